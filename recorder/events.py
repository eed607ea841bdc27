"""What the feed tells the rest of the recorder about its connections (sessions and gaps).

The feed calls these hooks; the pipeline journals them and turns them into rows of the
``sessions`` and ``gaps`` tables. Every time is UTC microseconds since the epoch.
"""

from __future__ import annotations

from typing import Protocol


class FeedEvents(Protocol):
    """Receives connection life-cycle events from :class:`recorder.feed.FeedConnection`."""

    def session_opened(
        self, session: str, endpoint: str, contracts: tuple[str, ...], at_us: int
    ) -> None:
        """A stream was accepted: ``contracts`` are being received from ``at_us`` on."""

    def session_closed(
        self, session: str, at_us: int, code: int | None, reason: str, frames: int, stale: bool
    ) -> None:
        """A stream ended (``stale``: closed by the no-data watchdog); its contracts are not
        received from ``at_us`` until a later session opens with them."""

    def contracts_rejected(self, contracts: tuple[str, ...], at_us: int, reason: str) -> None:
        """The server refuses these contracts; they are not recorded from ``at_us`` on."""


class NoEvents:
    """A FeedEvents that ignores everything (tools and tests that need no bookkeeping)."""

    def session_opened(
        self, session: str, endpoint: str, contracts: tuple[str, ...], at_us: int
    ) -> None:
        pass

    def session_closed(
        self, session: str, at_us: int, code: int | None, reason: str, frames: int, stale: bool
    ) -> None:
        pass

    def contracts_rejected(self, contracts: tuple[str, ...], at_us: int, reason: str) -> None:
        pass
