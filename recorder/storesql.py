"""The SQL behind :class:`recorder.store.Store`: views over file lists, filters, streamed reads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb

from recorder.flatten import Row
from recorder.pipeline import SOURCE_SNAPSHOT
from recorder.schema import TABLES, Table

SNAPSHOT = SOURCE_SNAPSHOT  # the `source` of a message fetched as a live overview
TimeLike = datetime | date | str
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


def view_sql(table: Table, files: list[Path]) -> str:
    """A view of ``table`` over exactly ``files`` (the catalog's view, minus the glob)."""
    if not files:
        empty = ", ".join(f"NULL::{c.type} AS {c.name}" for c in table.columns)
        return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {empty} WHERE false"
    columns = ", ".join(f"{c.name}::{c.type} AS {c.name}" for c in table.columns)
    hive_types = "{'date': 'DATE'" + (", 'contract': 'VARCHAR'}" if table.by_contract else "}")
    listing = "[" + ", ".join(sql_text(str(f)) for f in files) + "]"
    source = (
        f"read_parquet({listing}, hive_partitioning = true, hive_types = {hive_types}, "
        "union_by_name = true)"
    )
    return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {columns} FROM {source}"


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
    order: list[str] = [c for c in (time_column, "seq", "level") if c is not None and c in columns]
    if span is not None:
        order = ["contract", span[0]] if "contract" in columns else [span[0]]
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
        where.append(f"source IS DISTINCT FROM {sql_text(SNAPSHOT)}")
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
        for us, seq, contract, *row in zip(*columns, strict=True):
            if current is None or current[1] != seq:
                if current is not None:
                    yield current
                current = (us, seq, contract, name, [])
            current[4].append(tuple(row))
    if current is not None:
        yield current
