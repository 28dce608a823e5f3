"""Tests of the test media server, against httpx, raw sockets and the real yt-dlp."""

from __future__ import annotations

import email.utils
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yt_dlp

from mediaserver import Fault, MediaServer

# Byte i of DATA is i % 256, so a slice shows at a glance which offsets it came from.
DATA = bytes(range(256)) * 40
SIZE = len(DATA)
CLIENT_TIMEOUT = httpx.Timeout(5.0)
KIB = 1024
# httpx 0.29 loads the CA bundle for each Client that builds its own SSL context,
# which took about 80 ms per Client on the development machine. Every test speaks
# plain HTTP, so the clients share one context.
SSL_CONTEXT = ssl.create_default_context()


@pytest.fixture
def server() -> Iterator[MediaServer]:
    with MediaServer() as media_server:
        yield media_server


def make_client(timeout: httpx.Timeout = CLIENT_TIMEOUT) -> httpx.Client:
    return httpx.Client(timeout=timeout, verify=SSL_CONTEXT)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with make_client() as http_client:
        yield http_client


def random_bytes(n_bytes: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n_bytes)


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll `condition` every 10 ms until it returns True or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def read_until_error(client: httpx.Client, url: str) -> tuple[bytes, Exception | None]:
    """GET `url` and return the body bytes received and the error that ended it."""
    received = bytearray()
    try:
        with client.stream("GET", url) as response:
            for chunk in response.iter_raw():
                received += chunk
    except httpx.TransportError as error:
        return bytes(received), error
    return bytes(received), None


def ytdlp_options(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "outtmpl": str(tmp_path / "%(id)s.%(ext)s"),
        "quiet": True,
        "noprogress": True,
        **extra,
    }


# Plain files


def test_file_get_returns_whole_body(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = client.get(url)

    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["Content-Length"] == str(SIZE)
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.headers["Accept-Ranges"] == "bytes"


def test_file_get_sends_validators(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)
    other_url = server.add_file("other.mp4", DATA[::-1])

    first = client.get(url)
    second = client.get(url)
    other = client.get(other_url)

    assert first.headers["ETag"].startswith('"')
    assert first.headers["ETag"] == second.headers["ETag"]
    assert first.headers["ETag"] != other.headers["ETag"]
    assert first.headers["Last-Modified"].endswith(" GMT")
    assert first.headers["Last-Modified"] == second.headers["Last-Modified"]


def test_file_url_is_under_base_url(server: MediaServer) -> None:
    url = server.add_file("clip.mp4", DATA)

    assert server.base_url.startswith("http://127.0.0.1:")
    assert url == server.base_url + "/files/clip.mp4"


def test_file_name_with_space_is_quoted(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("my clip.mp4", DATA)

    response = client.get(url)

    assert url.endswith("/files/my%20clip.mp4")
    assert response.content == DATA
    assert server.requests[0].path == "/files/my clip.mp4"


def test_file_added_again_replaces_data(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.add_file("clip.mp4", b"new")

    assert client.get(url).content == b"new"


def test_replace_file_serves_new_bytes(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    assert server.replace_file("clip.mp4", b"new bytes") == url
    assert client.get(url).content == b"new bytes"


def test_replace_file_changes_validators(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    before = client.head(url).headers

    server.replace_file("clip.mp4", DATA[::-1])
    after = client.head(url).headers

    assert after["ETag"] != before["ETag"]
    assert after["Last-Modified"] != before["Last-Modified"]


def test_replace_file_same_bytes_moves_last_modified(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    before = client.head(url).headers

    server.replace_file("clip.mp4", DATA, etag=before["ETag"])
    after = client.head(url).headers

    assert after["ETag"] == before["ETag"]
    assert email.utils.parsedate_to_datetime(
        after["Last-Modified"]
    ) > email.utils.parsedate_to_datetime(before["Last-Modified"])


def test_replace_file_explicit_etag(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)

    server.replace_file("clip.mp4", b"v2", etag='"v2"')

    assert client.head(url).headers["ETag"] == '"v2"'


def test_replace_file_keeps_throttle(server: MediaServer) -> None:
    server.add_file("clip.mp4", DATA, rate=1000.0)

    server.replace_file("clip.mp4", b"x")

    resource = server._find_resource("/files/clip.mp4")
    assert resource is not None
    assert resource.throttle.rate == 1000.0


def test_replace_file_unknown_name_raises(server: MediaServer) -> None:
    with pytest.raises(KeyError, match="add it with add_file"):
        server.replace_file("absent.mp4", b"x")


def test_unknown_path_returns_404(server: MediaServer, client: httpx.Client) -> None:
    response = client.get(server.base_url + "/files/missing.mp4")

    assert response.status_code == 404
    assert server.requests[0].status == 404


def test_post_returns_405(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = client.post(url, content=b"x")

    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"


def test_empty_file_returns_empty_body(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("empty.mp4", b"")

    response = client.get(url)

    assert response.status_code == 200
    assert response.content == b""
    assert server.requests[0].body_started is None


# Ranges


def get_range(client: httpx.Client, url: str, range_header: str) -> httpx.Response:
    return client.get(url, headers={"Range": range_header})


def test_range_closed_returns_slice(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, "bytes=100-199")

    assert response.status_code == 206
    assert response.content == DATA[100:200]
    assert response.headers["Content-Range"] == f"bytes 100-199/{SIZE}"
    assert response.headers["Content-Length"] == "100"


def test_whole_fault_ignores_range(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.whole()])

    response = get_range(client, url, "bytes=100-199")

    assert response.status_code == 200
    assert response.content == DATA
    assert "Content-Range" not in response.headers


def test_range_open_ended_returns_rest(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, "bytes=10000-")

    assert response.status_code == 206
    assert response.content == DATA[10000:]
    assert response.headers["Content-Range"] == f"bytes 10000-{SIZE - 1}/{SIZE}"


def test_range_suffix_returns_tail(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, "bytes=-100")

    assert response.status_code == 206
    assert response.content == DATA[-100:]
    assert response.headers["Content-Range"] == f"bytes {SIZE - 100}-{SIZE - 1}/{SIZE}"


def test_range_suffix_longer_than_file_returns_all(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, f"bytes=-{SIZE * 2}")

    assert response.status_code == 206
    assert response.content == DATA
    assert response.headers["Content-Range"] == f"bytes 0-{SIZE - 1}/{SIZE}"


def test_range_end_past_size_is_clamped(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, f"bytes={SIZE - 40}-{SIZE * 10}")

    assert response.status_code == 206
    assert response.content == DATA[-40:]
    assert response.headers["Content-Range"] == f"bytes {SIZE - 40}-{SIZE - 1}/{SIZE}"


@pytest.mark.parametrize("range_header", [f"bytes={SIZE}-", "bytes=-0"])
def test_range_unsatisfiable_returns_416(
    server: MediaServer, client: httpx.Client, range_header: str
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, range_header)

    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{SIZE}"
    assert response.content == b""


@pytest.mark.parametrize(
    "range_header", ["bytes=0-1,5-6", "bytes=abc", "bytes=9-3", "items=0-1"]
)
def test_range_unsupported_returns_whole_file(
    server: MediaServer, client: httpx.Client, range_header: str
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = get_range(client, url, range_header)

    assert response.status_code == 200
    assert response.content == DATA
    assert "Content-Range" not in response.headers


# HEAD and keep-alive


def test_head_returns_headers_without_body(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = client.head(url)
    assert server.wait_idle()
    record = server.requests[0]

    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["Content-Length"] == str(SIZE)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert record.method == "HEAD"
    assert record.bytes_sent == 0


def test_head_with_range_returns_206_headers(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    response = client.head(url, headers={"Range": "bytes=0-9"})

    assert response.status_code == 206
    assert response.headers["Content-Length"] == "10"
    assert response.headers["Content-Range"] == f"bytes 0-9/{SIZE}"


def test_keepalive_reuses_connection(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)

    client.head(url)
    client.get(url)
    client.get(url, headers={"Range": "bytes=0-0"})
    connection_ids = {record.connection_id for record in server.requests}

    assert len(server.requests) == 3
    assert len(connection_ids) == 1


def test_keepalive_error_response_keeps_connection(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.status(500, body=b"boom")])

    client.get(url)
    client.get(server.base_url + "/missing")
    client.get(url)
    connection_ids = {record.connection_id for record in server.requests}

    assert len(connection_ids) == 1


def test_keepalive_pipelined_request_is_served(
    server: MediaServer,
) -> None:
    data = random_bytes(32 * KIB)
    server.add_file("slow.mp4", data, rate=128 * KIB)
    request = b"GET /files/slow.mp4 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    received = bytearray()

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request + b"\r\n")
        received += sock.recv(64 * KIB)
        # The second request reaches the socket while the first body is throttled.
        sock.sendall(request + b"Connection: close\r\n\r\n")
        while chunk := sock.recv(64 * KIB):
            received += chunk

    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert received.endswith(data)
    assert len(received) > 2 * len(data)
    assert server.errors == []


# Faults


def test_truncate_fault_sends_short_body(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.truncate(1000)])

    received, error = read_until_error(client, url)
    record = server.requests[0]

    assert received == DATA[:1000]
    assert isinstance(error, httpx.RemoteProtocolError)
    assert record.status == 200
    assert record.bytes_sent == 1000
    assert record.fault == "truncate"


def test_truncate_fault_keeps_range_headers(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.truncate(500)])
    received = bytearray()
    error: Exception | None = None

    try:
        with client.stream("GET", url, headers={"Range": "bytes=1000-"}) as response:
            for chunk in response.iter_raw():
                received += chunk
    except httpx.RemoteProtocolError as caught:
        error = caught

    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes 1000-{SIZE - 1}/{SIZE}"
    assert response.headers["Content-Length"] == str(SIZE - 1000)
    assert bytes(received) == DATA[1000:1500]
    assert error is not None


def test_reset_fault_resets_raw_socket(server: MediaServer) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.reset()])
    request = b"GET /files/clip.mp4 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)

    assert server.requests[0].status == 0
    assert server.requests[0].fault == "reset"


def test_reset_fault_raises_read_error_in_httpx(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.reset()])

    with pytest.raises(httpx.ReadError):
        client.get(url)
    assert client.get(url).content == DATA


@pytest.mark.parametrize("code", [401, 403, 404, 410, 500, 503])
def test_status_fault_returns_code(
    server: MediaServer, client: httpx.Client, code: int
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.status(code, body=b"nope")])

    response = client.get(url)

    assert response.status_code == code
    assert response.content == b"nope"
    assert server.requests[0].status == code


def test_status_fault_sends_extra_headers(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    headers = {"WWW-Authenticate": 'Basic realm="vod"'}
    server.script(url, [Fault.status(401, headers=headers)])

    response = client.get(url)

    assert response.headers["WWW-Authenticate"] == 'Basic realm="vod"'
    assert response.content == b""


def test_status_fault_works_for_unknown_path(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.base_url + "/files/later.mp4"
    server.script(url, [Fault.status(503)])

    assert client.get(url).status_code == 503
    assert client.get(url).status_code == 404


def test_too_many_sets_retry_after(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.too_many(7)])

    response = client.get(url)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"


def test_stall_fault_pauses_then_closes(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.stall(0.3, after_bytes=4000)])

    started = time.monotonic()
    received, error = read_until_error(client, url)
    elapsed = time.monotonic() - started

    assert received == DATA[:4000]
    assert isinstance(error, httpx.RemoteProtocolError)
    assert elapsed >= 0.3
    assert elapsed < 2.0


def test_stall_fault_hits_client_read_timeout(server: MediaServer) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.stall(10.0, after_bytes=100)])
    timeout = httpx.Timeout(5.0, read=0.2)

    with make_client(timeout) as client:
        received, error = read_until_error(client, url)

    assert received == DATA[:100]
    assert isinstance(error, httpx.ReadTimeout)
    # The server notices the closed connection during the stall and ends it.
    assert server.wait_idle(timeout=2.0)
    assert server.requests[0].client_closed


def test_stall_fault_ends_when_server_stops(server: MediaServer) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.stall(30.0, after_bytes=100)])
    errors: list[Exception | None] = []

    def download() -> None:
        with make_client() as client:
            errors.append(read_until_error(client, url)[1])

    thread = threading.Thread(target=download)
    thread.start()
    assert wait_until(
        lambda: bool(server.requests) and server.requests[0].bytes_sent > 0
    )
    started = time.monotonic()
    server.stop()
    stop_seconds = time.monotonic() - started
    thread.join(5)

    assert stop_seconds < 2.0
    assert not thread.is_alive()
    assert isinstance(errors[0], httpx.RemoteProtocolError)


def test_script_pops_faults_in_order(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.status(500), Fault.passthrough(), Fault.status(404)])
    server.script(url, [Fault.too_many(1)])

    statuses = [client.get(url).status_code for _ in range(5)]
    faults = [record.fault for record in server.requests]

    assert statuses == [500, 200, 404, 429, 200]
    assert faults == ["status", None, "status", "status", None]


def test_script_is_not_popped_by_head(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.status(500)])

    head = client.head(url)
    get = client.get(url)

    assert head.status_code == 200
    assert get.status_code == 500


def test_script_affects_only_its_path(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    other_url = server.add_file("other.mp4", DATA)
    server.script(url, [Fault.status(500)])

    assert client.get(other_url).status_code == 200
    assert client.get(url).status_code == 500


def test_fault_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="status code"):
        Fault.status(99)
    with pytest.raises(ValueError, match="n_bytes"):
        Fault.truncate(-1)
    with pytest.raises(ValueError, match="seconds"):
        Fault.stall(-1.0)


def test_wait_idle_times_out_during_stall(server: MediaServer) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.stall(1.0, after_bytes=100)])

    with make_client() as client, client.stream("GET", url) as response:
        # Closing the iterator would close the response, so keep a reference.
        chunks = response.iter_raw()
        next(chunks)
        idle = server.wait_idle(timeout=0.1)

    assert not idle
    assert server.wait_idle(timeout=2.0)


# Request records


def test_requests_record_range_and_bytes(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    get_range(client, url, "bytes=10-19")
    assert server.wait_idle()
    record = server.requests_for(url)[0]

    assert record.method == "GET"
    assert record.path == "/files/clip.mp4"
    assert record.range_header == "bytes=10-19"
    assert record.status == 206
    assert record.bytes_sent == 10
    assert record.finished is not None
    assert record.started <= record.finished
    assert not record.client_closed


def test_requests_for_filters_by_path(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    other_url = server.add_file("other.mp4", DATA)

    client.get(url)
    client.get(other_url)
    client.get(url + "?attempt=2")

    assert len(server.requests) == 3
    assert len(server.requests_for(url)) == 2
    assert len(server.requests_for("/files/other.mp4")) == 1


def test_reset_stats_clears_requests(server: MediaServer, client: httpx.Client) -> None:
    url = server.add_file("clip.mp4", DATA)
    client.get(url)

    server.reset_stats()

    assert server.requests == []
    assert server.max_concurrent() == 0


def test_client_disconnect_is_quiet(
    server: MediaServer, capfd: pytest.CaptureFixture[str]
) -> None:
    # Linux caps a socket's send buffer at net.ipv4.tcp_wmem[2], 4 MiB by default,
    # and the client's receive buffer is kept small, so a 16 MiB body cannot fit
    # into the buffers and a server write must fail once the client is gone.
    size = 16 * 1024 * KIB
    server.add_file("big.mp4", bytes(size))
    request = b"GET /files/big.mp4 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KIB)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(request)
        sock.recv(KIB)
    assert server.wait_idle()
    server.stop()

    assert server.requests[0].client_closed
    assert server.requests[0].bytes_sent < size
    assert server.errors == []
    assert capfd.readouterr().err == ""


# Throttling and concurrency


def test_throttle_limits_rate(server: MediaServer, client: httpx.Client) -> None:
    # Four 16 KiB chunks at 128 KiB/s leave three pauses of 0.125 s.
    url = server.add_file("slow.mp4", random_bytes(64 * KIB), rate=128 * KIB)

    started = time.monotonic()
    client.get(url)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.3
    assert elapsed < 2.0


def test_max_concurrent_counts_parallel_downloads(server: MediaServer) -> None:
    data = random_bytes(96 * KIB)
    url = server.add_file("slow.mp4", data, rate=192 * KIB)
    barrier = threading.Barrier(3, timeout=5)
    bodies: list[bytes] = []

    def download() -> None:
        with make_client() as client:
            barrier.wait()
            bodies.append(client.get(url).content)

    threads = [threading.Thread(target=download) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert bodies == [data, data, data]
    assert server.max_concurrent("/files/") == 3
    assert server.max_concurrent(url) == 3
    assert server.max_concurrent("/hls/") == 0


def test_max_concurrent_sequential_downloads_is_one(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)

    for _ in range(3):
        client.get(url)

    assert server.max_concurrent() == 1


def test_max_concurrent_ignores_head_and_errors(
    server: MediaServer, client: httpx.Client
) -> None:
    url = server.add_file("clip.mp4", DATA)
    server.script(url, [Fault.reset()])

    with pytest.raises(httpx.ReadError):
        client.get(url)
    client.head(url)
    client.get(server.base_url + "/files/missing.mp4")
    get_range(client, url, f"bytes={SIZE}-")

    assert len(server.requests) == 4
    assert server.max_concurrent() == 0


def test_max_concurrent_probe_counts_while_open(server: MediaServer) -> None:
    # At 64 KiB/s the whole body would take 16 s, so the record can only finish
    # early because the server saw the client close.
    url = server.add_file("slow.mp4", random_bytes(1024 * KIB), rate=64 * KIB)

    with (
        make_client() as client,
        client.stream("GET", url) as response,
    ):
        status = response.status_code
        assert server.active() == 1
    assert server.wait_idle(timeout=2.0)
    record = server.requests[0]

    assert status == 200
    assert record.client_closed
    assert record.bytes_sent < 1024 * KIB
    assert server.max_concurrent() == 1
    assert server.active() == 0


def test_active_counts_inflight_gets(server: MediaServer) -> None:
    # Two 16 KiB chunks at 64 KiB/s leave one pause of 0.25 s.
    url = server.add_file("slow.mp4", random_bytes(32 * KIB), rate=64 * KIB)
    options = {"timeout": CLIENT_TIMEOUT, "verify": SSL_CONTEXT}
    threads = [
        threading.Thread(target=httpx.get, args=(url,), kwargs=options)
        for _ in range(2)
    ]

    for thread in threads:
        thread.start()
    both_active = wait_until(lambda: server.active("/files/") == 2)
    for thread in threads:
        thread.join(10)

    assert both_active
    assert server.wait_idle()
    assert server.active() == 0


def test_set_rate_speeds_up_live_transfer(server: MediaServer) -> None:
    data = random_bytes(512 * KIB)
    # Unchanged, 512 KiB at 16 KiB/s would take 31 s.
    url = server.add_file("slow.mp4", data, rate=16 * KIB)
    received = bytearray()

    started = time.monotonic()
    with (
        make_client() as client,
        client.stream("GET", url) as response,
    ):
        for chunk in response.iter_raw():
            if not received:
                server.set_rate(url, None)
            received += chunk
    elapsed = time.monotonic() - started

    assert bytes(received) == data
    assert elapsed < 3.0


def test_set_rate_slows_hls_segments(server: MediaServer, client: httpx.Client) -> None:
    playlist_url = server.add_hls("show", [random_bytes(48 * KIB)])
    segment_url = playlist_url.replace("index.m3u8", "seg0.ts")

    server.set_rate(playlist_url, 64 * KIB)
    started = time.monotonic()
    client.get(segment_url)
    elapsed = time.monotonic() - started

    # Three 16 KiB chunks at 64 KiB/s leave two pauses of 0.25 s.
    assert elapsed >= 0.4


def test_set_rate_rejects_unknown_path(server: MediaServer) -> None:
    with pytest.raises(KeyError):
        server.set_rate("/files/missing.mp4", None)


def test_stop_closes_idle_keepalive_connection(client: httpx.Client) -> None:
    media_server = MediaServer().start()
    url = media_server.add_file("clip.mp4", DATA)
    client.get(url)

    started = time.monotonic()
    media_server.stop()

    assert time.monotonic() - started < 2.0


# HLS


def test_hls_playlist_lists_segments(server: MediaServer, client: httpx.Client) -> None:
    playlist_url = server.add_hls("show", [b"a", b"b", b"c"], segment_seconds=2.5)

    response = client.get(playlist_url)
    lines = response.text.splitlines()

    assert playlist_url == server.base_url + "/hls/show/index.m3u8"
    assert response.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert lines[0] == "#EXTM3U"
    assert "#EXT-X-TARGETDURATION:3" in lines
    assert lines.count("#EXTINF:2.500,") == 3
    assert [line for line in lines if not line.startswith("#")] == [
        "seg0.ts",
        "seg1.ts",
        "seg2.ts",
    ]
    assert lines[-1] == "#EXT-X-ENDLIST"


def test_hls_segment_returns_bytes(server: MediaServer, client: httpx.Client) -> None:
    playlist_url = server.add_hls("show", [b"first", b"second"])

    response = client.get(playlist_url.replace("index.m3u8", "seg1.ts"))

    assert response.content == b"second"
    assert response.headers["Content-Type"] == "video/mp2t"
    assert response.headers["Accept-Ranges"] == "bytes"


def test_hls_added_again_drops_old_segments(
    server: MediaServer, client: httpx.Client
) -> None:
    playlist_url = server.add_hls("show", [b"a", b"b"])
    server.add_hls("show", [b"c"])

    response = client.get(playlist_url.replace("index.m3u8", "seg1.ts"))

    assert response.status_code == 404


# The real yt-dlp


def test_ytdlp_direct_file_matches_source(server: MediaServer, tmp_path: Path) -> None:
    data = random_bytes(1536 * KIB, seed=1)
    url = server.add_file("clip.mp4", data)

    with yt_dlp.YoutubeDL(ytdlp_options(tmp_path)) as ydl:
        ydl.download([url])

    assert (tmp_path / "clip.mp4").read_bytes() == data
    assert server.errors == []


def test_ytdlp_hls_matches_concatenated_segments(
    server: MediaServer, tmp_path: Path
) -> None:
    segments = [random_bytes(200 * KIB, seed=index) for index in range(5)]
    playlist_url = server.add_hls("show", segments)
    # Random bytes are not MPEG-TS, and yt-dlp would otherwise warn that ffmpeg is
    # needed to fix up the container.
    options = ytdlp_options(tmp_path, fixup="never")

    with yt_dlp.YoutubeDL(options) as ydl:
        ydl.download([playlist_url])
    segment_gets = [r for r in server.requests if r.path.endswith(".ts")]

    assert (tmp_path / "index.mp4").read_bytes() == b"".join(segments)
    assert [r.path for r in segment_gets] == [f"/hls/show/seg{i}.ts" for i in range(5)]


def test_ytdlp_resume_requests_remaining_range(
    server: MediaServer, tmp_path: Path
) -> None:
    data = random_bytes(1024 * KIB, seed=2)
    url = server.add_file("clip.mp4", data)

    with yt_dlp.YoutubeDL(ytdlp_options(tmp_path)) as ydl:
        info = ydl.extract_info(url, download=False)
        final_path = Path(ydl.prepare_filename(info))
        Path(f"{final_path}.part").write_bytes(data[: 300 * KIB])
        ydl.download([url])
    assert server.wait_idle()
    range_requests = [r for r in server.requests_for(url) if r.range_header]

    assert final_path.read_bytes() == data
    assert len(range_requests) == 1
    assert range_requests[0].range_header == "bytes=307200-"
    assert range_requests[0].status == 206
    assert range_requests[0].bytes_sent == len(data) - 300 * KIB


def test_ytdlp_retries_after_truncated_body(
    server: MediaServer, tmp_path: Path
) -> None:
    data = random_bytes(1024 * KIB, seed=3)
    url = server.add_file("clip.mp4", data)
    # In yt-dlp 2026.11.23 the first GET is the generic extractor's probe of the URL,
    # which reads only the headers, and the second GET is the download.
    server.script(url, [Fault.passthrough(), Fault.truncate(300 * KIB)])
    # YoutubeDL 2026.11.23 does not retry a download unless "retries" is set. It
    # keeps only whole blocks of a cut body, and it grows its blocks with the
    # measured speed unless told not to; fixed 1 KiB blocks make the resume
    # offset exactly the 300 KiB that were sent.
    options = ytdlp_options(tmp_path, retries=2, buffersize=1024, noresizebuffer=True)

    with yt_dlp.YoutubeDL(options) as ydl:
        ydl.download([url])
    range_headers = [record.range_header for record in server.requests_for(url)]

    assert (tmp_path / "clip.mp4").read_bytes() == data
    assert range_headers == [None, None, "bytes=307200-"]
