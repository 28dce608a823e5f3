"""Resume safety: a partial file is resumed only into the VOD and source it came from.

yt-dlp resumes any ``.part`` it finds under the output name with a Range
request, whatever wrote it. vodq names partial files after the VOD id, so
the danger is a VOD whose source changed: a new URL after a reprocess, or
the same URL now serving other bytes (a re-encoded recording). Appending the
rest of the new file to the start of the old one gives a corrupt file that
yt-dlp reports as a success.

So every attempt keeps a sidecar next to the partial files,
``DATA_DIR/partial/<stem>.vodq.json``. It records the VOD id and the source
URL. For a direct media URL it also records the validators of the first
response: the full size (``Content-Length`` of a 200, or the total of
``Content-Range`` of a 206), ``ETag`` and ``Last-Modified``.

Before a direct download resumes, a HEAD request reads the validators again
and ``resume_verdict`` compares them. Another VOD id, another URL, another
size, ETag or Last-Modified, or a partial file larger than the source means
that the partial files are deleted and the download starts over. When the
HEAD fails, the downloader compares the first response of the download
instead.

A partial file without a sidecar (left by a vodq that did not write one) is
resumed when it is not larger than the source, and gets a sidecar then.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIDECAR_VERSION = 1
_CONTENT_RANGE_TOTAL = re.compile(r"bytes\s+[0-9*-]+/(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class SourceValidators:
    """What identifies one version of a source file, as the server reports it."""

    size: int | None = None
    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def from_response(
        cls, status: int, headers: Mapping[str, str]
    ) -> SourceValidators | None:
        """Read the validators of a 200 or 206 response, or None for other statuses."""
        lowered = {str(key).lower(): str(value) for key, value in headers.items()}
        size: int | None = None
        if status == 206:
            match = _CONTENT_RANGE_TOTAL.search(lowered.get("content-range", ""))
            size = int(match.group(1)) if match else None
        elif status == 200:
            # A compressed body's Content-Length is not the file's size.
            if "content-encoding" not in lowered:
                size = _non_negative_int(lowered.get("content-length"))
        else:
            return None
        return cls(
            size=size,
            etag=lowered.get("etag") or None,
            last_modified=lowered.get("last-modified") or None,
        )

    def is_empty(self) -> bool:
        return self.size is None and self.etag is None and self.last_modified is None

    def changed_from(self, before: SourceValidators) -> str | None:
        """Return why ``self`` names other bytes than ``before``, or None if it may not.

        Only validators present on both sides are compared. ETags are compared
        weakly (a ``W/`` prefix is ignored), because servers add it when they
        compress, not when the file changes.
        """
        if None not in (before.size, self.size) and before.size != self.size:
            return f"its size changed from {before.size} to {self.size} bytes"
        if (
            before.etag is not None
            and self.etag is not None
            and _weak(before.etag) != _weak(self.etag)
        ):
            return f"its ETag changed from {before.etag} to {self.etag}"
        if (
            None not in (before.last_modified, self.last_modified)
            and before.last_modified != self.last_modified
        ):
            return (
                f"its Last-Modified changed from {before.last_modified} "
                f"to {self.last_modified}"
            )
        return None


@dataclass(frozen=True)
class Sidecar:
    """Record of the VOD and source that a VOD's partial files came from."""

    vod_id: str
    source_url: str
    validators: SourceValidators | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": SIDECAR_VERSION,
            "vod_id": self.vod_id,
            "source_url": self.source_url,
        }
        if self.validators is not None:
            data["size"] = self.validators.size
            data["etag"] = self.validators.etag
            data["last_modified"] = self.validators.last_modified
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sidecar:
        vod_id = data["vod_id"]
        source_url = data["source_url"]
        if not isinstance(vod_id, str) or not isinstance(source_url, str):
            raise ValueError("vod_id and source_url must be strings")
        validators = None
        if any(key in data for key in ("size", "etag", "last_modified")):
            validators = SourceValidators(
                size=_non_negative_int(data.get("size")),
                etag=_text_or_none(data.get("etag")),
                last_modified=_text_or_none(data.get("last_modified")),
            )
        return cls(vod_id=vod_id, source_url=source_url, validators=validators)


def read_sidecar(path: Path) -> Sidecar | None:
    """Read a sidecar, or return None when it is missing, unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        return Sidecar.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_sidecar(path: Path, sidecar: Sidecar) -> None:
    """Write ``sidecar`` to ``path`` atomically, raising OSError (ENOSPC too)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(
        json.dumps(sidecar.to_json(), sort_keys=True) + "\n", encoding="utf-8"
    )
    os.replace(temporary, path)


def resume_verdict(
    sidecar: Sidecar | None,
    *,
    vod_id: str,
    source_url: str,
    current: SourceValidators | None,
    partial_size: int,
) -> str | None:
    """Return why the partial files must not be resumed, or None when they may be.

    ``current`` contains the validators the source shows now (None when they
    could not be read, or for sources that have none, such as HLS), and
    ``partial_size`` the size of the ``.part`` file.
    """
    if sidecar is not None:
        if sidecar.vod_id != vod_id:
            return f"they were written for VOD {sidecar.vod_id!r}"
        if sidecar.source_url != source_url:
            return (
                f"they came from {sidecar.source_url}, "
                f"and the VOD's source is now {source_url}"
            )
        if sidecar.validators is not None and current is not None:
            changed = current.changed_from(sidecar.validators)
            if changed is not None:
                return f"the source changed since they were written: {changed}"
    if current is not None and current.size is not None and partial_size > current.size:
        return (
            f"the partial file has {partial_size} bytes, more than the "
            f"{current.size} of the source"
        )
    return None


def _weak(etag: str) -> str:
    return etag.strip().removeprefix("W/")


def _non_negative_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
