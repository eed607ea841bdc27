"""`ime-recorder status` and `verify`: received = stored + quarantined, and what breaks it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import recorder
from recorder.accounting import status, verify
from recorder.catalog import table_files
from recorder.schema import TABLES
from tests.conftest import make_config, record_until
from tests.test_daemon import RECORDER


def _record(simulator: Any, data_dir: Path, **options: Any) -> Any:
    sim = simulator(contracts=3, rate=0, max_messages=200, keep_sent=True, **options)
    config = make_config(sim, data_dir, storage={"flush_interval_seconds": 0.1})
    config = type(config)(
        feed=config.feed,
        auth=config.auth,
        storage=config.storage,
        journal=type(config.journal)(retention_days=1),
    )
    record_until(config, lambda r: r.pipeline.stats.frames == 200)
    return sim


def test_status_balances_received_with_stored_and_quarantined(
    simulator: Any, tmp_path: Path
) -> None:
    """After a recording with 5% bad frames, received = stored + quarantined, per contract too."""
    sim = _record(simulator, tmp_path, malformed=0.05, seed=5)
    counts = status(tmp_path)
    bad = sum(1 for f in sim.sent if f.fault)
    assert bad > 0
    assert (counts.received, counts.stored, counts.quarantined) == (200, 200 - bad, bad)
    assert counts.balanced
    assert counts.open_sessions == 0
    per_contract = {c["contract"]: c["messages"] for c in counts.contracts}
    good: dict[str, int] = {}
    for frame in sim.sent:
        if not frame.fault:
            good[frame.contract_id] = good.get(frame.contract_id, 0) + 1
    assert per_contract == good
    assert all(c["aggregate"] == c["messages"] for c in counts.contracts)
    result = subprocess.run(
        [RECORDER, "status", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"frames received 200 = stored {200 - bad} + quarantined {bad}: holds" in result.stdout


def test_verify_passes_on_a_clean_recording_and_fails_on_a_lost_file(
    simulator: Any, tmp_path: Path
) -> None:
    """verify exits 0 on a clean store, and non-zero once a file of journaled frames is gone."""
    _record(simulator, tmp_path)
    clean = subprocess.run(
        [RECORDER, "verify", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stdout
    assert clean.stdout.strip().endswith("200 journaled frames checked: OK")
    victim = sorted(table_files(tmp_path, TABLES["contract_info"]))[0]  # a day file, as flushed
    lost = (
        recorder.connect(tmp_path)
        .execute(f"SELECT count(*) FROM read_parquet('{victim}')")
        .fetchall()[0][0]
    )
    victim.unlink()
    broken = verify(tmp_path)
    assert not broken.ok
    (problem,) = broken.problems
    assert problem.startswith(f"contract_info: {lost} journaled frames without exactly their rows")
    failed = subprocess.run(
        [RECORDER, "verify", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert "PROBLEM: contract_info:" in failed.stdout


def test_verify_reports_a_duplicated_file(simulator: Any, tmp_path: Path) -> None:
    """A Parquet file copied under a second name shows up as rows stored more than once."""
    _record(simulator, tmp_path)
    original = sorted(table_files(tmp_path, TABLES["aggregate"]))[0]
    rows = (
        recorder.connect(tmp_path)
        .execute(f"SELECT count(*) FROM read_parquet('{original}')")
        .fetchall()[0][0]
    )
    shutil.copy(original, original.with_name("99999999999999999999-99999999999999999999.parquet"))
    result = verify(tmp_path)
    assert result.problems[0] == f"aggregate: {rows} rows stored more than once"
    assert result.problems[1].startswith(
        f"aggregate: {rows} journaled frames without exactly their rows"
    )
    assert len(result.problems) == 2
