"""Receive buffers of a download's connections, sized to its rate.

A throttled download reads slowly, but the kernel accepts a connection's
first bytes at full speed into its receive buffer, up to the TCP window
(Linux starts it from net.ipv4.tcp_rmem, 128 KiB by default, and autotuning
grows it). A plain HTTP download pays this once, at its start. An HLS
download opens a new connection for every fragment, several at once, so
every round of fragments arrives partly as one burst on the network,
followed by a gap while the buffers drain. With 2 MiB segments at 500K and
four fragments at once, 5-second windows measured at the server strayed
10% from the limit (bench/bench_rates.py, Linux 6.18).

While a download fetches fragments, each new connection gets a receive
buffer of ``FRAGMENT_BUFFER_S`` seconds of its share of the rate in force,
or of ``BUFFERED_ROUND_TRIPS`` round trips of the path if that is more, set
before it connects so that the window agreed in the handshake fits it.
Plain HTTP connections keep the kernel's autotuning, because they last the
whole download and a buffer set here never grows by itself again. Only up
to 256 KiB/s, where the bursts of an autotuned buffer are a large part of
a 5 s window, does a plain connection get a buffer sized to its rate
before it connects (``ytdlp.PLAIN_SIZED_MAX_RATE``). At higher rates it gets
one once its source limits it, pauses or leaves a gap between bursts
(``ytdlp.SOURCE_HELD_S``).

A large cut of the rate clamps the windows of the connections already
open and shrinks their buffers (``resize_receive_buffer``), plain HTTP
included: a buffer sized to the old rate keeps taking bytes at it, and one
grown by autotuning is offered again only in large steps, so the source
sends in bursts seconds apart. What the connections held at the cut, and
what arrives until their buffers have shrunk, was invited at the old rate,
and the download reads it free (see ``ytdlp._MeteredRead``). A fragment
connection opened before a cut, whose response opens after it, counts as
cut when its response opens (``connect_buffer``).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import functools
import inspect
import socket
import struct
import sys
import termios
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import yt_dlp.networking._urllib as ytdlp_urllib
import yt_dlp.version

from vodq.errors import ConfigError

# A plain connection's receive buffer once sized to its rate, in seconds of
# the rate (ytdlp.PLAIN_SIZED_MAX_RATE, ytdlp.SOURCE_HELD_S).
RECEIVE_BUFFER_S = 0.2
# A fragment connection's receive buffer, in seconds of its share of the
# rate. Each fragment's buffer fills at its start and drains at its end
# unseen by the server, so a 5 s window there counts up to one buffer per
# connection early or late. At 0.2 s, HLS at 500K with 256 KiB segments ran
# up to 6.4% off in 5 s windows sliding by 0.05 s. At 0.1 s, with the ends
# of the fragments spread out (slots.OLDEST_WEIGHT), it ran within 2.9%.
FRAGMENT_BUFFER_S = 0.1
# Either buffer has room for at least this many round trips of its
# connection's part of the rate, as measured on the download's latest
# response (``round_trip``): a connection receives at most one window per
# round trip, so a smaller buffer caps it below its part.
# NOTE: a download's first connection is sized before any round trip is
# known, and the first fragments of a playlist from another host with the
# playlist's. A plain file's connection is resized at its first read, but
# a fragment's keeps its buffer to its end, so over a longer round trip the
# first fragments fall short. A buffer smaller than one segment (64 KiB on
# loopback) gets bytes only at the sender's window probe, about every
# 0.2 s. On loopback a connection sized to 320K or less then reads one to
# two buffers per probe. So a pooled download there may borrow little or
# nothing of what its neighbours leave (bandwidth.SpareTokens). At 113K, 4
# test runs in 20 under load read 1.04 times the limit.
BUFFERED_ROUND_TRIPS = 2.0
# Bounds of that buffer, in bytes. Linux doubles the value for its own
# bookkeeping and keeps at least about 4.5 KiB.
MIN_RECEIVE_BUFFER_BYTES = 4096
MAX_RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
# Linux's SO_MEMINFO, which Python's socket module does not name (55 on x86
# and arm64): nine 32-bit counters, the first the receive queue's memory.
_SO_MEMINFO = 55
_MEMINFO_BYTES = 9 * 4
# Offset of tcpi_rcv_wnd in struct tcp_info: the receive window last offered,
# in bytes. Linux 6.2 and newer fill it, and older kernels return less.
_TCPI_RCV_WND_OFFSET = 232
# Offset of tcpi_rtt in struct tcp_info: the smoothed round trip, in
# microseconds.
_TCPI_RTT_OFFSET = 68
# Offset of the byte of struct tcp_info whose high four bits are the receive
# window scale (tcpi_rcv_wscale).
_TCPI_WSCALE_OFFSET = 6
_TCP_INFO_BYTES = 512

# The receive buffer of the next connection, or None for the kernel's
# default; set by ``sized_receive_buffers`` for one download at a time.
_receive_buffer: Callable[[], int | None] | None = None
# The receive buffer, in bytes, that each open connection got at its connect.
# A connection missing here was opened with the kernel's autotuned buffer.
_connect_buffers: weakref.WeakKeyDictionary[socket.socket, int] = (
    weakref.WeakKeyDictionary()
)
# yt-dlp's own, kept at import; None when this yt-dlp lacks it.
_original_create_connection: Callable[..., socket.socket] | None = getattr(
    ytdlp_urllib, "create_connection", None
)


def check_supported() -> None:
    """Raise ConfigError unless this yt-dlp opens connections as replaced here.

    yt-dlp 2026.10.26 to 2026.11.23 give each urllib connection the
    ``create_connection`` of ``yt_dlp.networking._urllib``.
    """
    reason = None
    if _original_create_connection is None:
        reason = "yt_dlp.networking._urllib.create_connection is missing"
    else:
        opener = getattr(ytdlp_urllib, "_create_http_connection", None)
        try:
            source = inspect.getsource(opener) if opener is not None else ""
        except (OSError, TypeError):
            source = ""
        if "_create_connection = create_connection" not in source:
            reason = "its urllib handler no longer opens connections through "
            reason += "create_connection"
    if reason is not None:
        raise ConfigError(
            f"yt-dlp {yt_dlp.version.__version__} is not supported: {reason}, "
            "so HLS downloads could exceed their rate limit. Install a supported "
            "version, such as: pip install 'yt-dlp==2026.11.23'"
        )


def receive_buffer_for(
    rate: float | None, connections: int, seconds: float = RECEIVE_BUFFER_S
) -> int | None:
    """Return the receive buffer, in bytes, of one of ``connections`` sharing
    ``rate`` bytes per second, with room for ``seconds`` of its part, or None
    when the rate is unlimited."""
    if rate is None:
        return None
    size = rate / max(1, connections) * seconds
    return int(min(MAX_RECEIVE_BUFFER_BYTES, max(MIN_RECEIVE_BUFFER_BYTES, size)))


@contextlib.contextmanager
def sized_receive_buffers(size: Callable[[], int | None]) -> Iterator[None]:
    """Give each connection yt-dlp opens meanwhile a receive buffer of ``size()``.

    ``size`` is called at every connect, so it follows the rate in force. A
    download process runs one download at a time, so one setting serves all
    of its threads.
    """
    global _receive_buffer  # noqa: PLW0603 - one download per process
    check_supported()
    ytdlp_urllib.create_connection = _create_connection
    _receive_buffer = size
    try:
        yield
    finally:
        _receive_buffer = None


def _create_connection(
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
    source_address: tuple[str, int] | None = None,
    **options: Any,
) -> socket.socket:
    assert _original_create_connection is not None, "check_supported() checks it"
    source = _receive_buffer
    size = source() if source is not None else None
    if size is None or "_create_socket_func" in options:
        # Unlimited, or through a SOCKS proxy, which connects on its own.
        return _original_create_connection(address, timeout, source_address, **options)
    sock = _original_create_connection(
        address,
        timeout,
        source_address,
        _create_socket_func=functools.partial(_connect, size),
    )
    _connect_buffers[sock] = size
    return sock


def connect_buffer(sock: socket.socket | None) -> int | None:
    """Return the receive buffer in bytes that ``sock`` got before it
    connected, or None for the kernel's autotuned one."""
    return _connect_buffers.get(sock) if sock is not None else None


def is_closed(sock: socket.socket | None) -> bool:
    """Return whether ``sock`` is closed; False for no socket."""
    return sock is not None and sock.fileno() == -1


def _connect(
    receive_buffer: int,
    address_info: tuple[Any, ...],
    timeout: Any,
    source_address: tuple[str, int] | None,
) -> socket.socket:
    """Connect one of ``getaddrinfo``'s addresses with ``receive_buffer`` set."""
    family, kind, protocol, _name, address = address_info
    sock = socket.socket(family, kind, protocol)
    try:
        # Before connect: the window scale is agreed in the handshake.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def socket_of(response: Any) -> socket.socket | None:
    """Return the socket of a yt-dlp response, or None.

    yt-dlp 2026.11's urllib handler gives an ``UrllibResponseAdapter`` over
    ``http.client.HTTPResponse``, whose reader wraps a ``socket.SocketIO``.
    """
    raw = getattr(getattr(getattr(response, "fp", None), "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def queued_bytes(sock: socket.socket | None) -> int:
    """Return the bytes waiting in the kernel to be read from ``sock``.

    0 when there is no socket or it is closed, so that nothing is read free.
    """
    if sock is None:
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    except (OSError, ValueError):
        return 0
    return max(0, count[0])


def offered_window(sock: socket.socket | None) -> int:
    """Return the receive window ``sock`` last offered its peer, in bytes.

    The peer may still send up to this much without a new offer. 0 when
    unknown: no socket, or a kernel older than Linux 6.2.
    """
    if sock is None or not sys.platform.startswith("linux"):
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, ValueError):
        return 0
    if len(info) < _TCPI_RCV_WND_OFFSET + 4:
        return 0
    return int(struct.unpack_from("I", info, _TCPI_RCV_WND_OFFSET)[0])


def round_trip(sock: socket.socket | None) -> float | None:
    """Return the smoothed round trip of ``sock`` in seconds, or None when
    unknown: no socket, a closed one, or not Linux."""
    if sock is None or not sys.platform.startswith("linux"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, ValueError):
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    micros = int(struct.unpack_from("I", info, _TCPI_RTT_OFFSET)[0])
    return micros / 1_000_000 if micros else None


def _offers_no_window(sock: socket.socket) -> bool:
    """Return whether ``sock`` last offered a window of 0 bytes; False when
    the kernel does not say (older than Linux 6.2)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    if len(info) < _TCPI_RCV_WND_OFFSET + 4:
        return False
    return int(struct.unpack_from("I", info, _TCPI_RCV_WND_OFFSET)[0]) == 0


def resize_receive_buffer(
    sock: socket.socket | None, size: int, room: int = 0, grow: bool = False
) -> bool:
    """Shrink ``sock``'s receive buffer to ``size`` (SO_RCVBUF's value,
    which Linux doubles) plus one window unit, as far as the bytes on their
    way allow, and clamp its window. Return whether the buffer has its size.

    For a rate change on an open connection. A buffer sized to the old rate
    keeps taking bytes at it after a cut. A plain file's buffer, grown by
    autotuning at 10M, made its source send in bursts about 1.5 s apart at
    500K.

    The window offered from now on is clamped to twice ``size``
    (TCP_WINDOW_CLAMP), the most that a connection opened with that buffer
    offers. Clamped to ``size``, three pooled HLS downloads cut from 10M to
    500K ran 8% to 12% short, because a fragment then carried less than its
    share.

    The buffer keeps room for what may still arrive: its queue, ``room``
    bytes of window offered before the clamp (TCP never takes an offered
    window back), or at least ``size`` more. A packet that finds the buffer
    full is dropped, and the server sends it again only after a timeout
    that doubles while the buffer stays full. A buffer set below its queue
    at once stalled HLS for 1.5 s after a cut to 500K, and a connection cut
    from no limit to 100K then sent nothing for 1.3 s after its queue had
    drained. Without the clamp, a buffer held at its queue offered a new
    window with every read and hardly shrank.

    Only ``grow`` (the first resize after a cut) may set the buffer above
    its size, because an autotuned buffer offers more window than its
    memory holds, and what did not fit was dropped. Later calls only lower
    it, or the queue would grow by a window at each. Only on Linux, whose
    SO_MEMINFO gives the queue's memory; elsewhere nothing changes.

    Linux (6.18 here) resets the clamp to what the buffer holds when an
    arriving packet changes the connection's ratio of payload to memory, as
    the first data packets after a response's header do. So the reads call
    this again until the buffer has its size, which then bounds the window
    about as the clamp did.

    NOTE: the kernel caps the value at net.core.rmem_max, and a resized
    connection loses autotuning for good. After a cut and a later raise, a
    path with a long round trip may carry less than the new limit. On
    loopback (64 KiB segments) a plain download cut from 10M to 64K
    settled near 52K, because its buffer is smaller than one segment.
    """
    if sock is None or not sys.platform.startswith("linux"):
        return True
    window = max(size, MIN_RECEIVE_BUFFER_BYTES)
    try:
        # Linux's window for a buffer of ``window`` bytes is at most twice it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 2 * window)
        info = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO_BYTES)
        used = int(struct.unpack_from("I", info)[0])
        current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # A window is offered in units of the window scale, rounded up.
        granule = window_granule(sock)
        room = max(room, window + granule)
        # Memory per byte in the queue now (packet overhead), or twice the
        # bytes for an empty queue.
        queued = queued_bytes(sock)
        room_memory = room * used // queued if queued else 2 * room
        needed = used + room_memory
        if not grow:
            needed = min(needed, current)
        if _offers_no_window(sock):
            # Nothing may arrive until the buffer offers a window again, so
            # it can go below its queue at once. Held above the queue, it
            # would offer all of its room as soon as the read of the queue's
            # last bytes freed the queue's memory, before the next call.
            needed = 0
        # Linux doubles the value set and keeps a minimum of its own. Set
        # even when unchanged: setting it stops autotuning, which would
        # raise the clamp again.
        target = window + granule
        value = max(target, min(-(-needed // 2), MAX_RECEIVE_BUFFER_BYTES))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, value)
    except (OSError, ValueError):
        # A closed socket: nothing is left to resize.
        return True
    return value == target


def segment_size(sock: socket.socket | None) -> int | None:
    """Return the largest segment, in bytes, that ``sock`` exchanges with its
    peer (TCP_MAXSEG), or None when there is no socket or it is closed."""
    if sock is None:
        return None
    try:
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
    except (OSError, ValueError):
        return None


def window_granule(sock: socket.socket) -> int:
    """Return the unit, in bytes, of the windows that ``sock`` offers: 2 to
    the power of its receive window scale, agreed at connect."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    return 1 << (info[_TCPI_WSCALE_OFFSET] >> 4)
