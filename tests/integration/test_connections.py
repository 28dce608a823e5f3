"""Receive buffers of a throttled download's connections, on real sockets."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from buckets import CountingBucket, RecordingBucket
from mediaserver import MediaServer
from vodq.bandwidth import SpareTokens, TokenBucket
from vodq.download import DownloadJob, connections, ytdlp
from vodq.download.connections import (
    FRAGMENT_BUFFER_S,
    MAX_RECEIVE_BUFFER_BYTES,
    MIN_RECEIVE_BUFFER_BYTES,
    queued_bytes,
    receive_buffer_for,
    round_trip,
    sized_receive_buffers,
    socket_of,
)
from vodq.download.files import ArchiveLayout
from vodq.download.ytdlp import (
    HELD_BURST_S,
    STALL_S,
    YtDlpDownloader,
    _Watch,
    _WatchedYoutubeDL,
)

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


def test_receive_buffer_holds_given_seconds() -> None:
    # Half a second of a quarter of 2 MiB/s.
    assert receive_buffer_for(2048 * KIB, 4, 0.5) == 262_144


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


def test_round_trip_of_loopback_connection_is_short(
    listener: tuple[str, int],
) -> None:
    with socket.create_connection(listener, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        # The listener's kernel acknowledges the request; no accept needed.
        time.sleep(0.05)
        seconds = round_trip(sock)
    assert seconds is not None and 0 < seconds < 0.05


def test_round_trip_without_socket_is_unknown() -> None:
    assert round_trip(None) is None


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
    # The round trip on 127.0.0.1 is far below the buffer's seconds.
    assert set(sizes) == {receive_buffer_for(4096 * KIB, 4, FRAGMENT_BUFFER_S)}


def test_plain_file_keeps_autotuned_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, media_server: MediaServer
) -> None:
    url = media_server.add_file("plain.mp4", random.Random(7).randbytes(256 * KIB))
    assert download_sizes(tmp_path, monkeypatch, url, 4096 * KIB) == []


def wait_queued(sock: socket.socket | None, at_least: int) -> int:
    """Return the bytes queued for ``sock`` once at least ``at_least`` are,
    polling for at most 5 s."""
    deadline = time.monotonic() + 5
    queued = queued_bytes(sock)
    while queued < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
        queued = queued_bytes(sock)
    return queued


def test_queued_bytes_of_ytdlp_response(media_server: MediaServer) -> None:
    url = media_server.add_file("queued.mp4", random.Random(3).randbytes(64 * KIB))
    watch = _Watch(track_validators=False)
    params = {"quiet": True, "compat_opts": {"prefer-legacy-http-handler"}}
    with _WatchedYoutubeDL(params, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            # The reader's buffer holds up to 8 KiB of the body already.
            assert wait_queued(socket_of(response), 48 * KIB) >= 48 * KIB
        finally:
            response.close()


# yt-dlp options of the metered-read tests.
PARAMS = {"quiet": True, "compat_opts": {"prefer-legacy-http-handler"}}


def recording_watch(rate: float) -> tuple[RecordingBucket, _Watch]:
    """A watch whose bucket starts at ``rate`` bytes/s, records its charges
    and resizes the watch's connections at every change."""
    bucket = RecordingBucket(rate)
    watch = _Watch(track_validators=False, bucket=bucket)
    bucket.on_change = watch.follow_rate
    return bucket, watch


def test_metered_read_cut_queue_free(media_server: MediaServer) -> None:
    # Sent at 256 KiB/s, so the queue fills after the first read.
    body = random.Random(4).randbytes(128 * KIB)
    url = media_server.add_file("charged.mp4", body, rate=256 * KIB)
    bucket, watch = recording_watch(160 * KIB)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            first = response.read(4 * KIB)
            queued = wait_queued(socket_of(response), 48 * KIB)
            charged_before = len(bucket.charges)
            bucket.set_rate(32 * KIB)
            rest = response.read()
        finally:
            response.close()

    # Reads are charged as read until the cut, and what was queued at the
    # cut is read free.
    assert bucket.charges[0] == len(first)
    assert queued >= 48 * KIB
    assert sum(bucket.charges[charged_before:]) <= len(rest) - 40 * KIB
    assert first + rest == body


def read_around_cut(
    media_server: MediaServer, name: str, source_rate: int, cut_rate: int
) -> tuple[bytes, bytes, int, int]:
    """Read 4 KiB of a 128 KiB file sent at ``source_rate`` bytes/s, cut the
    bucket from 160 KiB/s to ``cut_rate``, read the rest in 4 KiB blocks.

    Return the body, the bytes read, the window offered at the cut, and
    the bytes charged after it.
    """
    body = random.Random(name).randbytes(128 * KIB)
    url = media_server.add_file(name, body, rate=source_rate)
    bucket, watch = recording_watch(160 * KIB)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            read = response.read(4 * KIB)
            window = connections.offered_window(socket_of(response))
            charged_before = len(bucket.charges)
            bucket.set_rate(cut_rate)
            read += b"".join(iter(lambda: response.read(4 * KIB), b""))
        finally:
            response.close()
    return body, read, window, sum(bucket.charges[charged_before:])


def test_metered_read_cut_window_free(media_server: MediaServer) -> None:
    # Cut before the queue fills: what the offered window brings after the
    # cut was invited at the old rate.
    body, read, window, charged = read_around_cut(
        media_server, "window.mp4", 256 * KIB, 32 * KIB
    )
    assert window >= 48 * KIB
    assert charged <= len(body) - 4 * KIB - 40 * KIB
    assert read == body


def test_metered_read_slow_source_charged(media_server: MediaServer) -> None:
    # A source at 32 KiB/s fills the window offered at the cut over seconds,
    # and only what arrives within INVITED_S of the cut is read free.
    body, read, window, charged = read_around_cut(
        media_server, "slow.mp4", 32 * KIB, 16 * KIB
    )
    assert window >= 64 * KIB
    assert charged >= len(body) - 4 * KIB - 56 * KIB
    assert read == body


@pytest.fixture
def queued_connection() -> Iterator[socket.socket]:
    """A client socket with a 1 MiB receive buffer and 64 KiB queued in it."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * KIB)
    client.connect(server.getsockname())
    peer, _ = server.accept()
    peer.sendall(b"x" * 64 * KIB)
    wait_queued(client, 64 * KIB)
    try:
        yield client
    finally:
        for sock in (client, peer, server):
            sock.close()


def test_resize_receive_buffer_lowers_buffer(queued_connection: socket.socket) -> None:
    before = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    connections.resize_receive_buffer(queued_connection, 128 * KIB)
    after = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert after < before


def test_resize_receive_buffer_keeps_queue(queued_connection: socket.socket) -> None:
    connections.resize_receive_buffer(queued_connection, 4 * KIB)
    assert queued_bytes(queued_connection) == 64 * KIB


def test_resize_receive_buffer_with_room_not_below_queue(
    queued_connection: socket.socket,
) -> None:
    connections.resize_receive_buffer(queued_connection, 4 * KIB, room=16 * KIB)
    after = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert after >= 64 * KIB


def test_resize_receive_buffer_with_window_keeps_queue(
    queued_connection: socket.socket,
) -> None:
    # The connection still offers a window, so bytes may be on their way.
    connections.resize_receive_buffer(queued_connection, 4 * KIB)
    after = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert after >= 64 * KIB


def test_resize_receive_buffer_clamps_window(queued_connection: socket.socket) -> None:
    connections.resize_receive_buffer(queued_connection, 8 * KIB)
    clamp = queued_connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP)
    # The window of a buffer set to 8 KiB, which Linux doubles.
    assert clamp == 16 * KIB


@pytest.fixture
def full_connection() -> Iterator[socket.socket]:
    """A client socket with a 16 KiB receive buffer that its peer has filled,
    so that it offers no window."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KIB)
    client.connect(server.getsockname())
    peer, _ = server.accept()
    peer.setblocking(False)
    deadline = time.monotonic() + 5
    while connections.offered_window(client) and time.monotonic() < deadline:
        try:
            peer.send(b"x" * 4 * KIB)
        except BlockingIOError:
            time.sleep(0.01)
    try:
        yield client
    finally:
        for sock in (client, peer, server):
            sock.close()


def test_resize_receive_buffer_without_window_below_queue(
    full_connection: socket.socket,
) -> None:
    # Nothing may arrive until the queue drains, so the buffer can go below it.
    queued = queued_bytes(full_connection)
    connections.resize_receive_buffer(full_connection, 4 * KIB)
    after = full_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert after < queued


def test_resize_receive_buffer_grows_for_room(queued_connection: socket.socket) -> None:
    # The first resize after a cut may hold more than the buffer did, for a
    # window that autotuning offered ahead of its memory.
    before = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    connections.resize_receive_buffer(
        queued_connection, 4 * KIB, room=2048 * KIB, grow=True
    )
    after = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert after > before


def test_resize_receive_buffer_later_never_grows(
    queued_connection: socket.socket,
) -> None:
    before = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    connections.resize_receive_buffer(queued_connection, 4 * KIB, room=2048 * KIB)
    after = queued_connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert after <= before


def test_queued_bytes_without_socket_is_zero() -> None:
    assert queued_bytes(None) == 0


def buffers_around_change(
    media_server: MediaServer,
    name: str,
    new_rate: float,
    *,
    fragmented: bool,
    start_rate: float | None = 4096 * KIB,
) -> tuple[int, int, int]:
    """Read a connection at ``start_rate``, change the rate to ``new_rate``;
    return its receive buffer before the change, right after it, and once
    the body is read.

    The file is sent at 2 MiB/s, so the queue stays far below the buffer of
    4 MiB/s, and it is longer than the window offered at the change.
    """
    body = random.Random(5).randbytes(1024 * KIB)
    url = media_server.add_file(name, body, rate=2048 * KIB)
    bucket = RecordingBucket(start_rate)
    watch = _Watch(track_validators=False, bucket=bucket)
    watch.fragmented = fragmented
    bucket.on_change = watch.follow_rate
    params = {"quiet": True, "compat_opts": {"prefer-legacy-http-handler"}}
    with (
        sized_receive_buffers(watch.receive_buffer),
        _WatchedYoutubeDL(params, watch, extractors=False) as ydl,
    ):
        response = ydl.urlopen(url)
        try:
            sock = socket_of(response)
            assert sock is not None
            before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            first = response.read(16 * KIB)
            bucket.set_rate(new_rate)
            after = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            # All but the last block: at the end of the body the socket closes.
            rest = b""
            while len(first) + len(rest) < len(body) - 64 * KIB:
                rest += response.read(16 * KIB)
            end = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            rest += response.read()
        finally:
            response.close()
    assert first + rest == body, "a resized connection lost or reordered bytes"
    return before, after, end


def test_rate_cut_resizes_fragment_connection(media_server: MediaServer) -> None:
    before, _, end = buffers_around_change(
        media_server, "cut.ts", 768 * KIB, fragmented=True
    )
    assert end < before


def test_rate_cut_keeps_room(media_server: MediaServer) -> None:
    # Bytes the connection had already invited would find no room and be
    # dropped, and the server would wait out a timeout to send them again.
    before, after, _ = buffers_around_change(
        media_server, "room.ts", 768 * KIB, fragmented=True
    )
    assert after >= before


def test_rate_cut_resizes_plain_connection(media_server: MediaServer) -> None:
    before, _, end = buffers_around_change(
        media_server, "cut.mp4", 64 * KIB, fragmented=False
    )
    assert end < before


def test_first_limit_resizes_unlimited_connection(media_server: MediaServer) -> None:
    before, _, end = buffers_around_change(
        media_server, "first.mp4", 64 * KIB, fragmented=False, start_rate=None
    )
    assert end < before


def test_small_rate_change_keeps_fragment_buffer(media_server: MediaServer) -> None:
    before, _, end = buffers_around_change(
        media_server, "kept.ts", 3072 * KIB, fragmented=True
    )
    assert end == before


def test_second_cut_keeps_room(media_server: MediaServer) -> None:
    # A raise between two cuts offers a new window, which the second cut
    # must leave room for like the first.
    body = random.Random(9).randbytes(1024 * KIB)
    url = media_server.add_file("recut.mp4", body, rate=2048 * KIB)
    bucket, watch = recording_watch(4096 * KIB)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            sock = socket_of(response)
            assert sock is not None
            read = response.read(16 * KIB)
            bucket.set_rate(64 * KIB)
            read += response.read(64 * KIB)
            bucket.set_rate(4096 * KIB)
            read += response.read(64 * KIB)
            window = connections.offered_window(sock)
            bucket.set_rate(64 * KIB)
            after = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            read += b"".join(iter(lambda: response.read(64 * KIB), b""))
        finally:
            response.close()

    assert after >= window
    assert read == body


def test_offered_window_of_new_connection(listener: tuple[str, int]) -> None:
    sock = socket.create_connection(listener, timeout=5)
    try:
        assert connections.offered_window(sock) > 0
    finally:
        sock.close()


def test_offered_window_without_socket_is_zero() -> None:
    assert connections.offered_window(None) == 0


def test_metered_read_forgets_ended_body(media_server: MediaServer) -> None:
    url = media_server.add_file("ended.mp4", random.Random(8).randbytes(16 * KIB))
    watch = _Watch(track_validators=False, bucket=RecordingBucket(None))
    params = {"quiet": True, "compat_opts": {"prefer-legacy-http-handler"}}
    with _WatchedYoutubeDL(params, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            response.read()
            # An empty read marks the end of the body, as yt-dlp reads it.
            response.read(4 * KIB)
        finally:
            response.close()
    assert len(watch.reads) == 0


def test_resize_receive_buffer_reports_size_reached(
    queued_connection: socket.socket,
) -> None:
    # 64 KiB queued and 16 KiB on the way need more than 4 KiB, but not more
    # than 512 KiB.
    resize = connections.resize_receive_buffer
    assert resize(queued_connection, 4 * KIB, room=16 * KIB) is False
    assert resize(queued_connection, 512 * KIB, room=16 * KIB) is True


def read_plain(
    media_server: MediaServer,
    name: str,
    rate: float,
    source_rate: float = 2048 * KIB,
    size: int = 1024 * KIB,
) -> tuple[bytes, bytes, int, int, int, int]:
    """Read a file of ``size`` bytes sent at ``source_rate`` bytes/s, limited
    to ``rate`` bytes/s.

    Return the body, the bytes read, the receive buffer after the first
    read and before the last block, the bytes charged, and the unit of the
    connection's windows.
    """
    body = random.Random(name).randbytes(size)
    url = media_server.add_file(name, body, rate=source_rate)
    bucket, watch = recording_watch(rate)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            sock = socket_of(response)
            assert sock is not None
            read = response.read(4 * KIB)
            first = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            # All but the last block: at the end of the body the socket closes.
            while len(read) < len(body) - 64 * KIB:
                read += response.read(16 * KIB)
            end = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            granule = connections.window_granule(sock)
            read += b"".join(iter(lambda: response.read(16 * KIB), b""))
        finally:
            response.close()
    return body, read, first, end, sum(bucket.charges), granule


def test_plain_connection_in_band_sized_to_rate(media_server: MediaServer) -> None:
    _, _, _, end, _, granule = read_plain(media_server, "band.mp4", 160 * KIB)
    # A window unit more than the window, doubled by Linux.
    assert end == 2 * (receive_buffer_for(160 * KIB, 1) + granule)


def test_plain_connection_at_band_top_sized_to_rate(media_server: MediaServer) -> None:
    _, _, _, end, _, granule = read_plain(media_server, "top.mp4", 256 * KIB)
    assert end == 2 * (receive_buffer_for(256 * KIB, 1) + granule)


def test_plain_connection_in_band_charges_every_byte(
    media_server: MediaServer,
) -> None:
    body, read, _, _, charged, _ = read_plain(media_server, "charged.mp4", 160 * KIB)
    assert read == body
    assert charged == len(body)


def test_plain_connection_above_band_keeps_buffer(media_server: MediaServer) -> None:
    _, _, first, end, _, _ = read_plain(media_server, "above.mp4", 1024 * KIB)
    assert end >= first


def test_plain_connection_at_lowest_rate_sized(media_server: MediaServer) -> None:
    # An autotuned buffer took bursts of about 208 KiB at 64K, three seconds
    # of the rate.
    _, _, _, end, _, granule = read_plain(
        media_server, "low.mp4", 64 * KIB, size=384 * KIB
    )
    assert end == 2 * (receive_buffer_for(64 * KIB, 1) + granule)


def plain_watch(rate: float, *, downloading: bool = True) -> _Watch:
    """Return the watch of a plain download limited to ``rate`` bytes/s."""
    watch = _Watch(track_validators=False, bucket=TokenBucket(rate))
    watch.downloading = downloading
    return watch


def test_plain_download_connects_sized_at_low_rate() -> None:
    # Sized only from its first read, the connection took 131 KiB, 2 s of
    # 64K, in its first window.
    watch = plain_watch(64 * KIB)
    assert watch.receive_buffer() == receive_buffer_for(64 * KIB, 1)


def test_plain_download_connects_autotuned_above_max() -> None:
    watch = plain_watch(2 * ytdlp.PLAIN_SIZED_MAX_RATE)
    assert watch.receive_buffer() is None


def fragment_watch(rate: float, round_trip_s: float) -> _Watch:
    """Return the watch of an HLS download limited to ``rate`` bytes/s whose
    latest response came over a round trip of ``round_trip_s`` seconds."""
    watch = _Watch(track_validators=False, bucket=TokenBucket(rate))
    watch.fragmented = True
    watch.round_trip_s = round_trip_s
    return watch


def test_fragment_buffer_on_short_round_trip() -> None:
    watch = fragment_watch(512 * KIB, 0.0001)
    assert watch.receive_buffer() == receive_buffer_for(512 * KIB, 4, 0.1)


def test_fragment_buffer_holds_two_round_trips() -> None:
    # A buffer of 0.1 s of its share would cap the connection at a third of
    # it over a round trip of 0.3 s.
    watch = fragment_watch(512 * KIB, 0.3)
    assert watch.receive_buffer() == receive_buffer_for(512 * KIB, 4, 0.6)


def test_plain_buffer_holds_two_round_trips() -> None:
    watch = plain_watch(64 * KIB)
    watch.round_trip_s = 0.25
    assert watch.receive_buffer() == receive_buffer_for(64 * KIB, 1, 0.5)


def test_response_notes_round_trip(media_server: MediaServer) -> None:
    url = media_server.add_file("trip.mp4", random.Random(9).randbytes(16 * KIB))
    watch = _Watch(track_validators=False)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        ydl.urlopen(url).close()
    assert 0 < watch.round_trip_s < 0.05


def test_extractor_requests_connect_autotuned() -> None:
    watch = plain_watch(64 * KIB, downloading=False)
    assert watch.receive_buffer() is None


def recorded_resizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the buffer size of every resize_receive_buffer call from now on."""
    resized: list[int] = []
    real_resize = ytdlp.resize_receive_buffer

    def recording_resize(
        sock: socket.socket | None, size: int, room: int = 0, grow: bool = False
    ) -> bool:
        resized.append(size)
        return real_resize(sock, size, room, grow)

    monkeypatch.setattr(ytdlp, "resize_receive_buffer", recording_resize)
    return resized


def test_plain_connection_held_by_source_sized_to_rate(
    media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 s of a source at a quarter of the limit: its reads wait for it, so
    # the buffer is sized before the source could speed up.
    resized = recorded_resizes(monkeypatch)
    read_plain(
        media_server, "held.mp4", 1024 * KIB, source_rate=256 * KIB, size=512 * KIB
    )
    assert resized
    assert set(resized) == {receive_buffer_for(1024 * KIB, 1)}


def read_watched(
    url: str,
    watch: _Watch,
    at_bytes: int = 0,
    action: Callable[[socket.socket], None] | None = None,
) -> bytes:
    """Read ``url`` through yt-dlp with ``watch`` in blocks of 16 KiB, and
    call ``action`` with the socket once ``at_bytes`` bytes are read."""
    with open_response(watch, url, None) as (response, sock):
        read = response.read(16 * KIB)
        while len(read) < at_bytes:
            read += response.read(16 * KIB)
        if action is not None:
            action(sock)
        return read + b"".join(iter(lambda: response.read(16 * KIB), b""))


def resume_after_gap(
    media_server: MediaServer, url: str, sock: socket.socket, gap_s: float
) -> None:
    """Once ``sock``'s receive queue has drained, wait ``gap_s`` seconds and
    let the source send at full speed."""
    deadline = time.monotonic() + 5.0
    while connections.queued_bytes(sock) > 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(gap_s)
    media_server.set_rate(url, None)


def read_through_gap(
    media_server: MediaServer, url: str, watch: _Watch, at_bytes: int
) -> bytes:
    """Read ``url`` as ``read_watched`` does, its source sending nothing
    for 0.25 s once ``at_bytes`` bytes are read and the queue has drained,
    then sending at full speed."""
    threads: list[threading.Thread] = []

    def pause(sock: socket.socket) -> None:
        # At one byte a second the source sends nothing until the resume.
        media_server.set_rate(url, 1.0)
        resume = threading.Thread(
            target=resume_after_gap, args=(media_server, url, sock, 0.25)
        )
        resume.start()
        threads.append(resume)

    read = read_watched(url, watch, at_bytes, pause)
    for thread in threads:
        thread.join()
    return read


def limited_file(
    media_server: MediaServer, name: str, source_rate: float, limit: float
) -> tuple[bytes, str, _Watch]:
    """Serve 1 MiB named ``name`` at ``source_rate`` bytes/s; return its
    body, its URL and a watch limited to ``limit`` bytes/s."""
    body = random.Random(name).randbytes(1024 * KIB)
    url = media_server.add_file(name, body, rate=source_rate)
    return body, url, _Watch(track_validators=False, bucket=TokenBucket(limit))


def test_plain_connection_gap_sized_to_rate(
    media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fast source that pauses once for 0.25 s, which is far less than half
    # of the reads' time and shorter than a stall. A source with such gaps
    # sends in bursts, which an autotuned buffer would take at once.
    body, url, watch = limited_file(media_server, "gap.mp4", 4096 * KIB, 1024 * KIB)
    resized = recorded_resizes(monkeypatch)
    read = read_through_gap(media_server, url, watch, 256 * KIB)
    assert read == body
    assert set(resized) == {receive_buffer_for(1024 * KIB, 1)}


def test_plain_connection_held_to_rate_not_resized(
    media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A source four times as fast as the limit, for 2 s: the reads wait for
    # tokens, not for the source.
    body, url, watch = limited_file(media_server, "fast.mp4", 2048 * KIB, 512 * KIB)
    resized = recorded_resizes(monkeypatch)
    read = read_watched(url, watch)
    assert read == body
    assert resized == []


def test_plain_connection_held_by_source_charges_speedup(
    media_server: MediaServer,
) -> None:
    # 1.5 s at a quarter of the limit, then as fast as the server sends: the
    # sized buffer fills at once, and that growth is charged as it arrives,
    # in a charge larger than any read of 16 KiB, but only once.
    body = random.Random(13).randbytes(1024 * KIB)
    url = media_server.add_file("speedup.mp4", body, rate=128 * KIB)
    bucket = CountingBucket(512 * KIB)
    watch = _Watch(track_validators=False, bucket=bucket)
    read = read_watched(
        url, watch, 192 * KIB, lambda _sock: media_server.set_rate(url, None)
    )
    assert read == body
    assert max(bucket.charges) > 16 * KIB
    assert sum(bucket.charges) == len(body)


def test_band_refill_charged_on_arrival(
    media_server: MediaServer,
) -> None:
    # At 192K the buffer is sized from the first read. After a gap of the
    # source, the sized buffer refills at once, and the refill is charged
    # with the next read, larger than any read of 16 KiB, but only once.
    body = random.Random("band").randbytes(384 * KIB)
    url = media_server.add_file("band.mp4", body, rate=4096 * KIB)
    bucket, watch = recording_watch(192 * KIB)
    read = read_through_gap(media_server, url, watch, 128 * KIB)
    assert read == body
    assert max(bucket.charges) > 16 * KIB
    assert sum(bucket.charges) == len(body)


def read_band_gap(media_server: MediaServer) -> RecordingBucket:
    """Read 384 KiB from ``media_server`` under 192K, its source sending
    nothing for 0.25 s after 128 KiB. Return the bucket."""
    body = random.Random("band gap").randbytes(384 * KIB)
    url = media_server.add_file("band-gap.mp4", body, rate=4096 * KIB)
    bucket, watch = recording_watch(192 * KIB)
    read = read_through_gap(media_server, url, watch, 128 * KIB)
    assert read == body
    return bucket


def test_band_connection_watched_small_segments() -> None:
    # Segments of 1448 bytes, as over a real path: the buffer sized to 192K
    # has room for many, so the gap marks the source, and its store is
    # trimmed.
    with MediaServer(segment=1448) as server:
        bucket = read_band_gap(server)
    assert HELD_BURST_S in bucket.kept


def test_band_connection_unwatched_on_loopback(
    media_server: MediaServer,
) -> None:
    # 64 KiB segments: the sized buffer has room for less than one, so its
    # reads wait for the sender's window probes, and the store is left
    # whole.
    bucket = read_band_gap(media_server)
    assert bucket.kept == []


def read_held_then_charge(
    media_server: MediaServer, name: str, bucket: TokenBucket
) -> bool:
    """Read 1.5 s of a source at a quarter of ``bucket``'s rate, then
    return whether the bucket still had HELD_BURST_S and 0.05 s more."""
    rate = bucket.rate
    assert rate is not None
    body = random.Random(name).randbytes(512 * KIB)
    url = media_server.add_file(name, body, rate=rate / 4)
    watch = _Watch(track_validators=False, bucket=bucket)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        try:
            read = response.read(16 * KIB)
            while len(read) < 384 * KIB:
                read += response.read(16 * KIB)
            return bucket.charge(int(rate * (HELD_BURST_S + 0.05)))
        finally:
            response.close()


def test_plain_connection_held_by_source_keeps_small_burst(
    media_server: MediaServer,
) -> None:
    # The bucket's store, full at BURST_S while the reads wait for the
    # source, keeps HELD_BURST_S once the connection is found held back.
    in_store = read_held_then_charge(media_server, "keep.mp4", TokenBucket(1024 * KIB))
    assert in_store is False


def test_pooled_connection_held_by_source_keeps_small_burst(
    media_server: MediaServer,
) -> None:
    spare = SpareTokens()
    spare.set_rate(1024 * KIB)
    bucket = TokenBucket(1024 * KIB, spare=spare)
    in_store = read_held_then_charge(media_server, "keep-pooled.mp4", bucket)
    assert in_store is False


def test_plain_connection_held_by_source_reads_body(
    media_server: MediaServer,
) -> None:
    body, read, _, _, _, _ = read_plain(
        media_server, "held-body.mp4", 1024 * KIB, source_rate=256 * KIB, size=512 * KIB
    )
    assert read == body


@contextlib.contextmanager
def open_response(
    watch: _Watch, url: str, connect_size: int | None
) -> Iterator[tuple[Any, socket.socket]]:
    """Open ``url`` through yt-dlp with ``watch`` and a receive buffer of
    ``connect_size`` bytes (None: the kernel's). Yield the response and its
    socket, and close them afterwards."""
    with (
        sized_receive_buffers(lambda: connect_size),
        _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl,
    ):
        response = ydl.urlopen(url)
        try:
            sock = socket_of(response)
            assert sock is not None
            yield response, sock
        finally:
            response.close()


def open_fragment(
    media_server: MediaServer,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    rate: float,
    connect_size: int | None,
) -> tuple[list[int], int]:
    """Open a fragment connection of a download limited to ``rate`` bytes/s,
    connected with a receive buffer of ``connect_size`` (None: the kernel's).

    Return the buffer sizes that the connection was resized to before any
    read, and its receive buffer once the response is open.
    """
    url = media_server.add_file(name, random.Random(name).randbytes(256 * KIB))
    _, watch = recording_watch(rate)
    watch.fragmented = True
    resized = recorded_resizes(monkeypatch)
    with open_response(watch, url, connect_size) as (_, sock):
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return resized, size


# The window clamp itself is not read back here. Linux (6.18 here) resets it
# to what the buffer holds when an arriving packet changes the connection's
# ratio of payload to memory, as the first data packets after a header do.
# The next read's resize sets it again (resize_receive_buffer).
def test_fragment_opened_before_cut_resized_at_response(
    media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Connected with the kernel's buffer, as without a limit, with its
    # response after a limit of 64 KiB/s: it is resized before any read.
    resized, _ = open_fragment(media_server, monkeypatch, "late.ts", 64 * KIB, None)
    assert resized == [receive_buffer_for(64 * KIB, 4)]


def test_fragment_opened_for_higher_rate_resized_at_response(
    media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    resized, _ = open_fragment(
        media_server,
        monkeypatch,
        "high.ts",
        64 * KIB,
        receive_buffer_for(4096 * KIB, 4),
    )
    assert resized == [receive_buffer_for(64 * KIB, 4)]


def test_fragment_opened_at_rate_keeps_buffer(
    media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = receive_buffer_for(1024 * KIB, 4)
    resized, size = open_fragment(
        media_server, monkeypatch, "kept.ts", 1024 * KIB, buffer
    )
    assert resized == []
    # Linux doubles the value set.
    assert size == 2 * buffer


def test_follow_rate_forgets_closed_connection(media_server: MediaServer) -> None:
    url = media_server.add_file("closed.mp4", random.Random(11).randbytes(64 * KIB))
    bucket, watch = recording_watch(1024 * KIB)
    with _WatchedYoutubeDL(PARAMS, watch, extractors=False) as ydl:
        response = ydl.urlopen(url)
        response.read(4 * KIB)
        response.close()
        bucket.set_rate(64 * KIB)
    assert len(watch.reads) == 0


@contextlib.contextmanager
def pausing_source(head: bytes, tail: bytes) -> Iterator[str]:
    """Serve one GET of ``head + tail`` on 127.0.0.1: the head at once, then
    nothing for a little longer than STALL_S, then the tail at once.

    Yield the URL.
    """
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError):
            peer, _ = server.accept()
            with peer:
                peer.settimeout(10)
                peer.recv(64 * KIB)
                header = (
                    "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n"
                    f"Content-Length: {len(head) + len(tail)}\r\n\r\n"
                )
                peer.sendall(header.encode() + head)
                time.sleep(STALL_S + 0.3)
                peer.sendall(tail)
                # Until the client has read the body and closed.
                peer.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    host, port = server.getsockname()
    try:
        yield f"http://{host}:{port}/paused.mp4"
    finally:
        server.close()
        thread.join(timeout=15)


def read_through_pause(
    watch: _Watch, seed: int, tail_kib: int, connect_size: int | None = None
) -> tuple[bytes, bytes, int, int]:
    """Read a body of 8 KiB and ``tail_kib`` KiB more, whose source pauses
    after the first 8 KiB, in 4 KiB reads.

    Return the body, the bytes read, the receive buffer before the last
    block and the connection's window unit.
    """
    head = random.Random(seed).randbytes(8 * KIB)
    tail = random.Random(seed + 1).randbytes(tail_kib * KIB)
    with (
        pausing_source(head, tail) as url,
        open_response(watch, url, connect_size) as (response, sock),
    ):
        read = b""
        while len(read) < len(head) + len(tail) - 16 * KIB:
            read += response.read(4 * KIB)
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        granule = connections.window_granule(sock)
        read += b"".join(iter(lambda: response.read(4 * KIB), b""))
    return head + tail, read, size, granule


def test_metered_read_pause_drops_tokens() -> None:
    bucket = TokenBucket(1024 * KIB)
    watch = _Watch(track_validators=False, bucket=bucket)
    bucket.on_change = watch.follow_rate

    read_through_pause(watch, 20, 20)

    # Kept, the 0.25 s burst of 256 KiB would cover these 64 KiB.
    assert not bucket.charge(64 * KIB)


def test_metered_read_pause_sizes_plain_buffer() -> None:
    # 64K is below the band of rates sized from the first read.
    _, watch = recording_watch(64 * KIB)

    _, _, size, granule = read_through_pause(watch, 22, 256)

    assert size == 2 * (receive_buffer_for(64 * KIB, 1) + granule)


def test_metered_read_pause_charges_plain_reads() -> None:
    bucket, watch = recording_watch(1024 * KIB)

    body, read, _, _ = read_through_pause(watch, 24, 120)

    assert read == body
    assert sum(bucket.charges) == len(body)


def test_metered_read_pause_charges_fragment_refill() -> None:
    # The tail lands in the 128 KiB buffer at once, before the reads. At 2M
    # a fragment connection opens with 52 KiB, so 128 KiB is within
    # RESIZE_BELOW of it and counts as opened at the rate, not before a cut.
    bucket, watch = recording_watch(2048 * KIB)
    watch.fragmented = True

    body, read, _, _ = read_through_pause(watch, 26, 120, connect_size=128 * KIB)

    assert read == body
    assert sum(bucket.charges) >= len(body) + 16 * KIB
