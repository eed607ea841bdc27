"""The one exception tree of ime-recorder.

    RecorderError
    ├── ConfigError        a wrong or missing config key, value or credential (exit code 2)
    ├── AuthError          the token endpoint refused the credentials (exit code 2)
    ├── FeedError          a stream ended or could not be opened
    │   ├── RefusedError   the server refused: HTTP 401/403 at the handshake or close code 1008
    │   │   └── AllRefusedError  every contract of a connection is refused, even after a new login
    │   └── TransientError any other end: a close code, a lost TCP connection, a timeout
    ├── FlattenError       a frame that cannot become rows (it goes to quarantine)
    └── StorageError       a Parquet write or a data-directory problem

Foreign exceptions (aiohttp, OSError, pyarrow) are translated once, at the boundary that
meets them, with ``raise ... from exc``. No message of this tree ever holds a password or
a token.
"""

from __future__ import annotations


class RecorderError(Exception):
    """Base class of every error raised by ime-recorder."""


class ConfigError(RecorderError):
    """A configuration key, value or credential is wrong or missing."""


class AuthError(RecorderError):
    """The token endpoint did not issue a token."""


class FeedError(RecorderError):
    """A stream ended or could not be opened."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RefusedError(FeedError):
    """The server refused the subscription (HTTP 401/403 or close code 1008)."""


class AllRefusedError(RefusedError):
    """Every contract of a connection is refused, even with a fresh token (exit code 2)."""


class TransientError(FeedError):
    """A stream ended for a reason that a reconnect may cure."""


class FlattenError(RecorderError):
    """A frame cannot be turned into rows; ``reason`` names the field at fault."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StorageError(RecorderError):
    """Writing to or reading from the data directory failed."""
