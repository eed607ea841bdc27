"""Spilling: when the stream outruns the recorder, frames wait in the journal, and are read back.

The server never replays, so a recorder that stops reading in a burst risks the stream
itself. The pipeline spills when the rows in memory reach ``storage.max_buffered_rows``, or
when a socket read finds the readers behind the stream (it hands over
:data:`recorder.pipeline.BEHIND_FRAMES` frames or more: checking each frame on the event
loop is what cannot keep up). The frames (and snapshots, and connection events) that come
next go to the journal only, which takes them at a fraction of their full cost, and the
readers go on. They are read back in seq order as memory has room, in the runs the event
loop queued them in: the latest from a copy kept in memory, older ones from the journal file
(:class:`JournalTail`). They then take the usual path; once the read-back has caught up with
the stream, and the readers with the socket, frames go to memory again.

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

from recorder.records import Pending, decode_runs

log = structlog.get_logger("recorder.spill")

#: spilled frames kept in memory besides the journal, for the read-back to catch up with
#: the stream without reading the journal file (a fraction of a second of the feed)
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

    def read(self, limit: int = READ_BYTES) -> list[Pending]:
        """The whole records written since the last call, about ``limit`` bytes of them, as
        runs (:func:`recorder.records.decode_runs`)."""
        out: list[Pending] = []
        taken = 0  # payload bytes in out
        for _ in range(64):  # segments crossed in one call at most
            segments = self._segments()
            if self._path is None or all(path != self._path for _, path in segments):
                self._locate(segments)  # first call, or the segment was released since
            if self._path is None:
                return out
            later = [path for first, path in segments if path > self._path]
            # a segment with a later one is closed: read to its end, then go on
            data = self._read_at(self._path, self._offset, limit)
            runs, valid = decode_runs(data, self.next_seq)
            if valid == 0 and len(data) >= limit:  # one record larger than the limit
                limit *= 2
                continue
            self._offset += valid
            for kind, first, received_us, connection, payloads in runs:
                cut = self.next_seq - first  # > 0: a write retried in the next segment
                if cut < len(payloads):
                    if cut > 0:
                        first, payloads = first + cut, payloads[cut:]
                    out.append((kind, first, received_us, connection, payloads))
                    taken += sum(map(len, payloads))
                    self.next_seq = first + len(payloads)
            if len(data) == limit or not later:
                return out  # more to read later in this segment (or it is the one written)
            if valid < len(data):
                log.warning("journal tail cut while reading back", segment=self._path.name)
            self._path, self._offset = later[0], 0
            if taken >= limit:
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
        #: the latest runs spilled, as the journal queued them, up to RECENT_FRAMES and none
        #: read back already: they are read back from here (see :meth:`recent_runs`)
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

    def recent_runs(self, most: int) -> list[Pending] | None:
        """Runs spilled and not read back yet, about ``most`` frames of them from
        :attr:`recent` (in memory: the journal file is not read); None when the first is
        older than it holds (it is in the journal file: read on). The tail moves past them."""
        position, recent = self.position, self.recent
        while recent and recent[0][1] + len(recent[0][4]) <= position:  # read back already
            self._recent_frames -= len(recent.popleft()[4])
        if not recent or recent[0][1] > position:
            return None if self.frames else []
        out: list[Pending] = []
        count = 0
        for kind, first, received_us, connection, payloads in recent:
            cut = max(0, position - first)
            out.append(
                (kind, first + cut, received_us, connection, payloads[cut:] if cut else payloads)
            )
            count += len(payloads) - cut
            if count >= most:
                break
        if out:
            last = out[-1]
            self.tail.next_seq = last[1] + len(last[4])
        return out

    def taken(self, payloads: list[bytes]) -> None:
        self.frames -= len(payloads)
        self.bytes -= sum(map(len, payloads))

    def due_overlaps(self, before_seq: int) -> list[tuple[tuple[str, ...], bool]]:
        """The overlap changes made before the frame ``before_seq`` came, in order (removed)."""
        due = [(c, active) for mark, c, active in self.overlaps if mark < before_seq]
        self.overlaps = [o for o in self.overlaps if o[0] >= before_seq]
        return due
