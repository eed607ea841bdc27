"""Compaction on real recordings: one sorted file per partition, the same rows, crash-safe."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recorder
from recorder.accounting import verify
from recorder.buffer import Batch, Key
from recorder.compaction import closed_dates_end, compact, next_pass
from recorder.compactor import Compactor, exchange
from recorder.config import CompactionConfig, load_config
from recorder.errors import ConfigError
from recorder.packing import (
    COMPRESSION_LEVEL,
    TRIAL_LEVEL,
    _candidates,
    _chunk_bytes,
    choose_encodings,
    pack_received,
    statistics_columns,
    unpack_received,
)
from recorder.paths import encode_contract, file_name, seq_range
from recorder.recovery import HighWater
from recorder.schema import RECEIVED_DELAY_COLUMN, TABLES
from recorder.simrunner import SimulatorThread
from recorder.simulator import SimulatorOptions
from recorder.writer import ParquetWriter, to_arrow
from tests.conftest import make_config, record_until, wait_for
from tests.test_daemon import RECORDER

TEHRAN = ZoneInfo("Asia/Tehran")
#: 2025-03-02 00:00 in Tehran; the multi-day store starts six hours before it
MIDNIGHT = datetime(2025, 3, 1, 20, 30, tzinfo=UTC)
FUTURE = datetime(2100, 1, 1, tzinfo=UTC)  # a "now" at which every recorded date is closed
DAY1, DAY2 = date(2025, 3, 1), date(2025, 3, 2)


def clock_from_first_message(start: datetime, scale: float) -> Callable[[], datetime]:
    """A simulator clock at ``start`` when first read (its first message), then ``scale``
    times faster than real time: the dates a test records do not depend on how long the
    recorder took to connect (a real second is 11 simulated hours at 40,000)."""
    origin: list[float] = []

    def now() -> datetime:
        if not origin:
            origin.append(time.monotonic())
        return start + timedelta(seconds=(time.monotonic() - origin[0]) * scale)

    return now


def record_multiday(data_dir: Path) -> None:
    """Record three dates from a simulator whose clock runs 40,000 times faster, flushing often."""
    options = SimulatorOptions(
        contracts=3,
        rate=250,
        seed=5,
        malformed=0.02,
        unknown_sections=0.03,
        clock=clock_from_first_message(MIDNIGHT - timedelta(hours=6), 40_000),
    )
    with SimulatorThread(options) as sim:
        config = make_config(sim, data_dir, storage={"flush_interval_seconds": 0.05})
        config = msgspec.structs.replace(config, compaction=CompactionConfig(enabled=False))
        record_until(config, lambda r: len(dates(data_dir)) >= 3 and r.pipeline.stats.frames >= 600)


def dates(data_dir: Path) -> list[str]:
    root = data_dir / "aggregate"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def read_checksums(con: Any, where: str = "") -> dict[str, tuple[int, int]]:
    """Per table: rows, and the sum of a hash of every column of every row (one query)."""
    union = " UNION ALL ".join(
        f"SELECT '{name}', count(*), sum(hash({', '.join(c.name for c in table.columns)})) "
        f"FROM {name} {where}"
        for name, table in TABLES.items()
    )
    return {name: (int(n), int(h or 0)) for name, n, h in con.execute(union).fetchall()}


def checksums(data_dir: Path) -> dict[str, tuple[int, int]]:
    return read_checksums(recorder.connect(data_dir))


def partitions(data_dir: Path) -> dict[Path, list[str]]:
    """Every partition folder (relative) and the Parquet files visible in it: each contract
    folder, and each date folder holding files (day files, for a table partitioned by contract)."""
    found: dict[Path, list[str]] = {}
    for table in TABLES.values():
        patterns = ["date=*", "date=*/contract=*"] if table.by_contract else ["date=*"]
        for pattern in patterns:
            for folder in sorted((data_dir / table.name).glob(pattern)):
                names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".parquet"))
                if names or "contract=" in folder.name or not table.by_contract:
                    found[folder.relative_to(data_dir)] = names
    return dict(sorted(found.items()))


def stored_keys(data_dir: Path) -> dict[Key, list[int]]:
    """Every (table, date, contract) holding rows (contract None: a table not partitioned by
    contract), and the seqs of its rows, read through the views."""
    con = recorder.connect(data_dir)
    keys: dict[Key, list[int]] = {}
    for name, table in TABLES.items():
        contract = "contract" if table.by_contract else "NULL"
        query = f"SELECT date::VARCHAR, {contract}, list(seq) FROM {name} GROUP BY ALL"
        for day, who, seqs in con.execute(query).fetchall():
            keys[(name, day, who)] = seqs
    con.close()
    return keys


def recovery_marks(data_dir: Path) -> dict[Key, int]:
    """Per (table, date, contract) holding rows, the highest seq recovery takes as stored
    there (recorder.recovery.HighWater); every stored row's seq is at or below it."""
    water = HighWater(data_dir)
    marks = {}
    for key, seqs in stored_keys(data_dir).items():
        marks[key] = water.get(key)
        assert max(seqs) <= marks[key], key
    return marks


def high_water(files: dict[Path, list[str]]) -> dict[Path, int]:
    """The highest seq named in each partition's files."""
    return {p: max(_last_seq(n) for n in names) for p, names in files.items() if names}


def _last_seq(name: str) -> int:
    span = seq_range(name)
    assert span is not None, name
    return span[1]


def compacted(names: list[str]) -> bool:
    """True when a partition holds exactly one compacted file."""
    return len(names) == 1 and names[0].endswith(".c.parquet")


def assert_no_leftovers(data_dir: Path) -> None:
    assert not (data_dir / "_state" / "compaction").exists()
    assert not [p for p in data_dir.glob("*/date=*/**/*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def multiday(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine multi-day store, recorded once per module; tests compact copies of it."""
    data_dir = tmp_path_factory.mktemp("multiday") / "data"
    record_multiday(data_dir)
    return data_dir


@pytest.fixture
def store(multiday: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(multiday, copy)
    return copy


def expected_compacted(data_dir: Path) -> dict[Path, list[str]]:
    """The files compaction leaves: per contract with rows in a date (and per date folder of
    the other tables), one compacted file whose seq range covers its folder's files and every
    day file of its date."""
    found = partitions(data_dir)
    expected = {}
    for (name, day, contract), _ in stored_keys(data_dir).items():
        date_folder = Path(name) / f"date={day}"
        spans = [seq_range(n) for n in found.get(date_folder, [])]
        if contract is None:
            folder = date_folder
        else:
            folder = date_folder / f"contract={encode_contract(contract)}"
            spans += [seq_range(n) for n in found.get(folder, [])]
        first, last = min(s[0] for s in spans if s), max(s[1] for s in spans if s)
        expected[folder] = [f"{first:020d}-{last:020d}.c.parquet"]
    return dict(sorted(expected.items()))


def test_every_partition_becomes_one_sorted_file_with_the_same_rows(store: Path) -> None:
    """Several dates and contracts, flushed as day files: one file per contract folder (and
    per date of the other tables), same counts and checksums, sorted, no day file left."""
    before_files = partitions(store)
    before = checksums(store)
    before_marks = recovery_marks(store)
    expected = expected_compacted(store)
    assert len(dates(store)) >= 3
    assert sum(len(n) for n in before_files.values()) > 4 * len(before_files)
    assert before["quarantine"][0] > 0
    assert before["extras"][0] > 0
    day_folders = [f for f in before_files if TABLES[f.parts[0]].by_contract]
    assert day_folders
    assert all(len(f.parts) == 2 for f in day_folders)  # the flushes wrote day files only

    result = compact(store, TEHRAN, now=FUTURE, bar=False)

    after_files = partitions(store)
    assert after_files == expected
    assert result.ok
    assert result.compacted == len(expected)
    assert result.files_before == sum(len(n) for n in before_files.values())
    assert result.rows == sum(rows for rows, _ in before.values())
    assert checksums(store) == before
    assert recovery_marks(store) == before_marks
    assert_no_leftovers(store)
    assert verify(store).ok

    for folder, (name,) in after_files.items():
        table = TABLES[folder.parts[0]]
        keys = ["exchange_ts", "seq"] if table.by_contract else ["seq"]
        rows = pq.ParquetFile(store / folder / name).read(columns=keys).to_pylist()
        ordered = [tuple(r[k] for k in keys) for r in rows]
        assert ordered == sorted(ordered), folder

    inodes = {p: p.stat().st_ino for p in store.glob("*/date=*/**/*.parquet")}
    again = compact(store, TEHRAN, now=FUTURE, bar=False)
    assert (again.compacted, again.skipped) == (0, len(after_files))
    assert {p: p.stat().st_ino for p in store.glob("*/date=*/**/*.parquet")} == inodes


def column_types(con: Any, source: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]


def test_compacted_files_are_written_for_size_and_read_back_the_same(store: Path) -> None:
    """No Arrow schema, statistics only on the filter columns, REQUIRED where there is no
    null, the chosen encodings: and every view has the same column types and rows as before."""
    before_con = recorder.connect(store)
    before_types = {name: column_types(before_con, name) for name in TABLES}
    before = read_checksums(before_con)
    before_con.close()

    assert compact(store, TEHRAN, now=FUTURE, bar=False).ok

    con = recorder.connect(store)
    assert {name: column_types(con, name) for name in TABLES} == before_types
    assert read_checksums(con) == before
    encodings: set[str] = set()
    for folder, (name,) in partitions(store).items():
        table = TABLES[folder.parts[0]]
        path = store / folder / name
        # the Parquet types alone give DuckDB the schema's types (TIMESTAMPTZ, DATE, TIME, ...);
        # a contract file holds received_at as microseconds after exchange_ts
        kinds = {c.name: c.type for c in table.file_columns} | {RECEIVED_DELAY_COLUMN: "BIGINT"}
        nulls = ", ".join(f"NULL::{kinds[n]} AS {n}" for n in table.contract_schema.names)
        expected = column_types(con, f"(SELECT {nulls})")
        assert column_types(con, f"read_parquet('{path}', hive_partitioning = false)") == expected
        parquet = pq.ParquetFile(path)
        assert b"ARROW:schema" not in (parquet.metadata.metadata or {}), folder
        data = parquet.read()
        times = [n for n in table.contract_schema.names if kinds[n] == "TIMESTAMPTZ"]
        filtered = ["exchange_ts"] if "exchange_ts" in times else times
        assert statistics_columns(data.schema) == filtered, folder
        group = parquet.metadata.row_group(0)
        for index in range(group.num_columns):
            chunk = group.column(index)
            column = chunk.path_in_schema.split(".")[0]
            assert chunk.compression == "ZSTD"
            assert chunk.is_stats_set == (column in filtered), (folder, column)
            field = data.schema.field(column)
            assert field.nullable == (data.column(column).null_count > 0), (folder, column)
            encodings.update(e for e in chunk.encodings if e != "RLE")
    con.close()
    # what the data asked for: PLAIN somewhere, DELTA for the timestamps that only grow
    assert {"PLAIN", "DELTA_BINARY_PACKED"} <= encodings


def test_each_column_gets_the_encoding_that_compresses_it_smallest() -> None:
    """Growing timestamps take DELTA_BINARY_PACKED, a few prices in any order a dictionary;
    every choice is the smallest of the candidates measured."""
    rng = random.Random(7)
    rows = 3000
    start = 1_700_000_000_000_000
    times, now = [], start
    for _ in range(rows):
        now += int(rng.expovariate(1 / 70_000)) + 1
        times.append(now)
    data = pa.table(
        {
            "exchange_ts": pa.array(times, pa.timestamp("us", tz="UTC")),
            "price": pa.array([rng.choice([1250.0, 1260.0, 1270.0, 1280.0]) for _ in times]),
            "quantity": pa.array([rng.randint(1, 300) for _ in times], pa.int64()),
            "source": pa.array(["stream"] * rows),
        }
    )
    chosen = choose_encodings(data, TRIAL_LEVEL)
    assert chosen["exchange_ts"] == "DELTA_BINARY_PACKED"
    assert chosen["price"] == "RLE_DICTIONARY"
    for field in data.schema:
        candidates = _candidates(field.type)
        assert chosen[field.name] in candidates
        sizes = {}
        for encoding in candidates:
            with contextlib.suppress(pa.ArrowNotImplementedError, pa.ArrowInvalid):
                sizes[encoding] = _chunk_bytes(field, data.column(field.name), encoding, 9)
        assert sizes[chosen[field.name]] == min(sizes.values()), field.name


def test_the_receive_lag_gives_received_at_back_and_a_row_without_exchange_ts_is_refused() -> None:
    """pack_received keeps received_at as the lag after exchange_ts (0, negative, 11 days);
    unpack_received adds it back exactly; a table without exchange_ts is left as it is."""
    table = TABLES["aggregate"]
    noon = 1_700_000_000_000_000
    names = [c.name for c in table.file_columns]
    lags = [0, -5, 950_400_000_000]
    rows = [
        tuple({"exchange_ts": noon, "received_at": noon + lag, "seq": i}.get(n) for n in names)
        for i, lag in enumerate(lags)
    ]
    data = to_arrow(table, rows)

    packed = pack_received(table, data)
    assert packed.schema == table.contract_schema
    assert packed[RECEIVED_DELAY_COLUMN].to_pylist() == lags
    assert unpack_received(packed).equals(data)
    quarantine = to_arrow(TABLES["quarantine"], [])
    assert pack_received(TABLES["quarantine"], quarantine) is quarantine
    broken = data.set_column(0, "exchange_ts", pa.nulls(3, data.schema.field(0).type))
    with pytest.raises(ValueError, match="received_at but no exchange_ts"):
        pack_received(table, broken)


def test_the_compaction_level_is_the_one_given(store: Path) -> None:
    """The same partition compacted at zstd level 1 and at the default level (19): the
    default gives the smaller file, with the same rows."""
    sizes, rows = {}, {}
    for level in (1, COMPRESSION_LEVEL):
        copy = store.parent / f"level{level}"
        shutil.copytree(store, copy)
        compact(copy, TEHRAN, days=[DAY2], bar=False, compactor=Compactor(copy, level))
        files = sorted(copy.glob(f"best_limit/date={DAY2}/*/*.c.parquet"))
        assert files
        sizes[level] = sum(p.stat().st_size for p in files)
        rows[level] = checksums(copy)
    assert COMPRESSION_LEVEL == 19
    assert sizes[COMPRESSION_LEVEL] < sizes[1]
    assert rows[1] == rows[COMPRESSION_LEVEL]


@pytest.mark.parametrize(
    ("now", "after_seconds", "first_open"),
    [
        (MIDNIGHT - timedelta(seconds=1), 0, date(2025, 3, 1)),
        (MIDNIGHT, 0, date(2025, 3, 2)),
        (MIDNIGHT + timedelta(seconds=899), 900, date(2025, 3, 1)),
        (MIDNIGHT + timedelta(seconds=900), 900, date(2025, 3, 2)),
    ],
)
def test_a_date_closes_at_local_midnight_plus_the_delay(
    now: datetime, after_seconds: float, first_open: date
) -> None:
    """Tehran midnight is 20:30 UTC; a date counts as closed after_seconds after it."""
    assert closed_dates_end(now, TEHRAN, after_seconds) == first_open


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (MIDNIGHT - timedelta(hours=3), MIDNIGHT + timedelta(seconds=900)),
        (MIDNIGHT + timedelta(seconds=899), MIDNIGHT + timedelta(seconds=900)),
        (MIDNIGHT + timedelta(seconds=900), MIDNIGHT + timedelta(days=1, seconds=900)),
    ],
)
def test_the_daemon_passes_after_each_local_midnight(now: datetime, expected: datetime) -> None:
    """The next automatic pass is the next Tehran midnight plus after_seconds."""
    assert next_pass(now, TEHRAN, 900) == expected


def test_cli_compacts_closed_dates_only_or_the_date_asked_for(store: Path) -> None:
    """By default today's partitions stay as they are; --date compacts that date alone."""
    before = partitions(store)
    today = datetime.now(TEHRAN).date().isoformat()
    assert any(f"date={today}" in str(p) for p in before)  # session_log and quarantine

    picked = subprocess.run(
        [RECORDER, "compact", "--data-dir", str(store), "--date", DAY2.isoformat()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.startswith("compacted ")
    for folder, names in partitions(store).items():
        if f"date={DAY2}" in str(folder):
            assert compacted(names), folder
        else:
            assert names == before[folder], folder

    closed = subprocess.run(
        [RECORDER, "compact", "--data-dir", str(store)], capture_output=True, text=True, check=False
    )
    assert closed.returncode == 0, closed.stderr
    for folder, names in partitions(store).items():
        if f"date={today}" in str(folder):
            assert names == before[folder], folder
        else:
            assert compacted(names), folder


class Crash(BaseException):
    """An injected crash: no handler of the compactor catches it, as with a real kill."""


def crash_at(step: str, nth: int) -> Callable[[str, Key], None]:
    seen: Counter[str] = Counter()

    def hook(name: str, key: Key) -> None:
        seen[name] += 1
        if name == step and seen[name] == nth:
            raise Crash(f"{step} #{nth}")

    return hook


def refuse(a: Path, b: Path) -> bool:
    """A file system without RENAME_EXCHANGE (the compactor falls back to two steps)."""
    return False


EXCHANGE_STEPS = ["staged", "verified", "locked", "exchanged", "cleaned"]
FALLBACK_STEPS = ["staged", "verified", "locked", "linked", "unlinked", "cleaned"]


@pytest.mark.parametrize(
    ("atomic", "step"),
    [(True, s) for s in EXCHANGE_STEPS] + [(False, s) for s in FALLBACK_STEPS],
)
def test_a_crash_at_any_step_of_the_swap_then_a_rerun_gives_the_same_store(
    store: Path, atomic: bool, step: str
) -> None:
    """Crashed mid-swap: the store holds every row once (but for the fallback's window), a
    rerun finishes the job, and no staging folder or covered file is left."""
    before = checksums(store)
    before_marks = recovery_marks(store)
    crashing = Compactor(store, on_step=crash_at(step, 3), swap=exchange if atomic else refuse)
    with pytest.raises(Crash):
        compact(store, TEHRAN, days=[DAY1], bar=False, compactor=crashing)

    assert recovery_marks(store) == before_marks  # recovery's rule holds mid-crash
    if atomic or step != "linked":
        assert checksums(store) == before
    result = compact(store, TEHRAN, days=[DAY1], bar=False)
    assert result.ok
    assert checksums(store) == before
    for folder, names in partitions(store).items():
        if f"date={DAY1}" in str(folder):
            assert compacted(names), folder
    assert_no_leftovers(store)


@pytest.mark.slow
def test_kill_9_of_the_compact_command_then_a_rerun_gives_the_same_store(store: Path) -> None:
    """kill -9 of `ime-recorder compact` at three random instants mid-run, then a full run."""
    before, marks = checksums(store), recovery_marks(store)
    rng = random.Random(4)
    staging = store / "_state" / "compaction"
    command = [RECORDER, "compact", "--data-dir", str(store), "--timezone", "Asia/Tehran"]
    killed_mid_run = 0
    for _ in range(3):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda p=proc: staging.exists() or p.poll() is not None, what="a first swap")
        time.sleep(rng.uniform(0.0, 0.3))  # the random instant of the kill, not a wait
        killed_mid_run += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert recovery_marks(store) == marks
        assert checksums(store) == before
    assert killed_mid_run >= 2
    final = subprocess.run(command, capture_output=True, text=True, check=False)
    assert final.returncode == 0, final.stderr
    assert checksums(store) == before
    today = datetime.now(TEHRAN).date().isoformat()
    for folder, names in partitions(store).items():
        if f"date={today}" not in str(folder):
            assert compacted(names), folder
    assert_no_leftovers(store)


def test_queries_during_compaction_never_see_a_row_twice_or_miss_one(store: Path) -> None:
    """Reads just before and after each swap, and a reader looping in a thread, see one result."""
    day = f"WHERE date = DATE '{DAY1}'"
    # a view reads contract files, or day files, only if the table had one when it was made
    # and fails once its glob matches nothing (see recorder.catalog.view_sql): as in a store
    # that keeps recording, another date is compacted already and a later one has day files
    assert compact(store, TEHRAN, days=[DAY2], bar=False).ok
    for table in TABLES.values():
        if table.by_contract:
            first = min((store / table.name / f"date={DAY1}").glob("*.parquet"))
            (store / table.name / "date=2099-01-01").mkdir()
            shutil.copy(first, store / table.name / "date=2099-01-01" / first.name)

    def read(con: Any) -> dict[str, tuple[int, int]]:
        return read_checksums(con, day)

    step_con = recorder.connect(store)
    expected = read(step_con)
    stepped: list[dict[str, tuple[int, int]]] = []
    swaps: list[Key] = []

    def read_now(step: str, key: Key) -> None:
        if step == "exchanged":
            swaps.append(key)
        if step in ("locked", "exchanged"):  # just before and just after the swap
            stepped.append(read(step_con))

    stop = threading.Event()
    looped: list[dict[str, tuple[int, int]]] = []
    failures: list[str] = []

    def loop() -> None:
        con = recorder.connect(store)
        while not stop.is_set():
            try:
                looped.append(read(con))
            except Exception as exc:  # a file that vanished between glob and open
                failures.append(str(exc))

    reader = threading.Thread(target=loop)
    reader.start()
    try:
        compactor = Compactor(store, on_step=read_now)
        result = compact(store, TEHRAN, days=[DAY1], bar=False, compactor=compactor)
    finally:
        stop.set()
        reader.join()
    assert result.compacted >= 10
    assert sum(key[2] is None for key in swaps) >= 5  # the date folds of DAY1
    assert len(stepped) == 2 * len(swaps)
    assert all(r == expected for r in stepped)
    assert looped, failures[:3]
    # on a failure, say which reads differed, in which tables, and how (seen, expected)
    wrong = [
        (i, {k: (v, expected[k]) for k, v in r.items() if v != expected[k]})
        for i, r in enumerate(looped)
        if r != expected
    ]
    assert not wrong, (len(looped), wrong[:3], failures[:3])


def test_foreign_and_overlapping_files_are_left_alone(tmp_path: Path) -> None:
    """A partition with a file not named by seq, or two overlapping files, is not touched."""
    writer = ParquetWriter(tmp_path, fsync=False)
    noon = 1_700_000_000_000_000
    values = {"exchange_ts": noon, "received_at": noon, "open_interest": 10}
    names = [c.name for c in TABLES["contract_info"].file_columns]
    rows = [tuple({**values, "seq": seq}.get(n) for n in names) for seq in (1, 2, 3)]
    foreign = writer.write(Batch(("contract_info", "2024-01-01", "1001"), rows[:1])).path
    shutil.copy(foreign, foreign.with_name("mine.parquet"))
    writer.write(Batch(("contract_info", "2024-01-02", "1001"), rows[:2]))
    writer.write(Batch(("contract_info", "2024-01-02", "1001"), rows[1:]))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("contract_info/*/*/*.parquet")}

    result = compact(tmp_path, TEHRAN, now=FUTURE, bar=False)

    assert result.compacted == 0
    assert len(result.problems) == 2
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("contract_info/*/*/*.parquet")} == before


def test_a_fallback_crash_on_a_single_file_partition_is_repaired(tmp_path: Path) -> None:
    """One plain file and its compacted copy of the same seq range: the rerun keeps one."""
    writer = ParquetWriter(tmp_path, fsync=False)
    noon = 1_700_000_000_000_000
    names = [c.name for c in TABLES["contract_info"].file_columns]
    values = {"exchange_ts": noon, "received_at": noon, "seq": 5, "open_interest": 3}
    writer.write(
        Batch(("contract_info", "2024-01-01", "1001"), [tuple(values.get(n) for n in names)])
    )
    before = checksums(tmp_path)
    crashing = Compactor(tmp_path, on_step=crash_at("linked", 1), swap=refuse)
    with pytest.raises(Crash):
        compact(tmp_path, TEHRAN, now=FUTURE, bar=False, compactor=crashing)
    folder = Path("contract_info/date=2024-01-01/contract=1001")
    assert [_last_seq(n) for n in partitions(tmp_path)[folder]] == [5, 5]

    assert compact(tmp_path, TEHRAN, now=FUTURE, bar=False).ok
    assert partitions(tmp_path)[folder] == [f"{5:020d}-{5:020d}.c.parquet"]
    assert checksums(tmp_path) == before


def test_files_written_before_the_receive_lag_are_compacted_into_it(tmp_path: Path) -> None:
    """A contract folder holding a file that stores received_at itself (as written before)
    and one that stores the lag is compacted into one file of the lag, with the same rows."""
    writer = ParquetWriter(tmp_path, fsync=False)
    table = TABLES["contract_info"]
    noon = 1_700_000_000_000_000
    names = [c.name for c in table.file_columns]
    values = {"exchange_ts": noon, "open_interest": 3, "source": "stream"}
    old = {**values, "seq": 1, "received_at": noon + 1_234_567}
    new = {**values, "seq": 2, "received_at": noon - 89}
    path = writer.write(
        Batch(("contract_info", "2024-01-01", "1001"), [tuple(new.get(n) for n in names)])
    ).path
    legacy = to_arrow(table, [tuple(old.get(n) for n in names)])
    pq.write_table(legacy, path.with_name(file_name(1, 1)))
    before = checksums(tmp_path)
    con = recorder.connect(tmp_path)
    received = "SELECT seq, epoch_us(received_at) FROM contract_info ORDER BY seq"
    assert con.execute(received).fetchall() == [(1, noon + 1_234_567), (2, noon - 89)]

    assert compact(tmp_path, TEHRAN, now=FUTURE, bar=False).ok
    folder = Path("contract_info/date=2024-01-01/contract=1001")
    assert partitions(tmp_path)[folder] == [file_name(1, 2, "c")]
    stored = pq.read_table(tmp_path / folder / file_name(1, 2, "c"))
    assert stored.column_names == table.contract_schema.names
    assert stored[RECEIVED_DELAY_COLUMN].to_pylist() == [1_234_567, -89]
    assert checksums(tmp_path) == before
    assert recorder.connect(tmp_path).execute(received).fetchall() == [
        (1, noon + 1_234_567),
        (2, noon - 89),
    ]


def test_compaction_keys_are_configurable_from_the_environment() -> None:
    """compaction.enabled and after_seconds come from the file or IME_RECORDER_COMPACTION__*."""
    environ = {
        "IME_RECORDER_FEED__CONTRACTS": "1001",
        "IME_RECORDER_COMPACTION__ENABLED": "false",
        "IME_RECORDER_COMPACTION__AFTER_SECONDS": "60",
    }
    assert load_config(None, environ).compaction == CompactionConfig(False, 60.0)
    with pytest.raises(ConfigError, match=r"compaction\.after_seconds"):
        load_config(None, {**environ, "IME_RECORDER_COMPACTION__AFTER_SECONDS": "-1"})
