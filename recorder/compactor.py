"""The compactor: a partition's files rewritten as one sorted file, swapped in atomically.

A **contract partition** (a folder ``P`` holding files ``S``; or a date folder of a table not
partitioned by contract) is swapped as follows:

1. read ``S``, sort by (``exchange_ts``, ``seq``) (tables without ``exchange_ts``: by ``seq``)
   and write the result as ``{first}-{last}.c.parquet`` (the union of the seq ranges of
   ``S``) into a staging folder ``H = {data_dir}/_state/compaction/<P relative>``, which no
   view's glob reaches; read it back and compare it with what was meant to be written;
2. under the partition lock (:func:`recorder.writer.partition_lock`, which every write into
   ``P`` holds), list ``P`` again: if a file was added, give this attempt up;
3. exchange ``H`` and ``P`` in one ``renameat2(RENAME_EXCHANGE)``: readers and crash recovery
   see ``S`` or the compacted file, never both and never neither; then delete ``H`` (now ``S``).

A **date folder with day files** ``D = {table}/date=X`` of a table partitioned by contract
(see :mod:`recorder.paths`) is folded as a whole (:mod:`recorder.datefold`), and so is every
closed date in the ``date`` layout (``layout``, :mod:`recorder.dayfold`: one compacted day file
per table); the intraday merge of an open date's day files (:mod:`recorder.merging`) rewrites
``D`` too: all three swap the date folder with the same staging, locks
(:meth:`Compactor.date_locks`) and exchange.

**Crashes.** A crash leaves at most a staging folder, never needed (``P`` or ``D`` is whole
before and after the exchange), and a date fold's placeholders; every run starts by deleting
the staging folder. **Without the exchange** (EINVAL from a file system without it, EXDEV from
some overlayfs directories, no renameat2 outside Linux) the compacted files are renamed into
place first and what they replace is unlinked after: a reader may see rows twice during that
window. A crash in it leaves files that compacted files cover; the next run deletes the covered
files of a contract folder (:meth:`Compactor.remove_covered`, under the lock); a date fold
leaves them, and the rows of the day files they hold, out of the new date folder itself
(:mod:`recorder.datefold`).

The compacted file is written once and kept, so it is written for size
(:func:`recorder.packing.write_compacted`). The views return the same columns, types and values
as before it.

What a swap reads (listings, the plan of a date fold, the rows of each new file) is in
:mod:`recorder.folding`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from recorder.buffer import Key
from recorder.folding import (
    CONTRACT_FOLDER,
    TAG,
    DateListing,
    covered_files,
    is_compacted,
    list_date,
    read_sorted,
    sort_keys,
    visible_files,
)
from recorder.packing import COMPRESSION_LEVEL, pack_received, write_compacted
from recorder.paths import decode_contract, file_name, seq_range
from recorder.schema import TABLES, Table
from recorder.state import STATE_DIR, fsync_dir
from recorder.writer import partition_lock

log = structlog.get_logger("recorder.compactor")

STAGING = "compaction"  # {data_dir}/_state/compaction/<partition path>
#: contracts whose rows a date fold reads from the day files at once (its memory bound)
CHUNK_CONTRACTS = 64
_DATE_FOLDER = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
#: any contract: partition_lock of (table, date, contract) locks the date folder, whichever
_ANY_CONTRACT = "-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# EXDEV: overlayfs refuses to rename some directories (a file rename, the fallback, works)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}

#: called with a step name at each point of a swap; tests inject crashes here
Step = Callable[[str, Key], None]
#: what a closed date of a table partitioned by contract becomes (``compaction.layout``):
#: one compacted file per contract folder, or one compacted day file (:mod:`recorder.dayfold`)
Layout = Literal["contract", "date"]


class Outcome(Enum):
    COMPACTED = "compacted"
    CHANGED = "changed"  # a flush added a file meanwhile; the attempt was given up
    UNSAFE = "unsafe"  # foreign or overlapping files: left alone, with a warning


@dataclass(frozen=True)
class Partition:
    """What one swap rewrites: a partition folder and the Parquet files visible in it (sorted
    by name = seq), or a date folder holding day files (key ``(table, date, None)`` of a table
    partitioned by contract) and every file under it (day files, then ``contract=<c>/<name>``).
    """

    key: Key
    folder: Path
    files: tuple[str, ...]

    @property
    def compacted(self) -> bool:
        return len(self.files) == 1 and is_compacted(self.files[0])

    @property
    def date_fold(self) -> bool:
        """Whether this is a date folder, folded whole: into contract files (day files), or
        into one compacted day file (the ``date`` layout)."""
        return self.key[2] is None and TABLES[self.key[0]].by_contract


@dataclass(frozen=True)
class Done:
    """What one swap did."""

    outcome: Outcome
    partitions: int = 0  # contract (or date) folders rewritten as one compacted file
    files_before: int = 0  # the files it replaced
    bytes_before: int = 0
    bytes_after: int = 0
    rows: int = 0  # rows written


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        function.argtypes += [ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


class Compactor:
    """Compacts the partitions of one data directory; see the module docstring for the swap."""

    def __init__(
        self,
        data_dir: Path,
        compression_level: int = COMPRESSION_LEVEL,
        on_step: Step | None = None,
        swap: Callable[[Path, Path], bool] = exchange,
        chunk_contracts: int = CHUNK_CONTRACTS,
        layout: Layout = "contract",
        convert: bool = False,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.layout: Layout = layout
        self.convert = convert
        self.staging = self.data_dir / STATE_DIR / STAGING
        self.compression_level = compression_level
        self.chunk_contracts = chunk_contracts
        self._step: Step = on_step or (lambda _step, _key: None)
        self._swap = swap

    # ------------------------------------------------------------------ finding partitions

    def partitions(self, days: Callable[[date], bool]) -> Iterator[Partition]:
        """Every partition of a date that ``days`` accepts, table by table, in date order: a
        date folder holding day files, or folded into the ``date`` layout, as one (a date
        fold), else each contract folder."""
        for table in TABLES.values():
            root = self.data_dir / table.name
            if not root.is_dir():
                continue
            for day_folder in sorted(root.iterdir()):
                found = _DATE_FOLDER.match(day_folder.name)
                if not found or not day_folder.is_dir():
                    continue
                day = date.fromisoformat(found[1])
                if not days(day):
                    continue
                key: Key = (table.name, day.isoformat(), None)
                if not table.by_contract:
                    yield Partition(key, day_folder, visible_files(day_folder))
                    continue
                listing = list_date(day_folder)
                if self._folds(listing) or listing.day_files:
                    # folded whole, or one compacted day file kept as it is (settled)
                    yield Partition(key, day_folder, listing.paths())
                    continue
                for name in sorted(listing.contracts):
                    contract = decode_contract(name.removeprefix(CONTRACT_FOLDER))
                    key = (table.name, day.isoformat(), contract)
                    yield Partition(key, day_folder / name, listing.contracts[name])

    def _folds(self, listing: DateListing) -> bool:
        """Whether a date folder is one partition, folded whole (else each contract folder
        is one): it has day files, or it is to be made the ``date`` layout.

        A date compacted in the other layout (:data:`Layout`) is kept as it is, unless
        ``convert``: a date with work to do is folded in ``layout``, one without is only
        rewritten when asked."""
        one_day_file = len(listing.day_files) == 1 and is_compacted(listing.day_files[0])
        if self.layout == "contract":
            return bool(listing.day_files) and not (
                one_day_file and not listing.contracts and not self.convert
            )
        if listing.day_files:
            return not (one_day_file and not listing.contracts)
        compacted = all(len(n) == 1 and is_compacted(n[0]) for n in listing.contracts.values())
        return bool(listing.contracts) and (self.convert or not compacted)

    def settled(self, partition: Partition) -> bool:
        """Whether ``partition`` needs no work: one compacted file, in this layout, or in the
        other one unless ``convert`` (a date partition of one compacted day file, for the
        ``contract`` layout)."""
        if not partition.compacted:
            return False
        return not (partition.date_fold and self.layout == "contract" and self.convert)

    def relisted(self, partition: Partition) -> Partition:
        """``partition`` with the files it holds now."""
        if partition.date_fold:
            return Partition(partition.key, partition.folder, list_date(partition.folder).paths())
        return Partition(partition.key, partition.folder, visible_files(partition.folder))

    def remove_leftovers(self) -> int:
        """Delete the staging folder a crashed run left (never needed: see the module docstring)."""
        removed = 0
        if self.staging.exists():
            removed += sum(1 for p in self.staging.rglob("*") if p.is_file())
            shutil.rmtree(self.staging)
        return removed

    def remove_covered(self, partition: Partition) -> Partition:
        """Delete files that a compacted file of the same partition covers (fallback crashes).

        A date fold deletes nothing here: it leaves covered files and rows out itself.
        """
        if partition.date_fold or not any(is_compacted(n) for n in partition.files):
            return partition
        with partition_lock(self.data_dir, partition.key):
            names = visible_files(partition.folder)
            covered = covered_files(names)
            for name in covered:
                (partition.folder / name).unlink()
            if covered:
                fsync_dir(partition.folder)
                log.warning(
                    "removed files a compacted file already holds (an interrupted compaction)",
                    partition=str(partition.folder.relative_to(self.data_dir)),
                    files=len(covered),
                )
        return Partition(partition.key, partition.folder, visible_files(partition.folder))

    # ------------------------------------------------------------------ one partition

    def compact(self, partition: Partition) -> Done:
        """Compact one partition (or fold one date, :mod:`recorder.datefold`): see the module
        docstring."""
        if partition.date_fold and self.layout == "date":
            from recorder.dayfold import DayFold  # which imports this module

            return DayFold(self).fold(partition)
        if partition.date_fold:
            from recorder.datefold import DateFold  # which imports this module

            return DateFold(self).fold(partition)
        table = TABLES[partition.key[0]]
        spans = [seq_range(n) for n in partition.files]
        if any(s is None for s in spans):
            return Done(Outcome.UNSAFE)
        ranges = sorted(s for s in spans if s is not None)
        if any(a[1] >= b[0] for a, b in itertools.pairwise(ranges)):
            return Done(Outcome.UNSAFE)
        paths = [partition.folder / n for n in partition.files]
        data = read_sorted(paths, table.arrow_schema, sort_keys(table))
        if data is None:
            return Done(Outcome.UNSAFE)
        before = sum((partition.folder / n).stat().st_size for n in partition.files)
        name = file_name(ranges[0][0], ranges[-1][1], TAG)
        relative = partition.folder.relative_to(self.data_dir)
        staged = self.fresh_staging(partition.folder)
        size = self.write_verified(table, data, staged / name)
        self._step("staged", partition.key)
        self._step("verified", partition.key)
        with partition_lock(self.data_dir, partition.key):
            self._step("locked", partition.key)
            if visible_files(partition.folder) != partition.files:
                outcome = Outcome.CHANGED
            else:
                outcome = Outcome.COMPACTED
                self._install(partition, staged, name)
        shutil.rmtree(staged)
        self._step("cleaned", partition.key)
        self.prune(staged.parent)
        if outcome is not Outcome.COMPACTED:
            return Done(outcome)
        log.debug("compacted", partition=str(relative), rows=data.num_rows)
        return Done(outcome, 1, len(partition.files), before, size, data.num_rows)

    def _install(self, partition: Partition, staged: Path, name: str) -> None:
        """Make the compacted file the partition's only file (called under the partition lock)."""
        if self.exchange(staged, partition.folder):
            self._step("exchanged", partition.key)
            return
        # the file system cannot exchange: the compacted file first, then the old ones go
        os.rename(staged / name, partition.folder / name)
        fsync_dir(partition.folder)
        self._step("linked", partition.key)
        for old in partition.files:
            (partition.folder / old).unlink()
        fsync_dir(partition.folder)
        self._step("unlinked", partition.key)

    # ------------------------------------------------------------ shared with merges and folds

    @contextlib.contextmanager
    def date_locks(self, key: Key) -> Iterator[None]:
        """Both locks that order writes into the date folder of ``key`` (``(table, date,
        None)``): the one every flush of day files takes, then the one of contract files."""
        with (
            partition_lock(self.data_dir, key),  # the flushes of day files
            partition_lock(self.data_dir, (key[0], key[1], _ANY_CONTRACT)),  # contract files
        ):
            yield

    def step(self, name: str, key: Key) -> None:
        """Tell ``on_step`` that a swap reached step ``name`` (tests inject crashes there)."""
        self._step(name, key)

    def exchange(self, staged: Path, live: Path) -> bool:
        """Exchange ``staged`` and ``live`` and make it durable; False when the file system
        cannot (nothing changed then)."""
        if not self._swap(staged, live):
            return False
        fsync_dir(live.parent)
        fsync_dir(staged.parent)
        return True

    def drop_staging(self, staged: Path) -> None:
        """Delete a staging folder and the empty folders above it."""
        shutil.rmtree(staged)
        self.prune(staged.parent)

    # ------------------------------------------------------------------ files

    def fresh_staging(self, live: Path) -> Path:
        """An empty staging folder for the live folder ``live`` (one it had is deleted)."""
        staged = self.staging / live.relative_to(self.data_dir)
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        return staged

    def write_verified(self, table: Table, data: pa.Table, path: Path) -> int:
        """Write ``data`` as the compacted file ``path``, read it back and compare; its bytes."""
        written = self._write(table, data, path)
        back = pq.ParquetFile(path).read()
        if back.num_rows != data.num_rows or not back.equals(written):
            where = path.relative_to(self.staging)
            raise OSError(f"{where}: the file read back differs from what was written")
        return path.stat().st_size

    def _write(self, table: Table, data: pa.Table, path: Path) -> pa.Table:
        """Write ``data`` as the compacted file ``path``, durably; returns it as written."""
        tmp = path.with_name(f".{path.name}.tmp")
        packed = pack_received(table, data)
        written = write_compacted(packed, tmp, sort_keys(table), self.compression_level)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(tmp, path)
        fsync_dir(path.parent)
        return written

    def prune(self, folder: Path) -> None:
        """Remove empty staging folders, up to and including the staging root."""
        while folder.is_relative_to(self.staging):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent
