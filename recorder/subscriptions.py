"""The set of live connections, changed while recording without losing or doubling a message.

Contracts are grouped into connections of at most ``feed.max_contracts_per_connection``.
When the universe changes, groups that still hold exactly their contracts stay untouched;
new contracts get new connections; a group that lost contracts is replaced. A replacement is
opened **before** the connection it replaces is closed, and while both are open the pipeline
drops a frame whose (contract, exchange timestamp) it already stored, so the switch neither
loses nor duplicates a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from recorder.errors import AllRefusedError, AuthError
from recorder.feed import FeedConnection

log = structlog.get_logger("recorder.subscriptions")

ConnectionFactory = Callable[[str, tuple[str, ...], asyncio.Event], FeedConnection]
Overlap = Callable[[tuple[str, ...], bool], None]


def regroup(
    groups: Sequence[tuple[str, ...]], wanted: Sequence[str], per_connection: int
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(groups to keep as they are, new groups to open) for the ``wanted`` contracts.

    A kept group holds only wanted contracts; a group that lost some is replaced by a new
    group of its remaining ones; contracts in no group fill new groups, in the given order.
    """
    want = set(wanted)
    keep = [g for g in groups if g and set(g) <= want]
    opened: list[tuple[str, ...]] = []
    for group in groups:
        remaining = tuple(c for c in group if c in want)
        if group not in keep and remaining:
            opened.append(remaining)
    placed = {c for g in (*keep, *opened) for c in g}
    loose = [c for c in dict.fromkeys(wanted) if c not in placed]
    opened += [tuple(loose[i : i + per_connection]) for i in range(0, len(loose), per_connection)]
    return keep, opened


@dataclass
class _Live:
    connection: FeedConnection
    group: tuple[str, ...]
    stop: asyncio.Event
    task: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)


class Subscriptions:
    """Runs the feed connections and changes them when the contract universe changes."""

    def __init__(
        self,
        factory: ConnectionFactory,
        per_connection: int,
        stop: asyncio.Event,
        overlap: Overlap | None = None,
        switch_timeout: float = 10.0,
        overlap_grace: float = 2.0,
    ) -> None:
        self._factory = factory
        self._per_connection = per_connection
        self._stop = stop
        self._overlap = overlap
        self._switch_timeout = switch_timeout
        self._overlap_grace = overlap_grace
        self._live: list[_Live] = []
        self._ended = asyncio.Event()
        self._refused: list[AllRefusedError] = []
        self._fatal: BaseException | None = None
        self._serial = 0
        self.rejected: set[str] = set()

    @property
    def connections(self) -> list[FeedConnection]:
        return [live.connection for live in self._live]

    @property
    def contracts(self) -> tuple[str, ...]:
        return tuple(c for live in self._live for c in live.connection.contracts)

    def _start(self, group: tuple[str, ...]) -> _Live:
        self._serial += 1
        stop = asyncio.Event()
        connection = self._factory(str(self._serial - 1), group, stop)
        task = asyncio.create_task(self._supervise(connection, stop), name=connection.name)
        live = _Live(connection, group, stop, task)
        task.add_done_callback(lambda _: self._ended.set())
        self._live.append(live)
        return live

    async def _supervise(self, connection: FeedConnection, stop: asyncio.Event) -> None:
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

    async def update(self, wanted: Sequence[str]) -> None:
        """Make the live connections carry exactly ``wanted`` (minus rejected contracts)."""
        wanted = [c for c in wanted if c not in self.rejected]
        current = [live.connection.contracts for live in self._live]
        keep, opened = regroup(current, wanted, self._per_connection)
        retiring = [live for live in self._live if live.connection.contracts not in keep]
        if not opened and not retiring:
            return
        moving = tuple({c for g in opened for c in g} & {c for r in retiring for c in r.group})
        if moving and self._overlap is not None:
            self._overlap(moving, True)
        fresh = [self._start(group) for group in opened]
        log.info(
            "subscriptions changing",
            opening=sum(len(g) for g in opened),
            connections_opened=len(opened),
            connections_closed=len(retiring),
        )
        await self._wait_open(fresh)
        for live in retiring:
            live.stop.set()
        await asyncio.gather(*(live.task for live in retiring), return_exceptions=True)
        self._live = [live for live in self._live if live not in retiring]
        if moving and self._overlap is not None:
            await asyncio.sleep(self._overlap_grace)  # late frames of the closed streams
            self._overlap(moving, False)

    async def _wait_open(self, fresh: list[_Live]) -> None:
        deadline = time.monotonic() + self._switch_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if all(live.connection.stats.open or live.task.done() for live in fresh):
                return
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Wait until stopped; raise when every connection ended refused or a login failed."""
        stopper = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                ender = asyncio.create_task(self._ended.wait())
                await asyncio.wait({stopper, ender}, return_when=asyncio.FIRST_COMPLETED)
                ender.cancel()
                self._ended.clear()
                self._collect_ended()
                if self._fatal is not None:
                    raise self._fatal
                if self._live == [] and self._refused:
                    raise self._refused[0]
        finally:
            stopper.cancel()
            for live in self._live:
                live.stop.set()
            await asyncio.gather(*(live.task for live in self._live), return_exceptions=True)

    def _collect_ended(self) -> None:
        for live in [live for live in self._live if live.task.done()]:
            self._live.remove(live)
            error = None if live.task.cancelled() else live.task.exception()
            if isinstance(error, AllRefusedError):
                log.error("every contract of a connection refused", error=str(error))
                self._refused.append(error)
                self.rejected.update(live.group)
            elif error is not None:
                self._fatal = error
        for live in self._live:
            self.rejected.update(live.connection.stats.rejected)
