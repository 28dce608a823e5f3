"""One SSL context for every YoutubeDL of a download process."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
import yt_dlp
from yt_dlp.networking import common

from vodq.download.ytdlp import share_ssl_context


@pytest.fixture
def local_url() -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_ssl_context_is_shared() -> None:
    assert share_ssl_context()


def test_ssl_context_default_is_built_once(local_url: str) -> None:
    cached = common.make_ssl_context
    hits = cached.cache_info().hits

    with yt_dlp.YoutubeDL({"quiet": True}, auto_init=False) as ydl:
        ydl.urlopen(local_url).read()

    assert cached.cache_info().hits > hits
