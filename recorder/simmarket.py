"""Seeded, pure IME market: one random walk per contract, rendered as feed messages.

Nothing here touches a socket or a clock: callers pass the exchange time (`now`, UTC) and every
random draw comes from `random.Random` instances seeded from the simulator seed, so the same seed,
options and timestamps always give the same frames. The contracts and the wire vocabulary (ids,
sections, variants, timestamp formats) are in simcontracts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from recorder.simcontracts import (
    CHANNEL,
    EXTRA_KINDS,
    FAULT_KINDS,
    ID_KEYS,
    MIX_MISSING_SECTIONS,
    MIX_PARTIAL_LEVELS,
    SECTIONS,
    TEHRAN,
    TIMESTAMP_STYLES,
    Contract,
    Endpoint,
    FeedVariants,
    format_timestamp,
    round_tick,
)

# An unknown field per known section (None: filled with the previous close).
_EXTRA_FIELDS: dict[str, tuple[str, Any]] = {
    "BestLimit": ("4", {"buy_quantity": 0, "buy_price": 0, "sell_quantity": 0, "sell_price": 0}),
    "Aggregate": ("vwap", None),
    "AllowedPriceRange": ("reference_price", None),
    "ContractInfo": ("open_interest_value", None),
}


@dataclass(frozen=True, slots=True)
class Message:
    """One rendered frame and what the generator did to it (tests need to know)."""

    contract: Contract
    timestamp: datetime
    text: str
    fault: str | None = None
    extras: tuple[str, ...] = ()


def _floatify(value: Any) -> Any:
    if type(value) is int:
        return float(value)
    if isinstance(value, dict):
        return {key: _floatify(item) for key, item in value.items()}
    return value


@dataclass(slots=True)
class _State:
    """Mutable market state of one contract; advances only through `Market.update`."""

    rng: random.Random
    shape_rng: random.Random
    mid: int
    previous_close: int
    open_interest: int
    session: str = ""
    trade_count: int = 0
    total_volume: int = 0
    total_value: int = 0
    open_price: int = 0
    high_price: int = 0
    low_price: int = 0
    last_price: int = 0
    min_allowed: int = 0
    max_allowed: int = 0
    oi_session_start: int = 0
    sequence: int = 0
    last_ts: datetime | None = None
    book: dict[str, dict[str, int]] = field(default_factory=dict)


class Market:
    """The exchange: one seeded random walk per contract, rendered with the chosen variants.

    Each contract has its own random streams, so its sequence of updates does not depend on
    how updates of different contracts interleave (several connections may share a contract).
    """

    def __init__(self, contracts: Sequence[Contract], seed: int, variants: FeedVariants) -> None:
        self.variants = variants
        self._states: dict[str, _State] = {}
        # How busy each contract is relative to the others: a few hot, many quiet.
        self.activity: dict[str, float] = {}
        for c in contracts:
            self.activity[c.id] = random.Random(f"ime-activity:{seed}:{c.id}").lognormvariate(0, 1)
            rng = random.Random(f"ime-state:{seed}:{c.id}")
            shape_rng = random.Random(f"ime-shape:{seed}:{c.id}")
            oi = rng.randint(50, 20_000)
            self._states[c.id] = _State(rng, shape_rng, c.base_price, c.base_price, oi)

    def add(self, contract: Contract, seed: int) -> None:
        """Start the market state of a newly listed contract."""
        self.activity[contract.id] = random.Random(
            f"ime-activity:{seed}:{contract.id}"
        ).lognormvariate(0, 1)
        rng = random.Random(f"ime-state:{seed}:{contract.id}")
        shape_rng = random.Random(f"ime-shape:{seed}:{contract.id}")
        oi = rng.randint(50, 20_000)
        self._states[contract.id] = _State(
            rng, shape_rng, contract.base_price, contract.base_price, oi
        )

    def current(self, contract: Contract, now: datetime) -> dict[str, Any]:
        """The contract's sections as they stand, without advancing its market."""
        state = self._states[contract.id]
        ts = state.last_ts or (now if now.tzinfo is not None else now.replace(tzinfo=UTC))
        local = ts.astimezone(TEHRAN)
        if not state.session:
            self._open_session(contract, state, local.date().isoformat())
        return self._snapshot(contract, state, state.session, local.strftime("%H:%M:%S"))

    def update(self, contract: Contract, now: datetime, endpoint: Endpoint) -> Message:
        """Advance `contract` to exchange time `now` (UTC) and render one message."""
        state = self._states[contract.id]
        ts = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        if state.last_ts is not None and ts <= state.last_ts:
            ts = state.last_ts + timedelta(microseconds=1)
        state.last_ts = ts
        state.sequence += 1
        local = ts.astimezone(TEHRAN)
        session = local.date().isoformat()
        if session != state.session:
            self._open_session(contract, state, session)
        self._step(contract, state)
        data = self._snapshot(contract, state, session, local.strftime("%H:%M:%S"))
        return self._render(contract, state, ts, endpoint, data)

    def _open_session(self, contract: Contract, state: _State, session: str) -> None:
        rng, tick = state.rng, contract.tick_size
        first = not state.session
        if state.trade_count:
            vwap = state.total_value / (state.total_volume * contract.csize)
            state.previous_close = round_tick(vwap, tick)
        state.session = session
        state.trade_count = state.total_volume = state.total_value = 0
        state.open_price = state.high_price = state.low_price = state.last_price = 0
        state.oi_session_start = state.open_interest
        state.min_allowed = round_tick(state.previous_close * (1 - contract.price_limit), tick)
        state.max_allowed = round_tick(state.previous_close * (1 + contract.price_limit), tick)
        state.mid = state.previous_close
        if first and rng.random() < 0.7:  # start mid-session, as a recorder usually does
            for _ in range(rng.randint(1, 40)):
                self._trade(contract, state)

    def _trade(self, contract: Contract, state: _State) -> None:
        rng, tick = state.rng, contract.tick_size
        price = state.mid + tick * rng.randint(-2, 2)
        price = min(max(price, state.min_allowed), state.max_allowed)
        quantity = rng.randint(1, 50)
        if not state.trade_count:
            state.open_price = state.high_price = state.low_price = price
        state.trade_count += 1
        state.total_volume += quantity
        state.total_value += price * quantity * contract.csize
        state.last_price = price
        state.high_price = max(state.high_price, price)
        state.low_price = min(state.low_price, price)

    def _step(self, contract: Contract, state: _State) -> None:
        rng, tick = state.rng, contract.tick_size
        low, high = state.min_allowed + 3 * tick, state.max_allowed - 3 * tick
        state.mid = min(max(state.mid + tick * rng.choice((-2, -1, 0, 0, 1, 2)), low), high)
        if rng.random() < 0.45:
            for _ in range(rng.randint(1, 3)):
                self._trade(contract, state)
        if rng.random() < 0.3:
            state.open_interest = max(0, state.open_interest + rng.randint(-25, 30))
        bid = state.mid - tick * rng.randint(0, 1)
        ask = bid + tick * rng.randint(1, 3)
        bid_depth = 3 if rng.random() > 0.06 else rng.randint(0, 2)
        ask_depth = 3 if rng.random() > 0.06 else rng.randint(0, 2)
        book: dict[str, dict[str, int]] = {}
        for level in range(1, 4):
            if level > 1:
                bid -= tick * rng.randint(1, 3)
                ask += tick * rng.randint(1, 3)
            buy_qty, sell_qty = rng.randint(1, 300), rng.randint(1, 300)
            has_bid = level <= bid_depth and bid >= state.min_allowed
            has_ask = level <= ask_depth and ask <= state.max_allowed
            book[str(level)] = {
                "buy_quantity": buy_qty if has_bid else 0,
                "buy_price": bid if has_bid else 0,
                "sell_quantity": sell_qty if has_ask else 0,
                "sell_price": ask if has_ask else 0,
            }
        state.book = book

    @staticmethod
    def _snapshot(contract: Contract, state: _State, session: str, clock: str) -> dict[str, Any]:
        # IME settles on the session's volume-weighted average price, on the tick grid.
        closing = 0
        if state.total_volume:
            vwap = state.total_value / (state.total_volume * contract.csize)
            closing = round_tick(vwap, contract.tick_size)
        return {
            "BestLimit": {level: dict(side) for level, side in state.book.items()},
            "Aggregate": {
                "date": session,
                "time": clock,
                "trade_count": state.trade_count,
                "total_volume": state.total_volume,
                "total_value": state.total_value,
                "closing_price": closing,
                "last_price": state.last_price,
                "low_price": state.low_price,
                "high_price": state.high_price,
                "open_price": state.open_price,
                "previous_close": state.previous_close,
            },
            "AllowedPriceRange": {
                "minAllowedPrice": state.min_allowed,
                "maxAllowedPrice": state.max_allowed,
            },
            "ContractInfo": {
                "open_interest": state.open_interest,
                "open_interest_changes": state.open_interest - state.oi_session_start,
            },
        }

    def _render(
        self, contract: Contract, state: _State, ts: datetime, endpoint: Endpoint, data: Any
    ) -> Message:
        v = self.variants
        # A fixed number of draws per message: changing one option never reshuffles the others.
        u = [state.shape_rng.random() for _ in range(12)]
        style = TIMESTAMP_STYLES[int(u[0] * 3)] if v.variant_mix else v.timestamp_style
        if endpoint == "name":
            id_key, ident = "contractName", contract.name
        else:
            id_key = ID_KEYS[int(u[1] * 2)] if v.variant_mix else v.id_key
            ident = contract.id
        partial = v.partial_levels or (MIX_PARTIAL_LEVELS if v.variant_mix else 0.0)
        missing = v.missing_sections or (MIX_MISSING_SECTIONS if v.variant_mix else 0.0)
        fault = FAULT_KINDS[int(u[11] * len(FAULT_KINDS))] if u[10] < v.malformed else None
        if fault is None and u[2] < partial:
            keep = 1 + int(u[3] * 2)
            data["BestLimit"] = {k: s for k, s in data["BestLimit"].items() if int(k) <= keep}
        if fault is None and u[4] < missing:
            start = int(u[6] * 4)
            for j in range(1 + int(u[5] * 4)):
                del data[SECTIONS[(start + j) % 4]]
        if v.float_ints or (v.variant_mix and u[7] < 0.5):
            data = _floatify(data)
        obj = {"channel": CHANNEL, id_key: ident, "timestamp": format_timestamp(ts, style)}
        obj["data"] = data
        extras: tuple[str, ...] = ()
        if u[8] < v.unknown_sections:
            extras = (self._add_extra(obj, state, EXTRA_KINDS[int(u[9] * 3)]),)
        if fault is None:
            return Message(contract, ts, orjson.dumps(obj).decode(), None, extras)
        return Message(contract, ts, self._corrupt(obj, id_key, fault, u[9]), fault, extras)

    @staticmethod
    def _add_extra(obj: dict[str, Any], state: _State, kind: str) -> str:
        data: dict[str, Any] = obj["data"]
        if kind == "envelope":
            obj["sequence"] = state.sequence
            return "envelope:sequence"
        if kind == "field" and data:
            section = next(iter(data))
            extra, value = _EXTRA_FIELDS[section]
            data[section][extra] = value if value is not None else state.previous_close
            return f"field:{section}.{extra}"
        side = "buy" if state.sequence % 2 else "sell"
        data["OrderBookDelta"] = {"side": side, "level": 1, "price": state.mid, "action": "update"}
        return "section:OrderBookDelta"

    @staticmethod
    def _corrupt(obj: dict[str, Any], id_key: str, fault: str, u: float) -> str:
        """Break a well-formed message in the way `fault` names; returns the frame text."""
        data = obj["data"]
        if fault == "not_json":
            text = orjson.dumps(obj).decode()
            return text[: len(text) // 2]
        if fault == "not_object":
            return orjson.dumps([obj]).decode()
        if fault == "missing_identifier":
            del obj[id_key]
        elif fault == "missing_timestamp":
            del obj["timestamp"]
        elif fault == "missing_data":
            del obj["data"]
        elif fault == "string_price":
            data["BestLimit"]["1"]["sell_price"] = str(data["BestLimit"]["1"]["sell_price"])
        elif fault == "fractional_quantity":
            data["BestLimit"]["1"]["buy_quantity"] = data["BestLimit"]["1"]["buy_quantity"] + 0.5
        else:
            data[SECTIONS[int(u * 4)]] = None
        return orjson.dumps(obj).decode()


class Subscription:
    """What one connection receives: updates of its contracts, busier contracts more often."""

    def __init__(
        self, market: Market, contracts: Sequence[Contract], endpoint: Endpoint, seed: int
    ) -> None:
        if not contracts:
            raise ValueError("a subscription needs at least one contract")
        self.market = market
        self.contracts = tuple(contracts)
        self.endpoint = endpoint
        ids = ",".join(c.id for c in self.contracts)
        self._rng = random.Random(f"ime-pick:{seed}:{endpoint}:{ids}")
        self._weights = [market.activity[c.id] for c in self.contracts]

    def next(self, now: datetime) -> Message:
        """The next update on this connection, stamped no earlier than `now`."""
        contract = self._rng.choices(self.contracts, self._weights)[0]
        return self.market.update(contract, now, self.endpoint)
