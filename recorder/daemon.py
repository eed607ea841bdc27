"""The daemon: wires config, tokens, feed connections and the pipeline; owns start-up and stop.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 when the configuration, the credentials
or the login is wrong, 1 on an unexpected error (details in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from recorder.auth import TokenProvider, ssl_context
from recorder.compaction import AutoCompaction
from recorder.config import Config, Credentials
from recorder.errors import AllRefusedError, AuthError, TransientError
from recorder.feed import FeedConnection, split_contracts
from recorder.metrics import InstrumentedPipeline, MetricsServer
from recorder.pipeline import Pipeline
from recorder.recovery import recover

log = structlog.get_logger("recorder.daemon")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


@dataclass
class Recorder:
    """A running recorder: its pipeline and connections (for progress lines and tests)."""

    config: Config
    pipeline: Pipeline
    connections: list[FeedConnection] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    metrics: MetricsServer | None = None


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
    recover(pipeline)
    pipeline.start()
    # metrics, /healthz and /readyz (503 until every stream is open): see recorder.metrics
    metrics = recorder.metrics = MetricsServer(recorder, config.metrics, stop)
    await metrics.start()
    connector = aiohttp.TCPConnector(limit=0, ssl=tls)
    trace = pipeline.meter.trace_config(config.auth.token_url)
    # each date is compacted once it has closed: see recorder.compaction
    compaction = AutoCompaction(
        config.data_dir, config.partition_tz, config.compaction.after_seconds
    )
    try:
        if config.compaction.enabled:
            compaction.start()
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            tokens = TokenProvider(session, config.auth, credentials)
            await tokens.token()  # a refused login stops start-up here, before any stream
            groups = split_contracts(
                config.feed.contracts, config.feed.max_contracts_per_connection
            )
            recorder.connections = [
                FeedConnection(
                    f"{run_id}-{i}",
                    group,
                    config.feed,
                    session,
                    tokens,
                    pipeline.on_frame,
                    stop,
                    events=pipeline,
                )
                for i, group in enumerate(groups)
            ]
            log.info(
                "recording",
                contracts=len(config.feed.contracts),
                connections=len(groups),
                data_dir=str(config.data_dir),
            )
            if on_start is not None:
                started = on_start(recorder)
                if started is not None:
                    await started
            await _run_connections(recorder.connections, stop)
    finally:
        try:
            await compaction.close()
            flushed = await pipeline.close()
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


async def _supervise(connection: FeedConnection, stop: asyncio.Event) -> None:
    """Run one connection; a bug in it restarts it instead of stopping the others."""
    while not stop.is_set():
        try:
            await connection.run()
            return
        except (AllRefusedError, AuthError):
            raise
        except Exception:
            log.exception(
                "connection failed unexpectedly; restarting it", connection=connection.name
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)


async def _run_connections(connections: list[FeedConnection], stop: asyncio.Event) -> None:
    """Run every connection until stopped.

    A connection whose every contract is refused ends alone; when all of them end so, or a
    login is refused, AllRefusedError / AuthError is raised after the others are stopped.
    """
    pending = {asyncio.create_task(_supervise(c, stop), name=c.name) for c in connections}
    refused: list[AllRefusedError] = []
    fatal: BaseException | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if isinstance(error, AllRefusedError):
                    log.error("every contract of a connection refused", error=str(error))
                    refused.append(error)
                elif error is not None and fatal is None:
                    fatal = error
                    stop.set()
            if len(refused) == len(connections):
                raise refused[0]
        if fatal is not None:
            raise fatal
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


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
    except (AuthError, AllRefusedError):
        raise
    except TransientError as exc:  # e.g. the token endpoint cannot be reached at start-up
        log.error("cannot start", error=str(exc))
        raise SystemExit(EXIT_ERROR) from None
    except Exception:
        log.exception("failed unexpectedly")
        raise SystemExit(EXIT_ERROR) from None
