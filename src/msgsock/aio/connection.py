"""asyncio connections: :func:`connect` and :class:`Connection` (SPEC §5.1).

Theory of operation.  A :class:`Connection` is an :class:`asyncio.BufferedProtocol`
and a pump over :class:`~msgsock.protocol.MessageProtocol` (STYLE §1):

- the transport reads straight into a buffer shared by every connection of the
  thread (:func:`read_buffer`; ``get_buffer`` and ``buffer_updated`` always run back
  to back, and the decoder copies what it keeps, so one buffer serves them all and a
  connection at rest costs no buffer at all, SPEC §8);
- ``buffer_updated`` feeds the bytes to the core, which returns every complete frame
  of that read; they go to a bounded queue that :meth:`Connection.receive` takes
  from.  When the application stops taking (more than ``limits.write_high_water``
  bytes unread), the connection pauses reading from the socket, so a fast peer
  cannot make us buffer without bound (SPEC §7); it resumes below
  ``limits.write_low_water``;
- :meth:`Connection.send` encodes through the core and writes at once; it then
  waits while the transport's buffer is above the high-water mark (the transport
  reports that with ``pause_writing``/``resume_writing``);
- the end of the connection is recorded once, with how it ended, and every later
  :meth:`~Connection.receive` raises the matching
  :class:`~msgsock.exceptions.ConnectionClosed`.  ``OSError`` is translated here and
  nowhere else (STYLE §4).

Close (the Winsock graceful shutdown of the seeds): flush, shut down our sending
side (``write_eof``), read and discard until the peer's EOF or ``close_timeout``,
then close the socket; abort it if it still cannot close by then.

Authentication (SPEC §4.2, ``connect(auth_key=...)``): a small protocol object,
:class:`_ClientAuthProtocol`, pumps the sans-I/O
:class:`~msgsock.auth.ClientHandshake` first; once the server's proof checks out it
swaps the framed :class:`Connection` in (``transport.set_protocol``) and hands it
the bytes that followed the handshake, so the framed path never tests for a
handshake on a read.  TLS comes before it (SPEC §7 order: TLS, then auth, then frames).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl as ssl_module
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from .._handshake import connect_timeout_error, ssl_error_text
from .._net import format_address, set_nodelay
from ..auth import ClientHandshake, new_nonce
from ..exceptions import (
    ConcurrencyError,
    ConnectionClosed,
    HandshakeError,
    InvalidState,
    ProtocolError,
)
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, Statistics

if TYPE_CHECKING:
    from ..proxy import ProxyInfo
    from .server import Server

__all__ = ["READ_BUFFER_SIZE", "Connection", "connect", "read_buffer"]

READ_BUFFER_SIZE = 256 * 1024
"""Bytes one read may take from the socket: many frames are parsed per read."""

MESSAGE_OVERHEAD = 32
"""Bytes charged per queued message on top of its body, so that a flood of empty
messages is bounded too."""

_local = threading.local()


def read_buffer() -> memoryview:
    """Return this thread's reusable read buffer (``READ_BUFFER_SIZE`` bytes).

    Safe to share between connections of one event loop: asyncio and uvloop call
    ``get_buffer`` and ``buffer_updated`` back to back for one connection, and the
    frame decoder copies the bytes it keeps before returning.
    """
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER_SIZE))
    return view


def describe_tls_error(exc: BaseException) -> str:
    """A short reason for a failed TLS handshake, for logs: OpenSSL's words, no traceback.

    ``[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca`` for an
    :class:`ssl.SSLError` (the ``(_ssl.c:NNN)`` source position dropped), the
    verification failure for a certificate we refused (``certificate verify failed:
    certificate has expired``), :func:`describe_os_error` for the rest.
    """
    if isinstance(exc, ssl_module.SSLError):
        return ssl_error_text(exc)
    return describe_os_error(exc)


def feed_buffered(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Deliver ``data`` to ``protocol`` as if the transport had read it (through its buffer).

    Used when a handshake stage hands over to the framed protocol: the bytes that
    followed the handshake in the same read are the start of the frames.
    """
    at = 0
    while at < len(data):
        buf = memoryview(protocol.get_buffer(len(data) - at)).cast("B")
        n = min(len(buf), len(data) - at)
        buf[:n] = data[at : at + n]
        protocol.buffer_updated(n)
        at += n


def setup_transport(transport: asyncio.Transport, limits: Limits) -> bool:
    """Prepare a new connection's transport: ``TCP_NODELAY`` and the write water marks (SPEC §7).

    Returns:
        True when the transport speaks TLS.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        set_nodelay(sock)
    transport.set_write_buffer_limits(high=limits.write_high_water, low=limits.write_low_water)
    return transport.get_extra_info("sslcontext") is not None


def describe_os_error(exc: BaseException) -> str:
    """A short reason for a connection lost with ``exc`` (for logs and ConnectionClosed)."""
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe (peer closed while we were sending)"
    if isinstance(exc, ssl_module.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        server: the server that accepted this connection, if any.
    """

    def __init__(
        self,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        *,
        server: Server | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._proto = MessageProtocol(frame, limits=limits)
        self._limits = limits
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._view = read_buffer()
        self._time: Callable[[], float] = self._loop.time
        self.peer: str = "?"  # formatted peer address, for logs
        self._peer_address: Any = None
        self._local_address: Any = None
        self._proxy_info: ProxyInfo | None = None
        # Receiving.
        self._messages: deque[Any] = deque()
        self._unread = 0  # bytes charged for queued messages
        self._read_paused = False  # paused because the application is not taking
        self._draining = False  # closing: incoming bytes are read only to see EOF
        self._recv_waiter: asyncio.Future[None] | None = None
        # Sending.
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # End of the connection: how it ended, recorded once.
        self._end: tuple[bool, str, BaseException | None] | None = None
        self._pending_error: ProtocolError | None = None  # raised once by receive()
        self._eof = False
        self._eof_waiter: asyncio.Future[None] | None = None
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._lost_future: asyncio.Future[None] = self._loop.create_future()
        self._closing = False  # close() or abort() was called
        self._close_task: asyncio.Task[None] | None = None
        # Timeouts are checked by a server's sweep (SPEC §7, MessageProtocol.check_timeouts).
        self._closing_since: float | None = None
        self._failed = False  # an abnormal end was reported to the server
        self._shutdown = False  # the server is stopping

    # -- asyncio protocol callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the transport (not by applications)."""
        self._setup(transport, transport.get_extra_info("peername"))
        if self._server is not None:
            self._server._connection_made(self)

    def _setup(self, transport: asyncio.BaseTransport, peer_address: Any) -> None:
        """Take ``transport``; ``peer_address`` is the peer to report (a proxied client's, SPEC §7)."""
        # uvloop's transports are not asyncio.Transport subclasses, only look alike.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._peer_address = peer_address
        self._local_address = transport.get_extra_info("sockname")
        self.peer = format_address(peer_address)
        self._tls = setup_transport(transport, self._limits)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Called by the transport (not by applications)."""
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        """Called by the transport (not by applications)."""
        if self._draining:
            return
        proto = self._proto
        try:
            messages = proto.receive_data(self._view[:nbytes])
        except ProtocolError as exc:
            self._fail(str(exc), exc, pending=exc)
            return
        if not messages:
            return
        self._messages.extend(messages)
        self._unread += sum(map(len, messages)) + MESSAGE_OVERHEAD * len(messages)
        if self._unread > self._limits.write_high_water and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake_receiver()
        if proto.error is not None:  # a bad header followed these messages: they stay readable
            self._fail(str(proto.error), proto.error, pending=proto.error)

    def eof_received(self) -> bool:
        """Called by the transport (not by applications)."""
        self._eof = True
        _wake(self._eof_waiter)
        if not self._draining:  # else we are closing: the peer's EOF was all we waited for
            try:
                self._proto.receive_eof()
            except ProtocolError as exc:
                self._fail(str(exc), exc, abort=False)
            else:
                self._set_end(True, "peer closed the connection", None)
                self._wake_receiver()
                if not self._tls:
                    # Keep the transport open: the peer only closed its sending side,
                    # we may still send (half-close).  close() finishes the job.
                    # (TLS transports close on EOF whatever we return.)
                    return True
        self._closing_since = self._time()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the transport (not by applications)."""
        self._lost = True
        self._lost_exc = exc
        if exc is not None:
            self._fail(describe_os_error(exc), exc, abort=False)
        elif self._closing:
            self._set_end(True, "connection closed locally", None)
        elif self._eof:
            self._set_end(True, "peer closed the connection", None)
        else:
            self._set_end(False, "connection lost", None)
        if not self._lost_future.done():
            self._lost_future.set_result(None)
        _wake(self._eof_waiter)
        _wake(self._drain_waiter)
        self._wake_receiver()
        if self._server is not None:
            self._server._connection_lost(self)

    def pause_writing(self) -> None:
        """Called by the transport (not by applications)."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """Called by the transport (not by applications)."""
        self._write_paused = False
        _wake(self._drain_waiter)
        self._drain_waiter = None

    # -- end-of-connection bookkeeping --------------------------------------------------

    def _set_end(self, clean: bool, reason: str, cause: BaseException | None) -> None:
        if self._end is None:
            self._end = (clean, reason, cause)

    def _fail(
        self,
        reason: str,
        cause: BaseException | None,
        *,
        pending: ProtocolError | None = None,
        abort: bool = True,
    ) -> None:
        """Record an abnormal end (protocol error, reset, timeout) and close at once."""
        if self._end is None:
            self._end = (False, reason, cause)
            self._pending_error = pending
        self._draining = True
        self._wake_receiver()
        if self._server is not None and not self._failed:
            self._failed = True
            self._server._connection_failed(self, reason)
        if abort and self._transport is not None and not self._lost:
            self._transport.abort()

    def _closed_error(self) -> ConnectionClosed:
        clean, reason, cause = self._end or (False, "connection closed", None)
        err = ConnectionClosed(clean, reason)
        err.__cause__ = cause
        return err

    def _wake_receiver(self) -> None:
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- receiving ----------------------------------------------------------------------

    async def receive(self) -> Any:
        """Wait for the next message and return it.

        Returns:
            The message body: ``bytes``, or a :class:`~msgsock.framing.Message` with
            ``.header`` when the frame format has extra header fields.

        Raises:
            ConnectionClosed: the connection ended and no message is left; ``clean``
                is True for a graceful close at a frame boundary (peer EOF, or our
                own ``close()``), False for a reset, a truncated frame (the
                :class:`~msgsock.exceptions.IncompleteMessage` is the ``__cause__``)
                or a protocol error already reported.
            ProtocolError: the peer broke the frame format (e.g. ``MessageTooLarge``);
                raised once, after the messages that came before it, then
                ``ConnectionClosed``.  The connection was closed at once.
            ConcurrencyError: another task is already waiting in ``receive()``.
        """
        while True:
            if self._messages:
                return self._take()
            if self._pending_error is not None:
                err, self._pending_error = self._pending_error, None
                raise err
            if self._end is not None or self._closing or self._shutdown:
                if self._end is None:
                    raise ConnectionClosed(
                        True, "server shutting down" if self._shutdown else "closed locally"
                    )
                raise self._closed_error()
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
            ConnectionClosed, ProtocolError: as :meth:`receive`, when the connection
                has ended and no message is left.
        """
        if self._messages:
            return self._take()
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        if self._end is not None:
            raise self._closed_error()
        raise InvalidState("no message ready")

    def _take(self) -> Any:
        message = self._messages.popleft()
        self._unread -= len(message) + MESSAGE_OVERHEAD
        if self._read_paused and self._unread <= self._limits.write_low_water:
            self._read_paused = False
            if self._transport is not None and not self._shutdown:
                self._transport.resume_reading()
        return message

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> Any:
        """The next message; iteration stops at a clean close.

        Raises:
            ConnectionClosed: the connection ended abnormally (``clean`` is False).
            ProtocolError: as :meth:`receive`.
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
            InvalidState: after ``close()`` or ``abort()``.
            ConnectionClosed: the connection was lost (reset, protocol error).
            MessageTooLarge: the body is above ``max_size`` or the length field's range.
            InvalidFormat: unknown header fields or values out of range.
        """
        transport = self._transport
        if self._closing:
            raise InvalidState("cannot send on a closed connection")
        if transport is None or self._lost or transport.is_closing():
            raise self._closed_error()
        proto = self._proto
        proto.send_message(message, header)
        chunks = proto.data_to_send()
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)

    async def send(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Send one message; wait while the write buffer is above the high-water mark.

        Args:
            message: the body; a :class:`~msgsock.framing.Message` brings its header.
            header: values of the format's extra header fields (missing ones are 0).

        Raises:
            InvalidState: after ``close()`` or ``abort()``.
            ConnectionClosed: the connection was lost before the buffer drained.
            MessageTooLarge: the body is above ``max_size`` or the length field's range.
            InvalidFormat: unknown header fields or values out of range.
        """
        self.send_nowait(message, header)
        while self._write_paused and not self._lost:
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = self._loop.create_future()
            await asyncio.shield(self._drain_waiter)
        if self._lost and self._lost_exc is not None:
            raise self._closed_error()

    # -- closing ------------------------------------------------------------------------

    async def close(self, timeout: float | None = None) -> None:
        """Close gracefully: flush, half-close, wait for the peer's EOF, then close.

        Messages not yet received are discarded.  Idempotent: later and concurrent
        calls wait for the same close.  Cancelling the caller does not stop the
        close, which is bounded by ``timeout``.

        Args:
            timeout: seconds to wait for the peer's EOF and for the buffer to drain
                (default ``limits.close_timeout``); the socket is aborted after it.
        """
        if self._close_task is None:
            self._closing = True
            self._close_task = self._loop.create_task(self._close(timeout))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float | None) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        if timeout is None:
            timeout = self._limits.close_timeout
        deadline = self._time() + timeout
        if transport.is_closing():  # aborted, or already closing after the peer's EOF
            await self._wait_lost(transport, deadline)
            return
        self._closing_since = self._time()
        self._messages.clear()
        self._unread = 0
        self._draining = True  # read only to see the peer's EOF (Winsock graceful close)
        self._wake_receiver()
        if self._read_paused or self._shutdown:
            self._read_paused = False
            transport.resume_reading()
        self._proto.send_eof()
        if not self._eof and transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):  # already broken; closing below reports nothing new
                pass
            else:
                self._eof_waiter = self._loop.create_future()
                try:
                    await asyncio.wait_for(
                        asyncio.shield(self._eof_waiter), max(0.0, deadline - self._time())
                    )
                except TimeoutError:
                    pass
        if not self._lost:
            transport.close()  # flushes what is buffered first
        await self._wait_lost(transport, deadline)

    async def _wait_lost(self, transport: asyncio.Transport, deadline: float) -> None:
        if not self._lost:
            try:
                await asyncio.wait_for(asyncio.shield(self._lost_future), max(0.0, deadline - self._time()))
            except TimeoutError:
                transport.abort()  # the peer does not read: give up on the rest
        await self._lost_future

    def abort(self) -> None:
        """Close at once, discarding unsent data (the peer may see a reset)."""
        self._closing = True
        self._set_end(False, "connection aborted locally", None)
        self._messages.clear()
        self._wake_receiver()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
        await asyncio.shield(self._lost_future)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- information --------------------------------------------------------------------

    @property
    def peer_address(self) -> Any:
        """The peer's address, e.g. ``("127.0.0.1", 5555)``.

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
        """True once the connection is closed or ``close()``/``abort()`` was called."""
        return self._lost or self._closing

    @property
    def frame(self) -> FrameFormat:
        """The frame format in use."""
        return self._proto.frame

    @property
    def transport(self) -> asyncio.Transport | None:
        """The underlying transport (for ``get_extra_info``, e.g. the TLS peer certificate)."""
        return self._transport

    def statistics(self) -> Statistics:
        """A snapshot of this connection's counters (messages and bytes, each way)."""
        return dataclasses.replace(self._proto.stats)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self.peer} {state}>"

    # -- server hooks -------------------------------------------------------------------

    def _begin_shutdown(self) -> None:
        """The server is stopping: finish what was received, then end the handler's loop."""
        self._shutdown = True
        if self._transport is not None and not self._read_paused:
            self._transport.pause_reading()
        self._wake_receiver()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _ClientAuthProtocol(asyncio.BufferedProtocol):
    """The client's authentication handshake (SPEC §4.2), before the framed :class:`Connection`.

    Writes the hello at once, pumps :class:`~msgsock.auth.ClientHandshake`, and on
    success swaps a new :class:`Connection` in on the same transport, in the read
    that completed the handshake (so no byte after it reaches this object).
    """

    def __init__(self, key: bytes, frame: FrameFormat, limits: Limits) -> None:
        self._loop = asyncio.get_running_loop()
        self._handshake = ClientHandshake(key, new_nonce())
        self._frame = frame
        self._limits = limits
        self._view = read_buffer()
        self._transport: asyncio.Transport | None = None
        self.result: asyncio.Future[Connection] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        # The hellos cross: ours goes out at once (docs/handshake.md).
        transport.write(self._handshake.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self.result.done():
            return
        handshake = self._handshake
        try:
            handshake.receive_data(self._view[:nbytes])
        except HandshakeError as exc:
            self._failed(exc)
            return
        transport = self._transport
        assert transport is not None
        out = handshake.data_to_send()
        if out:
            transport.write(out)
        if handshake.done:
            conn = Connection(self._frame, self._limits)
            transport.set_protocol(conn)
            conn.connection_made(transport)
            feed_buffered(conn, handshake.remaining)
            self.result.set_result(conn)

    def eof_received(self) -> bool:
        if not self.result.done():
            try:
                self._handshake.receive_eof()
            except HandshakeError as exc:
                self._failed(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.result.done():
            return
        if isinstance(exc, ssl_module.SSLError):
            # A TLS failure after the TLS handshake (e.g. TLS 1.3: the server refused
            # our certificate) is the real reason; report it as connect's TLS errors.
            self.result.set_exception(exc)
            return
        try:
            self._handshake.receive_eof()
        except HandshakeError as error:
            error.__cause__ = exc
            self.result.set_exception(error)

    def _failed(self, exc: HandshakeError) -> None:
        self.result.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def abort(self) -> None:
        """Give up (connect timed out or was cancelled): close at once."""
        if not self.result.done():
            self.result.cancel()
        if self._transport is not None:
            self._transport.abort()


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

    TLS failures are raised as the :mod:`ssl` module reports them (e.g.
    :class:`ssl.SSLCertVerificationError`, whose ``verify_message`` says why the
    server's certificate was refused), not wrapped.  With TLS 1.3 a server that
    refuses *our* certificate says so only after the handshake: without
    ``auth_key`` that shows on the first :meth:`~Connection.receive` as
    :class:`~msgsock.exceptions.ConnectionClosed` with the TLS reason; with
    ``auth_key`` it is raised here as the :class:`ssl.SSLError`.

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
        ssl.SSLError: the TLS handshake failed (``ssl.SSLCertVerificationError``
            when the server's certificate is not trusted or has expired).
        HandshakeError: the authentication failed: "authentication failed: the
            server rejected our key", "...the peer does not know the key (bad server
            proof)", or a server that does not speak the handshake ("bad handshake
            magic ...", "connection closed by the peer before its authentication
            hello ...").
        ValueError: ``auth_key`` is shorter than 16 bytes.
    """
    loop = asyncio.get_running_loop()
    if auth_key is not None:
        ClientHandshake(auth_key, new_nonce())  # a bad key fails here, before any I/O
    opened: list[_ClientAuthProtocol] = []

    def factory() -> asyncio.BufferedProtocol:
        if auth_key is None:
            return Connection(frame, limits)
        proto = _ClientAuthProtocol(auth_key, frame, limits)
        opened.append(proto)
        return proto

    kwargs: dict[str, Any] = {}
    if ssl is not None:
        kwargs["ssl"] = ssl
        kwargs["server_hostname"] = server_hostname if server_hostname is not None else host

    async def open_connection() -> Connection:
        _, proto = await loop.create_connection(factory, host, port, **kwargs)
        if isinstance(proto, Connection):
            return proto
        assert isinstance(proto, _ClientAuthProtocol)
        return await proto.result

    where = format_address((host, port))
    try:
        return await asyncio.wait_for(open_connection(), connect_timeout)
    except TimeoutError:
        authenticating = bool(opened) and opened[-1]._transport is not None
        if authenticating:
            opened[-1].abort()
        raise connect_timeout_error(where, connect_timeout, authenticating=authenticating) from None
    except BaseException:
        for proto in opened:
            proto.abort()
        raise
