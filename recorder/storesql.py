"""The SQL behind :class:`recorder.store.Store`: views over file lists, filters, streamed reads."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb

from recorder.catalog import (
    SCHEMAS,
    derived_views,
    empty_sql,
    empty_view_sql,
    read_sql,
    split_files,
)
from recorder.flatten import Row
from recorder.schema import SOURCE_SNAPSHOT, TABLES, Table

TimeLike = datetime | date | str
#: the files a request reads, per table (contract files, day files and compacted day files,
#: see recorder.paths)
Files = dict[str, list[Path]]
_BATCH_ROWS = 8192


def to_utc(value: TimeLike) -> datetime:
    """A UTC datetime from a datetime (naive = UTC), a date (its midnight UTC) or ISO text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def sql_text(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def day_filter(contracts: Iterable[str] | None, without: Iterable[str] = ()) -> str:
    """The condition on ``contract`` under which a request reads the rows of day files, which
    hold every contract of their date: those of ``contracts`` (None: every one) not
    ``without`` (empty: no condition)."""
    terms = []
    if contracts is not None:
        terms.append("contract IN (" + (", ".join(map(sql_text, contracts)) or "NULL") + ")")
    excluded = ", ".join(map(sql_text, sorted(without)))
    if excluded:
        terms.append(f"contract NOT IN ({excluded})")
    return " AND ".join(terms)


def _listing(files: list[Path]) -> str:
    return "[" + ", ".join(sql_text(str(f)) for f in files) + "]"


def view_sql(
    table: Table,
    files: list[Path],
    union_by_name: bool = False,
    temporary: bool = False,
    rows: str = "",
    packed_rows: str | None = None,
) -> str:
    """A view of ``table`` over exactly ``files`` (the catalog's view, minus the globs).

    Contract files, day files and compacted day files are read as the catalog's layers;
    ``rows`` (see :func:`day_filter`) picks the rows of both kinds of day file, so that the
    view holds the same rows whichever kind of file they are in (the contract files were
    picked by their folders); ``packed_rows``, when given, those of compacted day files
    instead (an equivalent condition that their row-group statistics can prune by).
    """
    kinds = split_files(table, files)
    selects = [read_sql(table, _listing(kinds.contract), union_by_name)] if kinds.contract else []
    for listed, packed in ((kinds.day, False), (kinds.packed_day, True)):
        if listed:
            day = read_sql(table, _listing(listed), union_by_name, day_files=True, packed=packed)
            where = packed_rows if packed and packed_rows is not None else rows
            selects.append(f"{day} WHERE {where}" if where else day)
    kind = "TEMP VIEW" if temporary else "VIEW"
    select = " UNION ALL ".join(selects) if selects else empty_sql(table)
    return f"CREATE OR REPLACE {kind} {table.name} AS {select}"


class Database:
    """The DuckDB database of one :class:`~recorder.store.Store`, opened at its first request.

    Its settings and the derived views of ``schemas/views.sql`` are made once (~40 ms); a
    request then takes a cursor and binds only its table views, as temporary views: the
    cursor's own, so that requests in other threads, each on its own cursor, read theirs.
    A table without files keeps the database's empty view. Parquet footers are cached by
    the database (a file is never rewritten in place), so files read again are not parsed
    again; the files themselves are listed by each request, so new files are read.
    """

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()

    def cursor(
        self, files: Files, rows: str = "", packed_rows: str | None = None
    ) -> duckdb.DuckDBPyConnection:
        """A connection whose table views read exactly ``files``, the rows of day files under
        the condition ``rows`` (see :func:`day_filter`; ``packed_rows``: see :func:`view_sql`);
        close it when done."""
        with self._lock:
            if self._con is None:
                con = duckdb.connect(":memory:")
                con.execute("SET GLOBAL TimeZone = 'UTC'")
                con.execute("SET GLOBAL parquet_metadata_cache = true")
                for table in TABLES.values():
                    con.execute(empty_view_sql(table))
                for statement in derived_views():
                    con.execute(statement)
                self._con = con
            cursor = self._con.cursor()
        try:
            for name, listed in files.items():
                if listed:
                    union = SCHEMAS.lacking(listed)
                    view = view_sql(TABLES[name], listed, union, True, rows, packed_rows)
                    cursor.execute(view)
        except BaseException:
            cursor.close()
            raise
        return cursor

    def close(self) -> None:
        with self._lock:
            con, self._con = self._con, None
        if con is not None:
            con.close()


def lacking(files: Files) -> dict[str, bool]:
    """Per table, whether one of its ``files`` is known to lack a column."""
    return {name: SCHEMAS.lacking(listed) for name, listed in files.items()}


def recoverable(files: Files, known: dict[str, bool]) -> bool:
    """Whether a query over ``files`` that failed may succeed when tried again: a file is
    gone (compacted away: list again) or a table has a file that lacks a column and was not
    read as such (``known``, from :func:`lacking` before the query; read its footers now)."""
    if any(not f.exists() for listed in files.values() for f in listed):
        return True
    newly = [  # every table's, so that one more try reads all of them as they are
        bool(listed) and not known.get(name) and SCHEMAS.check(TABLES[name], listed)
        for name, listed in files.items()
    ]
    return any(newly)


def fork(con: duckdb.DuckDBPyConnection, name: str) -> duckdb.DuckDBPyConnection:
    """Another connection to ``con``'s database (to stream a second result at the same
    time) that sees what ``con`` sees as ``name``, its temporary view included."""
    cursor = con.cursor()
    row = con.execute(
        "SELECT sql FROM duckdb_views() WHERE temporary AND view_name = ?", [name]
    ).fetchone()
    if row is not None:
        cursor.execute(row[0])
    return cursor


def contract_filter(contracts: list[str] | None, column: str = "contract") -> tuple[str, list[Any]]:
    if contracts is None:
        return "", []
    marks = ", ".join("?" for _ in contracts) or "NULL"
    return f"WHERE {column} IN ({marks})", list(contracts)


def table_query(
    name: str,
    columns: list[str],
    contracts: list[str] | None,
    start: TimeLike | None,
    end: TimeLike | None,
) -> tuple[str, list[Any]]:
    """The SELECT of :meth:`Store.table`: the filters and order that fit the columns."""
    where: list[str] = []
    params: list[Any] = []
    if contracts is not None and "contract" in columns:
        where.append(contract_filter(contracts)[0].removeprefix("WHERE "))
        params.extend(contracts)
    elif contracts is not None and "contracts" in columns:
        where.append("list_has_any(contracts, ?::VARCHAR[])")
        params.append(contracts)
    time_column = next((c for c in ("exchange_ts", "received_at") if c in columns), None)
    span = {"gaps": ("gap_start", "gap_end"), "sessions": ("opened_at", "closed_at")}.get(name)
    if start is not None:
        if span is not None:
            where.append(f"coalesce({span[1]}, 'infinity'::TIMESTAMPTZ) > ?")
        elif time_column is not None:
            where.append(f"{time_column} >= ?")
        params.append(to_utc(start))
    if end is not None:
        if span is not None:
            where.append(f"{span[0]} < ?")
        elif time_column is not None:
            where.append(f"{time_column} < ?")
        params.append(to_utc(end))
    if (start is not None or end is not None) and span is None and time_column is None:
        raise ValueError(f"{name} has no time column to filter on")
    # the rows of one frame in extras differ only in section and json: ordered by them too,
    # so that the order does not depend on the files' order (DuckDB's sort is not stable)
    keys = (time_column, "seq", "level", "section", "json")
    order: list[str] = [c for c in keys if c is not None and c in columns]
    if span is not None:
        # sessions opened at once (one per connection) by name, so the order is fixed
        order = [c for c in ("contract", span[0], "session") if c in columns or c == span[0]]
    sql = f"SELECT * FROM {name}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if order:
        sql += " ORDER BY " + ", ".join(order)
    return sql, params


Part = tuple[int, int, str, str, list[Row]]


def time_filter(start: TimeLike | None, end: TimeLike | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if start is not None:
        where.append("exchange_ts >= ?")
        params.append(to_utc(start))
    if end is not None:
        where.append("exchange_ts < ?")
        params.append(to_utc(end))
    return where, params


def frames(
    name: str,
    con: duckdb.DuckDBPyConnection,
    start: TimeLike | None,
    end: TimeLike | None,
    snapshots: bool = True,
) -> Iterator[Part]:
    """One table's rows grouped per message, in ``(exchange_ts, seq)`` order (streamed)."""
    table = TABLES[name]
    if name == "extras":
        values = ["section", "level", "json"]
    else:
        values = (["level"] if table.levels else []) + [c.name for c in table.wire_columns]
    where, params = time_filter(start, end)
    if not snapshots and any(c.name == "source" for c in table.columns):
        where.append(f"source IS DISTINCT FROM {sql_text(SOURCE_SNAPSHOT)}")
    order = "exchange_ts, seq" + (", level" if table.levels else "")
    sql = (
        f"SELECT epoch_us(exchange_ts) AS us, seq, contract, {', '.join(values)} FROM {name}"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY {order}"
    )
    reader = con.sql(sql, params=params).to_arrow_reader(_BATCH_ROWS)
    current: Part | None = None
    for batch in reader:
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for record in zip(*columns, strict=True):  # us, seq, contract, then the row
            if current is None or current[1] != record[1]:
                if current is not None:
                    yield current
                current = (record[0], record[1], record[2], name, [])
            current[4].append(record[3:])
    if current is not None:
        yield current
