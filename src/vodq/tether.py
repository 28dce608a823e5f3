"""Run a command in a process group that dies with the service that started it.

``python -m vodq.tether FD QUIET_S COMMAND...`` starts COMMAND as its child,
in its own process group (the service starts it with ``start_new_session``),
and reads FD, the read end of a pipe whose write end only the service
holds. The service writes a byte to it several times a second. When the
service dies, even by SIGKILL, the pipe reads end-of-file; when it is paused
(SIGSTOP, a frozen machine), nothing arrives for QUIET_S seconds. Either
way the tether kills its whole group, so an operator's upload command never
outlives its attempt's lease and never runs beside the next one. Otherwise
it exits as the command did: with its status, or by the signal that ended
it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading


def _watch(fd: int, quiet_s: float) -> None:
    """Kill this process group once the service's end closes or falls silent."""
    while True:
        try:
            readable, _, _ = select.select([fd], [], [], quiet_s)
            if not readable:
                break
            chunk = os.read(fd, 1024)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    try:
        fd, quiet_s, command = int(argv[0]), float(argv[1]), argv[2:]
    except (IndexError, ValueError):
        command = []
    if not command:
        print(
            "usage: python -m vodq.tether FD QUIET_S COMMAND [ARGUMENT...]",
            file=sys.stderr,
        )
        return 2
    os.set_inheritable(fd, False)

    try:
        child = subprocess.Popen(command)  # noqa: S603 - the operator's own command
    except OSError as exc:
        print(f"could not start {command[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    threading.Thread(target=_watch, args=(fd, quiet_s), daemon=True).start()

    # SIGTERM from the service reaches the whole group, the command too; the
    # tether itself waits for the command instead of dying first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = child.wait()

    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
