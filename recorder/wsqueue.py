"""Data messages aiohttp has already parsed, taken without ``receive()``'s machinery.

aiohttp's reader parses every WebSocket frame of one socket read into its queue at once (in
the throughput benchmark's burst, ~370 frames wait there each time the reader looks);
``receive()`` then hands them out one at a time, each through a closed/closing check, a
timeout context, the queue's ``read()`` and the control-frame dispatch.

:class:`Parsed` tells whether the message at the head of that queue is a data message (text
or binary) and then reads it with the queue's own ``read()``, which keeps the queue's size
accounting and resumes a paused parser, and does not suspend when a message is waiting. It
never reads anything else: a close, ping, pong or error stays first in the queue for
``receive()`` to handle as usual, so the order of frames and the close handshake are aiohttp's.

The queue is aiohttp's private state (``ClientWebSocketResponse._reader``, a
``WebSocketDataQueue`` with its ``_buffer``). When it is not there as expected (another
aiohttp), :attr:`active` is False and :meth:`data_next` always answers False: every message
then goes through ``receive()``, slower and the same. ``tests/test_wsqueue.py`` fails when the
installed aiohttp takes that path, so an upgrade cannot slow the recorder silently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSMessage, WSMsgType

_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


class Parsed:
    """The data messages parsed and waiting in one socket's queue; see the module docstring."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[Any]) -> None:
        queue = getattr(ws, "_reader", None)
        buffer = getattr(queue, "_buffer", None)
        read = getattr(queue, "read", None)
        # inactive: an empty queue of our own, never filled, so read is never called
        self._buffer: deque[tuple[tuple[Any, ...], int]] = deque()
        self.read: Callable[[], Awaitable[WSMessage]] = _nothing
        if isinstance(buffer, deque) and callable(read):
            self._buffer, self.read = buffer, read
        self.active = self._buffer is buffer

    def data_next(self) -> bool:
        """Whether the next message is parsed already and carries data: :attr:`read` takes it."""
        buffer = self._buffer
        # an entry is (message, size), and a message's first field is its type
        return bool(buffer) and buffer[0][0][0] in _DATA


async def _nothing() -> WSMessage:
    raise AssertionError("an inactive queue is never read")
