"""A real ``vodq worker`` process killed with SIGKILL in the middle of an upload.

The worker runs on a SQLite file in ``tmp_path`` with UPLOADER=command and
tests/upload_script.py, which blocks until the test releases it. After the
kill, a new process under the same WORKER_ID takes the upload over.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_uploads import Remote, body_gets

from conftest import wait_for
from mediaserver import MediaServer
from vodq.config import KNOWN_VARIABLES, load_settings
from vodq.models import VodState
from vodq.service import NewVod, Service

pytestmark = pytest.mark.slow

# Maximum time a process may take to start (imports, on a busy machine).
START_TIMEOUT_S = 60.0
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


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
        "LEASE_DURATION": "3s",
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
    assert len(body_gets(media_server, url)) == 1
