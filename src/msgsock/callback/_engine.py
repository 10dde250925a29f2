"""The reactor-side half of :class:`~msgsock.callback.AsyncSocket`, and the names both halves use.

Theory of operation.  An ``AsyncSocket`` is written in two parts.  The public part,
in :mod:`msgsock.callback.socket`, is the CAsyncSocket API: ``create``,
``connect``, ``listen``, ``accept``, ``send``, ``receive``, ``async_select``,
``close`` and the ``on_*`` callbacks.  This part, :class:`_SocketEngine`, is what
runs on the reactor thread behind it: the socket's state (``_State``), the connect
sequence over a name's addresses, the selector bookkeeping (which readiness the
reactor watches, given what the application armed), the handling of the
reactor's readiness events, and the delivery of the callbacks (through the
dispatcher, exceptions logged and the socket closed).  The rules they implement --
which notification fires when -- are the module notes of
:mod:`msgsock.callback.socket`.

The reactor deals with this part only (it calls ``_sync_guarded``,
``_handle_events``, ``_handle_oob`` and ``_close_now``), so its types name
:class:`_SocketEngine`.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..exceptions import InvalidState
from ..protocol import format_address
from .dispatch import Dispatcher
from .reactor import Reactor, TimerHandle

log = logging.getLogger("msgsock.callback")

_EVENT_READ = 1  # selectors.EVENT_READ
_EVENT_WRITE = 2  # selectors.EVENT_WRITE


class Event(enum.IntFlag):
    """Network events for :meth:`AsyncSocket.async_select` (Winsock's ``FD_*`` values)."""

    READ = 0x01
    WRITE = 0x02
    OOB = 0x04
    ACCEPT = 0x08
    CONNECT = 0x10
    CLOSE = 0x20


FD_READ = Event.READ
FD_WRITE = Event.WRITE
FD_OOB = Event.OOB
FD_ACCEPT = Event.ACCEPT
FD_CONNECT = Event.CONNECT
FD_CLOSE = Event.CLOSE
FD_ALL = FD_READ | FD_WRITE | FD_OOB | FD_ACCEPT | FD_CONNECT | FD_CLOSE
"""Every notification: CAsyncSocket::Create's default ``lEvent``."""


class SocketKind(enum.IntEnum):
    """The two kinds of socket :meth:`AsyncSocket.create` makes."""

    STREAM = socket.SOCK_STREAM
    DATAGRAM = socket.SOCK_DGRAM


STREAM = SocketKind.STREAM
DATAGRAM = SocketKind.DATAGRAM


class _State(enum.Enum):
    EMPTY = "empty"  # constructed, no OS socket yet (or detached)
    CREATED = "created"  # stream socket, not connected
    CONNECTING = "connecting"
    OPEN = "open"  # connected stream, or datagram
    LISTENING = "listening"
    FAILED = "failed"  # connect failed; waits for close()
    CLOSED = "closed"


# Errors after which a stream connection is unusable (reported once via on_close).
_FATAL_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EHOSTDOWN", "ENETRESET")
    if hasattr(errno, name)
)

_S = TypeVar("_S", bound="_SocketEngine")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _on_reactor(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Run a socket method on its reactor's thread (SPEC §5.3: all state changes there)."""

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        reactor = self.reactor
        if reactor._inline():
            return method(self, *args, **kwargs)
        return reactor.run_sync(functools.partial(method, self, *args, **kwargs))

    return wrapper


class _SocketEngine:
    """The state and the reactor-side machinery of an :class:`~msgsock.callback.AsyncSocket` (see the module notes).

    It fires the callbacks the public half defines (``on_accept`` ... ``on_out_of_band``).
    """

    on_accept: Callable[[], None]
    on_connect: Callable[[int], None]
    on_receive: Callable[[], None]
    on_send: Callable[[], None]
    on_close: Callable[[int], None]
    on_out_of_band: Callable[[], None]

    _default_events = FD_ALL

    def __init__(self, reactor: Reactor, *, dispatcher: Dispatcher | None = None) -> None:
        self.reactor = reactor
        self.dispatcher = dispatcher
        self.error: BaseException | None = None
        self._sock: socket.socket | None = None
        self._fd = -1
        self._kind = STREAM
        self._state = _State.EMPTY
        self._events: Event = self._default_events
        self._reg_events = 0  # what the selector watches now
        self._oob_registered = False
        self._read_armed = True
        self._write_armed = False
        self._accept_armed = True
        self._oob_armed = True
        self._oob_dead = False
        self._eof_seen = False
        self._broken = False  # a fatal error was seen on the connection
        self._close_notified = False
        self._app_closed = False  # close()/detach() was called: no more callbacks
        self._closed_event = threading.Event()
        self._peer: Any = None
        self._recreatable = False  # created with defaults: connect() may switch family
        self._options: list[tuple[int, int, int | bytes]] = []
        self._connect_addrs: deque[tuple[int, Any]] = deque()
        self._timers: list[TimerHandle] = []

    def __repr__(self) -> str:
        peer = f" peer={format_address(self._peer)}" if self._peer is not None else ""
        return f"<{type(self).__name__} fd={self._fd} {self._state.value}{peer}>"

    # -- internals: opening ---------------------------------------------------------------

    def _setup(self, sock: socket.socket, state: _State, peer: Any = None) -> None:
        # ``peer``: the address accept() gave (known even when the peer reset since).
        reactor = self.reactor
        if reactor._closed:
            sock.close()
            raise InvalidState(f"{reactor!r} is stopped")
        self._sock = sock
        self._fd = sock.fileno()
        self._kind = SocketKind(sock.type)
        self._state = state
        self._reg_events = 0
        self._oob_registered = False
        self._read_armed = self._accept_armed = self._oob_armed = True
        self._write_armed = False
        self._oob_dead = self._eof_seen = self._broken = self._close_notified = False
        self._app_closed = False
        self._closed_event.clear()
        self._recreatable = False
        self._options = []
        self.error = None
        self._peer = peer
        if state is _State.OPEN:
            if self._kind == STREAM and peer is None:
                try:
                    self._peer = sock.getpeername()
                except OSError:
                    pass
            self._write_armed = True  # one on_send after accept/attach/create (datagram)
            self._opened()
        reactor._add(self)
        self._mark_dirty()

    def _opened(self) -> None:
        """Hook: the socket just became OPEN (connected, accepted, attached, datagram)."""

    # -- internals: connecting ------------------------------------------------------------

    def _resolve(self, host: str, port: int) -> list[tuple[int, Any]]:
        assert self._sock is not None
        family = socket.AF_UNSPEC if self._recreatable else self._sock.family
        infos = socket.getaddrinfo(host, port, family, self._kind)
        addrs: list[tuple[int, Any]] = [
            (fam, sa) for fam, _, _, _, sa in infos if fam in (socket.AF_INET, socket.AF_INET6)
        ]
        if not addrs:
            raise OSError(errno.EAFNOSUPPORT, f"no address of the socket's family for {host!r}")
        return addrs

    def _try_next_address(self, fresh: bool = False) -> None:
        family, addr = self._connect_addrs.popleft()
        assert self._sock is not None
        if fresh or family != self._sock.family:
            # Only a socket created with defaults gets here (_resolve filters the
            # others to their own family): a retry needs a fresh socket.
            self._recreate(family)
            assert self._sock is not None
        err = self._sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY):
            # Report even an immediate failure through on_connect, never from inside connect().
            self.reactor._call_soon_quiet(self._connect_failed, err)
        self._mark_dirty()

    def _recreate(self, family: int) -> None:
        assert self._sock is not None
        self._unregister_now()
        sock = socket.socket(family, self._kind)
        try:
            sock.setblocking(False)
            for level, option, value in self._options:
                sock.setsockopt(level, option, value)
        except BaseException:
            sock.close()
            raise
        self._sock.close()
        self._sock = sock
        self._fd = sock.fileno()

    def _finish_connect(self) -> None:
        assert self._sock is not None
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            try:
                self._peer = self._sock.getpeername()
            except OSError as exc:
                err = exc.errno or errno.ENOTCONN
        if err:
            self._connect_failed(err)
            return
        self._state = _State.OPEN
        self._connect_addrs.clear()
        self._opened()
        self._mark_dirty()
        self._connect_done(0)
        if self._events & FD_WRITE:
            self._notify_send()

    def _connect_failed(self, err: int) -> None:
        if self._state is not _State.CONNECTING:
            return
        if self._connect_addrs and self._recreatable:
            self._try_next_address(fresh=True)
            return
        self._state = _State.FAILED
        self._connect_addrs.clear()
        self._mark_dirty()
        self._connect_done(err)

    def _connect_done(self, err: int) -> None:
        if self._events & FD_CONNECT:
            self._deliver(self.on_connect, err)

    # -- internals: closing ---------------------------------------------------------------

    def _run_or_queue(self, fn: Callable[[], object]) -> None:
        reactor = self.reactor
        if reactor._inline() or not reactor._call_soon_quiet(fn):
            fn()

    def _abort_now(self) -> None:
        if self._sock is not None and self._kind == STREAM:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            except OSError:
                pass
        self._close_now()

    def _close_now(self) -> None:
        sock = self._sock
        if sock is None:
            self._closed_event.set()
            return
        self._forget()
        self._state = _State.CLOSED
        try:
            sock.close()
        except OSError:
            pass
        self._closed_event.set()

    def _forget(self) -> None:
        # Unregister before the descriptor can be closed and its number reused.
        self._unregister_now()
        self.reactor._remove(self)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._sock = None

    # -- internals: state checks --------------------------------------------------------------

    def _require_socket(self) -> socket.socket:
        if self._sock is None:
            raise InvalidState(f"{self!r} has no socket (create() it, or it was closed)")
        return self._sock

    def _require_open(self) -> socket.socket:
        sock = self._require_socket()
        if self._state is not _State.OPEN:
            raise InvalidState(f"{self!r} is not connected")
        return sock

    def _mark_dirty(self) -> None:
        self.reactor._mark_dirty(self)

    def _arm_write(self) -> None:
        self._write_armed = True
        self._mark_dirty()

    def _rearm_read(self) -> None:
        self._read_armed = True
        self._oob_armed = True
        self._mark_dirty()

    def _io_error(self, exc: OSError) -> None:
        """An ``OSError`` from a data call: a fatal one ends the connection, reported once."""
        if self._kind != STREAM:
            return
        fatal = isinstance(exc, ConnectionError) or exc.errno in _FATAL_ERRNOS
        if fatal and not self._broken:
            self._broken = True
            self.error = exc
            self._mark_dirty()
            # Not from inside the caller's send()/receive(): at the reactor's next turn.
            self.reactor._call_soon_quiet(self._notify_close, exc.errno or errno.EIO)

    # -- internals: selector bookkeeping (reactor thread) ---------------------------------

    def _wanted_events(self) -> int:
        state = self._state
        ev = self._events
        if state is _State.CONNECTING:
            return _EVENT_WRITE
        if state is _State.LISTENING:
            return _EVENT_READ if self._accept_armed and ev & FD_ACCEPT else 0
        if state is not _State.OPEN or self._broken:
            return 0
        want = 0
        # A stream must be read to see the peer's close, so FD_CLOSE alone needs reading too.
        wanted = FD_READ if self._kind == DATAGRAM else FD_READ | FD_CLOSE
        if self._read_armed and not self._eof_seen and ev & wanted:
            want |= _EVENT_READ
        if self._write_armed and ev & FD_WRITE:
            want |= _EVENT_WRITE
        return want

    def _wants_oob(self) -> bool:
        return (
            self._kind == STREAM
            and self._state is _State.OPEN
            and self._oob_armed
            and not self._broken
            and not self._oob_dead
            and bool(self._events & FD_OOB)
        )

    def _sync_guarded(self) -> None:
        try:
            self._sync()
        except Exception as exc:
            log.exception("%r: internal error; closing it", self)
            self.error = exc
            self._close_now()

    def _sync(self) -> None:
        if self._sock is None:
            return
        want = self._wanted_events()
        have = self._reg_events
        if want != have:
            selector = self.reactor._selector
            if not have:
                selector.register(self._fd, want, self)
            elif not want:
                selector.unregister(self._fd)
            else:
                selector.modify(self._fd, want, self)
            self._reg_events = want
        oob = self._wants_oob()
        if oob != self._oob_registered:
            if oob:
                self.reactor._watch_oob(self, self._fd)
            else:
                self.reactor._unwatch_oob(self._fd)
            self._oob_registered = oob

    def _unregister_now(self) -> None:
        if self._reg_events:
            try:
                self.reactor._selector.unregister(self._fd)
            except (KeyError, ValueError, OSError):
                pass
            self._reg_events = 0
        if self._oob_registered:
            self.reactor._unwatch_oob(self._fd)
            self._oob_registered = False

    # -- internals: events (reactor thread) -------------------------------------------------

    def _handle_events(self, mask: int) -> None:
        try:
            if mask & _EVENT_WRITE:
                self._handle_writable()
            if mask & _EVENT_READ and self._sock is not None:
                self._handle_readable()
        except Exception as exc:
            log.exception("%r: internal error; closing it", self)
            self.error = exc
            self._close_now()

    def _handle_writable(self) -> None:
        state = self._state
        if state is _State.CONNECTING:
            self._finish_connect()
        elif state is _State.OPEN and not self._broken:
            self._writable()

    def _writable(self) -> None:
        if self._write_armed:
            self._write_armed = False
            self._mark_dirty()
            if self._events & FD_WRITE:
                self._notify_send()

    def _handle_readable(self) -> None:
        state = self._state
        if state is _State.LISTENING:
            if self._accept_armed:
                self._accept_armed = False
                self._mark_dirty()
                if self._events & FD_ACCEPT:
                    self._deliver(self.on_accept)
        elif state is _State.OPEN and not self._broken:
            if self._kind == DATAGRAM:
                if self._read_armed:
                    self._read_armed = False
                    self._mark_dirty()
                    if self._events & FD_READ:
                        self._deliver(self.on_receive)
            else:
                self._readable_stream()

    def _readable_stream(self) -> None:
        if not self._read_armed or self._eof_seen:
            return
        assert self._sock is not None
        # Peek to tell data from the peer's FIN or a reset: FD_CLOSE is only reported
        # once all data was read, so data first (WSAAsyncSelect).
        try:
            data = self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken = True
            self.error = exc
            self._mark_dirty()
            self._notify_close(exc.errno or errno.EIO)
            return
        self._read_armed = False  # until the application calls receive()
        self._mark_dirty()
        if data:
            if self._events & FD_READ:
                self._notify_receive()
        else:
            self._eof_seen = True
            self._notify_close(0)

    def _handle_oob(self, urgent: bool) -> None:
        if not urgent:
            # Hang-up or error without urgent data: the read side reports it; stop
            # watching, since a level-triggered hang-up would fire at every turn.
            self._oob_dead = True
            self._mark_dirty()
            return
        if self._oob_armed and self._sock is not None:
            self._oob_armed = False
            self._mark_dirty()
            if self._events & FD_OOB:
                self._deliver(self.on_out_of_band)

    # -- internals: delivering callbacks ------------------------------------------------------

    def _notify_receive(self) -> None:
        self._deliver(self.on_receive)

    def _notify_send(self) -> None:
        self._deliver(self.on_send)

    def _notify_close(self, err: int) -> None:
        if self._close_notified:
            return
        self._close_notified = True
        if self._events & FD_CLOSE:
            self._deliver(self.on_close, err)

    def _deliver(self, callback: Callable[..., object], *args: Any) -> None:
        dispatcher = self.dispatcher if self.dispatcher is not None else self.reactor.dispatcher
        if dispatcher is None:
            self._run_callback(callback, *args)
            return
        try:
            dispatcher(self._run_callback, callback, *args)
        except Exception as exc:
            log.exception("%r: dispatcher %r failed; closing the socket", self, dispatcher)
            self.error = exc
            self._app_closed = True
            self._run_or_queue(self._close_now)

    def _run_callback(self, callback: Callable[..., object], *args: Any) -> None:
        if self._app_closed:
            return  # close() was called: no callback after it, even one already queued
        try:
            callback(*args)
        except Exception as exc:
            log.exception(
                "%r: callback %s raised; closing the socket", self, getattr(callback, "__name__", callback)
            )
            self.error = exc
            self._app_closed = True
            self._run_or_queue(self._close_now)
