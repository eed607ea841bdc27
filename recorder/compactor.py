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
(see :mod:`recorder.paths`) is folded as a whole:

1. list ``D`` (its day files, and the files of each ``contract=`` folder); read the
   ``contract`` column of the day files. A contract that has rows in the day files but no file
   of its own gets a *placeholder*, ``{s}-{s}.p.parquet`` with no row (``s``: the lowest seq
   of the day files), in its folder, now, in the live ``D``: see "readers" below;
2. build the whole new date folder ``H = {data_dir}/_state/compaction/{table}/date=X``: for
   each contract with rows in the day files, or whose folder is not one compacted file, one
   compacted file of its rows (its folder's files and its rows of the day files, read a chunk
   of contracts at a time with a filter on ``contract``) named with the seq range of its
   folder's files and of *every* day file of the date; a hard link for every other contract
   file (its folder is already one compacted file); no day file. Each file is read back;
3. under both locks that order writes into ``D`` (``partition_lock((table, X, None))`` on
   ``{table}``, taken by the flushes of day files, then the one on ``D`` itself, taken by the
   writes of contract files), list ``D`` again; if anything changed, give this attempt up
   (the placeholders stay: they hold no row and are folded next time);
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

**Crashes.** A crash leaves at most a staging folder, never needed (``P`` or ``D`` is whole
before and after the exchange), and placeholders; every run starts by deleting the staging
folder. **Without the exchange** (EINVAL from a file system without it, EXDEV from some
overlayfs directories, no renameat2 outside Linux) the compacted files are renamed into place
first and what they replace is unlinked after: a reader may see rows twice during that window.
A crash in it leaves files that compacted files cover; the next run deletes the covered files
of a contract folder (:meth:`Compactor.remove_covered`, under the lock) and, folding a date
that still has day files, leaves out of each contract's new file its rows of the day files
whose seq lies in the range of one of its compacted files (they are in that file: every day
file that existed before the swap was one of its sources, and later flushes hold later
seqs). A day file is never deleted before every contract's rows of it are in place.

The intraday merge of an open date's day files (:mod:`recorder.merging`) swaps its date
folder with the same staging, locks (:meth:`Compactor.date_locks`) and exchange.

The compacted file is written once and kept, so it is written for size
(:func:`recorder.packing.write_compacted`). The views return the same columns, types and values
as before it.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from enum import Enum
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from recorder.buffer import Key
from recorder.packing import COMPRESSION_LEVEL, pack_received, unpack_received, write_compacted
from recorder.paths import decode_contract, encode_contract, file_name, seq_range
from recorder.schema import CONTRACT_COLUMN, TABLES, Table
from recorder.state import STATE_DIR, fsync_dir
from recorder.writer import partition_lock

log = structlog.get_logger("recorder.compactor")

TAG = "c"  # compacted files are named {first}-{last}.c.parquet
PLACEHOLDER = "p"  # a date fold's row-less marker in a contract folder: {s}-{s}.p.parquet
STAGING = "compaction"  # {data_dir}/_state/compaction/<partition path>
#: contracts whose rows a date fold reads from the day files at once (its memory bound)
CHUNK_CONTRACTS = 64
_DATE_FOLDER = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_CONTRACT_FOLDER = "contract="
#: any contract: partition_lock of (table, date, contract) locks the date folder, whichever
_ANY_CONTRACT = "-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# EXDEV: overlayfs refuses to rename some directories (a file rename, the fallback, works)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}

#: called with a step name at each point of a swap; tests inject crashes here
Step = Callable[[str, Key], None]


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
        return len(self.files) == 1 and _is_compacted(self.files[0])

    @property
    def date_fold(self) -> bool:
        """Whether this is a date folder whose day files are folded into contract files."""
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


def _is_compacted(name: str) -> bool:
    return name.endswith(f".{TAG}.parquet")


def _is_placeholder(name: str) -> bool:
    return name.endswith(f".{PLACEHOLDER}.parquet")


def visible_files(folder: Path) -> tuple[str, ...]:
    """The Parquet files a view reads in ``folder`` (temporary files end in ``.tmp``)."""
    try:
        return tuple(sorted(n for n in os.listdir(folder) if n.endswith(".parquet")))
    except FileNotFoundError:
        return ()


@dataclass(frozen=True)
class DateListing:
    """What a date folder of a table partitioned by contract holds: its day files, the visible
    files of each contract folder, and whether anything else is there (a foreign entry)."""

    day_files: tuple[str, ...]
    contracts: dict[str, tuple[str, ...]]  # contract folder name -> its visible files
    foreign: bool

    def paths(self) -> tuple[str, ...]:
        """Every file, relative to the date folder (day files first)."""
        inner = (f"{c}/{n}" for c, names in sorted(self.contracts.items()) for n in names)
        return (*self.day_files, *inner)


def list_date(folder: Path) -> DateListing:
    """List a date folder (see :class:`DateListing`); temporary files are not foreign."""
    day_files: list[str] = []
    contracts: dict[str, tuple[str, ...]] = {}
    foreign = False
    try:
        with os.scandir(folder) as entries:
            found = list(entries)
    except FileNotFoundError:
        found = []
    for entry in found:
        if entry.is_dir(follow_symlinks=False) and entry.name.startswith(_CONTRACT_FOLDER):
            names = os.listdir(entry.path)
            contracts[entry.name] = tuple(sorted(n for n in names if n.endswith(".parquet")))
            foreign |= any(not n.endswith((".parquet", ".tmp")) for n in names)
        elif entry.name.endswith(".parquet") and entry.is_file(follow_symlinks=False):
            day_files.append(entry.name)
        elif not entry.name.endswith(".tmp"):
            foreign = True
    return DateListing(tuple(sorted(day_files)), contracts, foreign)


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


@dataclass(frozen=True)
class _Contract:
    """The plan of one contract folder in a date fold."""

    folder: str  # contract=<encoded>
    contract: str
    sources: tuple[str, ...]  # its files read into the new file (none covered, no placeholder)
    covers: tuple[tuple[int, int], ...]  # ranges of its compacted files: day rows there are in
    name: str | None  # of its new compacted file; None: ``sources`` kept as they are (linked)
    replaced: tuple[str, ...]  # its files the new folder does not keep (placeholders too)


class _Unsafe(Exception):
    """A date fold met a file it must not rewrite (foreign, overlapping, unknown column)."""


class Compactor:
    """Compacts the partitions of one data directory; see the module docstring for the swap."""

    def __init__(
        self,
        data_dir: Path,
        compression_level: int = COMPRESSION_LEVEL,
        on_step: Step | None = None,
        swap: Callable[[Path, Path], bool] = exchange,
        chunk_contracts: int = CHUNK_CONTRACTS,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.staging = self.data_dir / STATE_DIR / STAGING
        self.compression_level = compression_level
        self.chunk_contracts = chunk_contracts
        self._step: Step = on_step or (lambda _step, _key: None)
        self._swap = swap

    # ------------------------------------------------------------------ finding partitions

    def partitions(self, days: Callable[[date], bool]) -> Iterator[Partition]:
        """Every partition of a date that ``days`` accepts, table by table, in date order: a
        date folder holding day files as one (a date fold), else each contract folder."""
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
                if listing.day_files:
                    yield Partition(key, day_folder, listing.paths())
                    continue
                for name in sorted(listing.contracts):
                    contract = decode_contract(name.removeprefix(_CONTRACT_FOLDER))
                    key = (table.name, day.isoformat(), contract)
                    yield Partition(key, day_folder / name, listing.contracts[name])

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
        if partition.date_fold or not any(_is_compacted(n) for n in partition.files):
            return partition
        with partition_lock(self.data_dir, partition.key):
            names = visible_files(partition.folder)
            covered = _covered(names)
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
        """Compact one partition (or fold one date): see the module docstring."""
        if partition.date_fold:
            return self._fold(partition)
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
        size = self._write_verified(table, data, staged / name)
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
        self._prune(staged.parent)
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

    # ------------------------------------------------------------------ one date fold

    def _fold(self, partition: Partition) -> Done:
        """Fold a date folder's day files into one compacted file per contract folder."""
        table, key, live = TABLES[partition.key[0]], partition.key, partition.folder
        listing = list_date(live)
        if not listing.day_files:
            return Done(Outcome.CHANGED)  # folded meanwhile (by another process)
        try:
            if listing.foreign:
                raise _Unsafe(str(live))
            in_days = _day_contracts(table, [live / n for n in listing.day_files])
            _plan(listing, in_days, placed=False)  # names and ranges checked before any write
            self._place_holders(table, live, listing, in_days)
            listing = list_date(live)
            plans = _plan(listing, in_days)
        except _Unsafe:
            return Done(Outcome.UNSAFE)
        replaced = [*listing.day_files]
        for plan in plans:
            replaced += [f"{plan.folder}/{n}" for n in plan.replaced if not _is_placeholder(n)]
        before = sum(_size(live, n) for n in replaced)
        staged = self.fresh_staging(live)
        try:
            rows, after, written = self._build(table, live, staged, listing, plans)
        except _Unsafe:
            shutil.rmtree(staged)
            self._prune(staged.parent)
            return Done(Outcome.UNSAFE)
        self._step("staged", key)
        self._step("verified", key)  # each file was read back as it was written
        with self.date_locks(key):
            self._step("locked", key)
            if list_date(live) != listing:
                outcome = Outcome.CHANGED
            else:
                outcome = Outcome.COMPACTED
                self._install_date(key, live, staged, listing, plans)
        shutil.rmtree(staged)
        self._step("cleaned", key)
        self._prune(staged.parent)
        if outcome is not Outcome.COMPACTED:
            return Done(outcome)
        log.debug("folded day files", date=str(live.relative_to(self.data_dir)), rows=rows)
        return Done(outcome, written, len(replaced), before, after, rows)

    def _place_holders(
        self, table: Table, live: Path, listing: DateListing, in_days: set[str]
    ) -> None:
        """Give each contract with rows in the day files and no file of its own a row-less
        file (see "readers" in the module docstring), named by a seq the day files name."""
        first = min(_span(n)[0] for n in listing.day_files)
        for contract in sorted(in_days):
            folder = live / (_CONTRACT_FOLDER + encode_contract(contract))
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
        plans: list[_Contract],
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
        for start in range(0, len(rewritten), self.chunk_contracts):
            chunk = rewritten[start : start + self.chunk_contracts]
            days = _read_days(table, day_paths, [p.contract for p in chunk])
            for plan in chunk:
                data, added = _contract_rows(table, live / plan.folder, plan, days)
                if added and plan.name in listing.contracts[plan.folder]:
                    raise _Unsafe(f"{plan.folder}/{plan.name} would change under its name")
                if data.num_rows == 0:
                    continue  # a contract folder with nothing but placeholders
                assert plan.name is not None
                size += self._write_verified(table, data, staged / plan.folder / plan.name)
                rows += data.num_rows
                files += 1
        fsync_dir(staged)
        return rows, size, files

    def _install_date(
        self, key: Key, live: Path, staged: Path, listing: DateListing, plans: list[_Contract]
    ) -> None:
        """Make the staged date folder the live one (called under both locks)."""
        if self.exchange(staged, live):
            self._step("exchanged", key)
            return
        # the file system cannot exchange: the compacted files first (a reader may see their
        # rows twice until the rest is gone), then the day files, then what the files replace
        for plan in plans:
            if plan.name is not None and (staged / plan.folder / plan.name).exists():
                os.replace(staged / plan.folder / plan.name, live / plan.folder / plan.name)
                fsync_dir(live / plan.folder)
        self._step("linked", key)
        for name in listing.day_files:
            (live / name).unlink()
        fsync_dir(live)
        for plan in plans:
            for name in plan.replaced:
                if name != plan.name:
                    (live / plan.folder / name).unlink()
            if plan.replaced:
                fsync_dir(live / plan.folder)
        self._step("unlinked", key)

    # ------------------------------------------------------------------ shared with merges

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
        self._prune(staged.parent)

    # ------------------------------------------------------------------ files

    def fresh_staging(self, live: Path) -> Path:
        """An empty staging folder for the live folder ``live`` (one it had is deleted)."""
        staged = self.staging / live.relative_to(self.data_dir)
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        return staged

    def _write_verified(self, table: Table, data: pa.Table, path: Path) -> int:
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

    def _prune(self, folder: Path) -> None:
        """Remove empty staging folders, up to and including the staging root."""
        while folder.is_relative_to(self.staging):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def _size(folder: Path, name: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (folder / name).stat().st_size
    return 0


def _span(name: str) -> tuple[int, int]:
    span = seq_range(name)
    if span is None:
        raise _Unsafe(name)
    return span


def _day_contracts(table: Table, paths: list[Path]) -> set[str]:
    """The contracts with rows in the day files ``paths``; _Unsafe when a file has a column the
    schema does not know (compacting would drop it) or no ``contract`` column."""
    known = set(table.day_schema.names)
    found: set[str] = set()
    for path in paths:
        _span(path.name)
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        if names - known or CONTRACT_COLUMN not in names:
            raise _Unsafe(str(path))
        for batch in parquet.iter_batches(columns=[CONTRACT_COLUMN]):
            found.update(pc.unique(batch.column(0)).to_pylist())
    if None in found:
        raise _Unsafe("a day file row without a contract")
    return found


def _plan(listing: DateListing, in_days: set[str], placed: bool = True) -> list[_Contract]:
    """What becomes of each contract folder of a date fold (_Unsafe: foreign or overlapping
    files; or, ``placed``, a contract of the day files without a folder)."""
    day_spans = [_span(n) for n in listing.day_files]
    if any(a[1] >= b[0] for a, b in itertools.pairwise(sorted(day_spans))):
        raise _Unsafe("overlapping day files")
    plans = []
    for folder, names in sorted(listing.contracts.items()):
        contract = decode_contract(folder.removeprefix(_CONTRACT_FOLDER))
        spans = {n: _span(n) for n in names}
        real = [n for n in names if not _is_placeholder(n)]
        covered = set(_covered(real))
        kept = tuple(n for n in real if n not in covered)
        if any(a[1] >= b[0] for a, b in itertools.pairwise(sorted(spans[n] for n in kept))):
            raise _Unsafe(folder)
        covers = tuple(spans[n] for n in kept if _is_compacted(n))
        if contract not in in_days and (not kept or (len(kept) == 1 and _is_compacted(kept[0]))):
            name = None  # kept as it is (or, with nothing kept, an empty folder)
        else:
            every = [spans[n] for n in real] + day_spans
            name = file_name(min(s[0] for s in every), max(s[1] for s in every), TAG)
        kept_names = () if name is not None else kept
        replaced = tuple(n for n in names if n not in kept_names)
        plans.append(_Contract(folder, contract, kept, covers, name, replaced))
    if placed and in_days - {p.contract for p in plans}:  # each got a placeholder
        raise _Unsafe(f"contracts without a folder: {sorted(in_days)[:3]}")
    return plans


def _read_days(table: Table, paths: list[Path], contracts: list[str]) -> pa.Table:
    """The rows of ``contracts`` in the day files ``paths``, in the day files' schema (file
    columns, then ``contract``), in file order; row-group statistics skip other contracts."""
    wanted = pc.field(CONTRACT_COLUMN).isin(contracts)
    parts = []
    for path in paths:
        part = conform(table.day_schema, pq.read_table(path, filters=wanted))
        if part is None:
            raise _Unsafe(str(path))
        parts.append(part)
    return pa.concat_tables(parts) if parts else table.day_schema.empty_table()


def _contract_rows(
    table: Table, folder: Path, plan: _Contract, days: pa.Table
) -> tuple[pa.Table, int]:
    """A contract's rows for its new file, sorted: its files' and its rows of the day files
    (but those in the range of one of its compacted files, which holds them already); and how
    many rows the day files added."""
    mine = days.filter(pc.equal(days.column(CONTRACT_COLUMN), plan.contract))
    for first, last in plan.covers:
        seq = mine.column("seq")
        inside = pc.and_(pc.greater_equal(seq, first), pc.less_equal(seq, last))
        mine = mine.filter(pc.invert(inside))
    parts = []
    for name in plan.sources:
        part = conform(table.arrow_schema, pq.ParquetFile(folder / name).read())
        if part is None:
            raise _Unsafe(str(folder / name))
        parts.append(part)
    parts.append(mine.select(table.arrow_schema.names))
    merged = pa.concat_tables(parts).combine_chunks()
    # a stable sort: the rows of one frame (one seq) keep their order
    return merged.sort_by([(k, "ascending") for k in sort_keys(table)]), mine.num_rows


def sort_keys(table: Table) -> list[str]:
    """The order of a compacted file: (exchange_ts, seq), or seq where there is no exchange_ts."""
    names = [c.name for c in table.file_columns]
    return ["exchange_ts", "seq"] if "exchange_ts" in names else ["seq"]


def _covered(names: Iterable[str]) -> list[str]:
    """Files whose seq range lies inside that of another, compacted, file of the same folder
    (its source: every later flush holds higher seqs, and recovery never writes lower ones)."""
    spans = {n: seq_range(n) for n in names}
    compacted = {n: s for n, s in spans.items() if s is not None and _is_compacted(n)}
    return [
        n
        for n, s in spans.items()
        if s is not None
        and any(m != n and c[0] <= s[0] and s[1] <= c[1] for m, c in compacted.items())
    ]


def conform(schema: pa.Schema, part: pa.Table) -> pa.Table | None:
    """``part`` in ``schema``: a missing column becomes nulls, a column of another type is cast;
    None when it has a column ``schema`` does not know (compacting would drop it). A contract
    file's ``received_at`` is given back (:func:`recorder.packing.unpack_received`)."""
    part = unpack_received(part)
    if set(part.column_names) - set(schema.names):
        return None
    columns = [
        part.column(f.name).cast(f.type)
        if f.name in part.column_names
        else pa.nulls(part.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_sorted(paths: list[Path], schema: pa.Schema, keys: list[str]) -> pa.Table | None:
    """Every row of ``paths`` in ``schema``, sorted by ``keys``; None when a file has a
    column ``schema`` does not know (rewriting it would drop that column)."""
    parts = []
    for path in paths:
        part = conform(schema, pq.ParquetFile(path).read())
        if part is None:
            return None
        parts.append(part)
    merged = pa.concat_tables(parts).combine_chunks()
    # a stable sort: the rows of one frame (one seq) keep their order
    return merged.sort_by([(k, "ascending") for k in keys])
