"""Consumers compared with the recorder, each run in a process of its own.

- ``ceiling``: aiohttp, the same connections as the recorder (50 contracts each, bytes
  frames), receiving and discarding: the most any Python consumer of this stream can do.
- ``hedgetech``: the official client (hedgetech 0.4.0, ``DataEngine_Ime_AsyncClient``
  ``websocket_by_id``) consuming the same stream. Its URL is hard-coded to the real host; the
  only change is the host, swapped in the ``connect`` its module calls.
- ``naive``: a recorder written the way the API documents suggest: the ``websockets``
  library, ``json.loads`` per message, and every ``--every`` messages a pandas DataFrame
  (``json_normalize``) written to Parquet. No journal, no partitions.

Each stops once ``--expect`` messages arrived and prints one JSON line: the messages, the
wall-clock nanoseconds of the first and the last frame and, for ``naive``, of the moment its
last file was written.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from bench.common import contract_ids

STREAM = "/live/data/websocket/contract/id"


class Count:
    """Messages seen by all connections; ``done`` is set at the expected total."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.messages = 0
        self.first_ns = 0
        self.last_ns = 0
        self.done = asyncio.Event()

    def add(self, n: int = 1) -> None:
        now = time.time_ns()
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        self.messages += n
        if self.messages >= self.expect:
            self.done.set()


async def login(token_url: str) -> str:
    form = {"UserName_or_Email": "demo", "Password": "demo"}
    async with aiohttp.ClientSession() as http, http.post(token_url, data=form) as answer:
        answer.raise_for_status()
        return str((await answer.json())["Authorization"])


def groups(total: int, per: int) -> list[list[str]]:
    ids = contract_ids(total)
    return [ids[i : i + per] for i in range(0, total, per)]


async def _until_done(count: Count, tasks: list[asyncio.Task[Any]]) -> None:
    waiter = asyncio.create_task(count.done.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in [waiter, *tasks]:
        task.cancel()
    await asyncio.gather(waiter, *tasks, return_exceptions=True)


# ---------------------------------------------------------------------- (a) the ceiling


async def ceiling(args: argparse.Namespace, count: Count) -> dict[str, Any]:
    token = await login(args.token_url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(contracts: list[str]) -> None:
            url = URL(args.base_url + STREAM).with_query([("contract_id", c) for c in contracts])
            async with http.ws_connect(
                url, headers={"Authorization": token}, decode_text=False, max_msg_size=1 << 24
            ) as ws:
                add = count.add
                while True:
                    msg = await ws.receive()
                    if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        add()
                    else:
                        return

        tasks = [asyncio.create_task(one(g)) for g in groups(args.contracts, args.per_connection)]
        await _until_done(count, tasks)
    return {}


# ---------------------------------------------------------------------- (b) the official client


def _redirect_hedgetech(base_url: str) -> None:
    """Point hedgetech's hard-coded wss://core.hedgetech.ir at the simulator; nothing else."""
    module = importlib.import_module("HedgeTech.DataEngine.__ime.__AsyncClient")
    real_connect: Callable[..., Any] = module.connect
    local = base_url.removesuffix("/data-engine/ime")

    def connect(uri: str, **kwargs: Any) -> Any:
        return real_connect(uri.replace("wss://core.hedgetech.ir", local), **kwargs)

    module.connect = connect


async def hedgetech(args: argparse.Namespace, count: Count) -> dict[str, Any]:
    import httpx
    from HedgeTech.Auth import AuthAsyncClient
    from HedgeTech.DataEngine import DataEngine_Ime_AsyncClient

    _redirect_hedgetech(args.base_url)
    token = await login(args.token_url)
    async with httpx.AsyncClient() as http:
        # AuthAsyncClient.login() needs HTTP/2 over TLS to the real host; this is its result
        auth = AuthAsyncClient(httpx_Client=http, token={"Authorization": token})
        client = DataEngine_Ime_AsyncClient(auth)

        async def one(contracts: list[str]) -> None:
            async for _message in client.websocket_by_id(contracts):
                count.add()

        tasks = [asyncio.create_task(one(g)) for g in groups(args.contracts, args.per_connection)]
        await _until_done(count, tasks)
    return {"hedgetech": importlib.metadata.version("hedgetech")}


# ---------------------------------------------------------------------- (c) a naive recorder


async def naive(args: argparse.Namespace, count: Count) -> dict[str, Any]:
    import pandas as pd
    import websockets

    token = await login(args.token_url)
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    batch: list[dict[str, Any]] = []
    files: list[Path] = []

    def write() -> None:
        frame = pd.json_normalize(batch)
        path = out / f"part-{len(files):05d}.parquet"
        frame.to_parquet(path)
        files.append(path)
        batch.clear()

    async def one(contracts: list[str]) -> None:
        query = "&".join(f"contract_id={c}" for c in contracts)
        url = f"{args.base_url}{STREAM}?{query}"
        async with websockets.connect(url, additional_headers={"Authorization": token}) as ws:
            async for message in ws:
                batch.append(json.loads(message))
                count.add()
                if len(batch) >= args.every:
                    write()  # on the event loop, as the examples do

    tasks = [asyncio.create_task(one(g)) for g in groups(args.contracts, args.per_connection)]
    await _until_done(count, tasks)
    if batch:
        write()
    return {
        "written_ns": time.time_ns(),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


KINDS = {"ceiling": ceiling, "hedgetech": hedgetech, "naive": naive}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--contracts", type=int, default=500)
    parser.add_argument("--per-connection", type=int, default=50)
    parser.add_argument("--expect", type=int, required=True, help="stop after this many")
    parser.add_argument("--out", default="naive-data", help="naive: where its files go")
    parser.add_argument("--every", type=int, default=10_000, help="naive: messages per file")
    args = parser.parse_args(argv)

    async def run() -> dict[str, Any]:
        count = Count(args.expect)
        extra = await KINDS[args.kind](args, count)
        return {
            "kind": args.kind,
            "messages": count.messages,
            "first_ns": count.first_ns,
            "last_ns": count.last_ns,
            **extra,
        }

    print(json.dumps(asyncio.run(run())), flush=True)


if __name__ == "__main__":
    sys.exit(main())
