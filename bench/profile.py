"""Where the recorder's time goes: py-spy over the throughput run, and the writer alone.

Not part of ``make bench`` (a profiler slows what it watches): ``python -m bench.profile``.

1. The recorder (``ime-recorder run`` under ``py-spy record --threads``) records
   ``--messages`` from the fast simulator; samples are summed per thread and per step of the
   pipeline (receive, flatten, buffer, journal, Arrow building, Parquet writing, fsync). With
   ``--gil`` only the thread holding the GIL is sampled: the shares then add up to the one
   core that Python code can use.
2. The writer alone, one thread, no contention: the cost of one flush file (``to_arrow``,
   ``pq.write_table``, fsyncs) for partition sizes a 5 s flush sees at 10 k and 100 k msg/s.
3. The hot path alone: ``flatten`` + buffering per message, and the journal's ``encode``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    CONTRACTS,
    OUT,
    PER_CONNECTION,
    RECORDER,
    RecorderProcess,
    SimProcess,
    cleanup,
    frames_done,
    free_port,
    fresh_dir,
    log,
    write_config,
)

# step of the pipeline: the first pattern that matches a frame of the stack, leaf first
STEPS = (
    ("fsync", re.compile(r"fsync|fdatasync")),
    ("parquet write", re.compile(r"write_table|ParquetWriter\.(__init__|close|write)|pyarrow/")),
    ("arrow build (to_arrow)", re.compile(r"to_arrow")),
    ("plain check, flatten", re.compile(r"recorder/(flatten|plain)\.py")),
    ("buffer + partition keys", re.compile(r"recorder/buffer\.py|Intake\._(ingest|add)")),
    ("journal", re.compile(r"recorder/journal\.py")),
    ("bulk decoding (DuckDB)", re.compile(r"Decoder\.decode")),
    ("websocket receive", re.compile(r"aiohttp/|asyncio/selector_events")),
    (
        "batching (intake, pipeline, columnar)",
        re.compile(r"recorder/(intake|pipeline|columnar)\.py"),
    ),
    ("read loop", re.compile(r"recorder/(feed|streams|wsqueue)\.py")),
    ("flush work, the rest", re.compile(r"recorder/flushing\.py")),
    ("event loop (asyncio)", re.compile(r"asyncio/")),
    ("import / start-up", re.compile(r"importlib")),
)


def _step(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in STEPS:
            if pattern.search(frame):
                return name
    return "other"


def summarise(raw: Path) -> dict[str, Any]:
    """Samples per thread, per pipeline step within each thread, and the top leaf functions."""
    threads: Counter[str] = Counter()
    steps: Counter[tuple[str, str]] = Counter()
    leaves: Counter[tuple[str, str]] = Counter()
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        head = re.match(r"thread \(\w+\)(?:: (.*))?", frames[0])
        thread = (head.group(1) if head else None) or "MainThread"
        if head:
            frames = frames[1:]
        thread = re.sub(r"_\d+$", "", thread)
        if not frames:
            continue
        n = int(count)
        threads[thread] += n
        steps[(thread, _step(frames))] += n
        leaves[(thread, re.sub(r":\d+\)", ")", frames[-1]))] += n
    total = sum(threads.values()) or 1
    return {
        "samples": total,
        "threads": {t: round(100 * n / total, 1) for t, n in threads.most_common()},
        "steps": {f"{t}: {s}": round(100 * n / total, 1) for (t, s), n in steps.most_common(20)},
        "leaves": {f"{t}: {f}": round(100 * n / total, 1) for (t, f), n in leaves.most_common(25)},
    }


def profile_recorder(messages: int, gil: bool) -> dict[str, Any]:
    work = fresh_dir("profile")
    data = work / "data"
    port = free_port()
    raw = work / "profile.txt"
    connections = CONTRACTS // PER_CONNECTION
    sim = SimProcess("--fast", "--contracts", str(CONTRACTS), "--max-messages",
                     str(messages // connections), name="profile-sim")  # fmt: skip
    config = write_config(work / "recorder.toml", sim, data, port)
    spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--threads", "--nonblocking"]
    spy += ["--rate", "100", "--format", "raw", "--output", str(raw)]
    spy += ["--gil"] if gil else []
    command = [*spy, "--", RECORDER, "run", "--config", str(config)]
    rec = RecorderProcess(config, port, work / "recorder.log", command)
    began = time.monotonic()
    try:
        rec.wait_until(frames_done(messages), timeout=1200)
        seconds = time.monotonic() - began
    finally:
        # stop the recorder itself (py-spy's child): py-spy then writes its file and exits
        children = Path(f"/proc/{rec.pid}/task/{rec.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        rec.process.wait(timeout=600)
        rec.stop()
        sim.stop()
    result = summarise(raw)
    result["seconds"] = round(seconds, 1)
    cleanup(work)
    return result


def _batch_rows(rows_per_partition: int) -> list[tuple[Any, ...]]:
    now = int(time.time() * 1e6)
    return [
        (
            now + i,
            now + i + 500,
            i,
            1 + i % 3,
            120 + i % 7,
            427300.0 + i % 5,
            80,
            427400.0,
            "stream",
        )
        for i in range(rows_per_partition)
    ]


def writer_alone(work: Path) -> dict[str, Any]:
    """One flush file's cost by step, single-threaded, for a few partition sizes."""
    from recorder.buffer import Batch
    from recorder.schema import TABLES
    from recorder.writer import ParquetWriter, to_arrow

    writer = ParquetWriter(work / "writer", compression_level=3, fsync=True)
    out: dict[str, Any] = {}
    for rows in (30, 150, 600, 3000):
        batch_rows = _batch_rows(rows)
        arrow_s, write_s, files = 0.0, 0.0, 40
        for i in range(files):
            began = time.perf_counter()
            to_arrow(TABLES["best_limit"], batch_rows)
            arrow_s += time.perf_counter() - began
            batch = Batch(("best_limit", "2026-11-21", str(1001 + i)), batch_rows)
            began = time.perf_counter()
            writer.write(batch)
            write_s += time.perf_counter() - began
        out[f"{rows} rows"] = {
            "to_arrow_ms": round(1000 * arrow_s / files, 2),
            "write_file_ms (to_arrow, write, 2 fsyncs, rename)": round(1000 * write_s / files, 2),
            "us_per_row": round(1e6 * write_s / files / rows, 2),
        }
    fd = os.open(work / "fsync-probe", os.O_WRONLY | os.O_CREAT)
    began = time.perf_counter()
    for _ in range(100):
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
    out["one fsync_ms"] = round(10 * (time.perf_counter() - began), 3)
    os.close(fd)
    return out


def hot_path_alone() -> dict[str, Any]:
    """Per message on the event loop: flatten, and flatten + buffer + journal encode."""
    from zoneinfo import ZoneInfo

    from recorder.flatten import flatten
    from recorder.records import FRAME, encode
    from recorder.simcontracts import FeedVariants, make_contracts
    from recorder.simmarket import Market, Subscription

    contracts = make_contracts(CONTRACTS, 0)
    subscription = Subscription(Market(contracts, 0, FeedVariants()), contracts[:50], "id", 0)
    frames = [subscription.next(datetime.now(UTC)).text.encode() for _ in range(20_000)]
    tz = ZoneInfo("UTC")
    began = time.perf_counter()
    for frame in frames:
        flatten(frame, tz)
    flatten_us = 1e6 * (time.perf_counter() - began) / len(frames)
    began = time.perf_counter()
    for i, frame in enumerate(frames):
        encode(FRAME, i, 0, "connection-1.1", frame)
    encode_us = 1e6 * (time.perf_counter() - began) / len(frames)
    return {
        "flatten_us_per_message": round(flatten_us, 2),
        "journal_encode_us_per_message": round(encode_us, 2),
        "frame_bytes": round(sum(map(len, frames)) / len(frames)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300_000)
    args = parser.parse_args(argv)
    work = fresh_dir("profile-alone")
    result = {
        "hot_path_alone": hot_path_alone(),
        "writer_alone": writer_alone(work),
    }
    log(json.dumps(result, indent=1))
    log("profiling the recorder (threads)")
    result["recorder_threads"] = profile_recorder(args.messages, gil=False)
    log("profiling the recorder (GIL holder)")
    result["recorder_gil"] = profile_recorder(args.messages, gil=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "profile.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    subprocess.run(["rm", "-rf", str(work)], check=True)


if __name__ == "__main__":
    sys.exit(main())
