"""Part 2, memory: peak RSS of the recorder while 100,000 messages/s arrive for 60 s.

The simulator's paced mode makes each message on the fly and tops out near 40 k messages/s
in one process, so the load comes from fast mode (pre-encoded frames, 500 contracts, 10
connections) held at 100,000 messages/s in total by bench/simserver.py's pacer. The recorder
(``ime-recorder run``, default settings) runs in its own process; its RSS is read from
/proc every 0.2 s (and the kernel's VmHWM). Whether the rate was sustained is read from the
recorder's count of frames read from its sockets (and journaled) over the window; the rows
stored from them, and the frames still waiting in the journal when the window ended (when
memory is full they wait there, see recorder.spill), are given beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import recorder
from bench.common import (
    CONTRACTS,
    CpuMeter,
    RecorderProcess,
    RssSampler,
    SimProcess,
    cleanup,
    flush_stats,
    free_port,
    fresh_dir,
    log,
    save,
    scaled,
    wait_quiet,
    write_config,
)

#: the frames the recorder read from its sockets (and journaled): what it took of the stream
RECEIVED = "ime_recorder_frames_received_total"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=scaled(60, 5))
    parser.add_argument("--rate", type=float, default=100_000.0, help="total messages/s")
    args = parser.parse_args(argv)
    work = fresh_dir("memory")
    data = work / "data"
    port = free_port()
    wait_quiet()
    log(f"memory: {args.rate:,.0f} msg/s for {args.seconds:.0f} s")
    sim = SimProcess(
        "--fast", "--contracts", str(CONTRACTS), "--pace", str(args.rate), "--fast-batch", "32",
        name="memory-sim",
    )  # fmt: skip
    # trials of a setting only: the results are then not those of the default settings
    overrides = json.loads(os.environ.get("BENCH_MEMORY_SECTIONS", "{}"))
    config = write_config(work / "recorder.toml", sim, data, port, **overrides)
    rec = RecorderProcess(config, port, work / "recorder.log")
    rss = RssSampler(rec.pid).start()
    cpu = CpuMeter([sim.pid, rec.pid])
    try:
        rec.wait_until(lambda m: m.get("ime_recorder_frames_received_total", 0) > 0, 60, 0.1)
        began_wall = time.time()
        began = time.monotonic()
        cpu.start()
        sent0 = sim.stats()["messages_sent_total"]
        received0 = rec.metrics().get(RECEIVED, 0.0)
        time.sleep(args.seconds)
        received = rec.metrics().get(RECEIVED, 0.0) - received0
        sim.control("pause")
        sent = sim.stats()["messages_sent_total"] - sent0
        ended_wall = time.time()
        window_peak = max((mb for t, mb in rss.samples if t <= began + args.seconds), default=0)
        samples = [mb for t, mb in rss.samples if began <= t <= began + args.seconds]
        window_median = statistics.median(samples) if samples else 0
        cpu.stop()
        metrics = rec.metrics(timeout=120)
        log("memory: stopping the recorder (it flushes what it holds)")
        stop_began = time.monotonic()
        exit_code = rec.stop(timeout=scaled(600, 120))
        stop_seconds = time.monotonic() - stop_began
    finally:
        rss.stop()
        rec.stop()
        sim.stop()
    con = recorder.connect(data)
    row = con.execute(
        "SELECT count(*) FILTER (WHERE received_at BETWEEN to_timestamp(?) AND to_timestamp(?)),"
        " count(*) FROM aggregate WHERE source = 'stream'",
        [began_wall, ended_wall],
    ).fetchone()
    con.close()
    in_window, stored = (int(row[0]), int(row[1])) if row else (0, 0)
    window = ended_wall - began_wall
    achieved = received / window
    result: dict[str, Any] = {
        "config_overrides": overrides,
        "target_rate": args.rate,
        "seconds": round(window, 1),
        "sent_in_window": sent,
        "sent_rate": sent / window,
        "received_in_window": int(received),
        "received_rate": achieved,
        "stored_in_window": in_window,
        "stored_total": stored,
        "spilled_total": metrics.get("ime_recorder_frames_spilled_total"),
        "waiting_in_journal_at_end": metrics.get("ime_recorder_frames_in_journal_waiting"),
        "sustained": achieved >= 0.98 * args.rate,
        "peak_rss_mb_in_window": round(window_peak, 1),
        "peak_rss_mb": round(rss.peak_mb, 1),
        "median_rss_mb_in_window": round(window_median, 1),
        "rss_timeline_mb": [round(mb) for _, mb in rss.samples[:: max(1, len(rss.samples) // 60)]],
        "stop_seconds": round(stop_seconds, 1),
        "exit_code": exit_code,
        "cpu": cpu.result,
        "flushes": flush_stats(metrics),
        "rows_buffered_at_end": metrics.get("ime_recorder_rows_buffered"),
    }
    log(
        f"memory: peak RSS {result['peak_rss_mb']:.0f} MB, received {achieved:,.0f} msg/s "
        f"({'sustained' if result['sustained'] else 'NOT sustained'})"
    )
    save("memory", result)
    cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
