"""Pure flattener: one IME frame becomes rows of the data tables, and rows become a frame again.

No I/O, no clock, no logging. :func:`flatten` either returns a :class:`Flattened` or raises
:class:`~recorder.errors.FlattenError` whose ``reason`` names the field at fault; the caller
puts such frames in quarantine. Sections and fields the schema does not know are returned as
``extras`` (JSON text) so nothing received is thrown away. The frames the feed sends all day
take a faster way to the same rows (:mod:`recorder.plain`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from operator import contains
from typing import Any, NamedTuple

import orjson

from recorder.errors import FlattenError
from recorder.schema import SECTION_TABLES, TABLES

ID_KEYS = ("contractId", "ContractId", "contractName")
CHANNEL = "IME Stream"
#: the ``section`` of an extras row that keeps unknown top-level keys of a frame (no data
#: section can be named None, so it never collides with one)
ENVELOPE = None
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
INT64_BOUND = 2**63
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
        if -INT64_BOUND <= value < INT64_BOUND:
            return int(value)
    elif kind is float:
        # strict at both ends: a float of magnitude 2**63 may be a rounded larger integer
        if value.is_integer() and -INT64_BOUND < value < INT64_BOUND:
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
def parse_date(value: str) -> date | None:
    """A YYYY-MM-DD text as a date (None when it is not one); memoised: dates repeat."""
    if _DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    return None


@lru_cache(maxsize=8192)
def parse_time(value: str) -> time | None:
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
    if type(value) is str and (parsed := parse_date(value)) is not None:
        return parsed
    raise FlattenError(f"{path}: {_show(value)} is not a YYYY-MM-DD date")


def _time(value: Any, path: str) -> time | None:
    if value is None or value == "":
        return None
    if type(value) is str and (parsed := parse_time(value)) is not None:
        return parsed
    raise FlattenError(f"{path}: {_show(value)} is not an HH:MM:SS time")


CONVERTERS: dict[str | None, Callable[[Any, str], Any]] = {
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
        converters=tuple(CONVERTERS[k] for k in kinds),
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
        not ints or (max(ints) < INT64_BOUND and min(ints) >= -INT64_BOUND)
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


# --------------------------------------------------------------------------- the way back


def format_timestamp(exchange_us: int) -> str:
    """The one documented wire form of a replayed timestamp: UTC, microseconds, ``Z``."""
    second, micro = divmod(exchange_us, 1_000_000)
    return f"{_second_text(second)}.{micro:06d}Z"


@lru_cache(maxsize=4096)
def _second_text(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a UTC second (a replay formats many messages a second)."""
    return (_EPOCH + timedelta(seconds=second)).replace(tzinfo=None).isoformat()


#: per table with a wire section: the section, its fields in row order, and the positions of
#: its date and time values (sent as text, ``""`` when empty)
_WAY_BACK: dict[str, tuple[str, tuple[str | None, ...], tuple[int, ...]]] = {
    name: (
        section,
        tuple(c.field for c in table.wire_columns),
        tuple(i for i, c in enumerate(table.wire_columns) if c.kind in ("date", "time")),
    )
    for name, table in TABLES.items()
    if (section := table.section) is not None
}


def _section(fields: tuple[Any, ...], texts: tuple[int, ...], values: Sequence[Any]) -> Any:
    """One section (or book level) of a message from its wire-column values."""
    if texts:
        values = list(values)
        for i in texts:
            value = values[i]
            values[i] = "" if value is None else value.isoformat()
    return dict(zip(fields, values, strict=True))


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
        name, fields, texts = _WAY_BACK[table_name]
        if TABLES[table_name].levels:
            data[name] = {str(row[0]): _section(fields, texts, row[1:]) for row in table_rows}
        else:
            (row,) = table_rows
            data[name] = _section(fields, texts, row)
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
