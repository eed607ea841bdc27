"""A generated store for part 5: about 20 million messages, 500 contracts, several days.

Written directly with pyarrow in the recorder's layout, one file per partition as after
compaction (``{table}/date=D/contract=C/{first:020d}-{last:020d}.c.parquet``, sorted by
``exchange_ts, seq``, zstd level and row groups as the compactor writes them), plus the same
rows as one unpartitioned file per table (``flat/{table}.parquet``, in arrival order, with
``contract`` and ``date`` as columns), the layout a recorder that appends to one file has.

Messages look like the feed's: per contract a random walk on its tick grid, three BestLimit
levels, cumulative Aggregate counters, a daily price band and open interest; busy and quiet
contracts (log-normal activity), trading 09:00-17:00 Tehran time, ``seq`` in arrival order.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recorder.folding import TAG
from recorder.packing import ROW_GROUP_ROWS, pack_received
from recorder.paths import file_name, partition_dir
from recorder.schema import TABLES

TABLE_NAMES = ("best_limit", "aggregate", "allowed_price_range", "contract_info")
FIRST_DAY = date(2026, 10, 3)  # a Saturday: the Iranian working week starts
TEHRAN_OFFSET = timedelta(hours=3, minutes=30)  # no daylight saving time since 2022
OPEN_LOCAL, CLOSE_LOCAL = 9, 17  # trading hours, Tehran
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PRICES = ("closing_price", "last_price", "low_price", "high_price", "open_price", "previous_close")


def contract_names(count: int) -> list[str]:
    return [str(1001 + i) for i in range(count)]


def trading_window_us(day: date) -> tuple[int, int]:
    """Start and end of the trading day, UTC microseconds since the epoch."""
    local_midnight = datetime(day.year, day.month, day.day, tzinfo=UTC) - TEHRAN_OFFSET
    start = local_midnight + timedelta(hours=OPEN_LOCAL)
    end = local_midnight + timedelta(hours=CLOSE_LOCAL)
    return (start - _EPOCH) // timedelta(microseconds=1), (end - _EPOCH) // timedelta(
        microseconds=1
    )


#: the compactor writes zstd 19 for size; reading costs the same at any level, and level 9
#: keeps generating 20 M messages to minutes
GENERATE_LEVEL = 9
#: the flat file keeps DuckDB's own row group size
FLAT_ROW_GROUP_ROWS = 122_880


def _write(table: pa.Table, path: Path, sort_columns: list[str]) -> None:
    delta = [c for c in ("exchange_ts", "received_at", "seq") if c in table.column_names]
    delta += [c for c in ("trade_count", "total_volume", "total_value") if c in table.column_names]
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=GENERATE_LEVEL,
        use_dictionary=[c for c in table.column_names if c not in delta],
        column_encoding=dict.fromkeys(delta, "DELTA_BINARY_PACKED"),
        write_statistics=True,
        row_group_size=ROW_GROUP_ROWS,
        sorting_columns=[pq.SortingColumn(table.column_names.index(c)) for c in sort_columns],
    )


def _contract_day(rng: np.random.Generator, times: np.ndarray, base: int) -> dict[str, Any]:
    """Column values of one contract's messages of one day (times sorted, microseconds)."""
    n = len(times)
    tick = 100 if base >= 200_000 else 10
    band_low, band_high = int(base * 0.95) // tick * tick, int(base * 1.05) // tick * tick
    mid = base + tick * np.cumsum(rng.choice([-2, -1, 0, 0, 1, 2], n))
    mid = np.clip(mid, band_low + 4 * tick, band_high - 4 * tick)
    bid1 = mid - tick * rng.integers(0, 2, n)
    ask1 = bid1 + tick * rng.integers(1, 4, n)
    bid2 = bid1 - tick * rng.integers(1, 4, n)
    ask2 = ask1 + tick * rng.integers(1, 4, n)
    bid3 = bid2 - tick * rng.integers(1, 4, n)
    ask3 = ask2 + tick * rng.integers(1, 4, n)
    traded = rng.random(n) < 0.45
    trades = np.where(traded, rng.integers(1, 4, n), 0)
    quantity = np.where(traded, rng.integers(1, 150, n), 0)
    price = np.where(traded, mid + tick * rng.integers(-2, 3, n), 0)
    trade_count = np.cumsum(trades)
    total_volume = np.cumsum(quantity)
    total_value = np.cumsum(price * quantity * 10)
    last = np.maximum.accumulate(np.where(traded, np.arange(n), -1))
    last_price = np.where(last >= 0, price[np.maximum(last, 0)], 0)
    high = np.where(last >= 0, np.maximum.accumulate(np.where(traded, price, 0)), 0)
    low_seen = np.minimum.accumulate(np.where(traded, price, np.iinfo(np.int64).max))
    low = np.where(last >= 0, low_seen, 0)
    first_trade = int(np.argmax(traded)) if traded.any() else -1
    open_price = (
        np.where(np.arange(n) >= first_trade, price[first_trade], 0)
        if first_trade >= 0
        else np.zeros(n, np.int64)
    )
    vwap = np.where(total_volume > 0, total_value / np.maximum(total_volume * 10, 1), 0)
    closing = (np.round(vwap / tick) * tick).astype(np.int64)
    oi0 = int(rng.integers(50, 20_000))
    oi = np.maximum(0, oi0 + np.cumsum(np.where(rng.random(n) < 0.3, rng.integers(-25, 31, n), 0)))
    return {
        "bid": (bid1, bid2, bid3),
        "ask": (ask1, ask2, ask3),
        "bid_qty": tuple(rng.integers(1, 301, n) for _ in range(3)),
        "ask_qty": tuple(rng.integers(1, 301, n) for _ in range(3)),
        "trade_count": trade_count,
        "total_volume": total_volume,
        "total_value": total_value,
        "closing_price": closing,
        "last_price": last_price,
        "low_price": low,
        "high_price": high,
        "open_price": open_price,
        "previous_close": np.full(n, base),
        "min_allowed_price": np.full(n, band_low),
        "max_allowed_price": np.full(n, band_high),
        "open_interest": oi,
        "open_interest_changes": oi - oi0,
    }


def _timestamps(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.timestamp("us", tz="UTC"))


def _tables(
    day: date, ts: np.ndarray, received: np.ndarray, seq: np.ndarray, v: dict[str, Any]
) -> dict[str, pa.Table]:
    """The four data tables of one contract-day, in the files' schemas."""
    n = len(ts)
    stream = pa.array(["stream"] * n)
    head = {"exchange_ts": _timestamps(ts), "received_at": _timestamps(received), "seq": seq}
    local = (ts + TEHRAN_OFFSET // timedelta(microseconds=1)) % 86_400_000_000
    trade_time = (local // 1_000_000) * 1_000_000
    levels = np.tile(np.array([1, 2, 3], np.int32), n)
    interleave = lambda arrays: np.stack(arrays, axis=1).reshape(-1)  # noqa: E731
    best = {
        "exchange_ts": _timestamps(np.repeat(ts, 3)),
        "received_at": _timestamps(np.repeat(received, 3)),
        "seq": np.repeat(seq, 3),
        "level": levels,
        "buy_quantity": interleave(v["bid_qty"]),
        "buy_price": interleave(v["bid"]).astype(np.float64),
        "sell_quantity": interleave(v["ask_qty"]),
        "sell_price": interleave(v["ask"]).astype(np.float64),
        "source": pa.array(["stream"] * (3 * n)),
    }
    aggregate = {
        **head,
        "trade_date": pa.array(np.full(n, (day - date(1970, 1, 1)).days, np.int32), pa.date32()),
        "trade_time": pa.array(trade_time, pa.time64("us")),
        "trade_count": v["trade_count"],
        "total_volume": v["total_volume"],
        "total_value": v["total_value"],
        **{k: v[k].astype(np.float64) for k in PRICES},
        "source": stream,
    }
    band = {
        **head,
        "min_allowed_price": v["min_allowed_price"].astype(np.float64),
        "max_allowed_price": v["max_allowed_price"].astype(np.float64),
        "source": stream,
    }
    info = {
        **head,
        "open_interest": v["open_interest"],
        "open_interest_changes": v["open_interest_changes"],
        "source": stream,
    }
    columns = {"best_limit": best, "aggregate": aggregate, "allowed_price_range": band}
    columns["contract_info"] = info
    return {
        name: pa.Table.from_pydict(columns[name], schema=TABLES[name].arrow_schema)
        for name in TABLE_NAMES
    }


def generate_day(args: tuple[Path, int, int, int, int]) -> dict[str, int]:
    """Write one date's partitions and its flat chunk; returns counts."""
    root, index, per_day, contracts, seed = args
    day = FIRST_DAY + timedelta(days=index)
    rng = np.random.default_rng([seed, index])
    activity = np.random.default_rng([seed]).lognormal(0.0, 1.0, contracts)
    counts = rng.multinomial(per_day, activity / activity.sum())
    start, end = trading_window_us(day)
    names = contract_names(contracts)
    bases = np.random.default_rng([seed, 1]).integers(100_000, 5_000_000, contracts)
    all_ts = [np.sort(rng.integers(start, end, c)) for c in counts]
    # seq in arrival order over all contracts of the day
    merged = np.concatenate(all_ts)
    order = np.argsort(merged, kind="stable")
    seq_all = np.empty(len(merged), np.int64)
    seq_all[order] = index * per_day * 2 + 1 + np.arange(len(merged))
    flat_parts: dict[str, list[pa.Table]] = {t: [] for t in TABLE_NAMES}
    offset = 0
    for c, ts in enumerate(all_ts):
        n = len(ts)
        if n == 0:
            continue
        seq = seq_all[offset : offset + n]
        offset += n
        received = ts + rng.lognormal(6.5, 0.8, n).astype(np.int64)  # ~0.7 ms later
        values = _contract_day(rng, ts, int(bases[c]))
        for name, table in _tables(day, ts, received, seq, values).items():
            folder = root / "store" / partition_dir(name, day.isoformat(), names[c])
            folder.mkdir(parents=True, exist_ok=True)
            _write(
                pack_received(TABLES[name], table),  # as the compactor writes contract files
                folder / file_name(int(seq[0]), int(seq[-1]), TAG),
                ["exchange_ts", "seq"],
            )
            flat = table.append_column("contract", pa.array([names[c]] * table.num_rows))
            flat = flat.append_column("date", pa.array([day] * table.num_rows, pa.date32()))
            flat_parts[name].append(flat)
    chunks = root / "flat-chunks"
    chunks.mkdir(exist_ok=True)
    for name, parts in flat_parts.items():
        table = pa.concat_tables(parts)
        table = table.sort_by([("exchange_ts", "ascending"), ("seq", "ascending")])
        pq.write_table(table, chunks / f"{name}-{index:03d}.parquet", compression="zstd")
    return {"messages": int(counts.sum()), "day": index}


def generate(root: Path, messages: int, days: int, contracts: int, seed: int = 7) -> dict[str, Any]:
    """Write the store under ``root/store`` and the flat files under ``root/flat``."""
    began = time.monotonic()
    per_day = messages // days
    jobs = [(root, i, per_day, contracts, seed) for i in range(days)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(generate_day, jobs))
    flat = root / "flat"
    flat.mkdir(exist_ok=True)
    con = duckdb.connect()
    for name in TABLE_NAMES:
        chunks = sorted((root / "flat-chunks").glob(f"{name}-*.parquet"))
        listing = ", ".join(f"'{p}'" for p in chunks)
        con.execute(
            f"COPY (SELECT * FROM read_parquet([{listing}])) TO '{flat / name}.parquet' "
            f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {FLAT_ROW_GROUP_ROWS})"
        )
        for chunk in chunks:
            chunk.unlink()
    (root / "flat-chunks").rmdir()
    con.close()
    return {
        "messages": sum(d["messages"] for d in done),
        "days": days,
        "contracts": contracts,
        "first_day": FIRST_DAY.isoformat(),
        "seconds": round(time.monotonic() - began, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--messages", type=int, default=20_000_000)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--contracts", type=int, default=500)
    args = parser.parse_args(argv)
    print(generate(args.root, args.messages, args.days, args.contracts))


if __name__ == "__main__":
    sys.exit(main())
