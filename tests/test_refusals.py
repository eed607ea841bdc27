"""The feed's fault policy over loopback: refusals, logins, token expiry, watchdog, backoff."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs
from tenacity import AsyncRetrying, RetryCallState

from recorder.auth import TokenProvider, jwt_expiry
from recorder.config import AuthConfig, Credentials, FeedConfig, Secret
from recorder.errors import AllRefusedError, AuthError
from recorder.feed import FeedConnection
from recorder.refusals import StreamRefused, all_refused_message, find_refused, next_step
from recorder.simrunner import SimulatorThread
from recorder.streams import reconnect_wait
from tests.conftest import DEMO, make_config, record_until

VALID = ("1001", "1002", "1003")


class RecordingEvents:
    """A FeedEvents that keeps every call, in order."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, str, tuple[str, ...], int]] = []
        self.closed: list[tuple[str, int, int | None, str, int, bool]] = []
        self.rejected: list[tuple[tuple[str, ...], int, str]] = []

    def session_opened(
        self, session: str, endpoint: str, contracts: tuple[str, ...], at_us: int
    ) -> None:
        self.opened.append((session, endpoint, contracts, at_us))

    def session_closed(
        self, session: str, at_us: int, code: int | None, reason: str, frames: int, stale: bool
    ) -> None:
        self.closed.append((session, at_us, code, reason, frames, stale))

    def contracts_rejected(self, contracts: tuple[str, ...], at_us: int, reason: str) -> None:
        self.rejected.append((contracts, at_us, reason))


@dataclass
class FeedRun:
    """What one FeedConnection did: its frames as (session, contract id), events and logs."""

    connection: FeedConnection
    events: RecordingEvents
    frames: list[tuple[str, str]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None

    def contracts_of(self, session: str) -> set[str]:
        return {contract for s, contract in self.frames if s == session}

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e["event"] == event]


def run_feed(
    sim: SimulatorThread,
    contracts: tuple[str, ...],
    until: Callable[[FeedRun], bool],
    *,
    credentials: Credentials = DEMO,
    during: Callable[[FeedRun], None] | None = None,
    timeout: float = 15.0,
    base_url: str | None = None,
    token_url: str | None = None,
    **feed: Any,
) -> FeedRun:
    """Run one connection against ``sim`` until ``until`` holds or ``run()`` ends, then stop."""
    config = FeedConfig(
        base_url=base_url or sim.base_url,
        contracts=contracts,
        reconnect_max_seconds=feed.pop("reconnect_max_seconds", 0.5),
        refusal_probe_seconds=feed.pop("refusal_probe_seconds", 0.3),
        **feed,
    )
    auth = AuthConfig(token_url=token_url or sim.token_url)
    events = RecordingEvents()

    async def main() -> FeedRun:
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            tokens = TokenProvider(session, auth, credentials)

            def on_frames(session_id: str, frames: list[bytes | str], received_us: int) -> None:
                for frame in frames:
                    result.frames.append((session_id, orjson.loads(frame)["contractId"]))

            connection = FeedConnection(
                "t", contracts, config, session, tokens, on_frames, stop, events=events
            )
            result = FeedRun(connection, events)
            task = asyncio.create_task(connection.run())
            deadline = time.monotonic() + timeout
            while not task.done() and not until(result):
                assert time.monotonic() < deadline, f"condition not met within {timeout} s"
                if during is not None:
                    during(result)
                await asyncio.sleep(0.02)
            stop.set()
            try:
                await task
            except Exception as exc:
                result.error = exc
            return result

    with capture_logs() as logs:
        result = asyncio.run(main())
    result.logs = logs
    return result


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "bad", "probes"),
    [
        (4, {"c3"}, 4),
        (8, {"c0"}, 6),
        (8, {"c0", "c7"}, 10),
        (3, {"c0", "c1", "c2"}, 4),
        (8, {f"c{i}" for i in range(8)}, 14),
        (1, {"c0"}, 0),
    ],
)
def test_find_refused_bisects_to_single_contracts(n: int, bad: set[str], probes: int) -> None:
    """Bisection finds exactly the refused contracts, in order, with the expected probe count."""
    contracts = [f"c{i}" for i in range(n)]
    asked: list[tuple[str, ...]] = []

    async def probe(group: tuple[str, ...]) -> str | None:
        asked.append(group)
        await asyncio.sleep(0)
        return "HTTP 403" if bad & set(group) else None

    found = asyncio.run(find_refused(contracts, probe))
    assert found == tuple(c for c in contracts if c in bad)
    assert len(asked) == probes


def test_find_refused_keeps_at_most_parallel_probes_open() -> None:
    """No more than ``parallel`` probes are open at a time, even when everything is refused."""
    open_now, most = 0, 0

    async def probe(group: tuple[str, ...]) -> str | None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        await asyncio.sleep(0.001)
        open_now -= 1
        return "HTTP 403"

    found = asyncio.run(find_refused([str(i) for i in range(64)], probe, parallel=3))
    assert len(found) == 64
    assert most == 3


@pytest.mark.parametrize(
    ("refusal", "relogged", "step"),
    [
        (StreamRefused("HTTP 403", code=403, at_once=True), False, "relogin"),
        (StreamRefused("HTTP 403", code=403, at_once=True), True, "bisect"),
        (StreamRefused("close 1008", code=1008, at_once=False), True, "relogin_then_wait"),
        (StreamRefused("close 1008", code=1008, at_once=True, expired=True), True, "relogin"),
        (StreamRefused("close 1008", code=1008, at_once=False, stable=True), True, "relogin"),
    ],
)
def test_next_step_after_a_refusal(refusal: StreamRefused, relogged: bool, step: str) -> None:
    """A first refusal, an expiry or a stable stream's end log in again; a second bisects."""
    assert next_step(refusal, relogged) == step


def test_all_refused_message_names_user_endpoint_answer_and_expiry() -> None:
    """The message says who, where, what the server answered, which contracts and the exp."""
    contracts = [str(i) for i in range(12)]
    text = all_refused_message("demo", "wss://h/x/contract/id", "HTTP 403", contracts, 0.0)
    assert text == (
        "the server refuses every contract of this connection, even after a new login: "
        "user 'demo' at wss://h/x/contract/id was answered HTTP 403 "
        "(refused: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more); "
        "the token expired at 1970-01-01T00:00:00Z"
    )


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 6])
def test_reconnect_wait_is_full_jitter_in_a_growing_capped_window(attempt: int) -> None:
    """Attempt n waits uniformly in [0, min(cap, 0.5 * 2^(n-1))]: jittered, growing, capped."""
    wait = reconnect_wait(FeedConfig(reconnect_max_seconds=3.0))
    state = RetryCallState(AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    window = min(3.0, 0.5 * 2 ** (attempt - 1))
    samples = [wait(state) for _ in range(2000)]
    assert all(0 <= s <= window for s in samples)
    assert max(samples) > 0.95 * window
    assert min(samples) < 0.05 * window


# ---- refusals over loopback ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["403", "1008"])
def test_one_unknown_contract_is_dropped_and_the_rest_recorded(simulator: Any, mode: str) -> None:
    """An unknown contract is found by bisection, reported by name, and the others recorded."""
    sim = simulator(contracts=3, rate=200, refuse_with=mode)

    def recording_the_rest(run: FeedRun) -> bool:
        main = [s for s, _, contracts, _ in run.events.opened if contracts == VALID]
        return bool(main) and run.contracts_of(main[-1]) == set(VALID)

    run = run_feed(sim, (*VALID, "9999"), recording_the_rest)
    assert run.error is None
    answer = "HTTP 403" if mode == "403" else "close code 1008 (policy violation): unknown contract"
    assert [(c, reason) for c, _, reason in run.events.rejected] == [
        (("9999",), f"refused: {answer}")
    ]
    warned = run.logged("contracts refused by the server; recording the rest without them")
    assert [(e["refused"], e["log_level"]) for e in warned] == [(["9999"], "warning")]
    assert {contract for _, contract in run.frames} == set(VALID)
    assert run.connection.contracts == VALID
    assert run.connection.url.query.getall("contract_id") == list(VALID)
    # main + retry after the new login, then probes [1001 1002] [1003 9999] [1003] [9999]
    assert sim.stats()["refusals"] == {"unknown contract": 4}
    assert run.connection.stats.probes == 4
    assert sim.stats()["tokens_issued"] == 2
    closed = {session: frames for session, _, _, _, frames, _ in run.events.closed}
    assert closed == {s: sum(1 for f, _ in run.frames if f == s) for s, *_ in run.events.opened}


@pytest.mark.parametrize("mode", ["403", "1008"])
def test_every_contract_refused_raises_all_refused_without_a_storm(
    simulator: Any, mode: str
) -> None:
    """All contracts unknown: AllRefusedError names user, endpoint and answer; no retry storm."""
    sim = simulator(contracts=3, rate=50, refuse_with=mode)
    unknown = ("9997", "9998", "9999")
    run = run_feed(sim, unknown, lambda run: False)
    assert isinstance(run.error, AllRefusedError)
    answer = "HTTP 403" if mode == "403" else "close code 1008 (policy violation): unknown contract"
    endpoint = f"{sim.base_url}/live/data/websocket/contract/id"
    assert str(run.error) == (
        "the server refuses every contract of this connection, even after a new login: "
        f"user 'demo' at {endpoint} was answered {answer} (refused: 9997, 9998, 9999)"
    )
    assert [c for c, _, _ in run.events.rejected] == [unknown]
    assert sim.stats()["refusals"] == {"unknown contract": 2 + 4}
    assert sim.stats()["tokens_issued"] == 2
    assert run.frames == []


def test_a_refused_fixed_token_names_the_token_source(simulator: Any) -> None:
    """A HEDGETECH_TOKEN the server refuses: AllRefusedError says so, and no login is tried."""
    sim = simulator(contracts=2, rate=50, refuse_with="403")
    credentials = Credentials(token=Secret("not-a-token-the-server-knows"))
    run = run_feed(sim, ("1001", "1002"), lambda run: False, credentials=credentials)
    assert isinstance(run.error, AllRefusedError)
    assert "user '(token from HEDGETECH_TOKEN)' at ws://" in str(run.error)
    assert "not-a-token" not in str(run.error)
    assert sim.stats()["refusals"] == {"invalid token": 2 + 2}
    assert sim.stats()["tokens_issued"] == 0


def test_revoked_token_and_close_1008_log_in_again_and_go_on(simulator: Any) -> None:
    """Token revoked and streams closed with 1008: one new login, and recording goes on."""
    sim = simulator(contracts=3, rate=200)
    revoked: list[bool] = []

    def revoke_once(run: FeedRun) -> None:
        if not revoked and len(run.frames) >= 20:
            revoked.append(True)
            sim.revoke_tokens()
            sim.close_all(1008, "revoked token")

    def second_session_records(run: FeedRun) -> bool:
        return len(run.events.opened) >= 2 and len(run.contracts_of(run.events.opened[1][0])) == 3

    run = run_feed(sim, VALID, second_session_records, during=revoke_once)
    assert run.error is None
    first, *_ = run.events.closed
    assert first[2:4] == (1008, "revoked token")
    assert sim.stats()["tokens_issued"] == 2
    assert sim.stats()["refusals"] == {}  # the retry already had the new token
    assert run.events.rejected == []
    assert run.connection.stats.probes == 0
    assert run.connection.stats.reconnects == 1


def test_token_expiry_closes_with_1008_and_the_recorder_goes_on(simulator: Any) -> None:
    """Tokens living 1-2 s: each expiry close is followed by a stream on a fresh token."""
    sim = simulator(contracts=3, rate=200, token_ttl_seconds=2)

    def after_two_expiries(run: FeedRun) -> bool:
        return len(run.events.opened) >= 3 and bool(run.contracts_of(run.events.opened[2][0]))

    run = run_feed(sim, VALID, after_two_expiries)
    assert run.error is None
    ended = [(code, reason) for _, _, code, reason, _, _ in run.events.closed]
    assert ended[:2] == [(1008, "expired token")] * 2
    assert sim.stats()["refusals"] == {}  # never presented an expired token
    assert sim.stats()["tokens_issued"] >= 3
    assert run.events.rejected == []
    assert run.connection.stats.probes == 0
    assert run.logged("stream lost; reconnecting") == []  # no backoff: retried at once


def test_tokens_are_renewed_before_they_expire_once_for_all_holders(simulator: Any) -> None:
    """keep_fresh logs in again before exp; two renewers sharing a provider log in once."""
    sim = simulator(contracts=1, token_ttl_seconds=2)

    async def main() -> tuple[float, float, float | None]:
        async with aiohttp.ClientSession() as session:
            tokens = TokenProvider(session, AuthConfig(token_url=sim.token_url), DEMO)
            first_exp = jwt_expiry(await tokens.token())
            assert first_exp is not None
            renewers = [asyncio.create_task(tokens.keep_fresh()) for _ in range(2)]
            while sim.stats()["tokens_issued"] < 2:
                assert time.time() < first_exp + 1, "not renewed"
                await asyncio.sleep(0.01)
            renewed_at = time.time()
            # not a wait for a condition: time for a second, duplicate login to show up
            await asyncio.sleep(max(0.0, first_exp + 0.3 - time.time()))
            for task in renewers:
                task.cancel()
            await asyncio.gather(*renewers, return_exceptions=True)
            return first_exp, renewed_at, tokens.expires_at

    first_exp, renewed_at, new_exp = asyncio.run(main())
    assert renewed_at < first_exp
    assert new_exp is not None
    assert new_exp > first_exp
    assert sim.stats()["tokens_issued"] == 2


# ---- logins ---------------------------------------------------------------------------------


def test_wrong_password_raises_auth_error_from_record_without_retries(
    simulator: Any, tmp_path: Any
) -> None:
    """A refused login ends the daemon's record() with AuthError after exactly one attempt."""
    sim = simulator(contracts=2)
    wrong = Credentials(username="demo", password=Secret("wrong"))
    with pytest.raises(AuthError, match="login refused for user 'demo'"):
        record_until(make_config(sim, tmp_path), lambda r: True, credentials=wrong)
    assert sim.stats()["logins_failed"] == 1


def test_refused_login_ends_every_connection_with_one_attempt(simulator: Any) -> None:
    """Connections sharing a provider all raise AuthError, and the server saw one login."""
    sim = simulator(contracts=2)
    wrong = Credentials(username="demo", password=Secret("wrong"))
    config = FeedConfig(base_url=sim.base_url, contracts=("1001", "1002"))

    async def main() -> list[BaseException | None]:
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            tokens = TokenProvider(session, AuthConfig(token_url=sim.token_url), wrong)
            connections = [
                FeedConnection(f"c{i}", [c], config, session, tokens, print, stop)
                for i, c in enumerate(config.contracts)
            ]
            results = await asyncio.gather(*(c.run() for c in connections), return_exceptions=True)
            return [r if isinstance(r, BaseException) else None for r in results]

    errors = asyncio.run(main())
    assert [type(e) for e in errors] == [AuthError, AuthError]
    assert sim.stats()["logins_failed"] == 1


# ---- watchdog -------------------------------------------------------------------------------


def test_watchdog_reconnects_a_silent_stream_without_flapping(simulator: Any) -> None:
    """A stream silent for stale_after_seconds is closed as stale; each new one gets its period."""
    sim = simulator(contracts=2, rate=100)
    sim.pause()

    def two_stale(run: FeedRun) -> bool:
        return sum(1 for c in run.events.closed if c[5]) >= 2

    run = run_feed(sim, ("1001", "1002"), two_stale, stale_after_seconds=0.5)
    assert run.error is None
    opened = {session: at for session, _, _, at in run.events.opened}
    stale = [
        (s, at - opened[s], reason, frames) for s, at, _, reason, frames, st in run.events.closed
    ]
    assert [(s, r, f) for s, _, r, f in stale[:2]] == [
        ("t.1", "no data for 0.5 s", 0),
        ("t.2", "no data for 1 s", 0),  # doubled after a stale stream that sent nothing
    ]
    assert stale[0][1] >= 500_000
    assert stale[1][1] >= 1_000_000
    assert [c[5] for c in run.events.closed[:2]] == [True, True]
    assert run.connection.stats.stale_closes == 2


def test_watchdog_never_fires_on_a_stream_that_sends(simulator: Any) -> None:
    """With frames every few milliseconds a 0.3 s watchdog never closes the stream."""
    sim = simulator(contracts=2, rate=100)
    run = run_feed(
        sim, ("1001", "1002"), lambda run: len(run.frames) >= 150, stale_after_seconds=0.3
    )
    assert run.error is None
    assert [(c[0], c[3], c[5]) for c in run.events.closed] == [("t.1", "shutdown", False)]
    assert run.connection.stats.stale_closes == 0
    assert sim.stats()["connections_accepted"] == 1


# ---- backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize("down", ["stream", "login"])
def test_failed_attempts_back_off_with_jittered_capped_waits(simulator: Any, down: str) -> None:
    """Unreachable stream or login server: retried forever, waits in the growing capped window."""
    sim = simulator(contracts=1)
    port = free_port()
    dead = {
        "base_url": f"ws://127.0.0.1:{port}/data-engine/ime" if down == "stream" else None,
        "token_url": f"http://127.0.0.1:{port}/auth/user/token/issue" if down == "login" else None,
    }
    run = run_feed(
        sim,
        ("1001",),
        lambda run: run.connection.stats.reconnects >= 6,
        reconnect_max_seconds=0.8,
        **dead,
    )
    assert run.error is None
    lost = run.logged("stream lost; reconnecting")
    assert [e["attempt"] for e in lost[:6]] == [1, 2, 3, 4, 5, 6]
    for event in lost:
        window = min(0.8, 0.5 * 2 ** (event["attempt"] - 1))
        assert 0 <= event["retry_in_seconds"] <= round(window, 2)
    assert len({e["retry_in_seconds"] for e in lost}) > 1  # jittered
    prefix = "cannot connect: ClientConnectorError" if down == "stream" else "login at http://"
    assert all(e["reason"].startswith(prefix) for e in lost)
    assert sim.stats()["connections_accepted"] == 0
