"""Log records of real downloads: levels, structured fields, JSON lines, secrets.

Records are captured with ``caplog`` and checked through the attributes that
``extra`` put on them, which is what both formatters in ``vodq.logs`` print.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import ServiceFactory, settings_for, wait_for, wait_for_state
from mediaserver import Fault, MediaServer
from vodq.api.app import create_app
from vodq.logs import JsonFormatter, TextFormatter, configure_logging
from vodq.models import VodState
from vodq.service import NewVod, Service

KIB = 1024
FINISHED = {VodState.DONE, VodState.FAILED}
DONE_FIELDS = ("vod_id", "bytes", "duration_ms", "rate_bps")
TOKEN = "tok-Log-Secret-5519"
DSN_PASSWORD = "dsn-Log-Secret-7730"


def media(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def vodq_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("vodq")]


def for_vod(
    caplog: pytest.LogCaptureFixture, vod_id: str, level: int | None = None
) -> list[logging.LogRecord]:
    return [
        r
        for r in vodq_records(caplog)
        if getattr(r, "vod_id", None) == vod_id
        and (level is None or r.levelno == level)
    ]


def finished_records(
    caplog: pytest.LogCaptureFixture, vod_id: str
) -> list[logging.LogRecord]:
    """INFO records of ``vod_id`` that carry every field of a finished download."""
    return [
        r
        for r in for_vod(caplog, vod_id, logging.INFO)
        if all(hasattr(r, name) for name in DONE_FIELDS)
    ]


def run_to_end(service: Service, vod_id: str, url: str) -> None:
    service.add_vod(NewVod(vod_id=vod_id, url=url))
    wait_for_state(service, vod_id, FINISHED)
    scheduler = service.scheduler
    assert scheduler is not None
    wait_for(lambda: not scheduler.running(), timeout_s=10)


def write_partial(tmp_path: Path, vod_id: str, data: bytes) -> None:
    """Leave ``data`` as the partial file of ``vod_id`` under the service's
    data folder."""
    partial = tmp_path / "data" / "partial"
    partial.mkdir(parents=True)
    (partial / f"{vod_id}.mp4.part").write_bytes(data)


def test_log_finished_download_once_with_fields(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    size = 160 * KIB
    service = make_service()
    run_to_end(service, "fine", media_server.add_file("fine.mp4", media(size, 1)))
    records = finished_records(logs, "fine")
    assert len(records) == 1
    record: Any = records[0]
    assert record.bytes == size
    assert isinstance(record.duration_ms, int)
    assert record.duration_ms >= 0
    assert isinstance(record.rate_bps, int)
    assert record.rate_bps > 0
    assert record.action == "download_done"


def test_log_resumed_download_rate_counts_fetched(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
    tmp_path: Path,
) -> None:
    data = media(500 * KIB, seed=7)
    rate = 100 * KIB
    url = media_server.add_file("again.mp4", data, rate=rate)
    write_partial(tmp_path, "again", data[: 400 * KIB])
    service = make_service()
    run_to_end(service, "again", url)
    record: Any = finished_records(logs, "again")[0]
    assert record.bytes == len(data)
    # Only 100 KiB is fetched at 100 KiB/s, because 400 KiB is resumed from disk.
    assert record.rate_bps < 1.5 * rate


def test_log_resume_ignored_counts_whole_file(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
    tmp_path: Path,
) -> None:
    data = media(500 * KIB, seed=8)
    url = media_server.add_file("whole.mp4", data, rate=500 * KIB)
    # The server responds to the Range request with the whole file.
    media_server.script(url, [Fault.whole()])
    write_partial(tmp_path, "whole", data[: 400 * KIB])
    service = make_service()
    run_to_end(service, "whole", url)
    record: Any = finished_records(logs, "whole")[0]
    restarts = [
        r
        for r in for_vod(logs, "whole", logging.WARNING)
        if getattr(r, "action", None) == "restart"
    ]
    assert record.resumed_bytes == 0
    assert len(restarts) == 1


def test_log_each_retry_warns_with_reason(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    url = media_server.add_file("bumpy.mp4", media(64 * KIB, seed=2))
    media_server.script(url, [Fault.status(500), Fault.status(503)])
    service = make_service()
    run_to_end(service, "bumpy", url)
    retries: list[Any] = [
        r
        for r in for_vod(logs, "bumpy", logging.WARNING)
        if getattr(r, "action", None) == "retry"
    ]
    assert len(retries) == 2
    assert [r.error_class for r in retries] == ["transient", "transient"]
    assert "500" in retries[0].getMessage()
    assert "503" in retries[1].getMessage()
    assert all(r.retry_at for r in retries)
    assert [r.levelno for r in vodq_records(logs) if r.levelno >= logging.ERROR] == []
    assert len(finished_records(logs, "bumpy")) == 1


def test_log_error_only_final_failure(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    url = media_server.add_file("doomed.mp4", media(32 * KIB, seed=3))
    media_server.script(url, [Fault.status(500)] * 2)
    service = make_service(DOWNLOAD_MAX_ATTEMPTS="2")
    run_to_end(service, "doomed", url)
    warnings = [
        r
        for r in for_vod(logs, "doomed", logging.WARNING)
        if getattr(r, "action", None) == "retry"
    ]
    errors: list[Any] = for_vod(logs, "doomed", logging.ERROR)
    assert service.queue.get("doomed").state is VodState.FAILED
    assert len(warnings) == 1
    assert len(errors) == 1
    assert errors[0].action == "download_failed"
    assert errors[0].error_class == "transient"
    assert "2 attempts" in errors[0].getMessage()
    assert finished_records(logs, "doomed") == []


def test_log_not_found_errors_without_retry(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    service = make_service()
    run_to_end(service, "absent", media_server.url("/files/absent.mp4"))
    errors: list[Any] = for_vod(logs, "absent", logging.ERROR)
    retries = [
        r for r in for_vod(logs, "absent") if getattr(r, "action", None) == "retry"
    ]
    assert len(errors) == 1
    assert errors[0].error_class == "gone"
    assert "404" in errors[0].getMessage()
    assert retries == []


def test_log_json_line_carries_fields(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    size = 64 * KIB
    service = make_service(LOG_FORMAT="json")
    assert service.settings.log_format == "json"
    run_to_end(service, "jsonl", media_server.add_file("jsonl.mp4", media(size, 4)))
    line = JsonFormatter().format(finished_records(logs, "jsonl")[0])
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "INFO"
    assert entry["logger"] == "vodq.scheduler"
    assert entry["vod_id"] == "jsonl"
    assert entry["bytes"] == size
    assert isinstance(entry["duration_ms"], int)
    assert isinstance(entry["rate_bps"], int)
    assert entry["message"].startswith(f"download finished: {size} bytes")


def test_log_json_multiline_record_one_line() -> None:
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "vodq.test", logging.ERROR, __file__, 1, "broke:\n%s", ("detail",), exc_info
    )
    record.__dict__.update({"path": Path("/x/y"), "state": VodState.DONE})
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "broke:\ndetail"
    assert "second line" in entry["exception"]
    assert entry["path"] == "/x/y"
    assert entry["state"] == "done"


def test_log_format_json_installs_json_formatter() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        settings = settings_for(Path("unused"), LOG_FORMAT="json", LOG_LEVEL="debug")
        configure_logging(settings.log_level, settings.log_format)
        assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


# -- secrets -------------------------------------------------------------------


def rendered(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record as the text and the JSON formatter print it."""
    text, as_json = TextFormatter(), JsonFormatter()
    return [
        form
        for record in caplog.records
        for form in (record.getMessage(), text.format(record), as_json.format(record))
    ]


def admin_call(service: Service, token: str) -> httpx.Response:
    app = create_app(service, manage_lifecycle=False)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", trust_env=False
        ) as client:
            return await client.post(
                "/admin/vod/cancel",
                json={"vod_id": "nobody"},
                headers={"X-Admin-Token": token},
            )

    return anyio.run(send)


def test_log_never_shows_admin_token(
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    service = make_service(ADMIN_TOKEN=TOKEN)
    assert admin_call(service, TOKEN).status_code == 404
    assert admin_call(service, TOKEN[:-1]).status_code == 401
    run_to_end(service, "tok", media_server.add_file("tok.mp4", media(32 * KIB, 5)))
    run_to_end(service, "tok-gone", media_server.url("/files/tok-gone.mp4"))
    lines = rendered(logs)
    assert len(lines) > 10
    assert [line for line in lines if TOKEN in line] == []


@pytest.mark.postgres
def test_log_never_shows_dsn_password(
    postgres_dsn: str,
    logs: pytest.LogCaptureFixture,
    make_service: ServiceFactory,
    media_server: MediaServer,
) -> None:
    # The test server's pg_hba.conf trusts 127.0.0.1, so any password works.
    with_password = postgres_dsn.replace("@", f":{DSN_PASSWORD}@", 1)
    service = make_service(DB_DSN=with_password)
    run_to_end(service, "pw", media_server.add_file("pw.mp4", media(32 * KIB, 6)))
    run_to_end(service, "pw-gone", media_server.url("/files/pw-gone.mp4"))
    lines = rendered(logs)
    assert len(lines) > 10
    assert [line for line in lines if DSN_PASSWORD in line] == []


def test_log_unreachable_database_hides_password(
    logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # A bound socket that never listens: connecting to it is refused at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        dsn = f"postgresql://vodq:{DSN_PASSWORD}@127.0.0.1:{port}/vodq"
        service = Service(settings_for(tmp_path, DB_DSN=dsn, WORKER_ID="unreachable"))
        service.start(migrate=False)
        try:
            wait_for(
                lambda: any(
                    getattr(r, "action", None) == "claim" for r in logs.records
                ),
                timeout_s=10,
            )
        finally:
            service.stop()
    lines = rendered(logs)
    assert any("could not claim VODs" in line for line in lines)
    assert [line for line in lines if DSN_PASSWORD in line] == []
