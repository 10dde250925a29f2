"""Blocking framed connections (SPEC §5.2): :class:`Connection` (opened by :func:`connect`, in :mod:`.connect`).

Theory of operation.  A :class:`Connection` is a pump over the sans-I/O
:class:`~msgsock.protocol.MessageProtocol` (STYLE §1, §11): the protocol decides what
the connection does -- its stages, when it times out, how it ends and how that is
worded -- and the connection only moves bytes and does what the protocol says.

- **Receiving**: ``recv_into`` a reusable 64 KiB buffer, feed the bytes to
  ``protocol.receive_data``, hand the messages out one at a time.  The socket is
  read only while the application is in :meth:`Connection.receive` (or in
  :meth:`Connection.close`), so what waits for the application is at most one
  read's messages.  Bytes of an unfinished frame stay in the protocol's decoder:
  a receive that times out loses nothing.
- **Sending**: ``protocol.send_message``, then everything ``protocol.data_to_send()``
  holds leaves with one ``sendall`` or ``sendmsg`` (header and body apart: a large
  body is never copied, SPEC §4.1).  The blocking write is the flow control: a
  peer that does not read holds up the sender, never our reading.
- **Stages** (SPEC §4.2, §7): TLS and the shared-key handshake are a
  :class:`~msgsock.stages.Stages` given to the protocol (no ssl socket): the
  handshake bytes and the TLS records come out of ``data_to_send()`` like any
  other.  :func:`connect` pumps the protocol until ``protocol.handshake_complete``
  or its end, within ``connect_timeout``.
- **Timeouts**: the socket stays in blocking mode (``settimeout`` would bound a
  concurrent send too).  A read that must not wait for ever sets the kernel's
  receive timeout (``SO_RCVTIMEO``: reads only, no extra system call per read) to
  the nearer of the caller's deadline and ``protocol.next_deadline(now)``; at that
  deadline ``protocol.check_timeouts(now)`` decides the idle, message, handshake
  and close timeouts (SPEC §7).  Where ``SO_RCVTIMEO`` is unreliable (Windows)
  ``select`` waits before the read.  A server's connections leave the timeouts to
  the server's one sweep (:class:`ServerConnection`).
- **Ending, threads, cancelling**: the base class, ``_ConnectionBase`` (in
  ``msgsock.sync._base``), owns the socket and its locks and does what the
  protocol's close state machine says; its module notes say how, and how the
  locks let one thread send while another receives and a third cancels.

``OSError`` is translated once, by the protocol (``connection_lost``: STYLE §4): a
reset becomes ``ConnectionClosed(clean=False, kind=RESET)``; a receive timeout is
:class:`~msgsock.exceptions.Timeout`, any failure after :meth:`Connection.cancel`
:class:`~msgsock.exceptions.Cancelled`.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._net import check_timeout
from ..exceptions import ConcurrencyError, ConnectionClosed, Timeout
from ..protocol import Action, State
from ._base import _ConnectionBase
from .cancel import CancelToken

__all__ = ["CancelToken", "Connection", "ServerConnection", "connect"]

Handler = Callable[[Any], bytes | bytearray | memoryview | None]
"""A per-message handler: the reply to one message (None: no reply)."""

_JOIN_LIMIT = 64 * 1024
"""Without ``sendmsg``, queued chunks up to this total are joined into one write."""

try:
    _IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, OSError, ValueError):
    _IOV_MAX = 16
if _IOV_MAX <= 0:
    _IOV_MAX = 16

_USE_RCVTIMEO = sys.platform != "win32" and hasattr(socket, "SO_RCVTIMEO")
_HAS_SENDMSG = hasattr(socket.socket, "sendmsg")
_TIMEVAL = struct.Struct("@ll")
_MIN_WAIT = 1e-6
"""A receive with no time left still makes one attempt; the kernel rounds this up to a tick."""
_SECONDS = frozenset({int, float})
"""The timeout types receive() checks inline, without calling check_timeout (bool is not one of them)."""

_OPEN = State.OPEN


def _nbytes(chunk: bytes | bytearray | memoryview) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


class Connection(_ConnectionBase):
    """A framed, blocking connection over a connected stream socket (SPEC §5.2).

    Use :func:`connect` to open one; servers wrap accepted sockets.  The socket is put
    in blocking mode (timeouts are per call, see the module notes) and
    ``TCP_NODELAY`` is set.

    Args:
        sock: a connected ``SOCK_STREAM`` socket; the connection owns it from now on.
        frame: the frame format both peers use (when no ``protocol`` is given).
        limits: limits in force (when no ``protocol`` is given): the idle, message
            and close timeouts (SPEC §7); ``close_timeout`` bounds :meth:`close`.
        cancel: a :class:`CancelToken` whose ``cancel()`` calls :meth:`cancel` (at once
            if the token is already cancelled).
        protocol: the sans-I/O protocol to pump: a server's (from
            :meth:`~msgsock.serving.ServerProtocol.accept`) or one with
            :class:`~msgsock.stages.Stages`; default a plain one of ``frame`` and
            ``limits``.

    Attributes:
        protocol: the :class:`~msgsock.protocol.MessageProtocol` this connection
            pumps: its ``state``, ``end`` and ``stats`` say how the connection is.
    """

    # -- sending ----------------------------------------------------------------------

    def send(self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None) -> None:
        """Send one message; return when the whole frame has been handed to the kernel.

        A large body is written from the caller's buffer, not copied.

        Args:
            message: the body.  A :class:`~msgsock.framing.Message` brings its header.
            header: values of the format's extra header fields (missing ones are 0).

        Raises:
            OversizeMessage: the body is above ``max_size`` (nothing was sent; the
                connection is still usable).
            InvalidFormat: unknown header fields or values that do not fit.
            TypeError: ``message`` is not bytes-like.
            InvalidState: after :meth:`send_eof` (the sending side is closed; receiving goes on).
            ConnectionClosed: the connection has ended, or is ending (:meth:`close`,
                :meth:`abort`, or a stopping server closed its sending side); ``kind`` says how.
            Cancelled: :meth:`cancel` was called, during this send or before it.
            ConcurrencyError: another thread is sending on this connection (raised at
                once; nothing of this message was sent).
        """
        if self._cancelled:
            raise self._cancel_error("send")
        if not self._send_call.acquire(blocking=False):
            raise ConcurrencyError("another thread is already sending on this connection")
        try:
            proto = self.protocol
            self._write_lock.acquire()
            try:
                if self._cancelled:
                    raise self._cancel_error("send")
                with self._lock:
                    if proto.state is State.CLOSED:
                        raise proto.closed_error()
                    proto.send_message(message, header)
                try:
                    self._flush_locked()
                except OSError as exc:
                    raise self._failed(exc, "send") from exc
            finally:
                self._release_write()
            if proto.state is not _OPEN:
                self._settle()
        finally:
            self._send_call.release()

    def send_eof(self) -> None:
        """Shut down the sending side (half-close); receiving still works.

        This is the Winsock "shutdown send side" (seed 004): the peer reads to the end
        of everything sent, then sees EOF; the messages it still sends are received as
        usual until its own EOF.  Over TLS the ``close_notify`` goes first.  Idempotent.

        Raises:
            ConnectionClosed: the connection has ended (or :meth:`close` was called).
            Cancelled: :meth:`cancel` was called.
            ConcurrencyError: another thread is sending on this connection.
        """
        if self._cancelled:
            raise self._cancel_error("send_eof")
        if not self._send_call.acquire(blocking=False):
            raise ConcurrencyError("another thread is sending on this connection; send_eof() would wait")
        try:
            proto = self.protocol
            with self._write_lock:
                if self._cancelled:
                    raise self._cancel_error("send_eof")
                with self._lock:
                    if proto.state is State.CLOSED:
                        raise proto.closed_error()
                    proto.send_eof(keep_receiving=True)  # the core decides; TLS sends close_notify
                try:
                    self._flush_locked()
                    with self._lock:
                        action = proto.close_action
                    if action is Action.HALF_CLOSE:
                        self._sock.shutdown(socket.SHUT_WR)
                        with self._lock:
                            proto.eof_written()
                except OSError as exc:
                    raise self._failed(exc, "send_eof") from exc
            if proto.state is not _OPEN:
                self._settle()
        finally:
            self._send_call.release()

    def _write(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Write all chunks: one ``sendall`` or ``sendmsg`` call in the usual case (SPEC §8)."""
        sock = self._sock
        if len(chunks) == 1:
            sock.sendall(chunks[0])
            return
        if not _HAS_SENDMSG:
            # Join the small pieces (one syscall); write big bodies as they are.
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
            ConnectionClosed: the connection ended, as its ``kind`` says: the peer
                closed at a frame boundary (``clean=True``); it reset, closed in the
                middle of a frame (with the
                :class:`~msgsock.exceptions.IncompleteMessage` as ``__cause__``) or
                broke the frame format (e.g. ``MESSAGE_TOO_LARGE``, with the
                :class:`~msgsock.exceptions.MessageTooLarge` as ``__cause__``; the
                messages before the bad frame are delivered first); a timeout ended
                it; or it was closed here.
            ConcurrencyError: another thread is receiving on this connection.
            Cancelled: :meth:`cancel` was called, during this receive or before it
                (messages already received are not delivered any more).
            ValueError: ``timeout`` is negative or NaN.
            TypeError: ``timeout`` is not a number.
        """
        if timeout is not None and not (type(timeout) in _SECONDS and timeout >= 0):
            check_timeout(timeout)  # raises (or takes an unusual number type); the common case costs no call
        if self._cancelled:
            raise self._cancel_error("receive")
        if not self._recv_lock.acquire(blocking=False):
            raise ConcurrencyError("another thread is already receiving on this connection")
        try:
            messages = self._messages
            if not messages:
                proto = self.protocol
                deadline = None if timeout is None else time.monotonic() + timeout
                while not messages:
                    if proto.state is not _OPEN or proto.eof_received:
                        raise proto.closed_error()
                    messages.extend(self._pump_once(deadline))
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

    def _pump_once(self, deadline: float | None) -> list[Any]:
        """Read once, feed the protocol, do what it says; return the messages completed (maybe none).

        The read waits at most until ``deadline`` and the protocol's next timeout
        check, which runs after it (so bytes waiting in the socket count as activity).

        Raises:
            Cancelled: :meth:`cancel` was called (before or during the read).
        """
        proto = self.protocol
        if proto.state is not _OPEN:  # ended by another thread (a server's sweep) meanwhile
            self._settle()
            if self.closed:
                return []
        wait: float | None = None
        check_at = self._check_at
        if check_at is not None or deadline is not None:
            end = deadline if check_at is None else check_at if deadline is None else min(check_at, deadline)
            assert end is not None
            wait = max(end - time.monotonic(), _MIN_WAIT)
        messages: list[Any] = []
        try:
            n = self._recv(wait)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            n = -1
        except (OSError, ValueError) as exc:  # ValueError: select() on a socket closed meanwhile
            if self._cancelled:
                raise self._cancel_error("receive") from None
            if isinstance(exc, OSError):
                self._lost(exc)
            return messages
        if self._cancelled:  # our own shutdown(), not the peer's EOF
            raise self._cancel_error("receive")
        if n >= 0:
            with self._lock:
                if n:
                    messages = proto.receive_data(self._view[:n])
                else:
                    proto.receive_eof()
                staged = proto.stages is not None
            if staged:  # the stages may have bytes of their own to send (a handshake, a TLS record)
                self._output_pending = True
                self._flush_pending()
        if self._check_at is not None:
            now = time.monotonic()
            if now >= self._check_at:
                self._check(now)
        if proto.state is not _OPEN:
            self._settle()
        return messages

    def _recv(self, wait: float | None) -> int:
        """``recv_into`` the buffer, waiting at most about ``wait`` seconds (None: for ever).

        Raises:
            BlockingIOError: the wait ran out.
            OSError: the read failed.
        """
        sock = self._sock
        if _USE_RCVTIMEO:
            current = self._rcvtimeo
            if wait is None:
                if current is not None:
                    self._set_recv_timeout(None)
            # Deadlines move by microseconds between reads; re-arming the kernel timer
            # for that would cost a syscall per read for nothing.
            elif current is None or abs(current - wait) > 0.001 + 0.01 * wait:
                self._set_recv_timeout(wait)
            return sock.recv_into(self._view)
        if wait is not None and not select.select([sock], [], [], wait)[0]:
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

    def _pass_stages(self) -> bool:
        """Pump until every stage (TLS, authentication) has passed, or the connection ended.

        Frames that arrive with the last stage bytes are kept for :meth:`receive`.

        Returns:
            True once every stage passed; False when the connection ended first (its
            socket is closed, ``protocol.end`` says why).

        Raises:
            Cancelled: :meth:`cancel` was called.
        """
        proto = self.protocol
        self._output_pending = True  # our first flight (a ClientHello, the auth hello)
        self._flush_pending()
        while not proto.handshake_complete:
            if self.closed:
                return False
            self._messages.extend(self._pump_once(None))
        return True


class ServerConnection(Connection):
    """A connection a :class:`~msgsock.sync.ThreadedServer` accepted, pumped on its own thread.

    Give it the protocol :meth:`~msgsock.serving.ServerProtocol.accept` returned.  Its
    server's one sweep, not the connection, checks the protocol's timeouts, and
    acts on what the sweep decides through :meth:`wake`.  A ``connection_handler``
    gets one and uses it as a :class:`Connection`.
    """

    _checks_timeouts = False

    def serve(self, handler: Handler) -> None:
        """Pump the connection until its socket is gone: each read, every message it
        completes through ``handler``, all the replies in one write (SPEC §8)."""
        proto = self.protocol
        sock = self._sock
        view = self._view
        recv_into = sock.recv_into
        sendall = sock.sendall
        reply = proto.receive_and_reply
        lock = self._write_lock
        staged = proto.stages is not None
        if staged:  # a server's first bytes (its authentication hello) go out at once
            self._output_pending = True
            self._flush_pending()
        try:
            while True:
                if proto.state is not _OPEN:  # ended meanwhile (by the sweep), or at once
                    self._settle(-1)
                    if self.closed:
                        return
                n = recv_into(view)
                # Under the write lock: a shutdown's EOF never cuts the replies of a read.
                with lock:
                    if n:
                        out = reply(view[:n], handler)[0]
                        if out:
                            sendall(out)
                    else:
                        proto.receive_eof()
                    if staged:
                        self._flush_locked()
        except OSError as exc:
            self._lost(exc)

    def handshake(self) -> bool:
        """Pump the stages (PROXY header, TLS, authentication) until they pass.

        Returns:
            True once they passed; False when the connection ended first (its socket
            is closed; the server has counted and logged why).
        """
        return self._pass_stages()

    def fail_handler(self, exc: BaseException) -> None:
        """The connection handler raised ``exc``: the protocol ends the connection (a reset, logged with the traceback)."""
        with self._lock:
            self.protocol.fail_handler(exc)

    def wake(self) -> None:
        """Act, from another thread (the sweep, the shutdown), on the end the protocol decided.

        A half-close is done at once unless the connection's thread is writing (it
        does it then); a close or reset shuts the socket down so that the thread
        blocked on it wakes and closes it.
        """
        self._settle(close=False)


# connect() lives in .connect (it needs Connection, defined above); re-exported here so
# ``msgsock.sync.connection.connect`` stays importable.
from .connect import connect  # noqa: E402
