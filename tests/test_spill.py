"""Spilling: with memory full, frames wait in the journal and are read back (recorder.spill)."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

import recorder
from recorder.config import JournalConfig, StorageConfig
from recorder.intake import DUPLICATE
from recorder.journal import Journal
from recorder.pipeline import BEHIND_FRAMES, Pipeline
from recorder.records import EVENT, FRAME, records_of
from recorder.recovery import journal_found, recover_while_recording
from recorder.simcontracts import make_contracts
from recorder.spill import JournalTail
from tests.conftest import make_config, record_until
from tests.test_columnar import RECEIVED, TEHRAN, everything, feed
from tests.test_crash import (
    assert_stored_once,
    journal_kept_config,
    journaled_frames,
    start_recorder,
)
from tests.test_recording import expected_rows, stored_rows

#: the overlap of two streams over the first ten contracts begins and ends at these frames
OVERLAPS = ((400, True), (1_700, False), (2_600, True))
OVERLAPPED = tuple(c.id for c in make_contracts(30, 7)[:10])
#: frames per socket read, cycled: none finds the readers behind the stream (BEHIND_FRAMES)
READS = (1, 7, 150, 2, 25, BEHIND_FRAMES - 1, 64)


def repeated_feed() -> list[bytes]:
    """Simulator frames of every wire variant, every fifth one sent twice (as two streams
    would during an overlap: the repeat is dropped while the overlap lasts, else kept)."""
    frames = feed(2_500, variant_mix=True, malformed=0.05, unknown_sections=0.05)
    return [f for i, frame in enumerate(frames) for f in (frame,) * (1 + (i % 5 == 0))]


def record(
    data_dir: Path,
    frames: list[bytes],
    max_buffered_rows: int,
    runs: tuple[int, ...] = READS,
    overlaps: tuple[tuple[int, bool], ...] = OVERLAPS,
) -> Pipeline:
    """The frames through a pipeline with a journal, in runs (cycled: the socket reads), the
    overlap changing at ``overlaps``; the event loop turns between runs, as it does between
    socket reads."""
    storage = StorageConfig(
        data_dir=str(data_dir),
        flush_interval_seconds=3600,
        fsync=False,
        max_buffered_rows=max_buffered_rows,
    )

    async def run() -> Pipeline:
        pipeline = Pipeline(data_dir, storage, TEHRAN, TEHRAN, JournalConfig(fsync=False))
        pipeline.start()
        changes = list(overlaps)
        start = 0
        for turn, size in enumerate(itertools.cycle(runs)):
            if start >= len(frames):
                break
            while changes and changes[0][0] <= start:
                pipeline.overlap(OVERLAPPED, changes.pop(0)[1])
            run = frames[start : start + size]
            pipeline.on_frames("conn", list(run), RECEIVED + start)
            start += len(run)
            await asyncio.sleep(0.01 if turn % 3 == 0 else 0)
        assert await pipeline.close()
        return pipeline

    return asyncio.run(run())


def take_in_runs(pipeline: Pipeline, frames: list[bytes], first: int) -> None:
    """``frames`` as the stream's, from frame ``first`` of the feed on, in runs of 50."""
    for start in range(0, len(frames), 50):
        pipeline.on_frames("conn", frames[start : start + 50], RECEIVED + first + start)


def crash_after_journaling(data_dir: Path, frames: list[bytes]) -> None:
    """A recorder that journaled ``frames`` and crashed before it wrote any (memory roomy:
    a flush would go on in its writer thread after the crash, which a process cannot)."""
    storage = StorageConfig(data_dir=str(data_dir), flush_interval_seconds=3600, fsync=False)

    async def run() -> None:
        crashed = Pipeline(data_dir, storage, TEHRAN, TEHRAN, JournalConfig(fsync=False))
        crashed.start()
        take_in_runs(crashed, frames, 0)
        assert crashed.journal is not None
        await asyncio.to_thread(crashed.journal.close)

    asyncio.run(run())


def test_frames_spilled_to_the_journal_are_stored_as_if_memory_had_held_them(
    tmp_path: Path,
) -> None:
    """A memory bound of ~100 frames against 3,000: frames wait in the journal and are read
    back, and every table (quarantine and extras included) ends up row for row as with room
    for all of them, the overlap's duplicates dropped exactly where they were; the readers
    never stopped, and the journal is empty once everything is in Parquet."""
    frames = repeated_feed()
    roomy = record(tmp_path / "roomy", frames, 2_000_000)
    tight = record(tmp_path / "tight", frames, 600)

    assert roomy.stats.spills == roomy.stats.spilled == 0
    assert tight.stats.spills >= 1
    assert tight.stats.spilled > 1_000
    assert tight.stats.pauses == 0
    stored = everything(tmp_path / "tight")
    assert stored == everything(tmp_path / "roomy")
    assert len(stored["aggregate"]) > 2_000
    con = recorder.connect(tmp_path / "tight")
    duplicates = con.execute("SELECT count(*) FROM quarantine WHERE reason = ?", [DUPLICATE])
    assert (duplicates.fetchone() or (0,))[0] > 20
    assert not list((tmp_path / "tight" / "_journal").glob("*.jnl"))


def test_frames_wait_in_the_journal_while_reads_find_the_readers_behind_the_stream(
    tmp_path: Path,
) -> None:
    """Memory roomy, but every socket read hands over BEHIND_FRAMES frames (the socket had
    that much waiting): from the first read on, frames wait in the journal, and every
    table ends up row for row as when no read finds the readers behind (but the receive
    times, one per read)."""
    frames = repeated_feed()
    calm = record(tmp_path / "calm", frames, 2_000_000, (BEHIND_FRAMES - 1,), overlaps=())
    behind = record(tmp_path / "behind", frames, 2_000_000, (BEHIND_FRAMES,), overlaps=())

    assert calm.stats.spills == calm.stats.spilled == 0
    assert behind.stats.spills == 1
    assert behind.stats.spilled == len(frames) - BEHIND_FRAMES
    assert behind.stats.pauses == 0
    stored = everything(tmp_path / "behind", but="received_at")
    assert stored == everything(tmp_path / "calm", but="received_at")
    assert sum(map(len, stored.values())) > len(frames)
    assert not list((tmp_path / "behind" / "_journal").glob("*.jnl"))


def test_the_readers_stop_once_the_journal_holds_max_spill_megabytes(
    simulator: Any, tmp_path: Path
) -> None:
    """With 1 MB allowed to wait in the journal, the readers stop when it does (TCP holds the
    server back), and every message still becomes exactly its rows."""
    sent = 6_000
    sim = simulator(contracts=20, rate=0, max_messages=sent, keep_sent=True)
    config = make_config(sim, tmp_path, storage={"max_buffered_rows": 300})
    config = msgspec.structs.replace(config, journal=JournalConfig(max_spill_megabytes=1))
    rec = record_until(config, lambda r: r.pipeline.stats.frames == sent, timeout=60)
    stats = rec.pipeline.stats
    assert stats.spills >= 1
    assert stats.pauses >= 1
    expected = expected_rows(sim.sent)
    for table, rows in expected.items():
        assert stored_rows(tmp_path, table) == rows, table


def test_messages_spilled_over_loopback_become_exactly_their_rows(
    simulator: Any, tmp_path: Path
) -> None:
    """The simulator's messages as fast as it sends them, memory bounded to ~50 frames: they
    wait in the journal, the readers never stop, and each becomes exactly its rows."""
    sent = 3_000
    sim = simulator(contracts=8, rate=0, max_messages=sent, keep_sent=True)
    config = make_config(sim, tmp_path, storage={"max_buffered_rows": 300})
    rec = record_until(config, lambda r: r.pipeline.stats.frames == sent, timeout=60)
    stats = rec.pipeline.stats
    assert stats.spills >= 1
    assert stats.spilled > 0
    assert stats.pauses == 0
    expected = expected_rows(sim.sent)
    for table, rows in expected.items():
        assert stored_rows(tmp_path, table) == rows, table
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)


def test_the_tail_reads_each_record_once_in_order_while_the_journal_writes_and_rotates(
    tmp_path: Path,
) -> None:
    """Records read back while the writer thread appends them, over 64 KB segments, the read
    ones released as it goes: each record from the first seq asked, once, in seq order,
    frames and events alike, and never a segment's checkpoint."""
    journal = Journal(tmp_path, fsync=False, write_interval=0.001, segment_bytes=64 * 1024)
    journal.start()
    payload = b'{"contractId": "1001", "data": {}}' * 10
    written: list[int] = []
    done = threading.Event()

    def write() -> None:
        seq = 1
        rng = random.Random(7)
        for _ in range(400):
            count = rng.randint(1, 40)
            journal.extend(FRAME, seq, 1, "conn", [payload] * count)
            written.extend(range(seq, seq + count))
            seq += count
            journal.append(EVENT, seq, 1, "conn", b"{}")
            written.append(seq)
            seq += 1
            time.sleep(rng.choice((0, 0, 0.002)))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    tail = JournalTail(journal.dir, 5)
    read: list[int] = []
    while not (
        done.is_set() and journal.written_seq == written[-1] and tail.next_seq > written[-1]
    ):
        runs = tail.read(8 * 1024)
        read.extend(r.seq for r in records_of(runs))
        journal.release(tail.next_seq)  # the writer removes what was read (not the open one)
        if not runs:
            time.sleep(0.001)
    writer.join()
    journal.close()
    assert read == [s for s in written if s >= 5]
    assert len(journal.segments()) < 10  # most were read, released and removed


@pytest.mark.slow
def test_kill_9_while_frames_wait_in_the_journal_loses_and_duplicates_nothing(
    simulator: Any, tmp_path: Path
) -> None:
    """Memory bounded to ~50 frames under load, so frames are spilled and read back; five
    kill -9 (a restart replays the journal while its stream runs, whose frames wait in the
    journal meanwhile; a kill may come during the replay), then a clean stop: every
    journaled frame is stored exactly once."""
    sim = simulator(contracts=6, rate=3000, malformed=0.01, keep_sent=False, seed=12)
    data_dir = tmp_path / "data"
    config = journal_kept_config(tmp_path, sim, "max_buffered_rows = 300\n", 0.15)
    rng = random.Random(20261122)
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(number: int) -> subprocess.Popen[bytes]:
        with (logs / f"{number}.log").open("wb") as log:  # the child keeps its own copy
            return start_recorder(config, sim, stderr=log)

    for number in range(5):
        proc = start(number)
        time.sleep(rng.uniform(0.3, 1.2))  # the random instant of the crash, not a wait
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    proc = start(5)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    texts = [p.read_text() for p in sorted(logs.iterdir())]
    assert "memory full: frames wait in the journal" in texts[0]
    # a restart replays what the kills left while its stream runs (a stop lets it finish)
    assert '"journal replayed"' in texts[-1]
    frames = journaled_frames(data_dir)
    assert len(frames) > 5000
    assert_stored_once(data_dir, frames)


def test_a_journal_replayed_after_a_crash_is_decoded_in_bulk_save_what_parquet_may_hold(
    tmp_path: Path,
) -> None:
    """A crash with frames journaled and not written (as many wait there after a spill): on
    restart the plain ones are decoded in bulk, as when they came; only a frame of a
    partition that a file already names a later seq of takes the per-frame rules; every
    table ends up as a recording without the crash leaves it."""
    frames = feed(1_200)
    record_plainly = record(tmp_path / "whole", frames, 2_000_000, runs=(50,))
    assert record_plainly.stats.recovered == 0
    storage = StorageConfig(
        data_dir=str(tmp_path / "crash"), flush_interval_seconds=3600, fsync=False
    )
    journal = JournalConfig(fsync=False)

    async def crash() -> None:
        pipeline = Pipeline(tmp_path / "crash", storage, TEHRAN, TEHRAN, journal)
        pipeline.start()
        changes = list(OVERLAPS)
        for start in range(0, len(frames), 50):
            while changes and changes[0][0] <= start:
                pipeline.overlap(OVERLAPPED, changes.pop(0)[1])
            pipeline.on_frames("conn", frames[start : start + 50], RECEIVED + start)
            if start >= 300 and not pipeline.stats.flushes:
                assert await pipeline.flush()  # the first frames reach Parquet: then the crash
        assert pipeline.journal is not None
        await asyncio.to_thread(pipeline.journal.close)

    asyncio.run(crash())

    async def restart() -> Pipeline:
        pipeline = Pipeline(tmp_path / "crash", storage, TEHRAN, TEHRAN, journal)
        found = journal_found(pipeline)
        pipeline.start()
        await recover_while_recording(pipeline, found)
        assert await pipeline.close()
        return pipeline

    restarted = asyncio.run(restart())
    assert restarted.stats.recovered == len(frames)
    assert restarted.stats.decoded_in_bulk > 700  # the unwritten plain frames, in bulk
    assert everything(tmp_path / "crash") == everything(tmp_path / "whole")


def test_a_stop_during_the_replay_leaves_the_rest_of_the_journal_for_the_next_start(
    tmp_path: Path,
) -> None:
    """A crash leaves 1,200 frames journaled; the restart is stopped midway through their
    replay, with the stream's frames waiting behind it: nothing of the journal goes, and the
    next start replays the rest, then the frames that waited, then records on. Every table
    ends up as a recording without the crash and the stop leaves it."""
    frames = feed(1_800)
    record(tmp_path / "whole", frames, 2_000_000, runs=(50,))
    storage = StorageConfig(
        data_dir=str(tmp_path / "crash"),
        flush_interval_seconds=3600,
        fsync=False,
        max_buffered_rows=600,  # the replay waits for flushes on the way
    )
    journal = JournalConfig(fsync=False)

    def pipeline() -> Pipeline:
        return Pipeline(tmp_path / "crash", storage, TEHRAN, TEHRAN, journal)

    async def stopped_midway() -> Pipeline:
        stopped = pipeline()
        found = journal_found(stopped)
        stopped.start()
        replay = asyncio.create_task(recover_while_recording(stopped, found))
        while stopped.stats.recovered < 400:  # noqa: ASYNC110 - a count, not an event
            await asyncio.sleep(0)
        take_in_runs(stopped, frames[1_200:1_500], 1_200)  # the stream: it waits in the journal
        replay.cancel()
        await asyncio.gather(replay, return_exceptions=True)
        assert not await stopped.close()  # what was not replayed stays in the journal
        return stopped

    async def restart() -> Pipeline:
        restarted = pipeline()
        found = journal_found(restarted)
        restarted.start()
        await recover_while_recording(restarted, found)
        take_in_runs(restarted, frames[1_500:], 1_500)
        assert await restarted.close()
        return restarted

    crash_after_journaling(tmp_path / "crash", frames[:1_200])
    stopped = asyncio.run(stopped_midway())
    assert 400 <= stopped.stats.recovered < 1_200
    assert stopped.stats.spilled == 300
    assert stopped.stats.files_written > 0  # some of the replayed rows reached Parquet
    restarted = asyncio.run(restart())
    assert restarted.stats.recovered == 1_500  # the journal was whole: read again, every frame
    assert restarted.stats.spilled == 300  # the stream waited behind the replay again
    # the frames after the crash have other seqs (a new process reserves a new block of them)
    assert everything(tmp_path / "crash", but="seq") == everything(tmp_path / "whole", but="seq")


def test_a_journal_restored_without_the_seq_counter_is_replayed_below_the_new_seqs(
    tmp_path: Path,
) -> None:
    """A backup restored without ``_state/seq`` (as the README says to do): the counter
    starts from the files, which hold none of the journal's frames; the stream's frames
    must still take seqs above the journal's, or the replay would take them for its own."""
    frames = feed(900)
    record(tmp_path / "whole", frames, 2_000_000, runs=(50,))
    storage = StorageConfig(
        data_dir=str(tmp_path / "restored"), flush_interval_seconds=3600, fsync=False
    )
    journal = JournalConfig(fsync=False)

    async def restart() -> Pipeline:
        restarted = Pipeline(tmp_path / "restored", storage, TEHRAN, TEHRAN, journal)
        found = journal_found(restarted)
        assert restarted.last_seq == 600  # the journal's highest: the files hold none
        assert restarted.recovering  # ime_recorder_journal_replaying
        restarted.start()
        take_in_runs(restarted, frames[600:], 600)  # the stream, while the journal is replayed
        await recover_while_recording(restarted, found)
        assert not restarted.recovering
        assert await restarted.close()
        return restarted

    crash_after_journaling(tmp_path / "restored", frames[:600])
    (tmp_path / "restored" / "_state" / "seq").unlink()
    restarted = asyncio.run(restart())
    assert restarted.stats.recovered == 600
    assert restarted.stats.spilled == 300
    con = recorder.connect(tmp_path / "restored")
    assert con.execute(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM aggregate"
    ).fetchall() == [(900, 900, 1, 900)]
    assert everything(tmp_path / "restored") == everything(tmp_path / "whole")
