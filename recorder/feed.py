"""The feed consumer: one WebSocket connection per group of contracts, reconnecting forever.

Each :class:`FeedConnection` opens ``{base_url}/live/data/websocket/contract/{id|name}`` with
the contracts as repeated query parameters and the Authorization header, hands every frame
to ``on_frame`` the moment it arrives, and reconnects with capped exponential backoff and
full jitter (tenacity) on any end that is not a stop. On a stop it sends the closing
handshake and keeps every frame the server sends before its own close frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential
from yarl import URL

from recorder.auth import TokenProvider
from recorder.config import FeedConfig
from recorder.events import FeedEvents, NoEvents
from recorder.errors import FeedError, RefusedError, TransientError
from recorder.logs import scrub

log = structlog.get_logger("recorder.feed")

_Socket = aiohttp.ClientWebSocketResponse[Literal[False]]
FrameSink = Callable[[str, bytes | str, int], object]
_POLICY_VIOLATION = 1008
_CLOSE_NORMAL = struct.pack("!H", 1000) + b"recorder stopping"


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


def now_us() -> int:
    return time.time_ns() // 1000


class _Stopped(Exception):
    """The daemon is stopping: leave the reconnect loop."""


@dataclass
class ConnectionStats:
    """What one connection has done (read by status lines and metrics)."""

    sessions: int = 0
    frames: int = 0
    open: bool = False
    reconnects: int = 0
    last_close: str = ""


class FeedConnection:
    """One subscription (a group of contracts) kept open until ``stop`` is set."""

    def __init__(
        self,
        name: str,
        contracts: Sequence[str],
        config: FeedConfig,
        session: aiohttp.ClientSession,
        tokens: TokenProvider,
        on_frame: FrameSink,
        stop: asyncio.Event,
        events: FeedEvents | None = None,
    ) -> None:
        self.name = name
        self.contracts = tuple(contracts)
        self.config = config
        self.url = stream_url(config.base_url, config.subscribe_by, contracts)
        self._session = session
        self._tokens = tokens
        self._on_frame = on_frame
        self._stop = stop
        self._events: FeedEvents = events or NoEvents()
        self.stats = ConnectionStats()
        self._log = log.bind(connection=name, contracts=len(self.contracts))

    async def run(self) -> None:
        """Keep the subscription open until stopped; backoff restarts after a stable session."""
        while not self._stop.is_set():
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(FeedError),
                wait=wait_random_exponential(multiplier=0.5, max=self.config.reconnect_max_seconds),
                sleep=self._sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._session_once()
            except _Stopped:
                return

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise _Stopped

    def _before_sleep(self, state: RetryCallState) -> None:
        self.stats.reconnects += 1
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        self._log.warning(
            "stream lost; reconnecting",
            reason=str(error),
            refused=isinstance(error, RefusedError),
            attempt=state.attempt_number,
            retry_in_seconds=round(wait, 2),
        )

    async def _session_once(self) -> None:
        """One connection from handshake to close; returns only on a stop or a stable session."""
        if self._stop.is_set():
            raise _Stopped
        token = await self._tokens.token()
        try:
            ws = await self._session.ws_connect(
                self.url,
                headers=self._tokens.header(token),
                heartbeat=self.config.heartbeat_seconds,
                decode_text=False,
                max_msg_size=16 * 1024 * 1024,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise RefusedError(
                    f"handshake refused: HTTP {exc.status}", code=exc.status
                ) from None
            raise TransientError(f"handshake failed: HTTP {exc.status}", code=exc.status) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(
                f"cannot connect: {type(exc).__name__}: {scrub(str(exc))}"
            ) from None

        opened = time.monotonic()
        self.stats.sessions += 1
        self.stats.open = True
        session_id = f"{self.name}.{self.stats.sessions}"
        self._log.info("stream open", session=session_id, url=str(self.url.with_query(None)))
        reader = asyncio.create_task(self._read(ws, session_id), name=f"read-{session_id}")
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                await self._close_gracefully(ws, reader)
        finally:
            self.stats.open = False
            for task in (reader, stopping):
                task.cancel()
            await asyncio.gather(reader, stopping, return_exceptions=True)
            if not ws.closed:
                await ws.close()

        code = ws.close_code
        self.stats.last_close = f"code {code}"
        if self._stop.is_set():
            self._log.info("stream closed for shutdown", session=session_id, code=code)
            raise _Stopped
        reason = f"closed with code {code}" if code is not None else "connection lost"
        if code == _POLICY_VIOLATION:
            raise RefusedError(f"{reason} (policy violation)", code=code)
        if time.monotonic() - opened >= self.config.stable_after_seconds:
            self._log.warning("stream lost after a stable session; reconnecting", reason=reason)
            return
        raise TransientError(reason, code=code)

    async def _read(self, ws: _Socket, session_id: str) -> None:
        on_frame = self._on_frame
        stats = self.stats
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                stats.frames += 1
                on_frame(session_id, msg.data, now_us())
            elif msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                return

    async def _close_gracefully(self, ws: _Socket, reader: asyncio.Task[None]) -> None:
        """Send our close frame, then keep reading until the server's close (bounded)."""
        # aiohttp's ws.close() discards the data frames that arrive before the server's close
        # frame; sending a bare close frame keeps our reader in charge, so those frames are
        # recorded too, and the reader ends when the server's close arrives.
        try:
            await ws.send_frame(_CLOSE_NORMAL, aiohttp.WSMsgType.CLOSE)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return  # a dead socket: nothing more can arrive on it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), self.config.close_timeout_seconds)
