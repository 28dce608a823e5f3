"""Run a command in a process group that dies with the service that started it.

``python -m vodq.tether FD COMMAND...`` starts COMMAND as its child, in its
own process group (the service starts it with ``start_new_session``), and
reads FD, the read end of a pipe whose write end only the service holds.
When the service dies, even by SIGKILL, the pipe reads end-of-file and the
tether kills its whole group, so an operator's upload command never outlives
its attempt and never runs beside the next one. Otherwise it exits as the
command did: with its status, or by the signal that ended it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def _watch(fd: int) -> None:
    """Kill this process group once the service's end of the pipe closes."""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m vodq.tether FD COMMAND [ARGUMENT...]", file=sys.stderr)
        return 2
    fd = int(argv[0])
    os.set_inheritable(fd, False)

    try:
        child = subprocess.Popen(argv[1:])  # noqa: S603 - the operator's own command
    except OSError as exc:
        print(f"could not start {argv[1]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    threading.Thread(target=_watch, args=(fd,), daemon=True).start()

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
