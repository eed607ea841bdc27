"""The table definitions, read once from ``schemas/tables.toml`` and shared by all modules."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

_ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "DATE": pa.date32(),
    "TIME": pa.time64("us"),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "VARCHAR[]": pa.list_(pa.string()),
}

#: the partition column that day files hold inside the file (folders name it elsewhere)
CONTRACT_COLUMN = "contract"

#: In the contract files of a table with ``exchange_ts`` (what compaction writes), the column
#: that stands for ``received_at``: ``received_at - exchange_ts`` in microseconds, which
#: takes fewer bytes (see :mod:`recorder.packing`); the views add it back.
RECEIVED_DELAY_COLUMN = "received_delay_us"

#: the data tables' ``source``: a message of a stream, or of the live overview fetched when a
#: session opens
SOURCE_STREAM, SOURCE_SNAPSHOT = "stream", "snapshot"

#: The tables that hold market data, in the order of the message's sections.
DATA_TABLES = ("best_limit", "aggregate", "allowed_price_range", "contract_info")


def package_data_dir(name: str) -> Path:
    """Return ``schemas``/``configs``: packaged in a wheel, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "_data" / name
    return packaged if packaged.is_dir() else here.parent / name


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its DuckDB type and, for wire columns, the field it is read from."""

    name: str
    type: str
    field: str | None = None
    kind: str | None = None
    partition: bool = False
    doc: str = ""

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW_TYPES[self.type]


@dataclass(frozen=True)
class Table:
    """One table: its columns, the message section it comes from and how it is partitioned."""

    name: str
    columns: tuple[Column, ...]
    section: str | None
    levels: bool
    by_contract: bool
    doc: str

    @cached_property
    def file_columns(self) -> tuple[Column, ...]:
        """The columns stored inside the Parquet files (the partition columns are folders)."""
        return tuple(c for c in self.columns if not c.partition)

    @cached_property
    def wire_columns(self) -> tuple[Column, ...]:
        """The columns read from a field of the message's section, in schema order."""
        return tuple(c for c in self.columns if c.field is not None)

    @cached_property
    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of the Parquet files."""
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.file_columns])

    @cached_property
    def day_schema(self) -> pa.Schema:
        """The Arrow schema of a day file (see :mod:`recorder.paths`): the file columns, then
        ``contract``, which a day file holds as a column since its rows mix contracts."""
        if not self.by_contract:
            return self.arrow_schema
        return self.arrow_schema.append(pa.field(CONTRACT_COLUMN, pa.string()))

    @cached_property
    def packs_received(self) -> bool:
        """Whether the contract files of this table hold :data:`RECEIVED_DELAY_COLUMN`
        instead of ``received_at`` (a table partitioned by contract with ``exchange_ts``)."""
        names = {c.name for c in self.file_columns}
        return self.by_contract and {"exchange_ts", "received_at"} <= names

    @cached_property
    def contract_schema(self) -> pa.Schema:
        """The Arrow schema of a contract file (see :mod:`recorder.paths`): the file columns,
        with ``received_at`` held as :data:`RECEIVED_DELAY_COLUMN` where
        :attr:`packs_received`."""
        if not self.packs_received:
            return self.arrow_schema
        where = self.arrow_schema.get_field_index("received_at")
        return self.arrow_schema.set(where, pa.field(RECEIVED_DELAY_COLUMN, pa.int64()))

    @cached_property
    def packed_day_schema(self) -> pa.Schema:
        """The Arrow schema of a compacted day file (``{table}/date=D/{first}-{last}.c.parquet``,
        written by a date fold in the ``date`` layout, see :mod:`recorder.dayfold`): the day
        schema, with ``received_at`` held as :data:`RECEIVED_DELAY_COLUMN` where
        :attr:`packs_received`."""
        if not self.packs_received:
            return self.day_schema
        where = self.day_schema.get_field_index("received_at")
        return self.day_schema.set(where, pa.field(RECEIVED_DELAY_COLUMN, pa.int64()))

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


def _column(spec: dict[str, Any]) -> Column:
    if spec["type"] not in _ARROW_TYPES:
        raise ValueError(f"schemas/tables.toml: unknown type {spec['type']!r} of {spec['name']!r}")
    return Column(**spec)


def load_tables(path: Path | None = None) -> dict[str, Table]:
    """Read the table definitions; the common columns are put first in every table."""
    path = path or package_data_dir("schemas") / "tables.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    common = [_column(c) for c in raw["common"]["columns"]]
    tables: dict[str, Table] = {}
    for name, spec in raw["tables"].items():
        by_contract = not spec.get("no_contract_partition", False)
        head = [
            c
            for c in common
            if (by_contract or c.name != "contract")
            and not (spec.get("no_exchange_ts", False) and c.name == "exchange_ts")
        ]
        tables[name] = Table(
            name=name,
            columns=(*head, *(_column(c) for c in spec["columns"])),
            section=spec.get("section"),
            levels=spec.get("levels", False),
            by_contract=by_contract,
            doc=spec.get("doc", ""),
        )
    return tables


TABLES: dict[str, Table] = load_tables()
#: section name on the wire -> table name
SECTION_TABLES: dict[str, str] = {
    t.section: t.name for t in TABLES.values() if t.section is not None
}
