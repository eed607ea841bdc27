"""Logging: structlog JSON lines (console rendering on a terminal), with secrets scrubbed.

Every line is one event with ``event``, ``level`` and ``timestamp`` (UTC, ISO 8601), plus the
fields of the call (``connection``, ``contract``/``contracts``, ``session`` where they apply).
Records of the standard ``logging`` module (aiohttp's, asyncio's) go through the same
processors, so a container's log holds nothing but JSON lines.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import structlog

_SECRETS: set[str] = set()
_SECRET_KEYS = frozenset(("password", "token", "authorization", "jwt"))
MASK = "***"
_OURS = "_ime_recorder_handler"  # marks the root handler configure() installed


def register_secrets(values: Iterable[str]) -> None:
    """Remember values (passwords, tokens) that must never reach a log line."""
    _SECRETS.update(v for v in values if v and len(v) >= 4)


def scrub(text: str) -> str:
    """Replace every registered secret inside ``text``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _scrub_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = MASK
        elif isinstance(value, str):
            event[key] = scrub(value)
        elif value is not None and not isinstance(value, int | float | bool):
            text = str(value)
            scrubbed = scrub(text)
            if scrubbed != text:
                event[key] = scrubbed
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog for the process: JSON lines unless ``fmt`` or a terminal says console."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, _scrub_event, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _scrub_event,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(numeric_level)


class Muted:
    """Warnings of each kind at most once a minute: a flood of one failure helps nobody.

    Called from the event loop and the worker threads alike (structlog's logger is
    thread-safe; a warning said twice in a race is harmless).
    """

    PERIOD = 60.0

    def __init__(self, logger: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._clock = clock
        self._last: dict[str, float] = {}

    def warning(self, kind: str, event: str, **fields: Any) -> None:
        """Log ``event`` unless a warning of ``kind`` was logged less than a minute ago."""
        now = self._clock()
        if now - self._last.get(kind, -math.inf) >= self.PERIOD:
            self._last[kind] = now
            self._log.warning(event, **fields, note="repeats of this kind are muted for a minute")
