"""Tokens for the feed: log in at ``auth.token_url`` or use HEDGETECH_TOKEN as it is."""

from __future__ import annotations

import base64
import time
from typing import Any

import aiohttp
import orjson
import structlog

from recorder.config import AuthConfig, Credentials
from recorder.errors import AuthError, TransientError
from recorder.logs import register_secrets, scrub

log = structlog.get_logger("recorder.auth")


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT in Unix seconds, read without verifying (None if absent)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    return float(exp) if isinstance(exp, int | float) else None


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
        register_secrets(credentials.secrets())

    @property
    def can_login(self) -> bool:
        return self._credentials.password is not None

    @property
    def who(self) -> str:
        return self._credentials.username or "(token from HEDGETECH_TOKEN)"

    def header(self, token: str) -> dict[str, str]:
        """The Authorization header in the configured scheme."""
        value = token if self._config.header_scheme == "raw" else f"Bearer {token}"
        return {"Authorization": value}

    async def token(self) -> str:
        """The token to connect with; logs in first if there is none or it expires within 60 s."""
        if self._token is None or (
            self.can_login and self._expires_at is not None and self._expires_at - time.time() < 60
        ):
            return await self.refresh()
        return self._token

    async def refresh(self) -> str:
        """Log in for a fresh token (with a fixed token: that token again)."""
        if self._credentials.token is not None:
            self._token = self._credentials.token.reveal()
        else:
            self._token = await self._login()
        self._expires_at = jwt_expiry(self._token)
        register_secrets([self._token])
        return self._token

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
