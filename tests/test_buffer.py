"""Pure buffer rules: when partitions are due, how they are taken and how failed ones return."""

from __future__ import annotations

from typing import Any

import pytest

from recorder.buffer import Batch, Buffer, Key

A: Key = ("best_limit", "2026-05-29", "1001")
B: Key = ("best_limit", "2026-05-29", "1002")
C: Key = ("aggregate", "2026-05-29", "1001")
Q: Key = ("quarantine", "2026-05-29", None)


def rows(*seqs: int) -> list[tuple[Any, ...]]:
    """best_limit rows (exchange_ts, received_at, seq, level, ...) with the given seqs."""
    return [(1_000 * s, 1_000 * s + 1, s, 1, 10, 100.0, 20, 101.0) for s in seqs]


def seqs_of(batch: Batch) -> list[int]:
    return [row[2] for row in batch.rows]


# (flush_interval, max_rows_per_file, max_buffered_rows), [(key, row count, now)], now, due keys
DUE_CASES = [
    pytest.param((5.0, 10, 100), [], 100.0, [], id="empty-buffer"),
    pytest.param((5.0, 10, 100), [(A, 1, 0.0)], 4.999, [], id="younger-than-interval"),
    pytest.param((5.0, 10, 100), [(A, 1, 0.0)], 5.0, [A], id="exactly-the-interval"),
    pytest.param((5.0, 10, 100), [(A, 1, 0.0), (A, 1, 4.0)], 5.0, [A], id="age-of-oldest-row"),
    pytest.param((5.0, 10, 100), [(A, 1, 0.0), (B, 1, 3.0)], 5.0, [A], id="only-the-old-one"),
    pytest.param((5.0, 10, 100), [(A, 1, 0.0), (B, 1, 3.0)], 8.0, [A, B], id="both-old"),
    pytest.param((5.0, 10, 100), [(B, 1, 0.0), (A, 1, 1.0)], 9.0, [B, A], id="opening-order"),
    pytest.param((5.0, 3, 100), [(A, 3, 0.0)], 0.0, [A], id="per-file-cap-reached"),
    pytest.param((5.0, 3, 100), [(A, 2, 0.0), (B, 1, 0.0)], 0.0, [], id="per-file-cap-not-met"),
    pytest.param((5.0, 3, 100), [(A, 2, 0.0), (A, 2, 1.0)], 1.0, [A], id="cap-over-two-adds"),
    pytest.param((5.0, 3, 100), [(A, 1, 0.0), (B, 3, 1.0)], 1.0, [B], id="cap-only-that-one"),
    pytest.param((5.0, 10, 4), [(A, 2, 0.0), (B, 2, 0.0)], 0.0, [A, B], id="global-cap"),
    pytest.param((5.0, 10, 4), [(A, 2, 0.0), (B, 1, 0.0)], 0.0, [], id="global-cap-not-met"),
    pytest.param((5.0, 10, 4), [(A, 1, 0.0), (B, 1, 1.0), (C, 2, 2.0)], 2.0, [A, B, C], id="g3"),
    pytest.param((0.5, 10, 100), [(A, 1, 10.0), (Q, 1, 10.2)], 10.6, [A], id="short-interval"),
]


@pytest.mark.parametrize(("limits", "adds", "now", "expected"), DUE_CASES)
def test_due_partitions(
    limits: tuple[float, int, int],
    adds: list[tuple[Key, int, float]],
    now: float,
    expected: list[Key],
) -> None:
    """due(now) lists the partitions that are old enough or full, in the order they opened."""
    buffer = Buffer(*limits)
    seq = 0
    for key, count, at in adds:
        buffer.add(key, rows(*range(seq + 1, seq + count + 1)), at)
        seq += count

    assert buffer.due(now) == expected
    assert buffer.rows == seq


@pytest.mark.parametrize(
    ("limits", "adds", "results"),
    [
        pytest.param((5.0, 3, 100), [(A, 1), (A, 1), (A, 1)], [False, False, True], id="per-file"),
        pytest.param((5.0, 3, 100), [(A, 5)], [True], id="per-file-at-once"),
        pytest.param((5.0, 3, 100), [(A, 2), (B, 2), (A, 1)], [False, False, True], id="mixed"),
        pytest.param((5.0, 10, 4), [(A, 2), (B, 1), (C, 1)], [False, False, True], id="global"),
        pytest.param((5.0, 10, 4), [(A, 0), (B, 0)], [False, False], id="no-rows"),
    ],
)
def test_add_reports_a_full_partition_or_buffer(
    limits: tuple[float, int, int], adds: list[tuple[Key, int]], results: list[bool]
) -> None:
    """add returns True exactly when it makes its partition or the whole buffer full."""
    buffer = Buffer(*limits)

    assert [buffer.add(key, rows(*range(count)), 0.0) for key, count in adds] == results


def test_full_partition_is_due_at_once() -> None:
    """A partition that reached max_rows_per_file is due at the moment it became full."""
    buffer = Buffer(flush_interval=60.0, max_rows_per_file=2, max_buffered_rows=100)
    buffer.add(B, rows(1), 0.0)

    assert buffer.add(A, rows(2, 3), 0.0) is True
    assert buffer.due(0.0) == [A]


def test_global_cap_makes_every_partition_due() -> None:
    """Once the buffer holds max_buffered_rows, every partition is due, even a one-row one."""
    buffer = Buffer(flush_interval=60.0, max_rows_per_file=100, max_buffered_rows=3)
    buffer.add(A, rows(1), 0.0)
    buffer.add(Q, [(1, 2, "conn-1", "frame: not JSON", "x")], 0.0)

    assert buffer.add(B, rows(3), 0.0) is True
    assert buffer.due(0.0) == [A, Q, B]


@pytest.mark.parametrize(
    ("cap", "count", "sizes"),
    [(3, 7, [3, 3, 1]), (3, 6, [3, 3]), (3, 2, [2]), (1, 3, [1, 1, 1]), (10, 10, [10])],
)
def test_take_splits_at_max_rows_per_file_keeping_order(
    cap: int, count: int, sizes: list[int]
) -> None:
    """take returns batches of at most max_rows_per_file rows, in arrival order, and empties."""
    buffer = Buffer(flush_interval=5.0, max_rows_per_file=cap, max_buffered_rows=1000)
    buffer.add(A, rows(*range(1, count + 1)), 0.0)

    batches = buffer.take([A])

    assert [len(b.rows) for b in batches] == sizes
    assert [s for b in batches for s in seqs_of(b)] == list(range(1, count + 1))
    assert {b.key for b in batches} == {A}
    assert (len(buffer), buffer.rows, buffer.due(100.0)) == (0, 0, [])


def test_take_leaves_other_partitions_and_skips_unknown_keys() -> None:
    """take removes only the partitions asked for; a key not buffered gives no batch."""
    buffer = Buffer(flush_interval=5.0, max_rows_per_file=10, max_buffered_rows=1000)
    buffer.add(A, rows(1, 2), 0.0)
    buffer.add(B, rows(3), 0.0)

    batches = buffer.take([B, C])

    assert [(b.key, seqs_of(b)) for b in batches] == [(B, [3])]
    assert (len(buffer), buffer.rows) == (1, 2)
    assert [(b.key, seqs_of(b)) for b in buffer.take_all()] == [(A, [1, 2])]


def test_restore_puts_rows_back_in_front_in_order() -> None:
    """Restored batches go before rows that arrived since, in their original order."""
    buffer = Buffer(flush_interval=5.0, max_rows_per_file=2, max_buffered_rows=1000)
    buffer.add(A, rows(1, 2, 3, 4, 5), 0.0)
    buffer.add(B, rows(6), 0.0)
    failed = buffer.take([A, B])
    buffer.add(A, rows(7, 8), 1.0)

    buffer.restore(failed, now=2.0)

    assert buffer.rows == 8
    assert len(buffer) == 2
    taken = buffer.take_all()
    assert [(b.key, seqs_of(b)) for b in taken] == [
        (A, [1, 2]),
        (A, [3, 4]),
        (A, [5, 7]),
        (A, [8]),
        (B, [6]),
    ]
    assert buffer.rows == 0


def test_restored_partition_waits_a_new_interval() -> None:
    """A restored partition that had no rows left is due again one interval after restore."""
    buffer = Buffer(flush_interval=5.0, max_rows_per_file=10, max_buffered_rows=1000)
    buffer.add(A, rows(1, 2), 0.0)
    failed = buffer.take([A])

    buffer.restore(failed, now=10.0)

    assert buffer.due(14.9) == []
    assert buffer.due(15.0) == [A]


@pytest.mark.parametrize(
    ("key", "batch_rows", "first", "last"),
    [
        (A, rows(5, 6, 9), 5, 9),
        (A, rows(42), 42, 42),
        (C, [(0, 1, 17, None, None, 3, 4, 5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)], 17, 17),
        (Q, [(1, 11, "c", "r", "x"), (2, 12, "c", "r", "y")], 11, 12),
        (("extras", "2026-05-29", "1001"), [(1, 2, 30, "S", None, "{}")], 30, 30),
    ],
)
def test_batch_first_and_last_seq(
    key: Key, batch_rows: list[tuple[Any, ...]], first: int, last: int
) -> None:
    """Batch.first_seq and last_seq read the seq column of the first and last row."""
    batch = Batch(key, batch_rows)

    assert (batch.first_seq, batch.last_seq) == (first, last)


@pytest.mark.parametrize(
    ("cap", "files"),
    [(4, [(1, 2), (3, 4)]), (3, [(1, 1), (2, 2), (3, 3), (4, 4)]), (7, [(1, 3), (4, 4)])],
)
def test_take_never_splits_the_levels_of_one_frame(cap: int, files: list[tuple[int, int]]) -> None:
    """A batch ends only at a frame boundary, so each file holds every level of its seqs."""
    buffer = Buffer(5.0, cap, 1000)
    key: Key = ("best_limit", "2026-05-29", "1001")
    rows = [(0, 0, seq, level, 1, 1.0, 1, 1.0) for seq in (1, 2, 3, 4) for level in (1, 2, 3)]
    buffer.add(key, rows, 0.0)
    batches = buffer.take([key])
    assert [(b.first_seq, b.last_seq) for b in batches] == files
    assert [row for b in batches for row in b.rows] == rows
