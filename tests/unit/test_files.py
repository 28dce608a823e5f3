"""Tests for safe file names, the partial and archive folders, and resume checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from vodq.download.files import ArchiveLayout, SizeMismatch, safe_stem
from vodq.download.validators import (
    Sidecar,
    SourceValidators,
    read_sidecar,
    resume_verdict,
    write_sidecar,
)

UNSAFE_IDS = [
    pytest.param("../../x", id="parent-traversal"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("/etc/passwd", id="absolute-path"),
    pytest.param("", id="empty"),
    pytest.param("日本語の配信", id="only-unicode"),
    pytest.param("vod-é-1", id="mixed-unicode"),
    pytest.param("a b", id="space"),
    pytest.param("x" * 300, id="very-long"),
    pytest.param("id*?[x]", id="glob-characters"),
    pytest.param("%(title)s", id="output-template-field"),
    pytest.param("a\x00b", id="nul-byte"),
    pytest.param("\ud800", id="lone-surrogate"),
]


@pytest.mark.parametrize(
    "vod_id",
    ["2345678901", "abc_DEF-123", "v" * 80],
    ids=["digits", "letters-and-marks", "eighty-characters"],
)
def test_safe_stem_plain_id_unchanged(vod_id: str) -> None:
    assert safe_stem(vod_id) == vod_id


@pytest.mark.parametrize("vod_id", UNSAFE_IDS)
def test_safe_stem_unsafe_id_has_no_separator(vod_id: str) -> None:
    stem = safe_stem(vod_id)

    assert "/" not in stem
    assert "\\" not in stem
    assert not stem.startswith(".")


@pytest.mark.parametrize("vod_id", UNSAFE_IDS)
def test_safe_stem_unsafe_id_only_safe_characters(vod_id: str) -> None:
    stem = safe_stem(vod_id)

    assert stem
    assert all(ch.isascii() and (ch.isalnum() or ch in "_-~") for ch in stem)


def test_safe_stem_keeps_safe_characters() -> None:
    assert safe_stem("a/b").startswith("a_b~")


def test_safe_stem_hashed_never_equals_plain_id() -> None:
    hashed = safe_stem("a/b")
    assert safe_stem(hashed.replace("~", "-")) != hashed


def test_safe_stem_long_id_bounded() -> None:
    assert len(safe_stem("x" * 300)) <= 80


def test_safe_stem_eighty_one_characters_hashed() -> None:
    assert safe_stem("v" * 81) != "v" * 81


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("a/b", "a\\b", id="slash-or-backslash"),
        pytest.param("a/b", "a b", id="slash-or-space"),
        pytest.param("a/b", "a//b", id="one-or-two-slashes"),
        pytest.param("x/", "x.", id="trailing-characters"),
        pytest.param("..", ".", id="dots"),
        pytest.param("日本", "中国", id="only-unicode"),
        pytest.param("x" * 100 + "1", "x" * 100 + "2", id="differ-after-cut"),
    ],
)
def test_safe_stem_distinct_ids_distinct_stems(first: str, second: str) -> None:
    assert safe_stem(first) != safe_stem(second)


def test_safe_stem_same_id_same_stem() -> None:
    assert safe_stem("../../x") == safe_stem("../../x")


def test_layout_folders_under_data_dir(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)

    assert layout.partial_dir == tmp_path / "partial"
    assert layout.archive_dir == tmp_path / "vods"


def test_layout_relative_data_dir_made_absolute() -> None:
    layout = ArchiveLayout(Path("data"))

    assert layout.partial_dir.is_absolute()
    assert layout.archive_dir.is_absolute()


def test_layout_ensure_creates_folders(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path / "data")

    layout.ensure()

    assert layout.partial_dir.is_dir()
    assert layout.archive_dir.is_dir()


@pytest.mark.parametrize("vod_id", ["2345678901", *UNSAFE_IDS])
def test_partial_template_stays_in_partial_dir(tmp_path: Path, vod_id: str) -> None:
    layout = ArchiveLayout(tmp_path)

    template = Path(layout.partial_template(vod_id))

    assert template.parent == layout.partial_dir
    assert template.name == f"{safe_stem(vod_id)}.%(ext)s"


def test_partial_template_single_template_field(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)

    template = layout.partial_template("%(title)s")

    assert template.count("%(") == 1


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


def test_remove_stray_fragments_deletes_fragments(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    _touch(
        layout.partial_dir,
        "123.mp4.part-Frag1",
        "123.mp4.part-Frag2.part",
        "123.mp4.part",
        "123.mp4.ytdl",
    )

    removed = layout.remove_stray_fragments("123")

    assert sorted(path.name for path in removed) == [
        "123.mp4.part-Frag1",
        "123.mp4.part-Frag2.part",
    ]
    assert not (layout.partial_dir / "123.mp4.part-Frag1").exists()
    assert not (layout.partial_dir / "123.mp4.part-Frag2.part").exists()


def test_remove_stray_fragments_keeps_part_and_ytdl(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    _touch(layout.partial_dir, "123.mp4.part-Frag1", "123.mp4.part", "123.mp4.ytdl")

    layout.remove_stray_fragments("123")

    assert (layout.partial_dir / "123.mp4.part").exists()
    assert (layout.partial_dir / "123.mp4.ytdl").exists()


def test_remove_stray_fragments_other_vod_untouched(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    _touch(layout.partial_dir, "1234.mp4.part-Frag1", "123-4.mp4.part-Frag1")

    removed = layout.remove_stray_fragments("123")

    assert removed == []
    assert (layout.partial_dir / "1234.mp4.part-Frag1").exists()
    assert (layout.partial_dir / "123-4.mp4.part-Frag1").exists()


def test_remove_stray_fragments_unsafe_id(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    stem = safe_stem("../x")
    _touch(layout.partial_dir, f"{stem}.mp4.part-Frag3", f"{stem}.mp4.ytdl")

    removed = layout.remove_stray_fragments("../x")

    assert [path.name for path in removed] == [f"{stem}.mp4.part-Frag3"]
    assert (layout.partial_dir / f"{stem}.mp4.ytdl").exists()


def test_remove_stray_fragments_no_partial_files(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()

    assert layout.remove_stray_fragments("123") == []


def test_finalise_moves_into_archive(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"complete video")

    final = layout.finalise(downloaded)

    assert final == layout.archive_dir / "123.mp4"
    assert final.read_bytes() == b"complete video"
    assert not downloaded.exists()


def test_finalise_keeps_existing_archive_file(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    (layout.archive_dir / "123.mp4").write_bytes(b"another VOD's file")
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"new")

    final = layout.finalise(downloaded)

    assert (layout.archive_dir / "123.mp4").read_bytes() == b"another VOD's file"
    assert final == layout.archive_dir / "123 (2).mp4"
    assert final.read_bytes() == b"new"


def test_finalise_after_interrupted_link_keeps_one_file(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"complete video")
    # A crash between the link and the unlink leaves both names.
    (layout.archive_dir / "123.mp4").hardlink_to(downloaded)

    final = layout.finalise(downloaded)

    assert final == layout.archive_dir / "123.mp4"
    assert not downloaded.exists()


def test_finalise_missing_file_raises(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()

    with pytest.raises(FileNotFoundError):
        layout.finalise(layout.partial_dir / "absent.mp4")


def test_finalise_size_mismatch_raises(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"short")

    with pytest.raises(SizeMismatch):
        layout.finalise(downloaded, expected_size=100)


def test_finalise_size_mismatch_keeps_file_out_of_archive(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"short")

    with pytest.raises(SizeMismatch):
        layout.finalise(downloaded, expected_size=100)

    assert list(layout.archive_dir.iterdir()) == []
    assert downloaded.exists()


def test_finalise_expected_size_matches(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"12345")

    final = layout.finalise(downloaded, expected_size=5)

    assert final.read_bytes() == b"12345"


def test_sidecar_path_next_to_partial(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)

    assert layout.sidecar_path("123") == layout.partial_dir / "123.vodq.json"


def test_download_files_excludes_sidecar(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    _touch(layout.partial_dir, "123.mp4.part", "123.vodq.json", "123.vodq.json.tmp")

    assert [path.name for path in layout.download_files("123")] == ["123.mp4.part"]


def test_discard_partial_deletes_every_file_of_vod(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    _touch(layout.partial_dir, "123.mp4.part", "123.mp4.ytdl", "123.vodq.json")

    layout.discard_partial("123")

    assert layout.partial_files("123") == []


def test_discard_partial_other_vod_untouched(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    _touch(layout.partial_dir, "123.mp4.part", "1234.mp4.part")

    layout.discard_partial("123")

    assert (layout.partial_dir / "1234.mp4.part").exists()


# Validators and the sidecar

URL = "http://127.0.0.1:1/files/a.mp4"
V1 = SourceValidators(
    size=100, etag='"a"', last_modified="Mon, 01 Jan 2024 00:00:00 GMT"
)


def test_validators_from_200() -> None:
    validators = SourceValidators.from_response(
        200, {"Content-Length": "100", "ETag": '"a"', "Last-Modified": "x"}
    )

    assert validators == SourceValidators(size=100, etag='"a"', last_modified="x")


def test_validators_from_206_use_total() -> None:
    validators = SourceValidators.from_response(
        206, {"content-length": "40", "content-range": "bytes 60-99/100"}
    )

    assert validators is not None
    assert validators.size == 100


def test_validators_compressed_body_size_unknown() -> None:
    validators = SourceValidators.from_response(
        200, {"Content-Length": "10", "Content-Encoding": "gzip"}
    )

    assert validators is not None
    assert validators.size is None


def test_validators_error_status_none() -> None:
    assert SourceValidators.from_response(404, {"Content-Length": "0"}) is None


@pytest.mark.parametrize(
    ("after", "reason_part"),
    [
        pytest.param(replace(V1, size=101), "size changed", id="size"),
        pytest.param(replace(V1, etag='"b"'), "ETag changed", id="etag"),
        pytest.param(replace(V1, last_modified="later"), "Last-Modified", id="date"),
    ],
)
def test_validators_change_detected(after: SourceValidators, reason_part: str) -> None:
    reason = after.changed_from(V1)

    assert reason is not None
    assert reason_part in reason


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(V1, id="same"),
        pytest.param(replace(V1, etag='W/"a"'), id="weak-etag"),
        pytest.param(SourceValidators(size=100), id="validators-missing-now"),
        pytest.param(SourceValidators(), id="nothing-known"),
    ],
)
def test_validators_unchanged(after: SourceValidators) -> None:
    assert after.changed_from(V1) is None


def test_sidecar_round_trip(tmp_path: Path) -> None:
    sidecar = Sidecar("123", URL, V1)
    path = tmp_path / "123.vodq.json"

    write_sidecar(path, sidecar)

    assert read_sidecar(path) == sidecar


def test_sidecar_without_validators_round_trip(tmp_path: Path) -> None:
    sidecar = Sidecar("123", URL)
    path = tmp_path / "123.vodq.json"

    write_sidecar(path, sidecar)

    assert read_sidecar(path) == sidecar


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("{not json", id="not-json"),
        pytest.param("[1, 2]", id="not-object"),
        pytest.param('{"vod_id": 1, "source_url": "x"}', id="wrong-type"),
        pytest.param('{"source_url": "x"}', id="missing-id"),
    ],
)
def test_sidecar_unreadable_is_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "123.vodq.json"
    path.write_text(text)

    assert read_sidecar(path) is None


def test_sidecar_missing_is_none(tmp_path: Path) -> None:
    assert read_sidecar(tmp_path / "absent.vodq.json") is None


def _verdict(
    sidecar: Sidecar | None,
    current: SourceValidators | None = V1,
    *,
    vod_id: str = "123",
    source_url: str = URL,
    partial_size: int = 50,
) -> str | None:
    return resume_verdict(
        sidecar,
        vod_id=vod_id,
        source_url=source_url,
        current=current,
        partial_size=partial_size,
    )


def test_resume_verdict_same_source_resumes() -> None:
    assert _verdict(Sidecar("123", URL, V1)) is None


def test_resume_verdict_other_vod_restarts() -> None:
    reason = _verdict(Sidecar("999", URL, V1))

    assert reason is not None
    assert "999" in reason


def test_resume_verdict_other_url_restarts() -> None:
    reason = _verdict(Sidecar("123", URL + "?v=2", V1))

    assert reason is not None
    assert "source is now" in reason


def test_resume_verdict_changed_etag_restarts() -> None:
    reason = _verdict(Sidecar("123", URL, V1), replace(V1, etag='"b"'))

    assert reason is not None
    assert "ETag" in reason


def test_resume_verdict_partial_larger_than_source_restarts() -> None:
    reason = _verdict(Sidecar("123", URL, V1), partial_size=101)

    assert reason is not None
    assert "more than" in reason


def test_resume_verdict_no_sidecar_resumes() -> None:
    assert _verdict(None) is None


def test_resume_verdict_no_sidecar_larger_partial_restarts() -> None:
    assert _verdict(None, partial_size=200) is not None


def test_resume_verdict_unknown_current_compares_url_only() -> None:
    assert _verdict(Sidecar("123", URL, V1), current=None) is None


def test_resume_verdict_complete_partial_resumes() -> None:
    # yt-dlp then gets a 416, which the downloader handles with a restart.
    assert _verdict(Sidecar("123", URL, V1), partial_size=100) is None
