"""The daemon: wires config, tokens, feed connections and the pipeline; owns start-up and stop.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 when the configuration, the credentials
or the login is wrong, 1 on an unexpected error (details in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pyarrow as pa
import structlog

from recorder.auth import TokenProvider, ssl_context
from recorder.compaction import AutoCompaction
from recorder.config import Config, Credentials
from recorder.discovery import Discovery
from recorder.errors import AllRefusedError, AuthError, ConfigError, TransientError
from recorder.feed import FeedConnection
from recorder.merging import AutoMerge
from recorder.metrics import InstrumentedPipeline, MetricsServer
from recorder.pipeline import Pipeline
from recorder.recovery import Recovered, journal_found, recover_while_recording
from recorder.rest import RestClient, rest_base
from recorder.snapshots import SnapshotTaker
from recorder.subscriptions import Subscriptions

GIL_SWITCH_SECONDS = 0.001
#: seconds a stop may take to write what memory and the journal hold (compose gives 30 s)
STOP_PATIENCE = 30.0
log = structlog.get_logger("recorder.daemon")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


@dataclass
class Recorder:
    """A running recorder: its pipeline and connections (for progress lines and tests)."""

    config: Config
    pipeline: Pipeline
    subscriptions: Subscriptions | None = None
    started_at: float = field(default_factory=time.time)
    metrics: MetricsServer | None = None
    #: the replay of a crash's journal, while it runs beside the feed (recorder.recovery)
    recovery: asyncio.Task[Recovered] | None = None

    @property
    def connections(self) -> list[FeedConnection]:
        """The live feed connections (they change when discovery changes the universe)."""
        return self.subscriptions.connections if self.subscriptions is not None else []


async def record(
    config: Config,
    credentials: Credentials,
    stop: asyncio.Event,
    on_start: Callable[[Recorder], Awaitable[None] | None] | None = None,
) -> None:
    """Record until ``stop`` is set, then close every stream gracefully and flush everything.

    Raises AuthError when the login is refused (the caller exits with code 2).
    """
    run_id = f"{int(time.time()):x}{secrets.token_hex(2)}"
    # The event loop is busy for every frame; with Python's default 5 ms GIL switch interval
    # the writer thread, which takes the GIL back after each Arrow or DuckDB call, waits up to
    # 5 ms each time and falls behind (flushes took 2-3 times longer, memory piled up);
    # restored when recording ends (an embedding program keeps its own setting)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    release_freed_memory()
    tls = ssl_context(config.auth)  # checks on; auth.ca_bundle adds a CA
    pipeline = InstrumentedPipeline(
        config.data_dir,
        config.storage,
        config.partition_tz,
        config.naive_tz,
        journal=config.journal,
        run=run_id,
    )
    recorder = Recorder(config, pipeline)
    found = journal_found(pipeline)  # what a crash left: replayed while the feed is read
    pipeline.start()
    if found:
        recorder.recovery = asyncio.create_task(
            recover_while_recording(pipeline, found), name="recovery"
        )
    # metrics, /healthz and /readyz (503 until every stream is open): see recorder.metrics
    metrics = recorder.metrics = MetricsServer(recorder, config.metrics, stop)
    await metrics.start()
    connector = aiohttp.TCPConnector(limit=0, ssl=tls)
    trace = pipeline.meter.trace_config(config.auth.token_url)
    # each date is compacted once it has closed: see recorder.compaction
    compaction = AutoCompaction(
        config.data_dir,
        config.partition_tz,
        config.compaction.after_seconds,
        layout=config.compaction.layout,
    )
    # the open date's day files are merged as the day goes: see recorder.merging
    merging = AutoMerge(
        config.data_dir,
        config.partition_tz,
        config.compaction.after_seconds,
        config.compaction.merge_interval_seconds,
        config.storage.max_rows_per_file,
    )
    settle_collector()

    async def upkeep() -> None:
        """Compaction and merging, once the journal is replayed (they rewrite its dates)."""
        if recorder.recovery is not None:
            await recorder.recovery
        if config.compaction.enabled:
            compaction.start()
            if config.compaction.merge_interval_seconds > 0:
                merging.start()

    upkeep_started = asyncio.create_task(upkeep(), name="upkeep")
    upkeep_started.add_done_callback(lambda task: _stop_on_failure(task, stop))
    try:
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            tokens = TokenProvider(session, config.auth, credentials)
            await tokens.token()  # a refused login stops start-up here, before any stream
            rest = RestClient(session, rest_base(config.feed.base_url), tokens)
            # a snapshot of each session's contracts when it opens: see recorder.snapshots
            events = SnapshotTaker(
                pipeline,
                rest if config.feed.snapshot_on_connect else None,
                config.feed.subscribe_by,
            )

            def connection(
                index: str, group: tuple[str, ...], own_stop: asyncio.Event
            ) -> FeedConnection:
                return FeedConnection(
                    f"{run_id}-{index}",
                    group,
                    config.feed,
                    session,
                    tokens,
                    pipeline.on_frames,
                    own_stop,
                    events=events,
                    backpressure=pipeline,
                )

            subscriptions = recorder.subscriptions = Subscriptions(
                connection, config.feed.max_contracts_per_connection, stop, pipeline.overlap
            )
            discovery = Discovery(rest, config, pipeline, subscriptions, stop)
            await subscriptions.update(await discovery.first())
            log.info(
                "recording",
                contracts=len(subscriptions.contracts),
                connections=len(subscriptions.connections),
                data_dir=str(config.data_dir),
            )
            if on_start is not None:
                started = on_start(recorder)
                if started is not None:
                    await started
            refresher = asyncio.create_task(discovery.run(), name="discovery")
            try:
                await subscriptions.run()
            finally:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
                await events.close()
    finally:
        try:
            deadline = time.monotonic() + STOP_PATIENCE
            await _finish_replay(recorder.recovery, STOP_PATIENCE)
            upkeep_started.cancel()
            await asyncio.gather(upkeep_started, return_exceptions=True)
            await merging.close()
            await compaction.close()
            flushed = await pipeline.close(max(1.0, deadline - time.monotonic()))
            log.info(
                "stopped",
                frames=pipeline.stats.frames,
                quarantined=pipeline.stats.quarantined,
                rows_written=dict(pipeline.stats.rows_written),
                files_written=pipeline.stats.files_written,
                flushed=flushed,
            )
        finally:
            await metrics.close()
            sys.setswitchinterval(switch)
            gc.unfreeze()
    replay = recorder.recovery
    if replay is not None and replay.done() and not replay.cancelled():
        replay.result()  # a replay that failed (logged already): exit code 1


async def _finish_replay(replay: asyncio.Task[Recovered] | None, patience: float) -> None:
    """On a stop, let the journal's replay finish (``patience`` s at most, then the rest
    stays in the journal for the next start)."""
    if replay is None or replay.done():
        return
    log.info("stopping: the journal's replay finishes first", patience_seconds=patience)
    await asyncio.wait({replay}, timeout=patience)
    if not replay.done():
        replay.cancel()
        await asyncio.gather(replay, return_exceptions=True)


def _stop_on_failure(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """A replay of the journal that fails stops the recorder (what it holds stays there)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("replaying the journal failed; stopping", error=repr(error))
        stop.set()


def settle_collector() -> None:
    """Move every object made so far (modules, functions, configuration: ~100,000) out of
    the garbage collector's sight: it never frees them, and each full collection walked
    them all while the event loop waited (with the frames' buffers, ~15 % of its time at
    90 k frames/s). Undone (``gc.unfreeze``) when recording ends.
    """
    gc.collect()
    gc.freeze()


def release_freed_memory() -> None:
    """Have Arrow allocate with the C library's malloc (unless ARROW_DEFAULT_MEMORY_POOL says
    otherwise): it gives a flush's buffers, megabytes each, back to the system when they are
    freed, where Arrow's default (mimalloc) keeps them for reuse. At 100,000 messages/s
    offered the recorder's RSS held at ~450-500 MB instead of ~630-660 MB, at the same rate.
    """
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def handler(signum: int) -> None:
        if stop.is_set():
            log.warning(
                "second signal: exiting without waiting", signal=signal.Signals(signum).name
            )
            os._exit(EXIT_ERROR)
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, handler, signum)


async def _main(config: Config, credentials: Credentials) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await record(config, credentials, stop)


def run(config: Config, credentials: Credentials) -> None:
    """Run the daemon in this process until a stop signal (AuthError: the login was refused).

    Any other failure is logged as one event and exits with code 1.
    """
    try:
        asyncio.run(_main(config, credentials))
    except (AuthError, AllRefusedError, ConfigError):
        raise
    except TransientError as exc:  # e.g. the token endpoint cannot be reached at start-up
        log.error("cannot start", error=str(exc))
        raise SystemExit(EXIT_ERROR) from None
    except Exception:
        log.exception("failed unexpectedly")
        raise SystemExit(EXIT_ERROR) from None
