"""Discovery pieces: the REST client against the simulator, reference rows, regrouping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from recorder.auth import TokenProvider
from recorder.config import AuthConfig, FeedConfig
from recorder.discovery import discover, next_refresh, searches
from recorder.reference import MARKETS, ROW_COLUMNS, market_of, reference_row, snapshot_message
from recorder.rest import RestClient, RestError, rest_base
from recorder.subscriptions import regroup
from tests.conftest import DEMO

T = TypeVar("T")
TEHRAN = ZoneInfo("Asia/Tehran")


def with_rest(sim: Any, use: Callable[[RestClient], Awaitable[T]]) -> T:
    """Run ``use`` with a RestClient logged in to ``sim``."""

    async def main() -> T:
        async with aiohttp.ClientSession() as session:
            tokens = TokenProvider(session, AuthConfig(token_url=sim.token_url), DEMO)
            return await use(RestClient(session, rest_base(sim.base_url), tokens))

    return asyncio.run(main())


def test_rest_base_maps_the_stream_base_url() -> None:
    """wss -> https and ws -> http, same host and path."""
    assert str(rest_base("wss://core.hedgetech.ir/data-engine/ime/")) == (
        "https://core.hedgetech.ir/data-engine/ime"
    )
    assert (
        str(rest_base("ws://127.0.0.1:9/data-engine/ime")) == "http://127.0.0.1:9/data-engine/ime"
    )


def test_search_finds_every_contract_of_a_market_and_only_those(simulator: Any) -> None:
    """search(market, "") lists the whole market; a fragment narrows it, case-insensitively."""
    sim = simulator(contracts=30)
    futures = sorted(c.id for c in sim.contracts if c.market == "IMEFutures")
    kash = sorted(c.id for c in sim.contracts if c.market == "IMEFutures" and "KASH" in c.name)

    async def use(rest: RestClient) -> tuple[list[str], list[str]]:
        whole = await rest.search("IMEFutures", "")
        part = await rest.search("IMEFutures", "kash")
        return sorted(i["contractId"] for i in whole), sorted(i["contractId"] for i in part)

    assert with_rest(sim, use) == (futures, kash)
    assert kash


def test_static_info_is_none_for_an_unknown_identifier(simulator: Any) -> None:
    """Static info by id and by name answers in request order, None for the unknown."""
    sim = simulator(contracts=3)
    name = sim.contracts[1].name

    async def use(rest: RestClient) -> tuple[list[Any], list[Any]]:
        return await rest.static_by_id(["1003", "9999"]), await rest.static_by_name([name])

    by_id, by_name = with_rest(sim, use)
    assert [i["contractId"] if i else None for i in by_id] == ["1003", None]
    assert [i["contractName"] for i in by_name] == [name]


def test_overview_carries_the_four_sections_and_the_server_time(simulator: Any) -> None:
    """The live overview has the sections of a stream message and a ServerTimeStamp."""
    sim = simulator(contracts=3)

    async def use(rest: RestClient) -> tuple[dict[str, Any], float | None]:
        return await rest.overview_by_id(["1001", "4242"])

    overview, server_time = with_rest(sim, use)
    assert overview["4242"] is None
    assert {"BestLimit", "Aggregate", "AllowedPriceRange", "ContractInfo"} <= set(overview["1001"])
    assert server_time is not None
    assert abs(server_time - datetime.now(UTC).timestamp()) < 60


def test_bad_search_raises_rest_error_with_the_detail(simulator: Any) -> None:
    """A request the server rejects raises RestError carrying the server's detail."""
    sim = simulator(contracts=3)

    async def use(rest: RestClient) -> list[dict[str, Any]]:
        return await rest.search("NYSE", "X")

    with pytest.raises(RestError, match="HTTP 422 market"):
        with_rest(sim, use)


def test_discover_markets_search_and_explicit(simulator: Any) -> None:
    """Explicit contracts first, then the searched ones; the static data of each is kept."""
    sim = simulator(contracts=30)
    futures = sorted(c.id for c in sim.contracts if c.market == "IMEFutures")
    option = next(c for c in sim.contracts if c.market == "IMEOption")
    feed = FeedConfig(contracts=(option.id,), markets=("IMEFutures",))

    universe = with_rest(sim, lambda rest: discover(rest, feed))
    assert universe.contracts == (option.id, *futures)
    assert [m for _, m in universe.reference] == ["IMEOption"] + ["IMEFutures"] * len(futures)


def test_a_contract_listed_later_is_discovered(simulator: Any) -> None:
    """A contract listed while the simulator runs shows up in the next discovery."""
    sim = simulator(contracts=5)
    feed = FeedConfig(markets=("IMEFutures",))
    before = with_rest(sim, lambda rest: discover(rest, feed)).contracts
    listed = sim.list_contract("IMEFutures")
    after = with_rest(sim, lambda rest: discover(rest, feed)).contracts
    assert after == (*before, listed.id)


@pytest.mark.parametrize(
    ("markets", "search", "expected"),
    [
        ((), ("KASH",), [(m, "KASH") for m in MARKETS]),
        (("IMEFutures",), (), [("IMEFutures", "")]),
        (("IMEFutures", "IMEOption"), ("A", "B"), [
            ("IMEFutures", "A"), ("IMEFutures", "B"), ("IMEOption", "A"), ("IMEOption", "B"),
        ]),
        ((), (), []),
    ],
)  # fmt: skip
def test_searches_follow_markets_and_fragments(
    markets: tuple[str, ...], search: tuple[str, ...], expected: list[tuple[str, str]]
) -> None:
    """Each fragment in each listed market (all three when none); a bare market is taken whole."""
    assert searches(FeedConfig(markets=markets, search=search)) == expected


def test_reference_row_maps_every_field_and_keeps_the_unknown() -> None:
    """Static fields become snake_case columns; unknown or misfit fields are kept as JSON."""
    item = {
        "contractId": "77",
        "contractName": "KASH-C1",
        "title": "اختیار",
        "optionType": "call",
        "strikePrice": 1000,
        "csize": 10.0,
        "ExpirationDate": "2026-12-20",
        "canBuy": True,
        "minValidBuyVolume": "lots",
        "brandNew": [1],
    }
    row = dict(zip([c.name for c in ROW_COLUMNS], reference_row(item), strict=True))
    assert row["market"] == "IMEOption"
    assert (row["contract_id"], row["contract_name"], row["title"]) == ("77", "KASH-C1", "اختیار")
    assert (row["option_type"], row["strike_price"], row["csize"]) == ("call", 1000.0, 10)
    assert row["expiration_date"] == date(2026, 12, 20)
    assert row["can_buy"] is True
    assert row["min_valid_buy_volume"] is None
    assert row["storage_cost"] is None
    assert row["extra"] == '{"brandNew":[1],"minValidBuyVolume":"lots"}'


@pytest.mark.parametrize(
    ("item", "market"),
    [({"optionType": "put"}, "IMEOption"), ({"StorageCost": 1.0}, "IMEDepositCertificate"),
     ({"initialMargin": 0.1}, "IMEFutures")],
)  # fmt: skip
def test_market_is_told_by_the_fields(item: dict[str, Any], market: str) -> None:
    """Options have optionType, certificates StorageCost, futures neither."""
    assert market_of(item) == market


def test_snapshot_message_is_a_wire_message() -> None:
    """An overview becomes a stream-shaped message with only the market sections."""
    overview = {"contractId": "1", "title": "x", "ContractInfo": {"open_interest": 5}}
    assert snapshot_message("1", "contractId", overview, 1_000_000) == {
        "channel": "IME Stream",
        "contractId": "1",
        "timestamp": "1970-01-01T00:00:01.000000Z",
        "data": {"ContractInfo": {"open_interest": 5}},
    }


@pytest.mark.parametrize(
    ("groups", "wanted", "keep", "opened"),
    [
        ([("a", "b")], ["a", "b", "c"], [("a", "b")], [("c",)]),
        ([("a", "b"), ("c",)], ["a", "c"], [("c",)], [("a",)]),
        ([("a", "b")], ["b", "a"], [("a", "b")], []),
        ([("a",)], [], [], []),
        ([], ["a", "b", "c"], [], [("a", "b"), ("c",)]),
    ],
)
def test_regroup_touches_only_groups_that_changed(
    groups: list[tuple[str, ...]],
    wanted: list[str],
    keep: list[tuple[str, ...]],
    opened: list[tuple[str, ...]],
) -> None:
    """Unchanged groups stay, a shrunk group is replaced, new contracts fill new groups."""
    assert regroup(groups, wanted, 2) == (keep, opened)


def test_next_refresh_is_the_interval_or_local_midnight() -> None:
    """The refresh comes after the interval, or at the next Tehran midnight if that is sooner."""
    noon = datetime(2026, 5, 29, 8, 30, tzinfo=UTC)  # 12:00 in Tehran
    assert next_refresh(noon, 3600, TEHRAN) == 3600
    late = datetime(2026, 5, 29, 20, 0, tzinfo=UTC)  # 23:30 in Tehran
    assert next_refresh(late, 3600, TEHRAN) == 1800
