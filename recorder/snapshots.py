"""State at every (re)connect: when a stream session opens, fetch its contracts' live overview.

The feed pushes a contract only when it changes, so after a reconnect a quiet contract's state
is unknown until it next moves. Right after each session opens, the live overview of its
contracts is fetched and stored as messages with ``source = 'snapshot'``, recorded as a short
session of its own (reason ``snapshot``) so the frame accounting stays exact.
"""

from __future__ import annotations

import asyncio

import orjson
import structlog

from recorder.errors import FeedError
from recorder.pipeline import Pipeline
from recorder.reference import snapshot_message
from recorder.rest import RestClient
from recorder.streams import now_us

log = structlog.get_logger("recorder.snapshots")


class SnapshotTaker:
    """A FeedEvents that forwards to the pipeline and takes a snapshot at each session open."""

    def __init__(self, pipeline: Pipeline, rest: RestClient | None, subscribe_by: str) -> None:
        self._pipeline = pipeline
        self._rest = rest
        self._by_id = subscribe_by == "id"
        self._tasks: set[asyncio.Task[None]] = set()

    def session_opened(
        self, session: str, endpoint: str, contracts: tuple[str, ...], at_us: int
    ) -> None:
        self._pipeline.session_opened(session, endpoint, contracts, at_us)
        if self._rest is not None and not session.endswith(".probe"):
            task = asyncio.create_task(self._take(session, contracts), name=f"snapshot-{session}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def session_closed(
        self, session: str, at_us: int, code: int | None, reason: str, frames: int, stale: bool
    ) -> None:
        self._pipeline.session_closed(session, at_us, code, reason, frames, stale)

    def contracts_rejected(self, contracts: tuple[str, ...], at_us: int, reason: str) -> None:
        self._pipeline.contracts_rejected(contracts, at_us, reason)

    async def _take(self, session: str, contracts: tuple[str, ...]) -> None:
        assert self._rest is not None
        fetch = self._rest.overview_by_id if self._by_id else self._rest.overview_by_name
        try:
            overview, server_time = await fetch(list(contracts))
        except FeedError as exc:
            log.warning("snapshot at connect failed", session=session, error=str(exc))
            return
        at = now_us()
        exchange_us = round(server_time * 1_000_000) if server_time else at
        id_key = "contractId" if self._by_id else "contractName"
        found = tuple(c for c in contracts if isinstance(overview.get(c), dict))
        snapshot = f"{session}.snapshot"
        self._pipeline.session_opened(snapshot, "live/data/overview", found, at)
        for contract in found:
            message = snapshot_message(contract, id_key, overview[contract], exchange_us)
            self._pipeline.on_snapshot(snapshot, orjson.dumps(message), at)
        self._pipeline.session_closed(snapshot, now_us(), None, "snapshot", len(found), False)
        missing = len(contracts) - len(found)
        log.info("snapshot taken", session=session, contracts=len(found), unknown=missing)

    async def close(self) -> None:
        """Cancel snapshots still being fetched (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
