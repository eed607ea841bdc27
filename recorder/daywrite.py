"""The compacted day file of the ``date`` layout, written from sorted batches.

:class:`recorder.dayfold.DayFold` streams a date's rows, sorted by (hour of ``exchange_ts``,
contract, ``exchange_ts``, seq), from DuckDB; :func:`write_day_file` writes them as the
compacted layout (:mod:`recorder.packing`: zstd, each column in its best encoding measured
on the first :data:`SAMPLE_ROWS` rows, columns without a null REQUIRED, ``received_at``
packed, statistics on ``exchange_ts`` and ``contract``) in row groups that :func:`cut` ends
at each hour and, where a contract's hour fits, at a change of contract; the footer lists
the file's contracts (:data:`recorder.packing.CONTRACTS_KEY`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recorder.packing import (
    CONTRACTS_KEY,
    DICTIONARY,
    PLAIN,
    ROW_GROUP_ROWS,
    TRIAL_LEVEL,
    choose_encodings,
    pack_received,
    statistics_columns,
)
from recorder.schema import CONTRACT_COLUMN, RECEIVED_DELAY_COLUMN, Table

#: rows whose encodings are measured before the file is opened (the first hours of the date)
SAMPLE_ROWS = 4 * ROW_GROUP_ROWS
#: the order's first key: ``epoch_us(exchange_ts) // HOUR_US``
HOUR_US = 3_600_000_000


def write_day_file(
    table: Table, batches: pa.RecordBatchReader, path: Path, complete: list[bool], level: int
) -> int:
    """Write the sorted ``batches`` (day schema) as a compacted day file; the rows written.

    ``complete``: per column of the day schema, whether it holds no null (written REQUIRED,
    as :func:`recorder.packing.write_compacted` does). The encodings are measured on the first
    :data:`SAMPLE_ROWS` rows, which are held until then."""
    schema = pa.schema(
        [f.with_nullable(not c) for f, c in zip(table.day_schema, complete, strict=True)]
    )
    packed_schema = _packed_schema(table, schema)
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    rows = 0
    contracts: set[str] = set()
    for chunk in row_groups(batches, schema):
        contracts.update(pc.unique(chunk.column(CONTRACT_COLUMN)).to_pylist())
        pending.append(pack_received(table, chunk).cast(packed_schema))
        if writer is None and sum(p.num_rows for p in pending) < SAMPLE_ROWS:
            continue
        if writer is None:
            writer = _open(path, pa.concat_tables(pending), level)
        for part in pending:
            writer.write_table(part, row_group_size=ROW_GROUP_ROWS)
            rows += part.num_rows
        pending = []
    if writer is None:
        sample = pa.concat_tables(pending) if pending else packed_schema.empty_table()
        writer = _open(path, sample, level)
        for part in pending:
            writer.write_table(part, row_group_size=ROW_GROUP_ROWS)
            rows += part.num_rows
    writer.add_key_value_metadata({CONTRACTS_KEY: json.dumps(sorted(contracts))})
    writer.close()
    return rows


def _packed_schema(table: Table, schema: pa.Schema) -> pa.Schema:
    """``table.packed_day_schema`` with the nullability of ``schema`` (the day schema's): the
    delay holds no null where neither time does."""
    fields = []
    for packed, plain in zip(table.packed_day_schema, schema, strict=True):
        if packed.name == RECEIVED_DELAY_COLUMN:
            nullable = plain.nullable or schema.field("exchange_ts").nullable
            fields.append(packed.with_nullable(nullable))
        else:
            fields.append(packed.with_nullable(plain.nullable))
    return pa.schema(fields)


def row_groups(batches: pa.RecordBatchReader, schema: pa.Schema) -> Iterator[pa.Table]:
    """``batches`` (sorted) cut into row groups, in ``schema``: see :func:`cut`."""
    held = schema.empty_table()
    for batch in batches:
        held = pa.concat_tables([held, pa.Table.from_batches([batch]).cast(schema)])
        while held.num_rows > ROW_GROUP_ROWS:  # row ROW_GROUP_ROWS + 1 decides a cut
            end = cut(held)
            yield held.slice(0, end).combine_chunks()
            held = held.slice(end)
    while held.num_rows:
        end = cut(held)
        yield held.slice(0, end).combine_chunks()
        held = held.slice(end)


def cut(rows: pa.Table) -> int:
    """Where the row group starting ``rows`` (sorted as a compacted day file) ends: at the
    first change of hour, else at the last change of contract within :data:`ROW_GROUP_ROWS`
    rows, else after them (one contract's hour longer than a group).

    So a row group holds one hour, and a contract's hour is in one group wherever it fits
    (a one-contract read then decompresses one group of each hour, not two, and the as-of
    reads the groups of its hour only)."""
    head = rows.slice(0, ROW_GROUP_ROWS + 1)
    size = int(head.num_rows)
    if size <= 1:
        return size
    if "exchange_ts" in head.column_names:
        hours = _changes(pc.divide(head.column("exchange_ts").cast(pa.int64()), HOUR_US))
        if len(hours):
            return int(hours[0])
    if size <= ROW_GROUP_ROWS:  # the last rows of all, in one hour
        return size
    contracts = _changes(head.column(CONTRACT_COLUMN))
    return int(contracts[-1]) if len(contracts) else ROW_GROUP_ROWS


def _changes(values: pa.ChunkedArray) -> np.ndarray:
    """The positions ``i`` (1 and up) where ``values[i]`` differs from ``values[i - 1]``."""
    array = values.combine_chunks()
    differ = pc.not_equal(array.slice(1), array.slice(0, len(array) - 1))
    return np.flatnonzero(differ.to_numpy(zero_copy_only=False)) + 1


def _open(path: Path, sample: pa.Table, level: int) -> pq.ParquetWriter:
    """A writer of the compacted layout, each column's encoding measured on ``sample``."""
    encodings = choose_encodings(sample, min(level, TRIAL_LEVEL))
    return pq.ParquetWriter(
        path,
        sample.schema,
        compression="zstd",
        compression_level=level,
        use_dictionary=[n for n, e in encodings.items() if e == DICTIONARY],
        column_encoding={n: e for n, e in encodings.items() if e not in (PLAIN, DICTIONARY)},
        write_statistics=[*statistics_columns(sample.schema), CONTRACT_COLUMN],
        write_page_index=False,
        store_schema=False,
    )
