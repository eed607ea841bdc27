"""The feed simulator: pure generator properties, then the server over loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from recorder.simcontracts import (
    FAULT_KINDS,
    SECTIONS,
    FeedVariants,
    format_timestamp,
    make_contracts,
)
from recorder.simmarket import Market, Subscription
from recorder.simrunner import SimulatorThread
from recorder.simulator import SimulatorOptions

TOKEN = "static-test-token"
NOON = datetime(2026, 5, 29, 12, 0, tzinfo=UTC)
LEVEL_FIELDS = {"buy_quantity", "buy_price", "sell_quantity", "sell_price"}
AGGREGATE_FIELDS = {
    "date",
    "time",
    "trade_count",
    "total_volume",
    "total_value",
    "closing_price",
    "last_price",
    "low_price",
    "high_price",
    "open_price",
    "previous_close",
}


def serve(**options: Any) -> SimulatorThread:
    """A simulator thread with the test token and flat-out sending unless told otherwise."""
    options.setdefault("static_token", TOKEN)
    options.setdefault("rate", 0)
    return SimulatorThread(SimulatorOptions(**options))


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def generate(count: int, seed: int = 0, **variants: Any) -> list[str]:
    contracts = make_contracts(5, seed)
    feed = Subscription(Market(contracts, seed, FeedVariants(**variants)), contracts, "id", seed)
    return [feed.next(NOON + timedelta(seconds=i)).text for i in range(count)]


class Stream:
    """Frames and the close code one client saw on one stream."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.end: WSMsgType | None = None


async def read_stream(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    count: int | None = None,
    then_close: bool = True,
    then: Callable[[], None] | None = None,
) -> Stream:
    """Read `count` frames (or until the server closes), optionally run `then`, then close
    from the client side while still reading, so frames sent before the server's close count."""
    seen = Stream()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": TOKEN, **(headers or {})}) as ws,
    ):
        acted = False
        while True:
            if not acted and count is not None and len(seen.frames) >= count:
                acted = True
                if then is not None:
                    await asyncio.to_thread(then)
                if then_close:  # a bare close frame: `ws.close()` would discard what follows
                    await ws.send_frame(struct.pack("!H", 1000), WSMsgType.CLOSE)
            msg = await ws.receive(timeout=10)
            if msg.type is WSMsgType.TEXT:
                seen.frames.append(msg.data)
                continue
            seen.end = msg.type
            seen.close_code = msg.data if msg.type is WSMsgType.CLOSE else ws.close_code
            seen.close_reason = msg.extra or "" if msg.type is WSMsgType.CLOSE else ""
            return seen


def read(url: str, **kwargs: Any) -> Stream:
    return asyncio.run(read_stream(url, **kwargs))


async def post_form(url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=form) as response:
        return response.status, await response.json()


def jwt_part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


# ---- the pure generator --------------------------------------------------------------------


def test_contract_names_unique_with_kash_future() -> None:
    """Every universe size has unique names, ids 1001.., and a KASH future for search."""
    for count in (1, 2, 5, 13, 200):
        contracts = make_contracts(count, seed=3)
        assert [c.id for c in contracts] == [str(1001 + i) for i in range(count)]
        assert len({c.name for c in contracts}) == count
        assert any(c.name.startswith("KASH-") and c.market == "IMEFutures" for c in contracts)
        assert all(c.name.isascii() and " " not in c.name for c in contracts)


def test_odd_names_are_added() -> None:
    """`odd_names` appends contracts whose names carry separators, escapes and Persian."""
    names = [c.name for c in make_contracts(3, 0, odd_names=True)][3:]
    assert "GOLD/APR05" in names
    assert ".." in names
    assert "سکه-طلا" in names
    assert any(" " in n for n in names)
    assert any("%" in n for n in names)
    assert any("=" in n for n in names)


def test_same_seed_same_messages_pure() -> None:
    """The same seed and timestamps give identical frames; another seed does not."""
    assert generate(200, seed=7, variant_mix=True) == generate(200, seed=7, variant_mix=True)
    assert generate(50, seed=7) != generate(50, seed=8)


def test_timestamps_strictly_increase_per_contract() -> None:
    """A clock that stands still still yields strictly increasing stamps per contract."""
    contracts = make_contracts(3, 0)
    feed = Subscription(Market(contracts, 0, FeedVariants()), contracts, "id", 0)
    last: dict[str, datetime] = {}
    for _ in range(300):
        message = feed.next(NOON)
        assert message.timestamp > last.get(message.contract.id, NOON - timedelta(1))
        last[message.contract.id] = message.timestamp
    assert min(last.values()) >= NOON


def test_book_and_aggregate_are_consistent_across_tehran_midnight() -> None:
    """Books are ordered, totals only grow within a Tehran date and restart on the next."""
    contracts = make_contracts(1, 4)
    feed = Subscription(Market(contracts, 4, FeedVariants()), contracts, "name", 4)
    start = datetime(2026, 5, 29, 20, 0, tzinfo=UTC)  # 23:30 in Tehran
    previous: dict[str, Any] = {}
    dates = []
    for i in range(600):
        data = orjson.loads(feed.next(start + timedelta(seconds=6 * i)).text)["data"]
        agg, book, band = data["Aggregate"], data["BestLimit"], data["AllowedPriceRange"]
        dates.append(agg["date"])
        if previous.get("date") == agg["date"]:
            for key in ("trade_count", "total_volume", "total_value"):
                assert agg[key] >= previous[key]
        elif previous:
            assert agg["previous_close"] == previous["closing_price"]
        if agg["trade_count"]:
            low, high = agg["low_price"], agg["high_price"]
            assert low <= agg["last_price"] <= high
            assert low <= agg["open_price"] <= high
            assert low <= agg["closing_price"] <= high
            assert band["minAllowedPrice"] <= low
            assert high <= band["maxAllowedPrice"]
        bids = [book[k]["buy_price"] for k in "123" if book[k]["buy_price"]]
        asks = [book[k]["sell_price"] for k in "123" if book[k]["sell_price"]]
        assert bids == sorted(bids, reverse=True)
        assert asks == sorted(asks)
        assert not (bids and asks) or bids[0] < asks[0]
        previous = agg
    assert dates[0] == "2026-05-29"
    assert dates[-1] == "2026-05-30"


def test_partial_levels_and_missing_sections_rates() -> None:
    """Partial books and missing sections appear at about the requested share, every run alike."""
    texts = generate(4000, partial_levels=0.3, missing_sections=0.2)
    datas = [orjson.loads(t)["data"] for t in texts]
    partial = sum(1 for d in datas if "BestLimit" in d and len(d["BestLimit"]) < 3)
    missing = sum(1 for d in datas if set(d) != set(SECTIONS))
    with_book = sum(1 for d in datas if "BestLimit" in d)
    assert abs(partial / with_book - 0.3) < 0.03
    assert abs(missing / len(datas) - 0.2) < 0.03
    assert all(
        list(d["BestLimit"]) in (["1"], ["1", "2"], ["1", "2", "3"])
        for d in datas
        if "BestLimit" in d
    )
    assert texts == generate(4000, partial_levels=0.3, missing_sections=0.2)


def test_malformed_frames_are_reported() -> None:
    """Each malformed frame is broken the way its reported fault says."""
    contracts = make_contracts(2, 0)
    feed = Subscription(Market(contracts, 0, FeedVariants(malformed=1.0)), contracts, "id", 0)
    seen: Counter[str] = Counter()
    for i in range(400):
        message = feed.next(NOON + timedelta(seconds=i))
        assert message.fault is not None
        seen[message.fault] += 1
        if message.fault == "not_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(message.text)
            continue
        obj = orjson.loads(message.text)
        if message.fault == "not_object":
            assert isinstance(obj, list)
            continue
        expected_missing = {
            "missing_identifier": "contractId",
            "missing_timestamp": "timestamp",
            "missing_data": "data",
        }.get(message.fault)
        if expected_missing:
            assert expected_missing not in obj
        elif message.fault == "string_price":
            assert isinstance(obj["data"]["BestLimit"]["1"]["sell_price"], str)
        elif message.fault == "fractional_quantity":
            assert obj["data"]["BestLimit"]["1"]["buy_quantity"] % 1 == 0.5
        else:
            assert None in obj["data"].values()
    assert set(seen) == set(FAULT_KINDS)


def test_unknown_sections_are_reported() -> None:
    """Unknown sections and fields come with a report naming what was added."""
    contracts = make_contracts(2, 0)
    feed = Subscription(
        Market(contracts, 0, FeedVariants(unknown_sections=1.0)), contracts, "id", 0
    )
    kinds = set()
    for i in range(60):
        message = feed.next(NOON + timedelta(seconds=i))
        (extra,) = message.extras
        kind, _, where = extra.partition(":")
        obj = orjson.loads(message.text)
        if kind == "envelope":
            assert where in obj
        elif kind == "section":
            assert where in obj["data"]
        else:
            section, _, field = where.partition(".")
            assert field in obj["data"][section]
        kinds.add(kind)
    assert kinds == {"envelope", "section", "field"}


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("z", "2026-05-29T12:00:00.000000Z"),
        ("offset", "2026-05-29T15:30:00.000000+03:30"),
        ("naive", "2026-05-29T12:00:00.000000"),
    ],
)
def test_format_timestamp(style: Any, expected: str) -> None:
    """Each timestamp style renders the same instant as its documented example."""
    assert format_timestamp(NOON, style) == expected


# ---- the server: authentication ------------------------------------------------------------


@pytest.mark.parametrize("fields", [("UserName_or_Email", "Password"), ("username", "password")])
def test_login_accepts_both_form_spellings(fields: tuple[str, str]) -> None:
    """Good credentials in either form spelling get 201 and a JWT in `Authorization`."""
    with serve(token_ttl_seconds=900, max_messages=3) as sim:
        status, body = asyncio.run(
            post_form(sim.token_url, dict(zip(fields, ("demo", "demo"), strict=True)))
        )
        assert status == 201
        assert list(body) == ["Authorization"]
        token = body["Authorization"]
        assert jwt_part(token, 0) == {"alg": "HS256", "typ": "JWT"}
        claims = jwt_part(token, 1)
        assert claims["sub"] == "demo"
        assert claims["exp"] - claims["iat"] == 900
        assert sim.stats()["tokens_issued"] == 1
        assert (
            len(
                read(
                    sim.stream_url("id", ["1001"]), headers={"Authorization": token}, count=3
                ).frames
            )
            == 3
        )


def test_login_bad_password_is_401_with_detail() -> None:
    """A wrong password gets 401 with `detail`, never echoing the password."""
    with serve() as sim:
        status, body = asyncio.run(
            post_form(sim.token_url, {"username": "demo", "password": "s3cr"})
        )
        assert status == 401
        assert set(body) == {"detail"}
        assert "s3cr" not in body["detail"]
        status, body = asyncio.run(post_form(sim.token_url, {}))
        assert status == 401
        assert "detail" in body
        assert sim.stats()["logins_failed"] == 2


@pytest.mark.parametrize(
    ("scheme", "header", "accepted"),
    [
        ("any", TOKEN, True),
        ("any", f"Bearer {TOKEN}", True),
        ("raw", TOKEN, True),
        ("raw", f"Bearer {TOKEN}", False),
        ("bearer", f"Bearer {TOKEN}", True),
        ("bearer", TOKEN, False),
    ],
)
def test_header_schemes(scheme: Any, header: str, accepted: bool) -> None:
    """Raw and Bearer headers are both accepted by default; a strict scheme refuses the other."""
    with serve(header_scheme=scheme, max_messages=2) as sim:
        seen = read(sim.stream_url("id", ["1001"]), headers={"Authorization": header}, count=2)
        if accepted:
            assert len(seen.frames) == 2
            assert seen.close_code == 1000
        else:
            assert seen.frames == []
            assert seen.close_code == 1008
            assert seen.close_reason == "bad auth scheme"


@pytest.mark.parametrize(
    ("endpoint", "idents", "header", "reason"),
    [
        ("id", ["1001", "9999"], TOKEN, "unknown contract"),
        ("name", ["NOPE-JAN05"], TOKEN, "unknown contract"),
        ("id", [], TOKEN, "no contract"),
        ("id", ["1001"], "not-a-token", "invalid token"),
        ("id", ["1001"], "", "missing token"),
    ],
)
def test_refusals_close_with_1008(
    endpoint: Any, idents: list[str], header: str, reason: str
) -> None:
    """In 1008 mode a bad handshake is accepted, then closed with 1008 and a short reason."""
    with serve() as sim:
        seen = read(sim.stream_url(endpoint, idents), headers={"Authorization": header})
        assert (seen.frames, seen.close_code, seen.close_reason) == ([], 1008, reason)
        assert "9999" not in seen.close_reason
        assert sim.stats()["refusals"] == {reason: 1}


def test_unknown_contract_refused_with_403() -> None:
    """In 403 mode an unknown contract fails the handshake itself with HTTP 403."""
    with serve(refuse_with="403") as sim:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            read(sim.stream_url("id", ["1001", "4242"]))
        assert caught.value.status == 403
        sim.set_refuse_with("1008")
        seen = read(sim.stream_url("id", ["4242"]))
        assert seen.close_code == 1008
        assert sim.stats()["refusals"] == {"unknown contract": 2}


def test_revoked_and_expired_tokens_are_refused() -> None:
    """Revoked and expired tokens are refused; the static token survives a revocation."""
    with serve(max_messages=1) as sim:
        stale, fresh = sim.issue_token(ttl_seconds=-1.0), sim.issue_token()
        url = sim.stream_url("id", ["1001"])
        assert read(url, headers={"Authorization": stale}).close_reason == "expired token"
        sim.revoke_tokens()
        assert read(url, headers={"Authorization": fresh}).close_reason == "revoked token"
        assert len(read(url, count=1).frames) == 1
        assert sim.stats()["tokens_revoked"] == 2


def test_expired_token_closes_open_stream_with_1008() -> None:
    """A token that expires mid-stream closes that stream with 1008 at its `exp`."""
    with serve(rate=200) as sim:
        token = sim.issue_token(ttl_seconds=0.5)
        seen = read(sim.stream_url("id", ["1001"]), headers={"Authorization": token})
        assert (seen.close_code, seen.close_reason) == (1008, "expired token")
        assert 10 <= len(seen.frames) == sim.stats()["messages_sent"]["1"]


# ---- the server: streams -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "id_key"),
    [("id", "contractId"), ("id", "ContractId"), ("name", "contractId")],
)
def test_stream_delivers_exactly_max_messages(endpoint: Any, id_key: Any) -> None:
    """A stream delivers exactly `max_messages` well-shaped frames, then stays open and idle."""
    with serve(max_messages=40, contracts=6, id_key=id_key) as sim:
        chosen = sim.contracts[1:4]
        idents = [c.id if endpoint == "id" else c.name for c in chosen]
        seen = read(sim.stream_url(endpoint, idents), count=40)
        assert len(seen.frames) == 40
        assert seen.close_code == 1000
        assert sim.stats()["messages_sent"] == {"1": 40}
        key = id_key if endpoint == "id" else "contractName"
        for text in seen.frames:
            obj = json.loads(text)
            assert list(obj) == ["channel", key, "timestamp", "data"]
            assert obj["channel"] == "IME Stream"
            assert obj[key] in idents
            data = obj["data"]
            assert list(data) == list(SECTIONS)
            assert list(data["BestLimit"]) == ["1", "2", "3"]
            assert all(set(level) == LEVEL_FIELDS for level in data["BestLimit"].values())
            assert set(data["Aggregate"]) == AGGREGATE_FIELDS
            assert set(data["AllowedPriceRange"]) == {"minAllowedPrice", "maxAllowedPrice"}
            assert set(data["ContractInfo"]) == {"open_interest", "open_interest_changes"}
        assert len({json.loads(t)[key] for t in seen.frames}) == 3


def test_odd_names_survive_the_url() -> None:
    """Names with `/`, `%`, `=`, spaces and Persian subscribe and come back verbatim."""
    with serve(odd_names=True, contracts=2, max_messages=60) as sim:
        names = [c.name for c in sim.contracts[2:]]
        seen = read(sim.stream_url("name", names), count=60)
        assert {json.loads(t)["contractName"] for t in seen.frames} <= set(names)
        assert len({json.loads(t)["contractName"] for t in seen.frames}) > 3


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("z", "2026-05-29T12:00:00.000000Z"),
        ("offset", "2026-05-29T15:30:00.000000+03:30"),
        ("naive", "2026-05-29T12:00:00.000000"),
    ],
)
def test_timestamp_styles_on_the_wire(style: Any, expected: str) -> None:
    """The stream's timestamps follow `timestamp_style` and parse back to the same instant."""
    with serve(timestamp_style=style, clock=lambda: NOON, max_messages=3) as sim:
        stamps = [
            json.loads(t)["timestamp"] for t in read(sim.stream_url("id", ["1001"]), count=3).frames
        ]
        assert stamps[0] == expected
        parsed = [datetime.fromisoformat(s) for s in stamps]
        as_utc = [p.replace(tzinfo=UTC) if p.tzinfo is None else p.astimezone(UTC) for p in parsed]
        assert as_utc == [NOON + timedelta(microseconds=i) for i in range(3)]


def test_float_ints_sends_every_integer_as_float() -> None:
    """With `float_ints` every number in `data` is an integral float, never an int."""

    def numbers(value: Any) -> list[Any]:
        if isinstance(value, dict):
            return [n for item in value.values() for n in numbers(item)]
        return [value] if isinstance(value, int | float) else []

    with serve(float_ints=True, max_messages=20) as sim:
        seen = read(sim.stream_url("id", ["1001", "1002"]), count=20)
    values = [n for t in seen.frames for n in numbers(json.loads(t)["data"])]
    assert len(values) == 20 * 25
    assert all(type(n) is float and n.is_integer() for n in values)
    assert '"trade_count":0,' not in "".join(seen.frames)


def test_close_all_closes_with_code() -> None:
    """`close_all(1011)` ends open streams with 1011 and its reason."""
    with serve(rate=100) as sim:
        seen = read(
            sim.stream_url("id", ["1001"]),
            count=2,
            then_close=False,
            then=lambda: sim.close_all(1011, "redis stream interrupted"),
        )
        assert (seen.close_code, seen.close_reason) == (1011, "redis stream interrupted")
        assert sim.stats()["server_closes"] == {"1011": 1}


def test_abort_all_drops_without_close_frame() -> None:
    """`abort_all()` drops the TCP connection: the client sees no close frame."""
    with serve(rate=100) as sim:
        seen = read(sim.stream_url("id", ["1001"]), count=1, then_close=False, then=sim.abort_all)
        assert seen.end in (WSMsgType.CLOSED, WSMsgType.ERROR)
        assert seen.close_code == 1006
        wait_until(lambda: sim.stats()["connections_open"] == 0)


@pytest.mark.parametrize("fast", [False, True])
def test_client_close_gets_every_frame_sent_before(fast: bool) -> None:
    """After the client's close, every frame the server sent before its own close arrives."""
    with serve(fast=fast, keep_sent=True, fast_pool=500) as sim:
        seen = read(sim.stream_url("id", ["1001", "1002", "1003"]), count=300)
        wait_until(lambda: sim.stats()["connections_open"] == 0)
        sent = sim.sent
        assert len(seen.frames) == len(sent) == sim.stats()["messages_sent"]["1"] >= 300
        assert seen.frames == [frame.text for frame in sent]
        assert seen.close_code == 1000


def test_fast_mode_delivers_exactly_max_messages() -> None:
    """Fast mode cycles its pool and delivers exactly `max_messages` valid JSON frames."""
    with serve(fast=True, max_messages=20_000, contracts=50) as sim:
        idents = [c.id for c in sim.contracts]
        seen = read(sim.stream_url("id", idents), count=20_000)
        assert len(seen.frames) == 20_000
        assert seen.close_code == 1000
        assert all(json.loads(t)["contractId"] in idents for t in seen.frames)
        assert len(set(seen.frames)) == 4096
        assert sim.stats()["messages_sent_total"] == 20_000


def test_same_seed_same_messages_on_the_wire() -> None:
    """Two simulators with the same seed and clock send identical streams."""
    streams = []
    for seed in (5, 5, 6):
        with serve(seed=seed, clock=lambda: NOON, max_messages=30, variant_mix=True) as sim:
            streams.append(read(sim.stream_url("id", ["1001", "1003"]), count=30).frames)
    assert streams[0] == streams[1] != streams[2]


def test_client_heartbeat_is_answered() -> None:
    """Client pings on an idle stream get pongs, so the stream stays open."""

    async def idle() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                sim.stream_url("id", ["1001"]), heartbeat=0.1, headers={"Authorization": TOKEN}
            ) as ws,
        ):
            assert (await ws.receive(timeout=5)).type is WSMsgType.TEXT
            with pytest.raises(TimeoutError):  # wait_for: a pong would restart receive's timeout
                await asyncio.wait_for(ws.receive(), 0.6)  # several heartbeat rounds, no data
            return ws.closed

    with serve(max_messages=1) as sim:
        assert asyncio.run(idle()) is False


def test_http_control_api() -> None:
    """`/_sim/close`, `/_sim/stats` and `/_sim/sent` work for a subprocess simulator."""

    async def control(base: str) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/_sim/close?code=4000&reason=bye") as response:
                status = response.status
            async with session.get(f"{base}/_sim/stats") as response:
                stats = await response.json()
            async with session.get(f"{base}/_sim/sent") as response:
                sent = [json.loads(line) for line in (await response.text()).splitlines()]
        return status, stats, sent

    with serve(keep_sent=True, rate=100) as sim:
        base = f"http://127.0.0.1:{sim.port}"
        results: list[Any] = []
        seen = read(
            sim.stream_url("id", ["1001"]),
            count=3,
            then_close=False,
            then=lambda: results.append(asyncio.run(control(base))),
        )
        status, stats, sent = results[0]
        assert status == 200
        assert (seen.close_code, seen.close_reason) == (4000, "bye")
        assert stats["connections_accepted"] == 1
        assert stats["server_closes"] == {"4000": 1}
        assert [line["text"] for line in sent] == seen.frames[: len(sent)]
        assert [line["seq"] for line in sent] == list(range(1, len(sent) + 1))


def test_scaled_clock_crosses_tehran_midnight() -> None:
    """`start_time` and `time_scale` run a stream across Tehran midnight within a second."""
    start = datetime(2026, 5, 29, 20, 29, 58, tzinfo=UTC)  # 23:59:58 in Tehran
    with serve(start_time=start, time_scale=100.0, rate=100, max_messages=40) as sim:
        frames = [json.loads(t) for t in read(sim.stream_url("id", ["1002"]), count=40).frames]
    stamps = [datetime.fromisoformat(f["timestamp"]) for f in frames]
    dates = [f["data"]["Aggregate"]["date"] for f in frames]
    assert stamps == sorted(stamps)
    assert start <= stamps[0] < start + timedelta(seconds=2)
    assert dates[0] == "2026-05-29"
    assert dates[-1] == "2026-05-30"
    first_new = frames[dates.index("2026-05-30")]["data"]["Aggregate"]
    assert first_new["time"].startswith("00:00:")
    assert first_new["trade_count"] <= 3


def test_pause_and_resume() -> None:
    """While paused nothing is sent on an open stream; `resume()` restarts it."""

    async def paused_then_resumed() -> tuple[int, int]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                sim.stream_url("id", ["1001"]), headers={"Authorization": TOKEN}
            ) as ws,
        ):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.receive(), 0.2)
            sent_while_paused = sim.stats()["messages_sent_total"]
            await asyncio.to_thread(sim.resume)
            msg = await ws.receive(timeout=5)
            return sent_while_paused, int(msg.type is WSMsgType.TEXT)

    with serve(rate=100) as sim:
        sim.pause()
        assert asyncio.run(paused_then_resumed()) == (0, 1)
