"""Tests of cancelling blocking calls and of one blocking call per direction (SPEC §5.2).

``Connection.cancel()`` and ``CancelToken`` are msgsock's ``CSocket::CancelBlockingCall``:
another thread wakes a blocked connect, receive or send, which raises ``Cancelled``;
afterwards only ``close()`` is valid.  A second concurrent send or receive raises
``ConcurrencyError`` at once.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from msgsock.exceptions import Cancelled, ConcurrencyError, ConnectionClosed, Timeout
from msgsock.framing import encode
from msgsock.sync import CancelToken, Connection, connect
from msgsock.sync import cancel as cancel_module
from tests.helpers import unit, wait_for
from tests.sync import test_connection as _tc

# Fixtures shared with the connection tests (every socket closed at teardown; IPv4/IPv6).
sockets = _tc.sockets
host = _tc.host
tls_contexts = _tc.tls_contexts
Sockets = _tc.Sockets

BIG = 8 << 20
"""A body far larger than the (shrunk) socket buffers: its send blocks on a peer that does not read."""


class Call:
    """Run a function on a thread of the registry; keep its result or exception."""

    def __init__(self, sockets: Sockets, target: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.finished_at = 0.0

        def run() -> None:
            try:
                self.result = target()
            except BaseException as exc:
                self.error = exc
            finally:
                self.finished_at = time.monotonic()
                self.done.set()

        self.thread = sockets.thread(run)

    def wait(self, timeout: float | None = None) -> None:
        assert self.done.wait(unit(5) if timeout is None else timeout), "the call did not return"


def small_buffer_pair(sockets: Sockets) -> tuple[Connection, socket.socket]:
    """A client Connection with a small send buffer, and a raw peer with a small receive buffer."""
    listener = sockets.listener()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the accepted socket inherits it
    raw = sockets.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw.settimeout(unit(5))
    raw.connect(listener.getsockname())
    conn = sockets.add(Connection(raw))
    return conn, sockets.accept(listener)


def full_backlog_listener(sockets: Sockets) -> tuple[Any, ...]:
    """The address of a listener whose accept queue is full, so a connect to it hangs.

    Skips when the kernel answers connects beyond the backlog (as in the connect-timeout test).
    """
    listener = sockets.listener("127.0.0.1", backlog=0)
    address: tuple[Any, ...] = listener.getsockname()
    for _ in range(8):  # fill the accept queue (1 entry for backlog 0 on Linux)
        probe = sockets.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        probe.settimeout(unit(0.3))
        try:
            probe.connect(address)
        except TimeoutError:
            return address
    pytest.skip("this kernel answers connects beyond the backlog; no way to make a connect hang")


def assert_only_close_valid(conn: Connection) -> None:
    """After a cancel, send/receive/send_eof raise Cancelled and close() works at once."""
    assert conn.cancelled
    with pytest.raises(Cancelled):
        conn.send(b"after")
    with pytest.raises(Cancelled):
        conn.receive(timeout=unit(1))
    with pytest.raises(Cancelled):
        conn.send_eof()
    start = time.monotonic()
    conn.close(timeout=unit(30))  # no graceful exchange after a cancel: returns at once
    assert conn.closed
    assert time.monotonic() - start < unit(2)


# -- cancelling a receive ---------------------------------------------------------------


def test_cancel_wakes_a_blocked_receive(sockets: Sockets, host: str) -> None:
    """cancel() from another thread makes a receive blocked in the kernel raise Cancelled promptly."""
    conn, raw = _tc.client_and_raw(sockets, host)
    call = Call(sockets, conn.receive)
    wait_for(conn._recv_lock.locked)
    cancelled_at = time.monotonic()
    conn.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    assert "only close() is valid" in str(call.error)
    assert call.finished_at - cancelled_at < unit(2)
    assert raw.recv(10) == b"", "the peer sees our end of stream at once"
    assert_only_close_valid(conn)


def test_cancel_wakes_a_receive_with_a_timeout(sockets: Sockets) -> None:
    """A receive waiting with a long timeout raises Cancelled (not Timeout) when cancelled."""
    conn, _raw = _tc.client_and_raw(sockets)
    call = Call(sockets, lambda: conn.receive(timeout=unit(30)))
    wait_for(conn._recv_lock.locked)
    conn.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    assert_only_close_valid(conn)


def test_cancel_wakes_a_receive_in_the_middle_of_a_frame(sockets: Sockets) -> None:
    """A receive that holds part of a frame is cancelled too; the partial frame is not delivered."""
    conn, raw = _tc.client_and_raw(sockets)
    frame = encode(b"half a message")
    raw.sendall(frame[:7])
    call = Call(sockets, conn.receive)
    wait_for(lambda: conn.protocol.in_frame)
    conn.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    raw.sendall(frame[7:])
    assert_only_close_valid(conn)


def test_cancel_before_a_call_applies_to_it(sockets: Sockets) -> None:
    """cancel() with no call in progress still cancels: the next receive raises Cancelled, queued messages are dropped."""
    conn, raw = _tc.client_and_raw(sockets)
    raw.sendall(encode(b"one") + encode(b"two"))
    assert conn.receive(timeout=unit(5)) == b"one"  # "two" is now queued
    conn.cancel()
    conn.cancel()  # idempotent
    with pytest.raises(Cancelled):
        conn.receive(timeout=0)
    with pytest.raises(Cancelled):
        list(conn)
    assert_only_close_valid(conn)


def test_cancel_after_close_does_nothing(sockets: Sockets) -> None:
    """cancel() on a closed connection is a no-op: later calls still report the close."""
    conn, _raw = _tc.client_and_raw(sockets)
    conn.abort()
    conn.cancel()
    assert not conn.cancelled
    with pytest.raises(ConnectionClosed):
        conn.receive(timeout=0)


def test_cancel_cuts_a_close_short(sockets: Sockets) -> None:
    """A close() waiting for a peer that never sends its EOF returns at once when cancelled."""
    conn, raw = _tc.client_and_raw(sockets)
    call = Call(sockets, lambda: conn.close(timeout=unit(30)))
    assert raw.recv(10) == b"", "close() has sent its EOF and now waits for the peer's"
    conn.cancel()
    call.wait(unit(2))
    assert call.error is None
    assert conn.closed


# -- cancelling a send ------------------------------------------------------------------


def test_cancel_wakes_a_blocked_send(sockets: Sockets) -> None:
    """A send blocked on a peer that does not read raises Cancelled; the peer sees a cut-off frame."""
    conn, raw = small_buffer_pair(sockets)
    call = Call(sockets, lambda: conn.send(b"s" * BIG))
    wait_for(conn._write_lock.locked)
    assert raw.recv(1, socket.MSG_PEEK) == b"\x00", "the frame has started to arrive"
    conn.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    received = _tc.recv_to_eof(raw)
    assert 0 < len(received) < BIG + 4, "the peer gets part of the frame, then our end of stream"
    assert_only_close_valid(conn)


def test_close_after_cancelled_send_does_not_wait(sockets: Sockets) -> None:
    """After a cancelled send, close() with the default close_timeout returns at once."""
    conn, _raw = small_buffer_pair(sockets)
    call = Call(sockets, lambda: conn.send(b"s" * BIG))
    wait_for(conn._write_lock.locked)
    conn.cancel()
    call.wait()
    start = time.monotonic()
    conn.close()
    assert time.monotonic() - start < unit(2)


# -- one call per direction -------------------------------------------------------------


def test_second_concurrent_send_raises_at_once(sockets: Sockets) -> None:
    """While one thread is blocked in send, a second send or send_eof raises ConcurrencyError at once."""
    conn, raw = small_buffer_pair(sockets)
    body = b"b" * BIG
    first = Call(sockets, lambda: conn.send(body))
    wait_for(conn._write_lock.locked)
    start = time.monotonic()
    with pytest.raises(ConcurrencyError):
        conn.send(b"second")
    with pytest.raises(ConcurrencyError):
        conn.send_eof()
    assert time.monotonic() - start < unit(1), "raised at once, not after the first send"
    assert not first.done.is_set()
    assert _tc.recv_frame(raw) == body  # the peer reads: the first send completes
    first.wait()
    assert first.error is None
    conn.send(b"after")  # the connection is still usable
    assert _tc.recv_frame(raw) == b"after"


def test_second_concurrent_receive_raises_at_once(sockets: Sockets) -> None:
    """While one thread is blocked in receive, a second receive raises ConcurrencyError at once, whatever its timeout."""
    conn, raw = _tc.client_and_raw(sockets)
    first = Call(sockets, lambda: conn.receive(timeout=unit(30)))
    wait_for(conn._recv_lock.locked)
    start = time.monotonic()
    with pytest.raises(ConcurrencyError):
        conn.receive(timeout=unit(30))
    assert time.monotonic() - start < unit(1)
    raw.sendall(encode(b"for the first"))
    first.wait()
    assert first.result == b"for the first"


def test_send_and_receive_may_block_together(sockets: Sockets) -> None:
    """A send and a receive blocked at the same time are not a ConcurrencyError; cancel wakes both."""
    conn, _raw = small_buffer_pair(sockets)
    sender = Call(sockets, lambda: conn.send(b"x" * BIG))
    receiver = Call(sockets, conn.receive)
    wait_for(lambda: conn._write_lock.locked() and conn._recv_lock.locked())
    conn.cancel()
    sender.wait()
    receiver.wait()
    assert isinstance(sender.error, Cancelled), sender.error
    assert isinstance(receiver.error, Cancelled), receiver.error
    assert_only_close_valid(conn)


# -- cancelling a connect ---------------------------------------------------------------


def entered_wait(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set when a cancellable connect starts waiting for the network."""
    entered = threading.Event()
    original = cancel_module._CancellableWait.wait

    def wait(self: Any, sock: socket.socket, address: Any, *, write: bool) -> None:
        entered.set()
        original(self, sock, address, write=write)

    monkeypatch.setattr(cancel_module._CancellableWait, "wait", wait)
    return entered


def test_cancel_a_connect_in_progress(sockets: Sockets, monkeypatch: pytest.MonkeyPatch) -> None:
    """token.cancel() from another thread makes a connect that hangs raise Cancelled promptly."""
    address = full_backlog_listener(sockets)
    entered = entered_wait(monkeypatch)
    token = CancelToken()
    call = Call(sockets, lambda: connect("127.0.0.1", address[1], connect_timeout=unit(30), cancel=token))
    assert entered.wait(unit(5))
    cancelled_at = time.monotonic()
    token.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    assert "was cancelled" in str(call.error)
    assert call.finished_at - cancelled_at < unit(2)
    assert token.cancelled


def test_cancellable_connect_still_times_out(sockets: Sockets) -> None:
    """With a token, a connect that hangs still raises Timeout after connect_timeout."""
    address = full_backlog_listener(sockets)
    start = time.monotonic()
    with pytest.raises(Timeout):
        connect("127.0.0.1", address[1], connect_timeout=unit(0.3), cancel=CancelToken())
    assert time.monotonic() - start < unit(3)


def test_cancellable_connect_refused(sockets: Sockets, host: str) -> None:
    """With a token, a refused connect raises ConnectionRefusedError as without one."""
    dead = sockets.dead_address(host)
    with pytest.raises(ConnectionRefusedError):
        connect(host, dead[1], connect_timeout=unit(5), cancel=CancelToken())


def test_already_cancelled_token_fails_connect_at_once(sockets: Sockets) -> None:
    """connect() with a token that is already cancelled raises Cancelled without connecting."""
    listener = sockets.listener()
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        connect("127.0.0.1", listener.getsockname()[1], connect_timeout=unit(5), cancel=token)
    listener.settimeout(0)
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_token_stays_attached_to_the_connection(sockets: Sockets, host: str) -> None:
    """The token given to connect() later cancels the connection's blocked receive."""
    listener = sockets.listener(host)
    token = CancelToken()
    conn = sockets.add(connect(host, listener.getsockname()[1], connect_timeout=unit(5), cancel=token))
    raw = sockets.accept(listener)
    conn.send(b"hello")
    assert _tc.recv_frame(raw) == b"hello"
    raw.sendall(encode(b"back"))
    assert conn.receive(timeout=unit(5)) == b"back"
    call = Call(sockets, conn.receive)
    wait_for(conn._recv_lock.locked)
    token.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    assert_only_close_valid(conn)


def test_one_token_cancels_several_connections(sockets: Sockets) -> None:
    """Connections sharing a token are all cancelled by it; a closed one is forgotten by the token."""
    listener = sockets.listener()
    token = CancelToken()
    conns = [
        sockets.add(Connection(socket.create_connection(listener.getsockname()), cancel=token))
        for _ in range(3)
    ]
    conns[2].close(timeout=0)
    assert len(token._callbacks) == 2
    token.cancel()
    assert conns[0].cancelled and conns[1].cancelled and not conns[2].cancelled


def test_connection_with_a_cancelled_token_is_cancelled(sockets: Sockets) -> None:
    """A Connection made with a token that is already cancelled is cancelled from the start."""
    conn, _raw = _tc.client_and_raw(sockets)
    token = CancelToken()
    token.cancel()
    other = sockets.add(Connection(socket.create_connection(conn.peer_address), cancel=token))
    assert other.cancelled
    with pytest.raises(Cancelled):
        other.receive(timeout=0)


def test_cancel_a_tls_handshake_in_progress(sockets: Sockets) -> None:
    """A TLS handshake the server never answers is cancelled by the token (no wait for connect_timeout)."""
    listener = sockets.listener()
    token = CancelToken()
    client_ctx = ssl.create_default_context()
    call = Call(
        sockets,
        lambda: connect(
            "127.0.0.1", listener.getsockname()[1], ssl=client_ctx, connect_timeout=unit(30), cancel=token
        ),
    )
    raw = sockets.accept(listener)
    assert raw.recv(1, socket.MSG_PEEK) == b"\x16", "the ClientHello arrived: the client waits for our answer"
    token.cancel()
    call.wait(unit(2))
    assert isinstance(call.error, Cancelled), call.error


def test_cancellable_connect_with_tls_round_trip(
    sockets: Sockets, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """With a token, the non-blocking TLS handshake completes and messages round-trip."""
    server_ctx, client_ctx = tls_contexts
    listener = sockets.listener()
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        raw, _ = listener.accept()
        raw.settimeout(unit(5))
        accepted.append(sockets.add(server_ctx.wrap_socket(raw, server_side=True)))

    thread = sockets.thread(accept)
    conn = sockets.add(
        connect(
            "127.0.0.1",
            listener.getsockname()[1],
            ssl=client_ctx,
            connect_timeout=unit(5),
            cancel=CancelToken(),
        )
    )
    thread.join(unit(5))
    peer = accepted[0]
    conn.send(b"secret")
    assert _tc.recv_frame(peer) == b"secret"
    peer.sendall(encode(b"reply"))
    assert conn.receive(timeout=unit(5)) == b"reply"
    call = Call(sockets, conn.receive)
    wait_for(conn._recv_lock.locked)
    conn.cancel()
    call.wait()
    assert isinstance(call.error, Cancelled), call.error
    assert_only_close_valid(conn)
