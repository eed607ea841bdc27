"""The IME feed simulator: options, tokens, contracts and a control API; streams in simstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import orjson
from aiohttp import web
from yarl import URL

from recorder.simcontracts import (
    Contract,
    Endpoint,
    FeedVariants,
    make_contracts,
    new_contract,
)
from recorder.simmarket import Market, Subscription
from recorder.simrest import RestEndpoints, exchange_clock_now
from recorder.simstream import STREAM_PATH, SentFrame, Streams

HeaderScheme = Literal["any", "raw", "bearer"]
RefuseWith = Literal["403", "1008"]
TOKEN_PATH = "/auth/user/token/issue"  # noqa: S105 - a URL path, not a secret
_T = TypeVar("_T")


@dataclass(frozen=True)
class SimulatorOptions(FeedVariants):
    """Everything a simulator run can vary: how messages are rendered (the fields of
    :class:`FeedVariants`) and the rest below; the defaults give a plain, well-behaved feed."""

    host: str = "127.0.0.1"
    port: int = 0
    contracts: int = 10
    rate: float = 50.0  # messages/s per connection; <= 0 means as fast as possible
    seed: int = 0
    username: str = "demo"
    password: str = "demo"  # noqa: S105 - the simulator's documented demo credentials
    token_ttl_seconds: int = 3600
    static_token: str | None = None  # accepted as well, never expires, not revoked
    header_scheme: HeaderScheme = "any"
    refuse_with: RefuseWith = "1008"
    max_messages: int | None = None  # per connection; then the socket stays open and idle
    fast: bool = False
    fast_pool: int = 4096  # distinct pre-encoded frames cycled in fast mode
    fast_batch: int = 256  # frames per transport.write in fast mode
    keep_sent: bool = False
    odd_names: bool = False
    clock: Callable[[], datetime] | None = None  # exchange time (UTC); overrides the next two
    start_time: datetime | None = None  # exchange time when the simulator is created
    time_scale: float = 1.0  # simulated seconds per real second
    heartbeat: float | None = None  # server pings, like uvicorn's ws_ping_interval
    close_timeout: float = 5.0  # how long to wait for the client's close frame after ours
    max_line_size: int = 8190  # request-line limit, as most servers have (PERFORMANCE-NOTES)

    def __post_init__(self) -> None:
        checks = {
            "header_scheme": self.header_scheme in ("any", "raw", "bearer"),
            "refuse_with": self.refuse_with in ("403", "1008"),
            "id_key": self.id_key in ("contractId", "ContractId"),
            "timestamp_style": self.timestamp_style in ("z", "offset", "naive"),
            "contracts": self.contracts >= 1,
            "fast_pool/fast_batch": self.fast_pool >= 1 and self.fast_batch >= 1,
            "time_scale": self.time_scale > 0,
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ValueError(f"invalid simulator options: {', '.join(bad)}")

    def variants(self) -> FeedVariants:
        """The wire variants these options ask for."""
        return FeedVariants(**{name: getattr(self, name) for name in FeedVariants.__slots__})


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def served_urls(host: str, port: int) -> tuple[str, str]:
    """(``feed.base_url``, ``auth.token_url``) of a server bound to ``host``:``port``; the
    recorder appends ``/live/data/websocket/contract/...`` to the first."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"ws://{reachable}:{port}/data-engine/ime", f"http://{reachable}:{port}{TOKEN_PATH}"


class Simulator:
    """The feed server on the caller's event loop; every public method is thread-safe."""

    def __init__(self, options: SimulatorOptions | None = None) -> None:
        self.options = opts = options or SimulatorOptions()
        self.port = opts.port
        self._contracts = make_contracts(opts.contracts, opts.seed, odd_names=opts.odd_names)
        self._by_key: dict[Endpoint, dict[str, Contract]] = {
            "id": {c.id: c for c in self._contracts},
            "name": {c.name: c for c in self._contracts},
        }
        self._market = Market(self._contracts, opts.seed, opts.variants())
        self._secret = secrets.token_bytes(32)
        self._tokens: dict[str, float] = {}  # issued token -> exp (unix seconds)
        self._revoked: set[str] = set()
        self._rest_refusals: Counter[str] = Counter()
        self.delisted: set[str] = set()
        self._logins_failed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._clock = opts.clock or self._scaled_clock(opts.start_time, opts.time_scale)
        self._streams = Streams(self, self._clock)

    @staticmethod
    def _scaled_clock(start: datetime | None, scale: float) -> Callable[[], datetime]:
        if start is None and scale == 1.0:
            return lambda: datetime.now(UTC)
        anchor = (start or datetime.now(UTC)).astimezone(UTC)
        origin = time.monotonic()
        return lambda: anchor + timedelta(seconds=(time.monotonic() - origin) * scale)

    async def start(self) -> None:
        """Bind and serve; `port` holds the real port afterwards."""
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self._login)
        self._streams.register(app)
        app.router.add_post("/_sim/{action:close|abort|revoke|pause|resume}", self._control)
        app.router.add_get("/_sim/{what:stats|sent}", self._report)
        app.router.add_post("/_sim/list", self._list_handler)
        RestEndpoints(self).register(app)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, max_line_size=self.options.max_line_size
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        self.port = site.port

    async def stop(self) -> None:
        """Close every stream with 1001 (going away), wait for the handlers, free the port."""
        await self._streams.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """WebSocket base, as ``feed.base_url`` wants it."""
        return served_urls(self.options.host, self.port)[0]

    @property
    def token_url(self) -> str:
        """The login endpoint, as ``auth.token_url`` wants it."""
        return served_urls(self.options.host, self.port)[1]

    @property
    def contracts(self) -> list[Contract]:
        return list(self._contracts)

    @property
    def sent(self) -> list[SentFrame]:
        """Every data frame sent so far, in send order (only with `keep_sent`)."""
        return self._on_loop(lambda: list(self._streams.sent))

    def stream_url(self, endpoint: Endpoint, identifiers: Sequence[str]) -> str:
        """Full stream URL with repeated `contract_id` / `contract_name` parameters."""
        key = "contract_id" if endpoint == "id" else "contract_name"
        root = URL(self.base_url)
        url = root.with_path(STREAM_PATH.format(endpoint=endpoint))
        return str(url.with_query([(key, ident) for ident in identifiers]))

    def stats(self) -> dict[str, Any]:
        """Counters: connections, messages sent (per connection and total), tokens, refusals."""

        def collect() -> dict[str, Any]:
            streams = self._streams
            return {
                "connections_open": len(streams.conns),
                "connections_accepted": streams.accepted,
                "messages_sent": {str(k): v for k, v in streams.sent_by_conn.items()},
                "messages_sent_total": sum(streams.sent_by_conn.values()),
                "tokens_issued": len(self._tokens),
                "tokens_revoked": len(self._revoked),
                "logins_failed": self._logins_failed,
                "refusals": dict(streams.refusals),
                "rest_refusals": dict(self._rest_refusals),
                "server_closes": {str(k): v for k, v in streams.closes.items()},
            }

        return self._on_loop(collect)

    def _on_loop(self, action: Callable[[], _T]) -> _T:
        """Run `action` on the server loop (waiting for it when called from another thread)."""
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop or loop.is_closed():
            return action()
        done: Future[_T] = Future()

        def run() -> None:
            try:
                done.set_result(action())
            except Exception as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=30)

    def close_all(self, code: int = 1011, reason: str = "") -> None:
        """Close every open stream with `code` and `reason` (a normal close handshake)."""
        self._on_loop(lambda: self._streams.close_all(code, reason))

    def abort_all(self) -> None:
        """Drop every stream's TCP connection without a close frame."""
        self._on_loop(self._streams.abort_all)

    def revoke_tokens(self) -> None:
        """Invalidate every token issued so far (not `static_token`); open streams stay open."""
        self._on_loop(lambda: self._revoked.update(self._tokens))

    def set_refuse_with(self, mode: RefuseWith) -> None:
        if mode not in ("403", "1008"):
            raise ValueError(f"refuse_with must be '403' or '1008', not {mode!r}")
        self._on_loop(lambda: setattr(self._streams, "refuse_with", mode))

    def set_rate(self, rate: float) -> None:
        self._on_loop(lambda: setattr(self._streams, "rate", rate))

    def pause(self) -> None:
        """Stop sending on every stream, sockets left open, until `resume()`."""
        self._on_loop(self._streams.resumed.clear)

    def resume(self) -> None:
        self._on_loop(self._streams.resumed.set)

    def issue_token(self, ttl_seconds: float | None = None, username: str | None = None) -> str:
        """Mint a valid token without logging in (tests: short-lived or expired tokens).

        An int TTL gives an integer `exp` like real tokens (so it lives ttl-1 to ttl seconds);
        a float TTL gives an `exp` precise to the millisecond.
        """
        now = time.time()
        ttl = self.options.token_ttl_seconds if ttl_seconds is None else ttl_seconds
        exp = int(now) + ttl if isinstance(ttl, int) else round(now + ttl, 3)
        claims = {"sub": username or self.options.username, "exp": exp, "iat": int(now)}
        claims["jti"] = secrets.token_hex(8)
        head = {"alg": "HS256", "typ": "JWT"}
        signing_input = f"{_b64url(orjson.dumps(head))}.{_b64url(orjson.dumps(claims))}"
        signature = hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{_b64url(signature)}"
        self._on_loop(lambda: self._tokens.__setitem__(token, exp))
        return token

    # ---- HTTP handlers ---------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        user = form.get("UserName_or_Email", form.get("username"))
        password = form.get("Password", form.get("password"))
        if not isinstance(user, str) or not isinstance(password, str):
            self._logins_failed += 1
            return web.json_response({"detail": "username and password are required"}, status=401)
        good_user = hmac.compare_digest(user.encode(), self.options.username.encode())
        good_pass = hmac.compare_digest(password.encode(), self.options.password.encode())
        if not (good_user and good_pass):
            self._logins_failed += 1
            return web.json_response({"detail": "invalid username or password"}, status=401)
        return web.json_response({"Authorization": self.issue_token(username=user)}, status=201)

    # ------------------------------------------------------------------ REST support (simrest)

    def token_refusal(self, request: web.Request) -> str | None:
        """Why this request's token is refused (None when it is good)."""
        refusal, _ = self.check_access(request, None)
        return refusal

    def count_refusal(self, reason: str) -> None:
        """A REST request refused (kept apart from the streams' refusals)."""
        self._rest_refusals[reason] += 1

    def exchange_now(self) -> datetime:
        return exchange_clock_now(self._clock)

    def lookup(self, endpoint: str, identifier: str) -> Contract | None:
        return self._by_key["id" if endpoint == "id" else "name"].get(identifier)

    def current_state(self, contract: Contract, now: datetime) -> dict[str, Any]:
        """The contract's market sections as they stand (the live overview's data)."""
        return self._market.current(contract, now)

    def list_contract(self, market: str = "IMEFutures", name: str | None = None) -> Contract:
        """List a new contract while running (discovery tests); returns it."""

        def add() -> Contract:
            contract = new_contract(self._contracts, market, self.options.seed, name)
            self._contracts.append(contract)
            self._by_key["id"][contract.id] = contract
            self._by_key["name"][contract.name] = contract
            self._market.add(contract, self.options.seed)
            return contract

        return self._on_loop(add)

    def delist(self, contract_id: str) -> None:
        """Stop listing a contract in searches (it expired); its streams go on."""
        self._on_loop(lambda: self.delisted.add(contract_id))

    async def _list_handler(self, request: web.Request) -> web.Response:
        contract = self.list_contract(
            request.query.get("market", "IMEFutures"), request.query.get("name")
        )
        return web.json_response({"contractId": contract.id, "contractName": contract.name})

    # ---- stream support (simstream); the token check serves the REST endpoints as well -----

    def check_access(
        self, request: web.Request, endpoint: Endpoint | None
    ) -> tuple[str | None, float | None]:
        """Why this request is refused (None when accepted), and the token's expiry.

        ``endpoint`` None checks the token only (the REST endpoints)."""
        header = request.headers.get("Authorization", "").strip()
        scheme, _, rest = header.partition(" ")
        bearer = scheme.lower() == "bearer" and bool(rest.strip())
        token = rest.strip() if bearer else header
        scheme_wanted = self.options.header_scheme
        exp: float | None = None
        if not token:
            return "missing token", None
        if (scheme_wanted == "raw" and bearer) or (scheme_wanted == "bearer" and not bearer):
            return "bad auth scheme", None
        if token != self.options.static_token:
            if token not in self._tokens:
                return "invalid token", None
            if token in self._revoked:
                return "revoked token", None
            exp = self._tokens[token]
            if exp <= time.time():
                return "expired token", None
        if endpoint is None:
            return None, exp
        idents = request.query.getall("contract_id" if endpoint == "id" else "contract_name", [])
        if not idents:
            return "no contract", exp
        if any(ident not in self._by_key[endpoint] for ident in idents):
            return "unknown contract", exp  # like the real server, never says which one
        return None, exp

    def subscribe(self, endpoint: Endpoint, identifiers: Sequence[str]) -> Subscription:
        """What a stream of these contracts hears (identifiers that `check_access` passed)."""
        chosen = [self._by_key[endpoint][ident] for ident in dict.fromkeys(identifiers)]
        return Subscription(self._market, chosen, endpoint, self.options.seed)

    # ---- control API over HTTP, for a simulator run as a subprocess ------------------------

    async def _control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action == "close":
            code = request.query.get("code", "1011")
            if not code.isdigit():
                return web.json_response({"detail": "code must be an integer"}, status=400)
            self.close_all(int(code), request.query.get("reason", ""))
        else:
            {"abort": self.abort_all, "revoke": self.revoke_tokens, "pause": self.pause}.get(
                action, self.resume
            )()
        return web.json_response({"ok": True, "action": action})

    async def _report(self, request: web.Request) -> web.Response:
        if request.match_info["what"] == "stats":
            return web.json_response(self.stats())
        if not self.options.keep_sent:
            return web.json_response({"detail": "start the simulator with keep_sent"}, status=404)
        lines = [orjson.dumps(f, option=orjson.OPT_APPEND_NEWLINE) for f in self._streams.sent]
        return web.Response(body=b"".join(lines), content_type="application/x-ndjson")
