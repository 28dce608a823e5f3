"""Input the API must refuse, or answer with care."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from conftest import ServiceFactory
from vodq.api.app import create_app
from vodq.service import Service


def request(
    service: Service, method: str, path: str, body: Any = None, *, raw: str = ""
) -> httpx.Response:
    """Send ``body`` as JSON, or ``raw`` as it is with a JSON content type."""
    app = create_app(service, manage_lifecycle=False)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost:8080", trust_env=False
        ) as client:
            if raw:
                return await client.request(
                    method,
                    path,
                    content=raw,
                    headers={"Content-Type": "application/json"},
                )
            return await client.request(method, path, json=body)

    return anyio.run(send)


def test_config_rejects_repeated_key(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False, MAX_CONCURRENT_DOWNLOADS="2")
    response = request(
        service,
        "PATCH",
        "/admin/config",
        raw='{"MAX_CONCURRENT_DOWNLOADS": 3, "MAX_CONCURRENT_DOWNLOADS": 4}',
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid request body: the key 'MAX_CONCURRENT_DOWNLOADS' appears "
        "twice in one object; send each key once"
    }
    assert service.status()["max_concurrent_downloads"] == 2


def test_add_rejects_repeated_key(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = request(
        service,
        "POST",
        "/admin/vods",
        raw='{"url": "http://127.0.0.1/a.mp4", "priority": 1, "priority": 9}',
    )
    assert response.status_code == 400
    assert "the key 'priority' appears twice" in response.json()["error"]
    assert service.queue.counts().by_state == {}


def test_malformed_json_still_reported_by_route(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = request(service, "PATCH", "/admin/config", raw='{"A": ')
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://:", "it has no host"),
        ("http://[::1", "it cannot be parsed"),
        ("http://127.0.0.1:99999/x.mp4", "it cannot be parsed"),
        ("ftp://127.0.0.1/x.mp4", "only http and https URLs can be downloaded"),
        ("file:///etc/passwd", "only http and https URLs can be downloaded"),
        ("http://127.0.0.1/a b.mp4", "not an absolute URL"),
    ],
    ids=["no-host", "bad-ipv6", "bad-port", "ftp", "file", "space"],
)
def test_add_rejects_malformed_url(
    make_service: ServiceFactory, url: str, reason: str
) -> None:
    service = make_service(run_worker=False)
    response = request(service, "POST", "/admin/vods", {"url": url})
    assert response.status_code == 400
    assert reason in response.json()["error"]


def test_add_accepts_uppercase_scheme(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = request(
        service, "POST", "/admin/vods", {"url": "HTTP://127.0.0.1/a.mp4"}
    )
    assert response.status_code == 201


@pytest.mark.parametrize(
    "date",
    ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"],
    ids=["after-9999", "before-year-1"],
)
def test_add_rejects_date_overflowing_utc(
    make_service: ServiceFactory, date: str
) -> None:
    service = make_service(run_worker=False)
    body = {"url": "http://127.0.0.1/d.mp4", "date": date}
    response = request(service, "POST", "/admin/vods", body)
    assert response.status_code == 400
    assert "outside the supported range" in response.json()["error"]


def test_batch_priority_rejects_overflowing_date(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    body = {"priority": 1, "date_from": "9999-12-31T23:59:59-14:00"}
    response = request(service, "POST", "/admin/vods/priority", body)
    assert response.status_code == 400


def test_long_invalid_id_not_echoed_whole(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = request(service, "POST", "/admin/vods", {"vod_id": "/" * 100_000})
    assert response.status_code == 400
    assert len(response.text) < 1000


def test_source_url_password_redacted(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    url = "http://user:s3cret-pass@127.0.0.1/a.mp4"
    request(service, "POST", "/admin/vods", {"vod_id": "cred", "url": url})
    shown = request(service, "GET", "/vods/cred").json()["source_url"]
    assert shown == "http://user:***@127.0.0.1/a.mp4"
    assert service.queue.get("cred").source_url == url


def test_trailing_slash_not_redirected(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = request(
        service, "POST", "/admin/vods/", {"url": "http://127.0.0.1/a.mp4"}
    )
    assert response.status_code == 404
    assert "location" not in response.headers


@pytest.mark.parametrize("path", ["/healthz", "/status"])
def test_head_answers_like_get(make_service: ServiceFactory, path: str) -> None:
    service = make_service(run_worker=False)
    assert request(service, "HEAD", path).status_code == 200


def test_oversized_body_rejected(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    body = {"url": "http://127.0.0.1/a.mp4", "title": "x" * (2 * 1024 * 1024)}
    response = request(service, "POST", "/admin/vods", body)
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]
