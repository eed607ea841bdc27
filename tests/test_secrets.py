"""Credentials never leak (logs, metrics, errors) and TLS trusts exactly what it should."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme

import recorder
from recorder.config import AuthConfig, Config, FeedConfig, MetricsConfig, load_config
from recorder.daemon import Recorder, record
from recorder.errors import ConfigError, TransientError
from tests.conftest import DEMO, make_config, wait_for
from tests.test_daemon import RECORDER, recorder_env, write_config

USER = "operator-7"
PASSWORD = "Pa55-w0rd-0f-0perat0r-7"  # distinctive, so that any leak of it is found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str) -> tuple[int, str]:
    """GET ``url``: its status and body, 5xx included; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class Daemon:
    """`ime-recorder run` as a real process, its output in files, its endpoint scraped."""

    def __init__(self, tmp_path: Path, sim: Any, contracts: list[str], env: dict[str, str]):
        self.port = free_port()
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        config = write_config(tmp_path / "c.toml", sim, tmp_path / "data", contracts)
        env = recorder_env(
            IME_RECORDER_METRICS__PORT=str(self.port),
            IME_RECORDER_FEED__REFUSAL_PROBE_SECONDS="0.3",
            IME_RECORDER_LOG__LEVEL="debug",  # the most a log can say must not say a secret
            **env,
        )
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [RECORDER, "run", "--config", str(config)], env=env, stdout=out, stderr=err
            )
        self.scraped: list[str] = []

    def get(self, path: str) -> tuple[int, str]:
        status, body = fetch(f"http://127.0.0.1:{self.port}{path}")
        self.scraped.append(body)
        return status, body

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of /metrics (None when absent or unreachable)."""
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split(" ")[1])
        return None

    def wait_ready(self, what: str, logins: int, rejected: int = 0) -> None:
        """/readyz 200 after ``logins`` logins, with ``rejected`` contracts dropped.

        A stream that the server accepts and then refuses is open for an instant, so 200
        alone could be that instant; the counters tell that the refusal was dealt with.
        """

        def settled() -> bool:
            return (
                self.metric('ime_recorder_logins_total{outcome="ok"}') == logins
                and self.metric("ime_recorder_contracts_rejected") == rejected
                and self.get("/readyz")[0] == 200
            )

        wait_for(settled, timeout=30, what=what)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text() + "\n".join(self.scraped)

    def events(self) -> list[dict[str, Any]]:
        lines = self.err.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.proc.kill()
        daemon.proc.wait(timeout=15)


def issued_tokens(sim: Any) -> list[str]:
    """Every token the simulator ever issued (read on its loop)."""
    return sim._on_loop(lambda: list(sim._tokens))  # type: ignore[no-any-return]


def assert_no_secret(text: str, secrets: list[str]) -> None:
    """No secret, nor any of a JWT's three parts, appears in ``text``."""
    for secret in secrets:
        for part in {secret, *(p for p in secret.split(".") if len(p) >= 8)}:
            assert part not in text, f"a secret leaked: {part[:6]}..."


@pytest.mark.slow
def test_login_refusals_and_relogins_never_show_password_or_tokens(
    simulator: Any, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Docker-secret files, an unknown contract, revoked tokens (1008 and 403): no leak."""
    sim = simulator(contracts=3, rate=30, username=USER, password=PASSWORD)
    (tmp_path / "user").write_text(USER + "\n")
    (tmp_path / "password").write_text(PASSWORD + "\n")  # as `echo` leaves it
    secrets = {
        "HEDGETECH_USERNAME_FILE": str(tmp_path / "user"),
        "HEDGETECH_PASSWORD_FILE": str(tmp_path / "password"),
    }
    daemon = Daemon(tmp_path, sim, ["1001", "1002", "1003", "9999"], secrets)
    daemons.append(daemon)
    # the unknown contract is refused (1008), the recorder logs in again, then bisects
    daemon.wait_ready("recording after the unknown contract is dropped", logins=2, rejected=1)
    for logins, mode in ((3, "1008"), (4, "403")):
        sim.set_refuse_with(mode)
        sim.revoke_tokens()
        sim.close_all(1011)
        daemon.wait_ready(f"again after the revoked token ({mode})", logins=logins, rejected=1)
    status, text = daemon.get("/metrics")
    assert status == 200
    assert daemon.get("/healthz")[0] == 200
    assert daemon.stop() == 0

    stats = sim.stats()
    assert stats["logins_failed"] == 0
    assert stats["refusals"]["unknown contract"] >= 1
    assert stats["refusals"]["revoked token"] >= 2
    tokens = issued_tokens(sim)
    assert len(tokens) == stats["tokens_issued"] == 4
    assert_no_secret(daemon.output(), [PASSWORD, *tokens])
    assert "eyJ" not in daemon.output()  # no JWT at all, whoever issued it

    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ime_recorder_")
    }
    assert samples["ime_recorder_contracts_rejected"] == 1
    assert samples['ime_recorder_logins_total{outcome="ok"}'] == len(tokens)
    assert samples["ime_recorder_refusals_total"] >= 3

    events = daemon.events()
    assert len(events) == len(daemon.err.read_text().splitlines())  # every line is JSON
    for event in events:
        assert {"event", "level", "timestamp"} <= event.keys(), event
    opened = [e for e in events if e["event"] == "stream open"]
    assert len(opened) >= 3
    assert all(e["connection"] and e["session"] for e in opened)
    (dropped,) = [e for e in events if e["event"].startswith("contracts refused by the server")]
    assert dropped["refused"] == ["9999"]


@pytest.mark.slow
def test_a_revoked_fixed_token_exits_2_without_showing_it(
    simulator: Any, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """HEDGETECH_TOKEN_FILE, then the server revokes it: exit 2, one line, no token anywhere."""
    sim = simulator(contracts=2, rate=30)
    token = sim.issue_token()
    (tmp_path / "token").write_text(token + "\n")
    daemon = Daemon(
        tmp_path, sim, ["1001", "1002"], {"HEDGETECH_TOKEN_FILE": str(tmp_path / "token")}
    )
    daemons.append(daemon)
    daemon.wait_ready("recording with the fixed token", logins=0)
    daemon.get("/metrics")
    sim.revoke_tokens()
    sim.close_all(1011)
    assert daemon.proc.wait(timeout=30) == 2
    last = daemon.err.read_text().strip().splitlines()[-1]
    assert last.startswith("ime-recorder: ")
    assert "HEDGETECH_TOKEN" in last
    assert_no_secret(daemon.output(), [token])


@pytest.mark.parametrize(
    ("case", "code", "named"),
    [
        pytest.param(
            "wrong-password", 2, "login refused for user 'operator-7'", id="wrong-password"
        ),
        pytest.param("unreachable", 1, "cannot start", id="unreachable-server"),
    ],
)
def test_failed_logins_name_the_problem_never_the_password(
    simulator: Any, tmp_path: Path, daemons: list[Daemon], case: str, code: int, named: str
) -> None:
    """A refused login exits 2, an unreachable server 1; neither shows the password sent."""
    sim = simulator(contracts=1, rate=10, username=USER, password=PASSWORD)
    env = {"HEDGETECH_USERNAME": USER, "HEDGETECH_PASSWORD": PASSWORD}
    if case == "wrong-password":
        env["HEDGETECH_PASSWORD"] = "Wr0ng-Gu3ss-0f-the-Pa55w0rd"
    else:
        env["IME_RECORDER_AUTH__TOKEN_URL"] = f"http://127.0.0.1:{free_port()}/auth/token"
    daemon = Daemon(tmp_path, sim, ["1001"], env)
    daemons.append(daemon)
    assert daemon.proc.wait(timeout=30) == code
    output = daemon.output()
    assert named in output
    assert_no_secret(output, [PASSWORD, env["HEDGETECH_PASSWORD"]])
    assert sim.stats()["connections_accepted"] == 0


# ---------------------------------------------------------------------- TLS


@contextlib.asynccontextmanager
async def tls_front(target_port: int, context: ssl.SSLContext) -> Any:
    """A TLS-terminating proxy on a free loopback port in front of ``target_port``."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


def tls_config(sim: Any, tmp_path: Path, port: int, ca_bundle: str) -> Config:
    plain = make_config(sim, tmp_path / "data")
    feed = msgspec.structs.replace(plain.feed, base_url=f"wss://localhost:{port}/data-engine/ime")
    auth = AuthConfig(
        token_url=f"https://localhost:{port}/auth/user/token/issue", ca_bundle=ca_bundle
    )
    return msgspec.structs.replace(
        plain, feed=feed, auth=auth, metrics=MetricsConfig(enabled=False)
    )


def run_behind_tls(sim: Any, tmp_path: Path, ca_bundle: str, frames: int) -> Recorder:
    """Record from ``sim`` through a TLS front whose certificate a throwaway CA signed."""
    ca = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    holder: list[Recorder] = []

    async def main() -> None:
        async with tls_front(sim.port, server_context) as port:
            config = tls_config(sim, tmp_path, port, ca_bundle)
            stop = asyncio.Event()

            async def watch(rec: Recorder) -> None:
                deadline = time.monotonic() + 20
                # polls a counter of the pipeline: no event is set per frame (hot path)
                while rec.pipeline.stats.frames < frames and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                stop.set()

            tasks: list[asyncio.Task[None]] = []

            def on_start(rec: Recorder) -> None:
                holder.append(rec)
                tasks.append(asyncio.create_task(watch(rec)))

            await record(config, DEMO, stop, on_start=on_start)
            await asyncio.gather(*tasks)

    asyncio.run(main())
    return holder[0]


def test_ca_bundle_is_trusted_for_login_and_streams(simulator: Any, tmp_path: Path) -> None:
    """With auth.ca_bundle, https login and wss streams through a private CA record fully."""
    sim = simulator(contracts=2, rate=0, max_messages=20, keep_sent=True)
    run_behind_tls(sim, tmp_path, str(tmp_path / "ca.pem"), frames=20)
    con = recorder.connect(tmp_path / "data")
    assert con.execute("SELECT count(*) FROM aggregate").fetchone() == (len(sim.sent),)
    assert len(sim.sent) == 20


def test_without_the_ca_the_certificate_is_refused(simulator: Any, tmp_path: Path) -> None:
    """Certificate checks are on by default: an unknown CA stops the login, nothing is sent."""
    sim = simulator(contracts=1, rate=10)
    with pytest.raises(TransientError, match="certificate verify failed"):
        run_behind_tls(sim, tmp_path, "", frames=1)
    assert sim.stats()["tokens_issued"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "auth.ca_bundle: file not found"),
        ("not a certificate\n", "holds no PEM certificate"),
    ],
)
def test_a_bad_ca_bundle_is_a_config_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    """A missing or non-PEM ca_bundle is caught at start-up with one line naming the key."""
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content)
    env = {"IME_RECORDER_FEED__CONTRACTS": "1001", "IME_RECORDER_AUTH__CA_BUNDLE": str(bundle)}
    with pytest.raises(ConfigError, match=message):
        load_config(None, env)


def test_defaults_keep_certificate_checks_on() -> None:
    """The default TLS context verifies certificates and host names (no bundle needed)."""
    from recorder.auth import ssl_context

    context = ssl_context(Config(feed=FeedConfig(contracts=("1001",))).auth)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
