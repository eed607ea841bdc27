"""Part 3, size: bytes on disk per message, per table and in total, after compaction.

Uses the recording of part 4 (bench/latency.py: 60 s at 10,000 messages/s over 500
contracts, every message made fresh by the simulator's random walks, every frame's bytes
counted by the simulator) or, run alone, makes one the same way. Then runs
``ime-recorder compact`` on its dates and compares the Parquet bytes with the raw JSON.
Parquet footers (a fixed cost per file, large when partitions are small) are shown apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import recorder
from bench import latency
from bench.common import (
    CONTRACTS,
    PER_CONNECTION,
    RECORDER,
    WORK,
    cleanup,
    fresh_dir,
    log,
    save,
    scaled,
    timed,
    visible_files,
)


def _bytes_by_table(data_dir: Path) -> tuple[Counter[str], Counter[str], Counter[str]]:
    size: Counter[str] = Counter()
    footers: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for path in visible_files(data_dir):
        table = path.relative_to(data_dir).parts[0]
        size[table] += path.stat().st_size
        footers[table] += pq.ParquetFile(path).metadata.serialized_size + 8  # + length, magic
        files[table] += 1
    return size, footers, files


def _bytes_by_column(data_dir: Path, tables: list[str]) -> dict[str, dict[str, int]]:
    """Compressed bytes of each column of each table (where the bytes go)."""
    out: dict[str, dict[str, int]] = {}
    for table in tables:
        columns: Counter[str] = Counter()
        for path in visible_files(data_dir, table):
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                row_group = meta.row_group(group)
                for index in range(row_group.num_columns):
                    chunk = row_group.column(index)
                    columns[chunk.path_in_schema] += chunk.total_compressed_size
        out[table] = dict(columns.most_common())
    return out


def _recording() -> tuple[Path, dict[str, Any]]:
    """The part-4 recording if there is one, else a new one made the same way."""
    marker = WORK / latency.RECORDING / "recording.json"
    if marker.exists():
        return marker.parent, json.loads(marker.read_text(encoding="utf-8"))
    work = fresh_dir("size")
    log("size: no part-4 recording; recording 10,000 msg/s for 60 s")
    run = latency.record(scaled(60, 5), 10_000 / (CONTRACTS // PER_CONNECTION), work)
    return work, run


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    work, run = _recording()
    data_dir = Path(run["data_dir"])
    con = recorder.connect(data_dir)
    row = con.execute(
        "SELECT count(DISTINCT seq) FROM aggregate WHERE source = 'stream'"
    ).fetchone()
    con.close()
    messages = int(row[0]) if row else 0
    raw = int(run["raw_bytes"])
    if messages != run["frames_counted"]:
        raise AssertionError(f"{messages} messages stored, {run['frames_counted']} sent")
    before, _, files_before = _bytes_by_table(data_dir)
    dates = sorted({p.name.removeprefix("date=") for p in data_dir.glob("*/date=*") if p.is_dir()})
    command = [RECORDER, "compact", "--data-dir", str(data_dir)]
    command += [arg for d in dates for arg in ("--date", d)]
    log(f"size: compacting {len(dates)} date(s) of {messages:,} messages")
    with timed() as took:
        subprocess.run(command, check=True, capture_output=True)
    after, footers, files_after = _bytes_by_table(data_dir)
    tables = sorted(after, key=lambda t: -after[t])
    total = sum(after.values())
    journal = sum(p.stat().st_size for p in (data_dir / "_journal").rglob("*") if p.is_file())
    result = {
        "messages": messages,
        "raw_json_bytes": raw,
        "raw_bytes_per_message": raw / messages,
        "dates": dates,
        "compaction_seconds": round(took["seconds"], 2),
        "before": {
            "bytes": sum(before.values()),
            "files": sum(files_before.values()),
            "bytes_per_message": sum(before.values()) / messages,
        },
        "tables": {
            t: {
                "bytes": after[t],
                "files": files_after[t],
                "footer_bytes": footers[t],
                "bytes_per_message": after[t] / messages,
                "bytes_per_message_without_footers": (after[t] - footers[t]) / messages,
            }
            for t in tables
        },
        "total_bytes": total,
        "bytes_per_message": total / messages,
        "bytes_per_message_without_footers": (total - sum(footers.values())) / messages,
        "ratio": raw / total,
        "journal_bytes_left": journal,
        "columns": _bytes_by_column(
            data_dir, ["best_limit", "aggregate", "contract_info", "allowed_price_range", "extras"]
        ),
    }
    log(f"size: {result['bytes_per_message']:.1f} bytes/message, {result['ratio']:.1f}x")
    save("size", result)
    cleanup(work)


if __name__ == "__main__":
    sys.exit(main())
