"""From frames to Parquet files: the flush side, on top of the event loop's (recorder.intake).

:class:`Pipeline` extends :class:`recorder.intake.Intake`, which takes the frames in (seq
numbers, the journal, flattening, quarantine) and buffers their rows. Decoding and Parquet
writes run in one worker thread (recorder.flushing), so a slow disk never stalls the receive
loops; a failed write puts its rows back and is retried with backoff. Once every row of a
frame is in Parquet, its journal segment goes. Memory is bounded by rows: once
``max_buffered_rows`` wait, or a socket read finds the readers behind the stream, the frames
that come next wait in the journal and are read back as flushes make room (recorder.spill);
without a working journal, or once ``journal.max_spill_megabytes`` wait there, the readers
stop until a flush makes room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import tzinfo
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from recorder.buffer import Key
from recorder.columnar import FrameBatch
from recorder.config import JournalConfig, StorageConfig
from recorder.flushing import FlushWorker
from recorder.intake import DECODE_FRAMES, Intake
from recorder.records import Pending
from recorder.spill import READ_BYTES, Spill

log = structlog.get_logger("recorder.pipeline")

#: frames handed over by one socket read from which the readers are taken to be behind the
#: stream (the socket had ~140 KB waiting): frames then wait in the journal, which takes
#: them at a fraction of their cost, until the reads are small again (1-5 frames a read at
#: 10,000 msg/s over 10 streams; ~370, a 256 KB read, when the event loop cannot keep up)
BEHIND_FRAMES = 200
#: records read back between two turns of the readers (a few ms of the event loop)
READ_BACK_SLICE = 1000
#: once no frame has come for this long, the rows waiting are written at once: nothing more
#: is coming to batch them with (the end of a burst or of a session is visible promptly)
QUIET_SECONDS = 0.5


def _slices(runs: list[Pending], frames: int) -> Iterator[list[Pending]]:
    """``runs`` in order, in lists of about ``frames`` frames."""
    start = count = 0
    for end, run in enumerate(runs, 1):
        count += len(run[4])
        if count >= frames:
            yield runs[start:end]
            start, count = end, 0
    if start < len(runs):
        yield runs[start:]


class Pipeline(Intake):
    """Turns frames and connection events into buffered rows, and rows into Parquet files."""

    def __init__(
        self,
        data_dir: Path,
        storage: StorageConfig,
        partition_tz: tzinfo,
        naive_tz: tzinfo,
        journal: JournalConfig | None = None,
        run: str = "",
        *,
        bulk_decode: bool = True,
    ) -> None:
        super().__init__(
            data_dir, storage, partition_tz, naive_tz, journal, run, bulk_decode=bulk_decode
        )
        self._parts: dict[str, list[pa.Table]] = {}  # decoded rows not written yet
        self._parts_rows = 0
        self._parts_min_seq: int | None = None
        self._parts_since: float | None = None
        self._in_flight_min_seq: int | None = None  # taken by a decode or flush under way
        self._in_flight_rows = 0
        self._last_flush_seconds = 0.0
        #: readers stop while ``full`` (recorder.streams.Backpressure): memory stays bounded
        self.full = False
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None  # reads back spilled frames
        self._failures = 0
        self._worker = FlushWorker(
            data_dir, storage, naive_tz, self.journal, self.stats, self._muted
        )
        self._max_spill_bytes = (journal.max_spill_megabytes if journal else 0) * 1024 * 1024
        #: frames waiting in the journal are read back while memory holds fewer rows
        self._read_back_below = max(1, storage.max_buffered_rows // 2)
        #: set while a crash's journal is replayed beside the stream (recorder.recovery)
        self.recovering = False

    @property
    def rows_buffered(self) -> int:
        """Rows in memory waiting for a flush (a frame not decoded yet counts as the rows it
        will make, estimated from the frames decoded so far: memory is bounded by rows)."""
        waiting = int(len(self._frames.seq) * self._worker.rows_per_frame)
        return self._buffer.rows + self._parts_rows + waiting + self._in_flight_rows

    @property
    def _rows_held(self) -> int:
        """:attr:`rows_buffered` but those of the decode or flush under way."""
        return self.rows_buffered - self._in_flight_rows

    @property
    def spilled_waiting(self) -> int:
        """Frames, snapshots and events waiting in the journal to be read back (recorder.spill)."""
        return 0 if self._spill is None else self._spill.frames

    @property
    def _behind(self) -> bool:
        """The last socket read found the readers behind the stream (never while closing:
        no read comes any more)."""
        return self._last_read >= BEHIND_FRAMES and not self._closing

    def _check_pressure(self) -> None:
        """Spill when memory is full or the readers fall behind the stream (the last socket
        read handed over BEHIND_FRAMES frames or more); without a journal to spill to, stop
        the readers while memory is full; restart them once there is room."""
        journal, spill = self.journal, self._spill
        memory_full = self.rows_buffered >= self.storage.max_buffered_rows
        journal_ok = journal is not None and not journal.failing
        if (memory_full or self._behind) and spill is None and journal_ok:
            spill = self._start_spill()
            self.stats.spills += 1
            if memory_full:
                log.info("memory full: frames wait in the journal", rows=self.rows_buffered)
            else:
                log.info(
                    "the stream outruns the recorder: frames wait in the journal",
                    frames_read=self._last_read,
                )
        if spill is None:
            stop = memory_full
        else:  # the frames wait on disk, unless the journal cannot take them or holds enough
            failing = journal is not None and journal.failing
            stop = failing or spill.bytes >= self._max_spill_bytes
        if memory_full:
            self._wake.set()
        if stop:
            if not self.full:
                self.full = True
                self.stats.pauses += 1
            self._room.clear()
        elif self.full:
            self.full = False
            self._room.set()

    def _start_spill(self) -> Spill:
        """From the next seq on, what comes waits in the journal (see recorder.spill)."""
        assert self.journal is not None
        spill = self._spill = Spill(self.journal.dir, self._seq.last + 1)
        self._reader = asyncio.get_running_loop().create_task(
            self._read_back_while(spill), name="read-back"
        )
        return spill

    def await_recovery(self) -> None:
        """What comes from now on waits in the journal until :meth:`recovered`, so that its
        rows reach the files after those of the journal being replayed (recorder.recovery);
        meanwhile no journal segment goes."""
        self.recovering = True
        if self._spill is None:
            self._start_spill()

    def recovered(self) -> None:
        """The journal is replayed: what waited is read back, and segments may go again."""
        self.recovering = False
        self._wake.set()

    async def room_to_replay(self) -> None:
        """Return once memory has room for more of the journal being replayed (the flusher
        decodes and writes meanwhile), or the pipeline closes."""
        while self._rows_held >= self._read_back_below and not self._closing:
            self._wake.set()
            await asyncio.sleep(0.005)

    async def room(self) -> None:
        """Return once the pipeline takes frames again (readers wait here while ``full``)."""
        if self.full:
            await self._room.wait()

    # ------------------------------------------------------------------ flushing

    def start(self) -> None:
        """Start the journal writer and the background flusher (call once, on the loop)."""
        if self.journal is not None:
            self.journal.start()
        self._flusher = asyncio.create_task(self.run_flusher(), name="flusher")

    async def run_flusher(self) -> None:
        """Decode and flush until :meth:`close`; a failed write is retried with backoff."""
        tick = min(0.25, self.storage.flush_interval_seconds / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()
            if self._closing:
                return
            if len(self._frames) >= DECODE_FRAMES:
                await self.decode_waiting()
            if self.due(time.monotonic()) and not await self.flush():
                backoff = min(30.0, 0.5 * 2 ** min(self._failures, 6))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)

    async def _read_back_while(self, spill: Spill) -> None:
        """Read back what waits in the journal until nothing does (or the pipeline closes).

        A task of its own, beside the flusher: frames are read back and checked while the
        rows read before are decoded and written, each half of memory's bound in turn.
        """
        while self._spill is spill and not self._closing:
            try:
                taken = await self.read_back_spilled()
            except Exception as exc:  # a read error: the frames stay in the journal meanwhile
                self._muted.warning("read-back", "reading back the journal failed", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            if taken == 0:
                await asyncio.sleep(0.005)  # no room yet, or nothing new in the journal

    async def read_back_spilled(self) -> int | None:
        """Read back some of what waits in the journal while memory has room (half the bound,
        besides the decode or flush under way): how many records were taken (0: no room, or
        nothing new written yet), or None once nothing waits any more.

        The latest frames are taken from memory (:meth:`Spill.recent_runs`), older ones from
        the journal file. Once all that waits is in memory, memory holds less than a quarter
        of its bound and the readers have caught up with the stream, it is taken in one step
        of the event loop, and frames go to memory again.
        """
        spill = self._spill
        if spill is None:
            return None
        if self.recovering:
            return 0  # what waits follows the journal being replayed
        room = self._read_back_below - self._rows_held
        if room <= 0:
            return 0
        wanted = max(READ_BACK_SLICE, int(room / self._worker.rows_per_frame))
        runs = spill.recent_runs(wanted)
        if runs is None:  # older than what memory holds: from the journal file
            frame_bytes = spill.bytes / spill.frames if spill.frames else 1024
            limit = min(READ_BYTES, max(65536, int(wanted * frame_bytes)))
            runs = await asyncio.to_thread(spill.tail.read, limit)
        taken = 0
        for piece in _slices(runs, READ_BACK_SLICE):
            self.read_back(spill, piece)
            taken += sum(len(run[4]) for run in piece)
            self._wake.set()  # the flusher decodes and writes them
            await asyncio.sleep(0)  # the readers' turn: the stream comes first
        roomy = self._rows_held < self._read_back_below // 2
        rest = spill.recent_runs(spill.frames) if roomy and not self._behind else None
        if rest is not None:  # the rest is in memory: take it, and the stream goes there again
            self.read_back(spill, rest)
            for contracts, active in spill.due_overlaps(self._seq.last + 1):
                self._overlap(contracts, active)
            self._spill = None
            self._wake.set()
            log.info("frames go to memory again", spilled=self.stats.spilled)
            self._check_pressure()
            return None
        self._check_pressure()
        return taken

    def due(self, now: float) -> bool:
        """A flush is due when the decoded rows fill a file (``max_rows_per_file``: a flush
        costs about the same per row whatever its size, so a busy feed is written as it
        comes rather than held), when memory holds too many rows, or early enough that the
        oldest row is visible flush_interval after it came (a flush starts ahead by the last
        one's duration, at most half the interval), or at once when no frame has come for
        ``QUIET_SECONDS``; while frames wait in the journal, once memory holds half its bound
        (what is read back waits for room)."""
        interval = self.storage.flush_interval_seconds
        deadline = now - interval + min(self._last_flush_seconds, interval / 2)
        if now - self._last_frame_at >= QUIET_SECONDS:
            deadline = now  # the feed is quiet: whatever waits is due
        return (
            bool(self._buffer.due(now))
            or self._parts_rows >= self.storage.max_rows_per_file
            or self.rows_buffered >= self.storage.max_buffered_rows
            or (self._spill is not None and self._rows_held >= self._read_back_below)
            or any(
                since is not None and since <= deadline
                for since in (self._frames.started, self._parts_since)
            )
        )

    async def decode_waiting(self) -> None:
        """Decode the plain frames received so far into Arrow rows (in the writer thread)."""
        frames, self._frames = self._frames, FrameBatch()
        self._in_flight_min_seq = frames.first_seq
        self._in_flight_rows = int(len(frames.seq) * self._worker.rows_per_frame)
        try:
            tables = await self._worker.decode(frames)
        finally:
            self._in_flight_min_seq, self._in_flight_rows = None, 0
        self._keep(
            {name: [rows] for name, rows in tables.items()}, frames.started or time.monotonic()
        )

    def _keep(self, tables: dict[str, list[pa.Table]], since: float) -> None:
        """Hold decoded (or not written) rows until the next flush."""
        for name, pieces in tables.items():
            for rows in pieces:
                if rows.num_rows == 0:
                    continue
                self._parts.setdefault(name, []).append(rows)
                self._parts_rows += rows.num_rows
                first = int(pc.min(rows.column("seq")).as_py())
                floor = self._parts_min_seq
                self._parts_min_seq = first if floor is None else min(floor, first)
        if self._parts and (self._parts_since is None or since < self._parts_since):
            self._parts_since = since

    async def flush(self, keys: list[Key] | None = None) -> bool:
        """Write every buffered row (``keys`` is ignored: a flush takes all partitions, so
        each gets one file per flush); False when a write failed (rows kept)."""
        floors = [self._buffer.min_seq(), self._frames.first_seq, self._parts_min_seq]
        batches = self._buffer.take_all()
        frames, self._frames = self._frames, FrameBatch()
        parts, self._parts = self._parts, {}
        self._in_flight_min_seq = min((f for f in floors if f is not None), default=None)
        self._in_flight_rows = (
            sum(len(b.rows) for b in batches)
            + int(len(frames.seq) * self._worker.rows_per_frame)
            + self._parts_rows
        )
        self._parts_rows, self._parts_min_seq, self._parts_since = 0, None, None
        if not (batches or len(frames) or parts):
            self._in_flight_min_seq, self._in_flight_rows = None, 0
            return True
        started = time.monotonic()
        job = [batches, frames, parts]  # the worker takes them: it alone holds them then
        del batches, frames, parts
        try:
            written, failed, error = await self._worker.write(job)
        finally:
            self._in_flight_min_seq, self._in_flight_rows = None, 0
        for file in written:
            self.stats.rows_written[file.table] += file.rows
            self.stats.bytes_written += file.bytes
        self.stats.files_written += len(written)
        self.stats.flushes += 1
        self.stats.last_flush_at = time.time()
        if failed:
            self._keep(failed, time.monotonic())
        self._check_pressure()
        self._last_flush_seconds = time.monotonic() - started
        if error is None:
            self._release_journal()
            self._failures = 0
            self.stats.last_flush_ok = True
            log.debug("flushed", files=len(written), seconds=round(time.monotonic() - started, 3))
            return True
        self._failures += 1
        self.stats.flush_failures += 1
        self.stats.last_flush_ok = False
        self._muted.warning(
            "flush",
            "flush failed; rows kept in memory and retried",
            error=str(error),
            rows_kept=self.rows_buffered,
            failures=self._failures,
        )
        return False

    def _release_journal(self) -> None:
        if self.journal is not None and not self.recovering:
            floors = [
                self._buffer.min_seq(),
                self._frames.first_seq,
                self._parts_min_seq,
                self._in_flight_min_seq,
                None if self._spill is None else self._spill.position,
            ]
            floor = min((f for f in floors if f is not None), default=None)
            self.journal.release(self._seq.last + 1 if floor is None else floor)

    async def close(self, patience: float = 30.0) -> bool:
        """Flush everything still buffered (retrying for up to ``patience`` s); True when done."""
        self._closing = True
        self._wake.set()
        self._stopping.set()
        if self._flusher is not None:
            await self._flusher  # it finishes the write in progress, so files stay in seq order
        if self._reader is not None:
            await self._reader  # it finishes the read-back in progress
        deadline = time.monotonic() + patience
        ok = await self.flush(None)
        while time.monotonic() < deadline and not self.recovering:
            if not ok:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            elif self._spill is None:
                break
            elif await self.read_back_spilled() == 0 and self.rows_buffered == 0:
                await asyncio.sleep(0.01)  # the journal has not written the last frames yet
            ok = await self.flush(None)
        if self.recovering:
            log.warning(
                "stopped before the journal was replayed; the rest is replayed at the next start",
                rows=self._buffer.rows,
            )
            ok = False
        elif not ok or self._spill is not None:
            log.error(
                "rows not written before exit; they stay in the journal",
                rows=self._buffer.rows,
                frames_in_journal=self.spilled_waiting,
            )
            ok = False
        self._worker.close()
        if self.journal is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.journal.close)
        self._seq.close()
        return ok
