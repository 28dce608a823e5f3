"""A media server for benchmarks on 127.0.0.1 that logs what it sends.

Unlike ``tests/mediaserver.py`` it keeps no file in memory. A generated file
repeats one 1 MiB block of seeded random bytes, so a file of any size costs
nothing to add. Files on disk are sent with ``sendfile``. Every body write
is logged as ``(time, bytes, stream)``, so that a benchmark measures rates
at the server, where no client can misreport them.

URLs (all under the server's base URL):

* ``/gen/<size>/<name>.mp4``: a generated file of ``<size>`` bytes. Any
  ``<name>`` works, so each trial can use a path of its own.
* ``/hls/<segment size>/<segments>/<name>/index.m3u8``: a VOD HLS playlist
  of generated segments ``seg<i>.ts``.
* ``/disk/<name>/<file>``: ``<file>`` from the folder given to the server.

A ``rate`` query parameter (bytes per second) throttles a generated file.
With ``after`` (seconds) and ``then`` (bytes per second) the file is sent
at ``rate`` (or at once) for ``after`` seconds and at ``then`` from there,
like a source that slows down midway. With ``burst`` (seconds) the file is
sent at ``rate`` on average, but ``burst`` seconds' worth at a time.
``BenchServer.pause`` holds every generated body still for a while, as if
all sources paused at once.
"""

from __future__ import annotations

import contextlib
import http.server
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlencode, urlsplit

BLOCK_BYTES = 1024 * 1024
# Bytes per logged write of a generated body by default, which is the
# resolution of the server-side rate measurement. 16 KiB is 1.6 ms at
# 10 MiB/s but 2.5% of a 5 s window at 128K, so ``write_bytes`` sets a
# smaller one for low rates.
WRITE_BYTES = 16 * 1024
# Bytes per sendfile call for files on disk.
SENDFILE_BYTES = 1024 * 1024
SEGMENT_SECONDS = 2.0
_SOCKET_TIMEOUT_S = 30.0

_GEN = re.compile(r"/gen/(\d+)/[^/]+")
_HLS = re.compile(r"/hls/(\d+)/(\d+)/([^/]+)/(index\.m3u8|seg(\d+)\.ts)")
_DISK = re.compile(r"/disk/[^/]+/([^/]+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def generated_block() -> bytes:
    """Build the 1 MiB block that generated files repeat."""
    rng = random.Random(20261204)
    return rng.randbytes(BLOCK_BYTES)


@dataclass
class Request:
    """One request as the server saw it, with ``time.monotonic()`` times."""

    method: str
    path: str
    arrived: float
    range_header: str | None
    status: int = 0
    bytes_sent: int = 0
    finished: float | None = None
    seq: int = 0

    @property
    def key(self) -> str:
        """The stream name in the send log: the path and the request number."""
        return f"{self.path}#{self.seq}"


@dataclass
class SendLog:
    """Body writes as ``(time, bytes, stream)``, in the order they happened."""

    entries: list[tuple[float, int, str]] = field(default_factory=list)

    def add(self, nbytes: int, stream: str) -> None:
        # list.append is atomic under the GIL, so handlers need no lock.
        self.entries.append((time.monotonic(), nbytes, stream))

    def since(self, start: float, prefix: str = "") -> list[tuple[float, int]]:
        return [
            (t, n)
            for t, n, s in list(self.entries)
            if t >= start and s.startswith(prefix)
        ]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, bench: BenchServer) -> None:
        self.bench = bench
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        if self.bench.mss:
            # Set before listen, so that the SYN-ACK announces it and both
            # ends send segments of at most this size.
            self.socket.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.bench.mss
            )
        super().server_bind()

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients close connections on purpose (a probe, a stopped download).
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vodq-benchserver/1.0"
    sys_version = ""
    timeout = _SOCKET_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sndbuf = self.server.bench.sndbuf
        if sndbuf:
            # A small send buffer keeps the server's writes in step with the
            # client's reads, so the send log shows the rate the client took.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        bench = self.server.bench
        parts = urlsplit(self.path)
        record = Request(
            self.command, parts.path, time.monotonic(), self.headers.get("Range")
        )
        bench.record(record)
        try:
            self._route(record, parts.path, parse_qs(parts.query), head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            record.finished = time.monotonic()

    def _route(
        self, record: Request, path: str, query: dict[str, list[str]], head: bool
    ) -> None:
        if match := _GEN.fullmatch(path):
            rate = float(query["rate"][0]) if "rate" in query else None
            change = None
            if "after" in query and "then" in query:
                change = (float(query["after"][0]), float(query["then"][0]))
            back = float(query["back"][0]) if "back" in query else None
            burst = float(query["burst"][0]) if "burst" in query else None
            self._send_generated(
                record, int(match.group(1)), head, rate, change, burst, back
            )
        elif match := _HLS.fullmatch(path):
            seg_bytes, count = int(match.group(1)), int(match.group(2))
            if match.group(5) is None:
                self._send_playlist(record, count)
            elif int(match.group(5)) < count:
                self._send_generated(record, seg_bytes, head, None)
            else:
                self._send_empty(record, 404)
        elif (match := _DISK.fullmatch(path)) and self.server.bench.folder:
            file = self.server.bench.folder / match.group(1)
            if file.is_file():
                self._send_disk(record, file, head)
            else:
                self._send_empty(record, 404)
        else:
            self._send_empty(record, 404)

    def _send_empty(self, record: Request, status: int) -> None:
        record.status = status
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_playlist(self, record: Request, count: int) -> None:
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{int(SEGMENT_SECONDS)}",
            "#EXT-X-MEDIA-SEQUENCE:0",
            "#EXT-X-PLAYLIST-TYPE:VOD",
        ]
        for index in range(count):
            lines += [f"#EXTINF:{SEGMENT_SECONDS:.3f},", f"seg{index}.ts"]
        lines.append("#EXT-X-ENDLIST")
        body = ("\n".join(lines) + "\n").encode()
        record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.apple.mpegurl")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _range(self, record: Request, size: int) -> tuple[int, int] | None:
        """Send the status line and headers, and return the byte range to send."""
        start, stop, status = 0, size, 200
        if record.range_header and (m := _RANGE.fullmatch(record.range_header)):
            first, last = m.group(1), m.group(2)
            if first:
                start = int(first)
                stop = min(size, int(last) + 1) if last else size
                status = 206
            elif last:
                start, stop, status = max(0, size - int(last)), size, 206
            if start >= size:
                self._send_empty(record, 416)
                return None
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        self.wfile.flush()
        return start, stop

    def _send_generated(
        self,
        record: Request,
        size: int,
        head: bool,
        rate: float | None,
        change: tuple[float, float] | None = None,
        burst: float | None = None,
        back: float | None = None,
    ) -> None:
        """Send a generated body at ``rate`` bytes/s (None: at once).

        ``change`` is (after, then): from ``after`` seconds on, ``then``
        bytes/s. ``back`` seconds after the change, the body goes out at once
        again.
        """
        span = self._range(record, size)
        if span is None or head:
            return
        bench = self.server.bench
        block = bench.block_view
        offset, stop = span
        started = time.monotonic()
        sent = 0
        while offset < stop:
            if not bench.flowing.is_set():
                paused = time.monotonic()
                bench.flowing.wait()
                # A throttled body goes on at its rate from the resume.
                started += time.monotonic() - paused
            at = offset % BLOCK_BYTES
            n = min(bench.write_bytes, stop - offset, BLOCK_BYTES - at)
            self.connection.sendall(block[at : at + n])
            offset += n
            sent += n
            record.bytes_sent += n
            bench.log.add(n, record.key)
            if change is not None and time.monotonic() - started >= change[0]:
                # From here on at the new rate, counted from this moment.
                rate, change = change[1], None
                started, sent = time.monotonic(), 0
            elif (
                change is None
                and back is not None
                and time.monotonic() - started >= back
            ):
                rate, back = None, None
            if rate is not None:
                due = sent / rate
                if burst is not None:
                    # Each burst of rate * burst bytes goes out at once,
                    # and the next one burst seconds after it.
                    due = sent // (rate * burst) * burst
                ahead = due - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    def _send_disk(self, record: Request, file: Path, head: bool) -> None:
        size = file.stat().st_size
        span = self._range(record, size)
        if span is None or head:
            return
        offset, stop = span
        log = self.server.bench.log
        with file.open("rb") as source:
            while offset < stop:
                # socket.sendfile waits for room in the socket buffer, but
                # os.sendfile fails with EAGAIN on a socket that has a timeout.
                n = self.connection.sendfile(
                    source, offset, min(SENDFILE_BYTES, stop - offset)
                )
                if n == 0:
                    break
                offset += n
                record.bytes_sent += n
                log.add(n, record.key)


class BenchServer:
    """The benchmark media server; a context manager that serves in a thread."""

    def __init__(
        self,
        *,
        folder: Path | None = None,
        sndbuf: int | None = None,
        write_bytes: int = WRITE_BYTES,
        mss: int | None = None,
    ) -> None:
        self.folder = folder
        self.sndbuf = sndbuf
        self.mss = mss
        self.write_bytes = write_bytes
        self.block_view = memoryview(generated_block())
        self.log = SendLog()
        # Cleared while every generated body is held still, as if all sources
        # paused at once (``pause``).
        self.flowing = threading.Event()
        self.flowing.set()
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._arrived = threading.Condition(self._lock)
        self._httpd = _Server(self)
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host!s}:{port}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BenchServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="benchserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def pause(self, seconds: float) -> None:
        """Hold every generated body still for ``seconds``, then resume them."""
        self.flowing.clear()
        try:
            time.sleep(seconds)
        finally:
            self.flowing.set()

    # -- URLs ---------------------------------------------------------------

    def gen_url(
        self,
        name: str,
        size: int,
        rate: float | None = None,
        change: tuple[float, float] | None = None,
        burst: float | None = None,
        back: float | None = None,
    ) -> str:
        """Return the URL of a generated file; ``change`` is (after, then) and
        ``back`` the seconds after the change until the full speed returns."""
        params = {} if rate is None else {"rate": f"{rate:.0f}"}
        if burst is not None:
            params["burst"] = f"{burst:g}"
        if change is not None:
            params.update(after=f"{change[0]:g}", then=f"{change[1]:.0f}")
            if back is not None:
                params["back"] = f"{back:g}"
        query = f"?{urlencode(params)}" if params else ""
        return f"{self.base_url}/gen/{size}/{name}.mp4{query}"

    def hls_url(self, name: str, segment_bytes: int, segments: int) -> str:
        return f"{self.base_url}/hls/{segment_bytes}/{segments}/{name}/index.m3u8"

    def disk_url(self, alias: str, file_name: str) -> str:
        return f"{self.base_url}/disk/{alias}/{file_name}"

    # -- the request log ----------------------------------------------------

    def record(self, request: Request) -> None:
        with self._arrived:
            request.seq = len(self._requests)
            self._requests.append(request)
            self._arrived.notify_all()

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def wait_request(self, path_part: str, timeout_s: float) -> Request | None:
        """Wait for the first GET whose path contains ``path_part``."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                for request in self._requests:
                    if request.method == "GET" and path_part in request.path:
                        return request
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
        self.log.entries.clear()


def window_rates(
    samples: list[tuple[float, int]], start: float, window_s: float, end: float
) -> Iterator[tuple[float, float]]:
    """Yield ``(window start, bytes per second)`` for whole windows in [start, end)."""
    count = int((end - start) // window_s)
    totals = [0] * count
    for t, n in samples:
        index = int((t - start) // window_s)
        if 0 <= index < count:
            totals[index] += n
    for index, total in enumerate(totals):
        yield start + index * window_s, total / window_s


@contextlib.contextmanager
def serving(
    folder: Path | None = None,
    sndbuf: int | None = None,
    write_bytes: int = WRITE_BYTES,
    mss: int | None = None,
) -> Iterator[BenchServer]:
    with BenchServer(
        folder=folder, sndbuf=sndbuf, write_bytes=write_bytes, mss=mss
    ) as server:
        yield server
