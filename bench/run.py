"""``make bench``: every part in turn (each in its own process), then the results table."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import OUT, PYTHON, REPO, log

PARTS = ("throughput", "memory", "latency", "size", "queries", "restart")


def code_version() -> str:
    """The commit measured, and whether recorder/ differed from it."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", "recorder", "schemas"],
        capture_output=True,
        text=True,
    )
    dirty = " + uncommitted changes in recorder/" if status.stdout.strip() else ""
    return (head.stdout.strip() or "unknown") + dirty


def main() -> int:
    began = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob("*.json"):
        stale.unlink()
    versions = {"start": code_version()}
    failed = []
    for part in PARTS:
        log(f"part {part}")
        if subprocess.run([PYTHON, "-m", f"bench.{part}"], cwd=REPO, check=False).returncode:
            failed.append(part)
            log(f"part {part} FAILED (its row says 'not measured')")
    seconds = time.monotonic() - began
    versions["end"] = code_version()
    (OUT / "run.json").write_text(json.dumps(versions), encoding="utf-8")
    subprocess.run([PYTHON, "-m", "bench.report", "--seconds", str(seconds)], cwd=REPO, check=True)
    log(f"the suite took {seconds / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
