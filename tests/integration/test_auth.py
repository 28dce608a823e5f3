"""Admin API authentication, on the real app over a real SQLite service.

Most requests go through ``httpx.ASGITransport`` with a chosen peer address.
203.0.113.x, 198.51.100.x and 2001:db8:: are documentation addresses that only
ever appear inside an in-process ASGI scope. A few tests run uvicorn on
127.0.0.1 to show what a real socket and a real server's path decoding do.
"""

from __future__ import annotations

import base64
import http.client
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import ip_network
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import Message

from conftest import ServiceFactory, wait_for
from vodq.api import auth
from vodq.api.app import create_app
from vodq.api.auth import (
    MESSAGE_INVALID,
    MESSAGE_MALFORMED,
    MESSAGE_PROXIED,
    MESSAGE_REMOTE,
    AdminAuthMiddleware,
    FailureLimiter,
    client_key,
    describe_admin_auth,
    install_admin_auth,
    is_admin_path,
)
from vodq.config import Settings
from vodq.service import Service

REMOTE = ("203.0.113.9", 40000)
OTHER_REMOTE = ("203.0.113.10", 40000)
LOOPBACK = ("127.0.0.1", 40000)
PROXY = ("10.0.0.5", 40000)

TOKEN = "t0ken-Secret-4821"
USERNAME = "archivist"
PASSWORD = "pa55-Secret-9137"
WRONG_TOKEN = "guess-Secret-1"
WRONG_PASSWORD = "guess-Secret-2"

TOKEN_ENV = {"ADMIN_TOKEN": TOKEN}
BASIC_ENV = {"ADMIN_USERNAME": USERNAME, "ADMIN_PASSWORD": PASSWORD}
MODES: dict[str, dict[str, str]] = {
    "token": TOKEN_ENV,
    "basic": BASIC_ENV,
    "both": {**TOKEN_ENV, **BASIC_ENV},
    "none": {},
}

NEW_VOD = {"vod_id": "123456789"}
ADD_VOD = "/admin/vods"


def basic(username: str, password: str, scheme: str = "Basic") -> dict[str, str]:
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"{scheme} {encoded}"}


RIGHT_TOKEN = {"X-Admin-Token": TOKEN}
BAD_TOKEN = {"X-Admin-Token": WRONG_TOKEN}
RIGHT_BASIC = basic(USERNAME, PASSWORD)
BAD_BASIC = basic(USERNAME, WRONG_PASSWORD)


def build_app(service: Service) -> FastAPI:
    """Build the real app with admin auth, installed once even if create_app did."""
    app = create_app(service, manage_lifecycle=False)
    install_admin_auth(app, service.settings)
    return app


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(make_service: ServiceFactory) -> AppFactory:
    def factory(**env: str) -> FastAPI:
        return build_app(make_service(run_worker=False, **env))

    return factory


def call(
    app: FastAPI,
    method: str = "POST",
    path: str = ADD_VOD,
    *,
    client: tuple[str, int] = REMOTE,
    headers: dict[str, Any] | None = None,
    json: Any = NEW_VOD,
) -> httpx.Response:
    """Send one request to ``app`` in process, as if from ``client``."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)
        # trust_env=False keeps proxy variables from routing anything off-process.
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", trust_env=False
        ) as http_client:
            body = None if method in ("GET", "HEAD", "OPTIONS") else json
            return await http_client.request(method, path, headers=headers, json=body)

    return anyio.run(send)


def fail_times(app: FastAPI, count: int, **kwargs: Any) -> list[int]:
    """Send ``count`` requests with a wrong token and return their statuses."""
    kwargs.setdefault("headers", BAD_TOKEN)
    return [call(app, **kwargs).status_code for _ in range(count)]


def asgi_scope(
    path: str,
    *,
    raw_path: bytes | None = None,
    root_path: str = "",
    client: tuple[str, int] | None = REMOTE,
    headers: list[tuple[bytes, bytes]] | None = None,
    scope_type: str = "http",
) -> dict[str, Any]:
    return {
        "type": scope_type,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode() if raw_path is None else raw_path,
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *(headers or [])],
        "client": client,
        "server": ("vodq.test", 80),
    }


def call_asgi(app: FastAPI, scope: dict[str, Any]) -> list[Message]:
    """Run ``app`` on a hand-built scope and return every message it sent."""
    sent: list[Message] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b'{"vod_id": "123456789"}'},
        {"type": "http.disconnect"},
    ]
    if scope["type"] == "websocket":
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect"}]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        await app(scope, receive, send)

    anyio.run(run)
    return sent


def asgi_status(app: FastAPI, scope: dict[str, Any]) -> int:
    start = call_asgi(app, scope)[0]
    assert start["type"] == "http.response.start"
    return int(start["status"])


@contextmanager
def live_server(app: FastAPI, http_impl: str = "auto") -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 and yield the port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=http_impl,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout_s=10)
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send ``target`` byte for byte, without the client normalising it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = b'{"vod_id": "123456789"}' if method == "POST" else None
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, target, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- credentials per mode -------------------------------------------------

CREDENTIAL_CASES = [
    ("token", "right_token", RIGHT_TOKEN, 201),
    ("token", "wrong_token", BAD_TOKEN, 401),
    ("token", "missing", {}, 401),
    ("token", "empty_token", {"X-Admin-Token": ""}, 401),
    ("token", "basic_not_configured", RIGHT_BASIC, 401),
    ("basic", "right_basic", RIGHT_BASIC, 201),
    ("basic", "lowercase_scheme", basic(USERNAME, PASSWORD, "basic"), 201),
    ("basic", "wrong_username", basic("intruder", PASSWORD), 401),
    ("basic", "wrong_password", BAD_BASIC, 401),
    ("basic", "swapped", basic(PASSWORD, USERNAME), 401),
    ("basic", "missing", {}, 401),
    ("basic", "token_not_configured", RIGHT_TOKEN, 401),
    ("both", "right_token", RIGHT_TOKEN, 201),
    ("both", "right_basic", RIGHT_BASIC, 201),
    ("both", "wrong_token", BAD_TOKEN, 401),
    ("both", "wrong_basic", BAD_BASIC, 401),
    ("both", "missing", {}, 401),
    ("both", "right_token_wrong_basic", {**RIGHT_TOKEN, **BAD_BASIC}, 201),
    ("both", "wrong_token_right_basic", {**BAD_TOKEN, **RIGHT_BASIC}, 201),
    ("both", "both_wrong", {**BAD_TOKEN, **BAD_BASIC}, 401),
]


@pytest.mark.parametrize(
    ("mode", "headers", "expected"),
    [
        pytest.param(mode, headers, expected, id=f"{mode}-{case}")
        for mode, case, headers, expected in CREDENTIAL_CASES
    ],
)
def test_admin_credentials_per_mode(
    make_app: AppFactory, mode: str, headers: dict[str, str], expected: int
) -> None:
    app = make_app(**MODES[mode])
    assert call(app, headers=headers).status_code == expected


@pytest.mark.parametrize(
    ("mode", "headers", "message"),
    [
        pytest.param(
            "token",
            {},
            "admin credentials required: send the X-Admin-Token header",
            id="token-missing",
        ),
        pytest.param(
            "basic",
            {},
            "admin credentials required: send HTTP Basic credentials",
            id="basic-missing",
        ),
        pytest.param(
            "both",
            {},
            "admin credentials required: send the X-Admin-Token header or "
            "HTTP Basic credentials",
            id="both-missing",
        ),
        pytest.param("token", BAD_TOKEN, MESSAGE_INVALID, id="token-wrong"),
        pytest.param("basic", BAD_BASIC, MESSAGE_INVALID, id="basic-wrong"),
        pytest.param("both", BAD_TOKEN, MESSAGE_INVALID, id="both-wrong"),
    ],
)
def test_unauthorized_message_per_mode(
    make_app: AppFactory, mode: str, headers: dict[str, str], message: str
) -> None:
    app = make_app(**MODES[mode])
    assert call(app, headers=headers).json() == {"error": message}


@pytest.mark.parametrize(
    ("mode", "challenge"),
    [
        pytest.param("token", 'X-Admin-Token realm="vodq"', id="token"),
        pytest.param("basic", 'Basic realm="vodq"', id="basic"),
        pytest.param("both", 'Basic realm="vodq"', id="both"),
    ],
)
def test_unauthorized_challenge_per_mode(
    make_app: AppFactory, mode: str, challenge: str
) -> None:
    app = make_app(**MODES[mode])
    assert call(app, headers={}).headers.get("www-authenticate") == challenge


def test_unauthorized_body_is_json(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    assert call(app, headers={}).headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "method", ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]
)
def test_admin_guard_every_method(make_app: AppFactory, method: str) -> None:
    app = make_app(**TOKEN_ENV)
    assert call(app, method, headers={}).status_code == 401


def test_admin_guard_priority_route(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    body = {"vod_id": "123456789", "priority": 5}
    response = call(app, path="/admin/vod/priority", json=body)
    assert response.status_code == 401


def test_admin_guard_passes_authorized(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    body = {"vod_id": "987", "priority": 5}
    response = call(app, path="/admin/vod/priority", headers=RIGHT_TOKEN, json=body)
    assert response.status_code == 404


# --- malformed Basic credentials ------------------------------------------

MALFORMED_BASIC = [
    ("not_base64", b"Basic !!!not-base64!!!", MESSAGE_MALFORMED),
    ("missing_padding", b"Basic YXJjaGl2aXN0OnBhc3M", MESSAGE_MALFORMED),
    ("no_colon", b"Basic " + base64.b64encode(b"archivist"), MESSAGE_MALFORMED),
    ("scheme_only", b"Basic", MESSAGE_MALFORMED),
    ("empty_credentials", b"Basic ", MESSAGE_MALFORMED),
    ("bearer_scheme", b"Bearer abc.def", MESSAGE_MALFORMED),
    ("non_ascii_bytes", b"Basic \xff\xfe\xfd", MESSAGE_MALFORMED),
    (
        "invalid_utf8",
        b"Basic " + base64.b64encode(b"\xff\xfe:\xfd\xfc"),
        MESSAGE_INVALID,
    ),
    ("empty_both", b"Basic " + base64.b64encode(b":"), MESSAGE_INVALID),
]


@pytest.mark.parametrize(
    ("value", "message"),
    [pytest.param(value, message, id=case) for case, value, message in MALFORMED_BASIC],
)
def test_basic_malformed_rejected(
    make_app: AppFactory, value: bytes, message: str
) -> None:
    app = make_app(**BASIC_ENV)
    response = call(app, headers={"Authorization": value})
    assert response.status_code == 401
    assert response.json() == {"error": message}


def test_basic_duplicate_header_rejected(make_app: AppFactory) -> None:
    app = make_app(**BASIC_ENV)
    headers = [(b"authorization", RIGHT_BASIC["Authorization"].encode())] * 2
    assert asgi_status(app, asgi_scope(ADD_VOD, headers=headers)) == 401


def test_token_duplicate_header_rejected(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    headers = [(b"x-admin-token", TOKEN.encode())] * 2
    assert asgi_status(app, asgi_scope(ADD_VOD, headers=headers)) == 401


# --- no credentials configured: loopback only -----------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_unconfigured_loopback_allowed(make_app: AppFactory, host: str) -> None:
    app = make_app()
    assert call(app, client=(host, 40000)).status_code == 201


@pytest.mark.parametrize(
    "host",
    ["203.0.113.9", "10.0.0.1", "2001:db8::1", "::ffff:203.0.113.9", "testclient"],
)
def test_unconfigured_remote_rejected(make_app: AppFactory, host: str) -> None:
    app = make_app()
    assert call(app, client=(host, 40000)).status_code == 403


def test_unconfigured_remote_message(make_app: AppFactory) -> None:
    app = make_app()
    assert call(app).json() == {"error": MESSAGE_REMOTE}


def test_unconfigured_message_explains_fix() -> None:
    assert "set ADMIN_TOKEN, or ADMIN_USERNAME and ADMIN_PASSWORD" in MESSAGE_REMOTE


def test_unconfigured_missing_client_rejected(make_app: AppFactory) -> None:
    app = make_app()
    assert asgi_status(app, asgi_scope(ADD_VOD, client=None)) == 403


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("Forwarded", "for=127.0.0.1", id="forwarded"),
        pytest.param("X-Forwarded-For", "127.0.0.1", id="x_forwarded_for"),
        pytest.param("X-Real-IP", "127.0.0.1", id="x_real_ip"),
        pytest.param("x-forwarded-for", "", id="empty_x_forwarded_for"),
    ],
)
def test_unconfigured_proxied_loopback_rejected(
    make_app: AppFactory, name: str, value: str
) -> None:
    app = make_app()
    response = call(app, client=LOOPBACK, headers={name: value})
    assert response.status_code == 403


def test_unconfigured_proxied_loopback_message(make_app: AppFactory) -> None:
    app = make_app()
    response = call(app, client=LOOPBACK, headers={"X-Real-IP": "127.0.0.1"})
    assert response.json() == {"error": MESSAGE_PROXIED}


def test_unconfigured_trusted_proxy_still_rejected(make_app: AppFactory) -> None:
    app = make_app(TRUSTED_PROXIES="127.0.0.1")
    response = call(app, client=LOOPBACK, headers={"X-Forwarded-For": "127.0.0.1"})
    assert response.status_code == 403


def test_unconfigured_never_rate_limited(make_app: AppFactory) -> None:
    app = make_app()
    statuses = [call(app).status_code for _ in range(15)]
    assert statuses == [403] * 15


# --- public endpoints -----------------------------------------------------

PUBLIC_STATUSES = {
    "/status": 200,
    "/vods": 200,
    "/vods/404404": 404,
    "/healthz": 200,
    "/metrics": 200,
    "/administrator": 404,
}


@pytest.mark.parametrize("mode", list(MODES))
def test_public_endpoints_open(make_app: AppFactory, mode: str) -> None:
    app = make_app(**MODES[mode])
    statuses = {
        path: call(app, "GET", path, headers={}).status_code for path in PUBLIC_STATUSES
    }
    assert statuses == PUBLIC_STATUSES


# --- path tricks ----------------------------------------------------------

# (decoded path as the server passes it on, raw path as sent, root_path)
PATH_TRICKS = [
    ("dot_segments", "/admin/../admin/vods", b"/admin/../admin/vods", ""),
    ("leading_double_slash", "//admin/vods", b"//admin/vods", ""),
    ("inner_double_slash", "/admin//vods", b"/admin//vods", ""),
    ("dot_prefix", "/./admin/vods", b"/./admin/vods", ""),
    ("climb_from_public", "/vods/../admin/vods", b"/vods/../admin/vods", ""),
    ("percent_encoded", "/admin/vods", b"/%61dmin/vods", ""),
    ("encoded_slash", "/admin/vods", b"/admin%2Fvods", ""),
    ("double_encoded", "/%61dmin/vods", b"/%2561dmin/vods", ""),
    ("upper_case", "/ADMIN/vods", b"/ADMIN/vods", ""),
    ("trailing_slash", "/admin/vods/", b"/admin/vods/", ""),
    ("bare_prefix", "/admin", b"/admin", ""),
    ("root_path", "/vodq/admin/vods", b"/vodq/admin/vods", "/vodq"),
]


@pytest.mark.parametrize(
    ("path", "raw_path", "root_path"),
    [pytest.param(p, r, rp, id=case) for case, p, r, rp in PATH_TRICKS],
)
def test_path_trick_rejected(
    make_app: AppFactory, path: str, raw_path: bytes, root_path: str
) -> None:
    app = make_app(**TOKEN_ENV)
    scope = asgi_scope(path, raw_path=raw_path, root_path=root_path)
    assert asgi_status(app, scope) == 401


@pytest.mark.parametrize(
    ("path", "raw_path", "expected"),
    [
        pytest.param("/admin", b"/admin", True, id="prefix"),
        pytest.param("/admin/vods", b"/admin/vods", True, id="route"),
        pytest.param("/vods", b"/vods", False, id="public"),
        pytest.param("/administrator", b"/administrator", False, id="lookalike"),
        pytest.param("/vods/admin", b"/vods/admin", False, id="admin_below_public"),
        pytest.param("/status", b"/%2561dmin", True, id="raw_double_encoded"),
        pytest.param("/x/../../admin", b"/x/../../admin", True, id="climb_above_root"),
    ],
)
def test_is_admin_path_cases(path: str, raw_path: bytes, expected: bool) -> None:
    assert is_admin_path(asgi_scope(path, raw_path=raw_path)) is expected


def test_websocket_admin_handshake_closed(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    sent = call_asgi(app, asgi_scope("/admin/events", scope_type="websocket"))
    assert sent == [{"type": "websocket.close", "code": 1008}]


# --- rate limiting --------------------------------------------------------


def test_rate_limit_rejects_eleventh_failure(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    assert fail_times(app, 10) == [401] * 10
    response = call(app, headers=BAD_TOKEN)
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 60
    message = response.json()["error"]
    assert message.startswith("too many failed admin logins from this client")


def test_rate_limit_blocks_correct_credentials(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    fail_times(app, 10)
    assert call(app, headers=RIGHT_TOKEN).status_code == 429


def test_rate_limit_counts_malformed_basic(make_app: AppFactory) -> None:
    app = make_app(**BASIC_ENV)
    fail_times(app, 10, headers={"Authorization": "Basic !!!"})
    assert call(app, headers=RIGHT_BASIC).status_code == 429


def test_rate_limit_keeps_other_clients_open(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    fail_times(app, 10)
    response = call(app, client=OTHER_REMOTE, headers=RIGHT_TOKEN)
    assert response.status_code == 201


def test_rate_limit_ignores_missing_credentials(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    fail_times(app, 15, headers={})
    assert call(app, headers=RIGHT_TOKEN).status_code == 201


def test_rate_limit_ignores_successes(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    fail_times(app, 9)
    successes = [call(app, headers=RIGHT_TOKEN).status_code for _ in range(5)]
    assert successes == [201] + [200] * 4
    assert call(app, headers=BAD_TOKEN).status_code == 401
    assert call(app, headers=RIGHT_TOKEN).status_code == 429


def test_rate_limit_expires_after_window(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "FAILURE_WINDOW_S", 0.5)
    app = make_app(**TOKEN_ENV)
    fail_times(app, 10)
    assert call(app, headers=RIGHT_TOKEN).status_code == 429
    time.sleep(0.6)
    assert call(app, headers=RIGHT_TOKEN).status_code == 201


def test_rate_limit_ipv6_keyed_by_prefix(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    fail_times(app, 10, client=("2001:db8::1", 40000))
    same_prefix = call(app, client=("2001:db8::2", 40000), headers=RIGHT_TOKEN)
    assert same_prefix.status_code == 429
    other_prefix = call(app, client=("2001:db8:0:1::1", 40000), headers=RIGHT_TOKEN)
    assert other_prefix.status_code == 201


def test_rate_limit_lockout_logged_once(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(**TOKEN_ENV)
    with caplog.at_level(logging.WARNING, logger="vodq.api.auth"):
        fail_times(app, 12)
    lockouts = [r for r in caplog.records if "failed to log in" in r.getMessage()]
    assert len(lockouts) == 1


# --- X-Forwarded-For keying -----------------------------------------------


def forwarded(address: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": address, **(headers or {})}


def test_trusted_proxy_separates_forwarded_clients(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV, TRUSTED_PROXIES="10.0.0.0/8")
    fail_times(app, 10, client=PROXY, headers=forwarded("198.51.100.1", BAD_TOKEN))
    locked = call(app, client=PROXY, headers=forwarded("198.51.100.1", RIGHT_TOKEN))
    assert locked.status_code == 429
    other = call(app, client=PROXY, headers=forwarded("198.51.100.2", RIGHT_TOKEN))
    assert other.status_code == 201


def test_untrusted_peer_forwarded_for_ignored(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV, TRUSTED_PROXIES="10.0.0.0/8")
    fail_times(app, 10, headers=forwarded("198.51.100.1", BAD_TOKEN))
    response = call(app, headers=forwarded("198.51.100.2", RIGHT_TOKEN))
    assert response.status_code == 429


def test_untrusted_proxy_shares_one_budget(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    fail_times(app, 10, client=PROXY, headers=forwarded("198.51.100.1", BAD_TOKEN))
    other = call(app, client=PROXY, headers=forwarded("198.51.100.2", RIGHT_TOKEN))
    assert other.status_code == 429


def test_trusted_proxy_spoofed_prefix_ignored(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV, TRUSTED_PROXIES="10.0.0.0/8")
    spoofed = [f"192.0.2.{n}, 198.51.100.1, 10.0.0.9" for n in range(10)]
    statuses = [
        call(app, client=PROXY, headers=forwarded(chain, BAD_TOKEN)).status_code
        for chain in spoofed
    ]
    assert statuses == [401] * 10
    response = call(app, client=PROXY, headers=forwarded("198.51.100.1", RIGHT_TOKEN))
    assert response.status_code == 429


TRUSTED = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        pytest.param("203.0.113.9", ["198.51.100.1"], "203.0.113.9", id="untrusted"),
        pytest.param("10.0.0.5", ["198.51.100.1"], "198.51.100.1", id="trusted"),
        pytest.param("10.0.0.5", [], "10.0.0.5", id="trusted_without_header"),
        pytest.param(
            "10.0.0.5",
            ["192.0.2.7, 198.51.100.1, 10.0.0.9"],
            "198.51.100.1",
            id="rightmost_untrusted",
        ),
        pytest.param(
            "10.0.0.5", ["10.0.0.7, 10.0.0.8"], "10.0.0.7", id="all_hops_trusted"
        ),
        pytest.param("10.0.0.5", ["198.51.100.1, unknown"], "10.0.0.5", id="junk_hop"),
        pytest.param(
            "10.0.0.5", ["192.0.2.7", "198.51.100.1"], "198.51.100.1", id="two_headers"
        ),
        pytest.param(
            "10.0.0.5", ["198.51.100.1:5555"], "198.51.100.1", id="hop_with_port"
        ),
        pytest.param(
            "10.0.0.5", ["[2001:db8::7]:443"], "2001:db8::/64", id="ipv6_hop_with_port"
        ),
        pytest.param("fd00::1", ["198.51.100.1"], "198.51.100.1", id="ipv6_proxy"),
        pytest.param("2001:db8::1", [], "2001:db8::/64", id="ipv6_peer"),
        pytest.param("::ffff:203.0.113.9", [], "203.0.113.9", id="ipv4_mapped"),
        pytest.param("testclient", [], "testclient", id="not_an_address"),
    ],
)
def test_client_key_cases(peer: str, forwarded_for: list[str], expected: str) -> None:
    headers = {b"x-forwarded-for": [value.encode() for value in forwarded_for]}
    scope = asgi_scope(ADD_VOD, client=(peer, 40000))
    assert client_key(scope, headers, TRUSTED) == expected


def test_client_key_missing_client() -> None:
    assert client_key(asgi_scope(ADD_VOD, client=None), {}, TRUSTED) == "unknown"


# --- failure table bounds -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_limiter_caps_clients() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=60, max_clients=3)
    for key in ("a", "b", "c", "d", "e"):
        limiter.record_failure(key)
    assert len(limiter) == 3


def test_failure_limiter_evicts_oldest() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=60, max_clients=3)
    for key in ("a", "b", "c", "d", "e"):
        limiter.record_failure(key)
    assert limiter.retry_after_s("a") is None
    assert limiter.retry_after_s("e") is not None


def test_failure_limiter_retry_after_counts_down() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=2, window_s=60, max_clients=10, clock=clock)
    limiter.record_failure("a")
    clock.now += 10
    limiter.record_failure("a")
    clock.now += 5
    assert limiter.retry_after_s("a") == 45


def test_failure_limiter_window_slides() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=2, window_s=60, max_clients=10, clock=clock)
    limiter.record_failure("a")
    clock.now += 30
    limiter.record_failure("a")
    clock.now += 30
    assert limiter.retry_after_s("a") is None
    limiter.record_failure("a")
    assert limiter.retry_after_s("a") == 30


def test_failure_limiter_forgets_expired_clients() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=5, window_s=60, max_clients=10, clock=clock)
    limiter.record_failure("a")
    limiter.record_failure("b")
    clock.now += 61
    limiter.record_failure("c")
    assert len(limiter) == 1


def test_failure_limiter_reports_once_per_window() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=2, window_s=60, max_clients=10, clock=clock)
    reports = []
    for offset_s in (0, 1, 30, 62):
        clock.now = 1000.0 + offset_s
        reports.append(limiter.record_failure("a"))
    assert reports == [False, True, False, True]


def test_failure_limiter_thread_safe() -> None:
    limiter = FailureLimiter(max_failures=10, window_s=60, max_clients=50)

    def hammer(worker: int) -> None:
        for n in range(500):
            limiter.record_failure(f"{worker}-{n % 100}")
            limiter.retry_after_s(f"{worker}-{n % 7}")

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(limiter) <= 50


# --- secrets stay out of responses and logs -------------------------------

SECRETS = {
    "configured_token": TOKEN,
    "configured_password": PASSWORD,
    "submitted_token": WRONG_TOKEN,
    "submitted_password": WRONG_PASSWORD,
}


@pytest.fixture
def exchange_text(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> tuple[str, str]:
    """Run every kind of outcome once and return the response text and log text."""
    caplog.set_level(logging.DEBUG)
    app = make_app(**MODES["both"])
    header_sets: list[dict[str, str]] = [
        {},
        RIGHT_TOKEN,
        RIGHT_BASIC,
        BAD_TOKEN,
        BAD_BASIC,
        {"Authorization": f"Basic {WRONG_PASSWORD}"},
        *([BAD_TOKEN] * 10),
        RIGHT_TOKEN,
    ]
    responses = [call(app, headers=headers) for headers in header_sets]
    text = "\n".join(f"{r.headers}\n{r.text}" for r in responses)
    return text, caplog.text


def test_secrets_absent_from_responses(exchange_text: tuple[str, str]) -> None:
    leaked = {name: secret in exchange_text[0] for name, secret in SECRETS.items()}
    assert leaked == dict.fromkeys(SECRETS, False)


def test_secrets_absent_from_logs(exchange_text: tuple[str, str]) -> None:
    leaked = {name: secret in exchange_text[1] for name, secret in SECRETS.items()}
    assert leaked == dict.fromkeys(SECRETS, False)


# --- install and description ----------------------------------------------


@pytest.mark.parametrize(
    ("env", "description"),
    [
        pytest.param(TOKEN_ENV, "admin API: token auth", id="token"),
        pytest.param(BASIC_ENV, "admin API: basic auth", id="basic"),
        pytest.param(MODES["both"], "admin API: token or basic auth", id="both"),
        pytest.param(
            {},
            "admin API: no credentials configured; /admin accepts only direct "
            "loopback clients (set ADMIN_TOKEN, or ADMIN_USERNAME and "
            "ADMIN_PASSWORD to allow others)",
            id="none",
        ),
        pytest.param(
            {**TOKEN_ENV, "TRUSTED_PROXIES": "10.0.0.0/8,127.0.0.1"},
            "admin API: token auth; failed logins keyed by X-Forwarded-For "
            "from 10.0.0.0/8, 127.0.0.1/32",
            id="trusted_proxies",
        ),
    ],
)
def test_describe_admin_auth_modes(
    make_service: ServiceFactory, env: dict[str, str], description: str
) -> None:
    service = make_service(run_worker=False, **env)
    assert describe_admin_auth(service.settings) == description


@pytest.mark.parametrize(
    ("mode", "level"),
    [
        pytest.param("token", logging.INFO, id="token"),
        pytest.param("basic", logging.INFO, id="basic"),
        pytest.param("both", logging.INFO, id="both"),
        pytest.param("none", logging.WARNING, id="none"),
    ],
)
def test_install_logs_mode(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture, mode: str, level: int
) -> None:
    with caplog.at_level(logging.DEBUG, logger="vodq.api.auth"):
        make_app(**MODES[mode])
    levels = [r.levelno for r in caplog.records if r.name == "vodq.api.auth"]
    assert levels == [level]


def test_install_twice_adds_one_middleware(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False, **TOKEN_ENV)
    app = build_app(service)
    install_admin_auth(app, service.settings)
    classes: list[object] = [m.cls for m in app.user_middleware]
    assert classes.count(AdminAuthMiddleware) == 1


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(Settings(admin_username="archivist"), id="username_only"),
        pytest.param(Settings(admin_password="pa55"), id="password_only"),
    ],
)
def test_install_half_basic_rejected(settings: Settings) -> None:
    with pytest.raises(ValueError, match="must be set together"):
        install_admin_auth(FastAPI(), settings)


# --- a real server on 127.0.0.1 -------------------------------------------


def test_live_loopback_allowed(make_app: AppFactory) -> None:
    app = make_app()
    with live_server(app) as port:
        status, _ = raw_request(port, "POST", ADD_VOD)
    assert status == 201


def test_live_loopback_proxied_rejected(make_app: AppFactory) -> None:
    app = make_app()
    with live_server(app) as port:
        status, _ = raw_request(port, "POST", ADD_VOD, {"X-Forwarded-For": "127.0.0.1"})
    assert status == 403


def test_live_token_accepted(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    with live_server(app) as port:
        status, _ = raw_request(port, "POST", ADD_VOD, RIGHT_TOKEN)
    assert status == 201


LIVE_TRICKS = [
    "/admin/vods",
    "/admin/../admin/vods",
    "//admin/vods",
    "/admin//vods",
    "/%61dmin/vods",
    "/%61%64%6d%69%6e/vods",
    "/admin%2Fvods",
    "/%2561dmin/vods",
    "/ADMIN/vods",
    "/vods/../admin/vods",
]


@pytest.mark.parametrize("http_impl", ["h11", "httptools"])
def test_live_path_tricks_rejected(make_app: AppFactory, http_impl: str) -> None:
    app = make_app(**TOKEN_ENV)
    with live_server(app, http_impl) as port:
        statuses = {
            target: raw_request(port, "POST", target)[0] for target in LIVE_TRICKS
        }
    assert statuses == dict.fromkeys(LIVE_TRICKS, 401)


def test_live_every_method_rejected(make_app: AppFactory) -> None:
    app = make_app(**TOKEN_ENV)
    methods = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE"]
    with live_server(app) as port:
        statuses = {method: raw_request(port, method, ADD_VOD)[0] for method in methods}
    assert statuses == dict.fromkeys(methods, 401)
