"""Browser attacks on the admin API: cross-site requests and DNS rebinding."""

from __future__ import annotations

import anyio
import httpx
import pytest

from conftest import ServiceFactory
from vodq.api.app import create_app
from vodq.service import Service

PAUSE = "/admin/queue/pause"


def post(
    service: Service, headers: dict[str, str], base_url: str = "http://localhost:8080"
) -> httpx.Response:
    app = create_app(service, manage_lifecycle=False)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(
            transport=transport, base_url=base_url, trust_env=False
        ) as client:
            return await client.post(PAUSE, headers=headers)

    return anyio.run(send)


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://localhost:9999"],
    ids=["other-site", "sandboxed", "other-port"],
)
def test_cross_site_origin_rejected(make_service: ServiceFactory, origin: str) -> None:
    service = make_service(run_worker=False)
    response = post(service, {"Origin": origin, "Content-Type": "text/plain"})
    assert response.status_code == 403
    assert "cross-site" in response.json()["error"]
    assert service.queue.is_paused() is False


def test_same_origin_accepted(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = post(service, {"Origin": "http://localhost:8080"})
    assert response.status_code == 200


def test_cross_site_rejected_with_credentials(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False, ADMIN_TOKEN="t0ken-value")
    response = post(
        service, {"Origin": "http://evil.example", "X-Admin-Token": "t0ken-value"}
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    "base_url",
    ["http://attacker.example:8080", "http://10.1.2.3:8080"],
    ids=["rebound-name", "private-address"],
)
def test_non_loopback_host_rejected(
    make_service: ServiceFactory, base_url: str
) -> None:
    service = make_service(run_worker=False)
    response = post(service, {}, base_url=base_url)
    assert response.status_code == 403
    assert "non-loopback Host" in response.json()["error"]


@pytest.mark.parametrize(
    "base_url",
    ["http://localhost:8080", "http://127.0.0.1:8080", "http://[::1]:8080"],
    ids=["localhost", "ipv4", "ipv6"],
)
def test_loopback_host_accepted(make_service: ServiceFactory, base_url: str) -> None:
    service = make_service(run_worker=False)
    assert post(service, {}, base_url=base_url).status_code == 200


def test_token_mode_accepts_any_host(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False, ADMIN_TOKEN="t0ken-value")
    response = post(
        service, {"X-Admin-Token": "t0ken-value"}, base_url="http://vodq.example:8080"
    )
    assert response.status_code == 200
