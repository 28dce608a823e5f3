"""Run the ``vodq`` command with a proposed change patched in, to measure it.

Benchmarks use this to put a number on a fix before anyone changes the
product: ``python bench/variant_vodq.py serve ...`` behaves like ``vodq
serve ...`` with the changes listed in VODQ_BENCH_VARIANT (comma-separated)
applied in memory. Nothing in ``src/`` is touched. Downloads run in
children of multiprocessing's fork server, a fresh interpreter, so this
module is added to the fork server's preload and applies the same changes
there when it is imported.

* ``block=<bytes>``: READ_BLOCK_BYTES of the yt-dlp downloader.
* ``ytdlp-buffer``: no fixed block at all; yt-dlp's own buffer, which starts
  at 1 KiB and grows to 4 MiB (drops ``buffersize`` and ``noresizebuffer``).
* ``progress-delta=<s>``: yt-dlp's ``progress_delta`` option, which makes
  its own progress reporter (called after every block, even with
  ``noprogress``) skip formatting the progress line between updates.
* ``no-extractors``: build YoutubeDL with ``auto_init=False``, so it does not
  load its 1,751 extractor classes (yt-dlp 2026.11.23). This is valid only
  for URLs that vodq passes as a ready info dict (direct media files and HLS
  playlists), which are the only ones the benchmarks use.
* ``shared-ssl``: reuse one SSL context per set of options instead of
  loading the CA bundle again for every YoutubeDL.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any


def apply(variant: str) -> list[str]:
    """Apply the changes named in ``variant`` and return the names applied."""
    applied = []
    for item in filter(None, (part.strip() for part in variant.split(","))):
        name, _, value = item.partition("=")
        if name == "block":
            import vodq.download.ytdlp as ytdlp

            ytdlp.READ_BLOCK_BYTES = int(value)
        elif name == "ytdlp-buffer":
            from vodq.download.ytdlp import YtDlpDownloader

            def params(
                self: Any,
                *args: Any,
                _original: Any = YtDlpDownloader._params,
                **kwargs: Any,
            ) -> dict[str, Any]:
                result: dict[str, Any] = _original(self, *args, **kwargs)
                result.pop("buffersize", None)
                result.pop("noresizebuffer", None)
                return result

            YtDlpDownloader._params = params  # type: ignore[method-assign]
        elif name == "progress-delta":
            from vodq.download.ytdlp import YtDlpDownloader

            def with_delta(
                self: Any,
                *args: Any,
                _original: Any = YtDlpDownloader._params,
                _delta: float = float(value),
                **kwargs: Any,
            ) -> dict[str, Any]:
                result: dict[str, Any] = _original(self, *args, **kwargs)
                result["progress_delta"] = _delta
                return result

            YtDlpDownloader._params = with_delta  # type: ignore[method-assign]
        elif name == "no-extractors":
            import yt_dlp

            def no_auto_init(
                self: Any,
                params: Any = None,
                auto_init: Any = True,
                _init: Any = yt_dlp.YoutubeDL.__init__,
            ) -> None:
                _init(self, params, auto_init=False)

            yt_dlp.YoutubeDL.__init__ = no_auto_init
        elif name == "shared-ssl":
            from yt_dlp.networking import _helper, common

            cached = functools.lru_cache(maxsize=8)(_helper.make_ssl_context)
            _helper.make_ssl_context = cached
            common.make_ssl_context = cached  # type: ignore[attr-defined]
        else:
            raise SystemExit(
                f"unknown variant {item!r}; use block=BYTES, ytdlp-buffer, "
                "progress-delta=SECONDS, no-extractors or shared-ssl"
            )
        applied.append(item)
    return applied


def main() -> int:
    applied = apply(os.environ.get("VODQ_BENCH_VARIANT", ""))
    from vodq.download import process

    process.PRELOAD.append("variant_vodq")
    process._context.set_forkserver_preload(process.PRELOAD)
    print(f"vodq variant: {', '.join(applied) or 'none'}", file=sys.stderr, flush=True)
    from vodq.cli import main as vodq_main

    return vodq_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
elif os.environ.get("VODQ_BENCH_VARIANT"):
    # Imported by the fork server that the downloads are forked from.
    apply(os.environ["VODQ_BENCH_VARIANT"])
