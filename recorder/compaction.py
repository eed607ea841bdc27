"""Compaction runs: ``ime-recorder compact``, and the daemon's compaction of each closed date.

:class:`recorder.compactor.Compactor` rewrites one partition (a date folder holding day files
through :class:`recorder.datefold.DateFold`); a run picks the partitions (those of the closed
dates, or of the dates asked for), removes what a crashed run left, skips partitions already
compacted (so a second run changes nothing) and shows progress.
One run at a time per data directory (a lock file in ``_state``). Compacted files are written
at zstd level 19 (``recorder.packing.COMPRESSION_LEVEL``): 1.7 times the CPU of level 9
for 2 % fewer bytes, affordable once per partition and off the recording's path.

The daemon runs a pass at start-up (catching up on the dates that closed while it was down)
and then ``compaction.after_seconds`` after each local midnight of ``partition_timezone``.
Each pass looks at every closed date, so late rows that reached a date after its compaction
(a snapshot re-sent with an old timestamp, a journal replay) are folded in by the next pass.
The work runs in a thread and stops between two partitions when the daemon stops. The
intraday merge of the open dates' day files (:mod:`recorder.merging`) takes the same run lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path

import pyarrow as pa
import structlog

from recorder.compactor import Compactor, Layout, Outcome, Partition
from recorder.packing import COMPRESSION_LEVEL
from recorder.progress import progress
from recorder.state import STATE_DIR

log = structlog.get_logger("recorder.compaction")


@dataclass
class Result:
    """What a compaction run did."""

    compacted: int = 0  # partition folders made one compacted file (a date fold: several)
    skipped: int = 0  # partitions already one compacted file
    files_before: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rows: int = 0
    leftovers_removed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class CompactionBusy(RuntimeError):
    """Another process is compacting this data directory."""


def closed_dates_end(now: datetime, tz: tzinfo, after_seconds: float = 0.0) -> date:
    """The first date that is not closed: dates before it ended ``after_seconds`` ago or more."""
    return (now - timedelta(seconds=after_seconds)).astimezone(tz).date()


@contextmanager
def run_lock(data_dir: Path, wait: bool) -> Iterator[None]:
    """One compaction at a time per data directory (``CompactionBusy`` when ``wait`` is False)."""
    path = data_dir / STATE_DIR / "compaction.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise CompactionBusy(f"another compaction is running in {data_dir}") from None
            log.info("another compaction is running; waiting for it", data_dir=str(data_dir))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def compact(
    data_dir: Path,
    tz: tzinfo,
    *,
    days: Iterable[date] | None = None,
    now: datetime | None = None,
    after_seconds: float = 0.0,
    bar: bool | None = None,
    wait: bool = True,
    stop: threading.Event | None = None,
    compactor: Compactor | None = None,
) -> Result:
    """Compact the partitions of ``days`` (None: every date closed ``after_seconds`` ago).

    Partitions already holding one compacted file are skipped, so a second run changes
    nothing. Raises CompactionBusy when another run holds the data directory and ``wait`` is
    False.
    """
    compactor = compactor or Compactor(data_dir)
    wanted = None if days is None else set(days)
    end = closed_dates_end(now or datetime.now(UTC), tz, after_seconds)

    def chosen(day: date) -> bool:
        return day < end if wanted is None else day in wanted

    result = Result()
    with run_lock(compactor.data_dir, wait):
        result.leftovers_removed = compactor.remove_leftovers()
        todo = []
        for found in compactor.partitions(chosen):
            partition = compactor.remove_covered(found) if len(found.files) > 1 else found
            if compactor.settled(partition) or not partition.files:
                result.skipped += 1
            else:
                todo.append(partition)
        if not todo:
            return result
        with progress(len(todo), "compacting", unit="partitions", bar=bar) as advance:
            for partition in todo:
                if stop is not None and stop.is_set():
                    break
                _compact_one(compactor, partition, result)
                advance(1)
    log.info(
        "compaction finished",
        partitions=result.compacted,
        skipped=result.skipped,
        files_before=result.files_before,
        bytes_before=result.bytes_before,
        bytes_after=result.bytes_after,
        rows=result.rows,
        problems=len(result.problems),
    )
    return result


def _compact_one(compactor: Compactor, partition: Partition, result: Result) -> None:
    where = str(partition.folder.relative_to(compactor.data_dir))
    for _ in range(3):  # a flush landing during each attempt three times in a row is unlikely
        try:
            done = compactor.compact(partition)
        except (OSError, pa.ArrowException) as exc:
            result.problems.append(f"{where}: {exc}")
            log.error("cannot compact a partition; left as it was", partition=where, error=str(exc))
            return
        if done.outcome is Outcome.COMPACTED:
            result.compacted += done.partitions
            result.files_before += done.files_before
            result.bytes_before += done.bytes_before
            result.bytes_after += done.bytes_after
            result.rows += done.rows
            return
        if done.outcome is Outcome.UNSAFE:
            result.problems.append(f"{where}: foreign, overlapping or unknown-column files")
            log.warning(
                "partition left alone: foreign or overlapping files, or a column the schema "
                "does not know (run ime-recorder verify)",
                partition=where,
            )
            return
        partition = compactor.relisted(partition)
    log.info("partition keeps receiving flushes; compacted next time", partition=where)


# ------------------------------------------------------------------ the daemon's schedule


def wall_clock() -> datetime:
    """Now, in UTC (tests replace it with the simulator's exchange clock)."""
    return datetime.now(UTC)


def next_pass(now: datetime, tz: tzinfo, after_seconds: float) -> datetime:
    """When the next date closes: the next local midnight in ``tz``, plus ``after_seconds``."""
    shifted = (now - timedelta(seconds=after_seconds)).astimezone(tz)
    midnight = datetime.combine(shifted.date() + timedelta(days=1), time(0), tzinfo=tz)
    return midnight.astimezone(UTC) + timedelta(seconds=after_seconds)


class BackgroundPasses:
    """A daemon task that runs passes over a data directory in a thread (:meth:`_run`);
    :meth:`close` sets ``_stop`` (the loop) and ``_halt`` (the pass in hand stops at its next
    step) and waits for it."""

    name = "passes"

    def __init__(self, data_dir: Path, tz: tzinfo, after_seconds: float) -> None:
        self.data_dir = data_dir
        self.tz = tz
        self.after_seconds = after_seconds
        self.passes = 0
        self._stop = asyncio.Event()
        self._halt = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        self._stop.set()
        self._halt.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        raise NotImplementedError


class AutoCompaction(BackgroundPasses):
    """A background task of the daemon; :meth:`close` stops it after the partition in hand."""

    name = "compaction"

    def __init__(
        self,
        data_dir: Path,
        tz: tzinfo,
        after_seconds: float,
        compression_level: int = COMPRESSION_LEVEL,
        layout: Layout = "contract",
    ) -> None:
        super().__init__(data_dir, tz, after_seconds)
        self.compression_level = compression_level
        self.layout: Layout = layout

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.to_thread(self._pass)
            self.passes += 1
            deadline = next_pass(wall_clock(), self.tz, self.after_seconds)
            while not self._stop.is_set():
                remaining = (deadline - wall_clock()).total_seconds()
                if remaining <= 0:
                    break
                # re-read the clock at least once a minute (suspend, clock steps)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(remaining, 60.0))

    def _pass(self) -> None:
        try:
            compact(
                self.data_dir,
                self.tz,
                now=wall_clock(),
                after_seconds=self.after_seconds,
                bar=False,
                wait=False,
                stop=self._halt,
                compactor=Compactor(self.data_dir, self.compression_level, layout=self.layout),
            )
        except CompactionBusy:
            log.info("another process is compacting; this pass is skipped")
        except Exception:  # a bug here must not stop the recording
            log.exception("compaction pass failed; the recording goes on")
