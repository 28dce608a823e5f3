"""The HTTP API against its own OpenAPI document, and bad input on purpose.

Schemathesis generates requests for every operation in the document, valid
and invalid, and checks that no response is a 5xx and that each status code,
content type, header and body is the one documented. The explicit tests
below send the bad input an operator or a script may send by mistake:
malformed JSON, wrong types, priorities beyond 64 bits, oversized bodies,
unknown ids, and ids with path separators or control characters. Every one
must get a 4xx answer with a JSON ``{"error": ...}`` body.

The app runs in-process over a started SQLite service without the scheduler.
Admin routes take ``ADMIN_TOKEN`` from the header, because an in-process
client has no loopback address.
"""

from __future__ import annotations

import asyncio
import copy
import json
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import ServiceFactory
from vodq.api.app import create_app
from vodq.config import load_settings
from vodq.service import Service

TOKEN = "openapi-Secret-5512"
ADMIN_HEADERS = {"X-Admin-Token": TOKEN}
# Examples per operation and generation phase, few enough that the run over
# every operation takes seconds rather than minutes.
MAX_EXAMPLES = 25
MIB = 1024 * 1024
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

KNOWN_ID = "123456789"
UNKNOWN_ID = "no-such-vod"
# A URL on the loopback address. Nothing fetches it, because no scheduler runs.
LOCAL_URL = "http://127.0.0.1:9/never-fetched.mp4"


def openapi_document() -> dict[str, Any]:
    """Build the app's OpenAPI document, which depends on the routes only.

    The service is never started, so its SQLite file is never opened.
    """
    unused_db = Path(tempfile.gettempdir()) / "vodq-openapi-never-opened.db"
    environ = {"DB_DSN": f"sqlite:///{unused_db}", "ADMIN_TOKEN": TOKEN}
    service = Service(load_settings(environ, env_file=None), run_worker=False)
    try:
        return create_app(service, manage_lifecycle=False).openapi()
    finally:
        service.engine.dispose()


# Loaded at import because schemathesis 4.32's fixture-based loader
# (schemathesis.pytest.from_fixture) fails under pytest 9.2. It sets
# Node._nodeid, which pytest 9 no longer has. Warnings raised while FastAPI
# builds the document are kept for test_openapi_document_builds_without_warnings,
# so that one defect does not stop the whole module from loading.
with warnings.catch_warnings(record=True) as DOCUMENT_WARNINGS:
    warnings.simplefilter("always")
    DOCUMENT = openapi_document()
SCHEMA = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))


def test_openapi_document_builds_without_warnings() -> None:
    assert [str(warning.message) for warning in DOCUMENT_WARNINGS] == []


# Status codes that every operation with a request body must document.
BODY_STATUS_CODES = {400, 413, 422}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def api_app(make_service: ServiceFactory) -> FastAPI:
    service = make_service(run_worker=False, ADMIN_TOKEN=TOKEN)
    return create_app(service, manage_lifecycle=False)


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    # The same examples on every run, so that CI results can be reproduced.
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_openapi_operation_conforms_to_schema(case: Any, api_app: FastAPI) -> None:
    case.call_and_validate(app=api_app, headers=ADMIN_HEADERS, checks=CHECKS)


# -- explicit bad input ------------------------------------------------------


class ApiClient:
    """A blocking client for the in-process app, with an event loop per request.

    Starlette's TestClient would do, but with httpx it raises a deprecation
    warning that asks for httpx2.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", headers=ADMIN_HEADERS
            ) as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(send())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    """One service for the explicit tests, none of which removes KNOWN_ID."""
    data_dir = tmp_path_factory.mktemp("openapi") / "data"
    environ = {"DATA_DIR": str(data_dir), "ADMIN_TOKEN": TOKEN}
    service = Service(load_settings(environ, env_file=None), run_worker=False)
    service.start()
    try:
        api = ApiClient(create_app(service, manage_lifecycle=False))
        response = api.post("/admin/vods", json={"vod_id": KNOWN_ID, "url": LOCAL_URL})
        assert response.status_code == 201, response.text
        yield api
    finally:
        service.stop()


def assert_client_error(response: httpx.Response, status: int | None = None) -> None:
    """A 4xx (``status`` if given) with a JSON body of the form {"error": "..."}."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]


def post_raw(client: ApiClient, path: str, content: bytes) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return client.post(path, content=content, headers=headers)


MALFORMED_BODIES = {
    "truncated": b'{"vod_id": "123456789", "priority": ',
    "not-json": b"priority=100",
    "missing-comma": b'{"vod_id": "123456789" "priority": 100}',
    "trailing-comma": b'{"vod_id": "123456789", "priority": 100,}',
    "single-quotes": b"{'vod_id': '123456789', 'priority': 100}",
    "invalid-utf8": b'{"vod_id": "\xff\xfe", "priority": 100}',
    "empty": b"",
    "bare-null": b"null",
    "array": b'["123456789", 100]',
    "deep-nesting": b"[" * 100_000,
    "huge-integer": b'{"vod_id": "123456789", "priority": 1' + b"0" * 5000 + b"}",
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_malformed_json_body_gets_json_4xx(client: ApiClient, body: bytes) -> None:
    assert_client_error(post_raw(client, "/admin/vod/priority", body))


WRONG_TYPES = {
    "priority-word": {"vod_id": KNOWN_ID, "priority": "high"},
    "priority-fraction": {"vod_id": KNOWN_ID, "priority": 1.5},
    "priority-null": {"vod_id": KNOWN_ID, "priority": None},
    "priority-list": {"vod_id": KNOWN_ID, "priority": [100]},
    "vod-id-number": {"vod_id": 123456789, "priority": 100},
    "vod-id-list": {"vod_id": [KNOWN_ID], "priority": 100},
    "vod-id-object": {"vod_id": {"id": KNOWN_ID}, "priority": 100},
    "extra-field": {"vod_id": KNOWN_ID, "priority": 100, "note": "x"},
    "missing-priority": {"vod_id": KNOWN_ID},
}


@pytest.mark.parametrize("body", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_priority_wrong_type_gets_422(client: ApiClient, body: object) -> None:
    assert_client_error(client.post("/admin/vod/priority", json=body), 422)


COERCED_TYPES = {
    "priority-numeric-string": (
        "/admin/vod/priority",
        {"vod_id": KNOWN_ID, "priority": "100"},
    ),
    "priority-boolean": ("/admin/vod/priority", {"vod_id": KNOWN_ID, "priority": True}),
    "add-priority-boolean": (
        "/admin/vods",
        {"vod_id": "coerced", "url": LOCAL_URL, "priority": False},
    ),
    "batch-priority-boolean": (
        "/admin/vods/priority",
        {"priority": False, "vod_ids": []},
    ),
    "skip-string": ("/admin/vod/skip-upload", {"vod_id": KNOWN_ID, "skip": "true"}),
    "stop-running-number": ("/admin/queue/pause", {"stop_running": 0}),
    "stop-running-word": ("/admin/queue/pause", {"stop_running": "yes"}),
}


@pytest.mark.parametrize(
    ("path", "body"), COERCED_TYPES.values(), ids=COERCED_TYPES.keys()
)
def test_coercible_wrong_type_gets_422(
    client: ApiClient, path: str, body: object
) -> None:
    assert_client_error(client.post(path, json=body), 422)


OUT_OF_RANGE = {
    "two-to-63": INT64_MAX + 1,
    "below-int64": INT64_MIN - 1,
    "ten-to-30": 10**30,
    "minus-ten-to-30": -(10**30),
}


@pytest.mark.parametrize("priority", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/vod/priority", {"vod_id": KNOWN_ID}),
        ("/admin/vods", {"vod_id": "range-check", "url": LOCAL_URL}),
        ("/admin/vods/priority", {"vod_ids": [KNOWN_ID]}),
    ],
    ids=["single", "add", "batch"],
)
def test_priority_beyond_int64_gets_422(
    client: ApiClient, path: str, body: dict[str, object], priority: int
) -> None:
    assert_client_error(client.post(path, json={**body, "priority": priority}), 422)


@pytest.mark.parametrize("priority", [INT64_MAX, INT64_MIN], ids=["max", "min"])
def test_priority_int64_bounds_accepted(client: ApiClient, priority: int) -> None:
    body = {"vod_id": KNOWN_ID, "priority": priority}
    response = client.post("/admin/vod/priority", json=body)
    assert response.json() == {"status": "ok", "vod_id": KNOWN_ID, "priority": priority}


@pytest.mark.parametrize("status", sorted(BODY_STATUS_CODES))
def test_openapi_documents_status_code(status: int) -> None:
    with_body = [
        operation
        for item in DOCUMENT["paths"].values()
        for operation in item.values()
        if "requestBody" in operation
    ]
    assert with_body
    assert all(str(status) in operation["responses"] for operation in with_body)


def test_openapi_priority_is_int64() -> None:
    priority = DOCUMENT["components"]["schemas"]["PriorityIn"]["properties"]["priority"]
    assert priority["format"] == "int64"
    # A float bound such as 9.223372036854776e+18 would round to 2**63.
    assert "maximum" not in priority


def oversized_batch() -> bytes:
    """A well-formed batch body just over 1 MiB."""
    ids = [f"id-{index:06d}-" + "x" * 100 for index in range(10_000)]
    body = json.dumps({"priority": 1, "vod_ids": ids}).encode()
    assert len(body) > MIB
    return body


def test_oversized_body_gets_413(client: ApiClient) -> None:
    response = post_raw(client, "/admin/vods/priority", oversized_batch())
    assert_client_error(response, 413)


def test_oversized_chunked_body_gets_413(client: ApiClient) -> None:
    body = oversized_batch()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    headers = {"Content-Type": "application/json"}
    response = client.post("/admin/vods/priority", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_client_error(response, 413)


def test_body_at_limit_is_read(client: ApiClient) -> None:
    # Padding inside the JSON keeps the body well-formed at exactly 1 MiB.
    prefix = b'{"vod_id": "123456789", "priority": 7'
    body = prefix + b" " * (MIB - len(prefix) - 1) + b"}"
    response = post_raw(client, "/admin/vod/priority", body)
    assert response.status_code == 200, response.text


UNKNOWN_ID_REQUESTS = {
    "get": ("GET", f"/vods/{UNKNOWN_ID}", None),
    "priority": ("POST", "/admin/vod/priority", {"vod_id": UNKNOWN_ID, "priority": 1}),
    "cancel": ("POST", "/admin/vod/cancel", {"vod_id": UNKNOWN_ID}),
    "reprocess": ("POST", "/admin/vod/reprocess", {"vod_id": UNKNOWN_ID}),
    "skip-upload": ("POST", "/admin/vod/skip-upload", {"vod_id": UNKNOWN_ID}),
    "delete": ("DELETE", f"/admin/vod/{UNKNOWN_ID}", None),
}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    UNKNOWN_ID_REQUESTS.values(),
    ids=UNKNOWN_ID_REQUESTS.keys(),
)
def test_unknown_vod_id_gets_404(
    client: ApiClient, method: str, path: str, body: object
) -> None:
    response = client.request(method, path, json=body)
    assert_client_error(response, 404)


def test_unknown_id_in_batch_updates_nothing(client: ApiClient) -> None:
    body = {"priority": 5, "vod_ids": [UNKNOWN_ID]}
    response = client.post("/admin/vods/priority", json=body)
    assert response.json() == {"status": "ok", "priority": 5, "updated": 0}


def test_unknown_route_gets_json_404(client: ApiClient) -> None:
    assert_client_error(client.get("/no/such/route"), 404)


# Ids that must never name a file or reach a log line unescaped.
BAD_IDS = {
    "slash": "a/b",
    "dot-dot": "../etc",
    "backslash": "a\\b",
    "leading-dot": ".hidden",
    "nul": "a\x00b",
    "newline": "a\nb",
    "carriage-return": "a\rb",
    "tab": "a\tb",
    "escape": "a\x1bb",
    "delete": "a\x7fb",
    "space": "a b",
    "empty": "",
    "too-long": "x" * 129,
}
BAD_ID_BODIES = {
    "priority": ("/admin/vod/priority", {"priority": 1}),
    "add": ("/admin/vods", {"url": LOCAL_URL}),
    "cancel": ("/admin/vod/cancel", {}),
    "batch": ("/admin/vods/priority", {"priority": 1}),
}


def bad_id_cases() -> Iterator[Any]:
    for where, (path, body) in BAD_ID_BODIES.items():
        for name, vod_id in BAD_IDS.items():
            if path == "/admin/vods" and not vod_id:
                # With a URL, an empty vod_id means "derive the id from the URL".
                continue
            if path == "/admin/vods/priority":
                fields = {**body, "vod_ids": [vod_id]}
            else:
                fields = {**body, "vod_id": vod_id}
            yield pytest.param(path, fields, id=f"{where}-{name}")


@pytest.mark.parametrize(("path", "body"), list(bad_id_cases()))
def test_bad_id_in_body_gets_400(
    client: ApiClient, path: str, body: dict[str, object]
) -> None:
    assert_client_error(client.post(path, json=body), 400)


# Path forms: percent-encoded so that the raw byte reaches the router.
BAD_PATH_IDS = {
    "encoded-slash": "a%2Fb",
    "encoded-dot-dot": "..%2F..%2Fetc",
    "encoded-backslash": "a%5Cb",
    "nul": "a%00b",
    "newline": "a%0Ab",
    "unit-separator": "a%1Fb",
    "delete": "a%7Fb",
    "lone-surrogate-bytes": "%ED%A0%80",
    "too-long": "x" * 129,
}


@pytest.mark.parametrize("vod_id", BAD_PATH_IDS.values(), ids=BAD_PATH_IDS.keys())
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_bad_id_in_path_gets_4xx(client: ApiClient, method: str, vod_id: str) -> None:
    path = "/vods/" if method == "GET" else "/admin/vod/"
    assert_client_error(client.request(method, path + vod_id))


def test_bad_id_in_path_leaves_vod_alone(client: ApiClient) -> None:
    client.delete(f"/admin/vod/..%2F{KNOWN_ID}")
    assert client.get(f"/vods/{KNOWN_ID}").status_code == 200


# -- dates beyond what datetime can hold after the offset is applied ----------

OVERFLOWING_DATES = {
    "max-date-west": "9999-12-31T23:59:59-23:00",
    "min-date-east": "0001-01-01T00:00:00+05:00",
}


@pytest.mark.parametrize(
    "date", OVERFLOWING_DATES.values(), ids=OVERFLOWING_DATES.keys()
)
def test_add_vod_date_overflow_gets_400(client: ApiClient, date: str) -> None:
    body = {"vod_id": "far-date", "url": LOCAL_URL, "date": date}
    assert_client_error(client.post("/admin/vods", json=body), 400)


@pytest.mark.parametrize("field", ["date_from", "date_to"])
@pytest.mark.parametrize(
    "date", OVERFLOWING_DATES.values(), ids=OVERFLOWING_DATES.keys()
)
def test_batch_date_overflow_gets_400(client: ApiClient, field: str, date: str) -> None:
    body = {"priority": 1, field: date}
    assert_client_error(client.post("/admin/vods/priority", json=body), 400)


# -- inputs that get a 500 today -------------------------------------------


# JSON may carry a lone UTF-16 surrogate as an escape. It has no UTF-8 form,
# so it cannot be stored or compared in SQL.
SURROGATE_BODIES = {
    "add-url": (
        "/admin/vods",
        b'{"vod_id": "s1", "url": "http://127.0.0.1:9/\\ud800"}',
    ),
    "batch-channel": ("/admin/vods/priority", b'{"priority": 1, "channel": "\\ud800"}'),
}


@pytest.mark.parametrize(
    ("path", "body"), SURROGATE_BODIES.values(), ids=SURROGATE_BODIES.keys()
)
def test_lone_surrogate_text_gets_400(
    client: ApiClient, path: str, body: bytes
) -> None:
    assert_client_error(post_raw(client, path, body), 400)


SURROGATE_SAFE = {
    "vod-id": ("/admin/vod/priority", b'{"vod_id": "\\ud800", "priority": 1}'),
    "title": (
        "/admin/vods",
        b'{"vod_id": "s2", "url": "http://127.0.0.1:9/a", "title": "\\ud800"}',
    ),
    "channel": (
        "/admin/vods",
        b'{"vod_id": "s3", "url": "http://127.0.0.1:9/a", "channel": "\\ud800"}',
    ),
    "batch-id": ("/admin/vods/priority", b'{"priority": 1, "vod_ids": ["\\ud800"]}'),
}


@pytest.mark.parametrize(
    ("path", "body"), SURROGATE_SAFE.values(), ids=SURROGATE_SAFE.keys()
)
def test_validated_surrogate_text_gets_400(
    client: ApiClient, path: str, body: bytes
) -> None:
    assert_client_error(post_raw(client, path, body), 400)
