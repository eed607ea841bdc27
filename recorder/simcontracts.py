"""The simulator's listed contracts and wire vocabulary: ids, names, feed variants, formatting.

Pure and seeded like the market in simmarket: `make_contracts` draws from a `random.Random` seeded
from the simulator seed, so the same seed always lists the same contracts; nothing here touches a
socket or a clock.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Literal
from zoneinfo import ZoneInfo

Endpoint = Literal["id", "name"]
IdKey = Literal["contractId", "ContractId"]
TimestampStyle = Literal["z", "offset", "naive"]

TEHRAN = ZoneInfo("Asia/Tehran")
CHANNEL = "IME Stream"
MARKETS = ("IMEFutures", "IMEOption", "IMEDepositCertificate")
SECTIONS = ("BestLimit", "Aggregate", "AllowedPriceRange", "ContractInfo")
TIMESTAMP_STYLES: tuple[TimestampStyle, ...] = ("z", "offset", "naive")
ID_KEYS: tuple[IdKey, ...] = ("contractId", "ContractId")
FAULT_KINDS = (
    "not_json",
    "not_object",
    "missing_identifier",
    "missing_timestamp",
    "missing_data",
    "string_price",
    "fractional_quantity",
    "null_section",
)
EXTRA_KINDS = ("section", "field", "envelope")
# Probabilities `variant_mix` uses where the explicit option is left at 0.
MIX_PARTIAL_LEVELS = 0.2
MIX_MISSING_SECTIONS = 0.1

# commodity code, lowest and highest base price (IRR), contract size, daily price limit
_COMMODITIES: tuple[tuple[str, int, int, int, float], ...] = (
    ("GOLD", 3_000_000, 5_000_000, 10, 0.05),
    ("SAFFRON", 150_000, 450_000, 1000, 0.06),
    ("KASH", 900_000, 1_800_000, 100, 0.05),
    ("PISTACHIO", 600_000, 1_200_000, 100, 0.05),
    ("CEMENT", 100_000, 180_000, 1000, 0.04),
    ("COPPER", 2_500_000, 4_000_000, 10, 0.04),
    ("ZINC", 1_000_000, 1_600_000, 10, 0.04),
    ("STEEL", 200_000, 350_000, 1000, 0.04),
    ("UREA", 120_000, 250_000, 1000, 0.05),
    ("BITUMEN", 180_000, 320_000, 1000, 0.05),
    ("BARLEY", 100_000, 160_000, 1000, 0.04),
    ("SILVER", 1_500_000, 2_500_000, 10, 0.05),
)
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_YEARS = ("05", "06", "07")  # Persian years 1405..1407, roughly 2026..2028
# Names that break naive storage: separators, traversal, hive `key=value`, escapes, Persian.
ODD_NAMES = (
    "GOLD/APR05",
    "..",
    "../SAFFRON-MAY05",
    "KASH=JUN05",
    "contract=1001",
    "CEMENT%2FJUL05",
    "COPPER AUG05",
    "سکه-طلا",
    "زعفران-مهر۰۵",
)


@dataclass(frozen=True, slots=True)
class Contract:
    """One listed IME contract with its static reference data."""

    id: str
    name: str
    market: str
    commodity: str
    csize: int
    tick_size: int
    base_price: int
    expiration_date: date
    price_limit: float
    strike_price: int | None = None
    option_type: Literal["call", "put"] | None = None


@dataclass(frozen=True, slots=True)
class FeedVariants:
    """How messages are rendered on the wire; see PROTOCOL.md for each variant's source.

    `variant_mix` picks per message the timestamp style, the id key (id endpoint), whether
    integers go as floats, and applies partial books / missing sections at their own share
    (or 0.2 / 0.1 when those are left at 0). `malformed` and `unknown_sections` stay separate.
    """

    id_key: IdKey = "contractId"
    timestamp_style: TimestampStyle = "z"
    partial_levels: float = 0.0
    missing_sections: float = 0.0
    float_ints: bool = False
    variant_mix: bool = False
    malformed: float = 0.0
    unknown_sections: float = 0.0


def _tick_for(price: int) -> int:
    for tick in (1000, 500, 100, 50, 10):
        if price // tick >= 2000:
            return tick
    return 1


def round_tick(value: float, tick: int) -> int:
    return max(tick, round(value / tick) * tick)


def make_contracts(count: int, seed: int, *, odd_names: bool = False) -> list[Contract]:
    """Build the contract universe: ids "1001".."1000+count", unique names, one KASH future."""
    rng = random.Random(f"ime-contracts:{seed}")
    commodities = list(_COMMODITIES)
    rng.shuffle(commodities)
    kash = next(i for i, c in enumerate(commodities) if c[0] == "KASH")
    kash_slot = rng.randrange(max(1, min(count, len(commodities))))
    commodities[kash], commodities[kash_slot] = commodities[kash_slot], commodities[kash]
    used: set[str] = set()
    contracts: list[Contract] = []
    for i in range(1, count + odd_names * len(ODD_NAMES) + 1):
        code, low, high, csize, limit = commodities[(i - 1) % len(commodities)]
        forced_future = (i - 1) == kash_slot or i > count
        market = "IMEFutures" if forced_future else rng.choices(MARKETS, (80, 12, 8))[0]
        month, year, base = rng.randrange(12), rng.choice(_YEARS), rng.randint(low, high)
        tick = _tick_for(base)
        base = round_tick(base, tick)
        strike: int | None = None
        kind: Literal["call", "put"] | None = None
        if market == "IMEOption":  # priced as a premium, named by side and strike
            kind = option = rng.choice(("call", "put"))
            strike = round_tick(base * rng.uniform(0.9, 1.1), tick)
            stem = f"{code}-{_MONTHS[month]}{year}-{option[0].upper()}{strike}"
            base, tick = round_tick(max(base * rng.uniform(0.02, 0.08), 10_000), 10), 10
        elif market == "IMEDepositCertificate":
            stem = f"{code}-DC{year}{month + 1:02d}"
        else:
            stem = f"{code}-{_MONTHS[month]}{year}"
        name = stem if i <= count else ODD_NAMES[i - count - 1]
        suffix = 2
        while name in used:
            name, suffix = f"{stem}-{suffix}", suffix + 1
        used.add(name)
        expiry = date(2026 + _YEARS.index(year) + (month < 2), month + 1, rng.randint(15, 28))
        fields = (name, market, code, csize, tick, base, expiry, limit, strike, kind)
        contracts.append(Contract(str(1000 + i), *fields))
    return contracts


def new_contract(
    existing: Sequence[Contract], market: str, seed: int, name: str | None = None
) -> Contract:
    """A contract listed later: the next free id, a unique name, in ``market``."""
    number = max((int(c.id) for c in existing if c.id.isdigit()), default=1000) + 1
    template = make_contracts(1, seed + number)[0]
    taken = {c.name for c in existing}
    name = name or f"{template.commodity}-NEW{number}"
    while name in taken:
        name += "-2"
    strike = template.base_price if market == "IMEOption" else None
    option: Literal["call", "put"] | None = "call" if market == "IMEOption" else None
    return Contract(
        str(number), name, market, template.commodity, template.csize, template.tick_size,
        template.base_price, template.expiration_date, template.price_limit, strike, option,
    )  # fmt: skip


def format_timestamp(ts: datetime, style: TimestampStyle) -> str:
    """Render an exchange time: `Z` UTC, Tehran local with offset, or naive UTC wall time."""
    if style == "offset":
        return ts.astimezone(TEHRAN).isoformat(timespec="microseconds")
    utc = ts.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text + "Z" if style == "z" else text


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked server-to-client WebSocket text frame (FIN, opcode 1)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload
