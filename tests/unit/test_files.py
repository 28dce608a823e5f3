"""Tests for safe file names and the partial and archive folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from vodq.download.files import ArchiveLayout, safe_stem

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


def test_finalise_replaces_existing_archive_file(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()
    (layout.archive_dir / "123.mp4").write_bytes(b"old")
    downloaded = layout.partial_dir / "123.mp4"
    downloaded.write_bytes(b"new")

    final = layout.finalise(downloaded)

    assert final.read_bytes() == b"new"


def test_finalise_missing_file_raises(tmp_path: Path) -> None:
    layout = ArchiveLayout(tmp_path)
    layout.ensure()

    with pytest.raises(FileNotFoundError):
        layout.finalise(layout.partial_dir / "absent.mp4")
