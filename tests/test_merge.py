"""The intraday merge: the open date's day files rewritten as one, readers and recovery unmoved."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

import recorder
from recorder.accounting import verify
from recorder.buffer import Key
from recorder.compaction import CompactionBusy, compact, run_lock
from recorder.compactor import Compactor, exchange
from recorder.config import CompactionConfig, StorageConfig, load_config
from recorder.daemon import Recorder
from recorder.merging import AutoMerge, Merger, merge_open_dates, plan_runs
from recorder.paths import file_name, is_day_file, seq_range
from recorder.pipeline import Pipeline
from recorder.schema import CONTRACT_COLUMN, DATA_TABLES, TABLES
from recorder.writer import partition_lock
from tests.conftest import make_config, record_until
from tests.test_columnar import RECEIVED, START, TEHRAN, everything, feed
from tests.test_compaction import (
    FUTURE,
    Crash,
    assert_no_leftovers,
    crash_at,
    recovery_marks,
    refuse,
)
from tests.test_compaction_days import (
    AGGREGATE,
    BEST_LIMIT,
    DAY,
    _view_rows,
    folder_files,
    rows,
    three_flushes,
    write_day_file,
)
from tests.test_config import ONE_CONTRACT, config_error
from tests.test_recording import expected_rows, stored_rows

OPEN_DAY = START.astimezone(TEHRAN).date()  # 2026-03-20: every frame of feed(200) is on it
#: the moment at which DAY (of tests.test_compaction_days) has not closed yet
DAY_OPEN = datetime(2025, 3, 1, 12, 0, tzinfo=TEHRAN)


def record_day_files(data_dir: Path, frames: list[bytes], every: int) -> None:
    """Record ``frames`` through the real pipeline, flushing after every ``every`` frames:
    one day file per table and flush."""
    storage = StorageConfig(data_dir=str(data_dir), flush_interval_seconds=3600, fsync=False)

    async def run() -> None:
        pipeline = Pipeline(data_dir, storage, TEHRAN, TEHRAN, None)
        pipeline.start()
        for i, frame in enumerate(frames):
            pipeline.on_frame("conn", frame, RECEIVED + i)
            if i % every == every - 1:
                assert await pipeline.flush()
        assert await pipeline.close()

    asyncio.run(run())


def day_files(data_dir: Path) -> dict[str, list[str]]:
    """The day files of OPEN_DAY, per table partitioned by contract that has some."""
    found = {}
    for table in TABLES.values():
        folder = data_dir / table.name / f"date={OPEN_DAY}"
        names = sorted(p.name for p in folder.glob("*.parquet"))
        if table.by_contract and names:
            found[table.name] = names
    return found


def merge_open(data_dir: Path, merger: Merger | None = None, now: datetime = START) -> Any:
    return merge_open_dates(data_dir, TEHRAN, now=now, after_seconds=0, merger=merger)


def test_merging_day_files_gives_one_sorted_file_holding_exactly_their_rows(
    tmp_path: Path,
) -> None:
    """20 flushes: each table's day files become one file named by their seq range, holding
    their rows sorted by (contract, seq), each frame's rows in order; every view, the Store
    and recovery's marks give the same answers; a second pass changes nothing."""
    record_day_files(tmp_path, feed(200), every=10)
    files = day_files(tmp_path)
    assert len(files["best_limit"]) == 20
    before, marks = everything(tmp_path), recovery_marks(tmp_path)
    one = before["best_limit"][0][0]
    store_before = recorder.Store(tmp_path).table("best_limit", contracts=one).to_pylist()
    expected = {}
    for name, names in files.items():
        folder = tmp_path / name / f"date={OPEN_DAY}"
        parts = [pq.ParquetFile(folder / n).read() for n in names]
        data = pa.concat_tables(parts)  # names are in seq order: a stable sort keeps frames
        expected[name] = data.sort_by([(CONTRACT_COLUMN, "ascending"), ("seq", "ascending")])

    result = merge_open(tmp_path)

    assert result.problems == []
    assert (result.dates, result.files_after) == (len(files), len(files))
    assert result.files_before == sum(map(len, files.values()))
    assert result.rows == sum(t.num_rows for t in expected.values())
    for name, names in files.items():
        first, last = seq_range(names[0]), seq_range(names[-1])
        assert first is not None
        assert last is not None
        merged = file_name(first[0], last[1])
        assert day_files(tmp_path)[name] == [merged], name
        path = tmp_path / name / f"date={OPEN_DAY}" / merged
        assert pq.ParquetFile(path).read().equals(expected[name]), name
        meta = pq.read_metadata(path)
        index = expected[name].column_names.index(CONTRACT_COLUMN)
        assert meta.row_group(0).column(index).statistics.has_min_max
        assert meta.row_group(0).column(index).compression == "ZSTD"
    assert everything(tmp_path) == before
    assert recorder.Store(tmp_path).table("best_limit", contracts=one).to_pylist() == store_before
    assert len(store_before) > 0
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)

    again = merge_open(tmp_path)
    assert (again.dates, again.files_before) == (0, 0)
    assert everything(tmp_path) == before


def test_a_closed_date_is_left_to_the_fold_and_runs_hold_the_row_cap(tmp_path: Path) -> None:
    """Once the date has closed the merge leaves it alone; with a cap of twice the largest
    flush, each run of contiguous files within the cap becomes one file, the rows unchanged."""
    record_day_files(tmp_path, feed(80), every=10)
    files = day_files(tmp_path)
    assert merge_open(tmp_path, now=FUTURE).dates == 0
    assert day_files(tmp_path) == files

    folder = tmp_path / "aggregate" / f"date={OPEN_DAY}"
    counts = [pq.read_metadata(folder / n).num_rows for n in files["aggregate"]]
    cap = max(counts) * 2
    runs = plan_runs(counts, cap)
    assert len(counts) == 8
    assert len(runs) >= 2
    before = everything(tmp_path)
    merge_open(tmp_path, Merger(Compactor(tmp_path), max_rows=cap))
    after = day_files(tmp_path)["aggregate"]
    assert len(after) == len(counts) - sum(len(r) - 1 for r in runs)
    assert all(pq.read_metadata(folder / n).num_rows <= cap for n in after)
    assert everything(tmp_path) == before


@pytest.mark.parametrize(
    ("rows_of", "cap", "runs"),
    [
        ([1, 1, 1], 10, [range(0, 3)]),
        ([5, 5, 5], 10, [range(0, 2)]),
        ([20, 1, 1], 10, [range(1, 3)]),
        ([1, 20, 1], 10, []),
        ([4, 4, 4, 4, 1], 8, [range(0, 2), range(2, 4)]),
        ([1], 10, []),
        ([], 10, []),
    ],
)
def test_runs_are_contiguous_files_up_to_the_row_cap(
    rows_of: list[int], cap: int, runs: list[range]
) -> None:
    """Files are taken in name order while their rows fit the cap; a lone file stays."""
    assert plan_runs(rows_of, cap) == runs


@given(st.lists(st.integers(0, 50), max_size=40), st.integers(1, 100))
def test_runs_never_skip_a_file_and_hold_the_cap(rows_of: list[int], cap: int) -> None:
    """Every run is at least two contiguous files within the cap, in order, disjoint; and a
    prefix of the files is cut the same way whatever follows (but for its last run)."""
    runs = plan_runs(rows_of, cap)
    for run in runs:
        assert run.step == 1
        assert len(run) >= 2
        assert sum(rows_of[i] for i in run) <= cap
    assert all(a.stop <= b.start for a, b in itertools.pairwise(runs))
    half = plan_runs(rows_of[: len(rows_of) // 2], cap)
    assert half[:-1] == runs[: max(len(half) - 1, 0)]


@pytest.mark.parametrize("when", ["verified", "swap"])
def test_a_flush_during_a_merge_is_kept_once(tmp_path: Path, when: str) -> None:
    """A day file flushed before the merge takes the lock is linked into the new folder; one
    flushed while the merge holds the lock (here: as it is about to exchange the folders)
    waits and lands in the new folder; neither is merged, lost or doubled."""
    three_flushes(tmp_path)
    flushes: list[threading.Thread] = []

    def flush() -> None:
        thread = threading.Thread(target=locked_flush)
        flushes.append(thread)
        thread.start()

    def flush_now(step: str, key: Key) -> None:
        if step == when and not flushes:
            flush()
            flushes[0].join()

    def flush_then_exchange(staged: Path, live: Path) -> bool:
        flush()
        time.sleep(0.2)  # time enough for a flush that did not wait for the lock
        return exchange(staged, live)

    def locked_flush() -> None:
        with partition_lock(tmp_path.resolve(), ("best_limit", DAY.isoformat(), None)):
            write_day_file(tmp_path, BEST_LIMIT, {"1001": range(70, 72), "1010": range(71, 73)})

    expected = sorted(
        [
            *rows(tmp_path),
            *_view_rows(tmp_path, "1001", range(70, 72)),
            *_view_rows(tmp_path, "1010", range(71, 73)),
        ]
    )
    swap = flush_then_exchange if when == "swap" else exchange
    merger = Merger(Compactor(tmp_path, on_step=flush_now, swap=swap))
    result = merge_open(tmp_path, merger, now=DAY_OPEN)
    flushes[0].join()

    assert (result.dates, result.files_before, result.files_after) == (1, 3, 1)
    assert folder_files(tmp_path) == {".": [file_name(1, 30), file_name(70, 72)]}
    assert rows(tmp_path) == expected
    merge_open(tmp_path, now=DAY_OPEN)
    assert folder_files(tmp_path) == {".": [file_name(1, 72)]}
    assert rows(tmp_path) == expected


def late_day_files_on_contract_files(data_dir: Path) -> None:
    """best_limit: a folded date (contract files) with three day files after it; aggregate:
    three day files."""
    three_flushes(data_dir)
    assert compact(data_dir, TEHRAN, days=[DAY], bar=False).ok
    write_day_file(data_dir, BEST_LIMIT, {"1001": range(40, 42), "1002": range(41, 43)})
    write_day_file(data_dir, BEST_LIMIT, {"1005": range(50, 51)})
    write_day_file(data_dir, BEST_LIMIT, {"1001": range(60, 62), "1099": range(60, 63)})
    three_flushes(data_dir, AGGREGATE)


STEPS = ["staged", "verified", "locked", "exchanged", "cleaned"]


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_of_a_merge_then_a_rerun_gives_the_same_rows(
    tmp_path: Path, step: str
) -> None:
    """Crashed mid-merge (aggregate, after best_limit merged): recovery's marks and every row
    are as before; a rerun leaves one day file per date, the contract files untouched (same
    inodes) and no staging folder."""
    late_day_files_on_contract_files(tmp_path)
    before = {t: rows(tmp_path, TABLES[t]) for t in ("best_limit", "aggregate")}
    marks = recovery_marks(tmp_path)
    contract_files = [p for p in (tmp_path / "best_limit").rglob("*.c.parquet")]
    inodes = {p: p.stat().st_ino for p in contract_files}
    assert len(inodes) == 5
    crashing = Merger(Compactor(tmp_path, on_step=crash_at(step, 2)))
    with pytest.raises(Crash):
        merge_open(tmp_path, crashing, now=DAY_OPEN)

    assert recovery_marks(tmp_path) == marks
    for name, shown in before.items():
        assert rows(tmp_path, TABLES[name]) == shown, name
    assert folder_files(tmp_path)["."] == [file_name(40, 62)]

    result = merge_open(tmp_path, now=DAY_OPEN)
    assert result.problems == []
    assert folder_files(tmp_path, AGGREGATE) == {".": [file_name(1, 30)]}
    assert folder_files(tmp_path)["."] == [file_name(40, 62)]
    assert {p: p.stat().st_ino for p in contract_files} == inodes
    for name, shown in before.items():
        assert rows(tmp_path, TABLES[name]) == shown, name
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)


def test_merging_then_the_closing_fold_gives_the_files_of_the_fold_alone(tmp_path: Path) -> None:
    """The fold of merged day files writes the same contract files, byte for byte in rows and
    names, as the fold of the flushes' day files."""
    record_day_files(tmp_path / "alone", feed(120), every=10)
    shutil.copytree(tmp_path / "alone", tmp_path / "merged")
    assert merge_open(tmp_path / "merged").dates == len(day_files(tmp_path / "alone"))
    assert all(len(n) == 1 for n in day_files(tmp_path / "merged").values())

    for name in ("alone", "merged"):
        assert compact(tmp_path / name, TEHRAN, now=FUTURE, bar=False).ok
    alone, merged = _contract_files(tmp_path / "alone"), _contract_files(tmp_path / "merged")
    assert sorted(merged) == sorted(alone)
    assert len(alone) >= 30
    for relative, data in alone.items():
        assert merged[relative].equals(data), relative
    assert everything(tmp_path / "alone") == everything(tmp_path / "merged")


def _contract_files(data_dir: Path) -> dict[str, pa.Table]:
    return {
        str(p.relative_to(data_dir)): pq.ParquetFile(p).read()
        for p in sorted(data_dir.glob("*/date=*/**/*.parquet"))
        if not is_day_file(p) or not TABLES[p.relative_to(data_dir).parts[0]].by_contract
    }


def test_without_an_atomic_exchange_nothing_is_merged(tmp_path: Path) -> None:
    """A file system that cannot exchange folders keeps the day files as they are."""
    three_flushes(tmp_path)
    before = folder_files(tmp_path)
    result = merge_open(tmp_path, Merger(Compactor(tmp_path, swap=refuse)), now=DAY_OPEN)
    assert (result.dates, len(result.problems)) == (0, 1)
    assert folder_files(tmp_path) == before
    assert_no_leftovers(tmp_path)


def test_a_broken_day_file_is_reported_and_the_other_tables_merged(tmp_path: Path) -> None:
    """A day file that is not Parquet leaves its date alone, with a problem; the rest merges."""
    three_flushes(tmp_path)
    three_flushes(tmp_path, AGGREGATE)
    broken = tmp_path / "best_limit" / f"date={DAY}" / file_name(90, 91)
    broken.write_bytes(b"not parquet")
    result = merge_open(tmp_path, now=DAY_OPEN)
    assert result.dates == 1
    assert len(result.problems) == 1
    assert "best_limit" in result.problems[0]
    assert folder_files(tmp_path, AGGREGATE) == {".": [file_name(1, 30)]}
    assert len(folder_files(tmp_path)["."]) == 4


def test_a_merge_waits_for_no_compaction(tmp_path: Path) -> None:
    """While a compaction holds the data directory, a merge pass is refused at once."""
    three_flushes(tmp_path)
    before = folder_files(tmp_path)
    with run_lock(tmp_path, wait=True), pytest.raises(CompactionBusy):
        merge_open(tmp_path, now=DAY_OPEN)
    assert folder_files(tmp_path) == before


def test_the_daemons_merge_task_stops_at_once() -> None:
    """close() ends the task during its wait, without waiting for the hour-long interval
    (the bound is generous: this is not a timing target, waiting would take an hour)."""

    async def run() -> int:
        merging = AutoMerge(Path("/nonexistent"), TEHRAN, 0.0, 3600.0)
        merging.start()
        await asyncio.sleep(0.05)
        await asyncio.wait_for(merging.close(), timeout=60)
        return merging.passes

    assert asyncio.run(run()) == 0


@pytest.mark.parametrize("interval", [0.2, 0.0])
def test_the_daemon_merges_the_open_date_by_itself(
    simulator: Any, tmp_path: Path, interval: float
) -> None:
    """With merge_interval_seconds the recording's day files are merged as it goes (a file
    appears whose seq range holds that of earlier ones) and every row is stored once; with
    0 no day file is ever replaced."""
    sim = simulator(contracts=3, rate=200, keep_sent=True)
    config = make_config(sim, tmp_path, storage={"flush_interval_seconds": 0.1})
    config = msgspec.structs.replace(
        config, compaction=CompactionConfig(merge_interval_seconds=interval)
    )
    seen: set[str] = set()

    def current() -> list[tuple[int, int]]:
        return [s for p in tmp_path.glob("aggregate/date=*/*.parquet") if (s := seq_range(p.name))]

    def merged() -> bool:
        now = current()
        spans = [s for s in (seq_range(n) for n in seen) if s is not None]
        return any(a[0] <= b[0] and b[1] <= a[1] and a != b for a in now for b in spans)

    def watch(r: Recorder) -> None:
        seen.update(p.name for p in tmp_path.glob("aggregate/date=*/*.parquet"))

    def done(r: Recorder) -> bool:
        enough = r.pipeline.stats.files_written >= 60
        return enough and (interval == 0 or merged())

    record_until(config, done, during=watch, timeout=40)

    expected = expected_rows(sim.sent)
    for table in DATA_TABLES:
        assert stored_rows(tmp_path, table) == expected[table], table
    assert verify(tmp_path).ok
    still = {p.name for p in tmp_path.glob("aggregate/date=*/*.parquet")}
    if interval == 0:
        assert seen <= still
    else:
        assert len(seen - still) >= 2
        assert len(still) < len(seen)


def test_merge_interval_is_configured_and_checked() -> None:
    """600 s by default, 0 turns merging off, a negative or infinite interval is refused."""
    assert load_config(None, ONE_CONTRACT).compaction.merge_interval_seconds == 600.0
    key = "IME_RECORDER_COMPACTION__MERGE_INTERVAL_SECONDS"
    assert load_config(None, {**ONE_CONTRACT, key: "0"}).compaction.merge_interval_seconds == 0
    for bad in ("-1", "inf", "nan"):
        message = config_error(None, {**ONE_CONTRACT, key: bad})
        assert message.startswith("compaction.merge_interval_seconds"), bad
