"""UPLOAD_RETENTION: delete the files of confirmed uploads once they are old enough."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from vodq.upload.store import UploadStore

log = logging.getLogger(__name__)

# Maximum number of files one pass deletes, so that it stays short.
RETENTION_BATCH = 500


def delete_expired_files(
    store: UploadStore, retention_s: float, archive_dir: Path
) -> int:
    """Delete files of VODs uploaded more than ``retention_s`` seconds ago.

    Only a done VOD with a remote id loses its file, and only a file inside
    ``archive_dir`` is deleted. The path is cleared in the database first, so
    a reprocess that races this pass downloads the file again instead of
    uploading a deleted one. Returns the number of files deleted.
    """
    archive_dir = archive_dir.resolve()
    before = store.clock() - timedelta(seconds=retention_s)
    deleted = 0
    for vod in store.uploaded_before(before, RETENTION_BATCH):
        path = Path(vod.file_path or "")
        # A file on another machine's DATA_DIR is that machine's to delete.
        # NOTE: a pass looks at the RETENTION_BATCH oldest uploads only, so
        # many such files can delay the deletion of this machine's own.
        if path.resolve().parent != archive_dir or not path.is_file():
            continue
        if not store.forget_file(vod):
            continue

        # NOTE: a crash between clearing the path and unlinking leaves the
        # file on disk, unknown to the database.
        path.unlink(missing_ok=True)
        deleted += 1
        log.info(
            "deleted the file of VOD %s after its confirmed upload",
            vod.vod_id,
            extra={
                "vod_id": vod.vod_id,
                "path": str(path),
                "remote_id": vod.remote_id,
                "action": "retention_delete",
            },
        )
    return deleted
