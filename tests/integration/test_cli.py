"""The vodq command as a process: start-up checks and signals."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_for
from mediaserver import MediaServer

KIB = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.isupper() or key in ("PATH", "HOME", "LANG", "PYTHONPATH")
    }
    base.update({"DATA_DIR": str(tmp_path / "data"), "MIN_FREE_DISK": "0"})
    base.update(env)
    return base


def start_serve(
    tmp_path: Path, port: int, *, stderr: int = subprocess.DEVNULL, **env: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vodq",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=clean_env(tmp_path, **env),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "MAX_CONCURRENT_DOWNLOADS",
            "0",
            "MAX_CONCURRENT_DOWNLOADS='0' is invalid: must be at least 1; "
            "use for example 3",
        ),
        (
            "PROCESSING_RETRY_COOLDOWN",
            "10min",
            "PROCESSING_RETRY_COOLDOWN='10min' is invalid: not a duration",
        ),
    ],
    ids=["zero-concurrency", "bad-duration"],
)
def test_serve_rejects_invalid_environment(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    process = start_serve(
        tmp_path, free_port(), stderr=subprocess.PIPE, **{name: value}
    )
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert message in stderr.decode()


def test_serve_port_in_use_exits_early(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        process = start_serve(tmp_path, port, stderr=subprocess.PIPE)
        _, stderr = process.communicate(timeout=30)

    assert process.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in stderr.decode()
    assert "scheduler started" not in stderr.decode()


def test_serve_sigterm_stops_cleanly(tmp_path: Path, media_server: MediaServer) -> None:
    port = free_port()
    process = start_serve(tmp_path, port)
    try:
        wait_for(lambda: healthy(port), timeout_s=30, interval_s=0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def test_serve_second_signal_exits_at_once(
    tmp_path: Path, media_server: MediaServer
) -> None:
    url = media_server.add_file("slow.mp4", random.randbytes(2048 * KIB), rate=64 * KIB)
    port = free_port()
    process = start_serve(tmp_path, port)
    try:
        wait_for(lambda: healthy(port), timeout_s=30, interval_s=0.2)
        body = f'{{"vod_id": "slow", "url": "{url}"}}'.encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/admin/vods",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=5).close()
        wait_for(lambda: media_server.active("/files/") == 1, timeout_s=20)
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 128 + signal.SIGINT
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def test_config_rejects_variable_given_twice(tmp_path: Path) -> None:
    # Refused before any request, so no server is needed.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vodq",
            "config",
            "DOWNLOAD_RATE_LIMIT=1M",
            "download_rate_limit=2M",
        ],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "DOWNLOAD_RATE_LIMIT is given twice" in result.stderr.decode()
