"""Replay: recorded messages come back exactly, over the Store and over the live protocol."""

from __future__ import annotations

import asyncio
import base64
import importlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

import recorder
from recorder import Store
from recorder.buffer import Batch
from recorder.config import AuthConfig, Config, FeedConfig, StorageConfig
from recorder.flatten import format_timestamp, parse_timestamp
from recorder.replay import ReplayOptions, ReplayServer
from recorder.schema import DATA_TABLES, TABLES
from recorder.writer import ParquetWriter
from tests.conftest import make_config, record_until, wait_for
from tests.test_views import row

ID_KEYS = ("contractId", "ContractId", "contractName")
RECORDER = str(Path(sys.executable).with_name("ime-recorder"))


class ReplayThread(ReplayServer):
    """A ReplayServer serving from its own event loop in a daemon thread."""

    def __init__(self, options: ReplayOptions) -> None:
        super().__init__(options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="ime-replay", daemon=True)
        self._started: Future[None] = Future()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.start())
        except BaseException as exc:
            self._started.set_exception(exc)
        else:
            self._started.set_result(None)
            self.loop.run_forever()
        finally:
            self.loop.close()

    def __enter__(self) -> ReplayThread:
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)

    def sent_total(self) -> int:
        return sum(self.sent.values())


@pytest.fixture
def replay_server() -> Iterator[Callable[..., ReplayThread]]:
    """Start replay servers on a data directory; all are stopped after the test."""
    started: list[ReplayThread] = []

    def start(data_dir: Path, **options: Any) -> ReplayThread:
        server = ReplayThread(ReplayOptions(data_dir=data_dir, **options))
        server.__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


def normalised(text: str) -> dict[str, Any]:
    """A sent frame with the documented normalisation: `contractId`, UTC `Z` timestamps."""
    message = json.loads(text)
    if "ContractId" in message:
        message["contractId"] = message.pop("ContractId")
    message["timestamp"] = format_timestamp(parse_timestamp(message["timestamp"], UTC))
    return message


def ident(message: dict[str, Any]) -> str:
    return str(next(message[k] for k in ID_KEYS if k in message))


def by_contract(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in messages:
        out[ident(message)].append(message)
    return dict(out)


async def receive(
    url: str, token: str, count: int, *, bearer: bool = False, idle: float = 0.3
) -> tuple[list[dict[str, Any]], bool]:
    """``count`` messages of a stream, then whether it stayed open and silent for ``idle`` s."""
    header = f"Bearer {token}" if bearer else token
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": header}) as ws,
    ):
        got = [orjson.loads(await ws.receive_str(timeout=10)) for _ in range(count)]
        try:
            extra = await ws.receive(timeout=idle)
        except TimeoutError:
            quiet = not ws.closed
        else:
            quiet = False
            got.append({"unexpected": str(extra)})
        return got, quiet


async def login(
    token_url: str,
    user: str = "anyone",
    password: str = "x",  # noqa: S107 - made up
) -> tuple[int, Any]:
    form = {"UserName_or_Email": user, "Password": password}
    async with aiohttp.ClientSession() as session, session.post(token_url, data=form) as answer:
        return answer.status, await answer.json()


def test_replay_reproduces_recorded_frames_exactly(
    simulator: Any, replay_server: Callable[..., ReplayThread], tmp_path: Path
) -> None:
    """Frames recorded through both endpoints, every variant, come back JSON-equal and in order."""
    per_run = 160
    sim = simulator(
        contracts=4,
        rate=0,
        max_messages=per_run,
        keep_sent=True,
        variant_mix=True,
        partial_levels=0.3,
        missing_sections=0.2,
        unknown_sections=0.15,
        seed=3,
    )
    record_until(make_config(sim, tmp_path), lambda r: r.pipeline.stats.frames == per_run)
    record_until(
        make_config(sim, tmp_path, subscribe_by="name"),
        lambda r: r.pipeline.stats.frames == per_run,
    )
    sent = [json.loads(f.text) for f in sim.sent]
    assert len(sent) == 2 * per_run
    stamps = [m["timestamp"] for m in sent]
    assert any("ContractId" in m for m in sent)
    assert any("contractName" in m for m in sent)
    assert any(s.endswith("Z") for s in stamps)
    assert any(s.endswith("+03:30") for s in stamps)
    assert any(datetime.fromisoformat(s).tzinfo is None for s in stamps)
    assert any(len(m["data"].get("BestLimit", {"1": 0, "2": 0, "3": 0})) < 3 for m in sent)
    assert any(len(m["data"]) < 4 for m in sent)
    assert any("sequence" in m for m in sent)
    assert any("OrderBookDelta" in m["data"] for m in sent)
    assert any(type(m["data"].get("ContractInfo", {}).get("open_interest")) is float for m in sent)

    expected = [normalised(f.text) for f in sim.sent]
    replayed = list(Store(tmp_path).replay())
    assert len(replayed) == len(expected)
    assert by_contract(replayed) == by_contract(expected)
    instants = [parse_timestamp(m["timestamp"], UTC) for m in replayed]
    assert instants == sorted(instants)

    # the server sends the same messages, the identifier key following the endpoint
    ids = sorted(c.id for c in sim.contracts)
    names = sorted(c.name for c in sim.contracts)
    server = replay_server(tmp_path, speed=None)
    _, answer = asyncio.run(login(server.token_url))
    token = answer["Authorization"]
    by_id_url = (
        server.base_url
        + "/live/data/websocket/contract/id?"
        + "&".join(f"contract_id={i}" for i in ids)
    )
    got, quiet = asyncio.run(receive(by_id_url, token, per_run))
    assert quiet
    assert got == list(Store(tmp_path).replay(ids))
    assert by_contract(got) == by_contract(expected[:per_run])
    by_name_base = URL(server.base_url + "/live/data/websocket/contract/name")
    by_name = str(by_name_base.with_query([("contract_name", n) for n in names]))
    got, quiet = asyncio.run(receive(by_name, token, per_run, bearer=True))
    assert quiet
    assert by_contract(got) == by_contract(expected[per_run:])
    assert all("contractName" in m for m in got)


def _data_rows(data_dir: Path, table: str) -> list[tuple[Any, ...]]:
    """Every stream row of a data table without received_at and seq, in a fixed order."""
    columns = [c.name for c in TABLES[table].columns if c.name not in ("received_at", "seq")]
    con = recorder.connect(data_dir)
    return con.execute(
        f"SELECT {', '.join(columns)} FROM {table} WHERE source IS DISTINCT FROM 'snapshot' "
        f"ORDER BY ALL"
    ).fetchall()


@pytest.mark.parametrize("subscribe_by", ["id", "name"])
def test_full_loop_live_store_replay_store(
    simulator: Any,
    replay_server: Callable[..., ReplayThread],
    tmp_path: Path,
    subscribe_by: str,
) -> None:
    """Simulator -> store A -> replay server -> the recorder -> store B: equal row for row."""
    total = 240
    sim = simulator(
        contracts=5, rate=0, max_messages=total, variant_mix=True, unknown_sections=0.1, seed=5
    )
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    config_a = make_config(sim, store_a, subscribe_by=subscribe_by)
    record_until(config_a, lambda r: r.pipeline.stats.frames == total)

    server = replay_server(store_a, speed=None)
    contracts = Store(store_a).contracts()
    assert len(contracts) == 5
    config_b = Config(
        feed=FeedConfig(
            base_url=server.base_url,
            subscribe_by=subscribe_by,  # type: ignore[arg-type]
            contracts=tuple(contracts),
            max_contracts_per_connection=2,  # three streams, each interleaving its contracts
            reconnect_max_seconds=0.5,
        ),
        auth=AuthConfig(token_url=server.token_url, header_scheme="bearer"),
        storage=StorageConfig(data_dir=str(store_b), flush_interval_seconds=0.3, fsync=False),
    )
    rec = record_until(config_b, lambda r: r.pipeline.stats.frames == total)
    assert len(rec.connections) == 3
    assert server.sent_total() == total
    for table in (*DATA_TABLES, "extras"):
        rows_a = _data_rows(store_a, table)
        assert rows_a, table
        assert _data_rows(store_b, table) == rows_a, table
    con = recorder.connect(store_b)
    assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)


def _paced_store(data_dir: Path) -> None:
    """Contract X at 0, 2, 4 s and Y at 1, 3 s (Aggregate only), on 2026-05-30."""
    writer = ParquetWriter(data_dir, fsync=False)
    base = datetime(2026, 5, 30, 6, 0, tzinfo=UTC)

    def agg(seq: int, second: int) -> tuple[Any, ...]:
        moment = base.replace(second=second)
        return row(
            "aggregate",
            exchange_ts=moment,
            seq=seq,
            trade_count=seq,
            total_volume=seq,
            total_value=seq,
            last_price=float(seq),
        )

    writer.write(Batch(("aggregate", "2026-05-30", "X"), [agg(1, 0), agg(3, 2), agg(5, 4)]))
    writer.write(Batch(("aggregate", "2026-05-30", "Y"), [agg(2, 1), agg(4, 3)]))


def test_paced_replay_interleaves_contracts_at_the_recorded_pace_times_speed(
    replay_server: Callable[..., ReplayThread], tmp_path: Path
) -> None:
    """At speed 10, messages 1 s apart arrive 0.1 s apart, X and Y interleaved as recorded."""
    _paced_store(tmp_path)
    server = replay_server(tmp_path, speed=10.0, start=datetime(2026, 5, 30, 6, 0, 1, tzinfo=UTC))

    async def main() -> tuple[list[tuple[str, int]], list[float]]:
        _, answer = await login(server.token_url)
        url = server.base_url + "/live/data/websocket/contract/name?contract_name=X&contract_name=Y"
        headers = {"Authorization": answer["Authorization"]}
        arrivals: list[float] = []
        order: list[tuple[str, int]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, headers=headers) as ws,
        ):
            for _ in range(4):
                message = orjson.loads(await ws.receive_str(timeout=10))
                arrivals.append(time.monotonic())
                order.append((message["contractName"], message["data"]["Aggregate"]["trade_count"]))
        return order, arrivals

    order, arrivals = asyncio.run(main())
    assert order == [("Y", 2), ("X", 3), ("Y", 4), ("X", 5)]  # --start skipped X at 0 s
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.07 <= gap <= 0.4 for gap in gaps), gaps
    assert 0.28 <= arrivals[-1] - arrivals[0] <= 0.8


def test_replay_speaks_the_live_protocol_tokens_and_refusals(
    replay_server: Callable[..., ReplayThread], tmp_path: Path
) -> None:
    """201 with a JWT, optional credentials, raw and Bearer headers, 1008 or 403 refusals."""
    _paced_store(tmp_path)
    server = replay_server(tmp_path, speed=None, username="trader", password="secret")
    strict = replay_server(tmp_path, speed=None, refuse_with="403", header_scheme="raw")

    async def main() -> None:
        assert (await login(server.token_url, "trader", "wrong"))[0] == 401
        assert (await login(server.token_url, "trader", "secret"))[0] == 201
        status, answer = await login(strict.token_url, "whoever", "whatever")
        assert status == 201
        token = answer["Authorization"]
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["sub"] == "whoever"
        assert claims["exp"] > time.time() + 3000
        url = strict.base_url + "/live/data/websocket/contract/id?contract_id=X"
        got, quiet = await receive(url, token, 3)
        assert [m["contractId"] for m in got] == ["X", "X", "X"]
        assert quiet
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(
                    url + "&contract_id=NOPE", headers={"Authorization": token}
                )
            assert refused.value.status == 403
            with pytest.raises(aiohttp.WSServerHandshakeError):  # Bearer refused with raw only
                await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
            _, good = await login(server.token_url, "trader", "secret")
            base = server.base_url + "/live/data/websocket/contract/id"
            for query, header in [
                ("?contract_id=X&contract_id=Z", good["Authorization"]),  # unknown contract
                ("?contract_id=X", token),  # a token another server issued
                ("?contract_id=X", ""),  # no token
                ("", good["Authorization"]),  # no contract
            ]:
                async with session.ws_connect(
                    base + query, headers={"Authorization": header}
                ) as ws:
                    closing = await ws.receive(timeout=10)
                    assert closing.type == aiohttp.WSMsgType.CLOSE
                    assert ws.close_code == 1008

    asyncio.run(main())
    assert server.refusals == {
        "unknown contract": 1,
        "invalid token": 1,
        "missing token": 1,
        "no contract": 1,
    }
    assert strict.refusals == {"unknown contract": 1, "bad auth scheme": 1}


def test_official_hedgetech_client_consumes_the_replay_unchanged(
    replay_server: Callable[..., ReplayThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hedgetech 0.4.0's AuthAsyncClient and websocket_by_id/_by_name read the history as is."""
    pytest.importorskip("HedgeTech", reason="the bench extra (hedgetech==0.4.0) is not installed")
    import httpx
    from HedgeTech.Auth import AuthAsyncClient
    from HedgeTech.DataEngine import DataEngine_Ime_AsyncClient

    _paced_store(tmp_path)
    server = replay_server(tmp_path, speed=None)
    client_module = importlib.import_module("HedgeTech.DataEngine.__ime.__AsyncClient")
    real_connect = client_module.connect
    local = server.base_url.removesuffix("/data-engine/ime")

    def connect(uri: str, **kwargs: Any) -> Any:
        # the client's URL is fixed to the real host: point it here, change nothing else
        return real_connect(uri.replace("wss://core.hedgetech.ir", local), **kwargs)

    monkeypatch.setattr(client_module, "connect", connect)

    async def main() -> tuple[list[Any], list[Any]]:
        _, token = await login(server.token_url)
        async with httpx.AsyncClient() as http:
            # login() itself needs HTTP/2 over TLS to the real host; its result is this object
            auth = AuthAsyncClient(httpx_Client=http, token=token)
            assert auth.Permissions["sub"] == "anyone"
            client = DataEngine_Ime_AsyncClient(auth)
            by_id = client.websocket_by_id(["X", "Y"])
            ids = [await anext(by_id) for _ in range(5)]
            await by_id.aclose()
            by_name = client.websocket_by_name(["Y"])
            names = [await anext(by_name) for _ in range(2)]
            await by_name.aclose()
        return ids, names

    ids, names = asyncio.run(main())
    store = Store(tmp_path)
    assert ids == list(store.replay(["X", "Y"], id_key="contractId"))
    assert names == list(store.replay(["Y"], id_key="contractName"))
    wait_for(lambda: server.sent_total() == 7, what="both streams sent everything")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_replay_command_serves_and_logs_progress(tmp_path: Path) -> None:
    """`ime-recorder replay` serves the store and, off a terminal, logs progress lines."""
    _paced_store(tmp_path)
    port = _free_port()
    command = [
        RECORDER,
        "replay",
        "--data-dir",
        str(tmp_path),
        "--port",
        str(port),
        "--as-fast-as-possible",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        token_url = f"http://127.0.0.1:{port}/auth/user/token/issue"

        def answered() -> bool:
            try:
                return asyncio.run(login(token_url))[0] == 201
            except aiohttp.ClientError:
                return False

        wait_for(answered, what="the replay server answers")
        url = f"ws://127.0.0.1:{port}/data-engine/ime/live/data/websocket/contract/id?contract_id=Y"
        _, answer = asyncio.run(login(token_url))
        got, quiet = asyncio.run(receive(url, answer["Authorization"], 2))
        assert [m["data"]["Aggregate"]["trade_count"] for m in got] == [2, 4]
        assert quiet
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    text = output.decode()
    assert process.returncode == 0, text
    events = {e["event"]: e for e in map(json.loads, text.splitlines()) if "event" in e}
    assert events["replaying started"]["total"] == 5
    assert events["replaying done"]["done"] == 2
    assert events["replay listening"]["base_url"] == f"ws://127.0.0.1:{port}/data-engine/ime"
