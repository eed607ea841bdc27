"""The daemon as a real process: SIGTERM loses nothing, bad start-up exits 2 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import recorder
from tests.conftest import wait_for

RECORDER = str(Path(sys.executable).with_name("ime-recorder"))


def write_config(
    path: Path,
    sim: Any,
    data_dir: Path,
    contracts: list[str],
    extra: str = "",
    flush_interval: float = 0.5,
    snapshots: bool = False,
) -> Path:
    """A TOML config for ``sim`` written the way a user writes one."""
    quoted = ", ".join(f'"{c}"' for c in contracts)
    path.write_text(
        f"""
[feed]
base_url = "{sim.base_url}"
subscribe_by = "id"
contracts = [{quoted}]
reconnect_max_seconds = 0.5
snapshot_on_connect = {str(snapshots).lower()}
[auth]
token_url = "{sim.token_url}"
header_scheme = "raw"
[storage]
data_dir = "{data_dir}"
flush_interval_seconds = {flush_interval}
partition_timezone = "Asia/Tehran"
{extra}
""",
        encoding="utf-8",
    )
    return path


def recorder_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IME_RECORDER_", "HEDGETECH_"))}
    env.update(extra)
    return env


def run_until_sigterm(
    config: Path, env: dict[str, str], sim: Any, data_dir: Path, frames: int
) -> str:
    """``ime-recorder run`` until ``sim`` sent ``frames`` and a first flush is on disk, then
    SIGTERM; its stderr, once it exited 0."""
    proc = subprocess.Popen(
        [RECORDER, "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(sim.sent) >= frames, timeout=30, what=f"{frames} frames sent")
        wait_for(lambda: any(data_dir.glob("aggregate/*/*.parquet")), what="a first flush")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    return stderr


@pytest.mark.slow
def test_sigterm_mid_stream_loses_nothing_received(simulator: Any, tmp_path: Path) -> None:
    """SIGTERM while messages stream: exit 0, and every frame the server sent is a stored row."""
    sim = simulator(contracts=6, rate=1500, keep_sent=True)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "c.toml", sim, data_dir, [c.id for c in sim.contracts])
    env = recorder_env(HEDGETECH_USERNAME="demo", HEDGETECH_PASSWORD="demo")
    stderr = run_until_sigterm(config, env, sim, data_dir, frames=3000)
    sent = sim.sent
    con = recorder.connect(data_dir)
    assert con.execute("SELECT count(*), count(DISTINCT seq) FROM aggregate").fetchone() == (
        len(sent),
        len(sent),
    )
    assert con.execute("SELECT count(*) FROM contract_info").fetchone() == (len(sent),)
    assert con.execute("SELECT count(*) FROM best_limit").fetchone() == (3 * len(sent),)
    assert '"stream closed for shutdown"' in stderr
    assert "eyJ" not in stderr  # no JWT (they all start so) is ever logged


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RECORDER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "extra", "named"),
    [
        pytest.param({}, "", "HEDGETECH_USERNAME", id="no-credentials"),
        pytest.param({"HEDGETECH_USERNAME": "demo"}, "", "HEDGETECH_PASSWORD", id="no-password"),
        pytest.param({"HEDGETECH_TOKEN": "t0k3n"}, "colour = 1", "colour", id="unknown-key"),
        pytest.param(
            {"HEDGETECH_TOKEN": "t0k3n", "IME_RECORDER_STORAGE__FLUSH_INTERVAL_SECONDS": "soon"},
            "",
            "storage.flush_interval_seconds",
            id="bad-env-value",
        ),
        pytest.param(
            {"HEDGETECH_TOKEN": "t0k3n", "IME_RECORDER_FEED__SUBSCRIBE_BY": "isin"},
            "",
            "feed.subscribe_by",
            id="bad-literal",
        ),
        pytest.param(
            {"HEDGETECH_TOKEN": "t0k3n", "IME_RECORDER_STORAGE__PARTITION_TIMEZONE": "Mars/Base"},
            "",
            "storage.partition_timezone",
            id="bad-zone",
        ),
        pytest.param(
            {"HEDGETECH_TOKEN": "t0k3n", "IME_RECORDER_FEED__WHAT": "1"},
            "",
            "IME_RECORDER_FEED__WHAT",
            id="unknown-env-key",
        ),
    ],
)
def test_wrong_start_up_exits_2_with_one_line_naming_it(
    simulator: Any, tmp_path: Path, env: dict[str, str], extra: str, named: str
) -> None:
    """A wrong or missing key, value or credential stops start-up with one line and exit code 2."""
    sim = simulator(contracts=2, rate=10)
    config = write_config(tmp_path / "c.toml", sim, tmp_path / "data", ["1001"], extra)
    result = _run(["run", "--config", str(config)], recorder_env(**env), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "t0k3n" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_refused_login_exits_2_naming_user_and_url_never_the_password(
    simulator: Any, tmp_path: Path
) -> None:
    """A wrong password: exit 2 with a line naming the user and the token URL, not the password."""
    sim = simulator(contracts=2, rate=10)
    config = write_config(tmp_path / "c.toml", sim, tmp_path / "data", ["1001"])
    env = recorder_env(HEDGETECH_USERNAME="alice", HEDGETECH_PASSWORD="s3cret-pa55")
    result = _run(["run", "--config", str(config)], env, tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ime-recorder: login refused for user 'alice'")
    assert sim.token_url in last
    assert "HTTP 401" in last
    assert "s3cret-pa55" not in result.stderr + result.stdout
    assert sim.stats()["connections_accepted"] == 0


def test_config_file_and_environment_feed_a_real_recording(simulator: Any, tmp_path: Path) -> None:
    """Environment overrides win over the file: contracts and data_dir come from IME_RECORDER_*."""
    sim = simulator(contracts=4, rate=0, max_messages=25, keep_sent=True)
    data_dir = tmp_path / "from-env"
    config = write_config(tmp_path / "c.toml", sim, tmp_path / "from-file", ["9999"])
    env = recorder_env(
        HEDGETECH_USERNAME="demo",
        HEDGETECH_PASSWORD="demo",
        IME_RECORDER_FEED__CONTRACTS="1002,1003",
        IME_RECORDER_STORAGE__DATA_DIR=str(data_dir),
    )
    proc = subprocess.Popen(
        [RECORDER, "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(sim.sent) == 25, what="25 frames sent")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0
    con = recorder.connect(data_dir)
    rows = con.execute(
        "SELECT contract, count(*) FROM aggregate GROUP BY ALL ORDER BY 1"
    ).fetchall()
    sent = sorted({f.contract_id for f in sim.sent})
    assert sent == ["1002", "1003"]
    assert sum(n for _, n in rows) == 25
    assert [c for c, _ in rows] == sent
    assert not (tmp_path / "from-file").exists()


def test_query_command_prints_csv_and_json(simulator: Any, tmp_path: Path) -> None:
    """`ime-recorder query` runs SQL on the views in every output format."""
    from tests.conftest import make_config, record_until

    sim = simulator(contracts=2, rate=0, max_messages=10, keep_sent=True)
    record_until(make_config(sim, tmp_path), lambda r: r.pipeline.stats.frames == 10)
    sql = "SELECT contract, count(*) AS n FROM contract_info GROUP BY 1 ORDER BY 1"
    expected: dict[str, int] = {}
    for frame in sim.sent:
        expected[frame.contract_id] = expected.get(frame.contract_id, 0) + 1
    csv_out = _run(
        ["query", "--data-dir", str(tmp_path), "--format", "csv", sql], recorder_env(), tmp_path
    )
    assert csv_out.returncode == 0, csv_out.stderr
    assert csv_out.stdout.splitlines() == [
        "contract,n",
        *(f"{c},{n}" for c, n in sorted(expected.items())),
    ]
    json_out = _run(
        ["query", "--data-dir", str(tmp_path), "--format", "json", sql], recorder_env(), tmp_path
    )
    assert json_out.stdout.splitlines() == [
        f'{{"contract":"{c}","n":{n}}}' for c, n in sorted(expected.items())
    ]
    table_out = _run(["query", "--data-dir", str(tmp_path), sql], recorder_env(), tmp_path)
    assert f"({len(expected)} rows)" in table_out.stdout
    bad = _run(
        ["query", "--data-dir", str(tmp_path), "SELECT nope FROM aggregate"],
        recorder_env(),
        tmp_path,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("ime-recorder: query failed")
