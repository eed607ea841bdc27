"""Crashes for real: kill -9 of the recorder process at random instants, then restarts."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

import recorder
from recorder.errors import FlattenError
from recorder.flatten import flatten
from recorder.journal import Journal
from recorder.records import EVENT, FRAME, Record
from recorder.schema import DATA_TABLES
from recorder.simcontracts import FeedVariants, make_contracts
from recorder.simmarket import Market, Subscription
from recorder.state import SeqAllocator
from tests.conftest import wait_for
from tests.test_daemon import RECORDER, recorder_env, write_config

KILLS = 20


def journaled_frames(data_dir: Path) -> list[Record]:
    """Every frame the journal ever held (live segments and retained archives), by seq."""
    journal = Journal(data_dir)
    frames = {r.seq: r for r in [*journal.archived(), *journal.recover()] if r.kind == FRAME}
    return [frames[seq] for seq in sorted(frames)]


def expected_counts(frames: list[Record]) -> dict[str, int]:
    """Rows per table that the journaled frames must have produced, each exactly once."""
    counts = dict.fromkeys((*DATA_TABLES, "quarantine"), 0)
    for record in frames:
        try:
            message = flatten(record.payload)
        except FlattenError:
            counts["quarantine"] += 1
            continue
        for table, rows in message.rows.items():
            counts[table] += len(rows)
    return counts


def assert_stored_once(data_dir: Path, frames: list[Record]) -> duckdb.DuckDBPyConnection:
    """Every table holds the rows of the journaled ``frames``, each exactly once; returns the
    connection that counted them."""
    con = recorder.connect(data_dir)
    for table, count in expected_counts(frames).items():
        key = "seq, level" if table == "best_limit" else "seq"
        stored, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT ({key})) FROM {table}"
        ).fetchone() or (0, 0)
        assert stored == distinct, f"{table}: duplicate rows"
        assert stored == count, f"{table}: {stored} rows for {count} expected"
    return con


def journal_kept_config(
    tmp_path: Path, sim: Any, storage: str = "", flush_interval: float = 0.5
) -> Path:
    """A config recording every contract of ``sim`` into ``tmp_path/data``, whose journal
    keeps its released segments (so :func:`journaled_frames` sees every frame);
    ``storage``: more ``[storage]`` lines."""
    return write_config(
        tmp_path / "c.toml",
        sim,
        tmp_path / "data",
        [c.id for c in sim.contracts],
        f"{storage}[journal]\nretention_days = 1\n",
        flush_interval=flush_interval,
    )


def start_recorder(
    config: Path, sim: Any, stderr: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``ime-recorder run`` with the simulator's demo credentials, once it has connected."""
    before = sim.stats()["connections_accepted"]
    proc = subprocess.Popen(
        [RECORDER, "run", "--config", str(config)],
        env=recorder_env(HEDGETECH_USERNAME="demo", HEDGETECH_PASSWORD="demo"),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    wait_for(lambda: sim.stats()["connections_accepted"] > before, what="a new connection")
    return proc


@pytest.mark.slow
def test_kill_9_at_random_instants_loses_and_duplicates_nothing(
    simulator: Any, tmp_path: Path
) -> None:
    """20 kill -9 under load: every journaled frame stored once, and a restart gap for each."""
    sim = simulator(contracts=6, rate=3000, malformed=0.01, keep_sent=False, seed=11)
    data_dir = tmp_path / "data"
    config = journal_kept_config(tmp_path, sim, flush_interval=0.15)
    rng = random.Random(20261121)

    def start() -> subprocess.Popen[bytes]:
        return start_recorder(config, sim)

    for _ in range(KILLS):
        proc = start()
        time.sleep(rng.uniform(0.05, 0.8))  # the random instant of the crash, not a wait
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    proc = start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0

    frames = journaled_frames(data_dir)
    assert len(frames) > 5000
    for path in data_dir.glob("*/date=*/**/*.parquet"):
        pq.read_table(path)  # every visible file is whole
    assert not list(data_dir.glob("**/.*.tmp"))
    con = assert_stored_once(data_dir, frames)
    journal_seqs = {r.seq for r in frames}
    stored_seqs = {
        s
        for (s,) in con.execute(
            "SELECT seq FROM aggregate UNION SELECT seq FROM quarantine"
        ).fetchall()
    }
    assert journal_seqs <= stored_seqs | {r.seq for r in frames if b'"Aggregate"' not in r.payload}

    sessions = con.execute("SELECT reason, count(*) FROM sessions GROUP BY 1 ORDER BY 1").fetchall()
    assert dict(sessions) == {"crash": KILLS, "shutdown": 1}
    restarts = con.execute(
        "SELECT contract, count(*) FROM gaps WHERE reason = 'restart' AND gap_end IS NOT NULL "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert restarts == [(c.id, KILLS) for c in sim.contracts]
    check = subprocess.run(
        [RECORDER, "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout


def write_crashed_journal(data_dir: Path, frames: list[bytes], copies: int) -> int:
    """A journal as a crash leaves it: one session of ``frames`` received ``copies`` times
    over, none written to Parquet; returns the last seq."""
    seqs = SeqAllocator(data_dir)
    journal = Journal(data_dir, fsync=False, segment_bytes=32 * 1024 * 1024)
    journal.start()
    opened = {
        "event": "session_opened",
        "session": "crashed-1",
        "run": "crashed",
        "endpoint": "id",
        "contracts": ["1001"],
        "opened_at": 1_700_000_000_000_000,
    }
    journal.append(EVENT, seqs.next(), 1_700_000_000_000_000, "crashed-1", orjson.dumps(opened))
    for copy in range(copies):
        first = seqs.take(len(frames))
        journal.extend(FRAME, first, 1_700_000_000_000_000 + copy, "crashed-1", list(frames))
    journal.close()
    seqs.close()
    return seqs.last


def test_the_feed_is_recorded_while_a_crash_s_journal_is_replayed(
    simulator: Any, tmp_path: Path
) -> None:
    """A crash left 80,000 frames in the journal: the restarted recorder opens its stream
    and records it while the journal is replayed (the server never replays what it sent
    meanwhile). What came meanwhile waited in the journal behind the replayed frames: every
    frame of both is stored exactly once, and the crashed session is closed."""
    sim = simulator(contracts=6, rate=2000, keep_sent=False, seed=13)
    data_dir = tmp_path / "data"
    contracts = make_contracts(6, 3)
    feed = Subscription(Market(contracts, 3, FeedVariants()), contracts, "id", 3)
    pool = [feed.next(datetime.now(UTC)).text.encode() for _ in range(2_000)]
    crashed = 40 * len(pool)
    last_crashed_seq = write_crashed_journal(data_dir, pool, 40)
    config = journal_kept_config(tmp_path, sim)
    log_path = tmp_path / "recorder.log"
    with log_path.open("wb") as log:  # the child keeps its own copy
        proc = start_recorder(config, sim, stderr=log)
    wait_for(lambda: '"journal replayed"' in log_path.read_text(), what="the replay", timeout=120)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0

    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    replayed = next(e for e in events if e["event"] == "journal replayed")
    assert replayed["frames"] == crashed
    assert replayed["events"] == 1
    assert replayed["crashed_sessions"] == 1
    assert replayed["received_meanwhile"] > 0  # the stream was read during the replay
    frames = journaled_frames(data_dir)
    live = [r for r in frames if r.seq > last_crashed_seq]
    assert len(frames) == crashed + len(live)
    con = assert_stored_once(data_dir, frames)
    replay_end_us = datetime.fromisoformat(replayed["timestamp"]).timestamp() * 1e6
    first_live = con.execute(
        f"SELECT epoch_us(min(received_at)) FROM aggregate WHERE seq > {last_crashed_seq}"
    ).fetchone()
    assert first_live is not None
    assert first_live[0] < replay_end_us  # a frame of the new stream came during the replay
    sessions = con.execute(
        "SELECT session, reason, frames FROM sessions WHERE session = 'crashed-1'"
    ).fetchall()
    assert sessions == [("crashed-1", "crash", crashed)]
