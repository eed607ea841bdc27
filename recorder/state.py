"""Durable state of a data directory: the frame sequence counter."""

from __future__ import annotations

import os
from pathlib import Path

from recorder.catalog import table_files
from recorder.paths import seq_range
from recorder.schema import TABLES

STATE_DIR = "_state"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def max_seq_on_disk(data_dir: Path) -> int:
    """The highest seq named by any Parquet file of the data directory (0 when there is none):
    day files and contract files (see :mod:`recorder.paths`)."""
    highest = 0
    for table in TABLES.values():
        for path in table_files(data_dir, table):
            found = seq_range(path.name)
            if found is not None:
                highest = max(highest, found[1])
    return highest


class SeqAllocator:
    """Hands out ``seq`` values: increasing, and unique within a data directory across restarts.

    A block of values is reserved durably before any of it is used (the file holds the ceiling),
    so a crash can skip values but never hand one out twice. Seq gaps therefore never mean lost
    frames; the ``gaps`` records do.
    """

    def __init__(self, data_dir: Path, block: int = 1_000_000) -> None:
        self._file = data_dir / STATE_DIR / "seq"
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._block = block
        if self._file.exists():
            start = int(self._file.read_text(encoding="ascii").strip())
        else:
            start = max_seq_on_disk(data_dir)
        self._next = start + 1
        self._ceiling = start
        self._reserve()

    def _reserve(self, count: int = 1) -> None:
        """Reserve durably a block from ``_next`` that holds at least ``count`` values."""
        self._ceiling = self._next - 1 + max(self._block, count)
        write_atomic(self._file, f"{self._ceiling}\n".encode("ascii"))

    def next(self) -> int:
        return self.take(1)

    def take(self, count: int) -> int:
        """Hand out ``count`` consecutive values; returns the first."""
        value = self._next
        if value + count - 1 > self._ceiling:
            self._reserve(count)
        self._next = value + count
        return value

    def ensure_above(self, seq: int) -> None:
        """Never hand out ``seq`` or anything below it (the journal knows of it)."""
        if self._next <= seq:
            self._next = seq + 1
            self._reserve()

    @property
    def last(self) -> int:
        """The last value handed out (0 when none yet)."""
        return self._next - 1

    def close(self) -> None:
        """Give back the unused part of the reserved block."""
        write_atomic(self._file, f"{self._next - 1}\n".encode("ascii"))
