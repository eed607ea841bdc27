"""Part 2, memory: peak RSS of the recorder while 100,000 messages/s arrive for 60 s.

The simulator's paced mode makes each message on the fly and tops out near 40 k messages/s
in one process, so the load comes from fast mode (pre-encoded frames, 500 contracts, 10
connections) held at 100,000 messages/s in total by bench/simserver.py's pacer. The recorder
(``ime-recorder run``, default settings) runs in its own process; its RSS is read from
/proc every 0.2 s (and the kernel's VmHWM). Whether the rate was sustained is read from the
rows afterwards: the messages received in the window over the window's length, and how far
the receiving lagged behind the sending (the simulator's exchange timestamps are its send
times in fast mode only up to the frame pool, so the lag is read from the counts).
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
        time.sleep(args.seconds)
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
    achieved = in_window / window
    result: dict[str, Any] = {
        "config_overrides": overrides,
        "target_rate": args.rate,
        "seconds": round(window, 1),
        "sent_in_window": sent,
        "sent_rate": sent / window,
        "received_in_window": in_window,
        "received_rate": achieved,
        "stored_total": stored,
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
