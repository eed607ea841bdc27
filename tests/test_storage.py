"""Storage on a real disk: zstd Parquet files, the DuckDB views over them and the seq counter."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import recorder
from recorder.buffer import Batch
from recorder.errors import StorageError
from recorder.schema import RECEIVED_DELAY_COLUMN, TABLES
from recorder.state import STATE_DIR, SeqAllocator, max_seq_on_disk
from recorder.writer import ParquetWriter

DAY = "2026-05-29"
NOON_US = 1_780_056_000_000_000  # 2026-05-29T12:00:00Z
#: DuckDB's DESCRIBE name of each schema type
DESCRIBED = {"TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE"}


def instant(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def files_under(root: Path) -> list[Path]:
    """Every file below root (hidden ones included), relative, sorted."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def parquet_files(root: Path) -> list[Path]:
    return [p for p in files_under(root) if p.parts[0] != STATE_DIR]


#: per table: the file-column rows of one batch (seq 11..) and the view rows they read back as
SAMPLES: dict[str, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {
    "best_limit": (
        [
            (NOON_US, NOON_US + 250, 11, 1, 150, 245000.0, 100, 246000.0),
            (NOON_US, NOON_US + 250, 11, 2, 120, 244500.5, 90, 246500.0),
            (NOON_US + 1, NOON_US + 900, 12, 1, 0, 0.0, None, None),
        ],
        [
            (instant(NOON_US), instant(NOON_US + 250), 11, 1, 150, 245000.0, 100, 246000.0),
            (instant(NOON_US), instant(NOON_US + 250), 11, 2, 120, 244500.5, 90, 246500.0),
            (instant(NOON_US + 1), instant(NOON_US + 900), 12, 1, 0, 0.0, None, None),
        ],
    ),
    "aggregate": (
        [
            (NOON_US, NOON_US + 5, 11, date(2026, 5, 29), time(12, 0, 0), 120, 4500,
             1102500000, 245500.0, 245700.0, 244000.0, 247000.0, 244500.0, 243000.0),
            (NOON_US + 7, NOON_US + 9, 12, None, None, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        ],
        [
            (instant(NOON_US), instant(NOON_US + 5), 11, date(2026, 5, 29), time(12, 0, 0), 120,
             4500, 1102500000, 245500.0, 245700.0, 244000.0, 247000.0, 244500.0, 243000.0),
            (instant(NOON_US + 7), instant(NOON_US + 9), 12, None, None, 0, 0, 0, 0.0, 0.0, 0.0,
             0.0, 0.0, 0.0),
        ],
    ),
    "allowed_price_range": (
        [(NOON_US, NOON_US + 1, 11, 220000.0, 270000.25)],
        [(instant(NOON_US), instant(NOON_US + 1), 11, 220000.0, 270000.25)],
    ),
    "contract_info": (
        [(NOON_US, NOON_US + 1, 11, 2**63 - 1, -(2**63))],
        [(instant(NOON_US), instant(NOON_US + 1), 11, 2**63 - 1, -(2**63))],
    ),
    "extras": (
        [
            (NOON_US, NOON_US + 1, 11, "OrderBook", None, '{"bids":[]}'),
            (NOON_US, NOON_US + 1, 11, "BestLimit", "2", '{"orders":4}'),
        ],
        [  # ordered by seq, section
            (instant(NOON_US), instant(NOON_US + 1), 11, "BestLimit", "2", '{"orders":4}'),
            (instant(NOON_US), instant(NOON_US + 1), 11, "OrderBook", None, '{"bids":[]}'),
        ],
    ),
}  # fmt: skip


# tables with a `source` column get "stream" at the end of every sample row
for _name, (_written, _read) in SAMPLES.items():
    if "source" in [c.name for c in TABLES[_name].columns]:
        SAMPLES[_name] = ([(*r, "stream") for r in _written], [(*r, "stream") for r in _read])


#: the ORDER BY that lists each table's sample rows in the order written above
ORDER = {"best_limit": "seq, level", "extras": "seq, section"}


def select_all(con: Any, table: str) -> list[tuple[Any, ...]]:
    """Every row of a view, columns in schema order."""
    columns = ", ".join(c.name for c in TABLES[table].columns)
    order = ORDER.get(table, "seq")
    return con.execute(f"SELECT {columns} FROM {table} ORDER BY {order}").fetchall()


def test_write_creates_exactly_one_zstd_file_at_the_partition_path(tmp_path: Path) -> None:
    """A batch becomes one zstd Parquet file named by its seq range, with no temporary left."""
    writer = ParquetWriter(tmp_path)
    rows = SAMPLES["best_limit"][0]

    written = writer.write(Batch(("best_limit", DAY, "1001"), rows))

    relative = Path(
        "best_limit/date=2026-05-29/contract=1001/00000000000000000011-00000000000000000012.parquet"
    )
    assert files_under(tmp_path) == [relative]
    assert written.path == tmp_path.resolve() / relative
    assert (written.table, written.rows, written.bytes) == (
        "best_limit",
        3,
        (tmp_path / relative).stat().st_size,
    )
    metadata = pq.ParquetFile(tmp_path / relative).metadata
    group = metadata.row_group(0)
    assert (metadata.num_rows, metadata.num_row_groups) == (3, 1)
    assert group.column(0).compression == "ZSTD"
    assert {group.column(i).compression for i in range(metadata.num_columns)} == {"ZSTD"}


@pytest.mark.parametrize("table", list(SAMPLES))
def test_file_holds_the_file_columns_only(tmp_path: Path, table: str) -> None:
    """A contract file has the table's contract-file schema: partition columns live in folder
    names, and ``received_at`` is held as microseconds after ``exchange_ts``."""
    written = ParquetWriter(tmp_path, fsync=False).write(
        Batch((table, DAY, "1001"), SAMPLES[table][0])
    )

    schema = pq.read_schema(written.path).remove_metadata()
    assert schema == TABLES[table].contract_schema
    assert (RECEIVED_DELAY_COLUMN in schema.names) == ("exchange_ts" in schema.names)


@pytest.mark.parametrize("table", list(SAMPLES))
def test_view_reads_back_every_column_written(tmp_path: Path, table: str) -> None:
    """The DuckDB view returns exactly the rows written, with contract and date from the path."""
    rows, expected = SAMPLES[table]
    ParquetWriter(tmp_path, fsync=False).write(Batch((table, DAY, "012345"), rows))

    found = select_all(recorder.connect(tmp_path), table)

    assert found == [("012345", date(2026, 5, 29), *row) for row in expected]


def test_view_gathers_every_file_of_every_partition(tmp_path: Path) -> None:
    """Files of several dates and contracts, and several files per partition, are all read."""
    writer = ParquetWriter(tmp_path, fsync=False)
    layout = [("2026-05-29", "1001", 1), ("2026-05-29", "1001", 2), ("2026-05-30", "1001", 3),
              ("2026-05-29", "1002", 4)]  # fmt: skip
    for day, contract, seq in layout:
        writer.write(
            Batch(("contract_info", day, contract), [(NOON_US, NOON_US, seq, seq, 0, "stream")])
        )

    con = recorder.connect(tmp_path)
    found = con.execute(
        "SELECT strftime(date, '%Y-%m-%d'), contract, seq, open_interest FROM contract_info "
        "ORDER BY seq"
    ).fetchall()

    assert found == [(day, contract, seq, seq) for day, contract, seq in layout]
    assert len(parquet_files(tmp_path)) == 4


ODD_CONTRACTS = [
    "012345",
    "0",
    "1001",
    "a/b",
    "..",
    ".",
    "../../etc",
    "سکه-طلا",
    "a b%c=d~e+f",
    "a%2Fb",
    "contract=1",
    "NULL",
    "true",
    "1e3",
    "'; DROP TABLE x; --",
]


def test_partition_columns_are_typed_and_contracts_round_trip(tmp_path: Path) -> None:
    """date is DATE and contract VARCHAR; every contract reads back exactly as written."""
    writer = ParquetWriter(tmp_path, fsync=False)
    for seq, contract in enumerate(ODD_CONTRACTS, start=1):
        writer.write(
            Batch(("contract_info", DAY, contract), [(NOON_US, NOON_US, seq, seq, 0, "stream")])
        )

    con = recorder.connect(tmp_path)
    found = con.execute(
        "SELECT contract, date, typeof(contract), typeof(date) FROM contract_info ORDER BY seq"
    ).fetchall()

    assert found == [(c, date(2026, 5, 29), "VARCHAR", "DATE") for c in ODD_CONTRACTS]
    assert all(p.is_relative_to("contract_info") for p in parquet_files(tmp_path))
    assert len(parquet_files(tmp_path)) == len(ODD_CONTRACTS)


def test_contract_named_like_the_hive_null_marker_round_trips(tmp_path: Path) -> None:
    """A contract named __HIVE_DEFAULT_PARTITION__ reads back as that name, not as NULL."""
    contract = "__HIVE_DEFAULT_PARTITION__"
    batch = Batch(("contract_info", DAY, contract), [(NOON_US, NOON_US, 1, 1, 0, "stream")])
    ParquetWriter(tmp_path, fsync=False).write(batch)

    found = recorder.connect(tmp_path).execute("SELECT contract FROM contract_info").fetchall()

    assert found == [(contract,)]


@pytest.mark.parametrize("with_other_files", [False, True])
@pytest.mark.parametrize("table", list(TABLES))
def test_table_without_files_is_an_empty_view_with_the_schema_columns(
    tmp_path: Path, table: str, with_other_files: bool
) -> None:
    """A table with no file yet is an empty view whose columns are the schema's, in order."""
    if with_other_files:
        other = "aggregate" if table == "best_limit" else "best_limit"
        ParquetWriter(tmp_path, fsync=False).write(Batch((other, DAY, "1001"), SAMPLES[other][0]))
    con = recorder.connect(tmp_path)

    described = con.execute(f"DESCRIBE {table}").fetchall()

    assert [(name, kind) for name, kind, *_ in described] == [
        (c.name, DESCRIBED.get(c.type, c.type)) for c in TABLES[table].columns
    ]
    assert con.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_quarantine_is_partitioned_by_date_only(tmp_path: Path) -> None:
    """Quarantine files live in quarantine/date=D/ and read back whole through the view."""
    rows = [
        (NOON_US, 5, "conn-1", "frame: not JSON (unexpected character)", "not json"),
        (NOON_US + 3, 6, "conn-2", "data.BestLimit.1.buy_price: '1' is bad", '{"x": "\u00e9"}'),
    ]

    written = ParquetWriter(tmp_path).write(Batch(("quarantine", DAY, None), rows))

    relative = Path("quarantine/date=2026-05-29/00000000000000000005-00000000000000000006.parquet")
    assert files_under(tmp_path) == [relative]
    assert written.path == tmp_path.resolve() / relative
    assert [c.name for c in TABLES["quarantine"].columns] == [
        "date", "received_at", "seq", "connection", "reason", "raw",
    ]  # fmt: skip
    assert select_all(recorder.connect(tmp_path), "quarantine") == [
        (date(2026, 5, 29), instant(NOON_US), 5, *rows[0][2:]),
        (date(2026, 5, 29), instant(NOON_US + 3), 6, *rows[1][2:]),
    ]


def test_failed_write_raises_storage_error_and_leaves_no_file(tmp_path: Path) -> None:
    """A batch whose values do not fit the schema raises StorageError and writes nothing."""
    bad = [(NOON_US, NOON_US, 1, "not a number", 0, "stream")]

    with pytest.raises(StorageError, match="contract_info"):
        ParquetWriter(tmp_path).write(Batch(("contract_info", DAY, "1001"), bad))

    assert parquet_files(tmp_path) == []


def test_write_into_a_blocked_folder_raises_storage_error(tmp_path: Path) -> None:
    """An OSError on the way (a file where the table folder should be) becomes StorageError."""
    (tmp_path / "contract_info").write_text("not a folder", encoding="utf-8")
    rows = [(NOON_US, NOON_US, 1, 1, 0, "stream")]

    with pytest.raises(StorageError):
        ParquetWriter(tmp_path).write(Batch(("contract_info", DAY, "1001"), rows))

    assert files_under(tmp_path) == [Path("contract_info")]


# --------------------------------------------------------------------------- the seq counter


def test_seq_values_increase_by_one(tmp_path: Path) -> None:
    """A new allocator hands out 1, 2, 3, ... across its block boundaries."""
    seqs = SeqAllocator(tmp_path, block=3)

    assert [seqs.next() for _ in range(8)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert seqs.last == 8


def test_seq_continues_after_close(tmp_path: Path) -> None:
    """After close(), a new allocator on the same directory continues at last + 1."""
    first = SeqAllocator(tmp_path, block=100)
    handed = [first.next() for _ in range(5)]
    first.close()

    second = SeqAllocator(tmp_path, block=100)

    assert handed == [1, 2, 3, 4, 5]
    assert (second.last, second.next(), second.next()) == (5, 6, 7)


@pytest.mark.parametrize(("block", "used", "resumes_at"), [(3, 5, 7), (3, 6, 7), (100, 1, 101)])
def test_seq_never_repeats_after_a_crash(
    tmp_path: Path, block: int, used: int, resumes_at: int
) -> None:
    """Without close() (a crash) the next allocator starts past every value reserved."""
    crashed = SeqAllocator(tmp_path, block=block)
    handed = [crashed.next() for _ in range(used)]
    del crashed  # no close(): the reserved ceiling is all that is on disk

    restarted = SeqAllocator(tmp_path, block=block)
    after = [restarted.next() for _ in range(3)]

    assert handed == list(range(1, used + 1))
    assert after == [resumes_at, resumes_at + 1, resumes_at + 2]
    assert not set(handed) & set(after)


def test_seq_ranges_taken_at_once_are_consecutive_and_reserved_before_use(tmp_path: Path) -> None:
    """``take(n)`` (the frames of one socket read) hands out n values in a row; a range larger
    than the block is reserved whole, so a crash never hands out one of its values again."""
    seqs = SeqAllocator(tmp_path, block=3)
    assert (seqs.take(2), seqs.take(1), seqs.next(), seqs.take(10)) == (1, 3, 4, 5)
    assert seqs.last == 14
    del seqs  # a crash: no close()

    assert SeqAllocator(tmp_path, block=3).next() == 15


def test_seq_starts_after_the_highest_file_without_a_state_file(tmp_path: Path) -> None:
    """With no state file the allocator starts after the highest seq any Parquet file names."""
    writer = ParquetWriter(tmp_path, fsync=False)
    writer.write(Batch(("best_limit", DAY, "1001"), SAMPLES["best_limit"][0]))  # seqs 11..12
    writer.write(
        Batch(("contract_info", "2026-05-30", "a/b"), [(NOON_US, NOON_US, 42, 1, 0, "stream")])
    )
    writer.write(Batch(("quarantine", DAY, None), [(NOON_US, 57, "c", "r", "x")]))
    foreign = tmp_path / "contract_info/date=2026-05-30/contract=a%2Fb"
    (foreign / "99999999999999999999-99999999999999999999.parquet.tmp").write_bytes(b"")
    (foreign / "part-0.parquet").write_bytes(b"")

    assert max_seq_on_disk(tmp_path) == 57
    seqs = SeqAllocator(tmp_path)
    assert seqs.next() == 58


def test_empty_directory_has_no_seq_on_disk(tmp_path: Path) -> None:
    """A data directory without Parquet files has 0 as its highest seq."""
    assert max_seq_on_disk(tmp_path) == 0
    assert max_seq_on_disk(tmp_path / "missing") == 0
