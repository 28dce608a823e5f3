"""Local HTTP/1.1 media server for tests.

It serves files and HLS streams from memory on 127.0.0.1 so that a real yt-dlp can
download them. Tests can throttle bodies, script one-shot faults per path (error
statuses, truncated bodies, connection resets, stalls), change a file's bytes and
validators between requests (replace_file) and inspect a record of every
request, including how many body transfers overlapped in time.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import logging
import math
import re
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

logger = logging.getLogger(__name__)

CHUNK_SIZE = 16 * 1024
DEFAULT_STALL_AFTER_BYTES = 64 * 1024
# Upper bound of one throttle or stall wait. Between waits the handler rereads the
# rate and checks whether the client or the server has gone away.
_WAIT_SLICE_SECONDS = 0.05
# Idle keep-alive connections and blocked writes give up after this many seconds.
_SOCKET_TIMEOUT_SECONDS = 30.0
_STOP_JOIN_SECONDS = 5.0

FILE_CONTENT_TYPE = "video/mp4"
PLAYLIST_CONTENT_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_CONTENT_TYPE = "video/mp2t"

_DISCONNECT_ERRORS = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
)

FaultKind = Literal[
    "passthrough", "status", "truncate", "reset", "stall", "delay", "whole"
]


@dataclass
class RequestRecord:
    """One request as the server saw it.

    `status` is 0 when no status line was sent (a reset fault). `bytes_sent` counts
    body bytes written to the socket, not headers. `body_started` is the time the
    first body byte was written, or None if no body was sent. Times come from
    time.monotonic(). `connection_id` numbers TCP connections in accept order, so
    requests that share it came over one keep-alive connection.
    """

    method: str
    path: str
    range_header: str | None
    status: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    client_closed: bool = False
    body_started: float | None = None
    fault: FaultKind | None = None
    connection_id: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    """A one-shot misbehaviour for one GET of a path. Build it with a classmethod."""

    kind: FaultKind
    code: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    n_bytes: int = 0
    seconds: float = 0.0

    @classmethod
    def passthrough(cls) -> Fault:
        """Serve the GET normally. It takes a place in a script, so that the next
        fault applies to a later request."""
        return cls("passthrough")

    @classmethod
    def status(
        cls, code: int, *, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Fault:
        """Respond with status `code`, the given extra headers and body."""
        if not 100 <= code <= 599:
            raise ValueError(f"invalid HTTP status code {code}: expected 100-599")
        return cls(
            "status", code=code, headers=tuple((headers or {}).items()), body=body
        )

    @classmethod
    def too_many(cls, retry_after: int) -> Fault:
        """Respond 429 Too Many Requests with `Retry-After: retry_after` (seconds)."""
        if retry_after < 0:
            raise ValueError(f"invalid retry_after {retry_after}: expected >= 0")
        return cls.status(429, headers={"Retry-After": str(retry_after)})

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait `seconds` before responding, then serve the GET normally."""
        if seconds < 0:
            raise ValueError(f"invalid seconds {seconds}: expected >= 0")
        return cls("delay", seconds=seconds)

    @classmethod
    def truncate(cls, n_bytes: int) -> Fault:
        """Send the normal headers, then only the first `n_bytes` of the body, then
        close the connection."""
        if n_bytes < 0:
            raise ValueError(f"invalid n_bytes {n_bytes}: expected >= 0")
        return cls("truncate", n_bytes=n_bytes)

    @classmethod
    def whole(cls) -> Fault:
        """Send the whole body with status 200 whatever the Range header, as a
        server without range support does."""
        return cls("whole")

    @classmethod
    def reset(cls) -> Fault:
        """Close the connection with a TCP reset before sending anything."""
        return cls("reset")

    @classmethod
    def stall(
        cls, seconds: float, *, after_bytes: int = DEFAULT_STALL_AFTER_BYTES
    ) -> Fault:
        """Send the headers and the first `after_bytes` of the body, send nothing for
        `seconds`, then close the connection."""
        if seconds < 0:
            raise ValueError(f"invalid seconds {seconds}: expected >= 0")
        if after_bytes < 0:
            raise ValueError(f"invalid after_bytes {after_bytes}: expected >= 0")
        return cls("stall", n_bytes=after_bytes, seconds=seconds)


@dataclass
class _Throttle:
    """Body rate in bytes per second, or None for unthrottled. Shared by every
    segment of one HLS stream so that one set_rate call changes them all."""

    rate: float | None


@dataclass(frozen=True)
class _Resource:
    data: bytes
    content_type: str
    etag: str
    last_modified: str
    throttle: _Throttle
    throttled: bool


@dataclass(frozen=True)
class _ByteRange:
    status: int
    start: int
    stop: int  # exclusive


class _ClientGone(Exception):
    """The client closed the connection while the server was writing or waiting."""


class _ServerStopping(Exception):
    """MediaServer.stop() was called while a handler was writing or waiting."""


def _validate_rate(rate: float | None) -> None:
    if rate is not None and not rate > 0:
        raise ValueError(f"invalid rate {rate}: expected bytes per second > 0 or None")


def _to_path(path_or_url: str) -> str:
    """Return the decoded path of a URL, or the path itself, without query."""
    path = unquote(urlsplit(path_or_url).path)
    return path if path.startswith("/") else "/" + path


def _make_resource(data: bytes, content_type: str, throttle: _Throttle) -> _Resource:
    return _Resource(
        data=data,
        content_type=content_type,
        etag='"' + hashlib.sha256(data).hexdigest()[:32] + '"',
        last_modified=email.utils.formatdate(time.time(), usegmt=True),
        throttle=throttle,
        throttled=content_type != PLAYLIST_CONTENT_TYPE,
    )


_RANGE_PATTERN = re.compile(
    r"bytes\s*=\s*(?P<first>[0-9]*)\s*-\s*(?P<last>[0-9]*)", re.IGNORECASE
)


def _parse_range(header: str | None, size: int) -> _ByteRange:
    """Map a Range header to the byte range to send.

    Returns status 200 with the whole body when there is no header, or when it is
    malformed or requests several ranges (RFC 9110 lets a server ignore Range).
    Returns status 416 when the single range cannot be satisfied.
    """
    whole = _ByteRange(200, 0, size)
    if header is None:
        return whole
    match = _RANGE_PATTERN.fullmatch(header.strip())
    if match is None:
        return whole
    first, last = match.group("first"), match.group("last")
    if not first and not last:
        return whole
    if not first:
        suffix_length = int(last)
        if suffix_length == 0 or size == 0:
            return _ByteRange(416, 0, 0)
        return _ByteRange(206, max(0, size - suffix_length), size)
    start = int(first)
    if last and int(last) < start:
        return whole
    if start >= size:
        return _ByteRange(416, 0, 0)
    stop = min(int(last) + 1, size) if last else size
    return _ByteRange(206, start, stop)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # MediaServer.stop() joins handler threads itself, with a deadline.
    block_on_close = False

    def __init__(self, media: MediaServer, segment: int | None = None) -> None:
        self.media = media
        self.segment = segment
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        if self.segment is not None:
            # Set before listen, so that the SYN-ACK announces it and both
            # ends send segments of at most this size, as over a real path.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.segment)
        super().server_bind()

    def handle_error(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, _DISCONNECT_ERRORS):
            return
        self.media.errors.append(repr(error))
        logger.error(
            "media server handler failed for %s", client_address, exc_info=True
        )


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vodq-mediaserver/1.0"
    sys_version = ""
    timeout = _SOCKET_TIMEOUT_SECONDS
    server: _HTTPServer

    connection_id = 0
    # Set once the client sent bytes that a throttle wait cannot consume (a
    # pipelined request), after which select() would always report readable.
    _peer_sent_data = False

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes. Without TCP_NODELAY, Nagle's
        # algorithm delays a short body until the client's delayed ACK, about 40 ms
        # on Linux, which slows every small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection_id = self.server.media._open_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.media._close_connection(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _reject_method(self) -> None:
        record = self._open_record()
        try:
            # The request body is not read, so the connection cannot be reused.
            self.close_connection = True
            self._send_simple(
                record,
                405,
                b"method not allowed\n",
                {"Allow": "GET, HEAD", "Connection": "close"},
            )
        except (*_DISCONNECT_ERRORS, _ClientGone):
            record.client_closed = True
        finally:
            self.server.media._finish_record(record)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _reject_method

    def _open_record(self) -> RequestRecord:
        record = RequestRecord(
            method=self.command,
            path=_to_path(self.path),
            range_header=self.headers.get("Range"),
            connection_id=self.connection_id,
            headers=dict(self.headers.items()),
        )
        self.server.media._add_record(record)
        return record

    def _serve(self, head: bool) -> None:
        media = self.server.media
        record = self._open_record()
        self._peer_sent_data = False
        try:
            fault = None if head else media._pop_fault(record.path)
            if fault is not None and fault.kind == "passthrough":
                fault = None
            record.fault = fault.kind if fault else None
            if fault is not None and fault.kind == "delay":
                self._wait(fault.seconds)
                fault = None
            resource = media._find_resource(record.path)
            if fault is not None and fault.kind == "reset":
                self._reset_connection()
            elif fault is not None and fault.kind == "status":
                self._send_simple(record, fault.code, fault.body, dict(fault.headers))
            elif resource is None:
                self._send_simple(record, 404, b"")
            else:
                self._send_resource(record, resource, head, fault)
        except (*_DISCONNECT_ERRORS, _ClientGone) as error:
            # Clients under test disconnect on purpose, so this is debug output.
            logger.debug(
                "client closed connection %d during %s %s: %r",
                self.connection_id,
                record.method,
                record.path,
                error,
            )
            record.client_closed = True
            self.close_connection = True
        except _ServerStopping:
            self.close_connection = True
        finally:
            media._finish_record(record)

    def _send_status_line(self, record: RequestRecord, code: int) -> None:
        self.send_response(code)
        record.status = code

    def _send_simple(
        self,
        record: RequestRecord,
        code: int,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._send_status_line(record, code)
        extra = headers or {}
        lower_names = {name.lower() for name in extra}
        if body and "content-type" not in lower_names:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        if "content-length" not in lower_names:
            self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self._write(record, memoryview(body), None)

    def _send_resource(
        self,
        record: RequestRecord,
        resource: _Resource,
        head: bool,
        fault: Fault | None,
    ) -> None:
        size = len(resource.data)
        byte_range = _parse_range(record.range_header, size)
        if fault is not None and fault.kind == "whole":
            byte_range = _ByteRange(200, 0, size)
        if byte_range.status == 416:
            self._send_simple(record, 416, b"", {"Content-Range": f"bytes */{size}"})
            return
        self._send_status_line(record, byte_range.status)
        self.send_header("Content-Type", resource.content_type)
        self.send_header("Content-Length", str(byte_range.stop - byte_range.start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", resource.etag)
        self.send_header("Last-Modified", resource.last_modified)
        if byte_range.status == 206:
            last = byte_range.stop - 1
            content_range = f"bytes {byte_range.start}-{last}/{size}"
            self.send_header("Content-Range", content_range)
        self.end_headers()
        if head:
            return
        body = memoryview(resource.data)[byte_range.start : byte_range.stop]
        throttle = resource.throttle if resource.throttled else None
        if fault is None or fault.kind == "whole":
            self._write(record, body, throttle)
            return
        # Truncate and stall end the response early, so the connection must close
        # for the client to notice a short body.
        self.close_connection = True
        self._write(record, body[: fault.n_bytes], throttle)
        if fault.kind == "stall":
            self._wait(fault.seconds)

    def _write(
        self, record: RequestRecord, body: memoryview, throttle: _Throttle | None
    ) -> None:
        media = self.server.media
        for offset in range(0, len(body), CHUNK_SIZE):
            if media._stopping.is_set():
                raise _ServerStopping
            chunk = body[offset : offset + CHUNK_SIZE]
            if record.body_started is None:
                media._mark_body_started(record)
            self.wfile.write(chunk)
            media._count_sent(record, len(chunk))
            if throttle is not None and offset + len(chunk) < len(body):
                self._pause_for(len(chunk), throttle)

    def _pause_for(self, n_bytes: int, throttle: _Throttle) -> None:
        """Wait as long as sending `n_bytes` takes at the throttle's current rate.

        The rate is reread between short waits, so set_rate() takes effect within
        _WAIT_SLICE_SECONDS even in the middle of a long pause.
        """
        remaining = float(n_bytes)
        while remaining > 0:
            rate = throttle.rate
            if rate is None:
                return
            seconds = min(_WAIT_SLICE_SECONDS, remaining / rate)
            self._wait_slice(seconds)
            remaining -= seconds * rate

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._wait_slice(min(_WAIT_SLICE_SECONDS, left))

    def _wait_slice(self, seconds: float) -> None:
        """Sleep up to `seconds`, returning early with an exception when the client
        closes the connection or the server stops."""
        media = self.server.media
        if media._stopping.is_set():
            raise _ServerStopping
        if self._peer_sent_data:
            if media._stopping.wait(seconds):
                raise _ServerStopping
            return
        readable, _, _ = select.select([self.connection], [], [], seconds)
        if not readable:
            return
        try:
            peeked = self.connection.recv(1, socket.MSG_PEEK)
        except (ConnectionResetError, ConnectionAbortedError) as error:
            raise _ClientGone from error
        if not peeked:
            raise _ClientGone
        self._peer_sent_data = True

    def _reset_connection(self) -> None:
        # With SO_LINGER on and a zero timeout, close() discards unsent data and
        # sends RST instead of FIN. The socket is closed here rather than by the
        # server, whose shutdown(SHUT_WR) would send a FIN first.
        self.close_connection = True
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        # rfile references the socket, and the file descriptor closes only after
        # every reference is closed.
        self.rfile.close()
        self.connection.close()


class MediaServer:
    """In-memory HTTP/1.1 server on 127.0.0.1 with an ephemeral port.

    The socket is bound in the constructor, so base_url and the URLs returned by
    add_file() and add_hls() are valid before start(). A stopped server cannot be
    started again.

    Paths given to set_rate(), script(), requests_for(), max_concurrent() and
    active() may be full URLs or paths. The query string is ignored.
    """

    def __init__(self, segment: int | None = None) -> None:
        """``segment``: the largest TCP segment, in bytes, of every connection
        (None: the loopback's own, about 64 KiB)."""
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = threading.Event()
        self._resources: dict[str, _Resource] = {}
        # Paths of the playlist and segments of each HLS stream, by its path prefix.
        self._streams: dict[str, list[str]] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._records: list[RequestRecord] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connection_count = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.errors: list[str] = []
        """Unexpected handler exceptions (not client disconnects), as repr strings."""
        self._httpd = _HTTPServer(self, segment)
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> MediaServer:
        """Start serving in a daemon thread and return self."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("a MediaServer can be started only once")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mediaserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every open connection and wait for the handlers.

        Throttled bodies and stalls end within about _WAIT_SLICE_SECONDS, and idle
        keep-alive connections are shut down. Handlers that are still running after
        _STOP_JOIN_SECONDS are left behind as daemon threads.
        """
        if self._stopped:
            return
        self._stopped = True
        with self._lock:
            self._stopping.set()
            connections = dict(self._connections)
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(_STOP_JOIN_SECONDS)
        self._httpd.server_close()
        for connection in connections:
            # A handler may have closed its connection already.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> MediaServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, path: str) -> str:
        """Return the full URL of a server path such as "/files/a.mp4"."""
        return self.base_url + quote(_to_path(path))

    def add_file(
        self,
        name: str,
        data: bytes,
        *,
        rate: float | None = None,
        content_type: str = FILE_CONTENT_TYPE,
    ) -> str:
        """Serve `data` at /files/{name} and return its URL.

        `rate` throttles the body in bytes per second, and None sends it at full
        speed. Adding a name again replaces the file and its throttle.
        """
        if not name:
            raise ValueError("invalid file name '': expected a non-empty name")
        _validate_rate(rate)
        path = "/files/" + name.lstrip("/")
        resource = _make_resource(bytes(data), content_type, _Throttle(rate))
        with self._lock:
            self._resources[path] = resource
        return self.url(path)

    def replace_file(self, name: str, data: bytes, *, etag: str | None = None) -> str:
        """Change the bytes of the file served at /files/{name} and return its URL.

        Unlike add_file(), the content type and throttle stay. The ETag becomes
        `etag` if given (a quoted string such as '"v2"'), else one derived from
        the new bytes, and Last-Modified moves at least one second past the old
        value, so both validators show the change even within one second.
        """
        path = "/files/" + name.lstrip("/")
        with self._lock:
            old = self._resources.get(path)
            if old is None:
                raise KeyError(
                    f"no file is served at {path!r}: add it with add_file() first"
                )
            new = _make_resource(bytes(data), old.content_type, old.throttle)
            old_time = email.utils.parsedate_to_datetime(old.last_modified).timestamp()
            stamp = max(time.time(), old_time + 1.0)
            self._resources[path] = replace(
                new,
                etag=etag if etag is not None else new.etag,
                last_modified=email.utils.formatdate(stamp, usegmt=True),
            )
        return self.url(path)

    def add_hls(
        self,
        name: str,
        segments: list[bytes],
        *,
        segment_seconds: float = 2.0,
        rate: float | None = None,
    ) -> str:
        """Serve a VOD HLS stream at /hls/{name}/ and return its playlist URL.

        The media playlist is index.m3u8 and segment i is seg{i}.ts. `rate`
        throttles every segment body in bytes per second, but not the playlist.
        Adding a name again replaces the whole stream.
        """
        if not name or "/" in name:
            raise ValueError(f"invalid HLS name {name!r}: expected one path segment")
        if not segments:
            raise ValueError(f"invalid HLS stream {name!r}: expected >= 1 segment")
        if not segment_seconds > 0:
            raise ValueError(f"invalid segment_seconds {segment_seconds}: expected > 0")
        _validate_rate(rate)
        prefix = f"/hls/{name}/"
        throttle = _Throttle(rate)
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{max(1, math.ceil(segment_seconds))}",
            "#EXT-X-MEDIA-SEQUENCE:0",
            "#EXT-X-PLAYLIST-TYPE:VOD",
        ]
        resources: dict[str, _Resource] = {}
        for index, segment in enumerate(segments):
            lines += [f"#EXTINF:{segment_seconds:.3f},", f"seg{index}.ts"]
            segment_path = f"{prefix}seg{index}.ts"
            resources[segment_path] = _make_resource(
                bytes(segment), SEGMENT_CONTENT_TYPE, throttle
            )
        lines.append("#EXT-X-ENDLIST")
        playlist = ("\n".join(lines) + "\n").encode()
        playlist_path = prefix + "index.m3u8"
        resources[playlist_path] = _make_resource(
            playlist, PLAYLIST_CONTENT_TYPE, throttle
        )
        with self._lock:
            for old_path in self._streams.pop(prefix, []):
                self._resources.pop(old_path, None)
            self._resources.update(resources)
            self._streams[prefix] = list(resources)
        return self.url(playlist_path)

    def set_rate(self, path_or_url: str, rate: float | None) -> None:
        """Change the throttle of a file, or of every segment of an HLS stream when
        given its playlist or one of its segments. Bodies in flight pick it up."""
        _validate_rate(rate)
        path = _to_path(path_or_url)
        with self._lock:
            resource = self._resources.get(path)
            if resource is None:
                raise KeyError(
                    f"no file or HLS stream is served at {path!r}: "
                    "add it with add_file() or add_hls() first"
                )
            resource.throttle.rate = rate

    def script(self, path_or_url: str, faults: list[Fault]) -> None:
        """Queue one-shot faults for a path. Each later GET of the path pops the next
        fault, and the path is served normally once the queue is empty. HEAD requests
        do not pop faults. The path need not be served, so a status or reset fault
        also works for an unknown path."""
        path = _to_path(path_or_url)
        with self._lock:
            self._faults.setdefault(path, deque()).extend(faults)

    @property
    def requests(self) -> list[RequestRecord]:
        """Copies of all request records in arrival order."""
        with self._lock:
            return [replace(record) for record in self._records]

    def requests_for(self, path_or_url: str) -> list[RequestRecord]:
        """Copies of the records of one path in arrival order."""
        path = _to_path(path_or_url)
        return [record for record in self.requests if record.path == path]

    def max_concurrent(self, prefix: str = "/") -> int:
        """Return the maximum number of GET body transfers under `prefix` that were
        in flight at the same moment.

        A transfer runs from the write of its first body byte until the handler stops
        writing, because the body is complete, the client closed the connection or a
        fault ended it. Requests that sent no body byte (HEAD, 404, 416, resets, empty
        bodies) never count, but the body of a status fault does.

        A client that reads only the headers and disconnects counts until the server
        notices. A throttled handler notices within _WAIT_SLICE_SECONDS because its
        waits watch the socket. An unthrottled one notices when a write fails, or
        never if the rest of the body fits into the socket buffers first. A transfer
        that ends exactly when another starts does not overlap it.
        """
        events: list[tuple[float, int]] = []
        now = time.monotonic()
        for record in self._body_transfers(prefix):
            assert record.body_started is not None
            end = record.finished if record.finished is not None else now
            events.append((record.body_started, 1))
            events.append((end, -1))
        # At equal times the -1 sorts first, so touching intervals do not overlap.
        events.sort()
        current = maximum = 0
        for _, delta in events:
            current += delta
            maximum = max(maximum, current)
        return maximum

    def active(self, prefix: str = "/") -> int:
        """Return the number of GET requests under `prefix` whose handling has
        started and not finished, whether or not they have sent a body byte yet."""
        path_prefix = _to_path(prefix)
        return sum(
            1
            for record in self.requests
            if record.method == "GET"
            and record.path.startswith(path_prefix)
            and record.finished is None
        )

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled, and return False on timeout.

        A client can see the end of a response before the handler has finished its
        record, so call this before checking `finished`, `bytes_sent` or active().
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def reset_stats(self) -> None:
        """Forget all request records. Scripted faults and errors stay."""
        with self._lock:
            self._records.clear()

    def _body_transfers(self, prefix: str) -> list[RequestRecord]:
        path_prefix = _to_path(prefix)
        return [
            record
            for record in self.requests
            if record.method == "GET"
            and record.path.startswith(path_prefix)
            and record.body_started is not None
        ]

    def _open_connection(self, connection: socket.socket) -> int:
        with self._lock:
            self._connection_count += 1
            if self._stopping.is_set():
                # Accepted just before stop(), which will not see this connection.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            else:
                self._connections[connection] = threading.current_thread()
            return self._connection_count

    def _close_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    def _add_record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._in_flight += 1

    def _finish_record(self, record: RequestRecord) -> None:
        with self._lock:
            record.finished = time.monotonic()
            self._in_flight -= 1
            self._idle.notify_all()

    def _mark_body_started(self, record: RequestRecord) -> None:
        with self._lock:
            record.body_started = time.monotonic()

    def _count_sent(self, record: RequestRecord, n_bytes: int) -> None:
        with self._lock:
            record.bytes_sent += n_bytes

    def _pop_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    def _find_resource(self, path: str) -> _Resource | None:
        with self._lock:
            return self._resources.get(path)
