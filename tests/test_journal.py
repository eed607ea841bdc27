"""The journal's on-disk form: what one write of the writer thread leaves in a segment."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
from structlog.testing import capture_logs

from recorder.journal import Journal
from recorder.records import (
    BLOCK,
    BLOCK_RECORDS,
    EVENT,
    FRAME,
    SNAPSHOT,
    Record,
    SessionCounts,
    decode,
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


def test_one_write_is_one_block_record_that_reads_back_as_every_record_queued(
    tmp_path: Path,
) -> None:
    """The writer packs what the event loop queued into BLOCK records (at most BLOCK_RECORDS
    each, under one CRC), and reading gives each record back exactly, in order."""
    queued = _queued(BLOCK_RECORDS + 100)
    journal = _write(tmp_path, queued)
    [segment] = journal.segments()
    # the segment's header (the open sessions), then two blocks; each named by its last seq
    assert [_kind_and_seq(r) for r in _raw_records(segment)] == [
        (EVENT, 0),
        (BLOCK, BLOCK_RECORDS),
        (BLOCK, len(queued)),
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


def test_a_block_counts_each_sessions_frames_as_record_by_record_would(tmp_path: Path) -> None:
    """Frames are counted per open session between the events that open and close them."""
    queued = _queued(200)
    one_by_one = SessionCounts()
    one_by_one.open["conn-1"] = {"session": "conn-1", "frames": 0}
    for r in queued:
        one_by_one.observe(r)
    at_once = SessionCounts()
    at_once.open["conn-1"] = {"session": "conn-1", "frames": 0}
    at_once.observe_many(
        bytes(r.kind for r in queued), [r.connection for r in queued], [r.payload for r in queued]
    )
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
    assert _kind_and_seq(block) == (BLOCK, 33)
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
    """A BLOCK whose CRC holds but whose columns are shorter than its count says (a defect,
    never seen) is where the valid journal ends, like a corrupt one: reading never raises."""
    good = encode(FRAME, 1, 1_001, "conn-1", b'{"x": 1}')
    cut = encode(BLOCK, 3, 1_003, "", (2).to_bytes(4, "little") + bytes([FRAME, FRAME]) + b"12345")
    records, valid = decode(good + cut)
    assert [(r.seq, r.payload) for r in records] == [(1, b'{"x": 1}')]
    assert valid == len(good)
