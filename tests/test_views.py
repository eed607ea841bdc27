"""The backtesting views (top_of_book, trades, bars, asof_state) on a hand-written store."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

import recorder
from recorder.buffer import Batch
from recorder.catalog import FileSchemas
from recorder.paths import file_name
from recorder.schema import RECEIVED_DELAY_COLUMN, TABLES
from recorder.writer import ParquetWriter, to_arrow

DAY = date(2026, 5, 30)  # Tehran dates: 06:00Z is 09:30 local
NEXT = date(2026, 5, 31)


def at(hour: int, minute: int, second: int, day: int = 30) -> datetime:
    """An instant of the fixture, in UTC."""
    return datetime(2026, 5, day, hour, minute, second, tzinfo=UTC)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def row(table: str, **values: Any) -> tuple[Any, ...]:
    """A file row of ``table`` from column values (the rest NULL; received_at = exchange_ts)."""
    if "exchange_ts" in values:
        values["exchange_ts"] = _us(values["exchange_ts"])
        values.setdefault("received_at", values["exchange_ts"])
    values.setdefault("source", "stream")
    return tuple(values.get(c.name) for c in TABLES[table].file_columns)


def aggregate(
    seq: int,
    ts: datetime,
    day: date | None,
    count: int,
    volume: int,
    value: int,
    last: float,
    high: float,
    low: float,
    open_: float,
) -> tuple[Any, ...]:
    """An Aggregate row (trade_time 12:00:00, closing and previous close 0)."""
    return row(
        "aggregate",
        exchange_ts=ts,
        seq=seq,
        trade_date=day,
        trade_time=time(12),
        trade_count=count,
        total_volume=volume,
        total_value=value,
        closing_price=0.0,
        last_price=last,
        low_price=low,
        high_price=high,
        open_price=open_,
        previous_close=0.0,
    )


def level(seq: int, ts: datetime, n: int, bid: tuple[int, float], ask: tuple[int, float]) -> Any:
    """A BestLimit row: (quantity, price) of each side."""
    return row(
        "best_limit",
        exchange_ts=ts,
        seq=seq,
        level=n,
        buy_quantity=bid[0],
        buy_price=bid[1],
        sell_quantity=ask[0],
        sell_price=ask[1],
    )


def write_fixture(data_dir: Path) -> None:
    """Contract A trades on 2026-05-30 with a gap at 06:01:15-06:01:45; B trades on two days.

    A: seq 1 before the first trade (no trade date), 2 the day's first two trades (10 @ 100,
    open 99, high 101, low 99), 3 one trade (5 @ 102, a new high), 4 no change, 5 two trades
    (10 @ 98, a new low 97), 6 extras only. B: seq 7 the first snapshot of 2026-05-30 with 4
    trades done before, seq 8 the first of 2026-05-31 (counters restarted).
    """
    writer = ParquetWriter(data_dir, fsync=False)
    files: dict[tuple[str, str, str | None], list[tuple[Any, ...]]] = {
        ("aggregate", "2026-05-30", "A"): [
            aggregate(1, at(6, 0, 10), None, 0, 0, 0, 0, 0, 0, 0),
            aggregate(2, at(6, 0, 20), DAY, 2, 10, 1000, 100, 101, 99, 99),
            aggregate(3, at(6, 0, 40), DAY, 3, 15, 1510, 102, 102, 99, 99),
            aggregate(4, at(6, 1, 10), DAY, 3, 15, 1510, 102, 102, 99, 99),
            aggregate(5, at(6, 2, 30), DAY, 5, 25, 2490, 98, 102, 97, 99),
        ],
        ("best_limit", "2026-05-30", "A"): [
            level(2, at(6, 0, 20), 1, (5, 99), (7, 101)),
            level(2, at(6, 0, 20), 2, (3, 98), (0, 0)),  # an empty ask side; no level 3
            level(3, at(6, 0, 40), 1, (0, 0), (4, 102)),  # an empty bid side
        ],
        ("allowed_price_range", "2026-05-30", "A"): [
            row(
                "allowed_price_range",
                exchange_ts=at(6, 0, 20),
                seq=2,
                min_allowed_price=90.0,
                max_allowed_price=110.0,
            ),
        ],
        ("contract_info", "2026-05-30", "A"): [
            row(
                "contract_info",
                exchange_ts=at(6, 0, 20),
                seq=2,
                open_interest=50,
                open_interest_changes=5,
            ),
        ],
        ("extras", "2026-05-30", "A"): [
            row(
                "extras",
                exchange_ts=at(6, 0, 20),
                seq=2,
                section=None,
                level=None,
                json='{"sequence":7}',
            ),
            row(
                "extras",
                exchange_ts=at(6, 3, 0),
                seq=6,
                section="OrderBookDelta",
                level=None,
                json='{"side":"buy"}',
            ),
        ],
        ("aggregate", "2026-05-30", "B"): [
            aggregate(7, at(10, 0, 0), DAY, 4, 40, 4000, 100, 100, 100, 100),
        ],
        ("aggregate", "2026-05-31", "B"): [
            aggregate(8, at(5, 0, 0, day=31), NEXT, 1, 3, 330, 110, 110, 110, 110),
        ],
        ("session_log", "2026-05-30", None): [
            row(
                "session_log",
                received_at=_us(at(5, 59, 0)),
                seq=100,
                session="r-0.1",
                run="r",
                endpoint="ws://x/contract/id",
                contracts=["A"],
                opened_at=_us(at(5, 59, 0)),
            ),
            row(
                "session_log",
                received_at=_us(at(6, 1, 15)),
                seq=101,
                session="r-0.1",
                run="r",
                endpoint="ws://x/contract/id",
                contracts=["A"],
                opened_at=_us(at(5, 59, 0)),
                closed_at=_us(at(6, 1, 15)),
                reason="connection lost",
                frames=4,
                stale=False,
            ),
            row(
                "session_log",
                received_at=_us(at(6, 1, 45)),
                seq=102,
                session="r-0.2",
                run="r",
                endpoint="ws://x/contract/id",
                contracts=["A"],
                opened_at=_us(at(6, 1, 45)),
            ),
        ],
    }
    for key, rows in files.items():
        writer.write(Batch(key, rows))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """The hand-written fixture store."""
    write_fixture(tmp_path)
    return tmp_path


def _query(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[Any, ...]]:
    return con.execute(sql).fetchall()


def test_top_of_book_rows_hold_nulls_for_empty_sides_and_missing_levels(store: Path) -> None:
    """One row per BestLimit message; empty sides and absent levels are NULL, mid/spread too."""
    con = recorder.connect(store)
    rows = _query(con, "SELECT * EXCLUDE (date) FROM top_of_book ORDER BY seq")
    empty = (None, None, None, None)
    assert rows == [
        ("A", at(6, 0, 20), 2, 99.0, 5, 98.0, 3, None, None, 101.0, 7, *empty, 100.0, 2.0),
        ("A", at(6, 0, 40), 3, None, None, *empty, 102.0, 4, *empty, None, None),
    ]


def test_trades_are_counter_increments_that_restart_each_trading_date(store: Path) -> None:
    """Increments between snapshots, the day's first counting from zero, only where trading."""
    con = recorder.connect(store)
    rows = _query(
        con,
        "SELECT contract, exchange_ts, seq, trade_date, trade_count, volume, value, avg_price,"
        " first_price, high_price, low_price, last_price FROM trades ORDER BY seq",
    )
    assert rows == [
        ("A", at(6, 0, 20), 2, DAY, 2, 10, 1000, 100.0, 99.0, 101.0, 99.0, 100.0),
        ("A", at(6, 0, 40), 3, DAY, 1, 5, 510, 102.0, 102.0, 102.0, 102.0, 102.0),
        ("A", at(6, 2, 30), 5, DAY, 2, 10, 980, 98.0, 98.0, 98.0, 97.0, 98.0),
        ("B", at(10, 0, 0), 7, DAY, 4, 40, 4000, 100.0, 100.0, 100.0, 100.0, 100.0),
        ("B", at(5, 0, 0, day=31), 8, NEXT, 1, 3, 330, 110.0, 110.0, 110.0, 110.0, 110.0),
    ]


def test_minute_bars_from_trades_and_carried_last_price(store: Path) -> None:
    """OHLCV per minute; a minute with snapshots but no trade is flat at the last price."""
    con = recorder.connect(store)
    rows = _query(con, "SELECT * FROM bars(INTERVAL '1 minute') ORDER BY contract, bar_start")
    assert rows == [
        ("A", at(6, 0, 0), 99.0, 102.0, 99.0, 102.0, 15, 1510, 3),
        ("A", at(6, 1, 0), 102.0, 102.0, 102.0, 102.0, 0, 0, 0),
        ("A", at(6, 2, 0), 98.0, 98.0, 97.0, 98.0, 10, 980, 2),
        ("B", at(10, 0, 0), 100.0, 100.0, 100.0, 100.0, 40, 4000, 4),
        ("B", at(5, 0, 0, day=31), 110.0, 110.0, 110.0, 110.0, 3, 330, 1),
    ]


def test_bars_in_a_time_zone_and_window(store: Path) -> None:
    """Tehran-day bars sum a day's trading; since/until keep only trading inside the window."""
    con = recorder.connect(store)
    days = _query(
        con,
        "SELECT contract, bar_start, open, high, low, close, volume FROM "
        "bars(INTERVAL '1 day', tz := 'Asia/Tehran') ORDER BY contract, bar_start",
    )
    assert days == [
        ("A", datetime(2026, 5, 29, 20, 30, tzinfo=UTC), 99.0, 102.0, 97.0, 98.0, 25),
        ("B", datetime(2026, 5, 29, 20, 30, tzinfo=UTC), 100.0, 100.0, 100.0, 100.0, 40),
        ("B", datetime(2026, 5, 30, 20, 30, tzinfo=UTC), 110.0, 110.0, 110.0, 110.0, 3),
    ]
    window = _query(
        con,
        "SELECT contract, bar_start, volume FROM bars(INTERVAL '1 hour', "
        "since := TIMESTAMPTZ '2026-05-30 06:00:30+00', "
        "until := TIMESTAMPTZ '2026-05-30 07:00+00')",
    )
    assert window == [("A", at(6, 0, 0), 15)]


def test_asof_state_is_each_contracts_last_message_at_or_before(store: Path) -> None:
    """The last message at or before the instant, with its sections; none before the first."""
    con = recorder.connect(store)
    early = _query(
        con,
        "SELECT contract, seq, bid_price_1, ask_price_1, mid, trade_count, last_price,"
        " min_allowed_price, open_interest FROM asof_state(TIMESTAMPTZ '2026-05-30 06:00:30+00')",
    )
    assert early == [("A", 2, 99.0, 101.0, 100.0, 2, 100.0, 90.0, 50)]
    late = _query(
        con,
        "SELECT contract, exchange_ts, seq, bid_price_1, total_volume, min_allowed_price "
        "FROM asof_state(TIMESTAMPTZ '2026-05-31 06:00:00+00') ORDER BY contract",
    )
    assert late == [
        ("A", at(6, 2, 30), 5, None, 25, None),
        ("B", at(5, 0, 0, 31), 8, None, 3, None),
    ]
    exact = _query(con, "SELECT seq FROM asof_state(TIMESTAMPTZ '2026-05-30 10:00:00+00')")
    assert sorted(exact) == [(5,), (7,)]
    recent = _query(
        con,
        "SELECT contract FROM asof_state(TIMESTAMPTZ '2026-05-31 06:00:00+00', "
        "lookback := INTERVAL 2 hours)",
    )
    assert recent == [("B",)]


def test_bars_step_over_snapshots_without_counters(tmp_path: Path) -> None:
    """A snapshot without trade counters (a partial Aggregate) is no step of trading, and
    the next snapshot's step is taken against the one before it that had counters, as the
    trades view takes it; its last price is carried all the same (0 carries nothing)."""
    bare = row("aggregate", exchange_ts=at(6, 0, 20), seq=2, trade_date=DAY, last_price=104.0)
    unpriced = row("aggregate", exchange_ts=at(6, 2, 10), seq=5, trade_date=DAY, last_price=0.0)
    rows = [
        aggregate(1, at(6, 0, 10), DAY, 2, 10, 1000, 100, 101, 99, 99),
        bare,
        aggregate(3, at(6, 0, 30), DAY, 3, 15, 1520, 104, 104, 99, 99),
        aggregate(4, at(6, 1, 10), DAY, 3, 15, 1520, 104, 104, 99, 99),
        unpriced,
    ]
    ParquetWriter(tmp_path, fsync=False).write(Batch(("aggregate", "2026-05-30", "C"), rows))
    con = recorder.connect(tmp_path)
    steps = "SELECT seq, trade_count, volume, value, first_price, high_price, low_price"
    assert _query(con, f"{steps} FROM trades ORDER BY seq") == [
        (1, 2, 10, 1000, 99.0, 101.0, 99.0),
        (3, 1, 5, 520, 104.0, 104.0, 104.0),
    ]
    assert _query(con, "SELECT * FROM bars(INTERVAL '1 minute') ORDER BY bar_start") == [
        ("C", at(6, 0, 0), 99.0, 104.0, 99.0, 104.0, 15, 1520, 3),
        ("C", at(6, 1, 0), 104.0, 104.0, 104.0, 104.0, 0, 0, 0),
        ("C", at(6, 2, 0), None, None, None, None, 0, 0, 0),
    ]
    window = "bars(INTERVAL '1 hour', since := TIMESTAMPTZ '2026-05-30 06:00:25+00')"
    assert _query(con, f"SELECT volume, trade_count, open FROM {window}") == [(5, 1, 104.0)]


def test_bars_join_gaps_to_flag_incomplete_history(store: Path) -> None:
    """A bar overlapping a gap of its contract is flagged; gaps and sessions join on contract."""
    con = recorder.connect(store)
    assert _query(con, "SELECT * FROM gaps") == [("A", at(6, 1, 15), at(6, 1, 45), "disconnect")]
    flagged = _query(
        con,
        """SELECT b.bar_start, EXISTS (
               SELECT 1 FROM gaps g WHERE g.contract = b.contract
                 AND g.gap_start < b.bar_start + INTERVAL 1 minute
                 AND coalesce(g.gap_end, 'infinity'::TIMESTAMPTZ) > b.bar_start) AS incomplete
           FROM bars(INTERVAL 1 minute) b WHERE b.contract = 'A' ORDER BY 1""",
    )
    assert flagged == [(at(6, 0, 0), False), (at(6, 1, 0), True), (at(6, 2, 0), False)]
    sessions = _query(
        con,
        "SELECT count(*) FROM trades t JOIN sessions s ON list_contains(s.contracts, t.contract)"
        " AND t.exchange_ts BETWEEN s.opened_at AND coalesce(s.closed_at, 'infinity')",
    )
    assert sessions == [(3,)]


def _files_read(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    """How many Parquet files DuckDB opened for ``sql`` (its EXPLAIN ANALYZE counter)."""
    plan = con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    return sum(int(n) for n in re.findall(r"Total Files Read: (\d+)", plan))


@pytest.mark.parametrize("view", ["best_limit", "aggregate", "top_of_book", "trades"])
def test_contract_and_date_filters_prune_partitions_through_the_views(
    store: Path, view: str
) -> None:
    """WHERE contract = ... AND date = ... opens only that partition's file, views included."""
    con = recorder.connect(store)
    book = view in ("best_limit", "top_of_book")  # only A on 2026-05-30 has a book
    assert _files_read(con, f"SELECT * FROM {view}") == (1 if book else 3)
    one_day = "WHERE contract = '{}' AND date = DATE '{}'"
    assert _files_read(con, f"SELECT * FROM {view} " + one_day.format("A", DAY)) == 1
    assert _files_read(con, f"SELECT * FROM {view} " + one_day.format("B", NEXT)) == (
        0 if book else 1
    )


def test_asof_state_book_is_the_last_messages_levels_only(tmp_path: Path) -> None:
    """A level the last BestLimit message did not carry is NULL, not the level of an earlier
    message; a message with levels beyond 3 only is still the last message, with no level."""
    writer = ParquetWriter(tmp_path, fsync=False)
    book = [
        level(10, at(6, 0, 0), 1, (5, 99), (7, 101)),
        level(10, at(6, 0, 0), 2, (3, 98), (2, 102)),
        level(10, at(6, 0, 0), 3, (1, 97), (1, 103)),
        level(11, at(6, 0, 1), 1, (6, 99.5), (0, 0)),  # one level, an empty ask side
        level(12, at(6, 0, 2), 4, (9, 95), (9, 105)),  # a fourth level only
    ]
    writer.write(Batch(("best_limit", "2026-05-30", "X"), book))
    aggregates = [aggregate(10, at(6, 0, 0), DAY, 1, 1, 100, 100, 100, 100, 100)]
    writer.write(Batch(("aggregate", "2026-05-30", "X"), aggregates))
    con = recorder.connect(tmp_path)
    columns = (
        "seq, bid_price_1, bid_quantity_1, bid_price_2, ask_price_1, ask_price_2, ask_price_3,"
        " mid, spread, trade_count"
    )
    rows = [
        _query(con, f"SELECT {columns} FROM asof_state(TIMESTAMPTZ '{moment}')")
        for moment in ("2026-05-30 06:00:00+00", "2026-05-30 06:00:01+00", "2026-05-30 06:00:02+00")
    ]
    assert rows == [
        [(10, 99.0, 5, 98.0, 101.0, 102.0, 103.0, 100.0, 2.0, 1)],
        [(11, 99.5, 6, None, None, None, None, None, None, None)],
        [(12, None, None, None, None, None, None, None, None, None)],
    ]
    tops = _query(
        con, "SELECT seq, bid_price_1, bid_price_2, ask_price_1 FROM top_of_book ORDER BY seq"
    )
    assert tops == [(10, 99.0, 98.0, 101.0), (11, 99.5, None, None), (12, None, None, None)]


def test_views_read_files_written_after_connect_without_union_by_name(store: Path) -> None:
    """The table views glob their files at each query: a file written after connect, in a
    new partition, is read; every file has the table's columns, so no view reads by name."""
    con = recorder.connect(store)
    assert _query(con, "SELECT count(*) FROM aggregate") == [(7,)]
    writer = ParquetWriter(store, fsync=False)
    rows = [aggregate(20, at(6, 0, 0, day=31), NEXT, 1, 1, 100, 100, 100, 100, 100)]
    writer.write(Batch(("aggregate", "2026-05-31", "C"), rows))
    assert _query(con, "SELECT contract, seq FROM aggregate WHERE seq = 20") == [("C", 20)]
    views = _query(con, "SELECT view_name FROM duckdb_views() WHERE sql LIKE '%union_by_name%'")
    assert views == []


def test_contract_files_hold_the_receive_lag_and_older_files_read_the_same(store: Path) -> None:
    """A contract file holds received_at as microseconds after exchange_ts (a lag may be
    negative: the two clocks differ); the views and the Store add it back, exactly, also
    next to a file written before, which holds received_at itself."""
    writer = ParquetWriter(store, fsync=False)
    ts = at(6, 0, 0, day=31)
    packed = list(aggregate(20, ts, NEXT, 1, 1, 100, 100, 100, 100, 100))
    packed[1] = _us(ts) - 250  # received_at: 250 us before the exchange's timestamp
    path = writer.write(Batch(("aggregate", "2026-05-31", "C"), [tuple(packed)])).path
    stored = pq.read_table(path)
    assert "received_at" not in stored.column_names
    assert stored[RECEIVED_DELAY_COLUMN].to_pylist() == [-250]
    legacy = list(aggregate(21, ts, NEXT, 2, 2, 200, 200, 200, 200, 200))
    legacy[1] = _us(ts) + 1_500_000
    folder = path.parent.parent / "contract=D"
    folder.mkdir()  # a contract file as written before: received_at itself
    pq.write_table(to_arrow(TABLES["aggregate"], [tuple(legacy)]), folder / file_name(21, 21))
    expected = [
        (20, datetime(2026, 5, 31, 5, 59, 59, 999750, tzinfo=UTC)),
        (21, datetime(2026, 5, 31, 6, 0, 1, 500000, tzinfo=UTC)),
    ]

    con = recorder.connect(store)
    sql = "SELECT seq, received_at FROM aggregate WHERE seq >= 20 ORDER BY seq"
    assert _query(con, sql) == expected
    assert _query(con, "SELECT count(*) FROM aggregate") == [(9,)]
    table = recorder.Store(store).table("aggregate", start=ts, end=at(7, 0, 0, day=31))
    found = zip(table["seq"].to_pylist(), table["received_at"].to_pylist(), strict=True)
    assert list(found) == expected


def test_file_schemas_tell_a_file_lacking_a_column_and_skip_removed_files(store: Path) -> None:
    """A file removed after it was listed is left out; a file lacking a column is told."""
    schemas = FileSchemas()
    files = sorted(store.glob("aggregate/*/*/*.parquet"))
    gone = files[0].with_name(file_name(99, 99))
    assert schemas.check(TABLES["aggregate"], [*files, gone]) is False
    assert schemas.lacking(files) is False
    legacy = files[0].with_name(file_name(98, 98))
    pq.write_table(pq.read_table(files[0]).drop_columns(["source"]), legacy)
    assert schemas.lacking([*files, legacy]) is False  # not read yet
    assert schemas.check(TABLES["aggregate"], [*files, legacy]) is True
    assert schemas.lacking([legacy]) is True
