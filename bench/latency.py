"""Part 4, latency at 10,000 messages/s: receive to durable in the journal, receive to visible.

The simulator (paced mode, 1,000 messages/s on each of 10 connections over 500 contracts)
sends for 60 s to the recorder daemon run by bench/probe.py (``ime-recorder run`` plus a
thread reading ``journal.durable_seq``). Per message (``seq``, ``received_at`` from the rows):

- durable: the first time the probe saw ``durable_seq >= seq`` (the journal fdatasynced);
- visible: the latest rename time (inode ctime) of the Parquet files that hold its rows: a
  view reads every visible file, so a message is queryable once its last file is renamed in.
  A poller also runs the DuckDB views every 2 s while recording, and the counts they return
  are checked against the rename times.

The recording is kept for part 3 (bench/size.py) with the bytes of every frame sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

import recorder
from bench.common import (
    CONTRACTS,
    DATA_TABLES,
    PER_CONNECTION,
    PYTHON,
    CpuMeter,
    RecorderProcess,
    SimProcess,
    flush_stats,
    frames_done,
    free_port,
    fresh_dir,
    log,
    percentile,
    save,
    scaled,
    visible_files,
    wait_quiet,
    write_config,
)

RECORDING = "latency"  # WORK/latency holds the recording that bench/size.py reuses
FLUSH_INTERVAL = 5.0  # storage.flush_interval_seconds's default


class ViewPoller:
    """Counts the stream messages the views show, every ``interval`` s, while recording."""

    def __init__(self, data_dir: Path, interval: float = 2.0) -> None:
        self.data_dir = data_dir
        self.interval = interval
        self.polls: list[tuple[float, float, int]] = []  # (began, ended, messages visible)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            began = time.time()
            try:
                con = recorder.connect(self.data_dir)
                row = con.execute(
                    "SELECT count(*) FROM aggregate WHERE source = 'stream'"
                ).fetchone()
                con.close()
            except duckdb.Error:
                continue  # a file renamed away by compaction between glob and read
            self.polls.append((began, time.time(), int(row[0]) if row else 0))

    def start(self) -> ViewPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def record(seconds: float, rate_per_connection: float, work: Path) -> dict[str, Any]:
    """Record from a paced simulator for ``seconds``; returns what the analysis needs."""
    data = work / "data"
    port = free_port()
    notes = work / "durable.json"
    sim = SimProcess(
        "--contracts", str(CONTRACTS), "--rate", str(rate_per_connection), "--count-bytes",
        name="latency-sim",
    )  # fmt: skip
    config = write_config(work / "recorder.toml", sim, data, port)
    command = [PYTHON, "-m", "bench.probe", "--config", str(config), "--out", str(notes)]
    rec = RecorderProcess(config, port, work / "recorder.log", command)
    cpu = CpuMeter([sim.pid, rec.pid])
    poller = ViewPoller(data)
    try:
        rec.wait_until(lambda m: m.get("ime_recorder_frames_received_total", 0) > 0, 60, 0.1)
        cpu.start()
        poller.start()
        time.sleep(seconds)
        sim.control("pause")
        sent = sim.stats()["messages_sent_total"]
        cpu.stop()
        # the last rows wait for their partition's flush interval
        rec.wait_until(frames_done(sent), timeout=120 + seconds)
        metrics = rec.metrics()
        exit_code = rec.stop()
    finally:
        poller.stop()
        rec.stop()
        summary = sim.stop()
    return {
        "data_dir": str(data),
        "notes": str(notes),
        "sent": sent,
        "raw_bytes": summary.get("raw_bytes"),
        "frames_counted": summary.get("frames_counted"),
        "exit_code": exit_code,
        "cpu": cpu.result,
        "polls": poller.polls,
        "flushes": flush_stats(metrics),
    }


def _messages(data_dir: Path) -> pa.Table:
    """Per stream message: seq, received and exchange time (us), and when its last file
    became visible (us, from the files' ctime)."""
    files = visible_files(data_dir)
    ctimes = pa.table(
        {
            "filename": [str(p) for p in files],
            "visible_us": [p.stat().st_ctime_ns // 1000 for p in files],
        }
    )
    con = duckdb.connect()
    con.register("ctimes", ctimes)
    # day files ({t}/date=D/x) and contract files ({t}/date=D/contract=C/x) alike
    root = data_dir.resolve()
    by_table = {
        t: [str(f) for f in files if f.resolve().relative_to(root).parts[0] == t]
        for t in DATA_TABLES
    }
    parts = " UNION ALL ".join(
        f"SELECT '{t}' AS t, seq, epoch_us(received_at) AS received_us, "
        "epoch_us(exchange_ts) AS exchange_us, filename "
        f"FROM read_parquet({by_table[t]!r}, filename = true, union_by_name = true) "
        "WHERE source = 'stream'"
        for t in DATA_TABLES
    )
    table = con.sql(
        "SELECT seq, min(received_us) AS received_us, min(exchange_us) AS exchange_us, "
        "max(visible_us) AS visible_us, "
        "max(visible_us) FILTER (WHERE t = 'aggregate') AS aggregate_visible_us "
        f"FROM ({parts}) JOIN ctimes USING (filename) GROUP BY seq ORDER BY seq"
    ).to_arrow_table()
    con.close()
    return table


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    data_dir = Path(run["data_dir"])
    messages = _messages(data_dir)
    seqs = messages.column("seq").to_pylist()
    received = messages.column("received_us").to_pylist()
    exchange = messages.column("exchange_us").to_pylist()
    visible = messages.column("visible_us").to_pylist()
    notes = json.loads(Path(run["notes"]).read_text(encoding="utf-8"))
    note_ns = [n[0] for n in notes]
    note_seq = [n[1] for n in notes]
    durable_ms: list[float] = []
    position = 0
    for seq, got in zip(seqs, received, strict=True):  # both in seq order
        while position < len(note_seq) and note_seq[position] < seq:
            position += 1
        if position < len(note_seq):
            durable_ms.append((note_ns[position] / 1000 - got) / 1000)
    visible_s = [(v - r) / 1e6 for v, r in zip(visible, received, strict=True)]
    wire_ms = [(r - e) / 1000 for r, e in zip(received, exchange, strict=True)]
    first, last = min(received), max(received)
    # each poll (of the aggregate view) must lie between the aggregate rows visible when it
    # began and when it ended, as the rename times say
    visible_sorted = sorted(messages.column("aggregate_visible_us").to_pylist())
    bad_polls = 0
    for began, ended, count in run["polls"]:
        low = _count_le(visible_sorted, began * 1e6)
        high = _count_le(visible_sorted, ended * 1e6)
        bad_polls += not low <= count <= high
    return {
        "messages": len(seqs),
        "sent": run["sent"],
        "receive_rate": len(seqs) / ((last - first) / 1e6) if last > first else 0.0,
        "durable_ms": _summary(durable_ms),
        "durable_unmatched": len(seqs) - len(durable_ms),
        "visible_s": _summary(visible_s),
        "send_to_receive_ms": _summary(wire_ms),
        "view_polls": len(run["polls"]),
        "view_polls_disagreeing": bad_polls,
        "exit_code": run["exit_code"],
        "cpu": run["cpu"],
        "flushes": run["flushes"],
    }


def _count_le(ordered: list[float], bound: float) -> int:
    import bisect

    return bisect.bisect_right(ordered, bound)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values, default=float("nan")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=scaled(60, 5))
    parser.add_argument("--rate", type=float, default=10_000.0, help="total messages/s")
    args = parser.parse_args(argv)
    connections = CONTRACTS // PER_CONNECTION
    work = fresh_dir(RECORDING)
    wait_quiet()
    log(f"latency: {args.rate:,.0f} msg/s for {args.seconds:.0f} s")
    run = record(args.seconds, args.rate / connections, work)
    result = analyse(run)
    result.update({"target_rate": args.rate, "seconds": args.seconds})
    result["flush_interval_s"] = FLUSH_INTERVAL
    (work / "recording.json").write_text(
        json.dumps({k: run[k] for k in ("data_dir", "sent", "raw_bytes", "frames_counted")}),
        encoding="utf-8",
    )
    log(
        f"latency: durable p99 {result['durable_ms']['p99']:.1f} ms, "
        f"visible p99 {result['visible_s']['p99']:.2f} s"
    )
    save("latency", result)


if __name__ == "__main__":
    sys.exit(main())
