"""Receive buffers sized to the rate limit, for the sockets of a download process.

Linux grows a TCP socket's receive buffer to several MiB while data flows
fast. When the rate limit is then lowered, the download reads slower at once,
but the server goes on sending until that buffer is full, so the server sees
the old rate for seconds: 3.9 s for a change from 6M to 3M shared by three
downloads, measured at the server on 127.0.0.1. A buffer of half a second at
the rate bounds that lag. It still lets the rate through over round trips
up to 500 ms, because TCP moves at most one window per round trip.

It applies to every TCP socket of the process that installs it, which is
why only a download process, whose sockets are all download sockets, does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref

# Receive buffer per second of rate limit, in seconds, and its bounds in
# bytes. Without a limit the kernel sizes the buffer itself.
RECEIVE_BUFFER_S = 0.5
MIN_RECEIVE_BUFFER = 65_536
MAX_RECEIVE_BUFFER = 8 * 1024 * 1024


def buffer_for(rate: float | None) -> int | None:
    """Return the receive buffer in bytes for ``rate``, or None to leave it alone."""
    if rate is None:
        return None
    wanted = int(rate * RECEIVE_BUFFER_S)
    return max(MIN_RECEIVE_BUFFER, min(MAX_RECEIVE_BUFFER, wanted))


class ReceiveBuffers:
    """Set SO_RCVBUF on every TCP socket this process connects, and on rate changes."""

    def __init__(self, rate: float | None) -> None:
        self._lock = threading.Lock()
        self._size = buffer_for(rate)
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def install(self) -> None:
        """Wrap ``socket.socket.connect`` for the rest of this process's life."""
        original = socket.socket.connect
        buffers = self

        def connect(sock: socket.socket, address: object) -> None:
            buffers._adopt(sock)
            original(sock, address)  # type: ignore[arg-type]

        socket.socket.connect = connect  # type: ignore[method-assign,assignment]

    def set_rate(self, rate: float | None) -> None:
        """Resize the buffers of open sockets, and of later ones, for ``rate``."""
        with self._lock:
            self._size = buffer_for(rate)
            size = self._size
            sockets = list(self._sockets)
        if size is None:
            # A buffer once set stays fixed; the next connection autotunes.
            return
        for sock in sockets:
            _set(sock, size)

    def _adopt(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            return
        with self._lock:
            size = self._size
            self._sockets.add(sock)
        if size is not None:
            _set(sock, size)


def _set(sock: socket.socket, size: int) -> None:
    # A socket closed meanwhile has no buffer to size.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
