"""The results table: reads each part's JSON (bench/.out) and writes bench/results.md."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import BENCH, OUT, SCALE
from bench.run import PARTS

FLUSH_INTERVAL = 5.0


def _load(part: str) -> dict[str, Any] | None:
    path = OUT / f"{part}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "**MISS**")


def _n(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _others(part: dict[str, Any], key: str = "cpu") -> str:
    """``0.12 / 0.05``: cores other processes used / the hypervisor stole (results from
    before the steal was measured show the first only)."""
    cpu = part.get(key) or {}
    if "others_cores" not in cpu:
        return "n/a"
    stolen = cpu.get("stolen_cores")
    return f"{cpu['others_cores']:.2f}" + ("" if stolen is None else f" / {stolen:.2f}")


Row = tuple[str, str, str, str, str]


def _runs(run: dict[str, Any]) -> str:
    """``; median of 3 runs, in turn with the others: 118.2 / 92.7 / 91.9 k`` (the rates in
    the order run; nothing for a single run)."""
    rates = run.get("rates") or []
    if len(rates) < 2:
        return ""
    listed = " / ".join(f"{rate / 1000:,.1f}" for rate in rates)
    return f"; median of {len(rates)} runs, in turn with the others: {listed} k"


def throughput_rows(part: dict[str, Any] | None) -> list[Row]:
    if part is None:
        return [("1 throughput", "not measured", "", "", "")]
    runs = part["contenders"]
    n = f"{part['messages']:,}"
    rows: list[Row] = []
    rec = runs.get("recorder")
    official = runs.get("hedgetech")
    if rec:
        rows.append(
            (
                f"1 throughput: recorder, journal on, {n} msgs, first frame → all queryable",
                f"{_n(rec['rate'])} msg/s ({rec['seconds']:.1f} s; receiving alone "
                f"{_n(rec['receive_rate'])} msg/s, then {rec['flush_tail_seconds']:.1f} s to "
                f"the last file; peak RSS {rec['peak_rss_mb']:.0f} MB{_runs(rec)})",
                "≥ 150,000 msg/s",
                _verdict(rec["rate"] >= 150_000),
                _others(rec),
            )
        )
    labels = {
        "ceiling": "1a ceiling: aiohttp receive-and-discard, same 10 connections",
        "hedgetech": "1b official client hedgetech 0.4.0, consuming only",
        "naive": "1c naive recorder (websockets, json.loads, pandas → Parquet every 10 k)",
    }
    for kind, label in labels.items():
        run = runs.get(kind)
        if run:
            rows.append(
                (
                    label,
                    f"{_n(run['rate'])} msg/s ({run['seconds']:.1f} s{_runs(run)})",
                    "",
                    "",
                    _others(run),
                )
            )
    if rec and official:
        ratio = rec["rate"] / official["rate"]
        rows.append(
            (
                "1 recorder ÷ official client (same run; medians)",
                f"{ratio:.2f}x",
                "≥ 3x",
                _verdict(ratio >= 3),
                "",
            )
        )
    return rows


def _spilled(part: dict[str, Any]) -> str:
    """What waited in the journal while memory was full (recorder.spill), if anything."""
    spilled = part.get("spilled_total") or 0
    if not spilled:
        return ""
    waiting = part.get("waiting_in_journal_at_end") or 0
    stored = part.get("stored_in_window") or 0
    received = part.get("received_in_window") or 0
    return (
        f"; {spilled:,.0f} frames waited in the journal while memory was full, "
        f"{waiting:,.0f} still there at the window's end; by the end of the stop, rows of "
        f"{stored:,.0f} of the window's {received:,.0f} frames were stored (the rest waits "
        "in the journal for the next start)"
    )


def memory_rows(part: dict[str, Any] | None) -> list[Row]:
    if part is None:
        return [("2 memory", "not measured", "", "", "")]
    sustained = "sustained" if part["sustained"] else "**not sustained**"
    return [
        (
            f"2 peak RSS, {part['target_rate']:,.0f} msg/s offered for {part['seconds']:.0f} s",
            f"{part['peak_rss_mb_in_window']:.0f} MB while receiving ({part['peak_rss_mb']:.0f} MB "
            f"incl. the final flush; median {part.get('median_rss_mb_in_window', 0):.0f} MB); "
            f"received {_n(part['received_rate'])} msg/s: {sustained}"
            + _spilled(part)
            + (
                f"; **settings not the defaults**: {part['config_overrides']}"
                if part.get("config_overrides")
                else ""
            ),
            "≤ 256 MB at 100,000 msg/s",
            _verdict(part["peak_rss_mb_in_window"] <= 256 and part["sustained"]),
            _others(part),
        )
    ]


def size_rows(part: dict[str, Any] | None) -> list[Row]:
    if part is None:
        return [("3 size", "not measured", "", "", "")]
    tables = part["tables"]
    detail = ", ".join(
        f"{t} {v['bytes_per_message']:.1f}"
        for t, v in tables.items()
        if v["bytes_per_message"] >= 0.05
    )
    return [
        (
            f"3 bytes/message after compaction ({part['messages']:,} msgs, raw JSON "
            f"{part['raw_bytes_per_message']:.0f} B/msg)",
            f"{part['bytes_per_message']:.1f} B/msg ({detail}); without Parquet footers "
            f"{part['bytes_per_message_without_footers']:.1f}",
            "≤ 45 B/msg",
            _verdict(part["bytes_per_message"] <= 45),
            "",
        ),
        (
            "3 raw JSON ÷ Parquet after compaction",
            f"{part['ratio']:.1f}x (before compaction "
            f"{part['before']['bytes_per_message']:.0f} B/msg)",
            "≥ 17x",
            _verdict(part["ratio"] >= 17),
            "",
        ),
    ]


def latency_rows(part: dict[str, Any] | None) -> list[Row]:
    if part is None:
        return [("4 latency", "not measured", "", "", "")]
    d, v = part["durable_ms"], part["visible_s"]
    limit = part.get("flush_interval_s", FLUSH_INTERVAL) + 1
    rate = f"{part['target_rate']:,.0f} msg/s ({_n(part['receive_rate'])} received)"
    return [
        (
            f"4 receive → durable in the journal, {rate}",
            f"p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms (max {d['max']:.0f})",
            "p99 ≤ 50 ms",
            _verdict(d["p99"] <= 50),
            _others(part),
        ),
        (
            "4 receive → visible in the DuckDB views",
            f"p50 {v['p50']:.2f} s, p99 {v['p99']:.2f} s (max {v['max']:.1f})",
            f"p99 ≤ {limit:g} s (flush interval + 1 s)",
            _verdict(v["p99"] <= limit),
            "",
        ),
    ]


def queries_rows(part: dict[str, Any] | None) -> list[Row]:
    if part is None:
        return [("5 queries", "not measured", "", "", "")]
    q = part["queries"]
    store = f"{part['generated']['messages'] / 1e6:.0f} M msgs"
    rows: list[Row] = []
    limits = {"bars": 50.0, "asof": 200.0}
    labels = {
        "bars": f"5 1-minute bars, one contract-day (busiest, {store})",
        "asof": "5 as-of state of all 500 contracts",
        "counts": "5 messages per contract per day",
        "replay": "5 Store.replay, one contract-day",
    }
    for name, label in labels.items():
        p, f = q[name]["partitioned"], q[name]["flat"]
        figure = (
            f"{p['median_ms']:,.0f} ms partitioned (first {p['first_ms']:,.0f}) vs "
            f"{f['median_ms']:,.0f} ms one flat file"
        )
        if name in limits:
            ok = p["median_ms"] <= limits[name] and p["median_ms"] <= f["median_ms"]
            target = f"≤ {limits[name]:g} ms and ≤ flat"
            rows.append((label, figure, target, _verdict(ok), ""))
        else:
            rows.append((label, figure + f" ({q[name]['rows']:,} rows/msgs)", "", "", ""))
    return rows + date_layout_rows(part)


def date_layout_rows(part: dict[str, Any]) -> list[Row]:
    """The one-date queries over the middle date folded into the ``date`` layout."""
    layout = part.get("date_layout")
    if layout is None:
        return []
    q = part["queries"]
    messages = layout["messages"]
    rows: list[Row] = [
        (
            '5 `compaction.layout = "date"`: the middle date folded into one file per table',
            f"{layout['seconds']:,.0f} s for {messages:,} msgs, {layout['rows']:,} rows "
            f"(zstd {layout['level']}): {layout['bytes'] / messages:.1f} B/msg, against "
            f"{layout['contract_files_bytes'] / messages:.1f} in the contract files as the "
            "generator writes them",
            "",
            "",
            "",
        )
    ]
    labels = {"bars": "5 1-minute bars, date layout", "asof": "5 as-of, date layout"}
    labels["replay"] = "5 Store.replay, date layout"
    for name, label in labels.items():
        d, f = q[name]["date"], q[name]["flat"]
        figure = (
            f"{d['median_ms']:,.0f} ms (first {d['first_ms']:,.0f}) vs "
            f"{f['median_ms']:,.0f} ms one flat file"
        )
        limit = {"bars": 50.0, "asof": 200.0}.get(name)
        if limit is None:
            rows.append((label, figure, "", "", ""))
            continue
        ok = d["median_ms"] <= limit and d["median_ms"] <= f["median_ms"]
        rows.append((label, figure, f"≤ {limit:g} ms and ≤ flat", _verdict(ok), ""))
    return rows


def restart_rows(part: dict[str, Any] | None) -> list[Row]:
    if part is None:
        return [("6 restart after a crash", "not measured", "", "", "")]
    stored = part["stored_replayed"] + part["stored_new"]
    whole = (
        part["stored_replayed"] == part["frames_in_journal"]
        and part["stored_new"] >= part["sent"]  # and the snapshots taken at connect
        and part["exit_code"] == 0
    )
    return [
        (
            f"6 restart after a crash: {part['frames_in_journal']:,} frames in the journal, "
            f"{part['rate']:,} msg/s offered",
            f"feed read again {part['first_frame_s']:.1f} s after the start; the journal "
            f"replayed in {part['replay_s']:.1f} s beside it ({part['received_meanwhile']:,} "
            f"frames received meanwhile); {stored:,} frames stored"
            + ("" if whole else " (**not all of them**)"),
            "",
            "",
            _others(part),
        )
    ]


#: stolen cores from which the table's header says the run measured a slowed machine
STOLEN_NOTED = 0.2


def _most_stolen(value: Any) -> float:
    """The most cores the hypervisor took during any one measurement in a part's results."""
    if isinstance(value, dict):
        own = value.get("stolen_cores")
        return max([float(own or 0.0), *map(_most_stolen, value.values())])
    if isinstance(value, list):
        return max(map(_most_stolen, value), default=0.0)
    return 0.0


def _stolen_note(parts: dict[str, dict[str, Any] | None]) -> str:
    """A warning for the header when the hypervisor took STOLEN_NOTED cores or more."""
    stolen, part = max((_most_stolen(results), name) for name, results in parts.items())
    if stolen < STOLEN_NOTED:
        return ""
    return (
        f" **The hypervisor took up to {stolen:.2f} of the cores during a measurement (part "
        f"{part}): this run's figures are those of a slowed machine.**"
    )


def table(total_seconds: float | None) -> str:
    rows = [
        *throughput_rows(_load("throughput")),
        *memory_rows(_load("memory")),
        *size_rows(_load("size")),
        *latency_rows(_load("latency")),
        *queries_rows(_load("queries")),
        *restart_rows(_load("restart")),
    ]
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("aiohttp", "pyarrow", "duckdb", "orjson")
    )
    took = f"; `make bench` took {total_seconds / 60:.1f} min" if total_seconds else ""
    parts = [p for p in map(_load, (*PARTS, "size")) if p]
    scales = ", ".join(sorted({f"{p['scale']:g}" for p in parts})) or f"{SCALE:g}"
    run = _load("run") or {}
    code = run.get("start", "")
    if run.get("end") and run["end"] != code:
        code += f" (changed to {run['end']} during the run)"
    code = f" of commit {code}" if code else ""
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')}{code} on {_cores()} cores, Python "
        f"{platform.python_version()} ({versions}); BENCH_SCALE={scales}{took}. "
        '"Others / stolen": cores used by other processes on the machine during the '
        "measurement / cores the hypervisor gave other virtual machines meanwhile."
        + _stolen_note({p: _load(p) for p in ("throughput", "memory", "latency", "restart")}),
        "",
        "| measure | result | target | status | others / stolen |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="how long the run took")
    parser.add_argument("--output", type=Path, default=BENCH / "results.md")
    args = parser.parse_args(argv)
    text = table(args.seconds)
    args.output.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
