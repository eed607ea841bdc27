"""Plain frames: the updates the feed sends all day, checked in C by msgspec.

Nearly every frame is a plain update: one identifier, known sections, plain values. msgspec
decodes and checks such a frame against Structs built from ``schemas/tables.toml``; whatever
it refuses (an unknown key, a wrong type, an integral float in an integer column, an empty
book, two identifier keys, ...) goes through :func:`recorder.flatten.flatten`, which alone
decides what is kept, put in extras or quarantined. So this path never changes a result,
only its cost (tests/test_flatten.py checks the two agree on generated and arbitrary
frames). :func:`plain_frame` is what the event loop calls for every frame;
:func:`flatten_fast` gives a plain frame's rows.
"""

from __future__ import annotations

from datetime import UTC, tzinfo
from typing import Annotated, Any, Literal

import msgspec

from recorder.errors import FlattenError
from recorder.flatten import (
    CONVERTERS,
    ID_KEYS,
    INT64_BOUND,
    Flattened,
    Row,
    parse_date,
    parse_time,
    parse_timestamp,
)
from recorder.schema import SECTION_TABLES, TABLES

_UNSET = msgspec.UNSET
_FINITE = 1.7976931348623157e308
_WIRE_TYPES: dict[str | None, Any] = {
    "int": Annotated[int, msgspec.Meta(ge=-INT64_BOUND, le=INT64_BOUND - 1)],
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
    (position, c.field, parse_date if c.kind == "date" else parse_time)
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
            (i, CONVERTERS[c.kind])
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


def plain_frame(frame: bytes | str, naive_tz: tzinfo = UTC) -> tuple[str, int] | None:
    """(contract, exchange_us) when ``frame`` is plain (see the fast path above) and its
    book holds only :data:`BULK_LEVELS`, in ascending order; else None.

    Such a frame's rows are exactly what :func:`~recorder.flatten.flatten` would give, so they
    may be built by other means (recorder.columnar decodes batches of them in DuckDB). A
    plain frame with another book (a level "4", levels out of order) is flattened on its own,
    as it came.

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
        if (text := aggregate.date) and parse_date(text) is None:
            return None
        if (text := aggregate.time) and parse_time(text) is None:
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
    """:func:`~recorder.flatten.flatten` for a plain frame, several times faster; None: use
    :func:`~recorder.flatten.flatten`.

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
