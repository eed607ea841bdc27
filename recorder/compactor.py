"""The compactor: one partition's files rewritten as one sorted file, swapped in atomically.

The swap, for a partition folder ``P`` holding files ``S``:

1. read ``S``, sort by (``exchange_ts``, ``seq``) (tables without ``exchange_ts``: by ``seq``)
   and write the result as ``{first}-{last}.c.parquet`` (the union of the seq ranges of
   ``S``) into a staging folder ``H = {data_dir}/_state/compaction/<P relative>``, which no
   view's glob reaches; read it back and compare it with what was meant to be written;
2. under the partition lock (:func:`recorder.writer.partition_lock`, which every flush of
   the writer holds), list ``P`` again: if a flush added a file, give this attempt up;
3. exchange ``H`` and ``P`` in one ``renameat2(RENAME_EXCHANGE)``: readers and crash recovery
   see ``S`` or the compacted file, never both and never neither; then delete ``H`` (now ``S``).

A crash leaves at most a staging folder, which is never needed (``P`` is whole before and
after the exchange), so every run starts by deleting them. Where the exchange is refused
(EINVAL from a file system without it, EXDEV from some overlayfs directories, no renameat2
outside Linux), the compacted file is renamed into ``P`` and ``S`` unlinked after it: a reader
may see rows twice during that window, and a crash in it leaves files that the compacted one
covers, which the next run deletes (under the lock) before it compacts that partition.
Recovery's rule ("a seq at or below the highest seq named in a partition's files is stored
there") holds at every instant in both modes.

The compacted file is written once and kept, so it is written for size (:func:`write_compacted`):
zstd at ``COMPRESSION_LEVEL`` (19; the flushes use ``storage.compression_level``, 1), each column
in whichever of PLAIN, dictionary, DELTA_BINARY_PACKED and BYTE_STREAM_SPLIT compresses it
smallest, columns without a null REQUIRED, statistics only where queries filter, and no Arrow
schema in the footer. The views return the same columns, types and values as before it.
"""

from __future__ import annotations

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
import pyarrow.parquet as pq
import structlog

from recorder.buffer import Key
from recorder.paths import decode_contract, file_name, seq_range
from recorder.schema import TABLES, Table
from recorder.state import STATE_DIR, fsync_dir
from recorder.writer import partition_lock

log = structlog.get_logger("recorder.compactor")

TAG = "c"  # compacted files are named {first}-{last}.c.parquet
STAGING = "compaction"  # {data_dir}/_state/compaction/<partition path>
#: zstd level of compacted files: compaction is offline and once per partition, so zstd's
#: strongest regular level (on the size benchmark: 2 % fewer bytes than level 9, 1.7 times the CPU)
COMPRESSION_LEVEL = 19
#: encodings are compared at this level, which ranks them nearly as 19 does at a fifth of the cost
TRIAL_LEVEL = 9
PLAIN = "PLAIN"
DICTIONARY = "RLE_DICTIONARY"  # written with use_dictionary (pyarrow's column_encoding refuses it)
#: rows per row group: small enough that a look-back (the as-of state) reads one group of
#: each contract-day file, not all of it (row-group statistics on exchange_ts skip the rest)
ROW_GROUP_ROWS = 16_384
_DATE_FOLDER = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
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
    """One partition folder and the Parquet files visible in it (sorted by name = seq)."""

    key: Key
    folder: Path
    files: tuple[str, ...]

    @property
    def compacted(self) -> bool:
        return len(self.files) == 1 and _is_compacted(self.files[0])


def _is_compacted(name: str) -> bool:
    return name.endswith(f".{TAG}.parquet")


def visible_files(folder: Path) -> tuple[str, ...]:
    """The Parquet files a view reads in ``folder`` (temporary files end in ``.tmp``)."""
    try:
        return tuple(sorted(n for n in os.listdir(folder) if n.endswith(".parquet")))
    except FileNotFoundError:
        return ()


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
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.staging = self.data_dir / STATE_DIR / STAGING
        self.compression_level = compression_level
        self._step: Step = on_step or (lambda _step, _key: None)
        self._swap = swap

    # ------------------------------------------------------------------ finding partitions

    def partitions(self, days: Callable[[date], bool]) -> Iterator[Partition]:
        """Every partition of a date that ``days`` accepts, table by table, in date order."""
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
                if not table.by_contract:
                    key: Key = (table.name, day.isoformat(), None)
                    yield Partition(key, day_folder, visible_files(day_folder))
                    continue
                for folder in sorted(day_folder.iterdir()):
                    if folder.name.startswith("contract=") and folder.is_dir():
                        contract = decode_contract(folder.name.removeprefix("contract="))
                        key = (table.name, day.isoformat(), contract)
                        yield Partition(key, folder, visible_files(folder))

    def remove_leftovers(self) -> int:
        """Delete the staging folder a crashed run left (never needed: see the module docstring)."""
        removed = 0
        if self.staging.exists():
            removed += sum(1 for p in self.staging.rglob("*") if p.is_file())
            shutil.rmtree(self.staging)
        return removed

    def remove_covered(self, partition: Partition) -> Partition:
        """Delete files that a compacted file of the same partition covers (fallback crashes)."""
        if not any(_is_compacted(n) for n in partition.files):
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

    def compact(self, partition: Partition) -> tuple[Outcome, int, int]:
        """Compact one partition; returns the outcome, its rows and the new file's bytes."""
        table = TABLES[partition.key[0]]
        spans = [seq_range(n) for n in partition.files]
        if any(s is None for s in spans):
            return Outcome.UNSAFE, 0, 0
        ranges = sorted(s for s in spans if s is not None)
        if any(a[1] >= b[0] for a, b in itertools.pairwise(ranges)):
            return Outcome.UNSAFE, 0, 0
        data = _read(table, [partition.folder / n for n in partition.files])
        if data is None:
            return Outcome.UNSAFE, 0, 0
        name = file_name(ranges[0][0], ranges[-1][1], TAG)
        relative = partition.folder.relative_to(self.data_dir)
        staged = self.staging / relative
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        written = self._write(table, data, staged / name)
        size = (staged / name).stat().st_size
        self._step("staged", partition.key)
        back = pq.ParquetFile(staged / name).read()
        if back.num_rows != data.num_rows or not back.equals(written):
            raise OSError(f"{relative}/{name}: the file read back differs from what was written")
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
        return outcome, data.num_rows, size

    def _install(self, partition: Partition, staged: Path, name: str) -> None:
        """Make the compacted file the partition's only file (called under the partition lock)."""
        if self._swap(staged, partition.folder):
            fsync_dir(partition.folder.parent)
            fsync_dir(staged.parent)
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

    def _write(self, table: Table, data: pa.Table, path: Path) -> pa.Table:
        """Write ``data`` as the compacted file ``path``, durably; returns it as written."""
        tmp = path.with_name(f".{path.name}.tmp")
        written = write_compacted(data, tmp, sort_keys(table), self.compression_level)
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


def write_compacted(
    data: pa.Table, where: str | Path | pa.NativeFile, sort: list[str], level: int
) -> pa.Table:
    """Write ``data`` (sorted by ``sort``) in the compacted layout; returns the table as a
    read of the file gives it back (columns without a null come back ``not null``).

    The layout is chosen for size (the file is written once and read for years):

    - zstd at ``level``, each column in the encoding that compresses it best
      (:func:`choose_encodings`);
    - columns without a null are REQUIRED (no definition levels to store);
    - min/max statistics only on the columns queries filter on (:func:`statistics_columns`),
      no page index, and no ``ARROW:schema`` in the footer: the Parquet types alone give
      DuckDB and pyarrow the same column types (TIMESTAMPTZ, DATE, TIME, VARCHAR[], ...).
    """
    data = data.cast(required_where_complete(data))
    encodings = choose_encodings(data, min(level, TRIAL_LEVEL))
    pq.write_table(
        data,
        where,
        compression="zstd",
        compression_level=level,
        use_dictionary=[n for n, e in encodings.items() if e == DICTIONARY],
        column_encoding={n: e for n, e in encodings.items() if e not in (PLAIN, DICTIONARY)},
        write_statistics=statistics_columns(data.schema),
        write_page_index=False,
        store_schema=False,
        row_group_size=ROW_GROUP_ROWS,
        sorting_columns=[pq.SortingColumn(data.column_names.index(k)) for k in sort],
    )
    return data


def required_where_complete(data: pa.Table) -> pa.Schema:
    """The schema of ``data`` with the columns that hold no null made non-nullable."""
    return pa.schema([f.with_nullable(data.column(f.name).null_count > 0) for f in data.schema])


def statistics_columns(schema: pa.Schema) -> list[str]:
    """The columns given min/max statistics: the times queries filter on, ``exchange_ts``, or
    in a table without it, its timestamps (``received_at``, ``opened_at``, ``closed_at``), as
    the views, :mod:`recorder.storesql` and :mod:`recorder.export` filter.

    DuckDB skips row groups by these. The statistics of any other column (``seq`` too, which
    queries order and join by but do not filter on) would skip nothing that a partition folder
    does not already skip, and cost about 90 bytes per column and file (footer and page
    header): 0.35 bytes per message for ``seq`` alone on the size benchmark.
    """
    names = set(schema.names)
    return [
        f.name
        for f in schema
        if f.name == "exchange_ts" or ("exchange_ts" not in names and pa.types.is_timestamp(f.type))
    ]


def choose_encodings(data: pa.Table, level: int) -> dict[str, str]:
    """Per column, the encoding whose zstd-compressed column chunk is smallest at ``level``.

    Each candidate is written on its own and measured: what pays depends on the data, not
    only on the type (timestamps that only grow take DELTA_BINARY_PACKED, but best_limit
    repeats each one for every level, and there PLAIN compresses better; prices on a tick
    grid take PLAIN or a dictionary; quantities BYTE_STREAM_SPLIT). Ties go to PLAIN.
    """
    chosen = {}
    for field in data.schema:
        column = data.column(field.name)
        sizes: dict[str, int] = {}
        for encoding in _candidates(field.type):
            try:
                sizes[encoding] = _chunk_bytes(field, column, encoding, level)
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                continue  # e.g. BYTE_STREAM_SPLIT of integers needs pyarrow 17
        chosen[field.name] = min(sizes, key=sizes.__getitem__)
    return chosen


def _candidates(kind: pa.DataType) -> tuple[str, ...]:
    if pa.types.is_floating(kind):
        return (PLAIN, DICTIONARY, "BYTE_STREAM_SPLIT")
    if _fixed_width_integer(kind):
        return (PLAIN, DICTIONARY, "DELTA_BINARY_PACKED", "BYTE_STREAM_SPLIT")
    return (PLAIN, DICTIONARY)


def _fixed_width_integer(kind: pa.DataType) -> bool:
    """Types stored as Parquet INT32/INT64 (integers, dates, times, timestamps)."""
    return bool(
        pa.types.is_integer(kind)
        or pa.types.is_timestamp(kind)
        or pa.types.is_time(kind)
        or pa.types.is_date(kind)
    )


def _chunk_bytes(field: pa.Field, column: pa.ChunkedArray, encoding: str, level: int) -> int:
    """The compressed bytes of ``column`` written alone with ``encoding``."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.table([column], schema=pa.schema([field])),
        sink,
        compression="zstd",
        compression_level=level,
        use_dictionary=encoding == DICTIONARY,
        column_encoding=None if encoding in (PLAIN, DICTIONARY) else {field.name: encoding},
        write_statistics=False,
        store_schema=False,
        row_group_size=ROW_GROUP_ROWS,
    )
    meta = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata
    return sum(
        meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups)
    )


def _read(table: Table, paths: list[Path]) -> pa.Table | None:
    """Every row of ``paths`` in the current schema, sorted; None when a file has an unknown
    column (compacting would drop it)."""
    schema = table.arrow_schema
    parts = []
    for path in paths:
        part = pq.ParquetFile(path).read()
        if set(part.column_names) - set(schema.names):
            return None
        columns = [
            part.column(f.name).cast(f.type)
            if f.name in part.column_names
            else pa.nulls(part.num_rows, f.type)
            for f in schema
        ]
        parts.append(pa.Table.from_arrays(columns, schema=schema))
    merged = pa.concat_tables(parts).combine_chunks()
    # a stable sort: the rows of one frame (one seq) keep their order
    return merged.sort_by([(k, "ascending") for k in sort_keys(table)])
