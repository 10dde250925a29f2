"""asyncio servers: :func:`serve` and :class:`Server` (SPEC §5.1, §6.1, §7).

Theory of operation.  A :class:`Server` is a pump around one
:class:`~msgsock.serving.ServerProtocol`, which decides admission
(``max_connections``), the stages of each connection (PROXY header, TLS,
authentication), timeouts, shutdown, the counters and every log line.  Each accepted
socket is one :class:`asyncio.BufferedProtocol` whose
:class:`~msgsock.protocol.MessageProtocol` comes from ``ServerProtocol.accept``; the
stages run inside the core, so the pump only writes what the core says after each
read: no protocol swap, no ``start_tls``.

Two connection models:

- **per message** (``handler``): :class:`_MessagePump`.  ``buffer_updated`` gives the
  read to the core (``receive_echo`` for the built-in echo, ``receive_and_reply`` for
  a handler), which calls the handler for every message and returns **all** replies
  of that read as one ``bytes``, written with one transport call: asyncio transports
  make one send syscall per write, so batching is what makes pipelined traffic fast
  (SPEC §8).  No asyncio object is created per message for a plain function.  When
  the handler returns an awaitable, the rest of the connection's messages wait in a
  queue served by one task, in order, until it is empty again; the core counts them
  as ``replies_owed`` (the connection does not close before they are answered) and
  in its inbox (reading pauses while too many wait);
- **per connection** (``connection_handler``): the handler gets a
  :class:`~msgsock.aio.connection.Connection` (server side: it talks to the server
  through :class:`~msgsock.aio.connection.ServerHooks`) and runs as a task once every
  stage has passed; when it returns the connection is closed gracefully, when it
  raises the core resets the connection and logs the handler error.

Time: **one** sweep per server (``loop.call_later`` every
``ServerProtocol.sweep_interval``) runs ``ServerProtocol.check_timeouts(now)``
(handshake, idle, message-completion and close timeouts, the shutdown deadline) and
acts on the connections it returns; the hot path does no timekeeping.

Graceful shutdown (``close()`` then ``wait_closed()``): stop accepting,
``ServerProtocol.begin_shutdown`` (connections still in their stages are dropped;
served ones finish what they received, flush the replies, half-close and wait for
the peer's EOF), then sweep until every connection is gone; the sweep resets what is
left at ``limits.shutdown_timeout``.

Log lines come from :mod:`msgsock.serving` (the same in every engine).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import logging
import os
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

from .._net import DEFAULT_LOGGER as DEFAULT_LOGGER
from .._net import check_async_function, check_callable, check_port, server_logger
from ..exceptions import ConnectionClosed
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, State, check_reply, format_address
from ..serving import ServerProtocol, ServerStatistics
from .connection import (
    Connection,
    apply_close_action,
    read_buffer,
    reset,
    setup_transport,
    transport_peer,
    write_chunks,
)

__all__ = ["ConnectionHandler", "Handler", "Server", "serve"]

Reply: TypeAlias = bytes | bytearray | memoryview | None
Handler: TypeAlias = Callable[[bytes], Reply | Awaitable[Reply]]
"""A per-message handler: takes a message, returns the reply (or None for no reply),
or an awaitable of it.  A :class:`~msgsock.framing.Message` reply keeps its header."""
ConnectionHandler: TypeAlias = Callable[[Connection], Awaitable[None]]
"""A per-connection handler: ``async def handler(conn)``."""

_OPEN = State.OPEN
_CLOSED = State.CLOSED
"""Module constants: looking an enum member up on its class costs about 80 ns (Python 3.11)."""

_TASK_GRACE = 1.0
"""Seconds a cancelled connection handler has to finish after the shutdown deadline."""


def _echo(message: Any) -> Any:
    return message


class _MessagePump(asyncio.BufferedProtocol):
    """One connection of a per-message server: read, let the core call the handler, write the replies."""

    __slots__ = (
        "_echo",
        "_handler",
        "_loop",
        "_paused",
        "_peer",
        "_queue",
        "_server",
        "_task",
        "_view",
        "proto",
        "transport",
    )

    proto: MessageProtocol
    transport: asyncio.Transport

    def __init__(self, server: Server, peer: Any = None) -> None:
        self._server = server
        self._loop = server._loop
        self._peer = peer  # the address accept() returned, where the pump saw it
        handler = server._handler
        self._echo = handler is None  # the built-in echo
        self._handler: Callable[[Any], Any] = handler if handler is not None else _echo
        self._view = server._view
        self._paused = False  # what we last told the transport
        self._queue: deque[Any] | None = None  # messages waiting for the async handler, in order
        self._task: asyncio.Task[None] | None = None

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look alike.
        self.transport = cast(asyncio.Transport, transport)
        peer = self._peer if self._peer is not None else transport_peer(transport)
        setup_transport(self.transport, self._server.limits)
        self.proto = proto = self._server._protocol.accept(peer, self._loop.time())
        proto.pump = self
        self.act()  # the server's first stage bytes; a rejected connection's reset

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        # The hot path (SPEC §8): one core call, one write.  No timekeeping here:
        # the server's sweep sees activity in the counters.
        proto = self.proto
        if self._queue is None:
            out, other, rest = proto.receive_and_reply(self._view[:nbytes], self._handler, awaitable_ok=True)
            if out:
                self.transport.write(out)
            if other is not None:
                self._await_replies(other, rest)
        else:  # the async handler is busy: keep the order
            self._enqueue(proto.receive_data(self._view[:nbytes]))
        if proto.state is not _OPEN:
            self.act()

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self.act()
        return True  # the core decides when the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None:
            self._task.cancel()
        self.proto.connection_lost(exc)
        self._server._connection_ended()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: the core pauses reading its requests (SPEC §7).
        self.proto.set_write_paused(True)
        self._sync_reading()

    def resume_writing(self) -> None:
        self.proto.set_write_paused(False)
        self._sync_reading()

    # -- the pump -----------------------------------------------------------------------

    def act(self) -> None:
        """Do what the core says now: write its output, apply its close action, (un)pause reading."""
        proto = self.proto
        transport = self.transport
        chunks = proto.data_to_send()
        if chunks:
            write_chunks(transport, chunks)
        if proto.state is not _OPEN:
            apply_close_action(transport, proto)
        self._sync_reading()

    def _sync_reading(self) -> None:
        paused = self.proto.reading_paused
        if paused is self._paused or self.transport.is_closing():
            return
        self._paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- the asynchronous handler's queue --------------------------------------------------

    def _await_replies(self, first: Awaitable[Any], rest: list[Any]) -> None:
        """The handler returned an awaitable: serve it and the messages after it in order, in a task."""
        self._queue = deque()
        self.proto.replies_owed += 1
        self._enqueue(rest)
        self._task = self._loop.create_task(self._serve_queue(first))

    def _enqueue(self, messages: list[Any]) -> None:
        if not messages:
            return
        assert self._queue is not None
        proto = self.proto
        count = len(messages)
        self._queue.extend(messages)
        proto.replies_owed += count
        proto.inbox_add(count, sum(map(len, messages)))
        if proto.reading_paused:
            self._sync_reading()

    async def _serve_queue(self, first: Awaitable[Any]) -> None:
        """Answer the queued messages in order while the handler is asynchronous."""
        proto = self.proto
        queue = self._queue
        assert queue is not None
        handler = self._handler
        try:
            reply = await first
            while True:
                reply = check_reply(reply)
                if reply is not None:
                    proto.send_message(reply)
                proto.replies_done()
                if not queue:
                    break
                message = queue.popleft()
                proto.inbox_take(1, len(message))
                reply = handler(message)
                if inspect.isawaitable(reply):
                    self.act()  # the replies so far go out before we wait
                    reply = await reply
        except Exception as exc:
            proto.fail_handler(exc)  # a reset and an error log with the traceback (SPEC §5.0)
        finally:
            self._queue = None
            self._task = None
        self.act()


class _EchoPump(_MessagePump):
    """A connection of the built-in echo server: the core sends every complete frame back as it came."""

    __slots__ = ()

    def buffer_updated(self, nbytes: int) -> None:
        proto = self.proto
        out = proto.receive_echo(self._view[:nbytes])
        if out:
            self.transport.write(out)
        if proto.state is not _OPEN:
            self.act()


class _StagedMessagePump(_MessagePump):
    """A per-message connection with stages (PROXY, TLS, authentication): the core's own bytes go out too."""

    __slots__ = ()

    def buffer_updated(self, nbytes: int) -> None:
        proto = self.proto
        if self._echo:
            out = proto.receive_echo(self._view[:nbytes])
        elif self._queue is None:
            out, other, rest = proto.receive_and_reply(self._view[:nbytes], self._handler, awaitable_ok=True)
            if other is not None:
                self._await_replies(other, rest)
        else:
            self._enqueue(proto.receive_data(self._view[:nbytes]))
            out = b""
        # The stages' bytes of this read (an authentication verdict) come before the
        # replies to the frames that followed them; TLS records are already in ``out``.
        chunks = proto.data_to_send()
        if chunks:
            write_chunks(self.transport, chunks)
        if out:
            self.transport.write(out)
        if proto.state is not _OPEN:
            self.act()


class _Hooks:
    """What the server-side :class:`~msgsock.aio.connection.Connection` of a :class:`Server` calls (its ``ServerHooks``)."""

    __slots__ = ("_server",)

    def __init__(self, server: Server) -> None:
        self._server = server

    def accept(self, peer_address: Any, now: float) -> MessageProtocol:
        return self._server._protocol.accept(peer_address, now)

    def opened(self, conn: Connection) -> None:
        self._server._start_handler(conn)

    def ended(self, conn: Connection) -> None:
        self._server._connection_ended()


class _Acceptor:
    """Accept connections on a loop that does not keep the address ``accept()`` returned.

    asyncio's own loop records it as the transport's ``peername``; uvloop reads it
    later with ``getpeername()``, which fails once the peer has reset, so an early
    reset would be logged as ``unknown peer`` (SPEC §5.0).  On such a loop the server
    binds with ``create_server`` (every address, option and family as usual), takes
    its listening sockets over, accepts them itself and hands each connection to
    ``connect_accepted_socket`` with the address it was accepted from.
    """

    _BATCH = 64  # accepts per readiness callback, as asyncio's loop does (backlog-bounded)
    _EMFILE_PAUSE = 1.0  # seconds to stop accepting when out of file descriptors, as asyncio does

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        factory: Callable[[Any], asyncio.BaseProtocol],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = factory
        self._pending: set[asyncio.Task[Any]] = set()
        self._closed = False
        for lsock in sockets:
            lsock.setblocking(False)
            loop.add_reader(lsock.fileno(), self._accept, lsock)

    @classmethod
    async def take_over(
        cls,
        loop: asyncio.AbstractEventLoop,
        server: asyncio.Server,
        factory: Callable[[Any], asyncio.BaseProtocol],
    ) -> _Acceptor:
        """Duplicate ``server``'s listening sockets, close it, and accept on the copies."""
        sockets = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
        server.close()
        await server.wait_closed()
        return cls(loop, sockets, factory)

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(self._BATCH):
            try:
                conn, address = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._loop.remove_reader(lsock.fileno())
                    self._loop.call_later(self._EMFILE_PAUSE, self._resume, lsock)
                return
            conn.setblocking(False)
            coro = self._loop.connect_accepted_socket(functools.partial(self._factory, address), conn)
            task = self._loop.create_task(coro)
            self._pending.add(task)
            task.add_done_callback(functools.partial(self._connected, conn))

    def _resume(self, lsock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock)

    def _connected(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if task.cancelled() or task.exception() is not None:
            conn.close()  # the transport could not be made (the peer is gone): nothing to serve

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lsock in self.sockets:
            self._loop.remove_reader(lsock.fileno())
            lsock.close()
        self.sockets = []  # as asyncio.Server: no sockets once closed

    async def wait_closed(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending))


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
        self._handler = handler  # None: the built-in echo (whole frames sent back as they came)
        self._connection_handler = connection_handler
        self.frame = frame
        self.limits = limits
        self.logger = logger
        self._protocol = ServerProtocol(
            frame,
            limits,
            log=logger.log,
            proxy_protocol=proxy_protocol,
            ssl_context=ssl,
            auth_key=auth_key,
            close_on_eof=connection_handler is None,
        )
        self._view = read_buffer()
        self._hooks = _Hooks(self)
        self._server: asyncio.Server | _Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._all_closed = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None

    async def _start(
        self,
        host: str | None,
        port: int,
        *,
        reuse_port: bool,
        backlog: int,
        sock: socket.socket | None,
    ) -> None:
        factory: Callable[[Any], asyncio.BaseProtocol]
        if self._connection_handler is not None:
            hooks = self._hooks

            def factory(peer: Any = None) -> asyncio.BaseProtocol:
                return Connection(self.frame, self.limits, server=hooks, peer=peer)

        else:
            pump = (
                _StagedMessagePump
                if self._protocol.staged
                else _EchoPump
                if self._handler is None
                else _MessagePump
            )

            def factory(peer: Any = None) -> asyncio.BaseProtocol:
                return pump(self, peer)

        kwargs: dict[str, Any] = {"backlog": backlog}
        if reuse_port:
            kwargs["reuse_port"] = True
        server: asyncio.Server | _Acceptor
        if sock is not None:
            server = await self._loop.create_server(factory, sock=sock, **kwargs)
        else:
            server = await self._loop.create_server(factory, host, port, **kwargs)
        if not isinstance(self._loop, asyncio.BaseEventLoop):
            server = await _Acceptor.take_over(self._loop, server, factory)
        self._server = server
        self._sweep_handle = self._loop.call_later(self._protocol.sweep_interval, self._sweep)

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
        """Counters so far: connections, rejections, errors by kind, messages and bytes each way.

        ``connections`` counts the connections accepted (in their stages or served);
        ``rejected`` the ones reset at once because ``max_connections`` were open;
        ``health_checks`` the load balancers' PROXY ``LOCAL`` checks.
        """
        return self._protocol.statistics()

    def __repr__(self) -> str:
        where = ", ".join(format_address(a) for a in self.addresses)
        return f"<Server {where} {len(self._protocol.connections)} connections>"

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
        if self._stopped.is_set():
            return
        if self._server is not None:
            self._server.close()
        for proto in self._protocol.begin_shutdown(self._loop.time()):
            proto.pump.act()
        self._connection_ended()
        self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait for the end of the shutdown that :meth:`close` began.

        Every connection finishes the messages already received and flushes the
        replies, half-closes and waits for its peer to close, all within
        ``limits.shutdown_timeout``; the connections left then are reset.
        """
        await self._stopped.wait()
        if self._shutdown_task is None:
            self._shutdown_task = self._loop.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        await self._all_closed.wait()  # the sweep resets what is left at the deadline
        if self._tasks:
            deadline = self._protocol.deadline or self._loop.time()
            _, pending = await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - self._loop.time()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_TASK_GRACE)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._server is not None:
            await self._server.wait_closed()

    # -- connections ----------------------------------------------------------------------

    def _connection_ended(self) -> None:
        if self._protocol.all_closed:
            self._all_closed.set()

    def _sweep(self) -> None:
        # One periodic pass over all connections instead of a timer each (SPEC §7).
        sp = self._protocol
        now = self._loop.time()
        for proto in sp.check_timeouts(now):
            proto.pump.act()
        deadline = sp.deadline
        if deadline is not None and now >= deadline:
            # The core's ends are all decided by now; a socket still open is one whose
            # close cannot flush: reset it so that the shutdown ends.
            for proto in list(sp.connections):
                if proto.state is _CLOSED:
                    reset(proto.pump.transport)
        self._sweep_handle = self._loop.call_later(sp.sweep_interval, self._sweep)

    def _start_handler(self, conn: Connection) -> None:
        task = self._loop.create_task(self._run_handler(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, conn: Connection) -> None:
        handler = self._connection_handler
        assert handler is not None
        try:
            await handler(conn)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except ConnectionClosed:
            pass  # the connection ended; the core has logged how
        except Exception as exc:
            conn.protocol.fail_handler(exc)  # a reset and an error log with the traceback (SPEC §5.0)
            conn.act()
            return
        await conn.close()


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
    ``connection_handler`` must be an async function (or a ``functools.partial`` of
    one, or an object whose ``__call__`` is one): a plain function is refused here
    with ``TypeError``, not left to fail on every connection.

    A handler that raises, or returns anything but bytes-like or None (or an
    awaitable of it), resets its connection and is logged at error level with its
    traceback (SPEC §5.0); the other connections go on.

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
            header is closed and logged with the socket's peer and the reason; a
            ``LOCAL`` header then the end is a load balancer's health check (logged
            at debug level, counted in ``health_checks``, no error).
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
        ValueError: both ``handler`` and ``connection_handler`` were given,
            ``auth_key`` is shorter than 16 bytes, or ``port`` is not an int
            0..65535 (``port 70000: must be 0..65535``).
        TypeError: ``connection_handler`` is not an async function (``async def``,
            a ``functools.partial`` of one, or an object whose ``__call__`` is one):
            ``connection_handler must be an async function (async def); got
            function 'name'``; ``handler`` is not callable (``handler must be
            callable, got bytes``); ``auth_key`` is not bytes, or ``ssl`` is not an
            :class:`ssl.SSLContext`.
        OSError: the address cannot be bound (e.g. in use).
    """
    if handler is not None and connection_handler is not None:
        raise ValueError("give either handler or connection_handler, not both")
    # Checked here, not by every connection failing (issue 11).
    if handler is not None:
        check_callable(handler, "handler")
    if connection_handler is not None:
        check_async_function(connection_handler, "connection_handler")
    port = check_port(port)
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
