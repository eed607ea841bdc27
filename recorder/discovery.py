"""Discovery: the contract universe from ``feed.contracts``, ``feed.markets`` and ``feed.search``.

Each name fragment of ``feed.search`` is searched in each market of ``feed.markets`` (in all
three when ``markets`` is empty); a market listed without fragments is taken whole (searched
with an empty fragment). Explicit contracts are always kept, first, in the given order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

import structlog

from recorder.config import FeedConfig
from recorder.reference import MARKETS, market_of
from recorder.rest import RestClient

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
