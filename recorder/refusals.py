"""Refused streams: what a refusal means, what to do next, and which contracts are refused.

The server refuses a whole subscription (HTTP 401/403 at the handshake, or close 1008 after
the accept) and never says which contract it objects to (PROTOCOL.md, "Rejection"). A
connection therefore logs in again once, and if a fresh token does not help, bisects its
contracts with probe streams: a refused group is split in halves, both halves are probed at
once, and each refused half is split again, down to single contracts. For ``k`` refused
contracts out of ``n`` that costs at most ``2k * ceil(log2 n)`` probes (``2n - 2`` when all
are refused) and ``ceil(log2 n)`` rounds of wall time; a refused probe answers in one round
trip, an accepted one after the probe wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Literal, TypeVar

from recorder.errors import RefusedError

_T = TypeVar("_T")

Probe = Callable[[tuple[str, ...]], Awaitable[str | None]]
"""Opens a stream for some contracts: None if accepted, else the server's answer."""

Step = Literal["relogin", "relogin_then_wait", "bisect"]


class StreamRefused(RefusedError):
    """One refused stream, with what decides the next step."""

    def __init__(
        self,
        answer: str,
        *,
        code: int,
        at_once: bool,
        expired: bool = False,
        stable: bool = False,
    ) -> None:
        super().__init__(f"refused: {answer}", code=code)
        self.answer = answer  # what the server said: "HTTP 403" or "close code 1008 ..."
        self.at_once = at_once  # at the handshake, or 1008 before any frame and the probe wait
        self.expired = expired  # 1008 after the exp of a token that was valid at connect
        self.stable = stable  # the stream had been open for feed.stable_after_seconds


def next_step(refusal: StreamRefused, relogged: bool) -> Step:
    """What a connection does about ``refusal`` (``relogged``: it already logged in again).

    A first refusal, an expiry and the end of a stable stream are cured by a new login and an
    immediate retry; a refusal at once with a fresh token calls for the bisection; a stream
    that is accepted and then refused again soon after a new login waits with the backoff.
    """
    if refusal.expired or refusal.stable or not relogged:
        return "relogin"
    if refusal.at_once:
        return "bisect"
    return "relogin_then_wait"


async def find_refused(
    contracts: Sequence[str], probe: Probe, parallel: int = 8
) -> tuple[str, ...]:
    """The contracts the server refuses among ``contracts``, which it refuses as a whole.

    At most ``parallel`` probes are open at a time. The result keeps the given order; it is
    empty when every half was accepted (the server refused the whole for another reason).
    """
    slots = asyncio.Semaphore(parallel)

    async def limited(group: tuple[str, ...]) -> str | None:
        async with slots:
            return await probe(group)

    return await _bisect(tuple(contracts), limited)


async def _bisect(group: tuple[str, ...], probe: Probe) -> tuple[str, ...]:
    if len(group) <= 1:
        return group
    middle = (len(group) + 1) // 2
    halves = (group[:middle], group[middle:])
    answers = await together([probe(half) for half in halves])
    refused = [half for half, answer in zip(halves, answers, strict=True) if answer is not None]
    found = await together([_bisect(half, probe) for half in refused])
    return tuple(contract for group_found in found for contract in group_found)


async def together(awaitables: Sequence[Awaitable[_T]]) -> list[_T]:
    """Await all at once; on the first error cancel the others and raise that error."""
    tasks = [asyncio.ensure_future(_as_coroutine(a)) for a in awaitables]
    try:
        if tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]


async def _as_coroutine(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def all_refused_message(
    who: str,
    endpoint: str,
    answer: str,
    contracts: Sequence[str],
    expired_at: float | None = None,
) -> str:
    """The one message of :class:`~recorder.errors.AllRefusedError` (never the token)."""
    shown = ", ".join(contracts[:10])
    if len(contracts) > 10:
        shown += f" and {len(contracts) - 10} more"
    text = (
        f"the server refuses every contract of this connection, even after a new login: "
        f"user {who!r} at {endpoint} was answered {answer} (refused: {shown})"
    )
    if expired_at is not None:
        when = datetime.fromtimestamp(expired_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text += f"; the token expired at {when}"
    return text
