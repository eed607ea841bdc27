"""Part 1, throughput: 1,000,000 messages over 500 contracts (10 connections), fast mode.

The simulator (its own process) sends pre-encoded frames as fast as they are read. Each
contender gets a fresh simulator and the same stream shape:

- the recorder: ``ime-recorder run`` (its own process; journal on, default settings), timed
  from its first frame (``min(received_at)``) to the moment the last row became queryable
  (the rename of the last Parquet file, which sets its ctime; the views read every visible
  file), after which the views are checked to hold every message exactly once;
- (a) the ceiling, (b) the official client, (c) a naive recorder: see bench/clients.py,
  timed from their first frame to their last frame (for the naive recorder, to its last file).

The contenders run in turn, ``--rounds`` times (3 at full scale; the naive recorder once),
and each is represented by its run of median rate: this machine's speed drifts by ±10 %
between minutes, and interleaved runs let the drift fall on every contender alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import recorder
from bench.common import (
    CONTRACTS,
    PER_CONNECTION,
    PYTHON,
    REPO,
    CpuMeter,
    RecorderProcess,
    RssSampler,
    SimProcess,
    cleanup,
    flush_stats,
    frames_done,
    free_port,
    fresh_dir,
    last_visible_at,
    log,
    save,
    scaled,
    wait_quiet,
    write_config,
)

CONNECTIONS = CONTRACTS // PER_CONNECTION


def _sim(per_connection: int) -> SimProcess:
    return SimProcess(
        "--fast", "--contracts", str(CONTRACTS), "--max-messages", str(per_connection)
    )


def _count(con: Any, sql: str) -> int:
    row = con.execute(sql).fetchone()
    return int(row[0]) if row else 0


def run_recorder(total: int) -> dict[str, Any]:
    """Record ``total`` messages with ``ime-recorder run``; first frame to all queryable."""
    work = fresh_dir("throughput-recorder")
    data = work / "data"
    port = free_port()
    with _sim(total // CONNECTIONS) as sim:
        config = write_config(work / "recorder.toml", sim, data, port)
        rec = RecorderProcess(config, port, work / "recorder.log")
        rss = RssSampler(rec.pid).start()
        cpu = CpuMeter([sim.pid, rec.pid])
        cpu.start()
        try:
            metrics = rec.wait_until(frames_done(total), timeout=max(600.0, total / 1000))
            cpu.stop()
            done_at = last_visible_at(data)
        finally:
            rss.stop()
            exit_code = rec.stop()
        accepted = sim.stats()["connections_accepted"]
    con = recorder.connect(data)
    # the messages of the stream (the recorder also stores one live-overview snapshot per
    # contract when a session opens: source = 'snapshot', not counted here)
    stream = "WHERE source = 'stream'"
    row = con.execute(
        "SELECT epoch_us(min(received_at)) / 1e6, epoch_us(max(received_at)) / 1e6, "
        f"count(*), count(DISTINCT seq) FROM aggregate {stream}"
    ).fetchone()
    assert row is not None
    first, last_frame, rows, distinct = row
    counts = {
        t: _count(con, f"SELECT count(*) FROM {t} {stream}")
        for t in ("best_limit", "allowed_price_range", "contract_info")
    }
    counts["quarantine"] = _count(con, "SELECT count(*) FROM quarantine")
    counts["snapshots"] = _count(con, "SELECT count(*) FROM aggregate WHERE source = 'snapshot'")
    con.close()
    if rows != total or distinct != total or counts["quarantine"]:
        raise AssertionError(f"views hold {rows} aggregate rows ({distinct} seqs), {counts}")
    seconds = done_at - first
    result = {
        "messages": total,
        "connections_accepted": accepted,
        "seconds": round(seconds, 3),
        "rate": total / seconds,
        "receive_seconds": round(last_frame - first, 3),
        "receive_rate": total / (last_frame - first),
        "flush_tail_seconds": round(done_at - last_frame, 3),
        "peak_rss_mb": round(rss.peak_mb, 1),
        "rows": {"aggregate": rows, **counts},
        "exit_code": exit_code,
        "cpu": cpu.result,
        "flushes": flush_stats(metrics),
        # frames that waited in the journal while memory was full (recorder.spill)
        "spilled": metrics.get("ime_recorder_frames_spilled_total"),
    }
    cleanup(work)
    return result


def run_client(kind: str, total: int) -> dict[str, Any]:
    """Run one of bench/clients.py against a fresh simulator."""
    work = fresh_dir(f"throughput-{kind}")
    with _sim(total // CONNECTIONS) as sim:
        command = [
            PYTHON, "-m", "bench.clients", kind,
            "--base-url", sim.base_url, "--token-url", sim.token_url,
            "--contracts", str(CONTRACTS), "--per-connection", str(PER_CONNECTION),
            "--expect", str(total), "--out", str(work / "data"),
        ]  # fmt: skip
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        cpu = CpuMeter([sim.pid, process.pid])
        cpu.start()
        output, _ = process.communicate(timeout=max(900.0, total / 500))
        cpu.stop()
        accepted = sim.stats()["connections_accepted"]
    if process.returncode != 0:
        raise RuntimeError(f"{kind} failed with exit code {process.returncode}")
    answer = json.loads(output)
    end_ns = answer.get("written_ns", answer["last_ns"])
    seconds = (end_ns - answer["first_ns"]) / 1e9
    result = {
        "messages": answer["messages"],
        "connections_accepted": accepted,
        "seconds": round(seconds, 3),
        "rate": answer["messages"] / seconds,
        "cpu": cpu.result,
        **{k: v for k, v in answer.items() if k in ("files", "bytes", "hedgetech")},
    }
    cleanup(work)
    return result


CONTENDERS = ("recorder", "ceiling", "hedgetech", "naive")
#: run once whatever --rounds says: the naive recorder takes 35-50 s a run and has no target
ONCE = ("naive",)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate (the lower of the middle two), with every run's rate in order."""
    middle = sorted(runs, key=lambda run: run["rate"])[(len(runs) - 1) // 2]
    return {**middle, "rates": [run["rate"] for run in runs]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=scaled(1_000_000, 10_000))
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--rounds",
        type=int,
        default=scaled(3),
        help="contenders run in turn this many times (the machine drifts: the ratio is of "
        "medians of interleaved runs)",
    )
    args = parser.parse_args(argv)
    total = args.messages // CONNECTIONS * CONNECTIONS
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.only}
    for round_ in range(max(1, args.rounds)):
        for kind in args.only:
            if round_ and kind in ONCE:
                continue
            wait_quiet()
            log(f"throughput: {kind}, {total:,} messages (round {round_ + 1})")
            began = time.monotonic()
            run = run_recorder(total) if kind == "recorder" else run_client(kind, total)
            run["wall_seconds"] = round(time.monotonic() - began, 1)
            runs[kind].append(run)
            log(f"throughput: {kind}: {run['rate']:,.0f} msg/s")
    results = {kind: median_run(done) for kind, done in runs.items()}
    save("throughput", {"messages": total, "contenders": results})


if __name__ == "__main__":
    sys.exit(main())
