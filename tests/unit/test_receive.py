"""Receive buffers of download sockets, sized to the rate limit."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vodq.download.receive import (
    MAX_RECEIVE_BUFFER,
    MIN_RECEIVE_BUFFER,
    ReceiveBuffers,
    buffer_for,
)


def test_receive_buffer_unlimited_is_left_alone() -> None:
    assert buffer_for(None) is None


def test_receive_buffer_is_half_a_second() -> None:
    assert buffer_for(4_000_000) == 2_000_000


def test_receive_buffer_has_a_floor() -> None:
    assert buffer_for(1000) == MIN_RECEIVE_BUFFER


def test_receive_buffer_has_a_ceiling() -> None:
    assert buffer_for(10**9) == MAX_RECEIVE_BUFFER


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


@pytest.fixture
def restore_connect() -> Iterator[None]:
    original = socket.socket.connect
    yield
    socket.socket.connect = original  # type: ignore[method-assign]


def _rcvbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


@pytest.mark.usefixtures("restore_connect")
def test_receive_buffers_sized_at_connect(listener: socket.socket) -> None:
    ReceiveBuffers(400_000).install()

    with socket.create_connection(listener.getsockname()) as client:
        # Linux doubles the value it is given, for its own bookkeeping.
        assert _rcvbuf(client) == 2 * 200_000


@pytest.mark.usefixtures("restore_connect")
def test_receive_buffers_follow_a_rate_change(listener: socket.socket) -> None:
    buffers = ReceiveBuffers(400_000)
    buffers.install()

    with socket.create_connection(listener.getsockname()) as client:
        buffers.set_rate(200_000)

        assert _rcvbuf(client) == 2 * 100_000
