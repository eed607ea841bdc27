"""Feed streams as plain values: URLs, contract groups, backoff, counters, sink types, end texts.

Nothing here does I/O: :class:`recorder.feed.FeedConnection` builds its stream URLs and
reconnect waits from these, counts into :class:`ConnectionStats`, hands its frames to a
:data:`FrameSink` and pauses on :class:`Backpressure`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tenacity import wait_random_exponential
from tenacity.wait import wait_base
from yarl import URL

from recorder.config import FeedConfig

#: takes (session id, frames received together in order, their receive time in µs)
FrameSink = Callable[[str, list[bytes | str], int], object]


def stream_url(base_url: str, subscribe_by: str, contracts: Sequence[str]) -> URL:
    """The stream endpoint with one ``contract_id``/``contract_name`` parameter per contract."""
    param = "contract_id" if subscribe_by == "id" else "contract_name"
    endpoint = f"{base_url.rstrip('/')}/live/data/websocket/contract/{subscribe_by}"
    return URL(endpoint).with_query([(param, c) for c in contracts])


def split_contracts(contracts: Sequence[str], per_connection: int) -> list[tuple[str, ...]]:
    """Groups of at most ``per_connection`` contracts, in the given order."""
    return [
        tuple(contracts[i : i + per_connection]) for i in range(0, len(contracts), per_connection)
    ]


def reconnect_wait(config: FeedConfig) -> wait_base:
    """Full-jitter exponential backoff: uniform in [0, 0.5 * 2^(n-1)] s, capped by the config."""
    return wait_random_exponential(multiplier=0.5, max=config.reconnect_max_seconds)


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class ConnectionStats:
    """What one connection has done (read by status lines and metrics)."""

    sessions: int = 0
    frames: int = 0
    open: bool = False
    reconnects: int = 0
    last_close: str = ""
    probes: int = 0
    stale_closes: int = 0
    rejected: tuple[str, ...] = ()


class Backpressure(Protocol):
    """What a frame sink tells the readers: ``full`` means stop reading until ``room()``."""

    full: bool

    async def room(self) -> None: ...


def refusal_answer(close_reason: str) -> str:
    return "close code 1008 (policy violation)" + (f": {close_reason}" if close_reason else "")


def close_text(code: int | None) -> str:
    return "connection lost" if code in (None, 1006) else f"closed with code {code}"
