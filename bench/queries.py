"""Part 5, queries on a generated store of about 20 million messages (bench/genstore.py).

Each query runs through the recorder's own code: :class:`recorder.Store` (``bars``,
``asof``, ``replay``) and :func:`recorder.connect` (message counts), over the partitioned
store; and the very same code over one unpartitioned file per table (``FlatStore`` below
only changes the file list the views read). Each query is timed end to end as a user calls
it (DuckDB connection and views included): the first call, then the median of the next ones.
The results of both layouts are checked to be equal.

The one-date queries (bars, as-of, replay) run a third time over the ``date`` layout
(``compaction.layout``): a copy of the store whose middle date the recorder's own compactor
folds into one file per table (:mod:`recorder.dayfold`), at the generator's zstd level.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow.parquet as pq

import recorder
from bench import genstore
from bench.common import cleanup, fresh_dir, log, save, scaled, timed, wait_quiet
from recorder import Store
from recorder.catalog import derived_views
from recorder.compaction import compact
from recorder.compactor import Compactor
from recorder.schema import DATA_TABLES, TABLES
from recorder.storesql import sql_text

TEHRAN = ZoneInfo("Asia/Tehran")
COUNTS_SQL = "SELECT contract, date, count(*) AS messages FROM aggregate GROUP BY ALL"


class FlatStore(Store):
    """The Store's queries over ``{table}.parquet`` files that hold every partition.

    Where the Store picks a contract's folders, the flat file has none: its views filter on
    the ``contract`` column instead (DuckDB pushes the filter into the scan).
    """

    _wanted: list[str] | None = None

    def files(
        self, table: str, contracts: Any = None, start: Any = None, end: Any = None, **_: Any
    ) -> list[Path]:
        if contracts is not None:
            self._wanted = [contracts] if isinstance(contracts, str) else list(contracts)
        path = self.data_dir / f"{table}.parquet"
        return [path] if path.exists() else []

    _db: duckdb.DuckDBPyConnection | None = None

    def _connect(
        self, files: dict[str, list[Path]], rows: str = "", packed_rows: str | None = None
    ) -> duckdb.DuckDBPyConnection:
        """One database per store, a cursor with the flat views per call: as Store does
        (``rows``, Store's filter of day files on contract, is not needed: the flat views
        filter on contract themselves)."""
        wanted, self._wanted = self._wanted, None
        if self._db is None:
            self._db = duckdb.connect(":memory:")
            self._db.execute("SET GLOBAL TimeZone = 'UTC'")
            self._db.execute("SET GLOBAL parquet_metadata_cache = true")
            for name, table in TABLES.items():
                empty = ", ".join(f"NULL::{c.type} AS {c.name}" for c in table.columns)
                self._db.execute(f"CREATE VIEW {name} AS SELECT {empty} WHERE false")
            for statement in derived_views():
                self._db.execute(statement)
        con = self._db.cursor()
        for name, table in TABLES.items():
            path = self.data_dir / f"{name}.parquet"
            if path.exists():
                columns = ", ".join(f"{c.name}::{c.type} AS {c.name}" for c in table.columns)
                where = ""
                if wanted is not None and table.by_contract:
                    where = " WHERE contract IN (" + ", ".join(map(sql_text, wanted)) + ")"
                source = f"read_parquet('{path}'){where}"
                con.execute(f"CREATE TEMP VIEW {name} AS SELECT {columns} FROM {source}")
        return con


def _time(call: Callable[[], Any], repeat: int) -> tuple[dict[str, float], Any]:
    timings = []
    result = None
    for _ in range(1 + repeat):
        began = time.perf_counter()
        result = call()
        timings.append(1000 * (time.perf_counter() - began))
    return {
        "first_ms": round(timings[0], 1),
        "median_ms": round(statistics.median(timings[1:]), 1),
    }, result


def _counts(store: Store) -> Any:
    con = store.connect() if isinstance(store, FlatStore) else recorder.connect(store.data_dir)
    try:
        return con.sql(COUNTS_SQL + " ORDER BY contract, date").fetchall()
    finally:
        con.close()


def _busiest(store_dir: Path, day: str) -> str:
    """The contract with the most messages that day (the slowest one-contract query)."""
    folder = store_dir / "aggregate" / f"date={day}"
    sizes = {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in folder.iterdir()}
    return max(sizes, key=lambda name: sizes[name]).removeprefix("contract=")


def _date_layout(store_dir: Path, date_dir: Path, day: date) -> dict[str, Any]:
    """``date_dir``: ``store_dir`` (hard links) with ``day`` folded into the date layout."""
    shutil.copytree(store_dir, date_dir, copy_function=os.link)
    folders = [date_dir / t / f"date={day.isoformat()}" for t in DATA_TABLES]
    before = sum(p.stat().st_size for f in folders for p in f.rglob("*.parquet"))
    level = genstore.GENERATE_LEVEL
    compactor = Compactor(date_dir, compression_level=level, layout="date", convert=True)
    with timed() as took:
        result = compact(date_dir, TEHRAN, days=[day], bar=False, compactor=compactor)
    if not result.ok or result.compacted != len(DATA_TABLES):
        raise AssertionError(f"the date layout's fold: {result}")
    log(f"queries: {day} folded into the date layout in {took['seconds']:.0f} s")
    aggregate = next((date_dir / "aggregate" / f"date={day.isoformat()}").glob("*.parquet"))
    return {
        "date": day.isoformat(),
        "messages": pq.read_metadata(aggregate).num_rows,  # one aggregate row per message
        "seconds": round(took["seconds"], 1),
        "level": level,
        "contract_files_bytes": before,
        "bytes": result.bytes_after,
        "rows": result.rows,
    }


def run(root: Path, messages: int, days: int, repeat: int) -> dict[str, Any]:
    free = shutil.disk_usage(root).free
    log(f"queries: generating {messages:,} messages ({free / 1e9:.0f} GB free)")
    generated = genstore.generate(root, messages, days, 500)
    store_dir, flat_dir = root / "store", root / "flat"
    size = {
        "store_bytes": sum(p.stat().st_size for p in store_dir.rglob("*.parquet")),
        "store_files": sum(1 for _ in store_dir.rglob("*.parquet")),
        "flat_bytes": sum(p.stat().st_size for p in flat_dir.glob("*.parquet")),
    }
    middle = genstore.FIRST_DAY + timedelta(days=days // 2)
    day_start = datetime(middle.year, middle.month, middle.day, tzinfo=UTC) - genstore.TEHRAN_OFFSET
    day_end = day_start + timedelta(days=1)
    instant = day_start + timedelta(hours=12)  # 12:00 Tehran, mid-session
    contract = _busiest(store_dir, middle.isoformat())
    date_layout = _date_layout(store_dir, root / "date", middle)
    stores = {
        "partitioned": Store(store_dir, partition_timezone="Asia/Tehran"),
        "flat": FlatStore(flat_dir, partition_timezone="Asia/Tehran"),
        "date": Store(root / "date", partition_timezone="Asia/Tehran"),
    }
    queries: dict[str, Callable[[Store], Any]] = {
        "bars": lambda s: s.bars("1 minute", contract, day_start, day_end).to_pylist(),
        "asof": lambda s: s.asof(instant).to_pylist(),
        "counts": _counts,
        "replay": lambda s: sum(1 for _ in s.replay(contract, day_start, day_end)),
    }
    wait_quiet()
    timings: dict[str, dict[str, Any]] = {}
    for name, query in queries.items():
        answers = {}
        for layout, store in stores.items():
            if layout == "date" and name == "counts":
                continue  # a one-date query: the other dates are in the contract layout
            times = repeat if name != "replay" else max(1, repeat // 3)
            figures, answers[layout] = _time(lambda q=query, s=store: q(s), times)
            timings.setdefault(name, {})[layout] = figures
            log(f"queries: {name} ({layout}): {figures['median_ms']:.1f} ms")
        if any(answer != answers["partitioned"] for answer in answers.values()):
            raise AssertionError(f"{name}: the layouts answer differently")
        answer = answers["partitioned"]
        timings[name]["rows"] = answer if isinstance(answer, int) else len(answer)
    return {
        "generated": generated,
        **size,
        "contract": contract,
        "day": middle.isoformat(),
        "instant": instant.isoformat(),
        "date_layout": date_layout,
        "queries": timings,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=scaled(20_000_000, 200_000))
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    root = fresh_dir("queries")
    try:
        result = run(root, args.messages, args.days, args.repeat)
    finally:
        cleanup(root)
    save("queries", result)


if __name__ == "__main__":
    sys.exit(main())
