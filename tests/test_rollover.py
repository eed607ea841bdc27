"""Compaction next to the recorder: local midnight, flushes during a swap, restarts after it."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

import recorder
from recorder import compaction
from recorder.accounting import verify
from recorder.buffer import Batch, Key, Row
from recorder.compaction import Result, compact
from recorder.compactor import Compactor
from recorder.config import CompactionConfig, JournalConfig, StorageConfig
from recorder.daemon import Recorder
from recorder.flushing import ROWS_PER_FRAME
from recorder.pipeline import Pipeline
from recorder.recovery import HighWater, journal_found, recover_while_recording
from recorder.schema import DATA_TABLES, TABLES
from recorder.writer import ParquetWriter
from tests.conftest import make_config, record_until
from tests.test_compaction import FUTURE, MIDNIGHT, TEHRAN, compacted, partitions
from tests.test_recording import expected_rows, stored_rows

CLOSED, OPEN = date(2025, 3, 1), date(2025, 3, 2)  # the Tehran dates on each side of MIDNIGHT


def exchange_clock(start: datetime) -> Callable[[], datetime]:
    """An exchange clock that reads ``start`` now and runs at the speed of real time."""
    origin = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - origin)


def date_folders(data_dir: Path, day: date) -> dict[Path, list[str]]:
    return {f: names for f, names in partitions(data_dir).items() if f"date={day}" in str(f)}


def test_a_stream_across_midnight_lands_in_two_dates_and_the_closed_one_is_compacted(
    simulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tehran midnight mid-stream: two dates with the right rows, and the daemon compacts the
    closed date after_seconds later while the recording goes on."""
    clock = exchange_clock(MIDNIGHT - timedelta(seconds=2))
    monkeypatch.setattr(compaction, "wall_clock", clock)
    sim = simulator(contracts=3, rate=100, keep_sent=True, clock=clock)
    config = make_config(sim, tmp_path)
    config = msgspec.structs.replace(config, compaction=CompactionConfig(after_seconds=1.5))
    frames_when_compacted: list[int] = []

    def closed_date_compacted_then_more_frames(r: Recorder) -> bool:
        if not frames_when_compacted:
            closed = date_folders(tmp_path, CLOSED)
            if len(closed) == 3 * len(DATA_TABLES) and all(map(compacted, closed.values())):
                frames_when_compacted.append(r.pipeline.stats.frames)
            return False
        return r.pipeline.stats.frames >= frames_when_compacted[0] + 50

    record_until(config, closed_date_compacted_then_more_frames, timeout=30)

    sent = sim.sent
    expected = expected_rows(sent)
    for table in DATA_TABLES:
        assert stored_rows(tmp_path, table) == expected[table], table
    con = recorder.connect(tmp_path)
    per_date = dict(con.execute("SELECT date, count(*) FROM aggregate GROUP BY 1").fetchall())
    assert set(per_date) == {CLOSED, OPEN}
    assert per_date[CLOSED] >= 50
    assert per_date[OPEN] >= 50
    last_closed = con.execute(
        f"SELECT max(exchange_ts) FROM aggregate WHERE date = '{CLOSED}'"
    ).fetchone()
    assert last_closed is not None
    assert last_closed[0] < MIDNIGHT
    assert all(map(compacted, date_folders(tmp_path, CLOSED).values()))
    still_open = date_folders(tmp_path, OPEN)
    assert not any(name.endswith(".c.parquet") for n in still_open.values() for name in n)
    assert verify(tmp_path).ok


def test_compacting_the_open_date_while_recording_loses_and_duplicates_nothing(
    simulator: Any, tmp_path: Path
) -> None:
    """`compact` in a loop on the dates being written: every frame's rows stored exactly once.

    Every ``step`` frames the feed pauses until the rows received are flushed and a
    compaction that started after that has ended, so each step's day files are folded by a
    compaction of their own while the recording goes on, however fast or slow the machine
    (counting the compactions that fit in a timed recording was not: a busy machine fit 8).
    """
    total, step = 1200, 100
    sim = simulator(contracts=3, rate=400, max_messages=total, keep_sent=True)
    config = make_config(sim, tmp_path, storage={"flush_interval_seconds": 0.05})
    stop = threading.Event()
    runs: list[Result] = []
    started = 0  # compactions begun
    pause: dict[str, int] = {}  # "emptied": compactions begun when the last rows were flushed
    resumed = 0

    def compact_in_a_loop() -> None:
        nonlocal started
        while not stop.is_set():
            days = {date.fromisoformat(p.name[5:]) for p in tmp_path.glob("*/date=*")}
            started += 1
            runs.append(compact(tmp_path, TEHRAN, days=days, bar=False))

    def interleave(r: Recorder) -> None:
        nonlocal resumed
        if not pause:
            if r.pipeline.stats.frames >= (resumed + 1) * step:
                sim.pause()
                pause["paused"] = 1
        elif "emptied" not in pause:
            if r.pipeline.rows_buffered == 0:
                pause["emptied"] = started
        elif len(runs) > pause["emptied"]:  # a compaction begun after the flush has ended
            pause.clear()
            resumed += 1
            sim.resume()

    compactor = threading.Thread(target=compact_in_a_loop)
    compactor.start()
    try:
        record_until(
            config, lambda r: r.pipeline.stats.frames == total, timeout=100, during=interleave
        )
    finally:
        stop.set()
        compactor.join()

    assert resumed == total // step - 1  # the last pause ends the recording
    # each step's rows were flushed after the previous pause: folded by a compaction of its own
    assert sum(1 for r in runs if r.compacted) >= total // step
    assert all(r.ok for r in runs)
    assert len(sim.sent) == total
    expected = expected_rows(sim.sent)
    for table in DATA_TABLES:
        assert stored_rows(tmp_path, table) == expected[table], table
    assert verify(tmp_path).ok


# --------------------------------------------------------------------------- the writer's side

DAY = date(2025, 3, 2)
KEY: Key = ("contract_info", DAY.isoformat(), "1001")
FOLDER = Path("contract_info") / f"date={DAY}" / "contract=1001"
NOON_US = 1_740_904_200_000_000  # 2025-03-02 12:00 in Tehran


def rows(seqs: range) -> list[Row]:
    names = [c.name for c in TABLES["contract_info"].file_columns]
    made = []
    for seq in seqs:
        at = NOON_US + seq * 1_000_000
        values = {"exchange_ts": at, "received_at": at, "seq": seq, "open_interest": seq}
        made.append(tuple(values.get(n) for n in names))
    return made


def five_files(data_dir: Path) -> ParquetWriter:
    """Partition KEY with five files of five frames each (seq 1..25), and a neighbour."""
    writer = ParquetWriter(data_dir, fsync=False)
    for first in range(1, 26, 5):
        writer.write(Batch(KEY, rows(range(first, first + 5))))
    writer.write(Batch(("contract_info", DAY.isoformat(), "1002"), rows(range(26, 28))))
    return writer


def stored_seqs(data_dir: Path) -> list[int]:
    con = recorder.connect(data_dir)
    found = con.execute("SELECT seq FROM contract_info WHERE contract = '1001' ORDER BY seq")
    return [seq for (seq,) in found.fetchall()]


@pytest.mark.parametrize("when", ["verified", "locked"])
def test_a_flush_into_a_partition_being_compacted_is_not_lost(tmp_path: Path, when: str) -> None:
    """A flush before the swap makes the compactor start over; one during it waits for it."""
    writer = five_files(tmp_path)
    late = Batch(KEY, rows(range(100, 107)))
    flushes: list[threading.Thread] = []

    def flush_now(step: str, key: Key) -> None:
        if step == when and key == KEY and not flushes:
            flush = threading.Thread(target=writer.write, args=(late,))
            flushes.append(flush)
            flush.start()
            if when == "verified":
                flush.join()  # the new file is there before the compactor takes the lock

    compactor = Compactor(tmp_path, on_step=flush_now)
    assert compact(tmp_path, TEHRAN, days=[DAY], bar=False, compactor=compactor).ok
    flushes[0].join()
    assert stored_seqs(tmp_path) == [*range(1, 26), *range(100, 107)]
    names = partitions(tmp_path)[FOLDER]
    if when == "verified":  # started over and took the new file in
        assert names == [f"{1:020d}-{106:020d}.c.parquet"]
    else:  # the flush waited for the swap and landed next to the compacted file
        assert names == [f"{1:020d}-{25:020d}.c.parquet", f"{100:020d}-{106:020d}.parquet"]


def lock_is_held(folder: Path) -> bool:
    """True when someone holds the partition lock on ``folder`` (probed, never waited for)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_flushes_and_swaps_happen_under_the_same_partition_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer renames its file into place, and the compactor checks and swaps, locked."""
    writer = five_files(tmp_path)
    date_folder = tmp_path / FOLDER.parent
    steps: dict[str, bool] = {}

    def probe(step: str, key: Key) -> None:
        if key == KEY:
            steps[step] = lock_is_held(date_folder)

    compact(tmp_path, TEHRAN, days=[DAY], bar=False, compactor=Compactor(tmp_path, on_step=probe))
    assert steps == {
        "staged": False,
        "verified": False,
        "locked": True,
        "exchanged": True,
        "cleaned": False,
    }

    renames: list[bool] = []
    replace = os.replace

    def probed_replace(src: Any, dst: Any) -> None:
        renames.append(lock_is_held(Path(dst).parent.parent))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", probed_replace)
    writer.write(Batch(KEY, rows(range(30, 32))))
    assert renames == [True]


def _frame(contract: str, at: datetime, interest: int) -> bytes:
    data = {
        "ContractInfo": {"open_interest": interest, "open_interest_changes": 1},
        "AllowedPriceRange": {"minAllowedPrice": 90.0, "maxAllowedPrice": 110.0},
    }
    return orjson.dumps({"contractId": contract, "timestamp": at.isoformat(), "data": data})


def test_recovery_after_compaction_replays_exactly_what_parquet_lacks(tmp_path: Path) -> None:
    """Three flushes, more frames journaled only, a crash, compaction, then recovery: each frame
    once (the frames below the compacted file's last seq are skipped)."""
    storage = StorageConfig(data_dir=str(tmp_path), flush_interval_seconds=3600, fsync=False)
    journal = JournalConfig(fsync=False)
    at = MIDNIGHT - timedelta(hours=2)
    key: Key = ("contract_info", "2025-03-01", "1001")

    async def crash() -> int:
        pipeline = Pipeline(tmp_path, storage, TEHRAN, UTC, journal=journal)
        assert pipeline.journal is not None
        pipeline.journal.start()
        seq = 0
        for batch in range(4):
            for i in range(10):
                frame = _frame(f"100{i % 2 + 1}", at + timedelta(seconds=batch * 10 + i), i)
                seq = pipeline.on_frame("conn", frame, 1_700_000_000_000_000 + seq)
            if batch < 3:  # the fourth batch is journaled, never written: then the crash
                assert await pipeline.flush()
        await asyncio.to_thread(pipeline.journal.close)
        return seq

    last = asyncio.run(crash())
    before = HighWater(tmp_path).get(key)
    assert len(partitions(tmp_path)[Path("contract_info/date=2025-03-01")]) == 3  # day files
    compact(tmp_path, TEHRAN, now=FUTURE, bar=False)
    assert HighWater(tmp_path).get(key) == before < last

    async def restart() -> tuple[int, int]:
        pipeline = Pipeline(tmp_path, storage, TEHRAN, UTC, journal=journal)
        found = journal_found(pipeline)
        pipeline.start()
        recovered = await recover_while_recording(pipeline, found)
        buffered = pipeline.rows_buffered
        # a new frame: the flush waits for the journal to have written something this recent
        later = _frame("1001", at + timedelta(minutes=5), 7)
        pipeline.on_frame("conn", later, 1_800_000_000_000_000)
        assert await pipeline.close()
        return recovered.frames, buffered

    replayed, buffered = asyncio.run(restart())
    assert replayed == 40  # every journaled frame was read again ...
    # ... and only the ten never written wait, to be decoded in bulk (each counted as the
    # rows a frame is taken to make until frames have been decoded)
    assert buffered == 10 * ROWS_PER_FRAME
    con = recorder.connect(tmp_path)
    for table in ("contract_info", "allowed_price_range"):
        counts = con.execute(f"SELECT count(*), count(DISTINCT seq) FROM {table}").fetchone()
        assert counts == (41, 41), table
