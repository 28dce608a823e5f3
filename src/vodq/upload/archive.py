"""The ``none`` uploader's one step: give the downloaded file its archive name.

The file stays in DATA_DIR/vods and is renamed after ARCHIVE_NAME_TEMPLATE.
The rename never replaces another file: the new name is taken with a hard
link, which fails when the name exists, and a taken name gets `` (2)``,
`` (3)`` and so on. The name is stored as the upload session before the
rename, so an attempt interrupted after the rename finds the file again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from vodq.errors import UploadFailed
from vodq.upload import UploadJob
from vodq.upload.template import extension_of, file_name

# Numbered names tried after the rendered one is taken, before giving up.
MAX_NAME_TRIES = 100


def place(job: UploadJob, template: str, on_session: Callable[[str], None]) -> Path:
    """Rename ``job.path`` after ``template``; return the file's new path."""
    source = job.path
    if job.session is not None and not source.exists():
        earlier = Path(job.session)
        if earlier.is_file():
            # An earlier attempt renamed the file but did not record it.
            return earlier
    if not source.is_file():
        raise UploadFailed(
            f"the downloaded file {str(source)!r} is missing; reprocess the VOD "
            "to download it again",
            retryable=False,
        )

    wanted = file_name(template, job, extension_of(source))
    for number in range(1, MAX_NAME_TRIES + 1):
        target = source.with_name(_numbered(wanted, number))
        if target == source:
            return source
        on_session(str(target))
        if _take_name(source, target):
            return target
    raise UploadFailed(
        f"every name from {wanted!r} to {_numbered(wanted, MAX_NAME_TRIES)!r} is "
        "taken in the archive; put {vod_id} into ARCHIVE_NAME_TEMPLATE",
        retryable=False,
    )


def _numbered(name: str, number: int) -> str:
    if number == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        return f"{name} ({number})"
    return f"{stem} ({number}).{suffix}"


def _take_name(source: Path, target: Path) -> bool:
    """Move ``source`` to ``target`` unless another file has that name."""
    try:
        os.link(source, target)
    except FileExistsError:
        if os.path.samefile(source, target):
            # An earlier attempt linked the name and stopped before unlinking.
            source.unlink()
            return True
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        # NOTE: without hard links, two VODs renamed to one name at the same
        # moment could race here; {vod_id} in ARCHIVE_NAME_TEMPLATE rules it out.
        if target.exists():
            return False
        os.rename(source, target)
        return True
    source.unlink()
    _fsync_dir(target.parent)
    return True


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
