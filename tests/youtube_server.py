"""Local HTTP server for tests that speaks the YouTube upload protocol.

It serves, on 127.0.0.1, the OAuth 2.0 token endpoint (refresh-token grant
only) and the YouTube Data API v3 resumable upload. That is the POST that
opens a session, chunk PUTs with Content-Range, 308 Resume Incomplete with
Range, status queries (an empty PUT with ``Content-Range: bytes */SIZE``) and
the final 200 with the video resource. It stores the uploaded bytes of every
session and the videos they became.

Tests can script faults: cut the connection after some bytes of a chunk,
reply to a request with an HTTP status and a YouTube-style error body,
expire a session, expire the access tokens, or hold the reply to a stored
chunk until the test releases it. Every request is recorded with the
headers that the protocol uses, so tests can count requests and tell
clients apart by their token.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

RequestKind = Literal["token", "initiate", "chunk", "query", "other"]

CLIENT_ID = "vodq-test.apps.googleusercontent.com"
CLIENT_SECRET = "test-client-secret-9f3a"
REFRESH_TOKEN = "test-refresh-token-41c7"

UPLOAD_PATH = "/upload/youtube/v3/videos"
TOKEN_PATH = "/token"
# Every chunk except the last must be a multiple of this many bytes.
CHUNK_MULTIPLE_BYTES = 256 * 1024
MAX_TITLE_CHARS = 100
MAX_DESCRIPTION_BYTES = 5000
PRIVACY_STATUSES = ("private", "unlisted", "public")

# Headers that the protocol uses, the only ones that records keep.
_RECORDED_HEADERS = (
    "Authorization",
    "Content-Length",
    "Content-Range",
    "Content-Type",
    "X-Upload-Content-Length",
    "X-Upload-Content-Type",
)
_CHUNK_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_QUERY_RANGE = re.compile(r"bytes \*/(\d+)")
# Idle keep-alive connections close after this many seconds.
_SOCKET_TIMEOUT_S = 10.0
_STOP_JOIN_S = 5.0
# How often serve_forever checks for shutdown(), which bounds each stop.
_POLL_INTERVAL_S = 0.05
# Maximum time a held reply waits for release_reply(), in seconds, so that a
# test that fails never leaves a handler thread waiting.
_HOLD_LIMIT_S = 60.0


@dataclass
class RequestRecord:
    """One request as the server received it (``status`` 0: the server cut it)."""

    method: str
    path: str
    kind: RequestKind
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0


@dataclass
class Video:
    """A video that a completed session created."""

    id: str
    data: bytes
    metadata: dict[str, Any]


@dataclass
class _Session:
    id: str
    size: int
    content_type: str
    metadata: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)
    video_id: str | None = None
    expired: bool = False


@dataclass
class _Fault:
    kind: RequestKind
    status: int
    reason: str
    location: str
    headers: dict[str, str]
    remaining: int | None  # None: every matching request


@dataclass
class _Cut:
    after_bytes: int
    remaining: int | None  # None: every chunk
    skip: int  # chunks to let through before the first cut


def _api_error_body(status: int, reason: str, location: str = "") -> bytes:
    """Build an error body in the shape of the YouTube Data API's errors."""
    detail: dict[str, str] = {"domain": "youtube.test", "reason": reason}
    detail["message"] = f"test server error {reason}"
    if location:
        detail["location"] = location
        detail["locationType"] = "other"
    error = {"code": status, "message": detail["message"], "errors": [detail]}
    return json.dumps({"error": error}).encode()


class YouTubeServer:
    """The token endpoint and the upload API on one port of 127.0.0.1."""

    def __init__(self, *, token_lifetime_s: int = 3600) -> None:
        # expires_in of issued access tokens, in seconds.
        self.token_lifetime_s = token_lifetime_s
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._sessions: dict[str, _Session] = {}
        self._videos: dict[str, Video] = {}
        self._tokens: dict[str, float] = {}  # token -> time.monotonic() expiry
        self._faults: list[_Fault] = []
        self._cuts: list[_Cut] = []
        self._expire_tokens_after_chunks: int | None = None
        # Chunks to store, counting down, before the reply to the last is held.
        self._hold_after_chunks: int | None = None
        self._holding = threading.Event()
        self._released = threading.Event()
        # Unexpected handler exceptions, as repr(); tests can assert it is empty.
        self.errors: list[str] = []
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name="youtube-server",
            daemon=True,
        )

    def __enter__(self) -> YouTubeServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(_STOP_JOIN_S)

    @property
    def url(self) -> str:
        """The base URL to pass as the uploader's api_url."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_uri(self) -> str:
        return self.url + TOKEN_PATH

    def credentials(self) -> dict[str, str]:
        """An authorized-user credentials document for this server."""
        return {
            "type": "authorized_user",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "refresh_token": REFRESH_TOKEN,
            "token_uri": self.token_uri,
        }

    def write_credentials(self, path: Path, **changes: str) -> Path:
        """Write ``credentials()`` with ``changes`` applied as JSON to ``path``."""
        path.write_text(json.dumps({**self.credentials(), **changes}))
        return path

    # Faults.

    def fail(
        self,
        kind: RequestKind,
        status: int,
        *,
        reason: str = "backendError",
        location: str = "",
        headers: dict[str, str] | None = None,
        times: int | None = 1,
    ) -> None:
        """Reply to the next ``times`` requests of ``kind`` (None: all) with
        ``status`` and an error body with ``reason``, without acting on them."""
        with self._lock:
            self._faults.append(
                _Fault(kind, status, reason, location, headers or {}, times)
            )

    def cut_chunks(
        self, after_bytes: int, *, times: int | None = 1, skip: int = 0
    ) -> None:
        """Reset the connection of ``times`` chunk PUTs (None: all) after reading
        ``after_bytes`` of the body, once ``skip`` chunks went through whole.

        The session keeps the bytes read, rounded down to a multiple of 256 KiB,
        as Google's servers keep a prefix of a cut chunk. Chunks shorter than
        ``after_bytes`` pass without a cut.
        """
        with self._lock:
            self._cuts.append(_Cut(after_bytes, times, skip))

    def clear_faults(self) -> None:
        """Forget every scripted fault and cut that has not happened yet."""
        with self._lock:
            self._faults.clear()
            self._cuts.clear()

    def expire_session(self, session_uri: str) -> None:
        """Make the session return 404 Not Found from now on."""
        with self._lock:
            self._sessions[_session_id(session_uri)].expired = True

    def expire_tokens(self) -> None:
        """Make every access token issued so far invalid, so requests get 401."""
        with self._lock:
            self._tokens.clear()

    def expire_tokens_after_chunks(self, count: int) -> None:
        """Expire every access token once ``count`` more chunks were stored."""
        with self._lock:
            self._expire_tokens_after_chunks = count

    def hold_reply(self, *, after_chunks: int) -> None:
        """Store the ``after_chunks``-th chunk from now on, then hold its reply.

        The reply waits until ``release_reply`` (at most _HOLD_LIMIT_S), so
        the client waits for it with every byte of that chunk sent.
        """
        with self._lock:
            self._hold_after_chunks = after_chunks
            self._holding.clear()
            self._released.clear()

    def wait_held(self, timeout_s: float) -> bool:
        """Wait until a reply is held; return False after ``timeout_s`` seconds."""
        return self._holding.wait(timeout_s)

    def release_reply(self) -> None:
        """Send the held reply."""
        self._released.set()

    # Inspection.

    @property
    def requests(self) -> list[RequestRecord]:
        """Copies of every request record, in arrival order."""
        with self._lock:
            return [replace(record) for record in self._records]

    def count(self, kind: RequestKind) -> int:
        """Return how many requests of ``kind`` the server received."""
        return sum(1 for record in self.requests if record.kind == kind)

    @property
    def videos(self) -> list[Video]:
        with self._lock:
            return list(self._videos.values())

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def session_bytes(self, session_uri: str) -> int:
        """Return how many bytes the session stores."""
        with self._lock:
            return len(self._sessions[_session_id(session_uri)].data)

    def metadata(self, session_uri: str) -> dict[str, Any]:
        """Return the video resource that opened the session."""
        with self._lock:
            return self._sessions[_session_id(session_uri)].metadata

    # Request handling, called by the handler threads.

    def _record(self, record: RequestRecord) -> None:
        """Store ``record``, which the handler thread goes on updating."""
        with self._lock:
            self._records.append(record)

    def _pop_fault(self, kind: RequestKind) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind != kind:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
            return None

    def _pop_cut(self, body_bytes: int) -> _Cut | None:
        """Return the cut for a chunk of ``body_bytes``, if one applies to it."""
        with self._lock:
            if not self._cuts or self._cuts[0].after_bytes >= body_bytes:
                return None
            cut = self._cuts[0]
            if cut.skip > 0:
                cut.skip -= 1
                return None
            if cut.remaining is not None:
                cut.remaining -= 1
                if cut.remaining <= 0:
                    self._cuts.pop(0)
            return cut

    def _issue_token(self) -> tuple[str, int]:
        token = "ya29.test-" + secrets.token_hex(8)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime_s
        return token, self.token_lifetime_s

    def _token_valid(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        with self._lock:
            expiry = self._tokens.get(authorization.removeprefix("Bearer "))
        return expiry is not None and time.monotonic() < expiry

    def _open_session(
        self, size: int, content_type: str, metadata: dict[str, Any]
    ) -> str:
        session_id = secrets.token_hex(12)
        with self._lock:
            self._sessions[session_id] = _Session(
                session_id, size, content_type, metadata
            )
        return f"{self.url}{UPLOAD_PATH}?uploadType=resumable&upload_id={session_id}"

    def _find_session(self, session_id: str) -> _Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
            return None if session is None or session.expired else session

    def _store(self, session: _Session, data: bytes) -> None:
        """Append ``data`` to the session and create the video once it is whole."""
        with self._lock:
            session.data += data
            if self._expire_tokens_after_chunks is not None:
                self._expire_tokens_after_chunks -= 1
                if self._expire_tokens_after_chunks <= 0:
                    self._expire_tokens_after_chunks = None
                    self._tokens.clear()
            if len(session.data) < session.size:
                return
            video = Video(
                secrets.token_urlsafe(8)[:11], bytes(session.data), session.metadata
            )
            session.video_id = video.id
            self._videos[video.id] = video

    def _hold_if_due(self) -> None:
        """Hold the reply to the chunk just stored if ``hold_reply`` requested it."""
        with self._lock:
            if self._hold_after_chunks is None:
                return
            self._hold_after_chunks -= 1
            if self._hold_after_chunks > 0:
                return
            self._hold_after_chunks = None
        self._holding.set()
        self._released.wait(_HOLD_LIMIT_S)

    def _video(self, session: _Session) -> Video | None:
        with self._lock:
            return self._videos.get(session.video_id or "")


def _session_id(session_uri: str) -> str:
    return parse_qs(urlsplit(session_uri).query)["upload_id"][0]


def _video_resource(video: Video) -> bytes:
    status = {"uploadStatus": "uploaded", **video.metadata.get("status", {})}
    resource = {
        "kind": "youtube#video",
        "id": video.id,
        "snippet": video.metadata.get("snippet", {}),
        "status": status,
    }
    return json.dumps(resource).encode()


def _metadata_problem(metadata: Any) -> tuple[str, str] | None:
    """Return the (reason, location) that YouTube would reject, or None."""
    if not isinstance(metadata, dict):
        return "parseError", "body"
    snippet = metadata.get("snippet")
    status = metadata.get("status")
    if not isinstance(snippet, dict) or not isinstance(status, dict):
        return "invalidVideoMetadata", "body"
    title = snippet.get("title")
    if not isinstance(title, str) or not title.strip():
        return "invalidTitle", "snippet.title"
    if len(title) > MAX_TITLE_CHARS or re.search(r"[<>\x00-\x1f\x7f]", title):
        return "invalidTitle", "snippet.title"
    description = snippet.get("description", "")
    if not isinstance(description, str) or re.search(r"[<>]", description):
        return "invalidDescription", "snippet.description"
    if len(description.encode()) > MAX_DESCRIPTION_BYTES:
        return "invalidDescription", "snippet.description"
    if status.get("privacyStatus") not in PRIVACY_STATUSES:
        return "invalidPrivacyStatus", "status.privacyStatus"
    return None


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, youtube: YouTubeServer) -> None:
        self.youtube = youtube
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: object,
    ) -> None:
        # A cut chunk closes the socket under the handler, so its final flush
        # fails. Clients that hang up cause the same error.
        error = sys.exc_info()[1]
        if isinstance(error, OSError | ValueError):
            return
        self.youtube.errors.append(repr(error))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vodq-youtube-test/1.0"
    sys_version = ""
    timeout = _SOCKET_TIMEOUT_S
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == TOKEN_PATH:
            self._handle(self._token, "token")
        elif parts.path == UPLOAD_PATH:
            self._handle(self._initiate, "initiate")
        else:
            self._handle(self._not_found, "other")

    def do_PUT(self) -> None:
        content_range = self.headers.get("Content-Range", "")
        if urlsplit(self.path).path != UPLOAD_PATH:
            self._handle(self._not_found, "other")
        elif _QUERY_RANGE.fullmatch(content_range):
            self._handle(self._query, "query")
        else:
            self._handle(self._chunk, "chunk")

    def _handle(self, action: Any, kind: RequestKind) -> None:
        youtube = self.server.youtube
        headers = {
            name: value
            for name in _RECORDED_HEADERS
            if (value := self.headers.get(name)) is not None
        }
        record = RequestRecord(
            self.command, urlsplit(self.path).path, kind, headers=headers
        )
        # Recorded before the reply, so a client that has its response always
        # finds its request in the records. The handler fills in the rest.
        youtube._record(record)
        fault = youtube._pop_fault(kind)
        if fault is None:
            action(record)
            return
        record.body_bytes = len(self._read_body())
        if kind == "token":
            body = json.dumps({"error": fault.reason}).encode()
        else:
            body = _api_error_body(fault.status, fault.reason, fault.location)
        self._reply(record, fault.status, body, fault.headers)

    def _read_body(self, limit: int | None = None) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        wanted = length if limit is None else min(limit, length)
        return self.rfile.read(wanted)

    def _reply(
        self,
        record: RequestRecord,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json; charset=UTF-8",
    ) -> None:
        record.status = status
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _api_error(
        self, record: RequestRecord, status: int, reason: str, location: str = ""
    ) -> None:
        self._reply(record, status, _api_error_body(status, reason, location))

    def _not_found(self, record: RequestRecord) -> None:
        record.body_bytes = len(self._read_body())
        self._api_error(record, 404, "notFound")

    def _token(self, record: RequestRecord) -> None:
        body = self._read_body()
        record.body_bytes = len(body)
        form = {key: values[0] for key, values in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "refresh_token":
            error = "unsupported_grant_type"
        elif (form.get("client_id"), form.get("client_secret")) != (
            CLIENT_ID,
            CLIENT_SECRET,
        ):
            error = "invalid_client"
        elif form.get("refresh_token") != REFRESH_TOKEN:
            error = "invalid_grant"
        else:
            token, lifetime_s = self.server.youtube._issue_token()
            grant = {
                "access_token": token,
                "expires_in": lifetime_s,
                "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/youtube.upload",
            }
            self._reply(record, 200, json.dumps(grant).encode())
            return
        status = 401 if error == "invalid_client" else 400
        self._reply(record, status, json.dumps({"error": error}).encode())

    def _initiate(self, record: RequestRecord) -> None:
        youtube = self.server.youtube
        body = self._read_body()
        record.body_bytes = len(body)
        query = parse_qs(urlsplit(self.path).query)
        parts = set(query.get("part", [""])[0].split(","))

        if not youtube._token_valid(self.headers.get("Authorization")):
            self._api_error(record, 401, "authError", "Authorization")
            return
        if query.get("uploadType") != ["resumable"] or not {"snippet", "status"} <= (
            parts
        ):
            self._api_error(record, 400, "invalidParameter", "part")
            return

        length = self.headers.get("X-Upload-Content-Length", "")
        content_type = self.headers.get("X-Upload-Content-Type", "")
        if not length.isdigit() or int(length) <= 0:
            self._api_error(record, 400, "invalidLength", "X-Upload-Content-Length")
            return
        if not (
            content_type.startswith("video/")
            or content_type == "application/octet-stream"
        ):
            self._api_error(record, 400, "invalidContentType", "X-Upload-Content-Type")
            return

        try:
            metadata = json.loads(body)
        except ValueError:
            metadata = None
        problem = _metadata_problem(metadata)
        if problem is not None:
            self._api_error(record, 400, *problem)
            return

        session_uri = youtube._open_session(int(length), content_type, metadata)
        self._reply(record, 200, headers={"Location": session_uri})

    def _session_or_reply(self, record: RequestRecord) -> _Session | None:
        """Find the request's session, or reply with the error and return None."""
        youtube = self.server.youtube
        if not youtube._token_valid(self.headers.get("Authorization")):
            self._api_error(record, 401, "authError", "Authorization")
            return None
        ids = parse_qs(urlsplit(self.path).query).get("upload_id", [""])
        session = youtube._find_session(ids[0])
        if session is None:
            self._api_error(record, 404, "notFound", "upload_id")
        return session

    def _query(self, record: RequestRecord) -> None:
        record.body_bytes = len(self._read_body())
        session = self._session_or_reply(record)
        if session is None:
            return
        match = _QUERY_RANGE.fullmatch(self.headers["Content-Range"])
        if match is None or int(match.group(1)) != session.size or record.body_bytes:
            self._api_error(record, 400, "invalidContentRange", "Content-Range")
            return
        self._reply_state(record, session)

    def _reply_state(self, record: RequestRecord, session: _Session) -> None:
        video = self.server.youtube._video(session)
        if video is not None:
            self._reply(record, 200, _video_resource(video))
            return
        stored = len(session.data)
        # A session without bytes returns 308 without a Range header.
        headers = {"Range": f"bytes=0-{stored - 1}"} if stored else {}
        self._reply(record, 308, headers=headers)

    def _chunk(self, record: RequestRecord) -> None:
        youtube = self.server.youtube
        if self.headers.get("Content-Length") is None:
            record.body_bytes = 0
            self.close_connection = True
            self._api_error(record, 411, "lengthRequired", "Content-Length")
            return
        length = int(self.headers["Content-Length"])
        cut = youtube._pop_cut(length)
        if cut is not None:
            self._cut(record, cut.after_bytes)
            return

        body = self._read_body()
        record.body_bytes = len(body)
        session = self._session_or_reply(record)
        if session is None:
            return
        if session.video_id is not None:
            self._reply_state(record, session)
            return
        problem = self._chunk_problem(session, len(body))
        if problem is not None:
            self._api_error(record, 400, problem, "Content-Range")
            return
        youtube._store(session, body)
        youtube._hold_if_due()
        self._reply_state(record, session)

    def _chunk_problem(self, session: _Session, body_bytes: int | None) -> str | None:
        """Return the error reason of an invalid chunk, or None.

        ``body_bytes`` None skips the length checks, for a chunk that was cut.
        """
        match = _CHUNK_RANGE.fullmatch(self.headers.get("Content-Range", ""))
        if match is None:
            return "invalidContentRange"
        first, last, total = (int(group) for group in match.groups())
        if total != session.size or last >= total or last < first:
            return "invalidContentRange"
        if first != len(session.data):
            return "unexpectedOffset"
        if body_bytes is None:
            return None
        if last - first + 1 != body_bytes:
            return "invalidContentLength"
        if last + 1 < total and body_bytes % CHUNK_MULTIPLE_BYTES:
            return "invalidChunkSize"
        return None

    def _cut(self, record: RequestRecord, after_bytes: int) -> None:
        """Read ``after_bytes`` of the chunk, keep a prefix, reset the connection."""
        youtube = self.server.youtube
        body = self._read_body(after_bytes)
        record.body_bytes = len(body)
        ids = parse_qs(urlsplit(self.path).query).get("upload_id", [""])
        session = youtube._find_session(ids[0])
        valid = (
            session is not None
            and youtube._token_valid(self.headers.get("Authorization"))
            and self._chunk_problem(session, None) is None
        )
        kept = len(body) - len(body) % CHUNK_MULTIPLE_BYTES
        if session is not None and valid and kept:
            youtube._store(session, body[:kept])
        record.status = 0
        self.close_connection = True
        # SO_LINGER with a zero timeout makes close() send a TCP reset.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.connection.close()
