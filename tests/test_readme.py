"""The README's example queries run and return rows on a real recording."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import recorder
from tests.conftest import make_config, record_until

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_queries_return_rows(simulator: Any, tmp_path: Path) -> None:
    """Each statement of the README's SQL example block returns at least one row."""
    sim = simulator(contracts=3, rate=0, max_messages=60)
    record_until(make_config(sim, tmp_path), lambda r: r.pipeline.stats.frames == 60)
    con = recorder.connect(tmp_path)
    (day,) = con.execute("SELECT min(date) FROM aggregate").fetchone()
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    block = next(b for b in blocks if "-- 1." in b)
    statements = [s for s in block.split(";") if s.strip()]
    assert len(statements) == 3
    for statement in statements:
        sql = statement.replace("DATE '2026-05-29'", f"DATE '{day.isoformat()}'")
        assert con.execute(sql).fetchall(), sql
