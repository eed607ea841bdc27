"""Row buffers per (table, date, contract) partition and the rules that decide when to flush.

Pure bookkeeping: no clock and no I/O. Every method that depends on time takes ``now`` (a
monotonic reading in seconds), so the rotation rules are tested with plain values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from recorder.schema import TABLES

Row = tuple[Any, ...]
#: (table, ISO date, contract or None for tables partitioned by date only)
Key = tuple[str, str, str | None]

_SEQ_INDEX = {name: [c.name for c in t.file_columns].index("seq") for name, t in TABLES.items()}


@dataclass(slots=True)
class Batch:
    """The rows of one partition taken out of the buffer for one Parquet file."""

    key: Key
    rows: list[Row]

    @property
    def first_seq(self) -> int:
        return int(self.rows[0][_SEQ_INDEX[self.key[0]]])

    @property
    def last_seq(self) -> int:
        return int(self.rows[-1][_SEQ_INDEX[self.key[0]]])


@dataclass(slots=True)
class _Partition:
    opened_at: float
    rows: list[Row] = field(default_factory=list)


class Buffer:
    """Rows waiting to be written, in arrival order within each partition.

    A partition is due when its oldest row has waited ``flush_interval`` seconds or it holds
    ``max_rows_per_file`` rows; every partition is due once the buffer as a whole holds
    ``max_buffered_rows``.
    """

    def __init__(
        self, flush_interval: float, max_rows_per_file: int, max_buffered_rows: int
    ) -> None:
        self.flush_interval = flush_interval
        self.max_rows_per_file = max_rows_per_file
        self.max_buffered_rows = max_buffered_rows
        self._partitions: dict[Key, _Partition] = {}
        self.rows = 0

    def __len__(self) -> int:
        return len(self._partitions)

    def add(self, key: Key, rows: Iterable[Row], now: float) -> bool:
        """Append rows to a partition; True when this made the partition or the buffer full."""
        partition = self._partitions.get(key)
        if partition is None:
            partition = self._partitions[key] = _Partition(now)
        before = len(partition.rows)
        partition.rows.extend(rows)
        self.rows += len(partition.rows) - before
        return len(partition.rows) >= self.max_rows_per_file or self.rows >= self.max_buffered_rows

    def due(self, now: float) -> list[Key]:
        """The partitions to flush now, in the order they were opened."""
        if self.rows >= self.max_buffered_rows:
            return list(self._partitions)
        deadline = now - self.flush_interval
        cap = self.max_rows_per_file
        return [
            key
            for key, p in self._partitions.items()
            if p.opened_at <= deadline or len(p.rows) >= cap
        ]

    def min_seq(self) -> int | None:
        """The lowest seq still buffered (None when empty): every lower seq is written."""
        firsts = [int(p.rows[0][_SEQ_INDEX[k[0]]]) for k, p in self._partitions.items() if p.rows]
        return min(firsts, default=None)

    def take(self, keys: Iterable[Key]) -> list[Batch]:
        """Remove the given partitions' rows, split into batches of at most max_rows_per_file."""
        batches: list[Batch] = []
        for key in keys:
            partition = self._partitions.pop(key, None)
            if partition is None:
                continue
            self.rows -= len(partition.rows)
            batches.extend(self._split(key, partition.rows))
        return batches

    def _split(self, key: Key, rows: list[Row]) -> list[Batch]:
        """Cut rows into batches of about max_rows_per_file, never inside one frame's rows.

        A file then holds every row of each seq it names, so "seq <= the highest seq in this
        partition's files" exactly means "already written" (crash recovery relies on it).
        """
        seq = _SEQ_INDEX[key[0]]
        batches, start, cap = [], 0, self.max_rows_per_file
        while start < len(rows):
            end = min(start + cap, len(rows))
            while end < len(rows) and rows[end][seq] == rows[end - 1][seq]:
                end += 1
            batches.append(Batch(key, rows[start:end]))
            start = end
        return batches

    def take_all(self) -> list[Batch]:
        return self.take(list(self._partitions))

    def restore(self, batches: Iterable[Batch], now: float) -> None:
        """Put batches whose write failed back in front of their partitions, order kept."""
        for batch in reversed(list(batches)):
            partition = self._partitions.get(batch.key)
            if partition is None:
                self._partitions[batch.key] = _Partition(now, list(batch.rows))
            else:
                partition.rows[:0] = batch.rows
            self.rows += len(batch.rows)
