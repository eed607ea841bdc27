"""Metrics, /healthz and /readyz of a recording from the simulator, scraped over loopback."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from recorder import healthcheck, metrics
from recorder.config import Config, MetricsConfig
from recorder.daemon import Recorder, record
from recorder.schema import TABLES
from recorder.simrunner import SimulatorThread
from recorder.simulator import SimulatorOptions
from tests.conftest import DEMO, make_config, record_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Endpoint:
    """The metrics server of a running recorder, read with a real HTTP client."""

    def __init__(self, http: aiohttp.ClientSession, recorder: Recorder) -> None:
        assert recorder.metrics is not None
        assert recorder.metrics.port is not None
        self.http = http
        self.recorder = recorder
        self.port = recorder.metrics.port
        self.base = f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.base + path) as response:
            return response.status, await response.text()

    async def samples(self) -> Samples:
        status, text = await self.get("/metrics")
        assert status == 200
        return parse(text)

    async def until(
        self, check: Callable[[], Awaitable[bool]], within: float = 20.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what or 'condition'} not met within {within} s")


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def with_metrics(config: Config, port: int = 0) -> Config:
    """``config`` serving metrics on ``port`` (0: any free port, read from the recorder)."""
    return msgspec.structs.replace(config, metrics=MetricsConfig(port=port))


def record_with_metrics(
    config: Config, scenario: Callable[[Endpoint], Awaitable[None]], timeout: float = 40.0
) -> Recorder:
    """Record while ``scenario`` runs against the metrics endpoint, then stop gracefully."""
    holder: list[Recorder] = []

    async def main() -> None:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        async def run(recorder: Recorder) -> None:
            try:
                async with aiohttp.ClientSession() as http:
                    await asyncio.wait_for(scenario(Endpoint(http, recorder)), timeout)
            finally:
                stop.set()

        def on_start(recorder: Recorder) -> None:
            holder.append(recorder)
            tasks.append(asyncio.create_task(run(recorder)))

        await record(config, DEMO, stop, on_start=on_start)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return holder[0]


def stored(data_dir: Path) -> tuple[dict[str, int], int]:
    """Rows per table and the number of files, read from the Parquet files themselves."""
    rows: dict[str, int] = {}
    files = 0
    for table in TABLES:
        for path in (data_dir / table).rglob("*.parquet"):
            if not path.name.startswith("."):
                rows[table] = rows.get(table, 0) + pq.read_metadata(path).num_rows
                files += 1
    return rows, files


@pytest.mark.slow
def test_counters_match_the_rows_stored(simulator: Any, tmp_path: Path) -> None:
    """After a flush, frames, rows per table, quarantine and files equal what is on disk."""
    sim = simulator(contracts=4, rate=0, max_messages=60, keep_sent=True, malformed=0.1)
    config = with_metrics(make_config(sim, tmp_path, feed={"max_contracts_per_connection": 2}))
    seen: dict[str, Any] = {}

    async def scenario(endpoint: Endpoint) -> None:
        pipeline = endpoint.recorder.pipeline

        async def settled() -> bool:
            if pipeline.stats.frames < 120 or pipeline.rows_buffered:
                return False
            samples = await endpoint.samples()
            rows, files = stored(tmp_path)
            if rows.get("aggregate", 0) + rows.get("quarantine", 0) < 120:
                return False  # a flush is still writing (its rows left the buffer already)
            seen.update(samples=samples, rows=rows, files=files)
            written = {
                dict(labels)["table"]: v
                for (name, labels), v in samples.items()
                if name == "ime_recorder_rows_written_total" and v
            }
            return written == rows and value(samples, "ime_recorder_files_written_total") == files

        await endpoint.until(settled, what="metrics equal to the files on disk")

    record_with_metrics(config, scenario)
    samples, rows = seen["samples"], seen["rows"]
    sent = sim.sent
    malformed = sum(1 for f in sent if f.fault is not None)
    assert len(sent) == 120
    assert 0 < malformed < 120
    assert value(samples, "ime_recorder_frames_received_total") == 120
    assert value(samples, "ime_recorder_frames_quarantined_total") == malformed
    assert rows["quarantine"] == malformed
    assert rows["aggregate"] == rows["contract_info"] == 120 - malformed
    assert rows["best_limit"] == 3 * (120 - malformed)
    assert rows["session_log"] == 2  # one opened row per connection
    for table in TABLES:  # every table is exported, with 0 until it has rows
        assert value(samples, "ime_recorder_rows_written_total", table=table) == rows.get(table, 0)
    assert value(samples, "ime_recorder_files_written_total") == seen["files"]
    assert value(samples, "ime_recorder_connections") == 2
    assert value(samples, "ime_recorder_connections_open") == 2
    assert value(samples, "ime_recorder_streams_opened_total") == 2
    assert value(samples, "ime_recorder_logins_total", outcome="ok") == 1
    assert value(samples, "ime_recorder_refusals_total") == 0
    assert value(samples, "ime_recorder_rows_buffered") == 0
    assert value(samples, "ime_recorder_frames_decoded_in_bulk_total") == 120 - malformed
    assert value(samples, "ime_recorder_reader_pauses_total") == 0
    assert value(samples, "ime_recorder_readers_paused") == 0
    assert value(samples, "ime_recorder_journal_replaying") == 0  # no journal was left
    assert value(samples, "ime_recorder_last_flush_ok") == 1
    assert value(samples, "ime_recorder_ready") == 1
    assert value(samples, "ime_recorder_journal_write_failing") == 0
    assert value(samples, "ime_recorder_journal_segments") >= 1
    flushes = value(samples, "ime_recorder_flushes_total")
    assert flushes >= 1
    assert value(samples, "ime_recorder_flush_duration_seconds_count") == flushes
    ages = {
        dict(labels)["contract"]: v
        for (name, labels), v in samples.items()
        if name == "ime_recorder_seconds_since_last_message"
    }
    assert set(ages) == {f.contract_id for f in sent if f.fault is None}
    assert all(0 <= age < 30 for age in ages.values())
    fs = os.statvfs(tmp_path)
    free = value(samples, "ime_recorder_data_volume_free_bytes")
    assert abs(free - fs.f_bavail * fs.f_frsize) < 512 * 1024 * 1024
    assert value(samples, "ime_recorder_data_volume_size_bytes") == fs.f_blocks * fs.f_frsize
    info = value(
        samples,
        "ime_recorder_build_info",
        version=metadata.version("ime-recorder"),
        python=platform.python_version(),
    )
    assert info == 1


@pytest.mark.slow
def test_readyz_is_503_while_the_server_is_down_and_200_after_it_returns(
    simulator: Any, tmp_path: Path
) -> None:
    """Simulator stopped: /readyz 503 naming the connection, /healthz still 200; back: 200."""
    first = SimulatorThread(SimulatorOptions(contracts=2, rate=50)).__enter__()
    config = with_metrics(make_config(first, tmp_path))
    answers: dict[str, Any] = {"stopped": False}

    async def scenario(endpoint: Endpoint) -> None:
        async def ready(expected: int) -> bool:
            status, body = await endpoint.get("/readyz")
            answers[expected] = body
            return status == expected

        async def connect_failed() -> bool:
            samples = await endpoint.samples()
            return value(samples, "ime_recorder_reconnects_total", reason="connect_failed") > 0

        await endpoint.until(lambda: ready(200), what="/readyz 200 at start")
        await asyncio.to_thread(first.__exit__, None, None, None)
        answers["stopped"] = True
        await endpoint.until(lambda: ready(503), what="/readyz 503 with the server down")
        await endpoint.until(connect_failed, what="a reconnect to the closed port")
        answers["healthz"] = await endpoint.get("/healthz")
        own = tmp_path / "metrics.toml"  # the HEALTHCHECK command, pointed at this port
        own.write_text(f"[metrics]\nport = {endpoint.port}\n")
        for path in ("/healthz", "/readyz"):
            check = ["--config", str(own), "--path", path]
            answers[f"check {path}"] = await asyncio.to_thread(healthcheck.main, check)
        answers["down"] = await endpoint.samples()
        await asyncio.to_thread(simulator, contracts=2, rate=50, port=first.port)

        async def back() -> bool:
            # the new server accepts the old token's stream, then refuses it (1008): 200 counts
            # only together with the login that follows
            if not await ready(200):
                return False
            samples = answers["back"] = await endpoint.samples()
            relogged = value(samples, "ime_recorder_logins_total", outcome="ok") == 2
            return relogged and value(samples, "ime_recorder_ready") == 1

        await endpoint.until(back, what="/readyz 200 once the server is back")

    try:
        record_with_metrics(config, scenario)
    finally:
        if not answers["stopped"]:
            first.__exit__(None, None, None)
    down = msgspec.json.decode(answers[503])
    assert down["ready"] is False
    (connection,) = down["connections"]
    assert down["connections"] == {connection: False}
    assert down["reasons"][0].startswith(f"connection {connection} is not open")
    assert answers["healthz"][0] == 200
    assert answers["check /healthz"] == 0
    assert answers["check /readyz"] == 1
    assert value(answers["down"], "ime_recorder_connections_open") == 0
    assert value(answers["down"], "ime_recorder_ready") == 0
    back = answers["back"]
    assert msgspec.json.decode(answers[200])["ready"] is True
    assert value(back, "ime_recorder_connections_open") == 1
    # the server said 1001 going away, then its port refused connections; the new server did
    # not know the old token (close 1008), so the recorder logged in again
    assert value(back, "ime_recorder_reconnects_total", reason="server_closed") == 1
    assert value(back, "ime_recorder_reconnects_total", reason="connect_failed") >= 1
    assert value(back, "ime_recorder_reconnects_total", reason="refused") == 1
    assert value(back, "ime_recorder_refusals_total") == 1
    assert value(back, "ime_recorder_logins_total", outcome="ok") == 2
    assert value(back, "ime_recorder_streams_opened_total") == 3


def _state(open_: list[bool], flush_ok: bool = True, journal_failing: bool = False) -> Any:
    connections = [
        SimpleNamespace(name=f"r-{i}", stats=SimpleNamespace(open=o, last_close="code 1006"))
        for i, o in enumerate(open_)
    ]
    stats = SimpleNamespace(last_flush_ok=flush_ok, last_flush_at=None)
    journal = SimpleNamespace(failing=journal_failing)
    return SimpleNamespace(
        connections=connections, pipeline=SimpleNamespace(stats=stats, journal=journal)
    )


@pytest.mark.parametrize(
    ("state", "stopping", "reasons"),
    [
        (_state([True, True]), False, []),
        (_state([]), False, ["starting: no stream yet"]),
        (_state([True, False]), False, ["connection r-1 is not open (last: code 1006)"]),
        (_state([True], flush_ok=False), False, ["the last flush failed"]),
        (_state([True], journal_failing=True), False, ["journal writes are failing"]),
        (_state([True]), True, ["stopping"]),
    ],
)
def test_readiness_names_every_reason(state: Any, stopping: bool, reasons: list[str]) -> None:
    """Ready only with every connection open and flushes and journal writes succeeding."""
    answer = metrics.readiness(state, stopping)
    assert answer["reasons"] == reasons
    assert answer["ready"] is (not reasons)


@pytest.mark.parametrize(
    ("file", "env", "url"),
    [
        ("", {}, "http://127.0.0.1:9108/healthz"),
        ("[metrics]\nport = 9200\n", {}, "http://127.0.0.1:9200/healthz"),
        (
            "[metrics]\nport = 9200\nhost = '0.0.0.0'\n",
            {"IME_RECORDER_METRICS__PORT": "9300"},
            "http://127.0.0.1:9300/healthz",
        ),
        ("", {"IME_RECORDER_METRICS__HOST": "::1"}, "http://[::1]:9108/healthz"),
    ],
)
def test_health_check_finds_the_port_in_file_and_environment(
    tmp_path: Path, file: str, env: dict[str, str], url: str
) -> None:
    """The HEALTHCHECK reads [metrics] of the config, then IME_RECORDER_METRICS__* overrides."""
    path = tmp_path / "recorder.toml"
    path.write_text(file, encoding="utf-8")
    assert healthcheck.health_url(str(path), env) == url


def test_a_taken_metrics_port_is_logged_and_recording_goes_on(
    simulator: Any, tmp_path: Path
) -> None:
    """Recording matters more than being watched: a busy port is one error line, no stop."""
    sim = simulator(contracts=1, rate=0, max_messages=5)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = with_metrics(make_config(sim, tmp_path), taken.getsockname()[1])
        with capture_logs() as logs:
            recorder = record_until(config, lambda r: r.pipeline.stats.frames == 5)
    assert recorder.metrics is not None
    assert recorder.metrics.port is None
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["metrics endpoint cannot listen; recording without it"]
