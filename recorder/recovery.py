"""Crash recovery: what the journal holds but Parquet does not is written, exactly once.

Files are named by the seq range they hold, and every flush writes all the rows it holds of
a (table, date) in seq order, never splitting a frame (as day files, or as contract files in
older versions: see :mod:`recorder.paths`); so a frame's rows in partition (table, date,
contract) are there already when a day file of that date or a file of that contract's
folder names a seq at or above the frame's, and are not there otherwise. Replaying the journal
through the pipeline while skipping those rows makes recovery idempotent: a crash during
recovery is recovered from the same way.

The journal is replayed while the feed is read again (:func:`recover_while_recording`):
what the streams send meanwhile waits in the journal, behind the replayed frames, so the
rule above holds for it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from recorder.buffer import Key
from recorder.paths import partition_dir, seq_range
from recorder.pipeline import Pipeline
from recorder.records import FRAME, SNAPSHOT, Pending, SessionCounts
from recorder.schema import DATA_TABLES, SOURCE_SNAPSHOT

log = structlog.get_logger("recorder.recovery")


class HighWater:
    """The highest seq already in Parquet, per partition: the highest named in its folder and,
    for a contract's partition, in its date folder's day files (each folder listed once).

    Listing a folder also removes temporary files a crash left in it (readers never saw them):
    those older than this HighWater, not those of a flush under way beside the replay.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._known: dict[Key, int] = {}
        self._frames: dict[tuple[str, str], int] = {}
        self._since = time.time()

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
                    with contextlib.suppress(FileNotFoundError):
                        if (folder / name).stat().st_mtime < self._since:
                            (folder / name).unlink()
                    continue
                span = seq_range(name)
                if span is not None:
                    found = max(found, span[1])
            self._known[key] = found
        return found

    def __call__(self, key: Key, seq: int) -> bool:
        """True when ``seq`` is already stored in partition ``key``."""
        return seq <= self.get(key)

    def frame_high(self, day: str, contract: str) -> int:
        """The highest seq in the partitions of every data table for ``(day, contract)``:
        a frame of a lower seq may have rows in Parquet (asked once a frame: memoised)."""
        found = self._frames.get((day, contract))
        if found is None:
            found = max(self.get((table, day, contract)) for table in DATA_TABLES)
            self._frames[(day, contract)] = found
        return found


@dataclass(frozen=True)
class Recovered:
    """What a recovery found."""

    frames: int
    events: int
    crashed_sessions: int
    last_alive_us: int


class _Replay:
    """The journal's records into the pipeline's buffer, skipping what Parquet holds."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.started = time.monotonic()
        self.sessions = SessionCounts()
        self.frames = self.events = 0
        self.last_alive = self.highest = 0
        self.alive: dict[str, int] = {}  # the latest record of each connection

    def runs(self, runs: Iterable[Pending]) -> Iterator[int]:
        """Replay ``runs`` (a segment's, :meth:`Journal.read_segment`), yielding after each
        (how many records it held)."""
        pipeline, sessions = self.pipeline, self.sessions
        for kind, first, received_us, connection, payloads in runs:
            # a run is one record, or a socket read's frames (bulk decoding takes them)
            if kind == FRAME:
                sessions.count(connection, len(payloads))
            else:
                sessions.observe_fields(kind, connection, payloads[0])
            self.last_alive = max(self.last_alive, received_us)
            self.highest = max(self.highest, first + len(payloads) - 1)
            if first == 0:
                continue  # a segment's checkpoint
            alive = self.alive
            alive[connection] = max(alive.get(connection, 0), received_us)
            now = time.monotonic()
            if kind == FRAME:
                self.frames += len(payloads)
                pipeline.replay_frames(connection, payloads, received_us, first, now)
            elif kind == SNAPSHOT:
                self.frames += 1
                pipeline.replay_frame(
                    connection, payloads[0], received_us, first, now, SOURCE_SNAPSHOT
                )
            else:
                self.events += 1
                pipeline.replay_event(orjson.loads(payloads[0]), first, received_us, now)
            yield len(payloads)

    def finish(self, **logged: int) -> Recovered:
        """Close the sessions a crash cut, at the last instant the journal shows their process
        alive (reason ``crash``); log what was replayed.

        The sessions of two processes may be open: a crash during a replay leaves those of
        the crash before too. A process was alive until the latest record of its sessions
        still open (of the whole journal if they have none).
        """
        pipeline, open_sessions = self.pipeline, self.sessions.open
        runs: dict[str, int] = {}
        for session, opened in open_sessions.items():
            run = str(opened.get("run"))
            runs[run] = max(runs.get(run, 0), self.alive.get(session, 0))
        for session, opened in open_sessions.items():
            until = runs[str(opened.get("run"))] or self.last_alive
            pipeline.reopen_for_close(session, opened)
            pipeline.session_closed(session, until, None, "crash", int(opened["frames"]), False)
        result = Recovered(self.frames, self.events, len(open_sessions), self.last_alive)
        if self.frames or self.events:
            log.info(
                "journal replayed",
                frames=self.frames,
                events=self.events,
                crashed_sessions=len(open_sessions),
                rows_to_write=pipeline.rows_buffered,
                seconds=round(time.monotonic() - self.started, 3),
                **logged,
            )
        return result


def journal_found(pipeline: Pipeline) -> list[Path]:
    """Before the pipeline starts: the journal segments a crash (or a stop that could not
    write everything) left, for :func:`recover_while_recording`. From now on seqs are
    handed out above every record in them, and what comes waits in the journal until they
    are replayed. Empty without a journal."""
    journal = pipeline.journal
    if journal is None:
        return []
    segments = journal.segments()
    if segments:
        pipeline.seq_above(journal.highest_seq(segments))
        journal.recovered_up_to(pipeline.last_seq)  # every record found is on disk
        pipeline.await_recovery()
    return segments


#: records replayed between two turns of the feed's readers (a few ms of the event loop)
REPLAY_SLICE = 1000


async def recover_while_recording(pipeline: Pipeline, segments: list[Path]) -> Recovered:
    """Replay ``segments`` (:func:`journal_found`) while the feed is read: what comes
    meanwhile waits in the journal (recorder.spill) and follows the replayed rows, so every
    partition's files keep seq order and a crash now is recovered from the same way.

    The server never replays: a recovery that ran before the streams opened lost what the
    feed sent meanwhile, for good (seconds for every million frames to replay). Replayed rows
    are decoded and written by the flusher as they come, memory bounded as while spilling.
    """
    journal = pipeline.journal
    assert journal is not None
    assert pipeline.recovering, "journal_found() holds back what comes"
    replay = _Replay(pipeline)
    pipeline.replaying(HighWater(pipeline.data_dir))
    try:
        since_turn = 0
        for path in segments:
            runs = await asyncio.to_thread(journal.read_segment, path, replay.highest)
            for count in replay.runs(runs):
                since_turn += count
                if since_turn >= REPLAY_SLICE:
                    since_turn = 0
                    await asyncio.sleep(0)  # the readers' turn
                await pipeline.room_to_replay()
    finally:
        pipeline.replaying(None)
    # the stream's frames so far all came during the replay (the pipeline started with it)
    result = replay.finish(received_meanwhile=pipeline.stats.frames)
    pipeline.recovered()
    return result
