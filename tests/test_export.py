"""Tools for other programs: the DuckDB catalog file, exports to CSV and Parquet, progress."""

from __future__ import annotations

import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

import recorder
from recorder.compaction import compact
from recorder.export import Bound, export, parse_bound, select_files, write_catalog
from recorder.paths import is_day_file
from recorder.progress import progress
from recorder.schema import TABLES
from tests.test_compaction import DAY1, DAY2, TEHRAN, record_multiday
from tests.test_daemon import RECORDER


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-day store with its first date compacted (exports read both kinds of file)."""
    data_dir = tmp_path_factory.mktemp("tools") / "data"
    record_multiday(data_dir)
    compact(data_dir, TEHRAN, days=[DAY1], bar=False)
    return data_dir


def view_names(con: Any) -> list[str]:
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1")
    return [name for (name,) in rows.fetchall()]


def test_catalog_opens_from_anywhere_and_gives_the_same_rows(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`catalog` with a relative --data-dir; the file opens read-only from another directory."""
    output = tmp_path / "out" / "catalog.duckdb"
    output.parent.mkdir()
    done = subprocess.run(
        [RECORDER, "catalog", "--data-dir", store.name, "--output", str(output)],
        cwd=store.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {output}\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    con = duckdb.connect(str(output), read_only=True)
    reference = recorder.connect(store)
    names = view_names(con)
    assert set(TABLES) | {"sessions", "gaps"} <= set(names)
    assert names == view_names(reference)
    for name in names:
        query = f"SELECT * FROM {name} ORDER BY ALL"
        assert con.execute(query).fetchall() == reference.execute(query).fetchall(), name
    assert con.execute("SELECT count(*) FROM aggregate").fetchone()[0] > 600  # type: ignore[index]
    assert not list(output.parent.glob(".*"))


def test_catalog_replaces_an_older_file(store: Path, tmp_path: Path) -> None:
    """Writing the catalog again replaces the file whole (built aside, then renamed)."""
    output = tmp_path / "catalog.duckdb"
    output.write_bytes(b"not a database")
    assert write_catalog(store, output) == output
    con = duckdb.connect(str(output), read_only=True)
    assert con.execute("SELECT count(*) FROM contract_info").fetchone() == (
        recorder.connect(store).execute("SELECT count(*) FROM contract_info").fetchone()
    )


def expected(store: Path, table: str, where: str) -> list[tuple[Any, ...]]:
    """The rows an export must hold, from the views, in the export's order."""
    columns = [c.name for c in TABLES[table].columns]
    time = "exchange_ts" if "exchange_ts" in columns else "received_at"
    order = ", ".join([time, "seq", *(c for c in columns if c not in (time, "seq"))])
    con = recorder.connect(store)
    return con.execute(
        f"SELECT {', '.join(columns)} FROM {table} WHERE {where} ORDER BY {order}"
    ).fetchall()


def read_csv(path: Path, table: str) -> list[tuple[Any, ...]]:
    types = "{" + ", ".join(f"'{c.name}': '{c.type}'" for c in TABLES[table].columns) + "}"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con.execute(
        f"SELECT * FROM read_csv('{path}', header = true, columns = {types})"
    ).fetchall()


def test_cli_export_to_csv_holds_exactly_the_contracts_and_dates_asked_for(
    store: Path, tmp_path: Path
) -> None:
    """Two contracts, dates DAY1..DAY2 inclusive: the CSV holds those rows and no other."""
    output = tmp_path / "agg.csv"
    command = [RECORDER, "export", "--data-dir", str(store), "--table", "aggregate"]
    command += ["--contracts", "1001,1003", "--start", str(DAY1), "--end", str(DAY2)]
    command += ["--format", "csv", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

    rows = expected(
        store, "aggregate", f"contract IN ('1001', '1003') AND date BETWEEN '{DAY1}' AND '{DAY2}'"
    )
    assert len(rows) > 100
    assert {r[0] for r in rows} == {"1001", "1003"}
    assert read_csv(output, "aggregate") == rows
    assert done.stdout == f"wrote {len(rows):,} rows to {output}\n"
    header = output.read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(c.name for c in TABLES["aggregate"].columns)


def test_export_to_parquet_between_two_instants(store: Path, tmp_path: Path) -> None:
    """Naive instants are Tehran time; start inclusive, end exclusive, across a midnight."""
    start = parse_bound("2025-03-01T22:00:00", TEHRAN)
    end = parse_bound("2025-03-02T03:30:00+03:30", TEHRAN)
    assert start.instant == datetime(2025, 3, 1, 18, 30, tzinfo=UTC)
    output = tmp_path / "book.parquet"

    count = export(store, "best_limit", output, "parquet", start=start, end=end, bar=False)

    rows = expected(
        store,
        "best_limit",
        "exchange_ts >= TIMESTAMPTZ '2025-03-01 18:30:00+00' "
        "AND exchange_ts < TIMESTAMPTZ '2025-03-02 00:00:00+00'",
    )
    assert {r[1] for r in rows} == {DAY1, DAY2}
    assert count == len(rows) > 100
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    columns = ", ".join(c.name for c in TABLES["best_limit"].columns)
    assert con.execute(f"SELECT {columns} FROM '{output}'").fetchall() == rows
    assert pq.ParquetFile(output).metadata.row_group(0).column(0).compression == "ZSTD"


def test_only_the_partitions_in_range_are_read(store: Path, tmp_path: Path) -> None:
    """Contract and date filters pick folders (and every day file of the dates, whose rows the
    export filters); an instant widens the dates by a day each side."""
    table = TABLES["best_limit"]
    picked = select_files(store, table, ["1002"], Bound(DAY2), Bound(DAY2))
    day_folder = store / "best_limit" / f"date={DAY2}"
    contract_files = sorted((day_folder / "contract=1002").glob("*.parquet"))
    day_files = sorted(day_folder.glob("*.parquet"))  # DAY2 is not compacted: as flushed
    assert picked == contract_files + day_files
    assert len(day_files) > 3

    noon = datetime(2025, 3, 2, 12, tzinfo=TEHRAN)
    around = select_files(store, table, None, Bound(DAY2, noon), Bound(DAY2, noon))
    days = {(p.parent if is_day_file(p) else p.parent.parent).name for p in around}
    assert days == {f"date={d}" for d in (DAY1, DAY2, DAY2 + timedelta(days=1))}
    nobody = select_files(store, table, ["nope"], None, None)
    assert nobody == sorted(store.glob("best_limit/*/*.parquet"))  # day files only
    assert export(store, "best_limit", tmp_path / "nope.csv", "csv", contracts=["nope"]) == 0


def test_an_empty_selection_writes_the_header_only(store: Path, tmp_path: Path) -> None:
    """No partition in range: a valid CSV with the column names and no row."""
    output = tmp_path / "none.csv"
    bound = Bound(date(2020, 1, 1))
    assert export(store, "aggregate", output, "csv", start=bound, end=bound, bar=False) == 0
    header = ",".join(c.name for c in TABLES["aggregate"].columns)
    assert output.read_text(encoding="utf-8").splitlines() == [header]


def test_progress_writes_log_lines_off_a_terminal() -> None:
    """Without a terminal: a start line, at most one line per interval, and an end line."""
    with (
        capture_logs() as logs,
        progress(10, "compacting", unit="partitions", bar=False, every=0) as advance,
    ):
        for _ in range(10):
            advance(1)
    assert logs[0]["event"] == "compacting started"
    assert logs[0]["total"] == 10
    assert [e["done"] for e in logs[1:-1]] == list(range(1, 11))
    assert logs[-1]["event"] == "compacting done"
    assert logs[-1]["done"] == 10


def test_progress_draws_a_bar_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    """bar=True draws a rich progress bar with the description and the count on stderr."""
    with progress(4, "compacting", unit="partitions", bar=True) as advance:
        advance(4)
    err = capsys.readouterr().err
    assert "compacting" in err
    assert "4/4 partitions" in err
    assert "100%" in err
