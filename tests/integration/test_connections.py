"""Receive buffers of a throttled download's connections, on real sockets."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mediaserver import MediaServer
from vodq.bandwidth import TokenBucket
from vodq.download import DownloadJob, connections
from vodq.download.connections import (
    MAX_RECEIVE_BUFFER_BYTES,
    MIN_RECEIVE_BUFFER_BYTES,
    receive_buffer_for,
    sized_receive_buffers,
)
from vodq.download.files import ArchiveLayout
from vodq.download.ytdlp import YtDlpDownloader

KIB = 1024


def test_receive_buffer_unlimited_is_default() -> None:
    assert receive_buffer_for(None, 4) is None


def test_receive_buffer_is_share_of_rate() -> None:
    # A fifth of a second of a quarter of 2 MiB/s.
    assert receive_buffer_for(2048 * KIB, 4) == 104_857


def test_receive_buffer_slow_rate_has_floor() -> None:
    assert receive_buffer_for(16 * KIB, 4) == MIN_RECEIVE_BUFFER_BYTES


def test_receive_buffer_fast_rate_has_ceiling() -> None:
    assert receive_buffer_for(1024 * 1024 * KIB, 1) == MAX_RECEIVE_BUFFER_BYTES


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield server.getsockname()
    finally:
        server.close()


def test_sized_connection_gets_receive_buffer(listener: tuple[str, int]) -> None:
    with sized_receive_buffers(lambda: 16 * KIB):
        sock = connections._create_connection(listener, timeout=5)
    try:
        # Linux doubles the value for its bookkeeping.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 32 * KIB
        assert sock.gettimeout() == 5
    finally:
        sock.close()


def test_unsized_connection_keeps_default(listener: tuple[str, int]) -> None:
    with sized_receive_buffers(lambda: None):
        sock = connections._create_connection(listener, timeout=5)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) != 32 * KIB
    finally:
        sock.close()


def download_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, rate: float
) -> list[int]:
    """Download ``url`` at ``rate`` bytes/s; return each sized connect's buffer."""
    sizes: list[int] = []
    connect = connections._connect

    def recording_connect(receive_buffer: int, *args: object) -> socket.socket:
        sizes.append(receive_buffer)
        return connect(receive_buffer, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(connections, "_connect", recording_connect)
    downloader = YtDlpDownloader(
        ArchiveLayout(tmp_path / "data"), socket_timeout_s=5, hls_fragments=4
    )
    downloader.download(
        DownloadJob(vod_id="v", source_url=url, attempt=1),
        on_progress=lambda progress: None,
        cancelled=threading.Event(),
        bucket=TokenBucket(rate),
    )
    return sizes


def test_hls_fragments_connect_with_rate_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, media_server: MediaServer
) -> None:
    segments = [random.Random(i).randbytes(32 * KIB) for i in range(6)]
    url = media_server.add_hls("sized", segments)
    sizes = download_sizes(tmp_path, monkeypatch, url, 4096 * KIB)
    assert len(sizes) >= len(segments)
    assert set(sizes) == {receive_buffer_for(4096 * KIB, 4)}


def test_plain_file_keeps_autotuned_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, media_server: MediaServer
) -> None:
    url = media_server.add_file("plain.mp4", random.Random(7).randbytes(256 * KIB))
    assert download_sizes(tmp_path, monkeypatch, url, 4096 * KIB) == []
