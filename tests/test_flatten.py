"""The pure flattener: frames become rows and extras, and ``to_message`` turns them back."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder.errors import FlattenError
from recorder.flatten import (
    ENVELOPE,
    ID_KEYS,
    Flattened,
    flatten,
    format_timestamp,
    parse_timestamp,
    to_message,
)
from recorder.plain import _PLAIN_SHAPE, BULK_LEVELS, flatten_fast, plain_frame
from recorder.schema import SECTION_TABLES, TABLES

TEHRAN = ZoneInfo("Asia/Tehran")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
#: 2026-05-29T12:00:00Z in microseconds since the epoch
NOON_US = 1_780_056_000_000_000

#: The complete example payload of document 000, section 9.
EXAMPLE: dict[str, Any] = {
    "channel": "IME Stream",
    "contractId": "1001",
    "timestamp": "2026-05-29T12:00:00.000000Z",
    "data": {
        "BestLimit": {
            "1": {
                "buy_quantity": 150,
                "buy_price": 245000,
                "sell_quantity": 100,
                "sell_price": 246000,
            },
            "2": {
                "buy_quantity": 120,
                "buy_price": 244500,
                "sell_quantity": 90,
                "sell_price": 246500,
            },
            "3": {
                "buy_quantity": 80,
                "buy_price": 244000,
                "sell_quantity": 70,
                "sell_price": 247000,
            },
        },
        "Aggregate": {
            "date": "2026-05-29",
            "time": "12:00:00",
            "trade_count": 120,
            "total_volume": 4500,
            "total_value": 1102500000,
            "closing_price": 245500,
            "last_price": 245700,
            "low_price": 244000,
            "high_price": 247000,
            "open_price": 244500,
            "previous_close": 243000,
        },
        "AllowedPriceRange": {"minAllowedPrice": 220000, "maxAllowedPrice": 270000},
        "ContractInfo": {"open_interest": 5400, "open_interest_changes": 120},
    },
}

#: The rows of EXAMPLE, wire columns in schema order.
EXAMPLE_ROWS: dict[str, list[tuple[Any, ...]]] = {
    "best_limit": [
        (1, 150, 245000.0, 100, 246000.0),
        (2, 120, 244500.0, 90, 246500.0),
        (3, 80, 244000.0, 70, 247000.0),
    ],
    "aggregate": [
        (
            date(2026, 5, 29),
            time(12, 0, 0),
            120,
            4500,
            1102500000,
            245500.0,
            245700.0,
            244000.0,
            247000.0,
            244500.0,
            243000.0,
        )
    ],
    "allowed_price_range": [(220000.0, 270000.0)],
    "contract_info": [(5400, 120)],
}

#: For each table, the Python type every wire column holds (None aside).
COLUMN_TYPES = {
    name: tuple(
        {"int": int, "float": float, "date": date, "time": time}[c.kind]
        for c in TABLES[name].wire_columns
    )
    for name in SECTION_TABLES.values()
}


def message(**changes: Any) -> dict[str, Any]:
    """A deep copy of EXAMPLE with top-level keys replaced (a value of ... deletes the key)."""
    result = copy.deepcopy(EXAMPLE)
    for key, value in changes.items():
        if value is ...:
            del result[key]
        else:
            result[key] = value
    return result


def data(**sections: Any) -> dict[str, Any]:
    """A deep copy of EXAMPLE's data with sections replaced (a value of ... deletes it)."""
    result = copy.deepcopy(EXAMPLE["data"])
    for name, value in sections.items():
        if value is ...:
            del result[name]
        else:
            result[name] = value
    return result


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def level(**fields: Any) -> dict[str, Any]:
    """EXAMPLE's BestLimit level 1 with fields replaced."""
    return {**EXAMPLE["data"]["BestLimit"]["1"], **fields}


def reason_of(frame: bytes) -> str:
    with pytest.raises(FlattenError) as caught:
        flatten(frame)
    return caught.value.reason


# --------------------------------------------------------------------------- the example


def test_example_gives_exactly_the_documented_rows() -> None:
    """Document 000's full example gives 3 best_limit rows and one row per other section."""
    flat = flatten(encode(EXAMPLE))

    assert flat.contract == "1001"
    assert flat.id_key == "contractId"
    assert flat.exchange_us == NOON_US
    assert flat.rows == EXAMPLE_ROWS
    assert {name: len(rows) for name, rows in flat.rows.items()} == {
        "best_limit": 3,
        "aggregate": 1,
        "allowed_price_range": 1,
        "contract_info": 1,
    }
    assert flat.extras == []


@pytest.mark.parametrize("table", list(EXAMPLE_ROWS))
def test_example_values_have_the_column_types(table: str) -> None:
    """Every value of the example is stored as its column's type (int, float, date, time)."""
    flat = flatten(encode(EXAMPLE))

    for row in flat.rows[table]:
        values = row[1:] if TABLES[table].levels else row
        assert tuple(type(v) for v in values) == COLUMN_TYPES[table]


def test_example_accepts_str_frames() -> None:
    """A frame given as text flattens like the same frame given as bytes."""
    assert flatten(json.dumps(EXAMPLE)) == flatten(encode(EXAMPLE))


# --------------------------------------------------------------------------- identifiers


@pytest.mark.parametrize(
    ("key", "value", "contract"),
    [
        ("contractId", "1001", "1001"),
        ("ContractId", "1001", "1001"),
        ("contractName", "GOLD-APR", "GOLD-APR"),
        ("contractName", "سکه-طلا", "سکه-طلا"),
        ("contractId", 1001, "1001"),
        ("ContractId", 1001, "1001"),
        ("contractId", "012345", "012345"),
    ],
)
def test_identifier_keys_are_all_accepted(key: str, value: Any, contract: str) -> None:
    """contractId, ContractId and contractName are accepted, the key reported, ints made text."""
    frame = message(contractId=...)
    frame[key] = value

    flat = flatten(encode(frame))

    assert (flat.contract, flat.id_key) == (contract, key)
    assert flat.rows == EXAMPLE_ROWS


def test_second_identifier_key_is_not_thrown_away() -> None:
    """A frame with both contractId and contractName keeps the unused one as an extra."""
    frame = message(contractName="GOLD-APR")

    flat = flatten(encode(frame))

    assert (flat.contract, flat.id_key) == ("1001", "contractId")
    assert flat.extras == [(ENVELOPE, None, '{"contractName":"GOLD-APR"}')]
    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )
    assert rebuilt["contractName"] == "GOLD-APR"


# --------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("timestamp", "naive_tz", "expected_us"),
    [
        ("2026-05-29T12:00:00.123456Z", UTC, NOON_US + 123456),
        ("2026-05-29T12:00:00.123456Z", TEHRAN, NOON_US + 123456),
        ("2026-05-29T12:00:00.123456+00:00", UTC, NOON_US + 123456),
        ("2026-05-29T15:30:00.123456+03:30", UTC, NOON_US + 123456),
        ("2026-05-29T07:00:00.000001-05:00", TEHRAN, NOON_US + 1),
        ("2026-05-29T12:00:00.123456", UTC, NOON_US + 123456),
        ("2026-05-29T15:30:00.123456", TEHRAN, NOON_US + 123456),
        ("2026-05-29T12:00:00.999999", ZoneInfo("Europe/London"), NOON_US - 3600_000_000 + 999999),
        ("1970-01-01T00:00:00.000000Z", UTC, 0),
    ],
)
def test_timestamp_gives_exact_utc_microseconds(
    timestamp: str, naive_tz: tzinfo, expected_us: int
) -> None:
    """Z, an offset, or no zone (read in naive_tz) give the exact UTC instant in microseconds."""
    flat = flatten(encode(message(timestamp=timestamp)), naive_tz)

    assert flat.exchange_us == expected_us


def test_naive_timestamp_defaults_to_utc() -> None:
    """Without a naive_tz argument a timestamp with no zone is read as UTC."""
    assert flatten(encode(message(timestamp="2026-05-29T12:00:00.000007"))).exchange_us == (
        NOON_US + 7
    )


@pytest.mark.parametrize(
    "timestamp",
    [
        "0001-01-01T00:00:00.000000+01:00",  # UTC instant in year 0
        "9999-12-31T23:59:59.000000-01:00",  # UTC instant in year 10000
        "1969-12-31T23:59:59.999999Z",  # before the epoch: nothing real is there
        "9000-01-01T00:00:00.000000Z",
    ],
)
def test_timestamp_outside_the_datetime_range_is_refused(timestamp: str) -> None:
    """A timestamp whose UTC instant is outside 1970..8999 is refused, naming timestamp."""
    assert reason_of(encode(message(timestamp=timestamp))).startswith("timestamp:")


def test_a_second_parsed_once_gives_every_timestamp_of_that_second_exactly() -> None:
    """The usual form (``...SS.ffffffZ``) is parsed once per second and the microseconds
    added: the same instants as a full parse, and what a full parse refuses is refused."""
    second = "2026-05-29T12:00:00"
    for micros in ("000000", "000001", "123456", "999999"):
        assert parse_timestamp(f"{second}.{micros}Z", TEHRAN) == NOON_US + int(micros)
    assert parse_timestamp("8999-12-31T23:59:59.999999Z", UTC) == (
        (datetime(9000, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)).days * 86_400 * 10**6
        - 1
    )
    assert parse_timestamp("8999-12-31T23:59:59.000000Z", UTC) % 10**6 == 0
    for refused in (
        f"{second}.12345xZ",
        f"{second}.\uff11\uff12\uff13\uff14\uff15\uff16Z",  # digits, but not ASCII ones
        f"{second}.-12345Z",
        "1969-12-31T23:59:59.999999Z",
    ):
        with pytest.raises(FlattenError, match=r"^timestamp:"):
            parse_timestamp(refused, UTC)


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-05-29T12:00:00.000001Z",
        "1970-01-01T00:00:00.000000Z",
        "8999-12-31T23:59:59.999999Z",
    ],
)
def test_rebuilt_timestamp_is_iso_8601_of_the_same_instant(timestamp: str) -> None:
    """to_message writes the timestamp as ISO 8601 (four-digit year) of the same instant."""
    flat = flatten(encode(message(timestamp=timestamp)))

    rebuilt = to_message(flat.contract, flat.exchange_us, flat.rows, flat.extras)

    assert rebuilt["timestamp"] == timestamp
    assert datetime.fromisoformat(rebuilt["timestamp"]) == datetime.fromisoformat(timestamp)


# --------------------------------------------------------------------------- sections


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        (["1"], [(1, 150, 245000.0, 100, 246000.0)]),
        (["1", "2"], [(1, 150, 245000.0, 100, 246000.0), (2, 120, 244500.0, 90, 246500.0)]),
        (["2"], [(2, 120, 244500.0, 90, 246500.0)]),
        ([], []),
    ],
)
def test_partial_best_limit_gives_only_the_levels_sent(
    levels: list[str], expected: list[tuple[Any, ...]]
) -> None:
    """A BestLimit with only some levels gives exactly those level rows."""
    best_limit = {k: v for k, v in EXAMPLE["data"]["BestLimit"].items() if k in levels}

    flat = flatten(encode(message(data=data(BestLimit=best_limit))))

    assert flat.rows.get("best_limit", []) == expected
    assert flat.extras == ([] if levels else [("BestLimit", None, "{}")])


@pytest.mark.parametrize("section", list(SECTION_TABLES))
def test_missing_section_gives_no_rows_for_its_table(section: str) -> None:
    """A section left out gives no entry for its table while the other tables keep their rows."""
    missing = SECTION_TABLES[section]

    flat = flatten(encode(message(data=data(**{section: ...}))))

    assert flat.rows == {k: v for k, v in EXAMPLE_ROWS.items() if k != missing}


def test_empty_data_gives_no_rows() -> None:
    """A message with an empty data object gives no rows and no extras."""
    flat = flatten(encode(message(data={})))

    assert (flat.rows, flat.extras) == ({}, [])


@pytest.mark.parametrize(
    ("section", "field", "sent", "table", "index", "stored"),
    [
        ("BestLimit", "buy_quantity", 150.0, "best_limit", 1, 150),
        ("BestLimit", "sell_quantity", -0.0, "best_limit", 3, 0),
        ("Aggregate", "trade_count", 120.0, "aggregate", 2, 120),
        ("Aggregate", "total_value", 1102500000.0, "aggregate", 4, 1102500000),
        ("ContractInfo", "open_interest", 5400.0, "contract_info", 0, 5400),
        ("ContractInfo", "open_interest_changes", -120.0, "contract_info", 1, -120),
    ],
)
def test_integral_float_is_stored_as_int(
    section: str, field: str, sent: float, table: str, index: int, stored: int
) -> None:
    """An integral float sent for an integer column is accepted and stored as an int."""
    frame = message()
    target = frame["data"][section]
    (target["1"] if section == "BestLimit" else target)[field] = sent

    value = flatten(encode(frame)).rows[table][0][index]

    assert value == stored
    assert type(value) is int


@pytest.mark.parametrize(
    ("field", "sent", "index"),
    [("buy_price", 245000, 2), ("buy_price", 245000.5, 2), ("sell_price", 0, 4)],
)
def test_price_is_stored_as_float(field: str, sent: float, index: int) -> None:
    """An integer or a float sent for a price column is stored as a float of the same value."""
    frame = message(data=data(BestLimit={"1": level(**{field: sent})}))

    value = flatten(encode(frame)).rows["best_limit"][0][index]

    assert value == sent
    assert type(value) is float


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"date": "", "time": ""}, (None, None)),
        ({"date": "", "time": "09:15:30"}, (None, time(9, 15, 30))),
        ({"date": "2026-01-31", "time": ""}, (date(2026, 1, 31), None)),
    ],
)
def test_empty_date_and_time_are_none(fields: dict[str, str], expected: tuple[Any, Any]) -> None:
    """An empty date or time string is stored as None, a given one as a date or time."""
    aggregate = {**EXAMPLE["data"]["Aggregate"], **fields}

    row = flatten(encode(message(data=data(Aggregate=aggregate)))).rows["aggregate"][0]

    assert row[:2] == expected
    assert row[2:] == EXAMPLE_ROWS["aggregate"][0][2:]


def test_missing_field_is_none() -> None:
    """A known field left out of its section is stored as None."""
    frame = message(data=data(ContractInfo={"open_interest": 7}))

    assert flatten(encode(frame)).rows["contract_info"] == [(7, None)]


# --------------------------------------------------------------------------- errors

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        pytest.param(b"not json", "frame", id="not-json"),
        pytest.param(b"", "frame", id="empty-bytes"),
        pytest.param(b"\xff\xfe", "frame", id="invalid-utf8"),
        pytest.param(b'{"contractId": "1"', "frame", id="truncated"),
        pytest.param(b"[1, 2]", "frame", id="json-array"),
        pytest.param(b"42", "frame", id="json-number"),
        pytest.param(b'"hello"', "frame", id="json-string"),
        pytest.param(b"null", "frame", id="json-null"),
        pytest.param(encode(message(contractId=...)), "identifier", id="missing-identifier"),
        pytest.param(encode(message(contractId="")), "contractId", id="empty-identifier"),
        pytest.param(encode(message(contractId=None)), "contractId", id="null-identifier"),
        pytest.param(encode(message(contractId=True)), "contractId", id="bool-identifier"),
        pytest.param(encode(message(contractId=1.5)), "contractId", id="float-identifier"),
        pytest.param(encode(message(timestamp=...)), "timestamp", id="missing-timestamp"),
        pytest.param(encode(message(timestamp="yesterday")), "timestamp", id="bad-timestamp"),
        pytest.param(encode(message(timestamp=1780056000)), "timestamp", id="number-timestamp"),
        pytest.param(encode(message(data=...)), "data", id="missing-data"),
        pytest.param(encode(message(data=[])), "data", id="data-array"),
        pytest.param(encode(message(data="x")), "data", id="data-string"),
        pytest.param(encode(message(data=None)), "data", id="data-null"),
        pytest.param(
            encode(message(data=data(Aggregate=None))), "data.Aggregate", id="null-section"
        ),
        pytest.param(
            encode(message(data=data(BestLimit=None))), "data.BestLimit", id="null-best-limit"
        ),
        pytest.param(
            encode(message(data=data(BestLimit={"1": 5}))),
            "data.BestLimit.1",
            id="level-not-object",
        ),
        pytest.param(
            encode(message(data=data(BestLimit={"1": level(buy_price="245000")}))),
            "data.BestLimit.1.buy_price",
            id="string-price",
        ),
        pytest.param(
            encode(message(data=data(BestLimit={"1": level(buy_quantity=1.5)}))),
            "data.BestLimit.1.buy_quantity",
            id="fractional-quantity",
        ),
        pytest.param(
            encode(message(data=data(BestLimit={"2": level(sell_quantity=True)}))),
            "data.BestLimit.2.sell_quantity",
            id="boolean-quantity",
        ),
        pytest.param(
            encode(message(data=data(BestLimit={"1": level(sell_price=False)}))),
            "data.BestLimit.1.sell_price",
            id="boolean-price",
        ),
        pytest.param(
            encode(message(data=data(ContractInfo={"open_interest": INT64_MAX + 1}))),
            "data.ContractInfo.open_interest",
            id="int64-max-plus-1",
        ),
        pytest.param(
            encode(message(data=data(ContractInfo={"open_interest_changes": -INT64_MAX - 2}))),
            "data.ContractInfo.open_interest_changes",
            id="int64-min-minus-1",
        ),
        pytest.param(
            encode(message(data=data(ContractInfo={"open_interest": 2**64}))),
            "data.ContractInfo.open_interest",
            id="two-to-the-64",
        ),
        pytest.param(
            encode(message(data=data(Aggregate={"trade_count": 10**20}))),
            "data.Aggregate.trade_count",
            id="ten-to-the-20",
        ),
        pytest.param(
            encode(message(data=data(Aggregate={"date": "29/05/2026"}))),
            "data.Aggregate.date",
            id="bad-date",
        ),
        pytest.param(
            encode(message(data=data(Aggregate={"time": "noon"}))),
            "data.Aggregate.time",
            id="bad-time",
        ),
        pytest.param(
            encode(message(data=data(Aggregate={"time": "12:00:00+03:30"}))),
            "data.Aggregate.time",
            id="time-with-zone",
        ),
        pytest.param(
            encode(message(data=data(AllowedPriceRange={"minAllowedPrice": [1]}))),
            "data.AllowedPriceRange.minAllowedPrice",
            id="list-price",
        ),
    ],
)
def test_bad_frame_raises_flatten_error_naming_the_field(frame: bytes, field: str) -> None:
    """A frame that cannot become rows raises FlattenError whose reason starts with the field."""
    assert reason_of(frame).startswith(f"{field}:")


def test_int64_bounds_are_accepted() -> None:
    """The smallest and largest int64 values are stored exactly."""
    frame = message(
        data=data(
            ContractInfo={"open_interest": INT64_MAX, "open_interest_changes": -INT64_MAX - 1}
        )
    )

    assert flatten(encode(frame)).rows["contract_info"] == [(INT64_MAX, -INT64_MAX - 1)]


def test_huge_numeric_level_key_is_not_a_crash() -> None:
    """A BestLimit key of 5000 digits is kept as an extra instead of raising another error."""
    key = "1" * 5000
    frame = message(data=data(BestLimit={key: {"buy_price": 1}}))

    flat = flatten(encode(frame))

    assert flat.rows.get("best_limit", []) == []
    assert flat.extras == [("BestLimit", key, '{"buy_price":1}')]


# --------------------------------------------------------------------------- extras


@pytest.mark.parametrize(
    ("sections", "rows", "extras"),
    [
        pytest.param(
            {"OrderBook": {"bids": [[245000, 3]], "asks": []}},
            EXAMPLE_ROWS,
            [("OrderBook", None, '{"bids":[[245000,3]],"asks":[]}')],
            id="unknown-section",
        ),
        pytest.param(
            {"Sequence": 17},
            EXAMPLE_ROWS,
            [("Sequence", None, "17")],
            id="unknown-scalar-section",
        ),
        pytest.param(
            {"Aggregate": {**EXAMPLE["data"]["Aggregate"], "vwap": 245100.5}},
            EXAMPLE_ROWS,
            [("Aggregate", None, '{"vwap":245100.5}')],
            id="unknown-field-in-section",
        ),
        pytest.param(
            {
                "BestLimit": {
                    **EXAMPLE["data"]["BestLimit"],
                    "2": {**EXAMPLE["data"]["BestLimit"]["2"], "orders": 4},
                }
            },
            EXAMPLE_ROWS,
            [("BestLimit", "2", '{"orders":4}')],
            id="unknown-field-in-level",
        ),
        pytest.param(
            {"BestLimit": {"1": EXAMPLE["data"]["BestLimit"]["1"], "best": {"x": 1}}},
            {**EXAMPLE_ROWS, "best_limit": EXAMPLE_ROWS["best_limit"][:1]},
            [("BestLimit", "best", '{"x":1}')],
            id="unknown-level-key",
        ),
        pytest.param(
            {"BestLimit": {"1": EXAMPLE["data"]["BestLimit"]["1"], "0": {"x": 1}}},
            {**EXAMPLE_ROWS, "best_limit": EXAMPLE_ROWS["best_limit"][:1]},
            [("BestLimit", "0", '{"x":1}')],
            id="level-zero",
        ),
        pytest.param(
            {"ContractInfo": {"open_interest": 5400, "open_interest_changes": 120, "note": None}},
            EXAMPLE_ROWS,
            [("ContractInfo", None, '{"note":null}')],
            id="unknown-null-field",
        ),
    ],
)
def test_unknown_content_lands_in_extras_and_comes_back(
    sections: dict[str, Any], rows: dict[str, Any], extras: list[tuple[str, str | None, str]]
) -> None:
    """Unknown sections, fields and level keys are kept as extras and to_message restores them."""
    original = data(**sections)

    flat = flatten(encode(message(data=original)))

    assert flat.rows == rows
    assert flat.extras == extras
    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )
    assert rebuilt["data"] == original


def test_unknown_envelope_keys_land_in_extras_and_come_back() -> None:
    """Unknown top-level keys and a different channel are kept and restored by to_message."""
    frame = message(channel="IME Stream v2", sequence=99)

    flat = flatten(encode(frame))

    assert flat.extras == [(ENVELOPE, None, '{"sequence":99,"channel":"IME Stream v2"}')]
    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )
    assert rebuilt == frame


def test_example_round_trips_through_to_message() -> None:
    """to_message of the example's rows gives back the example message itself."""
    flat = flatten(encode(EXAMPLE))

    assert to_message(flat.contract, flat.exchange_us, flat.rows, flat.extras) == EXAMPLE


@pytest.mark.parametrize("value", [{"a": 1}, None, [1, 2], {}])
def test_section_named_like_the_envelope_marker_comes_back_as_a_section(value: Any) -> None:
    """An unknown data section named "<envelope>" is restored inside data, not the envelope."""
    original = data(**{"<envelope>": value})
    frame = message(data=original)

    flat = flatten(encode(frame))
    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )

    assert flat.rows == EXAMPLE_ROWS
    assert rebuilt == frame


def test_non_canonical_level_key_is_not_merged_into_level_one() -> None:
    """A level key "01" beside "1" does not make a second level-1 row; nothing is lost."""
    original = data(BestLimit={"1": level(), "01": level(buy_quantity=7)})

    flat = flatten(encode(message(data=original)))

    assert [row[0] for row in flat.rows["best_limit"]] == [1]
    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )
    assert rebuilt["data"] == original


# --------------------------------------------------------------------------- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["", "1", "2026-05-29", "12:00:00", "2026-05-29T12:00:00Z"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["1", "2", "3", "buy_price", "date", "x"]) | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
section_names = st.sampled_from([*SECTION_TABLES, "Other"])
#: frames shaped like messages whose every part may be wrong
message_like = st.fixed_dictionaries(
    {},
    optional={
        "contractId": json_values,
        "contractName": json_values,
        "timestamp": json_values,
        "channel": json_values,
        "data": st.dictionaries(section_names, json_values, max_size=5) | json_values,
    },
)


def outcome(frame: bytes | str, naive_tz: tzinfo = UTC) -> Flattened | FlattenError:
    try:
        return flatten(frame, naive_tz)
    except FlattenError as exc:
        return exc


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_rows_or_flatten_error(frame: bytes) -> None:
    """Any bytes give a Flattened or a FlattenError, never another exception."""
    result = outcome(frame)

    assert type(result) in (Flattened, FlattenError)


@given(json_values | message_like, st.sampled_from([UTC, TEHRAN]))
def test_arbitrary_json_gives_rows_or_flatten_error(value: Any, naive_tz: tzinfo) -> None:
    """Any JSON document (NaN and huge integers included) gives a Flattened or a FlattenError."""
    result = outcome(json.dumps(value), naive_tz)

    assert type(result) in (Flattened, FlattenError)


INT_FIELDS = {c.field for t in TABLES.values() for c in t.wire_columns if c.kind == "int"}
KNOWN_FIELDS = {c.field for t in TABLES.values() for c in t.wire_columns}
int_values = st.integers(-(2**63), 2**63 - 1) | st.integers(-(2**53), 2**53).map(float)
price_values = st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
unknown_fields = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in KNOWN_FIELDS), plain_json, max_size=2
)


def section_values(table: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = {}
    for column in TABLES[table].wire_columns:
        if column.kind == "int":
            fields[column.field] = int_values
        elif column.kind == "float":
            fields[column.field] = price_values
        elif column.kind == "date":
            fields[column.field] = st.just("") | st.dates().map(date.isoformat)
        else:
            fields[column.field] = st.just("") | st.times().map(
                lambda t: t.replace(microsecond=0).isoformat()
            )
    return st.builds(
        lambda known, extra: {**extra, **known}, st.fixed_dictionaries(fields), unknown_fields
    )


@st.composite
def best_limits(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.sets(st.sampled_from(["1", "2", "3"]), min_size=1))
    section = {key: draw(section_values("best_limit")) for key in sorted(keys)}
    other_keys = st.text(max_size=6).filter(lambda k: not (k.isascii() and k.isdigit()))
    section.update(draw(st.dictionaries(other_keys, plain_json, max_size=1)))
    return section


@st.composite
def instants(draw: st.DrawFn) -> tuple[str, tzinfo, datetime]:
    """(wire timestamp, naive_tz to read it with, the aware instant it stands for)."""
    local = draw(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 12, 31)))
    style = draw(st.sampled_from(["Z", "offset", "naive"]))
    if style == "Z":
        return local.isoformat(timespec="microseconds") + "Z", TEHRAN, local.replace(tzinfo=UTC)
    if style == "offset":
        minutes = draw(st.integers(-14 * 60, 14 * 60))
        aware = local.replace(tzinfo=timezone(timedelta(minutes=minutes)))
        return aware.isoformat(timespec="microseconds"), TEHRAN, aware
    naive_tz = draw(st.sampled_from([UTC, TEHRAN]))
    return local.isoformat(timespec="microseconds"), naive_tz, local.replace(tzinfo=naive_tz)


@st.composite
def valid_messages(draw: st.DrawFn) -> tuple[dict[str, Any], tzinfo, datetime]:
    sections = draw(st.sets(st.sampled_from(list(SECTION_TABLES))))
    payload: dict[str, Any] = {}
    for section in SECTION_TABLES:
        if section not in sections:
            continue
        table = SECTION_TABLES[section]
        payload[section] = draw(best_limits() if table == "best_limit" else section_values(table))
    # ENVELOPE as a section name is a known bug with its own test above
    unknown_sections = st.text(max_size=10).filter(lambda k: k not in (*SECTION_TABLES, ENVELOPE))
    payload.update(draw(st.dictionaries(unknown_sections, plain_json, max_size=2)))
    timestamp, naive_tz, instant = draw(instants())
    key = draw(st.sampled_from(["contractId", "ContractId", "contractName"]))
    identifier = draw(st.text(min_size=1, max_size=12) | st.integers(-(2**63), 2**63 - 1))
    frame = {"channel": "IME Stream", key: identifier, "timestamp": timestamp, "data": payload}
    return frame, naive_tz, instant


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages())
def test_to_message_inverts_flatten(case: tuple[dict[str, Any], tzinfo, datetime]) -> None:
    """to_message of a flattened valid message gives back its data, identifier and instant."""
    frame, naive_tz, instant = case
    flat = flatten(orjson.dumps(frame), naive_tz)

    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )

    # subtraction, not ==: an aware comparison across zones is False at ambiguous local times
    instant_us = (instant - EPOCH) // ONE_US
    assert rebuilt["data"] == frame["data"]
    assert rebuilt[flat.id_key] == str(frame[flat.id_key])
    assert flat.exchange_us == instant_us
    assert (datetime.fromisoformat(rebuilt["timestamp"]) - EPOCH) // ONE_US == instant_us


def test_empty_best_limit_round_trips() -> None:
    """BestLimit sent as {} gives no level row but comes back as {} from to_message."""
    frame = message(data=data(BestLimit={}))
    flat = flatten(encode(frame))
    assert "best_limit" not in flat.rows
    assert flat.extras == [("BestLimit", None, "{}")]
    rebuilt = to_message(
        flat.contract, flat.exchange_us, flat.rows, flat.extras, id_key=flat.id_key
    )
    assert rebuilt == frame


# --------------------------------------------------------------------------- the fast path


def fast_agrees(frame: bytes | str, naive_tz: tzinfo = UTC) -> Flattened | None:
    """flatten_fast's answer, checked against the full rules whenever it gives one; and
    plain_frame's, which takes exactly the frames flatten_fast takes whose book holds the
    documented levels in ascending order."""
    fast = flatten_fast(frame, naive_tz)
    plain = plain_frame(frame, naive_tz)
    if fast is None:
        assert plain is None
        return None
    assert fast == flatten(frame, naive_tz)
    assert list(map(type, fast)) == list(map(type, flatten(frame, naive_tz)))
    book = tuple(json.loads(frame)["data"].get("BestLimit", {}))
    bulk = book == tuple(level for level in BULK_LEVELS if level in book)
    assert plain == ((fast.contract, fast.exchange_us) if bulk else None)
    return fast


def test_plain_frame_reads_the_names_of_the_schema() -> None:
    """plain_frame reads the decoded frame by literal names: they are the schema's."""
    sections = tuple(SECTION_TABLES)
    text = tuple(
        (section, c.field)
        for section, table in SECTION_TABLES.items()
        for c in TABLES[table].wire_columns
        if c.kind in ("date", "time")
    )
    books = tuple(section for section, table in SECTION_TABLES.items() if TABLES[table].levels)
    assert (ID_KEYS[0], sections, text, books) == _PLAIN_SHAPE


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param(message(), ("1001", NOON_US), id="example"),
        pytest.param(message(contractId=..., contractName="G"), ("G", NOON_US), id="name"),
        pytest.param(message(contractId=..., ContractId="7"), ("7", NOON_US), id="ContractId"),
        pytest.param(message(contractName="G"), None, id="two-identifiers"),
        pytest.param(message(contractId=...), None, id="no-identifier"),
        pytest.param(message(contractId=""), None, id="empty-identifier"),
        pytest.param(message(data={}), None, id="no-sections"),
        pytest.param(message(data=data(BestLimit=...)), ("1001", NOON_US), id="no-book"),
        pytest.param(
            message(data={"ContractInfo": EXAMPLE["data"]["ContractInfo"]}),
            ("1001", NOON_US),
            id="contract-info-only",
        ),
        pytest.param(message(data=data(BestLimit={"2": level(), "1": level()})), None, id="2-1"),
        pytest.param(message(data=data(BestLimit={"4": level()})), None, id="level-4"),
        pytest.param(
            message(data=data(Aggregate={**EXAMPLE["data"]["Aggregate"], "date": "2026-13-01"})),
            None,
            id="bad-date",
        ),
        pytest.param(
            message(data=data(Aggregate={**EXAMPLE["data"]["Aggregate"], "time": ""})),
            ("1001", NOON_US),
            id="empty-time",
        ),
        pytest.param(message(timestamp="2026-05-29T12:00:00"), ("1001", NOON_US), id="naive"),
    ],
)
def test_plain_frame_gives_the_contract_and_time_of_a_plain_frame(
    frame: dict[str, Any], expected: tuple[str, int] | None
) -> None:
    """The contract and exchange time of a frame the bulk decoder may take, else None."""
    assert plain_frame(encode(frame)) == expected
    assert fast_agrees(encode(frame)) is not None or expected is None


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(message(), id="example"),
        pytest.param({**message(contractId=...), "ContractId": "1001"}, id="ContractId"),
        pytest.param({**message(contractId=...), "contractName": "GOLD-1"}, id="contractName"),
        pytest.param(message(channel=...), id="no-channel"),
        pytest.param(message(timestamp="2026-05-29T15:30:00.000000"), id="naive"),
        pytest.param(message(timestamp="2026-05-29T15:30:00+03:30"), id="offset"),
        pytest.param(message(data=data(BestLimit={"1": level()})), id="one-level"),
        pytest.param(message(data=data(Aggregate=...)), id="no-aggregate"),
        pytest.param(message(data=data(BestLimit={"1": level(buy_price=None)})), id="null"),
        pytest.param(message(data=data(BestLimit={"1": {"buy_price": 5}})), id="missing"),
        pytest.param(
            message(data=data(Aggregate={**EXAMPLE["data"]["Aggregate"], "date": ""})),
            id="empty-date",
        ),
    ],
)
def test_plain_frames_take_the_fast_path_with_the_same_rows(frame: dict[str, Any]) -> None:
    """The frames the feed sends every day are flattened by the fast path, row for row."""
    assert fast_agrees(encode(frame), TEHRAN) is not None
    assert fast_agrees(encode(frame).decode(), TEHRAN) is not None


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(message(data=data(BestLimit={"1": level(buy_quantity=150.0)})), id="150.0"),
        pytest.param(message(data=data(BestLimit={"1": level(x=1)})), id="unknown-field"),
        pytest.param(message(data=data(Other={"a": 1})), id="unknown-section"),
        pytest.param(message(extra=1), id="unknown-key"),
        pytest.param(message(channel="Other"), id="other-channel"),
        pytest.param(message(ContractId="1002"), id="two-identifiers"),
        pytest.param(message(contractId=""), id="empty-identifier"),
        pytest.param(message(contractId=1001), id="integer-identifier"),
        pytest.param(message(data=data(BestLimit={})), id="empty-book"),
        pytest.param(message(data={}), id="no-sections"),
        pytest.param(message(data=data(BestLimit={"01": level()})), id="level-01"),
        pytest.param(message(data=data(Aggregate=None)), id="null-section"),
        pytest.param(message(timestamp="yesterday"), id="bad-timestamp"),
        pytest.param(message(timestamp="1960-01-01T00:00:00Z"), id="before-1970"),
        pytest.param(message(data=data(BestLimit={"1": level(buy_quantity=2**63)})), id="2**63"),
        pytest.param(
            message(data=data(Aggregate={**EXAMPLE["data"]["Aggregate"], "time": "25:00:00"})),
            id="bad-time",
        ),
    ],
)
def test_other_frames_are_left_to_the_full_rules(frame: dict[str, Any]) -> None:
    """Anything that needs extras, a conversion or an error message is not the fast path's."""
    assert flatten_fast(encode(frame)) is None


def test_fast_path_declines_what_is_not_json() -> None:
    assert flatten_fast(b'{"contractId": "1", "timestamp": ') is None
    assert flatten_fast(b"\xff\xfe") is None
    assert flatten_fast(encode(message()).replace(b"245000", b"1e400")) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | message_like | valid_messages().map(lambda case: case[0]))
def test_fast_path_never_disagrees_with_the_full_rules(value: Any) -> None:
    """On any JSON the fast path either declines or gives exactly flatten's rows."""
    for naive_tz in (UTC, TEHRAN):
        fast_agrees(json.dumps(value), naive_tz)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages())
def test_fast_path_takes_every_plain_valid_message(
    case: tuple[dict[str, Any], tzinfo, datetime],
) -> None:
    """A valid message without unknown keys or integral floats goes the fast way."""
    frame, naive_tz, _ = case
    plain = (
        type(frame["data"]) is dict
        and bool(frame["data"])
        and set(frame["data"]) <= set(SECTION_TABLES)
        and type(frame[next(k for k in ("contractId", "ContractId", "contractName") if k in frame)])
        is str
        and all(
            set(section) <= {c.field for c in TABLES[SECTION_TABLES[name]].wire_columns}
            for name, section in frame["data"].items()
            if name != "BestLimit"
        )
        and all(
            key in ("1", "2", "3")
            and set(lvl) <= {c.field for c in TABLES["best_limit"].wire_columns}
            for key, lvl in frame["data"].get("BestLimit", {}).items()
        )
        and not any(
            type(v) is float and c.kind == "int"
            for name, section in frame["data"].items()
            for fields in (section.values() if name == "BestLimit" else [section])
            for c in TABLES[SECTION_TABLES[name]].wire_columns
            if (v := fields.get(c.field)) is not None
        )
    )
    result = fast_agrees(orjson.dumps(frame), naive_tz)

    assert (result is not None) == plain


@given(st.integers(min_value=-62_135_596_800_000_000, max_value=253_402_300_799_999_999))
def test_format_timestamp_is_the_utc_iso_form_with_microseconds_and_z(us: int) -> None:
    """A replayed timestamp is datetime's ISO form of the instant (UTC, 6 digits, Z), any year."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    expected = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
    assert format_timestamp(us) == expected
    if moment.year in range(1970, 9000):  # the years a recorded timestamp may have
        assert parse_timestamp(format_timestamp(us), UTC) == us
