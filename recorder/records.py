"""Journal records: the bytes a segment is made of, and what they say about sessions.

A segment (see :mod:`recorder.journal`) is a sequence of records::

    u32 body length | u32 crc32(body) | body
    body = u8 kind | i64 seq | i64 received_us | u16 len(connection) | connection | payload

``kind`` is FRAME (payload = the frame's bytes), SNAPSHOT, EVENT (payload = JSON of a
connection event or of a checkpoint) or RUNS: the records one write carries, as the event
loop queued them (runs: a socket read's frames, or one other record), packed column by
column under the one CRC of the RUNS record (seq and received_us = the last record's)::

    u32 r | u32 n | r x u8 kind | r x i64 first seq | r x i64 received_us | r x u32 records
          | r x u16 len(connection) | n x u32 len(payload)
          | connection 1 | ... | connection r | payload 1 | ... | payload n

A run's records have consecutive seqs from its first, one kind, receive time and
connection. A RUNS record is built and read by C code (``array``, ``bytes.join``, ``map``
over slices) and checked by one ``zlib.crc32``, which releases the GIL: the per-record work
is a payload's length and its slice, so that frames spilled to the journal are read back at
a small fraction of what checking them costs. A corrupt RUNS record is cut whole: its CRC
cannot tell which of its records is damaged.

Earlier versions wrote single records, and then BLOCK records (the same, but with every
column per record: kind, seq, received_us and connection each)::

    u32 n | n x u8 kind | n x i64 seq | n x i64 received_us | n x u16 len(connection)
          | n x u32 len(payload) | connection 1 | payload 1 | ... | connection n | payload n

Both read the same: a journal left by an earlier version is recovered whole.
"""

from __future__ import annotations

import itertools
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, groupby
from operator import add
from typing import Any, NamedTuple

import orjson

FRAME, EVENT, SNAPSHOT, BLOCK, RUNS = 1, 2, 3, 4, 5
_KINDS = (FRAME, EVENT, SNAPSHOT)
_KIND_BYTES = bytes(_KINDS)
_PACKED = (BLOCK, RUNS)  # records that hold records (seq: their last one's)
_HEAD = struct.Struct("<II")
_BODY = struct.Struct("<BqqH")
_COUNT = struct.Struct("<I")
_COUNTS = struct.Struct("<II")
#: bytes of one record in a BLOCK's columns: kind, seq, received_us, two lengths
_RECORD_COLUMNS_BYTES = 1 + 8 + 8 + 2 + 4
#: bytes of one run in a RUNS record's columns: kind, first seq, received_us, two counts
_RUN_COLUMNS_BYTES = 1 + 8 + 8 + 4 + 2
#: records per RUNS record at most (a writer behind by more writes several)
BLOCK_RECORDS = 512
#: RUNS and BLOCK columns are written little-endian whatever the machine
_SWAP = sys.byteorder != "little"
#: records queued by the event loop, a run of one kind, connection and receive time:
#: (kind, first seq, received_us, connection, payloads), the seqs following the first; a plain
#: tuple per run (the frames of one socket read), not one object per record
Pending = tuple[int, int, int, str, list[bytes]]


class Record(NamedTuple):
    """One journal record as read back (:func:`records_of`)."""

    kind: int
    seq: int
    received_us: int
    connection: str
    payload: bytes


def encode(kind: int, seq: int, received_us: int, connection: str, payload: bytes) -> bytes:
    """The bytes of one record (header and body)."""
    conn = connection.encode()
    body = _BODY.pack(kind, seq, received_us, len(conn)) + conn + payload
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def encode_runs(runs: Sequence[Pending]) -> list[bytes]:
    """The bytes of one RUNS record holding ``runs`` (in seq order), as parts to write."""
    conns = [run[3].encode() for run in runs]
    payloads = list(itertools.chain.from_iterable(run[4] for run in runs))
    columns = [
        array("q", [run[1] for run in runs]),
        array("q", [run[2] for run in runs]),
        array("I", [len(run[4]) for run in runs]),
        array("H", map(len, conns)),
        array("I", map(len, payloads)),
    ]
    if _SWAP:
        for column in columns:
            column.byteswap()
    block = b"".join(
        [
            _COUNTS.pack(len(runs), len(payloads)),
            bytes(run[0] for run in runs),
            *(c.tobytes() for c in columns),
            *conns,
            *payloads,
        ]
    )
    last = runs[-1]
    body = _BODY.pack(RUNS, last[1] + len(last[4]) - 1, last[2], 0)
    crc = zlib.crc32(block, zlib.crc32(body))  # the GIL is released over the block
    return [_HEAD.pack(len(body) + len(block), crc), body, block]


def _columns(block: bytes, offset: int, codes: str, n: int) -> tuple[list[array[int]], int]:
    """Arrays of ``n`` items each (one per code) read from ``block`` at ``offset``, and the
    offset after them."""
    columns = []
    for code in codes:
        column = array(code)
        width = column.itemsize * n
        column.frombytes(block[offset : offset + width])
        if _SWAP:
            column.byteswap()
        columns.append(column)
        offset += width
    return columns, offset


def _unpack_runs(block: bytes, from_seq: int = 0) -> list[Pending] | None:
    """The runs of a RUNS record's payload, from seq ``from_seq`` on; None if its columns do
    not add up (a corrupt record)."""
    if len(block) < _COUNTS.size:
        return None
    r, n = _COUNTS.unpack_from(block)
    offset = _COUNTS.size
    if len(block) < offset + r * _RUN_COLUMNS_BYTES + n * 4:
        return None  # the columns cannot be there (frombytes of a cut column would raise)
    kinds = block[offset : offset + r]
    (firsts, received, counts, conn_lens), offset = _columns(block, offset + r, "qqIH", r)
    (payload_lens,), offset = _columns(block, offset, "I", n)
    if sum(counts) != n or offset + sum(conn_lens) + sum(payload_lens) != len(block):
        return None
    if kinds.translate(None, _KIND_BYTES):  # a kind that is none of _KINDS
        return None
    names_at = list(accumulate(conn_lens, initial=offset))
    names = list(map(block.__getitem__, map(slice, names_at, names_at[1:])))
    text = {name: str(name, "utf-8", "replace") for name in set(names)}
    # a payload per record: C loops (the slices are the only per-record work)
    starts = list(accumulate(payload_lens, initial=names_at[-1]))
    payloads = list(map(block.__getitem__, map(slice, starts, starts[1:])))
    runs: list[Pending] = []
    start = 0
    for kind, first, received_us, count, name in zip(
        kinds, firsts, received, counts, names, strict=True
    ):
        end = start + count
        cut = max(0, from_seq - first)
        if cut >= count:
            pass
        elif kind == FRAME:
            runs.append((kind, first + cut, received_us, text[name], payloads[start + cut : end]))
        else:  # one record (a writer never queues more in a run of another kind)
            runs.extend(
                (kind, seq, received_us, text[name], [payloads[i]])
                for seq, i in enumerate(range(start + cut, end), first + cut)
            )
        start = end
    return runs


def _unpack_block(block: bytes, from_seq: int = 0) -> list[Pending] | None:
    """The records of a BLOCK's payload (earlier versions) of seq ``from_seq`` on, as runs;
    None if its columns do not add up (a corrupt block)."""
    if len(block) < _COUNT.size:
        return None
    (n,) = _COUNT.unpack_from(block)
    if len(block) < _COUNT.size + n * _RECORD_COLUMNS_BYTES:
        return None  # the columns cannot be there (frombytes of a cut column would raise)
    kinds = block[_COUNT.size : _COUNT.size + n]
    (seqs, received, conn_lens, payload_lens), offset = _columns(block, _COUNT.size + n, "qqHI", n)
    if offset + sum(conn_lens) + sum(payload_lens) != len(block):
        return None
    if kinds.translate(None, _KIND_BYTES):  # a kind that is none of _KINDS
        return None
    # record i: its connection at starts[i]:names_end[i], its payload up to starts[i + 1]
    starts = list(accumulate(map(add, conn_lens, payload_lens), initial=offset))
    names_end = list(map(add, starts, conn_lens))
    names = list(map(block.__getitem__, map(slice, starts, names_end)))
    text = {name: str(name, "utf-8", "replace") for name in set(names)}
    payloads = list(map(block.__getitem__, map(slice, names_end, starts[1:])))
    runs: list[Pending] = []
    start = 0
    # records of one kind, receive time and connection in a row (C code groups them)
    for (kind, received_us, name), group in groupby(zip(kinds, received, names, strict=True)):
        count = len(list(group))
        end = start + count
        first, last = seqs[start], seqs[end - 1]
        if last < from_seq:
            pass
        elif kind == FRAME and last == first + count - 1:  # one socket read's frames
            cut = max(0, from_seq - first)
            runs.append((kind, first + cut, received_us, text[name], payloads[start + cut : end]))
        else:
            connection = text[name]
            runs.extend(
                (kind, seqs[i], received_us, connection, [payloads[i]])
                for i in range(start, end)
                if seqs[i] >= from_seq
            )
        start = end
    return runs


def _join(runs: list[Pending], more: Iterable[Pending]) -> None:
    """Append ``more`` to ``runs``, a run's frames joining the run before when they follow
    it (one socket read's frames, cut by a BLOCK's end or written as single records)."""
    for run in more:
        if runs and run[0] == FRAME:
            kind, first, received_us, connection, payloads = runs[-1]
            if (
                kind == FRAME
                and run[1] == first + len(payloads)
                and run[2] == received_us
                and run[3] == connection
            ):
                payloads.extend(run[4])
                continue
        runs.append(run)


def _walk(data: bytes) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Each record of a segment's bytes whose length and CRC hold, in order, up to the first
    that does not: (its end, kind, seq, received_us, where its connection starts and ends)."""
    offset, size, head, body = 0, len(data), _HEAD.size, _BODY.size
    while offset + head <= size:
        length, crc = _HEAD.unpack_from(data, offset)
        start, end = offset + head, offset + head + length
        if length < body or end > size or zlib.crc32(data[start:end]) != crc:
            return
        kind, seq, received_us, conn_len = _BODY.unpack_from(data, start)
        yield end, kind, seq, received_us, start + body, start + body + conn_len
        offset = end


def decode_runs(data: bytes, from_seq: int = 0) -> tuple[list[Pending], int]:
    """The records of a segment's bytes as runs, and the length of its valid prefix (the
    rest is torn).

    A run is a socket read's frames as the event loop queued them (:data:`Pending`: the seqs
    follow the first), or one other record: read back, they take the same path as when
    they came, without an object per frame. ``from_seq``: records of lower seqs are checked
    but not returned, and a BLOCK whose last seq is lower is not unpacked (reading back from
    the middle of a segment).
    """
    runs: list[Pending] = []
    valid = 0
    for end, kind, seq, received_us, conn_start, conn_end in _walk(data):
        if seq < from_seq and (kind in _PACKED or kind in _KINDS) and conn_end <= end:
            valid = end  # a RUNS or BLOCK record's header names its last record's seq
            continue
        if kind in _PACKED and conn_end == conn_start:
            unpack = _unpack_runs if kind == RUNS else _unpack_block
            packed = unpack(data[conn_end:end], from_seq)
            if packed is None:
                break
            _join(runs, packed)
            valid = end
            continue
        if kind not in _KINDS or conn_end > end:
            break
        connection = data[conn_start:conn_end].decode("utf-8", "replace")
        _join(runs, [(kind, seq, received_us, connection, [data[conn_end:end]])])
        valid = end
    return runs, valid


def records_of(runs: Iterable[Pending]) -> Iterator[Record]:
    """Each record of ``runs``, in order."""
    for kind, first, received_us, connection, payloads in runs:
        for seq, payload in enumerate(payloads, first):
            yield Record(kind, seq, received_us, connection, payload)


def decode(data: bytes, from_seq: int = 0) -> tuple[list[Record], int]:
    """:func:`decode_runs`, record by record."""
    runs, valid = decode_runs(data, from_seq)
    return list(records_of(runs)), valid


def highest_seq(data: bytes) -> int:
    """The highest seq of a segment's valid records (0: none), read from their headers (a
    RUNS or BLOCK record's names its last record's), without unpacking one."""
    highest = 0
    for _, kind, seq, _, _, _ in _walk(data):
        if kind not in _PACKED and kind not in _KINDS:
            break
        highest = max(highest, seq)
    return highest


class SessionCounts:
    """Open sessions and their frame counts, as the journal's records say (writer thread)."""

    def __init__(self) -> None:
        self.open: dict[str, dict[str, Any]] = {}

    def observe(self, record: Record) -> None:
        self.observe_fields(record.kind, record.connection, record.payload)

    def observe_runs(self, runs: Iterable[Pending]) -> None:
        """:meth:`observe_fields` of each record of ``runs`` in turn (a run's frames at once)."""
        for kind, _, _, connection, payloads in runs:
            if kind == EVENT:
                for payload in payloads:
                    self.observe_fields(kind, connection, payload)
            else:
                self.count(connection, len(payloads))

    def count(self, connection: str, frames: int) -> None:
        """``frames`` frames (or snapshots) of ``connection`` came."""
        session = self.open.get(connection)
        if session is not None:
            session["frames"] += frames

    def observe_fields(self, kind: int, connection: str, payload: bytes) -> None:
        if kind in (FRAME, SNAPSHOT):
            self.count(connection, 1)
            return
        event = orjson.loads(payload)
        if "checkpoint" in event:
            # what the segments before said, if they are gone; a session opened by an
            # earlier process stays open here (the writer of a new process never saw it)
            for session, opened in event["checkpoint"].items():
                self.open.setdefault(session, dict(opened))
        elif event.get("event") == "session_opened":
            self.open[event["session"]] = {**event, "frames": 0}
        elif event.get("event") == "session_closed":
            self.open.pop(event["session"], None)

    def checkpoint(self) -> bytes:
        return orjson.dumps({"checkpoint": self.open})
