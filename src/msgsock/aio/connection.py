"""asyncio connections: :func:`connect` and :class:`Connection` (SPEC §5.1).

Theory of operation.  A :class:`Connection` is an :class:`asyncio.BufferedProtocol`
and a pump over :class:`~msgsock.protocol.MessageProtocol` (STYLE §1, §11): the core
decides what the connection does, this module only moves bytes and wakes the tasks
that wait.

- the transport reads straight into a buffer shared by every connection of the
  thread (:func:`read_buffer`; ``get_buffer`` and ``buffer_updated`` always run back
  to back, and the core copies what it keeps, so one buffer serves them all and a
  connection at rest costs no buffer at all, SPEC §8);
- ``buffer_updated`` feeds the bytes to the core, which returns every complete frame
  of that read; they wait in a queue that :meth:`Connection.receive` takes from, and
  the core is told (``inbox_add``/``inbox_take``) so it pauses reading while the
  application does not take them (SPEC §7);
- after every call into the core the pump runs :meth:`Connection.act`: it writes what
  the core has to send (TLS records and handshake bytes included: the pump never
  looks at them), and once the core's state is not ``OPEN`` it does what
  ``close_action`` says (shut down our sending side, close, or reset), pauses or
  resumes reading as ``reading_paused`` says, and wakes the waiting tasks;
- every error the application sees comes from the core (``closed_error()``):
  :class:`~msgsock.exceptions.ConnectionClosed` with the core's ``kind``, ``clean``
  and ``reason``.  ``OSError`` goes to ``connection_lost`` untranslated.

Stages (SPEC §4.2, §7): ``connect(ssl=..., auth_key=...)`` gives the core a
:class:`~msgsock.stages.Stages` (TLS through ``ssl.SSLObject`` over memory BIOs, then
the shared-key handshake) and waits until the core says the handshake is complete.
No ``ssl=`` transport, no ``start_tls``: the transport is always plain TCP.

Close (the Winsock graceful shutdown of the seeds): ``close()`` tells the core
``send_eof()``; the pump flushes, half-closes when the core says ``HALF_CLOSE``,
reads (discarding) until the peer's EOF, then closes.  The core's
``check_timeouts(now)`` decides when that has taken too long (``limits.close_timeout``):
a client runs it on a timer at ``next_deadline`` while closing; a server's
connections are swept by their server.

A server-side connection (a server's ``connection_handler``) is the same class given
a :class:`ServerHooks`: its protocol comes from the server's
:class:`~msgsock.serving.ServerProtocol`, and it tells the server when it opens and
ends.  No module reaches into another's private members.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl as ssl_module
import struct
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol, cast

from .._net import check_port, check_timeout, set_nodelay
from ..exceptions import ConcurrencyError, ConnectionClosed, EndKind, HandshakeError, InvalidState, Timeout
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Action, Limits, MessageProtocol, State, Statistics, format_address
from ..proxy import ProxyInfo
from ..stages import Stages

__all__ = [
    "READ_BUFFER_SIZE",
    "Connection",
    "ServerHooks",
    "apply_close_action",
    "connect",
    "read_buffer",
    "reset",
    "setup_transport",
    "transport_peer",
    "write_chunks",
]

READ_BUFFER_SIZE = 256 * 1024
"""Bytes one read may take from the socket: many frames are parsed per read."""

_STAGE_KINDS = frozenset({EndKind.TLS, EndKind.AUTHENTICATION})
"""Ends that ``connect()`` reports as a :class:`~msgsock.exceptions.HandshakeError`."""

_LINGER_RESET = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on, 0 s: ``close()`` resets the connection (RST) instead of a FIN."""

_OPEN = State.OPEN
_CLOSED = State.CLOSED
"""Module constants: looking an enum member up on its class costs about 80 ns (Python 3.11)."""

_local = threading.local()


def read_buffer() -> memoryview:
    """Return this thread's reusable read buffer (``READ_BUFFER_SIZE`` bytes).

    Safe to share between connections of one event loop: asyncio and uvloop call
    ``get_buffer`` and ``buffer_updated`` back to back for one connection, and the
    core copies the bytes it keeps before returning.
    """
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER_SIZE))
    return view


def setup_transport(transport: asyncio.Transport, limits: Limits) -> None:
    """Prepare a new connection's transport: ``TCP_NODELAY`` and the write water marks (SPEC §7)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        set_nodelay(sock)
    transport.set_write_buffer_limits(high=limits.write_high_water, low=limits.write_low_water)


def transport_peer(transport: asyncio.BaseTransport) -> Any:
    """The peer's address of a new transport, read as early as the platform allows.

    The transport's ``peername`` (asyncio records the address ``accept()`` returned);
    else the socket's ``getpeername()``; else None, which the logs show as ``unknown
    peer`` (a peer that reset before its address could be read).
    """
    peer = transport.get_extra_info("peername")
    if peer is None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
    return peer


def write_chunks(transport: asyncio.Transport, chunks: list[bytes | bytearray | memoryview]) -> None:
    """Write what ``data_to_send()`` returned, in one transport call."""
    if len(chunks) == 1:
        transport.write(chunks[0])
    elif chunks:
        transport.writelines(chunks)


def reset(transport: asyncio.Transport) -> None:
    """Reset the connection now: ``SO_LINGER`` 0, then ``abort()`` (a bare ``abort()`` sends a FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:  # already reset by the peer: closing is all that is left
            pass
    transport.abort()


def apply_close_action(transport: asyncio.Transport, proto: MessageProtocol) -> None:
    """Do to ``transport`` what ``proto.close_action`` says, once everything is written (pump rule 3).

    ``ABORT`` resets at once; ``HALF_CLOSE`` writes our EOF after what is buffered
    and tells the core (``eof_written()``), which may then say ``CLOSE``; ``CLOSE``
    closes after what is buffered.  The core's end is final in ``CLOSED``, so a close
    that cannot flush (a peer that sent its EOF and reads nothing) is reset after
    ``limits.close_timeout`` as a backstop.
    """
    while True:
        action = proto.close_action
        if action is None:
            return
        if action is Action.ABORT:
            reset(transport)
            return
        if transport.is_closing():  # closed already: connection_lost follows
            return
        if action is Action.CLOSE:
            transport.close()
            if transport.get_write_buffer_size():
                asyncio.get_running_loop().call_later(proto.limits.close_timeout, reset, transport)
            return
        transport.write_eof()
        proto.eof_written()


class ServerHooks(Protocol):
    """How a server-side :class:`Connection` talks to its server (a small observer, STYLE §11).

    :mod:`msgsock.aio.server` implements it; the connection never sees the server.
    """

    def accept(self, peer_address: Any, now: float) -> MessageProtocol:
        """A socket was accepted from ``peer_address``: return its protocol (``ServerProtocol.accept``)."""
        ...

    def opened(self, conn: Connection) -> None:
        """Every stage passed: the server starts serving ``conn`` (its handler)."""
        ...

    def ended(self, conn: Connection) -> None:
        """The socket of ``conn`` is gone (its protocol's ``connection_lost`` has run)."""
        ...


class Connection(asyncio.BufferedProtocol):
    """One framed connection over an asyncio transport (SPEC §5.1).

    Made by :func:`connect`, or handed to a server's ``connection_handler``.  Not
    meant to be constructed directly; the ``asyncio.BufferedProtocol`` methods are
    called by the transport, not by applications.

    Messages are ``bytes``, or :class:`~msgsock.framing.Message` (``bytes`` with a
    ``.header`` dict) when the frame format has extra header fields.

    Args:
        frame: the frame format both peers use.
        limits: limits in force (write water marks, close timeout).
        stages: the client's TLS/authentication stages (:func:`connect` makes them).
        server: the server that accepted this connection, if any.
        peer: the address ``accept()`` returned, where the server saw it (else the
            transport's).
    """

    _proto: MessageProtocol

    def __init__(
        self,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        *,
        stages: Stages | None = None,
        server: ServerHooks | None = None,
        peer: Any = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._frame = frame
        self._limits = limits
        self._stages = stages
        self._server = server
        self._peer = peer
        self._transport: asyncio.Transport | None = None
        self._local_address: Any = None
        self._view = read_buffer()
        self._reading_paused = False  # what we last told the transport
        self._messages: deque[Any] = deque()  # received, not yet taken by the application
        self._held = False  # server side: the handler took a message and has not come back
        self._recv_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._handshake_waiter: asyncio.Future[None] | None = None
        self._opened = False  # the handshake outcome (complete, or the end) was seen
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._close_task: asyncio.Task[None] | None = None

    # -- asyncio protocol callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the transport (not by applications)."""
        # uvloop's transports are not asyncio.Transport subclasses, only look alike.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._peer if self._peer is not None else transport_peer(transport)
        self._local_address = transport.get_extra_info("sockname")
        setup_transport(self._transport, self._limits)
        if self._server is not None:
            proto = self._server.accept(peer, self._loop.time())
        else:
            proto = MessageProtocol(self._frame, limits=self._limits, stages=self._stages, peer_address=peer)
        proto.pump = self
        self._proto = proto
        self.act()  # a client's first flight; a rejected connection's reset

    def get_buffer(self, sizehint: int) -> memoryview:
        """Called by the transport (not by applications)."""
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        """Called by the transport (not by applications)."""
        proto = self._proto
        messages = proto.receive_data(self._view[:nbytes])
        if messages:
            count = len(messages)
            self._messages.extend(messages)
            proto.inbox_add(count, sum(map(len, messages)))
            if self._server is not None:
                proto.replies_owed += count  # answered when the handler comes back for more
            self._wake_receiver()
            if proto.reading_paused:
                self._sync_reading()
        if proto.stages is not None or proto.state is not _OPEN:
            self.act()

    def eof_received(self) -> bool:
        """Called by the transport (not by applications)."""
        self._proto.receive_eof()
        self._wake_receiver()
        self.act()
        return True  # the core decides when the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the transport (not by applications)."""
        self._proto.connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake_all()
        if self._server is not None:
            self._server.ended(self)

    def pause_writing(self) -> None:
        """Called by the transport (not by applications)."""
        self._proto.set_write_paused(True)
        self._sync_reading()

    def resume_writing(self) -> None:
        """Called by the transport (not by applications)."""
        self._proto.set_write_paused(False)
        self._sync_reading()
        _wake(self._drain_waiter)

    # -- the pump -----------------------------------------------------------------------

    def act(self) -> None:
        """Do what the core says now: write its output, apply its close action, (un)pause reading, wake waiters.

        Called after every call into the core; a server calls it for the connections
        its sweep or its shutdown changed.  Not for applications.
        """
        transport = self._transport
        if transport is None or self._lost.done():
            return
        proto = self._proto
        chunks = proto.data_to_send()
        if chunks:
            write_chunks(transport, chunks)
        state = proto.state
        if not self._opened and (proto.handshake_complete or state is not _OPEN):
            self._opened = True
            _wake(self._handshake_waiter)
            if self._server is not None and proto.handshake_complete and state is not _CLOSED:
                self._server.opened(self)
        if state is not _OPEN:
            apply_close_action(transport, proto)
            self._wake_all()
            if self._server is None and self._timer is None and proto.state is not _CLOSED:
                self._check_timeouts()  # a client times its own close (a server sweeps)
        self._sync_reading()

    def _check_timeouts(self) -> None:
        """The client's close timer: the core's check at its next deadline, while closing."""
        self._timer = None
        proto = self._proto
        if proto.state is _CLOSED or self._lost.done():
            return
        now = self._loop.time()
        if proto.check_timeouts(now) is not None:
            self.act()
            return
        deadline = proto.next_deadline(now)
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._check_timeouts)

    def _sync_reading(self) -> None:
        paused = self._proto.reading_paused
        if paused is self._reading_paused:
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._reading_paused = paused
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _wake_receiver(self) -> None:
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_all(self) -> None:
        self._wake_receiver()
        _wake(self._drain_waiter)
        _wake(self._handshake_waiter)

    async def _wait_handshake(self) -> None:
        """Wait until the core says every stage has passed; raise how it ended otherwise."""
        proto = self._proto
        while not proto.handshake_complete:
            if proto.state is not _OPEN:
                end = proto.end
                error = proto.closed_error()
                if end is not None and end.kind in _STAGE_KINDS:
                    raise HandshakeError(end.reason) from error
                raise error
            self._handshake_waiter = self._loop.create_future()
            try:
                await self._handshake_waiter
            finally:
                self._handshake_waiter = None

    # -- receiving ----------------------------------------------------------------------

    async def receive(self) -> Any:
        """Wait for the next message and return it.

        Returns:
            The message body: ``bytes``, or a :class:`~msgsock.framing.Message` with
            ``.header`` when the frame format has extra header fields.

        Raises:
            ConnectionClosed: the connection ended (or is ending) and no message is
                left; ``kind`` says how (:class:`~msgsock.exceptions.EndKind`):
                ``clean`` for the peer's EOF at a frame boundary or our own close,
                else a reset, a truncated frame or a frame the peer should not have
                sent (the :class:`~msgsock.exceptions.ProtocolError` is the
                ``__cause__``).  Messages that arrived before the end are returned
                first.
            ConcurrencyError: another task is already waiting in ``receive()``.
        """
        if self._held:
            self._release()
        while True:
            if self._messages:
                return self._take()
            proto = self._proto
            if proto.state is not _OPEN or proto.eof_received:
                raise proto.closed_error()
            if self._recv_waiter is not None:
                raise ConcurrencyError("another task is already waiting in receive()")
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None

    def receive_nowait(self) -> Any:
        """Return the next message if one has arrived, without waiting.

        Raises:
            InvalidState: no message is ready ("no message ready"); try ``receive()``.
            ConnectionClosed: as :meth:`receive`, when the connection has ended and
                no message is left.
        """
        if self._held:
            self._release()
        if self._messages:
            return self._take()
        proto = self._proto
        if proto.state is not _OPEN or proto.eof_received:
            raise proto.closed_error()
        raise InvalidState("no message ready")

    def _take(self) -> Any:
        message = self._messages.popleft()
        proto = self._proto
        proto.inbox_take(1, len(message))
        if self._server is not None:
            self._held = True
        if self._reading_paused:
            self._sync_reading()
        return message

    def _release(self) -> None:
        """A server's handler came back for more: the message it held is answered."""
        self._held = False
        proto = self._proto
        proto.replies_done()
        if proto.state is not _OPEN:
            self.act()  # what was owed is done: the close can go on

    def _discard_unread(self) -> None:
        """Drop the messages the application has not taken (a close or an abort)."""
        proto = self._proto
        if self._messages:
            proto.inbox_take(len(self._messages), sum(map(len, self._messages)))
            self._messages.clear()
        if self._server is not None:
            self._held = False
            proto.replies_done(proto.replies_owed)

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> Any:
        """The next message; iteration stops at a clean close.

        Raises:
            ConnectionClosed: the connection ended abnormally (``clean`` is False).
        """
        try:
            return await self.receive()
        except ConnectionClosed as exc:
            if exc.clean:
                raise StopAsyncIteration from None
            raise

    # -- sending ------------------------------------------------------------------------

    def send_nowait(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Queue one message for sending without waiting for the buffer to drain.

        For handlers and callbacks that cannot await; the transport buffers what the
        socket does not take at once.  The caller must not change a large body
        (above 16 KiB) until it has been written.

        Args:
            message: the body; a :class:`~msgsock.framing.Message` brings its header.
            header: values of the format's extra header fields (missing ones are 0).

        Raises:
            ConnectionClosed: the connection has ended or is closing (after
                ``close()``, ``abort()``, a reset); ``kind`` says how.
            OversizeMessage: the body is above ``max_size`` or the length field's range.
            InvalidFormat: unknown header fields or values out of range.
            TypeError: ``message`` is not bytes-like.
        """
        proto = self._proto
        if proto.state is _CLOSED:
            raise proto.closed_error()
        proto.send_message(message, header)
        transport = self._transport
        assert transport is not None
        write_chunks(transport, proto.data_to_send())

    async def send(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Send one message; wait while the write buffer is above the high-water mark.

        Args:
            message: the body; a :class:`~msgsock.framing.Message` brings its header.
            header: values of the format's extra header fields (missing ones are 0).

        Raises:
            ConnectionClosed: the connection has ended or is closing, or it broke
                before the buffer drained; ``kind`` says how.
            OversizeMessage: the body is above ``max_size`` or the length field's range.
            InvalidFormat: unknown header fields or values out of range.
            TypeError: ``message`` is not bytes-like.
        """
        self.send_nowait(message, header)
        proto = self._proto
        while proto.writing_paused and not self._lost.done():
            waiter = self._drain_waiter
            if waiter is None or waiter.done():
                waiter = self._drain_waiter = self._loop.create_future()
            await asyncio.shield(waiter)
        end = proto.end
        if proto.state is _CLOSED and end is not None and not end.kind.clean:
            raise proto.closed_error()

    # -- closing ------------------------------------------------------------------------

    async def close(self, timeout: float | None = None) -> None:
        """Close gracefully: flush, half-close, wait for the peer's EOF, then close.

        Messages not yet received are discarded (and so are those that still
        arrive).  Idempotent: later and concurrent calls wait for the same close.
        Cancelling the caller does not stop the close, which is bounded by the
        close timeout: past it the socket is reset (``close timeout``).

        Args:
            timeout: seconds the close may take (default ``limits.close_timeout``).

        Raises:
            ValueError: ``timeout`` is negative or NaN (nothing is closed then).
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        if self._close_task is None:
            self._close_task = self._loop.create_task(self._close(timeout))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float | None) -> None:
        if self._transport is None:
            return
        proto = self._proto
        if timeout is not None and proto.state is not _CLOSED:
            # The core words and decides the close timeout: give it this one.
            proto.limits = dataclasses.replace(proto.limits, close_timeout=timeout)
        self._discard_unread()
        proto.send_eof()
        self.act()
        await self._lost

    def abort(self) -> None:
        """Reset the connection at once, discarding what is unsent and unread (the peer sees a reset)."""
        if self._transport is None:
            return
        self._discard_unread()
        self._proto.abort()
        self.act()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
        await asyncio.shield(self._lost)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- information --------------------------------------------------------------------

    @property
    def protocol(self) -> MessageProtocol:
        """The sans-I/O :class:`~msgsock.protocol.MessageProtocol` this connection pumps (its state, its end)."""
        return self._proto

    @property
    def peer_address(self) -> Any:
        """The peer's address, e.g. ``("127.0.0.1", 5555)``.

        On a server with ``proxy_protocol``, the client the PROXY header named (the
        socket's own peer, the proxy, for a ``LOCAL`` or ``UNKNOWN`` header); see
        :attr:`proxy_info`.
        """
        return self._proto.peer_address

    @property
    def peer(self) -> str:
        """The peer as the log lines name it (``127.0.0.1:5555``)."""
        return self._proto.peer

    @property
    def proxy_info(self) -> ProxyInfo | None:
        """The PROXY header this connection began with (server with ``proxy_protocol``), else None."""
        info: ProxyInfo | None = self._proto.proxy_info
        return info

    @property
    def local_address(self) -> Any:
        """Our socket address."""
        return self._local_address

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed (``close()``, ``abort()``, a reset, an error)."""
        return self._proto.state is not _OPEN

    @property
    def frame(self) -> FrameFormat:
        """The frame format in use."""
        return self._frame

    @property
    def transport(self) -> asyncio.Transport | None:
        """The underlying (plain TCP) transport."""
        return self._transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Information about the connection, as ``asyncio.BaseTransport.get_extra_info``.

        With TLS, ``ssl_object`` (the :class:`ssl.SSLObject`), ``peercert``,
        ``cipher`` and ``sslcontext`` describe the TLS session (the transport itself
        is plain TCP); every other name is asked of the transport (``socket``,
        ``sockname``, ``peername``).
        """
        stages = self._proto.stages
        tls: ssl_module.SSLObject | None = stages.tls if stages is not None else None
        if tls is not None:
            if name == "ssl_object":
                return tls
            if name == "peercert":
                return tls.getpeercert()
            if name == "cipher":
                return tls.cipher()
            if name == "sslcontext":
                return tls.context
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    def statistics(self) -> Statistics:
        """A snapshot of this connection's counters (messages and bytes, each way)."""
        return dataclasses.replace(self._proto.stats)

    def __repr__(self) -> str:
        if self._transport is None:
            return "<Connection unconnected>"
        return f"<Connection {self._proto.peer} {self._proto.state.value}>"


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def connect(
    host: str = "127.0.0.1",
    port: int = 9898,
    *,
    frame: FrameFormat = DEFAULT_FORMAT,
    limits: Limits = DEFAULT_LIMITS,
    ssl: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float | None = 10.0,
    auth_key: bytes | None = None,
) -> Connection:
    """Open a framed connection to ``host:port``.

    Every address the name resolves to is tried in order.  With ``ssl`` the TLS
    handshake, then with ``auth_key`` the authentication handshake (SPEC §4.2), run
    before this returns: the connection it returns carries frames only, and the
    server has proved it knows the key.

    With TLS 1.3 a server that refuses *our* certificate says so only after the
    handshake: without ``auth_key`` that shows on the first
    :meth:`~Connection.receive` as :class:`~msgsock.exceptions.ConnectionClosed`
    (``kind`` ``TLS``); with ``auth_key`` it is raised here.

    Args:
        host: a name, a dotted IPv4 address or an IPv6 address.
        port: the TCP port.
        frame: the frame format both peers use.
        limits: write water marks and close timeout of the connection.
        ssl: a client TLS context, to connect with TLS.
        server_hostname: the name to check the server's certificate against
            (default: ``host``).
        connect_timeout: seconds for the TCP connect, the TLS handshake and the
            authentication handshake together; None waits as long as the system does.
        auth_key: the shared key (at least 16 bytes) of a server that requires
            authentication (``msgsock.auth.parse_key_file`` reads a key file).

    Returns:
        The open :class:`Connection`.

    Raises:
        Timeout: the connection was not established within ``connect_timeout``.
        ConnectionRefusedError: nothing listens there.
        socket.gaierror: the name cannot be resolved.
        OSError: another network error.
        HandshakeError: the TLS or the authentication handshake failed, with the
            core's reason: "TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]
            certificate verify failed: certificate has expired", "authentication
            failed: the server rejected our key", "...the peer does not know the key
            (bad server proof)", or a server that does not speak the handshake
            ("bad handshake magic ...", "connection closed by the peer before its
            authentication hello ...").  Its ``__cause__`` is the
            :class:`~msgsock.exceptions.ConnectionClosed` (``kind`` ``TLS`` or
            ``AUTHENTICATION``).
        ConnectionClosed: the connection ended otherwise before the handshake was
            complete.
        ValueError: ``auth_key`` is shorter than 16 bytes; ``port`` is not an int
            0..65535 (``port 70000: must be 0..65535``); ``connect_timeout`` is
            negative or NaN.
        TypeError: ``ssl`` is not an :class:`ssl.SSLContext`, ``auth_key`` is not
            bytes, or ``connect_timeout`` is not a number.
    """
    port = check_port(port)
    check_timeout(connect_timeout, "connect_timeout")
    loop = asyncio.get_running_loop()
    stages: Stages | None = None
    if ssl is not None or auth_key is not None:
        # A bad key or context fails here, before any I/O.
        stages = Stages(
            server_side=False,
            ssl_context=ssl,
            server_hostname=server_hostname if server_hostname is not None else host,
            auth_key=auth_key,
        )
    opened: list[Connection] = []

    def factory() -> Connection:
        conn = Connection(frame, limits, stages=stages)
        opened.append(conn)
        return conn

    async def open_connection() -> Connection:
        await loop.create_connection(factory, host, port)
        conn = opened[-1]
        await conn._wait_handshake()
        return conn

    try:
        return await asyncio.wait_for(open_connection(), connect_timeout)
    except TimeoutError:
        where = format_address((host, port))
        if opened and stages is not None:
            opened[-1].abort()
            raise Timeout(f"connecting to {where}: {stages.timeout_reason(connect_timeout or 0.0)}") from None
        raise Timeout(f"connecting to {where} timed out after {connect_timeout:g} s") from None
    except BaseException:
        for conn in opened:
            conn.abort()
        raise
