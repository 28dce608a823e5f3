"""HLS fragments appended and resumed: never "done" with data missing or doubled.

The real yt-dlp downloads from the local media server, with the fragment
appends of vodq.download.fragments. Each resume case lays out the partial
files a killed or failed attempt leaves, then checks that the next attempt
archives exactly the stream's bytes and which segments it fetched again.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yt_dlp
from yt_dlp.aes import aes_cbc_encrypt_bytes
from yt_dlp.downloader.hls import HlsFD

from conftest import ServiceFactory, tiny_filesystem, wait_for_state
from mediaserver import PLAYLIST_CONTENT_TYPE, Fault, MediaServer
from vodq.bandwidth import TokenBucket
from vodq.download import DownloadJob, fragments
from vodq.download.files import ArchiveLayout
from vodq.download.fragments import PART_BYTES_KEY, FragmentSink
from vodq.download.ytdlp import YtDlpDownloader, YtDlpEngine
from vodq.errors import ConfigError, DownloadFailed
from vodq.models import VodState
from vodq.service import NewVod

KIB = 1024
SEGMENT_BYTES = 64 * KIB
FINISHED = {VodState.DONE, VodState.FAILED}


def segments(count: int, seed: int) -> list[bytes]:
    return [random.Random(seed + i).randbytes(SEGMENT_BYTES) for i in range(count)]


def fetches(server: MediaServer, path: str) -> int:
    server.wait_idle(10)
    return len([r for r in server.requests_for(path) if r.method == "GET"])


def download(
    layout: ArchiveLayout, url: str, *, vod_id: str = "v", attempt: int = 1
) -> Path:
    downloader = YtDlpDownloader(layout, socket_timeout_s=5, hls_fragments=4)
    result = downloader.download(
        DownloadJob(vod_id=vod_id, source_url=url, attempt=attempt),
        on_progress=lambda progress: None,
        cancelled=threading.Event(),
        bucket=TokenBucket(None),
    )
    return result.path


def lay_out_partial(
    layout: ArchiveLayout, part: bytes, record: str, vod_id: str = "v"
) -> None:
    """Write the ``.part`` and ``.ytdl`` files that an earlier attempt left."""
    layout.ensure()
    (layout.partial_dir / f"{vod_id}.mp4.part").write_bytes(part)
    (layout.partial_dir / f"{vod_id}.mp4.ytdl").write_text(record)


def record(index: int, part_bytes: int | None = None) -> str:
    downloader: dict[str, object] = {"current_fragment": {"index": index}}
    if part_bytes is not None:
        downloader[PART_BYTES_KEY] = part_bytes
    return json.dumps({"downloader": downloader})


# -- a fragment that fails while others download --------------------------------


def test_fragments_failed_fetch_keeps_earlier_fragments(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = segments(6, seed=100)
    url = media_server.add_hls("cut", data)
    # seg1 arrives after seg2 has failed, so its append follows the failure.
    media_server.script("/hls/cut/seg1.ts", [Fault.delay(0.5)])
    media_server.script("/hls/cut/seg2.ts", [Fault.too_many(0)])
    service = make_service(
        HLS_CONCURRENT_FRAGMENTS="4",
        DOWNLOAD_BACKOFF_BASE="0.05s",
        DOWNLOAD_MAX_ATTEMPTS="3",
    )
    service.add_vod(NewVod(vod_id="cut", url=url))
    vod = wait_for_state(service, "cut", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.attempts == 2
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == b"".join(data)
    assert fetches(media_server, "/hls/cut/seg0.ts") == 1
    assert fetches(media_server, "/hls/cut/seg1.ts") == 1


def test_fragments_failed_fetch_resumes_whole_every_round(
    media_server: MediaServer, tmp_path: Path
) -> None:
    # Which fragment threads finish around the failure varies from round to
    # round. With yt-dlp's own index, about one round in five recorded
    # fragments that were downloaded but not appended.
    data = segments(5, seed=190)
    whole = []
    for round_number in range(10):
        name = f"round{round_number}"
        url = media_server.add_hls(name, data)
        media_server.script(f"/hls/{name}/seg2.ts", [Fault.status(500)])
        layout = ArchiveLayout(tmp_path / name)
        with pytest.raises(DownloadFailed):
            download(layout, url)
        whole.append(download(layout, url, attempt=2).read_bytes() == b"".join(data))
    assert whole == [True] * 10


def test_fragments_failed_attempt_leaves_no_fragment_files(
    media_server: MediaServer, tmp_path: Path
) -> None:
    url = media_server.add_hls("left", segments(6, seed=195))
    media_server.script("/hls/left/seg1.ts", [Fault.status(500)])
    layout = ArchiveLayout(tmp_path / "data")
    with pytest.raises(DownloadFailed):
        download(layout, url)
    names = [path.name for path in layout.partial_dir.iterdir()]
    assert [name for name in names if "-Frag" in name] == []


def test_fragments_record_index_of_last_append(tmp_path: Path) -> None:
    fragments.install()
    downloader = HlsFD(yt_dlp.YoutubeDL({"quiet": True}, auto_init=False), {})
    part = tmp_path / "v.mp4.part"
    sink = FragmentSink(str(part), last_index=2)
    fragment = tmp_path / "v.mp4.part-Frag3"
    fragment.write_bytes(b"fragment 3")
    # A fragment thread's progress hook has counted two more downloads.
    ctx = {
        "filename": str(tmp_path / "v.mp4"),
        "tmpfilename": str(part),
        "fragment_index": 5,
        "dest_stream": sink,
        "fragment_filename_sanitized": str(fragment),
    }
    downloader._append_fragment(ctx, b"fragment 3")
    sink.close()
    written = json.loads((tmp_path / "v.mp4.ytdl").read_text())
    assert written["downloader"]["current_fragment"]["index"] == 3
    assert written["downloader"][PART_BYTES_KEY] == len(b"fragment 3")


@pytest.mark.parametrize("threads", [1, 4])
def test_fragments_fetched_at_once_as_configured(
    make_service: ServiceFactory, media_server: MediaServer, threads: int
) -> None:
    data = segments(8, seed=110)
    # Slow enough that every fragment thread is mid-body at once.
    url = media_server.add_hls("many", data, rate=256 * KIB)
    service = make_service(HLS_CONCURRENT_FRAGMENTS=str(threads))
    service.add_vod(NewVod(vod_id="many", url=url))
    vod = wait_for_state(service, "many", FINISHED, timeout_s=30)
    assert vod.state is VodState.DONE
    assert media_server.max_concurrent("/hls/many/seg") == threads


def test_fragments_fetched_at_once_set_by_rate(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = [random.Random(120 + i).randbytes(32 * KIB) for i in range(8)]
    # Each body takes at least a second at the server, so eight fragments
    # fetched at once would overlap there.
    url = media_server.add_hls("paced", data, rate=32 * KIB)
    service = make_service(HLS_CONCURRENT_FRAGMENTS="8", DOWNLOAD_RATE_LIMIT="64K")
    service.add_vod(NewVod(vod_id="paced", url=url))
    vod = wait_for_state(service, "paced", FINISHED, timeout_s=30)
    assert vod.state is VodState.DONE
    assert media_server.max_concurrent("/hls/paced/seg") == 4


# -- resuming what an earlier attempt left ---------------------------------------


def test_fragments_resume_cuts_unrecorded_tail(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(4, seed=120)
    url = media_server.add_hls("tail", data)
    layout = ArchiveLayout(tmp_path / "data")
    # Killed after seg2 was appended and before its index was recorded.
    lay_out_partial(layout, b"".join(data[:3]), record(2, 2 * SEGMENT_BYTES))
    path = download(layout, url)
    assert path.read_bytes() == b"".join(data)
    assert fetches(media_server, "/hls/tail/seg0.ts") == 0
    assert fetches(media_server, "/hls/tail/seg2.ts") == 1


def test_fragments_resume_record_beyond_file_starts_over(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(4, seed=130)
    url = media_server.add_hls("short", data)
    layout = ArchiveLayout(tmp_path / "data")
    lay_out_partial(layout, b"".join(data[:2]), record(3, 3 * SEGMENT_BYTES))
    path = download(layout, url)
    assert path.read_bytes() == b"".join(data)
    assert fetches(media_server, "/hls/short/seg0.ts") == 1


def test_fragments_resume_nothing_recorded_starts_empty(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(3, seed=140)
    url = media_server.add_hls("zero", data)
    layout = ArchiveLayout(tmp_path / "data")
    lay_out_partial(layout, b"bytes of no known fragment", record(0, 0))
    path = download(layout, url)
    assert path.read_bytes() == b"".join(data)


def test_fragments_resume_unreadable_record_starts_empty(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(3, seed=150)
    url = media_server.add_hls("torn", data)
    layout = ArchiveLayout(tmp_path / "data")
    # A record cut short, as an older yt-dlp leaves it when the disk fills.
    lay_out_partial(layout, b"".join(data[:2]), '{"downloader": {"curr')
    path = download(layout, url)
    assert path.read_bytes() == b"".join(data)


def test_fragments_resume_record_written_by_ytdlp(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(4, seed=160)
    url = media_server.add_hls("plain", data)
    layout = ArchiveLayout(tmp_path / "data")
    lay_out_partial(layout, b"".join(data[:2]), record(2))
    path = download(layout, url)
    assert path.read_bytes() == b"".join(data)
    assert fetches(media_server, "/hls/plain/seg1.ts") == 0


def test_fragments_record_temporary_removed_before_resume(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(3, seed=175)
    url = media_server.add_hls("tmp", data)
    layout = ArchiveLayout(tmp_path / "data")
    lay_out_partial(layout, data[0], record(1, SEGMENT_BYTES))
    left = layout.partial_dir / "v.mp4.ytdl.140234.tmp"
    left.write_text('{"downloader": {}}')
    path = download(layout, url)
    assert path.read_bytes() == b"".join(data)
    assert not left.exists()


def test_fragments_record_gives_part_bytes(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(4, seed=170)
    url = media_server.add_hls("rec", data)
    media_server.script("/hls/rec/seg2.ts", [Fault.status(404)])
    layout = ArchiveLayout(tmp_path / "data")
    with pytest.raises(DownloadFailed):
        download(layout, url)
    written = json.loads((layout.partial_dir / "v.mp4.ytdl").read_text())
    assert written["downloader"][PART_BYTES_KEY] == 2 * SEGMENT_BYTES


# -- playlists that yt-dlp resumes wrongly -----------------------------------------


def serve_playlist(server: MediaServer, name: str, lines: list[str]) -> str:
    """Serve a media playlist with ``lines`` between its header and end tags."""
    text = "\n".join(["#EXTM3U", "#EXT-X-TARGETDURATION:2", *lines, "#EXT-X-ENDLIST"])
    return serve_text(server, f"{name}.m3u8", text)


def serve_text(server: MediaServer, name: str, text: str) -> str:
    return server.add_file(
        name, (text + "\n").encode(), content_type=PLAYLIST_CONTENT_TYPE
    )


def fail_then_finish(layout: ArchiveLayout, url: str) -> bytes:
    with pytest.raises(DownloadFailed):
        download(layout, url)
    return download(layout, url, attempt=2).read_bytes()


def test_fragments_init_segment_appended_once(
    media_server: MediaServer, tmp_path: Path
) -> None:
    init = b"init segment " * 512
    data = segments(4, seed=200)
    media_server.add_file("init.mp4", init)
    lines = ["#EXT-X-VERSION:7", '#EXT-X-MAP:URI="init.mp4"']
    for index, segment in enumerate(data):
        media_server.add_file(f"map{index}.m4s", segment)
        lines += ["#EXTINF:2.000,", f"map{index}.m4s"]
    url = serve_playlist(media_server, "map", lines)
    media_server.script("/files/map2.m4s", [Fault.status(500)])
    archived = fail_then_finish(ArchiveLayout(tmp_path / "data"), url)
    assert archived == init + b"".join(data)


def test_fragments_byte_ranges_without_offset_start_over(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = segments(6, seed=210)
    media_server.add_file("ranges.ts", b"".join(data))
    lines = []
    for _ in data:
        lines += ["#EXTINF:2.000,", f"#EXT-X-BYTERANGE:{SEGMENT_BYTES}", "ranges.ts"]
    url = serve_playlist(media_server, "ranges", lines)
    media_server.script(
        "/files/ranges.ts", [Fault.passthrough()] * 3 + [Fault.status(500)]
    )
    archived = fail_then_finish(ArchiveLayout(tmp_path / "data"), url)
    assert archived == b"".join(data)


def test_fragments_aes_without_iv_starts_over(
    media_server: MediaServer, tmp_path: Path
) -> None:
    key = bytes(range(16))
    plain = [random.Random(220 + i).randbytes(8 * KIB) for i in range(5)]
    media_server.add_file("aes.key", key)
    lines = ["#EXT-X-MEDIA-SEQUENCE:0", '#EXT-X-KEY:METHOD=AES-128,URI="aes.key"']
    for index, segment in enumerate(plain):
        # Without an IV attribute the IV is the segment's media sequence number.
        iv = struct.pack(">8xq", index)
        padded = segment + bytes([16]) * 16
        media_server.add_file(f"aes{index}.ts", aes_cbc_encrypt_bytes(padded, key, iv))
        lines += ["#EXTINF:2.000,", f"aes{index}.ts"]
    url = serve_playlist(media_server, "aes", lines)
    media_server.script("/files/aes3.ts", [Fault.status(500)])
    archived = fail_then_finish(ArchiveLayout(tmp_path / "data"), url)
    assert archived == b"".join(plain)


def test_fragments_master_playlist_best_variant(
    media_server: MediaServer, tmp_path: Path
) -> None:
    high = segments(3, seed=230)
    media_server.add_hls("high", high)
    media_server.add_hls("low", [segment[:1024] for segment in segments(3, seed=240)])
    master = [
        "#EXTM3U",
        "#EXT-X-STREAM-INF:BANDWIDTH=2000000,RESOLUTION=1280x720",
        "/hls/high/index.m3u8",
        "#EXT-X-STREAM-INF:BANDWIDTH=300000,RESOLUTION=320x180",
        "/hls/low/index.m3u8",
    ]
    url = serve_text(media_server, "master.m3u8", "\n".join(master))
    path = download(ArchiveLayout(tmp_path / "data"), url)
    assert path.read_bytes() == b"".join(high)


# -- a full disk ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tiny_filesystem(tmp_path / "small", "256k") as path:
        yield path


def test_fragments_disk_full_resumes_whole(
    media_server: MediaServer, small_disk: Path
) -> None:
    data = segments(8, seed=180)
    url = media_server.add_hls("full", data)
    layout = ArchiveLayout(small_disk)
    with pytest.raises(DownloadFailed) as failed:
        download(layout, url)
    assert failed.value.error_class == "disk_full"

    subprocess.run(
        ["mount", "-o", "remount,size=4m", str(small_disk)], check=True, timeout=30
    )
    path = download(layout, url, attempt=2)
    assert path.read_bytes() == b"".join(data)


def test_fragment_sink_failed_append_cut_back(small_disk: Path) -> None:
    sink = FragmentSink(str(small_disk / "x.part"), last_index=0)
    sink.write(b"\1" * 128 * KIB)
    with pytest.raises(OSError):
        sink.write(b"\2" * 256 * KIB)
    sink.close()
    assert (small_disk / "x.part").stat().st_size == 128 * KIB


def test_fragment_sink_refuses_after_failed_append(small_disk: Path) -> None:
    sink = FragmentSink(str(small_disk / "x.part"), last_index=0)
    with pytest.raises(OSError):
        sink.write(b"\2" * 512 * KIB)
    with pytest.raises(OSError, match="earlier append failed"):
        sink.write(b"\3")
    sink.close()


def test_fragment_sink_close_from_other_thread_ignored(tmp_path: Path) -> None:
    sink = FragmentSink(str(tmp_path / "x.part"), last_index=0)
    closer = threading.Thread(target=sink.close)
    closer.start()
    closer.join()
    sink.write(b"still open")
    sink.close()
    assert (tmp_path / "x.part").read_bytes() == b"still open"


def test_fragment_sink_close_by_owner_closes(tmp_path: Path) -> None:
    sink = FragmentSink(str(tmp_path / "x.part"), last_index=0)
    sink.close()
    assert sink.closed


@pytest.fixture
def fresh_check() -> Iterator[None]:
    fragments.incompatibility.cache_clear()
    yield
    fragments.incompatibility.cache_clear()


def test_fragments_installed_ytdlp_supported(fresh_check: None) -> None:
    assert fragments.incompatibility() is None


def test_fragments_changed_context_key_unsupported(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def append_elsewhere(self: object, ctx: dict[str, object], content: bytes) -> None:
        ctx["output"] = content

    monkeypatch.setattr(fragments, "_original_append", append_elsewhere)
    assert fragments.incompatibility() == (
        "FragmentFD._append_fragment no longer contains 'fragment_filename_sanitized'"
    )


def test_fragments_renamed_playlist_local_stops_start(
    fresh_check: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def real_download(self: object, filename: str, info_dict: dict[str, str]) -> bool:
        playlist = info_dict["url"]
        return bool(playlist)

    monkeypatch.setattr(HlsFD, "real_download", real_download)
    with pytest.raises(ConfigError) as raised:
        YtDlpEngine(tmp_path, socket_timeout_s=5)
    assert str(raised.value) == (
        f"yt-dlp {yt_dlp.version.__version__} is not supported: "
        "HlsFD.real_download no longer keeps its playlist in the local 's', "
        "so resuming an HLS download could lose data. Install a supported "
        "version, such as: pip install 'yt-dlp==2026.11.23'"
    )


def test_fragments_aes_decrypted_by_cryptodome() -> None:
    # yt-dlp's pure-Python AES fallback decrypts about 70 KiB/s.
    from yt_dlp.dependencies import Cryptodome

    assert Cryptodome.AES is not None
