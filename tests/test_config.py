"""Configuration: the TOML file, environment overrides, checks and credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recorder.config import (
    AuthConfig,
    Config,
    Credentials,
    FeedConfig,
    LogConfig,
    Secret,
    StorageConfig,
    load_config,
    load_credentials,
)
from recorder.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "recorder.toml"
#: the least environment that makes a config without a file valid
ONE_CONTRACT = {"IME_RECORDER_FEED__CONTRACTS": "1001"}
PASSWORD = "pa55-w0rd-s3cret"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2lnbmF0dXJl"


def config_error(path: str | Path | None, environ: dict[str, str]) -> str:
    """The message of the ConfigError that load_config raises, checked to be one line."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def toml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recorder.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the shipped file


def test_shipped_file_gives_the_documented_values() -> None:
    """configs/recorder.toml loads to exactly the values its comments document."""
    config = load_config(SHIPPED, environ={})

    assert config == Config(
        feed=FeedConfig(
            base_url="wss://core.hedgetech.ir/data-engine/ime",
            subscribe_by="id",
            contracts=("1001", "1002"),
            naive_timestamp_timezone="UTC",
            max_contracts_per_connection=50,
            heartbeat_seconds=20.0,
            reconnect_max_seconds=30.0,
            stable_after_seconds=60.0,
            close_timeout_seconds=2.0,
        ),
        auth=AuthConfig(
            token_url="https://core.hedgetech.ir/auth/user/token/issue",
            header_scheme="raw",
            timeout_seconds=15.0,
        ),
        storage=StorageConfig(
            data_dir="data",
            flush_interval_seconds=5.0,
            partition_timezone="Asia/Tehran",
            max_rows_per_file=250_000,
            max_buffered_rows=2_000_000,
            compression_level=1,
            fsync=True,
        ),
        log=LogConfig(level="info", format="auto"),
    )
    assert config.data_dir == Path("data")
    assert (config.partition_tz.key, config.naive_tz.key) == ("Asia/Tehran", "UTC")


def test_no_file_gives_the_defaults() -> None:
    """Without a file every key has its default; only the contracts must be given."""
    config = load_config(None, ONE_CONTRACT)

    assert config == Config(feed=FeedConfig(contracts=("1001",)))


def test_environment_argument_is_the_only_environment_read(tmp_path: Path) -> None:
    """An explicit environ mapping is used instead of the process environment."""
    path = toml_file(tmp_path, '[feed]\ncontracts = ["7"]\n')

    assert load_config(path, {}).feed.contracts == ("7",)


# --------------------------------------------------------------------------- env overrides


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("IME_RECORDER_FEED__BASE_URL", "ws://127.0.0.1:8765/ime", "ws://127.0.0.1:8765/ime"),
        ("IME_RECORDER_FEED__CONTRACTS", "1001,1002", ("1001", "1002")),
        ("IME_RECORDER_FEED__CONTRACTS", " 1001 , 012345 ,", ("1001", "012345")),
        ("IME_RECORDER_FEED__CONTRACTS", "سکه-طلا", ("سکه-طلا",)),
        ("IME_RECORDER_FEED__SUBSCRIBE_BY", "name", "name"),
        ("IME_RECORDER_FEED__NAIVE_TIMESTAMP_TIMEZONE", "Asia/Tehran", "Asia/Tehran"),
        ("IME_RECORDER_FEED__MAX_CONTRACTS_PER_CONNECTION", "7", 7),
        ("IME_RECORDER_FEED__HEARTBEAT_SECONDS", "2.5", 2.5),
        ("IME_RECORDER_FEED__RECONNECT_MAX_SECONDS", "3", 3.0),
        ("IME_RECORDER_AUTH__TOKEN_URL", "http://127.0.0.1/t", "http://127.0.0.1/t"),
        ("IME_RECORDER_AUTH__HEADER_SCHEME", "bearer", "bearer"),
        ("IME_RECORDER_AUTH__TIMEOUT_SECONDS", "0.25", 0.25),
        ("IME_RECORDER_STORAGE__DATA_DIR", "/var/lib/ime", "/var/lib/ime"),
        ("IME_RECORDER_STORAGE__FLUSH_INTERVAL_SECONDS", "0.5", 0.5),
        ("IME_RECORDER_STORAGE__PARTITION_TIMEZONE", "UTC", "UTC"),
        ("IME_RECORDER_STORAGE__MAX_ROWS_PER_FILE", "1000", 1000),
        ("IME_RECORDER_STORAGE__COMPRESSION_LEVEL", "22", 22),
        ("IME_RECORDER_STORAGE__FSYNC", "false", False),
        ("IME_RECORDER_STORAGE__FSYNC", "0", False),
        ("IME_RECORDER_STORAGE__FSYNC", "no", False),
        ("IME_RECORDER_STORAGE__FSYNC", "OFF", False),
        ("IME_RECORDER_STORAGE__FSYNC", "true", True),
        ("IME_RECORDER_STORAGE__FSYNC", "1", True),
        ("IME_RECORDER_STORAGE__FSYNC", " Yes ", True),
        ("IME_RECORDER_STORAGE__FSYNC", "on", True),
        ("IME_RECORDER_LOG__LEVEL", "debug", "debug"),
        ("IME_RECORDER_LOG__FORMAT", "json", "json"),
    ],
)
def test_environment_override(name: str, text: str, value: Any) -> None:
    """IME_RECORDER_<SECTION>__<KEY> overrides the file's key with a value of the key's type."""
    config = load_config(SHIPPED, {name: text})
    section, _, field = name.removeprefix("IME_RECORDER_").lower().partition("__")

    loaded = getattr(getattr(config, section), field)

    assert loaded == value
    assert type(loaded) is type(value)


def test_environment_override_leaves_other_keys_of_the_file() -> None:
    """An override changes its key only; the file's other keys in that section stay."""
    config = load_config(SHIPPED, {"IME_RECORDER_FEED__SUBSCRIBE_BY": "name"})

    assert (config.feed.subscribe_by, config.feed.contracts) == ("name", ("1001", "1002"))
    assert config.storage == load_config(SHIPPED, {}).storage


def test_environment_ignores_other_variables() -> None:
    """Variables without the IME_RECORDER_ prefix are not read."""
    environ = {**ONE_CONTRACT, "PATH": "/bin", "IME_RECORDERX": "1", "HEDGETECH_TOKEN": TOKEN}

    assert load_config(None, environ) == Config(feed=FeedConfig(contracts=("1001",)))


# --------------------------------------------------------------------------- wrong values


def env(name: str, text: str) -> dict[str, str]:
    """ONE_CONTRACT plus one variable."""
    return {**ONE_CONTRACT, name: text}


@pytest.mark.parametrize(
    ("toml", "environ", "names"),
    [
        pytest.param('[feed]\ncontracts = ["1"]\nnope = 1\n', {}, ["feed", "nope"], id="toml-key"),
        pytest.param('[feed]\ncontracts = ["1"]\n[nope]\nx = 1\n', {}, ["nope"], id="toml-sect"),
        pytest.param(
            "", env("IME_RECORDER_FEED__NOPE", "1"), ["IME_RECORDER_FEED__NOPE", "feed.nope"],
            id="env-key",
        ),
        pytest.param("", env("IME_RECORDER_NOPE__X", "1"), ["IME_RECORDER_NOPE__X"], id="env-sect"),
        pytest.param("", env("IME_RECORDER_FEED_X", "1"), ["IME_RECORDER_FEED_X"], id="env-form"),
        pytest.param("", env("IME_RECORDER_FEED__SUBSCRIBE_BY", "both"), ["feed.subscribe_by"]),
        pytest.param('[feed]\ncontracts = ["1"]\nsubscribe_by = "ID"\n', {}, ["feed.subscribe_by"]),
        pytest.param("", env("IME_RECORDER_FEED__BASE_URL", "https://x/ime"), ["feed.base_url"]),
        pytest.param("", env("IME_RECORDER_FEED__BASE_URL", "x.ir/ime"), ["feed.base_url"]),
        pytest.param("", env("IME_RECORDER_FEED__BASE_URL", "ws://"), ["feed.base_url"]),
        pytest.param("", env("IME_RECORDER_AUTH__TOKEN_URL", "ftp://x/t"), ["auth.token_url"]),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__PARTITION_TIMEZONE", "Mars/Olympus"),
            ["storage.partition_timezone"], id="unknown-zone",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__PARTITION_TIMEZONE", "../etc/zone"),
            ["storage.partition_timezone"], id="path-zone",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__PARTITION_TIMEZONE", "Asia"),
            ["storage.partition_timezone"], id="zone-folder",
        ),
        pytest.param(
            "", env("IME_RECORDER_FEED__NAIVE_TIMESTAMP_TIMEZONE", "+03:30"),
            ["feed.naive_timestamp_timezone"], id="offset-zone",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__FLUSH_INTERVAL_SECONDS", "0"),
            ["storage.flush_interval_seconds"], id="zero-flush-interval",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__FLUSH_INTERVAL_SECONDS", "-1.5"),
            ["storage.flush_interval_seconds"], id="negative-flush-interval",
        ),
        pytest.param(
            "[storage]\nflush_interval_seconds = nan\n", ONE_CONTRACT,
            ["storage.flush_interval_seconds"], id="nan-flush-interval",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__FLUSH_INTERVAL_SECONDS", "soon"),
            ["storage.flush_interval_seconds"], id="text-flush-interval",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__MAX_ROWS_PER_FILE", "0"), ["storage.max_rows_per_file"],
            id="zero-rows-per-file",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__MAX_ROWS_PER_FILE", "1.5"),
            ["storage.max_rows_per_file"], id="fractional-rows-per-file",
        ),
        pytest.param(
            "", env("IME_RECORDER_STORAGE__COMPRESSION_LEVEL", "23"), ["storage.compression_level"],
            id="compression-level",
        ),
        pytest.param("", env("IME_RECORDER_STORAGE__FSYNC", "maybe"), ["storage.fsync"], id="bool"),
        pytest.param("", env("IME_RECORDER_LOG__LEVEL", "verbose"), ["log.level"], id="log-level"),
        pytest.param("", {}, ["feed.contracts"], id="no-contracts"),
        pytest.param("[feed]\ncontracts = []\n", {}, ["feed.contracts"], id="empty-list"),
        pytest.param("", {"IME_RECORDER_FEED__CONTRACTS": " , "}, ["feed.contracts"], id="blank"),
        pytest.param("", {"IME_RECORDER_FEED__CONTRACTS": "1,1"}, ["feed.contracts"], id="twice"),
        pytest.param('[feed]\ncontracts = "1001"\n', {}, ["feed.contracts"], id="not-a-list"),
        pytest.param("[feed\n", {}, ["not valid TOML"], id="bad-toml"),
        pytest.param("a = 1\na = 2\n", {}, ["not valid TOML"], id="duplicate-toml-key"),
    ],
)  # fmt: skip
def test_wrong_config_raises_one_line_naming_the_key(
    tmp_path: Path, toml: str, environ: dict[str, str], names: list[str]
) -> None:
    """A wrong key or value raises ConfigError with one line that names the key."""
    message = config_error(toml_file(tmp_path, toml), environ)

    for name in names:
        assert name in message


def test_missing_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    """A config path that does not exist raises ConfigError naming that path."""
    missing = tmp_path / "nowhere.toml"

    message = config_error(missing, ONE_CONTRACT)

    assert message == f"config file not found: {missing}"


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("environ", "username", "password", "token"),
    [
        ({"HEDGETECH_USERNAME": "ali", "HEDGETECH_PASSWORD": PASSWORD}, "ali", PASSWORD, None),
        ({"HEDGETECH_TOKEN": TOKEN}, None, None, TOKEN),
        ({"HEDGETECH_TOKEN": TOKEN, "HEDGETECH_USERNAME": "ali"}, "ali", None, TOKEN),
        (
            {"HEDGETECH_TOKEN": TOKEN, "HEDGETECH_USERNAME": "ali", "HEDGETECH_PASSWORD": PASSWORD},
            "ali",
            None,
            TOKEN,
        ),
    ],
)
def test_credentials_from_the_environment(
    environ: dict[str, str], username: str | None, password: str | None, token: str | None
) -> None:
    """A username with a password, or a token (which wins), are read from the environment."""
    credentials = load_credentials(environ)

    assert credentials.username == username
    assert (credentials.password and credentials.password.reveal()) == password
    assert (credentials.token and credentials.token.reveal()) == token
    assert credentials.secrets() == [v for v in (password, token) if v is not None]


@pytest.mark.parametrize(
    ("files", "plain", "username", "password", "token"),
    [
        (
            {"HEDGETECH_USERNAME": "ali\n", "HEDGETECH_PASSWORD": f"{PASSWORD}\n"},
            {},
            "ali",
            PASSWORD,
            None,
        ),
        ({"HEDGETECH_PASSWORD": PASSWORD}, {"HEDGETECH_USERNAME": "ali"}, "ali", PASSWORD, None),
        ({"HEDGETECH_TOKEN": f"  {TOKEN}\n"}, {}, None, None, TOKEN),
    ],
)
def test_credentials_from_files(
    tmp_path: Path,
    files: dict[str, str],
    plain: dict[str, str],
    username: str | None,
    password: str | None,
    token: str | None,
) -> None:
    """NAME_FILE names a file whose stripped content is the value (Docker secrets)."""
    environ = dict(plain)
    for name, content in files.items():
        secret = tmp_path / name.lower()
        secret.write_text(content, encoding="utf-8")
        environ[f"{name}_FILE"] = str(secret)

    credentials = load_credentials(environ)

    assert credentials.username == username
    assert (credentials.password and credentials.password.reveal()) == password
    assert (credentials.token and credentials.token.reveal()) == token


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({}, "HEDGETECH_USERNAME"),
        ({"HEDGETECH_USERNAME": "ali"}, "HEDGETECH_PASSWORD"),
        ({"HEDGETECH_USERNAME": "ali", "HEDGETECH_PASSWORD": ""}, "HEDGETECH_PASSWORD"),
        ({"HEDGETECH_PASSWORD": PASSWORD}, "HEDGETECH_USERNAME"),
        ({"HEDGETECH_TOKEN": "", "HEDGETECH_PASSWORD": PASSWORD}, "HEDGETECH_USERNAME"),
        (
            {"HEDGETECH_PASSWORD": PASSWORD, "HEDGETECH_PASSWORD_FILE": "/run/secrets/pw"},
            "HEDGETECH_PASSWORD_FILE",
        ),
        ({"HEDGETECH_TOKEN_FILE": "/nonexistent/ime/token"}, "HEDGETECH_TOKEN_FILE"),
    ],
)
def test_missing_or_partial_credentials_name_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    """Missing or half-given credentials raise ConfigError naming the variable, never a secret."""
    with pytest.raises(ConfigError) as caught:
        load_credentials(environ)

    message = str(caught.value)
    assert variable in message
    assert PASSWORD not in message
    assert "\n" not in message


def test_empty_secret_file_counts_as_missing(tmp_path: Path) -> None:
    """A token file holding only whitespace is no token, so credentials are missing."""
    empty = tmp_path / "token"
    empty.write_text("\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="HEDGETECH_TOKEN"):
        load_credentials({"HEDGETECH_TOKEN_FILE": str(empty)})


def test_secret_file_that_cannot_be_read_is_named_not_shown(tmp_path: Path) -> None:
    """An unreadable *_FILE (here a directory) raises ConfigError naming the variable."""
    with pytest.raises(ConfigError) as caught:
        load_credentials({"HEDGETECH_USERNAME": "ali", "HEDGETECH_PASSWORD_FILE": str(tmp_path)})

    assert str(caught.value).startswith(f"HEDGETECH_PASSWORD_FILE: cannot read {tmp_path}")


@pytest.mark.parametrize(
    "environ",
    [
        {"HEDGETECH_USERNAME": "ali", "HEDGETECH_PASSWORD": PASSWORD},
        {"HEDGETECH_TOKEN": TOKEN},
    ],
)
def test_credentials_never_show_their_secrets(environ: dict[str, str]) -> None:
    """repr and str of credentials and of their secrets never contain the password or token."""
    credentials = load_credentials(environ)
    shown = [
        repr(credentials),
        str(credentials),
        repr(credentials.password),
        repr(credentials.token),
    ]
    shown += [str(credentials.password), str(credentials.token)]

    for text in shown:
        assert PASSWORD not in text
        assert TOKEN not in text
    assert "***" in repr(credentials)


def test_credentials_struct_with_secrets_hides_them() -> None:
    """A Credentials built directly still hides its password in repr."""
    credentials = Credentials(username="ali", password=Secret(PASSWORD))

    assert repr(credentials) == "Credentials(username='ali', password=Secret('***'), token=None)"


@pytest.mark.parametrize(
    "environ",
    [
        {"IME_RECORDER_AUTH__PASSWORD": PASSWORD},
        {"IME_RECORDER_AUTH__TOKEN": TOKEN},
    ],
)
def test_secret_put_in_config_environment_is_not_echoed(environ: dict[str, str]) -> None:
    """A credential wrongly given as a config override is refused without showing its value."""
    message = config_error(None, {**ONE_CONTRACT, **environ})

    assert PASSWORD not in message
    assert TOKEN not in message
    assert message.startswith(next(iter(environ)))
