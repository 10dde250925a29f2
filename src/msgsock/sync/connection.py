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
- **Threads**: one lock per direction, so one thread may send while another receives;
  two receives at once raise :class:`~msgsock.exceptions.ConcurrencyError`.  Closing a
  socket does not wake a thread blocked on it (Linux), so closing first shuts down
  the read side (which wakes readers and sends nothing), and the write side too when
  another thread may be blocked sending.

``OSError`` is translated once, here (STYLE §4): a reset becomes
``ConnectionClosed(clean=False)``, a receive timeout :class:`~msgsock.exceptions.Timeout`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import ssl as _ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, NoReturn

from .._net import format_address, set_nodelay
from ..exceptions import ConcurrencyError, ConnectionClosed, InvalidState, ProtocolError, Timeout
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, Statistics

__all__ = ["Connection", "connect"]

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


def _nbytes(chunk: bytes | bytearray | memoryview) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def _address(getter: Any) -> Any:
    try:
        return getter()
    except OSError:  # already reset: the server passes the address accept() returned
        return None


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
    """

    def __init__(
        self, sock: socket.socket, *, frame: FrameFormat = DEFAULT_FORMAT, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        sock.settimeout(None)
        set_nodelay(sock)
        self._sock = sock
        self._protocol = MessageProtocol(frame, limits=limits)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._buffer = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._messages: deque[Any] = deque()
        self._peer_address: Any = _address(sock.getpeername)
        self._local_address: Any = _address(sock.getsockname)
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

    def __repr__(self) -> str:
        state = "closed" if self._sock_closed else "open"
        return f"<Connection {format_address(self._peer_address)} {state}>"

    # -- properties -------------------------------------------------------------------

    @property
    def peer_address(self) -> Any:
        """The peer's socket address (host, port[, flowinfo, scope_id])."""
        return self._peer_address

    @property
    def local_address(self) -> Any:
        """Our socket address."""
        return self._local_address

    @property
    def closed(self) -> bool:
        """True once the socket is closed: by :meth:`close`, :meth:`abort` or a protocol error."""
        return self._sock_closed

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
        """
        with self._send_lock:
            if self._protocol.eof_sent or self._broken is not None or self._sock_closed:
                raise self._cannot_send()
            self._protocol.send_message(message, header)
            self._flush_locked()
            if self._eof_after_send:
                self._send_stop_eof_locked()

    def send_eof(self) -> None:
        """Shut down the sending side (half-close); receiving still works.

        This is the Winsock "shutdown send side" (seed 004): the peer reads to the end
        of everything sent, then sees EOF.  Idempotent.

        Raises:
            InvalidState: on a TLS connection (Python's ``ssl`` cannot half-close).
            ConnectionClosed: the connection is closed or failed.
        """
        with self._send_lock:
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
        """
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
            if self._sock_closed:
                raise self._local_closed() from None
            raise
        finally:
            with self._state_lock:
                self._waiting = False
                discard = self._discard
        protocol = self._protocol
        if n == 0:
            if self._sock_closed:
                raise self._local_closed()
            try:
                protocol.receive_eof()
            except ProtocolError as exc:  # IncompleteMessage
                self._rx_end = self._broken = ConnectionClosed(False, f"incomplete message: {exc}")
                raise ConnectionClosed(False, self._rx_end.reason) from exc
            self._rx_end = ConnectionClosed(True, "the peer closed the connection")
            raise ConnectionClosed(True, self._rx_end.reason)
        in_frame = protocol.in_frame
        try:
            messages = protocol.receive_data(self._view[:n])
        except ProtocolError as exc:
            self._protocol_failed(exc)
        if self._enforce_limits and protocol.in_frame and (messages or not in_frame):
            self._frame_start = time.monotonic()  # a new frame started in this read
        if discard and messages:
            self._discarded += len(messages)
            return []
        return messages

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

    def _local_closed(self) -> ConnectionClosed:
        if self._aborted:
            return ConnectionClosed(False, self._abort_reason)
        if self._broken is not None:
            return ConnectionClosed(False, self._broken.reason)
        return ConnectionClosed(True, "the connection was closed by this side")

    def _failed(self, exc: OSError) -> ConnectionClosed:
        """Translate an OSError from the socket (once, here: STYLE §4) and mark the connection failed."""
        if self._sock_closed:
            return self._local_closed()
        if isinstance(exc, _RESETS):
            reason = "connection reset by peer"
        elif isinstance(exc, BrokenPipeError):
            reason = "broken pipe: the peer is gone"
        else:
            reason = exc.strerror or str(exc) or type(exc).__name__
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
            if self._broken is None and not self._sock_closed:
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
            if self._tls:
                # Python's ssl cannot half-close: closing sends the TCP FIN after the data.
                return self._rx_end is not None and self._rx_end.clean
            if not self._protocol.eof_sent:
                self._flush_locked()
                self._protocol.send_eof()
                self._sock.shutdown(socket.SHUT_WR)
        except (OSError, ConnectionClosed):
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
                except Timeout:
                    return False
                except (ConnectionClosed, ProtocolError):
                    break
            return self._rx_end is not None and self._rx_end.clean
        finally:
            self._recv_lock.release()

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
        except (OSError, ConnectionClosed):
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


def connect(
    host: str = "127.0.0.1",
    port: int = 9898,
    *,
    frame: FrameFormat = DEFAULT_FORMAT,
    limits: Limits = DEFAULT_LIMITS,
    connect_timeout: float | None = 10.0,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Connect to a message server and return the :class:`Connection`.

    ``host`` may be a name, a dotted IPv4 address or an IPv6 address; every address it
    resolves to is tried in order (SPEC §5.2, seed 001 note 4).

    Args:
        host: where to connect.
        port: TCP port.
        frame: the frame format both peers use.
        limits: limits for the connection.
        connect_timeout: seconds allowed for each address (TCP connect plus TLS
            handshake); None waits for ever.
        ssl: a client ``SSLContext`` to speak TLS.
        server_hostname: name to check the server certificate against; default ``host``.

    Returns:
        The connected :class:`Connection` (``TCP_NODELAY`` on).

    Raises:
        socket.gaierror: ``host`` cannot be resolved.
        ConnectionRefusedError: nothing listens there (the last address's error).
        Timeout: the last address tried timed out.
        ssl.SSLError: the TLS handshake failed (not retried on other addresses).
        OSError: any other failure of the last address tried.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, type_, proto, _canonname, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(address)
            if ssl is not None:
                hostname = server_hostname if server_hostname is not None else host
                sock = ssl.wrap_socket(sock, server_hostname=hostname)
        except TimeoutError:
            sock.close()
            error = Timeout(f"connecting to {format_address(address)} timed out after {connect_timeout:g} s")
            continue
        except _ssl.SSLError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return Connection(sock, frame=frame, limits=limits)
    assert error is not None  # getaddrinfo never returns an empty list
    raise error
