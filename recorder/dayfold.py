"""The day fold: a closed date's files folded into one compacted day file per table.

In the ``date`` layout (``compaction.layout``, see :mod:`recorder.paths`) a closed date
folder ``D = {table}/date=X`` of a table partitioned by contract becomes one file,
``{table}/date=X/{first}-{last}.c.parquet``, ordered by (hour of ``exchange_ts``, contract,
``exchange_ts``, seq). Why: the state of every contract at an instant (the as-of) then reads
the row groups of one hour of one file, where the ``contract`` layout opens a file per
contract and table (2,000 on the query benchmark's store, which costs more than the whole
200 ms target). Within an hour, a contract's rows are contiguous, so a one-contract read
still skips the other contracts' row groups by their ``contract`` statistics. The order
costs ~5 % of the bytes against one file per contract (the hour cuts each contract's runs).

The fold swaps ``D`` with the staging, locks and exchange of
:class:`recorder.compactor.Compactor`, like :class:`recorder.datefold.DateFold`:

1. list ``D``; plan what each file gives (:func:`plan_day`): every day file and every
   contract file, but those a compacted file already holds (the leftovers of a fold without
   the exchange, below); the new file is named with the lowest and highest seq of them all,
   so recovery's rule (a frame's rows are stored once a day file of the date names a seq at
   or above it, :class:`recorder.recovery.HighWater`) gives the same answer after the swap;
2. write the new file into the staging folder ``H`` (``_state/compaction/{table}/date=X``):
   DuckDB reads the sources and sorts their rows (spilling to ``H`` beyond
   :data:`MEMORY_LIMIT`, so a date of any size folds in bounded memory); its batches are
   written in the compacted layout, a row group per hour or less (:mod:`recorder.daywrite`).
   The file is then read back: its row count and a checksum of every value of every row
   must equal the sources';
3. under both locks of the date folder (:meth:`Compactor.date_locks`), list ``D`` again; if
   anything changed, give this attempt up;
4. exchange ``H`` and ``D``, release the locks and delete ``H`` (now the old ``D``).

**Readers** list contract files, day files and compacted day files in that order
(:func:`recorder.catalog.layered_sql`). Every file of the old ``D`` is gone from the new one,
so a query that listed one of them before the swap and opens it after fails rather than
missing or doubling rows.

**Without the exchange** the new file is renamed into ``D`` first and the old files are
unlinked after (a reader may see rows twice meanwhile). A crash in between leaves old files
whose seq ranges lie inside the new file's: the next fold leaves them out (step 1), as it
leaves out the day rows of a contract whose compacted contract file's range holds them (the
same window of a fold in the ``contract`` layout, :mod:`recorder.datefold`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import structlog

from recorder.buffer import Key
from recorder.compactor import Compactor, Done, Outcome, Partition
from recorder.daywrite import HOUR_US, write_day_file
from recorder.folding import (
    CONTRACT_FOLDER,
    TAG,
    DateListing,
    Unsafe,
    covered_files,
    file_size,
    is_compacted,
    is_placeholder,
    list_date,
    span,
)
from recorder.packing import ROW_GROUP_ROWS
from recorder.paths import decode_contract, file_name
from recorder.schema import CONTRACT_COLUMN, RECEIVED_DELAY_COLUMN, TABLES, Table
from recorder.state import fsync_dir
from recorder.storesql import sql_text

log = structlog.get_logger("recorder.dayfold")

#: DuckDB's memory for reading and sorting a date's rows; beyond it the sort spills to disk
MEMORY_LIMIT = "256MB"


@dataclass(frozen=True)
class DayPlan:
    """What a day fold reads and writes."""

    day_files: tuple[str, ...]  # read whole, whether packed (``.c``) or not
    contract_files: tuple[str, ...]  # contract=<encoded>/<name>, read whole
    covers: tuple[tuple[str, int, int], ...]  # (contract, first, last): day rows held already
    name: str  # of the new compacted day file
    replaced: tuple[str, ...]  # every file of the listing, relative to the date folder


def plan_day(listing: DateListing) -> DayPlan | None:
    """The plan of folding ``listing`` into one compacted day file; None when it is one
    already. Unsafe: a foreign entry, or files whose seq ranges overlap where they must not."""
    if listing.foreign:
        raise Unsafe("a foreign entry in the date folder")
    contract_names = [(f, n) for f, names in sorted(listing.contracts.items()) for n in names]
    if not contract_names and len(listing.day_files) == 1 and is_compacted(listing.day_files[0]):
        return None
    real = [*listing.day_files, *(n for _, n in contract_names if not is_placeholder(n))]
    if not real:
        return None
    every = [span(n) for n in real]
    name = file_name(min(s[0] for s in every), max(s[1] for s in every), TAG)
    covered = set(covered_files(listing.day_files))
    days = tuple(n for n in listing.day_files if n not in covered)
    if _overlap(days):
        raise Unsafe("overlapping day files")
    holders = [span(n) for n in days if is_compacted(n)]
    contract_files: list[str] = []
    covers: list[tuple[str, int, int]] = []
    for folder, names in sorted(listing.contracts.items()):
        real_names = [n for n in names if not is_placeholder(n) and not _inside(span(n), holders)]
        inside = set(covered_files(real_names))
        kept = [n for n in real_names if n not in inside]
        if _overlap(kept):
            raise Unsafe(folder)
        contract = decode_contract(folder.removeprefix(CONTRACT_FOLDER))
        covers += [(contract, *span(n)) for n in kept if is_compacted(n)]
        contract_files += [f"{folder}/{n}" for n in kept]
    return DayPlan(days, tuple(contract_files), tuple(covers), name, listing.paths())


def _overlap(names: list[str] | tuple[str, ...]) -> bool:
    return any(a[1] >= b[0] for a, b in itertools.pairwise(sorted(span(n) for n in names)))


def _inside(inner: tuple[int, int], holders: list[tuple[int, int]]) -> bool:
    return any(h[0] <= inner[0] and inner[1] <= h[1] for h in holders)


class DayFold:
    """Folds date folders into one compacted day file each, with the staging, locks and
    exchange of ``compactor`` (whose ``on_step`` hook sees the steps staged, verified,
    locked, exchanged, or linked and unlinked without the exchange, and cleaned)."""

    def __init__(self, compactor: Compactor) -> None:
        self.compactor = compactor

    def fold(self, partition: Partition) -> Done:
        """Fold a date folder into one compacted day file (see the module docstring)."""
        table, key, live = TABLES[partition.key[0]], partition.key, partition.folder
        listing = list_date(live)
        try:
            plan = plan_day(listing)
        except Unsafe:
            return Done(Outcome.UNSAFE)
        if plan is None:
            return Done(Outcome.CHANGED)  # folded meanwhile (by another process)
        before = sum(file_size(live, n) for n in plan.replaced)
        staged = self.compactor.fresh_staging(live)
        try:
            rows = self._build(table, live, plan, staged / plan.name)
        except Unsafe:
            self.compactor.drop_staging(staged)
            return Done(Outcome.UNSAFE)
        except BaseException:
            self.compactor.drop_staging(staged)
            raise
        self.compactor.step("staged", key)
        self.compactor.step("verified", key)
        with self.compactor.date_locks(key):
            self.compactor.step("locked", key)
            if list_date(live) != listing:
                outcome = Outcome.CHANGED
            else:
                outcome = Outcome.COMPACTED
                self._install(key, live, staged, plan)
        shutil.rmtree(staged)
        self.compactor.step("cleaned", key)
        self.compactor.prune(staged.parent)
        if outcome is not Outcome.COMPACTED:
            return Done(outcome)
        after = (live / plan.name).stat().st_size
        log.debug("folded a date", date=str(live.relative_to(self.compactor.data_dir)), rows=rows)
        return Done(outcome, 1, len(plan.replaced), before, after, rows)

    def _build(self, table: Table, live: Path, plan: DayPlan, path: Path) -> int:
        """Write the new file at ``path``, durably, and check it; its rows."""
        source = source_sql(table, live, plan)
        with _duckdb(path.parent) as con:
            expected = con.execute(checksum_sql(table, source)).fetchall()[0]
            rows, complete = int(expected[0]), [bool(c) for c in expected[2:]]
            if not complete[table.day_schema.get_field_index(CONTRACT_COLUMN)]:
                raise Unsafe("a row without a contract")
            order = _order_sql(table)
            reader = con.sql(f"SELECT * EXCLUDE (_file, _row) FROM ({source}) ORDER BY {order}")
            tmp = path.with_name(f".{path.name}.tmp")
            level = self.compactor.compression_level
            batches = reader.to_arrow_reader(ROW_GROUP_ROWS)
            written = write_day_file(table, batches, tmp, complete, level)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.rename(tmp, path)
            fsync_dir(path.parent)
            back = con.execute(checksum_sql(table, packed_sql(table, path))).fetchall()[0]
        if written != rows or back != expected:
            where = path.relative_to(self.compactor.staging)
            raise OSError(f"{where}: the file read back differs from its sources")
        return rows

    def _install(self, key: Key, live: Path, staged: Path, plan: DayPlan) -> None:
        """Make the staged date folder the live one (called under both locks)."""
        if self.compactor.exchange(staged, live):
            self.compactor.step("exchanged", key)
            return
        # the file system cannot exchange: the new file first (a reader may see its rows
        # twice until the rest is gone), then every file it replaces
        os.replace(staged / plan.name, live / plan.name)
        fsync_dir(live)
        self.compactor.step("linked", key)
        for name in plan.replaced:
            with contextlib.suppress(FileNotFoundError):
                (live / name).unlink()
        for folder in {n.split("/")[0] for n in plan.replaced if "/" in n}:
            with contextlib.suppress(OSError):  # not empty: a placeholder-less leftover
                (live / folder).rmdir()
        fsync_dir(live)
        self.compactor.step("unlinked", key)


@contextlib.contextmanager
def _duckdb(spill: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection of the fold's own: UTC, bounded memory, spilling into ``spill``."""
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
        con.execute(f"SET temp_directory = {sql_text(str(spill / '.spill'))}")
        yield con
    finally:
        con.close()


# ---------------------------------------------------------------------------------- the SQL


def source_sql(table: Table, live: Path, plan: DayPlan) -> str:
    """Every row the new file holds, in the day schema, with ``_file`` and ``_row`` (each
    file's rows keep their order: one frame's rows sort by them within its seq)."""
    selects = []
    for columns, paths in _groups([live / n for n in plan.day_files], day=True):
        selects.append(_select(table, columns, paths, day=True))
    day_rows = " UNION ALL ".join(selects)
    if day_rows and plan.covers:
        covers = ", ".join(f"({sql_text(c)}, {lo}, {hi})" for c, lo, hi in plan.covers)
        day_rows = (
            f"SELECT d.* FROM ({day_rows}) d ANTI JOIN (VALUES {covers}) AS k(contract, lo, hi) "
            "ON d.contract = k.contract AND d.seq BETWEEN k.lo AND k.hi"
        )
    selects = [day_rows] if day_rows else []
    for columns, paths in _groups([live / n for n in plan.contract_files], day=False):
        selects.append(_select(table, columns, paths, day=False))
    return " UNION ALL ".join(f"({s})" for s in selects)


def _groups(paths: list[Path], day: bool) -> list[tuple[frozenset[str], list[Path]]]:
    """``paths`` grouped by the columns their footers name (one ``read_parquet`` each).

    Unsafe: a file with a column the table does not know (folding would drop it)."""
    groups: dict[frozenset[str], list[Path]] = {}
    for path in paths:
        span(path.name)
        names = frozenset(pq.ParquetFile(path).schema_arrow.names)
        groups.setdefault(names, []).append(path)
    return sorted(groups.items(), key=lambda g: str(g[1][0]))


def _select(table: Table, columns: frozenset[str], paths: list[Path], day: bool) -> str:
    known = {*table.day_schema.names, RECEIVED_DELAY_COLUMN}
    if columns - known or (day and CONTRACT_COLUMN not in columns):
        raise Unsafe(str(paths[0]))
    items = []
    for field in table.file_columns:
        if field.name == "received_at" and RECEIVED_DELAY_COLUMN in columns:
            value = f"exchange_ts + to_microseconds({RECEIVED_DELAY_COLUMN})"
        elif field.name in columns:
            value = f'"{field.name}"'
        else:
            value = "NULL"
        items.append(f'({value})::{field.type} AS "{field.name}"')
    items.append(f"{CONTRACT_COLUMN}::VARCHAR AS {CONTRACT_COLUMN}")
    files = ", ".join(sql_text(str(p)) for p in paths)
    hive = "" if day else ", hive_partitioning = true, hive_types = {'contract': 'VARCHAR'}"
    read = f"read_parquet([{files}], filename = true, file_row_number = true{hive})"
    return f"SELECT {', '.join(items)}, filename AS _file, file_row_number AS _row FROM {read}"


def packed_sql(table: Table, path: Path) -> str:
    """The rows of a compacted day file, in the day schema (``received_at`` unpacked)."""
    columns = frozenset(table.packed_day_schema.names)
    return _select(table, columns, [path], day=True)


def checksum_sql(table: Table, source: str) -> str:
    """Row count, a checksum of every value of every row, and per column whether it holds
    no null (those are written REQUIRED)."""
    names = [f'"{n}"' for n in table.day_schema.names]
    complete = ", ".join(f"count({n}) = count(*)" for n in names)
    row = f"hash({', '.join(names)})::HUGEINT"
    return f"SELECT count(*), coalesce(sum({row}), 0), {complete} FROM ({source})"


def _order_sql(table: Table) -> str:
    """The order of a compacted day file (see the module docstring)."""
    if "exchange_ts" not in table.day_schema.names:
        return f"{CONTRACT_COLUMN}, seq, _file, _row"
    return f"epoch_us(exchange_ts) // {HOUR_US}, {CONTRACT_COLUMN}, exchange_ts, seq, _file, _row"
