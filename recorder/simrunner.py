"""Running the simulator: in a thread for synchronous tests, or in the foreground for the CLI."""

from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import Future

import structlog

from recorder.simulator import Simulator, SimulatorOptions


class SimulatorThread(Simulator):
    """A Simulator serving from its own event loop in a daemon thread, for synchronous tests."""

    def __init__(self, options: SimulatorOptions | None = None) -> None:
        super().__init__(options)
        self._thread_loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="ime-simulator", daemon=True)
        self._started: Future[None] = Future()

    def _serve(self) -> None:
        loop = self._thread_loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.start())
        except BaseException as exc:
            self._started.set_exception(exc)
        else:
            self._started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def __enter__(self) -> SimulatorThread:
        """Start serving; returns once the port is bound."""
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), self._thread_loop).result(timeout=30)
        finally:
            self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
            self._thread.join(timeout=30)


def run_simulator(options: SimulatorOptions) -> None:
    """Serve until SIGINT or SIGTERM (the `ime-recorder simulate` command)."""
    asyncio.run(_serve_until_signal(options))


async def _serve_until_signal(options: SimulatorOptions) -> None:
    log = structlog.get_logger()
    simulator = Simulator(options)
    await simulator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    urls = {"base_url": simulator.base_url, "token_url": simulator.token_url}
    demo = {"username": options.username, "password": options.password}
    log.info("simulator listening", **urls, **demo, contracts=len(simulator.contracts))
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await simulator.stop()
        log.info("simulator stopped", **simulator.stats())
