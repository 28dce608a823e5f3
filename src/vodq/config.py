"""Settings from the environment and an optional ``.env`` file, validated at start-up.

Every variable is parsed with one grammar (see ``vodq.units``). A value that
does not parse, or that makes no sense (zero concurrency, a negative
duration), stops start-up with a message naming the variable, the value and
a valid example. Nothing is silently replaced by its default.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values

from vodq.errors import ConfigError
from vodq.units import format_rate, parse_duration, parse_rate
from vodq.upload import template
from vodq.upload.command import parse_command

T = TypeVar("T")

# Every environment variable that vodq reads.
KNOWN_VARIABLES = (
    "MAX_CONCURRENT_DOWNLOADS",
    "MAX_DOWNLOADS_PER_WORKER",
    "DOWNLOAD_RATE_LIMIT",
    "DOWNLOAD_TOTAL_RATE_LIMIT",
    "DOWNLOAD_MAX_ATTEMPTS",
    "DOWNLOAD_BACKOFF_BASE",
    "UPLOAD_MAX_ATTEMPTS",
    "UPLOAD_BACKOFF_BASE",
    "UPLOADER",
    "MAX_CONCURRENT_UPLOADS",
    "ARCHIVE_NAME_TEMPLATE",
    "UPLOAD_COMMAND",
    "UPLOAD_COMMAND_TIMEOUT",
    "UPLOAD_RETENTION",
    "YOUTUBE_CREDENTIALS_FILE",
    "YOUTUBE_API_URL",
    "YOUTUBE_PRIVACY",
    "YOUTUBE_TITLE_TEMPLATE",
    "YOUTUBE_DESCRIPTION_TEMPLATE",
    "YOUTUBE_CHUNK_SIZE",
    "YOUTUBE_TIMEOUT",
    "PROCESSING_RETRY_COOLDOWN",
    "CIRCUIT_FAILURE_THRESHOLD",
    "CIRCUIT_OPEN_COOLDOWN",
    "DATA_DIR",
    "DB_DSN",
    "HTTP_ADDR",
    "VOD_URL_TEMPLATE",
    "ADMIN_USERNAME",
    "ADMIN_PASSWORD",
    "ADMIN_TOKEN",
    "TRUSTED_PROXIES",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "LEASE_DURATION",
    "DOWNLOAD_SOCKET_TIMEOUT",
    "DOWNLOAD_STALL_TIMEOUT",
    "HLS_CONCURRENT_FRAGMENTS",
    "MIN_FREE_DISK",
    "WORKER_ID",
    "VODQ_SERVER",
)

# Longest duration any setting accepts, in seconds (365 days): longer ones
# are typing mistakes and would overflow date arithmetic.
MAX_DURATION_S = 365 * 86400.0

# Rate values that mean "no limit", so that a runtime change can lift a limit
# that the environment set.
NO_LIMIT_WORDS = ("none", "unlimited")
# Bounds of DOWNLOAD_RATE_LIMIT and DOWNLOAD_TOTAL_RATE_LIMIT, in bytes per
# second. At lower rates a read block or a connection's first window is a
# large part of a 5 s window. bench/bench_rates.py measured one download
# within 1.6% at 64K but 11% off at 32K, and three pooled downloads within
# 4.1% at 128K but 8.4% off at 64K. Above 100G a value is a typing error.
MIN_RATE = 64 * 1024
MIN_TOTAL_RATE = 128 * 1024
MAX_RATE = 100 * 1024**3

UPLOADERS = ("none", "command", "youtube")
YOUTUBE_PRIVACIES = ("private", "unlisted", "public")
# YouTube's resumable upload accepts chunks in multiples of 256 KiB.
YOUTUBE_CHUNK_UNIT_BYTES = 256 * 1024
DEFAULT_ARCHIVE_NAME_TEMPLATE = "{date} {channel} - {title} [{vod_id}]"
DEFAULT_YOUTUBE_DESCRIPTION = "{channel} {date}\n{source_url}"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    """The configuration in force; durations in seconds, rates in bytes per second."""

    max_concurrent_downloads: int = 1
    max_downloads_per_worker: int | None = None
    download_rate_limit: int | None = None
    download_total_rate_limit: int | None = None
    download_max_attempts: int = 5
    download_backoff_base: float = 2.0
    upload_max_attempts: int = 5
    upload_backoff_base: float = 2.0
    uploader: str = "none"
    max_concurrent_uploads: int = 1
    archive_name_template: str = DEFAULT_ARCHIVE_NAME_TEMPLATE
    # The operator's command as argv, placeholders not yet filled.
    upload_command: tuple[str, ...] = ()
    upload_command_timeout: float = 6 * 3600.0
    # Seconds a confirmed upload's file is kept: None keeps it for ever, 0
    # deletes it right after the upload.
    upload_retention: float | None = None
    youtube_credentials_file: Path | None = None
    youtube_api_url: str = "https://www.googleapis.com"
    youtube_privacy: str = "private"
    youtube_title_template: str = "{title}"
    youtube_description_template: str = DEFAULT_YOUTUBE_DESCRIPTION
    youtube_chunk_bytes: int = 8 * 1024**2
    youtube_timeout: float = 60.0
    processing_retry_cooldown: float = 600.0
    circuit_failure_threshold: int = 5
    circuit_open_cooldown: float = 300.0
    data_dir: Path = Path("data")
    db_dsn: str = field(default="", repr=False)
    http_host: str = "0.0.0.0"  # noqa: S104 - the documented default listens on all interfaces
    http_port: int = 8080
    vod_url_template: str = "https://www.twitch.tv/videos/{id}"
    admin_username: str | None = field(default=None, repr=False)
    admin_password: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    log_level: str = "INFO"
    log_format: str = "text"
    lease_duration: float = 30.0
    socket_timeout: float = 20.0
    stall_timeout: float = 60.0
    hls_concurrent_fragments: int = 4
    min_free_disk: int = 1024**3
    worker_id: str = ""

    @property
    def sqlite_path(self) -> Path:
        """Default database file, used when DB_DSN is not set."""
        return self.data_dir / "vodq.db"


class _Reader:
    """Parse variables from one mapping and collect every error before raising."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.errors: list[str] = []

    def get(self, name: str, parse: Callable[[str], T], default: T, example: str) -> T:
        raw = self.values.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            shown = _redact_dsn(raw) if name == "DB_DSN" else raw
            self.errors.append(
                f"{name}={shown!r} is invalid: {exc}; use for example {example}"
            )
            return default


# Largest count a setting takes (concurrency, attempts, thresholds). Far
# above any real use, it keeps a typo within what SQLite and PostgreSQL
# integers store: the claim binds the concurrency limit as a parameter.
MAX_COUNT = 1_000_000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("not a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    if value > MAX_COUNT:
        raise ValueError(f"must be at most {MAX_COUNT}")
    return value


# Most HLS fragments one download fetches at once. Beyond this a download
# opens more connections to one CDN than it gains in speed.
MAX_CONCURRENT_FRAGMENTS = 16


def _fragment_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_CONCURRENT_FRAGMENTS:
        raise ValueError(f"must be at most {MAX_CONCURRENT_FRAGMENTS}")
    return value


def _positive_duration(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ValueError(
            "not a duration (a number of seconds, or parts like 2s, 5m, 1h30m)"
        ) from None
    if seconds > MAX_DURATION_S:
        raise ValueError("must be at most 365d")
    return seconds


def _rate(text: str, minimum: int = MIN_RATE) -> int:
    try:
        rate = parse_rate(text)
    except ValueError:
        raise ValueError(
            "not a rate (bytes per second with an optional K, M or G)"
        ) from None
    if rate < minimum:
        raise ValueError(
            f"must be at least {format_rate(minimum)}, the lowest rate that "
            "vodq holds within 5%; use 'none' or unset it for no limit"
        )
    if rate > MAX_RATE:
        raise ValueError(f"must be at most {format_rate(MAX_RATE)}")
    return rate


def _rate_or_none(text: str) -> int | None:
    if text.strip().lower() in NO_LIMIT_WORDS:
        return None
    return _rate(text)


def _total_rate_or_none(text: str) -> int | None:
    if text.strip().lower() in NO_LIMIT_WORDS:
        return None
    return _rate(text, MIN_TOTAL_RATE)


def _address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError("not HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("the port is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError("the port must be between 1 and 65535")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ':8080' means every interface
    return host, port


def _url_template(text: str) -> str:
    if "{id}" not in text:
        raise ValueError("it must contain {id}")
    try:
        text.format(id="1")
    except (AttributeError, IndexError, KeyError, ValueError):
        raise ValueError("only the placeholder {id} is allowed") from None
    return text


def _dsn(text: str) -> str:
    if text.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if text.startswith(("postgresql+psycopg://", "sqlite:///")):
        return text
    raise ValueError("only postgres://... and sqlite:///PATH are supported")


def _redact_dsn(text: str) -> str:
    """Replace the password of a DSN with ***, so errors never show it."""
    scheme, sep, rest = text.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return text
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _choice(options: tuple[str, ...], *, upper: bool) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _text(text: str) -> str:
    return text


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> Settings:
    """Build the settings from ``environ`` (default ``os.environ``) over ``env_file``.

    Variables set in the environment win over the file. Raises ConfigError
    listing every invalid variable.
    """
    return settings_from(read_environment(environ, env_file))


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> dict[str, str]:
    """Merge ``env_file`` and ``environ`` (default ``os.environ``); environ wins."""
    values: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        values.update(
            {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        )
    values.update(os.environ if environ is None else environ)
    return values


def variable_name(name: str) -> str:
    """Return the variable that ``name`` spells, in any case and with spaces
    around it.

    Only ASCII names are upper-cased, because str.upper turns some other
    letters into ASCII ones (a dotless i into I).
    """
    name = name.strip()
    return name.upper() if name.isascii() else name


def settings_from(values: Mapping[str, str]) -> Settings:
    """Parse and validate settings; raise ConfigError listing every invalid variable."""
    reader = _Reader(values)
    defaults = Settings()
    host, port = reader.get("HTTP_ADDR", _address, ("0.0.0.0", 8080), ":8080")  # noqa: S104
    data_dir = reader.get("DATA_DIR", Path, defaults.data_dir, "/var/lib/vodq")
    settings = Settings(
        max_concurrent_downloads=reader.get(
            "MAX_CONCURRENT_DOWNLOADS", _positive_int, 1, "3"
        ),
        max_downloads_per_worker=reader.get(
            "MAX_DOWNLOADS_PER_WORKER", _positive_int, None, "2"
        ),
        download_rate_limit=reader.get(
            "DOWNLOAD_RATE_LIMIT", _rate_or_none, None, "1.5M"
        ),
        download_total_rate_limit=reader.get(
            "DOWNLOAD_TOTAL_RATE_LIMIT", _total_rate_or_none, None, "10M"
        ),
        download_max_attempts=reader.get(
            "DOWNLOAD_MAX_ATTEMPTS", _positive_int, 5, "5"
        ),
        download_backoff_base=reader.get(
            "DOWNLOAD_BACKOFF_BASE", _positive_duration, 2.0, "2s"
        ),
        upload_max_attempts=reader.get("UPLOAD_MAX_ATTEMPTS", _positive_int, 5, "5"),
        upload_backoff_base=reader.get(
            "UPLOAD_BACKOFF_BASE", _positive_duration, 2.0, "2s"
        ),
        processing_retry_cooldown=reader.get(
            "PROCESSING_RETRY_COOLDOWN", _non_negative_duration, 600.0, "600s"
        ),
        circuit_failure_threshold=reader.get(
            "CIRCUIT_FAILURE_THRESHOLD", _positive_int, 5, "5"
        ),
        circuit_open_cooldown=reader.get(
            "CIRCUIT_OPEN_COOLDOWN", _positive_duration, 300.0, "5m"
        ),
        data_dir=data_dir,
        db_dsn=reader.get(
            "DB_DSN",
            _dsn,
            f"sqlite:///{data_dir / 'vodq.db'}",
            "postgres://vod:secret@127.0.0.1:5432/vod",
        ),
        http_host=host,
        http_port=port,
        vod_url_template=reader.get(
            "VOD_URL_TEMPLATE",
            _url_template,
            defaults.vod_url_template,
            "https://www.twitch.tv/videos/{id}",
        ),
        admin_username=reader.get("ADMIN_USERNAME", _text, None, "admin"),
        admin_password=(values.get("ADMIN_PASSWORD") or "").strip() or None,
        admin_token=(values.get("ADMIN_TOKEN") or "").strip() or None,
        trusted_proxies=reader.get(
            "TRUSTED_PROXIES", _networks, (), "127.0.0.1,10.0.0.0/8"
        ),
        log_level=reader.get(
            "LOG_LEVEL", _choice(LOG_LEVELS, upper=True), "INFO", "INFO"
        ),
        log_format=reader.get(
            "LOG_FORMAT", _choice(LOG_FORMATS, upper=False), "text", "json"
        ),
        lease_duration=reader.get("LEASE_DURATION", _lease_duration, 30.0, "30s"),
        socket_timeout=reader.get(
            "DOWNLOAD_SOCKET_TIMEOUT", _positive_duration, 20.0, "20s"
        ),
        stall_timeout=reader.get(
            "DOWNLOAD_STALL_TIMEOUT", _positive_duration, 60.0, "60s"
        ),
        hls_concurrent_fragments=reader.get(
            "HLS_CONCURRENT_FRAGMENTS", _fragment_count, 4, "4"
        ),
        min_free_disk=reader.get("MIN_FREE_DISK", _size, 1024**3, "1G"),
        worker_id=reader.get(
            "WORKER_ID", _worker_id, f"{socket.gethostname()}-{os.getpid()}", "worker-1"
        ),
    )

    # Half of a Basic credential would leave the admin API open or unusable,
    # so it stops start-up like any other invalid value. The secret itself is
    # never part of the message.
    if bool(settings.admin_username) != bool(settings.admin_password):
        missing = "ADMIN_PASSWORD" if settings.admin_username else "ADMIN_USERNAME"
        present = "ADMIN_USERNAME" if settings.admin_username else "ADMIN_PASSWORD"
        reader.errors.append(
            f"{present} is set but {missing} is not; set both for Basic auth "
            "(for example ADMIN_USERNAME=admin with a long random ADMIN_PASSWORD), "
            "or neither (ADMIN_TOKEN alone is enough for token auth)"
        )

    settings = _with_upload_settings(reader, settings)
    _check_uploader(settings, values, reader.errors)

    if reader.errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(reader.errors))
    return settings


def _size(text: str) -> int:
    """A size in bytes, in the rate grammar's units: ``500M``, ``1G``, ``0``."""
    try:
        return parse_rate(text)
    except ValueError:
        raise ValueError(
            "not a size (bytes with an optional K, M or G, such as 1G)"
        ) from None


def _non_negative_duration(text: str) -> float:
    seconds = _duration(text)
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _lease_duration(text: str) -> float:
    seconds = _positive_duration(text)
    if seconds < 3:
        raise ValueError("must be at least 3s, so that heartbeats can renew it")
    return seconds


def _networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            networks.append(ip_network(part.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{part.strip()!r} is not an IP address or network"
            ) from None
    return tuple(networks)


def _worker_id(text: str) -> str:
    if not text.isprintable() or len(text) > 200:
        raise ValueError("must be printable and at most 200 characters")
    return text


def _with_upload_settings(reader: _Reader, settings: Settings) -> Settings:
    """Read the upload stage's variables (see docs/uploads.md) into ``settings``."""
    defaults = Settings()
    no_command: tuple[str, ...] = ()
    return replace(
        settings,
        uploader=reader.get(
            "UPLOADER", _choice(UPLOADERS, upper=False), "none", "command"
        ),
        max_concurrent_uploads=reader.get(
            "MAX_CONCURRENT_UPLOADS", _positive_int, 1, "2"
        ),
        archive_name_template=reader.get(
            "ARCHIVE_NAME_TEMPLATE",
            _template,
            defaults.archive_name_template,
            repr(DEFAULT_ARCHIVE_NAME_TEMPLATE),
        ),
        upload_command=reader.get(
            "UPLOAD_COMMAND",
            parse_command,
            no_command,
            "'rclone copy {path} remote:vods'",
        ),
        upload_command_timeout=reader.get(
            "UPLOAD_COMMAND_TIMEOUT", _positive_duration, 6 * 3600.0, "6h"
        ),
        upload_retention=reader.get(
            "UPLOAD_RETENTION", _retention, None, "keep, delete or 7d"
        ),
        youtube_credentials_file=reader.get(
            "YOUTUBE_CREDENTIALS_FILE", Path, None, "/etc/vodq/youtube.json"
        ),
        youtube_api_url=reader.get(
            "YOUTUBE_API_URL",
            _http_url,
            defaults.youtube_api_url,
            "https://www.googleapis.com",
        ),
        youtube_privacy=reader.get(
            "YOUTUBE_PRIVACY",
            _choice(YOUTUBE_PRIVACIES, upper=False),
            "private",
            "unlisted",
        ),
        youtube_title_template=reader.get(
            "YOUTUBE_TITLE_TEMPLATE", _template, "{title}", "'{date} {title}'"
        ),
        youtube_description_template=reader.get(
            "YOUTUBE_DESCRIPTION_TEMPLATE",
            _template,
            DEFAULT_YOUTUBE_DESCRIPTION,
            "'{channel} {date}'",
        ),
        youtube_chunk_bytes=reader.get(
            "YOUTUBE_CHUNK_SIZE", _chunk_size, defaults.youtube_chunk_bytes, "8M"
        ),
        youtube_timeout=reader.get("YOUTUBE_TIMEOUT", _positive_duration, 60.0, "60s"),
    )


def _check_uploader(
    settings: Settings, values: Mapping[str, str], errors: list[str]
) -> None:
    """Append an error for each upload variable that the chosen uploader lacks."""
    # An invalid UPLOAD_COMMAND has its own message already.
    command_set = bool((values.get("UPLOAD_COMMAND") or "").strip())
    if settings.uploader == "command" and not command_set:
        errors.append(
            "UPLOADER=command needs UPLOAD_COMMAND; set it to the command line "
            "that uploads one file, for example "
            "UPLOAD_COMMAND='rclone copy {path} remote:vods'"
        )
    if settings.uploader == "youtube" and settings.youtube_credentials_file is None:
        errors.append(
            "UPLOADER=youtube needs YOUTUBE_CREDENTIALS_FILE; set it to the "
            "OAuth credentials file, for example "
            "YOUTUBE_CREDENTIALS_FILE=/etc/vodq/youtube.json"
        )
    if settings.uploader == "none" and settings.upload_retention is not None:
        raw = (values.get("UPLOAD_RETENTION") or "").strip()
        errors.append(
            f"UPLOAD_RETENTION={raw!r} is invalid with UPLOADER=none: nothing is "
            "uploaded, so no file may be deleted after an upload; use "
            "UPLOAD_RETENTION=keep, or choose an uploader such as UPLOADER=command"
        )


def _template(text: str) -> str:
    try:
        template.check(text)
    except template.TemplateError as exc:
        raise ValueError(str(exc)) from None
    return text


def _retention(text: str) -> float | None:
    word = text.lower()
    if word == "keep":
        return None
    if word == "delete":
        return 0.0
    try:
        return _positive_duration(text)
    except ValueError:
        raise ValueError("not keep, delete or a duration such as 7d") from None


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or text[-3:] == "://":
        raise ValueError("not an http:// or https:// URL")
    return text.rstrip("/")


def _chunk_size(text: str) -> int:
    size = _size(text)
    if size < 1 or size % YOUTUBE_CHUNK_UNIT_BYTES:
        raise ValueError("must be a positive multiple of 256K, such as 256K or 8M")
    return size
