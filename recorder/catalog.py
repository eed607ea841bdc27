"""DuckDB views over the Parquet files of a data directory: one view per table."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import duckdb

from recorder.paths import is_day_file, is_packed_day_file
from recorder.schema import RECEIVED_DELAY_COLUMN, TABLES, Table, package_data_dir


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class FileSchemas:
    """Which Parquet files lack a column of their table, each file's footer read once.

    A file written before a column was added to ``schemas/tables.toml`` lacks it; DuckDB
    reads such files together with the others only with ``union_by_name``, which reads the
    footer of every file each time a query is bound (1-2 s for the 10,000 files of a
    20 M-message store). Every other file has all its table's columns, since the writer and
    the compactor write the current schema, so a table needs ``union_by_name`` only while one
    of its files lacks a column. Files are never rewritten in place (a new name holds new
    rows), so what a path says is kept for the life of the process. Files written later
    are taken to hold every column (a view made now reads them too); so once every file of a
    table folder had every column, the folder is ``settled`` and not listed again.
    """

    def __init__(self) -> None:
        self._complete: dict[str, bool] = {}
        self._settled: set[str] = set()
        self._lock = threading.Lock()

    def settled(self, root: Path) -> bool:
        """Whether every file under ``root`` had every column when it was last listed."""
        return str(root) in self._settled

    def lacking(self, files: Iterable[Path]) -> bool:
        """Whether one of ``files`` is known to lack a column (no file is read)."""
        known = self._complete
        return any(known.get(str(f)) is False for f in files)

    def check(
        self, table: Table, files: list[Path], con: duckdb.DuckDBPyConnection | None = None
    ) -> bool:
        """Read the footers not read yet; whether one of ``files`` lacks a column of ``table``.

        DuckDB reads them (``con``, whose footer cache then holds them, or a connection of
        its own): twice as fast as pyarrow in threads.
        """
        with self._lock:
            unknown = [str(f) for f in files if str(f) not in self._complete]
        if unknown:
            found = {
                name: expected_columns(table, name) <= set(columns)
                for name, columns in _columns(unknown, con)
            }
            with self._lock:
                self._complete.update(found)
        return self.lacking(files)

    def listed(self, root: Path, files: list[Path], lacking: bool) -> None:
        """Note the files found under ``root`` (those not among them are gone)."""
        prefix = str(root) + os.sep
        kept = {str(f) for f in files}
        with self._lock:
            for name in [n for n in self._complete if n.startswith(prefix) and n not in kept]:
                del self._complete[name]
            if files and not lacking:
                self._settled.add(str(root))
            else:
                self._settled.discard(str(root))


def expected_columns(table: Table, path: Path | str) -> set[str]:
    """The columns a file of ``table`` holds when written with the current schema, by its
    kind (see :mod:`recorder.paths` and :func:`split_files`)."""
    if not table.by_contract or not is_day_file(path):
        schema = table.contract_schema
    elif is_packed_day_file(path):
        schema = table.packed_day_schema
    else:
        schema = table.day_schema
    return set(schema.names)


def _columns(
    files: list[str], con: duckdb.DuckDBPyConnection | None
) -> list[tuple[str, list[str]]]:
    """The column names of each of ``files`` that still exists (a compaction removes files)."""
    own = con is None
    con = duckdb.connect(":memory:") if con is None else con
    sql = "SELECT file_name, list(name) FROM parquet_schema(?) GROUP BY ALL"
    try:
        try:
            return con.execute(sql, [files]).fetchall()
        except duckdb.IOException:
            present = [f for f in files if os.path.exists(f)]
            return con.execute(sql, [present]).fetchall() if present else []
    finally:
        if own:
            con.close()


#: what is known of the files of every data directory this process has read
SCHEMAS = FileSchemas()


def table_glob(data_dir: Path, table: Table) -> str:
    """The glob of the contract files of ``table`` (of every file, for a table not partitioned
    by contract); temporary files never match. See :mod:`recorder.paths` for the layout."""
    depth = "*/*" if table.by_contract else "*"
    return str(data_dir.resolve() / table.name / depth / "*.parquet")


def day_glob(data_dir: Path, table: Table) -> str:
    """The glob of the day files of ``table``, partitioned by contract (``{table}/date=D/``),
    but the compacted ones: a flush's name ends in a digit, a compacted day file's in
    ``.c`` (:func:`packed_day_glob`), so no file is read by both globs."""
    return str(data_dir.resolve() / table.name / "*" / "*[0-9].parquet")


def packed_day_glob(data_dir: Path, table: Table) -> str:
    """The glob of the compacted day files of ``table``, partitioned by contract
    (``{table}/date=D/{first}-{last}.c.parquet``, ``received_at`` packed)."""
    return str(data_dir.resolve() / table.name / "*" / "*.c.parquet")


def table_files(data_dir: Path, table: Table) -> list[Path]:
    """The files :func:`table_glob` and (partitioned by contract) :func:`day_glob` and
    :func:`packed_day_glob` match now."""
    days = [Path(e.path) for e in _entries(data_dir.resolve() / table.name) if e.is_dir()]
    files = []
    for day in days:
        for entry in _entries(day):
            if entry.name.endswith(".parquet"):
                files.append(Path(entry.path))
            elif table.by_contract and entry.is_dir():
                found = _entries(Path(entry.path))
                files.extend(Path(e.path) for e in found if e.name.endswith(".parquet"))
    return files


class FileKinds(NamedTuple):
    """The files of a table by kind (see :mod:`recorder.paths`), each read its own way
    (:func:`read_sql`). A table not partitioned by contract has only ``contract`` files:
    its files, compacted or not, hold the same columns."""

    contract: list[Path]
    day: list[Path]
    packed_day: list[Path]


def split_files(table: Table, files: Iterable[Path]) -> FileKinds:
    """``files`` of ``table`` by kind, each in the order given."""
    kinds = FileKinds([], [], [])
    for f in files:
        if not table.by_contract or not is_day_file(f):
            kinds.contract.append(f)
        elif is_packed_day_file(f):
            kinds.packed_day.append(f)
        else:
            kinds.day.append(f)
    return kinds


def _has_files(root: Path, pattern: str) -> bool:
    return next(root.glob(pattern), None) is not None


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def empty_view_sql(table: Table, temporary: bool = False) -> str:
    """A view of ``table`` with its columns and no row."""
    kind = "TEMP VIEW" if temporary else "VIEW"
    return f"CREATE OR REPLACE {kind} {table.name} AS {empty_sql(table)}"


def empty_sql(table: Table, delay: bool = False) -> str:
    """``SELECT`` every column of ``table``, typed, and no row; ``delay``: and
    :data:`~recorder.schema.RECEIVED_DELAY_COLUMN`."""
    empty = [f"NULL::{c.type} AS {c.name}" for c in table.columns]
    if delay:
        empty.append(f"NULL::BIGINT AS {RECEIVED_DELAY_COLUMN}")
    return f"SELECT {', '.join(empty)} WHERE false"


def read_sql(
    table: Table,
    source: str,
    union_by_name: bool,
    day_files: bool = False,
    may_be_empty: bool = False,
    packed: bool = False,
) -> str:
    """``SELECT`` every column of ``table``, typed, from ``read_parquet(source)``.

    Partition columns are typed explicitly (``date`` DATE, ``contract`` VARCHAR) so that
    numeric identifiers such as ``012345`` keep their zeros. Without ``union_by_name`` DuckDB
    takes the columns of the first file and fails on a file that lacks one of them (it never
    reads it as something else). ``day_files``: ``source`` names day files, whose folders
    name only the date and which hold ``contract`` as a column; ``packed``: compacted day
    files (which are day files too, ``received_at`` packed as in contract files).

    ``may_be_empty``: ``source`` is a glob that may match nothing, which then gives no row
    rather than an error (the files are read by name together with a typed empty row set),
    so a view made before a kind of file exists reads it once it does, and one made while it
    existed keeps working once compaction has removed the last of them. A column missing
    from the first file then reads as NULL instead of failing, so it is only for globs whose
    files :class:`FileSchemas` has checked (a file written later has every column).

    Contract files and compacted day files of a table that
    :attr:`~recorder.schema.Table.packs_received` hold ``received_at - exchange_ts`` (see
    :mod:`recorder.packing`); ``received_at`` is that plus ``exchange_ts``, or, in a file
    written before, its own column (such a file lacks a column, so it is read with
    ``union_by_name``, and the typed empty rows then give each file the column it lacks as
    NULL).
    """
    by_folder = table.by_contract and not (day_files or packed)
    delay = table.packs_received and (by_folder or packed)
    mixed = may_be_empty or union_by_name
    columns = ", ".join(_column_sql(c.name, c.type, delay, mixed) for c in table.columns)
    hive_types = "{'date': 'DATE'" + (", 'contract': 'VARCHAR'}" if by_folder else "}")
    union = ", union_by_name = true" if union_by_name else ""
    read = f"read_parquet({source}, hive_partitioning = true, hive_types = {hive_types}{union}"
    if not (may_be_empty or (union_by_name and delay)):
        return f"SELECT {columns} FROM {read})"
    empty = ", allow_empty = true" if may_be_empty else ""
    return (
        f"SELECT {columns} FROM (SELECT * FROM {read}{empty}) "
        f"UNION ALL BY NAME {empty_sql(table, delay)})"
    )


def _column_sql(name: str, kind: str, delay: bool, mixed: bool) -> str:
    """The select item of one column (see :func:`read_sql`)."""
    if not delay or name != "received_at":
        return f"{name}::{kind} AS {name}"
    added = f"exchange_ts + to_microseconds({RECEIVED_DELAY_COLUMN})"
    return f"coalesce(received_at, {added}) AS received_at" if mixed else f"{added} AS received_at"


def layered_sql(
    table: Table,
    contract_source: str | None,
    day_source: str | None,
    union_by_name: bool,
    may_be_empty: bool = False,
    packed_day_source: str | None = None,
) -> str:
    """``SELECT`` every row of ``table`` from its contract files, its day files and its
    compacted day files (a source is None when there is nothing to read); ``may_be_empty``:
    see :func:`read_sql`.

    DuckDB lists the sources in this order, one after the other: a compaction replaces
    files of the earlier kinds with files of a later one (day files by contract files in
    the ``contract`` layout, see :mod:`recorder.datefold`; every file of a date by one
    compacted day file in the ``date`` layout, :mod:`recorder.dayfold`). A query that lists
    the old kinds before a swap and the new one after it then opens an old file that is
    gone and fails, rather than missing rows or reading them twice.
    """
    selects = []
    if contract_source:
        selects.append(read_sql(table, contract_source, union_by_name, False, may_be_empty))
    if day_source:
        selects.append(read_sql(table, day_source, union_by_name, True, may_be_empty))
    if packed_day_source:
        packed = read_sql(table, packed_day_source, union_by_name, True, may_be_empty, True)
        selects.append(packed)
    return " UNION ALL ".join(selects) if selects else empty_sql(table)


def view_sql(
    data_dir: Path,
    table: Table,
    files: list[Path] | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> str:
    """The ``CREATE VIEW`` statement of one table, over its globs: files added later are read
    too, whichever kind (see :func:`read_sql`).

    ``union_by_name`` is used only while one of its files lacks a column (written before the
    column was added), see :class:`FileSchemas`, which reads the footers new to it with
    ``con``. ``files`` are the files the globs match now, listed when not given, unless the
    table's folder is settled (:meth:`FileSchemas.settled`).
    """
    root = data_dir.resolve() / table.name
    depth = "*/*/*.parquet" if table.by_contract else "*/*.parquet"
    if files is None and SCHEMAS.settled(root) and _has_files(root, depth):
        union = False
    else:
        files = table_files(data_dir, table) if files is None else files
        union = SCHEMAS.check(table, files, con) if files else False
        SCHEMAS.listed(root, files, union)
    by_contract = table.by_contract
    select = layered_sql(
        table,
        _quote(table_glob(data_dir, table)),
        _quote(day_glob(data_dir, table)) if by_contract else None,
        union,
        may_be_empty=True,
        packed_day_source=_quote(packed_day_glob(data_dir, table)) if by_contract else None,
    )
    return f"CREATE OR REPLACE VIEW {table.name} AS {select}"


def derived_views() -> list[str]:
    """The statements of ``schemas/views.sql`` (sessions, gaps, ...), in order."""
    text = (package_data_dir("schemas") / "views.sql").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def create_views(con: duckdb.DuckDBPyConnection, data_dir: Path) -> None:
    """(Re)create every view on ``con``; call again to see tables that gained files.

    The derived views are created over empty table views first: DuckDB binds a view when
    it is created, and binding a table's view lists all its files. The table views then
    replace the empty ones (a view is bound again, by name, at each query).
    """
    for table in TABLES.values():
        con.execute(empty_view_sql(table))
    for statement in derived_views():
        con.execute(statement)
    for table in TABLES.values():
        con.execute(view_sql(data_dir, table, con=con))


def connect(data_dir: str | Path, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """Open DuckDB with one view per table of ``data_dir``; timestamps are shown in UTC.

    The footers of the files are cached by the connection (a file is never rewritten in
    place), so the second query over the same files does not parse them again.
    """
    con = duckdb.connect(database)
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET parquet_metadata_cache = true")
    create_views(con, Path(data_dir))
    return con
