"""The yt-dlp downloader: the library, one attempt per call, with its guards.

Why the library and not the command line: it streams plain HTTP at close to
curl's speed, where the command line pays about 0.6 s of start-up per job and
a third of the throughput. Every response it reads passes through our
``urlopen``, so a token bucket charged after each read keeps a rate that can
change while the download runs. Its progress hook runs on the reading
thread, so raising from the hook stops the download at the next block.

The service runs each call in a child process of its own (process.py),
which it kills with its whole process group when a cancel is not honoured in
time or no byte arrives for DOWNLOAD_STALL_TIMEOUT. Inside the child:

- A silent server (headers and some bytes, then nothing; or no answer at
  all) is bounded by yt-dlp's ``socket_timeout``, which the service sets to
  ``min(DOWNLOAD_SOCKET_TIMEOUT, DOWNLOAD_STALL_TIMEOUT)``: every connect and
  every read fails after that long without data, and the attempt ends as
  ``transient`` with "download stalled" in its message. The next attempt
  resumes from the partial file.
- A cancel is seen at the next progress hook, after the next block of
  READ_BLOCK_BYTES; a hung extractor, which never reaches a hook, is ended
  by the service killing the child.

Each attempt also guards the result: a partial file is resumed only into the
VOD and source it came from (validators.py); an HLS download that skipped a
fragment, or a file whose size differs from the one the source announced, is
discarded instead of being archived.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yt_dlp
from yt_dlp.downloader import get_suitable_downloader
from yt_dlp.downloader.fragment import FragmentFD
from yt_dlp.extractor.generic import GenericIE
from yt_dlp.networking import Request, Response
from yt_dlp.networking.exceptions import HTTPError, RequestError
from yt_dlp.utils import YoutubeDLError

from vodq.bandwidth import TokenBucket
from vodq.download import DownloadJob, DownloadResult, connections, fragments
from vodq.download.classify import HttpErrorSeen, classify
from vodq.download.connections import (
    BUFFERED_ROUND_TRIPS,
    FRAGMENT_BUFFER_S,
    MAX_RECEIVE_BUFFER_BYTES,
    RECEIVE_BUFFER_S,
    connect_buffer,
    is_closed,
    offered_window,
    queued_bytes,
    receive_buffer_for,
    resize_receive_buffer,
    round_trip,
    segment_size,
    sized_receive_buffers,
    socket_of,
)
from vodq.download.files import ArchiveLayout, SizeMismatch
from vodq.download.slots import FragmentSlots
from vodq.download.validators import (
    Sidecar,
    SourceValidators,
    read_sidecar,
    resume_verdict,
    write_sidecar,
)
from vodq.errors import DownloadCancelled, DownloadFailed
from vodq.models import Progress

log = logging.getLogger(__name__)

# URL path endings that name a media file or an HLS playlist directly. For a
# media file yt-dlp gets a ready info dict instead of running the generic
# extractor, whose probe GET would fetch the start of the file a second time.
# A playlist goes through the generic extractor alone, which reads it once.
DIRECT_MEDIA_EXTENSIONS = frozenset({"mp4", "m4v", "mkv", "webm", "mov", "flv", "ts"})
HLS_EXTENSIONS = frozenset({"m3u8"})

# Most bytes yt-dlp reads per block. Fixed (not grown up to 4 MiB, yt-dlp's
# default) so the token bucket is consulted often enough to hold a rate.
READ_BLOCK_BYTES = 131_072

# A download under a rate limit reads blocks of at most this share of a
# second at the rate in force, and at least MIN_READ_BLOCK_BYTES. At 500K a
# 128 KiB block is a quarter of a second of data, so a 5 s window would show
# the rate only to within about 5%. The size follows the rate while the
# download runs (see _MeteredRead).
READ_BLOCK_SHARE_S = 0.025
MIN_READ_BLOCK_BYTES = 4096

# A connection whose rate falls below this part of the rate it started at
# gets a receive buffer sized to the rate (see _MeteredRead). A smaller cut
# leaves it, because the bytes it takes ahead are paid within a window. At
# a half, the first of three pooled downloads at 500K was resized as the
# others joined, and its 5 s windows strayed up to 5.3%.
RESIZE_BELOW = 0.25


# A plain HTTP connection whose rate is at most this, in bytes per second,
# gets a receive buffer sized to the rate before it connects. One whose rate
# falls this low later gets it at its next read. Either way it is charged
# for the bytes that reach its queue (``_MeteredRead._arrivals``).
# With the kernel's autotuned buffer the source sends in bursts of half the
# buffer, because Linux offers the window again when half of it is free:
# 112 to 128 KiB at 167 KB/s, about 208 KiB at 64K. Three downloads pooled
# at 500K then had 5 s windows up to 6.6% off, and sized within 2.1% in 3
# runs. One download at 64K, measured at the client against a server with
# the kernel's own send buffer (bench/cut_wire.py --from 64K --to 64K), had
# windows of -19.5% to +17.5%, and sized within 1.6%. Above this rate a
# burst is a small part of a window. The window is clamped as after a cut
# (see resize_receive_buffer).
PLAIN_SIZED_MAX_RATE = 262_144.0
# Such a connection is watched for its source as well (see SOURCE_HELD_S)
# when its sized buffer has room for at least this many of its segments. A
# smaller buffer gets bytes only at the sender's window probes, so its
# reads wait about 0.2 s for fast sources too: watched, a download lowered
# to 128K on 127.0.0.1 (64 KiB segments) lost its store and ran at 60K.
# Over a path with segments of 1448 bytes every buffer in the band has
# room enough.
SEGMENTS_WATCHED = 2

# Seconds after a cut during which the bytes that arrive before the buffer
# has shrunk are read free. Without a bound, a source slower than the old
# rate would get the buffer's room free at its own pace. The benchmark
# server on 127.0.0.1 filled it within 0.5 s, and a sender with data fills
# it within about one round trip.
INVITED_S = 1.0

# A read that waited this long, in seconds, for its block found the kernel's
# queue empty: its source sent nothing meanwhile (a pause). Reads of a
# download held to its rate return at once, from a full queue. Shorter
# waits are left alone: a buffer sized to 128K on 127.0.0.1 made reads wait
# about 0.4 s at a time, and dropping the tokens of those waits at 0.2 s
# halved the download's rate.
# NOTE: a pause shorter than this and the time the reads take to empty the
# queue still ends in a burst (+6.9% in the window from a 0.5 s pause).
STALL_S = 0.5
# A plain connection under a limit whose reads waited for the source for at
# least SOURCE_HELD_SHARE of SOURCE_HELD_S seconds is held back by its
# source, and its buffer is then sized to the rate as after a stall. A
# download held to its rate reads from a full queue and waits for tokens
# instead. Left to autotuning, the buffer of a source at 60% of its share
# grew from 128 KiB to 780 KiB the moment the source turned fast, and the
# source filled it at once. A pool of two at 1M on a cluster then ran +20%
# in the window that held the change.
# A single read that waited HELD_GAP_S seconds or more marks it as well,
# because a source that sends in bursts leaves gaps, and an autotuned
# buffer takes the start of each burst at once. A source sending 98% of a
# 500K limit in one burst every 2 s was read at the limit. Yet the server
# sent 2.56 times the limit into the buffer in the first 0.25 s of each
# burst, and its 5 s windows ran up to +3.7% (+4.96% sliding by 0.05 s).
# Marked at its first gap, the same source stays within +0.5% at 500K, 1M
# and 10M.
# Its bytes are then charged as they arrive (``_MeteredRead._arrivals``),
# because the sized buffer still refills at once at each burst.
# NOTE: a connection sized for its low rate (PLAIN_SIZED_MAX_RATE) whose
# buffer has room for fewer than SEGMENTS_WATCHED segments is not watched,
# so it keeps its full store. On 127.0.0.1 that is every such connection: a
# pool of two at 500K whose sources send in bursts ran up to +5.9%, and
# one download at 128K up to +10.6%.
# NOTE: a reader starved of CPU waits as well, and a lost packet makes a
# read wait a retransmission timeout (at least 0.2 s on Linux), so a fast
# source can be taken for a slow one. Outside the pool its bucket then
# keeps only HELD_BURST_S to catch up after a stall.
SOURCE_HELD_S = 1.0
SOURCE_HELD_SHARE = 0.5
HELD_GAP_S = 0.1
# Once such a connection is found, a read that waited at least HELD_WAIT_S
# seconds for its bytes leaves the bucket at most HELD_BURST_S seconds of
# the rate. A full store (bandwidth.BURST_S) went out at once when the
# source turned fast: the 5 s after a rise to full speed from half of a 1M
# limit ran +5.0%, and +1.25% with the smaller store. A pooled download
# keeps a small store as well. Three pooled sources sending 98% of their
# shares in bursts every 3 s spent their full stores at each burst. The
# pool of 1M ran up to +4.37% in 5 s windows sliding by 0.05 s, and
# +1.88% to +3.44% with small stores. A source turning fast in a pool of
# two ran +0.86% to +1.25% (+2.5% to +3.4% with full stores), and on a
# cluster +4.92% to +6.88% (+5.3% to +7.0%).
HELD_WAIT_S = 0.01
HELD_BURST_S = 0.05
# Seconds after such a stall in which a fragment connection is charged for
# the growth of its receive queue (``_MeteredRead._refill``), and the part
# of that growth charged.
REFILL_S = 0.5
REFILL_SHARE = 0.5


def read_block_for(rate: float | None) -> int:
    """Return the read block for a download limited to ``rate`` bytes/s now."""
    if rate is None:
        return READ_BLOCK_BYTES
    block = int(rate * READ_BLOCK_SHARE_S) // 4096 * 4096
    return max(MIN_READ_BLOCK_BYTES, min(READ_BLOCK_BYTES, block))


# HLS fragments downloaded at once unless HLS_CONCURRENT_FRAGMENTS sets
# another number. The fragment threads share one token bucket, so the rate
# holds for any number, and fragments.py keeps their appends safe to resume.
HLS_CONCURRENT_FRAGMENTS = 4

# HEAD statuses that mean the server does not support HEAD, not that the URL fails.
_HEAD_UNSUPPORTED = frozenset({405, 501})


class SourceKind(Enum):
    """How a VOD's URL is downloaded, which decides what can be checked."""

    FILE = "file"  # a direct media URL: HEAD validators and a known size
    HLS = "hls"  # an HLS playlist: no size, fragments checked instead
    EXTRACTED = "extracted"  # a page that yt-dlp's extractors resolve


def source_kind(url: str) -> SourceKind:
    extension = PurePosixPath(urlsplit(url).path).suffix.lower().lstrip(".")
    if extension in DIRECT_MEDIA_EXTENSIONS:
        return SourceKind.FILE
    if extension in HLS_EXTENSIONS:
        return SourceKind.HLS
    return SourceKind.EXTRACTED


class _YtDlpLog:
    """Route yt-dlp's messages to our logger; its errors reach us as exceptions."""

    def __init__(self, vod_id: str) -> None:
        self.extra = {"vod_id": vod_id, "action": "yt-dlp"}
        self.skipped_fragments: list[str] = []

    def debug(self, message: str) -> None:
        # yt-dlp reports a skipped HLS fragment on its "screen" channel, which
        # reaches a logger as debug.
        if "Skipping fragment" in message:
            self.skipped_fragments.append(message.strip())
            log.warning("yt-dlp: %s", message.strip(), extra=self.extra)
            return
        log.debug("%s", message, extra=self.extra)

    def info(self, message: str) -> None:
        log.debug("%s", message, extra=self.extra)

    def warning(self, message: str) -> None:
        log.warning("yt-dlp: %s", message, extra=self.extra)

    def error(self, message: str) -> None:
        log.debug("%s", message, extra=self.extra)


class _Hook:
    """The progress hook: report progress and stop on cancel."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
    ) -> None:
        self.on_progress = on_progress
        self.cancelled = cancelled
        self.lock = threading.Lock()

    def __call__(self, status: dict[str, Any]) -> None:
        if self.cancelled.is_set():
            raise DownloadCancelled("download cancelled")

        # HLS calls this from fragment threads with one shared dict, so read
        # it once under the lock.
        with self.lock:
            done = int(status.get("downloaded_bytes") or 0)
            total = status.get("total_bytes") or status.get("total_bytes_estimate")
            speed = status.get("speed")

        self.on_progress(
            Progress(
                bytes_done=done,
                bytes_total=int(total) if total else None,
                speed_bps=int(speed) if speed else None,
            )
        )
        if self.cancelled.is_set():
            raise DownloadCancelled("download cancelled")


class _Watch:
    """Errors and source validators from the HTTP responses of one attempt.

    ``urlopen`` of every request yt-dlp makes (extractor pages, the media
    file, HLS playlists and fragments) passes through ``_WatchedYoutubeDL``,
    which calls ``error`` and ``response`` from the download thread (or an
    HLS fragment thread, hence the lock).
    """

    def __init__(
        self,
        *,
        track_validators: bool,
        bucket: TokenBucket | None = None,
        cancelled: threading.Event | None = None,
        hls_fragments: int = HLS_CONCURRENT_FRAGMENTS,
    ) -> None:
        self.track_validators = track_validators
        self.lock = threading.Lock()
        self.last_error: HttpErrorSeen | None = None
        self.errors: list[HTTPError] = []
        self.first_validators: SourceValidators | None = None
        self.on_first_validators: Callable[[SourceValidators], None] | None = None
        # The bucket that every response's reads are charged to; None leaves
        # yt-dlp's reads as they are.
        self.bucket = bucket
        self.cancelled = cancelled
        self.slots = FragmentSlots(
            hls_fragments, lambda: self.bucket.rate if self.bucket else None, cancelled
        )
        # Whether yt-dlp downloads the media as fragments (HLS, DASH), and
        # whether it has started to (extractor requests come before).
        self.fragmented = False
        self.downloading = False
        # The metered reads of the responses still referenced.
        self.reads: weakref.WeakSet[_MeteredRead] = weakref.WeakSet()
        # The smoothed round trip, in seconds, of the latest response's
        # connection; 0.0 until one is known.
        self.round_trip_s = 0.0

    def read_block(self) -> int:
        """Return the read size in bytes for the rate in force now.

        A fragment's is scaled by its weight (``FragmentSlots.weight``): the
        fragment threads read a block each in turn from one bucket, so their
        blocks set their parts of the rate.
        """
        rate = self.bucket.rate if self.bucket else None
        block = read_block_for(rate)
        if self.fragmented and rate is not None:
            block = min(READ_BLOCK_BYTES, int(block * self.slots.weight()))
        return block

    def note_round_trip(self, sock: socket.socket | None) -> None:
        """Record the round trip of ``sock``, a new response's connection, for
        the buffers of the connections opened or resized from now on."""
        seconds = round_trip(sock)
        if seconds is not None:
            self.round_trip_s = seconds

    def buffer_seconds(self) -> float:
        """Return the seconds of its part of the rate that a sized connection's
        receive buffer has room for: FRAGMENT_BUFFER_S for a fragment's,
        RECEIVE_BUFFER_S for a plain file's, or BUFFERED_ROUND_TRIPS round
        trips if that is more."""
        base = FRAGMENT_BUFFER_S if self.fragmented else RECEIVE_BUFFER_S
        return max(base, BUFFERED_ROUND_TRIPS * self.round_trip_s)

    def charge(self, nbytes: int, read_rate: float | None) -> None:
        """Charge ``nbytes``, read while ``read_rate`` was in force, to the
        bucket, waiting while it is in debt."""
        if self.bucket is not None:
            cost = self.bucket.read_cost(nbytes, read_rate)
            self.bucket.consume(cost, self.cancelled)

    def receive_buffer(self) -> int | None:
        """Return the receive buffer in bytes of a connection opened now, or
        None for the kernel's autotuned one.

        A fragment connection gets its share of the rate. So does the plain
        file's connection at a rate of at most PLAIN_SIZED_MAX_RATE: with an
        autotuned buffer its first window took about 2 s of a 64K limit.
        """
        if self.bucket is None or self.bucket.rate is None:
            return None

        rate = self.bucket.rate
        if self.fragmented or (self.downloading and rate <= PLAIN_SIZED_MAX_RATE):
            return self.receive_buffer_at(rate)
        return None

    def receive_buffer_at(self, rate: float | None) -> int:
        """Return the receive buffer in bytes of one connection of this
        download at ``rate``: a fragment connection's, or the plain file's,
        and the largest for no limit."""
        connections = self.slots.capacity_at(rate) if self.fragmented else 1
        size = receive_buffer_for(rate, connections, self.buffer_seconds())
        return size or MAX_RECEIVE_BUFFER_BYTES

    def track(self, read: _MeteredRead) -> None:
        """Resize the connection of ``read`` at every rate change from now on."""
        with self.lock:
            self.reads.add(read)

    def forget(self, read: _MeteredRead) -> None:
        """Stop resizing the connection of ``read``, whose body has ended."""
        with self.lock:
            self.reads.discard(read)

    def follow_rate(self) -> None:
        """Resize the receive buffers of the open connections that a rate cut
        left too large, and let waiting fragments see the new rate; called
        when the rate changes."""
        self.slots.wake()
        with self.lock:
            reads = list(self.reads)
        for read in reads:
            if read.closed:
                # A body that ended without a last empty read, whose object
                # the garbage collector has not taken yet.
                self.forget(read)
            else:
                read.follow_rate()

    def error(self, err: HTTPError) -> None:
        response = err.response
        seen = HttpErrorSeen(
            status=int(err.status),
            reason=str(err.reason or ""),
            url=str(getattr(response, "url", "") or ""),
            headers=dict(getattr(response, "headers", {}) or {}),
        )
        with self.lock:
            self.last_error = seen
            self.errors.append(err)

    def close(self) -> None:
        """Close the responses of the HTTP errors seen.

        yt-dlp's retry manager drops a 5xx response without closing it, and
        an extractor may still read an error body, so they are closed only
        when the attempt is over.
        """
        with self.lock:
            errors, self.errors = self.errors, []
        for err in errors:
            _close(err.response)

    def response(self, request: Request, response: Any) -> None:
        if not self.track_validators or request.method != "GET":
            return
        validators = SourceValidators.from_response(
            int(getattr(response, "status", 0) or 0),
            dict(getattr(response, "headers", {}) or {}),
        )
        if validators is None:
            return
        with self.lock:
            if self.first_validators is not None:
                return
            self.first_validators = validators
            callback = self.on_first_validators
        if callback is not None:
            callback(validators)


class _WatchedYoutubeDL(yt_dlp.YoutubeDL):  # type: ignore[misc]
    """YoutubeDL whose requests report to a _Watch."""

    def __init__(
        self, params: dict[str, Any], watch: _Watch, *, extractors: bool = True
    ) -> None:
        self.vodq_watch = watch
        # Read by the fragment steps that fragments.install puts in place.
        self.vodq_fragment_slots = watch.slots
        # Loading the ~1,800 extractors costs about half a second per
        # YoutubeDL (yt-dlp 2026.11, measured on 2 cores); a ready info dict
        # for a direct file or playlist needs none of them.
        super().__init__(params, auto_init=extractors)

    def dl(self, name: str, info: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        downloader = get_suitable_downloader(info, self.params, to_stdout=name == "-")
        self.vodq_watch.fragmented = isinstance(downloader, type) and issubclass(
            downloader, FragmentFD
        )
        self.vodq_watch.downloading = True
        return super().dl(name, info, *args, **kwargs)

    def urlopen(self, req: Any) -> Any:
        request = Request(req) if isinstance(req, str) else req
        try:
            response = super().urlopen(request)
        except HTTPError as err:
            self.vodq_watch.error(err)
            raise
        if isinstance(request, Request):
            self.vodq_watch.response(request, response)
        sock = socket_of(response)
        self.vodq_watch.note_round_trip(sock)
        if self.vodq_watch.bucket is not None and isinstance(response, Response):
            metered = _MeteredRead(response.read, sock, self.vodq_watch)
            response.read = metered
            self.vodq_watch.track(metered)
        return response


class _MeteredRead:
    """A response's ``read`` that charges the bucket for the bytes read.

    Each read is at most one block of the rate in force: yt-dlp fixes its
    read size when a transfer starts, so a limit that falls later (a lower
    PATCH, or a pool shared by more downloads) would be met only in blocks
    of many seconds. A read of everything (a playlist, a page) stays whole.

    A connection whose rate falls below RESIZE_BELOW of its reference rate
    (the rate at its start or last such cut, or any higher rate since) gets a
    receive buffer sized to the new rate (``follow_rate``). The first bytes
    read after that cut are free: the kernel's queue at the cut, then what
    arrives until the buffer has its new size, within INVITED_S. Both were
    invited at the old rate. Charged at the new rate, they took seconds while
    the network carried nothing: after a cut from 10M to 500K, HLS ran 70% to
    80% short for the next 5 s. The smaller buffer stops the queue from
    growing to the old size, which would be read at the new rate in the same
    way.

    A read that waited STALL_S for its source (a pause) drops the tokens
    that accrued meanwhile and limits the burst of its connection's refill
    (``_stall``). A plain connection whose buffer is sized to the rate is
    charged for the bytes that reach its queue, not for those read
    (``_arrivals``).
    """

    def __init__(
        self,
        read: Callable[[int | None], bytes],
        sock: socket.socket | None,
        watch: _Watch,
    ) -> None:
        self._read = read
        self._sock = sock
        self._watch = watch
        # The rate a cut is measured against, in bytes per second: the rate
        # at the connection's start or at the last cut, or any higher rate
        # since. None while there is no limit.
        self._reference = watch.bucket.rate if watch.bucket else None
        # Since a cut: the bytes the kernel held at the cut, the window the
        # connection had offered then, and the bytes read and charged since.
        self._queued_at_cut: int | None = None
        self._window_at_cut = 0
        # At most this many bytes that arrive after the cut are read free.
        self._invited = 0
        self._cut_at = 0.0
        self._read_since = 0
        self._charged_since = 0
        # Whether what was queued or invited at the last snapshot is read free.
        self._reads_free = True
        # The buffer size, in bytes, that the socket has reached since the
        # last resize; None while the queue still holds it above that.
        self._resized_to: int | None = None
        # Whether the next resize is the first since the cut, which may grow
        # the buffer to hold what the connection was offered.
        self._grow = False
        # Whether a read waited STALL_S, after which a plain connection's
        # buffer is sized to the rate (``follow_rate``).
        self._stalled = False
        # When (time.monotonic()) the current span of a plain connection
        # under a limit began, from its first bytes on, and the seconds its
        # reads waited for the source in it. Once found held back by its
        # source, the connection gets a buffer sized to the rate.
        self._watched_from: float | None = None
        self._waited_s = 0.0
        self._source_held = False
        # Once a plain connection's buffer is sized to the rate, it is
        # charged for the bytes that arrive, not for those read
        # (``_arrivals``). These count the bytes read since then, and the
        # bytes charged since then, which is the maximum that were read and
        # queued at one time. None while reads are charged.
        self._arrival_read = 0
        self._arrival_paid: int | None = None
        # Whether a connection sized before it was found held back (at most
        # PLAIN_SIZED_MAX_RATE, or after a stall) is watched for its source
        # all the same (``_holds_segments``).
        self._band_watched = False
        # Until this time.monotonic(), after a stall of a fragment, the
        # growth of the kernel's queue past ``_refilled`` bytes is charged.
        self._refill_until = 0.0
        self._refilled = 0
        if watch.fragmented and self._reference is not None:
            opened = connect_buffer(sock)
            size = watch.receive_buffer_at(self._reference)
            if opened is None or opened * RESIZE_BELOW > size:
                # Opened before a cut that follow_rate did not reach, and
                # whose old buffer took 128 KiB bursts at 100K: cut it now.
                self._start_cut()
                self.follow_rate()

    def __call__(self, amt: int | None = None) -> bytes:
        read_rate = self._watch.bucket.rate if self._watch.bucket else None
        started = time.monotonic()
        if amt is None or amt < 0:
            data = self._read(amt)
        else:
            data = self._read(min(amt, self._watch.read_block()))
        waited = time.monotonic() - started

        charge = len(data)
        if self._queued_at_cut is not None:
            self._read_since += len(data)
        free = self._queued_at_cut is not None and self._reads_free
        if free:
            charge = self._charge_after_cut()
        if data and amt is not None and amt >= 0 and waited >= STALL_S:
            self._stall(waited)
        if (
            data
            and read_rate is not None
            and (self._queued_at_cut is None or (not free and self._band_watched))
        ):
            self._note_wait(waited)
        if data and self._arrival_paid is not None and not free:
            charge = self._arrivals(len(data))
        elif data and time.monotonic() < self._refill_until:
            charge += self._refill()
        if data and self._source_held:
            self._trim_store(waited)
        if charge:
            self._watch.charge(charge, read_rate)
        if data:
            self.follow_rate()
        elif amt != 0:
            # The end of the body: nothing is left to resize.
            self._watch.forget(self)
        return data

    def _charge_after_cut(self) -> int:
        """Return the bytes to charge for a read after a cut: none of the
        queue at the cut, nor of what the window offered before it brought."""
        assert self._queued_at_cut is not None, "only called after a cut"
        arrived = self._arrived_since()
        if time.monotonic() - self._cut_at > INVITED_S:
            # Bytes that come later were sent at the source's pace, so the
            # window stops growing the free part.
            self._invited = min(self._invited, arrived)
        in_window = min(self._invited, arrived)
        due = self._read_since - self._queued_at_cut
        if self._arrival_paid is not None:
            # Charged as they arrive, so the queue at the cut was paid.
            due = arrived
        charge = max(0, due - in_window - self._charged_since)
        self._charged_since += charge
        return charge

    @property
    def closed(self) -> bool:
        """Whether the connection is closed, so that nothing is left to resize."""
        return is_closed(self._sock)

    def follow_rate(self) -> None:
        """Resize the receive buffer to the rate once it falls below
        RESIZE_BELOW of the reference rate, and again at each call until the
        buffer has that size.

        A limit on a connection opened without one counts as such a cut.
        Each cut takes a fresh snapshot (``_start_cut``), so a second cut
        after a raise leaves room for the window the raise offered.
        """
        rate = self._watch.bucket.rate if self._watch.bucket else None
        if rate is None:
            self._reference = None
        elif self._reference is None or rate < RESIZE_BELOW * self._reference:
            # A connection opened without a limit counts as cut by any.
            self._start_cut()
            self._reference = rate
        else:
            self._reference = max(self._reference, rate)
        if self._queued_at_cut is None:
            if self._watch.fragmented or rate is None:
                return
            sized = rate <= PLAIN_SIZED_MAX_RATE
            if not (sized or self._stalled or self._source_held):
                return
            self._start_cut(free=False)
            self._charge_arrivals()
            self._band_watched = self._holds_segments(rate)

        # Once the buffer has the size, reads skip the system calls.
        size = self._watch.receive_buffer_at(rate)
        if size == self._resized_to:
            return
        room = max(0, self._window_at_cut - self._arrived_since())
        reached = resize_receive_buffer(self._sock, size, room, grow=self._grow)
        self._grow = False
        self._resized_to = size if reached else None
        if reached:
            # From now on the buffer's size bounds what arrives.
            self._invited = min(self._invited, self._arrived_since())

    def _note_wait(self, waited: float) -> None:
        """Count ``waited`` seconds of a plain connection's read, and mark the
        connection held back by its source once its reads waited at least
        SOURCE_HELD_SHARE of SOURCE_HELD_S, or once one read waited HELD_GAP_S."""
        if self._watch.fragmented or self._source_held:
            return
        now = time.monotonic()
        if self._watched_from is None:
            # The first read waits for the response's first bytes, which a
            # fast source may send late.
            self._watched_from = now
            return
        self._waited_s += waited
        span = now - self._watched_from
        if span < SOURCE_HELD_S and waited < HELD_GAP_S:
            return
        if self._waited_s >= SOURCE_HELD_SHARE * span or waited >= HELD_GAP_S:
            # From now on its bytes are charged as they arrive, the queue
            # now included: the sized buffer refills at once at each burst,
            # and when the source turns fast.
            self._source_held = True
            self._charge_arrivals()
        self._watched_from = now
        self._waited_s = 0.0

    def _trim_store(self, waited: float) -> None:
        """Leave the bucket HELD_BURST_S of its rate after a read that waited
        ``waited`` seconds for a source found holding the connection back."""
        bucket = self._watch.bucket
        if bucket is not None and waited >= HELD_WAIT_S:
            bucket.keep_at_most(HELD_BURST_S)

    def _stall(self, waited: float) -> None:
        """Note a read that waited ``waited`` seconds for its source.

        The tokens that accrued meanwhile are dropped: the source left them
        unused, and spent at its resume they add a burst to the refill of
        the receive queue. A plain connection's buffer is then sized to the
        rate, as after a cut (``follow_rate``): after a stall the kernel grew
        an autotuned buffer for seconds, and the source filled the growth. A
        fragment connection's buffer is sized already, and part of its
        refill is charged as it arrives (``_refill``).
        """
        if self._watch.bucket is not None:
            self._watch.bucket.forfeit(waited)
        self._stalled = True
        if self._watch.fragmented:
            self._refill_until = time.monotonic() + REFILL_S
            self._refilled = 0

    def _holds_segments(self, rate: float) -> bool:
        """Return whether a buffer sized to ``rate`` has room for
        SEGMENTS_WATCHED of the connection's segments, so that its reads wait
        only for the source."""
        segment = segment_size(self._sock)
        size = self._watch.receive_buffer_at(rate)
        return segment is not None and size >= SEGMENTS_WATCHED * segment

    def _charge_arrivals(self) -> None:
        """Charge the bytes that arrive from now on instead of those read.
        The bytes queued now were not charged, so they count as arrived."""
        if self._arrival_paid is None:
            self._arrival_read = 0
            self._arrival_paid = 0

    def _arrivals(self, nbytes: int) -> int:
        """Return the bytes that arrived since the last read: the ``nbytes``
        this read took, and the growth of the kernel's queue.

        The queue takes a burst of the source at once, uncharged while its
        bytes wait to be read. A sized buffer contains about 0.4 s of the
        rate on 127.0.0.1, because Linux doubles its size. While its refills
        were charged only as they were read, a source sending 98% of a 500K
        limit in a burst every 3 s ran +5.4% in 5 s windows.
        """
        assert self._arrival_paid is not None, "only once arrivals are charged"
        self._arrival_read += nbytes
        # http.client reads through a buffer of its own, which may hold
        # bytes that left the kernel's queue unread. Counting them only once
        # read keeps the charge from exceeding what arrived.
        seen = self._arrival_read + queued_bytes(self._sock)
        arrived = max(0, seen - self._arrival_paid)
        self._arrival_paid = max(self._arrival_paid, seen)
        return arrived

    def _refill(self) -> int:
        """Return the bytes to charge for the receive queue's growth since
        the last read, while the sender refills it after a stall.

        The refill arrives at once, before any read, so a window that starts
        at the resume contains it. Charged in full, it is made up for by a
        gap in the next window instead. Charging REFILL_SHARE of it splits
        the error between the two: with three pooled HLS downloads at 1M,
        whose twelve connections refilled about 0.6 MB, the windows around
        the resume went from up to +12.5% to within +3.8% and -6.6%.
        """
        queued = queued_bytes(self._sock)
        grown = max(0, queued - self._refilled)
        self._refilled = max(self._refilled, queued)
        return int(grown * REFILL_SHARE)

    def _start_cut(self, free: bool = True) -> None:
        """Record the queue and the offered window at a cut: the buffer
        shrinks from them, and the free reads are counted from them.

        ``free`` False sizes a plain connection up to PLAIN_SIZED_MAX_RATE: its
        bytes came at the rate in force, so none is read free.
        """
        self._reads_free = free
        self._queued_at_cut = queued_bytes(self._sock)
        self._window_at_cut = offered_window(self._sock)
        # The buffer keeps memory for that window, and the server fills the
        # memory, not the window: what arrives until the buffer has its
        # size, or for INVITED_S, was invited before the cut. That is at
        # most the memory of the largest buffer set here (Linux doubles it).
        self._invited = MAX_RECEIVE_BUFFER_BYTES * 2
        self._cut_at = time.monotonic()
        self._read_since = 0
        self._charged_since = 0
        self._resized_to = None
        self._grow = True

    def _arrived_since(self) -> int:
        """Return the bytes that arrived since the cut: read, or queued now."""
        assert self._queued_at_cut is not None, "only called after a cut"
        queued = queued_bytes(self._sock)
        return max(0, self._read_since + queued - self._queued_at_cut)


def close_responses(exc: BaseException) -> None:
    """Close HTTP responses held by ``exc`` and its causes.

    yt-dlp's HTTPError keeps the response (and its socket) open; the error
    outlives the attempt in our exception chain, so the socket would stay
    open until garbage collection.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        response = getattr(current, "response", None)
        close = getattr(response, "close", None)
        if callable(close):
            close()
        exc_info = getattr(current, "exc_info", None)
        if isinstance(exc_info, tuple) and len(exc_info) > 1:
            inner = exc_info[1]
            pending.append(inner if isinstance(inner, BaseException) else None)
        cause = getattr(current, "cause", None)
        pending.append(cause if isinstance(cause, BaseException) else None)
        pending.extend([current.__cause__, current.__context__])


def close_leftovers(exc: BaseException) -> None:
    """Close what yt-dlp's frames left open when ``exc`` went through them.

    When an HLS fragment fails for good, yt-dlp 2026.11 raises past the
    ``.part`` file it appends to (``ctx["dest_stream"]``) and past the
    playlist's response without closing either, and a cancel from the
    progress hook leaves the media response open (``ctx["data"]``), so the
    server keeps sending until the garbage collector runs. Those frames have
    ended and their locals live on only in the traceback, so closing them is
    safe. Only yt-dlp's frames are read: reading ``f_locals`` of a frame that
    still runs would keep its locals, ``exc`` among them, in a reference
    cycle.
    """
    for error in _exceptions(exc):
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if str(frame.f_globals.get("__name__", "")).startswith("yt_dlp."):
                for value in frame.f_locals.values():
                    if isinstance(value, dict):
                        _close(value.get("dest_stream"))
                        if isinstance(value.get("data"), Response):
                            _close(value["data"])
                    elif isinstance(value, Response):
                        _close(value)
            tb = tb.tb_next


def _close(thing: object) -> None:
    close = getattr(thing, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def _exceptions(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    pending: list[object] = [exc]
    while pending and len(found) < 20:
        current = pending.pop()
        if not isinstance(current, BaseException) or current in found:
            continue
        found.append(current)
        exc_info = getattr(current, "exc_info", None)
        if isinstance(exc_info, tuple) and len(exc_info) > 1:
            pending.append(exc_info[1])
        pending.extend([current.__cause__, current.__context__])
    return found


def direct_info(job: DownloadJob) -> dict[str, Any] | None:
    """Return a ready info dict when the URL names a media file itself."""
    kind = source_kind(job.source_url)
    if kind is SourceKind.FILE:
        extension = PurePosixPath(urlsplit(job.source_url).path).suffix.lower()
        return {
            "id": job.vod_id,
            "title": job.vod_id,
            "url": job.source_url,
            "ext": extension.lstrip("."),
        }
    return None


@dataclass(frozen=True)
class YtDlpEngine:
    """The settings from which a download process builds the yt-dlp downloader."""

    data_dir: Path
    socket_timeout_s: float
    read_block_bytes: int = READ_BLOCK_BYTES
    hls_fragments: int = HLS_CONCURRENT_FRAGMENTS

    def __post_init__(self) -> None:
        # Checked here, in the service's process at start-up, because the
        # download processes build the downloader only when they run a job.
        fragments.check_supported()
        connections.check_supported()

    def build(self) -> YtDlpDownloader:
        return YtDlpDownloader(
            ArchiveLayout(self.data_dir),
            socket_timeout_s=self.socket_timeout_s,
            hls_fragments=self.hls_fragments,
        )


class YtDlpDownloader:
    """Download VODs with the yt-dlp library into an ArchiveLayout."""

    def __init__(
        self,
        layout: ArchiveLayout,
        *,
        socket_timeout_s: float,
        hls_fragments: int = HLS_CONCURRENT_FRAGMENTS,
    ) -> None:
        self.layout = layout
        self.socket_timeout_s = socket_timeout_s
        self.hls_fragments = hls_fragments
        fragments.install()

    def download(
        self,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult:
        """Download ``job`` to a complete file in the archive, resuming any partial."""
        try:
            self.layout.ensure()
            removed = self.layout.remove_stray_fragments(job.vod_id)
        except OSError as exc:
            raise classify(exc) from exc
        if removed:
            log.info(
                "VOD %s: removed %d unmerged HLS fragment files before resuming",
                job.vod_id,
                len(removed),
                extra={"vod_id": job.vod_id, "action": "resume_check"},
            )
        try:
            return self._attempt(job, on_progress, cancelled, bucket)
        except DownloadFailed as exc:
            if exc.error_class != "range_rejected":
                raise
        # A 416 on resume means the partial file is complete or no longer
        # matches the source; either way only a fresh download is safe.
        log.warning(
            "VOD %s: the server rejected resuming the partial file; starting over",
            job.vod_id,
            extra={"vod_id": job.vod_id, "attempt": job.attempt, "action": "restart"},
        )
        self.layout.discard_partial(job.vod_id)
        return self._attempt(job, on_progress, cancelled, bucket)

    def _attempt(
        self,
        job: DownloadJob,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult:
        kind = source_kind(job.source_url)
        watch = _Watch(
            track_validators=kind is SourceKind.FILE,
            bucket=bucket,
            cancelled=cancelled,
            hls_fragments=self.hls_fragments,
        )
        bucket.on_change = watch.follow_rate
        try:
            with sized_receive_buffers(watch.receive_buffer):
                hook = _Hook(on_progress, cancelled)
                return self._run(job, kind, watch, hook)
        finally:
            bucket.on_change = None
            watch.close()
            # Fragments fetched but not appended are fetched again by the next
            # attempt, so they need not take disk space until it starts.
            with contextlib.suppress(OSError):
                self.layout.remove_stray_fragments(job.vod_id)

    def _run(
        self, job: DownloadJob, kind: SourceKind, watch: _Watch, hook: _Hook
    ) -> DownloadResult:
        cancelled = hook.cancelled
        ytdlp_log = _YtDlpLog(job.vod_id)
        params = self._params(job, hook, ytdlp_log)
        started = time.monotonic()
        known: SourceValidators | None = None
        try:
            direct = direct_info(job)
            extractors = kind is SourceKind.EXTRACTED
            with _WatchedYoutubeDL(params, watch, extractors=extractors) as ydl:
                if kind is SourceKind.HLS:
                    # The generic extractor alone reads the playlist, so that a
                    # multivariant one becomes a choice of its best variant
                    # instead of a "download" of the variants' playlists.
                    ydl.add_info_extractor(GenericIE())
                known = self._prepare_partial(job, kind, ydl, watch)
                if direct is not None:
                    info = ydl.process_ie_result(direct, download=True)
                else:
                    info = ydl.extract_info(job.source_url, download=True)
                path = self._downloaded_path(ydl, info)
        except DownloadCancelled as exc:
            close_leftovers(exc)
            raise
        except (YoutubeDLError, OSError) as exc:
            # Mostly DownloadError; a write error whose close fails again
            # (ENOSPC) arrives as UnavailableVideoError.
            close_responses(exc)
            close_leftovers(exc)
            self._discard_if_changed(job, known, watch)
            self._drop_lone_sidecar(job)
            if cancelled.is_set():
                raise DownloadCancelled("download cancelled") from exc
            raise classify(
                exc, seen=watch.last_error, stall_timeout_s=self.socket_timeout_s
            ) from exc
        if cancelled.is_set():
            raise DownloadCancelled("download cancelled")

        self._check_complete(job, known, watch, ytdlp_log)
        expected = _expected_size(known, watch)
        try:
            final = self.layout.finalise(path, expected_size=expected)
        except SizeMismatch as exc:
            self.layout.discard_partial(job.vod_id)
            raise DownloadFailed(
                f"incomplete download: {exc}. The file was discarded and the "
                "next attempt downloads it again from the start",
                error_class="incomplete",
                retryable=True,
            ) from exc
        except OSError as exc:
            raise classify(exc) from exc
        self.layout.sidecar_path(job.vod_id).unlink(missing_ok=True)
        size = final.stat().st_size
        log.debug(
            "VOD %s: yt-dlp finished in %.1fs",
            job.vod_id,
            time.monotonic() - started,
            extra={"vod_id": job.vod_id, "bytes": size},
        )
        return DownloadResult(path=final, size=size)

    # -- resume safety ------------------------------------------------------

    def _prepare_partial(
        self, job: DownloadJob, kind: SourceKind, ydl: Any, watch: _Watch
    ) -> SourceValidators | None:
        """Keep the partial files only if they belong to this VOD and source.

        Returns the validators in force for this attempt (from a HEAD, or the
        sidecar), and writes the sidecar for this attempt.
        """
        sidecar_path = self.layout.sidecar_path(job.vod_id)
        sidecar = read_sidecar(sidecar_path)
        media_files = self.layout.download_files(job.vod_id)
        current: SourceValidators | None = None
        if media_files:
            if kind is SourceKind.FILE:
                current = self._head(ydl, job)
            partial_size = sum(
                path.stat().st_size
                for path in media_files
                if path.name.endswith(".part") and path.exists()
            )
            reason = resume_verdict(
                sidecar,
                vod_id=job.vod_id,
                source_url=job.source_url,
                current=current,
                partial_size=partial_size,
            )
            if reason is not None:
                log.warning(
                    "VOD %s: not resuming its partial files, %s; starting over",
                    job.vod_id,
                    reason,
                    extra={
                        "vod_id": job.vod_id,
                        "attempt": job.attempt,
                        "action": "resume_check",
                        "reason": reason,
                    },
                )
                self.layout.discard_partial(job.vod_id)
                sidecar = None
                # The HEAD's validators describe the source now, so they are
                # still the ones the fresh download must match.
            elif sidecar is None:
                log.info(
                    "VOD %s: resuming a partial file that has no sidecar",
                    job.vod_id,
                    extra={"vod_id": job.vod_id, "action": "resume_check"},
                )
        else:
            # Nothing to resume: a sidecar alone describes nothing.
            sidecar = None

        known = current
        if known is None and sidecar is not None:
            known = sidecar.validators
        wanted = Sidecar(job.vod_id, job.source_url, known)
        if wanted != sidecar:
            write_sidecar(sidecar_path, wanted)
        if known is None and kind is SourceKind.FILE:
            watch.on_first_validators = lambda validators: self._record(job, validators)
        return known

    def _drop_lone_sidecar(self, job: DownloadJob) -> None:
        """Delete the sidecar of an attempt that failed before writing media."""
        if not self.layout.download_files(job.vod_id):
            self.layout.sidecar_path(job.vod_id).unlink(missing_ok=True)

    def _record(self, job: DownloadJob, validators: SourceValidators) -> None:
        """Store the validators of the first response, before any byte is written."""
        try:
            write_sidecar(
                self.layout.sidecar_path(job.vod_id),
                Sidecar(job.vod_id, job.source_url, validators),
            )
        except OSError as exc:
            # The media write that follows fails the same way and is classified.
            log.warning(
                "VOD %s: could not write its sidecar: %s",
                job.vod_id,
                exc,
                extra={"vod_id": job.vod_id, "action": "resume_check"},
            )

    def _head(self, ydl: Any, job: DownloadJob) -> SourceValidators | None:
        """Read the source's validators with a HEAD; None when it cannot tell."""
        request = Request(
            job.source_url, headers={"Accept-Encoding": "identity"}, method="HEAD"
        )
        try:
            response = ydl.urlopen(request)
        except RequestError as exc:
            close_responses(exc)
            status = getattr(exc, "status", None)
            level = logging.DEBUG if status in _HEAD_UNSUPPORTED else logging.INFO
            log.log(
                level,
                "VOD %s: HEAD before resuming failed (%s); the first response "
                "is checked instead",
                job.vod_id,
                exc,
                extra={"vod_id": job.vod_id, "action": "resume_check"},
            )
            return None
        try:
            return SourceValidators.from_response(
                int(response.status), dict(response.headers)
            )
        finally:
            response.close()

    def _discard_if_changed(
        self, job: DownloadJob, known: SourceValidators | None, watch: _Watch
    ) -> str | None:
        """Delete the partial files if this attempt's response shows other bytes."""
        first = watch.first_validators
        if known is None or first is None:
            return None
        changed = first.changed_from(known)
        if changed is None:
            return None
        log.warning(
            "VOD %s: the source changed during the attempt (%s); deleting the "
            "partial files",
            job.vod_id,
            changed,
            extra={"vod_id": job.vod_id, "action": "resume_check", "reason": changed},
        )
        self.layout.discard_partial(job.vod_id)
        return changed

    def _check_complete(
        self,
        job: DownloadJob,
        known: SourceValidators | None,
        watch: _Watch,
        ytdlp_log: _YtDlpLog,
    ) -> None:
        changed = self._discard_if_changed(job, known, watch)
        if changed is not None:
            raise DownloadFailed(
                f"the source changed while the download resumed: {changed}. "
                "The partial file was discarded and the next attempt starts over",
                error_class="incomplete",
                retryable=True,
            )
        if ytdlp_log.skipped_fragments:
            self.layout.discard_partial(job.vod_id)
            raise DownloadFailed(
                f"incomplete download: yt-dlp skipped "
                f"{len(ytdlp_log.skipped_fragments)} HLS fragments "
                f"({ytdlp_log.skipped_fragments[0]}). The file was discarded and "
                "the next attempt downloads it again",
                error_class="incomplete",
                retryable=True,
            )

    # -- yt-dlp -------------------------------------------------------------

    def _params(
        self, job: DownloadJob, hook: _Hook, ytdlp_log: _YtDlpLog
    ) -> dict[str, Any]:
        return {
            "outtmpl": {"default": self.layout.partial_template(job.vod_id)},
            "logger": ytdlp_log,
            "quiet": True,
            "no_warnings": False,
            "noprogress": True,
            "noplaylist": True,
            "cachedir": False,
            "progress_hooks": [hook],
            # yt-dlp renders a progress line after every block even when
            # nothing prints it, which cost 63% of the reading thread at
            # 128 KiB blocks. Our own hook still runs after every block.
            "progress_delta": 1.0,
            # Every failure reaches our retry policy, which backs off and
            # counts attempts; yt-dlp's own retries would do neither.
            "retries": 0,
            "fragment_retries": 0,
            "extractor_retries": 0,
            # Skipping a fragment would end in success with data missing.
            "skip_unavailable_fragments": False,
            # Never False: yt-dlp would then append to an old .part file.
            "continuedl": True,
            "socket_timeout": self.socket_timeout_s,
            # One HTTP stack wherever vodq runs. Without this yt-dlp prefers
            # the requests library when it happens to be installed (as in
            # the test environment), whose errors read differently.
            "compat_opts": {"prefer-legacy-http-handler"},
            # The largest read. _MeteredRead makes reads smaller while a
            # rate limit is in force.
            "buffersize": READ_BLOCK_BYTES,
            "noresizebuffer": True,
            # The native HLS downloader keeps cancellation and throttling in
            # this process; ffmpeg would be a child we cannot throttle.
            "external_downloader": {"m3u8": "native"},
            "concurrent_fragment_downloads": self.hls_fragments,
        }

    def _downloaded_path(self, ydl: Any, info: dict[str, Any] | None) -> Path:
        if not info:
            raise DownloadFailed(
                "yt-dlp returned no video information for this URL. Retried "
                "after PROCESSING_RETRY_COOLDOWN",
                error_class="error",
                retryable=True,
            )
        downloads = info.get("requested_downloads") or []
        raw = downloads[0].get("filepath") if downloads else None
        path = Path(raw or ydl.prepare_filename(info)).resolve()
        if path.parent != self.layout.partial_dir.resolve():
            raise DownloadFailed(
                f"yt-dlp wrote {path}, outside {self.layout.partial_dir}; refusing it",
                error_class="error",
                retryable=False,
            )
        if not path.is_file():
            raise DownloadFailed(
                f"yt-dlp reported success but {path.name} does not exist. Retried "
                "after PROCESSING_RETRY_COOLDOWN",
                error_class="error",
                retryable=True,
            )
        return path


def _expected_size(known: SourceValidators | None, watch: _Watch) -> int | None:
    """The size the finished file must have: this attempt's response, else the HEAD."""
    first = watch.first_validators
    if first is not None and first.size is not None:
        return first.size
    return known.size if known is not None else None


def share_ssl_context() -> bool:
    """Make every YoutubeDL of this process reuse one SSL context per set of options.

    yt-dlp builds a context, parsing the whole CA bundle, for each YoutubeDL:
    about 40 ms of every download's start on 2 cores (yt-dlp 2026.11). The
    fork server calls this and builds the default
    context once (preload.py), so each download process starts with it. The function is
    private to yt-dlp; when it is missing, nothing changes. Returns whether
    the context is shared.
    """
    from yt_dlp.networking import common

    original = getattr(common, "make_ssl_context", None)
    if original is None or hasattr(original, "cache_info"):
        return original is not None
    cached = functools.lru_cache(maxsize=8)(original)
    common.make_ssl_context = cached
    # The keywords, in their order, that RequestHandler passes by default.
    cached(verify=True, legacy_support=False, use_certifi=True)
    return True


def rehearse() -> None:
    """Run yt-dlp's steps before a download's first request once, with no request.

    yt-dlp imports its HTTP downloader, request handlers and format code on
    first use and fills caches as it goes. Done once in the fork server,
    every download process starts with all of it ready.
    """
    info = {
        "id": "rehearsal",
        "title": "rehearsal",
        "url": "http://127.0.0.1:9/rehearsal.mp4",
        "ext": "mp4",
    }
    params = {"quiet": True, "noprogress": True, "cachedir": False}
    with yt_dlp.YoutubeDL(params, auto_init=False) as ydl:
        processed = ydl.process_ie_result(info, download=False)
        get_suitable_downloader(processed, ydl.params)
        get_suitable_downloader({**info, "protocol": "m3u8_native"}, ydl.params)
        # Reading it builds the request handlers, and their SSL context.
        assert ydl._request_director.handlers
