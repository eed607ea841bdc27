"""The sessions and gaps views say what happened to the feed, scenario by scenario."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

import recorder
from tests.conftest import make_config, record_until
from tests.test_daemon import RECORDER, recorder_env, write_config


def _views(data_dir: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    con = recorder.connect(data_dir)
    sessions = con.execute(
        "SELECT contracts, close_code, reason, frames, stale, opened_at, closed_at "
        "FROM sessions ORDER BY opened_at"
    ).fetchall()
    gaps = con.execute(
        "SELECT contract, reason, gap_start, gap_end FROM gaps ORDER BY contract, gap_start"
    ).fetchall()
    return sessions, gaps


def test_server_close_1011_is_a_session_end_and_a_disconnect_gap(
    simulator: Any, tmp_path: Path
) -> None:
    """A 1011 close gives a session closed with 1011 and one disconnect gap per contract."""
    sim = simulator(contracts=3, rate=300)
    closed: list[bool] = []

    def close_once(rec: Any) -> None:
        if not closed and rec.pipeline.stats.frames >= 60:
            closed.append(True)
            sim.close_all(1011, "redis stream interrupted")

    rec = record_until(
        make_config(sim, tmp_path),
        lambda r: bool(closed) and r.connections[0].stats.sessions >= 2,
        during=close_once,
    )
    sessions, gaps = _views(tmp_path)
    contracts = ["1001", "1002", "1003"]
    assert [(s[0], s[1], s[2]) for s in sessions] == [
        (contracts, 1011, "redis stream interrupted"),
        (contracts, 1000, "shutdown"),
    ]
    assert sum(s[3] for s in sessions) == rec.pipeline.stats.frames
    first, second = sessions
    disconnects = [(c, first[6], second[5]) for c in contracts]
    assert [(g[0], g[2], g[3]) for g in gaps if g[1] == "disconnect"] == disconnects
    assert [(g[0], g[1], g[3]) for g in gaps if g[1] != "disconnect"] == [
        (c, "restart", None) for c in contracts
    ]


@pytest.mark.parametrize("mode", ["403", "1008"])
def test_unknown_contract_is_a_rejected_gap_and_the_rest_is_recorded(
    simulator: Any, tmp_path: Path, mode: str
) -> None:
    """One unknown contract among valid ones: a rejection row and an open rejected gap for it."""
    sim = simulator(contracts=3, rate=200, refuse_with=mode)
    frames_then: list[int] = []

    def note_rejection(rec: Any) -> None:
        if not frames_then and rec.connections[0].stats.rejected and rec.connections[0].stats.open:
            frames_then.append(rec.pipeline.stats.frames)

    rec = record_until(
        make_config(sim, tmp_path, ["1001", "9999", "1002"]),
        lambda r: bool(frames_then) and r.pipeline.stats.frames >= frames_then[0] + 100,
        during=note_rejection,
    )
    assert rec.connections[0].contracts == ("1001", "1002")
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT contract FROM rejections").fetchall() == [("9999",)]
    received = con.execute("SELECT DISTINCT contract FROM aggregate ORDER BY 1").fetchall()
    assert received == [("1001",), ("1002",)]
    _, gaps = _views(tmp_path)
    open_for_9999 = [(g[1], g[3]) for g in gaps if g[0] == "9999"]
    assert open_for_9999 == [("rejected", None)]


def test_stale_watchdog_gap(simulator: Any, tmp_path: Path) -> None:
    """A silent stream closed by the watchdog leaves a gap with reason stale."""
    sim = simulator(contracts=2, rate=200)
    paused: list[bool] = []

    def pause_once(rec: Any) -> None:
        if not paused and rec.pipeline.stats.frames >= 40:
            paused.append(True)
            sim.pause()
        elif paused and rec.connections[0].stats.stale_closes >= 1:
            sim.resume()

    record_until(
        make_config(sim, tmp_path, feed={"stale_after_seconds": 0.4}),
        lambda r: r.connections[0].stats.stale_closes >= 1 and r.connections[0].stats.open,
        during=pause_once,
    )
    sessions, gaps = _views(tmp_path)
    assert [s[4] for s in sessions] == [True, False]
    assert [(g[0], g[1]) for g in gaps if g[3] is not None] == [
        ("1001", "stale"),
        ("1002", "stale"),
    ]


def test_every_contract_refused_exits_2_with_one_line(simulator: Any, tmp_path: Path) -> None:
    """When the server refuses every subscription, the daemon exits 2 naming user and endpoint."""
    sim = simulator(contracts=2, rate=10, username="alice", password="wonderland")
    config = write_config(tmp_path / "c.toml", sim, tmp_path / "data", ["8888", "9999"])
    env = recorder_env(HEDGETECH_USERNAME="alice", HEDGETECH_PASSWORD="wonderland")
    result = subprocess.run(
        [RECORDER, "run", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ime-recorder: ")
    assert "user 'alice'" in last
    assert "wonderland" not in result.stderr
    assert "/live/data/websocket/contract/id" in last
    assert "1008" in last
    assert sum(sim.stats()["refusals"].values()) <= 8
    con = recorder.connect(tmp_path / "data")
    assert sorted(con.execute("SELECT contract FROM rejections").fetchall()) == [
        ("8888",),
        ("9999",),
    ]
