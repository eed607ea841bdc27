"""Journal records: the bytes a segment is made of, and what they say about sessions.

A segment (see :mod:`recorder.journal`) is a sequence of records::

    u32 body length | u32 crc32(body) | body
    body = u8 kind | i64 seq | i64 received_us | u16 len(connection) | connection | payload

``kind`` is FRAME (payload = the frame's bytes), SNAPSHOT, EVENT (payload = JSON of a
connection event or of a checkpoint) or BLOCK: the records one write carries, packed column
by column under the one CRC of the BLOCK record (seq = the last record's)::

    u32 n | n x u8 kind | n x i64 seq | n x i64 received_us | n x u16 len(connection)
          | n x u32 len(payload) | connection 1 | payload 1 | ... | connection n | payload n

A BLOCK is built from whole columns by C code (``array``, ``bytes.join``) and checked by
one ``zlib.crc32``, which releases the GIL: a record per frame, each with its own header
and CRC, cost the event loop ~1.5 us a frame. Segments of single records, as earlier
versions wrote them, read the same. A corrupt BLOCK is cut whole: its CRC cannot tell which
of its records is damaged.
"""

from __future__ import annotations

import itertools
import struct
import sys
import zlib
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, repeat
from operator import add
from typing import Any, NamedTuple

import orjson

FRAME, EVENT, SNAPSHOT, BLOCK = 1, 2, 3, 4
_KINDS = (FRAME, EVENT, SNAPSHOT)
_KIND_BYTES = bytes(_KINDS)
_HEAD = struct.Struct("<II")
_BODY = struct.Struct("<BqqH")
_COUNT = struct.Struct("<I")
#: bytes of one record in a BLOCK's columns: kind, seq, received_us, two lengths
_RECORD_COLUMNS_BYTES = 1 + 8 + 8 + 2 + 4
#: records per BLOCK at most (a writer behind by more writes several)
BLOCK_RECORDS = 512
#: BLOCK columns are written little-endian whatever the machine
_SWAP = sys.byteorder != "little"
#: records queued by the event loop, a run of one kind, connection and receive time:
#: (kind, first seq, received_us, connection, payloads), the seqs following the first; a plain
#: tuple per run (the frames of one socket read), not one object per record
Pending = tuple[int, int, int, str, list[bytes]]


class Record(NamedTuple):
    """One journal record as read back (a tuple: made 3 times faster than a frozen
    dataclass, and recovery makes one per frame)."""

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


def encode_block(
    kinds: bytes,
    seqs: Sequence[int],
    received: Sequence[int],
    connections: Sequence[str],
    payloads: Sequence[bytes],
) -> list[bytes]:
    """The bytes of one BLOCK record holding the records given column by column (in order),
    as parts to write."""
    conns = list(map(str.encode, connections))
    columns = [
        array("q", seqs),
        array("q", received),
        array("H", map(len, conns)),
        array("I", map(len, payloads)),
    ]
    if _SWAP:
        for column in columns:
            column.byteswap()
    block = b"".join(
        [
            _COUNT.pack(len(kinds)),
            kinds,
            *(c.tobytes() for c in columns),
            *itertools.chain.from_iterable(zip(conns, payloads, strict=True)),
        ]
    )
    body = _BODY.pack(BLOCK, seqs[-1], received[-1], 0)
    crc = zlib.crc32(block, zlib.crc32(body))  # the GIL is released over the block
    return [_HEAD.pack(len(body) + len(block), crc), body, block]


def _unpack_block(block: bytes) -> list[Record] | None:
    """The records of a BLOCK's payload; None if its columns do not add up (a corrupt block)."""
    if len(block) < _COUNT.size:
        return None
    (n,) = _COUNT.unpack_from(block)
    if len(block) < _COUNT.size + n * _RECORD_COLUMNS_BYTES:
        return None  # the columns cannot be there (frombytes of a cut column would raise)
    offset = _COUNT.size
    kinds = block[offset : offset + n]
    offset += n
    columns = []
    for code in ("q", "q", "H", "I"):
        column = array(code)
        width = column.itemsize * n
        column.frombytes(block[offset : offset + width])
        if _SWAP:
            column.byteswap()
        columns.append(column)
        offset += width
    seqs, received, conn_lens, payload_lens = columns
    if offset + sum(conn_lens) + sum(payload_lens) != len(block):
        return None
    if kinds.translate(None, _KIND_BYTES):  # a kind that is none of _KINDS
        return None
    # record i: its connection at starts[i]:names_end[i], its payload up to starts[i + 1]
    # (C loops: a Python loop per record cost 1.6 us of a replay's 1.0 here)
    starts = list(accumulate(map(add, conn_lens, payload_lens), initial=offset))
    names_end = list(map(add, starts, conn_lens))
    names = list(map(block.__getitem__, map(slice, starts, names_end)))
    text = {name: str(name, "utf-8", "replace") for name in set(names)}
    payloads = map(block.__getitem__, map(slice, names_end, starts[1:]))
    fields = zip(kinds, seqs, received, map(text.__getitem__, names), payloads, strict=True)
    return list(map(tuple.__new__, repeat(Record), fields))


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


def decode(data: bytes, from_seq: int = 0) -> tuple[list[Record], int]:
    """Records of a segment's bytes and the length of its valid prefix (the rest is torn).

    ``from_seq``: records of lower seqs are checked but not returned, and a BLOCK whose last
    seq is lower is not unpacked (reading back from the middle of a segment).
    """
    records: list[Record] = []
    valid = 0
    for end, kind, seq, received_us, conn_start, conn_end in _walk(data):
        if seq < from_seq and (kind == BLOCK or kind in _KINDS) and conn_end <= end:
            valid = end  # a BLOCK's header names its last record's seq
            continue
        if kind == BLOCK and conn_end == conn_start:
            block = _unpack_block(data[conn_end:end])
            if block is None:
                break
            records.extend(r for r in block if r.seq >= from_seq)
            valid = end
            continue
        if kind not in _KINDS or conn_end > end:
            break
        connection = data[conn_start:conn_end].decode("utf-8", "replace")
        records.append(Record(kind, seq, received_us, connection, data[conn_end:end]))
        valid = end
    return records, valid


def highest_seq(data: bytes) -> int:
    """The highest seq of a segment's valid records (0: none), read from their headers (a
    BLOCK's names its last record's), without unpacking a BLOCK."""
    highest = 0
    for _, kind, seq, _, _, _ in _walk(data):
        if kind != BLOCK and kind not in _KINDS:
            break
        highest = max(highest, seq)
    return highest


def frame_runs(records: Iterable[Record], most: int = 4_096) -> Iterator[list[Record]]:
    """``records`` in order, in lists: the frames received together (one socket read:
    consecutive seqs, one receive time and connection; ``most`` at most) in one, every
    other record in one of its own."""
    run: list[Record] = []
    for record in records:
        if run and (
            record.kind != FRAME
            or record.seq != run[-1].seq + 1
            or record.received_us != run[0].received_us
            or record.connection != run[0].connection
            or len(run) >= most
        ):
            yield run
            run = []
        if record.kind == FRAME:
            run.append(record)
        else:
            yield [record]
    if run:
        yield run


class SessionCounts:
    """Open sessions and their frame counts, as the journal's records say (writer thread)."""

    def __init__(self) -> None:
        self.open: dict[str, dict[str, Any]] = {}

    def observe(self, record: Record) -> None:
        self.observe_fields(record.kind, record.connection, record.payload)

    def observe_many(
        self, kinds: bytes, connections: Sequence[str], payloads: Sequence[bytes]
    ) -> None:
        """:meth:`observe_fields` of each record in turn; the frames between two events are
        counted per connection at once (C code), not one by one."""
        start = 0
        while start < len(kinds):
            event = kinds.find(EVENT, start)
            stop = len(kinds) if event < 0 else event
            if stop > start:
                for connection, frames in Counter(connections[start:stop]).items():
                    self.count(connection, frames)
            if event < 0:
                return
            self.observe_fields(EVENT, connections[event], payloads[event])
            start = event + 1

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
