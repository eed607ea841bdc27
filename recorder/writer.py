"""Parquet files: each batch becomes one zstd file, visible to readers only once complete."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recorder.buffer import Batch, Key
from recorder.errors import StorageError
from recorder.packing import pack_received
from recorder.paths import file_name, partition_dir
from recorder.schema import CONTRACT_COLUMN, TABLES, Table
from recorder.state import STATE_DIR, fsync_dir

#: the partition columns while rows travel to the writer (named apart from every file column:
#: the rejections table has a ``contract`` column of its own); see recorder.columnar
DATE, CONTRACT = "__date", "__contract"
#: where a flush writes its files before they are durable (never read by any view)
WRITING_DIR = "writing"
_PART = "__batch"  # the column that tells a flush's files apart while it is written
_PARTITIONING = ds.partitioning(pa.schema([(_PART, pa.int32())]), flavor="hive")
_ROW_GROUP_ROWS = 128 * 1024
#: rows per row group of a flush's files: a day file's rows are ordered by contract, and a
#: one-contract read skips the groups whose statistics name other contracts only
FLUSH_GROUP_ROWS = 32 * 1024
_OPEN_FILES = 32
_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def sync_filesystem(path: Path) -> None:
    """Make everything written to ``path``'s file system durable: one ``syncfs`` for a whole
    flush instead of an fsync per file and folder (where the call is missing: a global sync)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(path))
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Part:
    """The rows of one Parquet file to write: a slice of its table's sorted rows."""

    key: Key
    first_seq: int
    last_seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """One Parquet file that is now visible in the data directory."""

    table: str
    path: Path
    rows: int
    bytes: int


@contextlib.contextmanager
def partition_lock(data_dir: Path, key: Key) -> Iterator[None]:
    """Hold the lock that orders file writes into partition ``key`` with its compaction swap.

    An exclusive ``flock`` on the folder holding the partition folder (``{table}/date=D`` or
    ``{table}``), which is never renamed or removed, so no lock file is needed; it works across
    processes and between threads (each holder opens its own descriptor). Closing releases it,
    and so does the death of its process.
    """
    folder = data_dir / partition_dir(*key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def to_arrow(table: Table, rows: list[tuple[object, ...]]) -> pa.Table:
    """Build the Arrow table of a batch of row tuples (file columns, schema order)."""
    schema = table.arrow_schema
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    arrays = [pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


class ParquetWriter:
    """Writes batches under ``data_dir``; called from one worker thread, never the event loop.

    A file is written under a dot-prefixed temporary name (which no view's glob matches),
    fsynced, then renamed to ``{first_seq}-{last_seq}.parquet``; the directory is fsynced so
    the rename survives a power loss.
    """

    def __init__(self, data_dir: Path, compression_level: int = 3, fsync: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.compression_level = compression_level
        self.fsync = fsync
        self._root = str(self.data_dir) + os.sep
        self._staging = self.data_dir / STATE_DIR / WRITING_DIR
        # files a crash left here were never visible; the journal still holds their rows
        shutil.rmtree(self._staging, ignore_errors=True)
        # a flush writes many small files that compaction rewrites for size: dictionaries
        # cost more than they save at this size
        self._options = ds.ParquetFileFormat().make_write_options(
            compression="zstd",
            compression_level=compression_level,
            use_dictionary=False,
            write_statistics=True,
        )

    def path_for(self, batch: Batch) -> Path:
        return self.path_of(batch.key, batch.first_seq, batch.last_seq)

    def path_of(self, key: Key, first_seq: int, last_seq: int) -> Path:
        table, day, contract = key
        folder = self.data_dir / partition_dir(table, day, contract)
        path = folder / file_name(first_seq, last_seq)
        # encode_contract already makes this impossible; a second, independent check is cheap
        if not os.path.normpath(path).startswith(self._root):
            raise StorageError(f"partition path escapes the data directory: {path}")
        return path

    def _write_parquet(
        self, table: Table, rows: list[tuple[object, ...]], path: Path, contract_file: bool
    ) -> None:
        data = to_arrow(table, rows)
        pq.write_table(
            pack_received(table, data) if contract_file else data,
            path,
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=True,
            write_statistics=True,
            row_group_size=_ROW_GROUP_ROWS,
        )

    def _write_dataset(
        self, rows: dict[str, pa.Table], parts: list[Part]
    ) -> list[tuple[Path, int]]:
        """Write each part as one file under the staging folder, a table at a time in Arrow's
        multi-threaded dataset writer (which holds the GIL far less than one call per file);
        returns each part's staged file and its size."""
        by_table: dict[str, list[int]] = {}
        for index, part in enumerate(parts):
            by_table.setdefault(part.key[0], []).append(index)
        staged: dict[int, list[tuple[str, int]]] = {}

        def visit(written: Any) -> None:  # called from Arrow's threads: a dict write is atomic
            index = int(Path(written.path).parent.name.split("=", 1)[1])
            staged.setdefault(index, []).append((written.path, written.size))

        for name, indexes in by_table.items():
            table = TABLES[name]
            data = rows[name]
            first, last = parts[indexes[0]], parts[indexes[-1]]
            data = data.slice(first.offset, last.offset + last.length - first.offset)
            counts = [parts[i].length for i in indexes]
            if sum(counts) != data.num_rows:
                raise StorageError(f"the parts of {name} do not cover its rows")
            batch = np.repeat(np.asarray(indexes, dtype=np.int32), counts)
            files = data.select(table.arrow_schema.names).cast(table.arrow_schema)
            if table.by_contract:  # day files: the contract is a column (see recorder.paths)
                files = files.append_column(CONTRACT_COLUMN, data.column(CONTRACT))
            ds.write_dataset(
                files.append_column(_PART, pa.array(batch)),
                self._staging,
                format="parquet",
                partitioning=_PARTITIONING,
                file_options=self._options,
                basename_template=name + "-{i}.parquet",
                preserve_order=True,
                max_rows_per_group=FLUSH_GROUP_ROWS,
                max_partitions=len(indexes) + 1,
                # parts arrive one after the other, so a file closed early gets no more rows;
                # each open file holds its column buffers and compressors in memory
                max_open_files=_OPEN_FILES,
                existing_data_behavior="overwrite_or_ignore",
                file_visitor=visit,
            )
        out = []
        for index, part in enumerate(parts):
            found = sorted(staged.get(index, []))
            if len(found) != 1:  # the writer closed and reopened it: make it one file again
                whole = pq.read_table([f for f, _ in found]) if found else None
                if whole is None or whole.num_rows != part.length:
                    raise StorageError(f"the dataset writer lost rows of {part.key}")
                path = self._staging / f"{_PART}={index}" / "whole.parquet"
                pq.write_table(whole, path, compression="zstd")
                found = [(str(path), path.stat().st_size)]
            out.append((Path(found[0][0]), found[0][1]))
        return out

    def write_parts(
        self, rows: dict[str, pa.Table], parts: list[Part]
    ) -> tuple[list[WrittenFile], list[Part], StorageError | None]:
        """Write a flush, one file per part, durable at the cost of two ``syncfs``.

        ``rows[table]`` holds a table's rows sorted as :func:`recorder.columnar.partitions`
        cut them into ``parts``. Every file is written under ``_state/writing`` (by Arrow's
        dataset writer), the file system is synced, each file is renamed into its partition
        (under the partition lock, taken once per date folder) and the file system is synced
        again, so a power loss leaves each file whole or absent. Returns the files now
        visible, the parts not written and the error that stopped the writing (or None). A
        failure of the last sync leaves the files visible and reports the error: they are
        complete, and the caller keeps the journal until a later flush syncs.
        """
        try:
            paths = [self.path_of(p.key, p.first_seq, p.last_seq) for p in parts]
            staged = self._write_dataset(rows, parts)
            if self.fsync:
                sync_filesystem(self._staging)
        except (OSError, pa.ArrowException, StorageError) as exc:
            shutil.rmtree(self._staging, ignore_errors=True)
            return [], parts, StorageError(f"cannot write a flush of {len(parts)} files: {exc}")
        written: list[WrittenFile] = []
        pending = 0  # the first part not moved yet
        try:
            # parts come grouped by table and date: one lock per date folder
            for _, group in groupby(range(len(parts)), key=lambda i: parts[i].key[:2]):
                indexes = list(group)
                with partition_lock(self.data_dir, parts[indexes[0]].key):
                    for index in indexes:
                        (tmp, size), path, part = staged[index], paths[index], parts[index]
                        try:
                            os.replace(tmp, path)
                        except FileNotFoundError:
                            path.parent.mkdir(parents=True, exist_ok=True)
                            os.replace(tmp, path)
                        written.append(WrittenFile(part.key[0], path, part.length, size))
                        pending = index + 1
        except OSError as exc:
            shutil.rmtree(self._staging, ignore_errors=True)
            where = paths[pending].relative_to(self.data_dir)
            return written, parts[pending:], StorageError(f"cannot move {where}: {exc}")
        if self.fsync:
            try:
                sync_filesystem(self.data_dir)
            except OSError as exc:
                return written, [], StorageError(f"cannot sync the data directory: {exc}")
        return written, [], None

    def write(self, batch: Batch) -> WrittenFile:
        """Write one batch as one file; on failure raise StorageError and leave no visible file.

        A batch of one contract is written as a contract file (with ``received_at`` held as
        in the compactor's, :func:`recorder.packing.pack_received`), not as a day file.
        """
        table = TABLES[batch.key[0]]
        path = self.path_for(batch)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            # the compactor swaps partition folders under this lock (recorder.compaction)
            with partition_lock(self.data_dir, batch.key):
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_parquet(table, batch.rows, tmp, batch.key[2] is not None)
                if self.fsync:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.replace(tmp, path)
                if self.fsync:
                    fsync_dir(path.parent)
            return WrittenFile(table.name, path, len(batch.rows), path.stat().st_size)
        except (OSError, pa.ArrowException) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path.relative_to(self.data_dir)}: {exc}") from exc
