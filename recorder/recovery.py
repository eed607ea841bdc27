"""Crash recovery: what the journal holds but Parquet does not is written, exactly once.

Files are named by the seq range they hold, and every flush writes all the rows it holds of
a (table, date) in seq order, never splitting a frame (as day files, or as contract files in
older versions: see :mod:`recorder.paths`); so a frame's rows in partition (table, date,
contract) are there already when a day file of that date or a file of that contract's
folder names a seq at or above the frame's, and are not there otherwise. Replaying the journal
through the pipeline while skipping those rows makes recovery idempotent: a crash during
recovery is recovered from the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from recorder.buffer import Key
from recorder.paths import partition_dir, seq_range
from recorder.pipeline import Pipeline
from recorder.records import FRAME, SNAPSHOT, SessionCounts, frame_runs
from recorder.schema import SOURCE_SNAPSHOT

log = structlog.get_logger("recorder.recovery")


class HighWater:
    """The highest seq already in Parquet, per partition: the highest named in its folder and,
    for a contract's partition, in its date folder's day files (each folder listed once).

    Listing a folder also removes temporary files a crash left in it (readers never saw them).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._known: dict[Key, int] = {}

    def get(self, key: Key) -> int:
        table, day, contract = key
        found = self._folder(key)
        if contract is not None:  # the day files of its date
            found = max(found, self._folder((table, day, None)))
        return found

    def _folder(self, key: Key) -> int:
        found = self._known.get(key)
        if found is None:
            found = 0
            folder = self.data_dir / partition_dir(*key)
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                names = []
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    (folder / name).unlink(missing_ok=True)
                    continue
                span = seq_range(name)
                if span is not None:
                    found = max(found, span[1])
            self._known[key] = found
        return found

    def __call__(self, key: Key, seq: int) -> bool:
        """True when ``seq`` is already stored in partition ``key``."""
        return seq <= self.get(key)


@dataclass(frozen=True)
class Recovered:
    """What a recovery found."""

    frames: int
    events: int
    crashed_sessions: int
    last_alive_us: int


def recover(pipeline: Pipeline) -> Recovered:
    """Replay the journal into the pipeline's buffer, skipping what Parquet already holds.

    Sessions still open in the journal were cut by a crash: they are closed at the last
    instant the journal shows the process alive, with reason ``crash``.
    """
    journal = pipeline.journal
    if journal is None:
        return Recovered(0, 0, 0, 0)
    started = time.monotonic()
    high_water = HighWater(pipeline.data_dir)
    sessions = SessionCounts()
    frames = events = 0
    last_alive = highest = 0
    pipeline.replaying(high_water)
    try:
        for run in frame_runs(journal.recover()):  # a read's frames together: bulk decoding
            for record in run:
                sessions.observe(record)
                last_alive = max(last_alive, record.received_us)
                highest = max(highest, record.seq)
            head = run[0]
            if head.seq == 0:
                continue  # a segment's checkpoint
            now = time.monotonic()
            if head.kind == FRAME:
                frames += len(run)
                payloads = [r.payload for r in run]
                pipeline.replay_frames(head.connection, payloads, head.received_us, head.seq, now)
            elif head.kind == SNAPSHOT:
                frames += 1
                pipeline.replay_frame(
                    head.connection, head.payload, head.received_us, head.seq, now, SOURCE_SNAPSHOT
                )
            else:
                events += 1
                pipeline.replay_event(orjson.loads(head.payload), head.seq, head.received_us, now)
            pipeline.relieve_memory(highest)
    finally:
        pipeline.replaying(None)
    pipeline.seq_above(highest)
    journal.recovered_up_to(highest)
    for session, opened in sessions.open.items():
        pipeline.reopen_for_close(session, opened)
        pipeline.session_closed(session, last_alive, None, "crash", int(opened["frames"]), False)
    result = Recovered(frames, events, len(sessions.open), last_alive)
    if frames or events:
        log.info(
            "journal replayed",
            frames=frames,
            events=events,
            crashed_sessions=len(sessions.open),
            rows_to_write=pipeline.rows_buffered,
            seconds=round(time.monotonic() - started, 3),
        )
    return result
