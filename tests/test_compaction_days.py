"""Compaction of day files: each date's day files folded into one sorted file per contract."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recorder
from recorder.buffer import Key
from recorder.catalog import day_glob, read_sql, table_glob
from recorder.compaction import compact
from recorder.compactor import Compactor, Layout, Outcome, exchange
from recorder.paths import encode_contract, file_name, seq_range
from recorder.schema import TABLES, Table
from recorder.writer import partition_lock
from tests.test_compaction import (
    FUTURE,
    TEHRAN,
    Crash,
    assert_no_leftovers,
    crash_at,
    recovery_marks,
    refuse,
)

DAY = date(2025, 3, 1)
BEST_LIMIT, AGGREGATE = TABLES["best_limit"], TABLES["aggregate"]
CONTRACTS = ["1001", "1002", "IRO1 FOLD", "1004", "1005"]  # one with a space in its name
NOON_US = int(datetime.combine(DAY, time(8, 30)).timestamp() * 1_000_000)


def value(column: pa.Field, seq: int, contract: str, row: int) -> object:
    """A value of ``column`` for row ``row`` of frame ``seq``: distinct, in the column's type."""
    n = seq * 10 + row
    if column.name == "seq":
        return seq
    if column.name == "level":
        return row + 1 if pa.types.is_integer(column.type) else f"L{row + 1}"
    if column.name in ("exchange_ts", "received_at"):  # out of seq order: sorting has work
        offset = (seq * 7_919) % 1_000 * 1_000_000 + (500 if column.name == "received_at" else 0)
        return datetime.fromtimestamp((NOON_US + offset) / 1e6).astimezone()
    kind = column.type
    if pa.types.is_integer(kind):
        return n + len(contract)
    if pa.types.is_floating(kind):
        return n / 4 + 0.5
    if pa.types.is_string(kind):
        return f"{contract}:{column.name}:{n}"
    if pa.types.is_date(kind):
        return DAY
    if pa.types.is_time(kind):
        return time(10, seq % 60, row)
    if pa.types.is_boolean(kind):
        return n % 2 == 0
    raise AssertionError(kind)


def frames(table: Table, contract: str, seqs: range) -> pa.Table:
    """The rows of frames ``seqs`` of ``contract`` (best_limit: three levels per frame)."""
    per_frame = 3 if table.levels else 1
    rows = [
        {f.name: value(f, seq, contract, row) for f in table.arrow_schema}
        for seq in seqs
        for row in range(per_frame)
    ]
    return pa.Table.from_pylist(rows, schema=table.arrow_schema)


def write_day_file(data_dir: Path, table: Table, parts: dict[str, range], day: date = DAY) -> Path:
    """Write a day file as a flush does: the rows of several contracts, ``contract`` a column,
    sorted by (contract, seq), named by the seq range of the flush."""
    pieces = [_with_contract(frames(table, c, seqs), c) for c, seqs in parts.items()]
    data = pa.concat_tables(pieces).sort_by([("contract", "ascending"), ("seq", "ascending")])
    assert data.schema == table.day_schema
    first = min(s.start for s in parts.values())
    last = max(s.stop - 1 for s in parts.values())
    folder = data_dir / table.name / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(first, last)
    pq.write_table(data, path, compression="zstd", row_group_size=4)
    return path


def _with_contract(data: pa.Table, contract: str) -> pa.Table:
    return data.append_column("contract", pa.array([contract] * data.num_rows, pa.string()))


def three_flushes(data_dir: Path, table: Table = BEST_LIMIT) -> None:
    """Three day files of one date: seqs 1..30, each contract in some of them."""
    write_day_file(data_dir, table, {"1001": range(1, 5), "1002": range(2, 8)})
    write_day_file(data_dir, table, {"1001": range(11, 14), "IRO1 FOLD": range(12, 16)})
    write_day_file(data_dir, table, {c: range(21 + i, 31, 5) for i, c in enumerate(CONTRACTS)})


def rows(data_dir: Path, table: Table = BEST_LIMIT, con: Any = None) -> list[tuple[Any, ...]]:
    """Every row of ``table``'s view, in a fixed order."""
    own = con is None
    con = recorder.connect(data_dir) if con is None else con
    names = ", ".join(c.name for c in table.columns)
    found = con.execute(f"SELECT {names} FROM {table.name} ORDER BY ALL").fetchall()
    if own:
        con.close()
    return found


def folder_files(data_dir: Path, table: Table = BEST_LIMIT) -> dict[str, list[str]]:
    """The Parquet files of the date folder, relative to it."""
    root = data_dir / table.name / f"date={DAY}"
    return {
        str(p.relative_to(root).parent): sorted(x.name for x in p.parent.glob("*.parquet"))
        for p in sorted(root.rglob("*.parquet"))
    }


def contract_folder(contract: str) -> str:
    return f"contract={encode_contract(contract)}"


def test_a_date_of_day_files_only_becomes_one_sorted_file_per_contract(tmp_path: Path) -> None:
    """Three day files, five contracts read two at a time: one compacted file per contract
    named by the range of every day file, no day file left, the same rows in the views."""
    three_flushes(tmp_path)
    before, marks = rows(tmp_path), recovery_marks(tmp_path)
    assert len(before) == 3 * (4 + 6 + 3 + 4 + 10)

    compactor = Compactor(tmp_path, chunk_contracts=2)
    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=compactor)

    assert result.ok
    name = file_name(1, 30, "c")
    assert folder_files(tmp_path) == {contract_folder(c): [name] for c in CONTRACTS}
    assert (result.compacted, result.files_before, result.rows) == (5, 3, len(before))
    assert rows(tmp_path) == before
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)
    for contract in CONTRACTS:
        path = tmp_path / "best_limit" / f"date={DAY}" / contract_folder(contract) / name
        data = pq.read_table(path, partitioning=None)
        assert "contract" not in data.column_names
        keys = list(
            zip(*(data.column(k).to_pylist() for k in ("exchange_ts", "seq", "level")), strict=True)
        )
        assert keys == sorted(keys)  # by (exchange_ts, seq), the levels of a frame in order

    inodes = {p: p.stat().st_ino for p in tmp_path.glob("best_limit/**/*.parquet")}
    again = compact(tmp_path, TEHRAN, now=FUTURE, bar=False)
    assert (again.compacted, again.skipped) == (0, 5)
    assert {p: p.stat().st_ino for p in tmp_path.glob("best_limit/**/*.parquet")} == inodes


def test_late_day_files_fold_into_the_contract_files_of_a_compacted_date(tmp_path: Path) -> None:
    """A compacted date gets late rows (a new contract too) and an old version's flushed file:
    the contracts they touch get a new file covering everything; the others keep theirs."""
    three_flushes(tmp_path)
    assert compact(tmp_path, TEHRAN, now=FUTURE, bar=False).ok
    write_day_file(tmp_path, BEST_LIMIT, {"1002": range(40, 43), "1009": range(41, 44)})
    write_day_file(tmp_path, BEST_LIMIT, {"1002": range(50, 51)})
    old_style = tmp_path / "best_limit" / f"date={DAY}" / contract_folder("1005")
    pq.write_table(frames(BEST_LIMIT, "1005", range(60, 62)), old_style / file_name(60, 61))
    before, marks = rows(tmp_path), recovery_marks(tmp_path)
    kept = {c: tmp_path / "best_limit" / f"date={DAY}" / contract_folder(c) for c in CONTRACTS}
    inodes = {c: next(f.glob("*.c.parquet")).stat().st_ino for c, f in kept.items()}

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False)

    assert result.ok
    old, late = file_name(1, 30, "c"), file_name(1, 50, "c")
    assert folder_files(tmp_path) == {
        contract_folder("1001"): [old],
        contract_folder("1002"): [late],
        contract_folder("IRO1 FOLD"): [old],
        contract_folder("1004"): [old],
        contract_folder("1005"): [file_name(1, 61, "c")],
        contract_folder("1009"): [file_name(40, 50, "c")],
    }
    # the three rewritten contracts replace two day files and three contract files
    assert (result.compacted, result.files_before) == (3, 5)
    assert result.rows == 3 * (12 + 4 + 3)  # frames of 1002, 1005 and 1009
    assert rows(tmp_path) == before
    # recovery: the day files no longer cover the contracts they held no row of (no frame
    # of those in 31..50 exists: the day files would hold it); the others' marks are kept
    linked = {("best_limit", DAY.isoformat(), c): 30 for c in ("1001", "IRO1 FOLD", "1004")}
    assert recovery_marks(tmp_path) == {**marks, **linked}
    assert all(marks[k] == 50 for k in linked)
    for contract in ("1001", "IRO1 FOLD", "1004"):  # linked, not rewritten
        assert (kept[contract] / old).stat().st_ino == inodes[contract]
    assert_no_leftovers(tmp_path)


def flush_during(
    data_dir: Path, when: str
) -> tuple[Callable[[str, Key], None], list[threading.Thread]]:
    """An ``on_step`` hook that, at step ``when`` of best_limit's fold, writes a day file of
    1001 (seqs 70-71) and 1010 (71-72) as a flush does, under the flushes' lock, in a thread
    (waited for at once, unless the fold holds that lock at ``when``); and the thread."""
    flushes: list[threading.Thread] = []

    def locked_flush() -> None:
        with partition_lock(data_dir.resolve(), ("best_limit", DAY.isoformat(), None)):
            write_day_file(data_dir, BEST_LIMIT, {"1001": range(70, 72), "1010": range(71, 73)})

    def flush_now(step: str, key: Key) -> None:
        if step == when and key[0] == "best_limit" and not flushes:
            flushes.append(threading.Thread(target=locked_flush))
            flushes[0].start()
            if when != "locked":
                flushes[0].join()

    return flush_now, flushes


@pytest.mark.parametrize("when", ["placed", "verified", "locked"])
def test_a_flush_into_a_date_being_folded_is_not_lost(tmp_path: Path, when: str) -> None:
    """A day file written before the lock makes the fold start over (and take it in), also
    one written between the read of the day files' contracts and the plan (1001's rows
    there, its folder one compacted file: kept as it was, they were dropped); one written
    during the swap waits for the lock and lands next to the compacted files."""
    three_flushes(tmp_path)
    outcomes: list[Outcome] = []
    expected = [
        *rows(tmp_path),
        *_view_rows(tmp_path, "1001", range(70, 72)),
        *_view_rows(tmp_path, "1010", range(71, 73)),
    ]
    flush_now, flushes = flush_during(tmp_path, when)
    compactor = Compactor(tmp_path, on_step=flush_now)
    first = next(p for p in compactor.partitions(lambda d: True) if p.key[0] == "best_limit")
    outcomes.append(compactor.compact(first).outcome)
    flushes[0].join()
    assert rows(tmp_path) == sorted(expected)
    if when != "locked":
        assert outcomes == [Outcome.CHANGED]
        # the placeholder of a contract that had only day rows stays until the fold succeeds
        assert compact(tmp_path, TEHRAN, now=FUTURE, bar=False).ok
        assert set(folder_files(tmp_path)) == {contract_folder(c) for c in [*CONTRACTS, "1010"]}
        assert all(n == [file_name(1, 72, "c")] for n in folder_files(tmp_path).values())
    else:
        assert outcomes == [Outcome.COMPACTED]
        assert folder_files(tmp_path)["."] == [file_name(70, 72)]
        assert folder_files(tmp_path)[contract_folder("1001")] == [file_name(1, 30, "c")]
    assert rows(tmp_path) == sorted(expected)


def _view_rows(data_dir: Path, contract: str, seqs: range) -> list[tuple[Any, ...]]:
    """The rows the view gives for frames ``seqs`` of ``contract`` (as :func:`frames` makes)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    data = frames(BEST_LIMIT, contract, seqs)  # noqa: F841 (read by name by DuckDB)
    columns = ", ".join(
        f"'{contract}' AS contract"
        if c.name == "contract"
        else f"DATE '{DAY}' AS date"
        if c.name == "date"
        else f"{c.name}::{c.type}"
        for c in BEST_LIMIT.columns
    )
    found = con.execute(f"SELECT {columns} FROM data").fetchall()
    con.close()
    return found


EXCHANGE_STEPS = ["staged", "verified", "locked", "exchanged", "cleaned"]
FALLBACK_STEPS = ["staged", "verified", "locked", "linked", "unlinked", "cleaned"]


@pytest.mark.parametrize(
    ("atomic", "step"),
    [(True, s) for s in EXCHANGE_STEPS] + [(False, s) for s in FALLBACK_STEPS],
)
def test_a_crash_at_any_step_of_a_fold_then_a_rerun_gives_the_same_rows(
    tmp_path: Path, atomic: bool, step: str
) -> None:
    """Crashed mid-fold (aggregate, after best_limit folded): recovery's rule holds, the views
    give every row once (but in the fallback's window, where the folded rows show twice), and
    a rerun leaves one file per contract, no day file and no staging folder."""
    three_flushes(tmp_path)
    three_flushes(tmp_path, AGGREGATE)
    write_day_file(tmp_path, AGGREGATE, {"1001": range(40, 42)})  # on top of a contract file
    before, marks = crash_mid_fold(tmp_path, step, atomic)

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=Compactor(tmp_path))
    assert result.ok
    for table in (BEST_LIMIT, AGGREGATE):
        assert rows(tmp_path, table) == before[table.name]
        last = 41 if table is AGGREGATE else 30
        names = {contract_folder(c): [file_name(1, last, "c")] for c in CONTRACTS}
        assert folder_files(tmp_path, table) == names
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)


def crash_mid_fold(
    data_dir: Path, step: str, atomic: bool, layout: Layout = "contract"
) -> tuple[dict[str, list[tuple[Any, ...]]], dict[Key, int]]:
    """Compact best_limit and aggregate in ``layout``, crashing at ``step`` of the second
    fold (aggregate's), with the exchange or without (``atomic``), and check what that
    leaves: recovery's rule holds, the views give every row once, but in the fallback's
    window ("linked" without the exchange), where aggregate's new files are in and what they
    replace still there (its rows twice). The rows of both tables and the recovery marks
    from before."""
    before = {t: rows(data_dir, TABLES[t]) for t in ("best_limit", "aggregate")}
    marks = recovery_marks(data_dir)
    swap = exchange if atomic else refuse
    crashing = Compactor(data_dir, on_step=crash_at(step, 2), swap=swap, layout=layout)
    with pytest.raises(Crash):
        compact(data_dir, TEHRAN, now=FUTURE, bar=False, compactor=crashing)

    assert recovery_marks(data_dir) == marks
    assert rows(data_dir) == before["best_limit"]
    shown = rows(data_dir, AGGREGATE)
    if atomic or step != "linked":
        assert shown == before["aggregate"]
    else:
        assert shown == sorted(before["aggregate"] * 2)
    return before, marks


def test_without_the_exchange_a_second_fallback_run_repairs_a_crash(tmp_path: Path) -> None:
    """The fallback crashed after moving some compacted files in: the next run, also without
    the exchange, leaves the rows already moved out of the new files (no row twice)."""
    three_flushes(tmp_path)
    before = rows(tmp_path)
    moved: list[str] = []
    replace = os.replace

    def crash_on_third(src: Any, dst: Any) -> None:
        if len(moved) == 2:
            raise Crash("third compacted file")
        moved.append(str(dst))
        replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("recorder.datefold.os.replace", crash_on_third)
        with pytest.raises(Crash):
            compact(
                tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=Compactor(tmp_path, swap=refuse)
            )
    assert len(moved) == 2
    assert len(rows(tmp_path)) == len(before) + 3 * (9 + 8)  # 1001 and 1002 show twice

    result = compact(
        tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=Compactor(tmp_path, swap=refuse)
    )
    assert result.ok
    assert rows(tmp_path) == before
    assert folder_files(tmp_path) == {
        contract_folder(c): [file_name(1, 30, "c")] for c in CONTRACTS
    }
    assert_no_leftovers(tmp_path)


def straddled(data_dir: Path, table: Table, contract_files: list[str], day_files: list[str]) -> Any:
    """What a view's query returns when DuckDB listed ``contract_files`` and ``day_files`` (its
    two globs) at different instants and opens them now."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    sources = []
    if contract_files:
        sources.append(read_sql(table, repr(contract_files), False))
    if day_files:
        sources.append(read_sql(table, repr(day_files), False, day_files=True))
    names = ", ".join(c.name for c in table.columns)
    try:
        return con.execute(
            f"SELECT {names} FROM ({' UNION ALL '.join(sources)}) ORDER BY ALL"
        ).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("first", ["contract files", "day files"])
def test_a_query_listing_across_the_swap_fails_rather_than_missing_or_doubling_rows(
    tmp_path: Path, first: str
) -> None:
    """A query whose two globs straddle the swap opens a file that is gone (a placeholder, a
    replaced contract file or a day file): DuckDB raises, it never returns a wrong count."""
    three_flushes(tmp_path)
    write_day_file(tmp_path, BEST_LIMIT, {"1001": range(40, 41)}, date(2025, 3, 9))
    before = rows(tmp_path)
    listed: dict[str, list[str]] = {}

    def glob(pattern: str) -> list[str]:
        return sorted(str(p) for p in Path("/").glob(pattern.lstrip("/")))

    def at(step: str, key: Key) -> None:
        if key[0] != "best_limit" or step not in ("locked", "exchanged"):
            return
        earlier = step == "locked"  # just before the exchange, else just after it
        if (first == "contract files") == earlier:
            listed["contract"] = glob(table_glob(tmp_path, BEST_LIMIT))
        else:
            listed["day"] = glob(day_glob(tmp_path, BEST_LIMIT))

    compact(tmp_path, TEHRAN, days=[DAY], bar=False, compactor=Compactor(tmp_path, on_step=at))
    if first == "contract files":  # what makes it fail: each contract's placeholder
        placeholders = [f for f in listed["contract"] if f.endswith(".p.parquet")]
        assert len(placeholders) == len(CONTRACTS)
    with pytest.raises(duckdb.IOException, match=r"No such file|No files found"):
        straddled(tmp_path, BEST_LIMIT, listed["contract"], listed["day"])
    assert rows(tmp_path) == before


def test_a_day_file_with_an_unknown_column_leaves_its_date_alone(tmp_path: Path) -> None:
    """A column the schema does not know: the date is not touched; one lacking a column: nulls."""
    three_flushes(tmp_path)
    path = write_day_file(tmp_path, AGGREGATE, {"1001": range(1, 3)})
    data = pq.read_table(path, partitioning=None)
    pq.write_table(data.append_column("surprise", pa.array([1] * data.num_rows)), path)
    older = write_day_file(tmp_path, AGGREGATE, {"1002": range(5, 7)}, date(2025, 3, 2))
    data = pq.read_table(older, partitioning=None)
    pq.write_table(data.drop_columns(["previous_close"]), older)
    before = {p: p.stat().st_ino for p in tmp_path.glob("aggregate/date=2025-03-01/**/*")}

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False)

    assert result.problems == [
        f"aggregate/date={DAY}: foreign, overlapping or unknown-column files"
    ]
    assert {p: p.stat().st_ino for p in tmp_path.glob("aggregate/date=2025-03-01/**/*")} == before
    assert folder_files(tmp_path)[contract_folder("1001")] == [file_name(1, 30, "c")]
    folded = tmp_path / "aggregate/date=2025-03-02" / contract_folder("1002") / file_name(5, 6, "c")
    closes = pq.read_table(folded, partitioning=None).column("previous_close").to_pylist()
    assert closes == [None, None]


def test_seq_ranges_of_new_files_cover_every_day_file(tmp_path: Path) -> None:
    """A contract with rows in the last day file only is still named from the first one."""
    three_flushes(tmp_path)
    compact(tmp_path, TEHRAN, now=FUTURE, bar=False)
    span = seq_range(folder_files(tmp_path)[contract_folder("1005")][0])
    assert span == (1, 30)
