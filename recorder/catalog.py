"""DuckDB views over the Parquet files of a data directory: one view per table."""

from __future__ import annotations

from pathlib import Path

import duckdb

from recorder.schema import TABLES, Table, package_data_dir


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_glob(data_dir: Path, table: Table) -> str:
    """The glob of every visible Parquet file of ``table`` (temporary files never match)."""
    depth = "*/*" if table.by_contract else "*"
    return str(data_dir.resolve() / table.name / depth / "*.parquet")


def _has_files(data_dir: Path, table: Table) -> bool:
    root = data_dir / table.name
    pattern = "*/*/*.parquet" if table.by_contract else "*/*.parquet"
    return root.is_dir() and next(root.glob(pattern), None) is not None


def view_sql(data_dir: Path, table: Table) -> str:
    """The ``CREATE VIEW`` statement of one table.

    Partition columns are typed explicitly (``date`` DATE, ``contract`` VARCHAR) so that
    numeric identifiers such as ``012345`` keep their zeros; a table with no files yet is an
    empty view with the right columns. ``union_by_name`` lets files written before a column
    was added be read with it as NULL.
    """
    if not _has_files(data_dir, table):
        empty = ", ".join(f"NULL::{c.type} AS {c.name}" for c in table.columns)
        return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {empty} WHERE false"
    columns = ", ".join(f"{c.name}::{c.type} AS {c.name}" for c in table.columns)
    hive_types = "{'date': 'DATE'" + (", 'contract': 'VARCHAR'}" if table.by_contract else "}")
    source = (
        f"read_parquet({_quote(table_glob(data_dir, table))}, hive_partitioning = true, "
        f"hive_types = {hive_types}, union_by_name = true)"
    )
    return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {columns} FROM {source}"


def derived_views() -> list[str]:
    """The statements of ``schemas/views.sql`` (sessions, gaps, ...), in order."""
    text = (package_data_dir("schemas") / "views.sql").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def create_views(con: duckdb.DuckDBPyConnection, data_dir: Path) -> None:
    """(Re)create every view on ``con``; call again to see tables that gained files."""
    for table in TABLES.values():
        con.execute(view_sql(data_dir, table))
    for statement in derived_views():
        con.execute(statement)


def connect(data_dir: str | Path, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """Open DuckDB with one view per table of ``data_dir``; timestamps are shown in UTC."""
    con = duckdb.connect(database)
    con.execute("SET TimeZone = 'UTC'")
    create_views(con, Path(data_dir))
    return con
