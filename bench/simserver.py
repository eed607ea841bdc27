"""The simulator in a process of its own, for the benchmarks.

Prints one JSON line on stdout once listening (``base_url``, ``token_url``, ``port``) and
serves until SIGINT or SIGTERM, then writes a summary (the simulator's stats and, with
``--count-bytes``, the bytes of every data frame sent) to ``--summary``.

``--pace R`` (fast mode only) holds the total send rate of all connections at R messages/s:
a task pauses the simulator whenever it is ahead of ``R * elapsed`` and resumes it otherwise
(the simulator's public ``pause``/``resume``). Paced mode (``--rate`` per connection) makes
each message on the fly, which tops out near 40 k messages/s in one process; fast mode
cycles pre-encoded frames and, paced like this, sustains far more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from recorder.simulator import Simulator, SimulatorOptions

_PACE_TICK = 0.002  # seconds between pacing decisions


async def _pace(sim: Simulator, rate: float, stop: asyncio.Event) -> None:
    """Pause/resume the fast senders so that the total sent follows ``rate * elapsed``."""
    started: float | None = None
    while not stop.is_set():
        sent = sim.stats()["messages_sent_total"]
        now = time.monotonic()
        if started is None:
            if sent == 0:  # the clock starts with the first frame sent
                await asyncio.sleep(_PACE_TICK)
                continue
            started = now
        if sent > rate * (now - started):
            sim.pause()
        else:
            sim.resume()
        await asyncio.sleep(_PACE_TICK)


async def _serve(args: argparse.Namespace) -> dict[str, object]:
    options = SimulatorOptions(
        port=args.port,
        contracts=args.contracts,
        rate=args.rate,
        seed=args.seed,
        fast=args.fast,
        max_messages=args.max_messages,
        fast_pool=args.fast_pool,
        fast_batch=args.fast_batch,
        keep_sent=args.count_bytes,
    )
    sim = Simulator(options)
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    pacer = None
    if args.pace > 0:
        pacer = asyncio.create_task(_pace(sim, args.pace, stop))
    ready = {"base_url": sim.base_url, "token_url": sim.token_url, "port": sim.port}
    print(json.dumps(ready), flush=True)
    await stop.wait()
    if pacer is not None:
        await pacer
    summary = sim.stats()
    if args.count_bytes:
        sent = sim.sent
        summary["frames_counted"] = len(sent)
        summary["raw_bytes"] = sum(len(f.text.encode()) for f in sent)
    await sim.stop()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--contracts", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="paced mode: per connection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--max-messages", type=int, default=None, help="per connection")
    parser.add_argument("--fast-pool", type=int, default=4096)
    parser.add_argument("--fast-batch", type=int, default=256)
    parser.add_argument("--pace", type=float, default=0.0, help="fast mode: total messages/s")
    parser.add_argument("--count-bytes", action="store_true", help="sum the frames' bytes")
    parser.add_argument("--summary", default=None, help="write the stats here at exit")
    args = parser.parse_args(argv)
    summary = asyncio.run(_serve(args))
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
