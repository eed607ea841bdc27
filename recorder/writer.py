"""Parquet files: each batch becomes one zstd file, visible to readers only once complete."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recorder.buffer import Batch, Key
from recorder.errors import StorageError
from recorder.paths import file_name, partition_dir
from recorder.schema import TABLES, Table
from recorder.state import fsync_dir


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

    def path_for(self, batch: Batch) -> Path:
        table, day, contract = batch.key
        folder = self.data_dir / partition_dir(table, day, contract)
        path = folder / file_name(batch.first_seq, batch.last_seq)
        # encode_contract already makes this impossible; a second, independent check is cheap
        if not path.resolve().is_relative_to(self.data_dir):
            raise StorageError(f"partition path escapes the data directory: {path}")
        return path

    def write(self, batch: Batch) -> WrittenFile:
        """Write one batch as one file; on failure raise StorageError and leave no visible file."""
        table = TABLES[batch.key[0]]
        path = self.path_for(batch)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            arrow = to_arrow(table, batch.rows)
            # the compactor swaps partition folders under this lock (recorder.compaction)
            with partition_lock(self.data_dir, batch.key):
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(
                    arrow,
                    tmp,
                    compression="zstd",
                    compression_level=self.compression_level,
                    use_dictionary=True,
                    write_statistics=True,
                    row_group_size=128 * 1024,
                )
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
