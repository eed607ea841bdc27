"""Discovery: the contract universe from ``feed.contracts``, ``feed.markets`` and ``feed.search``.

Each name fragment of ``feed.search`` is searched in each market of ``feed.markets`` (in all
three when ``markets`` is empty); a market listed without fragments is taken whole (searched
with an empty fragment). Explicit contracts are always kept, first, in the given order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from recorder.config import Config, FeedConfig
from recorder.errors import ConfigError, FeedError, TransientError
from recorder.pipeline import Pipeline
from recorder.reference import MARKETS, market_of
from recorder.rest import RestClient
from recorder.subscriptions import Subscriptions

log = structlog.get_logger("recorder.discovery")


@dataclass(frozen=True)
class Universe:
    """What to subscribe to, and the static data of each contract found."""

    contracts: tuple[str, ...]
    reference: tuple[tuple[dict[str, Any], str], ...]  # (static item, market)


def searches(feed: FeedConfig) -> list[tuple[str, str]]:
    """The (market, fragment) searches the config asks for."""
    if feed.search:
        markets = feed.markets or MARKETS
        return [(market, fragment) for market in markets for fragment in feed.search]
    return [(market, "") for market in feed.markets]


async def discover(rest: RestClient, feed: FeedConfig) -> Universe:
    """Ask the REST service for the universe the config describes."""
    key = "contractId" if feed.subscribe_by == "id" else "contractName"
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for market, fragment in searches(feed):
        for item in await rest.search(market, fragment):
            identifier = item.get(key)
            if isinstance(identifier, str | int) and str(identifier):
                found.setdefault(str(identifier), (item, market))
    explicit = [c for c in feed.contracts if c not in found]
    if explicit:
        lookup = rest.static_by_id if feed.subscribe_by == "id" else rest.static_by_name
        for identifier, static in zip(explicit, await lookup(explicit), strict=False):
            if static is not None:
                found[identifier] = (static, market_of(static))
            else:
                log.warning("contract unknown to the static service", contract=identifier)
    ordered = list(feed.contracts) + sorted(i for i in found if i not in feed.contracts)
    return Universe(tuple(ordered), tuple(found[i] for i in ordered if i in found))


def next_refresh(now: datetime, interval_seconds: float, tz: tzinfo) -> float:
    """Seconds until the next refresh: the interval, or the next local midnight if sooner."""
    local = now.astimezone(tz)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tz)
    return max(0.0, min(interval_seconds, (midnight - local).total_seconds()))


class Discovery:
    """Keeps the universe fresh: at start, every ``feed.discovery_interval_seconds`` and at
    each local midnight; stores the reference data each time (the ``contracts`` view)."""

    def __init__(
        self,
        rest: RestClient,
        config: Config,
        pipeline: Pipeline,
        subscriptions: Subscriptions,
        stop: asyncio.Event,
    ) -> None:
        self._rest = rest
        self._config = config
        self._pipeline = pipeline
        self._subscriptions = subscriptions
        self._stop = stop
        self.active = bool(config.feed.markets or config.feed.search)
        self.refreshes = 0

    async def _fetch(self) -> Universe:
        universe = await discover(self._rest, self._config.feed)
        self._pipeline.on_reference(list(universe.reference), time.time_ns() // 1000)
        self.refreshes += 1
        return universe

    async def first(self) -> tuple[str, ...]:
        """The contracts to start with (explicit ones if the REST service cannot be asked)."""
        feed = self._config.feed
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_random_exponential(multiplier=1, max=60),
            stop=(lambda _: self._stop.is_set()) if self.active else stop_after_attempt(2),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return (await self._fetch()).contracts
        except FeedError as exc:
            if feed.contracts:
                log.warning("discovery failed; recording the listed contracts", error=str(exc))
                return feed.contracts
            raise ConfigError(f"feed.markets/feed.search: discovery failed: {exc}") from None
        return feed.contracts

    async def run(self) -> None:
        """Refresh until stopped; a failed refresh keeps the current subscriptions."""
        zone = self._config.partition_tz
        interval = self._config.feed.discovery_interval_seconds
        while not self._stop.is_set():
            delay = next_refresh(datetime.now(UTC), interval, zone) + 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            try:
                universe = await self._fetch()
            except FeedError as exc:
                log.warning("discovery refresh failed; subscriptions unchanged", error=str(exc))
                continue
            await self._subscriptions.update(universe.contracts)
