"""The ``date`` layout: each closed date of a table compacted into one file, ordered by hour."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recorder.accounting import verify
from recorder.buffer import Key
from recorder.catalog import day_glob, layered_sql, packed_day_glob, table_glob
from recorder.compaction import AutoCompaction, compact
from recorder.compactor import Compactor, Outcome
from recorder.config import load_config
from recorder.dayfold import plan_day
from recorder.daywrite import cut, row_groups
from recorder.errors import ConfigError
from recorder.folding import list_date
from recorder.packing import CONTRACTS_KEY, ROW_GROUP_ROWS
from recorder.paths import file_name
from recorder.schema import TABLES, Table
from recorder.store import Store
from recorder.storefiles import PACKED
from tests.test_compaction import (
    FUTURE,
    TEHRAN,
    Crash,
    assert_no_leftovers,
    checksums,
    crash_at,
    multiday,  # noqa: F401 (the fixture, by name)
    partitions,
    recovery_marks,
    refuse,
)
from tests.test_compaction_days import (
    AGGREGATE,
    BEST_LIMIT,
    CONTRACTS,
    DAY,
    NOON_US,
    contract_folder,
    crash_mid_fold,
    flush_during,
    folder_files,
    rows,
    three_flushes,
    write_day_file,
)
from tests.test_config import ONE_CONTRACT
from tests.test_daemon import RECORDER
from tests.test_merge import DAY_OPEN, merge_open

DATE_LAYOUT_STEPS = ["staged", "verified", "locked", "exchanged", "cleaned"]
FALLBACK_STEPS = ["staged", "verified", "locked", "linked", "unlinked", "cleaned"]
ONE_FILE = {".": [file_name(1, 30, "c")]}


def date_compactor(data_dir: Path, **options: Any) -> Compactor:
    return Compactor(data_dir, layout="date", **options)


def spread_over_hours(data_dir: Path, table: Table = BEST_LIMIT) -> None:
    """Give the day files' frames times over five hours, out of seq order (seq % 5 hours, then
    minutes going back as seq grows), so that the hour, not the seq, leads the order."""
    for path in (data_dir / table.name / f"date={DAY}").glob("*.parquet"):
        data = pq.read_table(path, partitioning=None)
        seq = data.column("seq").to_numpy()
        micros = NOON_US + (seq % 5) * 3_600_000_000 + (60 - seq) * 60_000_000
        stamps = pa.array(micros, pa.int64()).cast(data.schema.field("exchange_ts").type)
        data = data.set_column(0, data.schema.field(0), stamps)
        assert data.schema.names[0] == "exchange_ts"
        pq.write_table(data, path, row_group_size=4)


def sort_key(data: pa.Table) -> list[tuple[Any, ...]]:
    """(hour, contract, exchange_ts, seq, level) of each row, in file order."""
    hours = pc.divide(data.column("exchange_ts").cast(pa.int64()), 3_600_000_000).to_pylist()
    columns = [data.column(k).to_pylist() for k in ("contract", "exchange_ts", "seq", "level")]
    return list(zip(hours, *columns, strict=True))


def test_a_date_folds_into_one_file_per_table_ordered_by_hour_then_contract(
    tmp_path: Path,
) -> None:
    """Three day files, five contracts over five hours: one compacted day file named by the
    range of every day file, the rows in (hour, contract, exchange_ts, seq) order, the levels
    of a frame in theirs, the same rows in the views and the same recovery marks; a second
    run changes nothing."""
    three_flushes(tmp_path)
    spread_over_hours(tmp_path)
    before, marks = rows(tmp_path), recovery_marks(tmp_path)
    assert len(before) == 3 * 27

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))

    assert result.ok
    assert (result.compacted, result.files_before, result.rows) == (1, 3, 3 * 27)
    assert folder_files(tmp_path) == ONE_FILE
    assert rows(tmp_path) == before
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)
    path = tmp_path / "best_limit" / f"date={DAY}" / file_name(1, 30, "c")
    data = pq.read_table(path, partitioning=None)
    assert data.schema.names == BEST_LIMIT.packed_day_schema.names
    keys = sort_key(data)
    assert keys == sorted(keys)
    assert len({k[0] for k in keys}) == 5
    assert [k[2] for k in keys] != sorted(k[2] for k in keys)  # not by time alone
    meta = pq.ParquetFile(path).metadata
    stats = meta.row_group(0).column(data.schema.names.index("contract")).statistics
    assert stats is not None
    assert stats.has_min_max
    for group in range(meta.num_row_groups):  # one hour each
        times = meta.row_group(group).column(0).statistics
        assert times.min.hour == times.max.hour
    assert meta.num_row_groups == 5
    listed = (pq.read_metadata(path).metadata or {})[CONTRACTS_KEY.encode()]
    assert json.loads(listed) == sorted(CONTRACTS)

    inode = path.stat().st_ino
    again = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))
    assert (again.compacted, again.skipped) == (0, 1)
    assert path.stat().st_ino == inode


def test_late_rows_fold_into_a_new_file_of_the_date(tmp_path: Path) -> None:
    """A date compacted in the date layout gets late day files (one of a new contract): the
    next run makes one file of everything, named up to the latest seq."""
    three_flushes(tmp_path)
    compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))
    write_day_file(tmp_path, BEST_LIMIT, {"1002": range(40, 43), "1009": range(41, 44)})
    before, marks = rows(tmp_path), recovery_marks(tmp_path)
    assert folder_files(tmp_path) == {".": [file_name(1, 30, "c"), file_name(40, 43)]}

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))

    assert result.ok
    assert (result.compacted, result.files_before, result.rows) == (1, 2, len(before))
    assert folder_files(tmp_path) == {".": [file_name(1, 43, "c")]}
    assert rows(tmp_path) == before
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)


def test_the_layouts_convert_both_ways_only_when_asked(tmp_path: Path) -> None:
    """A date compacted in one layout stays so under the other, unless ``convert``; then it
    becomes the other layout with the same rows and recovery marks, and back."""
    three_flushes(tmp_path)
    three_flushes(tmp_path, AGGREGATE)
    before = {t: rows(tmp_path, TABLES[t]) for t in ("best_limit", "aggregate")}
    marks = recovery_marks(tmp_path)
    per_contract = {contract_folder(c): [file_name(1, 30, "c")] for c in CONTRACTS}
    assert compact(tmp_path, TEHRAN, now=FUTURE, bar=False).ok
    assert folder_files(tmp_path) == per_contract

    kept = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))
    assert (kept.compacted, kept.skipped) == (0, 2 * len(CONTRACTS))
    assert folder_files(tmp_path) == per_contract

    converted = compact(
        tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path, convert=True)
    )
    assert converted.ok
    assert (converted.compacted, converted.files_before) == (2, 2 * len(CONTRACTS))
    for table in (BEST_LIMIT, AGGREGATE):
        assert folder_files(tmp_path, table) == ONE_FILE
        assert rows(tmp_path, table) == before[table.name]
    assert recovery_marks(tmp_path) == marks

    kept = compact(tmp_path, TEHRAN, now=FUTURE, bar=False)
    assert (kept.compacted, kept.skipped) == (0, 2)
    back = compact(
        tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=Compactor(tmp_path, convert=True)
    )
    assert back.ok
    for table in (BEST_LIMIT, AGGREGATE):
        assert folder_files(tmp_path, table) == per_contract
        assert rows(tmp_path, table) == before[table.name]
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)


@pytest.mark.parametrize(
    ("atomic", "step"),
    [(True, s) for s in DATE_LAYOUT_STEPS] + [(False, s) for s in FALLBACK_STEPS],
)
def test_a_crash_at_any_step_of_a_day_fold_then_a_rerun_gives_the_same_rows(
    tmp_path: Path, atomic: bool, step: str
) -> None:
    """Crashed mid-fold (aggregate, after best_limit folded; aggregate has contract files
    already): recovery's rule holds, the views give every row once (but in the fallback's
    window, where the folded rows show twice), and a rerun leaves one file per table."""
    three_flushes(tmp_path)
    three_flushes(tmp_path, AGGREGATE)
    compact(tmp_path, TEHRAN, days=[DAY], bar=False)  # aggregate's rows in contract files
    for table in (BEST_LIMIT, AGGREGATE):
        write_day_file(tmp_path, table, {"1001": range(40, 42), "1002": range(41, 43)})
    before, marks = crash_mid_fold(tmp_path, step, atomic, layout="date")

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))
    assert result.ok
    for table in (BEST_LIMIT, AGGREGATE):
        assert rows(tmp_path, table) == before[table.name]
        assert folder_files(tmp_path, table) == {".": [file_name(1, 42, "c")]}
    assert recovery_marks(tmp_path) == marks
    assert_no_leftovers(tmp_path)


def test_a_crash_of_the_other_layout_is_repaired_by_a_day_fold(tmp_path: Path) -> None:
    """A fold into contract files crashed without the exchange once its files were in (the
    day files still there, each row shown twice): a day fold leaves out the day rows those
    files hold."""
    three_flushes(tmp_path)
    before = rows(tmp_path)
    crashing = Compactor(tmp_path, on_step=crash_at("linked", 1), swap=refuse)
    with pytest.raises(Crash):
        compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=crashing)
    assert rows(tmp_path) == sorted(before * 2)
    plan = plan_day(list_date(tmp_path / "best_limit" / f"date={DAY}"))
    assert plan is not None
    assert len(plan.covers) == len(CONTRACTS)

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))

    assert result.ok
    assert folder_files(tmp_path) == ONE_FILE
    assert rows(tmp_path) == before
    assert_no_leftovers(tmp_path)


@pytest.mark.parametrize("when", ["verified", "locked"])
def test_a_flush_into_a_date_being_folded_is_not_lost(tmp_path: Path, when: str) -> None:
    """A day file written before the lock makes the fold start over; one written during the
    swap waits for the lock and lands next to the new file."""
    three_flushes(tmp_path)
    flush_now, flushes = flush_during(tmp_path, when)
    compactor = date_compactor(tmp_path, on_step=flush_now)
    first = next(p for p in compactor.partitions(lambda d: True) if p.key[0] == "best_limit")
    outcome = compactor.compact(first).outcome
    flushes[0].join()
    assert len(rows(tmp_path)) == 3 * (27 + 4)
    if when == "locked":
        assert outcome is Outcome.COMPACTED
        assert folder_files(tmp_path) == {".": [file_name(1, 30, "c"), file_name(70, 72)]}
    else:
        assert outcome is Outcome.CHANGED
        assert len(folder_files(tmp_path)["."]) == 4
    expected = rows(tmp_path)
    assert compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path)).ok
    assert folder_files(tmp_path) == {".": [file_name(1, 72, "c")]}
    assert rows(tmp_path) == expected


def test_a_foreign_file_leaves_the_date_alone(tmp_path: Path) -> None:
    """A file compaction did not write (a name without seqs) is never folded away."""
    three_flushes(tmp_path)
    folder = tmp_path / "best_limit" / f"date={DAY}"
    (folder / "notes.txt").write_text("mine")
    before = folder_files(tmp_path)

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))

    assert not result.ok
    assert len(result.problems) == 1
    assert folder_files(tmp_path) == before
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_merge_leaves_a_compacted_day_file_as_it_is(tmp_path: Path) -> None:
    """A date compacted while still open (``compact --date``) merges only its later flushes."""
    three_flushes(tmp_path)
    compact(tmp_path, TEHRAN, days=[DAY], bar=False, compactor=date_compactor(tmp_path))
    write_day_file(tmp_path, BEST_LIMIT, {"1001": range(40, 42)})
    write_day_file(tmp_path, BEST_LIMIT, {"1002": range(43, 45)})
    before = rows(tmp_path)

    assert merge_open(tmp_path, now=DAY_OPEN).dates == 1

    assert folder_files(tmp_path) == {".": [file_name(1, 30, "c"), file_name(40, 44)]}
    assert rows(tmp_path) == before


@pytest.mark.parametrize("late", ["day files", "compacted day files"])
def test_a_query_listing_across_a_day_fold_fails_rather_than_missing_or_doubling_rows(
    tmp_path: Path, late: str
) -> None:
    """A view lists contract files, day files, then compacted day files: a query that listed
    the first kinds before the swap and the last after it opens a file that is gone."""
    three_flushes(tmp_path)
    compact(tmp_path, TEHRAN, days=[DAY], bar=False)  # contract files
    write_day_file(tmp_path, BEST_LIMIT, {"1001": range(40, 42)})
    before = rows(tmp_path)
    globs = {
        "contract": table_glob(tmp_path, BEST_LIMIT),
        "day": day_glob(tmp_path, BEST_LIMIT),
        "packed": packed_day_glob(tmp_path, BEST_LIMIT),
    }
    listed: dict[str, list[str]] = {}

    def at(step: str, key: Key) -> None:
        if key[0] != "best_limit" or step not in ("locked", "exchanged"):
            return
        after = ["packed"] if late == "compacted day files" else ["day", "packed"]
        for kind, pattern in globs.items():
            if (kind in after) == (step == "exchanged"):
                listed[kind] = sorted(str(p) for p in Path("/").glob(pattern.lstrip("/")))

    compactor = date_compactor(tmp_path, on_step=at)
    assert compact(tmp_path, TEHRAN, days=[DAY], bar=False, compactor=compactor).ok
    assert len(listed["contract"]) == len(CONTRACTS)
    assert len(listed["packed"]) == 1
    con = duckdb.connect()
    sources = {k: repr(v) if v else None for k, v in listed.items()}
    select = layered_sql(
        BEST_LIMIT, sources["contract"], sources["day"], False, packed_day_source=sources["packed"]
    )
    with pytest.raises(duckdb.IOException, match=r"No such file|No files found"):
        con.execute(f"SELECT count(*) FROM ({select})").fetchall()
    con.close()
    assert rows(tmp_path) == before


def test_readers_take_a_compacted_day_files_contracts_from_its_footer(tmp_path: Path) -> None:
    """The footer's list is what readers take (here made to differ from the rows: a file
    written otherwise falls back to reading its ``contract`` column)."""
    three_flushes(tmp_path)
    compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))
    path = tmp_path / "best_limit" / f"date={DAY}" / file_name(1, 30, "c")
    data = pq.read_table(path, partitioning=None)
    told, plain = path.with_name(file_name(1, 31, "c")), path.with_name(file_name(1, 32, "c"))
    pq.write_table(data.replace_schema_metadata({CONTRACTS_KEY: '["9999"]'}), told)
    pq.write_table(data.replace_schema_metadata(None), plain)
    assert PACKED.of(told) == {"9999"}
    assert PACKED.of(plain) == set(CONTRACTS)
    assert PACKED.of(path.with_name(file_name(1, 33, "c"))) is None  # no such file


def test_row_groups_hold_one_hour_and_a_contracts_hour_where_it_fits() -> None:
    """Cuts at each change of hour, else at the last change of contract that fits in a group,
    else after a full group (a contract's hour longer than one)."""
    runs = [(0, "A", 10_000), (0, "B", 10_000), (0, "C", 20_000), (1, "A", 100)]
    hours = [h for h, _, n in runs for _ in range(n)]
    data = pa.table(
        {
            "exchange_ts": pa.array(
                [NOON_US + h * 3_600_000_000 + i for i, h in enumerate(hours)], pa.int64()
            ).cast(pa.timestamp("us", "UTC")),
            "contract": [c for _, c, n in runs for _ in range(n)],
        }
    )
    reader = pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=7_000))
    groups = list(row_groups(reader, data.schema))
    assert ROW_GROUP_ROWS == 16_384
    assert [g.num_rows for g in groups] == [10_000, 10_000, 16_384, 3_616, 100]
    assert pa.concat_tables(groups).equals(data)
    assert cut(data.slice(0, 0)) == 0


def test_a_day_row_without_a_contract_leaves_the_date_alone(tmp_path: Path) -> None:
    three_flushes(tmp_path)
    path = write_day_file(tmp_path, BEST_LIMIT, {"1001": range(40, 42)})
    data = pq.read_table(path, partitioning=None)
    where = data.schema.get_field_index("contract")
    pq.write_table(data.set_column(where, "contract", pa.nulls(data.num_rows, pa.string())), path)
    before = folder_files(tmp_path)

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(tmp_path))

    assert len(result.problems) == 1
    assert folder_files(tmp_path) == before
    assert_no_leftovers(tmp_path)


# ----------------------------------------------------------------- a recorded store, both ways


@pytest.fixture
def both(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The multi-day store recorded from the simulator (tests.test_compaction's fixture),
    and copies of it compacted in each layout."""
    recorded: Path = request.getfixturevalue("multiday")
    by_contract, by_date = tmp_path / "contract", tmp_path / "date"
    shutil.copytree(recorded, by_contract)
    shutil.copytree(recorded, by_date)
    assert compact(by_contract, TEHRAN, now=FUTURE, bar=False).ok
    result = compact(by_date, TEHRAN, now=FUTURE, bar=False, compactor=date_compactor(by_date))
    assert result.ok
    return recorded, by_contract, by_date


def test_a_recorded_store_gives_the_same_answers_in_both_layouts(
    both: tuple[Path, Path, Path],
) -> None:
    """Every table's counts and checksums, one contract's rows, the as-of state, bars and
    the replay are the same from either layout; the date layout holds one file per table
    partitioned by contract and date; verify finds every frame."""
    recorded, by_contract, by_date = both
    assert checksums(by_date) == checksums(recorded) == checksums(by_contract)
    folders = partitions(by_date)
    for folder, names in folders.items():
        if TABLES[folder.parts[0]].by_contract and len(folder.parts) == 2:
            assert [n.endswith(".c.parquet") for n in names] == [True], folder
    assert not [f for f in folders if "contract=" in str(f)]
    assert verify(by_date).ok

    with Store(by_contract, TEHRAN) as one, Store(by_date, TEHRAN) as other:
        contracts = one.contracts()
        assert contracts == other.contracts()
        assert len(contracts) == 3
        days = sorted({d for d in one.table("aggregate").column("date").to_pylist()})
        assert len(days) >= 3
        middle = datetime.combine(days[1], datetime.min.time(), TEHRAN) + timedelta(hours=12)
        for table in ("aggregate", "best_limit", "contract_info"):
            mine = one.table(table, contracts=[contracts[1]])
            assert mine.num_rows > 0
            assert other.table(table, contracts=[contracts[1]]).equals(mine)
        asof = one.asof(middle)
        assert asof.num_rows == 3
        assert other.asof(middle).equals(asof)
        start, end = middle - timedelta(hours=6), middle + timedelta(hours=6)
        bars = one.bars("10 minutes", contracts=[contracts[0]], start=start, end=end)
        assert bars.num_rows > 0
        assert other.bars("10 minutes", contracts=[contracts[0]], start=start, end=end).equals(bars)
        replayed = list(one.replay(contracts, start, end))
        assert len(replayed) > 100
        assert list(other.replay(contracts, start, end)) == replayed


# ------------------------------------------------------------------ the key and the command


def test_the_layout_key_takes_contract_or_date(tmp_path: Path) -> None:
    path = tmp_path / "recorder.toml"
    path.write_text('[compaction]\nlayout = "date"\n')
    assert load_config(path, ONE_CONTRACT).compaction.layout == "date"
    assert load_config(None, ONE_CONTRACT).compaction.layout == "contract"
    path.write_text('[compaction]\nlayout = "hourly"\n')
    with pytest.raises(ConfigError, match=r"compaction\.layout"):
        load_config(path, ONE_CONTRACT)


def test_the_daemon_compacts_in_the_configured_layout(tmp_path: Path) -> None:
    """The daemon's pass (AutoCompaction) folds a closed date into one file per table."""
    three_flushes(tmp_path)
    AutoCompaction(tmp_path, TEHRAN, 0.0, layout="date")._pass()
    assert folder_files(tmp_path) == ONE_FILE


def test_cli_compact_takes_the_recordings_config(tmp_path: Path) -> None:
    """``--config``: the data directory, time zone and layout of the recording's config."""
    data_dir = tmp_path / "data"
    three_flushes(data_dir)
    config = tmp_path / "recorder.toml"
    config.write_text(
        '[feed]\ncontracts = ["1001"]\n'
        f'[storage]\ndata_dir = "{data_dir}"\npartition_timezone = "Asia/Tehran"\n'
        '[compaction]\nlayout = "date"\n'
    )
    run = subprocess.run(
        [RECORDER, "compact", "--config", str(config)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("compacted 1 partition(s)")
    assert folder_files(data_dir) == ONE_FILE

    config.write_text('[compaction]\nlayout = "hourly"\n')
    wrong = subprocess.run(
        [RECORDER, "compact", "--config", str(config)], capture_output=True, text=True, check=False
    )
    assert wrong.returncode == 2
    assert "compaction.layout" in wrong.stderr


def test_cli_compact_takes_the_layout_and_converts_when_asked(tmp_path: Path) -> None:
    three_flushes(tmp_path)
    before = rows(tmp_path)
    command = [RECORDER, "compact", "--data-dir", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert len(folder_files(tmp_path)) == len(CONTRACTS)

    kept = subprocess.run([*command, "--layout", "date"], capture_output=True, text=True)
    assert kept.returncode == 0, kept.stderr
    assert "compacted 0 partition(s)" in kept.stdout
    moved = subprocess.run(
        [*command, "--layout", "date", "--convert"], capture_output=True, text=True, check=False
    )
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.startswith("compacted 1 partition(s)")
    assert folder_files(tmp_path) == ONE_FILE
    assert rows(tmp_path) == before
