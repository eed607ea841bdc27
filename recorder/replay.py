"""The replay server: recorded history served over the live feed's protocol.

It speaks what the live service speaks (PROTOCOL.md): ``POST /auth/user/token/issue`` answers
201 with ``{"Authorization": "<jwt>"}``; the two stream endpoints
``/data-engine/ime/live/data/websocket/contract/{id|name}`` take repeated ``contract_id`` /
``contract_name`` parameters and the ``Authorization`` header (raw or ``Bearer``), and refuse
a bad token or an unknown contract with close code 1008 (or HTTP 403). So a client written
for the live feed, the recorder included, consumes history unchanged.

Each accepted stream replays its contracts' messages from ``start`` to ``end`` in recorded
``(exchange_ts, seq)`` order, several contracts interleaved, each message rebuilt by
:meth:`recorder.store.Store.replay` with the identifier key of the endpoint (``contractId``
on ``/id``, ``contractName`` on ``/name``). Its first message goes at once, the next ones at
the recorded pace divided by ``speed`` (or as fast as the client reads); after the last one
the stream stays open and idle, like a quiet live feed. Every stream has its own timeline: a
client that connects again hears the history again from ``start``. A token is checked at the
handshake only, so a long replay is never cut by its expiry.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from recorder.simstream import POLICY_VIOLATION, STREAM_PATH, converse
from recorder.simulator import (
    TOKEN_PATH,
    HeaderScheme,
    RefuseWith,
    Simulator,
    SimulatorOptions,
    served_urls,
)
from recorder.store import Store

log = structlog.get_logger("recorder.replay")

OnSent = Callable[[int], object]
_Chunk = list[tuple[int, str]]


@dataclass(frozen=True)
class ReplayOptions:
    """What a replay server serves and whom it lets in (defaults: everyone, recorded pace)."""

    data_dir: Path
    start: datetime | None = None
    end: datetime | None = None  # exclusive
    speed: float | None = 1.0  # recorded pace times this; None: as fast as the client reads
    host: str = "127.0.0.1"
    port: int = 0
    username: str | None = None  # with `password`: only these credentials get a token
    password: str | None = None
    header_scheme: HeaderScheme = "any"
    refuse_with: RefuseWith = "1008"
    token_ttl_seconds: int = 3600
    partition_timezone: str | None = None  # of the store (see Store); None: any
    close_timeout: float = 5.0
    chunk: int = 512  # messages read from the store at a time, off the event loop
    snapshots: bool = True  # replay the snapshots taken at each connect as ordinary messages

    def __post_init__(self) -> None:
        if self.speed is not None and not self.speed > 0:
            raise ValueError(f"speed must be above 0, not {self.speed}")
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        if self.chunk < 1:
            raise ValueError("chunk must be at least 1")


class ReplayServer:
    """Serves a data directory on the caller's event loop until :meth:`stop`.

    ``on_sent(n)`` is called after every ``n`` messages sent on any stream (progress).
    """

    def __init__(self, options: ReplayOptions, on_sent: OnSent | None = None) -> None:
        self.options = opts = options
        self.port = opts.port
        self.store = Store(opts.data_dir, opts.partition_timezone)
        # the simulator's token book: issue_token, token_refusal (same JWTs, same checks)
        self._tokens = Simulator(
            SimulatorOptions(
                contracts=1,
                header_scheme=opts.header_scheme,
                token_ttl_seconds=opts.token_ttl_seconds,
            )
        )
        self._on_sent = on_sent
        self.contracts: frozenset[str] = frozenset()
        self.sent: Counter[int] = Counter()  # messages sent, per stream number
        self.refusals: Counter[str] = Counter()
        self.logins = 0
        self._accepted = 0
        self._closers: dict[int, asyncio.Future[tuple[int, str]]] = {}
        self._handlers: set[asyncio.Future[Any]] = set()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Read the store's contracts, bind and serve; ``port`` holds the real port afterwards."""
        self.contracts = frozenset(await asyncio.to_thread(self.store.contracts))
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self._login)
        app.router.add_get(STREAM_PATH.replace("{endpoint}", "{endpoint:id|name}"), self._stream)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        """Close every stream with 1001 (going away), wait for the handlers, free the port."""
        for closer in self._closers.values():
            if not closer.done():
                closer.set_result((1001, "server shutdown"))
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=self.options.close_timeout + 1)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """WebSocket base, as ``feed.base_url`` wants it."""
        return served_urls(self.options.host, self.port)[0]

    @property
    def token_url(self) -> str:
        """The login endpoint, as ``auth.token_url`` wants it."""
        return served_urls(self.options.host, self.port)[1]

    # ---- HTTP handlers ---------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        user = form.get("UserName_or_Email", form.get("username"))
        password = form.get("Password", form.get("password"))
        if not isinstance(user, str) or not isinstance(password, str):
            return web.json_response({"detail": "username and password are required"}, status=401)
        wanted = (self.options.username, self.options.password)
        if wanted != (None, None) and (user, password) != wanted:
            return web.json_response({"detail": "invalid username or password"}, status=401)
        self.logins += 1
        token = self._tokens.issue_token(username=user)
        return web.json_response({"Authorization": token}, status=201)

    def _refusal(self, request: web.Request, idents: list[str]) -> str | None:
        refusal = self._tokens.token_refusal(request)
        if refusal is not None:
            return refusal
        if not idents:
            return "no contract"
        if any(ident not in self.contracts for ident in idents):
            return "unknown contract"  # like the real server, never says which one
        return None

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        by_id = request.match_info["endpoint"] == "id"
        param = "contract_id" if by_id else "contract_name"
        idents = list(dict.fromkeys(request.query.getall(param, [])))
        refusal = self._refusal(request, idents)
        if refusal is not None:
            self.refusals[refusal] += 1
            if self.options.refuse_with == "403":  # FastAPI closing before accept answers 403
                return web.Response(status=403, text="Forbidden")
            refused = web.WebSocketResponse(timeout=self.options.close_timeout)
            await refused.prepare(request)
            await refused.close(code=POLICY_VIOLATION, message=refusal.encode())
            return refused
        ws = web.WebSocketResponse(timeout=self.options.close_timeout)
        await ws.prepare(request)
        self._accepted += 1
        number = self._accepted
        closer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._closers[number] = closer
        self.sent[number] = 0
        id_key = "contractId" if by_id else "contractName"
        log.info("replay stream open", stream=number, contracts=len(idents), id_key=id_key)
        sender = asyncio.create_task(self._send(ws, number, idents, id_key))
        try:
            await converse(ws, closer)
        finally:
            sender.cancel()
            await asyncio.wait([sender])
            del self._closers[number]
            self._handlers.discard(handler)
            log.info("replay stream closed", stream=number, sent=self.sent[number])
        return ws

    # ---- sending ---------------------------------------------------------------------------

    async def _send(
        self, ws: web.WebSocketResponse, number: int, contracts: list[str], id_key: str
    ) -> None:
        """Send the history of ``contracts`` at the recorded pace, then return (idle stream)."""
        opts = self.options
        messages = self.store.replay_timed(
            contracts, opts.start, opts.end, id_key=id_key, snapshots=opts.snapshots
        )
        chunks = _chunks(messages, opts.chunk)
        loop = asyncio.get_running_loop()
        origin: tuple[int, float] | None = None  # (first exchange_us, loop time it was sent)
        empty: _Chunk = []
        # one read at a time runs in a worker thread, the next one while this one is sent;
        # awaited through a shield, so a cancel never leaves the generator mid-step
        pending = loop.run_in_executor(None, next, chunks, empty)
        try:
            while chunk := await asyncio.shield(pending):
                pending = loop.run_in_executor(None, next, chunks, empty)
                for i, (exchange_us, text) in enumerate(chunk):
                    if opts.speed is not None:
                        if origin is None:
                            origin = (exchange_us, loop.time())
                        due = origin[1] + (exchange_us - origin[0]) / 1e6 / opts.speed
                        if due > loop.time():
                            await asyncio.sleep(due - loop.time())
                    elif i % 64 == 63:
                        await asyncio.sleep(0)  # flat out, but let the reader see a close
                    if ws.closed:
                        return
                    await ws.send_str(text)
                    self.sent[number] += 1
                    if self._on_sent is not None:
                        self._on_sent(1)
            log.info("replay stream finished; idle", stream=number, sent=self.sent[number])
        except ConnectionError:
            return  # the client went away mid-send; converse() sees the end
        finally:
            await asyncio.wait([pending])
            await loop.run_in_executor(None, chunks.close)


def _chunks(
    messages: Generator[tuple[int, dict[str, Any]]], size: int
) -> Generator[_Chunk, None, None]:
    """Encoded messages, ``size`` at a time (run in a worker thread: DuckDB and JSON work)."""
    try:
        while chunk := [
            (us, orjson.dumps(m).decode()) for us, m in itertools.islice(messages, size)
        ]:
            yield chunk
    finally:
        messages.close()


def run_replay(options: ReplayOptions, *, bar: bool | None = None) -> None:
    """Serve until SIGINT or SIGTERM, with a progress display (the ``replay`` command)."""
    asyncio.run(_serve_until_signal(options, bar))


async def _serve_until_signal(options: ReplayOptions, bar: bool | None) -> None:
    from recorder.progress import progress

    store = Store(options.data_dir, options.partition_timezone)
    total = await asyncio.to_thread(store.message_count, None, options.start, options.end)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        with progress(total, "replaying", unit="messages", bar=bar) as advance:
            server = ReplayServer(options, on_sent=advance)
            await server.start()
            log.info(
                "replay listening",
                base_url=server.base_url,
                token_url=server.token_url,
                contracts=len(server.contracts),
                messages=total,
                speed=options.speed or "as fast as possible",
            )
            try:
                await stop.wait()
            finally:
                await server.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
