"""Accounting of a data directory: ``ime-recorder status`` and ``ime-recorder verify``.

The invariant: every frame received is stored (rows in the data tables or ``extras``) or
quarantined, exactly once: received = stored + quarantined. Rows are counted through the
catalog's views, so a contract's rows count alike in day files (``contract`` a column) and in
contract files (``contract`` the folder); see :mod:`recorder.paths`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from recorder.catalog import connect, table_files
from recorder.errors import FlattenError
from recorder.flatten import flatten
from recorder.journal import Journal
from recorder.records import FRAME, SNAPSHOT
from recorder.schema import DATA_TABLES, TABLES

#: the tables whose rows make a frame "stored"
STORED_TABLES = (*DATA_TABLES, "extras")
#: what makes a row unique within a table, besides seq
_ROW_KEYS = {
    "best_limit": ["level"],
    "extras": ["section", "level"],
    "rejections": ["contract"],
    "reference": ["contract_id"],
}


def _stored_seqs_sql(extra: str = "") -> str:
    return " UNION ".join(f"SELECT contract, seq{extra} FROM {t}" for t in STORED_TABLES)


@dataclass
class Status:
    """Counts per contract and in total."""

    contracts: list[dict[str, Any]]
    received: int
    stored: int
    quarantined: int
    open_sessions: int
    open_gaps: int

    @property
    def balanced(self) -> bool:
        return self.received == self.stored + self.quarantined


def status(data_dir: Path) -> Status:
    """Frames received, rows per table, quarantined, last message and open gaps per contract."""
    con = connect(data_dir)
    joins = " ".join(
        f"LEFT JOIN (SELECT contract, count(*) AS {t} FROM {t} GROUP BY contract) USING (contract)"
        for t in STORED_TABLES
    )
    counts = ", ".join(f"coalesce({t}, 0) AS {t}" for t in STORED_TABLES)
    per_contract = con.execute(
        f"""
        WITH stored AS ({_stored_seqs_sql(", exchange_ts, received_at")}),
        c AS (SELECT contract, count(DISTINCT seq) AS messages, max(exchange_ts) AS last_update,
                     max(received_at) AS last_received FROM stored GROUP BY contract),
        g AS (SELECT contract, count(*) AS open_gaps FROM gaps WHERE gap_end IS NULL GROUP BY 1)
        SELECT contract, messages, {counts}, last_update, last_received,
               coalesce(open_gaps, 0) AS open_gaps
        FROM c {joins} LEFT JOIN g USING (contract) ORDER BY contract
        """
    )
    columns = [d[0] for d in per_contract.description or []]
    contracts = [dict(zip(columns, row, strict=True)) for row in per_contract.fetchall()]
    totals = con.execute(
        f"""
        SELECT (SELECT coalesce(sum(frames), 0) FROM sessions),
               (SELECT count(*) FROM (SELECT DISTINCT seq FROM ({_stored_seqs_sql()}))),
               (SELECT count(DISTINCT seq) FROM quarantine),
               (SELECT count(*) FROM sessions WHERE closed_at IS NULL),
               (SELECT count(*) FROM gaps WHERE gap_end IS NULL)
        """
    ).fetchall()[0]
    received, stored, quarantined, open_sessions, open_gaps = (int(v) for v in totals)
    return Status(contracts, received, stored, quarantined, open_sessions, open_gaps)


@dataclass
class Verification:
    """What ``verify`` found; ``problems`` is empty when the directory is consistent."""

    files: int = 0
    journal_frames: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _readable_files(data_dir: Path, result: Verification) -> None:
    root = data_dir.resolve()  # what table_files' paths are relative to
    for table in TABLES.values():
        for path in sorted(table_files(root, table)):
            result.files += 1
            try:
                pq.read_table(path)
            except (OSError, pa.ArrowException) as exc:
                result.problems.append(f"unreadable file {path.relative_to(root)}: {exc}")


def _duplicates(con: duckdb.DuckDBPyConnection, result: Verification) -> None:
    for name, table in TABLES.items():
        keys = ", ".join(
            ["seq", *(["contract"] if table.by_contract else []), *_ROW_KEYS.get(name, [])]
        )
        found = con.execute(
            f"SELECT count(*) FROM (SELECT {keys} FROM {name} GROUP BY ALL HAVING count(*) > 1)"
        ).fetchall()[0]
        if found and found[0]:
            result.problems.append(f"{name}: {found[0]} rows stored more than once")
    stored = _stored_seqs_sql()
    both = con.execute(
        f"SELECT count(*) FROM (SELECT seq FROM quarantine INTERSECT SELECT seq FROM ({stored}))"
    ).fetchall()[0]
    if both and both[0]:
        result.problems.append(f"{both[0]} frames are both quarantined and stored")


def _journal_frames(data_dir: Path, con: duckdb.DuckDBPyConnection, result: Verification) -> None:
    """Every frame in the journal (live and archived) has exactly its rows in Parquet."""
    journal = Journal(data_dir)
    expected: list[tuple[str, int, int]] = []
    for record in [*journal.archived(), *journal.recover()]:
        if record.kind not in (FRAME, SNAPSHOT):
            continue
        result.journal_frames += 1
        try:
            message = flatten(record.payload)
        except FlattenError:
            expected.append(("quarantine", record.seq, 1))
            continue
        for table, rows in message.rows.items():
            expected.append((table, record.seq, len(rows)))
        expected.append(("extras", record.seq, len(message.extras) or (0 if message.rows else 1)))
    if not expected:
        return
    wanted = pa.table(
        {
            "tbl": [e[0] for e in expected],
            "seq": [e[1] for e in expected],
            "n": [e[2] for e in expected],
        }
    )
    con.register("wanted", wanted)
    actual = " UNION ALL ".join(
        f"SELECT '{t}' AS tbl, seq, count(*) AS n FROM {t} GROUP BY seq"
        for t in (*STORED_TABLES, "quarantine")
    )
    missing = con.execute(
        f"""
        SELECT w.tbl, count(*), min(w.seq) FROM wanted w LEFT JOIN ({actual}) a USING (tbl, seq)
        WHERE w.n > 0 AND coalesce(a.n, 0) <> w.n GROUP BY w.tbl ORDER BY 1
        """
    ).fetchall()
    for table, count, first in missing:
        result.problems.append(
            f"{table}: {count} journaled frames without exactly their rows (first seq {first})"
        )


def verify(data_dir: Path) -> Verification:
    """Check files, duplicates, the journal against Parquet, and the frame balance."""
    result = Verification()
    _readable_files(data_dir, result)
    con = connect(data_dir)
    _duplicates(con, result)
    _journal_frames(data_dir, con, result)
    counts = status(data_dir)
    if counts.open_sessions == 0 and not counts.balanced:
        result.problems.append(
            f"frames received {counts.received} != stored {counts.stored}"
            f" + quarantined {counts.quarantined}"
        )
    return result
