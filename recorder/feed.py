"""The feed consumer: one WebSocket connection per group of contracts, reconnecting forever.

Each :class:`FeedConnection` opens ``{base_url}/live/data/websocket/contract/{id|name}`` with
the contracts as repeated query parameters and the Authorization header, hands the frames
to ``on_frames`` the moment they arrive (those parsed from one socket read together), and
reconnects with capped exponential backoff and full jitter (tenacity) on any end that is not
a stop. On a stop it sends the closing handshake and keeps every frame the server sends
before its own close frame.

Fault policy: heartbeat pings find dead TCP connections; the no-data watchdog
(``feed.stale_after_seconds``) closes a stream that sent nothing for that long, giving every
new stream the full period (doubled after each stale stream that sent nothing, up to 8x). A
refusal (HTTP 401/403, close 1008) is answered by one new login and an immediate retry;
if the server still refuses, the contracts are bisected with probe streams
(:mod:`recorder.refusals`), the refused ones are dropped and reported, and the rest are
recorded. Probes that deliver frames are sessions too (announced at their first frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import structlog
from aiohttp import WSMsgType
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from yarl import URL

from recorder.auth import TokenProvider
from recorder.config import FeedConfig
from recorder.errors import AllRefusedError, TransientError
from recorder.events import FeedEvents, NoEvents
from recorder.logs import scrub
from recorder.refusals import StreamRefused, all_refused_message, find_refused, next_step
from recorder.streams import (
    Backpressure,
    ConnectionStats,
    FrameSink,
    close_text,
    now_us,
    reconnect_wait,
    refusal_answer,
    stream_url,
)
from recorder.wsqueue import Parsed

log = structlog.get_logger("recorder.feed")

_Socket = aiohttp.ClientWebSocketResponse[Literal[False]]
_POLICY_VIOLATION = 1008
_EXPIRY_SLACK_SECONDS = 1.0  # a 1008 this close to the token's exp is the expiry
_STALE_GROWTH_MAX = 3  # the watchdog period doubles at most this many times
_ENDS = (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)


class _Stopped(Exception):
    """The daemon is stopping: leave the reconnect loop."""


@dataclass
class _Session:
    """One accepted stream (the connection's own, or a probe)."""

    id: str
    contracts: tuple[str, ...]
    endpoint: str
    opened_us: int = field(default_factory=now_us)
    opened: float = field(default_factory=time.monotonic)
    last_frame: float = field(default_factory=time.monotonic)
    frames: int = 0
    announced: bool = False
    close_reason: str = ""


class FeedConnection:
    """One subscription (a group of contracts) kept open until ``stop`` is set."""

    def __init__(
        self,
        name: str,
        contracts: Sequence[str],
        config: FeedConfig,
        session: aiohttp.ClientSession,
        tokens: TokenProvider,
        on_frames: FrameSink,
        stop: asyncio.Event,
        events: FeedEvents | None = None,
        backpressure: Backpressure | None = None,
    ) -> None:
        self.name = name
        self._pressure = backpressure
        self.contracts = tuple(contracts)
        self.config = config
        self.url = stream_url(config.base_url, config.subscribe_by, contracts)
        self._session = session
        self._tokens = tokens
        self._on_frames = on_frames
        self._stop = stop
        self._events: FeedEvents = events or NoEvents()
        self.stats = ConnectionStats()
        self._log = log.bind(connection=name, contracts=len(self.contracts))
        self._seq = 0  # sessions and probes opened, for unique session ids
        self._relogged = False  # logged in again since the last stream that was not refused
        self._stale_streak = 0  # stale streams in a row that sent nothing
        self._token_used: str | None = None

    @property
    def endpoint(self) -> str:
        """The stream URL without its query string."""
        return str(self.url.with_query(None))

    async def run(self) -> None:
        """Keep the subscription open until stopped; backoff restarts after a stable session.

        Raises AllRefusedError when the server refuses every contract even after a new login,
        and AuthError when a login is refused; transient failures are retried forever.
        """
        renewer = asyncio.create_task(self._tokens.keep_fresh(), name=f"tokens-{self.name}")
        try:
            while not self._stop.is_set():
                retrying = AsyncRetrying(
                    retry=retry_if_exception_type(TransientError),
                    wait=reconnect_wait(self.config),
                    sleep=self._sleep,
                    before_sleep=self._before_sleep,
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        await self._attempt()
        except _Stopped:
            return
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

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
            attempt=state.attempt_number,
            retry_in_seconds=round(wait, 2),
        )

    async def _attempt(self) -> None:
        """One stream and what its refusal calls for; returning means: again at once."""
        try:
            await self._session_once()
            return
        except StreamRefused as exc:
            refused = exc
        step = next_step(refused, self._relogged)
        if step == "bisect":
            self._relogged = False
            await self._drop_refused(refused)
        else:
            why = {"answer": refused.answer, "token_expired": refused.expired}
            self._log.warning("stream refused; logging in again", **why)
            await self._tokens.refresh(replacing=self._token_used)
            self._relogged = True
            if step == "relogin_then_wait":
                raise TransientError(f"{refused} again soon after a new login", code=refused.code)
        self.stats.reconnects += 1

    async def _open(self, url: URL, token: str) -> _Socket:
        """The handshake, with its failures translated: StreamRefused or TransientError."""
        try:
            return await self._session.ws_connect(
                url,
                headers=self._tokens.header(token),
                heartbeat=self.config.heartbeat_seconds,
                decode_text=False,
                max_msg_size=16 * 1024 * 1024,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise StreamRefused(f"HTTP {exc.status}", code=exc.status, at_once=True) from None
            raise TransientError(f"handshake failed: HTTP {exc.status}", code=exc.status) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(
                f"cannot connect: {type(exc).__name__}: {scrub(str(exc))}"
            ) from None

    def _new_session(self, contracts: tuple[str, ...], kind: str = "") -> _Session:
        self._seq += 1
        return _Session(f"{self.name}.{self._seq}{kind}", contracts, self.endpoint)

    def _announce(self, s: _Session) -> None:
        s.announced = True
        self._events.session_opened(s.id, s.endpoint, s.contracts, s.opened_us)

    def _closed(self, s: _Session, code: int | None, reason: str, stale: bool = False) -> None:
        if s.announced:
            self._events.session_closed(s.id, now_us(), code, reason, s.frames, stale)

    async def _session_once(self) -> None:
        """One stream from handshake to close; returns only after a stable stream."""
        if self._stop.is_set():
            raise _Stopped
        token = await self._tokens.token()
        self._token_used, valid_until = token, self._tokens.expires_at
        connected_at = time.time()
        ws = await self._open(self.url, token)
        s = self._new_session(self.contracts)
        self._announce(s)
        self.stats.sessions += 1
        self.stats.open = True
        self._log.info("stream open", session=s.id, url=self.endpoint)
        period = self.config.stale_after_seconds * 2 ** min(self._stale_streak, _STALE_GROWTH_MAX)
        try:
            ended = await self._converse(ws, s, watch=period)
        finally:
            self.stats.open = False
        code = ws.close_code
        self.stats.last_close = f"code {code}"
        if self._stop.is_set():
            self._log.info("stream closed for shutdown", session=s.id, code=code)
            raise _Stopped
        stale = ended == "stale"
        stable = time.monotonic() - s.opened >= self.config.stable_after_seconds
        self._stale_streak = self._stale_streak + 1 if stale and s.frames == 0 else 0
        if code == _POLICY_VIOLATION and not stale:
            quick = time.monotonic() - s.opened < self.config.refusal_probe_seconds
            exp = valid_until if valid_until is not None else -1.0
            expired = connected_at < exp <= time.time() + _EXPIRY_SLACK_SECONDS
            answer = refusal_answer(s.close_reason)
            at_once = s.frames == 0 and quick
            raise StreamRefused(answer, code=code, at_once=at_once, expired=expired, stable=stable)
        self._relogged = False
        reason = f"no data for {period:g} s" if stale else s.close_reason or close_text(code)
        if stale:
            self.stats.stale_closes += 1
            self._log.warning("no data; reconnecting", session=s.id, idle_seconds=period)
        if stable:
            self._log.warning("stream lost after a stable session; reconnecting", reason=reason)
            return
        raise TransientError(reason, code=code)

    async def _converse(
        self, ws: _Socket, s: _Session, *, watch: float = 0.0, probe_for: float | None = None
    ) -> str:
        """Hand ``ws``'s frames on until the server closes it ("server"), a stop ("stop"), the
        watchdog after ``watch`` silent seconds ("stale") or ``probe_for`` s ("timeout"); always
        closes the socket and reports the session's end."""
        reader = asyncio.create_task(self._read(ws, s), name=f"read-{s.id}")
        tasks = {reader, asyncio.create_task(self._stop.wait())}
        watchdog = asyncio.create_task(self._watch(s, watch)) if watch > 0 else None
        if watchdog is not None:
            tasks.add(watchdog)
        ended, reason = "cancelled", "cancelled"
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=probe_for, return_when=asyncio.FIRST_COMPLETED
            )
            if reader.done():
                ended, reason = "server", s.close_reason or close_text(ws.close_code)
            elif self._stop.is_set():
                ended, reason = "stop", "shutdown"
            elif watchdog in done:
                ended, reason = "stale", f"no data for {watch:g} s"
            else:
                ended, reason = "timeout", "probe done"
            if ended != "server":
                await self._close_gracefully(ws, reader, reason.encode())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not ws.closed:
                await ws.close()
            reason = "shutdown" if self._stop.is_set() else reason
            self._closed(s, ws.close_code, reason, ended == "stale")
        return ended

    async def _read(self, ws: _Socket, s: _Session) -> None:
        on_frames = self._on_frames
        stats = self.stats
        session_id = s.id
        pressure = self._pressure
        parsed = Parsed(ws)
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                if not s.announced:
                    self._announce(s)
                received = now_us()  # every frame taken below had arrived by now
                frames = [msg.data]
                while parsed.data_next():  # those aiohttp parsed from the same socket reads
                    frames.append((await parsed.read()).data)  # returns without suspending
                on_frames(session_id, frames, received)
                s.frames += len(frames)
                stats.frames += len(frames)
                s.last_frame = time.monotonic()
                if pressure is not None and pressure.full:
                    # stop reading (TCP holds the server back) while memory drains to disk;
                    # the watchdog's clock stops too, for a wait is not a silent stream
                    await pressure.room()
                    s.last_frame = time.monotonic()
            elif msg.type in _ENDS:
                if msg.type is WSMsgType.CLOSE and msg.extra:
                    s.close_reason = scrub(str(msg.extra))[:200]
                return

    @staticmethod
    async def _watch(s: _Session, period: float) -> None:
        """Return once the stream has sent no frame for ``period`` seconds."""
        # the deadline moves with every frame; an Event set per frame would tax the hot path
        while (idle := time.monotonic() - s.last_frame) < period:  # noqa: ASYNC110
            await asyncio.sleep(period - idle)

    async def _close_gracefully(self, ws: _Socket, reader: asyncio.Task[None], why: bytes) -> None:
        """Send our close frame, then keep reading until the server's close (bounded)."""
        # aiohttp's ws.close() discards the data frames that arrive before the server's close
        # frame; sending a bare close frame keeps our reader in charge, so those frames are
        # recorded too, and the reader ends when the server's close arrives.
        payload = struct.pack("!H", 1000) + why
        try:
            await ws.send_frame(payload, WSMsgType.CLOSE)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return  # a dead socket: nothing more can arrive on it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), self.config.close_timeout_seconds)

    async def _drop_refused(self, refused: StreamRefused) -> None:
        """Find the refused contracts by probing, report them, and keep the rest."""
        contracts = self.contracts
        self._log.warning("refused with a fresh token; probing contracts", answer=refused.answer)
        found = await find_refused(contracts, self._probe)
        if not found:
            raise TransientError(f"{refused}, but every probe was accepted", code=refused.code)
        self._events.contracts_rejected(found, now_us(), f"refused: {refused.answer}")
        self.stats.rejected += found
        self._log.warning(
            "contracts refused by the server; recording the rest without them",
            refused=list(found),
            answer=refused.answer,
            remaining=len(contracts) - len(found),
        )
        if len(found) == len(contracts):
            exp = self._tokens.expires_at
            expired = exp if exp is not None and exp < time.time() else None
            who, answer = self._tokens.who, refused.answer
            message = all_refused_message(who, self.endpoint, answer, found, expired)
            raise AllRefusedError(message, code=refused.code)
        dropped = set(found)
        self.contracts = tuple(c for c in contracts if c not in dropped)
        self.url = stream_url(self.config.base_url, self.config.subscribe_by, self.contracts)
        self._log = log.bind(connection=self.name, contracts=len(self.contracts))

    async def _probe(self, contracts: tuple[str, ...]) -> str | None:
        """Open a stream for ``contracts`` for the probe wait: None if accepted, else the answer.

        Frames that arrive are real data: they go to ``on_frames`` under the probe's session.
        """
        if self._stop.is_set():
            raise _Stopped
        self.stats.probes += 1
        url = stream_url(self.config.base_url, self.config.subscribe_by, contracts)
        try:
            ws = await self._open(url, await self._tokens.token())
        except StreamRefused as refused:
            return refused.answer
        s = self._new_session(contracts, ".probe")
        ended = await self._converse(ws, s, probe_for=max(0.0, self.config.refusal_probe_seconds))
        if self._stop.is_set():
            raise _Stopped
        if ended == "timeout":
            return None
        if ws.close_code == _POLICY_VIOLATION:
            return refusal_answer(s.close_reason)
        raise TransientError(f"probe stream: {close_text(ws.close_code)}", code=ws.close_code)
