"""Pure partition paths: contract folder encoding, file names and local partition dates."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import PurePosixPath
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recorder.paths import (
    decode_contract,
    encode_contract,
    file_name,
    partition_date,
    partition_dir,
    seq_range,
)

TEHRAN = ZoneInfo("Asia/Tehran")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc_us(*args: int) -> int:
    """Microseconds since the epoch of a UTC wall-clock time."""
    return (datetime(*args, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("contract", "encoded"),
    [
        ("1001", "1001"),
        ("012345", "012345"),
        ("GOLD-APR_1", "GOLD-APR%5F1"),
        ("a/b", "a%2Fb"),
        ("/", "%2F"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("../etc", "%2E%2E%2Fetc"),
        ("a=b", "a%3Db"),
        ("100%", "100%25"),
        ("%2F", "%252F"),
        ("a b", "a%20b"),
        ("~x", "%7Ex"),
        ("a+b", "a%2Bb"),
        ("a\\b", "a%5Cb"),
        ("سکه-طلا", "%D8%B3%DA%A9%D9%87-%D8%B7%D9%84%D8%A7"),
    ],
)
def test_encode_contract_gives_a_safe_folder_name_that_decodes_back(
    contract: str, encoded: str
) -> None:
    """Plain ids stay as they are; every other byte is percent-encoded and decodes back."""
    assert encode_contract(contract) == encoded
    assert decode_contract(encoded) == contract


def test_encode_contract_refuses_an_empty_identifier() -> None:
    """An empty identifier has no folder name and raises ValueError."""
    with pytest.raises(ValueError, match="cannot be empty"):
        encode_contract("")


@given(st.text(min_size=1))
def test_any_contract_round_trips_through_a_safe_folder_name(contract: str) -> None:
    """For any non-empty text the encoded name decodes back and is one plain folder name."""
    encoded = encode_contract(contract)

    assert decode_contract(encoded) == contract
    assert "/" not in encoded
    assert encoded not in (".", "..")
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_%")


@pytest.mark.parametrize(
    ("table", "day", "contract", "expected"),
    [
        ("best_limit", "2026-05-29", "1001", "best_limit/date=2026-05-29/contract=1001"),
        ("aggregate", "2026-01-01", "012345", "aggregate/date=2026-01-01/contract=012345"),
        ("extras", "2026-05-29", "a/b", "extras/date=2026-05-29/contract=a%2Fb"),
        ("contract_info", "2026-05-29", "..", "contract_info/date=2026-05-29/contract=%2E%2E"),
        ("quarantine", "2026-05-29", None, "quarantine/date=2026-05-29"),
    ],
)
def test_partition_dir_layout(table: str, day: str, contract: str | None, expected: str) -> None:
    """The partition folder is table/date=D/contract=<encoded>, or table/date=D without one."""
    path = partition_dir(table, day, contract)

    assert path == PurePosixPath(expected)
    assert ".." not in path.parts


@pytest.mark.parametrize(
    ("first", "last", "tag", "name"),
    [
        (1, 1, "", "00000000000000000001-00000000000000000001.parquet"),
        (42, 1000, "", "00000000000000000042-00000000000000001000.parquet"),
        (0, 2**63 - 1, "", "00000000000000000000-09223372036854775807.parquet"),
        (7, 9, "compact", "00000000000000000007-00000000000000000009.compact.parquet"),
    ],
)
def test_file_name_and_seq_range_round_trip(first: int, last: int, tag: str, name: str) -> None:
    """file_name writes both seqs as 20 digits and seq_range reads them back."""
    assert file_name(first, last, tag) == name
    assert seq_range(name) == (first, last)


@pytest.mark.parametrize(
    "name",
    [
        ".00000000000000000001-00000000000000000002.parquet.tmp",
        "00000000000000000001-00000000000000000002.parquet.tmp",
        "1-2.parquet",
        "part-0.parquet",
        "00000000000000000001-00000000000000000002.PARQUET",
        "00000000000000000001_00000000000000000002.parquet",
        "",
    ],
)
def test_seq_range_of_a_foreign_name_is_none(name: str) -> None:
    """A name that file_name did not make (temporary files included) has no seq range."""
    assert seq_range(name) is None


@given(
    st.lists(
        st.tuples(st.integers(0, 10**20 - 1), st.integers(0, 10**20 - 1)).map(sorted),
        min_size=2,
        max_size=20,
        unique_by=lambda pair: pair[0],
    )
)
def test_file_names_sort_in_seq_order(ranges: list[list[int]]) -> None:
    """Sorting file names as text sorts them by their first seq."""
    names = [file_name(first, last) for first, last in ranges]

    assert [seq_range(name) for name in sorted(names)] == sorted(
        (first, last) for first, last in ranges
    )


@pytest.mark.parametrize(
    ("instant_us", "expected"),
    [
        (utc_us(2026, 5, 28, 20, 29, 59, 999999), date(2026, 5, 28)),
        (utc_us(2026, 5, 28, 20, 30, 0, 0), date(2026, 5, 29)),
        (utc_us(2026, 5, 29, 12, 0, 0, 0), date(2026, 5, 29)),
        (utc_us(2026, 12, 31, 20, 29, 59, 999999), date(2026, 12, 31)),
        (utc_us(2026, 12, 31, 20, 30, 0, 0), date(2027, 1, 1)),
    ],
)
def test_partition_date_turns_at_tehran_midnight(instant_us: int, expected: date) -> None:
    """The partition date is the Asia/Tehran calendar date: it turns at 20:30 UTC."""
    assert partition_date(instant_us, TEHRAN) == expected


@pytest.mark.parametrize(
    ("instant_us", "expected"),
    [
        (utc_us(2026, 5, 28, 23, 59, 59, 999999), date(2026, 5, 28)),
        (utc_us(2026, 5, 29, 0, 0, 0, 0), date(2026, 5, 29)),
        (0, date(1970, 1, 1)),
        (-1, date(1969, 12, 31)),
    ],
)
def test_partition_date_in_utc(instant_us: int, expected: date) -> None:
    """In UTC the partition date turns at 00:00 UTC, before the epoch included."""
    assert partition_date(instant_us, UTC) == expected
