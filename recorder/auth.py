"""Tokens for the feed: log in at ``auth.token_url`` or use HEDGETECH_TOKEN as it is.

A logged-in token is replaced ahead of its ``exp`` (a tenth of its life early, at most 60 s),
lazily by :meth:`TokenProvider.token` and in the background by
:meth:`TokenProvider.keep_fresh`, so a reconnect never presents an expired token. Callers
that share one provider never log in twice for the same stale token, and a refused login is
final: it is raised again to every later caller without asking the server again.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from typing import Any

import aiohttp
import orjson
import structlog

from recorder.config import AuthConfig, Credentials
from recorder.errors import AuthError, TransientError
from recorder.logs import register_secrets, scrub

log = structlog.get_logger("recorder.auth")

_EARLY_MAX_SECONDS = 60.0  # replace a token at most this long before its exp
_EARLY_SHARE = 0.1  # ...and at most this share of its life early
_MIN_LIFE_SECONDS = 0.5  # a fresh token due sooner than this: the clocks disagree


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT in Unix seconds, read without verifying (None if absent)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    return float(exp) if isinstance(exp, int | float) else None


def ssl_context(config: AuthConfig) -> ssl.SSLContext:
    """TLS for the login and the streams: the system's CAs, plus ``auth.ca_bundle`` if set.

    Certificate and host name checks stay on; the bundle only adds trust (a private CA).
    """
    context = ssl.create_default_context()
    if config.ca_bundle:
        context.load_verify_locations(cafile=config.ca_bundle)
    return context


def _detail(body: Any) -> str:
    if isinstance(body, dict) and "detail" in body:
        return scrub(str(body["detail"]))[:200]
    return "no detail"


class TokenProvider:
    """Hands out the current token and logs in again when asked to or near its expiry."""

    def __init__(
        self, session: aiohttp.ClientSession, config: AuthConfig, credentials: Credentials
    ) -> None:
        self._session = session
        self._config = config
        self._credentials = credentials
        self._token: str | None = None
        self._expires_at: float | None = None
        self._renew_at: float | None = None
        self._lock = asyncio.Lock()
        self._have_token = asyncio.Event()
        self._refused: AuthError | None = None
        register_secrets(credentials.secrets())

    @property
    def can_login(self) -> bool:
        return self._credentials.password is not None

    @property
    def who(self) -> str:
        return self._credentials.username or "(token from HEDGETECH_TOKEN)"

    @property
    def expires_at(self) -> float | None:
        """The current token's ``exp`` in Unix seconds (None: no token yet, or no exp)."""
        return self._expires_at

    def header(self, token: str) -> dict[str, str]:
        """The Authorization header in the configured scheme."""
        value = token if self._config.header_scheme == "raw" else f"Bearer {token}"
        return {"Authorization": value}

    def _due(self) -> bool:
        return self._token is None or (
            self.can_login and self._renew_at is not None and time.time() >= self._renew_at
        )

    async def token(self) -> str:
        """The token to connect with; logs in first if there is none or it is due for renewal."""
        if self._due():
            async with self._lock:
                if self._due():
                    await self._renew()
        assert self._token is not None
        return self._token

    async def refresh(self, replacing: str | None = None) -> str:
        """Log in for a fresh token (with a fixed token: that token again).

        With ``replacing``, log in only if that is still the current token: callers that saw
        the same token refused share one login.
        """
        async with self._lock:
            if replacing is None or self._token is None or self._token == replacing:
                await self._renew()
        assert self._token is not None
        return self._token

    async def keep_fresh(self) -> None:
        """Log in again ahead of each token's expiry, until cancelled (returns if it cannot).

        Transient login failures are retried (1, 2, 4 ... 30 s apart); a refused login is
        logged and ends the loop (the next reconnect raises it), and so does a fresh token
        that is already due (clocks that disagree would make it log in without pause).
        """
        if not self.can_login:
            return  # a fixed token cannot be renewed
        await self._have_token.wait()
        failures = 0
        while True:
            renew_at = self._renew_at
            if renew_at is None:
                return  # a token without exp: nothing to renew ahead of
            if (delay := renew_at - time.time()) > 0:
                await asyncio.sleep(delay)
                continue  # the token may have been renewed meanwhile: look again
            stale = self._token
            try:
                await self.refresh(replacing=stale)
            except TransientError as exc:
                failures += 1
                retry_in = min(30.0, 2.0 ** (failures - 1))
                log.warning("token renewal failed", reason=str(exc), retry_in_seconds=retry_in)
                await asyncio.sleep(retry_in)
                continue
            except AuthError as exc:
                log.error("token renewal refused", reason=str(exc))
                return
            failures = 0
            if self._renew_at is not None and self._renew_at - time.time() < _MIN_LIFE_SECONDS:
                # renewing now would log in again and again: leave it to the reconnects
                log.warning(
                    "a fresh token is already due for renewal; check the clock",
                    expires_in_seconds=round((self._expires_at or 0.0) - time.time(), 3),
                )
                return

    async def _renew(self) -> None:
        """Take a token (the lock is held): the fixed one, or a fresh login."""
        if self._refused is not None:
            raise AuthError(str(self._refused))
        if self._credentials.token is not None:
            token = self._credentials.token.reveal()
        else:
            try:
                token = await self._login()
            except AuthError as exc:
                self._refused = exc
                raise
        issued = time.time()
        register_secrets([token])
        self._token = token
        self._expires_at = jwt_expiry(token)
        self._renew_at = None
        if self._expires_at is not None:
            early = min(_EARLY_MAX_SECONDS, max(0.0, self._expires_at - issued) * _EARLY_SHARE)
            self._renew_at = self._expires_at - early
        self._have_token.set()

    async def _login(self) -> str:
        credentials = self._credentials
        assert credentials.username is not None
        assert credentials.password is not None
        form = {
            "UserName_or_Email": credentials.username,
            "Password": credentials.password.reveal(),
        }
        url = self._config.token_url
        try:
            async with self._session.post(
                url, data=form, timeout=aiohttp.ClientTimeout(total=self._config.timeout_seconds)
            ) as response:
                status = response.status
                try:
                    body = await response.json(content_type=None, loads=orjson.loads)
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(
                f"login at {url} failed: {type(exc).__name__}: {scrub(str(exc))}"
            ) from None
        if status in (200, 201) and isinstance(body, dict):
            token = body.get("Authorization")
            if isinstance(token, str) and token:
                token = token.removeprefix("Bearer ").strip()
                log.info("logged in", user=credentials.username, url=url)
                return token
            raise AuthError(
                f"login at {url} as {credentials.username!r}: HTTP {status} without a token"
            )
        if status >= 500 or status == 429:
            raise TransientError(f"login at {url}: HTTP {status} ({_detail(body)})")
        who = credentials.username
        raise AuthError(f"login refused for user {who!r} at {url}: HTTP {status} ({_detail(body)})")
