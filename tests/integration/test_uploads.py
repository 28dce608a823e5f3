"""The upload stage end to end: real downloads, real upload commands, real databases.

Downloads run with yt-dlp against the local media server. UPLOADER=command
runs tests/upload_script.py, which copies each file into a folder of
``tmp_path``; files in a control folder make it fail or block.
"""

from __future__ import annotations

import logging
import random
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from test_admin import Api
from test_upload_command import pid_alive

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import MediaServer, RequestRecord
from vodq.models import VodState
from vodq.service import NewVod, Service

KIB = 1024
SCRIPT = Path(__file__).parent.parent / "upload_script.py"
FINISHED = {VodState.DONE, VodState.FAILED}


def media(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Remote:
    """The folder that the upload script copies into, and its control files."""

    def __init__(self, root: Path) -> None:
        self.dest = root / "remote"
        self.control = root / "control"
        self.runs_log = root / "runs.log"
        self.control.mkdir(parents=True)

    def command(self) -> str:
        return shlex.join([sys.executable, str(SCRIPT), str(self.dest)])

    def set(self, name: str, on: bool = True) -> None:
        path = self.control / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def files(self) -> list[str]:
        if not self.dest.exists():
            return []
        return sorted(path.name for path in self.dest.iterdir())

    def runs(self, vod_id: str) -> list[list[str]]:
        if not self.runs_log.exists():
            return []
        lines = [line.split(" ") for line in self.runs_log.read_text().splitlines()]
        return [line for line in lines if line[0] == vod_id]

    def pids(self, vod_id: str) -> list[int]:
        path = self.control / f"{vod_id}.pids"
        wait_for(path.exists, timeout_s=20)
        return [int(pid) for pid in path.read_text().split()]


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return Remote(tmp_path / "upload")


def command_service(
    make_service: ServiceFactory, remote: Remote, **env: str
) -> Service:
    settings = {
        "UPLOADER": "command",
        "UPLOAD_COMMAND": remote.command(),
        "UPLOAD_BACKOFF_BASE": "0.05s",
        **env,
    }
    return make_service(**settings)


def add(service: Service, vod_id: str, url: str, **fields: Any) -> None:
    service.add_vod(NewVod(vod_id=vod_id, url=url, **fields))


def settle(service: Service) -> None:
    """Wait until every upload thread of ``service`` has ended and logged."""
    stage = service.upload_stage
    assert stage is not None
    wait_for(lambda: not stage.running(), timeout_s=10)


def body_gets(server: MediaServer, url: str) -> list[RequestRecord]:
    return [
        r for r in server.requests_for(url) if r.method == "GET" and r.bytes_sent > 0
    ]


# -- the whole pipeline ------------------------------------------------------


def test_command_upload_copies_every_vod_once(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote, db_dsn: str
) -> None:
    sources = {f"v{n}": media(64 * KIB, seed=n) for n in range(5)}
    service = command_service(
        make_service,
        remote,
        DB_DSN=db_dsn,
        MAX_CONCURRENT_DOWNLOADS="2",
        MAX_CONCURRENT_UPLOADS="2",
    )
    for vod_id, data in sources.items():
        add(service, vod_id, media_server.add_file(f"{vod_id}.mp4", data))

    done = {vod_id: wait_for_state(service, vod_id, FINISHED) for vod_id in sources}
    assert {vod.state for vod in done.values()} == {VodState.DONE}
    assert remote.files() == sorted(f"{vod_id}.mp4" for vod_id in sources)
    for vod_id, data in sources.items():
        assert (remote.dest / f"{vod_id}.mp4").read_bytes() == data
        assert done[vod_id].remote_id == f"copy-{vod_id}"
        assert done[vod_id].uploader == "command"
        assert len(remote.runs(vod_id)) == 1


def test_upload_failure_retries_then_fails_keeping_file(
    make_service: ServiceFactory,
    media_server: MediaServer,
    remote: Remote,
    caplog: pytest.LogCaptureFixture,
) -> None:
    remote.set("fail")
    caplog.set_level(logging.INFO, logger="vodq")
    service = command_service(make_service, remote, UPLOAD_MAX_ATTEMPTS="3")
    add(service, "doomed", media_server.add_file("doomed.mp4", media(64 * KIB, 7)))

    vod = wait_for_state(service, "doomed", {VodState.FAILED})
    settle(service)
    assert vod.error_class == "upload_failed"
    assert vod.upload_attempts == 3
    assert vod.last_error == (
        "UPLOAD_COMMAND exited with status 3: remote refused doomed. Not retried: "
        "all 3 upload attempts are used; reprocess the VOD to upload it again"
    )
    assert vod.file_path is not None
    assert Path(vod.file_path).is_file()
    assert len(remote.runs("doomed")) == 3
    retries = [r for r in caplog.records if getattr(r, "action", "") == "retry"]
    assert len([r for r in retries if r.name == "vodq.upload.stage"]) == 2
    lost = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [getattr(r, "action", "") for r in lost] == ["upload_failed"]


def test_upload_session_reaches_next_attempt(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    remote.set("fail")
    service = command_service(make_service, remote, UPLOAD_MAX_ATTEMPTS="2")
    add(service, "resumed", media_server.add_file("resumed.mp4", media(32 * KIB, 8)))

    wait_for_state(service, "resumed", {VodState.FAILED})
    sessions = [run[2] for run in remote.runs("resumed")]
    assert sessions == ["-", "started-resumed"]


def test_reprocess_reuploads_without_download(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    remote.set("fail")
    service = command_service(make_service, remote, UPLOAD_MAX_ATTEMPTS="1")
    url = media_server.add_file("again.mp4", media(64 * KIB, 9))
    add(service, "again", url)
    wait_for_state(service, "again", {VodState.FAILED})
    downloads = len(body_gets(media_server, url))

    remote.set("fail", on=False)
    requeued = service.reprocess_vod("again")
    assert requeued.state in {VodState.DOWNLOADED, VodState.UPLOADING}
    vod = wait_for_state(service, "again", FINISHED)
    assert vod.state is VodState.DONE
    assert remote.files() == ["again.mp4"]
    assert len(body_gets(media_server, url)) == downloads
    assert downloads == 1


def test_cancel_during_upload_kills_process_group(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    remote.set("block")
    service = command_service(make_service, remote)
    add(service, "stopme", media_server.add_file("stopme.mp4", media(64 * KIB, 10)))
    script_pid, child_pid = remote.pids("stopme")

    vod = service.cancel_vod("stopme")
    assert vod.state is VodState.CANCELLED
    wait_for(lambda: not pid_alive(child_pid), timeout_s=10)
    assert not pid_alive(script_pid)
    settle(service)
    stored = service.queue.get("stopme")
    assert stored.state is VodState.CANCELLED
    assert stored.file_path is not None
    assert Path(stored.file_path).is_file()
    assert remote.files() == []

    remote.set("block", on=False)
    service.reprocess_vod("stopme")
    assert wait_for_state(service, "stopme", FINISHED).state is VodState.DONE
    assert remote.files() == ["stopme.mp4"]


def test_upload_holds_no_download_slot(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    remote.set("block")
    service = command_service(make_service, remote, MAX_CONCURRENT_DOWNLOADS="1")
    add(service, "first", media_server.add_file("first.mp4", media(32 * KIB, 11)))
    remote.pids("first")
    second_url = media_server.add_file("second.mp4", media(32 * KIB, 12))
    add(service, "second", second_url)

    second = wait_for_state(service, "second", {VodState.DOWNLOADED})
    assert second.file_path is not None
    assert service.queue.get("first").state is VodState.UPLOADING
    assert service.status()["uploading"] == 1
    assert service.status()["awaiting_upload"] == 1
    remote.set("release")
    assert wait_for_state(service, "second", FINISHED).state is VodState.DONE


# -- skip_upload and the later upload -----------------------------------------


def test_skip_upload_then_admin_call_uploads(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote, db_dsn: str
) -> None:
    service = command_service(make_service, remote, DB_DSN=db_dsn)
    service.pause(stop_running=False)
    for vod_id in ("later", "other"):
        add(
            service, vod_id, media_server.add_file(f"{vod_id}.mp4", media(32 * KIB, 13))
        )
        service.set_skip_upload(vod_id, True)
    service.resume()
    skipped = [wait_for_state(service, v, FINISHED) for v in ("later", "other")]
    assert [vod.state for vod in skipped] == [VodState.DONE, VodState.DONE]
    assert [vod.remote_id for vod in skipped] == [None, None]
    assert remote.files() == []

    api = Api(service)
    response = api.post("/admin/uploads", {"vod_ids": ["later"]})
    assert response.status_code == 200, response.text
    assert response.json()["queued"] == ["later"]
    wait_for(lambda: service.queue.get("later").remote_id is not None)
    assert remote.files() == ["later.mp4"]

    response = api.post("/admin/uploads", {"all_not_uploaded": True})
    assert response.json() == {"status": "ok", "queued": ["other"], "missing_files": []}
    wait_for(lambda: service.queue.get("other").remote_id is not None)
    assert remote.files() == ["later.mp4", "other.mp4"]


def test_admin_uploads_names_vod_without_file(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    service = command_service(make_service, remote)
    add(service, "gone", media_server.add_file("gone.mp4", media(32 * KIB, 14)))
    service.set_skip_upload("gone", True)
    vod = wait_for_state(service, "gone", FINISHED)
    assert vod.file_path is not None
    Path(vod.file_path).unlink()

    api = Api(service)
    response = api.post("/admin/uploads", {"vod_ids": ["gone"]})
    assert response.status_code == 400
    assert response.json()["error"] == (
        f"VOD 'gone' has no file to upload ({vod.file_path} does not exist); "
        "reprocess it to download it again"
    )
    response = api.post("/admin/uploads", {"all_not_uploaded": True})
    assert response.json()["missing_files"] == ["gone"]


def test_admin_uploads_rejects_uploaded_vod(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    service = command_service(make_service, remote)
    add(service, "twice", media_server.add_file("twice.mp4", media(32 * KIB, 15)))
    wait_for_state(service, "twice", FINISHED)

    response = Api(service).post("/admin/uploads", {"vod_ids": ["twice"]})
    assert response.status_code == 409
    assert response.json()["error"] == (
        "VOD 'twice' is already uploaded as 'copy-twice'; reprocess it to "
        "upload it again"
    )


def test_admin_uploads_rejects_uploader_none(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = Api(service).post("/admin/uploads", {"all_not_uploaded": True})
    assert response.status_code == 400
    assert response.json()["error"].startswith("UPLOADER is none")


# -- retention ------------------------------------------------------------------


def test_retention_delete_removes_uploaded_file(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    service = command_service(make_service, remote, UPLOAD_RETENTION="delete")
    add(service, "tidy", media_server.add_file("tidy.mp4", media(32 * KIB, 16)))
    wait_for(lambda: service.queue.get("tidy").uploaded_at is not None)
    wait_for(lambda: service.queue.get("tidy").file_path is None)
    # The path is cleared before the file is deleted.
    settle(service)

    vod = service.queue.get("tidy")
    assert vod.state is VodState.DONE
    assert vod.remote_id == "copy-tidy"
    assert list((service.settings.data_dir / "vods").iterdir()) == []
    assert remote.files() == ["tidy.mp4"]


def test_retention_days_deletes_only_old_uploads(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    service = command_service(make_service, remote, UPLOAD_RETENTION="7d")
    for vod_id in ("old", "new"):
        add(
            service, vod_id, media_server.add_file(f"{vod_id}.mp4", media(32 * KIB, 17))
        )
    vods = {v: wait_for_state(service, v, FINISHED) for v in ("old", "new")}
    eight_days_ago = service.queue.clock() - timedelta(days=8)
    with service.engine.begin() as conn:
        conn.execute(
            text("UPDATE vods SET uploaded_at = :at WHERE vod_id = 'old'"),
            {"at": eight_days_ago.replace(tzinfo=None).isoformat(sep=" ")},
        )
    stage = service.upload_stage
    assert stage is not None

    assert stage.apply_retention() == 1
    assert not Path(str(vods["old"].file_path)).exists()
    assert Path(str(vods["new"].file_path)).is_file()
    assert service.queue.get("old").file_path is None
    assert service.queue.get("new").file_path == vods["new"].file_path


def test_retention_keeps_failed_upload_file(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    remote.set("fail")
    service = command_service(
        make_service, remote, UPLOAD_RETENTION="delete", UPLOAD_MAX_ATTEMPTS="1"
    )
    add(service, "kept", media_server.add_file("kept.mp4", media(32 * KIB, 18)))
    vod = wait_for_state(service, "kept", FINISHED)
    stage = service.upload_stage
    assert stage is not None

    assert stage.apply_retention() == 0
    assert Path(str(vod.file_path)).is_file()


# -- UPLOADER=none --------------------------------------------------------------

HOSTILE_TITLES = {
    "climb": "../../etc/passwd",
    "device": "CON",
    "punct": 'a/b\\c:d*e?f"g<h>i|j',
    "dots": " ... ",
    "control": "line\nbreak\ttab\x1b[31m",
    "long": "é" * 300,
    "bidi": "evil\u202egnp.exe",
}


def test_none_uploader_renames_hostile_titles(
    make_service: ServiceFactory, media_server: MediaServer, db_dsn: str
) -> None:
    service = make_service(DB_DSN=db_dsn)
    archive_dir = (service.settings.data_dir / "vods").resolve()
    sources: dict[str, bytes] = {}
    # Titles are set with SQL, as an operator could, because the API
    # rejects control characters.
    service.pause(stop_running=False)
    for n, (vod_id, title) in enumerate(HOSTILE_TITLES.items()):
        sources[vod_id] = media(16 * KIB, seed=100 + n)
        url = media_server.add_file(f"{vod_id}.mp4", sources[vod_id])
        add(service, vod_id, url, channel="chan", date="2024-10-15")
        with service.engine.begin() as conn:
            conn.execute(
                text("UPDATE vods SET title = :title WHERE vod_id = :vod_id"),
                {"title": title, "vod_id": vod_id},
            )
    service.resume()

    for vod_id, data in sources.items():
        vod = wait_for_state(service, vod_id, FINISHED)
        assert vod.state is VodState.DONE, vod.last_error
        path = Path(str(vod.file_path))
        assert path.resolve().parent == archive_dir
        assert path.read_bytes() == data
        assert path.name.startswith("2024-10-15 chan - ")
        assert path.name.endswith(f"[{vod_id}].mp4")
        assert len(path.name.encode()) <= 255
        assert vod.uploader == "none"
        assert vod.remote_id is None
    assert len(list(archive_dir.iterdir())) == len(sources)


def test_none_uploader_never_overwrites_same_name(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(ARCHIVE_NAME_TEMPLATE="{title}")
    sources = {"one": media(16 * KIB, 20), "two": media(16 * KIB, 21)}
    for vod_id, data in sources.items():
        add(service, vod_id, media_server.add_file(f"{vod_id}.mp4", data), title="Same")

    paths = {
        v: Path(str(wait_for_state(service, v, FINISHED).file_path)) for v in sources
    }
    assert sorted(path.name for path in paths.values()) == ["Same (2).mp4", "Same.mp4"]
    for vod_id, data in sources.items():
        assert paths[vod_id].read_bytes() == data


def test_none_uploader_reserved_fallback_name(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(ARCHIVE_NAME_TEMPLATE="{title}")
    add(
        service,
        "NUL",
        media_server.add_file("nul.mp4", media(16 * KIB, 22)),
        title="..",
    )

    vod = wait_for_state(service, "NUL", FINISHED)
    assert Path(str(vod.file_path)).name == "_NUL.mp4"


# -- observability -------------------------------------------------------------


def test_status_and_vod_show_upload(
    make_service: ServiceFactory, media_server: MediaServer, remote: Remote
) -> None:
    service = command_service(make_service, remote, MAX_CONCURRENT_UPLOADS="3")
    add(service, "shown", media_server.add_file("shown.mp4", media(16 * KIB, 23)))
    wait_for_state(service, "shown", FINISHED)
    settle(service)
    api = Api(service)

    status = api.get("/status").json()
    assert status["uploader"] == "command"
    assert status["max_concurrent_uploads"] == 3
    assert status["uploading"] == 0
    assert status["awaiting_upload"] == 0
    vod = api.vod("shown")
    assert vod["remote_id"] == "copy-shown"
    assert vod["upload_attempts"] == 1
    assert vod["uploader"] == "command"
    assert vod["uploaded_at"] is not None
    assert "upload_session" not in vod
    metrics = api.get("/metrics").text
    assert "vod_uploads_started_total 1.0" in metrics
    assert "vod_uploads_succeeded_total 1.0" in metrics
    assert "vod_uploads_failed_total 0.0" in metrics
    assert "vod_upload_duration_seconds_count 1.0" in metrics
    assert "vod_active_uploads 0.0" in metrics


def test_upload_concurrency_changes_at_runtime(make_service: ServiceFactory) -> None:
    service = make_service(run_worker=False)
    response = Api(service).request(
        "PATCH", "/admin/config", {"MAX_CONCURRENT_UPLOADS": 4}
    )
    assert response.status_code == 200, response.text
    assert response.json()["max_concurrent_uploads"]["value"] == 4
    assert service.settings.max_concurrent_uploads == 4


def test_upload_logs_start_and_finish(
    make_service: ServiceFactory,
    media_server: MediaServer,
    remote: Remote,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vodq.upload")
    service = command_service(make_service, remote)
    add(service, "logged", media_server.add_file("logged.mp4", media(16 * KIB, 24)))
    wait_for_state(service, "logged", FINISHED)
    settle(service)

    records = {getattr(r, "action", ""): r for r in caplog.records}
    start = records["upload_start"]
    done = records["upload_done"]
    assert (start.levelno, done.levelno) == (logging.INFO, logging.INFO)
    assert getattr(start, "vod_id", None) == "logged"
    assert getattr(start, "attempt", None) == 1
    assert getattr(start, "bytes", None) == 16 * KIB
    assert getattr(done, "remote_id", None) == "copy-logged"
    assert isinstance(getattr(done, "duration_ms", None), int)
    output = records["upload_output"]
    assert getattr(output, "vod_id", None) == "logged"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
