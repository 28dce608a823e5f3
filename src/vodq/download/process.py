"""Each download in a child process of its own, which can always be killed.

A download thread inside the service cannot be stopped from outside: a hung
yt-dlp extractor, a server that trickles bytes, or a child program that
yt-dlp started would keep running until the service exits. So every attempt
runs in a child process that leads a process group of its own, and the
service keeps the means to end it:

- **Cancel, pause, shutdown, lost lease:** the child is asked to stop and
  does so at its next progress hook, keeping its partial file consistent. If
  it has not stopped after CANCEL_GRACE_S, its whole process group is killed
  with SIGKILL. The partial file keeps every byte written before the kill,
  and the next attempt resumes from its size.
- **Stall:** when no media byte arrives for DOWNLOAD_STALL_TIMEOUT (longer
  when the rate limit alone explains the wait), the process group is killed
  and the attempt fails as ``transient``, so it is retried with backoff.
  Silent sockets fail sooner inside the child, through yt-dlp's socket
  timeout, with the same class.
- **The service dies:** the child's end of the pipe reads end-of-file and the
  child kills its own process group at once, so a restarted service never
  shares a partial file with a leftover writer.

Children are forked from multiprocessing's fork server, which imports
yt-dlp once at start-up. A new attempt then costs a fork, not the 0.35 s
that importing yt-dlp takes (yt-dlp 2026.11 on 2 cores), and the children
share those pages with the fork server.

The pipe carries small tuples. From the service: ``("rate", bytes_per_s,
ceiling_bytes_per_s)`` and ``("cancel",)``. From the child: ``("log",
record)``, ``("progress", bytes_done, bytes_total, speed_bps)``, then exactly
one of ``("done", path, size)``, ``("failed", message, error_class,
retryable, retry_after_s)``, ``("cancelled",)`` or ``("crashed",
description)``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from vodq.bandwidth import SpareTokens, TokenBucket
from vodq.download import Downloader, DownloadJob, DownloadResult
from vodq.errors import DownloadCancelled, DownloadFailed
from vodq.models import Progress

log = logging.getLogger(__name__)

# How long a child may take to stop after it was asked, in seconds, before
# its process group is killed. A child stops at its next progress hook, which
# runs after every read block: well under a second unless the source is very
# slow or yt-dlp is not reading media at all.
CANCEL_GRACE_S = 2.0

# How often the service side looks at the cancel flag, the rate and the
# stall clock while it waits for messages, in seconds.
POLL_S = 0.05

# Shortest time between two progress messages from a child, in seconds. The
# hook runs after every read block, up to a thousand times a second on a
# fast source, and the service needs only a recent figure.
PROGRESS_INTERVAL_S = 0.1

# How often the service side writes to a child that it is still running, in
# seconds. A child that reads nothing for its orphan timeout (half the lease)
# kills its group, because a paused service (SIGSTOP, a frozen machine)
# cannot renew the lease, and another worker may take the VOD over.
ALIVE_INTERVAL_S = 0.5
# A child that reads nothing from the service for this long, in seconds (or
# for a quarter of the lease if that is shorter), reads at HELD_RATE bytes
# per second until it hears again. It matches STALE_LEASE_S in vodq.queue.
HOLD_AFTER_S = 3.0
HELD_RATE = 1.0

# Extra seconds the stall watchdog grants beyond DOWNLOAD_STALL_TIMEOUT, so
# that a silent socket fails first inside the child, through yt-dlp's own
# timeout, with its precise message.
STALL_MARGIN_S = 5.0

# The modules the fork server imports once, for every child to share. Each
# child runs the parent's main script again before it starts, as
# multiprocessing does for every start method but fork. For the ``vodq``
# command that script imports vodq.cli and the whole service, 60 to 150 ms
# per download (measured on 2 cores) unless the fork server has it already.
# Python 3.11 ignores "__main__" in this list, because it never passes the
# script's path to the fork server.
PRELOAD = ["vodq.cli", "vodq.download.process", "vodq.download.preload"]


class Engine(Protocol):
    """A picklable recipe for the downloader that a child process runs."""

    @property
    def read_block_bytes(self) -> int:
        """Bytes read between two progress hooks, which bounds stall detection."""
        ...

    def build(self) -> Downloader: ...


_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def warm_up() -> None:
    """Start the fork server now, so that the first download does not wait for it."""
    multiprocessing.forkserver.ensure_running()


@dataclass
class _Outcome:
    """The end of a child's run, as the service side saw it."""

    message: tuple[Any, ...] | None = None
    killed_for: str | None = None
    # Seconds without progress before a stall kill.
    waited_s: float = 0.0


class ProcessDownloader:
    """Run each download of an Engine in a child process with its own group."""

    def __init__(
        self,
        engine: Engine,
        *,
        stall_timeout_s: float,
        cancel_grace_s: float = CANCEL_GRACE_S,
        stall_margin_s: float = STALL_MARGIN_S,
        orphan_after_s: float = 15.0,
    ) -> None:
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.stall_margin_s = stall_margin_s
        # Seconds without a word from this side after which a child kills
        # its group; below the lease, so that it stops before a takeover.
        self.orphan_after_s = orphan_after_s

    def download(
        self,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult:
        """Download ``job`` in a child process; raise as the child's attempt ended."""
        ours, theirs = _context.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()
        # Read once: the rate may change while the child starts, and the
        # watch loop sends any rate that differs from the one the child has.
        start_limits = (bucket.rate, bucket.ceiling)
        child = _context.Process(
            target=child_main,
            args=(theirs, self.engine, job),
            kwargs={
                "rate": start_limits[0],
                "ceiling": start_limits[1],
                # Shared memory: the child borrows what the worker's other
                # downloads leave of the pool.
                "spare": bucket.spare,
                "log_level": level,
                "orphan_after_s": self.orphan_after_s,
            },
            name=f"vodq-download-{job.vod_id}",
            daemon=True,
        )
        try:
            child.start()
        except OSError as exc:
            ours.close()
            theirs.close()
            raise DownloadFailed(
                f"could not start a download process: {exc}. Check the "
                "service's process and memory limits; retried after "
                "PROCESSING_RETRY_COOLDOWN",
                error_class="error",
                retryable=True,
            ) from exc
        # The child has its own copy now. Ours must be closed, or the
        # child's death would never read as end-of-file here.
        theirs.close()

        try:
            outcome = self._watch(
                child,
                ours,
                job,
                on_progress=on_progress,
                cancelled=cancelled,
                bucket=bucket,
                sent=start_limits,
            )
        finally:
            _kill_group(child)
            ours.close()
            child.join(timeout=5.0)
        return _result(outcome, child, job, self.stall_timeout_s)

    def _watch(
        self,
        child: Any,
        conn: Connection,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
        sent: tuple[float | None, float | None],
    ) -> _Outcome:
        """Relay messages until the child reports a result, dies or is killed."""
        last_bytes = -1
        last_activity = time.monotonic()
        last_alive = last_activity
        cancel_deadline: float | None = None

        while True:
            try:
                ready = conn.poll(POLL_S)
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                return _Outcome()
            now = time.monotonic()

            if message is not None:
                kind = message[0]
                if kind == "log":
                    _emit(message[1])
                elif kind == "progress":
                    _, done, total, speed = message
                    if done != last_bytes:
                        last_bytes = done
                        last_activity = now
                    on_progress(Progress(done, total, speed))
                else:
                    return _Outcome(message=message)

            if cancelled.is_set() and cancel_deadline is None:
                cancel_deadline = now + self.cancel_grace_s
                _send(conn, ("cancel",))
            if cancel_deadline is not None and now >= cancel_deadline:
                log.warning(
                    "VOD %s: the download process did not stop within %.0fs of "
                    "the request; killing its process group",
                    job.vod_id,
                    self.cancel_grace_s,
                    extra={"vod_id": job.vod_id, "attempt": job.attempt},
                )
                return _Outcome(killed_for="cancel")

            rate = bucket.rate
            limits = (rate, bucket.ceiling)
            if limits != sent:
                sent = limits
                _send(conn, ("rate", *limits))
            if now - last_alive >= ALIVE_INTERVAL_S:
                last_alive = now
                _send(conn, ("alive",))

            if now - last_activity > self._stall_limit_s(rate):
                return _Outcome(killed_for="stall", waited_s=now - last_activity)

    def _stall_limit_s(self, rate: float | None) -> float:
        """Seconds without a new byte after which the attempt counts as stalled.

        A rate limit of r bytes/s spaces progress hooks one read block apart,
        so a wait of a few blocks at that rate is throttling, not a stall.
        """
        limit = self.stall_timeout_s + self.stall_margin_s
        if rate:
            limit = max(limit, 3 * self.engine.read_block_bytes / rate)
        return limit


def _result(
    outcome: _Outcome, child: Any, job: DownloadJob, stall_timeout_s: float
) -> DownloadResult:
    """Turn what the child reported, or how it ended, into a result or an error."""
    if outcome.killed_for == "cancel":
        raise DownloadCancelled("download cancelled; its process group was killed")
    if outcome.killed_for == "stall":
        raise DownloadFailed(
            f"download stalled: no data arrived for {outcome.waited_s:.0f}s "
            f"(DOWNLOAD_STALL_TIMEOUT is {stall_timeout_s:g}s), so yt-dlp and "
            "its child processes were killed. Retried with backoff, resuming "
            "any partial file",
            error_class="transient",
            retryable=True,
        )

    message = outcome.message
    if message is None:
        raise DownloadFailed(
            f"the download process ended ({_exit_description(child)}) without "
            "reporting a result. The partial file is kept and the next attempt "
            "resumes it",
            error_class="error",
            retryable=True,
        )
    kind = message[0]
    if kind == "done":
        return DownloadResult(path=Path(message[1]), size=int(message[2]))
    if kind == "failed":
        _, text, error_class, retryable, retry_after_s = message
        raise DownloadFailed(
            text,
            error_class=error_class,
            retryable=retryable,
            retry_after_s=retry_after_s,
        )
    if kind == "cancelled":
        raise DownloadCancelled("download cancelled")
    raise DownloadFailed(
        f"unexpected error in the download process: {message[1]}",
        error_class="error",
        retryable=True,
    )


def _exit_description(child: Any) -> str:
    child.join(timeout=1.0)
    code = child.exitcode
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _kill_group(child: Any) -> None:
    """SIGKILL the child's process group, and the child if it has no group yet.

    The child leads its own group (``os.setsid`` is its first step), so the
    group contains yt-dlp and any program it started. Killing it after a result
    ends whatever the attempt left running.
    """
    pid = child.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if child.exitcode is None:
            child.kill()


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    # A child that already exited cannot read; its end is noticed by recv.
    with contextlib.suppress(OSError, ValueError):
        conn.send(message)


def _emit(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    logging.getLogger(record.name).handle(record)


# -- the child side ------------------------------------------------------


class _PipeHandler(logging.Handler):
    """Send each log record of the child to the service, ready to format."""

    def __init__(self, outbox: _Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = self.format_exception(record)
            fields["exc_info"] = None
            self.outbox.send(("log", _picklable(fields)))
        except Exception:
            self.handleError(record)

    def format_exception(self, record: logging.LogRecord) -> str:
        exc_info = record.exc_info
        if not exc_info or exc_info[0] is None:
            return ""
        return "".join(traceback.format_exception(*exc_info))


def _picklable(fields: dict[str, Any]) -> dict[str, Any]:
    plain = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, plain) else str(v) for k, v in fields.items()}


class _Outbox:
    """The child's end of the pipe, shared by its threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.final_sent = False

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            if not self.final_sent:
                self.conn.send(message)

    def send_final(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            if not self.final_sent:
                self.final_sent = True
                self.conn.send(message)


def child_main(
    conn: Connection,
    engine: Engine,
    job: DownloadJob,
    *,
    rate: float | None,
    log_level: int,
    orphan_after_s: float,
    ceiling: float | None = None,
    spare: SpareTokens | None = None,
) -> None:
    """Run one attempt in this child process and report it through ``conn``."""
    os.setsid()
    outbox = _Outbox(conn)
    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(outbox)]
    root.setLevel(log_level)
    cancelled = threading.Event()
    bucket = TokenBucket(rate, spare=spare, ceiling=ceiling)
    threading.Thread(
        target=_listen,
        args=(conn, outbox, cancelled, bucket, orphan_after_s),
        daemon=True,
    ).start()

    last_sent = 0.0
    pending: Progress | None = None

    def on_progress(progress: Progress) -> None:
        nonlocal last_sent, pending
        now = time.monotonic()
        if now - last_sent < PROGRESS_INTERVAL_S:
            pending = progress
            return
        last_sent = now
        pending = None
        outbox.send(_progress_message(progress))

    try:
        result = engine.build().download(
            job, on_progress=on_progress, cancelled=cancelled, bucket=bucket
        )
    except DownloadCancelled:
        final: tuple[Any, ...] = ("cancelled",)
    except DownloadFailed as exc:
        final = (
            "failed",
            str(exc),
            exc.error_class,
            exc.retryable,
            exc.retry_after_s,
        )
    except BaseException as exc:
        log.exception(
            "VOD %s: the download crashed",
            job.vod_id,
            extra={"vod_id": job.vod_id, "attempt": job.attempt},
        )
        final = ("crashed", f"{type(exc).__name__}: {exc}")
    else:
        final = ("done", str(result.path), result.size)

    if pending is not None:
        outbox.send(_progress_message(pending))
    outbox.send_final(final)
    conn.close()
    # yt-dlp may leave non-daemon fragment threads behind a failed HLS
    # download; the attempt is over and reported, so nothing may keep this
    # process alive.
    os._exit(0)


def _progress_message(progress: Progress) -> tuple[Any, ...]:
    return ("progress", progress.bytes_done, progress.bytes_total, progress.speed_bps)


def _listen(
    conn: Connection,
    outbox: _Outbox,
    cancelled: threading.Event,
    bucket: TokenBucket,
    orphan_after_s: float,
) -> None:
    """Apply the service's rate changes and cancel; die with the service.

    The service side writes at least every ALIVE_INTERVAL_S, so silence for
    ``orphan_after_s`` means it is paused or wedged, and is treated like its
    death. After HOLD_AFTER_S of silence the download already reads at
    HELD_RATE and borrows nothing, because other workers stop counting it in
    the bandwidth pool once its lease goes unrenewed for STALE_LEASE_S, and
    give its share to their own downloads. The first message after the
    silence restores the rate.
    """
    hold_after_s = min(HOLD_AFTER_S, orphan_after_s / 2)
    holding = False
    # The rate in force when the hold began, restored when it ends.
    rate_before_hold: float | None = None
    while True:
        try:
            wait_s = orphan_after_s - hold_after_s if holding else hold_after_s
            if not conn.poll(wait_s):
                if holding:
                    break
                holding = True
                rate_before_hold = bucket.rate
                bucket.borrowing = False
                bucket.set_rate(HELD_RATE)
                continue
            message = conn.recv()
        except (EOFError, OSError):
            break
        if holding:
            holding = False
            bucket.set_rate(rate_before_hold)
            bucket.borrowing = True
        if message[0] == "rate":
            bucket.set_rate(message[1])
            bucket.set_ceiling(message[2])
        elif message[0] == "cancel":
            cancelled.set()

    if outbox.final_sent:
        return
    # The service is gone or silent: it can no longer renew this VOD's lease,
    # and another worker, or a restarted service, will resume the partial
    # file. Nothing may write it after this point.
    os.killpg(0, signal.SIGKILL)
