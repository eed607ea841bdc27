"""Pure flattener: one IME frame becomes rows of the data tables, and rows become a frame again.

No I/O, no clock, no logging. :func:`flatten` either returns a :class:`Flattened` or raises
:class:`~recorder.errors.FlattenError` whose ``reason`` names the field at fault; the caller
puts such frames in quarantine. Sections and fields the schema does not know are returned as
``extras`` (JSON text) so nothing received is thrown away.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from operator import contains
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import orjson

from recorder.errors import FlattenError
from recorder.schema import SECTION_TABLES, TABLES, Column

ID_KEYS = ("contractId", "ContractId", "contractName")
CHANNEL = "IME Stream"
#: the ``section`` of an extras row that keeps unknown top-level keys of a frame (no data
#: section can be named None, so it never collides with one)
ENVELOPE = None
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_INT64 = 2**63
# exchange timestamps outside [1970, 9000) are refused: nothing real is there, and every
# later step (local dates, formatting) stays far from the datetime range limits
_MIN_US = 0
_MAX_US = (datetime(9000, 1, 1, tzinfo=UTC) - _EPOCH) // _ONE_US
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME = re.compile(r"\d{2}:\d{2}:\d{2}(\.\d{6})?")

Row = tuple[Any, ...]
Extra = tuple[str | None, str | None, str]  # (section or ENVELOPE, BestLimit level key, JSON)


class Flattened(NamedTuple):
    """One message as rows: ``rows[table]`` holds the wire columns of that table's rows."""

    contract: str
    id_key: str
    exchange_us: int
    rows: dict[str, list[Row]]
    extras: list[Extra]


def _int(value: Any, path: str) -> int | None:
    kind = type(value)
    if kind is int:
        if -_INT64 <= value < _INT64:
            return int(value)
    elif kind is float:
        # strict at both ends: a float of magnitude 2**63 may be a rounded larger integer
        if value.is_integer() and -_INT64 < value < _INT64:
            return int(value)
        raise FlattenError(f"{path}: {value!r} is not an integer")
    elif value is None:
        return None
    raise FlattenError(f"{path}: {_show(value)} does not fit an integer column")


def _float(value: Any, path: str) -> float | None:
    kind = type(value)
    if kind is float or kind is int:
        return float(value)
    if value is None:
        return None
    raise FlattenError(f"{path}: {_show(value)} does not fit a number column")


@lru_cache(maxsize=4096)
def _parse_date(value: str) -> date | None:
    """A YYYY-MM-DD text as a date (None when it is not one); memoised: dates repeat."""
    if _DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    return None


@lru_cache(maxsize=8192)
def _parse_time(value: str) -> time | None:
    """An HH:MM:SS[.ffffff] text as a time (None when it is not one); memoised."""
    if _TIME.fullmatch(value):
        try:
            return time.fromisoformat(value)
        except ValueError:
            pass
    return None


def _date(value: Any, path: str) -> date | None:
    if value is None or value == "":
        return None
    if type(value) is str and (parsed := _parse_date(value)) is not None:
        return parsed
    raise FlattenError(f"{path}: {_show(value)} is not a YYYY-MM-DD date")


def _time(value: Any, path: str) -> time | None:
    if value is None or value == "":
        return None
    if type(value) is str and (parsed := _parse_time(value)) is not None:
        return parsed
    raise FlattenError(f"{path}: {_show(value)} is not an HH:MM:SS time")


_CONVERT: dict[str | None, Callable[[Any, str], Any]] = {
    "int": _int,
    "float": _float,
    "date": _date,
    "time": _time,
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_NUMBER_TYPES = frozenset((int, float))
_PLAIN_TYPES = {"int": frozenset((int,)), "float": _NUMBER_TYPES, "date": None, "time": None}


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one section becomes a row: the hot path checks plain types in C, and only a value
    that is not plain (None, an integral float, a string, ...) takes the per-field path."""

    table: str
    fields: tuple[str, ...]
    converters: tuple[Callable[[Any, str], Any], ...]
    plain: tuple[frozenset[type], ...]  # types taken as they are, per field
    ints: tuple[int, ...]  # positions of integer columns (range-checked)
    floats: tuple[int, ...]  # positions of number columns (made floats)
    always: tuple[int, ...]  # positions always converted (dates, times)
    known: frozenset[str]


def _section_plan(table: str) -> _Plan:
    columns = [c for c in TABLES[table].wire_columns if c.field is not None]
    kinds = [c.kind for c in columns]
    return _Plan(
        table=table,
        fields=tuple(c.field for c in columns if c.field is not None),
        converters=tuple(_CONVERT[k] for k in kinds),
        plain=tuple(_PLAIN_TYPES[k] or frozenset((str,)) for k in kinds if k is not None),
        ints=tuple(i for i, k in enumerate(kinds) if k == "int"),
        floats=tuple(i for i, k in enumerate(kinds) if k == "float"),
        always=tuple(i for i, k in enumerate(kinds) if k in ("date", "time")),
        known=frozenset(c.field for c in columns if c.field is not None),
    )


_PLANS = {section: _section_plan(table) for section, table in SECTION_TABLES.items()}


def _identifier(message: dict[str, Any]) -> tuple[str, str]:
    for key in ID_KEYS:
        if key in message:
            value = message[key]
            if type(value) is str and value:
                return key, value
            if type(value) is int:
                return key, str(value)
            raise FlattenError(f"{key}: {_show(value)} is not a contract identifier")
    raise FlattenError("identifier: none of contractId, ContractId, contractName")


#: the instant of each second seen in the wire's usual form (``YYYY-MM-DDTHH:MM:SS.ffffffZ``):
#: every contract's frames of one second share it, so one parse serves them all
_SECONDS: dict[str, int] = {}
_SECONDS_KEPT = 4096


def parse_timestamp(value: Any, naive_tz: tzinfo) -> int:
    """ISO 8601 (``Z``, an offset, or naive in ``naive_tz``) -> UTC microseconds since epoch."""
    usual = type(value) is str and len(value) == 27 and value[19] == "." and value[26] == "Z"
    if usual:
        micros = value[20:26]
        usual = micros.isdigit() and micros.isascii()
        second = _SECONDS.get(value[:19]) if usual else None
        if second is not None:
            return second + int(micros)
    if type(value) is not str:
        raise FlattenError(f"timestamp: {_show(value)} is not an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise FlattenError(f"timestamp: {_show(value)} is not ISO 8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=naive_tz)
    try:
        instant = (parsed - _EPOCH) // _ONE_US
    except OverflowError:
        instant = -1
    if not _MIN_US <= instant < _MAX_US:
        raise FlattenError(f"timestamp: {_show(value)} is outside 1970..8999")
    if usual:  # the second's instant; with any microseconds it stays in 1970..8999
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        _SECONDS[value[:19]] = instant - int(micros)
    return instant


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _row(section: dict[str, Any], plan: _Plan, path: str) -> tuple[Row, dict[str, Any] | None]:
    values: list[Any] = list(map(section.get, plan.fields))
    ints = [values[i] for i in plan.ints]
    if all(map(contains, plan.plain, map(type, values))) and (
        not ints or (max(ints) < _INT64 and min(ints) >= -_INT64)
    ):
        for i in plan.floats:
            values[i] = float(values[i])
        for i in plan.always:
            values[i] = plan.converters[i](values[i], path + "." + plan.fields[i])
        row = tuple(values)
    else:  # the exact per-field checks, with an error that names the field
        row = tuple(
            convert(value, f"{path}.{field}")
            for field, convert, value in zip(plan.fields, plan.converters, values, strict=True)
        )
    known = plan.known
    unknown = None
    if len(section) > len(known) or not known.issuperset(section):
        unknown = {k: v for k, v in section.items() if k not in known}
    return row, unknown or None


def flatten(frame: bytes | str, naive_tz: tzinfo = UTC) -> Flattened:
    """Decode one frame and flatten it; raises FlattenError on anything that is not a message."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise FlattenError(f"frame: not JSON ({exc.msg})") from None
    return flatten_message(message, naive_tz)


def flatten_message(message: Any, naive_tz: tzinfo = UTC) -> Flattened:
    """Flatten one decoded message (see :func:`flatten`)."""
    if type(message) is not dict:
        raise FlattenError(f"frame: a JSON {type(message).__name__}, not an object")
    id_key, contract = _identifier(message)
    if "timestamp" not in message:
        raise FlattenError("timestamp: missing")
    exchange_us = parse_timestamp(message["timestamp"], naive_tz)
    if "data" not in message:
        raise FlattenError("data: missing")
    data = message["data"]
    if type(data) is not dict:
        raise FlattenError(f"data: {_show(data)} is not an object")

    rows: dict[str, list[Row]] = {}
    extras: list[Extra] = []
    envelope = {
        k: v for k, v in message.items() if k not in ("channel", "timestamp", "data", id_key)
    }
    if message.get("channel", CHANNEL) != CHANNEL:
        envelope["channel"] = message["channel"]
    if envelope:
        extras.append((ENVELOPE, None, _dumps(envelope)))

    for name, section in data.items():
        plan = _PLANS.get(name)
        if plan is None:
            extras.append((name, None, _dumps(section)))
            continue
        if type(section) is not dict:
            raise FlattenError(f"data.{name}: {_show(section)} is not an object")
        table = plan.table
        if table == "best_limit":
            levels = _levels(section, plan, extras)
            if levels:
                rows[table] = levels
            elif not section:
                extras.append((name, None, "{}"))  # an empty book is kept, so it replays
            continue
        row, unknown = _row(section, plan, f"data.{name}")
        rows[table] = [row]
        if unknown:
            extras.append((name, None, _dumps(unknown)))
    return Flattened(contract, id_key, exchange_us, rows, extras)


def _levels(section: dict[str, Any], plan: _Plan, extras: list[Extra]) -> list[Row]:
    rows = []
    for key, level in section.items():
        # only canonical level numbers ("1", not "01" nor 5000 digits) are levels
        if not (key.isascii() and key.isdigit() and len(key) <= 9 and key[0] != "0"):
            extras.append(("BestLimit", key, _dumps(level)))
            continue
        if type(level) is not dict:
            raise FlattenError(f"data.BestLimit.{key}: {_show(level)} is not an object")
        row, unknown = _row(level, plan, f"data.BestLimit.{key}")
        rows.append((int(key), *row))
        if unknown:
            extras.append(("BestLimit", key, _dumps(unknown)))
    return rows


# --------------------------------------------------------------------------- the fast path
#
# Nearly every frame is a plain update: one identifier, known sections, plain values. msgspec
# decodes and checks such a frame in C against Structs built from the schema; whatever it
# refuses (an unknown key, a wrong type, an integral float in an integer column, an empty
# book, two identifier keys, ...) goes through :func:`flatten`, which alone decides what is
# kept, put in extras or quarantined. So the fast path never changes a result, only its cost
# (tests/test_flatten.py checks the two paths agree on generated frames).

_FINITE = 1.7976931348623157e308
_WIRE_TYPES: dict[str | None, Any] = {
    "int": Annotated[int, msgspec.Meta(ge=-_INT64, le=_INT64 - 1)],
    "float": Annotated[float, msgspec.Meta(ge=-_FINITE, le=_FINITE)],
    "date": str,
    "time": str,
}
_LEVEL_KEY = Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{0,8}\Z")]


def _section_struct(table: str) -> type[msgspec.Struct]:
    fields = [
        (c.field, _WIRE_TYPES[c.kind] | None, None)
        for c in TABLES[table].wire_columns
        if c.field is not None
    ]
    return msgspec.defstruct(f"_{table}", fields, forbid_unknown_fields=True, gc=False)


def _frame_struct(level_key: Any) -> type[msgspec.Struct]:
    sections: list[tuple[str, Any, Any]] = []
    for section, table in SECTION_TABLES.items():
        struct: Any = _section_struct(table)
        if TABLES[table].levels:
            struct = Annotated[dict[level_key, struct], msgspec.Meta(min_length=1)]
        sections.append((section, struct | msgspec.UnsetType, msgspec.UNSET))
    data = msgspec.defstruct("_data", sections, forbid_unknown_fields=True, gc=False)
    optional_id = str | msgspec.UnsetType
    return msgspec.defstruct(
        "_frame",
        [
            ("timestamp", str),
            ("data", data),
            ("channel", Literal["IME Stream"] | msgspec.UnsetType, msgspec.UNSET),
            *((key, optional_id, msgspec.UNSET) for key in ID_KEYS),
        ],
        forbid_unknown_fields=True,
        gc=False,
    )


#: the order book levels of a frame decoded in bulk: the documented ones, "1" to "3" (DuckDB
#: reads them as a STRUCT, which is twice as fast as a MAP of any level key)
BULK_LEVELS = ("1", "2", "3")
_FAST_DECODER = msgspec.json.Decoder(_frame_struct(_LEVEL_KEY))
#: the fast path's checks with a book of BULK_LEVELS only: a Literal key costs msgspec a
#: lookup where the pattern of any level key costs a regular expression call (2 us a frame)
_BULK_DECODER = msgspec.json.Decoder(_frame_struct(Literal[BULK_LEVELS]))
#: (position of the section in the data Struct, field, parser) of every date and time field
_TEXT_CHECKS = tuple(
    (position, c.field, _parse_date if c.kind == "date" else _parse_time)
    for position, table in enumerate(SECTION_TABLES.values())
    for c in TABLES[table].wire_columns
    if c.field is not None and c.kind in ("date", "time")
)
_astuple = msgspec.structs.astuple
#: per section, in the order of the data Struct's fields: (section, table, has levels,
#: positions of date/time values to convert)
_FAST_SECTIONS = tuple(
    (
        section,
        table,
        TABLES[table].levels,
        tuple(
            (i, _CONVERT[c.kind])
            for i, c in enumerate(c for c in TABLES[table].wire_columns if c.field is not None)
            if c.kind in ("date", "time")
        ),
    )
    for section, table in SECTION_TABLES.items()
)


def _plain(
    frame: bytes | str, naive_tz: tzinfo, decoder: msgspec.json.Decoder[Any] = _FAST_DECODER
) -> tuple[str, str, int, tuple[Any, ...]] | None:
    """(id key, contract, exchange_us, sections) of a plain frame, every value checked."""
    try:
        timestamp, data, _, *ids = _astuple(decoder.decode(frame))
    except msgspec.DecodeError:
        return None
    if ids[0] is not _UNSET and ids[1] is _UNSET and ids[2] is _UNSET:
        index = 0  # contractId alone: nearly every frame
    elif ids.count(_UNSET) != len(ids) - 1:
        return None  # no identifier, or two: the full rules keep the second in extras
    else:
        index = next(i for i, value in enumerate(ids) if value is not _UNSET)
    contract = ids[index]
    if not contract:
        return None
    sections = _astuple(data)
    if sections.count(_UNSET) == len(sections):
        return None  # no section: the pipeline keeps an extras row for it
    for position, field, parse in _TEXT_CHECKS:  # dates and times: "" or a valid value
        section = sections[position]
        if section is not _UNSET:
            text = getattr(section, field)
            if text and parse(text) is None:
                return None
    try:
        exchange_us = parse_timestamp(timestamp, naive_tz)
    except FlattenError:
        return None
    return ID_KEYS[index], contract, exchange_us, sections


#: the level keys of a book, in wire order, that the bulk decoder gives the same rows for:
#: documented levels in ascending order (a STRUCT keeps no order and drops other keys)
_BULK_BOOKS = frozenset(
    tuple(level for bit, level in enumerate(BULK_LEVELS) if mask >> bit & 1)
    for mask in range(1, 1 << len(BULK_LEVELS))
)
_BOOKS = tuple(i for i, table in enumerate(SECTION_TABLES.values()) if TABLES[table].levels)


def plain_frame(frame: bytes | str, naive_tz: tzinfo = UTC) -> tuple[str, int] | None:
    """(contract, exchange_us) when ``frame`` is plain (see the fast path above) and its
    book holds only :data:`BULK_LEVELS`, in ascending order; else None.

    Such a frame's rows are exactly what :func:`flatten` would give, so they may be built by
    other means (recorder.columnar decodes batches of them in DuckDB). A plain frame with
    another book (a level "4", levels out of order) is flattened on its own, as it came.

    The event loop calls this for every frame, so the decoded Struct is read by the literal
    names of the documented shape (:data:`_PLAIN_SHAPE`, tied to ``schemas/tables.toml`` by
    a test): 0.4 us a frame less than :func:`_plain`'s walk over the schema's positions.
    """
    try:
        decoded: Any = _BULK_DECODER.decode(frame)
    except msgspec.DecodeError:
        return None
    contract = decoded.contractId
    if contract is _UNSET or decoded.ContractId is not _UNSET or decoded.contractName is not _UNSET:
        ids = (contract, decoded.ContractId, decoded.contractName)
        named = [value for value in ids if value is not _UNSET]
        if len(named) != 1:
            return None  # no identifier, or two: the full rules keep the second in extras
        contract = named[0]
    if not contract:
        return None
    data = decoded.data
    book = data.BestLimit
    if book is not _UNSET:
        if tuple(book) not in _BULK_BOOKS:
            return None
    elif data.Aggregate is data.AllowedPriceRange is data.ContractInfo is _UNSET:
        return None  # no section: the pipeline keeps an extras row for it
    aggregate = data.Aggregate
    if aggregate is not _UNSET:  # dates and times: "" or a valid value
        if (text := aggregate.date) and _parse_date(text) is None:
            return None
        if (text := aggregate.time) and _parse_time(text) is None:
            return None
    try:
        return contract, parse_timestamp(decoded.timestamp, naive_tz)
    except FlattenError:
        return None


#: the names :func:`plain_frame` reads: the first identifier key, the sections in the data
#: Struct's order, the (section, field) of every date and time value, the sections with levels
_PLAIN_SHAPE = (
    "contractId",
    ("BestLimit", "Aggregate", "AllowedPriceRange", "ContractInfo"),
    (("Aggregate", "date"), ("Aggregate", "time")),
    ("BestLimit",),
)


def flatten_fast(frame: bytes | str, naive_tz: tzinfo = UTC) -> Flattened | None:
    """:func:`flatten` for a plain frame, several times faster; None: use :func:`flatten`.

    A book of the documented levels is checked with their literal keys first (a lookup
    where the pattern any level key must match costs a regular expression call per key).
    """
    plain = _plain(frame, naive_tz, _BULK_DECODER) or _plain(frame, naive_tz)
    if plain is None:
        return None
    id_key, contract, exchange_us, sections = plain
    rows: dict[str, list[Row]] = {}
    for (_, table, levels, convert), value in zip(_FAST_SECTIONS, sections, strict=True):
        if value is _UNSET:
            continue
        if levels:
            rows[table] = [(int(key), *_astuple(level)) for key, level in value.items()]
        elif convert:
            row = list(_astuple(value))
            for i, converter in convert:
                row[i] = converter(row[i], table)
            rows[table] = [tuple(row)]
        else:
            rows[table] = [_astuple(value)]
    return Flattened(contract, id_key, exchange_us, rows, [])


_UNSET = msgspec.UNSET


# --------------------------------------------------------------------------- the way back


def format_timestamp(exchange_us: int) -> str:
    """The one documented wire form of a replayed timestamp: UTC, microseconds, ``Z``."""
    moment = _EPOCH + timedelta(microseconds=exchange_us)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _wire_value(column: Column, value: Any) -> Any:
    if column.kind in ("date", "time"):
        return "" if value is None else value.isoformat()
    return value


def to_message(
    contract: str,
    exchange_us: int,
    rows: Mapping[str, Sequence[Row]],
    extras: Iterable[Extra] = (),
    *,
    id_key: str = "contractId",
) -> dict[str, Any]:
    """Rebuild the wire message from its rows (the inverse of :func:`flatten_message`).

    ``rows[table]`` holds wire-column tuples as :func:`flatten_message` returns them. Numbers
    come back as the column's type (an integral float sent for an integer is an int again),
    an empty ``date``/``time`` as ``""``, and the timestamp in :func:`format_timestamp` form.
    """
    data: dict[str, Any] = {}
    for table_name, table_rows in rows.items():
        table = TABLES[table_name]
        section = table.section
        assert section is not None, table_name
        columns = table.wire_columns
        if table.levels:
            data[section] = {
                str(row[0]): {
                    c.field: _wire_value(c, v) for c, v in zip(columns, row[1:], strict=True)
                }
                for row in table_rows
            }
        else:
            (row,) = table_rows
            data[section] = {c.field: _wire_value(c, v) for c, v in zip(columns, row, strict=True)}
    message: dict[str, Any] = {
        "channel": CHANNEL,
        id_key: contract,
        "timestamp": format_timestamp(exchange_us),
        "data": data,
    }
    for section, level, text in extras:
        value = orjson.loads(text)
        if section is ENVELOPE:
            message.update(value)
        elif level is not None and level in data.get(section, {}):
            data[section][level].update(value)
        elif level is not None:
            data.setdefault(section, {})[level] = value
        elif section in data and section in SECTION_TABLES:
            data[section].update(value)
        else:
            data[section] = value
    return message
