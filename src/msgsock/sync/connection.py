"""Blocking framed connections (SPEC §5.2): :func:`connect` and :class:`Connection`.

Theory of operation.  A :class:`Connection` is a pump over the sans-I/O
:class:`~msgsock.protocol.MessageProtocol` (STYLE §1); it never parses a frame itself.

- **Receiving**: ``recv_into`` a reusable 64 KiB buffer, feed the bytes to the
  protocol, queue the decoded messages and hand them out one at a time.  Bytes of an
  unfinished frame stay in the decoder, so a receive that times out loses nothing.
- **Sending**: the message is encoded under the send lock and its header and body are
  written with one ``sendmsg`` (header and body apart: a large body is never copied,
  SPEC §4.1).
- **Timeouts**: the socket stays in blocking mode.  ``socket.settimeout`` would apply
  to *both* directions, so a thread sending a large message would fail when another
  thread's receive timeout ran out.  A receive with a deadline instead sets the
  kernel's receive timeout (``SO_RCVTIMEO``), which bounds reads only and costs no
  extra system call per read (``settimeout`` polls before every call).  Where
  ``SO_RCVTIMEO`` is unreliable (Windows: a timed-out socket is in an indeterminate
  state; TLS: CPython retries the read) ``select`` waits before the read instead.
  Over TLS a peer that stops in the middle of a TLS record can hold a read past its
  timeout (the record must be complete to be decrypted).
- **Closing** follows the Winsock graceful shutdown (seed 004, SPEC §2): flush, shut
  down the sending side, read until the peer's EOF (up to ``limits.close_timeout``),
  then close.  ``abort()`` closes at once with a reset (``SO_LINGER`` 0).
- **Threads**: one lock per direction, so one thread may send while another receives.
  A second *concurrent* call of the same direction -- two receives, or two sends (or
  ``send_eof``) -- raises :class:`~msgsock.exceptions.ConcurrencyError` at once
  instead of queueing behind the first (the CSocket rule: one blocking call per
  socket at a time).  Sends used to be serialized; failing fast makes a design that
  shares a connection between sending threads visible at once rather than as a stall
  behind a slow peer.  :meth:`Connection.close` is not a send: it waits (up to its
  timeout) for a send in progress.  Closing a socket does not wake a thread blocked
  on it (Linux), so closing first shuts down the read side (which wakes readers and
  sends nothing), and the write side too when another thread may be blocked sending.
- **Cancelling** (``CSocket::CancelBlockingCall``): :meth:`Connection.cancel`, from any
  thread, shuts the socket down both ways (``shutdown(SHUT_RDWR)``).  That wakes a
  thread blocked in ``recv`` or ``send`` -- it raises
  :class:`~msgsock.exceptions.Cancelled` -- and, being socket *state* rather than a
  one-off signal, it cannot be missed by a thread that is just about to block.  It
  costs nothing on the hot path (a wake-up pipe would need a ``poll`` before every
  read).  The consequences: the peer sees our end of stream at once (an
  :class:`~msgsock.exceptions.IncompleteMessage` if a send was cut off mid-frame); the
  stream position is lost, so every later ``send``/``receive`` raises ``Cancelled``
  too and only :meth:`Connection.close` remains valid (as after MFC's
  ``CancelBlockingCall``).  :func:`connect` takes a :class:`CancelToken` that aborts a
  connect (or TLS handshake) in progress; the token stays attached to the new
  connection, so the same ``token.cancel()`` later cancels its blocking calls.

**Authentication** (SPEC §4.2, ``connect(auth_key=...)``): after the TCP connect and
the TLS handshake, and within the same ``connect_timeout``, :func:`connect` pumps the
sans-I/O :class:`~msgsock.auth.ClientHandshake` on the socket, then builds the
:class:`Connection` and hands it the bytes that followed the handshake.

``OSError`` is translated once, here (STYLE §4): a reset becomes
``ConnectionClosed(clean=False)``, a receive timeout :class:`~msgsock.exceptions.Timeout`,
any failure after :meth:`Connection.cancel` :class:`~msgsock.exceptions.Cancelled`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import selectors
import socket
import ssl as _ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from .._handshake import connect_timeout_error, run_blocking
from .._net import format_address, set_nodelay
from ..auth import ClientHandshake, new_nonce
from ..exceptions import (
    Cancelled,
    ConcurrencyError,
    ConnectionClosed,
    HandshakeError,
    InvalidState,
    ProtocolError,
    Timeout,
)
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, Statistics

if TYPE_CHECKING:
    from ..proxy import ProxyInfo

__all__ = ["CancelToken", "Connection", "connect"]

_BUFFER_SIZE = 64 * 1024
"""Size of the reusable receive buffer: one read takes up to this many bytes (STYLE §10)."""

_JOIN_LIMIT = 64 * 1024
"""Without ``sendmsg`` (TLS), queued chunks up to this total are joined into one write."""

try:
    _IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, OSError, ValueError):
    _IOV_MAX = 16
if _IOV_MAX <= 0:
    _IOV_MAX = 16

_USE_RCVTIMEO = sys.platform != "win32" and hasattr(socket, "SO_RCVTIMEO")
_TIMEVAL = struct.Struct("@ll")
_LINGER_ABORT = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
_MIN_WAIT = 1e-6
"""A receive with no time left still makes one attempt; the kernel rounds this up to a tick."""

# What a read raises when SO_RCVTIMEO runs out (TLS: OpenSSL saw EAGAIN underneath).
_TIMED_OUT = (BlockingIOError, _ssl.SSLWantReadError)
_RESETS = (ConnectionResetError, ConnectionAbortedError)


# What a non-blocking connect() answers while the handshake is under way.
# (Not EWOULDBLOCK on POSIX: there it is EAGAIN, which connect() uses for "no free local port".)
_IN_PROGRESS = frozenset({errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", errno.EINPROGRESS)})


class CancelToken:
    """A one-shot cancel switch that another thread flips (``CSocket::CancelBlockingCall``).

    Pass it to :func:`connect` to make the connect (and TLS handshake) cancellable;
    the token then stays attached to the :class:`Connection`, so the same
    :meth:`cancel` also cancels the connection's blocking calls (see
    :meth:`Connection.cancel`).  It can also be given to
    :class:`~msgsock.sync.SocketFile`.  One token may serve several objects: cancelling
    it cancels all of them.  It cannot be reset; make a new token for new work.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next_key = 0

    def __repr__(self) -> str:
        return f"<CancelToken {'cancelled' if self._cancelled else 'active'}>"

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Cancel, from any thread, everything this token is attached to.  Idempotent; never blocks."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            callback()

    def _subscribe(self, callback: Callable[[], object]) -> int | None:
        """Call ``callback`` on :meth:`cancel` (at once if already cancelled: then None is returned)."""
        with self._lock:
            if not self._cancelled:
                key = self._next_key
                self._next_key += 1
                self._callbacks[key] = callback
                return key
        callback()
        return None

    def _unsubscribe(self, key: int | None) -> None:
        """Forget a callback (a closed object must not be kept alive by a long-lived token)."""
        if key is not None:
            with self._lock:
                self._callbacks.pop(key, None)


def _nbytes(chunk: bytes | bytearray | memoryview) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def _address(getter: Any) -> Any:
    try:
        return getter()
    except OSError:  # already reset: the server passes the address accept() returned
        return None


def _describe_os_error(exc: OSError) -> str:
    """A short reason for a connection that failed with ``exc`` (for logs and ConnectionClosed)."""
    if isinstance(exc, _RESETS):
        return "connection reset by peer"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe: the peer is gone"
    return exc.strerror or str(exc) or type(exc).__name__


class Connection:
    """A framed, blocking connection over a connected stream socket (SPEC §5.2).

    Use :func:`connect` to open one; servers wrap accepted sockets directly.  The
    socket is put in blocking mode (timeouts are per call, see the module notes) and
    ``TCP_NODELAY`` is set.

    Args:
        sock: a connected ``SOCK_STREAM`` socket (or ``ssl.SSLSocket``); the connection
            owns it from now on.
        frame: the frame format both peers use.
        limits: limits in force; ``close_timeout`` bounds :meth:`close`.
        cancel: a :class:`CancelToken` whose ``cancel()`` calls :meth:`cancel` (at once
            if the token is already cancelled).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        cancel: CancelToken | None = None,
    ) -> None:
        sock.settimeout(None)
        set_nodelay(sock)
        self._sock = sock
        self._protocol = MessageProtocol(frame, limits=limits)
        # _send_call: held by the one public send()/send_eof() in progress (a second one
        # raises ConcurrencyError); _send_lock: held while writing, by that call or by
        # close()/the server's flushes, which wait for each other.
        self._send_call = threading.Lock()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._buffer = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._messages: deque[Any] = deque()
        self._peer_address: Any = _address(sock.getpeername)
        self._local_address: Any = _address(sock.getsockname)
        self._proxy_info: ProxyInfo | None = None  # set by a server with proxy_protocol
        self._tls = isinstance(sock, _ssl.SSLSocket)
        self._use_sendmsg = hasattr(sock, "sendmsg") and not self._tls
        # CPython retries a blocking TLS read that hits SO_RCVTIMEO, so TLS waits in select().
        self._use_rcvtimeo = _USE_RCVTIMEO and not self._tls
        self._rcvtimeo: float | None = None  # the SO_RCVTIMEO in force; None = none
        # How each side ended, kept so later calls raise again (a fresh exception each time).
        self._rx_end: ConnectionClosed | None = None  # receiving: EOF, reset or error
        self._broken: ConnectionClosed | None = None  # the whole connection failed
        self._user_eof = False  # send_eof()/close() was called: sending again is misuse
        self._closing = False
        self._aborted = False
        self._abort_reason = "aborted by this side"
        self._abort_by_user = False
        self._sock_closed = False
        self._discard = False  # drop what arrives: we are closing, no reply can go out
        self._discarded = 0
        # Server graceful stop (see ThreadedServer.shutdown): EOF goes out as soon as the
        # connection next waits for data, never in the middle of writing replies.
        self._stop_requested = False
        self._waiting = False
        self._eof_after_send = False
        # Server connections enforce limits.idle_timeout and message_timeout (SPEC §7).
        self._enforce_limits = False
        self._frame_start = 0.0
        self._cancelled = False
        # Last, once the connection is whole: an already-cancelled token cancels at once.
        self._token = cancel
        self._token_key = cancel._subscribe(self.cancel) if cancel is not None else None

    def __repr__(self) -> str:
        state = "closed" if self._sock_closed else "cancelled" if self._cancelled else "open"
        return f"<Connection {format_address(self._peer_address)} {state}>"

    # -- properties -------------------------------------------------------------------

    @property
    def peer_address(self) -> Any:
        """The peer's address (host, port[, flowinfo, scope_id]).

        On a server with ``proxy_protocol``, the client the PROXY header named (the
        socket's own peer, the proxy, for a ``LOCAL`` or ``UNKNOWN`` header); see
        :attr:`proxy_info`.
        """
        return self._peer_address

    @property
    def proxy_info(self) -> ProxyInfo | None:
        """The PROXY header this connection began with (server with ``proxy_protocol``), else None."""
        return self._proxy_info

    @property
    def local_address(self) -> Any:
        """Our socket address."""
        return self._local_address

    @property
    def closed(self) -> bool:
        """True once the socket is closed: by :meth:`close`, :meth:`abort` or a protocol error."""
        return self._sock_closed

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called (then only :meth:`close` is valid)."""
        return self._cancelled

    @property
    def frame(self) -> FrameFormat:
        """The frame format in use."""
        return self._protocol.frame

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self._protocol.limits

    @property
    def discarded(self) -> int:
        """Messages received but never delivered because the connection was closing."""
        return self._discarded

    def statistics(self) -> Statistics:
        """Return a copy of this connection's counters (headers included in byte counts)."""
        return dataclasses.replace(self._protocol.stats)

    # -- sending ----------------------------------------------------------------------

    def send(self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None) -> None:
        """Send one message; return when the whole frame has been handed to the kernel.

        A large body is written from the caller's buffer, not copied.

        Args:
            message: the body.  A :class:`~msgsock.framing.Message` brings its header.
            header: values of the format's extra header fields (missing ones are 0).

        Raises:
            MessageTooLarge: the body is above ``max_size`` (nothing was sent; the
                connection is still usable).
            InvalidFormat: unknown header fields or values that do not fit.
            InvalidState: after :meth:`send_eof` or :meth:`close`.
            ConnectionClosed: the connection was reset or failed (``clean=False``), or a
                stopping server closed its sending side (``clean=True``).
            Cancelled: :meth:`cancel` was called, during this send or before it.
            ConcurrencyError: another thread is sending on this connection (raised at
                once; nothing of this message was sent).
        """
        if self._cancelled:
            raise self._cancel_error("send")
        if not self._send_call.acquire(blocking=False):
            raise ConcurrencyError("another thread is already sending on this connection")
        try:
            with self._send_lock:
                if self._cancelled:
                    raise self._cancel_error("send")
                if self._protocol.eof_sent or self._broken is not None or self._sock_closed:
                    raise self._cannot_send()
                self._protocol.send_message(message, header)
                self._flush_locked()
                if self._eof_after_send:
                    self._send_stop_eof_locked()
        finally:
            self._send_call.release()

    def send_eof(self) -> None:
        """Shut down the sending side (half-close); receiving still works.

        This is the Winsock "shutdown send side" (seed 004): the peer reads to the end
        of everything sent, then sees EOF.  Idempotent.

        Raises:
            InvalidState: on a TLS connection (Python's ``ssl`` cannot half-close).
            ConnectionClosed: the connection is closed or failed.
            Cancelled: :meth:`cancel` was called.
            ConcurrencyError: another thread is sending on this connection.
        """
        if self._cancelled:
            raise self._cancel_error("send_eof")
        if not self._send_call.acquire(blocking=False):
            raise ConcurrencyError("another thread is sending on this connection; send_eof() would wait")
        try:
            with self._send_lock:
                if self._cancelled:
                    raise self._cancel_error("send_eof")
                if self._broken is not None or self._sock_closed:
                    raise self._cannot_send()
                if self._tls:
                    raise InvalidState("half-close is not supported over TLS; use close()")
                self._user_eof = True
                if self._protocol.eof_sent:
                    return
                self._flush_locked()
                self._protocol.send_eof()
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    raise self._failed(exc) from exc
        finally:
            self._send_call.release()

    def _cannot_send(self) -> Exception:
        if self._broken is not None:
            return ConnectionClosed(False, self._broken.reason)
        if self._aborted and not self._abort_by_user:
            return ConnectionClosed(False, self._abort_reason)
        if self._user_eof or self._closing:
            return InvalidState("cannot send after send_eof(), close() or abort()")
        return ConnectionClosed(True, "the sending side was closed (server shutting down)")

    def _flush(self) -> None:
        """Write everything queued in the protocol (the server's batched replies)."""
        with self._send_lock:
            if self._protocol.outgoing_size:
                self._flush_locked()

    def _flush_locked(self) -> None:
        chunks = self._protocol.data_to_send()
        if not chunks:
            return
        try:
            self._write(chunks)
        except OSError as exc:
            raise self._failed(exc) from exc

    def _write(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Write all chunks: one ``sendall`` or ``sendmsg`` call in the usual case (SPEC §8)."""
        sock = self._sock
        if len(chunks) == 1:
            sock.sendall(chunks[0])
            return
        if not self._use_sendmsg:
            # TLS: join the small pieces (one record, one syscall); write big bodies as is.
            pending: list[bytes | bytearray | memoryview] = []
            size = 0
            for chunk in chunks:
                n = _nbytes(chunk)
                if n >= _JOIN_LIMIT:
                    if pending:
                        sock.sendall(b"".join(pending))
                        pending, size = [], 0
                    sock.sendall(chunk)
                    continue
                pending.append(chunk)
                size += n
                if size >= _JOIN_LIMIT:
                    sock.sendall(b"".join(pending))
                    pending, size = [], 0
            if pending:
                sock.sendall(b"".join(pending))
            return
        # A blocking sendmsg writes everything unless a signal interrupts it; then
        # resume where the kernel stopped (KB Q185728: never lose bytes on partial sends).
        while chunks:
            batch = chunks[:_IOV_MAX] if len(chunks) > _IOV_MAX else chunks
            sent = sock.sendmsg(batch)
            done = 0
            for chunk in batch:
                n = _nbytes(chunk)
                if sent < n:
                    break
                sent -= n
                done += 1
            chunks = chunks[done:]
            if sent:
                chunks[0] = memoryview(chunks[0]).cast("B")[sent:]

    # -- receiving --------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Any:
        """Return the next message: ``bytes``, or a :class:`~msgsock.framing.Message`
        (with ``.header``) when the format has extra header fields.

        Args:
            timeout: seconds to wait for a complete message; None waits for ever.  On
                timeout the connection stays usable: bytes of a partial frame are kept.

        Raises:
            Timeout: no complete message within ``timeout``.
            ConnectionClosed: the peer closed at a frame boundary (``clean=True``); it
                reset, or closed in the middle of a frame (``clean=False``, with the
                :class:`~msgsock.exceptions.IncompleteMessage` as ``__cause__``); or
                the connection was closed here.
            ProtocolError: the peer broke the frame format (e.g.
                :class:`~msgsock.exceptions.MessageTooLarge`); the connection is then
                closed and later calls raise ``ConnectionClosed``.
            ConcurrencyError: another thread is receiving on this connection.
            Cancelled: :meth:`cancel` was called, during this receive or before it
                (messages already received are not delivered any more).
        """
        if self._cancelled:
            raise self._cancel_error("receive")
        messages = self._messages
        if self._closing and not messages:
            raise self._local_closed()
        if not self._recv_lock.acquire(blocking=False):
            raise ConcurrencyError("another thread is already receiving on this connection")
        try:
            if messages:
                return messages.popleft()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not messages:
                messages.extend(self._read(deadline, timeout))
                if not messages and deadline is not None and time.monotonic() >= deadline:
                    # Bytes trickling in must not stretch the timeout; they stay decoded so far.
                    raise Timeout(f"no complete message within {timeout:g} s")
            return messages.popleft()
        finally:
            self._recv_lock.release()

    def __iter__(self) -> Iterator[Any]:
        """Yield messages until the peer closes cleanly.

        Raises:
            ConnectionClosed: the connection ended abnormally (``clean=False``).
            ProtocolError: as :meth:`receive`.
            Cancelled: :meth:`cancel` was called.
        """
        while True:
            try:
                message = self.receive()
            except ConnectionClosed as exc:
                if exc.clean:
                    return
                raise
            yield message

    def _receive_batch(self) -> list[Any]:
        """Return every message of one read (queued ones first): the server's per-read batch.

        Only the connection's own server thread calls this, so no receive lock.
        """
        if self._messages:
            batch = list(self._messages)
            self._messages.clear()
            return batch
        return self._read(None, None)

    def _read(self, deadline: float | None, timeout: float | None) -> list[Any]:
        """One read: feed the decoder, return the messages it completed (maybe none)."""
        view, discard = self._read_chunk(deadline, timeout)
        protocol = self._protocol
        in_frame = protocol.in_frame
        try:
            messages = protocol.receive_data(view)
        except ProtocolError as exc:
            self._protocol_failed(exc)
        if self._enforce_limits and protocol.in_frame and (messages or not in_frame):
            self._frame_start = time.monotonic()  # a new frame started in this read
        if discard and messages:
            self._discarded += len(messages)
            return []
        return messages

    def _read_and_reply(self, handler: Callable[[Any], Any]) -> bytes:
        """The threaded server's per-read step: read once, run ``handler`` on every
        message, return the encoded replies to write in one call (SPEC §8).

        Raises:
            TypeError: the handler returned something that is neither bytes-like nor None.
            ConnectionClosed, ProtocolError: as :meth:`_read`; whatever ``handler`` raises.
        """
        view, discard = self._read_chunk(None, None)
        protocol = self._protocol
        if discard:  # stopping: what arrives after our EOF cannot be answered
            in_frame = protocol.in_frame
            try:
                messages = protocol.receive_data(view)
            except ProtocolError as exc:
                self._protocol_failed(exc)
            self._discarded += len(messages)
            if self._enforce_limits and protocol.in_frame and (messages or not in_frame):
                self._frame_start = time.monotonic()
            return b""
        in_frame = protocol.in_frame
        before = protocol.stats.messages_received
        try:
            out, other, _ = protocol.receive_and_reply(view, handler)
        except ProtocolError as exc:
            if exc is protocol.error:  # the peer's bytes, not the handler's reply
                self._protocol_failed(exc)
            raise
        if (
            self._enforce_limits
            and protocol.in_frame
            and (protocol.stats.messages_received != before or not in_frame)
        ):
            self._frame_start = time.monotonic()  # a new frame started in this read
        if other is not None:
            raise TypeError(f"handler returned {type(other).__name__}; expected bytes or None")
        return out

    def _write_reply(self, data: bytes) -> None:
        """Write what :meth:`_read_and_reply` returned (under the send lock)."""
        with self._send_lock:
            try:
                self._write([data])
            except OSError as exc:
                raise self._failed(exc) from exc

    def _read_chunk(self, deadline: float | None, timeout: float | None) -> tuple[memoryview, bool]:
        """Read once into the buffer; return the bytes read and whether to discard what they hold.

        Raises:
            ConnectionClosed: end of stream (clean at a frame boundary), reset, or closed.
            ProtocolError: the error the previous read found after its whole messages.
        """
        if self._rx_end is not None:
            raise ConnectionClosed(self._rx_end.clean, self._rx_end.reason)
        if self._sock_closed:
            raise self._local_closed()
        if self._protocol.error is not None:
            # The last read held whole messages then a bad header: those were returned;
            # now the error, without waiting for more bytes.
            self._protocol_failed(self._protocol.error)
        with self._state_lock:
            self._waiting = True
            stop = self._stop_requested
            if stop:
                self._discard = True
        try:
            if stop:
                self._stop_sending()
            n = self._recv_into(deadline, timeout)
        except ValueError:
            # Another thread closed the socket under us (ssl and select say ValueError).
            if self._cancelled:
                raise self._cancel_error("receive") from None
            if self._sock_closed:
                raise self._local_closed() from None
            raise
        finally:
            with self._state_lock:
                self._waiting = False
                discard = self._discard
        if n == 0:
            if self._cancelled:  # our own shutdown(), not the peer's EOF
                raise self._cancel_error("receive")
            if self._sock_closed:
                raise self._local_closed()
            try:
                self._protocol.receive_eof()
            except ProtocolError as exc:  # IncompleteMessage
                self._rx_end = self._broken = ConnectionClosed(False, f"incomplete message: {exc}")
                raise ConnectionClosed(False, self._rx_end.reason) from exc
            self._rx_end = ConnectionClosed(True, "the peer closed the connection")
            raise ConnectionClosed(True, self._rx_end.reason)
        return self._view[:n], discard

    def _receive_initial(self, data: bytes) -> None:
        """Take bytes that arrived with a handshake's last read: the start of the frames.

        Raises:
            ProtocolError: they break the frame format (the connection is then closed).
        """
        if not data:
            return
        protocol = self._protocol
        try:
            messages = protocol.receive_data(data)
        except ProtocolError as exc:
            self._protocol_failed(exc)
        if self._enforce_limits and protocol.in_frame:
            self._frame_start = time.monotonic()
        self._messages.extend(messages)

    def _protocol_failed(self, exc: ProtocolError) -> NoReturn:
        # A bad frame is terminal (STYLE §4): the stream position is lost.
        self._rx_end = self._broken = ConnectionClosed(False, str(exc))
        self._terminate(reset=True)
        raise exc

    def _recv_into(self, deadline: float | None, timeout: float | None) -> int:
        """Read once into the buffer within the deadline and the limits; 0 means EOF."""
        if deadline is None and not self._enforce_limits:
            if self._rcvtimeo is not None:
                self._set_recv_timeout(None)
            try:
                return self._sock.recv_into(self._view)
            except OSError as exc:
                raise self._failed(exc) from exc
        now = time.monotonic()
        limit_at: float | None = None
        idle = True  # which limit limit_at is
        limits = self._protocol.limits
        if self._enforce_limits:
            if limits.idle_timeout is not None:
                limit_at = now + limits.idle_timeout
            if limits.message_timeout is not None and self._protocol.in_frame:
                at = self._frame_start + limits.message_timeout
                if limit_at is None or at < limit_at:
                    limit_at = at
                    idle = False
        if limit_at is not None and now >= limit_at:
            # Checked before reading, so a peer trickling bytes cannot stretch the limit.
            raise self._limit_breached(idle)
        end = limit_at if deadline is None else deadline if limit_at is None else min(deadline, limit_at)
        if end is None:
            if self._rcvtimeo is not None:
                self._set_recv_timeout(None)
            try:
                return self._sock.recv_into(self._view)
            except OSError as exc:
                raise self._failed(exc) from exc
        while True:
            try:
                return self._recv_wait(max(end - now, _MIN_WAIT))
            except _TIMED_OUT:
                pass
            except OSError as exc:
                raise self._failed(exc) from exc
            now = time.monotonic()
            if now >= end:
                break
        if limit_at is not None and now >= limit_at:
            raise self._limit_breached(idle)
        raise Timeout(f"no complete message within {timeout:g} s")

    def _limit_breached(self, idle: bool) -> ConnectionClosed:
        limits = self._protocol.limits
        if idle:
            return self._fail(f"idle timeout: no data for {limits.idle_timeout:g} s")
        return self._fail(
            f"message timeout: a message started {limits.message_timeout:g} s ago is still "
            f"incomplete ({self._protocol._decoder.buffered} bytes of it received)"
        )

    def _recv_wait(self, wait: float) -> int:
        """``recv_into`` that waits at most about ``wait`` seconds.

        Raises:
            BlockingIOError, ssl.SSLWantReadError: the wait ran out.
            OSError: the read failed.
        """
        sock = self._sock
        if self._use_rcvtimeo:
            current = self._rcvtimeo
            # Deadlines move by microseconds between reads; re-arming the kernel timer
            # for that would cost a syscall per read for nothing.
            if current is None or abs(current - wait) > 0.001 + 0.01 * wait:
                self._set_recv_timeout(wait)
            return sock.recv_into(self._view)
        if not (self._tls and sock.pending()):  # type: ignore[attr-defined]
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                raise BlockingIOError(errno.EAGAIN, "receive timed out")
        return sock.recv_into(self._view)

    def _set_recv_timeout(self, seconds: float | None) -> None:
        if seconds is None:
            sec, usec = 0, 0  # 0 = no timeout
        else:
            seconds = min(seconds, 1e8)
            sec = int(seconds)
            usec = max(int((seconds - sec) * 1_000_000), 0 if sec else 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(sec, usec))
        self._rcvtimeo = seconds

    # -- failures ---------------------------------------------------------------------

    def _cancel_error(self, operation: str | None = None) -> Cancelled:
        prefix = f"{operation}: " if operation else ""
        return Cancelled(
            f"{prefix}the connection was cancelled (Connection.cancel); only close() is valid now"
        )

    def _local_closed(self) -> ConnectionClosed:
        if self._aborted:
            return ConnectionClosed(False, self._abort_reason)
        if self._broken is not None:
            return ConnectionClosed(False, self._broken.reason)
        return ConnectionClosed(True, "the connection was closed by this side")

    def _failed(self, exc: OSError) -> ConnectionClosed | Cancelled:
        """Translate an OSError from the socket (once, here: STYLE §4) and mark the connection failed."""
        if self._cancelled:  # the error is our own shutdown() waking this call
            return self._cancel_error()
        if self._sock_closed:
            return self._local_closed()
        reason = _describe_os_error(exc)
        self._broken = ConnectionClosed(False, reason)
        if self._rx_end is None:
            self._rx_end = self._broken
        return ConnectionClosed(False, reason)

    def _fail(self, reason: str) -> ConnectionClosed:
        """End the connection abnormally now (a limit was breached): reset and report why."""
        self._broken = ConnectionClosed(False, reason)
        if self._rx_end is None:
            self._rx_end = self._broken
        self._terminate(reset=True)
        return ConnectionClosed(False, reason)

    # -- closing ----------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Close gracefully: flush, send EOF, read to the peer's EOF, then close the socket.

        Messages that arrive meanwhile are discarded (counted in :attr:`discarded`).
        If the peer does not close within ``timeout`` the socket is closed anyway.
        Idempotent; another thread blocked in :meth:`receive` gets ``ConnectionClosed``.

        Args:
            timeout: seconds to wait for the peer's EOF; default ``limits.close_timeout``.
        """
        self._close(timeout)

    def _close(self, timeout: float | None) -> bool:
        """Close; return True when the peer's EOF was seen (a fully graceful close)."""
        with self._state_lock:
            if self._closing:
                return False
            self._closing = True
            self._discard = True
        if timeout is None:
            timeout = self._protocol.limits.close_timeout
        deadline = time.monotonic() + timeout
        graceful = False
        try:
            # After cancel() the stream position is lost and both directions are shut.
            if self._broken is None and not self._sock_closed and not self._cancelled:
                graceful = self._close_gracefully(deadline)
        finally:
            leftover = len(self._messages)
            if leftover:
                self._discarded += leftover
                self._messages.clear()
            self._terminate(reset=False)
        return graceful

    def _close_gracefully(self, deadline: float) -> bool:
        # 1. Our EOF, after whatever another thread is sending right now.
        if not self._send_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            return False
        try:
            self._user_eof = True
            if self._cancelled:  # cancel() woke the send we waited for
                return False
            if self._tls:
                # Python's ssl cannot half-close: closing sends the TCP FIN after the data.
                return self._rx_end is not None and self._rx_end.clean
            if not self._protocol.eof_sent:
                self._flush_locked()
                self._protocol.send_eof()
                self._sock.shutdown(socket.SHUT_WR)
        except (OSError, ConnectionClosed, Cancelled):
            return False
        finally:
            self._send_lock.release()
        # 2. Read to the peer's EOF (seed 004: "receive until the peer closes").  A
        # thread already receiving gets the EOF itself; then the lock is ours.
        if not self._recv_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            return False
        try:
            while self._rx_end is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    self._read(deadline, remaining)
                except (Timeout, Cancelled):  # cancel() cuts a close short too
                    return False
                except (ConnectionClosed, ProtocolError):
                    break
            return self._rx_end is not None and self._rx_end.clean
        finally:
            self._recv_lock.release()

    def cancel(self) -> None:
        """Cancel, from any thread, the blocking calls on this connection (``CancelBlockingCall``).

        A thread blocked in :meth:`receive`, :meth:`send` or :meth:`send_eof` wakes
        and raises :class:`~msgsock.exceptions.Cancelled`; so does every later call of
        those, because the socket is shut down both ways (``shutdown(SHUT_RDWR)``, see
        the module notes): the peer sees our end of stream now, a send cut off in the
        middle leaves it an incomplete frame, and messages not yet delivered are lost.
        Only :meth:`close` (which then closes at once, without the graceful
        exchange) and :meth:`abort` remain useful.  A :meth:`close` waiting for the
        peer's EOF in another thread returns at once.  Idempotent; never blocks; does
        nothing once the connection is closed.
        """
        with self._state_lock:
            if self._cancelled or self._sock_closed:
                return
            self._cancelled = True
            # Under the state lock, so the socket cannot be closed (and its descriptor
            # reused) between the check and the shutdown.  socket.socket.shutdown, not
            # SSLSocket.shutdown, which would drop the TLS state under a blocked reader.
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already reset: a blocked call has seen that failure itself

    def abort(self) -> None:
        """Close at once with a reset (``SO_LINGER`` 0): unsent data is dropped.  Idempotent."""
        self._abort("aborted by this side", by_user=True)

    def _abort(self, reason: str, *, by_user: bool = False) -> None:
        with self._state_lock:
            if self._sock_closed:
                return
            self._closing = True
            self._discard = True
            if not self._aborted:
                self._aborted = True
                self._abort_by_user = by_user
                self._abort_reason = reason
        self._terminate(reset=True)

    def _terminate(self, *, reset: bool) -> None:
        """Close the socket now, waking any thread blocked on it."""
        with self._state_lock:
            if self._sock_closed:
                return
            self._sock_closed = True
        if self._token is not None:
            self._token._unsubscribe(self._token_key)
        sock = self._sock
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            # close() alone does not wake a thread blocked in recv/send on Linux.
            # SHUT_RD wakes readers and sends nothing; SHUT_WR (a FIN) only when some
            # thread may be blocked writing.
            sock.shutdown(socket.SHUT_RDWR if self._send_lock.locked() else socket.SHUT_RD)
        except OSError:
            pass
        sock.close()

    def _request_stop(self) -> None:
        """Server shutdown: send EOF as soon as no reply is being written (now, if idle)."""
        with self._state_lock:
            self._stop_requested = True
            now = self._waiting
            if now:
                self._discard = True
        if now:
            self._stop_sending(wait=False)

    def _stop_sending(self, *, wait: bool = True) -> None:
        """Send EOF for a server shutdown.  Never blocks when ``wait`` is False: if another
        thread is sending, that thread sends the EOF when it is done."""
        if not self._send_lock.acquire(blocking=wait):
            self._eof_after_send = True
            return
        try:
            self._send_stop_eof_locked()
        finally:
            self._send_lock.release()

    def _send_stop_eof_locked(self) -> None:
        if self._protocol.eof_sent or self._broken is not None or self._sock_closed:
            return
        try:
            self._flush_locked()
            self._protocol.send_eof()
            self._sock.shutdown(socket.SHUT_WR)
        except (OSError, ConnectionClosed, Cancelled):
            pass  # the reader sees the failure on its next call

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _CancellableWait:
    """Waits on one socket for a connect or handshake, until a deadline or a token's cancel.

    The socket is non-blocking; a wake-up socket pair is the second thing waited on,
    and the token's callback writes to it.  A byte in a socket is state, so a cancel
    that lands before the wait starts is seen too (no lost wake-up).
    """

    def __init__(self, token: CancelToken, timeout: float | None) -> None:
        self._token = token
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()  # not select(): no FD_SETSIZE limit
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._key = token._subscribe(self._wake)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (already woken) or closed (already done)

    def check(self, address: Any) -> None:
        """Raise Cancelled if the token was cancelled."""
        if self._token.cancelled:
            raise Cancelled(f"connecting to {format_address(address)} was cancelled")

    def wait(self, sock: socket.socket, address: Any, *, write: bool) -> None:
        """Wait until ``sock`` is writable (``write``) or readable.

        Raises:
            Cancelled: the token was cancelled.
            TimeoutError: the deadline passed.
        """
        # On Windows a failed connect shows only as "exceptional"; the selector then
        # watches that too for EVENT_WRITE (SelectSelector passes the write set twice).
        self._selector.register(sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ)
        try:
            while True:
                self.check(address)
                timeout = None if self._deadline is None else self._deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                events = self._selector.select(timeout)
                self.check(address)
                if any(key.fileobj is sock for key, _ in events):
                    return
        finally:
            self._selector.unregister(sock)

    def close(self) -> None:
        self._token._unsubscribe(self._key)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _connect_cancellable(
    sock: socket.socket,
    address: Any,
    waiter: _CancellableWait,
    ssl: _ssl.SSLContext | None,
    server_hostname: str,
) -> socket.socket:
    """Non-blocking connect (and TLS handshake) of ``sock``, each wait cancellable.

    Raises:
        Cancelled, TimeoutError: from the waits.
        OSError: the connect failed (e.g. ``ConnectionRefusedError``).
        ssl.SSLError: the handshake failed.
    """
    sock.setblocking(False)
    waiter.check(address)
    error = sock.connect_ex(address)
    if error in _IN_PROGRESS:
        waiter.wait(sock, address, write=True)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    if ssl is None:
        return sock
    # wrap_socket detaches ``sock``: from here on only ``tls`` can close the descriptor.
    tls = ssl.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except _ssl.SSLWantReadError:
                waiter.wait(tls, address, write=False)
            except _ssl.SSLWantWriteError:
                waiter.wait(tls, address, write=True)
    except BaseException:
        tls.close()
        raise


_HANDSHAKE_READ = 4096
"""Bytes one read of the authentication handshake may take (a hello is 45 bytes)."""


def _time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (None: no deadline).

    Raises:
        TimeoutError: it has passed.
    """
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    return left


def _authenticate(
    sock: socket.socket,
    key: bytes,
    address: Any,
    deadline: float | None,
    waiter: _CancellableWait | None,
) -> bytes:
    """Run the client side of the authentication handshake (SPEC §4.2) on a connected socket.

    The socket is blocking with timeouts (``waiter`` None: each call gets the time
    left until ``deadline``) or non-blocking (each wait goes through ``waiter``).

    Returns:
        The bytes that followed the handshake: the start of the frames.

    Raises:
        HandshakeError: the server refused our key, failed to prove its own, or does
            not speak the handshake (a reset during it is reported this way too,
            with the ``OSError`` as ``__cause__``).
        TimeoutError, Cancelled: from the waits.
        ssl.SSLError: a TLS failure (e.g. TLS 1.3: the server refused our certificate).
        OSError: another network error.
    """
    handshake = ClientHandshake(key, new_nonce())

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            if waiter is None:
                sock.settimeout(_time_left(deadline))
                sock.sendall(view)
                return
            try:
                view = view[sock.send(view) :]
            except (BlockingIOError, _ssl.SSLWantWriteError):
                waiter.wait(sock, address, write=True)
            except _ssl.SSLWantReadError:
                waiter.wait(sock, address, write=False)

    def receive() -> bytes:
        while True:
            if waiter is None:
                sock.settimeout(_time_left(deadline))
                return sock.recv(_HANDSHAKE_READ)
            try:
                return sock.recv(_HANDSHAKE_READ)
            except (BlockingIOError, _ssl.SSLWantReadError):
                waiter.wait(sock, address, write=False)

    try:
        return run_blocking(handshake, send, receive)
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
        # The server hung up on us (a server without a key refuses our hello at once):
        # say what the handshake was waiting for.
        try:
            handshake.receive_eof()
        except HandshakeError as error:
            raise error from exc
        raise


def connect(
    host: str = "127.0.0.1",
    port: int = 9898,
    *,
    frame: FrameFormat = DEFAULT_FORMAT,
    limits: Limits = DEFAULT_LIMITS,
    connect_timeout: float | None = 10.0,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    cancel: CancelToken | None = None,
    auth_key: bytes | None = None,
) -> Connection:
    """Connect to a message server and return the :class:`Connection`.

    ``host`` may be a name, a dotted IPv4 address or an IPv6 address; every address it
    resolves to is tried in order (SPEC §5.2, seed 001 note 4).  With ``ssl`` the TLS
    handshake, then with ``auth_key`` the authentication handshake (SPEC §4.2), run
    before this returns.

    TLS failures are raised as the :mod:`ssl` module reports them (e.g.
    :class:`ssl.SSLCertVerificationError`, whose ``verify_message`` says why the
    server's certificate was refused), not wrapped.  With TLS 1.3 a server that
    refuses *our* certificate says so only after the handshake: without
    ``auth_key`` that shows on the first :meth:`~Connection.receive` as
    :class:`~msgsock.exceptions.ConnectionClosed` with the TLS reason; with
    ``auth_key`` it is raised here as the :class:`ssl.SSLError`.

    Args:
        host: where to connect.
        port: TCP port.
        frame: the frame format both peers use.
        limits: limits for the connection.
        connect_timeout: seconds allowed for each address (TCP connect, TLS
            handshake and authentication handshake); None waits for ever.
        ssl: a client ``SSLContext`` to speak TLS.
        server_hostname: name to check the server certificate against; default ``host``.
        cancel: a :class:`CancelToken`: another thread's ``cancel.cancel()`` aborts
            the connect or TLS handshake in progress (name resolution itself is not
            interruptible; the token is checked before and after it), and the token
            stays attached to the returned connection (see :meth:`Connection.cancel`).
        auth_key: the shared key (at least 16 bytes) of a server that requires
            authentication (``msgsock.auth.parse_key_file`` reads a key file).

    Returns:
        The connected :class:`Connection` (``TCP_NODELAY`` on).

    Raises:
        socket.gaierror: ``host`` cannot be resolved.
        ConnectionRefusedError: nothing listens there (the last address's error).
        Timeout: the last address tried timed out.
        Cancelled: ``cancel`` was cancelled before the connection was made (no other
            address is tried).
        ssl.SSLError: the TLS handshake failed (not retried on other addresses;
            ``ssl.SSLCertVerificationError`` when the server's certificate is not
            trusted or has expired).
        HandshakeError: the authentication failed (not retried): "authentication
            failed: the server rejected our key", "...the peer does not know the key
            (bad server proof)", or a server that does not speak the handshake ("bad
            handshake magic ...", "connection closed by the peer before its
            authentication hello ...").
        ProtocolError: frames that arrived with the end of the handshake are malformed.
        ValueError: ``auth_key`` is shorter than 16 bytes.
        OSError: any other failure of the last address tried.
    """
    if cancel is not None and cancel.cancelled:
        raise Cancelled(f"connecting to {format_address((host, port))} was cancelled")
    if auth_key is not None:
        ClientHandshake(auth_key, new_nonce())  # a bad key fails here, before any I/O
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    hostname = server_hostname if server_hostname is not None else host
    error: OSError | None = None
    for family, type_, proto, _canonname, address in infos:
        sock = socket.socket(family, type_, proto)
        deadline = None if connect_timeout is None else time.monotonic() + connect_timeout
        authenticating = False
        rest = b""
        try:
            if cancel is None:
                sock.settimeout(connect_timeout)
                sock.connect(address)
                if ssl is not None:
                    sock = ssl.wrap_socket(sock, server_hostname=hostname)
                if auth_key is not None:
                    authenticating = True
                    rest = _authenticate(sock, auth_key, address, deadline, None)
            else:
                waiter = _CancellableWait(cancel, connect_timeout)
                try:
                    sock = _connect_cancellable(sock, address, waiter, ssl, hostname)
                    if auth_key is not None:
                        authenticating = True
                        rest = _authenticate(sock, auth_key, address, None, waiter)
                finally:
                    waiter.close()
        except TimeoutError:
            sock.close()
            error = connect_timeout_error(
                format_address(address), connect_timeout, authenticating=authenticating
            )
            if authenticating:  # the server is there but does not finish: not another address's job
                raise error from None
            continue
        except (_ssl.SSLError, Cancelled, HandshakeError):
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
            continue
        conn = Connection(sock, frame=frame, limits=limits, cancel=cancel)
        conn._receive_initial(rest)
        if conn.cancelled:  # cancelled before we return: the caller never gets a dead connection
            conn.abort()
            raise Cancelled(f"connecting to {format_address(address)} was cancelled")
        return conn
    assert error is not None  # getaddrinfo never returns an empty list
    raise error
