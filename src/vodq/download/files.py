"""Where a VOD's files live, named safely from its id, and how they are finalised.

Partial files stay in ``DATA_DIR/partial`` so that a later attempt resumes
them, next to a small sidecar (``<stem>.vodq.json``, see validators.py) that
records which VOD and source they came from. A file reaches ``DATA_DIR/vods``
only complete (its size checked when the source announced one), synced to
disk and renamed in one step.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

SIDECAR_SUFFIX = ".vodq.json"

# Numbered names tried after a file's name is taken, before giving up.
MAX_NAME_TRIES = 100

_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_stem(vod_id: str) -> str:
    """Return a file name stem for ``vod_id`` that cannot leave its folder.

    A plain id (letters, digits, ``_`` and ``-``) is used as it is. Any other
    id is reduced to those characters and joined with ``~`` to 64 bits of a
    hash of the whole id. A plain id cannot contain ``~``, so the two kinds
    never meet, and two other ids share a stem only on a hash collision.
    """
    if _PLAIN_ID.fullmatch(vod_id):
        return vod_id
    digest = hashlib.sha256(vod_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    cleaned = _UNSAFE.sub("_", vod_id).strip("_")[:60]
    return f"{cleaned}~{digest}"


class SizeMismatch(ValueError):
    """A downloaded file does not have the size its source announced."""

    def __init__(self, path: Path, size: int, expected: int) -> None:
        super().__init__(
            f"{path.name} has {size} bytes but the source announced {expected}"
        )
        self.path = path
        self.size = size
        self.expected = expected


class ArchiveLayout:
    """The folders under DATA_DIR that hold partial and finished downloads."""

    def __init__(self, data_dir: Path) -> None:
        data_dir = data_dir.absolute()
        self.partial_dir = data_dir / "partial"
        self.archive_dir = data_dir / "vods"

    def ensure(self) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.archive_dir.mkdir(parents=True, exist_ok=True)

    def partial_template(self, vod_id: str) -> str:
        """Return yt-dlp's output template for ``vod_id``, extension left to yt-dlp."""
        return str(self.partial_dir / f"{safe_stem(vod_id)}.%(ext)s")

    def partial_files(self, vod_id: str) -> list[Path]:
        """List every file an attempt for ``vod_id`` may have left behind."""
        stem = safe_stem(vod_id)
        return sorted(self.partial_dir.glob(f"{glob_escape(stem)}.*"))

    def sidecar_path(self, vod_id: str) -> Path:
        """Return the path of the sidecar of ``vod_id``'s partial files."""
        return self.partial_dir / f"{safe_stem(vod_id)}{SIDECAR_SUFFIX}"

    def download_files(self, vod_id: str) -> list[Path]:
        """List the partial files of ``vod_id`` that hold media, not the sidecar."""
        return [
            path
            for path in self.partial_files(vod_id)
            if not path.name.endswith(SIDECAR_SUFFIX)
            and not path.name.endswith(SIDECAR_SUFFIX + ".tmp")
        ]

    def discard_partial(self, vod_id: str) -> list[Path]:
        """Delete every file an attempt for ``vod_id`` left, the sidecar too."""
        removed = self.partial_files(vod_id)
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def remove_stray_fragments(self, vod_id: str) -> list[Path]:
        """Delete fragment files of an interrupted HLS download, keeping ``.ytdl``.

        A fragment written but not yet merged answers 416 on resume, and yt-dlp
        then skips it and reports success with data missing (yt-dlp 2026.11),
        so such fragments are fetched again instead. A ``.ytdl`` record's
        temporary file, left by a kill before its rename, goes too.
        """
        removed = [
            path
            for path in self.partial_files(vod_id)
            if ".part-Frag" in path.name
            or (".ytdl." in path.name and path.name.endswith(".tmp"))
        ]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def finalise(self, downloaded: Path, expected_size: int | None = None) -> Path:
        """Sync ``downloaded`` and move it into the archive; return its new path.

        With ``expected_size`` a file of any other size raises SizeMismatch
        and stays where it is, out of the archive. A name that another file
        has in the archive gets `` (2)``, `` (3)`` and so on.
        """
        with downloaded.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if expected_size is not None and size != expected_size:
                raise SizeMismatch(downloaded, size, expected_size)
            os.fsync(handle.fileno())
        # The archive also contains files renamed after ARCHIVE_NAME_TEMPLATE
        # and the operator's own, so the name may be taken already.
        for number in range(1, MAX_NAME_TRIES + 1):
            target = self.archive_dir / numbered(downloaded.name, number)
            if take_name(downloaded, target):
                return target
        raise FileExistsError(
            errno.EEXIST,
            f"every name from {downloaded.name!r} to "
            f"{numbered(downloaded.name, MAX_NAME_TRIES)!r} is taken in "
            f"{self.archive_dir}; move files out of it",
        )


def numbered(name: str, number: int) -> str:
    """Return ``name`` for the first try, then ``stem (2).ext`` and so on."""
    if number == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        return f"{name} ({number})"
    return f"{stem} ({number}).{suffix}"


def take_name(source: Path, target: Path) -> bool:
    """Move ``source`` to ``target`` unless another file has that name.

    The name is taken with a hard link, which fails when it exists, so no
    file is ever replaced. Returns False when ``target`` belongs to another
    file.
    """
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
        # NOTE: without hard links, two files moved to one name at the same
        # moment could race here.
        if target.exists():
            return False
        os.rename(source, target)
        return True
    source.unlink()
    _fsync_dir(target.parent)
    return True


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
