"""``MessageServer``: the callback layer's server (SPEC §5.0, §5.3, §6.1, §7).

Theory of operation.  A :class:`MessageServer` is a listening :class:`AsyncSocket`
on a :class:`~msgsock.callback.Reactor` and a pump around one
:class:`~msgsock.serving.ServerProtocol`, which decides everything a server does:
admission (``max_connections``), the stages of each connection (PROXY header, TLS,
authentication), how each end is counted and logged, and the shutdown.  So it
behaves as the asyncio and threaded servers do, with the same log lines and counts.

- Each accepted socket becomes a :class:`~msgsock.callback.MessageSocket` (a private
  subclass) whose protocol comes from ``ServerProtocol.accept``; every read goes
  through ``receive_and_reply`` with the handler (``receive_echo`` for the default
  echo), and the replies of one read are written as one chunk.  A handler that
  raises or returns a wrong type resets that connection (the core decides and the
  server protocol logs it with the traceback).
- One reactor timer sweeps every connection's timeouts (``ServerProtocol.check_timeouts``
  every ``sweep_interval``), not a timer per connection.
- :meth:`MessageServer.close` (from any thread) stops accepting and begins the
  graceful shutdown: each connection finishes what it received, half-closes and
  waits for its peer; the sweep resets what is left at ``limits.shutdown_timeout``.
  :meth:`MessageServer.wait_closed` waits for the last connection.

The handler runs on the reactor thread, so it must not block: it delays every
connection of that reactor.
"""

from __future__ import annotations

import logging
import socket
import ssl as _ssl
import threading
import time
from collections.abc import Callable
from typing import TypeAlias

from .._net import check_callable, check_port, check_timeout, server_logger
from ..exceptions import InvalidState
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol
from ..serving import ServerProtocol, ServerStatistics
from ._engine import _on_reactor
from .dispatch import direct
from .message import MessageSocket
from .reactor import Reactor, TimerHandle
from .socket import FD_ACCEPT, AsyncSocket, WouldBlock

__all__ = ["Handler", "MessageServer"]

Handler: TypeAlias = Callable[[bytes], "bytes | bytearray | memoryview | None"]
"""A per-message handler: takes a message, returns the reply (None for no reply).
A :class:`~msgsock.framing.Message` reply keeps its header fields."""

_ACCEPT_BATCH = 32
"""Connections accepted per notification (the rest at the next turn)."""


class _ServerConnection(MessageSocket):
    """One accepted connection of a :class:`MessageServer`: replies through the server's protocol."""

    def __init__(self, server: MessageServer) -> None:
        super().__init__(server.reactor, server.frame, server.limits, dispatcher=direct)
        self._server = server

    def _new_protocol(self) -> MessageProtocol:
        return self._server.protocol.accept(self._peer, time.monotonic())

    def _received(self, data: memoryview) -> None:
        proto = self.protocol
        handler = self._server.handler
        # The replies of one read come back as one chunk, ready for the wire.
        out = proto.receive_echo(data) if handler is None else proto.receive_and_reply(data, handler)[0]
        if out:
            self._hold(out)

    def _arm_timer(self) -> None:
        pass  # the server's one sweep keeps the time

    def _ended(self, exc: BaseException | None) -> None:
        self._server._connection_gone()

    def wake(self) -> None:
        """The server's sweep or shutdown changed this connection's state: pump it this turn."""
        self._mark_dirty()


class MessageServer(AsyncSocket):
    """A framed server on a reactor: accepts connections and answers each message (SPEC §5.3).

    Make it, then :meth:`start` it (or ``create(port, address=host)`` and
    ``listen()`` it as any :class:`AsyncSocket`)::

        with Reactor() as reactor:
            server = MessageServer(reactor, lambda message: message[::-1], "127.0.0.1", 9898)
            server.start()
            ...
            server.close()
            server.wait_closed(5.0)

    Args:
        reactor: the reactor that runs the server and its connections.
        handler: called on the reactor thread for every message; returns the reply
            (bytes-like, or None for none).  None echoes every message (header
            fields included).
        host: the address :meth:`start` binds (loopback by default; ``""`` for every
            interface).
        port: the TCP port; 0 picks a free one (see :attr:`port`).
        frame: the frame format of every connection.
        limits: the limits in force (SPEC §7): ``max_connections``, the timeouts,
            the write water marks, ``shutdown_timeout``.
        ssl: a server TLS context, to serve TLS.
        auth_key: a shared key (at least 16 bytes): every client must pass the
            authentication handshake (SPEC §4.2) before any frame.
        proxy_protocol: every connection begins with a PROXY protocol v1 or v2
            header; the peer logged is the client it names.
        logger: where connections, their ends and errors are logged (default
            ``logging.getLogger("msgsock.server")``, as for every server).

    Attributes:
        protocol: the server's :class:`~msgsock.serving.ServerProtocol`.

    Raises:
        ValueError: ``auth_key`` is shorter than 16 bytes, or ``port`` is not an int
            0..65535 (``port 70000: must be 0..65535``).
        TypeError: ``handler`` is not callable (``handler must be callable, got
            bytes``), ``auth_key`` is not bytes, or ``ssl`` is not an ``ssl.SSLContext``.
    """

    _default_events = FD_ACCEPT

    def __init__(
        self,
        reactor: Reactor,
        handler: Handler | None = None,
        host: str = "127.0.0.1",
        port: int = 9898,
        *,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        ssl: _ssl.SSLContext | None = None,
        auth_key: bytes | None = None,
        proxy_protocol: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        # Checked here, not by every connection failing (issue 11).
        if handler is not None:
            check_callable(handler, "handler")
        port = check_port(port)
        super().__init__(reactor, dispatcher=direct)
        self.handler = handler
        self.host = host
        self.frame = frame
        self.limits = limits
        self.logger = server_logger(logger)
        self.protocol = ServerProtocol(
            frame,
            limits,
            log=self.logger.log,
            proxy_protocol=proxy_protocol,
            ssl_context=ssl,
            auth_key=auth_key,
            close_on_eof=True,
        )
        self._sweeper: TimerHandle | None = None
        self._stopped = threading.Event()
        self._port = port

    @_on_reactor
    def start(self, backlog: int = 1024) -> None:
        """Bind ``host``:``port`` (the first address it resolves to; ``SO_REUSEADDR``) and start serving.

        Raises:
            InvalidState: already started, or the reactor is stopped.
            OSError: the address cannot be bound (e.g. in use; ``socket.gaierror``
                for a name that does not resolve).
        """
        if self._sock is not None:
            raise InvalidState(f"{self!r} is already started")
        family, _, _, _, address = socket.getaddrinfo(
            self.host or None, self._port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )[0]
        self.attach(socket.create_server(address, family=family, backlog=backlog))
        self._serving()

    @property
    def port(self) -> int:
        """The listening port (the real one once listening, when port 0 was asked for)."""
        return self._port

    def statistics(self) -> ServerStatistics:
        """Counters so far: connections, rejections, errors by kind, messages and bytes each way."""
        return self.reactor.run_sync(self.protocol.statistics)

    def summary(self) -> str:
        """The summary line every server prints when it stops (SPEC §6.1)."""
        return self.statistics().summary()

    @_on_reactor
    def listen(self, backlog: int = 1024) -> None:
        """Listen for connections and start serving them.

        Raises:
            InvalidState: not a created, unconnected stream socket.
            OSError: from the system.
        """
        AsyncSocket.listen(self, backlog)
        self._serving()

    def _serving(self) -> None:
        self._port = int(self.sock_name[1])
        self._sweep_later()

    def on_accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                self.accept(_ServerConnection(self))
            except WouldBlock:
                return
            except OSError as exc:  # e.g. out of file descriptors: the next notification retries
                self.logger.warning("accept failed: %s", exc)
                return

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Shut down gracefully: stop accepting, let every connection finish, then close it.

        Callable from any thread; returns at once (:meth:`wait_closed` waits).  Every
        connection answers what it already received, half-closes and waits for its
        peer to close; what is left after ``limits.shutdown_timeout`` is reset.
        """
        self._app_closed = True
        self._run_or_queue(self._begin_shutdown)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`close` has ended every connection; False if ``timeout`` ran out first.

        Raises:
            ValueError: ``timeout`` is negative or NaN.
            TypeError: ``timeout`` is not a number.
        """
        return self._stopped.wait(check_timeout(timeout))

    def _begin_shutdown(self) -> None:
        protocol = self.protocol
        if protocol.closing:
            return
        AsyncSocket._close_now(self)  # the listening socket: no new connection
        for proto in protocol.begin_shutdown(time.monotonic()):
            proto.pump.wake()
        self._connection_gone()
        if self._sweeper is None and not self._stopped.is_set():
            self._sweep_later()

    def _connection_gone(self) -> None:
        if self.protocol.all_closed:
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            self._stopped.set()

    # -- time -----------------------------------------------------------------------------

    def _sweep_later(self) -> None:
        self._sweeper = self.reactor.call_later(self.protocol.sweep_interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if self._stopped.is_set():
            return
        for proto in self.protocol.check_timeouts(time.monotonic()):
            proto.pump.wake()
        self._sweep_later()
