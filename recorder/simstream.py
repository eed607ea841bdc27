"""The simulator's live streams: the stream endpoint, one sender per connection, server closes.

aiohttp behaviour relied on (read in aiohttp 3.14's web_ws.py, _websocket/writer.py and
http_writer.py; only public names are touched, but these properties are not documented):
- After `WebSocketResponse.prepare()`, aiohttp's `WebSocketWriter` writes every uncompressed
  frame straight to `request.transport` with no buffer of its own, so whole frames that fast
  mode writes to that transport interleave safely with aiohttp's own (close, pong).
- The `StreamWriter` that `prepare()` returns has `drain()`, which waits only while the
  protocol is paused, i.e. while the transport's write buffer is above its high-water mark.
- `WebSocketResponse.close()` sets `closed` and writes the close frame without yielding in
  between, so checking `ws.closed` right before each write means no data frame ever follows our
  close frame; and `send_str()` of a small frame writes it before its first suspension point,
  so a frame counted just before `send_str()` is on the wire even if the sender is cancelled.
- `close()` racing a pending `receive()` in another task drops TCP without awaiting the peer's
  close frame, so server-initiated closes first cancel the pending `receive()` (cancel-safe: the
  data queue keeps unread frames) and then call `close()` from the reading task.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from recorder.simcontracts import Endpoint, text_frame
from recorder.simmarket import Message, Subscription

if TYPE_CHECKING:
    from recorder.simulator import RefuseWith, Simulator

STREAM_PATH = "/data-engine/ime/live/data/websocket/contract/{endpoint}"
POLICY_VIOLATION = 1008


@dataclass(frozen=True, slots=True)
class SentFrame:
    """One data frame handed to a connection's transport, in send order."""

    conn: int
    seq: int  # 1-based position on its connection
    contract_id: str
    fault: str | None
    text: str


@dataclass(eq=False)
class _Connection:
    id: int
    ws: web.WebSocketResponse
    transport: asyncio.Transport
    subscription: Subscription
    close_request: asyncio.Future[tuple[int, str]]
    sent: int = 0

    def writable(self) -> bool:
        return not self.ws.closed and not self.transport.is_closing()


class Streams:
    """The stream endpoint of one simulator: its connections, their senders, what they sent.

    The simulator decides who gets in (`check_access`) and what they hear (`subscribe`); it
    sets `rate`, `refuse_with` and `resumed`, and reads the counters, on the server loop.
    """

    def __init__(self, sim: Simulator, clock: Callable[[], datetime]) -> None:
        self.sim = sim
        self.options = sim.options
        self.conns: dict[int, _Connection] = {}
        self.sent: list[SentFrame] = []
        self.sent_by_conn: dict[int, int] = {}
        self.refusals: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()
        self.accepted = 0
        self.rate = sim.options.rate
        self.refuse_with: RefuseWith = sim.options.refuse_with
        self.resumed = asyncio.Event()
        self.resumed.set()
        self._handlers: set[asyncio.Future[Any]] = set()
        self._clock = clock

    def register(self, app: web.Application) -> None:
        app.router.add_get(STREAM_PATH.replace("{endpoint}", "{endpoint:id|name}"), self._stream)

    async def stop(self) -> None:
        """Close every stream with 1001 (going away) and wait for the handlers."""
        self.close_all(1001, "server shutdown")
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=self.options.close_timeout + 1)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, code, reason)

    def abort_all(self) -> None:
        for conn in list(self.conns.values()):
            conn.transport.abort()

    def _close(self, conn: _Connection, code: int, reason: str) -> None:
        if not conn.close_request.done() and not conn.ws.closed:
            self.closes[code] += 1
            conn.close_request.set_result((code, reason))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        endpoint: Endpoint = "id" if request.match_info["endpoint"] == "id" else "name"
        refusal, exp = self.sim.check_access(request, endpoint)
        if refusal is not None:
            self.refusals[refusal] += 1
            if self.refuse_with == "403":  # FastAPI closing before accept answers HTTP 403
                return web.Response(status=403, text="Forbidden")
            refused = web.WebSocketResponse(timeout=self.options.close_timeout)
            await refused.prepare(request)
            await refused.close(code=POLICY_VIOLATION, message=refusal.encode())
            return refused
        idents = request.query.getall("contract_id" if endpoint == "id" else "contract_name")
        subscription = self.sim.subscribe(endpoint, idents)
        ws = web.WebSocketResponse(
            compress=not self.options.fast,  # fast mode writes its own uncompressed frames
            heartbeat=self.options.heartbeat,
            timeout=self.options.close_timeout,
        )
        writer = await ws.prepare(request)
        if request.transport is None:
            return ws
        self.accepted += 1
        closing = asyncio.get_running_loop().create_future()
        conn = _Connection(self.accepted, ws, request.transport, subscription, closing)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.conns[conn.id] = conn
        self.sent_by_conn[conn.id] = 0
        expiry = None
        if exp is not None:
            delay = max(0.0, exp - time.time())
            expiry = asyncio.get_running_loop().call_later(
                delay, self._close, conn, POLICY_VIOLATION, "expired token"
            )
        send = self._send_fast(conn, writer) if self.options.fast else self._send_paced(conn)
        sender = asyncio.create_task(send)
        try:
            await converse(conn.ws, conn.close_request)
        finally:
            if expiry is not None:
                expiry.cancel()
            sender.cancel()
            await asyncio.wait([sender])
            del self.conns[conn.id]
            self._handlers.discard(handler)
        return ws

    # ---- senders ---------------------------------------------------------------------------

    def _record(self, conn: _Connection, messages: Sequence[Message]) -> None:
        if self.options.keep_sent:
            self.sent.extend(
                SentFrame(conn.id, conn.sent + i, m.contract.id, m.fault, m.text)
                for i, m in enumerate(messages, 1)
            )
        conn.sent += len(messages)
        self.sent_by_conn[conn.id] = conn.sent

    async def _send_paced(self, conn: _Connection) -> None:
        """One `send_str` per message at `rate` per second, catching up after stalls."""
        loop = asyncio.get_running_loop()
        limit = self.options.max_messages
        rate, due = self.rate, loop.time()
        while limit is None or conn.sent < limit:
            if not self.resumed.is_set():
                await self.resumed.wait()
                due = loop.time()
            if rate != self.rate:
                rate, due = self.rate, loop.time()
            now = loop.time()
            if rate > 0 and due > now:
                await asyncio.sleep(due - now)
                continue
            if rate > 0:
                due = max(due + 1.0 / rate, now - 1.0)  # catch up at most one second
            elif conn.sent % 64 == 63:
                await asyncio.sleep(0)  # flat out, but let the reader see a close
            if not conn.writable():
                return
            message = conn.subscription.next(self._clock())
            self._record(conn, (message,))  # before the await: the write happens first
            await conn.ws.send_str(message.text)

    async def _send_fast(self, conn: _Connection, writer: AbstractStreamWriter) -> None:
        """Cycle a pool of pre-encoded frames, `fast_batch` frames per `transport.write`."""
        opts = self.options
        limit, size, step = opts.max_messages, opts.fast_pool, opts.fast_batch
        size = size if limit is None else max(1, min(size, limit))
        pool: list[Message] = []
        while len(pool) < size:
            pool.extend(conn.subscription.next(self._clock()) for _ in range(min(512, size)))
            await asyncio.sleep(0)
        del pool[size:]
        frames = [text_frame(m.text.encode()) for m in pool]
        batches = [(i, b"".join(frames[i : i + step])) for i in range(0, size, step)]
        index = 0
        while limit is None or conn.sent < limit:
            if not self.resumed.is_set():
                await self.resumed.wait()
            if not conn.writable():
                return
            start, data = batches[index]
            count = min(step, size - start)
            if limit is not None and limit - conn.sent < count:
                count = limit - conn.sent
                data = b"".join(frames[start : start + count])
            conn.transport.write(data)
            self._record(conn, pool[start : start + count])
            index = (index + 1) % len(batches)
            await writer.drain()  # waits only while the transport is above its high-water mark
            await asyncio.sleep(0)  # let the reader see a client close between batches


async def converse(
    ws: web.WebSocketResponse, close_request: asyncio.Future[tuple[int, str]]
) -> None:
    """Read until the client closes, or close on request with a full close handshake.

    Reading answers pings (autoping) and the client's close (autoclose); client text is
    ignored, there is no dynamic subscribe yet. Our close runs here, not beside a pending
    `receive()`: aiohttp would then drop the TCP connection without awaiting the reply.
    Shared by the simulator and the replay server (recorder/replay.py).
    """
    ends = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
    while not ws.closed:
        receiving = asyncio.ensure_future(ws.receive())
        try:
            await asyncio.wait((receiving, close_request), return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiving.cancel()
            await asyncio.wait([receiving])
        if not receiving.cancelled() and receiving.result().type in ends:
            return
        if close_request.done():
            code, reason = close_request.result()
            await ws.close(code=code, message=reason.encode())
