"""Tests for reading and validating settings with vodq.config.load_settings."""

from __future__ import annotations

import os
import socket
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from vodq.config import KNOWN_VARIABLES, load_settings
from vodq.errors import ConfigError

HEADER = "invalid configuration:\n  "


def _config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ, env_file=None)
    return str(caught.value)


def test_defaults_max_concurrent_downloads() -> None:
    assert load_settings({}, env_file=None).max_concurrent_downloads == 1


def test_defaults_download_max_attempts() -> None:
    assert load_settings({}, env_file=None).download_max_attempts == 5


def test_defaults_download_backoff_base() -> None:
    assert load_settings({}, env_file=None).download_backoff_base == 2.0


def test_defaults_processing_retry_cooldown() -> None:
    assert load_settings({}, env_file=None).processing_retry_cooldown == 600.0


def test_defaults_http_address() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.http_host == "0.0.0.0"
    assert settings.http_port == 8080


def test_defaults_vod_url_template() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.vod_url_template == "https://www.twitch.tv/videos/{id}"


def test_defaults_no_rate_limit() -> None:
    assert load_settings({}, env_file=None).download_rate_limit is None


def test_defaults_no_admin_credentials() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.admin_username is None
    assert settings.admin_password is None
    assert settings.admin_token is None


def test_defaults_remaining_values() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.upload_max_attempts == 5
    assert settings.upload_backoff_base == 2.0
    assert settings.circuit_failure_threshold == 5
    assert settings.circuit_open_cooldown == 300.0
    assert settings.trusted_proxies == ()
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"
    assert settings.lease_duration == 30.0
    assert settings.socket_timeout == 20.0


def test_defaults_worker_id_host_and_pid() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.worker_id == f"{socket.gethostname()}-{os.getpid()}"


def test_defaults_db_dsn_sqlite_in_data_dir() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.data_dir == Path("data")
    assert settings.db_dsn == "sqlite:///data/vodq.db"


def test_db_dsn_follows_data_dir(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path / "d")}, env_file=None)

    assert settings.db_dsn == f"sqlite:///{tmp_path / 'd' / 'vodq.db'}"
    assert settings.sqlite_path == tmp_path / "d" / "vodq.db"


@pytest.mark.parametrize(
    ("name", "value", "attribute", "expected"),
    [
        pytest.param(
            "MAX_CONCURRENT_DOWNLOADS",
            "3",
            "max_concurrent_downloads",
            3,
            id="concurrency",
        ),
        pytest.param(
            "MAX_CONCURRENT_DOWNLOADS",
            " 3 ",
            "max_concurrent_downloads",
            3,
            id="concurrency-whitespace",
        ),
        pytest.param(
            "MAX_CONCURRENT_DOWNLOADS",
            "",
            "max_concurrent_downloads",
            1,
            id="concurrency-empty-is-default",
        ),
        pytest.param(
            "DOWNLOAD_RATE_LIMIT",
            "1.5M",
            "download_rate_limit",
            1572864,
            id="rate-mebi",
        ),
        pytest.param(
            "DOWNLOAD_RATE_LIMIT", "500K", "download_rate_limit", 512000, id="rate-kibi"
        ),
        pytest.param(
            "DOWNLOAD_RATE_LIMIT",
            "100000",
            "download_rate_limit",
            100000,
            id="rate-bytes",
        ),
        pytest.param(
            "DOWNLOAD_RATE_LIMIT",
            "64K",
            "download_rate_limit",
            65536,
            id="rate-minimum",
        ),
        pytest.param(
            "DOWNLOAD_MAX_ATTEMPTS", "10", "download_max_attempts", 10, id="attempts"
        ),
        pytest.param(
            "DOWNLOAD_BACKOFF_BASE",
            "500ms",
            "download_backoff_base",
            0.5,
            id="backoff-milliseconds",
        ),
        pytest.param(
            "DOWNLOAD_BACKOFF_BASE",
            "5",
            "download_backoff_base",
            5.0,
            id="backoff-bare",
        ),
        pytest.param("UPLOAD_MAX_ATTEMPTS", "3", "upload_max_attempts", 3, id="upload"),
        pytest.param(
            "UPLOAD_BACKOFF_BASE",
            "1m",
            "upload_backoff_base",
            60.0,
            id="upload-backoff",
        ),
        pytest.param(
            "PROCESSING_RETRY_COOLDOWN",
            "600",
            "processing_retry_cooldown",
            600.0,
            id="cooldown-bare-number",
        ),
        pytest.param(
            "PROCESSING_RETRY_COOLDOWN",
            "1h30m",
            "processing_retry_cooldown",
            5400.0,
            id="cooldown-parts",
        ),
        pytest.param(
            "PROCESSING_RETRY_COOLDOWN",
            "0s",
            "processing_retry_cooldown",
            0.0,
            id="cooldown-zero",
        ),
        pytest.param(
            "CIRCUIT_FAILURE_THRESHOLD",
            "2",
            "circuit_failure_threshold",
            2,
            id="circuit-threshold",
        ),
        pytest.param(
            "CIRCUIT_OPEN_COOLDOWN",
            "10m",
            "circuit_open_cooldown",
            600.0,
            id="circuit-cooldown",
        ),
        pytest.param(
            "DATA_DIR",
            "/var/lib/vodq",
            "data_dir",
            Path("/var/lib/vodq"),
            id="data-dir",
        ),
        pytest.param(
            "DB_DSN",
            "sqlite:////var/lib/vodq/queue.db",
            "db_dsn",
            "sqlite:////var/lib/vodq/queue.db",
            id="dsn-sqlite",
        ),
        pytest.param(
            "DB_DSN",
            "postgres://vod:pw@127.0.0.1:5432/vod",
            "db_dsn",
            "postgresql+psycopg://vod:pw@127.0.0.1:5432/vod",
            id="dsn-postgres-normalised",
        ),
        pytest.param(
            "DB_DSN",
            "postgresql://vod@127.0.0.1/vod",
            "db_dsn",
            "postgresql+psycopg://vod@127.0.0.1/vod",
            id="dsn-postgresql-normalised",
        ),
        pytest.param(
            "DB_DSN",
            "postgresql+psycopg://vod@127.0.0.1/vod",
            "db_dsn",
            "postgresql+psycopg://vod@127.0.0.1/vod",
            id="dsn-psycopg-unchanged",
        ),
        pytest.param(
            "VOD_URL_TEMPLATE",
            "https://example.invalid/v/{id}",
            "vod_url_template",
            "https://example.invalid/v/{id}",
            id="url-template",
        ),
        pytest.param("ADMIN_TOKEN", "t0ken", "admin_token", "t0ken", id="token-alone"),
        pytest.param("LOG_LEVEL", "debug", "log_level", "DEBUG", id="log-level-lower"),
        pytest.param("LOG_LEVEL", "WARNING", "log_level", "WARNING", id="log-level"),
        pytest.param("LOG_FORMAT", "JSON", "log_format", "json", id="log-format-upper"),
        pytest.param("LEASE_DURATION", "3s", "lease_duration", 3.0, id="lease-minimum"),
        pytest.param("LEASE_DURATION", "1m", "lease_duration", 60.0, id="lease-minute"),
        pytest.param(
            "DOWNLOAD_SOCKET_TIMEOUT", "5s", "socket_timeout", 5.0, id="socket-timeout"
        ),
        pytest.param("WORKER_ID", "worker-1", "worker_id", "worker-1", id="worker-id"),
        pytest.param(
            "HLS_CONCURRENT_FRAGMENTS",
            "16",
            "hls_concurrent_fragments",
            16,
            id="fragments-most",
        ),
        pytest.param(
            "HLS_CONCURRENT_FRAGMENTS",
            "1",
            "hls_concurrent_fragments",
            1,
            id="fragments-one",
        ),
    ],
)
def test_load_settings_valid_variable(
    name: str, value: str, attribute: str, expected: Any
) -> None:
    settings = load_settings({name: value}, env_file=None)

    assert getattr(settings, attribute) == expected


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        pytest.param("127.0.0.1:9000", "127.0.0.1", 9000, id="ipv4"),
        pytest.param("localhost:1", "localhost", 1, id="name-lowest-port"),
        pytest.param(":65535", "0.0.0.0", 65535, id="all-interfaces-highest-port"),
        pytest.param("[::1]:9000", "::1", 9000, id="bracketed-ipv6"),
        pytest.param("[::]:8081", "::", 8081, id="ipv6-all-interfaces"),
    ],
)
def test_http_addr_host_and_port(value: str, host: str, port: int) -> None:
    settings = load_settings({"HTTP_ADDR": value}, env_file=None)

    assert settings.http_host == host
    assert settings.http_port == port


@pytest.mark.parametrize(
    ("value", "networks"),
    [
        pytest.param(
            "127.0.0.1,10.0.0.0/8",
            ("127.0.0.1/32", "10.0.0.0/8"),
            id="address-and-network",
        ),
        pytest.param(
            " 127.0.0.1 , , 10.0.0.0/8 ,",
            ("127.0.0.1/32", "10.0.0.0/8"),
            id="spaces-and-empty-parts",
        ),
        pytest.param("10.1.2.3/8", ("10.0.0.0/8",), id="host-bits-cleared"),
        pytest.param("::1,fd00::/8", ("::1/128", "fd00::/8"), id="ipv6"),
        pytest.param(",", (), id="only-separators"),
    ],
)
def test_trusted_proxies_parsed(value: str, networks: tuple[str, ...]) -> None:
    settings = load_settings({"TRUSTED_PROXIES": value}, env_file=None)

    assert settings.trusted_proxies == tuple(ip_network(text) for text in networks)


INVALID_VARIABLES = [
    pytest.param(
        "HLS_CONCURRENT_FRAGMENTS",
        "0",
        "HLS_CONCURRENT_FRAGMENTS='0' is invalid: must be at least 1; "
        "use for example 4",
        id="fragments-zero",
    ),
    pytest.param(
        "HLS_CONCURRENT_FRAGMENTS",
        "17",
        "HLS_CONCURRENT_FRAGMENTS='17' is invalid: must be at most 16; "
        "use for example 4",
        id="fragments-too-many",
    ),
    pytest.param(
        "MAX_CONCURRENT_DOWNLOADS",
        "0",
        "MAX_CONCURRENT_DOWNLOADS='0' is invalid: must be at least 1; "
        "use for example 3",
        id="concurrency-zero",
    ),
    pytest.param(
        "MAX_CONCURRENT_DOWNLOADS",
        "-2",
        "MAX_CONCURRENT_DOWNLOADS='-2' is invalid: must be at least 1; "
        "use for example 3",
        id="concurrency-negative",
    ),
    pytest.param(
        "MAX_CONCURRENT_DOWNLOADS",
        "99999999999999999999",
        "MAX_CONCURRENT_DOWNLOADS='99999999999999999999' is invalid: must be at "
        "most 1000000; use for example 3",
        id="concurrency-huge",
    ),
    pytest.param(
        "DOWNLOAD_MAX_ATTEMPTS",
        "1000001",
        "DOWNLOAD_MAX_ATTEMPTS='1000001' is invalid: must be at most 1000000; "
        "use for example 5",
        id="attempts-huge",
    ),
    pytest.param(
        "MAX_CONCURRENT_DOWNLOADS",
        "three",
        "MAX_CONCURRENT_DOWNLOADS='three' is invalid: not a whole number; "
        "use for example 3",
        id="concurrency-word",
    ),
    pytest.param(
        "MAX_CONCURRENT_DOWNLOADS",
        "1.5",
        "MAX_CONCURRENT_DOWNLOADS='1.5' is invalid: not a whole number; "
        "use for example 3",
        id="concurrency-fraction",
    ),
    pytest.param(
        "MAX_CONCURRENT_DOWNLOADS",
        " 0 ",
        "MAX_CONCURRENT_DOWNLOADS=' 0 ' is invalid: must be at least 1; "
        "use for example 3",
        id="concurrency-shows-raw-value",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "fast",
        "DOWNLOAD_RATE_LIMIT='fast' is invalid: not a rate (bytes per second "
        "with an optional K, M or G); use for example 1.5M",
        id="rate-word",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "1.5 M",
        "DOWNLOAD_RATE_LIMIT='1.5 M' is invalid: not a rate (bytes per second "
        "with an optional K, M or G); use for example 1.5M",
        id="rate-space",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "0",
        "DOWNLOAD_RATE_LIMIT='0' is invalid: must be at least 64K, the lowest rate "
        "that vodq holds within 5%; use 'none' or unset it for no limit; use for "
        "example 1.5M",
        id="rate-zero",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "0.4",
        "DOWNLOAD_RATE_LIMIT='0.4' is invalid: must be at least 64K, the lowest "
        "rate that vodq holds within 5%; use 'none' or unset it for no limit; use "
        "for example 1.5M",
        id="rate-rounds-to-zero",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "63K",
        "DOWNLOAD_RATE_LIMIT='63K' is invalid: must be at least 64K, the lowest "
        "rate that vodq holds within 5%; use 'none' or unset it for no limit; use "
        "for example 1.5M",
        id="rate-below-minimum",
    ),
    pytest.param(
        "DOWNLOAD_TOTAL_RATE_LIMIT",
        "100K",
        "DOWNLOAD_TOTAL_RATE_LIMIT='100K' is invalid: must be at least 128K, the "
        "lowest rate that vodq holds within 5%; use 'none' or unset it for no "
        "limit; use for example 10M",
        id="total-rate-below-minimum",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "101G",
        "DOWNLOAD_RATE_LIMIT='101G' is invalid: must be at most 100G; use for "
        "example 1.5M",
        id="rate-above-maximum",
    ),
    pytest.param(
        "DOWNLOAD_RATE_LIMIT",
        "\uff15M",
        "DOWNLOAD_RATE_LIMIT='\uff15M' is invalid: not a rate (bytes per second "
        "with an optional K, M or G); use for example 1.5M",
        id="rate-full-width-digit",
    ),
    pytest.param(
        "DOWNLOAD_MAX_ATTEMPTS",
        "0",
        "DOWNLOAD_MAX_ATTEMPTS='0' is invalid: must be at least 1; use for example 5",
        id="attempts-zero",
    ),
    pytest.param(
        "DOWNLOAD_BACKOFF_BASE",
        "0s",
        "DOWNLOAD_BACKOFF_BASE='0s' is invalid: must be greater than zero; "
        "use for example 2s",
        id="backoff-zero",
    ),
    pytest.param(
        "DOWNLOAD_BACKOFF_BASE",
        "2 seconds",
        "DOWNLOAD_BACKOFF_BASE='2 seconds' is invalid: not a duration (a number "
        "of seconds, or parts like 2s, 5m, 1h30m); use for example 2s",
        id="backoff-words",
    ),
    pytest.param(
        "DOWNLOAD_BACKOFF_BASE",
        "-5s",
        "DOWNLOAD_BACKOFF_BASE='-5s' is invalid: not a duration (a number "
        "of seconds, or parts like 2s, 5m, 1h30m); use for example 2s",
        id="backoff-negative",
    ),
    pytest.param(
        "UPLOAD_MAX_ATTEMPTS",
        "many",
        "UPLOAD_MAX_ATTEMPTS='many' is invalid: not a whole number; use for example 5",
        id="upload-attempts-word",
    ),
    pytest.param(
        "UPLOAD_BACKOFF_BASE",
        "0",
        "UPLOAD_BACKOFF_BASE='0' is invalid: must be greater than zero; "
        "use for example 2s",
        id="upload-backoff-zero",
    ),
    pytest.param(
        "PROCESSING_RETRY_COOLDOWN",
        "10 minutes",
        "PROCESSING_RETRY_COOLDOWN='10 minutes' is invalid: not a duration (a "
        "number of seconds, or parts like 2s, 5m, 1h30m); use for example 600s",
        id="cooldown-words",
    ),
    pytest.param(
        "PROCESSING_RETRY_COOLDOWN",
        "-1s",
        "PROCESSING_RETRY_COOLDOWN='-1s' is invalid: not a duration (a "
        "number of seconds, or parts like 2s, 5m, 1h30m); use for example 600s",
        id="cooldown-negative",
    ),
    pytest.param(
        "CIRCUIT_FAILURE_THRESHOLD",
        "0",
        "CIRCUIT_FAILURE_THRESHOLD='0' is invalid: must be at least 1; "
        "use for example 5",
        id="circuit-threshold-zero",
    ),
    pytest.param(
        "CIRCUIT_OPEN_COOLDOWN",
        "0s",
        "CIRCUIT_OPEN_COOLDOWN='0s' is invalid: must be greater than zero; "
        "use for example 5m",
        id="circuit-cooldown-zero",
    ),
    pytest.param(
        "DB_DSN",
        "mysql://127.0.0.1/vod",
        "DB_DSN='mysql://127.0.0.1/vod' is invalid: only postgres://... and "
        "sqlite:///PATH are supported; use for example "
        "postgres://vod:secret@127.0.0.1:5432/vod",
        id="dsn-mysql",
    ),
    pytest.param(
        "DB_DSN",
        "sqlite://vodq.db",
        "DB_DSN='sqlite://vodq.db' is invalid: only postgres://... and "
        "sqlite:///PATH are supported; use for example "
        "postgres://vod:secret@127.0.0.1:5432/vod",
        id="dsn-sqlite-two-slashes",
    ),
    pytest.param(
        "HTTP_ADDR",
        "8080",
        "HTTP_ADDR='8080' is invalid: not HOST:PORT; use for example :8080",
        id="addr-no-colon",
    ),
    pytest.param(
        "HTTP_ADDR",
        "localhost:http",
        "HTTP_ADDR='localhost:http' is invalid: the port is not a number; "
        "use for example :8080",
        id="addr-port-word",
    ),
    pytest.param(
        "HTTP_ADDR",
        ":0",
        "HTTP_ADDR=':0' is invalid: the port must be between 1 and 65535; "
        "use for example :8080",
        id="addr-port-zero",
    ),
    pytest.param(
        "HTTP_ADDR",
        ":65536",
        "HTTP_ADDR=':65536' is invalid: the port must be between 1 and 65535; "
        "use for example :8080",
        id="addr-port-too-high",
    ),
    pytest.param(
        "VOD_URL_TEMPLATE",
        "https://www.twitch.tv/videos/",
        "VOD_URL_TEMPLATE='https://www.twitch.tv/videos/' is invalid: it must "
        "contain {id}; use for example https://www.twitch.tv/videos/{id}",
        id="template-no-placeholder",
    ),
    pytest.param(
        "VOD_URL_TEMPLATE",
        "https://example.invalid/{channel}/{id}",
        "VOD_URL_TEMPLATE='https://example.invalid/{channel}/{id}' is invalid: "
        "only the placeholder {id} is allowed; use for example "
        "https://www.twitch.tv/videos/{id}",
        id="template-other-placeholder",
    ),
    pytest.param(
        "VOD_URL_TEMPLATE",
        "https://example.invalid/{id}{",
        "VOD_URL_TEMPLATE='https://example.invalid/{id}{' is invalid: "
        "only the placeholder {id} is allowed; use for example "
        "https://www.twitch.tv/videos/{id}",
        id="template-unclosed-brace",
    ),
    pytest.param(
        "TRUSTED_PROXIES",
        "127.0.0.1,proxy.local",
        "TRUSTED_PROXIES='127.0.0.1,proxy.local' is invalid: 'proxy.local' is "
        "not an IP address or network; use for example 127.0.0.1,10.0.0.0/8",
        id="proxies-host-name",
    ),
    pytest.param(
        "TRUSTED_PROXIES",
        "10.0.0.0/33",
        "TRUSTED_PROXIES='10.0.0.0/33' is invalid: '10.0.0.0/33' is "
        "not an IP address or network; use for example 127.0.0.1,10.0.0.0/8",
        id="proxies-prefix-too-long",
    ),
    pytest.param(
        "LOG_LEVEL",
        "trace",
        "LOG_LEVEL='trace' is invalid: must be one of DEBUG, INFO, WARNING, ERROR; "
        "use for example INFO",
        id="log-level-unknown",
    ),
    pytest.param(
        "LOG_FORMAT",
        "xml",
        "LOG_FORMAT='xml' is invalid: must be one of text, json; use for example json",
        id="log-format-unknown",
    ),
    pytest.param(
        "LEASE_DURATION",
        "2s",
        "LEASE_DURATION='2s' is invalid: must be at least 3s, so that heartbeats "
        "can renew it; use for example 30s",
        id="lease-too-short",
    ),
    pytest.param(
        "LEASE_DURATION",
        "0",
        "LEASE_DURATION='0' is invalid: must be greater than zero; use for example 30s",
        id="lease-zero",
    ),
    pytest.param(
        "DOWNLOAD_SOCKET_TIMEOUT",
        "0s",
        "DOWNLOAD_SOCKET_TIMEOUT='0s' is invalid: must be greater than zero; "
        "use for example 20s",
        id="socket-timeout-zero",
    ),
    pytest.param(
        "WORKER_ID",
        "worker\t1",
        "WORKER_ID='worker\\t1' is invalid: must be printable and at most "
        "200 characters; use for example worker-1",
        id="worker-id-tab",
    ),
    pytest.param(
        "WORKER_ID",
        "w" * 201,
        f"WORKER_ID='{'w' * 201}' is invalid: must be printable and at most "
        "200 characters; use for example worker-1",
        id="worker-id-too-long",
    ),
]


@pytest.mark.parametrize(("name", "value", "message"), INVALID_VARIABLES)
def test_load_settings_invalid_variable(name: str, value: str, message: str) -> None:
    assert _config_error({name: value}) == HEADER + message


def test_config_error_lists_every_invalid_variable() -> None:
    message = _config_error(
        {"MAX_CONCURRENT_DOWNLOADS": "0", "LOG_LEVEL": "trace", "HTTP_ADDR": "8080"}
    )

    lines = message.split("\n  ")
    assert lines[0] == "invalid configuration:"
    assert sorted(lines[1:]) == [
        "HTTP_ADDR='8080' is invalid: not HOST:PORT; use for example :8080",
        "LOG_LEVEL='trace' is invalid: must be one of DEBUG, INFO, WARNING, ERROR; "
        "use for example INFO",
        "MAX_CONCURRENT_DOWNLOADS='0' is invalid: must be at least 1; "
        "use for example 3",
    ]


def test_config_error_includes_admin_pair_error() -> None:
    message = _config_error({"ADMIN_USERNAME": "admin", "LOG_FORMAT": "xml"})

    assert len(message.split("\n  ")) == 3


def test_env_file_values_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_CONCURRENT_DOWNLOADS=4\nLOG_LEVEL=debug\n")

    settings = load_settings({}, env_file=env_file)

    assert settings.max_concurrent_downloads == 4
    assert settings.log_level == "DEBUG"


def test_env_file_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_CONCURRENT_DOWNLOADS=4\nLOG_LEVEL=debug\n")

    settings = load_settings({"MAX_CONCURRENT_DOWNLOADS": "2"}, env_file=env_file)

    assert settings.max_concurrent_downloads == 2
    assert settings.log_level == "DEBUG"


def test_env_file_quotes_and_comments(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# vodq settings\n"
        'VOD_URL_TEMPLATE="https://example.invalid/v/{id}"\n'
        "export DOWNLOAD_RATE_LIMIT=500K\n"
    )

    settings = load_settings({}, env_file=env_file)

    assert settings.vod_url_template == "https://example.invalid/v/{id}"
    assert settings.download_rate_limit == 512000


def test_env_file_invalid_value_reported(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_CONCURRENT_DOWNLOADS=0\n")

    with pytest.raises(ConfigError) as caught:
        load_settings({}, env_file=env_file)

    assert str(caught.value) == (
        HEADER + "MAX_CONCURRENT_DOWNLOADS='0' is invalid: must be at least 1; "
        "use for example 3"
    )


def test_env_file_missing_is_ignored(tmp_path: Path) -> None:
    settings = load_settings({}, env_file=tmp_path / "absent.env")

    assert settings.max_concurrent_downloads == 1


def test_env_file_default_from_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("MAX_CONCURRENT_DOWNLOADS=6\n")
    monkeypatch.chdir(tmp_path)

    settings = load_settings({})

    assert settings.max_concurrent_downloads == 6


def test_env_file_none_skips_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("MAX_CONCURRENT_DOWNLOADS=6\n")
    monkeypatch.chdir(tmp_path)

    settings = load_settings({}, env_file=None)

    assert settings.max_concurrent_downloads == 1


def test_environ_default_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KNOWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAX_CONCURRENT_DOWNLOADS", "7")

    settings = load_settings(env_file=None)

    assert settings.max_concurrent_downloads == 7


def test_admin_basic_pair_accepted() -> None:
    settings = load_settings(
        {"ADMIN_USERNAME": "admin", "ADMIN_PASSWORD": "pw-1"}, env_file=None
    )

    assert settings.admin_username == "admin"
    assert settings.admin_password == "pw-1"


def test_admin_username_without_password_rejected() -> None:
    message = _config_error({"ADMIN_USERNAME": "admin"})

    assert message == HEADER + (
        "ADMIN_USERNAME is set but ADMIN_PASSWORD is not; set both for Basic "
        "auth (for example ADMIN_USERNAME=admin with a long random ADMIN_PASSWORD), "
        "or neither (ADMIN_TOKEN alone is enough for token auth)"
    )


def test_admin_password_without_username_rejected() -> None:
    message = _config_error({"ADMIN_PASSWORD": "hunter2-secret"})

    assert message == HEADER + (
        "ADMIN_PASSWORD is set but ADMIN_USERNAME is not; set both for Basic "
        "auth (for example ADMIN_USERNAME=admin with a long random ADMIN_PASSWORD), "
        "or neither (ADMIN_TOKEN alone is enough for token auth)"
    )


def test_admin_password_error_hides_secret() -> None:
    message = _config_error({"ADMIN_PASSWORD": "hunter2-secret"})

    assert "hunter2-secret" not in message


def test_admin_password_with_token_hides_secret() -> None:
    message = _config_error(
        {"ADMIN_PASSWORD": "hunter2-secret", "ADMIN_TOKEN": "token-secret"}
    )

    assert "hunter2-secret" not in message
    assert "token-secret" not in message


def test_admin_blank_username_counts_unset() -> None:
    message = _config_error({"ADMIN_USERNAME": "   ", "ADMIN_PASSWORD": "pw-1"})

    assert message.startswith(HEADER + "ADMIN_PASSWORD is set but ADMIN_USERNAME")


def test_settings_repr_hides_admin_secrets() -> None:
    settings = load_settings(
        {
            "ADMIN_USERNAME": "admin",
            "ADMIN_PASSWORD": "hunter2-secret",
            "ADMIN_TOKEN": "token-secret",
        },
        env_file=None,
    )

    assert "hunter2-secret" not in repr(settings)
    assert "token-secret" not in repr(settings)


def test_db_dsn_error_hides_password() -> None:
    message = _config_error({"DB_DSN": "mysql://vod:hunter2-secret@127.0.0.1/vod"})

    assert "hunter2-secret" not in message


def test_url_template_attribute_field_rejected() -> None:
    with pytest.raises(ConfigError):
        load_settings(
            {"VOD_URL_TEMPLATE": "https://example.invalid/{id}?t={id.name}"},
            env_file=None,
        )


@pytest.mark.parametrize("word", ["none", "unlimited", "NONE"])
def test_rate_limit_none_means_unlimited(word: str) -> None:
    settings = load_settings({"DOWNLOAD_RATE_LIMIT": word}, env_file=None)
    assert settings.download_rate_limit is None


def test_total_rate_limit_parsed() -> None:
    settings = load_settings({"DOWNLOAD_TOTAL_RATE_LIMIT": "10M"}, env_file=None)
    assert settings.download_total_rate_limit == 10 * 1024 * 1024


@pytest.mark.parametrize(
    "name", ["PROCESSING_RETRY_COOLDOWN", "LEASE_DURATION", "DOWNLOAD_BACKOFF_BASE"]
)
def test_duration_above_a_year_rejected(name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({name: "100000000000000"}, env_file=None)
    assert "must be at most 365d" in str(raised.value)
