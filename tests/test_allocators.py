"""The recorder hands freed memory back to the system (recorder.allocators).

Each case runs a fresh interpreter: DuckDB's allocator reads its options once, when the
``duckdb`` module loads, and glibc's heap must start clean. The probe measures the RSS that
freed memory leaves behind (MB): after a DuckDB sort, and after 150 freed 1 MB blocks left
below a live one in glibc's heap. Each case has its control: the same work without the
setting keeps the memory, so the probe sees what the setting gives back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from recorder.allocators import DUCKDB_ALLOCATOR_OPTIONS, DUCKDB_ALLOCATOR_VARIABLE

PROBE = """
import asyncio, os, sys
from datetime import UTC, datetime
from pathlib import Path

def rss_mb():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024

mode, data_dir = sys.argv[1], Path(sys.argv[2])
import recorder.cli
loaded_early = "duckdb" in sys.modules
if mode == "cli":
    try:
        recorder.cli.main(["query", "--data-dir", str(data_dir), "SELECT 1"])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
import duckdb
con = duckdb.connect()
con.execute("SET threads = 1")
before = rss_mb()
con.execute(
    "SELECT count(*) FROM (SELECT range::VARCHAR || repeat('x', 40) AS s "
    "FROM range(2000000) ORDER BY s DESC)"
).fetchall()
duckdb_kept = rss_mb() - before

from zoneinfo import ZoneInfo
from recorder import allocators
from recorder.config import StorageConfig
from recorder.pipeline import Pipeline
from recorder.simdata import FeedVariants, Market, Subscription, make_contracts

contracts = make_contracts(3, 7)
stream = Subscription(Market(contracts, 7, FeedVariants()), contracts, "id", 7)
storage = StorageConfig(data_dir=str(data_dir), flush_interval_seconds=3600, fsync=False)

async def main():
    zone = ZoneInfo("Asia/Tehran")
    pipeline = Pipeline(data_dir, storage, zone, zone, None)
    pipeline.start()
    await pipeline.flush()  # the writer thread and its first flush are under way before
    # glibc: freeing one 8 MB block moves its mmap threshold up, so the 1 MB blocks come
    # from the heap; all but the last are freed, below it
    big = b"x" * (8 << 20)
    del big
    before = rss_mb()
    blocks = [b"x" * (1 << 20) for _ in range(150)]
    last = blocks[-1]
    del blocks
    if mode == "trim":
        allocators.give_back()
    elif mode == "flush":
        for i in range(10):
            pipeline.on_frame("c", stream.next(datetime.now(UTC)).text, i)
        assert await pipeline.flush()
    glibc_kept = rss_mb() - before
    assert await pipeline.close()
    return glibc_kept

glibc_kept = asyncio.run(main())
print(loaded_early, os.environ.get("DUCKDB_JE_MALLOC_CONF"), duckdb_kept, glibc_kept)
"""


def _probe(tmp_path: Path, mode: str, **env: str) -> tuple[str, str, int, int]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "data").mkdir()
    environment = {k: v for k, v in os.environ.items() if k != DUCKDB_ALLOCATOR_VARIABLE}
    done = subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path / "data")],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    early, conf, duckdb_kept, glibc_kept = done.stdout.splitlines()[-1].split()
    return early, conf, int(duckdb_kept), int(glibc_kept)


def test_the_command_line_sets_duckdb_to_give_freed_memory_back(tmp_path: Path) -> None:
    early, conf, duckdb_kept, glibc_kept = _probe(tmp_path, "cli")
    assert early == "False"  # importing the command line does not load duckdb
    assert conf == DUCKDB_ALLOCATOR_OPTIONS
    assert duckdb_kept < 30
    assert glibc_kept > 100  # nothing trimmed glibc's heap in this case


def test_without_the_command_line_duckdb_keeps_freed_memory(tmp_path: Path) -> None:
    early, conf, duckdb_kept, _ = _probe(tmp_path, "library")
    assert (early, conf) == ("False", "None")
    assert duckdb_kept > 100


def test_an_allocator_setting_in_the_environment_wins(tmp_path: Path) -> None:
    own = "dirty_decay_ms:10000,muzzy_decay_ms:10000"
    _, conf, duckdb_kept, _ = _probe(tmp_path, "cli", **{DUCKDB_ALLOCATOR_VARIABLE: own})
    assert conf == own
    assert duckdb_kept > 100  # DuckDB keeps its pages, as that setting asks


def test_give_back_returns_glibcs_free_heap_blocks(tmp_path: Path) -> None:
    assert _probe(tmp_path, "trim")[3] < 20


def test_each_flush_gives_glibcs_free_heap_blocks_back(tmp_path: Path) -> None:
    assert _probe(tmp_path, "flush")[3] < 20
