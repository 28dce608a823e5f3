"""Real ``vodq worker`` processes killed or paused in the middle of an upload.

The workers run on a SQLite file in ``tmp_path``. With UPLOADER=command they
run tests/upload_script.py, which blocks until the test releases it; after a
SIGKILL, a new process under the same WORKER_ID, or another worker once the
lease expired, takes the upload over. With UPLOADER=youtube they upload to
tests/youtube_server.py, and a worker paused with SIGSTOP resumes after
another worker took its upload over.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_uploads import Remote, body_gets

from conftest import wait_for
from mediaserver import MediaServer
from vodq.config import KNOWN_VARIABLES, load_settings
from vodq.models import VodState
from vodq.service import NewVod, Service
from youtube_server import YouTubeServer

pytestmark = pytest.mark.slow

# Maximum time a process may take to start (imports, on a busy machine).
START_TIMEOUT_S = 60.0
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
# The workers' LEASE_DURATION, in seconds: the shortest that vodq accepts.
LEASE_S = 3.0
CHUNK_BYTES = 256 * 1024


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def worker_env(tmp_path: Path, remote: Remote) -> dict[str, str]:
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name not in KNOWN_VARIABLES and name.lower() not in PROXY_VARIABLES
    }
    return {
        **inherited,
        "DATA_DIR": str(tmp_path / "data"),
        "WORKER_ID": "crash-worker",
        "LEASE_DURATION": f"{LEASE_S:.0f}s",
        "MIN_FREE_DISK": "0",
        "UPLOADER": "command",
        "UPLOAD_COMMAND": remote.command(),
    }


def spawn(
    env: dict[str, str], cwd: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    log = (cwd / f"worker-{len(started)}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "vodq", "worker"],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    started.append(process)
    return process


def test_upload_sigkill_then_restart_completes_once(
    tmp_path: Path,
    media_server: MediaServer,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    remote = Remote(tmp_path / "upload")
    remote.set("block")
    env = worker_env(tmp_path, remote)
    data = random.Random(30).randbytes(64 * 1024)
    url = media_server.add_file("crash.mp4", data)
    control = Service(load_settings(env, env_file=None), run_worker=False)
    control.start()
    try:
        control.add_vod(NewVod(vod_id="crash", url=url))
        first = spawn(env, tmp_path, processes)
        remote.pids("crash")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert control.queue.get("crash").state is VodState.UPLOADING

        spawn(env, tmp_path, processes)
        wait_for(lambda: len(remote.runs("crash")) == 2, timeout_s=START_TIMEOUT_S)
        remote.set("release")
        wait_for(
            lambda: control.queue.get("crash").state is VodState.DONE,
            timeout_s=START_TIMEOUT_S,
        )
        vod = control.queue.get("crash")
    finally:
        control.stop()

    assert vod.remote_id == "copy-crash"
    assert remote.files() == ["crash.mp4"]
    assert (remote.dest / "crash.mp4").read_bytes() == data
    assert [run[2] for run in remote.runs("crash")] == ["-", "started-crash"]
    # The killed attempt counts, so the attempt number continues from it.
    assert [run[1] for run in remote.runs("crash")] == ["1", "2"]
    assert vod.upload_attempts == 2
    assert len(body_gets(media_server, url)) == 1


def test_upload_takeover_continues_attempt_number(
    tmp_path: Path,
    media_server: MediaServer,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    remote = Remote(tmp_path / "upload")
    remote.set("block")
    env = worker_env(tmp_path, remote)
    url = media_server.add_file("moved.mp4", random.Random(32).randbytes(32 * 1024))
    control = Service(load_settings(env, env_file=None), run_worker=False)
    control.start()
    takeover: Service | None = None
    try:
        control.add_vod(NewVod(vod_id="moved", url=url))
        first = spawn(env, tmp_path, processes)
        remote.pids("moved")
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        # Another worker, which claims the upload once its lease expired.
        remote.set("block", on=False)
        takeover_env = {**env, "WORKER_ID": "takeover-worker"}
        takeover = Service(load_settings(takeover_env, env_file=None))
        takeover.start()
        wait_for(
            lambda: control.queue.get("moved").state is VodState.DONE,
            timeout_s=START_TIMEOUT_S,
        )
        vod = control.queue.get("moved")
    finally:
        if takeover is not None:
            takeover.stop()
        control.stop()

    assert [run[1] for run in remote.runs("moved")] == ["1", "2"]
    assert vod.upload_attempts == 2
    assert remote.files() == ["moved.mp4"]


def youtube_env(tmp_path: Path, youtube: YouTubeServer) -> dict[str, str]:
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name not in KNOWN_VARIABLES and name.lower() not in PROXY_VARIABLES
    }
    credentials = youtube.write_credentials(tmp_path / "youtube.json")
    return {
        **inherited,
        "DATA_DIR": str(tmp_path / "data"),
        "WORKER_ID": "paused-worker",
        "LEASE_DURATION": f"{LEASE_S:.0f}s",
        "MIN_FREE_DISK": "0",
        "LOG_FORMAT": "json",
        "UPLOADER": "youtube",
        "YOUTUBE_CREDENTIALS_FILE": str(credentials),
        "YOUTUBE_API_URL": youtube.url,
        "YOUTUBE_CHUNK_SIZE": "256K",
        "YOUTUBE_TIMEOUT": "30s",
    }


def upload_outcomes(log: Path, vod_id: str) -> list[dict[str, Any]]:
    """Return the JSON log records that end an upload attempt of ``vod_id``."""
    ending = {"upload_stopped", "upload_lease_lost", "upload_done", "retry"}
    records = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        # Only the records of an attempt's outcome carry its number.
        if "attempt" not in record or record.get("vod_id") != vod_id:
            continue
        if record.get("action") in ending:
            records.append(record)
    return records


def test_youtube_paused_worker_stops_after_takeover(
    tmp_path: Path,
    media_server: MediaServer,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    # Four whole chunks and a short one.
    data = random.Random(33).randbytes(4 * CHUNK_BYTES + 1000)
    url = media_server.add_file("paused.mp4", data)
    with YouTubeServer() as youtube:
        env = youtube_env(tmp_path, youtube)
        control = Service(load_settings(env, env_file=None), run_worker=False)
        control.start()
        takeover: Service | None = None
        try:
            youtube.hold_reply(after_chunks=1)
            control.add_vod(NewVod(vod_id="paused", url=url))
            paused = spawn(env, tmp_path, processes)
            assert youtube.wait_held(START_TIMEOUT_S), "the first chunk never arrived"
            paused.send_signal(signal.SIGSTOP)
            # The 308 for the first chunk waits in the paused worker's socket;
            # once it reads it, its next step would be the second chunk.
            youtube.release_reply()

            takeover_env = {**env, "WORKER_ID": "takeover-worker"}
            takeover = Service(load_settings(takeover_env, env_file=None))
            takeover.start()
            wait_for(
                lambda: control.queue.get("paused").state is VodState.DONE,
                timeout_s=START_TIMEOUT_S,
            )
            requests_before = len(youtube.requests)
            paused.send_signal(signal.SIGCONT)
            log = tmp_path / "worker-0.log"
            wait_for(lambda: bool(upload_outcomes(log, "paused")), timeout_s=30)
            late = youtube.requests[requests_before:]
            vod = control.queue.get("paused")
            first_chunk = next(r for r in youtube.requests if r.kind == "chunk")
        finally:
            if takeover is not None:
                takeover.stop()
            control.stop()
        videos = youtube.videos
        sessions = youtube.session_count

    paused_token = first_chunk.headers["Authorization"]
    assert [r.kind for r in late if r.headers["Authorization"] == paused_token] == []
    (outcome,) = upload_outcomes(log, "paused")
    assert outcome["action"] == "upload_stopped"
    assert outcome["reason"] == "lease_lost"
    assert len(videos) == 1
    assert videos[0].data == data
    assert sessions == 1
    assert vod.remote_id == videos[0].id
    assert vod.upload_attempts == 2
