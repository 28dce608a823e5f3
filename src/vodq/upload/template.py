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
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {
        f"{port}{n}"
        for port in ("COM", "LPT")
        for n in (*range(10), *"\u00b9\u00b2\u00b3")
    }
)
_SPACES = re.compile(r"\s+")


class TemplateError(ValueError):
    """A template names an unknown field or is not valid format text."""


def check(template: str) -> None:
    """Raise TemplateError unless ``template`` renders with the known fields.

    Conversions (``{title!r}``) and format specs (``{title:>9}``) are
    rejected: every field is text, so a spec such as ``{date:%Y}`` would fail
    only when the first VOD is archived, and a wide one could fill memory.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"{exc}; write fields as {{title}}") from exc
    for _text, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            known = ", ".join("{" + field + "}" for field in FIELDS)
            raise TemplateError(f"unknown field {{{name}}}; known fields: {known}")
        if spec or conversion:
            raise TemplateError(
                f"field {{{name}}} has a conversion or format spec; write it as "
                f"{{{name}}}"
            )
    if not any(name for _text, name, _spec, _conv in parsed):
        raise TemplateError("it uses no field, so every VOD would get the same name")


def fields(job: UploadJob) -> dict[str, str]:
    """Return the values a template can use, for one job."""
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

    Forbidden and unprintable characters become ``_``, runs of white space one
    space, and the name is cut to MAX_NAME_BYTES of UTF-8 on a character
    boundary. A name that would be empty, hidden or a reserved device name
    falls back to the VOD id, and a fallback that is itself reserved gets a
    leading ``_``.
    """
    name = _fitted(template, job)
    if not name or _is_reserved(name):
        name = _sanitise(job.vod_id) or "vod"
        if _is_reserved(name):
            name = "_" + name
    suffix = _sanitise(extension.lstrip("."))
    return f"{name}.{suffix}" if suffix else name


def _fitted(template: str, job: UploadJob) -> str:
    """Render a clean name, shortening long fields before cutting the whole name.

    The title goes first, then the channel and the source URL, so that a
    long title does not push the rest of the template, such as ``[{vod_id}]``,
    out of the name.
    """
    # Cleaned first, so that the length measured is the length that stays:
    # collapsed white space would otherwise shorten a field less than needed.
    values = {name: _clean(value) for name, value in fields(job).items()}
    for name in ("title", "channel", "source_url"):
        excess = len(_clean(template.format_map(values)).encode()) - MAX_NAME_BYTES
        if excess <= 0:
            break
        kept = max(0, len(values[name].encode("utf-8", "replace")) - excess)
        values[name] = _cut(values[name], kept)
    return _sanitise(template.format_map(values))


def _sanitise(text: str) -> str:
    """Clean ``text`` (see _clean) and cut it to MAX_NAME_BYTES."""
    return _cut(_clean(text), MAX_NAME_BYTES)


def _clean(text: str) -> str:
    """Replace what file systems reject, and trim dots and spaces."""
    name = unicodedata.normalize("NFC", text)
    name = _SPACES.sub(" ", name)
    name = "".join(
        "_" if _FORBIDDEN.match(ch) or not (ch == " " or ch.isprintable()) else ch
        for ch in name
    )
    # Windows drops trailing dots and spaces, and a leading dot hides a file
    # on Linux and macOS.
    return name.strip(" .")


def _is_reserved(name: str) -> bool:
    """Tell whether Windows takes ``name`` for a device, whatever its extension."""
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    return stem in _RESERVED


def extension_of(path: Path) -> str:
    """Return the extension of a downloaded file, without the dot."""
    return path.suffix.lstrip(".")


def _cut(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore").strip(" .")
