"""recorder/wsqueue.py: data messages read from aiohttp's parsed queue, over a real socket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from recorder.wsqueue import Parsed

TOKEN = "static-test-token"


async def _read_all(url: str, expect: int, close: Any) -> tuple[list[bytes], int, Any, bool]:
    """Every data message until the server's close; how many came through :class:`Parsed`."""
    texts: list[bytes] = []
    through_queue = 0
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": TOKEN}, decode_text=False) as ws,
    ):
        parsed = Parsed(ws)
        closing = False
        while True:
            msg = await ws.receive(timeout=10)
            while msg.type is WSMsgType.TEXT:
                texts.append(msg.data)
                if not parsed.data_next():
                    break
                msg = await parsed.read()
                through_queue += 1
            else:
                return texts, through_queue, msg, parsed.active
            if len(texts) >= expect and not closing:
                closing = True
                await asyncio.to_thread(close)


def test_the_installed_aiohttp_offers_its_parsed_queue(simulator: Any) -> None:
    """If an aiohttp upgrade moves the queue, this fails instead of the recorder slowing."""
    sim = simulator(contracts=2, static_token=TOKEN, max_messages=1)

    async def active() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                sim.stream_url("id", ["1001"]), headers={"Authorization": TOKEN}
            ) as ws,
        ):
            return Parsed(ws).active

    assert asyncio.run(active()) is True


def test_a_burst_is_read_in_order_and_the_close_after_it_by_receive(simulator: Any) -> None:
    """Fast mode writes 256 frames at once: most are taken from the queue, none reordered."""
    sim = simulator(contracts=10, fast=True, static_token=TOKEN, max_messages=6_000, keep_sent=True)
    url = sim.stream_url("id", [c.id for c in sim.contracts])

    texts, through_queue, last, active = asyncio.run(
        _read_all(url, 6_000, lambda: sim.close_all(1011, "end of test"))
    )
    assert active
    assert texts == [frame.text.encode() for frame in sim.sent]
    assert len(texts) == 6_000
    assert through_queue > 3_000  # a frame read by receive() leaves the rest of its read queued
    assert (last.type, last.data, last.extra) == (WSMsgType.CLOSE, 1011, "end of test")


def test_an_inactive_queue_leaves_every_message_to_receive() -> None:
    """Without aiohttp's queue (another aiohttp), nothing is read past ``receive()``."""

    class Elsewhere:
        _reader = object()

    parsed = Parsed(Elsewhere())  # type: ignore[arg-type]
    assert parsed.active is False
    assert parsed.data_next() is False
