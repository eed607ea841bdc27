"""Write-ahead journal: every frame, as received, is appended here before it is parsed.

Layout: ``{data_dir}/_journal/{first_seq:020d}.jnl`` segments, each a sequence of records
(:mod:`recorder.records`).

The event loop only queues a tuple per run of records (the frames of one socket read); one
writer thread packs what is queued into RUNS records (:mod:`recorder.records`) and writes
them to the segment every ``write_interval`` (so a ``kill -9`` loses at most that much) and
fdatasyncs it every ``fsync_interval`` (so a power loss loses at most that much). Segments
whose frames are all in Parquet are removed, or compressed into ``_journal/archive`` and
kept for ``retention_days``.

Reading checks every record's CRC; a torn or corrupt tail is cut off with a warning that
says how many bytes, and never stops anything.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import structlog

from recorder.records import (
    BLOCK_RECORDS,
    EVENT,
    Pending,
    Record,
    SessionCounts,
    decode_runs,
    encode,
    encode_runs,
    highest_seq,
    records_of,
)
from recorder.state import fsync_dir

log = structlog.get_logger("recorder.journal")

JOURNAL_DIR = "_journal"
ARCHIVE_DIR = "archive"
_SUFFIX = ".jnl"
_ARCHIVE_SUFFIX = ".jnl.zst"


def _segment_first_seq(path: Path) -> int:
    return int(path.name.split(".", 1)[0])


class Journal:
    """The append side (event loop) and the writer thread of the journal."""

    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: bool = True,
        fsync_interval: float = 0.02,
        write_interval: float = 0.005,
        segment_bytes: int = 64 * 1024 * 1024,
        retention_days: float = 0.0,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self.dir = data_dir / JOURNAL_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.write_interval = write_interval
        self.segment_bytes = segment_bytes
        self.retention_days = retention_days
        self._on_error = on_error
        self._written = threading.Condition()
        self._wake = threading.Event()
        #: records queued by the event loop (deque appends and pops are atomic: no lock)
        self._pending: deque[Pending] = deque()
        self._retry: list[Pending] = []  # a chunk whose write failed (writer thread)
        self._queued_bytes = 0  # payload bytes queued (event loop) ...
        self._written_bytes = 0  # ... and written (writer thread)
        self._closing = False
        self._release_below = 0
        self._released_checked = 0  # the release mark the segments were last checked for
        self._file: int | None = None
        self._file_path: Path | None = None
        self._file_bytes = 0
        self._sessions = SessionCounts()
        self._thread: threading.Thread | None = None
        #: last seq handed to the OS (survives a kill -9) and last seq fsynced (survives power loss)
        self.written_seq = 0
        self.durable_seq = 0
        self.failing = False

    @property
    def backlog_bytes(self) -> int:
        """Payload bytes queued and not yet written to the journal file."""
        return self._queued_bytes - self._written_bytes

    # ------------------------------------------------------------------ reading (at start)

    def segments(self) -> list[Path]:
        """Live segments in seq order."""
        return sorted(self.dir.glob(f"*{_SUFFIX}"), key=_segment_first_seq)

    def recover(self) -> Iterator[Record]:
        """Every record of the live segments, in order, cutting torn or corrupt tails.

        A record repeated after a failed write (same seq) is given once.
        """
        last_seq = -1
        for path in self.segments():
            runs = self.read_segment(path, last_seq)
            last_seq = max((r[1] + len(r[4]) - 1 for r in runs), default=last_seq)
            yield from records_of(runs)

    @staticmethod
    def read_segment(path: Path, after_seq: int = -1) -> list[Pending]:
        """The records of one segment as runs (:func:`recorder.records.decode_runs`), its
        torn or corrupt tail cut (from the file too), but a repeat of a seq up to
        ``after_seq`` or given before (a write retried in the next segment after it failed);
        checkpoints (seq 0) are kept."""
        data = path.read_bytes()
        runs, valid = decode_runs(data)
        if valid < len(data):
            log.warning(
                "journal tail cut",
                segment=path.name,
                bytes_cut=len(data) - valid,
                records_kept=sum(len(run[4]) for run in runs),
            )
            with open(path, "r+b") as handle:
                handle.truncate(valid)
                handle.flush()
                os.fsync(handle.fileno())
        kept: list[Pending] = []
        highest = after_seq
        for kind, first, received_us, connection, payloads in runs:
            last = first + len(payloads) - 1
            if first == 0:
                kept.append((kind, first, received_us, connection, payloads))
            elif last > highest:
                cut = max(0, highest + 1 - first)
                kept.append((kind, first + cut, received_us, connection, payloads[cut:]))
                highest = last
        return kept

    @staticmethod
    def highest_seq(segments: list[Path]) -> int:
        """The highest seq in ``segments`` (the last one that holds a record), from the
        records' headers: no frame is unpacked."""
        for path in reversed(segments):
            if found := highest_seq(path.read_bytes()):
                return found
        return 0

    def archived(self) -> Iterator[Record]:
        """Every record of the retained (compressed) segments, in order."""
        archive = self.dir / ARCHIVE_DIR
        for path in sorted(archive.glob(f"*{_ARCHIVE_SUFFIX}"), key=_segment_first_seq):
            with pa.CompressedInputStream(str(path), "zstd") as stream:
                runs, _ = decode_runs(stream.read())
            yield from records_of(runs)

    # ------------------------------------------------------------------ writing

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()

    def append(
        self, kind: int, seq: int, received_us: int, connection: str, payload: bytes
    ) -> None:
        """Queue one record (event loop; no I/O, no encoding: the writer packs RUNS records)."""
        self._pending.append((kind, seq, received_us, connection, [payload]))
        self._queued_bytes += len(payload)

    def extend(
        self, kind: int, first_seq: int, received_us: int, connection: str, payloads: list[bytes]
    ) -> None:
        """Queue records of consecutive seqs from ``first_seq``, one per payload, as
        :meth:`append` of each would; ``payloads`` is the journal's from now on."""
        self._pending.append((kind, first_seq, received_us, connection, payloads))
        self._queued_bytes += sum(map(len, payloads))

    def release(self, below_seq: int) -> None:
        """Every frame with a seq below ``below_seq`` is in Parquet: its segments may go."""
        self._release_below = max(self._release_below, below_seq)

    def close(self) -> None:
        """Write and fsync everything queued, then stop the writer thread."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        last_sync = time.monotonic()
        while True:
            self._wake.wait(self.write_interval)
            self._wake.clear()
            # read after the wake is cleared: a close() that woke this wait is seen now, not
            # one write_interval later (everything queued before it is written below)
            closing = self._closing
            try:
                self._write_pending()
                now = time.monotonic()
                if closing or now - last_sync >= self.fsync_interval:
                    self._sync()
                    last_sync = now
                if self._release_below != self._released_checked:
                    self._released_checked = self._release_below
                    self._remove_released()
                self.failing = False
            except OSError as exc:
                self.failing = True
                if self._on_error is not None:
                    self._on_error(exc)
                if closing:
                    return  # the rows are in Parquet or reported lost by the pipeline
                time.sleep(min(1.0, self.fsync_interval * 10))
                continue
            if closing:
                if self._file is not None:
                    os.close(self._file)
                    self._file, self._file_path = None, None
                with contextlib.suppress(OSError):
                    self._remove_released(final=True)
                return

    def _write_pending(self) -> None:
        pending = self._pending
        chunk, self._retry = self._retry, []
        # popleft called by C code, as many times as there were runs a moment ago
        chunk.extend(itertools.islice(iter(pending.popleft, None), len(pending)))
        if not chunk:
            return
        if self._file is None or self._file_bytes >= self.segment_bytes:
            self._rotate(chunk[0][1])
        assert self._file is not None
        before = self._file_bytes
        try:
            for block in _blocks(chunk, BLOCK_RECORDS):
                self._file_bytes += _write_all(self._file, encode_runs(block))
        except OSError:
            # Keep the whole chunk for the next try, in a new segment: a record never
            # straddles segments, and a partial chunk left here is a torn tail that
            # recovery cuts (or a repeat that it skips by seq).
            self._retry = chunk
            with contextlib.suppress(OSError):
                os.ftruncate(self._file, before)
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = None
            raise
        self._written_bytes += sum(sum(map(len, run[4])) for run in chunk)
        self._sessions.observe_runs(chunk)
        last = chunk[-1]
        with self._written:
            self.written_seq = last[1] + len(last[4]) - 1
            self._written.notify_all()

    def recovered_up_to(self, seq: int) -> None:
        """Records up to ``seq`` were found on disk at start: they count as written."""
        with self._written:
            self.written_seq = max(self.written_seq, seq)
            self.durable_seq = max(self.durable_seq, seq)
            self._written.notify_all()

    def wait_written(self, seq: int, timeout: float) -> bool:
        """Block (not on the event loop) until ``seq`` is in the journal file; False on timeout.

        The write-ahead rule: a frame's rows may reach Parquet only after the frame itself
        reached the journal, or a crash could leave rows that no journal record accounts for.
        """
        with self._written:
            return self._written.wait_for(lambda: self.written_seq >= seq, timeout)

    def _rotate(self, first_seq: int) -> None:
        if self._file is not None:
            self._sync()
            os.close(self._file)
            self._file = None
        path = self.dir / f"{first_seq:020d}{_SUFFIX}"
        self._released_checked = -1  # the segment before may now be removable
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._file, self._file_path, self._file_bytes = fd, path, os.fstat(fd).st_size
        # each segment opens with the open sessions and their frame counts so far, so the
        # sessions stay exact after older segments are gone
        header = encode(EVENT, 0, time.time_ns() // 1000, "", self._sessions.checkpoint())
        os.write(fd, header)
        self._file_bytes += len(header)
        fsync_dir(self.dir)

    def _sync(self) -> None:
        if self._file is not None:
            if self.fsync:
                os.fdatasync(self._file)
            self.durable_seq = self.written_seq

    def _remove_released(self, final: bool = False) -> None:
        """Remove (or archive) closed segments whose every record is below the release mark.

        ``final``: the writer is closed and nothing is pending, so the last segment's records
        all stand below ``written_seq + 1``; it goes too when that is released.
        """
        segments = self.segments()
        bounds = [_segment_first_seq(s) for s in segments[1:]]
        if final and not self._pending and not self._retry:
            bounds.append(self.written_seq + 1)
        for path, bound in zip(segments, bounds, strict=False):
            if bound > self._release_below or path == self._file_path:
                break
            if self.retention_days > 0:
                self._archive(path)
            else:
                path.unlink()
        if self.retention_days > 0:
            cutoff = time.time() - self.retention_days * 86400
            for old in (self.dir / ARCHIVE_DIR).glob(f"*{_ARCHIVE_SUFFIX}"):
                if old.stat().st_mtime < cutoff:
                    old.unlink()

    def _archive(self, path: Path) -> None:
        archive = self.dir / ARCHIVE_DIR
        archive.mkdir(exist_ok=True)
        target = archive / (path.name.removesuffix(_SUFFIX) + _ARCHIVE_SUFFIX)
        tmp = target.with_name("." + target.name + ".tmp")
        with pa.CompressedOutputStream(str(tmp), "zstd") as out:
            out.write(path.read_bytes())
        os.replace(tmp, target)
        fsync_dir(archive)
        path.unlink()


def _blocks(runs: list[Pending], most: int) -> Iterator[list[Pending]]:
    """``runs`` in order, in lists of ``most`` records at most (a run cut in two if need be:
    reading joins it again)."""
    block: list[Pending] = []
    room = most
    for run in runs:
        kind, first, received_us, connection, payloads = run
        while len(payloads) > room:
            block.append((kind, first, received_us, connection, payloads[:room]))
            first, payloads = first + room, payloads[room:]
            yield block
            block, room = [], most
        if payloads:
            block.append((kind, first, received_us, connection, payloads))
            room -= len(payloads)
        if room == 0:
            yield block
            block, room = [], most
    if block:
        yield block


def _write_all(fd: int, parts: list[bytes]) -> int:
    """Write ``parts`` in order, whole (os.writev may write less than asked); bytes written."""
    total = sum(map(len, parts))
    written = os.writev(fd, parts)
    if written < total:
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
    return total
