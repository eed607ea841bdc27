"""Part 6, a restart after a crash: how soon the feed is read again, and the journal replayed.

A crash (kill -9, an OOM kill, a power cut) leaves frames in the journal that Parquet does
not hold yet: a flush interval's worth normally, millions after a burst spilled to the
journal (bench/memory.py). The server never replays, so whatever it sends before the
restarted recorder reads the stream again is lost for good.

The data directory is given a journal as a crash leaves it: ``--frames`` frames of 500
contracts (a pool of distinct frames received again and again), none in Parquet. The
recorder (default settings) is started against the simulator sending 10,000 messages/s
(paced, as part 4), and measured:

- from the recorder's start (its process spawned) to the first frame of the new stream
  received (``received_at`` of the earliest row of a seq above the journal's);
- the journal's replay (its log line ``journal replayed``: seconds, frames received meanwhile);
- once the simulator is paused: every row of both written (the run is kept only if so).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

import recorder
from bench.common import (
    CONTRACTS,
    PER_CONNECTION,
    CpuMeter,
    RecorderProcess,
    SimProcess,
    cleanup,
    free_port,
    fresh_dir,
    log,
    save,
    scaled,
    wait_quiet,
    write_config,
)
from recorder.journal import Journal
from recorder.records import EVENT, FRAME
from recorder.simcontracts import FeedVariants, make_contracts
from recorder.simmarket import Market, Subscription
from recorder.state import SeqAllocator

POOL = 5_000  # distinct frames in the crashed journal
RATE = 10_000  # messages/s the simulator sends meanwhile


def crashed_journal(data_dir: Path, frames: int) -> int:
    """Write the journal a crash left (one session, ``frames`` frames); its last seq."""
    contracts = make_contracts(CONTRACTS, 7)
    feed = Subscription(Market(contracts, 7, FeedVariants()), contracts, "id", 7)
    pool = [feed.next(datetime.now(UTC)).text.encode() for _ in range(POOL)]
    seqs = SeqAllocator(data_dir)
    journal = Journal(data_dir, fsync=False)
    journal.start()
    at = int(time.time() * 1e6) - 60_000_000
    opened = {
        "event": "session_opened",
        "session": "crashed-1",
        "run": "crashed",
        "endpoint": "id",
        "contracts": [c.id for c in contracts],
        "opened_at": at,
    }
    journal.append(EVENT, seqs.next(), at, "crashed-1", orjson.dumps(opened))
    for start in range(0, frames, 500):  # socket reads of 500 frames
        count = min(500, frames - start)
        chunk = [pool[(start + i) % POOL] for i in range(count)]
        journal.extend(FRAME, seqs.take(count), at + start, "crashed-1", chunk)
        while journal.backlog_bytes > 64 * 1024 * 1024:
            time.sleep(0.01)
    journal.close()
    seqs.close()
    return seqs.last


def _replayed(log_path: Path) -> dict[str, Any] | None:
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"journal replayed"' in line:
            return dict(json.loads(line))
    return None


def measure(frames: int, work: Path) -> dict[str, Any]:
    data = work / "data"
    began = time.monotonic()
    last_crashed = crashed_journal(data, frames)
    log(f"crashed journal of {frames:,} frames written in {time.monotonic() - began:.1f} s")
    wait_quiet()
    port = free_port()
    per_connection = RATE / (CONTRACTS / PER_CONNECTION)
    with SimProcess(
        "--contracts", str(CONTRACTS), "--rate", str(per_connection), name="restart-sim"
    ) as sim:  # fmt: skip
        config = write_config(work / "recorder.toml", sim, data, port)
        spawned_us = time.time() * 1e6
        rec = RecorderProcess(config, port, work / "recorder.log")
        cpu = CpuMeter([sim.pid, rec.pid])
        cpu.start()
        try:
            deadline = time.monotonic() + 600
            while (replayed := _replayed(rec.log_path)) is None:
                if rec.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no replay; see {rec.log_path}")
                time.sleep(0.1)
            cpu.stop()
            time.sleep(2)  # the frames that waited are read back beside the stream
            sim.control("pause")
            sent = sim.stats()["messages_sent_total"]
            rec.wait_until(
                lambda m: (
                    m.get("ime_recorder_frames_received_total", 0) >= sent
                    and m.get("ime_recorder_rows_buffered", 1) == 0
                    and m.get("ime_recorder_frames_in_journal_waiting", 1) == 0
                ),
                timeout=600,
            )
            exit_code = rec.stop()
        finally:
            rec.stop()
    con = recorder.connect(data)
    first, stored_old, stored_new = con.execute(
        f"SELECT epoch_us(min(received_at) FILTER (seq > {last_crashed})), "
        f"count(DISTINCT seq) FILTER (seq <= {last_crashed}), "
        f"count(DISTINCT seq) FILTER (seq > {last_crashed}) FROM contract_info"
    ).fetchone() or (None, 0, 0)
    con.close()
    if first is None:
        raise RuntimeError("no frame of the new stream was stored")
    replay_end_us = datetime.fromisoformat(replayed["timestamp"]).timestamp() * 1e6
    return {
        "frames_in_journal": frames,
        "rate": RATE,
        "sent": sent,
        "exit_code": exit_code,
        "first_frame_s": (first - spawned_us) / 1e6,
        "replay_s": replayed["seconds"],
        "replay_done_s": (replay_end_us - spawned_us) / 1e6,
        "received_meanwhile": replayed.get("received_meanwhile", 0),
        "frames_replayed": replayed["frames"],
        "stored_replayed": stored_old,
        "stored_new": stored_new,
        "cpu": cpu.result,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=scaled(1_000_000))
    args = parser.parse_args(argv)
    work = fresh_dir("restart")
    try:
        result = measure(args.frames, work)
    finally:
        cleanup(work)
    log(json.dumps(result))
    save("restart", result)


if __name__ == "__main__":
    main()
