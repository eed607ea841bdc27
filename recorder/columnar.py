"""Plain frames in bulk: DuckDB turns a batch of them into Arrow tables, off the event loop.

On the event loop a plain frame (:func:`recorder.plain.plain_frame`: checked in C by
msgspec, so its rows are exactly what :func:`~recorder.flatten.flatten` would give) costs a
few list appends, and the frames of one socket read join a :class:`FrameBatch` together. In
the writer thread, :class:`Decoder` hands the batch to DuckDB, which parses the JSON and
builds every table's columns in C++ without the GIL; rows then travel as Arrow tables
(:data:`PARTS_SCHEMA` order: the partition columns (:data:`DATE` and :data:`CONTRACT`)
first, then the file columns) until :func:`partitions` cuts them into one slice per Parquet
file.
"""

from __future__ import annotations

import json
import threading
from array import array
from collections.abc import Iterable
from itertools import accumulate, islice, repeat
from sys import intern
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recorder.buffer import Batch
from recorder.plain import BULK_LEVELS
from recorder.schema import SECTION_TABLES, TABLES, Table
from recorder.writer import CONTRACT, DATE, Part, to_arrow

_DUCK_TYPES = {"int": "BIGINT", "float": "DOUBLE", "date": "VARCHAR", "time": "VARCHAR"}
_PARTITION_FIELDS = [pa.field(DATE, pa.string()), pa.field(CONTRACT, pa.string())]


def parts_schema(table: Table) -> pa.Schema:
    """The schema rows travel in between decoding and writing: partition, then file columns."""
    return pa.schema([*_PARTITION_FIELDS, *table.arrow_schema])


#: frames joined into one ``bytes`` at a time as a batch fills: a batch then holds a few
#: objects per thousand frames, and no buffer that grows (a ``bytearray`` that grew by each
#: frame was copied whole at its resizes: 7 % of the event loop's time)
BLOCK_FRAMES = 1_000


class FrameBatch:
    """Plain frames waiting to be decoded, as columns (appended to on the event loop).

    The numbers are kept in ``array``s and the frames in blocks of :data:`BLOCK_FRAMES`
    joined end to end, with their end offsets: objects the garbage collector does not
    track or walks at once. As lists of ``bytes`` and ``int`` objects, each of a batch's
    20,000-100,000 frames was 5 objects that every full collection visited, scattered in
    memory: at 90 k frames/s the collector took ~15 % of the event loop's time. The batch's
    Arrow table is built on the blocks without copying them.
    """

    __slots__ = (
        "block_stops",
        "blocks",
        "contract",
        "day",
        "ends",
        "exchange",
        "open",
        "received",
        "seq",
        "size",
        "started",
    )

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.seq = array("q")
        self.received = array("q")
        self.exchange = array("q")
        self.day: list[str] = []  # a few str objects, each repeated
        self.contract: list[str] = []  # interned: a few hundred str objects, each repeated
        self.blocks: list[bytes] = []  # frames end to end, BLOCK_FRAMES a block ...
        self.block_stops = array("q")  # ... block i holding frames block_stops[i - 1]: [i]
        self.open: list[bytes] = []  # the frames of the block being filled
        self.size = 0  # bytes of all frames
        self.ends = array("q", [0])  # frame i is bytes ends[i]:ends[i + 1] of them all
        self.started: float | None = None  # monotonic reading of the first frame

    def __len__(self) -> int:
        return len(self.seq)

    def extend(
        self,
        seqs: list[int],
        received_us: int,
        exchange_us: list[int],
        days: list[str],
        contracts: list[str],
        frames: list[bytes],
        now: float,
    ) -> None:
        """Add frames received together, in order (C loops, no call per frame)."""
        if self.started is None:
            self.started = now
        count = len(seqs)
        self.seq.extend(seqs)
        self.received.extend(repeat(received_us, count))
        self.exchange.extend(exchange_us)
        self.day.extend(days)
        self.contract.extend(map(intern, contracts))
        ends = self.ends
        ends.extend(islice(accumulate(map(len, frames), initial=self.size), 1, None))
        self.size = ends[-1]
        current, start = self.open, 0
        while start < count:
            room = BLOCK_FRAMES - len(current)
            current.extend(frames[start : start + room])
            start += room
            if len(current) == BLOCK_FRAMES:
                self.blocks.append(b"".join(current))
                self.block_stops.append(len(self.seq) - count + start)
                self.open = current = []

    def _pieces(self) -> list[tuple[int, int, bytes]]:
        """(first frame, frame after the last, their bytes) of each block, the open one too."""
        out, first = [], 0
        for stop, block in zip(self.block_stops, self.blocks, strict=True):
            out.append((first, stop, block))
            first = stop
        if self.open:
            out.append((first, len(self.seq), b"".join(self.open)))
        return out

    @property
    def frames(self) -> list[bytes]:
        """The frames, each as received."""
        ends = self.ends
        return [
            block[ends[i] - ends[first] : ends[i + 1] - ends[first]]
            for first, stop, block in self._pieces()
            for i in range(first, stop)
        ]

    def chunks(self, size: int) -> list[FrameBatch]:
        """This batch cut into batches of at most ``size`` frames, in order."""
        if len(self.seq) <= size:
            return [self]
        return self._cut(size)

    def take_chunks(self, size: int) -> list[FrameBatch]:
        """:meth:`chunks`, leaving this batch empty (``started`` kept): the chunks alone hold
        the frames' blocks, so each chunk's frames are freed once it is dropped."""
        chunks = self._cut(size)
        started = self.started
        self._clear()
        self.started = started
        return chunks

    def _cut(self, size: int) -> list[FrameBatch]:
        count = len(self.seq)
        pieces = self._pieces()
        ends = np.frombuffer(self.ends, np.int64)
        out = []
        for start in range(0, count, size):
            stop = min(start + size, count)
            part = FrameBatch()
            part.started = self.started
            part.seq = self.seq[start:stop]
            part.received = self.received[start:stop]
            part.exchange = self.exchange[start:stop]
            part.day = self.day[start:stop]
            part.contract = self.contract[start:stop]
            part.ends = array("q", (ends[start : stop + 1] - ends[start]).tobytes())
            part.size = part.ends[-1]
            for first, last, block in pieces:
                if last <= start or first >= stop:
                    continue
                low, high = max(first, start), min(last, stop)
                if (low, high) != (first, last):  # a block the cut goes through: its part
                    block = block[ends[low] - ends[first] : ends[high] - ends[first]]
                part.blocks.append(block)
                part.block_stops.append(high - start)
            out.append(part)
        return out

    @property
    def first_seq(self) -> int | None:
        return self.seq[0] if self.seq else None

    def arrow(self) -> pa.Table:
        """The batch as a table, on its blocks (no copy)."""
        ends = np.frombuffer(self.ends, np.int64)
        frames = pa.chunked_array(
            [
                pa.Array.from_buffers(
                    pa.large_string(),
                    stop - first,
                    [None, pa.py_buffer(ends[first : stop + 1] - ends[first]), pa.py_buffer(block)],
                )
                for first, stop, block in self._pieces()
            ],
            pa.large_string(),
        )
        return pa.table(
            {
                "seq": _int64s(self.seq),
                "received_us": _int64s(self.received),
                "exchange_us": _int64s(self.exchange),
                "day": pa.array(self.day, pa.string()),
                "contract": pa.array(self.contract, pa.string()),
                "frame": frames,
            }
        )


def _int64s(values: array[int]) -> pa.Array:
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _json_structure() -> str:
    data: dict[str, Any] = {}
    for section, name in SECTION_TABLES.items():
        table = TABLES[name]
        fields = {c.field: _DUCK_TYPES[c.kind or ""] for c in table.wire_columns if c.field}
        if table.levels:  # a STRUCT of the levels (plain_frame checked the keys)
            struct = ", ".join(f"{_quote(f)} {t}" for f, t in fields.items())
            data[section] = {level: f"STRUCT({struct})" for level in BULK_LEVELS}
        else:
            data[section] = fields
    return json.dumps({"data": data})


def _value(column: Any, source: str) -> str:
    field = f"{source}.{_quote(column.field)}"
    if column.kind in ("date", "time"):
        return f"CAST(NULLIF({field}, '') AS {column.kind.upper()}) AS {column.name}"
    return f"{field} AS {column.name}"


def _table_sql(name: str) -> str:
    """The rows of one data table from the decoded batch ``j``; a frame's levels in ascending
    order, the frames in any order (:func:`partitions` orders rows by seq, then as they come).
    """
    table = TABLES[name]
    section = next(s for s, t in SECTION_TABLES.items() if t == name)
    head = (
        f"day AS {DATE}, contract AS {CONTRACT}, exchange_us AS exchange_ts, "
        "received_us AS received_at, seq"
    )
    path = f"j.data.{_quote(section)}"
    wire = [c for c in table.wire_columns if c.field]
    if table.levels:  # unnest keeps a list's order: the levels come as plain_frame saw them
        values = ", ".join(_value(c, "e.value") for c in wire)
        levels = ", ".join(
            f"{{'level': {int(level)}, 'value': {path}.{_quote(level)}}}" for level in BULK_LEVELS
        )
        return (
            f"SELECT {head}, e.level::INTEGER AS level, {values}, 'stream' AS source "
            f"FROM (SELECT *, unnest([{levels}]) AS e FROM j WHERE {path} IS NOT NULL) "
            "WHERE e.value IS NOT NULL"
        )
    values = ", ".join(_value(c, path) for c in wire)
    return f"SELECT {head}, {values}, 'stream' AS source FROM j WHERE {path} IS NOT NULL"


_STRUCTURE = _json_structure()
_TABLE_SQL = {name: _table_sql(name) for name in SECTION_TABLES.values()}


class Decoder:
    """Turns a FrameBatch into one Arrow table per data table (one DuckDB connection).

    One DuckDB thread by default: a second one took the core the event loop runs on while a
    batch was decoded (in paired runs: 105 k msg/s with two, 112 k with one; flushes took
    0.27 s instead of 0.37 s at 100 k msg/s, and the peak RSS fell from ~710 to 574 MB).
    """

    def __init__(self, threads: int = 1) -> None:
        self._con = duckdb.connect()
        self._con.execute(f"SET threads = {int(threads)}")
        self._con.execute("SET preserve_insertion_order = true")
        self._lock = threading.Lock()

    def decode(self, batch: FrameBatch) -> dict[str, pa.Table]:
        """The rows of every plain frame in ``batch``; raises duckdb.Error if one is not."""
        with self._lock:
            con = self._con
            con.register("frames", batch.arrow())
            try:
                con.execute(
                    "CREATE OR REPLACE TEMP TABLE j AS SELECT seq, received_us, exchange_us, "
                    f"day, contract, from_json(frame, '{_STRUCTURE}') AS j FROM frames"
                )
                out = {}
                for name, sql in _TABLE_SQL.items():
                    arrow = con.sql(sql).to_arrow_table()
                    if arrow.num_rows:
                        out[name] = _conform(arrow, TABLES[name])
                return out
            finally:
                con.unregister("frames")
                con.execute("DROP TABLE IF EXISTS j")

    def close(self) -> None:
        self._con.close()


def _conform(arrow: pa.Table, table: Table) -> pa.Table:
    """Cast DuckDB's answer to the table's exact Arrow types (timestamps from microseconds)."""
    schema = parts_schema(table)
    columns = []
    for field in schema:
        column = arrow.column(field.name)
        if pa.types.is_timestamp(field.type) and pa.types.is_integer(column.type):
            column = column.cast(pa.int64()).cast(field.type)
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def batches_to_parts(batches: Iterable[Batch]) -> dict[str, pa.Table]:
    """Row batches of the buffer as Arrow tables per table, in the parts schema, rows in the
    batches' order.

    The rows of every partition of a table are gathered first and built into Arrow once:
    the 500 live-overview snapshots taken at connect fill ~2,000 partitions, and one Arrow
    build per partition, each call waiting for the GIL a busy event loop holds, took 1.8 s.
    """
    by_table: dict[str, tuple[list[str], list[str | None], list[tuple[object, ...]]]] = {}
    for batch in batches:
        name, day, contract = batch.key
        days, contracts, rows = by_table.setdefault(name, ([], [], []))
        days.extend([day] * len(batch.rows))
        contracts.extend([contract] * len(batch.rows))
        rows.extend(batch.rows)
    out = {}
    for name, (days, contracts, rows) in by_table.items():
        table = TABLES[name]
        built = to_arrow(table, rows)
        out[name] = pa.Table.from_arrays(
            [pa.array(days, pa.string()), pa.array(contracts, pa.string()), *built.columns],
            schema=parts_schema(table),
        )
    return out


def partitions(table: Table, rows: pa.Table, max_rows: int) -> tuple[pa.Table, list[Part]]:
    """Group ``rows`` (parts schema) into files: one per date (tables partitioned by contract:
    a day file, see :mod:`recorder.paths`) and, where it has more than ``max_rows`` rows, cut
    into ranges of seq, never inside one frame's rows (recovery relies on it: see
    recorder.recovery). Returns the rows reordered so that each file is one slice, and the
    files.

    Within a file rows are in seq order (rows of one seq keep their order); a day file's rows
    are first ordered by contract, so its row-group statistics skip the other contracts.
    """
    n = rows.num_rows
    if n == 0:
        return rows, []
    # integer codes (hashing) and numpy lexsorts rather than sorting strings
    date = rows.column(DATE).combine_chunks().dictionary_encode().indices.to_numpy()
    seq = rows.column("seq").to_numpy()
    arrival = np.arange(n)
    by_seq = np.lexsort((arrival, seq, date))
    # cut each date into files of at most max_rows rows (more where one frame is longer)
    file_of = np.empty(n, dtype=np.int64)
    day_sorted, seq_sorted = date[by_seq], seq[by_seq]
    bounds = [*np.flatnonzero(day_sorted[1:] != day_sorted[:-1]) + 1, n]
    cuts, start = [], 0
    for end in bounds:
        cut = start
        while cut < end:
            stop = min(cut + max_rows, end)
            while stop < end and seq_sorted[stop] == seq_sorted[stop - 1]:
                stop += 1
            cuts.append((cut, stop))
            cut = stop
        start = end
    for index, (cut, stop) in enumerate(cuts):
        file_of[by_seq[cut:stop]] = index
    if table.by_contract:
        contract = pc.fill_null(rows.column(CONTRACT), "").combine_chunks().dictionary_encode()
        rank = np.empty(len(contract.dictionary), dtype=np.int64)
        rank[pc.array_sort_indices(contract.dictionary).to_numpy()] = np.arange(rank.size)
        order = np.lexsort((arrival, seq, rank[contract.indices.to_numpy()], file_of))
    else:
        order = np.lexsort((arrival, seq, file_of))
    rows = rows.take(pa.array(order))
    parts = []
    for cut, stop in cuts:
        span = seq_sorted[cut:stop]
        day = rows.column(DATE)[cut].as_py()
        key = (table.name, day, None)
        parts.append(Part(key, int(span.min()), int(span.max()), int(cut), int(stop - cut)))
    return rows, parts
