"""The ``command`` uploader: runs the operator's UPLOAD_COMMAND for each file.

UPLOAD_COMMAND is split into arguments with ``shlex`` once, at start-up, and
run without a shell. Placeholders such as ``{path}`` are filled inside each
argument, so a title with spaces, quotes or ``;`` stays one argument and is
never interpreted. The command also finds the file and the VOD's metadata in
``VODQ_*`` environment variables. Exit status 0 is success. A line
``vodq-remote: <id or URL>`` on standard output names the uploaded copy, and
a line ``vodq-session: <text>`` stores text that the next attempt receives
in ``VODQ_SESSION``, so a command can resume or verify an interrupted upload.

The command runs in a process group of its own, and cancel, shutdown and
timeout end the whole group: SIGTERM first, SIGKILL after KILL_GRACE_S.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

from vodq.errors import ConfigError, UploadCancelled, UploadFailed
from vodq.upload import UploadJob, UploadResult

log = logging.getLogger(__name__)

# Fields a placeholder in UPLOAD_COMMAND may name.
PLACEHOLDERS = (
    "path",
    "file_name",
    "vod_id",
    "title",
    "channel",
    "date",
    "source_url",
    "attempt",
)
REMOTE_PREFIX = "vodq-remote:"
SESSION_PREFIX = "vodq-session:"
# Output lines logged per stream and attempt, and characters kept of each;
# more is counted, not logged, so a chatty command cannot flood the log.
MAX_LOGGED_LINES = 200
MAX_LINE_CHARS = 1000
# Wait between SIGTERM and SIGKILL of the command's process group, in seconds.
KILL_GRACE_S = 5.0
# How often the running command is checked for exit and cancel, in seconds.
POLL_S = 0.1
# Maximum wait for the output readers after the command exited, in seconds.
READER_JOIN_S = 5.0
# vodq's own secrets, which the operator's command has no use for.
HIDDEN_VARIABLES = ("ADMIN_PASSWORD", "ADMIN_TOKEN", "DB_DSN")


def parse_command(text: str) -> tuple[str, ...]:
    """Split UPLOAD_COMMAND into arguments; raise ValueError naming the problem."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"it cannot be split into arguments ({exc})") from None
    if not argv:
        raise ValueError("it names no program")
    for argument in argv:
        try:
            parsed = list(string.Formatter().parse(argument))
        except ValueError as exc:
            raise ValueError(
                f"argument {argument!r} is not valid: {exc}; write a literal "
                "brace as {{ or }}"
            ) from None
        for _text, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                known = ", ".join("{" + field + "}" for field in PLACEHOLDERS)
                raise ValueError(
                    f"argument {argument!r} uses {{{name}}}, which is not a "
                    f"placeholder; known placeholders: {known}"
                )
    return argv


def job_fields(job: UploadJob) -> dict[str, str]:
    """Return the values of the placeholders and VODQ_* variables for ``job``."""
    return {
        "path": str(job.path),
        "file_name": job.path.name,
        "vod_id": job.vod_id,
        "title": job.title or "",
        "channel": job.channel or "",
        "date": job.date.strftime("%Y-%m-%d") if job.date else "",
        "source_url": job.source_url,
        "attempt": str(job.attempt),
    }


def command_environment(
    job: UploadJob, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Build the command's environment: vodq's own, less its secrets, plus VODQ_*."""
    environment = {
        name: value
        for name, value in (os.environ if base is None else base).items()
        if name not in HIDDEN_VARIABLES
    }
    fields = job_fields(job)
    environment.update(
        {
            "VODQ_FILE": fields["path"],
            "VODQ_VOD_ID": fields["vod_id"],
            "VODQ_TITLE": fields["title"],
            "VODQ_CHANNEL": fields["channel"],
            "VODQ_DATE": fields["date"],
            "VODQ_SOURCE_URL": fields["source_url"],
            "VODQ_ATTEMPT": fields["attempt"],
            "VODQ_SIZE": str(job.size),
        }
    )
    if job.session is not None:
        environment["VODQ_SESSION"] = job.session
    return environment


class _OutputReader:
    """Log one stream of the command line by line and pick out vodq- lines."""

    def __init__(
        self,
        stream: IO[bytes],
        name: str,
        job: UploadJob,
        on_session: Callable[[str], None] | None,
    ) -> None:
        self.stream = stream
        self.name = name
        self.job = job
        self.on_session = on_session
        self.remote: str | None = None
        self.last_line = ""
        self.dropped = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._read, name=f"vodq-upload-{name}", daemon=True
        )

    def _read(self) -> None:
        logged = 0
        try:
            for raw in self.stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.strip():
                    self.last_line = line[:MAX_LINE_CHARS]
                self._interpret(line)
                if logged >= MAX_LOGGED_LINES:
                    self.dropped += 1
                    continue
                logged += 1
                log.info(
                    "upload command %s: %s",
                    self.name,
                    line[:MAX_LINE_CHARS],
                    extra={
                        "vod_id": self.job.vod_id,
                        "attempt": self.job.attempt,
                        "stream": self.name,
                        "action": "upload_output",
                    },
                )
        except BaseException as exc:  # handed to the thread that waits
            self.error = exc
        finally:
            self.stream.close()

    def _interpret(self, line: str) -> None:
        if self.on_session is None:
            return
        if line.startswith(REMOTE_PREFIX):
            self.remote = line.removeprefix(REMOTE_PREFIX).strip() or None
        elif line.startswith(SESSION_PREFIX):
            session = line.removeprefix(SESSION_PREFIX).strip()
            if session:
                self.on_session(session)


class CommandUploader:
    """Uploads a file by running UPLOAD_COMMAND; see the module docstring."""

    name = "command"

    def __init__(
        self, argv: tuple[str, ...], *, timeout_s: float, orphan_after_s: float = 15.0
    ) -> None:
        program = argv[0]
        if "{" not in program and shutil.which(program) is None:
            # Checked where uploads run, not in every process that reads the
            # settings: an API machine need not have the program.
            raise ConfigError(
                f"invalid configuration:\n  UPLOAD_COMMAND names the program "
                f"{program!r}, which is not an executable file here (not found "
                "on PATH); install it or give its full path, for example "
                "UPLOAD_COMMAND='/usr/bin/rclone copy {path} remote:vods'"
            )
        self.argv = argv
        self.timeout_s = timeout_s
        # Seconds of silence from this process after which the tether kills
        # the command; below the lease, so that it stops before a takeover.
        self.orphan_after_s = orphan_after_s

    def upload(
        self,
        job: UploadJob,
        *,
        cancelled: threading.Event,
        on_session: Callable[[str], None],
        on_progress: Callable[[int], None],
        lease_held: Callable[[], bool],
    ) -> UploadResult:
        fields = job_fields(job)
        argv = [argument.format_map(fields) for argument in self.argv]
        if shutil.which(argv[0]) is None:
            raise UploadFailed(
                f"UPLOAD_COMMAND could not start {argv[0]!r}: no such executable "
                "file; check that the program exists and is executable",
                retryable=False,
            )
        # The tether kills the command's group if this process dies or falls
        # silent, so a command does not outlive its attempt. Only this
        # process has the pipe's write end.
        tether_read, tether_write = os.pipe()
        # Writes must not block: a full pipe only means the tether has not
        # read yet.
        os.set_blocking(tether_write, False)
        try:
            process = subprocess.Popen(  # noqa: S603 - the operator's own command, no shell
                [
                    sys.executable,
                    "-m",
                    "vodq.tether",
                    str(tether_read),
                    str(self.orphan_after_s),
                    *argv,
                ],
                env=command_environment(job),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(tether_read,),
            )
        except OSError as exc:
            os.close(tether_write)
            raise UploadFailed(
                f"UPLOAD_COMMAND could not start {argv[0]!r}: {exc.strerror or exc}; "
                "check that the program exists and is executable",
                retryable=False,
            ) from exc
        finally:
            os.close(tether_read)

        assert process.stdout is not None and process.stderr is not None
        stdout = _OutputReader(process.stdout, "stdout", job, on_session)
        stderr = _OutputReader(process.stderr, "stderr", job, None)
        stdout.thread.start()
        stderr.thread.start()
        try:
            status = self._wait(process, cancelled, lease_held, tether_write)
        finally:
            # Whatever the command left running belongs to this attempt and
            # could otherwise upload a second copy later.
            _kill_group(process, signal.SIGKILL)
            os.close(tether_write)
            for reader in (stdout, stderr):
                reader.thread.join(READER_JOIN_S)
        for reader in (stdout, stderr):
            if reader.dropped:
                log.warning(
                    "upload command wrote %d more lines to %s than are logged",
                    reader.dropped,
                    reader.name,
                    extra={
                        "vod_id": job.vod_id,
                        "attempt": job.attempt,
                        "action": "upload_output",
                    },
                )
        if stdout.error is not None:
            # The session callback failed, so this upload cannot be resumed.
            raise stdout.error

        if status != 0:
            detail = f": {stderr.last_line}" if stderr.last_line else ""
            raise UploadFailed(
                f"UPLOAD_COMMAND {_describe_status(status)}{detail}", retryable=True
            )
        on_progress(job.size)
        remote = stdout.remote
        if remote is None:
            # The command named no copy; record truthfully that it succeeded.
            return UploadResult(remote_id="command")
        is_url = remote.startswith(("http://", "https://"))
        return UploadResult(remote_id=remote, remote_url=remote if is_url else None)

    def _wait(
        self,
        process: subprocess.Popen[bytes],
        cancelled: threading.Event,
        lease_held: Callable[[], bool],
        tether: int,
    ) -> int:
        """Wait for the command; stop its group on cancel, lost lease or timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            status = process.poll()
            if status is not None:
                return status
            # Checked before the keep-alive, so that a worker that resumes
            # after losing its lease does not keep its command running.
            if not lease_held():
                _stop_group(process)
                raise UploadCancelled(
                    "the upload command was stopped because this worker no "
                    "longer holds the VOD's lease"
                )
            _keep_alive(tether)
            if cancelled.wait(POLL_S):
                _stop_group(process)
                raise UploadCancelled("the upload command was stopped")
            if time.monotonic() >= deadline:
                _stop_group(process)
                raise UploadFailed(
                    f"UPLOAD_COMMAND timed out after {self.timeout_s:.0f}s and was "
                    "stopped; raise UPLOAD_COMMAND_TIMEOUT if uploads take longer",
                    retryable=True,
                )


def _keep_alive(tether: int) -> None:
    """Tell the tether that this process still runs the attempt."""
    # A tether that already ended cannot read, and the command's exit status
    # reports why.
    with contextlib.suppress(OSError):
        os.write(tether, b".")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's process group, then SIGKILL it after KILL_GRACE_S."""
    _kill_group(process, signal.SIGTERM)
    try:
        process.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGKILL)
        process.wait()


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # With start_new_session the group id is the command's pid.
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        return


def _describe_status(status: int) -> str:
    if status < 0:
        return f"was killed by signal {-status}"
    return f"exited with status {status}"
