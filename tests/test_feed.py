"""The feed consumer against the real simulator: refusals, lost streams, header schemes, tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import recorder
from recorder.config import Credentials, Secret
from recorder.errors import AllRefusedError
from recorder.streams import split_contracts, stream_url
from tests.conftest import make_config, record_until


def test_stream_url_repeats_the_query_parameter() -> None:
    """Contracts become repeated contract_id / contract_name parameters on the right endpoint."""
    by_id = stream_url("wss://h/data-engine/ime/", "id", ["1001", "1002"])
    assert str(by_id) == (
        "wss://h/data-engine/ime/live/data/websocket/contract/id?contract_id=1001&contract_id=1002"
    )
    by_name = stream_url("wss://h/data-engine/ime", "name", ["GOLD APR", "سکه"])
    assert by_name.path == "/data-engine/ime/live/data/websocket/contract/name"
    assert by_name.query.getall("contract_name") == ["GOLD APR", "سکه"]


def test_split_contracts_keeps_order_and_size() -> None:
    """A long list is cut into groups of at most the per-connection maximum, in order."""
    assert split_contracts(["a", "b", "c", "d", "e"], 2) == [("a", "b"), ("c", "d"), ("e",)]
    assert split_contracts(["a"], 50) == [("a",)]


@pytest.mark.parametrize("mode", ["403", "1008"])
def test_refused_contract_is_dropped_and_the_rest_recorded_by_the_daemon(
    simulator: Any, tmp_path: Path, mode: str
) -> None:
    """An unknown contract refused with HTTP 403 or close 1008 is dropped; the rest is recorded."""
    sim = simulator(contracts=3, rate=50, refuse_with=mode)
    config = make_config(sim, tmp_path, ["1001", "9999"], feed={"refusal_probe_seconds": 0.3})
    with capture_logs() as logs:
        rec = record_until(
            config, lambda r: r.connections[0].stats.open and r.pipeline.stats.frames >= 20
        )
    assert rec.connections[0].contracts == ("1001",)
    assert rec.connections[0].stats.rejected == ("9999",)
    refused = [e for e in logs if e["event"].startswith("contracts refused by the server")]
    assert [e["refused"] for e in refused] == [["9999"]]
    # the first stream, its retry after a new login, and the probe of 9999 alone
    assert sim.stats()["refusals"] == {"unknown contract": 3}


def test_server_close_1011_reconnects_and_keeps_every_frame(simulator: Any, tmp_path: Path) -> None:
    """A close with 1011 mid-stream: the recorder reconnects and stores every frame sent."""
    sim = simulator(contracts=4, rate=400, keep_sent=True)
    closed = []

    def close_once(rec: Any) -> None:
        if not closed and rec.pipeline.stats.frames >= 100:
            closed.append(True)
            sim.close_all(1011, "redis stream interrupted")

    rec = record_until(
        make_config(sim, tmp_path),
        lambda r: (
            bool(closed) and r.connections[0].stats.sessions >= 2 and r.pipeline.stats.frames >= 250
        ),
        during=close_once,
    )
    assert rec.connections[0].stats.reconnects == 1
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM aggregate").fetchone() == (len(sim.sent),)
    assert sim.stats()["server_closes"].get("1011") == 1


def test_aborted_tcp_connection_reconnects(simulator: Any, tmp_path: Path) -> None:
    """A TCP abort without a close frame is survived: a new session opens and recording goes on."""
    sim = simulator(contracts=2, rate=300)
    aborted = []

    def abort_once(rec: Any) -> None:
        if not aborted and rec.pipeline.stats.frames >= 50:
            aborted.append(True)
            sim.abort_all()

    rec = record_until(
        make_config(sim, tmp_path),
        lambda r: (
            bool(aborted)
            and r.connections[0].stats.sessions >= 2
            and r.pipeline.stats.frames >= 150
        ),
        during=abort_once,
    )
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM aggregate").fetchone() == (rec.pipeline.stats.frames,)


@pytest.mark.parametrize(
    ("server", "client", "records"),
    [
        ("bearer", "bearer", True),
        ("raw", "raw", True),
        ("bearer", "raw", False),
        ("raw", "bearer", False),
    ],
)
def test_header_scheme_is_sent_as_configured(
    simulator: Any, tmp_path: Path, server: str, client: str, records: bool
) -> None:
    """auth.header_scheme picks a raw or a Bearer Authorization header; a strict server checks."""
    sim = simulator(contracts=2, rate=0, max_messages=20, header_scheme=server)
    config = make_config(sim, tmp_path)
    config = type(config)(
        feed=config.feed,
        auth=type(config.auth)(token_url=config.auth.token_url, header_scheme=client),
        storage=config.storage,
    )  # type: ignore[arg-type]
    if records:
        rec = record_until(config, lambda r: r.pipeline.stats.frames == 20)
        assert rec.connections[0].stats.reconnects == 0
    else:
        with pytest.raises(AllRefusedError, match=r"HTTP 403|close code 1008"):
            record_until(config, lambda r: False)
        assert sim.stats()["refusals"] == {"bad auth scheme": 2 + 2}


def test_static_token_is_used_as_is_without_login(simulator: Any, tmp_path: Path) -> None:
    """HEDGETECH_TOKEN is sent as it is: no login happens and the stream is recorded."""
    sim = simulator(contracts=2, rate=0, max_messages=15, static_token="fixed-token-123")
    credentials = Credentials(token=Secret("fixed-token-123"))
    rec = record_until(
        make_config(sim, tmp_path), lambda r: r.pipeline.stats.frames == 15, credentials=credentials
    )
    assert rec.pipeline.stats.frames == 15
    assert sim.stats()["tokens_issued"] == 0
