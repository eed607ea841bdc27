"""Tools for other programs: a DuckDB catalog file, and exports of a table to CSV or Parquet."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Literal

import duckdb

from recorder.catalog import create_views, layered_sql, split_files
from recorder.paths import encode_contract
from recorder.progress import progress
from recorder.schema import TABLES, Table

Format = Literal["csv", "parquet"]
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def write_catalog(data_dir: Path, output: Path) -> Path:
    """Write a DuckDB database file holding every view of ``data_dir`` (absolute paths).

    The file is built under a temporary name and renamed, so a client never opens half of it.
    """
    output = output.resolve()
    tmp = output.with_name(f".{output.name}.tmp")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        create_views(con, data_dir.resolve())
    finally:
        con.close()
    Path(f"{output}.wal").unlink(missing_ok=True)  # a stale log must not replay into the new file
    os.replace(tmp, output)
    return output


@dataclass(frozen=True)
class Bound:
    """One end of an export range: a whole local date, or an instant."""

    day: date
    instant: datetime | None = None  # None: the bound is the whole ``day``


def parse_bound(text: str, tz: tzinfo) -> Bound:
    """``YYYY-MM-DD`` (a whole date) or an ISO 8601 instant (naive: read in ``tz``)."""
    if _DATE.match(text):
        return Bound(date.fromisoformat(text))
    instant = datetime.fromisoformat(text)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=tz)
    return Bound(instant.astimezone(tz).date(), instant)


def _time_column(table: Table) -> str:
    names = [c.name for c in table.file_columns]
    return "exchange_ts" if "exchange_ts" in names else "received_at"


def select_files(
    data_dir: Path,
    table: Table,
    contracts: list[str] | None,
    start: Bound | None,
    end: Bound | None,
) -> list[Path]:
    """The Parquet files of the partitions in range: only those folders are listed and read.

    Per date, the contract files of ``contracts`` (every one: None) and the day files,
    compacted or not, which hold every contract (see :mod:`recorder.paths`;
    :func:`export_sql` picks their rows). An instant bound widens the date range by a day on
    each side, so a ``--timezone`` other than the recording's ``partition_timezone`` can cost
    reading more, never missing rows.
    """
    low = start.day - timedelta(days=1 if start.instant else 0) if start else date.min
    high = end.day + timedelta(days=1 if end.instant else 0) if end else date.max
    root = data_dir / table.name
    wanted = None if contracts is None else {f"contract={encode_contract(c)}" for c in contracts}
    files: list[Path] = []
    if not root.is_dir():
        return files
    for day_folder in sorted(root.glob("date=*")):
        try:
            day = date.fromisoformat(day_folder.name.removeprefix("date="))
        except ValueError:
            continue
        if not low <= day <= high:
            continue
        day_files = sorted(day_folder.glob("*.parquet"))  # listed first: see Store.files
        if table.by_contract:
            for folder in sorted(day_folder.glob("contract=*")):
                if wanted is None or folder.name in wanted:
                    files.extend(sorted(folder.glob("*.parquet")))
        files.extend(day_files)
    return files


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def export_sql(
    table: Table,
    files: list[Path],
    contracts: list[str] | None,
    start: Bound | None,
    end: Bound | None,
) -> str:
    """The query of an export: the rows of ``files`` in range, in (time, seq) order.

    Contract files, day files and compacted day files are read as the catalog's layers; the
    filter on ``contract`` picks the rows of both kinds of day file (DuckDB skips the row
    groups of other contracts).
    """
    kinds = split_files(table, files)
    source = layered_sql(
        table,
        _listing(kinds.contract),
        _listing(kinds.day),
        True,
        packed_day_source=_listing(kinds.packed_day),
    )
    where = []
    time_column = _time_column(table)
    for bound, op, date_op in ((start, ">=", ">="), (end, "<", "<=")):
        if bound is None:
            continue
        if bound.instant is None:
            where.append(f"date {date_op} DATE '{bound.day.isoformat()}'")
        else:
            where.append(f"{time_column} {op} TIMESTAMPTZ '{bound.instant.isoformat()}'")
    if contracts is not None and any(c.name == "contract" for c in table.columns):
        where.append("contract IN (" + ", ".join(_quote(c) for c in contracts) + ")")
    condition = " WHERE " + " AND ".join(where) if where else ""
    # time, seq, then every other column: the rows of one frame come out in a fixed order
    rest = [c.name for c in table.columns if c.name not in (time_column, "seq")]
    order = ", ".join([time_column, "seq", *rest])
    return f"SELECT * FROM ({source}){condition} ORDER BY {order}"


def _listing(files: list[Path]) -> str | None:
    return "[" + ", ".join(_quote(str(p)) for p in files) + "]" if files else None


def export(
    data_dir: Path,
    table_name: str,
    output: Path,
    fmt: Format,
    *,
    contracts: list[str] | None = None,
    start: Bound | None = None,
    end: Bound | None = None,
    bar: bool | None = None,
) -> int:
    """Write the rows of ``table_name`` in range to ``output``; returns how many.

    ``start`` is inclusive; ``end`` is inclusive for a date and exclusive for an instant. The
    output appears only once complete (written under a temporary name, then renamed).
    """
    table = TABLES[table_name]
    files = select_files(data_dir.resolve(), table, contracts, start, end)
    sql = export_sql(table, files, contracts, start, end)
    output = output.resolve()
    tmp = output.with_name(f".{output.name}.tmp")
    options = "FORMAT csv, HEADER true" if fmt == "csv" else "FORMAT parquet, COMPRESSION zstd"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = true")
    con.execute("SET enable_progress_bar_print = false")
    rows: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            row = con.execute(f"COPY ({sql}) TO {_quote(str(tmp))} ({options})").fetchone()
            rows.append(int(row[0]) if row else 0)
        except BaseException as exc:  # handed over to the calling thread
            errors.append(exc)

    worker = threading.Thread(target=run, name="export")
    try:
        with progress(100, f"exporting {table_name}", unit="%", bar=bar) as advance:
            worker.start()
            shown = 0.0
            while worker.is_alive():
                worker.join(0.1)
                percent = con.query_progress()
                if percent > shown:
                    advance(percent - shown)
                    shown = percent
            if errors:
                raise errors[0]
            advance(100 - shown)
        os.replace(tmp, output)
    except BaseException:
        con.interrupt()  # Ctrl-C: stop the query too
        if worker.ident is not None:
            worker.join()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        con.close()
    return rows[0]
