"""``MessageSocket``: whole messages over an :class:`AsyncSocket` (SPEC §5.3, KB Q185728).

Theory of operation.  A :class:`MessageSocket` is a pump over
:class:`~msgsock.protocol.MessageProtocol` (STYLE §1) that runs on the reactor
thread.  It makes the two mistakes of KB Q185728 ("MFCSocs avoids two common MFC
socket mistakes") impossible by construction:

1. *Never assume one Receive is one message.*  Each read notification does exactly
   one receive (the seeds' "one Receive per OnReceive") into the reactor's shared
   buffer and feeds the bytes to the core, which returns every complete frame,
   however the stream was split -- one byte at a time or many frames per read.  Each
   frame becomes one :meth:`~MessageSocket.on_message` call.
2. *Never lose the unsent part of a Send.*  :meth:`~MessageSocket.send_message`
   only queues the frame; the reactor writes the queue at the end of its turn (so
   the replies of one read go out in one ``sendmsg``), keeps whatever the kernel did
   not take, and resumes when the socket is writable again -- the ``OnSend`` of the
   MFC samples.

Backpressure (SPEC §7): while more than ``limits.write_high_water`` bytes wait to be
written, the socket stops reading from the peer, and resumes below
``limits.write_low_water``; a peer that does not read cannot make us buffer its
replies without bound.

Threads: :meth:`~MessageSocket.send_message`, :meth:`~MessageSocket.close` and
:meth:`~MessageSocket.abort` may be called from any thread and never wait for the
reactor.  Messages handed over by one thread keep their order; messages of different
threads interleave whole.  The user-facing callbacks (``on_message``,
``on_connect``, ``on_close``, ``on_accept``) go through the socket's dispatcher; the
reading and writing itself always stays on the reactor thread, so a slow dispatcher
thread delays only its own callbacks.  ``on_receive`` and ``on_send`` are used by
the pump and are not delivered.

Closing: :meth:`~MessageSocket.close` is graceful -- write everything queued, shut
down the sending side, read (and discard) until the peer's end of stream, then close;
``limits.close_timeout`` bounds the whole sequence, after which the connection is
reset.  A peer that breaks the frame format closes the socket at once:
``on_close(errno.EPROTO)``, with the :class:`~msgsock.exceptions.ProtocolError` in
:attr:`~AsyncSocket.error`.

Security (SPEC §4.2, §7): with ``ssl`` a connection speaks TLS, with ``auth_key`` it
runs the shared-key authentication handshake (:mod:`msgsock.auth`) -- inside TLS when
both are given, in that order, as the other layers do.  Both are pumped by the
reactor like the frames, never blocking it: TLS is an :class:`ssl.SSLObject`
between two :class:`ssl.MemoryBIO` objects (ciphertext read from the socket goes
into the incoming BIO, plaintext comes out of the ``SSLObject``; frames and handshake bytes go into
the ``SSLObject`` and the outgoing BIO's ciphertext joins the write queue).  The
stages run as soon as the TCP connection is up, within ``limits.handshake_timeout``;
messages queued meanwhile wait for them.  A socket on which
:meth:`~MessageSocket.connect` was called is the client side and gets ``on_connect(0)`` only
once every stage passed; a
failed stage gives ``on_connect(errno.ECONNABORTED)`` with the
:class:`ssl.SSLError` or :class:`~msgsock.exceptions.HandshakeError` in
:attr:`~AsyncSocket.error` (``errno.ETIMEDOUT`` and a
:class:`~msgsock.exceptions.Timeout` when the deadline passed; the errno of a
network error), and :attr:`~MessageSocket.handshake_stage` names the stage.  An
accepted (or attached) socket is the server side: it runs the stages quietly and
reports a failure as ``on_close(error)`` after a warning log line ``PEER closed:
REASON``.  A graceful close over TLS sends TLS's ``close_notify`` before the
half-close; a peer that closes its TCP side without one is taken as a clean end of
stream, as Python's blocking ``ssl`` sockets do (a frame cut short still shows as
:class:`~msgsock.exceptions.IncompleteMessage`).  A plain connection (neither
option) pays one flag test per read for all this.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Mapping
from typing import Literal, cast

from .._handshake import ssl_error_text, stage_failed, stage_name, tls_failed
from .._net import format_address, set_nodelay
from ..auth import ClientHandshake, ServerHandshake, new_nonce
from ..exceptions import ConnectionClosed, HandshakeError, InvalidState, ProtocolError, Timeout
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, Statistics
from .dispatch import Dispatcher
from .reactor import Reactor, TimerHandle
from .socket import (
    _EVENT_READ,
    _EVENT_WRITE,
    DATAGRAM,
    FD_ACCEPT,
    FD_CLOSE,
    FD_CONNECT,
    FD_READ,
    FD_WRITE,
    AsyncSocket,
    SocketKind,
    _on_reactor,
    _State,
)

__all__ = ["MessageSocket"]

log = logging.getLogger("msgsock.callback")

_MAX_IOV = 64
"""Chunks per ``sendmsg`` (well under every system's IOV_MAX)."""

_Chunk = bytes | bytearray | memoryview


_NO_BIO = _ssl.MemoryBIO()
"""Placeholder of a plain connection's BIOs (never written to), so they need no None checks."""

HandshakeStage = Literal["tls", "auth"]
"""The security stages of a connection, in the order they run (SPEC §7)."""


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
        limits: write water marks, ``close_timeout`` and ``handshake_timeout`` (SPEC §7).
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
        protocol: the sans-I/O state of the current connection (counters in ``protocol.stats``).
        handshake_stage: ``"tls"`` or ``"auth"`` while that stage of the current
            connection runs, and after it failed (so a failure's stage is known);
            None when there is no stage left.

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
        if auth_key is not None:
            ClientHandshake(auth_key, new_nonce())  # a bad key fails here, not per connection
            auth_key = bytes(auth_key)
        super().__init__(reactor, dispatcher=dispatcher)
        self.frame = frame
        self.limits = limits
        self.protocol = MessageProtocol(frame, limits=limits)
        self.ssl = ssl
        self.server_hostname = server_hostname
        self._auth_key = auth_key
        self._out: deque[_Chunk] = deque()  # taken from the protocol, not yet written
        self._out_size = 0
        self._want_write = False
        self._paused = False
        self._closing = False
        self._shut_wr = False
        # Security state of the current connection (reset by _setup).
        self.handshake_stage: HandshakeStage | None = None
        self._client_side = False  # connect() was called: on_connect waits for the stages
        self._host = ""  # connect()'s host: the default server_hostname
        self._secure = False  # reads and writes go through the TLS or handshake pump
        self._handshaking = False
        self._tls: _ssl.SSLObject | None = None
        self._tls_in = self._tls_out = _NO_BIO
        self._tls_shut = False  # our close_notify is queued
        self._auth: ClientHandshake | ServerHandshake | None = None
        self._handshake_timer: TimerHandle | None = None

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
        :meth:`connect` was called; the message goes out once connected.

        Args:
            message: the body; a :class:`~msgsock.framing.Message` brings its header.
            header: values of the frame's extra header fields.

        Raises:
            MessageTooLarge: the body is above the frame's ``max_size``.
            InvalidFormat: bad header fields.
            InvalidState: the socket was closed (or never created), or is listening.
            ConnectionClosed: the connection failed or broke the protocol.
        """
        self._check_can_send()
        reactor = self.reactor
        if reactor._inline():
            self.protocol.send_message(message, header)
            self._mark_dirty()
            return
        # Check the message here so the caller gets MessageTooLarge, not a log line.
        self.frame.encode_parts(message, header)
        if not reactor._call_soon_quiet(self._send_handed_off, message, header):
            raise InvalidState(f"{reactor!r} is stopped")

    def _check_can_send(self, *, caller: bool = True) -> None:
        # The caller's view includes close() already called from its thread; the
        # reactor's does not, since a message handed over before close() must go out
        # (the handoffs run in order, so _begin_close comes after it).
        closed = self._app_closed if caller else False
        if closed or self._closing or self._state in (_State.EMPTY, _State.CLOSED):
            if self._broken or self.error is not None:
                raise ConnectionClosed(False, f"{self!r} failed: {self.error}")
            raise InvalidState(f"cannot send on {self!r}: it is closed")
        if self._broken or self._state is _State.FAILED:
            raise ConnectionClosed(False, f"{self!r} failed: {self.error}")
        if self._state is _State.LISTENING:
            raise InvalidState(f"cannot send on listening {self!r}")

    def _send_handed_off(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None
    ) -> None:
        try:
            self._check_can_send(caller=False)
        except (InvalidState, ConnectionClosed):
            log.debug("%r: dropping a message handed over after the socket closed", self)
            return
        self.protocol.send_message(message, header)
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
            OSError: ``socket.gaierror`` for a name that does not resolve, or no address
                of the socket's family.
        """
        AsyncSocket.connect(self, host, port)
        # The connection completes at a later turn of this thread: in time for _opened().
        self._client_side = True
        self._host = host

    @property
    def ssl_object(self) -> _ssl.SSLObject | None:
        """The TLS session of the current connection (``version()``, ``cipher()``,
        ``getpeercert()``), or None without TLS; complete once ``on_connect(0)`` fired."""
        return self._tls

    @property
    def outgoing_size(self) -> int:
        """Bytes queued and not yet taken by the kernel."""
        return self._out_size + self.protocol.outgoing_size

    def statistics(self) -> Statistics:
        """Messages and bytes sent and received on the current connection."""
        return self.protocol.stats

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close gracefully: send what is queued, half-close, wait for the peer's EOF, close.

        Callable from any thread; returns at once (:meth:`~AsyncSocket.wait_closed`
        waits).  No callback runs after it.  Over TLS the last frame is followed by
        TLS's ``close_notify``; a connection still in its TLS or authentication
        handshake finishes it first, so the queued messages go out.  Bounded by
        ``limits.close_timeout``, after which the connection is reset.
        """
        self._app_closed = True
        self._run_or_queue(self._begin_close)

    def _begin_close(self) -> None:
        if self._sock is None:
            self._closed_event.set()
            return
        if self._closing:
            return
        if self._state not in (_State.OPEN, _State.CONNECTING) or self._broken:
            self._close_now()
            return
        # Still connecting: the queued messages go out once connected, then the close.
        self._closing = True
        self.protocol.send_eof()
        self._timers.append(self.reactor.call_later(self.limits.close_timeout, self._close_timed_out))
        self._mark_dirty()

    def _connect_failed(self, err: int) -> None:
        super()._connect_failed(err)
        if self._closing and self._state is _State.FAILED:
            self._close_now()  # close() was called while connecting: nothing left to flush

    def _close_timed_out(self) -> None:
        log.info("%r: graceful close timed out after %s s; resetting", self, self.limits.close_timeout)
        self._abort_now()

    def detach(self) -> socket.socket:
        """Hand the socket over, like :meth:`AsyncSocket.detach`.

        Raises:
            InvalidState: no socket, or bytes would be lost: a message is still queued
                for sending, part of a frame was received, or the connection speaks
                TLS (or is still in its authentication handshake).
        """
        return self.reactor.run_sync(self._detach_checked)

    def _detach_checked(self) -> socket.socket:
        # On the reactor thread, so the check and the detach see the same state.
        if self.outgoing_size or self.protocol.in_frame:
            raise InvalidState(f"cannot detach {self!r}: unsent or partly received data would be lost")
        if self._secure:  # the TLS session (or the handshake) lives here, not in the socket
            raise InvalidState(f"cannot detach {self!r}: its TLS session or handshake would be lost")
        return AsyncSocket.detach(self)

    # -- internals ----------------------------------------------------------------------------

    def _setup(self, sock: socket.socket, state: _State) -> None:
        if SocketKind(sock.type) == DATAGRAM:
            sock.close()
            raise ValueError("a MessageSocket needs a stream socket")
        self.protocol = MessageProtocol(self.frame, limits=self.limits)
        self._out.clear()
        self._out_size = 0
        self._want_write = self._paused = self._closing = self._shut_wr = False
        self.handshake_stage = None
        self._client_side = self._secure = self._handshaking = self._tls_shut = False
        self._tls = None
        self._tls_in = self._tls_out = _NO_BIO
        self._auth = None
        self._handshake_timer = None
        super()._setup(sock, state)

    def _opened(self) -> None:
        assert self._sock is not None
        set_nodelay(self._sock)  # whole frames are written at once; batching is ours (SPEC §5.1)
        if self.ssl is not None or self._auth_key is not None:
            self._start_security()

    def _notify_send(self) -> None:
        self._mark_dirty()  # connected: flush what was queued before (no user on_send)

    def _connect_done(self, err: int) -> None:
        if not err and self._handshaking:
            return  # on_connect(0) waits for the TLS and authentication stages
        super()._connect_done(err)

    def _wanted_events(self) -> int:
        if self._state is not _State.OPEN:
            return super()._wanted_events()
        if self._broken:
            return 0
        want = 0
        if not self._eof_seen and (
            self._closing or (not self._paused and self._events & FD_READ) or self._handshaking
        ):
            want |= _EVENT_READ
        if self._want_write:
            want |= _EVENT_WRITE
        return want

    def _sync(self) -> None:
        if self._sock is not None and self._state is _State.OPEN and not self._broken:
            self._flush()
        super()._sync()

    def _writable(self) -> None:
        self._flush()
        self._mark_dirty()

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None
        protocol = self.protocol
        out = self._out
        if self._secure:
            self._fill_secure()
        elif protocol.outgoing_size:
            for chunk in protocol.data_to_send():
                out.append(chunk)
                self._out_size += _nbytes(chunk)
        while out:
            try:
                if len(out) == 1:
                    offered = _nbytes(out[0])
                    sent = sock.send(out[0])
                else:
                    chunks = list(itertools.islice(out, _MAX_IOV))
                    offered = sum(_nbytes(c) for c in chunks)
                    sent = sock.sendmsg(chunks)
            except BlockingIOError:
                sent = offered = -1
            except OSError as exc:
                self._fail(exc)
                return
            if sent > 0:
                self._consume(sent)
            if sent < offered:
                self._want_write = True  # resume in the write notification (the MFC OnSend)
                break
        else:
            self._want_write = False
            if self._closing and not self._shut_wr and not self._handshaking:
                self._shut_wr = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._close_now()
                    return
                if self._eof_seen:
                    self._close_now()
                    return
        size = self._out_size
        if self._paused:
            self._paused = size > self.limits.write_low_water
        else:
            self._paused = size > self.limits.write_high_water

    def _consume(self, n: int) -> None:
        out = self._out
        self._out_size -= n
        while n:
            chunk = out[0]
            size = _nbytes(chunk)
            if n >= size:
                out.popleft()
                n -= size
            else:
                out[0] = memoryview(chunk).cast("B")[n:]
                n = 0

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
            self._fail(exc)
            return
        if not n:
            self._eof()
            return
        if self._secure:  # TLS, or the authentication handshake still running
            self._received_secure(buffer[:n])
            return
        if self._closing:
            return  # closing: read only to see the peer's EOF
        try:
            messages = self.protocol.receive_data(buffer[:n])
        except ProtocolError as exc:
            self._protocol_failed(exc)
            return
        for message in messages:
            self._deliver(self.on_message, message)
        if self.protocol.error is not None:  # a bad header followed those messages
            self._protocol_failed(self.protocol.error)

    def _eof(self) -> None:
        if self._handshaking:
            self._eof_seen = True
            self._handshake_eof()
            return
        self._eof_seen = True
        self._mark_dirty()
        if self._closing:
            if self._shut_wr:
                self._close_now()
            return
        try:
            self.protocol.receive_eof()
        except ProtocolError as exc:  # IncompleteMessage: the stream ended mid-frame
            self._protocol_failed(exc)
            return
        self._notify_close(0)

    def _protocol_failed(self, exc: ProtocolError) -> None:
        log.warning("%s: %s; closing the connection", format_address(self._peer), exc)
        self.error = exc
        self._broken = True
        self._close_now()
        self._notify_close(errno.EPROTO)

    def _fail(self, exc: OSError) -> None:
        if self._handshaking:
            self._handshake_lost(exc)
            return
        if not self._closing:
            log.info("%s: %s; closing the connection", format_address(self._peer), exc)
        self.error = exc
        self._broken = True
        self._close_now()
        self._notify_close(exc.errno or errno.EIO)

    # -- internals: TLS and the authentication handshake (SPEC §4.2, §7) ---------------------

    def _start_security(self) -> None:
        """The TCP connection is up: start the first stage (TLS, else authentication)."""
        self._secure = self._handshaking = True
        timeout = self.limits.handshake_timeout
        if timeout is not None:
            self._handshake_timer = self.reactor.call_later(timeout, self._handshake_timed_out)
            self._timers.append(self._handshake_timer)
        try:
            if self.ssl is not None:
                self.handshake_stage = "tls"
                self._tls_in = _ssl.MemoryBIO()
                self._tls_out = _ssl.MemoryBIO()
                hostname = None
                if self._client_side:
                    hostname = self.server_hostname if self.server_hostname is not None else self._host
                self._tls = self.ssl.wrap_bio(
                    self._tls_in, self._tls_out, server_side=not self._client_side, server_hostname=hostname
                )
                self._tls_step()  # the client's hello goes out at once
            else:
                self._start_auth()
        except (_ssl.SSLError, ValueError) as exc:
            # Not from inside _opened() (a connect or an accept is still being set up):
            # at the next turn, with _handshaking still holding back on_connect(0).
            self.reactor._call_soon_quiet(self._handshake_failed, errno.ECONNABORTED, exc)

    def _start_auth(self) -> None:
        self.handshake_stage = "auth"
        key = self._auth_key
        assert key is not None
        handshake: ClientHandshake | ServerHandshake
        if self._client_side:
            handshake = ClientHandshake(key, new_nonce())
        else:
            handshake = ServerHandshake(key, new_nonce())
        self._auth = handshake
        self._send_raw(handshake.data_to_send())  # the hellos cross (docs/handshake.md)

    def _tls_step(self) -> None:
        """Advance the TLS handshake; on completion start authentication or finish.

        Raises:
            ssl.SSLError: the handshake failed (a certificate refused, an alert).
        """
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except _ssl.SSLWantReadError:
            self._mark_dirty()  # what it wrote to the outgoing BIO goes out this turn
            return
        self._mark_dirty()
        if self._auth_key is not None:
            self._start_auth()
        else:
            self._handshake_complete()

    def _send_raw(self, data: bytes) -> None:
        """Queue handshake bytes (through TLS when it is on)."""
        if not data:
            return
        if self._tls is not None:
            self._tls.write(data)  # into the outgoing memory BIO: never blocks
        else:
            self._out.append(data)
            self._out_size += len(data)
        self._mark_dirty()

    def _handshake_complete(self) -> None:
        self._handshaking = False
        self.handshake_stage = None
        if self._tls is None:
            self._secure = False  # authenticated plain TCP: the plain pump from here on
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._mark_dirty()  # the messages queued meanwhile can go now
        if self._client_side:
            AsyncSocket._connect_done(self, 0)

    def _fill_secure(self) -> None:
        """Move what is to be sent into the write queue, through TLS when it is on."""
        protocol = self.protocol
        out = self._out
        tls = self._tls
        if not self._handshaking and protocol.outgoing_size:
            if tls is None:
                for chunk in protocol.data_to_send():
                    out.append(chunk)
                    self._out_size += _nbytes(chunk)
            else:
                for chunk in protocol.data_to_send():
                    view = memoryview(chunk).cast("B")
                    while view:  # SSLObject.write may take part of it (one call per record)
                        view = view[tls.write(view) :]
        if tls is None:
            return
        if self._closing and not self._handshaking and not self._tls_shut:
            # The graceful close sends TLS's close_notify after the last frame; the
            # peer's close_notify is not waited for (its EOF is, as in plain TCP).
            self._tls_shut = True
            try:
                tls.unwrap()
            except _ssl.SSLError:  # SSLWantReadError: ours is written, the peer's not here
                pass
        if self._tls_out.pending:
            data = self._tls_out.read()
            out.append(data)
            self._out_size += len(data)

    def _received_secure(self, data: memoryview) -> None:
        """Bytes read on a TLS connection, or during the authentication handshake."""
        tls = self._tls
        if tls is None:
            self._plaintext(data)  # authentication over plain TCP
            return
        if self._closing and not self._handshaking:
            return  # closing: read only to see the peer's EOF
        self._tls_in.write(data)
        try:
            if self.handshake_stage == "tls":
                self._tls_step()
                if self.handshake_stage == "tls":
                    return
            # The ciphertext was copied into the BIO: the read buffer is free for plaintext.
            buffer = self.reactor._get_read_buffer()
            size = len(buffer)
            while self._sock is not None and not self._broken:
                try:
                    # Into the buffer, so it returns the count (typeshed says bytes).
                    n = cast(int, tls.read(size, buffer))
                except _ssl.SSLWantReadError:
                    break
                except _ssl.SSLZeroReturnError:
                    n = 0
                if not n:  # the peer's close_notify: its end of stream
                    self._eof()
                    return
                self._plaintext(buffer[:n])
        except _ssl.SSLError as exc:
            self._tls_error(exc)
            return
        if self._tls_out.pending:
            self._mark_dirty()  # e.g. a key update to answer

    def _plaintext(self, data: memoryview | bytes) -> None:
        """Application-layer bytes: the authentication handshake's, then frames."""
        auth = self._auth
        if auth is not None and not auth.done:
            try:
                auth.receive_data(data)
            except HandshakeError as exc:
                self._send_raw(auth.data_to_send())  # the server's rejection byte
                self._handshake_failed(errno.ECONNABORTED, exc)
                return
            self._send_raw(auth.data_to_send())
            if not auth.done:
                return
            data = auth.remaining
            self._auth = None
            self._handshake_complete()
            if not data or self._sock is None:
                return
        if self._closing:
            return
        try:
            messages = self.protocol.receive_data(data)
        except ProtocolError as exc:
            self._protocol_failed(exc)
            return
        for message in messages:
            self._deliver(self.on_message, message)
        if self.protocol.error is not None:  # a bad header followed those messages
            self._protocol_failed(self.protocol.error)

    def _tls_error(self, exc: _ssl.SSLError) -> None:
        if self._handshaking:
            self._handshake_failed(errno.ECONNABORTED, exc)
            return
        # After the handshake: a record that fails its check, an alert from the peer.
        if not self._closing:
            log.info(
                "%s: TLS error: %s; closing the connection", format_address(self._peer), ssl_error_text(exc)
            )
        self.error = exc
        self._broken = True
        self._close_now()
        self._notify_close(errno.ECONNABORTED)

    def _handshake_eof(self) -> None:
        """The peer closed during a stage: let that stage say what it was waiting for."""
        exc: Exception = ConnectionAbortedError(errno.ECONNABORTED, "connection closed by the peer")
        if self._auth is not None:
            try:
                self._auth.receive_eof()
            except HandshakeError as error:
                exc = error
        elif self._tls is not None:
            self._tls_in.write_eof()
            try:
                self._tls.do_handshake()
            except _ssl.SSLError as error:  # SSLEOFError, or an alert read just before
                exc = error
        self._handshake_failed(errno.ECONNABORTED, exc)

    def _handshake_lost(self, exc: OSError) -> None:
        """A network error during a stage (e.g. a reset)."""
        if self._auth is not None and isinstance(
            exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError
        ):
            # A server without a key resets on our hello: say what the handshake waited
            # for, as the blocking client does.
            try:
                self._auth.receive_eof()
            except HandshakeError as error:
                error.__cause__ = exc
                self._handshake_failed(errno.ECONNABORTED, error)
                return
        self._handshake_failed(exc.errno or errno.EIO, exc)

    def _handshake_timed_out(self) -> None:
        if not self._handshaking or self._sock is None:
            return
        timeout = self.limits.handshake_timeout or 0.0
        stage = stage_name(self.handshake_stage or "")
        self._handshake_failed(errno.ETIMEDOUT, Timeout(f"{stage} did not complete within {timeout:g} s"))

    def _handshake_failed(self, err: int, exc: BaseException) -> None:
        """A stage failed: close, then ``on_connect(err)`` (client) or ``on_close(err)`` (server)."""
        if not self._handshaking or self._sock is None:
            return
        self._handshaking = False
        self._handshake_timer = None
        self.error = exc
        self._broken = True
        self._send_now()  # a TLS alert or the rejection byte tells the peer why
        if isinstance(exc, _ssl.SSLError):
            reason = tls_failed(ssl_error_text(exc))
        elif isinstance(exc, OSError) and exc.strerror:
            reason = stage_failed(exc.strerror, self.handshake_stage or "")
        else:
            reason = str(exc)
        if self._client_side:
            log.info("%s: %s; closing the connection", format_address(self._peer), reason)
        elif not self._app_closed:
            log.warning("%s closed: %s", format_address(self._peer), reason)
        self._close_now()
        if self._client_side:
            AsyncSocket._connect_done(self, err)
        else:
            self._notify_close(err)

    def _send_now(self) -> None:
        """Write what is queued, as far as the kernel takes it at once (before closing)."""
        sock = self._sock
        if sock is None:
            return
        if self._tls_out.pending:
            self._out.append(self._tls_out.read())
        for chunk in self._out:
            try:
                if sock.send(chunk) < _nbytes(chunk):
                    return
            except OSError:
                return
