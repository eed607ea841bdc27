"""The Python API: Store tables, bars, as-of state and replay on the hand-written store."""

from __future__ import annotations

import importlib.util
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recorder
from recorder import Store
from recorder.buffer import Batch
from recorder.paths import file_name, partition_dir
from recorder.schema import TABLES
from recorder.writer import ParquetWriter, to_arrow
from tests.test_views import DAY, aggregate, at, write_fixture

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


def _quote(rows: list[dict[str, Any]], *names: str) -> list[tuple[Any, ...]]:
    return [tuple(r[n] for n in names) for r in rows]


def test_asof_looks_back_past_a_minute_and_an_hour_to_days_before(tmp_path: Path) -> None:
    """Contracts last updated a second, half an hour and three days before are all found,
    each with its own last message, as the SQL macro over every file finds them."""
    writer = ParquetWriter(tmp_path, fsync=False)
    instant = at(6, 0, 0, day=30)
    updates = {  # contract: (seq, exchange_ts) of its messages, oldest first
        "busy": [(20, instant - timedelta(days=1)), (21, instant - timedelta(seconds=1))],
        "slow": [(30, instant - timedelta(minutes=30)), (31, instant + timedelta(seconds=1))],
        "idle": [(40, instant - timedelta(days=3, hours=2)), (41, instant - timedelta(days=3))],
        "late": [(50, instant + timedelta(minutes=5))],
    }
    for contract, messages in updates.items():
        for seq, moment in messages:
            day = (moment + timedelta(hours=3, minutes=30)).date()
            rows = [aggregate(seq, moment, day, seq, seq, seq, seq, seq, seq, seq)]
            writer.write(Batch(("aggregate", day.isoformat(), contract), rows))
    store = Store(tmp_path, partition_timezone="Asia/Tehran")
    state = store.asof(instant).to_pylist()
    assert _quote(state, "contract", "seq", "exchange_ts", "date", "total_volume") == [
        ("busy", 21, instant - timedelta(seconds=1), DAY, 21),
        ("idle", 41, instant - timedelta(days=3), date(2026, 5, 27), 41),
        ("slow", 30, instant - timedelta(minutes=30), DAY, 30),
    ]
    con = recorder.connect(tmp_path)
    exact = con.sql("SELECT * FROM asof_state(?::TIMESTAMPTZ) ORDER BY contract", params=[instant])
    assert state == exact.to_arrow_table().to_pylist()
    assert store.asof(instant, ["late", "idle"]).column("seq").to_pylist() == [41]
    assert store.asof(instant, ["late"]).num_rows == 0
    assert store.asof(instant - timedelta(days=4)).num_rows == 0
    assert Store(tmp_path).asof(instant).to_pylist() == state  # without the time zone


def test_store_reuses_its_database_and_sees_files_written_after_it_opened(
    tmp_path: Path,
) -> None:
    """Calls share one DuckDB database, yet each reads the files there are when it runs:
    a file written since, in an existing or a new partition, is read; a removed one is not."""
    write_fixture(tmp_path)
    store = Store(tmp_path, partition_timezone="Asia/Tehran")
    assert store.table("aggregate", "A").column("seq").to_pylist() == [1, 2, 3, 4, 5]
    database = store._database._con
    assert database is not None
    writer = ParquetWriter(tmp_path, fsync=False)
    written = [
        ("A", 9, at(6, 4, 0)),  # the partition of A on the 30th gains a file
        ("C", 10, at(6, 5, 0)),  # a new contract
        ("A", 11, at(6, 0, 0, day=31)),  # a new date
    ]
    for contract, seq, moment in written:
        local = (moment + timedelta(hours=3, minutes=30)).date()
        rows = [aggregate(seq, moment, local, 6, 30, 3000, 97, 102, 97, 99)]
        writer.write(Batch(("aggregate", local.isoformat(), contract), rows))
    assert store.table("aggregate", "A").column("seq").to_pylist() == [1, 2, 3, 4, 5, 9, 11]
    assert store.asof(at(11, 0, 0)).select(["contract", "seq"]).to_pylist() == [
        {"contract": "A", "seq": 9},
        {"contract": "B", "seq": 7},
        {"contract": "C", "seq": 10},
    ]
    assert store.bars("1 hour", "C").column("volume").to_pylist() == [30]
    assert store.message_count("A") == 8
    for path in (tmp_path / partition_dir("aggregate", "2026-05-30", "C")).iterdir():
        path.unlink()
    assert store.asof(at(11, 0, 0)).column("contract").to_pylist() == ["A", "B"]
    assert store._database._con is database
    with store:
        assert store.bars("1 hour", "C").num_rows == 0
    assert store._database._con is None
    assert store.table("aggregate", "B").num_rows == 2  # opens a database again


def test_a_request_in_several_steps_lists_each_folder_once(tmp_path: Path) -> None:
    """Within listed_once() a file written meanwhile is not listed (the steps of one
    request read one listing); after the block, or once forgotten, it is; ``skip`` leaves a
    contract's folder unread."""
    write_fixture(tmp_path)
    files = Store(tmp_path, partition_timezone="Asia/Tehran")._files
    day = ("2026-05-30T00:00+03:30", "2026-05-31T00:00+03:30")
    before = files.files("aggregate", None, *day)
    assert [f.parent.name for f in before] == ["contract=A", "contract=B"]
    writer = ParquetWriter(tmp_path, fsync=False)
    row = aggregate(9, at(6, 4, 0), DAY, 6, 30, 3000, 97, 102, 97, 99)
    with files.listed_once():
        assert files.files("aggregate", None, *day) == before
        writer.write(Batch(("aggregate", "2026-05-30", "A"), [row]))
        with files.listed_once():  # an inner block keeps the outer one's listings
            assert files.files("aggregate", None, *day) == before
        assert files.files("aggregate", None, *day) == before
        files.forget()
        after = files.files("aggregate", None, *day)
        assert len(after) == 3
        writer.write(Batch(("aggregate", "2026-05-30", "B"), [row]))
        assert files.files("aggregate", None, *day) == after
    assert len(files.files("aggregate", None, *day)) == 4
    assert [f.parent.name for f in files.files("aggregate", None, *day, skip={"A"})] == [
        "contract=B",
        "contract=B",
    ]
    assert files.files("aggregate", ["A", "B"], *day, skip=["B"]) == after[:2]


def test_requests_in_threads_at_the_same_time_each_read_their_own_files(store: Store) -> None:
    """Each call has its own connection and views: calls for different contracts from eight
    threads at once give what they give one after the other."""
    calls = [
        lambda: store.table("aggregate", "A").column("seq").to_pylist(),
        lambda: store.table("aggregate", "B").column("seq").to_pylist(),
        lambda: store.asof(at(10, 0, 0), "A").column("seq").to_pylist(),
        lambda: [m["sequence"] for m in store.replay("A") if "sequence" in m],
        lambda: store.bars("1 day", "B").column("volume").to_pylist(),
    ]
    expected = [call() for call in calls]
    assert expected == [[1, 2, 3, 4, 5], [7, 8], [5], [7], [40, 3]]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: calls[i % len(calls)](), range(40)))
    assert results == [expected[i % len(calls)] for i in range(40)]


def _write_without_source(path: Path, rows: list[tuple[Any, ...]]) -> None:
    """An aggregate file as written before the ``source`` column was added."""
    table = to_arrow(TABLES["aggregate"], rows).drop_columns(["source"])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.mark.parametrize("legacy_first", [True, False])
def test_files_written_before_a_column_was_added_read_it_as_null(
    tmp_path: Path, legacy_first: bool
) -> None:
    """A file without ``source``, read first or after files that have it, gives NULL there:
    through every Store call and recorder.connect, whose view then reads by name."""
    write_fixture(tmp_path)
    seq = 0 if legacy_first else 90  # names sort by seq: the order DuckDB reads them in
    moment = at(6, 0, 5) if legacy_first else at(6, 5, 0)
    folder = tmp_path / partition_dir("aggregate", "2026-05-30", "A")
    rows = [aggregate(seq, moment, DAY, 1, 1, 100, 100, 100, 100, 100)]
    _write_without_source(folder / file_name(seq, seq), rows)
    store = Store(tmp_path, partition_timezone="Asia/Tehran")
    table = store.table("aggregate", "A")
    assert table.column("seq").to_pylist() == (
        [0, 1, 2, 3, 4, 5] if legacy_first else [1, 2, 3, 4, 5, 90]
    )
    sources: list[str | None] = ["stream"] * 5
    sources.insert(0 if legacy_first else 5, None)
    assert table.column("source").to_pylist() == sources
    assert store.asof(at(7, 0, 0), "A").column("seq").to_pylist() == [5 if legacy_first else 90]
    assert store.message_count("A") == 7
    replayed = [m["timestamp"][11:19] for m in store.replay("A", end=at(6, 0, 15))]
    assert replayed == (["06:00:05", "06:00:10"] if legacy_first else ["06:00:10"])
    assert store.bars("1 day", "A", tz="Asia/Tehran").column("volume").to_pylist() == [25]
    con = recorder.connect(tmp_path)
    views = dict(con.sql("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
    assert "union_by_name" in views["aggregate"]
    assert "union_by_name" not in views["best_limit"]
    assert con.execute("SELECT count(*) FROM aggregate WHERE source IS NULL").fetchone() == (1,)
    with store.connect("A") as mine:
        assert mine.execute("SELECT count(*) FROM aggregate WHERE source IS NULL").fetchone() == (
            1,
        )


def test_a_file_removed_after_it_was_listed_is_listed_again(tmp_path: Path) -> None:
    """A compaction may remove a file between the listing and the read: the call lists the
    files again instead of failing."""
    write_fixture(tmp_path)
    folder = tmp_path / partition_dir("aggregate", "2026-05-30", "A")
    (old,) = folder.iterdir()
    listed: list[Path] = []

    class Racing(Store):
        def files(self, table: str, *args: Any, **kwargs: Any) -> list[Path]:
            found = super().files(table, *args, **kwargs)
            if table == "aggregate" and not listed:
                listed.extend(found)
                moved = folder / file_name(1, 5, "c")
                old.rename(moved)  # compacted: same rows, a new name
            return found

    store = Racing(tmp_path)
    assert store.table("aggregate", "A").column("seq").to_pylist() == [1, 2, 3, 4, 5]
    assert listed == [old]
