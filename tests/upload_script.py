"""An upload command for tests: copies VODQ_FILE into a folder, or misbehaves.

Run as ``python upload_script.py DEST``. The files in the control folder
DEST/../control choose what it does, so one UPLOAD_COMMAND serves a whole
test:

- ``fail``: print a message to stderr and exit with status 3;
- ``block``: write ``<vod_id>.pids`` (its pid and the pid of a child it
  starts), then wait until ``release`` exists before copying;
- otherwise: copy at once.

Every run appends ``<vod_id> <attempt> <session>`` to DEST/../runs.log. A copy
is written to a temporary name and renamed, so DEST never contains half a file,
and the script prints ``vodq-session:`` before and ``vodq-remote:`` after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Maximum time the script waits for ``release``, in seconds, so that a test that
# fails never leaves it running.
BLOCK_LIMIT_S = 30.0


def main() -> int:
    dest = Path(sys.argv[1])
    control = dest.parent / "control"
    vod_id = os.environ["VODQ_VOD_ID"]
    source = Path(os.environ["VODQ_FILE"])

    with (dest.parent / "runs.log").open("a") as runs:
        runs.write(
            f"{vod_id} {os.environ['VODQ_ATTEMPT']} "
            f"{os.environ.get('VODQ_SESSION', '-')}\n"
        )
    print(f"vodq-session: started-{vod_id}", flush=True)

    if (control / "fail").exists():
        print(f"remote refused {vod_id}", file=sys.stderr)
        return 3
    if (control / "block").exists():
        child = subprocess.Popen(
            [sys.executable, "-c", f"import time; time.sleep({BLOCK_LIMIT_S})"]
        )
        (control / f"{vod_id}.pids").write_text(f"{os.getpid()} {child.pid}")
        deadline = time.monotonic() + BLOCK_LIMIT_S
        while not (control / "release").exists():
            if time.monotonic() > deadline:
                return 4
            time.sleep(0.05)

    dest.mkdir(parents=True, exist_ok=True)
    temporary = dest / f".{vod_id}.{os.getpid()}.tmp"
    shutil.copyfile(source, temporary)
    os.replace(temporary, dest / f"{vod_id}{source.suffix}")
    print(f"copied {source.name}")
    print(f"vodq-remote: copy-{vod_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
