"""asyncio servers: :func:`serve` and :class:`Server` (SPEC §5.1, §6.1, §7).

Theory of operation.  Two connection models share one :class:`Server`:

- **per message** (``handler``): each connection is a lean
  :class:`asyncio.BufferedProtocol` pump.  ``buffer_updated`` feeds the read to the
  core, calls the handler for every message of that read and writes **all** replies
  with one transport call: asyncio transports make one send syscall per write, so
  batching is what makes pipelined traffic fast (SPEC §8).  No asyncio object is
  created per message for a plain function.  When the handler returns an awaitable,
  the connection switches to a queue served by one task, in order, until the queue
  is empty again;
- **per connection** (``connection_handler``): the handler gets a
  :class:`~msgsock.aio.connection.Connection` and runs as a task; when it returns,
  the connection is closed gracefully.

Limits (SPEC §7): over ``max_connections`` a new connection is closed at once.
When a peer does not read its replies, the transport's write buffer passes the
high-water mark and reading from that peer pauses until it drains, so memory stays
bounded.  Idle and message-completion timeouts are run by **one** periodic sweep
per server over the ``loop.time()`` stamps each read leaves, not by a timer per
message.

Graceful shutdown (``close()`` then ``wait_closed()``): stop accepting; every
connection finishes the messages it has already received and flushes the replies;
then it half-closes (``write_eof``) and waits for the peer to close, everything
within ``limits.shutdown_timeout``; what is left is aborted.

Log lines (the same as the threaded server's): ``connection from PEER`` and
``PEER disconnected (N messages in, M out)`` at info; ``PEER closed: REASON`` at
warning for an abnormal end (no traceback); a handler's exception at error with
its traceback.

Handshake stages (SPEC §4.2, §7; ``docs/handshake.md``).  A server with a PROXY
header to read, TLS or an auth key first gives each connection to a
:class:`_HandshakeProtocol`, which runs, in this order and within **one**
``limits.handshake_timeout`` deadline (one timer per connection, cancelled when
done): the PROXY header (:class:`~msgsock.proxy.ProxyHeaderParser`; when TLS follows,
each read takes at most ``parser.max_read`` bytes so the ClientHello stays in the
socket), TLS (``loop.start_tls`` on the accepted transport), and the
authentication handshake (:class:`~msgsock.auth.ServerHandshake`).  Then it puts
the framed protocol on the transport (``transport.set_protocol``) and hands it the
bytes that followed the handshake.  So the framed hot path (``buffer_updated``)
never tests for a handshake: a server without these options accepts straight into
the framed protocol, exactly as before.  TLS is started by ``start_tls`` rather
than by ``create_server(ssl=...)`` because asyncio reports a failed server-side
handshake to nobody (only to a debug log), and a failed handshake must be logged
with the peer and the reason and counted in ``errors`` (SPEC §7).  With a PROXY
header the peer in every log line is the proxied client (the socket's peer for a
``LOCAL`` header); a handshake that fails before the header is parsed is logged
with the socket's peer.  A failed handshake is logged ``PEER closed: REASON`` at
warning and counts one connection and one error; the connection is logged
``connection from PEER`` only once every stage has passed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

from .._handshake import check_server_key, stage_failed, timeout_reason, tls_failed
from .._net import DEFAULT_LOGGER as DEFAULT_LOGGER
from .._net import format_address, server_logger, set_nodelay
from ..auth import ServerHandshake, new_nonce
from ..exceptions import ConnectionClosed, HandshakeError, ProtocolError, ProxyProtocolError
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, ServerStatistics, Statistics
from ..proxy import ProxyHeaderParser, ProxyInfo
from .connection import (
    MESSAGE_OVERHEAD,
    Connection,
    describe_os_error,
    describe_tls_error,
    feed_buffered,
    read_buffer,
    setup_transport,
)

__all__ = ["ConnectionHandler", "Handler", "Server", "serve"]

Reply: TypeAlias = bytes | bytearray | memoryview | None
Handler: TypeAlias = Callable[[bytes], Reply | Awaitable[Reply]]
"""A per-message handler: takes a message, returns the reply (or None for no reply),
or an awaitable of it.  A :class:`~msgsock.framing.Message` reply keeps its header."""
ConnectionHandler: TypeAlias = Callable[[Connection], Awaitable[None]]
"""A per-connection handler: ``async def handler(conn)``."""

# Why reading from a peer is paused (bits of _HandlerProtocol._paused).
_PAUSED_WRITE = 1  # our replies to it are above the high-water mark (it does not read)
_PAUSED_BUSY = 2  # too many messages wait for the async handler

_BUFFER_TYPES = (bytes, bytearray, memoryview)  # a tuple: isinstance is faster than with a union

_MAX_SWEEP_INTERVAL = 1.0
_MIN_SWEEP_INTERVAL = 0.01


def _echo(message: bytes) -> bytes:
    return message


class _HandlerProtocol(asyncio.BufferedProtocol):
    """One connection of a per-message server: read, call the handler, write replies."""

    __slots__ = (
        "_closing_since",
        "_draining",
        "_echo",
        "_failed",
        "_handler",
        "_lost",
        "_paused",
        "_peer_eof",
        "_proto",
        "_queue",
        "_queued",
        "_server",
        "_shutdown",
        "_task",
        "_time",
        "_tls",
        "_transport",
        "_view",
        "peer",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._handler = server._handler
        self._echo = server._handler is _echo
        self._proto = MessageProtocol(server.frame, limits=server.limits)
        self._view = server._view
        self._time = server._loop.time
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self.peer = "?"
        self._closing_since: float | None = None
        self._queue: deque[Any] | None = None  # messages waiting for the async handler, in order
        self._queued = 0  # bytes charged for them
        self._task: asyncio.Task[None] | None = None
        self._paused = 0
        self._draining = False  # incoming bytes are no longer processed (shutdown or failure)
        self._shutdown = False
        self._peer_eof = False
        self._failed = False
        self._lost = False

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._setup(transport, transport.get_extra_info("peername"))
        self._server._connection_made(self)

    def _setup(self, transport: asyncio.BaseTransport, peer_address: Any) -> None:
        """Take ``transport``; ``peer_address`` is the peer to log (a proxied client's, SPEC §7)."""
        # uvloop's transports are not asyncio.Transport subclasses, only look alike.
        self._transport = transport = cast(asyncio.Transport, transport)
        self.peer = format_address(peer_address)
        self._tls = setup_transport(transport, self._server.limits)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        # The hot path (SPEC §8): one decode, one handler call per message, one write.
        # No timekeeping here: the server's sweep sees activity in the counters.
        if self._draining:
            return
        proto = self._proto
        try:
            if self._echo:
                # Built-in echo: headers checked, complete frames sent back as one span.
                span = proto.receive_echo(self._view[:nbytes])
                if span:
                    self._transport.write(span)  # type: ignore[union-attr]
            elif self._queue is not None:  # the async handler is busy: keep the order
                messages = proto.receive_data(self._view[:nbytes])
                if messages:
                    self._enqueue(messages)
            else:
                out, other, rest = proto.receive_and_reply(self._view[:nbytes], self._handler)
                if out:
                    self._transport.write(out)  # type: ignore[union-attr]
                if other is not None:
                    self._await_reply(other, rest)
        except ProtocolError as exc:
            if exc is proto.error:  # the peer's bytes are bad
                self._fail(str(exc), exc)
            else:  # a reply the handler produced cannot be sent (e.g. too large)
                self._handler_failed(exc)
            return
        except Exception as exc:
            self._handler_failed(exc)
            return
        if proto.error is not None:  # a bad header followed these messages: replies out, then close
            self._fail(str(proto.error), proto.error, abort=False)

    def _await_reply(self, reply: object, rest: list[Any]) -> None:
        """The handler returned an awaitable: serve this and the rest in order in a task."""
        if not inspect.isawaitable(reply):
            raise TypeError(f"handler returned {type(reply).__name__}; expected bytes, None or an awaitable")
        self._queue = deque()
        self._enqueue(rest)
        self._task = self._server._loop.create_task(self._run_queue(reply))

    def eof_received(self) -> bool:
        self._peer_eof = True
        if not self._draining:  # else shutting down or failed: the peer's EOF lets us close now
            try:
                self._proto.receive_eof()
            except ProtocolError as exc:  # EOF mid-frame: log it, flush the replies, close
                self._fail(str(exc), exc, abort=False)
            else:
                if self._task is not None and not self._tls:
                    # The async handler still owes replies: stay open, _run_queue closes.
                    # (TLS transports close on EOF whatever we return.)
                    return True
        elif self._shutdown and self._task is not None and not self._tls:
            return True  # shutting down: the replies to what was received go out first
        # transport.close() flushes the replies first; the sweep aborts it if the
        # peer never takes them (close_timeout).
        self._closing_since = self._time()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._task is not None:
            self._task.cancel()
        if exc is not None:
            self._fail(describe_os_error(exc), exc, abort=False)
        self._server._connection_lost(self)

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests (SPEC §7).
        self._pause(_PAUSED_WRITE)

    def resume_writing(self) -> None:
        self._resume(_PAUSED_WRITE)

    # -- helpers ------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None and not self._lost:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self._transport is not None and not self._lost:
                self._transport.resume_reading()

    def _flush(self) -> None:
        chunks = self._proto.data_to_send()
        if chunks and self._transport is not None and not self._lost:
            if len(chunks) == 1:
                self._transport.write(chunks[0])
            else:
                self._transport.writelines(chunks)

    def _reply(self, reply: object) -> None:
        if reply is None:
            return
        if not isinstance(reply, _BUFFER_TYPES):
            raise TypeError(f"handler returned {type(reply).__name__}; expected bytes or None")
        self._proto.send_message(reply)

    def _enqueue(self, messages: list[Any]) -> None:
        assert self._queue is not None
        self._queue.extend(messages)
        self._queued += sum(map(len, messages)) + MESSAGE_OVERHEAD * len(messages)
        if self._queued > self._server.limits.write_high_water:
            self._pause(_PAUSED_BUSY)

    async def _run_queue(self, first: Awaitable[Any]) -> None:
        """Serve queued messages in order while the handler is asynchronous."""
        queue = self._queue
        assert queue is not None
        handler = self._handler
        low = self._server.limits.write_low_water
        try:
            self._reply(await first)
            while queue:
                message = queue.popleft()
                self._queued -= len(message) + MESSAGE_OVERHEAD
                if self._paused & _PAUSED_BUSY and self._queued <= low:
                    self._resume(_PAUSED_BUSY)
                reply = handler(message)
                if inspect.isawaitable(reply):
                    self._flush()
                    reply = await reply
                self._reply(reply)
            self._flush()
        except Exception as exc:
            self._handler_failed(exc)
            return
        finally:
            self._queue = None
            self._queued = 0
            self._task = None
        self._resume(_PAUSED_BUSY)
        if self._shutdown:
            self._half_close()
        elif self._peer_eof and self._transport is not None and not self._lost:
            self._closing_since = self._time()
            self._transport.close()

    def _fail(self, reason: str, cause: BaseException | None, *, abort: bool = True) -> None:
        """An abnormal end (protocol error, reset, timeout): log once, close at once."""
        self._draining = True
        if not self._failed:
            self._failed = True
            self._server._connection_failed(self, reason)
        if self._transport is not None and not self._lost:
            if abort:
                self._transport.abort()
            else:  # flush what is queued (replies to the messages before the error), then close
                self._transport.close()

    def _handler_failed(self, exc: Exception) -> None:
        self._draining = True
        if not self._failed:
            self._failed = True
            self._server._handler_failed(self, exc)
        # The replies computed before the failure still go out; then close.
        self._flush()
        if self._transport is not None and not self._lost:
            self._closing_since = self._time()
            self._transport.close()

    def _begin_shutdown(self) -> None:
        # SPEC §6.1: finish the messages already received, then half-close.
        self._shutdown = True
        self._draining = True
        if self._task is None:
            self._half_close()

    def _half_close(self) -> None:
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            return
        self._flush()
        self._proto.send_eof()
        self._closing_since = self._time()
        if self._peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        # Read on (discarding) only to see the peer's EOF; memory stays bounded.
        if self._paused:
            self._paused = 0
            transport.resume_reading()


_TLS_BACKSTOP = 1.0
"""Seconds added to asyncio's own TLS handshake timeout: our deadline timer fires
first and names the stage; asyncio's is only a backstop."""


class _HandshakeProtocol(asyncio.BufferedProtocol):
    """The stages before the frames (SPEC §7 order): PROXY header, TLS, authentication.

    Not on the hot path: once every stage has passed, :meth:`_finish` puts the
    server's framed protocol on the transport and this object is dropped.  At most
    one stage is active (``_stage``); each is a small pump over a sans-I/O core
    (:class:`~msgsock.proxy.ProxyHeaderParser`, :class:`~msgsock.auth.ServerHandshake`),
    except TLS, which ``loop.start_tls`` runs in a task.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server._loop
        self._view = server._view
        self._transport: asyncio.Transport | None = None  # the raw one, then the TLS one
        self._actual: Any = None  # the socket's peer
        self._address: Any = None  # the peer to report: the proxied client, once known
        self.peer = "?"
        self._parser = ProxyHeaderParser() if server._proxy_protocol else None
        self._info: ProxyInfo | None = None
        self._ssl = server._ssl  # None once TLS has been started (or when not asked for)
        self._auth: ServerHandshake | None = None
        self._stage = "start"
        self._pending = bytearray()  # bytes after the last stage's end, for the next one
        self._early = bytearray()  # TLS bytes read before start_tls took over the transport
        self._tls_app = False  # start_tls has the transport: what reaches us is decrypted
        self._peer_eof = False
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._ended = False
        self._lost = False

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self._actual = self._address = transport.get_extra_info("peername")
        self.peer = format_address(self._actual)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_nodelay(sock)
        if not self._server._handshake_started(self):
            return
        timeout = self._server.limits.handshake_timeout
        if timeout is not None:
            self._deadline = self._loop.time() + timeout
            self._timer = self._loop.call_later(timeout, self._timed_out)
        self._advance()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._stage == "proxy" and self._ssl is not None and self._parser is not None:
            # TLS starts right after the header: never read past it (docs/proxy.md).
            return self._view[: max(self._parser.max_read, 1)]
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        stage = self._stage
        if stage == "proxy":
            self._receive_proxy(self._view[:nbytes])
        elif stage == "auth":
            self._receive_auth(self._view[:nbytes])
        elif stage == "tls":
            if self._tls_app:
                # The TLS handshake is done and its first application bytes arrived
                # before our task resumed: keep them for the next stage.
                self._pending += self._view[:nbytes]
            else:
                # Read before start_tls took the transport over (uvloop starts reading
                # after connection_made even when it paused): the start of the
                # ClientHello, handed to the TLS protocol in _start_tls.
                self._early += self._view[:nbytes]

    def eof_received(self) -> bool:
        try:
            if self._stage == "proxy":
                assert self._parser is not None
                self._parser.eof()
            elif self._stage == "auth":
                assert self._auth is not None
                self._auth.receive_eof()
            elif self._stage == "tls":
                self._peer_eof = True  # after TLS data: the framed protocol gets it in order
                return False
        except (ProxyProtocolError, HandshakeError) as exc:
            self._fail(str(exc), abort=False)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._ended:
            why = describe_os_error(exc) if exc is not None else "connection closed by the peer"
            self._fail(stage_failed(why, self._stage))

    # -- stages -------------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the next stage, or hand over to the framed protocol when none is left."""
        transport = self._transport
        assert transport is not None
        if self._parser is not None and self._info is None:
            self._stage = "proxy"
            return
        if self._ssl is not None:
            self._stage = "tls"
            context, self._ssl = self._ssl, None
            # The ClientHello is for start_tls, not for us.  (uvloop starts reading after
            # connection_made even so: what it reads first is kept in _early.)
            transport.pause_reading()
            self._task = self._loop.create_task(self._start_tls(context))
            return
        key = self._server._auth_key
        if key is not None and self._auth is None:
            self._stage = "auth"
            self._auth = ServerHandshake(key, new_nonce())
            transport.write(self._auth.data_to_send())  # our hello at once: the hellos cross
            if self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                self._receive_auth(data)
            return
        self._finish()

    def _receive_proxy(self, data: bytes | memoryview) -> None:
        parser = self._parser
        assert parser is not None
        try:
            info = parser.feed(data)
        except ProxyProtocolError as exc:
            self._fail(str(exc))
            return
        if info is None:
            return
        self._info = info
        # A LOCAL (health check) or UNKNOWN header names nobody: the socket's peer stays.
        self._address = info.peer_address(self._actual)
        self.peer = format_address(self._address)
        self._pending += parser.remaining
        self._advance()

    def _receive_auth(self, data: bytes | memoryview) -> None:
        handshake = self._auth
        transport = self._transport
        assert handshake is not None and transport is not None
        try:
            handshake.receive_data(data)
        except HandshakeError as exc:
            out = handshake.data_to_send()  # the rejection byte: the client can say why
            if out:
                transport.write(out)
            self._fail(str(exc), abort=False)
            return
        out = handshake.data_to_send()
        if out:
            transport.write(out)
        if handshake.done:
            self._pending += handshake.remaining
            self._finish()

    async def _start_tls(self, context: ssl_module.SSLContext) -> None:
        raw = self._transport
        assert raw is not None
        timeout = None
        if self._deadline is not None:
            timeout = max(self._deadline - self._loop.time(), 0.001) + _TLS_BACKSTOP
        self._tls_app = True
        if self._early:
            # Runs after start_tls has put its protocol on the transport (synchronously,
            # below) and before that protocol's connection_made and first read.
            self._loop.call_soon(self._hand_early_bytes, raw, bytes(self._early))
            self._early.clear()
        try:
            transport = await self._loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=self._server.limits.close_timeout or None,
            )
        except asyncio.CancelledError:
            # Only _close() cancels this task (handshake timeout, shutdown), after reporting.
            self._task = None
            raw.abort()
            return
        except Exception as exc:
            self._task = None
            # start_tls closed the transport; close, not abort: a TLS alert may be queued.
            self._fail(tls_failed(describe_tls_error(exc)), abort=False)
            return
        self._task = None
        if self._ended or transport is None:
            if transport is not None:
                transport.abort()
            return
        self._transport = transport
        self._advance()

    def _hand_early_bytes(self, raw: asyncio.Transport, data: bytes) -> None:
        """Give the TLS protocol the bytes we read before it took over, in stream order."""
        tls = raw.get_protocol()
        # uvloop's TLS protocol is buffered without subclassing asyncio.BufferedProtocol.
        if tls is not self and not self._ended and hasattr(tls, "get_buffer"):
            feed_buffered(cast(asyncio.BufferedProtocol, tls), data)

    def _finish(self) -> None:
        """Every stage passed: put the framed protocol on the transport and hand it the rest."""
        transport = self._transport
        assert transport is not None
        self._ended = True
        self._stage = "done"
        self._cancel_timer()
        server = self._server
        final = server._new_protocol()
        transport.set_protocol(final)
        final._setup(transport, self._address)
        if isinstance(final, Connection):
            final._proxy_info = self._info
        if not server._handover(self, final):
            return
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            feed_buffered(final, data)
        if self._peer_eof and not final.eof_received():
            transport.close()

    # -- ending -------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self._timer = None
        if self._ended:
            return
        timeout = self._server.limits.handshake_timeout or 0.0
        self._fail(timeout_reason(self._stage, self._parser, timeout))

    def _fail(self, reason: str, *, abort: bool = True) -> None:
        """The handshake failed: log it once, count an error, close the connection."""
        if self._ended:
            return
        self._ended = True
        self._stage = "failed"
        self._cancel_timer()
        self._server._handshake_failed(self, reason)
        self._close(abort)

    def _abort_for_shutdown(self) -> None:
        """The server is stopping: drop a connection that was never served."""
        if self._ended:
            return
        self._ended = True
        self._stage = "failed"
        self._cancel_timer()
        self._close(True)

    def _close(self, abort: bool) -> None:
        if self._task is not None:
            self._task.cancel()  # its transport is aborted as the cancellation lands
            return
        transport = self._transport
        if transport is not None and not self._lost:
            if abort:
                transport.abort()
            else:  # after the rejection byte (auth) or at the peer's EOF: flush, then close
                transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_Conn: TypeAlias = "_HandlerProtocol | Connection"


class Server:
    """A listening msgsock server (SPEC §5.1).  Made by :func:`serve`.

    Use it as an async context manager (leaving it closes gracefully), or call
    :meth:`serve_forever`, :meth:`close` and :meth:`wait_closed`.

    Attributes:
        frame: the frame format of every connection.
        limits: the limits in force.
        logger: where connections, disconnections and errors are logged.
    """

    def __init__(
        self,
        handler: Handler | None,
        connection_handler: ConnectionHandler | None,
        *,
        frame: FrameFormat,
        limits: Limits,
        logger: logging.Logger,
        ssl: ssl_module.SSLContext | None = None,
        auth_key: bytes | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._handler: Handler = handler if handler is not None else _echo
        self._connection_handler = connection_handler
        self.frame = frame
        self.limits = limits
        self.logger = logger
        self._ssl = ssl
        self._auth_key = auth_key
        self._proxy_protocol = proxy_protocol
        self._view = read_buffer()
        self._server: asyncio.Server | None = None
        self._connections: set[_Conn] = set()
        self._handshaking: set[_HandshakeProtocol] = set()  # connections still in their stages
        self._tasks: set[asyncio.Task[None]] = set()
        self._totals = Statistics()  # counters of connections that have ended
        self._accepted = 0
        self._rejected = 0
        self._errors = ServerStatistics()  # only its error counters are used
        self._closing = False
        self._deadline = 0.0
        self._stopped = asyncio.Event()
        self._all_closed = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        timeouts = [t for t in (limits.idle_timeout, limits.message_timeout, limits.close_timeout) if t]
        interval = min(timeouts) / 4 if timeouts else _MAX_SWEEP_INTERVAL
        self._sweep_interval = max(_MIN_SWEEP_INTERVAL, min(_MAX_SWEEP_INTERVAL, interval))

    def _new_protocol(self) -> _HandlerProtocol | Connection:
        """The framed protocol of one connection."""
        if self._connection_handler is None:
            return _HandlerProtocol(self)
        return Connection(self.frame, self.limits, server=self)

    async def _start(
        self,
        host: str | None,
        port: int,
        *,
        reuse_port: bool,
        backlog: int,
        sock: socket.socket | None,
    ) -> None:
        factory: Callable[[], asyncio.BaseProtocol]
        if self._ssl is not None or self._auth_key is not None or self._proxy_protocol:
            # Stages first; the framed protocol takes over after them (module notes).
            def factory() -> asyncio.BaseProtocol:
                return _HandshakeProtocol(self)

        elif self._connection_handler is None:

            def factory() -> asyncio.BaseProtocol:
                return _HandlerProtocol(self)

        else:

            def factory() -> asyncio.BaseProtocol:
                return Connection(self.frame, self.limits, server=self)

        kwargs: dict[str, Any] = {"backlog": backlog}
        if reuse_port:
            kwargs["reuse_port"] = True
        if sock is not None:
            self._server = await self._loop.create_server(factory, sock=sock, **kwargs)
        else:
            self._server = await self._loop.create_server(factory, host, port, **kwargs)
        self._sweep_handle = self._loop.call_later(self._sweep_interval, self._sweep)

    # -- information --------------------------------------------------------------------

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets."""
        return list(self._server.sockets) if self._server is not None else []

    @property
    def addresses(self) -> list[Any]:
        """The listening addresses, e.g. ``[("127.0.0.1", 9898)]``."""
        return [s.getsockname() for s in self.sockets]

    @property
    def port(self) -> int:
        """The listening port (the real one when ``port=0`` was asked for)."""
        addresses = self.addresses
        return int(addresses[0][1]) if addresses else 0

    def statistics(self) -> ServerStatistics:
        """Counters so far: connections, rejections, errors, messages and bytes each way.

        ``connections`` counts the connections served; ``rejected`` the ones closed
        at once because ``max_connections`` were open.
        """
        stats = ServerStatistics(
            connections=self._accepted,
            active=len(self._connections) + len(self._handshaking),
            rejected=self._rejected,
            errors=self._errors.errors,
            error_kinds=dict(self._errors.error_kinds),
        )
        stats.add(self._totals)
        for conn in self._connections:
            stats.add(conn._proto.stats)
        return stats

    def __repr__(self) -> str:
        where = ", ".join(format_address(a) for a in self.addresses)
        return f"<Server {where} {len(self._connections)} connections>"

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called (or the task is cancelled), then shut down gracefully.

        Raises:
            asyncio.CancelledError: the task was cancelled (after the graceful shutdown).
        """
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise
        await self.wait_closed()

    def close(self) -> None:
        """Begin a graceful shutdown: stop accepting, drain connections (see :meth:`wait_closed`)."""
        if self._closing:
            return
        self._closing = True
        self._deadline = self._loop.time() + self.limits.shutdown_timeout
        if self._server is not None:
            self._server.close()
        for pending in list(self._handshaking):
            # Never served: nothing to drain.  Not an error of the peer's.
            self.logger.info("%s closed during the handshake: server shutting down", pending.peer)
            pending._abort_for_shutdown()
        self._handshaking.clear()
        for conn in list(self._connections):
            conn._begin_shutdown()
        self._check_all_closed()
        self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait for the end of the shutdown that :meth:`close` began.

        Every connection finishes the messages already received and flushes the
        replies, half-closes and waits for its peer to close, all within
        ``limits.shutdown_timeout``; the connections left then are aborted.
        """
        await self._stopped.wait()
        if self._shutdown_task is None:
            self._shutdown_task = self._loop.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        try:
            await asyncio.wait_for(self._all_closed.wait(), max(0.0, self._deadline - self._loop.time()))
        except TimeoutError:
            for conn in list(self._connections):
                conn._fail(f"shutdown_timeout {self.limits.shutdown_timeout:g} s passed", None)
            for task in list(self._tasks):
                task.cancel()
            try:  # aborted transports report connection_lost on the next loop iterations
                await asyncio.wait_for(self._all_closed.wait(), 1.0)
            except TimeoutError:
                pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._server is not None:
            await self._server.wait_closed()

    # -- connection bookkeeping (called by the connections) -----------------------------

    def _connection_made(self, conn: _Conn) -> None:
        transport = conn._transport
        assert transport is not None
        if self._closing:  # accepted while stopping: nothing of it was served
            conn._draining = True
            transport.abort()
            return
        limit = self.limits.max_connections
        active = len(self._connections)
        if active >= limit:
            self._rejected += 1
            self.logger.warning("%s rejected: %d connections open (limit %d)", conn.peer, active, limit)
            conn._draining = True
            transport.close()
            return
        self._accepted += 1
        self._register(conn)

    def _register(self, conn: _Conn) -> None:
        self._connections.add(conn)
        self.logger.info("connection from %s", conn.peer)
        if isinstance(conn, Connection):
            task = self._loop.create_task(self._run_connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _handshake_started(self, pending: _HandshakeProtocol) -> bool:
        """A connection with stages was accepted: admit it (limits as for any connection)."""
        transport = pending._transport
        assert transport is not None
        if self._closing:
            pending._ended = True
            transport.abort()
            return False
        limit = self.limits.max_connections
        active = len(self._connections) + len(self._handshaking)
        if active >= limit:
            self._rejected += 1
            self.logger.warning("%s rejected: %d connections open (limit %d)", pending.peer, active, limit)
            pending._ended = True
            transport.close()
            return False
        self._accepted += 1
        self._handshaking.add(pending)
        return True

    def _handover(self, pending: _HandshakeProtocol, conn: _Conn) -> bool:
        """Every stage passed: ``conn`` (already on the transport) is now a served connection."""
        self._handshaking.discard(pending)
        if self._closing:
            conn._draining = True
            if conn._transport is not None:
                conn._transport.abort()
            self._check_all_closed()
            return False
        self._register(conn)
        return True

    def _handshake_failed(self, pending: _HandshakeProtocol, reason: str) -> None:
        if pending not in self._handshaking:
            return  # rejected, or already aborted by close()
        self._handshaking.discard(pending)
        self._errors.count_error(reason)
        self.logger.warning("%s closed: %s", pending.peer, reason)
        self._check_all_closed()

    def _check_all_closed(self) -> None:
        if self._closing and not self._connections and not self._handshaking:
            self._all_closed.set()

    def _connection_lost(self, conn: _Conn) -> None:
        if conn not in self._connections:
            return  # rejected
        self._connections.discard(conn)
        stats = conn._proto.stats
        self._totals.add(stats)
        if not conn._failed:  # an abnormal end was logged as "closed: REASON" instead
            self.logger.info(
                "%s disconnected (%d messages in, %d out)",
                conn.peer,
                stats.messages_received,
                stats.messages_sent,
            )
        self._check_all_closed()

    def _connection_failed(self, conn: _Conn, reason: str) -> None:
        if conn not in self._connections:
            return
        self._errors.count_error(reason)
        self.logger.warning("%s closed: %s", conn.peer, reason)

    def _handler_failed(self, conn: _Conn, exc: BaseException) -> None:
        self._errors.count_error("handler raised")
        self.logger.error(
            "%s closed: handler raised %s: %s", conn.peer, type(exc).__name__, exc, exc_info=exc
        )

    async def _run_connection(self, conn: Connection) -> None:
        handler = self._connection_handler
        assert handler is not None
        try:
            await handler(conn)
        except asyncio.CancelledError:
            conn.abort()
            return
        except Exception as exc:
            # A ConnectionClosed or ProtocolError escaping the handler was already
            # reported by the connection (or is a clean end); anything else is a bug.
            quiet = isinstance(exc, ConnectionClosed | ProtocolError) and (
                conn._failed or (isinstance(exc, ConnectionClosed) and exc.clean)
            )
            if not quiet:
                conn._failed = True
                self._handler_failed(conn, exc)
                conn.abort()
                return
        await conn.close()

    def _sweep(self) -> None:
        # One periodic pass over all connections instead of a timer per message (SPEC §7).
        now = self._loop.time()
        close_timeout = self.limits.close_timeout
        if not self._closing:
            for conn in list(self._connections):
                if conn._lost:
                    continue
                closing_since = conn._closing_since
                if closing_since is not None:
                    if now - closing_since > close_timeout and conn._transport is not None:
                        conn._transport.abort()  # the peer will not take the rest
                    continue
                reason = conn._proto.check_timeouts(now)
                if reason is not None:
                    conn._fail(reason, None)
        self._sweep_handle = self._loop.call_later(self._sweep_interval, self._sweep)


async def serve(
    handler: Handler | None = None,
    host: str | None = "127.0.0.1",
    port: int = 9898,
    *,
    connection_handler: ConnectionHandler | None = None,
    frame: FrameFormat = DEFAULT_FORMAT,
    limits: Limits = DEFAULT_LIMITS,
    ssl: ssl_module.SSLContext | None = None,
    auth_key: bytes | None = None,
    proxy_protocol: bool = False,
    reuse_port: bool = False,
    backlog: int = 1024,
    sock: socket.socket | None = None,
    logger: logging.Logger | None = None,
) -> Server:
    """Start a framed server and return it, listening.

    Give either ``handler`` (called for every message; its return value is the
    reply, None for none; it may be a coroutine function, replies stay in order) or
    ``connection_handler`` (``async def h(conn)``, the connection is closed
    gracefully when it returns).  With neither, the server echoes every message.

    Args:
        handler: the per-message handler.
        host: the address to bind (loopback by default; None for every interface).
        port: the TCP port; 0 picks a free one (see :attr:`Server.port`).
        connection_handler: the per-connection handler.
        frame: the frame format of every connection.
        limits: limits in force (SPEC §7).
        ssl: a server TLS context, to serve TLS.  For mutual TLS give it the client
            CA (``load_verify_locations``) and ``verify_mode = ssl.CERT_REQUIRED``.
        auth_key: a shared key (at least 16 bytes; ``msgsock.auth.parse_key_file``
            reads a key file): every client must pass the authentication handshake
            (SPEC §4.2) before any frame.  A client that fails is sent the rejection
            byte, closed and logged ``PEER closed: authentication failed: ...``.
        proxy_protocol: every connection must begin with a PROXY protocol v1 or v2
            header (HAProxy's ``send-proxy``/``send-proxy-v2``); the peer logged and
            given to handlers is the client it names.  A connection without a valid
            header is closed and logged with the socket's peer and the reason.
        reuse_port: set SO_REUSEPORT (several processes on one port).
        backlog: the listen backlog.
        sock: an already bound socket to serve on instead of ``host``/``port``.
        logger: where to log (default ``logging.getLogger("msgsock.server")``).

    Per connection, the stages run in this order, all within one
    ``limits.handshake_timeout`` (SPEC §7): PROXY header (``proxy_protocol``), TLS
    (``ssl``), authentication (``auth_key``), then frames.  A failed stage is logged
    ``PEER closed: REASON`` at warning (no traceback) and counted in the statistics'
    ``errors``; the others go on being served.

    Returns:
        The running :class:`Server`.

    Raises:
        ValueError: both ``handler`` and ``connection_handler`` were given, or
            ``auth_key`` is shorter than 16 bytes.
        TypeError: ``auth_key`` is not bytes.
        OSError: the address cannot be bound (e.g. in use).
    """
    if handler is not None and connection_handler is not None:
        raise ValueError("give either handler or connection_handler, not both")
    auth_key = check_server_key(auth_key)
    server = Server(
        handler,
        connection_handler,
        frame=frame,
        limits=limits,
        logger=server_logger(logger),
        ssl=ssl,
        auth_key=auth_key,
        proxy_protocol=proxy_protocol,
    )
    await server._start(host, port, reuse_port=reuse_port, backlog=backlog, sock=sock)
    return server
