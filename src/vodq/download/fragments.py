"""Fragment appends that keep yt-dlp's resume record true to the partial file.

yt-dlp's fragment downloaders (HLS and DASH) append each fragment to
``X.part`` and then record its index in ``X.ytdl``. The next attempt skips
every fragment up to that index. In yt-dlp 2026.11 the record can claim
more than the file contains, and the next attempt then ends "done" with
data missing:

- With concurrent fragments, a fragment thread whose download fails closes
  the shared ``X.part`` before raising. The main thread's next append,
  of an earlier fragment that did arrive, then fails on the closed file,
  but the index is recorded in a ``finally`` all the same.
- With concurrent fragments, yt-dlp's progress hook sets the index to be
  recorded from the fragment threads, to the count of fragments downloaded
  so far. An append racing a fragment thread that finishes a later
  fragment records that count, which is ahead of the file.
- An append that fails part-way (a full disk) leaves its first bytes in
  ``X.part`` and records the index too.
- A ``.ytdl`` that cannot be read (cut short by a full disk) makes yt-dlp
  start again from the first fragment, appended to the old ``X.part``.
- An HLS init segment (``EXT-X-MAP``) is fetched and appended again on every
  resume.
- Byte ranges without an offset, and AES-128 IVs taken from the media
  sequence, are counted only over the fragments downloaded. So a resume
  reads the wrong ranges or decrypts with the wrong IVs.

``install`` replaces two of ``FragmentFD``'s steps, for every download in
this process. The partial file becomes a ``FragmentSink``, which writes an
append whole or cuts it back off. Only the thread that opened the file may
close it. A failed append is never recorded, the index recorded is that of
the last fragment appended (from its file name), and a fragment already in
the file is not appended again. The record is written to a
temporary file and renamed over the old one, so it is always whole, and it
also gives the partial file's size. When the next attempt starts, a file
longer than its record (a process killed between an append and its record)
is cut back to it. A shorter one, or one with no fragment recorded, starts
again empty, and so does a playlist that yt-dlp would resume wrongly.

``install`` also wraps the fetch of each fragment in a slot of the
download's ``FragmentSlots`` (slots.py), so that its rate sets how many
fragments are fetched at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yt_dlp.version
from yt_dlp.downloader.dash import DashSegmentsFD
from yt_dlp.downloader.fragment import FragmentFD
from yt_dlp.downloader.hls import HlsFD

from vodq.errors import ConfigError

log = logging.getLogger(__name__)

# The record's key for the partial file's size after the last append, in
# bytes. yt-dlp's reader (2026.11) reads the fragment index and extra_state
# only, so it ignores this key.
PART_BYTES_KEY = "vodq_part_bytes"


class FragmentSink:
    """The partial file that fragments are appended to, each whole or not at all.

    Unbuffered, so that a returned write is already in the file and no buffer
    is flushed after the file is cut back.
    """

    def __init__(self, path: str, last_index: int) -> None:
        self.path = path
        # The index of the last fragment that the file contains whole.
        self.last_index = last_index
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self.broken = False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, data: bytes) -> int:
        """Append ``data`` whole, or cut the file back to its old size and raise."""
        with self._lock:
            if self.broken or self._file.closed:
                self.broken = True
                raise OSError(
                    f"{self.path}: closed, or an earlier append failed, so "
                    "nothing more is appended in this attempt; the next attempt "
                    "resumes after the last whole fragment"
                )
            fd = self._file.fileno()
            start = os.fstat(fd).st_size
            view = memoryview(data)
            try:
                while view:
                    written = self._file.write(view)
                    if not written:
                        raise OSError(f"{self.path}: a write wrote nothing")
                    view = view[written:]
            except BaseException:
                self.broken = True
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        return len(data)

    def flush(self) -> None:
        # Unbuffered: every write has reached the file already.
        return None

    def close(self) -> None:
        """Close the file, unless called from a thread other than the opener's.

        In yt-dlp a failing fragment thread closes the shared file, which
        would fail the appends of earlier fragments that did arrive. Those
        are appended instead, and the attempt ends at the failed fragment.
        """
        if threading.get_ident() != self._owner:
            log.debug("ignored a close of %s from a fragment thread", self.path)
            return
        self._file.close()


def _prepare_frag_download(self: FragmentFD, ctx: dict[str, Any]) -> None:
    assert _original_prepare is not None, "install() checks it"
    _original_prepare(self, ctx)
    path = ctx["tmpfilename"]
    if path == "-" or not isinstance(self, HlsFD | DashSegmentsFD):
        # Other fragment downloaders (f4m, ism) write headers of their own
        # to the file, so their writes are not one per fragment.
        return

    ctx["dest_stream"].close()
    # The file's own size, because after an unreadable record yt-dlp counts
    # 0 bytes but still appends to the old file.
    size = os.stat(path).st_size
    recorded = _recorded_bytes(self, ctx)
    keep = size
    if ctx["fragment_index"] == 0:
        # No fragment is recorded as appended, so the file's bytes are not
        # known to be the start of this stream.
        keep = 0
    elif recorded is not None and recorded < size:
        # Killed between an append and its record: the tail is that
        # fragment, which this attempt appends again.
        keep = recorded
    elif (reason := _resume_blocker(self)) is not None:
        log.warning(
            "%s: yt-dlp cannot resume this playlist, because %s; downloading it "
            "again from the first fragment",
            path,
            reason,
        )
        keep = 0
        ctx["fragment_index"] = 0
    elif recorded is not None and recorded > size:
        log.warning(
            "%s is %d bytes but its record gives %d; downloading it again "
            "from the first fragment",
            path,
            size,
            recorded,
        )
        keep = 0
        ctx["fragment_index"] = 0

    if keep != size:
        os.truncate(path, keep)
        ctx["complete_frags_downloaded_bytes"] = keep
        _write_ytdl_file(self, ctx)
    ctx["dest_stream"] = FragmentSink(path, ctx["fragment_index"])


def _append_fragment(self: FragmentFD, ctx: dict[str, Any], content: bytes) -> None:
    sink = ctx["dest_stream"]
    if not isinstance(sink, FragmentSink):
        assert _original_append is not None, "install() checks it"
        _original_append(self, ctx, content)
        return

    # The index comes from the fragment's file name, because fragment threads
    # also set ctx["fragment_index"] (see _write_ytdl_file).
    name = ctx["fragment_filename_sanitized"]
    match = _FRAGMENT_NAME.search(name)
    index = int(match.group(1)) if match else sink.last_index + 1
    try:
        if index <= sink.last_index:
            # yt-dlp fetches an HLS init segment (EXT-X-MAP) again on every
            # resume although the file starts with it already.
            log.debug("%s: fragment %d is in the file already", sink.path, index)
            return
        sink.write(content)
        sink.last_index = index
        if ctx.get("live") is not True and not self.params.get("_no_ytdl_file"):
            _write_ytdl_file(self, ctx)
    finally:
        if not self.params.get("keep_fragments", False):
            self.try_remove(name)
        del ctx["fragment_filename_sanitized"]


def _resume_blocker(self: FragmentFD) -> str | None:
    if not isinstance(self, HlsFD):
        return None
    manifest = _hls_manifest()
    return None if manifest is None else _unsafe_resume(manifest)


def _unsafe_resume(manifest: str) -> str | None:
    """Return why yt-dlp cannot resume this HLS playlist, or None if it can.

    yt-dlp 2026.11 numbers byte ranges without an offset, and the default
    AES-128 IV (the media sequence number), only over the fragments it
    downloads, so after the skipped ones both are wrong.
    """
    for raw in manifest.splitlines():
        line = raw.strip()
        if line.startswith("#EXT-X-BYTERANGE:") and "@" not in line:
            return "its byte ranges give no offsets"
        if line.startswith("#EXT-X-KEY:") and "AES-128" in line and "IV=" not in line:
            return "it is AES-128 encrypted without an IV"
    return None


def _hls_manifest() -> str | None:
    """Return the playlist text that HlsFD.real_download is downloading, if any.

    The playlist is a local of that caller's frame, which is still running,
    so only that one name is read from it.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is HlsFD.real_download.__code__:
            manifest = frame.f_locals.get("s")
            return manifest if isinstance(manifest, str) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _recorded_bytes(self: FragmentFD, ctx: dict[str, Any]) -> int | None:
    """Return the partial file's size that vodq recorded, or None."""
    try:
        record = json.loads(Path(self.ytdl_filename(ctx["filename"])).read_text())
        value = record["downloader"][PART_BYTES_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def _write_ytdl_file(self: FragmentFD, ctx: dict[str, Any]) -> None:
    sink = ctx.get("dest_stream")
    if isinstance(sink, FragmentSink) and sink.broken:
        # The fragment was not appended: the record of the last whole one stays.
        return
    # Not ctx["fragment_index"], because with concurrent fragments yt-dlp's
    # progress hook sets it from fragment threads to the count of fragments
    # downloaded, which runs ahead of the appends.
    index = sink.last_index if isinstance(sink, FragmentSink) else ctx["fragment_index"]
    downloader: dict[str, Any] = {"current_fragment": {"index": index}}
    if "extra_state" in ctx:
        downloader["extra_state"] = ctx["extra_state"]
    if ctx.get("fragment_count") is not None:
        downloader["fragment_count"] = ctx["fragment_count"]
    # The sink is unbuffered, so the file's size counts every append.
    with contextlib.suppress(FileNotFoundError):
        downloader[PART_BYTES_KEY] = os.stat(ctx["tmpfilename"]).st_size
    record = Path(self.ytdl_filename(ctx["filename"]))
    temporary = record.with_name(f"{record.name}.{threading.get_ident()}.tmp")
    try:
        temporary.write_text(json.dumps({"downloader": downloader}))
        os.replace(temporary, record)
    finally:
        temporary.unlink(missing_ok=True)


def _download_fragment(
    self: FragmentFD, ctx: dict[str, Any], *args: Any, **kwargs: Any
) -> Any:
    """Fetch one fragment as yt-dlp does, within a slot of its download."""
    assert _original_download is not None, "install() checks it"
    slots = getattr(self.ydl, "vodq_fragment_slots", None)
    if slots is None:
        return _original_download(self, ctx, *args, **kwargs)
    with slots.fetching(int(ctx.get("fragment_index") or 0)):
        return _original_download(self, ctx, *args, **kwargs)


# yt-dlp's own steps, kept at import so that install() can run twice. None
# when this yt-dlp lacks one (see incompatibility()).
_original_prepare = getattr(FragmentFD, "_prepare_frag_download", None)
_original_append = getattr(FragmentFD, "_append_fragment", None)
_original_download = getattr(FragmentFD, "_download_fragment", None)
# The name of a fragment's file: "<partial file>-Frag<index>".
_FRAGMENT_NAME = re.compile(r"-Frag(\d+)$")
# The keys of yt-dlp's download context that the steps above share with each
# yt-dlp step they wrap, as in yt-dlp 2026.10.26 to 2026.11.23.
_CONTEXT_KEYS = {
    "_prepare_frag_download": (
        "tmpfilename",
        "dest_stream",
        "fragment_index",
        "complete_frags_downloaded_bytes",
    ),
    "_append_fragment": ("fragment_filename_sanitized", "dest_stream"),
    "_download_fragment": ("fragment_index",),
}
# Text that other yt-dlp steps must contain for the steps above to hold: the
# fragment file name that _FRAGMENT_NAME reads, and the record's index field
# that the next attempt resumes from.
_REQUIRED_TEXT = {
    "_download_fragment": ("-Frag%d",),
    "_read_ytdl_file": ("'current_fragment'", "'index'"),
}


@functools.cache
def incompatibility() -> str | None:
    """Return how this yt-dlp differs from the code the steps above replace.

    None when it matches. With a yt-dlp that differs, a resume could skip
    fragments that its partial file lacks, so vodq does not start with it.
    """
    for name in ("_write_ytdl_file", "ytdl_filename"):
        if not callable(getattr(FragmentFD, name, None)):
            return f"FragmentFD.{name} is missing"
    originals = {
        "_prepare_frag_download": _original_prepare,
        "_append_fragment": _original_append,
        "_download_fragment": _original_download,
    }
    for name, keys in _CONTEXT_KEYS.items():
        forms = [(f"'{key}'", f'"{key}"') for key in keys]
        reason = _missing_text(name, originals[name], forms)
        if reason is not None:
            return reason
    for name, texts in _REQUIRED_TEXT.items():
        # yt-dlp's own step, also once install() has replaced it.
        function = originals.get(name, getattr(FragmentFD, name, None))
        reason = _missing_text(name, function, [(text,) for text in texts])
        if reason is not None:
            return reason
    if "s" not in HlsFD.real_download.__code__.co_varnames:
        return "HlsFD.real_download no longer keeps its playlist in the local 's'"
    return None


def _missing_text(
    name: str, function: Any, wanted: Sequence[tuple[str, ...]]
) -> str | None:
    """Return what FragmentFD.``name`` lacks of ``wanted``, or None.

    Each entry of ``wanted`` lists the forms of one text, any of which will do.
    """
    if function is None:
        return f"FragmentFD.{name} is missing"
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return f"the source of FragmentFD.{name} cannot be read"
    for forms in wanted:
        if not any(form in source for form in forms):
            return f"FragmentFD.{name} no longer contains {forms[0]}"
    return None


def check_supported() -> None:
    """Raise ConfigError unless this yt-dlp matches the steps above."""
    reason = incompatibility()
    if reason is not None:
        raise ConfigError(
            f"yt-dlp {yt_dlp.version.__version__} is not supported: {reason}, "
            "so resuming an HLS download could lose data. Install a supported "
            "version, such as: pip install 'yt-dlp==2026.11.23'"
        )


def install() -> None:
    """Make every fragment download in this process use the steps above.

    Calling it again changes nothing: the originals were kept at import.
    """
    check_supported()
    FragmentFD._prepare_frag_download = _prepare_frag_download
    FragmentFD._append_fragment = _append_fragment
    FragmentFD._write_ytdl_file = _write_ytdl_file
    FragmentFD._download_fragment = _download_fragment
