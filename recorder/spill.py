"""Spilling: when memory is full, frames wait in the journal instead, and are read back.

The server never replays, so a recorder that stops reading in a burst risks the stream
itself. When the rows in memory reach ``storage.max_buffered_rows``, the pipeline spills: the
frames (and snapshots, and connection events) that come next go to the journal only, which
takes them at a fraction of their full cost, and the readers go on. Once a flush has made
room, they are read back from the journal in seq order (:class:`JournalTail`) and take the
usual path; when the read-back has caught up with the stream, frames go to memory again.

At start-up the frames wait the same way while a crash's journal is replayed
(:func:`recorder.recovery.recover_while_recording`): the feed is read again at once, and
its rows follow the replayed ones.

Files therefore keep seq order within every partition (crash recovery's rule: see
:mod:`recorder.recovery`), and the journal keeps every segment that holds a frame not read
back yet, so a crash while spilling is recovered as any other. The readers stop only when the
frames waiting in the journal reach ``journal.max_spill_megabytes``, or while the journal
cannot write.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import structlog

from recorder.records import Pending, Record, decode

log = structlog.get_logger("recorder.spill")

#: spilled frames kept in memory besides the journal, for the read-back to catch up with
#: the stream without waiting for the journal's writer (a fraction of a second of the feed)
RECENT_FRAMES = 20_000
#: bytes of the journal read back at a time at most (about 5,000 frames of the feed)
READ_BYTES = 4 * 1024 * 1024


class JournalTail:
    """Reads the journal's records from a seq onward, as the writer thread appends them.

    Only whole records are returned (a record being written is read on a later call); a
    record given again after a failed write (the same seq, in a new segment) is returned
    once; segment checkpoints (seq 0) are left out.
    """

    def __init__(self, segments_dir: Path, first_seq: int) -> None:
        self._dir = segments_dir
        self.next_seq = first_seq  # the first seq not returned yet
        self._path: Path | None = None
        self._offset = 0

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for name in os.listdir(self._dir):
            head, _, suffix = name.partition(".")
            if suffix == "jnl" and head.isdigit():
                found.append((int(head), self._dir / name))
        return sorted(found)

    def _locate(self, segments: list[tuple[int, Path]]) -> None:
        """Start at the last segment that begins at or before ``next_seq`` (else the first)."""
        chosen = segments[0][1] if segments else None
        for first, path in segments:
            if first <= self.next_seq:
                chosen = path
        self._path, self._offset = chosen, 0

    def read(self, limit: int = READ_BYTES) -> list[Record]:
        """The whole records written since the last call, about ``limit`` bytes of them."""
        out: list[Record] = []
        for _ in range(64):  # segments crossed in one call at most
            segments = self._segments()
            if self._path is None or all(path != self._path for _, path in segments):
                self._locate(segments)  # first call, or the segment was released since
            if self._path is None:
                return out
            later = [path for first, path in segments if path > self._path]
            # a segment with a later one is closed: read to its end, then go on
            data = self._read_at(self._path, self._offset, limit)
            records, valid = decode(data, self.next_seq)
            if valid == 0 and len(data) >= limit:  # one record larger than the limit
                limit *= 2
                continue
            self._offset += valid
            for record in records:
                if record.seq >= self.next_seq:
                    out.append(record)
                    self.next_seq = record.seq + 1
            if len(data) == limit or not later:
                return out  # more to read later in this segment (or it is the one written)
            if valid < len(data):
                log.warning("journal tail cut while reading back", segment=self._path.name)
            self._path, self._offset = later[0], 0
            if out and sum(len(r.payload) for r in out) >= limit:
                return out
        return out

    @staticmethod
    def _read_at(path: Path, offset: int, limit: int) -> bytes:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(limit)
        except FileNotFoundError:
            return b""


class Spill:
    """The frames waiting in the journal while the pipeline spills, and what defers to them."""

    def __init__(self, segments_dir: Path, first_seq: int) -> None:
        self.tail = JournalTail(segments_dir, first_seq)
        self.frames = 0  # records spilled and not read back yet (nearly all frames)
        self.bytes = 0  # their payload bytes
        #: overlap changes made while spilling: (the last seq before it, contracts, active),
        #: applied when the read-back passes that seq, as they were when the frames came
        self.overlaps: list[tuple[int, tuple[str, ...], bool]] = []
        #: the latest runs spilled, as the journal queued them, up to RECENT_FRAMES: those it
        #: has not written yet are read back from here (see :meth:`rest`)
        self.recent: deque[Pending] = deque()
        self._recent_frames = 0

    @property
    def position(self) -> int:
        """The first seq not read back yet: no frame from it on is in memory or in Parquet."""
        return self.tail.next_seq

    def spilled(
        self, kind: int, first: int, received_us: int, connection: str, payloads: list[bytes]
    ) -> None:
        self.frames += len(payloads)
        self.bytes += sum(map(len, payloads))
        self.recent.append((kind, first, received_us, connection, payloads))
        self._recent_frames += len(payloads)
        while self._recent_frames > RECENT_FRAMES:
            self._recent_frames -= len(self.recent.popleft()[4])

    def rest(self) -> list[Record] | None:
        """Every record spilled and not read back yet, from :attr:`recent`; None when some
        are older than it holds (they are in the journal file: read on)."""
        position = self.position
        out = [
            Record(kind, seq, received_us, connection, payload)
            for kind, first, received_us, connection, payloads in self.recent
            if first + len(payloads) > position
            for seq, payload in enumerate(payloads, first)
            if seq >= position
        ]
        return out if len(out) == self.frames else None

    def taken(self, payloads: list[bytes]) -> None:
        self.frames -= len(payloads)
        self.bytes -= sum(map(len, payloads))

    def due_overlaps(self, before_seq: int) -> list[tuple[tuple[str, ...], bool]]:
        """The overlap changes made before the frame ``before_seq`` came, in order (removed)."""
        due = [(c, active) for mark, c, active in self.overlaps if mark < before_seq]
        self.overlaps = [o for o in self.overlaps if o[0] >= before_seq]
        return due
