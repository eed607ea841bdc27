"""Day files: every reader answers the same whether rows sit in day files or contract files.

The same messages are written three ways (see :mod:`recorder.paths`): every flush as contract
files (older recorders), every flush as one day file per table and date (the recorder now),
and a mix (some contracts compacted, later rows in day files, a date whose first flush was
written by an older recorder). Store, export, status and verify must not tell them apart.
"""

from __future__ import annotations

import random
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recorder
from recorder import Store
from recorder.accounting import status, verify
from recorder.catalog import table_files
from recorder.export import Bound, export, select_files
from recorder.paths import file_name, is_day_file, partition_dir
from recorder.schema import CONTRACT_COLUMN, TABLES
from recorder.state import SeqAllocator, max_seq_on_disk
from recorder.writer import to_arrow
from tests.test_views import row

TEHRAN = ZoneInfo("Asia/Tehran")
CONTRACTS = ("012345", "A", "B", "ش/1 x")  # sorted; a numeric id and one that needs encoding
OLD, DAY1, DAY2 = date(2026, 5, 27), date(2026, 5, 30), date(2026, 5, 31)
BY_CONTRACT = [name for name, table in TABLES.items() if table.by_contract]
FLUSH = 6  # seqs per flush
LAYOUTS = ("contract", "day", "mixed")


@dataclass
class Message:
    """One recorded frame: its file rows per table (``contract`` and ``date`` are folders)."""

    seq: int
    contract: str
    ts: datetime
    snapshot: bool
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    @property
    def day(self) -> date:
        return self.ts.astimezone(TEHRAN).date()


def _messages() -> list[Message]:
    """Random walks of four contracts over three Tehran dates; ``012345`` only on OLD."""
    rng = random.Random(7)
    stamps: list[tuple[datetime, str]] = []
    for minute in range(0, 40, 3):
        stamps.append((datetime(2026, 5, 27, 6, minute, tzinfo=UTC), "012345"))
    for contract, start in (("A", 6), ("B", 6), ("ش/1 x", 7)):
        for day, hour in ((30, start), (31, 5)):
            moment = datetime(2026, 5, day, hour, 0, tzinfo=UTC)
            for _ in range(25):
                moment += timedelta(seconds=rng.randint(5, 150))
                stamps.append((moment, contract))
    stamps.sort()
    totals: dict[tuple[str, date], tuple[int, int, int]] = {}
    messages = []
    for seq, (moment, contract) in enumerate(stamps, start=1):
        message = Message(seq, contract, moment, snapshot=False)
        first = (contract, message.day) not in totals
        message.snapshot = first and contract != "B"  # fetched at connect, not streamed
        count, volume, value = totals.get((contract, message.day), (0, 0, 0))
        if seq % 11 == 0 and not first:  # extras only: a section the schema does not know
            message.rows["extras"] = [_row("extras", message, section="Odd", json='{"x":1}')]
            messages.append(message)
            continue
        if rng.random() < 0.6:
            trades = rng.randint(1, 3)
            count, volume = count + trades, volume + 10 * trades
            value += 10 * trades * rng.randint(95, 105)
        totals[(contract, message.day)] = (count, volume, value)
        last = float(rng.randint(95, 105))
        message.rows["aggregate"] = [
            _row(
                "aggregate",
                message,
                trade_date=message.day if count else None,
                trade_time=time(12),
                trade_count=count,
                total_volume=volume,
                total_value=value,
                closing_price=0.0,
                last_price=last if count else 0.0,
                low_price=95.0,
                high_price=105.0,
                open_price=100.0,
                previous_close=99.0,
            )
        ]
        message.rows["best_limit"] = [
            _row(
                "best_limit",
                message,
                level=n,
                buy_quantity=0 if (seq + n) % 7 == 0 else rng.randint(1, 9),
                buy_price=0.0 if (seq + n) % 7 == 0 else last - n,
                sell_quantity=rng.randint(1, 9),
                sell_price=last + n,
            )
            for n in range(1, 2 + seq % 3)
        ]
        if seq % 3 == 0:
            message.rows["allowed_price_range"] = [
                _row(
                    "allowed_price_range", message, min_allowed_price=90.0, max_allowed_price=110.0
                )
            ]
        if seq % 4 == 0:
            message.rows["contract_info"] = [
                _row("contract_info", message, open_interest=seq, open_interest_changes=1)
            ]
        if seq % 5 == 0:  # several rows of one frame, in wire order
            message.rows["extras"] = [
                _row("extras", message, section=None, json=f'{{"sequence":{seq}}}'),
                _row("extras", message, section="BestLimit", level="1", json='{"flag":true}'),
                _row("extras", message, section="OrderBookDelta", json='{"side":"buy"}'),
            ]
        messages.append(message)
    return messages


def _row(table: str, message: Message, **values: Any) -> tuple[Any, ...]:
    source = "snapshot" if message.snapshot else "stream"
    return row(table, exchange_ts=message.ts, seq=message.seq, source=source, **values)


MESSAGES = _messages()
B_DAY1 = [m for m in MESSAGES if m.contract == "B" and m.day == DAY1]
#: sessions: (session, endpoint, contracts, opened, closed or None, close reason)
SESSIONS = (
    ("r-0.1", "ws://x/contract/id", ["012345"], "2026-05-27T05:00", "2026-05-27T08:00", "shutdown"),
    ("r-1.1", "ws://x/contract/id", ["A", "ش/1 x"], "2026-05-30T05:00", "2026-05-30T05:30", "lost"),
    ("r-1.2", "ws://x/contract/id", ["A", "ش/1 x"], "2026-05-30T05:35", "2026-05-31T09:00", "stop"),
    ("r-1.3", "ws://x/contract/name", ["B"], "2026-05-30T05:00", "2026-05-31T09:00", "stop"),
)


def _session_rows() -> list[tuple[date, tuple[Any, ...]]]:
    """An opening and a closing row per session, counting the frames of its contracts."""
    out = []
    seq = 10_000
    for session, endpoint, contracts, opened, closed, reason in SESSIONS:
        begin = datetime.fromisoformat(opened).replace(tzinfo=UTC)
        end = datetime.fromisoformat(closed).replace(tzinfo=UTC)
        frames = sum(1 for m in MESSAGES if m.contract in contracts and begin <= m.ts < end)
        common = {"session": session, "run": "r", "endpoint": endpoint, "contracts": contracts}
        us = int(begin.timestamp() * 1e6)
        for at, extra in (
            (begin, {}),
            (end, {"closed_at": int(end.timestamp() * 1e6), "reason": reason, "frames": frames}),
        ):
            seq += 1
            received = int(at.timestamp() * 1e6)
            values = {**common, **extra, "received_at": received, "seq": seq, "opened_at": us}
            out.append((at.astimezone(TEHRAN).date(), row("session_log", **values)))
    return out


def _contract_file(data_dir: Path, table: str, day: date, contract: str, rows: list[Any]) -> Path:
    """A contract file as an older recorder flushed it."""
    folder = data_dir / partition_dir(table, day.isoformat(), contract)
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder, to_arrow(TABLES[table], rows))


def write_day_file(data_dir: Path, table: str, day: date, rows: list[tuple[str, Any]]) -> Path:
    """A day file as the recorder flushes it: ``Table.day_schema``, rows by (contract, seq)
    (a frame's rows kept in order), small row groups so that statistics can skip."""
    spec = TABLES[table]
    data = to_arrow(spec, [r for _, r in rows])
    data = data.append_column(CONTRACT_COLUMN, pa.array([c for c, _ in rows], pa.string()))
    data = data.cast(spec.day_schema).sort_by(
        [(CONTRACT_COLUMN, "ascending"), ("seq", "ascending")]
    )
    folder = data_dir / partition_dir(table, day.isoformat(), None)
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder, data, row_group_size=4)


def _write(folder: Path, data: pa.Table, tag: str = "", row_group_size: int | None = None) -> Path:
    seqs = data.column("seq").to_pylist()
    path = folder / file_name(min(seqs), max(seqs), tag)
    pq.write_table(data, path, row_group_size=row_group_size)
    return path


def write_store(data_dir: Path, layout: str) -> None:
    """Every message written as ``layout`` says (see the module docstring)."""
    data_dir.mkdir(parents=True)
    by_date: dict[date, list[tuple[Any, ...]]] = defaultdict(list)
    for day, session_row in _session_rows():
        by_date[day].append(session_row)
    for day, rows in by_date.items():
        folder = data_dir / partition_dir("session_log", day.isoformat(), None)
        folder.mkdir(parents=True)
        _write(folder, to_arrow(TABLES["session_log"], sorted(rows, key=lambda r: r[2])))
    day1_seqs = [m.seq for m in MESSAGES if m.day == DAY1]
    cut = day1_seqs[len(day1_seqs) // 2]  # DAY1 rows of compacted contracts up to here
    day2_first = min(m.seq for m in MESSAGES if m.day == DAY2)
    for table in BY_CONTRACT:
        rows = [(m, r) for m in MESSAGES for r in m.rows.get(table, [])]
        compacted: dict[tuple[date, str], list[Any]] = defaultdict(list)
        flushed: dict[tuple[date, str, int], list[Any]] = defaultdict(list)
        day_files: dict[tuple[date, int], list[tuple[str, Any]]] = defaultdict(list)
        for m, r in rows:
            flush = m.seq // FLUSH
            if layout == "contract":
                flushed[(m.day, m.contract, flush)].append(r)
            elif layout == "day":
                day_files[(m.day, flush)].append((m.contract, r))
            elif m.day == OLD or (m.day == DAY1 and m.contract in ("A", "ش/1 x") and m.seq <= cut):
                compacted[(m.day, m.contract)].append(r)
            elif m.day == DAY2 and flush == day2_first // FLUSH:  # an older recorder's flush
                flushed[(m.day, m.contract, flush)].append(r)
            else:
                day_files[(m.day, flush)].append((m.contract, r))
        for (day, contract), part in compacted.items():
            folder = data_dir / partition_dir(table, day.isoformat(), contract)
            folder.mkdir(parents=True)
            _write(folder, to_arrow(TABLES[table], part), tag="c")
        for (day, contract, _), part in flushed.items():
            _contract_file(data_dir, table, day, contract, part)
        for (day, _), mixed in day_files.items():
            write_day_file(data_dir, table, day, mixed)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same messages in each layout."""
    root = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        write_store(root / layout, layout)
    return {layout: root / layout for layout in LAYOUTS}


def test_the_layouts_hold_the_kinds_of_file_they_are_meant_to(stores: dict[str, Path]) -> None:
    """The contract layout has no day file, the day layout no contract file, the mix both."""
    kinds = {}
    for layout, data_dir in stores.items():
        files = [f for t in BY_CONTRACT for f in table_files(data_dir, TABLES[t])]
        kinds[layout] = (sum(map(is_day_file, files)), sum(not is_day_file(f) for f in files))
    assert kinds["contract"][0] == 0 < kinds["contract"][1]
    assert kinds["day"][1] == 0 < kinds["day"][0]
    assert kinds["mixed"][0] > 0
    assert kinds["mixed"][1] > 0


def _stream(messages: list[Message]) -> list[Message]:
    return [m for m in messages if not m.snapshot]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


#: Store calls whose answers every layout must share, by name
CALLS: dict[str, Callable[[Store], Any]] = {
    "contracts": lambda s: s.contracts(),
    "count": lambda s: s.message_count(),
    "count A": lambda s: s.message_count("A"),
    "count two in a window": lambda s: s.message_count(
        ["B", "ش/1 x"], start=_at("2026-05-30T06:20"), end=_at("2026-05-31T05:10")
    ),
    "bars 1 minute A": lambda s: s.bars("1 minute", "A").to_pylist(),
    "bars 5 minutes in a window": lambda s: s.bars(
        "5 minutes", ["ش/1 x", "B"], start=_at("2026-05-30T06:30"), end=_at("2026-05-31T05:30")
    ).to_pylist(),
    "bars 1 day": lambda s: s.bars(timedelta(days=1), tz="Asia/Tehran").to_pylist(),
    "asof busy": lambda s: s.asof(_at("2026-05-30T07:30")).to_pylist(),
    "asof two": lambda s: s.asof(_at("2026-05-31T05:10"), ["ش/1 x", "012345"]).to_pylist(),
    "asof later": lambda s: s.asof(_at("2026-06-02T00:00")).to_pylist(),
    "asof before all": lambda s: s.asof(_at("2026-05-20T00:00")).to_pylist(),
    "replay": lambda s: list(s.replay()),
    "replay B, no snapshots": lambda s: list(s.replay("B", snapshots=False)),
    "replay window": lambda s: list(
        s.replay_timed(["A", "012345"], start=_at("2026-05-27T06:10"), end=_at("2026-05-30T06:30"))
    ),
    "connect A": lambda s: _fetch(
        s.connect("A"), "SELECT contract, count(*), sum(seq) FROM best_limit GROUP BY ALL"
    ),
}
#: calls whose answer is empty in every layout (checked to be so)
EMPTY = {"asof before all", "table gaps of one in a day"}
for _name in (*BY_CONTRACT, "top_of_book", "trades", "gaps", "sessions"):
    CALLS[f"table {_name}"] = lambda s, n=_name: s.table(n).to_pylist()
    CALLS[f"table {_name} of two"] = lambda s, n=_name: s.table(n, ["ش/1 x", "A"]).to_pylist()
    CALLS[f"table {_name} of one in a day"] = lambda s, n=_name: s.table(
        n, "B", start=_at("2026-05-30T00:00"), end=_at("2026-05-31T00:00")
    ).to_pylist()


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[Any, ...]]:
    with con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def answers(stores: dict[str, Path]) -> dict[tuple[str, bool], dict[str, Any]]:
    """Every call's answer, per layout, with and without the partition time zone."""
    out = {}
    for layout, data_dir in stores.items():
        for zoned in (True, False):
            with Store(data_dir, "Asia/Tehran" if zoned else None) as store:
                out[(layout, zoned)] = {name: call(store) for name, call in CALLS.items()}
    return out


@pytest.mark.parametrize("call", list(CALLS))
def test_every_store_call_answers_the_same_in_every_layout(
    answers: dict[tuple[str, bool], dict[str, Any]], call: str
) -> None:
    """Day files, contract files or both: the same answer, with or without the time zone."""
    reference = answers[("contract", True)][call]
    assert (reference == []) == (call in EMPTY)
    for key, found in answers.items():
        assert found[call] == reference, key


def test_the_answers_are_the_recorded_messages(
    answers: dict[tuple[str, bool], dict[str, Any]],
) -> None:
    """Counts, as-of and replay hold exactly the messages written (so no layout is wrong
    in the same way as the others)."""
    got = answers[("mixed", True)]
    assert got["contracts"] == list(CONTRACTS)
    assert got["count"] == len(_stream(MESSAGES))
    assert got["count A"] == len(_stream([m for m in MESSAGES if m.contract == "A"]))
    assert len(got["replay"]) == len(MESSAGES)
    replayed = got["replay"]
    assert [m.get("sequence") for m in replayed] == [
        m.seq if m.seq % 5 == 0 and "best_limit" in m.rows else None for m in MESSAGES
    ]
    assert [m.get("contractName", m.get("contractId")) for m in replayed] == [
        m.contract for m in MESSAGES
    ]
    assert [("contractName" in m) for m in replayed] == [m.contract == "B" for m in MESSAGES]
    flagged = next(m for m in replayed if "sequence" in m)
    assert flagged["data"]["BestLimit"]["1"]["flag"] is True
    assert flagged["data"]["OrderBookDelta"] == {"side": "buy"}
    assert len(got["replay B, no snapshots"]) == sum(m.contract == "B" for m in MESSAGES)
    at = _at("2026-05-30T07:30")
    last = {
        c: max((m for m in MESSAGES if m.contract == c and m.ts <= at), key=lambda m: m.ts).seq
        for c in CONTRACTS
    }
    assert [(r["contract"], r["seq"]) for r in got["asof busy"]] == sorted(last.items())
    assert [r["contract"] for r in got["asof two"]] == ["012345", "ش/1 x"]
    assert got["asof before all"] == []
    rows = {name: sum(len(m.rows.get(name, [])) for m in MESSAGES) for name in BY_CONTRACT}
    assert {name: len(got[f"table {name}"]) for name in BY_CONTRACT} == rows
    expected = [("A", *_sum_rows("best_limit", "A"))]
    assert got["connect A"] == expected


def _sum_rows(table: str, contract: str) -> tuple[int, int]:
    rows = [m.seq for m in MESSAGES if m.contract == contract for _ in m.rows.get(table, [])]
    return len(rows), sum(rows)


def _files_read(store: Store, sql: str, **request: Any) -> tuple[int, int, int]:
    """Files, row groups scanned and row groups there were, from the query's profile."""
    with store.connect(**request) as con:
        plan = con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    files = sum(int(n) for n in re.findall(r"Total Files Read: (\d+)", plan))
    groups = re.findall(r"Row Groups Scanned: (\d+) / (\d+)", plan)
    return files, sum(int(a) for a, _ in groups), sum(int(b) for _, b in groups)


def _row_groups(files: list[Path], contract: str) -> tuple[int, int]:
    """Row groups whose statistics may hold ``contract`` (every one of a contract file), and
    row groups in all."""
    may, total = 0, 0
    for path in files:
        meta = pq.read_metadata(path)
        column = meta.schema.names.index(CONTRACT_COLUMN) if is_day_file(path) else None
        for i in range(meta.num_row_groups):
            total += 1
            if column is None:
                may += 1
                continue
            stats = meta.row_group(i).column(column).statistics
            may += stats.min <= contract <= stats.max
    return may, total


@pytest.mark.parametrize("layout", ["day", "mixed"])
def test_one_contract_one_day_opens_that_dates_files_and_skips_other_contracts(
    stores: dict[str, Path], layout: str
) -> None:
    """A request for B on DAY1 lists and reads only DAY1's day files (and B's folder), and the
    filter on ``contract`` leaves most of their row groups unread."""
    data_dir = stores[layout]
    store = Store(data_dir, "Asia/Tehran")
    day = {"contracts": "B", "start": "2026-05-30T00:00+03:30", "end": "2026-05-31T00:00+03:30"}
    date_dir = data_dir / partition_dir("aggregate", DAY1.isoformat(), None)
    listed = store.files("aggregate", **day)
    day_files = sorted(date_dir.glob("*.parquet"))
    folder = data_dir / partition_dir("aggregate", DAY1.isoformat(), "B")
    assert listed == sorted(folder.glob("*.parquet")) + day_files
    assert len(day_files) > 3
    files, scanned, groups = _files_read(store, "SELECT * FROM aggregate", **day)
    assert files == len(listed)
    assert (scanned, groups) == _row_groups(listed, "B")
    assert scanned < groups
    rows = store.table("aggregate", **day).column("seq").to_pylist()
    assert rows == [m.seq for m in B_DAY1 if "aggregate" in m.rows]


def test_asof_finds_a_contract_whose_last_rows_are_in_day_files_of_an_old_date(
    tmp_path: Path,
) -> None:
    """Days back, and only in day files (no compaction yet): found for every contract and for
    it alone, as the SQL macro over every file finds it."""
    old = [m for m in MESSAGES if m.day == OLD]
    for table in BY_CONTRACT:
        rows = [(m.contract, r) for m in old for r in m.rows.get(table, [])]
        if rows:
            write_day_file(tmp_path, table, OLD, rows)
    recent = [m for m in MESSAGES if m.day == DAY2 and m.contract == "A"]
    for m in recent:  # A's rows of DAY2 as contract files
        for table, rows in m.rows.items():
            _contract_file(tmp_path, table, DAY2, "A", rows)
    at = _at("2026-06-01T00:00")
    store = Store(tmp_path, "Asia/Tehran")
    state = store.asof(at).to_pylist()
    assert [(r["contract"], r["seq"]) for r in state] == [
        ("012345", max(m.seq for m in old if "aggregate" in m.rows)),
        ("A", recent[-1].seq),
    ]
    con = recorder.connect(tmp_path)
    exact = con.sql("SELECT * FROM asof_state(?::TIMESTAMPTZ) ORDER BY contract", params=[at])
    assert state == exact.to_arrow_table().to_pylist()
    assert store.asof(at, "012345").to_pylist() == state[:1]
    assert Store(tmp_path).asof(at, ["012345", "nobody"]).to_pylist() == state[:1]
    assert store.contracts() == ["012345", "A"]


@pytest.mark.parametrize("legacy_first", [True, False])
def test_a_day_file_without_a_newer_column_reads_it_as_null(
    stores: dict[str, Path], tmp_path: Path, legacy_first: bool
) -> None:
    """A day file written before ``source`` existed, read first or after files that have it,
    gives NULL there (read by name) through the Store and recorder.connect alike."""
    data_dir = tmp_path / "data"
    shutil.copytree(stores["mixed"], data_dir)
    seq = 0 if legacy_first else 9_999  # names sort by seq: the order DuckDB reads them in
    ts = _at("2026-05-30T06:00") if legacy_first else _at("2026-05-30T12:00")
    message = Message(seq, "B", ts, snapshot=False)
    values = {"trade_count": 1, "total_volume": 1, "total_value": 1, "last_price": 1.0}
    rows = [("B", _row("aggregate", message, **values)), ("A", _row("aggregate", message))]
    path = write_day_file(data_dir, "aggregate", DAY1, rows)
    pq.write_table(pq.read_table(path).drop_columns(["source"]), path)
    store = Store(data_dir, "Asia/Tehran")
    day = {"start": "2026-05-30T00:00+03:30", "end": "2026-05-31T00:00+03:30"}
    table = store.table("aggregate", "B", **day)
    expected = [
        m.seq for m in MESSAGES if m.contract == "B" and m.day == DAY1 and m.rows.get("aggregate")
    ]
    expected.insert(0 if legacy_first else len(expected), seq)
    assert table.column("seq").to_pylist() == expected
    sources = table.column("source").to_pylist()
    assert sources.count(None) == 1
    assert sources[0 if legacy_first else -1] is None
    assert store.message_count("B", **day) == len(B_DAY1) + 1
    con = recorder.connect(data_dir)
    found = con.execute("SELECT contract FROM aggregate WHERE source IS NULL ORDER BY 1")
    assert found.fetchall() == [("A",), ("B",)]


def _compact_day2(data_dir: Path, table: str) -> None:
    """DAY2's rows of ``table`` as contract files, as compaction folds its day files."""
    for contract in CONTRACTS:
        rows = [
            r
            for m in MESSAGES
            if m.contract == contract and m.day == DAY2
            for r in m.rows.get(table, [])
        ]
        if rows:
            _contract_file(data_dir, table, DAY2, contract, rows)


def test_a_day_file_folded_away_after_it_was_listed_is_listed_again(tmp_path: Path) -> None:
    """Compaction folds day files into contract files, maybe between a request's listing and
    its read: the request lists again and reads every row once."""
    write_store(tmp_path / "data", "day")
    data_dir = tmp_path / "data"
    folded: list[Path] = []

    class Racing(Store):
        def files(self, table: str, *args: Any, **kwargs: Any) -> list[Path]:
            found = super().files(table, *args, **kwargs)
            if table == "aggregate" and not folded:
                _compact_day2(data_dir, table)
                folded.extend(f for f in found if is_day_file(f))
                for f in folded:
                    f.unlink()
            return found

    store = Racing(data_dir, "Asia/Tehran")
    day = {"start": "2026-05-31T00:00+03:30", "end": "2026-06-01T00:00+03:30"}
    seqs = store.table("aggregate", **day).column("seq").to_pylist()
    assert len(folded) > 3
    assert seqs == [m.seq for m in MESSAGES if m.day == DAY2 and "aggregate" in m.rows]


def test_asof_lists_again_when_a_day_file_it_listed_was_folded_away(tmp_path: Path) -> None:
    """The steps of an as-of request share one listing; compaction may fold day files away
    after it: the read fails, the listing is dropped, and the answer is the same."""
    data_dir = tmp_path / "data"
    write_store(data_dir, "day")
    store = Store(data_dir, "Asia/Tehran")
    at = _at("2026-05-31T05:20")  # within DAY2's messages: the look-back steps answer
    expected = store.asof(at).to_pylist()
    assert [r["contract"] for r in expected] == ["012345", "A", "B", "ش/1 x"]
    with store._files.listed_once():  # as-of's own block joins this one: the listing is kept
        assert store.asof(at).to_pylist() == expected
        folded = sorted(data_dir.glob("*/date=2026-05-31/*.parquet"))
        for table in BY_CONTRACT:
            _compact_day2(data_dir, table)
        for f in folded:
            f.unlink()
        assert len(folded) > 3
        assert store.asof(at).to_pylist() == expected


def test_exports_hold_the_same_rows_in_every_layout(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """By contracts and dates, or between two instants: the same rows from every layout,
    and exactly those of the messages asked for."""
    exports: dict[str, list[Any]] = {}
    for layout, data_dir in stores.items():
        got = []
        for n, (table, contracts, start, end) in enumerate(
            [
                ("aggregate", ["ش/1 x", "012345"], Bound(OLD), Bound(DAY1)),
                ("best_limit", None, Bound(DAY1, _at("2026-05-30T06:30")), None),
                ("extras", ["A"], None, None),
            ]
        ):
            output = tmp_path / f"{layout}-{n}.parquet"
            count = export(
                data_dir,
                table,
                output,
                "parquet",
                contracts=contracts,
                start=start,
                end=end,
                bar=False,
            )
            rows = duckdb.connect().execute(f"SELECT * FROM '{output}'").fetchall()
            assert count == len(rows)
            got.append(rows)
        exports[layout] = got
    assert exports["day"] == exports["contract"]
    assert exports["mixed"] == exports["contract"]
    aggregate, book, extras = exports["mixed"]
    wanted = [m for m in MESSAGES if m.contract in ("ش/1 x", "012345") and m.day <= DAY1]
    assert [r[4] for r in aggregate] == [m.seq for m in wanted if "aggregate" in m.rows]
    assert {r[0] for r in aggregate} == {"ش/1 x", "012345"}
    since = _at("2026-05-30T06:30")
    assert len(book) == sum(len(m.rows.get("best_limit", [])) for m in MESSAGES if m.ts >= since)
    assert len(extras) == sum(len(m.rows.get("extras", [])) for m in MESSAGES if m.contract == "A")
    picked = select_files(stores["day"], TABLES["extras"], ["A"], Bound(DAY2), Bound(DAY2))
    assert picked == sorted((stores["day"] / "extras" / f"date={DAY2}").glob("*.parquet"))


def _contracts_in(day_file: Path) -> set[str]:
    return set(pq.ParquetFile(day_file).read([CONTRACT_COLUMN]).column(0).to_pylist())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_status_and_verify_count_day_file_rows_per_contract(
    stores: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    """status counts each contract's messages and rows wherever they are; verify reads every
    file and finds a day file stored twice and one that cannot be read."""
    data_dir = tmp_path / "data"
    shutil.copytree(stores[layout], data_dir)
    counts = status(data_dir)
    assert (counts.received, counts.stored, counts.quarantined) == (len(MESSAGES),) * 2 + (0,)
    assert counts.balanced
    per_contract = {
        c["contract"]: (c["messages"], c["aggregate"], c["extras"]) for c in counts.contracts
    }
    assert per_contract == {
        contract: (
            sum(m.contract == contract for m in MESSAGES),
            sum(m.contract == contract and "aggregate" in m.rows for m in MESSAGES),
            sum(len(m.rows.get("extras", [])) for m in MESSAGES if m.contract == contract),
        )
        for contract in CONTRACTS
    }
    files = sorted(f for t in TABLES.values() for f in table_files(data_dir, t))
    clean = verify(data_dir)
    assert clean.problems == []
    assert clean.files == len(files)

    if layout == "contract":
        victim = next(f for f in files if "contract_info" in f.parts)
    else:  # the day file of the most contracts
        day_files = [f for f in files if "contract_info" in f.parts and is_day_file(f)]
        victim = max(day_files, key=lambda f: len(_contracts_in(f)))
        assert len(_contracts_in(victim)) >= 2
    shutil.copy(victim, victim.with_name(file_name(99_998, 99_999)))
    rows = pq.read_metadata(victim).num_rows
    result = verify(data_dir)
    assert result.files == len(files) + 1
    assert result.problems == [f"contract_info: {rows} rows stored more than once"]


def test_the_seq_counter_starts_above_the_seqs_day_files_name(tmp_path: Path) -> None:
    """Without its state file, the seq counter starts above the highest seq any file names,
    a day file's included."""
    old = [m for m in MESSAGES if m.day == OLD]
    _contract_file(tmp_path, "aggregate", OLD, "012345", old[0].rows["aggregate"])
    day = [(m.contract, r) for m in MESSAGES if m.day == DAY2 for r in m.rows.get("aggregate", [])]
    write_day_file(tmp_path, "aggregate", DAY2, day)
    highest = max(m.seq for m in MESSAGES if m.day == DAY2 and "aggregate" in m.rows)
    assert max_seq_on_disk(tmp_path) == highest
    assert SeqAllocator(tmp_path).next() == highest + 1
