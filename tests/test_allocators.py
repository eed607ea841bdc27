"""The daemon hands glibc's free heap blocks back to the system (recorder.allocators).

Each case runs a fresh interpreter, so glibc's heap starts clean. The probe frees 250 blocks
of 1 MB left below a live one in the heap, then measures the RSS they leave behind (MB). The
control does the same and nothing else: the probe sees the memory that is given back. A
flush keeps some memory of its own (DuckDB's and Arrow's, 10-25 MB), hence its bound.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import asyncio, sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from recorder import allocators
from recorder.config import StorageConfig
from recorder.pipeline import Pipeline
from recorder.simcontracts import FeedVariants, make_contracts
from recorder.simmarket import Market, Subscription

def rss_mb():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024

mode, data_dir = sys.argv[1], Path(sys.argv[2])
contracts = make_contracts(3, 7)
stream = Subscription(Market(contracts, 7, FeedVariants()), contracts, "id", 7)
# a flush trims at most once a flush interval: this one passes before the flush below
storage = StorageConfig(data_dir=str(data_dir), flush_interval_seconds=0.2, fsync=False)

async def main():
    zone = ZoneInfo("Asia/Tehran")
    pipeline = Pipeline(data_dir, storage, zone, zone, None)
    pipeline.start()
    await pipeline.flush()  # the writer thread and its first flush are done before
    # freeing one 8 MB block moves glibc's mmap threshold up, so the 1 MB blocks come from
    # the heap; all but the last are freed, below it
    big = b"x" * (8 << 20)
    del big
    before = rss_mb()
    blocks = [b"x" * (1 << 20) for _ in range(250)]
    last = blocks[-1]
    del blocks
    if mode == "give_back":
        assert allocators.give_back()
    elif mode == "flush":
        await asyncio.sleep(0.3)
        for i in range(10):
            pipeline.on_frame("c", stream.next(datetime.now(UTC)).text, i)
        assert await pipeline.flush()
    kept = rss_mb() - before
    assert await pipeline.close()
    return kept

print(asyncio.run(main()))
"""


def _kept_mb(tmp_path: Path, mode: str) -> int:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "data").mkdir()
    done = subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.splitlines()[-1])


def test_freed_heap_blocks_stay_in_the_rss_by_themselves(tmp_path: Path) -> None:
    """Without a trim, glibc keeps the 250 MB of freed blocks in the RSS."""
    assert _kept_mb(tmp_path, "control") > 200


def test_give_back_returns_glibcs_free_heap_blocks(tmp_path: Path) -> None:
    """give_back() returns the freed blocks' pages to the system."""
    assert _kept_mb(tmp_path, "give_back") < 20


def test_a_flush_gives_glibcs_free_heap_blocks_back(tmp_path: Path) -> None:
    """A flush, a flush interval after the last trim, returns them too."""
    assert _kept_mb(tmp_path, "flush") < 60
