"""The date fold: a date folder's day files folded into one compacted file per contract.

A **date folder with day files** ``D = {table}/date=X`` of a table partitioned by contract
(see :mod:`recorder.paths`) is folded as a whole, with the staging, locks and exchange of
:class:`recorder.compactor.Compactor`:

1. list ``D`` (its day files, and the files of each ``contract=`` folder); read the
   ``contract`` column of the day files. A contract that has rows in the day files but no file
   of its own gets a *placeholder*, ``{s}-{s}.p.parquet`` with no row (``s``: the lowest seq
   of the day files), in its folder, now, in the live ``D``: see "readers" below. List ``D``
   again: if a day file came meanwhile, give this attempt up (the contracts of its rows were
   not read, and one whose folder is already one compacted file would be kept as it is while
   the new day file is left out of the new ``D``);
2. build the whole new date folder ``H = {data_dir}/_state/compaction/{table}/date=X``: for
   each contract with rows in the day files, or whose folder is not one compacted file, one
   compacted file of its rows (its folder's files and its rows of the day files, read a chunk
   of contracts at a time with a filter on ``contract``) named with the seq range of its
   folder's files and of *every* day file of the date; a hard link for every other contract
   file (its folder is already one compacted file); no day file. Each file is read back
   (:meth:`Compactor.write_verified`);
3. under both locks that order writes into ``D`` (:meth:`Compactor.date_locks`:
   ``partition_lock((table, X, None))`` on ``{table}``, taken by the flushes of day files,
   then the one on ``D`` itself, taken by the writes of contract files), list ``D`` again; if
   anything changed, give this attempt up (the placeholders stay: they hold no row and are
   folded next time);
4. exchange ``H`` and ``D``, release the locks and delete ``H`` (now the old ``D``).

Recovery's rule (a frame's rows in (table, date, contract) are stored once a day file of
the date or a file of the contract's folder names a seq at or above the frame's) gives the
same answer before and after the fold for every frame that has rows there: a new file names
the highest seq of every day file it replaces, and a placeholder names a seq the day files
already name. (A contract without rows in the date loses the day files' cover, which no frame
of it needed.)

**Readers.** A DuckDB view lists the contract files and the day files with two globs, one after
the other (see :func:`recorder.catalog.layered_sql`), so a query can list the contract files
of the old ``D`` and the day files of the new one. Every file it listed in the old ``D`` that is
not in the new one fails to open ("No files found" / "No such file"), so such a query fails
rather than missing rows: the contracts whose rows move have a file in the old ``D`` that
the new one lacks (their replaced files, or their placeholder, in place since step 1). The
same holds for a query that lists both in the old ``D`` and opens the files after the swap.

**Crashes.** A crash leaves at most the staging folder ``H``, which the next run deletes
(``D`` is whole before and after the exchange), and placeholders. **Without the exchange**
(see :mod:`recorder.compactor`) the compacted files are renamed into place first, then the day
files and the files the new ones replace are unlinked: a reader may see rows twice during that
window. A crash in it leaves files that compacted files cover; the next run deletes the covered
files of a contract folder (:meth:`Compactor.remove_covered`, under the lock) and, folding a
date that still has day files, leaves out of each contract's new file its rows of the day files
whose seq lies in the range of one of its compacted files (they are in that file: every day
file that existed before the swap was one of its sources, and later flushes hold later
seqs). A day file is never deleted before every contract's rows of it are in place.

What the fold reads (the listing of ``D``, the plan of each contract folder, the rows of each
new file) is in :mod:`recorder.folding`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import structlog

from recorder.buffer import Key
from recorder.compactor import Compactor, Done, Outcome, Partition
from recorder.folding import (
    CONTRACT_FOLDER,
    PLACEHOLDER,
    ContractPlan,
    DateListing,
    Unsafe,
    contract_rows,
    day_contracts,
    file_size,
    is_placeholder,
    list_date,
    plan_fold,
    read_days,
    span,
)
from recorder.paths import encode_contract, file_name
from recorder.schema import TABLES, Table
from recorder.state import fsync_dir

log = structlog.get_logger("recorder.datefold")


class DateFold:
    """Folds the day files of date folders, with the staging, locks, exchange and compacted
    files of ``compactor`` (whose ``on_step`` hook sees the steps placed, staged, verified,
    locked, exchanged, or linked and unlinked without the exchange, and cleaned)."""

    def __init__(self, compactor: Compactor) -> None:
        self.compactor = compactor

    def fold(self, partition: Partition) -> Done:
        """Fold a date folder's day files into one compacted file per contract folder."""
        table, key, live = TABLES[partition.key[0]], partition.key, partition.folder
        listing = list_date(live)
        if not listing.day_files:
            return Done(Outcome.CHANGED)  # folded meanwhile (by another process)
        try:
            if listing.foreign:
                raise Unsafe(str(live))
            in_days = day_contracts(table, [live / n for n in listing.day_files])
            plan_fold(listing, in_days, placed=False)  # names and ranges checked before any write
            self._place_holders(table, live, listing, in_days)
            self.compactor.step("placed", key)
            placed = list_date(live)
            if placed.day_files != listing.day_files:
                # a flush landed since the contracts were read: its rows' contracts would be
                # missing from in_days, and a contract whose folder is one compacted file
                # would be kept as it is while the new day file is dropped
                return Done(Outcome.CHANGED)
            listing = placed
            plans = plan_fold(listing, in_days)
        except Unsafe:
            return Done(Outcome.UNSAFE)
        replaced = [*listing.day_files]
        for plan in plans:
            replaced += [f"{plan.folder}/{n}" for n in plan.replaced if not is_placeholder(n)]
        before = sum(file_size(live, n) for n in replaced)
        staged = self.compactor.fresh_staging(live)
        try:
            rows, after, written = self._build(table, live, staged, listing, plans)
        except Unsafe:
            shutil.rmtree(staged)
            self.compactor.prune(staged.parent)
            return Done(Outcome.UNSAFE)
        self.compactor.step("staged", key)
        self.compactor.step("verified", key)  # each file was read back as it was written
        with self.compactor.date_locks(key):
            self.compactor.step("locked", key)
            if list_date(live) != listing:
                outcome = Outcome.CHANGED
            else:
                outcome = Outcome.COMPACTED
                self._install_date(key, live, staged, listing, plans)
        shutil.rmtree(staged)
        self.compactor.step("cleaned", key)
        self.compactor.prune(staged.parent)
        if outcome is not Outcome.COMPACTED:
            return Done(outcome)
        log.debug(
            "folded day files", date=str(live.relative_to(self.compactor.data_dir)), rows=rows
        )
        return Done(outcome, written, len(replaced), before, after, rows)

    def _place_holders(
        self, table: Table, live: Path, listing: DateListing, in_days: set[str]
    ) -> None:
        """Give each contract with rows in the day files and no file of its own a row-less
        file (see "readers" in the module docstring), named by a seq the day files name."""
        first = min(span(n)[0] for n in listing.day_files)
        for contract in sorted(in_days):
            folder = live / (CONTRACT_FOLDER + encode_contract(contract))
            if listing.contracts.get(folder.name):
                continue
            folder.mkdir(exist_ok=True)
            path = folder / file_name(first, first, PLACEHOLDER)
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(table.contract_schema.empty_table(), tmp)
            os.rename(tmp, path)

    def _build(
        self,
        table: Table,
        live: Path,
        staged: Path,
        listing: DateListing,
        plans: list[ContractPlan],
    ) -> tuple[int, int, int]:
        """Write the new date folder into ``staged``; returns its new rows, bytes and files."""
        rows = size = files = 0
        for plan in plans:
            (staged / plan.folder).mkdir()
            if plan.name is None:
                for name in plan.sources:
                    os.link(live / plan.folder / name, staged / plan.folder / name)
        day_paths = [live / n for n in listing.day_files]
        rewritten = [p for p in plans if p.name is not None]
        for start in range(0, len(rewritten), self.compactor.chunk_contracts):
            chunk = rewritten[start : start + self.compactor.chunk_contracts]
            days = read_days(table, day_paths, [p.contract for p in chunk])
            for plan in chunk:
                data, added = contract_rows(table, live / plan.folder, plan, days)
                if added and plan.name in listing.contracts[plan.folder]:
                    raise Unsafe(f"{plan.folder}/{plan.name} would change under its name")
                if data.num_rows == 0:
                    continue  # a contract folder with nothing but placeholders
                assert plan.name is not None
                size += self.compactor.write_verified(table, data, staged / plan.folder / plan.name)
                rows += data.num_rows
                files += 1
        fsync_dir(staged)
        return rows, size, files

    def _install_date(
        self, key: Key, live: Path, staged: Path, listing: DateListing, plans: list[ContractPlan]
    ) -> None:
        """Make the staged date folder the live one (called under both locks)."""
        if self.compactor.exchange(staged, live):
            self.compactor.step("exchanged", key)
            return
        # the file system cannot exchange: the compacted files first (a reader may see their
        # rows twice until the rest is gone), then the day files, then what the files replace
        for plan in plans:
            if plan.name is not None and (staged / plan.folder / plan.name).exists():
                os.replace(staged / plan.folder / plan.name, live / plan.folder / plan.name)
                fsync_dir(live / plan.folder)
        self.compactor.step("linked", key)
        for name in listing.day_files:
            (live / name).unlink()
        fsync_dir(live)
        for plan in plans:
            for name in plan.replaced:
                if name != plan.name:
                    (live / plan.folder / name).unlink()
            if plan.replaced:
                fsync_dir(live / plan.folder)
        self.compactor.step("unlinked", key)
