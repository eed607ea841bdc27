"""Shared fixtures: a real simulator over loopback and a recorder run in the test's own loop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from recorder.config import (
    AuthConfig,
    Config,
    Credentials,
    FeedConfig,
    MetricsConfig,
    Secret,
    StorageConfig,
)
from recorder.daemon import Recorder, record
from recorder.simrunner import SimulatorThread
from recorder.simulator import SimulatorOptions

DEMO = Credentials(username="demo", password=Secret("demo"))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without IME_RECORDER_* or HEDGETECH_* variables from the outside."""
    for name in list(os.environ):
        if name.startswith(("IME_RECORDER_", "HEDGETECH_")):
            monkeypatch.delenv(name)


@pytest.fixture
def simulator() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators with the given options; all are stopped after the test."""
    started: list[SimulatorThread] = []

    def start(**options: Any) -> SimulatorThread:
        sim = SimulatorThread(SimulatorOptions(**options))
        sim.__enter__()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.__exit__(None, None, None)


def make_config(
    sim: SimulatorThread,
    data_dir: Path,
    contracts: list[str] | None = None,
    *,
    subscribe_by: str = "id",
    feed: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
) -> Config:
    """A config that records from ``sim`` into ``data_dir`` (every contract by default)."""
    if contracts is None:
        contracts = [c.id if subscribe_by == "id" else c.name for c in sim.contracts]
    return Config(
        feed=FeedConfig(
            base_url=sim.base_url,
            subscribe_by=subscribe_by,  # type: ignore[arg-type]
            contracts=tuple(contracts),
            **{"reconnect_max_seconds": 0.5, "snapshot_on_connect": False, **(feed or {})},
        ),
        auth=AuthConfig(token_url=sim.token_url),
        metrics=MetricsConfig(port=0),  # any free port: tests run side by side
        storage=StorageConfig(
            **{
                "data_dir": str(data_dir),
                "flush_interval_seconds": 0.3,
                "fsync": False,
                **(storage or {}),
            }
        ),
    )


def record_until(
    config: Config,
    condition: Callable[[Recorder], bool],
    *,
    credentials: Credentials = DEMO,
    timeout: float = 30.0,
    during: Callable[[Recorder], None] | None = None,
) -> Recorder:
    """Record until ``condition`` holds (polled), then stop gracefully; fails after ``timeout``."""
    holder: dict[str, Recorder] = {}
    met = False

    async def main() -> None:
        nonlocal met
        stop = asyncio.Event()

        async def watch(recorder: Recorder) -> None:
            nonlocal met
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if during is not None:
                    during(recorder)
                if condition(recorder):
                    met = True
                    break
                await asyncio.sleep(0.02)
            stop.set()

        tasks: list[asyncio.Task[None]] = []

        def on_start(recorder: Recorder) -> None:
            holder["recorder"] = recorder
            tasks.append(asyncio.create_task(watch(recorder)))

        await record(config, credentials, stop, on_start=on_start)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert met, f"condition not met within {timeout} s"
    return holder["recorder"]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout} s")
