"""Tests for archive file names and titles rendered by vodq.upload.template."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from vodq.upload import UploadJob
from vodq.upload.template import MAX_NAME_BYTES, TemplateError, check, file_name

DEFAULT = "{date} {channel} - {title} [{vod_id}]"


def job(
    vod_id: str = "123",
    title: str | None = "Talk",
    channel: str | None = "chan",
    date: datetime | None = datetime(2024, 10, 15, tzinfo=UTC),
) -> UploadJob:
    return UploadJob(
        vod_id=vod_id,
        path=Path("/data/vods/123.mp4"),
        size=1,
        attempt=1,
        title=title,
        channel=channel,
        date=date,
        source_url="https://example.invalid/v",
    )


def test_file_name_default_template() -> None:
    assert file_name(DEFAULT, job(), "mp4") == "2024-10-15 chan - Talk [123].mp4"


def test_file_name_missing_metadata() -> None:
    name = file_name(DEFAULT, job(title=None, channel=None, date=None), "mp4")
    assert name == "undated - [123].mp4"


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        pytest.param("a/b\\c", "a_b_c.mp4", id="separators"),
        pytest.param('x:y*z?"<>|', "x_y_z_____.mp4", id="windows_forbidden"),
        pytest.param("line\nbreak", "line break.mp4", id="newline_is_space"),
        pytest.param("bell\x07", "bell_.mp4", id="control"),
        pytest.param("rtl\u202eexe", "rtl_exe.mp4", id="bidi_override"),
        pytest.param("  trail. ", "trail.mp4", id="trailing_dot_space"),
        pytest.param("..hidden", "hidden.mp4", id="leading_dots"),
        pytest.param("cafe\u0301", "caf\u00e9.mp4", id="nfc"),
    ],
)
def test_file_name_sanitises_title(title: str, expected: str) -> None:
    assert file_name("{title}", job(title=title), "mp4") == expected


@pytest.mark.parametrize(
    "title", ["CON", "nul", "Com1", "LPT\u00b9", "aux.tar", "CON "]
)
def test_file_name_reserved_falls_back_to_id(title: str) -> None:
    assert file_name("{title}", job(title=title), "mp4") == "123.mp4"


@pytest.mark.parametrize("title", ["", "...", "   "])
def test_file_name_empty_falls_back_to_id(title: str) -> None:
    assert file_name("{title}", job(title=title), "mp4") == "123.mp4"


def test_file_name_reserved_fallback_prefixed() -> None:
    name = file_name("{title}", job(vod_id="PRN", title=""), "mp4")
    assert name == "_PRN.mp4"


def test_file_name_long_title_keeps_vod_id() -> None:
    name = file_name(DEFAULT, job(title="\u00e9" * 300), "mp4")
    assert name.endswith(" [123].mp4")
    assert len(name.removesuffix(".mp4").encode()) <= MAX_NAME_BYTES


@pytest.mark.parametrize(
    "title",
    [
        pytest.param("word  " * 80, id="doubled-spaces"),
        pytest.param("\u00e9t\u00e9 \U0001f600 " * 60, id="trailing-space"),
    ],
)
def test_file_name_long_spaced_title_keeps_vod_id(title: str) -> None:
    name = file_name(DEFAULT, job(title=title), "mp4")
    assert name.endswith(" [123].mp4")


def test_file_name_cut_on_character_boundary() -> None:
    name = file_name("{title}", job(title="\U0001f600" * 100), "mp4")
    assert name.encode().decode() == name
    assert len(name.removesuffix(".mp4").encode()) <= MAX_NAME_BYTES


def test_file_name_lone_surrogate_replaced() -> None:
    assert file_name("{title}", job(title="a\ud800b"), "mp4") == "a_b.mp4"


def test_file_name_without_extension() -> None:
    assert file_name("{title}", job(), "") == "Talk"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        pytest.param(
            "{nope}",
            "unknown field {nope}; known fields: {vod_id}, {title}, {channel}, "
            "{date}, {source_url}",
            id="unknown_field",
        ),
        pytest.param(
            "{title.upper}",
            "unknown field {title.upper}; known fields: {vod_id}, {title}, "
            "{channel}, {date}, {source_url}",
            id="attribute",
        ),
        pytest.param(
            "{date:%Y}",
            "field {date} has a conversion or format spec; write it as {date}",
            id="format_spec",
        ),
        pytest.param(
            "{title!r}",
            "field {title} has a conversion or format spec; write it as {title}",
            id="conversion",
        ),
        pytest.param(
            "fixed", "it uses no field, so every VOD would get the same name", id="none"
        ),
    ],
)
def test_check_rejects_template(template: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        check(template)
    assert str(caught.value) == message


def test_check_rejects_unbalanced_brace() -> None:
    with pytest.raises(TemplateError, match="write fields as"):
        check("{title")
