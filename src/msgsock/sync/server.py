"""Thread-per-connection message server (SPEC §5.2, §7): the MFCAsync AsyncServer model.

Theory of operation.  The server is a pump around one
:class:`~msgsock.serving.ServerProtocol` (SPEC §5.0): it decides admission, the stages
of every connection, how each end is counted and worded in the log, and the
shutdown; this module only runs threads and sockets.

- The listening socket is bound in the constructor (so a bad address fails there
  and the real port is known at once).  :meth:`ThreadedServer.start` runs the accept
  loop on its own thread; it waits on the listening socket and on a wake-up socket
  pair (closing a socket does not wake a thread blocked on it).
- Each accepted socket gets ``server_protocol.accept(address, now)``'s protocol
  (already ended when ``max_connections`` are open: the socket is reset) and one
  thread, up to ``limits.max_threads`` (beyond it the connection is refused through
  ``server_protocol.reject``).
- A connection's thread is a pump (STYLE §1), :class:`ServerConnection`: one read,
  ``receive_and_reply`` runs the handler on every message it completed, and all
  the replies of that read leave in **one** write (SPEC §8).  A handler that raises
  or returns a wrong type ends its connection with a reset, by the protocol.  The
  blocking write is the flow control: while a peer leaves its replies unread the
  thread waits in it and reads nothing more.  The stages (PROXY header, TLS,
  authentication) run inside the protocol on the connection's own thread.  A
  ``connection_handler`` is given the :class:`ServerConnection` once its stages
  have passed.
- The timeouts (idle, message, handshake, close, the shutdown deadline) are one
  sweep, ``server_protocol.check_timeouts(now)``, that the accept thread runs every
  ``sweep_interval`` -- no timer threads, no clock on the per-read path.  A
  connection the sweep ends is reset from the sweeping thread: its socket is shut
  down (``SO_LINGER`` 0) so that its own thread wakes and closes it.
- Graceful shutdown: stop accepting; ``server_protocol.begin_shutdown(now)``: every
  connection finishes what it has received (the replies go out first), then sends
  its EOF (done at once for a thread waiting for data, else by the thread itself
  once it has written), and reads to the peer's EOF: what still arrives is counted
  as *discarded*, never as received.  Whatever is still open at the deadline is
  reset by the sweep.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import selectors
import socket
import ssl as _ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .._net import check_callable, check_port, check_timeout, is_async_function, server_logger
from ..exceptions import ConnectionClosed, InvalidState
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, State, format_address
from ..serving import ServerProtocol, ServerStatistics
from .connection import Handler, ServerConnection

__all__ = ["ServerConnection", "ThreadedServer"]

ConnectionHandler = Callable[[ServerConnection], None]

_ACCEPT_BURST = 64
"""Connections accepted per wake-up before waiting again."""

_ABORT_GRACE = 1.0
"""Seconds the threads of reset connections get to finish after the shutdown deadline."""

_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_LINGER_RESET = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
"""``SO_LINGER`` on, 0 s: ``close()`` resets (RST) a socket refused at accept."""


def _bind(host: str, port: int, family: int, backlog: int, reuse_port: bool) -> socket.socket:
    """Bind and listen on the first address of ``host`` that works.

    Raises:
        ValueError: ``reuse_port`` on a platform without ``SO_REUSEPORT``.
        OSError: no address could be bound (the last error).
    """
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port: SO_REUSEPORT is not available on this platform")
    infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    error: OSError | None = None
    for af, type_, proto, _canonname, address in infos:
        sock = socket.socket(af, type_, proto)
        try:
            if os.name != "nt":  # on Windows SO_REUSEADDR lets another process steal the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    assert error is not None
    raise error


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def _wake(proto: MessageProtocol) -> None:
    """Act on the end the server protocol just decided for ``proto`` (pump rule 3)."""
    conn = proto.pump
    if isinstance(conn, ServerConnection):
        conn.wake()


class ThreadedServer:
    """A message server with one thread per connection (SPEC §5.2; KB Q192570).

    Give exactly one of ``handler`` (called with each message; a non-None return value
    is sent back as one message, with its header fields when it is a
    :class:`~msgsock.framing.Message`, so ``lambda m: m`` echoes) and
    ``connection_handler`` (called once with the :class:`ServerConnection`, on its
    thread, and owns it until it returns; the server then closes it gracefully).

    A body returned by ``handler`` is written without a copy after the other messages
    of the same read are handled: do not modify it afterwards.  A ``handler`` that
    raises, or returns something else than bytes-like or None, ends its connection
    with a reset, logged at error with the traceback (SPEC §5.0); so does a
    ``connection_handler`` that raises anything but ``ConnectionClosed``.

    Args:
        handler: the per-message function.
        host: address to bind: a name, IPv4 or IPv6 literal; ``""`` for every interface.
        port: TCP port; 0 picks a free one (see :attr:`port`).
        connection_handler: the per-connection function.
        frame: the frame format of every connection.
        limits: limits in force (SPEC §7): ``max_connections``, ``max_threads``,
            ``idle_timeout``, ``message_timeout``, ``handshake_timeout``,
            ``close_timeout``, ``shutdown_timeout``.
        backlog: ``listen()`` backlog.
        reuse_port: set ``SO_REUSEPORT`` (several processes on one port).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.
        logger: where connection events go; default ``logging.getLogger("msgsock.server")``.
        ssl: a server TLS context, to serve TLS.  For mutual TLS give it the client
            CA (``load_verify_locations``) and ``verify_mode = ssl.CERT_REQUIRED``.
        auth_key: a shared key (at least 16 bytes; ``msgsock.auth.parse_key_file``
            reads a key file): every client must pass the authentication handshake
            (SPEC §4.2) before any frame.
        proxy_protocol: every connection must begin with a PROXY protocol v1 or v2
            header; the peer logged and given to handlers is the client it names.

    Per connection, the stages run on its thread in this order, all within one
    ``limits.handshake_timeout`` (SPEC §7): PROXY header, TLS, authentication, then
    frames.  A failed stage is logged at warning (no traceback) and counted in the
    statistics' ``errors``; a load balancer's health check (PROXY ``LOCAL``) is not.

    Raises:
        ValueError: not exactly one of ``handler`` and ``connection_handler``,
            ``reuse_port`` where it is unavailable, an ``auth_key`` shorter than
            16 bytes, or ``port`` not an int 0..65535 (``port 70000: must be 0..65535``).
        TypeError: ``handler`` or ``connection_handler`` is not callable
            (``handler must be callable, got bytes``), ``connection_handler`` is an
            async function (use :func:`msgsock.aio.serve`), ``auth_key`` is not
            bytes, ``ssl`` not an ``SSLContext``.
        OSError: the address cannot be resolved or bound.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        host: str = "127.0.0.1",
        port: int = 9898,
        *,
        connection_handler: ConnectionHandler | None = None,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        backlog: int = 1024,
        reuse_port: bool = False,
        family: int = socket.AF_UNSPEC,
        logger: logging.Logger | None = None,
        ssl: _ssl.SSLContext | None = None,
        auth_key: bytes | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        if (handler is None) == (connection_handler is None):
            raise ValueError("give exactly one of handler and connection_handler")
        # Checked here, not by every connection failing (issue 11).
        if handler is not None:
            check_callable(handler, "handler")
        if connection_handler is not None:
            check_callable(connection_handler, "connection_handler")
            if is_async_function(connection_handler):  # its coroutine would never be awaited
                raise TypeError(
                    "connection_handler of a ThreadedServer must be a plain function, not async def"
                )
        port = check_port(port)
        self._handler = handler
        self._connection_handler = connection_handler
        self.frame = frame
        self.limits = limits
        self._log = server_logger(logger)
        self._sp = ServerProtocol(
            frame,
            limits,
            log=self._log.log,
            proxy_protocol=proxy_protocol,
            ssl_context=ssl,
            auth_key=auth_key,
            close_on_eof=handler is not None,
            lock=threading.Lock(),
        )
        self._listener = _bind(host, port, family, backlog, reuse_port)
        self._listener.setblocking(False)
        self._address: Any = self._listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads = threading.Condition()  # guards _live, _started; notified when a thread ends
        self._live: set[threading.Thread] = set()  # the connections' threads
        self._accept_thread: threading.Thread | None = None
        self._started = False
        self._stop = threading.Event()
        self._done = threading.Event()

    def __repr__(self) -> str:
        return f"<ThreadedServer {format_address(self._address)}>"

    @property
    def address(self) -> Any:
        """The bound address (the real port when 0 was asked)."""
        return self._address

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._address[1])

    def statistics(self) -> ServerStatistics:
        """Return the counters so far: ended connections plus the live ones (SPEC §6.1)."""
        return self._sp.statistics()

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting on a background thread.  Does nothing if already started.

        Raises:
            InvalidState: the server was shut down.
        """
        with self._threads:
            if self._stop.is_set():
                raise InvalidState("the server was shut down")
            if self._started:
                return
            self._started = True
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f"msgsock-accept-{self.port}", daemon=True
            )
            self._accept_thread.start()

    def serve_forever(self) -> None:
        """Start if needed, then block until :meth:`shutdown` has completed."""
        if not self._stop.is_set():
            self.start()
        # A timed wait keeps the main thread responsive to Ctrl-C on every platform.
        while not self._done.wait(0.5):
            pass

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop gracefully; return when every connection has ended.

        Stop accepting; each connection finishes the messages it has already received
        (replies flushed), sends EOF and reads until the peer closes; what arrives
        meanwhile is counted as discarded.  At the deadline the connections still
        open are reset.  Idempotent: a second call waits for the first to finish.
        Callable from any thread; a signal handler or a message handler should hand
        it to a new thread (a handler calling it directly holds up its own
        connection until the deadline).

        Args:
            timeout: seconds for the whole drain; default ``limits.shutdown_timeout``.

        Raises:
            ValueError: ``timeout`` is negative or NaN (the server goes on).
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        with self._threads:
            first = not self._stop.is_set()
            self._stop.set()
        if not first:
            self._done.wait()
            return
        sp = self._sp
        try:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass
            accept = self._accept_thread
            if accept is not None and accept is not threading.current_thread():
                accept.join()
            self._listener.close()
            if timeout is not None:
                sp.limits = dataclasses.replace(sp.limits, shutdown_timeout=timeout)
            for proto in sp.begin_shutdown(time.monotonic()):
                _wake(proto)
            self._drain()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self._done.set()

    def _drain(self) -> None:
        """Sweep until every connection's thread has ended (the deadline's resets included)."""
        sp = self._sp
        deadline = sp.deadline
        assert deadline is not None
        me = threading.current_thread()
        while True:
            now = time.monotonic()
            for proto in sp.check_timeouts(now):
                _wake(proto)
            with self._threads:
                if self._threads.wait_for(lambda: not self._live - {me}, sp.sweep_interval):
                    return
            if now > deadline + _ABORT_GRACE:
                return  # a handler that never returns: its thread is a daemon

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- accepting --------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        sp = self._sp
        interval = sp.sweep_interval
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            next_sweep = time.monotonic() + interval
            while not self._stop.is_set():
                selector.select(max(next_sweep - time.monotonic(), 0.0))
                for _ in range(_ACCEPT_BURST):
                    if self._stop.is_set():
                        return
                    try:
                        sock, address = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if self._stop.is_set():
                            return
                        self._log.warning("accept failed: %s", exc)
                        if exc.errno in _RESOURCE_ERRORS:
                            # The listener stays readable: back off instead of spinning.
                            self._stop.wait(0.1)
                        break
                    try:
                        self._admit(sock, address)
                    except Exception:  # keep accepting whatever one connection did
                        self._log.exception("%s: could not start the connection", format_address(address))
                        sock.close()
                now = time.monotonic()
                if now >= next_sweep:  # the one timeout sweep (SPEC §7)
                    for proto in sp.check_timeouts(now):
                        _wake(proto)
                    next_sweep = now + interval

    def _admit(self, sock: socket.socket, address: Any) -> None:
        sp = self._sp
        cap = self.limits.max_threads
        with self._threads:
            running = len(self._live)
        if running >= cap:
            sp.reject(address, f"{running} connection threads running (limit {cap})")
            _reset(sock)
            return
        proto = sp.accept(address, time.monotonic())
        if proto.state is State.CLOSED:  # max_connections, or the server is stopping
            _reset(sock)
            proto.connection_lost(None)
            return
        conn = ServerConnection(sock, protocol=proto)
        thread = threading.Thread(target=self._serve, args=(conn,), name=f"msgsock-{proto.peer}", daemon=True)
        with self._threads:
            self._live.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread
            with self._threads:
                self._live.discard(thread)
            proto.reject(f"cannot start a thread: {exc}")
            conn.abort()

    # -- one connection ---------------------------------------------------------------

    def _serve(self, conn: ServerConnection) -> None:
        """A connection's thread: the pump, or the stages and then the connection handler."""
        try:
            if self._handler is not None:
                conn.serve(self._handler)
            elif conn.handshake():
                assert self._connection_handler is not None
                try:
                    self._connection_handler(conn)
                except ConnectionClosed:
                    pass  # the protocol ended the connection and knows how
                except Exception as exc:
                    conn.fail_handler(exc)
                conn.close()
        except BaseException as exc:  # never let a connection thread die silently
            conn.fail_handler(exc)
        finally:
            conn.abort()  # nothing left to do once closed; else a reset
            with self._threads:
                self._live.discard(threading.current_thread())
                self._threads.notify_all()
