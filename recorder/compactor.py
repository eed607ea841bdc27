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
import pyarrow.compute as pc
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
COMPRESSION_LEVEL = 9  # once per partition: a slower level than the flushes' is affordable
ROW_GROUP_ROWS = 122_880  # DuckDB's own row group size: one group per reader thread
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
        self._write(table, data, staged / name)
        size = (staged / name).stat().st_size
        self._step("staged", partition.key)
        back = pq.ParquetFile(staged / name).read()
        if back.num_rows != data.num_rows or not back.equals(data):
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

    def _write(self, table: Table, data: pa.Table, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        delta = [
            f.name
            for f in table.arrow_schema
            if _delta_encodable(f.type) and _non_decreasing(data.column(f.name))
        ]
        keys = sort_keys(table)
        pq.write_table(
            data,
            tmp,
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=[n for n in data.column_names if n not in delta],
            column_encoding=dict.fromkeys(delta, "DELTA_BINARY_PACKED"),
            write_statistics=True,
            row_group_size=ROW_GROUP_ROWS,
            sorting_columns=[pq.SortingColumn(data.column_names.index(k)) for k in keys],
        )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(tmp, path)
        fsync_dir(path.parent)

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


def _delta_encodable(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_timestamp(kind) or pa.types.is_time(kind))


def _non_decreasing(column: pa.ChunkedArray) -> bool:
    """Delta encoding pays for columns that only grow (timestamps, seq, cumulative counters)."""
    values = column.combine_chunks()
    if len(values) < 2 or values.null_count:
        return False
    if pa.types.is_timestamp(values.type) or pa.types.is_time(values.type):
        values = values.cast(pa.int64())
    drops = pc.sum(pc.less(values[1:], values[:-1])).as_py()
    return not drops


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
