"""``ime-recorder demo``, what ``make run`` starts: the simulator and the recorder side by side."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from recorder.catalog import connect
from recorder.config import AuthConfig, Config, Credentials, FeedConfig, Secret, StorageConfig
from recorder.daemon import Recorder, install_stop_signals, record
from recorder.simulator import Simulator, SimulatorOptions

EXAMPLE_SQL = (
    "SELECT contract, count(*) AS messages, min(exchange_ts) AS first, "
    "max(exchange_ts) AS last, arg_max(last_price, seq) AS last_price "
    "FROM aggregate GROUP BY contract ORDER BY contract LIMIT 5"
)


def _progress(recorder: Recorder, rate: float) -> Text:
    stats = recorder.pipeline.stats
    rows = sum(stats.rows_written.values())
    flushed = (
        f"{time.time() - stats.last_flush_at:4.1f} s ago" if stats.last_flush_at else "not yet"
    )
    open_ = sum(c.stats.open for c in recorder.connections)
    return Text.assemble(
        ("● recording ", "bold green"),
        f"{len(recorder.config.feed.contracts)} contracts on {open_} connection(s) │ ",
        (f"{rate:8,.0f} msg/s", "bold"),
        f" │ frames {stats.frames:,} │ rows written {rows:,} │ buffered "
        f"{recorder.pipeline.rows_buffered:,} │ files {stats.files_written:,}",
        f" │ last flush {flushed} │ Ctrl-C to stop",
    )


async def _watch(recorder: Recorder, stop: asyncio.Event, seconds: float | None) -> None:
    console = Console(stderr=True)
    started = time.monotonic()
    last_frames, last_at, rate = 0, started, 0.0
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            now = time.monotonic()
            frames = recorder.pipeline.stats.frames
            rate = (frames - last_frames) / max(now - last_at, 1e-6)
            last_frames, last_at = frames, now
            live.update(_progress(recorder, rate))
            if seconds is not None and now - started >= seconds:
                stop.set()


async def _demo(
    data_dir: Path, contracts: int, rate: float, flush_interval: float, seconds: float | None
) -> int:
    simulator = Simulator(SimulatorOptions(contracts=contracts, rate=rate))
    await simulator.start()
    config = Config(
        feed=FeedConfig(
            base_url=simulator.base_url, contracts=tuple(c.id for c in simulator.contracts)
        ),
        auth=AuthConfig(token_url=simulator.token_url),
        storage=StorageConfig(data_dir=str(data_dir), flush_interval_seconds=flush_interval),
    )
    credentials = Credentials(username="demo", password=Secret("demo"))
    stop = asyncio.Event()
    install_stop_signals(stop)
    watchers: list[asyncio.Task[None]] = []
    print(f"simulator on {simulator.base_url}; recording into {data_dir}/", file=sys.stderr)

    def start_watch(recorder: Recorder) -> None:
        watchers.append(asyncio.create_task(_watch(recorder, stop, seconds)))

    try:
        await record(config, credentials, stop, on_start=start_watch)
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await simulator.stop()
    return 0


def run_demo(
    data_dir: Path, contracts: int, rate: float, flush_interval: float, seconds: float | None
) -> int:
    """Record from the built-in simulator until Ctrl-C, then show an example query."""
    code = asyncio.run(_demo(data_dir, contracts, rate, flush_interval, seconds))
    from recorder.cli import write_result

    print(f'\nExample query (run it again: ime-recorder query --data-dir {data_dir} "..."):')
    print(f"  {EXAMPLE_SQL}\n")
    result = connect(data_dir).execute(EXAMPLE_SQL)
    write_result([d[0] for d in result.description or []], result.fetchall(), "table")
    return code
