"""Tests for the upload stage's settings in vodq.config."""

from __future__ import annotations

from pathlib import Path

import pytest

from vodq.config import load_settings
from vodq.errors import ConfigError

HEADER = "invalid configuration:\n  "


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ, env_file=None)
    return str(caught.value).removeprefix(HEADER)


def test_upload_defaults() -> None:
    settings = load_settings({}, env_file=None)
    assert settings.uploader == "none"
    assert settings.max_concurrent_uploads == 1
    assert settings.archive_name_template == "{date} {channel} - {title} [{vod_id}]"
    assert settings.upload_command_timeout == 6 * 3600
    assert settings.upload_retention is None


def test_youtube_defaults() -> None:
    settings = load_settings({}, env_file=None)
    assert settings.youtube_api_url == "https://www.googleapis.com"
    assert settings.youtube_privacy == "private"
    assert settings.youtube_title_template == "{title}"
    assert settings.youtube_description_template == "{channel} {date}\n{source_url}"
    assert settings.youtube_chunk_bytes == 8 * 1024 * 1024
    assert settings.youtube_timeout == 60.0


def test_upload_command_split_with_shlex() -> None:
    settings = load_settings(
        {
            "UPLOADER": "command",
            "UPLOAD_COMMAND": "rclone copy '{path}' 'remote:my vods'",
        },
        env_file=None,
    )
    assert settings.upload_command == ("rclone", "copy", "{path}", "remote:my vods")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("keep", None), ("delete", 0.0), ("7d", 7 * 86400.0), ("KEEP", None)],
)
def test_upload_retention_parsed(value: str, seconds: float | None) -> None:
    settings = load_settings(
        {"UPLOADER": "command", "UPLOAD_COMMAND": "true", "UPLOAD_RETENTION": value},
        env_file=None,
    )
    assert settings.upload_retention == seconds


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        pytest.param(
            {"UPLOADER": "ftp"},
            "UPLOADER='ftp' is invalid: must be one of none, command, youtube; "
            "use for example command",
            id="uploader",
        ),
        pytest.param(
            {"MAX_CONCURRENT_UPLOADS": "0"},
            "MAX_CONCURRENT_UPLOADS='0' is invalid: must be at least 1; use for "
            "example 2",
            id="concurrency",
        ),
        pytest.param(
            {"UPLOADER": "command"},
            "UPLOADER=command needs UPLOAD_COMMAND; set it to the command line "
            "that uploads one file, for example "
            "UPLOAD_COMMAND='rclone copy {path} remote:vods'",
            id="command_missing",
        ),
        pytest.param(
            {"UPLOADER": "command", "UPLOAD_COMMAND": "rclone copy '{path}"},
            'UPLOAD_COMMAND="rclone copy \'{path}" is invalid: it cannot be split '
            "into arguments (No closing quotation); use for example "
            "'rclone copy {path} remote:vods'",
            id="command_quote",
        ),
        pytest.param(
            {"UPLOADER": "command", "UPLOAD_COMMAND": "rclone copy {file} x:"},
            "UPLOAD_COMMAND='rclone copy {file} x:' is invalid: argument '{file}' "
            "uses {file}, which is not a placeholder; known placeholders: {path}, "
            "{file_name}, {vod_id}, {title}, {channel}, {date}, {source_url}, "
            "{attempt}; use for example 'rclone copy {path} remote:vods'",
            id="command_placeholder",
        ),
        pytest.param(
            {"UPLOAD_COMMAND_TIMEOUT": "0"},
            "UPLOAD_COMMAND_TIMEOUT='0' is invalid: must be greater than zero; use "
            "for example 6h",
            id="timeout",
        ),
        pytest.param(
            {"UPLOADER": "command", "UPLOAD_COMMAND": "true", "UPLOAD_RETENTION": "1w"},
            "UPLOAD_RETENTION='1w' is invalid: not keep, delete or a duration such "
            "as 7d; use for example keep, delete or 7d",
            id="retention",
        ),
        pytest.param(
            {"UPLOAD_RETENTION": "7d"},
            "UPLOAD_RETENTION='7d' is invalid with UPLOADER=none: nothing is "
            "uploaded, so no file may be deleted after an upload; use "
            "UPLOAD_RETENTION=keep, or choose an uploader such as UPLOADER=command",
            id="retention_without_uploader",
        ),
        pytest.param(
            {"ARCHIVE_NAME_TEMPLATE": "{name}"},
            "ARCHIVE_NAME_TEMPLATE='{name}' is invalid: unknown field {name}; known "
            "fields: {vod_id}, {title}, {channel}, {date}, {source_url}; use for "
            "example '{date} {channel} - {title} [{vod_id}]'",
            id="archive_template",
        ),
        pytest.param(
            {"UPLOADER": "youtube"},
            "UPLOADER=youtube needs YOUTUBE_CREDENTIALS_FILE; set it to the OAuth "
            "credentials file, for example "
            "YOUTUBE_CREDENTIALS_FILE=/etc/vodq/youtube.json",
            id="youtube_credentials",
        ),
        pytest.param(
            {"YOUTUBE_PRIVACY": "secret"},
            "YOUTUBE_PRIVACY='secret' is invalid: must be one of private, unlisted, "
            "public; use for example unlisted",
            id="youtube_privacy",
        ),
        pytest.param(
            {"YOUTUBE_CHUNK_SIZE": "300K"},
            "YOUTUBE_CHUNK_SIZE='300K' is invalid: must be a positive multiple of "
            "256K, such as 256K or 8M; use for example 8M",
            id="youtube_chunk",
        ),
        pytest.param(
            {"YOUTUBE_API_URL": "ftp://x"},
            "YOUTUBE_API_URL='ftp://x' is invalid: not an http:// or https:// URL; "
            "use for example https://www.googleapis.com",
            id="youtube_url",
        ),
        pytest.param(
            {"YOUTUBE_TITLE_TEMPLATE": "{title:>9}"},
            "YOUTUBE_TITLE_TEMPLATE='{title:>9}' is invalid: field {title} has a "
            "conversion or format spec; write it as {title}; use for example "
            "'{date} {title}'",
            id="youtube_title",
        ),
        pytest.param(
            {"YOUTUBE_TIMEOUT": "soon"},
            "YOUTUBE_TIMEOUT='soon' is invalid: not a duration (a number of "
            "seconds, or parts like 2s, 5m, 1h30m); use for example 60s",
            id="youtube_timeout",
        ),
    ],
)
def test_upload_config_invalid(environ: dict[str, str], message: str) -> None:
    assert config_error(environ) == message


def test_youtube_credentials_file_path(tmp_path: Path) -> None:
    credentials = tmp_path / "youtube.json"
    settings = load_settings(
        {"UPLOADER": "youtube", "YOUTUBE_CREDENTIALS_FILE": str(credentials)},
        env_file=None,
    )
    assert settings.youtube_credentials_file == credentials
