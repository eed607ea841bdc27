"""Pure partition paths.

A table partitioned by contract keeps two kinds of files under ``{table}/date=YYYY-MM-DD/``:

- **day files**, ``{table}/date=D/{first}-{last}.parquet``: what the recorder's flushes write,
  one file per table and date per flush (cut at ``storage.max_rows_per_file``), whatever the
  number of contracts. Their rows mix contracts, so they hold ``contract`` as a column,
  sorted by (contract, seq): row-group statistics let a one-contract read skip the rest.
- **contract files**, ``{table}/date=D/contract=<encoded>/{first}-{last}[.c].parquet``: what
  compaction writes when a date has closed (day files folded into one sorted file per
  contract), and what older versions flushed.
- **compacted day files**, ``{table}/date=D/{first}-{last}.c.parquet``: what compaction writes
  instead in the ``date`` layout (``compaction.layout``): the date's rows in one file per
  table, ordered by (hour of ``exchange_ts``, contract, ``exchange_ts``, seq), ``received_at``
  packed as in a contract file. Views read them with a glob of their own (``*.c.parquet``;
  the other day files match ``*[0-9].parquet``).

A frame's rows in (table, date, contract) are stored once a file of that date's folder (day
file) or of that contract's folder names a seq at or above the frame's: every flush writes
all the rows it holds of a (table, date) in seq order and never cuts a frame (see
:mod:`recorder.recovery`). Tables not partitioned by contract keep only
``{table}/date=D/{first}-{last}.parquet``.

Contract identifiers are data from the network. Every byte outside ``[A-Za-z0-9-]`` is
percent-encoded, so ``/``, ``..``, ``=``, ``%``, spaces and Persian letters become plain ASCII
folder names and no name can look like ``__HIVE_DEFAULT_PARTITION__``; DuckDB and pyarrow
decode them back when they read hive partitions.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import PurePath, PurePosixPath
from urllib.parse import quote, unquote

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FILE_NAME = re.compile(r"^(\d{20})-(\d{20})(?:\.[a-z]+)?\.parquet$")


def encode_contract(contract: str) -> str:
    """Return a folder-safe form of ``contract`` that hive readers decode back exactly."""
    if not contract:
        raise ValueError("a contract identifier cannot be empty")
    return quote(contract, safe="-").replace(".", "%2E").replace("~", "%7E").replace("_", "%5F")


def decode_contract(encoded: str) -> str:
    """Invert :func:`encode_contract`."""
    return unquote(encoded)


def partition_date(exchange_us: int, tz: tzinfo) -> date:
    """The local calendar date, in ``tz``, of a UTC instant in microseconds since the epoch."""
    return (_EPOCH + timedelta(microseconds=exchange_us)).astimezone(tz).date()


def partition_dir(table: str, day: str, contract: str | None) -> PurePosixPath:
    """Folder of one partition, relative to the data directory (``contract=None``: by date only)."""
    path = PurePosixPath(table) / f"date={day}"
    return path if contract is None else path / f"contract={encode_contract(contract)}"


def is_day_file(path: PurePath | str) -> bool:
    """Whether ``path`` (of a table partitioned by contract) is a day file, not a contract file."""
    parent = PurePath(path).parent.name
    return parent.startswith("date=")


def is_packed_day_file(path: PurePath | str) -> bool:
    """Whether ``path`` is a compacted day file, written by a date fold in the ``date``
    layout, ``{table}/date=D/{first}-{last}.c.parquet`` (a contract file may end so too): its
    rows hold ``received_at`` packed as in a contract file
    (:attr:`recorder.schema.Table.packed_day_schema`)."""
    return is_day_file(path) and PurePath(path).name.endswith(".c.parquet")


def file_name(first_seq: int, last_seq: int, tag: str = "") -> str:
    """Name of a Parquet file holding frames ``first_seq..last_seq``; names sort in write order."""
    suffix = f".{tag}" if tag else ""
    return f"{first_seq:020d}-{last_seq:020d}{suffix}.parquet"


def seq_range(name: str) -> tuple[int, int] | None:
    """The ``(first, last)`` seq of a Parquet file name, or None for a foreign file."""
    match = _FILE_NAME.match(name)
    return (int(match[1]), int(match[2])) if match else None
