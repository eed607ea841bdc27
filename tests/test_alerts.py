"""The example alert rules: valid, unit-tested by promtool, and naming only real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_config
from tests.test_metrics import Endpoint, record_with_metrics, with_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RULES = CONFIGS / "alerts.yml"
#: what Prometheus itself adds to every target
SCRAPE_METRICS = frozenset(("up",))
#: alerts that README.md's runbook must explain, one section each
EXPECTED = {
    "IMERecorderDown",
    "IMERecorderFeedStale",
    "IMERecorderNotReady",
    "IMERecorderRefusals",
    "IMERecorderFlushFailing",
    "IMERecorderDiskLow",
    "IMERecorderJournalBacklogGrowing",
}


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def promtool() -> str | None:
    """promtool from the virtualenv (`make promtool` puts it there) or the PATH."""
    beside = Path(sys.executable).with_name("promtool")
    return str(beside) if beside.is_file() else shutil.which("promtool")


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    """Each rule is an alert with a severity, a summary and a README anchor that exists."""
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", readme, re.M)
    }
    found = rules()
    assert {r["alert"] for r in found} == EXPECTED
    for rule in found:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        anchor = rule["annotations"]["runbook"].removeprefix("README.md#")
        assert anchor == rule["alert"].lower()
        assert anchor in headings, f"README.md has no section {rule['alert']}"


def test_alert_expressions_name_only_metrics_the_daemon_exports(
    simulator: Any, tmp_path: Path
) -> None:
    """Every ime_recorder_* name in an expression is exported by a live recorder."""
    sim = simulator(contracts=2, rate=0, max_messages=20)
    config = with_metrics(make_config(sim, tmp_path))
    text: list[str] = []

    async def scrape(endpoint: Endpoint) -> None:
        async def flushed() -> bool:
            return endpoint.recorder.pipeline.stats.files_written > 0

        await endpoint.until(flushed, what="a first flush")
        status, body = await endpoint.get("/metrics")
        assert status == 200
        text.append(body)

    record_with_metrics(config, scrape)
    exported = set(re.findall(r"^# TYPE (\S+) ", text[0], re.M))
    exported |= {
        line.split("{")[0].split(" ")[0] for line in text[0].splitlines() if line[:1] != "#"
    }
    used: set[str] = set()
    for rule in rules():
        names = set(re.findall(r"\b(ime_recorder_[a-z_]+|up)\b(?!\s*\()", rule["expr"]))
        assert names, rule["alert"]
        used |= names
    assert used - exported - SCRAPE_METRICS == set()
    assert "ime_recorder_seconds_since_last_message" in exported


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (make promtool)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    """`promtool check rules` accepts the file and `promtool test rules` passes its tests."""
    tool = promtool()
    assert tool is not None
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in check.stdout
    unit = subprocess.run(
        [tool, "test", "rules", str(CONFIGS / "alerts.test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout
