"""Prometheus metrics, ``/healthz`` and ``/readyz``, served by the daemon on ``metrics.port``.

The server is aiohttp on the daemon's own event loop, not prometheus_client's thread server:
an answer from ``/healthz`` then proves that the loop which receives the feed is responsive,
and the collector reads the counters the loop owns (``Pipeline.stats``, each connection's
``ConnectionStats``) from that same thread, at scrape time, with no lock and no work added to
the per-frame path. What no existing counter knows is counted here, off the hot path: flush
durations and how streams end (:class:`InstrumentedPipeline`), handshake and login outcomes
(an aiohttp ``TraceConfig`` on the daemon's client session).

The container's HEALTHCHECK asks ``/healthz`` with :mod:`recorder.healthcheck`.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from recorder.buffer import Key
from recorder.config import MetricsConfig
from recorder.pipeline import Pipeline
from recorder.schema import TABLES

if TYPE_CHECKING:
    from recorder.daemon import Recorder

log = structlog.get_logger("recorder.metrics")

PREFIX = "ime_recorder_"
#: why a stream attempt failed or an open stream ended (each is followed by a reconnect)
RECONNECT_REASONS = (
    "connect_failed",  # no TCP/TLS connection to the stream endpoint
    "handshake_failed",  # an HTTP answer other than 101, 401 or 403
    "refused",  # HTTP 401/403 at the handshake, or close code 1008 after it
    "connection_lost",  # the stream ended without a close frame
    "server_closed",  # the server closed the stream with another code
    "stale",  # the no-data watchdog closed it
)
LOGIN_OUTCOMES = ("ok", "refused", "failed")
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_POLICY_VIOLATION = 1008
_NOT_A_RECONNECT = frozenset(("shutdown", "probe done"))


class FeedMeter:
    """Counts what the feed's own counters do not: stream ends by reason, refusals, logins."""

    def __init__(self) -> None:
        self.reconnects: Counter[str] = Counter(dict.fromkeys(RECONNECT_REASONS, 0))
        self.refusals = 0
        self.logins: Counter[str] = Counter(dict.fromkeys(LOGIN_OUTCOMES, 0))
        self.flush_seconds = Histogram(
            f"{PREFIX}flush_duration_seconds",
            "Time to write the due partitions to Parquet (flushes that had rows only)",
            buckets=FLUSH_BUCKETS,
            registry=None,
        )

    def stream_ended(self, code: int | None, reason: str, stale: bool) -> None:
        """An accepted stream (or a probe that delivered frames) ended."""
        if reason in _NOT_A_RECONNECT:
            return
        if stale:
            self.reconnects["stale"] += 1
        elif code == _POLICY_VIOLATION:
            self.reconnects["refused"] += 1
            self.refusals += 1
        elif code in (None, 1006):
            self.reconnects["connection_lost"] += 1
        else:
            self.reconnects["server_closed"] += 1

    def trace_config(self, token_url: str) -> aiohttp.TraceConfig:
        """Hooks on the client session: WebSocket handshakes and logins at ``token_url``."""
        trace = aiohttp.TraceConfig()

        def is_handshake(headers: Mapping[str, str]) -> bool:
            return headers.get("Upgrade", "").lower() == "websocket"

        async def on_end(
            _: aiohttp.ClientSession, __: Any, params: aiohttp.TraceRequestEndParams
        ) -> None:
            status = params.response.status
            if is_handshake(params.headers):
                if status in (401, 403):
                    self.reconnects["refused"] += 1
                    self.refusals += 1
                elif status != 101:
                    self.reconnects["handshake_failed"] += 1
            elif params.method == "POST" and str(params.url) == token_url:
                self.logins[_login_outcome(status)] += 1

        async def on_exception(
            _: aiohttp.ClientSession, __: Any, params: aiohttp.TraceRequestExceptionParams
        ) -> None:
            if not isinstance(params.exception, Exception):
                return  # cancelled: the daemon is stopping
            if is_handshake(params.headers):
                self.reconnects["connect_failed"] += 1
            elif params.method == "POST" and str(params.url) == token_url:
                self.logins["failed"] += 1

        trace.on_request_end.append(on_end)
        trace.on_request_exception.append(on_exception)
        return trace


def _login_outcome(status: int) -> str:
    """As recorder.auth reads the answer: 5xx and 429 are retried, other errors are final."""
    if status in (200, 201):
        return "ok"
    return "failed" if status >= 500 or status == 429 else "refused"


class InstrumentedPipeline(Pipeline):
    """A Pipeline that also times its flushes and counts how streams end, for the metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter = FeedMeter()

    async def flush(self, keys: list[Key] | None = None) -> bool:
        flushes, started = self.stats.flushes, time.perf_counter()
        try:
            return await super().flush(keys)
        finally:
            if self.stats.flushes != flushes:  # something was written (or tried)
                self.meter.flush_seconds.observe(time.perf_counter() - started)

    def session_closed(
        self, session: str, at_us: int, code: int | None, reason: str, frames: int, stale: bool
    ) -> None:
        super().session_closed(session, at_us, code, reason, frames, stale)
        self.meter.stream_ended(code, reason, stale)


def readiness(recorder: Recorder, stopping: bool) -> dict[str, Any]:
    """Ready: every connection open and the last flush (and journal write) succeeded."""
    reasons: list[str] = []
    if stopping:
        reasons.append("stopping")
    elif not recorder.connections:
        reasons.append("starting: no stream yet")
    for connection in recorder.connections:
        if not connection.stats.open:
            last = connection.stats.last_close
            reasons.append(
                f"connection {connection.name} is not open" + (f" (last: {last})" if last else "")
            )
    stats = recorder.pipeline.stats
    if not stats.last_flush_ok:
        reasons.append("the last flush failed")
    journal = recorder.pipeline.journal
    if journal is not None and journal.failing:
        reasons.append("journal writes are failing")
    return {
        "ready": not reasons,
        "reasons": reasons,
        "connections": {c.name: c.stats.open for c in recorder.connections},
        "last_flush_ok": stats.last_flush_ok,
        "last_flush_at": stats.last_flush_at,
    }


def _version() -> str:
    try:
        return metadata.version("ime-recorder")
    except metadata.PackageNotFoundError:
        return "unknown"


class RecorderCollector(Collector):
    """Every ime_recorder_* metric, read from the running recorder at scrape time."""

    def __init__(self, recorder: Recorder, stop: asyncio.Event) -> None:
        self._recorder = recorder
        self._stop = stop
        self._version = _version()

    def collect(self) -> Iterable[Metric]:
        recorder = self._recorder
        pipeline = recorder.pipeline
        stats = pipeline.stats
        connections = [c.stats for c in recorder.connections]
        info = {"version": self._version, "python": platform.python_version()}
        yield InfoMetricFamily(f"{PREFIX}build", "The running ime-recorder", value=info)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}{name}", doc, value=value)

        yield counter("frames_received", "Frames received from the feed", stats.frames)
        yield counter("frames_quarantined", "Frames stored whole in quarantine", stats.quarantined)
        yield counter(
            "frames_recovered", "Frames replayed from the journal at start", stats.recovered
        )
        rows = CounterMetricFamily(
            f"{PREFIX}rows_written", "Rows written to Parquet", labels=["table"]
        )
        for table in sorted(set(TABLES) | set(stats.rows_written)):
            rows.add_metric([table], stats.rows_written.get(table, 0))
        yield rows
        yield counter("files_written", "Parquet files written", stats.files_written)
        yield counter("bytes_written", "Bytes of Parquet written", stats.bytes_written)
        yield counter("flushes", "Flushes that had rows to write", stats.flushes)
        yield counter("flush_failures", "Flushes that failed (rows kept)", stats.flush_failures)
        yield gauge("last_flush_ok", "1 if the last flush succeeded", int(stats.last_flush_ok))
        if stats.last_flush_at is not None:
            yield gauge(
                "last_flush_timestamp_seconds", "When the last flush ended", stats.last_flush_at
            )
        yield gauge("rows_buffered", "Rows in memory waiting for a flush", pipeline.rows_buffered)
        yield counter(
            "reader_pauses",
            "Times the readers stopped: memory full and the journal unable to hold more",
            stats.pauses,
        )
        yield gauge("readers_paused", "1 while the readers wait for a flush", int(pipeline.full))
        yield counter(
            "spills",
            "Times frames went to wait in the journal (memory full, or readers behind)",
            stats.spills,
        )
        yield counter(
            "frames_spilled", "Frames and snapshots that waited in the journal", stats.spilled
        )
        yield gauge(
            "frames_in_journal_waiting",
            "Frames, snapshots and events waiting in the journal to be read back",
            pipeline.spilled_waiting,
        )
        yield gauge(
            "journal_replaying",
            "1 while the journal a crash left is replayed (the stream's frames wait behind it)",
            int(pipeline.recovering),
        )
        yield counter(
            "frames_decoded_in_bulk", "Plain frames whose rows DuckDB built", stats.decoded_in_bulk
        )
        yield from self._journal()
        yield gauge("connections", "Feed connections (groups of contracts)", len(connections))
        yield gauge("connections_open", "Feed connections open", sum(c.open for c in connections))
        yield counter("streams_opened", "Streams accepted", sum(c.sessions for c in connections))
        yield gauge(
            "contracts_rejected",
            "Contracts the server refuses (dropped from the subscription)",
            sum(len(c.rejected) for c in connections),
        )
        if isinstance(pipeline, InstrumentedPipeline):
            yield from self._meter(pipeline.meter)
        now = time.time()
        age = GaugeMetricFamily(
            f"{PREFIX}seconds_since_last_message",
            "Seconds since the last message of each contract received in this run",
            labels=["contract"],
        )
        for contract, at in sorted(stats.last_message_at.items()):
            age.add_metric([contract], max(0.0, now - at))
        yield age
        yield from self._volume()
        stopping = self._stop.is_set()
        ready = readiness(recorder, stopping)["ready"]
        yield gauge("ready", "1 while /readyz answers 200", int(ready))

    def _meter(self, meter: FeedMeter) -> Iterable[Metric]:
        reconnects = CounterMetricFamily(
            f"{PREFIX}reconnects",
            "Stream attempts that failed and streams that ended, by reason (each is retried)",
            labels=["reason"],
        )
        for reason, count in sorted(meter.reconnects.items()):
            reconnects.add_metric([reason], count)
        yield reconnects
        yield CounterMetricFamily(
            f"{PREFIX}refusals",
            "Streams refused by the server: HTTP 401/403 or close code 1008",
            value=meter.refusals,
        )
        logins = CounterMetricFamily(
            f"{PREFIX}logins", "Logins at auth.token_url, by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(meter.logins.items()):
            logins.add_metric([outcome], count)
        yield logins
        yield from meter.flush_seconds.collect()

    def _journal(self) -> Iterable[Metric]:
        journal = self._recorder.pipeline.journal
        if journal is None:
            return
        yield GaugeMetricFamily(
            f"{PREFIX}journal_backlog_bytes",
            "Journal records in memory, not yet written to the journal file",
            value=journal.backlog_bytes,
        )
        segments, size = 0, 0
        for path in journal.segments():
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                continue  # released by the writer thread meanwhile
            segments += 1
        yield GaugeMetricFamily(
            f"{PREFIX}journal_segments",
            "Journal segments on disk whose frames are not all in Parquet yet",
            value=segments,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}journal_bytes", "Size of those journal segments", value=size
        )
        yield GaugeMetricFamily(
            f"{PREFIX}journal_write_failing",
            "1 while writing the journal fails",
            value=int(journal.failing),
        )

    def _volume(self) -> Iterable[Metric]:
        try:
            fs = os.statvfs(self._recorder.pipeline.data_dir)
        except OSError:
            return
        yield GaugeMetricFamily(
            f"{PREFIX}data_volume_free_bytes",
            "Bytes free for the recorder on the data directory's file system",
            value=fs.f_bavail * fs.f_frsize,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}data_volume_size_bytes",
            "Size of the data directory's file system",
            value=fs.f_blocks * fs.f_frsize,
        )


def _json(body: dict[str, Any], status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on the daemon's event loop."""

    def __init__(self, recorder: Recorder, config: MetricsConfig, stop: asyncio.Event) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.registry.register(RecorderCollector(recorder, stop))
        self._recorder = recorder
        self._stop = stop
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Listen on ``metrics.host:port``; a port that cannot be bound is logged, not fatal.

        Recording matters more than being watched: the daemon goes on without the endpoint
        (the HEALTHCHECK and the IMERecorderDown alert then say so).
        """
        if not self.config.enabled:
            return
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{self.config.host}:{self.config.port}"
            log.error(
                "metrics endpoint cannot listen; recording without it",
                address=where,
                error=exc.strerror or str(exc),
            )
            return
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("metrics listening", host=self.config.host, port=self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        # answered by the event loop that receives the feed: an answer means it is not stuck
        return _json(
            {"status": "ok", "uptime_seconds": time.time() - self._recorder.started_at}, 200
        )

    async def _readyz(self, _: web.Request) -> web.Response:
        state = readiness(self._recorder, self._stop.is_set())
        return _json(state, 200 if state["ready"] else 503)
