"""The ``none`` uploader's one step: give the downloaded file its archive name.

The file stays in DATA_DIR/vods and is renamed after ARCHIVE_NAME_TEMPLATE.
The rename never replaces another file: the new name is taken with a hard
link, which fails when the name exists, and a taken name gets `` (2)``,
`` (3)`` and so on. The name is stored as the upload session before the
rename, so an attempt interrupted after the rename finds the file again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vodq.download.files import MAX_NAME_TRIES, numbered, take_name
from vodq.errors import UploadFailed
from vodq.upload import UploadJob
from vodq.upload.template import extension_of, file_name


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
        target = source.with_name(numbered(wanted, number))
        if target == source:
            return source
        on_session(str(target))
        if take_name(source, target):
            return target
    raise UploadFailed(
        f"every name from {wanted!r} to {numbered(wanted, MAX_NAME_TRIES)!r} is "
        "taken in the archive; put {vod_id} into ARCHIVE_NAME_TEMPLATE",
        retryable=False,
    )
