"""The command uploader against real processes: argv, environment, output, groups."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import wait_for
from vodq.errors import ConfigError, UploadCancelled, UploadFailed
from vodq.upload import UploadJob, UploadResult
from vodq.upload.command import (
    MAX_LOGGED_LINES,
    CommandUploader,
    command_environment,
    parse_command,
)

PYTHON = sys.executable


def make_job(tmp_path: Path, **fields: object) -> UploadJob:
    path = tmp_path / "vod.mp4"
    path.write_bytes(b"data")
    values: dict[str, object] = {
        "vod_id": "v1",
        "path": path,
        "size": 4,
        "attempt": 2,
        "title": "Talk",
        "channel": "chan",
        "date": datetime(2024, 10, 15, tzinfo=UTC),
        "source_url": "https://example.invalid/v",
    }
    values.update(fields)
    return UploadJob(**values)  # type: ignore[arg-type]


def run(
    argv: list[str],
    job: UploadJob,
    *,
    timeout_s: float = 30.0,
    cancelled: threading.Event | None = None,
    sessions: list[str] | None = None,
) -> UploadResult:
    uploader = CommandUploader(tuple(argv), timeout_s=timeout_s)
    return uploader.upload(
        job,
        cancelled=cancelled or threading.Event(),
        on_session=(sessions if sessions is not None else []).append,
        on_progress=lambda _sent: None,
        lease_held=lambda: True,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def python(code: str, *args: str) -> list[str]:
    return [PYTHON, "-c", code, *args]


def test_command_remote_url_recorded(tmp_path: Path) -> None:
    result = run(
        python("print('vodq-remote: https://videos.invalid/1')"), make_job(tmp_path)
    )
    assert result == UploadResult(
        remote_id="https://videos.invalid/1", remote_url="https://videos.invalid/1"
    )


def test_command_without_remote_line(tmp_path: Path) -> None:
    result = run(python("print('done')"), make_job(tmp_path))
    assert result == UploadResult(remote_id="command", remote_url=None)


def test_command_title_stays_one_argument(tmp_path: Path) -> None:
    title = "a; rm -rf / $(touch x) `id` 'q\" *"
    code = "import sys; print('vodq-remote:', len(sys.argv), sys.argv[1])"
    argv = list(parse_command(f'{PYTHON} -c "{code}" {{title}}'))
    result = run(argv, make_job(tmp_path, title=title))
    assert result.remote_id == f"2 {title}"
    assert not (tmp_path / "x").exists()


def test_command_environment_carries_metadata(tmp_path: Path) -> None:
    code = (
        "import os; print('vodq-remote:', '|'.join(os.environ[n] for n in "
        "('VODQ_FILE', 'VODQ_VOD_ID', 'VODQ_TITLE', 'VODQ_CHANNEL', 'VODQ_DATE', "
        "'VODQ_SOURCE_URL', 'VODQ_ATTEMPT')))"
    )
    job = make_job(tmp_path)
    result = run(python(code), job)
    assert result.remote_id == (
        f"{job.path}|v1|Talk|chan|2024-10-15|https://example.invalid/v|2"
    )


def test_command_environment_hides_secrets(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "ADMIN_TOKEN": "t", "ADMIN_PASSWORD": "p", "DB_DSN": "d"}
    environment = command_environment(make_job(tmp_path), base)
    assert "ADMIN_TOKEN" not in environment
    assert "ADMIN_PASSWORD" not in environment
    assert "DB_DSN" not in environment
    assert environment["PATH"] == "/bin"


def test_command_session_line_stored(tmp_path: Path) -> None:
    sessions: list[str] = []
    run(python("print('vodq-session: abc 123')"), make_job(tmp_path), sessions=sessions)
    assert sessions == ["abc 123"]


def test_command_session_passed_back(tmp_path: Path) -> None:
    code = "import os; print('vodq-remote:', os.environ['VODQ_SESSION'])"
    result = run(python(code), make_job(tmp_path, session="resume-here"))
    assert result.remote_id == "resume-here"


def test_command_failure_names_status_and_stderr(tmp_path: Path) -> None:
    code = "import sys; print('first', file=sys.stderr); sys.exit('quota exceeded')"
    with pytest.raises(UploadFailed) as caught:
        run(python(code), make_job(tmp_path))
    assert str(caught.value) == "UPLOAD_COMMAND exited with status 1: quota exceeded"
    assert caught.value.retryable


def test_command_missing_program_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        CommandUploader((str(tmp_path / "no-such-program"),), timeout_s=30)
    assert "UPLOAD_COMMAND names the program" in str(caught.value)


def test_command_program_gone_later_not_retryable(tmp_path: Path) -> None:
    program = tmp_path / "uploader"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    uploader = CommandUploader((str(program),), timeout_s=30)
    program.unlink()

    with pytest.raises(UploadFailed) as caught:
        uploader.upload(
            make_job(tmp_path),
            cancelled=threading.Event(),
            on_session=lambda _session: None,
            on_progress=lambda _sent: None,
            lease_held=lambda: True,
        )

    assert caught.value.retryable is False
    assert "could not start" in str(caught.value)


def test_command_output_logged_with_vod_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vodq.upload.command")
    code = f"for n in range({MAX_LOGGED_LINES + 50}): print('line', n)"
    run(python(code), make_job(tmp_path))
    lines = [r for r in caplog.records if getattr(r, "action", "") == "upload_output"]
    logged = [r for r in lines if r.levelno == logging.INFO]
    assert len(logged) == MAX_LOGGED_LINES
    assert {getattr(r, "vod_id", None) for r in lines} == {"v1"}
    assert logged[0].getMessage() == "upload command stdout: line 0"
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert warnings == ["upload command wrote 50 more lines to stdout than are logged"]


CHILD_AND_WAIT = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
    "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(30)"
)


def test_command_timeout_kills_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(UploadFailed) as caught:
        run(python(CHILD_AND_WAIT, str(pid_file)), make_job(tmp_path), timeout_s=1.0)
    assert str(caught.value).startswith("UPLOAD_COMMAND timed out after 1s")
    child = int(pid_file.read_text())
    wait_for(lambda: not pid_alive(child), timeout_s=10)


def test_command_cancel_kills_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    cancelled = threading.Event()
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            run(
                python(CHILD_AND_WAIT, str(pid_file)),
                make_job(tmp_path),
                cancelled=cancelled,
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", timeout_s=20)
    cancelled.set()
    thread.join(20)
    assert not thread.is_alive()
    assert [type(error) for error in errors] == [UploadCancelled]
    wait_for(lambda: not pid_alive(int(pid_file.read_text())), timeout_s=10)


_UPLOAD_IN_A_SERVICE = """
import sys, threading
from datetime import UTC, datetime
from pathlib import Path
from vodq.upload import UploadJob
from vodq.upload.command import CommandUploader

job = UploadJob("v1", Path(sys.argv[1]), 4, 1, None, None, None, "http://127.0.0.1:9/v")
CommandUploader(
    tuple(sys.argv[3:]), timeout_s=60, orphan_after_s=float(sys.argv[2])
).upload(
    job,
    cancelled=threading.Event(),
    on_session=lambda _session: None,
    on_progress=lambda _sent: None,
    lease_held=lambda: True,
)
"""


def test_command_dies_with_a_killed_service(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    media = make_job(tmp_path).path
    service = subprocess.Popen(
        [
            PYTHON,
            "-c",
            _UPLOAD_IN_A_SERVICE,
            str(media),
            "15",
            *python(CHILD_AND_WAIT, str(pid_file)),
        ]
    )
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", timeout_s=20)
        child = int(pid_file.read_text())

        service.kill()
        service.wait(timeout=10)

        wait_for(lambda: not pid_alive(child), timeout_s=10)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)
    assert not pid_alive(child)


def test_command_stops_when_its_service_is_paused(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    media = make_job(tmp_path).path
    service = subprocess.Popen(
        [
            PYTHON,
            "-c",
            _UPLOAD_IN_A_SERVICE,
            str(media),
            "1",
            *python(CHILD_AND_WAIT, str(pid_file)),
        ]
    )
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", timeout_s=20)
        child = int(pid_file.read_text())

        # A paused worker cannot renew the upload's lease; another worker may
        # take it over, so the command must not go on meanwhile.
        service.send_signal(signal.SIGSTOP)

        wait_for(lambda: not pid_alive(child), timeout_s=10)
    finally:
        service.send_signal(signal.SIGCONT)
        service.kill()
        service.wait(timeout=10)
    assert not pid_alive(child)
