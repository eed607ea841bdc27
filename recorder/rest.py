"""REST client of the HedgeTech IME data engine: static info, search and live overview.

Same token and header scheme as the streams. Transient failures (network, HTTP 5xx/429) are
retried a few times with jittered backoff (tenacity); a 401/403 logs in again once. Answers
have a ``Data`` part and a ``Status`` part; an unknown identifier is ``None`` in ``Data``;
errors carry ``detail``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from yarl import URL

from recorder.auth import TokenProvider
from recorder.errors import FeedError, RefusedError, TransientError
from recorder.logs import scrub

log = structlog.get_logger("recorder.rest")

_BATCH = 50  # identifiers per request: URL length limits, as for the streams


def rest_base(stream_base_url: str) -> URL:
    """``wss://host/data-engine/ime`` -> ``https://host/data-engine/ime`` (ws -> http)."""
    url = URL(stream_base_url.rstrip("/"))
    return url.with_scheme("https" if url.scheme == "wss" else "http")


class RestError(FeedError):
    """The REST service answered with an error (its ``detail`` is in the message)."""


class RestClient:
    """Static info, search and live overview of IME contracts."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: URL,
        tokens: TokenProvider,
        *,
        attempts: int = 4,
        timeout_seconds: float = 15.0,
    ) -> None:
        self._session = session
        self._base = base_url
        self._tokens = tokens
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def static_by_id(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        return await self._batched("static/data/contract/id", "contract_ids", ids)

    async def static_by_name(self, names: Sequence[str]) -> list[dict[str, Any] | None]:
        return await self._batched("static/data/contract/name", "contract_names", names)

    async def search(self, market: str, fragment: str) -> list[dict[str, Any]]:
        """Contracts of ``market`` whose name contains ``fragment`` (static info)."""
        answer = await self._get(
            "static/data/contract/search", [("market", market), ("Search_char", fragment)]
        )
        return [item for item in answer or [] if isinstance(item, dict)]

    async def overview_by_id(self, ids: Sequence[str]) -> tuple[dict[str, Any], float | None]:
        return await self._overview("live/data/overview/contract/id", "contract_ids", ids)

    async def overview_by_name(self, names: Sequence[str]) -> tuple[dict[str, Any], float | None]:
        return await self._overview("live/data/overview/contract/name", "contract_names", names)

    async def _overview(
        self, path: str, param: str, identifiers: Sequence[str]
    ) -> tuple[dict[str, Any], float | None]:
        """Overview per identifier (None when unknown) and the server's time of the answer."""
        merged: dict[str, Any] = {}
        server_time: float | None = None
        for start in range(0, len(identifiers), _BATCH):
            chunk = identifiers[start : start + _BATCH]
            body = await self._get_body(path, [(param, i) for i in chunk])
            data = body.get("Data")
            if isinstance(data, dict):
                merged.update(data)
            status = body.get("Status")
            if isinstance(status, dict) and isinstance(status.get("ServerTimeStamp"), int | float):
                server_time = float(status["ServerTimeStamp"])
        return merged, server_time

    async def _batched(
        self, path: str, param: str, identifiers: Sequence[str]
    ) -> list[dict[str, Any] | None]:
        items: list[dict[str, Any] | None] = []
        for start in range(0, len(identifiers), _BATCH):
            chunk = identifiers[start : start + _BATCH]
            answer = await self._get(path, [(param, i) for i in chunk])
            items.extend(a if isinstance(a, dict) else None for a in (answer or []))
        return items

    async def _get(self, path: str, params: list[tuple[str, str]]) -> Any:
        return (await self._get_body(path, params)).get("Data")

    async def _get_body(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        url = self._base / path
        relogged = False
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_random_exponential(multiplier=0.5, max=10),
            stop=stop_after_attempt(self._attempts),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self._fetch(url, params)
                except RefusedError:
                    if relogged:
                        raise
                    relogged = True
                    await self._tokens.refresh()
                    return await self._fetch(url, params)
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    async def _fetch(self, url: URL, params: list[tuple[str, str]]) -> dict[str, Any]:
        token = await self._tokens.token()
        try:
            async with self._session.get(
                url, params=params, headers=self._tokens.header(token), timeout=self._timeout
            ) as response:
                status = response.status
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"GET {url}: {type(exc).__name__}: {scrub(str(exc))}") from None
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = {}
        detail = scrub(str(body.get("detail", ""))) if isinstance(body, dict) else ""
        if status in (401, 403):
            raise RefusedError(f"GET {url}: HTTP {status} {detail}".strip(), code=status)
        if status >= 500 or status == 429:
            raise TransientError(f"GET {url}: HTTP {status} {detail}".strip(), code=status)
        if status >= 400 or not isinstance(body, dict):
            raise RestError(f"GET {url}: HTTP {status} {detail or 'unexpected answer'}".strip())
        return body
