"""Configuration: a TOML file, then ``IME_RECORDER_<SECTION>__<KEY>`` environment overrides.

Values are small frozen objects checked once at start-up; anything wrong raises ConfigError
with one line naming the key. Credentials come only from the environment (see
:func:`load_credentials`) and never appear in a repr, a log line or an error.
"""

from __future__ import annotations

import math
import os
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from recorder.errors import ConfigError

ENV_PREFIX = "IME_RECORDER_"


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class FeedConfig(_Section, frozen=True):
    base_url: str = "wss://core.hedgetech.ir/data-engine/ime"
    subscribe_by: Literal["id", "name"] = "id"
    contracts: tuple[str, ...] = ()
    markets: tuple[str, ...] = ()  # discovery: whole markets (IMEFutures, IMEOption, ...)
    search: tuple[str, ...] = ()  # discovery: name fragments, searched in `markets` (or all)
    discovery_interval_seconds: float = 3600.0
    snapshot_on_connect: bool = True  # fetch the live overview of a session's contracts
    naive_timestamp_timezone: str = "UTC"
    max_contracts_per_connection: int = 50
    heartbeat_seconds: float = 20.0
    reconnect_max_seconds: float = 30.0
    stable_after_seconds: float = 60.0
    close_timeout_seconds: float = 2.0
    stale_after_seconds: float = 0.0  # no-data watchdog; 0 = off (quiet contracts are normal)
    refusal_probe_seconds: float = 1.0  # how long a probe waits for a 1008 after the accept


class AuthConfig(_Section, frozen=True):
    token_url: str = "https://core.hedgetech.ir/auth/user/token/issue"  # noqa: S105 - a URL
    header_scheme: Literal["raw", "bearer"] = "raw"
    timeout_seconds: float = 15.0
    ca_bundle: str = ""  # a PEM file of extra CAs, trusted besides the system's (checks stay on)


class StorageConfig(_Section, frozen=True):
    data_dir: str = "data"
    flush_interval_seconds: float = 5.0
    partition_timezone: str = "Asia/Tehran"
    max_rows_per_file: int = 250_000
    max_buffered_rows: int = 2_000_000
    compression_level: int = 1  # of flushed files; compaction rewrites them at level 19
    fsync: bool = True


class JournalConfig(_Section, frozen=True):
    enabled: bool = True
    fsync: bool = True
    fsync_interval_seconds: float = 0.02  # a power loss takes about this much of the stream
    write_interval_seconds: float = 0.005  # a kill -9 takes at most this much
    segment_megabytes: int = 64
    # frames waiting in the journal while memory is full (recorder.spill); beyond, readers stop
    max_spill_megabytes: int = 4096
    retention_days: float = 0.0  # 0: remove segments once in Parquet; else keep them compressed


class CompactionConfig(_Section, frozen=True):
    enabled: bool = True  # the daemon compacts every date once it has closed
    after_seconds: float = 900.0  # after local midnight in storage.partition_timezone
    merge_interval_seconds: float = 600.0  # the open date's day files merged; 0 = off
    # a closed date becomes one file per contract ("contract") or per table ("date", whose
    # order answers the state of every contract at an instant from one file: recorder.dayfold)
    layout: Literal["contract", "date"] = "contract"


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class MetricsConfig(_Section, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"  # the container image sets 0.0.0.0
    port: int = 9108  # /metrics, /healthz, /readyz; 0 = any free port (tests)


class Config(_Section, frozen=True):
    feed: FeedConfig = FeedConfig()
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig()
    journal: JournalConfig = JournalConfig()
    compaction: CompactionConfig = CompactionConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    @property
    def partition_tz(self) -> ZoneInfo:
        return ZoneInfo(self.storage.partition_timezone)

    @property
    def naive_tz(self) -> ZoneInfo:
        return ZoneInfo(self.feed.naive_timestamp_timezone)


_SECTIONS: dict[str, type[_Section]] = {f.name: f.type for f in msgspec.structs.fields(Config)}


def _env_value(section: str, key: str, text: str) -> Any:
    """Turn an environment string into the type the key expects (lists are comma-separated)."""
    fields = {f.name: f.type for f in msgspec.structs.fields(_SECTIONS[section])}
    if key not in fields:
        raise ConfigError(
            f"{ENV_PREFIX}{section.upper()}__{key.upper()}: unknown key {section}.{key}"
        )
    expected = fields[key]
    if get_origin(expected) in (tuple, list):
        return [item.strip() for item in text.split(",") if item.strip()]
    if expected is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    return text


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or section not in _SECTIONS:
            raise ConfigError(f"{name}: not of the form {ENV_PREFIX}<SECTION>__<KEY>")
        raw.setdefault(section, {})[key] = _env_value(section, key, text)


def _path_of(error: msgspec.ValidationError) -> str:
    text = str(error)
    where = text.rpartition(" - at `$.")
    return f"{where[2].rstrip('`')}: {where[0]}" if where[1] else text


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (None: defaults only), apply environment overrides and check it all."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    _apply_env(raw, environ)
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config: {_path_of(exc)}") from None
    _check(config)
    return config


def _check(config: Config) -> None:
    feed, auth, storage = config.feed, config.auth, config.storage
    if urlsplit(feed.base_url).scheme not in ("ws", "wss") or not urlsplit(feed.base_url).netloc:
        raise ConfigError(f"feed.base_url: {feed.base_url!r} is not a ws:// or wss:// URL")
    if urlsplit(auth.token_url).scheme not in ("http", "https"):
        raise ConfigError(f"auth.token_url: {auth.token_url!r} is not an http(s):// URL")
    if not (feed.contracts or feed.markets or feed.search):
        raise ConfigError(
            "feed.contracts: no contract to record (give contracts, markets or search)"
        )
    for market in feed.markets:
        if market not in ("IMEDepositCertificate", "IMEFutures", "IMEOption"):
            raise ConfigError(
                f"feed.markets: unknown market {market!r} "
                "(IMEDepositCertificate, IMEFutures, IMEOption)"
            )
    if len(set(feed.contracts)) != len(feed.contracts):
        raise ConfigError("feed.contracts: a contract is listed twice")
    for key in ("naive_timestamp_timezone",):
        _check_zone(f"feed.{key}", getattr(feed, key))
    _check_zone("storage.partition_timezone", storage.partition_timezone)
    positive = {
        "feed.max_contracts_per_connection": feed.max_contracts_per_connection,
        "feed.discovery_interval_seconds": feed.discovery_interval_seconds,
        "feed.heartbeat_seconds": feed.heartbeat_seconds,
        "feed.reconnect_max_seconds": feed.reconnect_max_seconds,
        "feed.close_timeout_seconds": feed.close_timeout_seconds,
        "auth.timeout_seconds": auth.timeout_seconds,
        "storage.flush_interval_seconds": storage.flush_interval_seconds,
        "storage.max_rows_per_file": storage.max_rows_per_file,
        "storage.max_buffered_rows": storage.max_buffered_rows,
        "journal.fsync_interval_seconds": config.journal.fsync_interval_seconds,
        "journal.write_interval_seconds": config.journal.write_interval_seconds,
        "journal.segment_megabytes": config.journal.segment_megabytes,
        "journal.max_spill_megabytes": config.journal.max_spill_megabytes,
    }
    for key, value in positive.items():
        if not 0 < value < math.inf:  # also refuses NaN
            raise ConfigError(f"{key}: must be a finite number greater than 0, got {value}")
    stable = feed.stable_after_seconds
    if not 0 <= stable < math.inf:
        raise ConfigError(f"feed.stable_after_seconds: must be 0 or more, got {stable}")
    if not 0 <= config.compaction.after_seconds < math.inf:
        raise ConfigError("compaction.after_seconds: must be 0 or more")
    if not 0 <= config.compaction.merge_interval_seconds < math.inf:
        raise ConfigError("compaction.merge_interval_seconds: must be 0 (off) or more")
    if not 0 <= config.journal.retention_days < math.inf:
        raise ConfigError("journal.retention_days: must be 0 or more")
    if not 1 <= storage.compression_level <= 22:
        raise ConfigError("storage.compression_level: must be 1..22 (zstd)")
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"metrics.port: must be 0..65535, got {config.metrics.port}")
    if auth.ca_bundle:
        _check_ca_bundle(auth.ca_bundle)


def _check_ca_bundle(path: str) -> None:
    """``auth.ca_bundle`` must be a readable PEM file holding at least one certificate."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError:  # before OSError, of which it is a subclass
        raise ConfigError(f"auth.ca_bundle: {path} holds no PEM certificate") from None
    except FileNotFoundError:
        raise ConfigError(f"auth.ca_bundle: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"auth.ca_bundle: cannot read {path} ({exc.strerror})") from None


def _check_zone(key: str, name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(f"{key}: unknown time zone {name!r}") from None


class Secret:
    """A credential: its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class Credentials(msgspec.Struct, frozen=True):
    """Either a username and password to log in with, or a ready token."""

    username: str | None = None
    password: Secret | None = None
    token: Secret | None = None

    def secrets(self) -> list[str]:
        """The values that must never be printed."""
        return [s.reveal() for s in (self.password, self.token) if s is not None]


def _from_env(name: str, environ: Mapping[str, str]) -> str | None:
    """``NAME`` or the content of the file named by ``NAME_FILE`` (Docker secrets)."""
    value = environ.get(name)
    file_name = environ.get(f"{name}_FILE")
    if value and file_name:
        raise ConfigError(f"{name} and {name}_FILE are both set; keep one")
    if file_name:
        try:
            return Path(file_name).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {file_name} ({exc.strerror})") from None
    return value or None


def load_credentials(environ: Mapping[str, str] | None = None) -> Credentials:
    """HEDGETECH_USERNAME + HEDGETECH_PASSWORD, or HEDGETECH_TOKEN (each also as ``*_FILE``)."""
    environ = os.environ if environ is None else environ
    username = _from_env("HEDGETECH_USERNAME", environ)
    password = _from_env("HEDGETECH_PASSWORD", environ)
    token = _from_env("HEDGETECH_TOKEN", environ)
    if token:
        return Credentials(username=username, token=Secret(token))
    if username and password:
        return Credentials(username=username, password=Secret(password))
    if username:
        raise ConfigError("HEDGETECH_PASSWORD: not set (HEDGETECH_USERNAME is)")
    if password:
        raise ConfigError("HEDGETECH_USERNAME: not set (HEDGETECH_PASSWORD is)")
    raise ConfigError(
        "credentials: set HEDGETECH_USERNAME and HEDGETECH_PASSWORD, or HEDGETECH_TOKEN"
    )
