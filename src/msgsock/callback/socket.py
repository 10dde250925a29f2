"""``AsyncSocket``: the CAsyncSocket model on a :class:`~msgsock.callback.Reactor` (SPEC §5.3).

Theory of operation.  An :class:`AsyncSocket` is built in two stages as in MFC
(``s = AsyncSocket(reactor); s.create(...)``), then connected, listening or (for
datagrams) ready at once.  The reactor watches it and turns readiness into the
callbacks the application overrides.  Which callbacks fire, and when, follows
Winsock's ``WSAAsyncSelect`` (the notification model behind CAsyncSocket):

``on_receive`` (FD_READ) and ``on_accept`` (FD_ACCEPT) -- level-triggered with
re-enabling:
    fires when data (a connection) is waiting; after it fired, it does not fire
    again until the application calls :meth:`~AsyncSocket.receive` /
    :meth:`~AsyncSocket.receive_from` (:meth:`~AsyncSocket.accept`).  The call
    re-enables the notification whatever its result (data, ``WouldBlock``, an
    error), and if data (a connection) still waits after it, the notification fires
    again at the reactor's next turn.  So a callback that reads a little gets called
    again while data remains, and a callback that does not read is not called again
    -- the reactor never spins on unread data.  A call made on another thread
    (e.g. from a dispatcher's thread) re-enables the same way.

``on_send`` (FD_WRITE):
    fires once when a stream socket becomes connected (right after
    ``on_connect(0)``), once after it was accepted or attached connected, and once
    after a datagram socket is created; then again only after a
    :meth:`~AsyncSocket.send` (or ``send_to``) raised :class:`WouldBlock` or took
    fewer bytes than offered, as soon as the kernel has room again.

``on_connect(error)`` (FD_CONNECT):
    fires once per :meth:`~AsyncSocket.connect`: ``0`` on success, else the errno
    (``errno.ECONNREFUSED``, ``errno.ETIMEDOUT``...).  After a failure the socket is
    left created but idle; close it.

``on_close(error)`` (FD_CLOSE):
    fires once when the *peer* ends the connection: ``0`` for a graceful close
    (its FIN), delivered only once every byte before it was read -- as Winsock
    says, "FD_CLOSE should only be posted after all data is read" -- or the errno
    of a failure (``errno.ECONNRESET`` for a reset) as soon as it is seen.  A
    failure that the application meets first, as an ``OSError`` from ``send`` or
    ``receive``, is also reported once through ``on_close``.  It never fires for
    the application's own :meth:`~AsyncSocket.close`: after ``close()`` no
    callback of that socket runs again.

``on_out_of_band`` (FD_OOB):
    fires when TCP urgent data (``MSG_OOB``, with ``SO_OOBINLINE`` off) arrives;
    re-enabled by any ``receive`` call (read the byte with
    ``receive(1, socket.MSG_OOB)``).

:meth:`~AsyncSocket.async_select` chooses which of the six notifications are
delivered (``FD_ALL`` by default).  Calling it re-enables every notification, and
adding ``FD_WRITE`` to a connected socket delivers one ``on_send``, as a second
``WSAAsyncSelect`` call does.

Threads.  Every state change runs on the reactor thread.  The methods may be called
from any thread: from another thread they are handed to the reactor thread with
:meth:`Reactor.run_sync` and the caller waits for the result (so ``send`` from a UI
thread costs a round trip through the reactor, and must not be made while the
reactor thread is blocked waiting for that UI thread).  :meth:`~AsyncSocket.close`
does not wait: it is queued, and :meth:`~AsyncSocket.wait_closed` waits.  Callbacks
run on the reactor thread, or are handed to the socket's dispatcher
(:mod:`msgsock.callback.dispatch`).  An exception raised by a callback is logged
with its traceback (logger ``msgsock.callback``), kept in :attr:`AsyncSocket.error`,
and the socket is closed at once; the reactor goes on.

Layout.  This module is the public half of :class:`AsyncSocket`: the CAsyncSocket
calls and the callbacks.  What runs behind them on the reactor thread -- the
socket's state, the connect sequence, the selector bookkeeping, the readiness
handlers and the delivery of the callbacks -- is its base ``_SocketEngine``, in
``msgsock.callback._engine``, with the :class:`Event` and :class:`SocketKind` values
both halves use.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import Any

from .._net import check_port, check_timeout
from ..exceptions import InvalidState
from ._engine import (
    DATAGRAM,
    FD_ACCEPT,
    FD_ALL,
    FD_CLOSE,
    FD_CONNECT,
    FD_OOB,
    FD_READ,
    FD_WRITE,
    STREAM,
    Event,
    SocketKind,
    _on_reactor,
    _SocketEngine,
    _State,
)

__all__ = [
    "DATAGRAM",
    "FD_ACCEPT",
    "FD_ALL",
    "FD_CLOSE",
    "FD_CONNECT",
    "FD_OOB",
    "FD_READ",
    "FD_WRITE",
    "STREAM",
    "AsyncSocket",
    "Event",
    "SocketKind",
    "WouldBlock",
]


class WouldBlock(BlockingIOError):
    """The operation cannot complete now without blocking; a notification will say when to retry.

    This is Winsock's ``WSAEWOULDBLOCK``, which CAsyncSocket's ``Send``/``Receive``/
    ``Accept`` report as a normal outcome of a non-blocking call.  It subclasses
    :class:`BlockingIOError` (so it is an ``OSError`` with ``errno.EAGAIN``) because
    that is exactly what Python raises for the same condition: code that already
    catches ``BlockingIOError`` keeps working, and it is not a msgsock error tree
    member because nothing went wrong.
    """

    def __init__(self, operation: str) -> None:
        super().__init__(errno.EWOULDBLOCK, f"{operation} would block")


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _family_of(address: str, kind: int) -> int:
    if not address:
        return socket.AF_INET
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address.split("%", 1)[0])
        except OSError:
            continue
        return family
    return socket.getaddrinfo(address, None, 0, kind, 0, socket.AI_PASSIVE)[0][0]


class AsyncSocket(_SocketEngine):
    """A socket whose network events become callbacks on a :class:`Reactor` (CAsyncSocket).

    Subclass it and override the ``on_*`` methods; the defaults do nothing.  See the
    module documentation for exactly when each one fires.

    Args:
        reactor: the reactor that owns this socket.
        dispatcher: where this socket's callbacks run; None uses the reactor's
            (:func:`~msgsock.callback.direct` forces the reactor thread).

    Attributes:
        error: the exception that ended the socket, if one did: an ``OSError`` from
            the connection, or an exception a callback raised; on a
            :class:`~msgsock.callback.MessageSocket`, the core's
            :class:`~msgsock.exceptions.ConnectionClosed` (its ``kind`` says how).
    """

    # -- callbacks (override these) -----------------------------------------------------

    def on_accept(self) -> None:
        """A connection is waiting: call :meth:`accept` (FD_ACCEPT)."""

    def on_connect(self, error: int) -> None:
        """The :meth:`connect` finished: ``error`` is 0 on success, else an errno (FD_CONNECT)."""

    def on_receive(self) -> None:
        """Data is waiting: call :meth:`receive` or :meth:`receive_from` (FD_READ)."""

    def on_send(self) -> None:
        """:meth:`send` can take data now (FD_WRITE)."""

    def on_close(self, error: int) -> None:
        """The peer closed (``error`` 0) or the connection failed (an errno) (FD_CLOSE)."""

    def on_out_of_band(self) -> None:
        """Urgent data is waiting: ``receive(1, socket.MSG_OOB)`` (FD_OOB)."""

    # -- creation -----------------------------------------------------------------------

    @_on_reactor
    def create(
        self,
        port: int = 0,
        kind: SocketKind | int = STREAM,
        address: str = "",
        *,
        family: int | None = None,
        events: Event | int | None = None,
    ) -> None:
        """Create the OS socket (the second stage of construction).

        A datagram socket is always bound (to ``address``:``port``; ``""`` means all
        interfaces, as in MFC); a stream socket is bound only when ``port`` or
        ``address`` is given.  With neither (the client case) and no ``family``,
        :meth:`connect` may replace the socket by one of the family the host
        resolves to, replaying the options set with :meth:`set_option`.

        Args:
            port: local port; 0 lets the system choose.
            kind: ``STREAM`` or ``DATAGRAM``.
            address: local address (a literal or a name); ``""`` for any.
            family: ``socket.AF_INET`` or ``AF_INET6``; None infers it from
                ``address`` (IPv4 when empty).
            events: notifications to deliver (``FD_ALL`` by default); see
                :meth:`async_select`.

        Raises:
            InvalidState: the socket already exists, or the reactor is stopped.
            ValueError: ``port`` is not an int 0..65535 (``port 70000: must be 0..65535``).
            OSError: the socket cannot be created or bound (``socket.gaierror`` for
                a name that does not resolve).
        """
        if self._sock is not None:
            raise InvalidState(f"{self!r} is already created")
        port = check_port(port)
        kind = SocketKind(kind)
        fam = _family_of(address, kind) if family is None else family
        sock = socket.socket(fam, kind)
        try:
            sock.setblocking(False)
            if kind == DATAGRAM or port or address:
                if not address:
                    sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
                else:
                    infos = socket.getaddrinfo(address, port, fam, kind, 0, socket.AI_PASSIVE)
                    sock.bind(infos[0][4])
        except BaseException:
            sock.close()
            raise
        if events is not None:
            self._events = Event(events)
        self._setup(sock, _State.OPEN if kind == DATAGRAM else _State.CREATED)
        self._recreatable = kind == STREAM and not port and not address and family is None

    @_on_reactor
    def attach(self, sock: socket.socket, *, events: Event | int | None = None) -> None:
        """Take ownership of an existing socket and watch it on this socket's reactor.

        The MultiSoc pattern (KB Q175668): accept on one reactor, :meth:`detach`,
        then attach to an ``AsyncSocket`` of a per-connection reactor.  A connected
        stream socket gets one ``on_send``, like an accepted one.

        Args:
            sock: a stream or datagram socket (listening, connected or not); it is
                made non-blocking.
            events: notifications to deliver (``FD_ALL`` by default).

        Raises:
            InvalidState: this object already holds a socket, or the reactor is stopped.
            ValueError: ``sock`` is neither a stream nor a datagram socket.
        """
        self._attach(sock, events, None)

    @_on_reactor
    def _attach(self, sock: socket.socket, events: Event | int | None, peer: Any) -> None:
        """attach(); ``peer`` is the address accept() returned, when it is known."""
        if self._sock is not None:
            raise InvalidState(f"{self!r} already holds a socket")
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise ValueError(f"cannot attach a socket of type {sock.type!r}")
        sock.setblocking(False)
        if events is not None:
            self._events = Event(events)
        state = _State.OPEN
        if peer is not None:
            # Accepted: connected even if the peer already reset it (getpeername would
            # then fail with ENOTCONN); the first read reports on_close(ECONNRESET).
            self._setup(sock, state, peer)
            return
        if sock.type == socket.SOCK_STREAM:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                state = _State.LISTENING
            else:
                try:
                    sock.getpeername()
                except OSError:
                    state = _State.CREATED
        self._setup(sock, state)

    @_on_reactor
    def detach(self) -> socket.socket:
        """Stop watching the socket and hand it over; this object is left empty.

        The returned socket stays non-blocking.  No callback of this object runs after it.

        Raises:
            InvalidState: there is no socket to detach.
        """
        sock = self._sock
        if sock is None:
            raise InvalidState(f"{self!r} holds no socket")
        self._forget()
        self._app_closed = True
        self._state = _State.EMPTY
        self._closed_event.set()
        return sock

    # -- connecting -----------------------------------------------------------------------

    @_on_reactor
    def connect(self, host: str, port: int) -> None:
        """Start connecting to ``host``:``port``; the outcome arrives in :meth:`on_connect`.

        Does not wait for the connection (it may resolve a host *name*, which blocks
        like Winsock's ``gethostbyname``; pass an address literal to avoid that).  When
        the name has several addresses they are tried in order (each on a fresh socket)
        if the socket was created with defaults; ``on_connect`` reports the last error.
        A datagram socket connects at once (its default peer) and still gets
        ``on_connect(0)``.

        Raises:
            InvalidState: not a created, unconnected socket.
            ValueError: ``port`` is not an int 0..65535 (``port 70000: must be 0..65535``).
            OSError: ``socket.gaierror`` for a name that does not resolve, or no address
                of the socket's family.
        """
        port = check_port(port)
        self._require_socket()
        if self._kind == DATAGRAM:
            addr = self._resolve(host, port)[0][1]
            assert self._sock is not None
            self._sock.connect(addr)
            self._peer = addr
            self.reactor._call_soon_quiet(self._connect_done, 0)
            return
        if self._state is not _State.CREATED:
            raise InvalidState(f"cannot connect {self!r}")
        self._connect_addrs = deque(self._resolve(host, port))
        self._state = _State.CONNECTING
        self._try_next_address()

    # -- listening ------------------------------------------------------------------------

    @_on_reactor
    def listen(self, backlog: int = 5) -> None:
        """Listen for connections; :meth:`on_accept` says when one waits.

        Raises:
            InvalidState: not a created, unconnected stream socket.
            OSError: from the system (an unbound socket is bound to a free port first).
        """
        if self._kind != STREAM or self._state is not _State.CREATED:
            raise InvalidState(f"cannot listen on {self!r}")
        assert self._sock is not None
        self._sock.listen(backlog)
        self._state = _State.LISTENING
        self._accept_armed = True
        self._mark_dirty()

    @_on_reactor
    def accept(self, sock: AsyncSocket | None = None) -> AsyncSocket:
        """Accept a waiting connection (re-enables :meth:`on_accept`).

        Args:
            sock: an object to hold the connection, typically of your subclass, that
                holds no socket yet (MFC's ``Accept(CAsyncSocket&)``); it may belong to
                another reactor.  None makes a plain ``AsyncSocket`` on this reactor
                with this socket's dispatcher (e.g. to :meth:`detach` it).

        Returns:
            The connected socket (``sock`` when given).

        Raises:
            WouldBlock: no connection is waiting.
            InvalidState: not listening, or ``sock`` already holds a socket.
            OSError: from the system (e.g. ``EMFILE``).
        """
        if self._state is not _State.LISTENING:
            raise InvalidState(f"cannot accept on {self!r}")
        if sock is not None and sock._sock is not None:
            raise InvalidState(f"accept() needs an object that holds no socket, not {sock!r}")
        assert self._sock is not None
        self._accept_armed = True  # WSAAsyncSelect: accept() re-enables FD_ACCEPT, whatever it returns
        self._mark_dirty()
        try:
            conn, address = self._sock.accept()
        except BlockingIOError:
            raise WouldBlock("accept") from None
        target = sock if sock is not None else AsyncSocket(self.reactor, dispatcher=self.dispatcher)
        try:
            target._attach(conn, None, address)
        except BaseException:
            conn.close()
            raise
        return target

    # -- data -----------------------------------------------------------------------------

    @_on_reactor
    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send what the kernel takes now; returns the count (may be less than offered).

        Taking less than offered, or raising ``WouldBlock``, arms :meth:`on_send`.

        Raises:
            WouldBlock: the kernel took nothing.
            InvalidState: not connected.
            OSError: the connection failed (also reported once through ``on_close``).
        """
        sock = self._require_open()
        try:
            n = sock.send(data, flags)
        except BlockingIOError:
            self._arm_write()
            raise WouldBlock("send") from None
        except OSError as exc:
            self._io_error(exc)
            raise
        if n < _nbytes(data):
            self._arm_write()
        return n

    @_on_reactor
    def receive(self, n: int = 65536, flags: int = 0) -> bytes:
        """Receive up to ``n`` bytes; ``b""`` means the peer closed gracefully.

        Re-enables :meth:`on_receive` and :meth:`on_out_of_band`.

        Raises:
            WouldBlock: nothing is waiting.
            InvalidState: not connected.
            OSError: the connection failed (also reported once through ``on_close``).
        """
        sock = self._require_open()
        self._rearm_read()
        try:
            return sock.recv(n, flags)
        except BlockingIOError:
            raise WouldBlock("receive") from None
        except OSError as exc:
            if not flags & socket.MSG_OOB:  # EINVAL when no urgent byte waits: not fatal
                self._io_error(exc)
            raise

    @_on_reactor
    def send_to(self, data: bytes | bytearray | memoryview, address: Any, flags: int = 0) -> int:
        """Send a datagram to ``address`` (a ``(host, port)`` tuple); returns the bytes sent.

        Raises:
            WouldBlock: no room in the send buffer (arms :meth:`on_send`).
            InvalidState: not a created socket.
            ValueError: the address's port is not 0..65535 (``port 70000: must be 0..65535``).
            OSError: from the system (e.g. ``EMSGSIZE``).
        """
        sock = self._require_open()
        try:
            n = sock.sendto(data, flags, address)
        except BlockingIOError:
            self._arm_write()
            raise WouldBlock("send_to") from None
        except OverflowError:  # only on this failing path: sendto() checks the range itself
            check_port(address[1])
            raise
        except OSError as exc:
            self._io_error(exc)
            raise
        return n

    @_on_reactor
    def receive_from(self, n: int = 65536, flags: int = 0) -> tuple[bytes, Any]:
        """Receive one datagram (up to ``n`` bytes) and its sender's address.

        Re-enables :meth:`on_receive`.

        Raises:
            WouldBlock: nothing is waiting.
            InvalidState: not a created socket.
            OSError: from the system (e.g. ``ECONNREFUSED`` reported by ICMP).
        """
        sock = self._require_open()
        self._rearm_read()
        try:
            return sock.recvfrom(n, flags)
        except BlockingIOError:
            raise WouldBlock("receive_from") from None
        except OSError as exc:
            self._io_error(exc)
            raise

    @_on_reactor
    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        """Shut down one or both directions (``socket.SHUT_RD``/``SHUT_WR``/``SHUT_RDWR``).

        The default, ``SHUT_WR``, is the graceful close of the seeds: the peer reads
        everything sent, then end of stream.

        Raises:
            InvalidState: no socket.
            OSError: from the system (``ENOTCONN`` when not connected).
        """
        self._require_socket()
        assert self._sock is not None
        self._sock.shutdown(how)

    # -- options, names ---------------------------------------------------------------------

    @_on_reactor
    def set_option(self, option: int, value: int | bytes, level: int = socket.SOL_SOCKET) -> None:
        """Set a socket option (``setsockopt``; MFC's ``SetSockOpt`` argument order).

        Raises:
            InvalidState: no socket.
            OSError: from the system.
        """
        self._require_socket()
        assert self._sock is not None
        self._sock.setsockopt(level, option, value)
        if self._recreatable:
            self._options.append((level, option, value))

    @_on_reactor
    def get_option(self, option: int, level: int = socket.SOL_SOCKET, buflen: int = 0) -> int | bytes:
        """Get a socket option (``getsockopt``): an int, or bytes when ``buflen`` > 0.

        Raises:
            InvalidState: no socket.
            OSError: from the system.
        """
        self._require_socket()
        assert self._sock is not None
        if buflen:
            return self._sock.getsockopt(level, option, buflen)
        return self._sock.getsockopt(level, option)

    @property
    def peer_name(self) -> Any:
        """The peer's address, as ``socket.getpeername`` gives it.

        Raises:
            InvalidState: no socket.
            OSError: not connected.
        """
        sock = self._require_socket()
        if self._peer is not None:
            return self._peer
        return sock.getpeername()

    @property
    def sock_name(self) -> Any:
        """This socket's own address, as ``socket.getsockname`` gives it.

        Raises:
            InvalidState: no socket.
        """
        return self._require_socket().getsockname()

    def fileno(self) -> int:
        """The file descriptor (-1 when there is no socket)."""
        return self._fd if self._sock is not None else -1

    @property
    def closed(self) -> bool:
        """True when this object holds no socket (closed, detached, or never created)."""
        return self._sock is None

    # -- notifications ----------------------------------------------------------------------

    @property
    def events(self) -> Event:
        """The notifications currently delivered (see :meth:`async_select`)."""
        return self._events

    @_on_reactor
    def async_select(self, events: Event | int = FD_ALL) -> None:
        """Choose which notifications are delivered; re-enables all of them.

        Like a second ``WSAAsyncSelect`` call: notifications that were waiting for a
        ``receive``/``accept`` call to be re-enabled are enabled again, and when
        ``FD_WRITE`` is turned on for a connected socket, ``on_send`` fires once.

        Raises:
            InvalidState: no socket.
        """
        self._require_socket()
        new = Event(events)
        if new & FD_WRITE and not self._events & FD_WRITE and self._state is _State.OPEN:
            self._write_armed = True
        self._events = new
        self._read_armed = self._accept_armed = self._oob_armed = True
        self._mark_dirty()

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket at once (CAsyncSocket::Close); callable from any thread.

        Data already taken by :meth:`send` is still delivered by the kernel (unless
        unread data is pending here, in which case the system resets the connection).
        No callback of this socket runs after ``close()`` is called.  From a thread
        other than the reactor's, the close is queued: :meth:`wait_closed` waits for it.
        """
        self._app_closed = True
        self._run_or_queue(self._close_now)

    def abort(self) -> None:
        """Reset the connection (``SO_LINGER`` 0, then close): the peer sees ``ECONNRESET``.

        Callable from any thread, like :meth:`close`.
        """
        self._app_closed = True
        self._run_or_queue(self._abort_now)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the socket is closed; returns False if ``timeout`` ran out first.

        Raises:
            ValueError: ``timeout`` is negative or NaN.
            TypeError: ``timeout`` is not a number.
        """
        return self._closed_event.wait(check_timeout(timeout))
