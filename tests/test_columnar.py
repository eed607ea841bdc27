"""Bulk decoding: plain frames become rows in DuckDB, exactly as the full rules would make them."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import msgspec
import orjson
import pyarrow as pa
import pytest

import recorder
from recorder.buffer import Batch
from recorder.columnar import (
    CONTRACT,
    DATE,
    FrameBatch,
    batches_to_parts,
    partitions,
    parts_schema,
)
from recorder.config import JournalConfig, StorageConfig
from recorder.flushing import DECODE_CHUNK_FRAMES, ROWS_PER_FRAME
from recorder.intake import DECODE_FRAMES
from recorder.pipeline import Pipeline
from recorder.plain import plain_frame
from recorder.schema import TABLES
from recorder.simcontracts import FeedVariants, make_contracts
from recorder.simmarket import Market, Subscription
from tests.conftest import make_config, record_until

TEHRAN = ZoneInfo("Asia/Tehran")
START = datetime(2026, 3, 20, 20, 0, tzinfo=UTC)  # 23:30 in Tehran: the local date changes
RECEIVED = 1_774_000_000_000_000


def feed(count: int, **variants: Any) -> list[bytes]:
    """``count`` simulator frames of 30 contracts, every wire variant mixed in."""
    contracts = make_contracts(30, 7)
    stream = Subscription(Market(contracts, 7, FeedVariants(**variants)), contracts, "id", 7)
    return [stream.next(START + timedelta(seconds=i)).text.encode() for i in range(count)]


#: frames handed over together, as the feed hands over those of one socket read: runs of 1
#: to 1,500 (a run spans the batch's 1,000-frame blocks and the 1,024-seq pressure checks)
RUNS = (1, 7, 1_500, 2, 250, 999, 64)


def record(
    data_dir: Path,
    frames: list[bytes],
    *,
    bulk: bool,
    overlap: bool = False,
    runs: tuple[int, ...] = (1,),
) -> Pipeline:
    """Each frame through the pipeline, in ``runs`` of frames received together (cycled)."""
    storage = StorageConfig(data_dir=str(data_dir), flush_interval_seconds=3600, fsync=False)

    async def run() -> Pipeline:
        pipeline = Pipeline(data_dir, storage, TEHRAN, TEHRAN, None, bulk_decode=bulk)
        pipeline.start()
        if overlap:
            pipeline.overlap(tuple(c.id for c in make_contracts(30, 7)[:10]), True)
        start, flushed = 0, False
        for size in itertools.cycle(runs):
            if start >= len(frames):
                break
            run = frames[start : start + size]
            assert pipeline.on_frames("conn", list(run), RECEIVED + start) == start + 1
            start += len(run)
            if not flushed and start > len(frames) // 2:
                flushed = True
                assert await pipeline.flush()
        assert await pipeline.close()
        return pipeline

    return asyncio.run(run())


def everything(data_dir: Path, but: str = "") -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in order (``but``: without that column)."""
    con = recorder.connect(data_dir)
    columns = f"* EXCLUDE ({but})" if but else "*"
    try:
        return {
            name: con.sql(f"SELECT {columns} FROM {name} ORDER BY ALL").fetchall()
            for name in TABLES
        }
    finally:
        con.close()


@pytest.mark.parametrize(
    "variants",
    [
        pytest.param({}, id="plain"),
        pytest.param(
            {"variant_mix": True, "malformed": 0.05, "unknown_sections": 0.05}, id="every-variant"
        ),
    ],
)
@pytest.mark.parametrize("runs", [(1,), RUNS], ids=["one-at-a-time", "runs"])
def test_bulk_decoding_stores_exactly_the_rows_of_the_full_rules(
    tmp_path: Path, variants: dict[str, Any], runs: tuple[int, ...]
) -> None:
    """The same frames through DuckDB and through the per-frame rules: the same rows, in
    every table (quarantine and extras included), partitioned the same way; whether they
    come one at a time or in runs received together (malformed ones inside a run)."""
    frames = feed(3000, **variants)
    bulk = record(tmp_path / "bulk", frames, bulk=True, runs=runs)
    one_by_one = record(tmp_path / "one", frames, bulk=False, runs=runs)

    plain = sum(plain_frame(f, TEHRAN) is not None for f in frames)
    assert plain > 1000
    assert bulk.stats.decoded_in_bulk == plain
    assert one_by_one.stats.decoded_in_bulk == 0
    stored = everything(tmp_path / "bulk")
    assert stored == everything(tmp_path / "one")
    assert len(stored["aggregate"]) > 1000
    assert {row[1] for row in stored["aggregate"]} >= {
        datetime(2026, 3, 20).date(),
        datetime(2026, 3, 21).date(),
    }
    folders = {p.relative_to(tmp_path / "bulk") for p in (tmp_path / "bulk").rglob("contract=*")}
    assert folders == {
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("contract=*")
    }


def _reshape_book(frame: bytes, keys: tuple[str, ...]) -> bytes:
    """``frame`` with its book's levels re-keyed to ``keys``, in that order (level 1 repeated
    where the frame has fewer levels)."""
    message = orjson.loads(frame)
    levels = list(message["data"]["BestLimit"].values())
    message["data"]["BestLimit"] = {k: levels[min(i, len(levels) - 1)] for i, k in enumerate(keys)}
    return orjson.dumps(message)


def in_file_order(data_dir: Path, table: str, columns: str = "*") -> list[tuple[Any, ...]]:
    """``columns`` of every row of ``table``'s files, file by file, in the files' order."""
    con = duckdb.connect()
    try:
        return [
            row
            for path in sorted(data_dir.glob(f"{table}/**/*.parquet"))
            for row in con.sql(f"SELECT {columns} FROM read_parquet('{path}')").fetchall()
        ]
    finally:
        con.close()


def test_books_bulk_decoding_does_not_take_are_stored_as_the_full_rules_store_them(
    tmp_path: Path,
) -> None:
    """DuckDB reads a book as the documented levels "1" to "3": a frame whose book has
    another level, or its levels out of order, is flattened on its own instead. Both kinds
    are stored row for row (and in the files' order) as the per-frame rules store them."""
    shapes = [("1", "2", "3", "4"), ("2", "1"), ("3", "2", "1"), ("1", "3"), ("3",), ("1", "2")]
    frames = feed(60)
    for i, keys in enumerate(shapes * 5):
        frames[2 * i] = _reshape_book(frames[2 * i], keys)
    bulk = record(tmp_path / "bulk", frames, bulk=True)
    record(tmp_path / "one", frames, bulk=False)

    assert everything(tmp_path / "bulk") == everything(tmp_path / "one")
    # the last three shapes are ascending documented levels: decoded in bulk, as plain books
    taken = [keys for keys in shapes * 5 if keys in (("1", "3"), ("3",), ("1", "2"))]
    assert bulk.stats.decoded_in_bulk == 60 - 30 + len(taken) == 45
    stored = in_file_order(tmp_path / "bulk", "best_limit")
    assert stored == in_file_order(tmp_path / "one", "best_limit")
    levels: dict[int, list[int]] = {}  # seq: its levels, in file order
    for seq, level in in_file_order(tmp_path / "bulk", "best_limit", "seq, level"):
        levels.setdefault(seq, []).append(level)
    shown = {tuple(v) for v in levels.values()}
    assert {(1, 2, 3, 4), (2, 1), (3, 2, 1), (1, 3), (3,), (1, 2)} <= shown


@pytest.mark.parametrize("runs", [(1,), (150, 50)], ids=["one-at-a-time", "runs"])
def test_overlap_duplicates_are_quarantined_on_the_bulk_path(
    tmp_path: Path, runs: tuple[int, ...]
) -> None:
    """While two streams overlap, a repeated (contract, timestamp) is quarantined once, also
    when the repeat comes in the same run of frames as the first."""
    frames = feed(200)
    repeated = frames[:100] + frames[:100]
    bulk = record(tmp_path / "bulk", repeated, bulk=True, overlap=True, runs=runs)

    con = recorder.connect(tmp_path / "bulk")
    duplicates = con.execute(
        "SELECT count(*) FROM quarantine WHERE reason LIKE 'duplicate%'"
    ).fetchone()
    messages = con.execute("SELECT count(DISTINCT seq) FROM aggregate").fetchone()
    ids = {c.id for c in make_contracts(30, 7)[:10]}
    expected = sum(orjson.loads(f)["contractId"] in ids for f in frames[:100])
    assert duplicates == (expected,)
    assert messages == (200 - expected,)
    assert bulk.stats.quarantined == expected


def test_plain_frames_wait_undecoded_until_the_flush(tmp_path: Path) -> None:
    """A plain frame costs the event loop a few appends: no row is built before the flush,
    yet it counts as the rows it will make (six for a full message) against the memory bound."""
    frames = feed(50)
    storage = StorageConfig(data_dir=str(tmp_path), flush_interval_seconds=3600, fsync=False)

    async def run() -> tuple[int, int, int]:
        pipeline = Pipeline(tmp_path, storage, TEHRAN, TEHRAN, None)
        pipeline.start()
        for i, frame in enumerate(frames):
            pipeline.on_frame("conn", frame, RECEIVED + i)
        waiting = pipeline.rows_buffered
        decoded = pipeline.stats.decoded_in_bulk
        assert await pipeline.close()
        return waiting, decoded, pipeline.stats.decoded_in_bulk

    assert asyncio.run(run()) == (50 * ROWS_PER_FRAME, 0, 50)


def test_a_failed_write_keeps_decoded_rows_for_the_next_flush(tmp_path: Path) -> None:
    """Rows DuckDB built are kept when their write fails, and written once when it works."""
    frames = feed(300)
    storage = StorageConfig(data_dir=str(tmp_path), flush_interval_seconds=3600, fsync=False)
    blocker = tmp_path / "best_limit"

    async def run() -> tuple[bool, int, bool, int]:
        pipeline = Pipeline(tmp_path, storage, TEHRAN, TEHRAN, None)
        pipeline.start()
        blocker.write_text("not a folder")  # no partition folder can be made under it
        for i, frame in enumerate(frames):
            pipeline.on_frame("conn", frame, RECEIVED + i)
        failed = await pipeline.flush()
        kept = pipeline.rows_buffered
        blocker.unlink()
        retried = await pipeline.flush()
        assert await pipeline.close()
        return failed, kept, retried, pipeline.rows_buffered

    failed, kept, retried, left = asyncio.run(run())
    assert (failed, retried, left) == (False, True, 0)
    assert kept > 0
    con = recorder.connect(tmp_path)
    levels = sum(len(orjson.loads(f)["data"].get("BestLimit", {})) for f in frames)
    assert con.execute(
        "SELECT count(*), count(DISTINCT (seq, level)) FROM best_limit"
    ).fetchone() == (
        levels,
        levels,
    )
    assert con.execute("SELECT count(*) FROM aggregate").fetchone() == (300,)


def test_row_batches_of_many_partitions_become_one_table_each_in_order() -> None:
    """The per-frame path's row batches (one per table, date and contract: the snapshots at
    connect make ~2,000) become one Arrow table per table, rows in the batches' order, each
    row with its partition's date and contract."""
    at = datetime(2026, 3, 20, 8, 0, tzinfo=UTC)

    def info(seq: int) -> tuple[Any, ...]:
        return (at, at, seq, 10 * seq, seq, "snapshot")

    batches = [
        Batch(("contract_info", "2026-03-20", "B"), [info(1), info(4)]),
        Batch(("quarantine", "2026-03-20", None), [(at, 2, "conn", "bad", "{")]),
        Batch(("contract_info", "2026-03-21", "A"), [info(3)]),
        Batch(("contract_info", "2026-03-20", "A"), []),
        Batch(("contract_info", "2026-03-20", "A"), [info(2)]),
    ]
    parts = batches_to_parts(batches)

    assert sorted(parts) == ["contract_info", "quarantine"]
    assert parts["contract_info"].schema == parts_schema(TABLES["contract_info"])
    assert parts["contract_info"].to_pylist() == [
        {DATE: day, CONTRACT: contract, "exchange_ts": at, "received_at": at, "seq": seq,
         "open_interest": 10 * seq, "open_interest_changes": seq, "source": "snapshot"}
        for day, contract, seq in [
            ("2026-03-20", "B", 1), ("2026-03-20", "B", 4), ("2026-03-21", "A", 3),
            ("2026-03-20", "A", 2),
        ]
    ]  # fmt: skip
    assert parts["quarantine"].to_pylist() == [
        {DATE: "2026-03-20", CONTRACT: None, "received_at": at, "seq": 2,
         "connection": "conn", "reason": "bad", "raw": "{"}
    ]  # fmt: skip


def test_partitions_make_day_files_cut_between_frames_and_ordered_by_contract() -> None:
    """A flush makes one day file per date, cut into seq ranges above max_rows, never inside
    one frame's rows; inside a file, rows are ordered by contract (by name, not by arrival)
    and then by seq, each frame's rows in their order."""
    table = TABLES["best_limit"]
    # (contract, seq, levels): Z arrives first, but A sorts first; one frame on another date
    frames = [("Z", 1, 3), ("A", 2, 2), ("Z", 3, 3), ("A", 4, 1), ("Z", 5, 1), ("A", 6, 2)]
    contracts, seqs, levels, days = [], [], [], []
    for contract, seq, count in frames:
        for level in range(1, count + 1):
            contracts.append(contract)
            seqs.append(seq)
            levels.append(level)
            days.append("2026-01-02" if seq == 6 else "2026-01-01")
    ts = pa.array([0] * len(seqs), pa.timestamp("us", tz="UTC"))
    columns = {
        DATE: days,
        CONTRACT: contracts,
        "exchange_ts": ts,
        "received_at": ts,
        "seq": seqs,
        "level": levels,
        **{n: [0] * len(seqs) for n in ("buy_quantity", "sell_quantity")},
        **{n: [0.0] * len(seqs) for n in ("buy_price", "sell_price")},
        "source": ["stream"] * len(seqs),
    }
    schema = parts_schema(table)
    rows = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)

    ordered, parts = partitions(table, rows, max_rows=4)

    spans = [(p.key, p.first_seq, p.last_seq, p.offset, p.length) for p in parts]
    assert spans == [
        (("best_limit", "2026-01-01", None), 1, 2, 0, 5),  # seq 1 alone is 3 rows, 2 makes 5
        (("best_limit", "2026-01-01", None), 3, 4, 5, 4),
        (("best_limit", "2026-01-01", None), 5, 5, 9, 1),
        (("best_limit", "2026-01-02", None), 6, 6, 10, 2),
    ]
    got = list(
        zip(
            ordered.column(CONTRACT).to_pylist(),
            ordered.column("seq").to_pylist(),
            ordered.column("level").to_pylist(),
            strict=True,
        )
    )
    assert got == [
        ("A", 2, 1), ("A", 2, 2), ("Z", 1, 1), ("Z", 1, 2), ("Z", 1, 3),
        ("A", 4, 1), ("Z", 3, 1), ("Z", 3, 2), ("Z", 3, 3),
        ("Z", 5, 1),
        ("A", 6, 1), ("A", 6, 2),
    ]  # fmt: skip


def test_readers_pause_while_memory_is_full_and_nothing_is_lost(
    simulator: Any, tmp_path: Path
) -> None:
    """With max_buffered_rows tiny and no journal to spill to (tests/test_spill.py has the
    spilling), the readers stop and wait for flushes (TCP holds the server back), and every
    frame sent is still stored exactly once."""
    sim = simulator(contracts=6, rate=0, max_messages=4000, fast=True, keep_sent=True)
    storage = {"flush_interval_seconds": 60.0, "max_buffered_rows": 400, "fsync": False}
    config = make_config(sim, tmp_path / "data", storage=storage)
    config = msgspec.structs.replace(config, journal=JournalConfig(enabled=False))
    rec = record_until(config, lambda r: r.pipeline.stats.frames >= 4000, timeout=60)

    assert rec.pipeline.stats.pauses >= 3
    con = recorder.connect(tmp_path / "data")
    stream = "WHERE source = 'stream'"
    counts = con.execute(f"SELECT count(*), count(DISTINCT seq) FROM aggregate {stream}")
    assert counts.fetchone() == (4000, 4000)
    assert rec.pipeline.stats.flushes >= 3


def test_the_frames_of_one_read_that_fill_memory_stop_the_readers_at_once(
    tmp_path: Path,
) -> None:
    """The memory check runs after each call's frames joined: one read that fills
    ``max_buffered_rows`` marks the pipeline full before the reader's next read."""
    frames = feed(300)
    storage = StorageConfig(
        data_dir=str(tmp_path), flush_interval_seconds=3600, fsync=False, max_buffered_rows=500
    )

    async def run() -> tuple[bool, bool, int]:
        pipeline = Pipeline(tmp_path, storage, TEHRAN, TEHRAN, None)
        pipeline.on_frames("conn", frames[:10], RECEIVED)  # ~35 rows: room left
        before = pipeline.full
        pipeline.on_frames("conn", frames[10:], RECEIVED)  # 290 frames, ~1,000 rows
        assert pipeline.rows_buffered >= 500
        return before, pipeline.full, pipeline.stats.pauses

    assert asyncio.run(run()) == (False, True, 1)


def test_a_quiet_feed_is_written_at_once_not_after_the_flush_interval(
    simulator: Any, tmp_path: Path
) -> None:
    """Once frames stop coming, the rows waiting are written within QUIET_SECONDS, although
    the flush interval is an hour away."""
    sim = simulator(contracts=4, rate=0, max_messages=300, fast=True)
    storage = {"flush_interval_seconds": 3600.0, "fsync": False}
    config = make_config(sim, tmp_path / "data", storage=storage)

    rec = record_until(
        config, lambda r: r.pipeline.stats.rows_written["aggregate"] >= 300, timeout=20
    )

    assert rec.pipeline.stats.rows_written["aggregate"] == 300
    con = recorder.connect(tmp_path / "data")
    assert con.execute("SELECT count(*) FROM aggregate WHERE source = 'stream'").fetchone() == (
        300,
    )


def test_a_busy_feed_is_flushed_once_decoded_rows_fill_a_file(tmp_path: Path) -> None:
    """Decoded rows are due for a flush once they fill a file (max_rows_per_file), however
    far the flush interval is and while frames keep coming; below that, they wait."""
    frames = feed(DECODE_FRAMES)  # one decoded batch: 20,000 messages, 120,000 rows

    async def due_after_one_batch(max_rows_per_file: int) -> tuple[bool, int]:
        storage = StorageConfig(
            data_dir=str(tmp_path / str(max_rows_per_file)),
            flush_interval_seconds=3600,
            max_rows_per_file=max_rows_per_file,
            fsync=False,
        )
        pipeline = Pipeline(Path(storage.data_dir), storage, TEHRAN, TEHRAN, None)
        for i, frame in enumerate(frames):
            pipeline.on_frame("conn", frame, RECEIVED + i)
        now = time.monotonic()  # the feed is not quiet: the last frame came just now
        await pipeline.decode_waiting()
        due = pipeline.due(now)
        rows = pipeline.rows_buffered
        assert await pipeline.close()
        return due, rows

    assert asyncio.run(due_after_one_batch(100_000)) == (True, 120_000)
    assert asyncio.run(due_after_one_batch(250_000)) == (False, 120_000)


def test_a_view_reads_day_files_written_after_it_and_survives_their_compaction(
    tmp_path: Path,
) -> None:
    """A catalog view made on an empty store reads the day files flushed later, and keeps
    reading the same rows once compaction has folded every day file into contract files."""
    from recorder.compaction import compact

    con = recorder.connect(tmp_path)
    per_contract = "SELECT contract, date, count(*) FROM aggregate GROUP BY ALL ORDER BY ALL"
    assert con.execute(per_contract).fetchall() == []

    record(tmp_path, feed(300), bulk=True)
    day_files = sorted(tmp_path.glob("aggregate/*/*.parquet"))
    before = con.execute(per_contract).fetchall()
    days = sorted({d for _, d, _ in before})
    compact(tmp_path, TEHRAN, days=days, bar=False)
    after = con.execute(per_contract).fetchall()

    assert len(days) == 1
    assert len(day_files) == 2  # a flush half-way, then the rest
    assert sum(n for *_, n in before) == 300
    assert sorted(tmp_path.glob("aggregate/*/*.parquet")) == []
    # one compacted file per contract and date
    assert len(list(tmp_path.glob("aggregate/*/contract=*/*.c.parquet"))) == len(before)
    assert after == before


def test_a_batch_keeps_its_frames_where_the_garbage_collector_does_not_walk() -> None:
    """A waiting frame adds no object that a collection visits: its bytes, seq and times
    are in buffers, its date and contract are shared strings. As lists of bytes and ints,
    every full collection walked each of a batch's frames (~15 % of the event loop's time
    at 90 k frames/s). The Arrow table is the frames and numbers as added."""
    frames = feed(3_000)
    batch = FrameBatch()
    for i, frame in enumerate(frames):
        plain = plain_frame(frame, TEHRAN)
        assert plain is not None
        contract = plain[0].encode().decode()  # a str object of its own, as decoding gives
        batch.extend([i + 1], RECEIVED + i, [plain[1]], ["2026-03-20"], [contract], [frame], 0.0)
    contracts = {plain_frame(f, TEHRAN)[0] for f in frames}  # type: ignore[index]
    visited = {id(o) for part in gc.get_referents(batch) for o in gc.get_referents(part)}
    assert len(visited) < 2 * len(contracts) + 100  # not per frame: 3,000 frames
    table = batch.arrow()
    assert table.num_rows == 3_000
    assert table.column("frame").to_pylist() == [f.decode() for f in frames]
    assert table.column("seq").to_pylist() == list(range(1, 3_001))
    assert table.column("received_us").to_pylist() == [RECEIVED + i for i in range(3_000)]
    assert set(table.column("contract").to_pylist()) == contracts
    assert batch.frames == frames
    # cut anywhere, even inside a block of frames, the chunks hold the same frames in order
    chunks = batch.chunks(1_234)
    assert [len(c) for c in chunks] == [1_234, 1_234, 532]
    assert [f for c in chunks for f in c.frames] == frames
    assert [f for c in chunks for f in c.arrow().column("frame").to_pylist()] == [
        f.decode() for f in frames
    ]


def test_frames_added_together_make_the_batch_adding_each_makes() -> None:
    """Frames added in runs (a socket read's frames) fill the columns, the 1,000-frame
    blocks and the frames' offsets exactly as adding each frame in turn does."""
    frames = feed(3_100)
    plain = [plain_frame(f, TEHRAN) for f in frames]
    one_by_one, together = FrameBatch(), FrameBatch()
    for i, (frame, checked) in enumerate(zip(frames, plain, strict=True)):
        assert checked is not None
        one_by_one.extend(
            [i + 1], RECEIVED, [checked[1]], [f"d{i % 3}"], [checked[0]], [frame], 5.0
        )
    start = 0
    for size in itertools.cycle(RUNS):
        if start >= len(frames):
            break
        run = range(start, min(start + size, len(frames)))
        together.extend(
            [i + 1 for i in run],
            RECEIVED,
            [plain[i][1] for i in run],  # type: ignore[index]
            [f"d{i % 3}" for i in run],
            [plain[i][0] for i in run],  # type: ignore[index]
            frames[run.start : run.stop],
            5.0,
        )
        start = run.stop
    columns = ("seq", "received", "exchange", "day", "contract", "blocks", "block_stops")
    for name in (*columns, "open", "ends", "size", "started"):
        assert getattr(together, name) == getattr(one_by_one, name), name
    assert list(together.block_stops) == [1_000, 2_000, 3_000]
    assert together.frames == frames
    assert together.arrow().equals(one_by_one.arrow())


def test_a_flush_decodes_a_big_backlog_a_batch_at_a_time_with_the_same_rows(
    tmp_path: Path,
) -> None:
    """Frames piled up while the readers paused are decoded DECODE_CHUNK_FRAMES at a time
    (DuckDB's working memory grows with the batch), in order, and give the per-frame rules'
    rows."""
    frames = feed(DECODE_CHUNK_FRAMES + 700)
    batch = FrameBatch()
    for i, frame in enumerate(frames):
        plain = plain_frame(frame, TEHRAN)
        assert plain is not None
        batch.extend([i + 1], RECEIVED + i, [plain[1]], ["d"], [plain[0]], [frame], 0.0)
    chunks = batch.chunks(DECODE_CHUNK_FRAMES)
    assert [len(c) for c in chunks] == [DECODE_CHUNK_FRAMES, 700]
    assert [s for c in chunks for s in c.seq] == list(batch.seq)
    assert [f for c in chunks for f in c.frames] == batch.frames
    # a flush takes the chunks: the batch is left empty, so decoded chunks free their frames
    taken = batch.take_chunks(DECODE_CHUNK_FRAMES)
    assert [(list(c.seq), c.frames) for c in taken] == [(list(c.seq), c.frames) for c in chunks]
    assert (len(batch), batch.frames, batch.started) == (0, [], 0.0)
    assert (batch.blocks, batch.open, list(batch.ends)) == ([], [], [0])

    async def run(bulk: bool, data_dir: Path) -> None:
        storage = StorageConfig(data_dir=str(data_dir), flush_interval_seconds=3600, fsync=False)
        pipeline = Pipeline(data_dir, storage, TEHRAN, TEHRAN, None, bulk_decode=bulk)
        for i, frame in enumerate(frames):  # no flusher: all wait for the one flush
            pipeline.on_frame("conn", frame, RECEIVED + i)
        assert await pipeline.flush()
        assert pipeline.stats.decoded_in_bulk == (len(frames) if bulk else 0)
        assert await pipeline.close()

    asyncio.run(run(True, tmp_path / "bulk"))
    asyncio.run(run(False, tmp_path / "per-frame"))
    assert everything(tmp_path / "bulk") == everything(tmp_path / "per-frame")
