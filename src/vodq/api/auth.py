"""Authentication for the admin API: every request to ``/admin`` or below it.

The guard is a pure ASGI middleware rather than a FastAPI dependency, so a
new admin route is protected without having to opt in, and a rejected request
never reaches routing, validation or the service layer.

Modes, chosen from the settings:

* ``ADMIN_TOKEN``: the ``X-Admin-Token`` header must equal the token.
* ``ADMIN_USERNAME`` and ``ADMIN_PASSWORD``: HTTP Basic credentials must match.
* both: either credential is accepted.
* neither: only direct loopback clients without proxy headers are let in.

A failed check returns 401. Its ``WWW-Authenticate`` challenge is
``Basic realm="vodq"`` when Basic auth is configured. In token-only mode it is
``X-Admin-Token realm="vodq"``, because RFC 7235 (section 3.1) requires a
challenge on every 401. That scheme names the header to send and does not
invite a browser's Basic login dialog.

Wrong or malformed credentials count against a budget per client (see
``FAILURE_LIMIT``). A client over budget gets 429 with ``Retry-After``, even
with the right credentials, until its oldest counted failure expires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from vodq.config import Settings

logger = logging.getLogger(__name__)

ADMIN_PATH_PREFIX = "/admin"
TOKEN_HEADER = b"x-admin-token"
PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
AUTH_REALM = "vodq"
CROSS_SITE_MESSAGE = (
    "the admin API rejects cross-site browser requests (the Origin header "
    "does not match Host); call it from a command-line client or the same origin"
)
REBINDING_MESSAGE = (
    "the admin API rejects requests for a non-loopback Host because no admin "
    "credentials are configured; use http://localhost or http://127.0.0.1, or "
    "set ADMIN_TOKEN, or ADMIN_USERNAME and ADMIN_PASSWORD"
)

# A client that fails this many times within the window gets 429 until the
# oldest of those failures is older than the window.
FAILURE_LIMIT = 10
FAILURE_WINDOW_S = 60.0
# Above this many clients with recent failures, the least recently failed
# client is forgotten, so a flood of addresses cannot exhaust memory.
MAX_TRACKED_CLIENTS = 10_000
# IPv6 clients are keyed by their /64, the standard size of one IPv6 subnet, so
# that one host cannot get a fresh budget from each of its addresses.
# NOTE: a client that controls a whole /48 still gets one budget per /64.
IPV6_CLIENT_PREFIX_BITS = 64
# Each round undoes one layer of percent-encoding, for example ``%2561`` to
# ``%61`` to ``a``, so double-encoded paths are recognised too.
MAX_PATH_DECODE_ROUNDS = 4
# Fallback keys from non-IP peer names are cut to this length.
MAX_CLIENT_KEY_CHARS = 64
# Close code sent to a rejected WebSocket handshake (RFC 6455: policy violation).
WS_POLICY_VIOLATION = 1008

FIX_HINT = "set ADMIN_TOKEN, or ADMIN_USERNAME and ADMIN_PASSWORD"
MESSAGE_INVALID = "invalid admin credentials"
MESSAGE_MALFORMED = (
    "malformed Authorization header: expected 'Basic' followed by "
    "base64 of USERNAME:PASSWORD"
)
MESSAGE_REMOTE = (
    "the admin API rejects non-loopback clients because no admin credentials "
    f"are configured; {FIX_HINT}"
)
MESSAGE_PROXIED = (
    "the admin API rejects proxied requests (with a Forwarded, X-Forwarded-For "
    f"or X-Real-IP header) because no admin credentials are configured; {FIX_HINT}"
)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Outcome(Enum):
    """Result of checking one request's credentials."""

    ACCEPTED = "accepted"
    MISSING = "missing"
    INVALID = "invalid"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class Rejection:
    """A response that ends a request before it reaches the app."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def install_admin_auth(app: FastAPI, settings: Settings) -> None:
    """Guard every ``/admin`` path of ``app`` and log the mode in force.

    A second call on the same app does nothing, so ``create_app`` and a test
    may both call it. Raises ValueError when only one of ``admin_username``
    and ``admin_password`` is set, because that would leave the API open to
    loopback clients while the operator believes it is protected.
    """
    if getattr(app.state, "admin_auth_installed", False):
        return
    if bool(settings.admin_username) != bool(settings.admin_password):
        raise ValueError(
            "ADMIN_USERNAME and ADMIN_PASSWORD must be set together for Basic auth"
        )

    limiter = FailureLimiter(
        max_failures=FAILURE_LIMIT,
        window_s=FAILURE_WINDOW_S,
        max_clients=MAX_TRACKED_CLIENTS,
    )
    app.add_middleware(AdminAuthMiddleware, settings=settings, limiter=limiter)
    app.state.admin_auth_installed = True

    configured = bool(settings.admin_token or settings.admin_username)
    level = logging.INFO if configured else logging.WARNING
    logger.log(level, "%s", describe_admin_auth(settings))


def describe_admin_auth(settings: Settings) -> str:
    """Return a one-line, secret-free description of the admin auth mode."""
    token = bool(settings.admin_token)
    basic = bool(settings.admin_username and settings.admin_password)
    if not token and not basic:
        return (
            "admin API: no credentials configured; /admin accepts only direct "
            f"loopback clients ({FIX_HINT} to allow others)"
        )
    if token and basic:
        mode = "token or basic auth"
    elif token:
        mode = "token auth"
    else:
        mode = "basic auth"
    description = f"admin API: {mode}"
    if settings.trusted_proxies:
        networks = ", ".join(str(network) for network in settings.trusted_proxies)
        description += f"; failed logins keyed by X-Forwarded-For from {networks}"
    return description


@dataclass
class _ClientFailures:
    times: deque[float]
    reported_at: float | None = None


class FailureLimiter:
    """Per-client record of recent failed logins, bounded in memory.

    Each client keeps at most ``max_failures`` timestamps, and at most
    ``max_clients`` clients are kept, least recently failed evicted first.
    A lock guards the table, so the limiter may be shared between threads.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, _ClientFailures] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._failures)

    def retry_after_s(self, key: str) -> float | None:
        """Return the seconds until ``key`` may try again, or None if it may now."""
        with self._lock:
            now = self._clock()
            client = self._recent(key, now)
            if client is None or len(client.times) < self.max_failures:
                return None
            return max(client.times[0] + self.window_s - now, 0.0)

    def record_failure(self, key: str) -> bool:
        """Count one failure of ``key`` and tell whether to report a lockout.

        Returns True when this failure uses up the budget of ``key`` and no
        lockout of ``key`` was reported within the window, so that a client
        that keeps failing is reported at most once per window.
        """
        with self._lock:
            now = self._clock()
            client = self._recent(key, now)
            if client is None:
                client = _ClientFailures(deque(maxlen=self.max_failures))
                self._failures[key] = client
            client.times.append(now)
            self._failures.move_to_end(key)
            self._forget_stale(now)
            if len(client.times) < self.max_failures:
                return False
            last = client.reported_at
            if last is not None and now - last < self.window_s:
                return False
            client.reported_at = now
            return True

    def _recent(self, key: str, now: float) -> _ClientFailures | None:
        client = self._failures.get(key)
        if client is None:
            return None
        while client.times and client.times[0] <= now - self.window_s:
            client.times.popleft()
        if not client.times:
            del self._failures[key]
            return None
        return client

    def _forget_stale(self, now: float) -> None:
        # The table is ordered by each client's latest failure, so clients whose
        # failures have all expired sit at the front.
        while self._failures:
            oldest_key, oldest = next(iter(self._failures.items()))
            expired = oldest.times[-1] <= now - self.window_s
            if not expired and len(self._failures) <= self.max_clients:
                break
            del self._failures[oldest_key]


class AdminAuthMiddleware:
    """ASGI middleware that rejects unauthenticated requests to admin paths."""

    def __init__(
        self, app: ASGIApp, *, settings: Settings, limiter: FailureLimiter
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.trusted_proxies = settings.trusted_proxies
        self.token_digest = _optional_digest(settings.admin_token)
        self.basic_digests: tuple[bytes, bytes] | None = None
        if settings.admin_username and settings.admin_password:
            self.basic_digests = (
                _digest(settings.admin_username.encode()),
                _digest(settings.admin_password.encode()),
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not is_admin_path(scope):
            await self.app(scope, receive, send)
            return
        rejection = self.check(scope)
        if rejection is None:
            await self.app(scope, receive, send)
            return
        await _send_rejection(rejection, scope, send)

    def check(self, scope: Scope) -> Rejection | None:
        """Return why the request in ``scope`` is rejected, or None to let it in."""
        headers = _header_values(scope)
        cross_site = _check_origin(headers)
        if cross_site is not None:
            return cross_site
        if self.token_digest is None and self.basic_digests is None:
            return _check_loopback_host(headers) or _check_loopback(scope, headers)

        key = client_key(scope, headers, self.trusted_proxies)
        retry_after_s = self.limiter.retry_after_s(key)
        if retry_after_s is not None:
            seconds = max(1, math.ceil(retry_after_s))
            return Rejection(
                429,
                "too many failed admin logins from this client; "
                f"retry after {seconds} s",
                (("Retry-After", str(seconds)),),
            )

        outcome = self.verify(headers)
        if outcome is Outcome.ACCEPTED:
            return None
        logger.debug("admin API: %s credentials from client %s", outcome.value, key)
        # A request without credentials guesses nothing, so only wrong or
        # malformed credentials use up the budget.
        if outcome is not Outcome.MISSING and self.limiter.record_failure(key):
            logger.warning(
                "admin API: client %s failed to log in %d times within %g s; "
                "rejecting it with 429 until the oldest failure expires",
                key,
                self.limiter.max_failures,
                self.limiter.window_s,
            )
        return Rejection(401, self._message(outcome), self._challenge())

    def verify(self, headers: dict[bytes, list[bytes]]) -> Outcome:
        """Check the token and the Basic credentials; either one may match."""
        outcomes: list[Outcome] = []
        if self.token_digest is not None:
            outcomes.append(_verify_token(headers, self.token_digest))
        if self.basic_digests is not None:
            outcomes.append(_verify_basic(headers, self.basic_digests))
        for outcome in (Outcome.ACCEPTED, Outcome.MALFORMED, Outcome.INVALID):
            if outcome in outcomes:
                return outcome
        return Outcome.MISSING

    def _message(self, outcome: Outcome) -> str:
        if outcome is Outcome.MALFORMED:
            return MESSAGE_MALFORMED
        if outcome is Outcome.INVALID:
            return MESSAGE_INVALID
        if self.token_digest is not None and self.basic_digests is not None:
            expected = "the X-Admin-Token header or HTTP Basic credentials"
        elif self.token_digest is not None:
            expected = "the X-Admin-Token header"
        else:
            expected = "HTTP Basic credentials"
        return f"admin credentials required: send {expected}"

    def _challenge(self) -> tuple[tuple[str, str], ...]:
        scheme = "Basic" if self.basic_digests is not None else "X-Admin-Token"
        return (("WWW-Authenticate", f'{scheme} realm="{AUTH_REALM}"'),)


def is_admin_path(scope: Scope) -> bool:
    """Return True if any reading of the request path lands under ``/admin``.

    Starlette routes on the decoded ``scope["path"]`` minus ``root_path``, and a
    proxy in front may decode or normalise the path differently. So the path,
    the route path and the raw path are each checked as sent, with dot segments
    and repeated slashes resolved, and after each round of percent-decoding.
    The comparison ignores case. Matching too much only guards a path that has
    no public route.
    """
    return any(
        _is_admin(form) or _is_admin(_normalise_path(form))
        for path in _path_forms(scope)
        for form in _decodings(path)
    )


def client_key(
    scope: Scope,
    headers: dict[bytes, list[bytes]],
    trusted_proxies: tuple[IPNetwork, ...],
) -> str:
    """Return the key that failed logins are counted under for this request.

    The key is the direct peer, except when the peer is a trusted proxy: then
    it is the right-most ``X-Forwarded-For`` address that is not a trusted
    proxy. Addresses left of it could have been written by the client.
    """
    peer_host = _peer_host(scope)
    if peer_host is None:
        return "unknown"
    peer = _parse_address(peer_host)
    if peer is None:
        return peer_host[:MAX_CLIENT_KEY_CHARS]
    if not _is_trusted(peer, trusted_proxies):
        return _address_key(peer)

    forwarded = b",".join(headers.get(b"x-forwarded-for", [])).decode("latin-1")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    nearest = peer
    for hop in reversed(hops):
        address = _parse_address(hop)
        if address is None:
            # A trusted proxy would not write this, so nothing further left can
            # be trusted. Falling back to the last trusted hop shares its budget.
            break
        nearest = address
        if not _is_trusted(address, trusted_proxies):
            break
    return _address_key(nearest)


# NOTE: a reverse proxy on the same host that adds none of PROXY_HEADERS makes
# every client it forwards look like a direct loopback client.
def _check_loopback(
    scope: Scope, headers: dict[bytes, list[bytes]]
) -> Rejection | None:
    host = _peer_host(scope)
    address = None if host is None else _parse_address(host)
    if address is None or not address.is_loopback:
        logger.debug("admin API: rejected non-loopback client %s", host)
        return Rejection(403, MESSAGE_REMOTE)
    if any(name in headers for name in PROXY_HEADERS):
        logger.debug("admin API: rejected proxied request from %s", host)
        return Rejection(403, MESSAGE_PROXIED)
    return None


def _verify_token(headers: dict[bytes, list[bytes]], expected: bytes) -> Outcome:
    values = headers.get(TOKEN_HEADER)
    if not values:
        return Outcome.MISSING
    if len(values) != 1:
        return Outcome.INVALID
    if hmac.compare_digest(_digest(values[0]), expected):
        return Outcome.ACCEPTED
    return Outcome.INVALID


def _verify_basic(
    headers: dict[bytes, list[bytes]], expected: tuple[bytes, bytes]
) -> Outcome:
    values = headers.get(b"authorization")
    if not values:
        return Outcome.MISSING
    if len(values) != 1:
        return Outcome.MALFORMED
    credentials = _decode_basic(values[0])
    if credentials is None:
        return Outcome.MALFORMED
    username, password = credentials
    # Both comparisons always run, and on digests of equal length, so the
    # response time does not tell which part was wrong or how long it is.
    username_ok = hmac.compare_digest(_digest(username), expected[0])
    password_ok = hmac.compare_digest(_digest(password), expected[1])
    if username_ok & password_ok:
        return Outcome.ACCEPTED
    return Outcome.INVALID


def _decode_basic(value: bytes) -> tuple[bytes, bytes] | None:
    """Split an ``Authorization: Basic`` value into username and password bytes.

    The bytes are compared without decoding, so invalid UTF-8 is simply wrong.
    """
    scheme, _, encoded = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return username, password


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _optional_digest(secret: str | None) -> bytes | None:
    return _digest(secret.encode()) if secret else None


def _check_origin(headers: dict[bytes, list[bytes]]) -> Rejection | None:
    """Reject a browser's cross-site request to the admin API.

    Browsers send ``Origin`` with cross-site POSTs, including "simple" ones
    that need no CORS preflight and carry cached Basic credentials, so an
    Origin that is not this server's own Host means another site is calling.
    Clients such as curl send no Origin and are not affected.
    """
    origins = headers.get(b"origin", [])
    if not origins:
        return None
    origin = origins[0].decode("latin-1").strip()
    host = b"".join(headers.get(b"host", [])[:1]).decode("latin-1").strip().lower()
    origin_host = urlsplit(origin).netloc.lower() if "://" in origin else ""
    if len(origins) == 1 and origin_host and origin_host == host:
        return None
    return Rejection(403, CROSS_SITE_MESSAGE)


def _check_loopback_host(headers: dict[bytes, list[bytes]]) -> Rejection | None:
    """Without credentials, insist on a loopback Host, which defeats DNS rebinding.

    A page on another site can make a browser on this machine send requests
    to 127.0.0.1 under the site's own host name; such requests carry that
    name in ``Host``.
    """
    values = headers.get(b"host", [])
    if not values:
        return None
    host = values[0].decode("latin-1").strip().lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return None
    try:
        if ip_address(name).is_loopback:
            return None
    except ValueError:
        pass
    return Rejection(403, REBINDING_MESSAGE)


def _header_values(scope: Scope) -> dict[bytes, list[bytes]]:
    values: dict[bytes, list[bytes]] = {}
    for name, value in scope.get("headers", ()):
        values.setdefault(bytes(name).lower(), []).append(bytes(value))
    return values


def _path_forms(scope: Scope) -> Iterator[str]:
    path = str(scope.get("path", ""))
    yield path
    # Starlette matches routes against the path with root_path removed.
    root_path = str(scope.get("root_path", ""))
    if root_path and path.startswith(root_path):
        yield path[len(root_path) :]
    raw_path = scope.get("raw_path")
    if isinstance(raw_path, bytes):
        yield raw_path.decode("latin-1")


def _decodings(path: str) -> Iterator[str]:
    yield path
    for _ in range(MAX_PATH_DECODE_ROUNDS):
        decoded = unquote(path, errors="replace")
        if decoded == path:
            return
        path = decoded
        yield path


def _normalise_path(path: str) -> str:
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def _is_admin(path: str) -> bool:
    folded = path.casefold()
    return folded == ADMIN_PATH_PREFIX or folded.startswith(ADMIN_PATH_PREFIX + "/")


def _peer_host(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    return str(client[0])


def _parse_address(text: str) -> IPAddress | None:
    """Parse an address as written by servers and proxies, with or without a port."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: IPAddress, trusted_proxies: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in trusted_proxies)


def _address_key(address: IPAddress) -> str:
    if isinstance(address, IPv6Address):
        network = ip_network(f"{address}/{IPV6_CLIENT_PREFIX_BITS}", strict=False)
        return str(network)
    return str(address)


async def _send_rejection(rejection: Rejection, scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting makes the server reject the handshake with 403.
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        return
    body = json.dumps({"error": rejection.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in rejection.headers),
    ]
    await send(
        {"type": "http.response.start", "status": rejection.status, "headers": headers}
    )
    await send({"type": "http.response.body", "body": body})
