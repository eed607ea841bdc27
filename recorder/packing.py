"""Compacted files written for size: each column in its smallest encoding, zstd 19.

A compacted file is written once and read for years (see :mod:`recorder.compactor`), so it
is written for size: zstd at ``COMPRESSION_LEVEL`` (19; the flushes use
``storage.compression_level``, 1), each column in whichever of PLAIN, dictionary,
DELTA_BINARY_PACKED and BYTE_STREAM_SPLIT compresses it smallest, columns without a null
REQUIRED, statistics only where queries filter, and no Arrow schema in the footer.

A contract file of a table with ``exchange_ts`` holds ``received_at`` as its difference from
``exchange_ts`` (:data:`recorder.schema.RECEIVED_DELAY_COLUMN`, :func:`pack_received`):
both times grow with the feed, and the second adds only the lag to the first. On the size
benchmark that column takes 1.0-1.2 bytes a row instead of 2.3-2.7 (5.2 bytes a message over
the four tables). The views add it back (:func:`recorder.catalog.read_sql`), as does
:func:`unpack_received` for the compactor, which reads contract files again.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recorder.schema import RECEIVED_DELAY_COLUMN, Table

#: zstd level of compacted files: compaction is offline and once per partition, so zstd's
#: strongest regular level (on the size benchmark: 2 % fewer bytes than level 9, 1.7 times the CPU)
COMPRESSION_LEVEL = 19
#: encodings are compared at this level, which ranks them nearly as 19 does at a fifth of the cost
TRIAL_LEVEL = 9
PLAIN = "PLAIN"
DICTIONARY = "RLE_DICTIONARY"  # written with use_dictionary (pyarrow's column_encoding refuses it)
#: footer key of a compacted day file (:mod:`recorder.dayfold`): the JSON list of the contracts
#: it holds, which readers take without reading its ``contract`` column
CONTRACTS_KEY = "ime_recorder.contracts"
#: rows per row group: small enough that a look-back (the as-of state) reads one group of
#: each contract-day file, not all of it (row-group statistics on exchange_ts skip the rest)
ROW_GROUP_ROWS = 16_384


def write_compacted(
    data: pa.Table, where: str | Path | pa.NativeFile, sort: list[str], level: int
) -> pa.Table:
    """Write ``data`` (sorted by ``sort``) in the compacted layout; returns the table as a
    read of the file gives it back (columns without a null come back ``not null``).

    The layout is chosen for size (the file is written once and read for years):

    - zstd at ``level``, each column in the encoding that compresses it best
      (:func:`choose_encodings`);
    - columns without a null are REQUIRED (no definition levels to store);
    - min/max statistics only on the columns queries filter on (:func:`statistics_columns`),
      no page index, and no ``ARROW:schema`` in the footer: the Parquet types alone give
      DuckDB and pyarrow the same column types (TIMESTAMPTZ, DATE, TIME, VARCHAR[], ...).
    """
    data = data.cast(required_where_complete(data))
    encodings = choose_encodings(data, min(level, TRIAL_LEVEL))
    pq.write_table(
        data,
        where,
        compression="zstd",
        compression_level=level,
        use_dictionary=[n for n, e in encodings.items() if e == DICTIONARY],
        column_encoding={n: e for n, e in encodings.items() if e not in (PLAIN, DICTIONARY)},
        write_statistics=statistics_columns(data.schema),
        write_page_index=False,
        store_schema=False,
        row_group_size=ROW_GROUP_ROWS,
        sorting_columns=[pq.SortingColumn(data.column_names.index(k)) for k in sort],
    )
    return data


def pack_received(table: Table, data: pa.Table) -> pa.Table:
    """``data`` (in ``table.arrow_schema``) in ``table.contract_schema``: ``received_at`` as
    microseconds after ``exchange_ts`` where the table :attr:`~Table.packs_received`.

    Raises ValueError for a row with ``received_at`` but no ``exchange_ts``, which the
    difference could not give back (the flattener never makes one: a frame without a
    timestamp is quarantined).
    """
    if not table.packs_received:
        return data
    exchange = data.column("exchange_ts").cast(pa.int64())
    received = data.column("received_at").cast(pa.int64())
    if pc.any(pc.and_(exchange.is_null(), received.is_valid())).as_py():
        raise ValueError(f"{table.name}: a row has received_at but no exchange_ts")
    delay = pc.subtract_checked(received, exchange)
    where = data.schema.get_field_index("received_at")
    return data.set_column(where, table.contract_schema.field(where), delay)


def unpack_received(data: pa.Table) -> pa.Table:
    """The inverse of :func:`pack_received`, for a contract file as read: ``received_at`` in
    place of :data:`~recorder.schema.RECEIVED_DELAY_COLUMN` (a file written before the
    difference was stored holds ``received_at`` and is returned as it is)."""
    if RECEIVED_DELAY_COLUMN not in data.column_names:
        return data
    where = data.schema.get_field_index(RECEIVED_DELAY_COLUMN)
    exchange = data.column("exchange_ts")
    received = pc.add_checked(exchange.cast(pa.int64()), data.column(where).cast(pa.int64()))
    field = pa.field("received_at", exchange.type, data.schema.field(where).nullable)
    return data.set_column(where, field, received.cast(exchange.type))


def required_where_complete(data: pa.Table) -> pa.Schema:
    """The schema of ``data`` with the columns that hold no null made non-nullable."""
    return pa.schema([f.with_nullable(data.column(f.name).null_count > 0) for f in data.schema])


def statistics_columns(schema: pa.Schema) -> list[str]:
    """The columns given min/max statistics: the times queries filter on, ``exchange_ts``, or
    in a table without it, its timestamps (``received_at``, ``opened_at``, ``closed_at``), as
    the views, :mod:`recorder.storesql` and :mod:`recorder.export` filter.

    DuckDB skips row groups by these. The statistics of any other column (``seq`` too, which
    queries order and join by but do not filter on) would skip nothing that a partition folder
    does not already skip, and cost about 90 bytes per column and file (footer and page
    header): 0.35 bytes per message for ``seq`` alone on the size benchmark.
    """
    names = set(schema.names)
    return [
        f.name
        for f in schema
        if f.name == "exchange_ts" or ("exchange_ts" not in names and pa.types.is_timestamp(f.type))
    ]


def choose_encodings(data: pa.Table, level: int) -> dict[str, str]:
    """Per column, the encoding whose zstd-compressed column chunk is smallest at ``level``.

    Each candidate is written on its own and measured: what pays depends on the data, not
    only on the type (timestamps that only grow take DELTA_BINARY_PACKED, but best_limit
    repeats each one for every level, and there PLAIN compresses better; prices on a tick
    grid take PLAIN or a dictionary; quantities BYTE_STREAM_SPLIT). Ties go to PLAIN.
    """
    chosen = {}
    for field in data.schema:
        column = data.column(field.name)
        sizes: dict[str, int] = {}
        for encoding in _candidates(field.type):
            try:
                sizes[encoding] = _chunk_bytes(field, column, encoding, level)
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                continue  # e.g. BYTE_STREAM_SPLIT of integers needs pyarrow 17
        chosen[field.name] = min(sizes, key=sizes.__getitem__)
    return chosen


def _candidates(kind: pa.DataType) -> tuple[str, ...]:
    if pa.types.is_floating(kind):
        return (PLAIN, DICTIONARY, "BYTE_STREAM_SPLIT")
    if _fixed_width_integer(kind):
        return (PLAIN, DICTIONARY, "DELTA_BINARY_PACKED", "BYTE_STREAM_SPLIT")
    return (PLAIN, DICTIONARY)


def _fixed_width_integer(kind: pa.DataType) -> bool:
    """Types stored as Parquet INT32/INT64 (integers, dates, times, timestamps)."""
    return bool(
        pa.types.is_integer(kind)
        or pa.types.is_timestamp(kind)
        or pa.types.is_time(kind)
        or pa.types.is_date(kind)
    )


def _chunk_bytes(field: pa.Field, column: pa.ChunkedArray, encoding: str, level: int) -> int:
    """The compressed bytes of ``column`` written alone with ``encoding``."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.table([column], schema=pa.schema([field])),
        sink,
        compression="zstd",
        compression_level=level,
        use_dictionary=encoding == DICTIONARY,
        column_encoding=None if encoding in (PLAIN, DICTIONARY) else {field.name: encoding},
        write_statistics=False,
        store_schema=False,
        row_group_size=ROW_GROUP_ROWS,
    )
    meta = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata
    return sum(
        meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups)
    )
