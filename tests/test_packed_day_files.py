"""Compacted day files: every reader gives back exactly the rows written, ``received_at`` too.

A compacted day file (``{table}/date=D/{first}-{last}.c.parquet``, see :mod:`recorder.paths`)
holds the rows of every contract of its date, ``contract`` as a column and ``received_at``
packed as in a contract file (``received_delay_us``). The same messages are written as the
recorder flushes them (day files only) and compacted: date A as contract files, date B as a
compacted day file and a flush that came after the fold. The views, the Store, export and the
catalog file must give the rows written, whichever kind of file holds them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import recorder
from recorder import Store
from recorder.catalog import FileSchemas, day_glob, packed_day_glob, table_files
from recorder.export import Bound, export, write_catalog
from recorder.packing import pack_received, write_compacted
from recorder.paths import file_name, is_day_file, is_packed_day_file, partition_dir
from recorder.schema import CONTRACT_COLUMN, RECEIVED_DELAY_COLUMN, TABLES
from recorder.storefiles import StoreFiles
from recorder.writer import to_arrow
from tests.test_day_files import BY_CONTRACT, CALLS, DAY1, DAY2, OLD, write_day_file, write_store
from tests.test_views import row

A, B = date(2026, 5, 30), date(2026, 5, 31)  # UTC dates: the stores are opened in UTC
WRITTEN = ("aggregate", "best_limit")
#: received_at - exchange_ts of the messages, in turn by seq: most of a second, a few
#: microseconds, a clock behind the exchange's (negative), a day late
DELAYS = (250_001, 3, 999_999, -17, 86_399_999_999)
LATER = datetime(2026, 6, 5, tzinfo=UTC)


@dataclass(frozen=True)
class Message:
    seq: int
    contract: str
    ts: datetime

    @property
    def day(self) -> date:
        return self.ts.date()

    @property
    def received(self) -> datetime:
        return self.ts + timedelta(microseconds=DELAYS[self.seq % len(DELAYS)])


def _at(day: date, hour: int, minute: int, second: int, us: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, us, tzinfo=UTC)


MESSAGES = [
    Message(1, "012345", _at(A, 6, 0, 0, 1)),
    Message(2, "D", _at(A, 6, 0, 1, 500_000)),
    Message(3, "ش/1 x", _at(A, 6, 0, 2, 250_000)),
    Message(4, "012345", _at(A, 6, 0, 3, 7)),
    Message(5, "D", _at(A, 6, 0, 4)),
    Message(6, "012345", _at(B, 5, 0, 0, 123_456)),
    Message(7, "ش/1 x", _at(B, 5, 0, 0, 123_456)),  # same instant as 6: seq orders them
    Message(8, "012345", _at(B, 5, 30, 0)),
    Message(9, "ش/1 x", _at(B, 6, 10, 0, 999_999)),
    Message(10, "012345", _at(B, 7, 0, 0, 1)),  # a flush after B was folded
    Message(11, "C", _at(B, 7, 0, 2)),  # a contract that only that flush holds
]
ON_A = [m for m in MESSAGES if m.day == A]
FOLDED = [m for m in MESSAGES if m.day == B and m.seq <= 9]
LATE = [m for m in MESSAGES if m.seq > 9]
CONTRACTS = ["012345", "C", "D", "ش/1 x"]


def _us(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def file_rows(table: str, m: Message) -> list[tuple[Any, ...]]:
    """The rows of ``m`` in ``table`` (file columns): one Aggregate, one or two levels."""
    common = {"exchange_ts": m.ts, "seq": m.seq, "received_at": _us(m.received)}
    if table == "aggregate":
        values = {
            "trade_date": m.day,
            "trade_time": time(12, 0, m.seq),
            "trade_count": m.seq,
            "total_volume": 10 * m.seq,
            "total_value": 1000 * m.seq,
            "closing_price": 0.0,
            "last_price": 100.0 + m.seq,
            "low_price": 90.0,
            "high_price": 110.0 + m.seq,
            "open_price": 100.0,
            "previous_close": 99.5,
        }
        return [row(table, **common, **values)]
    return [
        row(
            table,
            **common,
            level=n,
            buy_quantity=m.seq + n,
            buy_price=100.0 - n,
            sell_quantity=2 * m.seq + n,
            sell_price=100.0 + n,
        )
        for n in range(1, 2 + m.seq % 2)
    ]


def expected(table: str, messages: list[Message] = MESSAGES) -> list[dict[str, Any]]:
    """The view rows of ``messages`` in ``table``, in (exchange_ts, seq, level) order."""
    spec = TABLES[table]
    out = []
    for m in messages:
        for values in file_rows(table, m):
            named = dict(zip([c.name for c in spec.file_columns], values, strict=True))
            named.update(exchange_ts=m.ts, received_at=m.received, contract=m.contract, date=m.day)
            out.append({c.name: named[c.name] for c in spec.columns})
    return out


def _order(table: str) -> str:
    return "exchange_ts, seq" + (", level" if TABLES[table].levels else "")


def _day_rows(table: str, messages: list[Message]) -> list[tuple[str, Any]]:
    return [(m.contract, r) for m in messages for r in file_rows(table, m)]


def write_flush(data_dir: Path, table: str, messages: list[Message]) -> Path:
    """A day file as the recorder flushes it."""
    return write_day_file(data_dir, table, messages[0].day, _day_rows(table, messages))


def _write_packed(data: pa.Table, folder: Path) -> Path:
    """``data`` as compaction writes it: sorted by (exchange_ts, seq), named with its seqs."""
    data = data.sort_by([("exchange_ts", "ascending"), ("seq", "ascending")])
    seqs = data.column("seq").to_pylist()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(min(seqs), max(seqs), "c")
    write_compacted(data, path, sort=["exchange_ts", "seq"], level=3)
    return path


def write_contract_file(data_dir: Path, table: str, messages: list[Message]) -> Path:
    """One contract's rows of a date as a fold in the ``contract`` layout writes them."""
    spec = TABLES[table]
    data = pack_received(spec, to_arrow(spec, [r for m in messages for r in file_rows(table, m)]))
    folder = partition_dir(table, messages[0].day.isoformat(), messages[0].contract)
    return _write_packed(data, data_dir / folder)


def packed_day_rows(table: str, rows: list[tuple[str, Any]]) -> pa.Table:
    """Day rows (contract, file row) in ``Table.packed_day_schema``."""
    spec = TABLES[table]
    data = to_arrow(spec, [r for _, r in rows])
    data = data.append_column(CONTRACT_COLUMN, pa.array([c for c, _ in rows], pa.string()))
    packed = pack_received(spec, data.cast(spec.day_schema))
    assert packed.schema == spec.packed_day_schema
    return packed


def write_packed_day_file(data_dir: Path, table: str, messages: list[Message]) -> Path:
    """A date's rows of every contract as a fold in the ``date`` layout writes them."""
    data = packed_day_rows(table, _day_rows(table, messages))
    return _write_packed(data, data_dir / partition_dir(table, messages[0].day.isoformat(), None))


def write_flushed(data_dir: Path) -> None:
    """The messages as the recorder flushes them: date A in one day file, B in two."""
    for table in WRITTEN:
        for part in (ON_A, FOLDED, LATE):
            write_flush(data_dir, table, part)


def write_compacted_store(data_dir: Path) -> None:
    """Date A folded into contract files, B into a compacted day file, then B's late flush."""
    for table in WRITTEN:
        for contract in sorted({m.contract for m in ON_A}):
            write_contract_file(data_dir, table, [m for m in ON_A if m.contract == contract])
        write_packed_day_file(data_dir, table, FOLDED)
        write_flush(data_dir, table, LATE)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed")
    write_flushed(root / "flushed")
    write_compacted_store(root / "compacted")
    return {"flushed": root / "flushed", "compacted": root / "compacted"}


def _packed_file(data_dir: Path, table: str, day: date = B) -> Path:
    (path,) = (data_dir / partition_dir(table, day.isoformat(), None)).glob("*.c.parquet")
    return path


def _late_file(data_dir: Path, table: str) -> Path:
    return data_dir / partition_dir(table, B.isoformat(), None) / file_name(10, 11)


def _view_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[dict[str, Any]]:
    result = con.sql(f"SELECT * FROM {table} ORDER BY {_order(table)}").to_arrow_table()
    return result.to_pylist()


def test_views_give_back_every_row_of_every_kind_of_file(stores: dict[str, Path]) -> None:
    """recorder.connect reads contract files, the compacted day file and the late day file:
    every row once, received_at to the microsecond, ``012345`` with its zero."""
    data_dir = stores["compacted"]
    files = table_files(data_dir, TABLES["aggregate"])
    kinds = [(is_day_file(f), is_packed_day_file(f)) for f in sorted(files)]
    assert sorted(kinds) == [(False, False)] * 3 + [(True, False), (True, True)]
    schema = pq.read_schema(_packed_file(data_dir, "aggregate"))
    assert RECEIVED_DELAY_COLUMN in schema.names
    assert "received_at" not in schema.names
    con = recorder.connect(data_dir)
    for table in WRITTEN:
        assert _view_rows(con, table) == expected(table)
    sql = "SELECT contract, count(*) FROM best_limit WHERE date = ? GROUP BY ALL ORDER BY 1"
    assert con.execute(sql, [B]).fetchall() == [("012345", 3), ("C", 2), ("ش/1 x", 4)]


def _calls() -> dict[str, Callable[[Store], Any]]:
    """Store calls over both dates, by name."""
    b_day = {"start": B, "end": B + timedelta(days=1)}
    calls: dict[str, Callable[[Store], Any]] = {
        "contracts": lambda s: s.contracts(),
        "count": lambda s: s.message_count(),
        "count 012345": lambda s: s.message_count("012345"),
        "count two on B": lambda s: s.message_count(["ش/1 x", "C"], **b_day),
        "bars": lambda s: s.bars("1 minute").to_pylist(),
        "bars on B": lambda s: s.bars("1 hour", "012345", **b_day).to_pylist(),
        "asof later": lambda s: s.asof(LATER).to_pylist(),
        "asof D later": lambda s: s.asof(LATER, "D").to_pylist(),
        "asof within B": lambda s: s.asof(_at(B, 6, 0, 0)).to_pylist(),
        "asof at the late flush": lambda s: s.asof(_at(B, 7, 0, 2)).to_pylist(),
        "replay": lambda s: list(s.replay()),
        "replay one on B": lambda s: list(s.replay_timed("ش/1 x", **b_day)),
    }
    for table in (*WRITTEN, "top_of_book", "trades"):
        calls[f"table {table}"] = lambda s, t=table: s.table(t).to_pylist()
        calls[f"table {table} one on B"] = lambda s, t=table: s.table(
            t, "012345", **b_day
        ).to_pylist()
    return calls


@pytest.mark.parametrize("zone", ["UTC", None])
def test_store_calls_give_the_rows_written(stores: dict[str, Path], zone: str | None) -> None:
    """Every call answers as over the flushed files, and those answers are the messages."""
    answers = {}
    for layout, data_dir in stores.items():
        with Store(data_dir, zone) as store:
            answers[layout] = {name: call(store) for name, call in _calls().items()}
    got = answers["compacted"]
    assert got == answers["flushed"]
    assert got["contracts"] == CONTRACTS
    assert got["table aggregate"] == expected("aggregate")
    assert got["table best_limit"] == expected("best_limit")
    on_b = [m for m in MESSAGES if m.day == B and m.contract == "012345"]
    assert got["table best_limit one on B"] == expected("best_limit", on_b)
    assert (got["count"], got["count 012345"], got["count two on B"]) == (11, 5, 3)
    assert [(r["contract"], r["seq"]) for r in got["asof later"]] == [
        ("012345", 10),
        ("C", 11),
        ("D", 5),
        ("ش/1 x", 9),
    ]
    assert [(r["contract"], r["seq"]) for r in got["asof D later"]] == [("D", 5)]
    assert [(r["contract"], r["seq"]) for r in got["asof within B"]] == [
        ("012345", 8),
        ("D", 5),
        ("ش/1 x", 7),
    ]
    assert [(m["contractId"], m["timestamp"]) for m in got["replay"]] == [
        (m.contract, m.ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")) for m in MESSAGES
    ]
    assert [us for us, _ in got["replay one on B"]] == [
        _us(m.ts) for m in (MESSAGES[6], MESSAGES[8])
    ]
    # a bar per contract and minute with a message; 012345 on B: 60 + 20 at 05:xx, 20 at 07:00
    assert len(got["bars"]) == 9
    assert [bar["volume"] for bar in got["bars on B"]] == [80, 20]


def test_asof_looks_back_to_the_latest_compacted_day_file_holding_the_contract(
    stores: dict[str, Path],
) -> None:
    """A contract found in B's compacted day file is not looked for further back; one it
    does not hold is, down to its contract files of A; the late flush is read every time."""
    data_dir = stores["compacted"]
    files = StoreFiles(data_dir, UTC)
    packed, late = _packed_file(data_dir, "aggregate"), _late_file(data_dir, "aggregate")
    d_file = next((data_dir / partition_dir("aggregate", A.isoformat(), "D")).iterdir())
    assert files.asof_files("aggregate", ["ش/1 x"], LATER, set()) == [packed, late]
    assert files.asof_files("aggregate", ["D"], LATER, set()) == [d_file, late]
    assert files.asof_files("aggregate", None, LATER, set()) == [packed, d_file, late]
    assert files.asof_files("aggregate", None, LATER, {"012345", "ش/1 x"}) == [d_file, late]


def test_one_contract_skips_the_other_contracts_row_groups_of_a_compacted_day_file(
    tmp_path: Path,
) -> None:
    """A request for one contract on B reads B's compacted day file, but only the row groups
    whose ``contract`` statistics may hold it (as a fold writes them, see recorder.dayfold)."""
    data = packed_day_rows("aggregate", _day_rows("aggregate", FOLDED + LATE))
    folder = tmp_path / partition_dir("aggregate", B.isoformat(), None)
    folder.mkdir(parents=True)
    path = folder / file_name(6, 11, "c")
    pq.write_table(
        data.sort_by([(CONTRACT_COLUMN, "ascending"), ("seq", "ascending")]), path, row_group_size=2
    )
    store = Store(tmp_path, "UTC")
    day = {"start": B, "end": B + timedelta(days=1)}
    assert store.files("aggregate", "C", **day) == [path]
    with store.connect("C", **day) as con:
        plan = con.execute("EXPLAIN ANALYZE SELECT * FROM aggregate").fetchall()[0][1]
    assert re.findall(r"Row Groups Scanned: (\d+) / (\d+)", plan) == [("1", "3")]
    assert store.table("aggregate", "C", **day).to_pylist() == expected("aggregate", LATE[1:])


def test_exports_and_the_catalog_file_give_the_rows_written(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """``export`` (whole, and one contract's date B) and ``catalog`` read the compacted day
    file as the views do."""
    data_dir = stores["compacted"]
    output = tmp_path / "all.parquet"
    assert export(data_dir, "aggregate", output, "parquet", bar=False) == len(MESSAGES)
    assert pq.read_table(output).to_pylist() == expected("aggregate")
    one = tmp_path / "one.parquet"
    count = export(
        data_dir, "best_limit", one, "parquet", contracts=["012345"], start=Bound(B), end=Bound(B)
    )
    on_b = [m for m in MESSAGES if m.day == B and m.contract == "012345"]
    assert count == 3  # one level each
    assert pq.read_table(one).to_pylist() == expected("best_limit", on_b)
    catalog = write_catalog(data_dir, tmp_path / "catalog.duckdb")
    with duckdb.connect(str(catalog), read_only=True) as con:
        for table in WRITTEN:
            assert _view_rows(con, table) == expected(table)


def test_a_view_made_before_the_fold_reads_the_compacted_day_file(tmp_path: Path) -> None:
    """A connection made over flushed day files only (no compacted day file anywhere) reads
    the compacted day file a fold writes after it, and its contract files."""
    write_flushed(tmp_path)
    con = recorder.connect(tmp_path)
    assert _view_rows(con, "aggregate") == expected("aggregate")
    for table in WRITTEN:
        for contract in sorted({m.contract for m in ON_A}):
            write_contract_file(tmp_path, table, [m for m in ON_A if m.contract == contract])
        write_packed_day_file(tmp_path, table, FOLDED)
        for part in (ON_A, FOLDED):
            seqs = [m.seq for m in part]
            folder = tmp_path / partition_dir(table, part[0].day.isoformat(), None)
            (folder / file_name(min(seqs), max(seqs))).unlink()
    for table in WRITTEN:
        assert _view_rows(con, table) == expected(table)


def test_the_day_glob_leaves_compacted_day_files_to_their_own_glob(tmp_path: Path) -> None:
    """A compacted day file is matched by its glob alone: its rows are read once."""
    packed = write_packed_day_file(tmp_path, "aggregate", FOLDED)
    late = write_flush(tmp_path, "aggregate", LATE)
    con = recorder.connect(tmp_path)
    table = TABLES["aggregate"]
    listed = {
        glob: [Path(f) for (f,) in con.execute("SELECT file FROM glob(?)", [glob]).fetchall()]
        for glob in (day_glob(tmp_path, table), packed_day_glob(tmp_path, table))
    }
    assert list(listed.values()) == [[late], [packed]]
    assert con.execute("SELECT count(*), count(DISTINCT seq) FROM aggregate").fetchall() == [(6, 6)]


def test_a_compacted_day_file_without_a_newer_column_reads_it_as_null(tmp_path: Path) -> None:
    """Footers are checked against the compacted day file's own columns: one with them all
    is read as it is, one written before ``source`` existed by name (NULL there)."""
    packed = write_packed_day_file(tmp_path, "aggregate", FOLDED)
    late = write_flush(tmp_path, "aggregate", LATE)
    schemas = FileSchemas()
    assert schemas.check(TABLES["aggregate"], [packed, late]) is False
    pq.write_table(pq.read_table(packed).drop_columns(["source"]), packed)
    assert FileSchemas().check(TABLES["aggregate"], [packed, late]) is True
    rows = expected("aggregate", FOLDED + LATE)
    for r in rows[: len(FOLDED)]:
        r["source"] = None
    assert _view_rows(recorder.connect(tmp_path), "aggregate") == rows
    assert Store(tmp_path).table("aggregate").to_pylist() == rows


class _Folding(StoreFiles):
    """Folds a table's contract folders of date B into a compacted day file once its date
    folder is listed, before the contract folders are (a swap between a request's listings)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, UTC)
        self.folded: list[str] = []

    def date_listing(self, folder: Path) -> tuple[set[str], list[Path]]:
        listing = super().date_listing(folder)
        table = folder.parent.name
        if folder.name == f"date={B}" and table not in self.folded:
            self.folded.append(table)
            write_packed_day_file(self.data_dir, table, FOLDED)
            for contract_folder in folder.glob("contract=*"):
                shutil.rmtree(contract_folder)
        return listing


def _book(state: pa.Table) -> list[tuple[Any, ...]]:
    return [
        (r["contract"], r["seq"], r["bid_quantity_1"], r["ask_quantity_2"])
        for r in state.to_pylist()
    ]


#: calls that list date B once before it is folded, and what they must answer
RACED: dict[str, tuple[Callable[[Store], Any], Any]] = {
    "table": (lambda s: s.table("best_limit", start=B).to_pylist(), expected("best_limit", FOLDED)),
    "asof": (lambda s: _book(s.asof(LATER)), [("012345", 8, 9, None), ("ش/1 x", 9, 10, 20)]),
    "contracts": (lambda s: s.contracts(), ["012345", "ش/1 x"]),
}


@pytest.mark.parametrize("call", list(RACED))
def test_contract_folders_folded_away_after_their_date_was_listed(
    tmp_path: Path, call: str
) -> None:
    """A date folder listed with contract folders that a fold in the ``date`` layout removes
    before they are listed is listed again (or its listing is used alone): no row is left
    unread."""
    for table in WRITTEN:
        for contract in sorted({m.contract for m in FOLDED}):
            write_contract_file(tmp_path, table, [m for m in FOLDED if m.contract == contract])
    store = Store(tmp_path, "UTC")
    store._files = folding = _Folding(store.data_dir)
    work, answer = RACED[call]
    assert work(store) == answer
    assert sorted(folding.folded) == sorted(WRITTEN)
    assert not list(tmp_path.glob("*/date=*/contract=*"))


def _pack_days(data_dir: Path) -> None:
    """test_day_files' ``day`` layout, compacted: OLD into contract files; DAY1 into a
    compacted day file, but its last flush; DAY2's first half of flushes into a compacted day
    file, but contract A's rows, which are in A's folder (a date that switched layouts)."""
    for name in BY_CONTRACT:
        for day in (OLD, DAY1, DAY2):
            folder = data_dir / partition_dir(name, day.isoformat(), None)
            flushes = sorted(folder.glob("*.parquet"))
            folded = {OLD: flushes, DAY1: flushes[:-1], DAY2: flushes[: len(flushes) // 2]}[day]
            if folded:
                _fold(data_dir, name, day, folded, None if day == OLD else {"A"})


def _fold(
    data_dir: Path, name: str, day: date, flushes: list[Path], into_folders: set[str] | None
) -> None:
    """``flushes`` of ``name`` replaced by the contract files of the contracts
    ``into_folders`` (None: every one) and a compacted day file of the other contracts."""
    table = TABLES[name]
    rows = pa.concat_tables(pq.read_table(f, partitioning=None) for f in flushes)
    packed = pack_received(table, rows.cast(table.day_schema))
    contracts = packed.column(CONTRACT_COLUMN)
    chosen = sorted(set(contracts.to_pylist()) if into_folders is None else into_folders)
    for contract in chosen:
        mine = packed.filter(pc.equal(contracts, contract))
        if mine.num_rows:
            where = data_dir / partition_dir(name, day.isoformat(), contract)
            _write_packed(mine.drop_columns([CONTRACT_COLUMN]), where)
    rest = packed.filter(pc.invert(pc.is_in(contracts, pa.array(chosen, pa.string()))))
    if rest.num_rows:
        _write_packed(rest, data_dir / partition_dir(name, day.isoformat(), None))
    for f in flushes:
        f.unlink()


def test_every_store_call_of_test_day_files_answers_the_same_compacted(tmp_path: Path) -> None:
    """test_day_files' messages (snapshots, extras, sessions, every table): the same answers
    from contract files as from compacted day files with contract folders and late flushes."""
    write_store(tmp_path / "contract", "contract")
    packed_dir = tmp_path / "packed"
    write_store(packed_dir, "day")
    _pack_days(packed_dir)
    files = [f for name in BY_CONTRACT for f in table_files(packed_dir, TABLES[name])]
    kinds = {(is_day_file(f), is_packed_day_file(f)) for f in files}
    assert kinds == {(False, False), (True, False), (True, True)}
    for zone in ("Asia/Tehran", None):
        with Store(tmp_path / "contract", zone) as reference, Store(packed_dir, zone) as store:
            for name, call in CALLS.items():
                assert call(store) == call(reference), (name, zone)
