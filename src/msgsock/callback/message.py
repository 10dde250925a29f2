"""``MessageSocket``: whole messages over an :class:`AsyncSocket` (SPEC §5.0, §5.3, KB Q185728).

Theory of operation.  A :class:`MessageSocket` is a pump over
:class:`~msgsock.protocol.MessageProtocol` (STYLE §1, §11) that runs on the reactor
thread: it reads, feeds the core, writes what the core says and turns what the core
decided into the CAsyncSocket callbacks.  It decides nothing about the connection
itself: the stages (TLS, shared-key authentication), flow control, timeouts, how
the connection closes and how its end is worded all come from the core.  It makes
the two mistakes of KB Q185728 ("MFCSocs avoids two common MFC socket mistakes")
impossible by construction:

1. *Never assume one Receive is one message.*  Each read notification does exactly
   one receive (the seeds' "one Receive per OnReceive") into the reactor's shared
   buffer and feeds the bytes to the core, which returns every complete frame,
   however the stream was split.  Each frame becomes one :meth:`~MessageSocket.on_message`.
2. *Never lose the unsent part of a Send.*  :meth:`~MessageSocket.send_message`
   only queues the frame in the core; at the end of its turn the reactor writes the
   core's queue (``peek_output``/``consume_output``), leaves what the kernel did not
   take where it is, and resumes when the socket is writable again -- the ``OnSend``
   of the MFC samples.

The pump, after every read, write, timer and request (all on the reactor thread):
write what is queued; when the core is no longer ``OPEN``, do its
:attr:`~msgsock.protocol.MessageProtocol.close_action` (reset at once, or once
everything is written shut down the sending side or close); once the socket is
gone, call ``connection_lost`` and tell the application how it ended.  Reading
stops only while the core says ``reading_paused``: an accepted (server-side) socket
stops reading from a peer that leaves its replies unread above
``limits.write_high_water``; a connecting (client-side) socket never stops reading
because of what it queued itself, so a client that sends more than the water mark
at once cannot deadlock with a server that waits for it to read (SPEC §5.0).
Timeouts (SPEC §7): one reactor timer per socket at the core's ``next_deadline``
calls ``check_timeouts``, so idle, message-completion, handshake and close timeouts
end the connection as on every server.

What the core decided becomes the callbacks, as WSAAsyncSelect reports them:

- the peer's end of stream at a frame boundary: ``on_close(0)``, once every message
  before it was delivered; the socket stays open for our replies until
  :meth:`~MessageSocket.close`;
- any other end: once the socket is closed, ``on_close(errno)`` with the core's
  :class:`~msgsock.exceptions.ConnectionClosed` in :attr:`~AsyncSocket.error` (its
  ``kind`` and ``reason`` say how; ``__cause__`` holds the ``OSError`` or the
  :class:`~msgsock.exceptions.ProtocolError` behind it, when there is one).  The errno
  follows the kind: ``EPROTO`` for a frame the peer broke, ``ETIMEDOUT`` for a
  timeout, ``ECONNABORTED`` for a failed stage, the socket's own errno for a
  network error;
- nothing after the application's own ``close()`` or ``abort()``.

Stages (SPEC §4.2, §7): with ``ssl`` and/or ``auth_key`` the core runs TLS (an
:class:`ssl.SSLObject` over memory BIOs) and/or the authentication handshake first,
within ``limits.handshake_timeout``.  A socket on which :meth:`~MessageSocket.connect`
was called is the client side: it gets ``on_connect(0)`` only once every stage
passed, or ``on_connect(errno)`` (``ECONNABORTED``, ``ETIMEDOUT``, the errno of a
network error) with the end in :attr:`~AsyncSocket.error`; :attr:`~MessageSocket.handshake_stage`
names the stage.  An accepted (or attached) socket is the server side: a failed
stage is an ``on_close(errno)``.  Messages sent before the socket is connected wait
in it and go to the core, in order, once it is (the core holds them until every
stage passed); a :meth:`~MessageSocket.close` made before the stages passed is
applied once they have, so nothing is lost by closing right after sending.

Threads: :meth:`~MessageSocket.send_message`, :meth:`~MessageSocket.close` and
:meth:`~MessageSocket.abort` may be called from any thread and never wait for the
reactor.  Messages handed over by one thread keep their order; messages of different
threads interleave whole.  The user-facing callbacks go through the socket's
dispatcher; reading and writing always stay on the reactor thread, so a slow
dispatcher thread delays only its own callbacks.  ``on_receive`` and ``on_send`` are
used by the pump and are not delivered.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl as _ssl
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

from .._net import set_nodelay
from ..exceptions import ConnectionClosed, EndKind, InvalidState
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Action, End, Limits, MessageProtocol, State, Statistics
from ..stages import Stage, Stages
from ._engine import _EVENT_READ, _EVENT_WRITE, _on_reactor, _State
from .dispatch import Dispatcher
from .reactor import Reactor, TimerHandle
from .socket import (
    DATAGRAM,
    FD_ACCEPT,
    FD_CLOSE,
    FD_CONNECT,
    FD_READ,
    FD_WRITE,
    AsyncSocket,
    SocketKind,
)

__all__ = ["HandshakeStage", "MessageSocket"]

log = logging.getLogger("msgsock.callback")

_Chunk = bytes | bytearray | memoryview

HandshakeStage = Literal["proxy", "tls", "auth"]
"""The stages of a connection, in the order they run (SPEC §7)."""

_KIND_ERRNO = {
    EndKind.RESET: errno.ECONNRESET,
    EndKind.INCOMPLETE_MESSAGE: errno.EPROTO,
    EndKind.MESSAGE_TOO_LARGE: errno.EPROTO,
    EndKind.FRAME_ERROR: errno.EPROTO,
    EndKind.IDLE_TIMEOUT: errno.ETIMEDOUT,
    EndKind.MESSAGE_TIMEOUT: errno.ETIMEDOUT,
    EndKind.HANDSHAKE_TIMEOUT: errno.ETIMEDOUT,
    EndKind.CLOSE_TIMEOUT: errno.ETIMEDOUT,
    EndKind.SHUTDOWN_DEADLINE: errno.ETIMEDOUT,
    EndKind.OS_ERROR: errno.EIO,
}
"""The errno ``on_close``/``on_connect`` report for an end of each kind (else ``ECONNABORTED``)."""


def _errno_of(end: End | None, exc: BaseException | None) -> int:
    """The Winsock-style error code of an end: 0 for a clean one, else an errno."""
    if end is None or end.kind.clean:
        return 0
    for cause in (exc, end.error):
        if isinstance(cause, OSError) and not isinstance(cause, _ssl.SSLError) and cause.errno:
            return cause.errno
    return _KIND_ERRNO.get(end.kind, errno.ECONNABORTED)


def _nbytes(data: _Chunk) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class MessageSocket(AsyncSocket):
    """A stream :class:`AsyncSocket` that sends and receives whole framed messages.

    Override :meth:`on_message` (and ``on_connect``, ``on_close``, ``on_accept`` as
    needed); do not override ``on_receive``/``on_send``, the pump does that work.
    Stream sockets only: ``create(kind=DATAGRAM)`` (or attaching a datagram socket)
    raises ``ValueError``.  Raw ``send``/``receive`` raise ``InvalidState``.

    With ``ssl`` and/or ``auth_key`` every connection first runs TLS and/or the
    authentication handshake (see the module documentation): a connecting socket is
    the client side, an accepted or attached one the server side.

    Args:
        reactor: the reactor that owns this socket.
        frame: the frame format both peers use (SPEC §4.1).
        limits: water marks and timeouts (SPEC §7): ``idle_timeout``,
            ``message_timeout``, ``handshake_timeout``, ``close_timeout``.
        ssl: speak TLS with this context: a client context (``PROTOCOL_TLS_CLIENT``,
            e.g. :func:`msgsock.tls.client_context`) for a socket that connects, a
            server context for accepted ones.
        server_hostname: the name to check the server's certificate against (and
            send as SNI); None uses the host given to :meth:`connect`.  Ignored
            without ``ssl`` and on the server side.
        auth_key: run the shared-key authentication handshake (SPEC §4.2) with this
            key (at least 16 bytes; :func:`msgsock.auth.parse_key_file` reads a key
            file) before any frame.
        dispatcher: where callbacks run; None uses the reactor's.

    Attributes:
        protocol: the sans-I/O state of the current connection (counters in
            ``protocol.stats``, its end in ``protocol.end``).

    Raises:
        ValueError: ``auth_key`` is shorter than 16 bytes.
        TypeError: ``auth_key`` is not bytes, or ``ssl`` is not an ``ssl.SSLContext``.
    """

    _default_events = FD_READ | FD_WRITE | FD_ACCEPT | FD_CONNECT | FD_CLOSE

    def __init__(
        self,
        reactor: Reactor,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        auth_key: bytes | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext, not {type(ssl).__name__}")
        if auth_key is not None:  # a bad key fails here, not per connection
            Stages(server_side=False, auth_key=auth_key)
            auth_key = bytes(auth_key)
        super().__init__(reactor, dispatcher=dispatcher)
        self.frame = frame
        self.limits = limits
        self.ssl = ssl
        self.server_hostname = server_hostname
        self._auth_key = auth_key
        self.protocol = MessageProtocol(frame, limits=limits)
        self._host = ""  # connect()'s host: the default server_hostname
        self._client_side = False  # connect() was called: the client side of the stages
        self._early: deque[tuple[_Chunk, Mapping[str, int] | None]] = deque()  # sent before connected
        self._ready = False  # every stage passed (or failed): on_connect is reported, close() can begin
        self._close_requested = False  # close() before that: applied once ready
        self._held: deque[_Chunk] = deque()  # wire bytes the core returned (server replies)
        self._held_size = 0
        self._write_paused = False  # what we told the core with set_write_paused()
        self._want_write = False  # the kernel took less than offered: wait for writable
        self._timer: TimerHandle | None = None
        self._timer_for: State | None = None  # the core state the timer was armed in

    # -- callbacks ------------------------------------------------------------------------

    def on_message(self, message: bytes) -> None:
        """A whole message arrived (a :class:`~msgsock.framing.Message` when the frame has extra fields)."""

    # -- sending --------------------------------------------------------------------------

    def send_message(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Queue one message for sending; callable from any thread, never waits.

        The bytes the kernel does not take at once are kept and written as it makes
        room.  A ``bytearray`` or ``memoryview`` is not copied: do not change it until
        it has been sent (pass ``bytes`` when in doubt).  May be called as soon as
        :meth:`connect` was called; the message goes out once connected (and every
        stage passed).

        Args:
            message: the body; a :class:`~msgsock.framing.Message` brings its header.
            header: values of the frame's extra header fields.

        Raises:
            OversizeMessage: the body is above the frame's ``max_size``.
            InvalidFormat: bad header fields.
            InvalidState: the socket was closed (or never created), or is listening.
            ConnectionClosed: the connection has ended; ``kind`` says how.
            TypeError: ``message`` is not bytes-like (``message must be bytes-like, got str``).
        """
        # Not bytes-like: TypeError from the core (or encode_parts below), on the
        # path that already refuses it, at no cost to a good message.
        self._check_can_send()
        reactor = self.reactor
        if reactor._inline():
            self._queue_message(message, header)
            return
        # Check the message here so the caller gets OversizeMessage (or TypeError), not a log line.
        self.frame.encode_parts(message, header)
        if not reactor._call_soon_quiet(self._send_handed_off, message, header):
            raise InvalidState(f"{reactor!r} is stopped")

    def _check_can_send(self, *, caller: bool = True) -> None:
        # The caller's view includes close() already called from its thread; the
        # reactor's does not, since a message handed over before close() must go out
        # (the handoffs run in order, so the close comes after it).
        state = self._state
        if state is _State.LISTENING:
            raise InvalidState(f"cannot send on listening {self!r}")
        proto = self.protocol
        if (
            (caller and self._app_closed)
            or state is _State.EMPTY
            or (state is _State.CLOSED and proto.end is None)
        ):
            raise InvalidState(f"cannot send on {self!r}: it is closed")
        if proto.state is not State.OPEN:
            raise proto.closed_error()

    def _send_handed_off(self, message: _Chunk, header: Mapping[str, int] | None) -> None:
        try:
            self._check_can_send(caller=False)
            self._queue_message(message, header)
        except (InvalidState, ConnectionClosed):
            log.debug("%r: dropping a message handed over after the connection ended", self)

    def _queue_message(self, message: _Chunk, header: Mapping[str, int] | None) -> None:
        if self._state is _State.OPEN:
            self.protocol.send_message(message, header)  # held by the core until the stages pass
        else:
            self.frame.encode_parts(message, header)  # fails now, not when it is replayed
            self._early.append((message, header))
        self._mark_dirty()

    # The raw data calls would interleave bytes with the frames: not on a MessageSocket.

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Not available: raw bytes would break the framing; use :meth:`send_message`.

        Raises:
            InvalidState: always.
        """
        raise InvalidState("a MessageSocket sends whole messages: use send_message()")

    def receive(self, n: int = 65536, flags: int = 0) -> bytes:
        """Not available: the pump receives; messages arrive in :meth:`on_message`.

        Raises:
            InvalidState: always.
        """
        raise InvalidState("a MessageSocket receives whole messages: override on_message()")

    @_on_reactor
    def connect(self, host: str, port: int) -> None:
        """Start connecting to ``host``:``port``, as :meth:`AsyncSocket.connect` does.

        With ``ssl`` or ``auth_key`` this socket is the client side of the stages, and
        :meth:`~AsyncSocket.on_connect` fires once the TCP connection and every stage
        succeeded, or with the error that ended them.

        Raises:
            InvalidState: not a created, unconnected socket.
            ValueError: ``port`` is not an int 0..65535 (``port 70000: must be 0..65535``).
            OSError: ``socket.gaierror`` for a name that does not resolve, or no address
                of the socket's family.
        """
        AsyncSocket.connect(self, host, port)
        # The connection completes at a later turn of this thread: in time for _opened().
        self._client_side = True
        self._host = host

    # -- information ------------------------------------------------------------------------

    @property
    def handshake_stage(self) -> HandshakeStage | None:
        """The stage of the current connection that runs now (``"tls"``, ``"auth"``; ``"proxy"``
        on a server), or the one that failed; None once every stage passed (or without any)."""
        stages = self.protocol.stages
        if stages is None or stages.stage is Stage.DONE:
            return None
        stage: HandshakeStage = stages.stage.value
        return stage

    @property
    def ssl_object(self) -> _ssl.SSLObject | None:
        """The TLS session of the current connection (``version()``, ``cipher()``,
        ``getpeercert()``), or None without TLS; complete once ``on_connect(0)`` fired."""
        stages = self.protocol.stages
        return stages.tls if stages is not None else None

    @property
    def outgoing_size(self) -> int:
        """Bytes queued and not yet taken by the kernel."""
        early = sum(_nbytes(m) for m, _ in self._early)
        return self._held_size + self.protocol.outgoing_size + early

    def statistics(self) -> Statistics:
        """Messages and bytes sent and received on the current connection."""
        return self.protocol.stats

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close gracefully: send what is queued, half-close, wait for the peer's EOF, close.

        Callable from any thread; returns at once (:meth:`~AsyncSocket.wait_closed`
        waits).  No callback runs after it.  Over TLS the last frame is followed by
        TLS's ``close_notify``; a connection still connecting or in its stages
        finishes them first, so the queued messages go out.  Bounded by
        ``limits.close_timeout`` (and ``handshake_timeout``), after which the
        connection is reset.
        """
        self._app_closed = True
        self._run_or_queue(self._begin_close)

    def _begin_close(self) -> None:
        if self._sock is None:
            self._closed_event.set()
            return
        state = self._state
        if state is _State.OPEN and self._ready:
            self.protocol.send_eof()
            self._mark_dirty()
        elif state is _State.OPEN or state is _State.CONNECTING:
            self._close_requested = True  # once connected and through the stages
        else:
            self._close_now()

    def abort(self) -> None:
        """Reset the connection (``SO_LINGER`` 0, then close): the peer sees ``ECONNRESET``.

        Callable from any thread, like :meth:`close`; nothing queued is sent.
        """
        self._app_closed = True
        self._run_or_queue(self._begin_abort)

    def _begin_abort(self) -> None:
        if self._sock is not None and self._state is _State.OPEN:
            self.protocol.abort()
        self._abort_now()

    def _connect_failed(self, err: int) -> None:
        connecting = self._state is _State.CONNECTING
        super()._connect_failed(err)
        if connecting and self._state is _State.FAILED:
            # No connection: its (never started) protocol ends with the connect error.
            self.protocol.connection_lost(OSError(err, os.strerror(err)))
            if self._close_requested:
                self._close_now()  # close() was called while connecting: nothing left to flush

    def detach(self) -> socket.socket:
        """Hand the socket over, like :meth:`AsyncSocket.detach`.

        Raises:
            InvalidState: no socket, or bytes would be lost: a message is still queued
                for sending, part of a frame was received, or the connection speaks
                TLS (or is still in its stages).
        """
        return self.reactor.run_sync(self._detach_checked)

    def _detach_checked(self) -> socket.socket:
        # On the reactor thread, so the check and the detach see the same state.
        proto = self.protocol
        if self.outgoing_size or proto.in_frame:
            raise InvalidState(f"cannot detach {self!r}: unsent or partly received data would be lost")
        stages = proto.stages
        if stages is not None and (stages.encrypted or not stages.done):
            raise InvalidState(f"cannot detach {self!r}: its TLS session or handshake would be lost")
        return AsyncSocket.detach(self)

    # -- internals: the connection's protocol ---------------------------------------------------

    def _setup(self, sock: socket.socket, state: _State, peer: Any = None) -> None:
        if SocketKind(sock.type) == DATAGRAM:
            sock.close()
            raise ValueError("a MessageSocket needs a stream socket")
        self.protocol = MessageProtocol(self.frame, limits=self.limits)  # until connected
        self._client_side = self._ready = self._close_requested = False
        self._early.clear()
        self._held.clear()
        self._held_size = 0
        self._write_paused = self._want_write = False
        self._timer = None
        self._timer_for = None
        super()._setup(sock, state, peer)

    def _new_protocol(self) -> MessageProtocol:
        """The protocol of a connection that just opened (a hook: the server's connections override it)."""
        stages = None
        if self.ssl is not None or self._auth_key is not None:
            hostname = None
            if self._client_side and self.ssl is not None:
                hostname = self.server_hostname if self.server_hostname is not None else self._host
            stages = Stages(
                server_side=not self._client_side,
                ssl_context=self.ssl,
                server_hostname=hostname,
                auth_key=self._auth_key,
            )
        return MessageProtocol(
            self.frame,
            limits=self.limits,
            server_side=not self._client_side,
            stages=stages,
            peer_address=self._peer,
        )

    def _opened(self) -> None:
        assert self._sock is not None
        set_nodelay(self._sock)  # whole frames are written at once; batching is ours (SPEC §5.1)
        proto = self._new_protocol()
        proto.pump = self
        self.protocol = proto
        proto.check_timeouts(time.monotonic())
        for message, header in self._early:
            proto.send_message(message, header)
        self._early.clear()
        if proto.handshake_complete:
            self._become_ready(notify=False)  # _finish_connect() reports on_connect(0) itself

    def _become_ready(self, *, notify: bool) -> None:
        """Connected and every stage passed: do the close that waited, report the connect."""
        self._ready = True
        if self._close_requested:
            self.protocol.send_eof()
        if notify and self._client_side:
            AsyncSocket._connect_done(self, 0)
        self._mark_dirty()

    def _connect_done(self, err: int) -> None:
        if not err and not self._ready:
            return  # on_connect(0) waits for the TLS and authentication stages
        super()._connect_done(err)

    def _notify_send(self) -> None:
        self._mark_dirty()  # connected: flush what was queued before (no user on_send)

    def _received(self, data: memoryview) -> None:
        """Bytes read: feed the core, deliver the messages (a hook: servers reply instead)."""
        proto = self.protocol
        messages = proto.receive_data(data)
        if not self._ready and proto.handshake_complete:
            self._become_ready(notify=True)  # on_connect(0) before the first message
        on_message = self.on_message
        for message in messages:
            self._deliver(on_message, message)

    def _hold(self, data: bytes) -> None:
        """Queue wire bytes the core returned (a server's replies), after what the core holds."""
        held = self._held
        for chunk in self.protocol.data_to_send():
            held.append(chunk)
            self._held_size += _nbytes(chunk)
        held.append(data)
        self._held_size += len(data)
        if not self._write_paused and self._held_size > self.limits.write_high_water:
            self._write_paused = True
            self.protocol.set_write_paused(True)

    # -- internals: the pump (reactor thread) ---------------------------------------------------

    def _wanted_events(self) -> int:
        if self._state is not _State.OPEN:
            return super()._wanted_events()
        want = 0
        proto = self.protocol
        if not self._eof_seen and (
            proto.state is not State.OPEN
            or not proto.handshake_complete
            or (self._events & FD_READ and not proto.reading_paused)
        ):
            want |= _EVENT_READ
        if self._want_write:
            want |= _EVENT_WRITE
        return want

    def _sync(self) -> None:
        if self._sock is not None and self._state is _State.OPEN:
            self._pump()
        super()._sync()

    def _writable(self) -> None:
        self._pump()
        self._mark_dirty()

    def _pump(self) -> None:
        """Write what is queued and do what the core says about closing."""
        proto = self.protocol
        if proto.close_action is Action.ABORT:
            self._abort_now()
            self._ended(None)
            return
        if not self._flush():
            return
        state = proto.state
        if state is State.OPEN:
            if proto.eof_received and not self._close_notified:
                self._notify_close(0)  # the peer's FIN, after every message before it
        elif not self._want_write:  # everything is written
            action = proto.close_action
            if action is Action.HALF_CLOSE:
                assert self._sock is not None
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self._lost(exc)
                    return
                proto.eof_written()
                action = proto.close_action
            if action is Action.CLOSE:
                self._close_now()
                self._ended(None)
                return
        if proto.state is not self._timer_for:
            self._arm_timer()

    def _flush(self) -> bool:
        """Write the held bytes, then the core's queue, as far as the kernel takes them.

        Returns False when the socket failed (and is closed now).
        """
        sock = self._sock
        assert sock is not None
        proto = self.protocol
        held = self._held
        while True:
            chunk = held[0] if held else proto.peek_output()
            size = _nbytes(chunk)
            if not size:
                break
            try:
                sent = sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(exc)
                return False
            if held:
                self._consume_held(sent)
            else:
                proto.consume_output(sent)
            if sent < size:
                self._want_write = True  # resume in the write notification (the MFC OnSend)
                return True
        self._want_write = False
        return True

    def _consume_held(self, n: int) -> None:
        held = self._held
        self._held_size -= n
        while n:
            size = _nbytes(held[0])
            if n >= size:
                held.popleft()
                n -= size
            else:
                held[0] = memoryview(held[0])[n:]
                n = 0
        if self._write_paused and self._held_size <= self.limits.write_low_water:
            self._write_paused = False
            self.protocol.set_write_paused(False)

    def _readable_stream(self) -> None:
        if self._eof_seen:
            return
        sock = self._sock
        assert sock is not None
        buffer = self.reactor._get_read_buffer()
        try:
            n = sock.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        if n:
            self._received(buffer[:n])
        else:
            self._eof_seen = True
            self.protocol.receive_eof()
        self._mark_dirty()

    def _arm_timer(self) -> None:
        """Run ``check_timeouts`` at the core's next deadline (a hook: a server sweeps instead)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proto = self.protocol
        self._timer_for = proto.state
        now = time.monotonic()
        when = proto.next_deadline(now)
        if when is not None:
            self._timer = self.reactor.call_later(when - now, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_for = None  # re-armed by the pump
        if self._sock is not None:
            self.protocol.check_timeouts(time.monotonic())
            self._mark_dirty()

    def _lost(self, exc: OSError) -> None:
        """The socket failed: close it and report the end (the core words it)."""
        self._close_now(exc)
        self._ended(exc)

    def _close_now(self, exc: BaseException | None = None) -> None:
        connected = self._sock is not None and self._state is _State.OPEN
        super()._close_now()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if connected:
            self.protocol.connection_lost(exc)

    def _ended(self, exc: BaseException | None) -> None:
        """The socket is gone by the core's decision: tell the application how it ended (once).

        A hook: the server's connections tell their server instead.
        """
        end = self.protocol.end
        err = _errno_of(end, exc)
        if err and end is not None:
            self.error = end.exception()
        if self._client_side and not self._ready:
            self._ready = True  # on_connect is reported once
            AsyncSocket._connect_done(self, err or errno.ECONNABORTED)
        else:
            self._notify_close(err)
