"""Pure conversions of the REST answers: static info -> ``reference`` rows, overview -> messages.

No I/O, no clock: times are passed in. Field names and types come from the ``reference``
table of ``schemas/tables.toml``.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any

import orjson

from recorder.flatten import CHANNEL, format_timestamp
from recorder.schema import SECTION_TABLES, TABLES

MARKETS = ("IMEDepositCertificate", "IMEFutures", "IMEOption")
_COLUMNS = TABLES["reference"].columns
_KNOWN = frozenset(c.field for c in _COLUMNS if c.field is not None)
# the reference row: the columns after the common ones (received_at, seq, date partition)
ROW_COLUMNS = tuple(
    c for c in TABLES["reference"].file_columns if c.name not in ("received_at", "seq")
)


def market_of(item: dict[str, Any]) -> str:
    """The instrument kind, told apart by fields as the official client documents."""
    if "optionType" in item or "strikePrice" in item:
        return "IMEOption"
    if "StorageCost" in item:
        return "IMEDepositCertificate"
    return "IMEFutures"


def _value(kind: str | None, raw: Any) -> tuple[Any, bool]:
    """(converted value, fits) for one static field; a misfit is kept raw in ``extra``."""
    if raw is None:
        return None, True
    if kind == "str":
        return (
            (str(raw), True)
            if isinstance(raw, str | int) and not isinstance(raw, bool)
            else (None, False)
        )
    if kind == "bool":
        return (raw, True) if isinstance(raw, bool) else (None, False)
    if kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw, True
        if isinstance(raw, float) and raw.is_integer():
            return int(raw), True
        return None, False
    if kind == "float":
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw), True
        return None, False
    if kind == "date":
        if isinstance(raw, str):
            try:
                return date.fromisoformat(raw[:10]), True
            except ValueError:
                pass
        return None, False
    raise ValueError(f"unknown kind {kind!r}")


def reference_row(item: dict[str, Any], market: str | None = None) -> tuple[Any, ...]:
    """One ``reference`` row (without received_at/seq) from a static-info item."""
    values: dict[str, Any] = {"market": market or market_of(item)}
    extra = {k: v for k, v in item.items() if k not in _KNOWN}
    for column in _COLUMNS:
        if column.field is None:
            continue
        value, fits = _value(column.kind, item.get(column.field))
        values[column.name] = value
        if not fits:
            extra[column.field] = item[column.field]
    values["extra"] = orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else None
    return tuple(values.get(c.name) for c in ROW_COLUMNS)


def snapshot_message(
    identifier: str, id_key: str, overview: dict[str, Any], exchange_us: int
) -> dict[str, Any]:
    """A live overview as a wire-shaped stream message (only the market-data sections)."""
    data = {section: overview[section] for section in SECTION_TABLES if section in overview}
    return {
        "channel": CHANNEL,
        id_key: identifier,
        "timestamp": format_timestamp(exchange_us),
        "data": data,
    }
