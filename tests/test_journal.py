"""The journal's on-disk form: what one write of the writer thread leaves in a segment."""

from __future__ import annotations

import threading
import zlib
from array import array
from pathlib import Path

import orjson
from structlog.testing import capture_logs

from recorder.journal import Journal
from recorder.records import (
    BLOCK,
    BLOCK_RECORDS,
    EVENT,
    FRAME,
    RUNS,
    SNAPSHOT,
    Pending,
    Record,
    SessionCounts,
    decode,
    decode_runs,
    encode,
)


def _queued(count: int) -> list[Record]:
    """Frames of two connections, a snapshot and session events in between, as queued."""
    opened = orjson.dumps({"event": "session_opened", "session": "conn-2"})
    closed = orjson.dumps({"event": "session_closed", "session": "conn-1"})
    records = []
    for seq in range(1, count + 1):
        if seq == 40:
            records.append(Record(EVENT, seq, 1_000 + seq, "conn-2", opened))
        elif seq == 90:
            records.append(Record(EVENT, seq, 1_000 + seq, "conn-1", closed))
        elif seq == 7:
            records.append(Record(SNAPSHOT, seq, 1_000 + seq, "conn-1", b'{"s": 7}'))
        else:
            connection = "conn-1" if seq % 2 or seq < 40 else "conn-2"
            frame = b'{"contractId":"%d","n":"%s"}' % (seq, "\u0628".encode() * (seq % 5))
            records.append(Record(FRAME, seq, 1_000 + seq, connection, frame))
    return records


def _write(data_dir: Path, records: list[Record]) -> Journal:
    """Queue ``records``, then start the writer thread: it writes them in one go."""
    journal = Journal(data_dir, fsync=False, write_interval=0.01)
    for r in records:
        journal.append(r.kind, r.seq, r.received_us, r.connection, r.payload)
    journal.start()
    journal.close()
    return journal


def _raw_records(segment: Path) -> list[bytes]:
    """Each record as it lies in the file (header included), blocks not opened."""
    data, offset, out = segment.read_bytes(), 0, []
    while offset < len(data):
        end = offset + 8 + int.from_bytes(data[offset : offset + 4], "little")
        out.append(data[offset:end])
        offset = end
    return out


def _kind_and_seq(record: bytes) -> tuple[int, int]:
    return record[8], int.from_bytes(record[9:17], "little", signed=True)


def test_one_write_is_one_runs_record_that_reads_back_as_every_record_queued(
    tmp_path: Path,
) -> None:
    """The writer packs what the event loop queued into RUNS records (at most BLOCK_RECORDS
    records each, under one CRC), and reading gives each record back exactly, in order."""
    queued = _queued(BLOCK_RECORDS + 100)
    journal = _write(tmp_path, queued)
    [segment] = journal.segments()
    # the segment's header (the open sessions), then two RUNS records; each named by its
    # last seq
    assert [_kind_and_seq(r) for r in _raw_records(segment)] == [
        (EVENT, 0),
        (RUNS, BLOCK_RECORDS),
        (RUNS, len(queued)),
    ]
    found = list(Journal(tmp_path).recover())
    assert found[0].kind == EVENT  # the segment's checkpoint
    assert found[1:] == queued
    assert (journal.written_seq, journal.backlog_bytes) == (len(queued), 0)


def test_reading_from_a_seq_gives_the_records_from_it_and_skips_whole_blocks_before_it(
    tmp_path: Path,
) -> None:
    """``decode(data, from_seq)`` (the read-back of spilled frames, recorder.spill) gives
    exactly the records a whole read gives from that seq on, with the same valid length,
    whether the seq is a block's first, inside a block or past every record."""
    queued = _queued(2 * BLOCK_RECORDS + 50)
    journal = _write(tmp_path, queued)
    data = journal.segments()[0].read_bytes()
    everything, valid = decode(data)
    for from_seq in (1, 2, 40, BLOCK_RECORDS, BLOCK_RECORDS + 1, 1_000, len(queued) + 1):
        assert decode(data, from_seq) == ([r for r in everything if r.seq >= from_seq], valid)
    torn = data[:-10]
    assert decode(torn, BLOCK_RECORDS + 1) == (
        [r for r in decode(torn)[0] if r.seq >= BLOCK_RECORDS + 1],
        decode(torn)[1],
    )


def test_frames_queued_together_read_back_as_frames_queued_one_by_one(tmp_path: Path) -> None:
    """``extend`` (the frames of one socket read) queues what ``append`` of each would:
    consecutive seqs, one receive time and connection, between records appended alone."""
    frames = [b'{"contractId":"%d"}' % i for i in range(2_500)]
    journal = Journal(tmp_path, fsync=False, write_interval=0.01)
    journal.append(EVENT, 1, 900, "conn-1", b'{"event": "x"}')
    journal.extend(FRAME, 2, 1_000, "conn-1", frames[:1])
    journal.extend(FRAME, 3, 1_001, "conn-1", frames[1:2_400])
    journal.append(SNAPSHOT, 2_402, 1_002, "conn-2", b'{"s": 1}')
    journal.extend(FRAME, 2_403, 1_003, "conn-2", frames[2_400:])
    assert journal.backlog_bytes == sum(map(len, frames)) + 14 + 8
    journal.start()
    journal.close()

    found = list(Journal(tmp_path).recover())[1:]  # after the segment's checkpoint
    assert found == [
        Record(EVENT, 1, 900, "conn-1", b'{"event": "x"}'),
        Record(FRAME, 2, 1_000, "conn-1", frames[0]),
        *(Record(FRAME, 2 + i, 1_001, "conn-1", frames[i]) for i in range(1, 2_400)),
        Record(SNAPSHOT, 2_402, 1_002, "conn-2", b'{"s": 1}'),
        *(Record(FRAME, 3 + i, 1_003, "conn-2", frames[i]) for i in range(2_400, 2_500)),
    ]
    assert journal.written_seq == 2_502


def test_runs_count_each_sessions_frames_as_record_by_record_would(tmp_path: Path) -> None:
    """Frames are counted per open session between the events that open and close them."""
    queued = _queued(200)
    one_by_one = SessionCounts()
    one_by_one.open["conn-1"] = {"session": "conn-1", "frames": 0}
    for r in queued:
        one_by_one.observe(r)
    at_once = SessionCounts()
    at_once.open["conn-1"] = {"session": "conn-1", "frames": 0}
    at_once.observe_runs(decode_runs(_write(tmp_path, queued).segments()[0].read_bytes())[0][1:])
    assert at_once.open == one_by_one.open
    # conn-2 opens at seq 40 and has the even seqs after it but 90 (an event): 79 frames
    assert at_once.open["conn-2"]["frames"] == 79


def test_a_corrupt_block_ends_the_valid_prefix_and_earlier_records_stay(tmp_path: Path) -> None:
    """Records written one by one (earlier versions) and blocks read the same; a block whose
    CRC fails is cut whole, with the warning, and the records before it are kept."""
    journal = _write(tmp_path, _queued(30))
    [segment] = journal.segments()
    single = encode(FRAME, 31, 1_031, "conn-1", b'{"single": 31}')
    later = [Record(FRAME, seq, 1_000 + seq, "conn-1", b'{"x": %d}' % seq) for seq in (32, 33)]
    [_, block] = _raw_records(_write(tmp_path / "later", later).segments()[0])
    assert _kind_and_seq(block) == (RUNS, 33)
    broken = bytearray(block)
    broken[-1] ^= 0xFF
    segment.write_bytes(segment.read_bytes() + single + block + bytes(broken))
    with capture_logs() as logs:
        found = list(Journal(tmp_path).recover())
    assert [r.seq for r in found[1:]] == [*range(1, 34)]
    assert found[-3].payload == b'{"single": 31}'
    cut = [e for e in logs if e["event"] == "journal tail cut"]
    assert [e["bytes_cut"] for e in cut] == [len(broken)]
    records, valid = decode(segment.read_bytes())
    assert (len(records) - 1, valid) == (33, segment.stat().st_size)


def test_close_writes_what_is_queued_at_once_whatever_the_write_interval(tmp_path: Path) -> None:
    """close() wakes the writer, which writes what is queued and stops: it does not wait out
    the write interval (an hour here)."""
    journal = Journal(tmp_path, fsync=False, write_interval=3600)
    journal.start()
    journal.append(FRAME, 1, 1_001, "conn-1", b'{"x": 1}')
    closer = threading.Thread(target=journal.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert journal.written_seq == 1
    assert [r.seq for r in Journal(tmp_path).recover()][1:] == [1]


def test_a_block_whose_columns_are_cut_short_ends_the_valid_prefix(tmp_path: Path) -> None:
    """A RUNS (or BLOCK) record whose CRC holds but whose columns are shorter than its counts
    say (a defect, never seen) is where the valid journal ends, like a corrupt one: reading
    never raises."""
    good = encode(FRAME, 1, 1_001, "conn-1", b'{"x": 1}')
    for kind in (RUNS, BLOCK):
        columns = (2).to_bytes(4, "little") * (1 + (kind == RUNS)) + bytes([FRAME, FRAME])
        cut = encode(kind, 3, 1_003, "", columns + b"12345")
        records, valid = decode(good + cut)
        assert [(r.seq, r.payload) for r in records] == [(1, b'{"x": 1}')]
        assert valid == len(good)


def test_runs_whose_counts_disagree_end_the_valid_prefix(tmp_path: Path) -> None:
    """A RUNS record whose runs hold more records than it says, or whose lengths do not add
    up to its size, is cut like a corrupt one."""
    [_, good] = _raw_records(_write(tmp_path, _queued(30)).segments()[0])
    body = good[8:]
    block = bytearray(body[19:])
    runs = int.from_bytes(block[:4], "little")
    block[4:8] = (30 + 1).to_bytes(4, "little")  # one record more than the runs hold
    bad = encode(RUNS, 30, 1_030, "", bytes(block))
    assert decode(bad) == ([], 0)
    block = bytearray(body[19:])
    block[8 + runs - 1] = 9  # the last run's kind: none of the journal's
    assert decode(encode(RUNS, 30, 1_030, "", bytes(block))) == ([], 0)
    assert len(decode(encode(RUNS, 30, 1_030, "", body[19:]))[0]) == 30


def _encode_block(records: list[Record]) -> bytes:
    """``records`` as one BLOCK record, as the versions before RUNS wrote them."""
    conns = [r.connection.encode() for r in records]
    columns = [
        array("q", [r.seq for r in records]),
        array("q", [r.received_us for r in records]),
        array("H", map(len, conns)),
        array("I", [len(r.payload) for r in records]),
    ]
    parts = [len(records).to_bytes(4, "little"), bytes(r.kind for r in records)]
    parts += [c.tobytes() for c in columns]
    parts += [part for conn, r in zip(conns, records, strict=True) for part in (conn, r.payload)]
    block = b"".join(parts)
    body = bytes([BLOCK]) + records[-1].seq.to_bytes(8, "little")
    body += records[-1].received_us.to_bytes(8, "little") + bytes(2)
    crc = zlib.crc32(block, zlib.crc32(body))
    return (len(body) + len(block)).to_bytes(4, "little") + crc.to_bytes(4, "little") + body + block


def test_a_segment_of_blocks_as_earlier_versions_wrote_it_reads_the_same(tmp_path: Path) -> None:
    """A journal left by a version that wrote BLOCK records (every column per record) is
    read record for record as the same records written now, from any seq; a socket read's
    frames come back as one run, even where they straddle two BLOCKs."""
    queued = _queued(2 * BLOCK_RECORDS + 50)
    now = _write(tmp_path / "now", queued).segments()[0].read_bytes()
    checkpoint = now[: 8 + int.from_bytes(now[:4], "little")]
    pieces = [queued[i : i + BLOCK_RECORDS] for i in range(0, len(queued), BLOCK_RECORDS)]
    old = checkpoint + b"".join(map(_encode_block, pieces))
    for from_seq in (0, 1, 2, 40, BLOCK_RECORDS, BLOCK_RECORDS + 1, len(queued) + 1):
        assert decode(old, from_seq) == (decode(now, from_seq)[0], len(old))
        assert decode_runs(old, from_seq)[0] == decode_runs(now, from_seq)[0]

    reads = [
        Record(FRAME, seq, 1_000 + (seq > 700), "conn-1", b"%d" % seq) for seq in range(1, 1_201)
    ]
    pieces = [reads[i : i + BLOCK_RECORDS] for i in range(0, len(reads), BLOCK_RECORDS)]
    runs: list[Pending] = decode_runs(b"".join(map(_encode_block, pieces)), 3)[0]
    assert [run[:4] for run in runs] == [(FRAME, 3, 1_000, "conn-1"), (FRAME, 701, 1_001, "conn-1")]
    assert [run[4] for run in runs] == [
        [r.payload for r in reads[2:700]],
        [r.payload for r in reads[700:]],
    ]
