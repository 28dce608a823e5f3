"""Templates that name an archived file or title an uploaded video.

A template is Python ``str.format`` text over a fixed set of fields, for
example ``{date} {channel} - {title} [{vod_id}]``. Fields that a VOD lacks
render as an empty string (``channel``, ``title``) or ``undated``
(``date``), so a template never fails on a VOD with missing metadata.
"""

from __future__ import annotations

import re
import string
import unicodedata
from pathlib import Path

from vodq.upload import UploadJob

FIELDS = ("vod_id", "title", "channel", "date", "source_url")

# Longest file name that every common file system accepts is 255 bytes
# (ext4, XFS, APFS, NTFS in UTF-16 units); leave room for ".part" and the
# extension.
MAX_NAME_BYTES = 200

# Characters that Windows, macOS or Linux refuse in a file name, and the
# names Windows reserves for devices.
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{n}" for n in range(1, 10)}
    | {f"LPT{n}" for n in range(1, 10)}
)
_SPACES = re.compile(r"\s+")


class TemplateError(ValueError):
    """A template names an unknown field or is not valid format text."""


def check(template: str) -> None:
    """Raise TemplateError unless ``template`` renders with the known fields."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"{exc}; write fields as {{title}}") from exc
    for _text, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            known = ", ".join("{" + field + "}" for field in FIELDS)
            raise TemplateError(f"unknown field {{{name}}}; known fields: {known}")
    if not any(name for _text, name, _spec, _conv in parsed):
        raise TemplateError("it uses no field, so every VOD would get the same name")


def fields(job: UploadJob) -> dict[str, str]:
    """The values a template can use, for one job."""
    return {
        "vod_id": job.vod_id,
        "title": job.title or "",
        "channel": job.channel or "",
        "date": job.date.strftime("%Y-%m-%d") if job.date else "undated",
        "source_url": job.source_url,
    }


def render(template: str, job: UploadJob) -> str:
    """Fill ``template`` with ``job``'s fields; the template was checked before."""
    return template.format_map(fields(job))


def file_name(template: str, job: UploadJob, extension: str) -> str:
    """Render ``template`` into a file name that every file system accepts.

    Forbidden characters become ``_``, runs of white space one space, and the
    name is cut to MAX_NAME_BYTES of UTF-8 on a character boundary. A name
    that would be empty, hidden or a reserved device name falls back to the
    VOD id.
    """
    name = unicodedata.normalize("NFC", render(template, job))
    name = _SPACES.sub(" ", _FORBIDDEN.sub("_", name)).strip(" .")
    name = _cut(name, MAX_NAME_BYTES)
    stem = name.split(".", 1)[0].upper()
    if not name or name.startswith(".") or stem in _RESERVED:
        name = _cut(_FORBIDDEN.sub("_", job.vod_id), MAX_NAME_BYTES) or "vod"
    suffix = extension.lstrip(".")
    return f"{name}.{suffix}" if suffix else name


def extension_of(path: Path) -> str:
    """The extension of a downloaded file, without the dot."""
    return path.suffix.lstrip(".")


def _cut(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore").rstrip(" .")
