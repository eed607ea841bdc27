"""The Python API: Store tables, bars, as-of state and replay on the hand-written store."""

from __future__ import annotations

import importlib.util
import re
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from recorder import Store
from recorder.buffer import Batch
from recorder.paths import partition_dir
from recorder.writer import ParquetWriter
from tests.test_views import aggregate, at, write_fixture

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """The hand-written fixture store of test_views, opened as a Store."""
    write_fixture(tmp_path)
    return Store(tmp_path)


def test_table_returns_arrow_rows_of_contracts_in_a_half_open_range(store: Store) -> None:
    """table() filters contracts and [start, end) on exchange_ts and orders by time and seq."""
    table = store.table("aggregate", ["A"], start=at(6, 0, 20), end="2026-05-30T06:02:30Z")
    assert isinstance(table, pa.Table)
    assert table.column("seq").to_pylist() == [2, 3, 4]
    assert table.schema.field("exchange_ts").type == pa.timestamp("us", tz="UTC")
    assert table.column("contract").to_pylist() == ["A", "A", "A"]
    book = store.table("top_of_book", "A", start=datetime(2026, 5, 30, 6, 0, 30))  # naive: UTC
    assert book.column("seq").to_pylist() == [3]
    assert book.column("ask_price_1").to_pylist() == [102.0]
    trades = store.table("trades", start=date(2026, 5, 31))
    assert trades.to_pylist()[0]["volume"] == 3
    gaps = store.table("gaps", "A", start=at(6, 1, 30), end=at(6, 1, 40))
    assert gaps.to_pylist() == [
        {
            "contract": "A",
            "gap_start": at(6, 1, 15),
            "gap_end": at(6, 1, 45),
            "reason": "disconnect",
        }
    ]
    assert store.table("gaps", "A", start=at(6, 1, 45)).num_rows == 0
    assert store.table("sessions", "A").num_rows == 2
    assert store.table("aggregate", ["nobody"]).num_rows == 0
    with pytest.raises(KeyError, match="no table or view named 'nope'"):
        store.table("nope")


def test_bars_and_asof_match_the_views(store: Store) -> None:
    """bars() and asof() give the hand-computed values, restricted to contracts and a window."""
    bars = store.bars("1 minute", ["A"], start=at(6, 0, 30), end=at(6, 3, 0))
    assert bars.to_pylist() == [
        {
            "contract": "A",
            "bar_start": at(6, 0, 0),
            "open": 102.0,
            "high": 102.0,
            "low": 102.0,
            "close": 102.0,
            "volume": 5,
            "value": 510,
            "trade_count": 1,
        },
        {
            "contract": "A",
            "bar_start": at(6, 1, 0),
            "open": 102.0,
            "high": 102.0,
            "low": 102.0,
            "close": 102.0,
            "volume": 0,
            "value": 0,
            "trade_count": 0,
        },
        {
            "contract": "A",
            "bar_start": at(6, 2, 0),
            "open": 98.0,
            "high": 98.0,
            "low": 97.0,
            "close": 98.0,
            "volume": 10,
            "value": 980,
            "trade_count": 2,
        },
    ]
    daily = store.bars(timedelta(days=1), tz="Asia/Tehran")
    assert daily.column("volume").to_pylist() == [25, 40, 3]
    state = store.asof("2026-05-30T06:00:30+00:00")
    assert state.column("contract").to_pylist() == ["A"]
    assert state.to_pylist()[0]["bid_price_1"] == 99.0
    later = store.asof(at(10, 0, 0), ["B", "A"])
    assert later.select(["contract", "seq", "total_volume"]).to_pylist() == [
        {"contract": "A", "seq": 5, "total_volume": 25},
        {"contract": "B", "seq": 7, "total_volume": 40},
    ]


def test_replay_rebuilds_the_wire_message_with_extras(store: Store) -> None:
    """replay() yields the messages in (exchange_ts, seq) order, in their exact wire shape."""
    messages = list(store.replay("A", end=at(6, 0, 41)))
    assert messages[1] == {
        "channel": "IME Stream",
        "contractId": "A",
        "timestamp": "2026-05-30T06:00:20.000000Z",
        "sequence": 7,
        "data": {
            "BestLimit": {
                "1": {
                    "buy_quantity": 5,
                    "buy_price": 99.0,
                    "sell_quantity": 7,
                    "sell_price": 101.0,
                },
                "2": {"buy_quantity": 3, "buy_price": 98.0, "sell_quantity": 0, "sell_price": 0.0},
            },
            "Aggregate": {
                "date": "2026-05-30",
                "time": "12:00:00",
                "trade_count": 2,
                "total_volume": 10,
                "total_value": 1000,
                "closing_price": 0.0,
                "last_price": 100.0,
                "low_price": 99.0,
                "high_price": 101.0,
                "open_price": 99.0,
                "previous_close": 0.0,
            },
            "AllowedPriceRange": {"minAllowedPrice": 90.0, "maxAllowedPrice": 110.0},
            "ContractInfo": {"open_interest": 50, "open_interest_changes": 5},
        },
    }
    assert messages[0]["data"]["Aggregate"]["date"] == ""  # no trade date yet
    assert [m["timestamp"][11:19] for m in messages] == ["06:00:10", "06:00:20", "06:00:40"]
    everything = list(store.replay(id_key="contractName"))
    assert [(m["contractName"], m["timestamp"][5:19]) for m in everything] == [
        ("A", "05-30T06:00:10"),
        ("A", "05-30T06:00:20"),
        ("A", "05-30T06:00:40"),
        ("A", "05-30T06:01:10"),
        ("A", "05-30T06:02:30"),
        ("A", "05-30T06:03:00"),
        ("B", "05-30T10:00:00"),
        ("B", "05-31T05:00:00"),
    ]
    assert everything[5]["data"] == {"OrderBookDelta": {"side": "buy"}}
    assert store.message_count() == 8
    assert store.message_count("B", start=at(10, 0, 0)) == 2


def _files_read(store: Store, sql: str, **request: Any) -> int:
    con = store.connect(**request)
    plan = con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    return sum(int(n) for n in re.findall(r"Total Files Read: (\d+)", plan))


def test_one_contract_one_day_reads_the_same_files_however_big_the_store(tmp_path: Path) -> None:
    """Forty more contracts over twenty more days change neither the files read nor the rows."""
    write_fixture(tmp_path)
    store = Store(tmp_path, partition_timezone="Asia/Tehran")
    day = {
        "contracts": ["A"],
        "start": "2026-05-30T00:00:00+03:30",
        "end": "2026-05-31T00:00+03:30",
    }
    folder = tmp_path / partition_dir("aggregate", "2026-05-30", "A")

    def measure() -> tuple[list[Path], int, int, list[Any], list[Any]]:
        return (
            store.files("aggregate", **day),
            _files_read(store, "SELECT * FROM aggregate", **day),
            _files_read(store, "SELECT * FROM trades", **day),
            store.table("trades", **day).to_pylist(),
            list(store.replay(**day)),
        )

    before = measure()
    assert before[0] == sorted(folder.iterdir())
    assert len(before[0]) == 1
    assert before[1] == before[2] == 1
    assert len(before[3]) == 3
    assert len(before[4]) == 6
    assert len(Store(tmp_path).files("aggregate", **day)) == 1  # the 29th and 31st: no A yet

    writer = ParquetWriter(tmp_path, fsync=False)
    seq = 1000
    for offset in range(-10, 11):
        moment = at(6, 0, 0) + timedelta(days=offset)
        local_day = (moment + timedelta(hours=3, minutes=30)).date()
        others = [f"C{n}" for n in range(40)] + (["A"] if offset else [])
        for contract in others:
            seq += 1
            rows = [aggregate(seq, moment, local_day, 9, 9, 9, 9, 9, 9, 9)]
            writer.write(Batch(("aggregate", local_day.isoformat(), contract), rows))
    assert len(list(tmp_path.glob("aggregate/*/*/*.parquet"))) == 21 * 40 + 20 + 3
    assert measure() == before
    # without the time zone, a day more on each side, whatever else the store holds
    assert len(Store(tmp_path).files("aggregate", **day)) == 3
    assert store.table("aggregate", "A").num_rows == 5 + 20


def test_polars_helper_needs_polars(store: Store) -> None:
    """Store.polars gives a polars DataFrame when polars is installed, else a clear error."""
    if importlib.util.find_spec("polars") is None:
        with pytest.raises(ModuleNotFoundError, match="pip install polars"):
            store.polars("aggregate")
    else:
        assert store.polars("aggregate", "B").height == 2


def test_readme_backtesting_examples_run(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """The Backtesting section's SQL statements return rows and its Python example runs."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Backtesting") : text.index("## Commands")]
    (sql,) = re.findall(r"```sql\n(.*?)```", section, re.S)
    (python,) = re.findall(r"```python\n(.*?)```", section, re.S)
    con = store.connect()
    statements = [s for s in sql.split(";") if s.strip()]
    assert len(statements) == 4
    for statement in statements:
        assert con.execute(statement.replace("'1001'", "'A'")).fetchall(), statement
    code = python.replace('"1001"', '"A"').replace(
        'Store("data")', f"Store({str(store.data_dir)!r})"
    )
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "2026-05-30T06:00:10.000000Z 0.0",
        "2026-05-30T06:00:20.000000Z 100.0",
        "2026-05-30T06:00:40.000000Z 102.0",
        "2026-05-30T06:01:10.000000Z 102.0",
        "2026-05-30T06:02:30.000000Z 98.0",
    ]
