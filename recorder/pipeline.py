"""From frames to Parquet files: seq numbers, flattening, quarantine, buffering and flushes.

``on_frame`` runs on the event loop for every frame and does no I/O; Parquet writes run in
one worker thread, so a slow disk never stalls the receive loops. A failed write puts its
rows back and is retried with backoff: nothing received is dropped while the process lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path

import structlog

from recorder.buffer import Batch, Buffer, Key
from recorder.config import StorageConfig
from recorder.errors import FlattenError, StorageError
from recorder.flatten import Extra, flatten
from recorder.paths import partition_date
from recorder.state import SeqAllocator
from recorder.writer import ParquetWriter, WrittenFile

log = structlog.get_logger("recorder.pipeline")

_DAY_BUCKET_US = 15 * 60 * 1_000_000  # every time zone offset in use is a multiple of 15 min


@dataclass
class Stats:
    """Counters of one recorder run (the metrics and the progress line read them)."""

    frames: int = 0
    quarantined: int = 0
    rows_written: Counter[str] = field(default_factory=Counter)
    files_written: int = 0
    bytes_written: int = 0
    flushes: int = 0
    last_flush_at: float | None = None  # wall-clock seconds
    last_flush_ok: bool = True
    last_message_at: dict[str, float] = field(default_factory=dict)


class LocalDays:
    """Local calendar dates of UTC instants, memoised per 15-minute bucket (a hot-path cache)."""

    def __init__(self, tz: tzinfo) -> None:
        self._tz = tz
        self._cache: dict[int, str] = {}

    def __call__(self, instant_us: int) -> str:
        bucket = instant_us // _DAY_BUCKET_US
        day = self._cache.get(bucket)
        if day is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            day = self._cache[bucket] = partition_date(instant_us, self._tz).isoformat()
        return day


class Pipeline:
    """Turns frames into buffered rows and buffered rows into Parquet files."""

    def __init__(
        self,
        data_dir: Path,
        storage: StorageConfig,
        partition_tz: tzinfo,
        naive_tz: tzinfo,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.storage = storage
        self._naive_tz = naive_tz
        self._local_day = LocalDays(partition_tz)
        self._seq = SeqAllocator(data_dir)
        self._buffer = Buffer(
            storage.flush_interval_seconds, storage.max_rows_per_file, storage.max_buffered_rows
        )
        self._writer = ParquetWriter(data_dir, storage.compression_level, storage.fsync)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._seen_sections: set[str | None] = set()
        self._failures = 0
        self._last_error_log = 0.0
        self.stats = Stats()

    @property
    def rows_buffered(self) -> int:
        return self._buffer.rows

    # ------------------------------------------------------------------ hot path

    def on_frame(self, connection: str, frame: bytes | str, received_us: int) -> int:
        """Take one frame as received; returns its seq. Never raises for bad input."""
        seq = self._seq.next()
        self.stats.frames += 1
        now = time.monotonic()
        try:
            message = flatten(frame, self._naive_tz)
        except FlattenError as exc:
            self._quarantine(connection, frame, received_us, seq, exc.reason, now)
            return seq
        contract = message.contract
        day = self._local_day(message.exchange_us)
        head = (message.exchange_us, received_us, seq)
        full = False
        for table, rows in message.rows.items():
            full |= self._buffer.add((table, day, contract), [head + row for row in rows], now)
        if message.extras:
            full |= self._buffer.add(
                ("extras", day, contract), [head + extra for extra in message.extras], now
            )
            self._note_sections(message.extras, contract)
        self.stats.last_message_at[contract] = time.time()
        if full:
            self._wake.set()
        return seq

    def _quarantine(
        self,
        connection: str,
        frame: bytes | str,
        received_us: int,
        seq: int,
        reason: str,
        now: float,
    ) -> None:
        raw = frame if isinstance(frame, str) else frame.decode("utf-8", "backslashreplace")
        day = self._local_day(received_us)
        self.stats.quarantined += 1
        if self._buffer.add(
            ("quarantine", day, None), [(received_us, seq, connection, reason, raw)], now
        ):
            self._wake.set()
        log.warning("frame quarantined", seq=seq, connection=connection, reason=reason)

    def _note_sections(self, extras: list[Extra], contract: str) -> None:
        for section, _, _ in extras:
            if section not in self._seen_sections:
                self._seen_sections.add(section)
                log.info("unknown section kept in extras", section=section, contract=contract)

    # ------------------------------------------------------------------ flushing

    def start(self) -> None:
        """Start the background flusher (call once, from the event loop)."""
        self._flusher = asyncio.create_task(self.run_flusher(), name="flusher")

    async def run_flusher(self) -> None:
        """Flush due partitions until :meth:`close`; a failed write is retried with backoff."""
        tick = min(0.25, self.storage.flush_interval_seconds / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()
            if self._closing:
                return
            keys = self._buffer.due(time.monotonic())
            if keys and not await self._flush(keys):
                backoff = min(30.0, 0.5 * 2 ** min(self._failures, 6))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)

    async def _flush(self, keys: list[Key] | None) -> bool:
        """Write the given partitions (None: all); False when a write failed (rows kept)."""
        batches = self._buffer.take_all() if keys is None else self._buffer.take(keys)
        if not batches:
            return True
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        written, failed, error = await loop.run_in_executor(self._pool, self._write, batches)
        for file in written:
            self.stats.rows_written[file.table] += file.rows
            self.stats.bytes_written += file.bytes
        self.stats.files_written += len(written)
        self.stats.flushes += 1
        self.stats.last_flush_at = time.time()
        if error is None:
            self._failures = 0
            self.stats.last_flush_ok = True
            log.debug("flushed", files=len(written), seconds=round(time.monotonic() - started, 3))
            return True
        self._buffer.restore(failed, time.monotonic())
        self._failures += 1
        self.stats.last_flush_ok = False
        if time.monotonic() - self._last_error_log >= 60 or self._failures == 1:
            self._last_error_log = time.monotonic()
            log.error(
                "flush failed; rows kept in memory and retried",
                error=str(error),
                rows_kept=self._buffer.rows,
                failures=self._failures,
            )
        return False

    def _write(
        self, batches: list[Batch]
    ) -> tuple[list[WrittenFile], list[Batch], StorageError | None]:
        written = []
        for index, batch in enumerate(batches):
            try:
                written.append(self._writer.write(batch))
            except StorageError as exc:
                return written, batches[index:], exc
        return written, [], None

    async def close(self, patience: float = 30.0) -> bool:
        """Flush everything still buffered (retrying for up to ``patience`` s); True when done."""
        self._closing = True
        self._wake.set()
        self._stopping.set()
        if self._flusher is not None:
            await self._flusher  # it finishes the write in progress, so files stay in seq order
        deadline = time.monotonic() + patience
        ok = await self._flush(None)
        while not ok and time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            ok = await self._flush(None)
        if not ok:
            log.error("rows could not be written before exit", rows_lost=self._buffer.rows)
        self._pool.shutdown(wait=True)
        self._seq.close()
        return ok
