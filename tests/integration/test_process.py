"""The download process: each attempt in a child process that can always be killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from conftest import wait_for
from engines import CrashingEngine, HangingEngine, RateEngine
from mediaserver import CHUNK_SIZE, MediaServer
from vodq.bandwidth import SpareTokens, TokenBucket
from vodq.download import DownloadJob, process
from vodq.download.process import ProcessDownloader
from vodq.download.ytdlp import YtDlpEngine
from vodq.errors import DownloadCancelled, DownloadFailed
from vodq.models import Progress


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as gone, its work has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: the process was reaped between open and read.
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ends(pid: int) -> bool:
    """Whether ``pid`` ends within a few seconds; SIGKILL takes effect async."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def _pids(pid_file: Path) -> tuple[int, int]:
    wait_for(pid_file.exists, timeout_s=20)
    child, grandchild = pid_file.read_text().split()
    return int(child), int(grandchild)


def _job(vod_id: str = "v1", url: str = "http://127.0.0.1:9/none.mp4") -> DownloadJob:
    return DownloadJob(vod_id=vod_id, source_url=url, attempt=1)


def _run_in_thread(
    downloader: ProcessDownloader,
    job: DownloadJob,
    cancelled: threading.Event,
    bucket: TokenBucket | None = None,
) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            downloader.download(
                job,
                on_progress=lambda _progress: None,
                cancelled=cancelled,
                bucket=bucket or TokenBucket(None),
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_process_download_equals_source(
    media_server: MediaServer, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    url = media_server.add_file("talk.mp4", data)
    downloader = ProcessDownloader(
        YtDlpEngine(tmp_path, socket_timeout_s=10), stall_timeout_s=30
    )
    seen: list[Progress] = []

    result = downloader.download(
        _job(url=url),
        on_progress=seen.append,
        cancelled=threading.Event(),
        bucket=TokenBucket(None),
    )

    assert result.path.read_bytes() == data
    assert seen[-1].bytes_done == len(data)


def test_process_hung_extractor_is_killed_as_stalled(
    media_server: MediaServer, tmp_path: Path
) -> None:
    # A page whose first chunk arrives at once and the rest at 1 KiB/s: the
    # extractor reads it for minutes, long past the stall timeout, and no
    # progress hook runs meanwhile, so only the service's watchdog can end it.
    url = media_server.add_file(
        "page", b"<html>" + b" " * (4 * CHUNK_SIZE), rate=1024, content_type="text/html"
    )
    downloader = ProcessDownloader(
        YtDlpEngine(tmp_path, socket_timeout_s=20),
        stall_timeout_s=1,
        stall_margin_s=0.5,
    )

    with pytest.raises(DownloadFailed) as caught:
        downloader.download(
            _job(url=url),
            on_progress=lambda _progress: None,
            cancelled=threading.Event(),
            bucket=TokenBucket(None),
        )

    assert caught.value.error_class == "transient"
    assert "stalled" in str(caught.value)
    assert len(media_server.requests_for(url)) == 1


def test_process_stall_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    downloader = ProcessDownloader(
        HangingEngine(pid_file, progress_steps=5),
        stall_timeout_s=0.5,
        stall_margin_s=0.0,
    )
    thread, errors = _run_in_thread(downloader, _job(), threading.Event())
    child, grandchild = _pids(pid_file)

    thread.join(timeout=20)

    assert isinstance(errors[0], DownloadFailed)
    assert _ends(child)
    assert _ends(grandchild)


def test_process_cancel_ignored_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    downloader = ProcessDownloader(
        HangingEngine(pid_file), stall_timeout_s=60, cancel_grace_s=0.3
    )
    cancelled = threading.Event()
    thread, errors = _run_in_thread(downloader, _job(), cancelled)
    child, grandchild = _pids(pid_file)

    cancelled.set()
    thread.join(timeout=20)

    assert isinstance(errors[0], DownloadCancelled)
    assert _ends(child)
    assert _ends(grandchild)


def test_process_cancel_honoured_reports_cancelled(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    downloader = ProcessDownloader(
        HangingEngine(pid_file, honour_cancel=True), stall_timeout_s=60
    )
    cancelled = threading.Event()
    thread, errors = _run_in_thread(downloader, _job(), cancelled)
    _child, grandchild = _pids(pid_file)

    cancelled.set()
    thread.join(timeout=20)

    assert isinstance(errors[0], DownloadCancelled)
    assert _ends(grandchild)


def test_process_crash_becomes_retryable_error(tmp_path: Path) -> None:
    downloader = ProcessDownloader(CrashingEngine("raise"), stall_timeout_s=60)

    with pytest.raises(DownloadFailed) as caught:
        downloader.download(
            _job(vod_id="broken"),
            on_progress=lambda _progress: None,
            cancelled=threading.Event(),
            bucket=TokenBucket(None),
        )

    assert "engine broke while downloading broken" in str(caught.value)
    assert caught.value.retryable


def test_process_exit_without_result_names_the_exit(tmp_path: Path) -> None:
    downloader = ProcessDownloader(CrashingEngine("exit"), stall_timeout_s=60)

    with pytest.raises(DownloadFailed) as caught:
        downloader.download(
            _job(),
            on_progress=lambda _progress: None,
            cancelled=threading.Event(),
            bucket=TokenBucket(None),
        )

    assert "exit status 3" in str(caught.value)


def test_process_rate_change_reaches_the_child(tmp_path: Path) -> None:
    rate_file = tmp_path / "rate"
    downloader = ProcessDownloader(RateEngine(rate_file), stall_timeout_s=60)
    bucket = TokenBucket(1000.0)
    cancelled = threading.Event()
    thread, _errors = _run_in_thread(downloader, _job(), cancelled, bucket)
    wait_for(lambda: rate_file.exists() and rate_file.read_text() == "1000.0")

    bucket.set_rate(5000.0)

    wait_for(lambda: rate_file.read_text() == "5000.0", timeout_s=10)
    cancelled.set()
    thread.join(timeout=20)


def test_process_ceiling_and_spare_reach_the_child(tmp_path: Path) -> None:
    rate_file = tmp_path / "rate"
    ceiling_file, spare_file = (
        rate_file.with_suffix(s) for s in (".ceiling", ".spare")
    )
    downloader = ProcessDownloader(RateEngine(rate_file), stall_timeout_s=60)
    spare = SpareTokens()
    spare.set_rate(3000.0)
    bucket = TokenBucket(1000.0, spare=spare, ceiling=2000.0)
    cancelled = threading.Event()
    thread, _errors = _run_in_thread(downloader, _job(), cancelled, bucket)
    wait_for(lambda: ceiling_file.exists() and spare_file.exists())
    first_ceiling, first_spare = ceiling_file.read_text(), spare_file.read_text()

    bucket.set_ceiling(2500.0)
    spare.set_rate(4000.0)

    wait_for(lambda: ceiling_file.read_text() == "2500.0", timeout_s=10)
    wait_for(lambda: spare_file.read_text() == "4000.0", timeout_s=10)
    cancelled.set()
    thread.join(timeout=20)
    assert first_ceiling == "2000.0"
    assert first_spare == "3000.0"


class _ChangingBucket(TokenBucket):
    """A bucket whose rate changes right after its first read."""

    def __init__(self, first: float, then: float) -> None:
        super().__init__(first)
        self.reads = 0
        self.then = then

    @property
    def rate(self) -> float | None:
        self.reads += 1
        return self._rate if self.reads == 1 else self.then


def test_process_rate_changed_while_child_starts(tmp_path: Path) -> None:
    # Another download joining changes the rate while this child starts.
    rate_file = tmp_path / "rate"
    downloader = ProcessDownloader(RateEngine(rate_file), stall_timeout_s=60)
    bucket = _ChangingBucket(1000.0, then=7000.0)
    cancelled = threading.Event()
    thread, _errors = _run_in_thread(downloader, _job(), cancelled, bucket)

    wait_for(lambda: rate_file.exists() and rate_file.read_text() == "7000.0")
    cancelled.set()
    thread.join(timeout=20)


def test_process_throttling_is_not_a_stall() -> None:
    downloader = ProcessDownloader(
        CrashingEngine("raise", read_block_bytes=100_000), stall_timeout_s=60
    )

    assert downloader._stall_limit_s(1000.0) == pytest.approx(300.0)


_SERVICE_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from engines import HangingEngine
    from vodq.bandwidth import SpareTokens, TokenBucket
    from vodq.download import DownloadJob
    from vodq.download.process import ProcessDownloader

    downloader = ProcessDownloader(
        HangingEngine(Path(sys.argv[1])),
        stall_timeout_s=60,
        orphan_after_s=float(sys.argv[2]),
    )
    downloader.download(
        DownloadJob("v1", "http://127.0.0.1:9/none.mp4", 1),
        on_progress=lambda _progress: None,
        cancelled=threading.Event(),
        bucket=TokenBucket(None),
    )
    """
)


def test_process_service_killed_takes_its_downloads_along(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    tests_dir = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{tests_dir}{os.pathsep}" + os.environ.get("PYTHONPATH", ""),
    }
    service = subprocess.Popen(
        [sys.executable, "-c", _SERVICE_SCRIPT, str(pid_file), "15"], env=env
    )
    try:
        child, grandchild = _pids(pid_file)

        service.send_signal(signal.SIGKILL)
        service.wait(timeout=10)

        wait_for(lambda: not _alive(child) and not _alive(grandchild), timeout_s=10)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)

    assert _ends(grandchild)


def test_process_paused_service_stops_its_downloads(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    tests_dir = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{tests_dir}{os.pathsep}" + os.environ.get("PYTHONPATH", ""),
    }
    service = subprocess.Popen(
        [sys.executable, "-c", _SERVICE_SCRIPT, str(pid_file), "1"], env=env
    )
    try:
        child, grandchild = _pids(pid_file)

        # A paused service cannot renew its leases, so its downloads must
        # stop before another worker takes them over.
        service.send_signal(signal.SIGSTOP)

        wait_for(lambda: not _alive(child) and not _alive(grandchild), timeout_s=10)
    finally:
        service.send_signal(signal.SIGCONT)
        service.kill()
        service.wait(timeout=10)

    assert not _alive(grandchild)


def _listen_reporting(conn: Connection, report: Connection) -> None:
    """Run a child's listener on ``conn``; send its bucket's rate and whether
    it may borrow to ``report``."""
    # A group of its own, which the listener kills when the service goes.
    os.setpgid(0, 0)
    bucket = TokenBucket(1000.0)
    listener = threading.Thread(
        target=process._listen,
        args=(conn, process._Outbox(conn), threading.Event(), bucket, 8.0),
        daemon=True,
    )
    listener.start()
    for _ in range(100):
        report.send((bucket.rate, bucket.borrowing))
        time.sleep(0.1)


def test_process_silent_service_holds_download() -> None:
    context = multiprocessing.get_context("fork")
    service_end, child_end = context.Pipe()
    report_in, report_out = context.Pipe(duplex=False)
    child = context.Process(target=_listen_reporting, args=(child_end, report_out))
    child.start()

    def latest_rate() -> tuple[float | None, bool] | None:
        """Return the last rate the child reported, after it reported twice."""
        time.sleep(0.25)
        rate = None
        while report_in.poll(0):
            rate = report_in.recv()
        return rate

    try:
        # Nothing from the service for longer than HOLD_AFTER_S.
        time.sleep(process.HOLD_AFTER_S + 0.5)
        held = latest_rate()
        service_end.send(("alive",))
        restored = latest_rate()
    finally:
        child.kill()
        child.join(timeout=5)
    assert held is not None
    assert restored is not None
    assert held[0] == process.HELD_RATE
    assert not held[1], "a held download borrowed"
    assert restored[0] == 1000.0
    assert restored[1], "the restored download may not borrow"
