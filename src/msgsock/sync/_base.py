"""What every blocking connection shares: its socket, its locks and how it ends.

Theory of operation.  :class:`_ConnectionBase` is the half of
:class:`~msgsock.sync.Connection` that owns the socket: it holds the locks, the
state of a cancel and the flags the pump leaves for other threads, and it does
what the protocol's close state machine decides.  The other half, in
:mod:`msgsock.sync.connection`, moves the bytes: it sends, receives and runs the
timeouts; this module calls it back through :meth:`_ConnectionBase._write` and
:meth:`_ConnectionBase._pump_once`.

- **Ending** (the protocol's close state machine): after every call into the
  protocol, once ``protocol.state`` is not ``OPEN`` the connection does what
  ``protocol.close_action`` says, when it has written what it holds:
  ``HALF_CLOSE`` -> ``shutdown(SHUT_WR)`` and ``protocol.eof_written()``;
  ``CLOSE`` -> close; ``ABORT`` -> reset at once (``SO_LINGER`` 0).  Whoever closes
  the socket calls ``protocol.connection_lost`` (once).  The errors the caller sees
  come from the protocol: ``protocol.closed_error()`` is a
  :class:`~msgsock.exceptions.ConnectionClosed` with its ``kind``.
  :meth:`Connection.close` is the Winsock graceful shutdown (seed 004):
  ``protocol.send_eof()``, flush, half-close, then read to the peer's EOF -- what
  still arrives is discarded, and counted so by the protocol -- until the protocol
  is ``CLOSED`` or decides the close timeout.
- **Threads**: one thread may send while another receives.  A second *concurrent*
  call of the same direction -- two receives, or two sends (or ``send_eof``) --
  raises :class:`~msgsock.exceptions.ConcurrencyError` at once (the CSocket rule:
  one blocking call per socket at a time).  One short lock is held around every
  call into the protocol (TLS's ``SSLObject`` must never be used by two threads at
  once) and never across I/O; a write lock keeps what is taken from the protocol
  and written in order.  A reader that has bytes to write (a TLS record of its
  own) while another thread is writing leaves them to that thread.  Closing a
  socket does not wake a thread blocked on it (Linux), so closing first shuts down
  the read side (which wakes readers and sends nothing), and the write side too
  when another thread may be blocked writing.
- **Cancelling** (``CSocket::CancelBlockingCall``): :meth:`Connection.cancel`, from
  any thread, shuts the socket down both ways (``shutdown(SHUT_RDWR)``).  That
  wakes a thread blocked in ``recv`` or ``send`` -- it raises
  :class:`~msgsock.exceptions.Cancelled` -- and, being socket *state* rather than
  a one-off signal, it cannot be missed by a thread that is just about to block.
  It costs nothing on the hot path.  The consequences: the peer sees our end of
  stream at once (an incomplete frame if a send was cut off); the stream position
  is lost, so every later ``send``/``receive`` raises ``Cancelled`` too and only
  :meth:`Connection.close` remains valid (as after MFC's ``CancelBlockingCall``).
  :func:`connect` takes a :class:`CancelToken` that aborts a connect (or its
  handshake) in progress; the token stays attached to the new connection, so the
  same ``token.cancel()`` later cancels its blocking calls.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from .._net import check_timeout, set_nodelay
from ..exceptions import Cancelled
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Action, Limits, MessageProtocol, Statistics
from .cancel import CancelToken

if TYPE_CHECKING:
    from ..proxy import ProxyInfo

_BUFFER_SIZE = 64 * 1024
"""Size of the reusable receive buffer: one read takes up to this many bytes (STYLE §10)."""

_LINGER_ABORT = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)


def _address(getter: Any) -> Any:
    try:
        return getter()
    except OSError:  # already reset: a server passes the address accept() returned
        return None


class _ConnectionBase:
    """The socket, the locks and the ending of a :class:`~msgsock.sync.Connection` (see the module notes).

    Subclasses provide the two halves of the pump this class calls back:
    :meth:`_write` (write a list of chunks) and :meth:`_pump_once` (read once).
    """

    _checks_timeouts: ClassVar[bool] = True
    """The connection checks the protocol's timeouts itself (a server's sweep does for its own)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        cancel: CancelToken | None = None,
        protocol: MessageProtocol | None = None,
    ) -> None:
        sock.settimeout(None)
        set_nodelay(sock)
        if protocol is None:
            protocol = MessageProtocol(frame, limits=limits, peer_address=_address(sock.getpeername))
        self.protocol = protocol
        self._sock = sock
        self._view = memoryview(bytearray(_BUFFER_SIZE))
        self._messages: deque[Any] = deque()
        self._local_address: Any = _address(sock.getsockname)
        self._lock = threading.Lock()  # around every call into the protocol, and the socket's close
        self._write_lock = threading.Lock()  # held from taking the protocol's output to writing it
        self._send_call = threading.Lock()  # the one send()/send_eof() in progress
        self._recv_lock = threading.Lock()  # the one receive() (or close()'s read) in progress
        self._output_pending = False  # a reader left bytes in the protocol to a busy writer
        self._rcvtimeo: float | None = None  # the SO_RCVTIMEO in force; None = none
        self._check_at: float | None = None  # when to call protocol.check_timeouts next
        self._cancelled = False
        if self._checks_timeouts:
            self._check(time.monotonic())
        protocol.pump = self  # a server finds the connection of a protocol here
        # Last, once the connection is whole: an already-cancelled token cancels at once.
        self._token = cancel
        self._token_key = cancel._subscribe(self.cancel) if cancel is not None else None

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else self.protocol.state.value
        return f"<Connection {self.protocol.peer} {state}>"

    # -- properties -------------------------------------------------------------------

    @property
    def peer_address(self) -> Any:
        """The peer's address (host, port[, flowinfo, scope_id]).

        On a server with ``proxy_protocol``, the client the PROXY header named (the
        socket's own peer, the proxy, for a ``LOCAL`` or ``UNKNOWN`` header); see
        :attr:`proxy_info`.
        """
        return self.protocol.peer_address

    @property
    def proxy_info(self) -> ProxyInfo | None:
        """The PROXY header this connection began with (server with ``proxy_protocol``), else None."""
        info: ProxyInfo | None = self.protocol.proxy_info
        return info

    @property
    def local_address(self) -> Any:
        """Our socket address."""
        return self._local_address

    @property
    def closed(self) -> bool:
        """True once the socket is closed: by :meth:`close`, :meth:`abort` or the end the protocol decided."""
        return self._sock.fileno() < 0

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called (then only :meth:`close` is valid)."""
        return self._cancelled

    @property
    def frame(self) -> FrameFormat:
        """The frame format in use."""
        return self.protocol.frame

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self.protocol.limits

    @property
    def discarded(self) -> int:
        """Messages that arrived after this side began to close: read to reach the peer's EOF, never delivered."""
        return self.protocol.stats.messages_discarded

    def statistics(self) -> Statistics:
        """Return a copy of this connection's counters (headers included in byte counts)."""
        return dataclasses.replace(self.protocol.stats)

    # -- the locks around the protocol's output ---------------------------------------

    def _flush_locked(self) -> None:
        """Write everything the protocol has to send, in order (the write lock held).

        Raises:
            OSError: the write failed.
        """
        with self._lock:
            chunks = self.protocol.data_to_send()
        if chunks:
            self._write(chunks)

    def _flush_pending(self) -> None:
        """Write what a reader left in the protocol, unless another thread is writing (it does it then)."""
        while self._output_pending:
            if not self._write_lock.acquire(blocking=False):
                return  # its holder calls this again once it has released the lock
            try:
                self._output_pending = False
                self._flush_locked()
            except OSError as exc:
                self._lost(exc)
                return
            finally:
                self._write_lock.release()

    def _write(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Write all ``chunks``, in order (the write lock held).

        Raises:
            OSError: the write failed.
        """
        raise NotImplementedError

    def _pump_once(self, deadline: float | None) -> list[Any]:
        """Read once, feed the protocol, do what it says; return the messages completed (maybe none)."""
        raise NotImplementedError

    def _check(self, now: float) -> None:
        """Let the protocol decide its timeouts at ``now`` and say when to ask next."""
        with self._lock:
            self.protocol.check_timeouts(now)
            self._check_at = self.protocol.next_deadline(now)

    # -- ending -----------------------------------------------------------------------

    def _settle(self, timeout: float = 0.0, *, close: bool = True) -> None:
        """Do what ``protocol.close_action`` says, once what we hold is written (pump rule 3).

        Args:
            timeout: seconds to wait for a write in progress in another thread before
                flushing (0: do not wait, that thread settles when it is done; -1: as
                long as it takes).
            close: False from a thread that does not own the socket (a server's
                sweep): the socket is then only shut down, so that the thread
                blocked on it wakes, and that thread closes it.
        """
        proto = self.protocol
        while not self.closed:
            action = proto.close_action
            if action is not Action.ABORT:  # the rest comes once what is queued is out
                if not self._write_lock.acquire(timeout=timeout):
                    return
                try:
                    self._flush_locked()
                    action = proto.close_action
                    if action is Action.HALF_CLOSE:
                        self._sock.shutdown(socket.SHUT_WR)
                        with self._lock:
                            proto.eof_written()
                        continue
                except OSError as exc:
                    self._lost(exc)
                    return
                finally:
                    self._release_write()
                if action is None:
                    return
            if close:
                self._close_socket(reset=action is Action.ABORT)
            else:
                with self._lock:
                    self._shut(reset=action is Action.ABORT)
            return

    def _release_write(self) -> None:
        """Release the write lock; then write what a reader left meanwhile."""
        self._write_lock.release()
        if self._output_pending:
            self._flush_pending()

    def _shut(self, *, reset: bool) -> bool:
        """Shut the socket down to wake the threads blocked on it (``self._lock`` held).

        Returns:
            False when the socket was closed already.
        """
        sock = self._sock
        if sock.fileno() < 0:
            return False
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            # close() alone does not wake a thread blocked in recv/send on Linux.
            # SHUT_RD wakes readers and sends nothing; SHUT_WR (a FIN) only when some
            # thread may be blocked writing.
            sock.shutdown(socket.SHUT_RDWR if self._write_lock.locked() else socket.SHUT_RD)
        except OSError:
            pass
        return True

    def _close_socket(self, *, reset: bool, exc: BaseException | None = None) -> None:
        """Close the socket now (a reset with ``reset``), waking any thread blocked on it; tell the protocol, once."""
        with self._lock:
            if not self._shut(reset=reset):
                return
            self._sock.close()
            self.protocol.connection_lost(exc)
        if self._token is not None:
            self._token._unsubscribe(self._token_key)

    def _lost(self, exc: OSError) -> None:
        """The socket failed with ``exc``: close it; the protocol words the end (once, STYLE §4)."""
        self._close_socket(reset=self.protocol.close_action is Action.ABORT, exc=exc)

    def _failed(self, exc: OSError, operation: str) -> Exception:
        """The error of a write that failed with ``exc``."""
        if self._cancelled:  # the error is our own shutdown() waking this call
            return self._cancel_error(operation)
        self._lost(exc)
        return self.protocol.closed_error()

    def _cancel_error(self, operation: str) -> Cancelled:
        return Cancelled(
            f"{operation}: the connection was cancelled (Connection.cancel); only close() is valid now"
        )

    def close(self, timeout: float | None = None) -> None:
        """Close gracefully: flush, send EOF, read to the peer's EOF, then close the socket.

        Messages that arrive meanwhile are discarded (counted in :attr:`discarded`);
        messages received and not yet taken are dropped.  If the peer does not close
        within the close timeout the connection is reset (``CLOSE_TIMEOUT``).
        Idempotent; another thread blocked in :meth:`receive` gets
        ``ConnectionClosed``.  After :meth:`cancel` the socket is closed at once.

        Args:
            timeout: seconds to wait for the peer's EOF; default ``limits.close_timeout``.

        Raises:
            ValueError: ``timeout`` is negative or NaN (nothing is closed then).
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        try:
            if self.closed:
                return
            proto = self.protocol
            if not self._cancelled:
                now = time.monotonic()
                with self._lock:
                    if timeout is not None:
                        proto.limits = dataclasses.replace(proto.limits, close_timeout=timeout)
                    proto.send_eof()
                    proto.check_timeouts(now)  # the close timeout runs from now
                    self._check_at = proto.next_deadline(now)
                try:
                    self._close_wait()
                except Cancelled:
                    pass  # cancel() cuts a close short too
            if not self.closed:  # cancelled: the stream position is lost, nothing graceful is left
                with self._lock:
                    proto.abort()
                self._close_socket(reset=True)
        finally:
            self._messages.clear()

    def _close_wait(self) -> None:
        """Flush and half-close, then read to the peer's EOF, until the protocol says the socket is done."""
        proto = self.protocol
        while not self.closed:
            now = time.monotonic()
            check_at = self._check_at
            if check_at is not None and now >= check_at:
                self._check(now)
                check_at = self._check_at
            wait = -1.0 if check_at is None else max(check_at - now, 0.0)
            self._settle(wait)  # waits (until the next check) for a send in progress
            if self.closed or proto.close_action is not None:
                continue  # still to flush behind a send in progress: check the clock again
            # Read to the peer's EOF (seed 004: "receive until the peer closes").  A
            # thread already receiving gets the EOF itself; then the lock is ours.
            if self._recv_lock.acquire(timeout=wait):
                try:
                    while not self.closed:
                        self._pump_once(None)
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
        with self._lock:  # the socket cannot be closed (its descriptor reused) meanwhile
            if self._cancelled or self.closed:
                return
            self._cancelled = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already reset: a blocked call has seen that failure itself

    def abort(self) -> None:
        """Close at once with a reset (``SO_LINGER`` 0): unsent data is dropped.  Idempotent."""
        with self._lock:
            self.protocol.abort()
        self._close_socket(reset=True)
        self._messages.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
