"""The once-a-minute warning (recorder.logs.Muted) that quarantine, flush, decode and journal
failures go through."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from recorder.logs import Muted


def test_a_kind_is_said_once_a_minute_and_kinds_apart() -> None:
    """Warnings of one kind within a minute of the last one said are muted; another kind is
    said at once; a minute later the first kind is said again, with its own fields."""
    now = [1_000.0]
    muted = Muted(structlog.get_logger("test"), clock=lambda: now[0])
    with capture_logs() as logs:
        muted.warning("flush", "flush failed", attempt=1)
        now[0] += 59.0
        muted.warning("flush", "flush failed", attempt=2)
        muted.warning("journal", "journal write failed", attempt=3)
        now[0] += 1.0
        muted.warning("flush", "flush failed", attempt=4)
        muted.warning("journal", "journal write failed", attempt=5)
    said = [(e["event"], e["attempt"], e["log_level"]) for e in logs]
    assert said == [
        ("flush failed", 1, "warning"),
        ("journal write failed", 3, "warning"),
        ("flush failed", 4, "warning"),
    ]
    assert {e["note"] for e in logs} == {"repeats of this kind are muted for a minute"}
