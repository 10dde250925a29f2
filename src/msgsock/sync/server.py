"""Thread-per-connection message server (SPEC §5.2, §7): the MFCAsync AsyncServer model.

Theory of operation.  The listening socket is bound in the constructor (so a bad
address fails there and the real port is known at once).  :meth:`ThreadedServer.start`
runs the accept loop on its own thread; it waits on the listening socket and on a
wake-up socket pair (closing a socket does not wake a thread blocked on it).  Each
accepted connection gets one thread, up to ``min(max_connections, max_threads)``;
one more is reset at once and logged.

A connection thread is a pump (STYLE §1): one read, every message it completed goes
through the handler, and all the replies of that read leave in **one** write (SPEC
§8).  The idle and message-completion timeouts (SPEC §7) are the receive timeout of
that same thread: no timer threads.

Graceful shutdown: stop accepting; ask every connection to stop.  A connection sends
its EOF as soon as it is not in the middle of handling a read (at once if it is
waiting for data), so the replies to everything it already received go out first;
then it reads until the peer closes, dropping what still arrives (no reply can follow
our EOF).  Whatever is still open at the deadline is reset.

Every connection's end is logged once: ``info`` for a clean close, ``warning`` with
the reason (and no traceback) for a peer's fault or a timeout, ``error`` with the
traceback when the handler raised.  One connection's failure never touches another.

Handshake stages (SPEC §4.2, §7; ``docs/handshake.md``).  With ``proxy_protocol``,
``ssl`` or ``auth_key``, the connection's own thread runs them before the framed
loop, in this order and within **one** ``limits.handshake_timeout`` deadline (the
socket's timeout is set to the time left before each call): the PROXY header
(:class:`~msgsock.proxy.ProxyHeaderParser`; when TLS follows, each ``recv`` asks for
``parser.max_read`` bytes so the ClientHello stays in the socket), TLS
(``context.wrap_socket(server_side=True)``), and the authentication handshake
(:class:`~msgsock.auth.ServerHandshake`).  Bytes that followed the last stage go to
the :class:`Connection` before its first read.  A failed stage is logged ``PEER
closed: REASON`` at warning (the socket's peer until a PROXY header named the
client) and counted as a connection and an error; ``connection from PEER`` is
logged only once every stage has passed, with the proxied client as ``PEER``.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import selectors
import socket
import ssl as _ssl
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from .._handshake import (
    check_server_key,
    run_blocking,
    ssl_error_text,
    stage_failed,
    timeout_reason,
    tls_failed,
)
from .._net import format_address, server_logger
from ..auth import ServerHandshake, new_nonce
from ..exceptions import ConnectionClosed, HandshakeError, InvalidState, ProtocolError, ProxyProtocolError
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, ServerStatistics
from ..proxy import ProxyHeaderParser, ProxyInfo
from .connection import _LINGER_ABORT, Connection, _describe_os_error, _time_left

__all__ = ["ThreadedServer"]

_T = TypeVar("_T")

Handler = Callable[[bytes], bytes | bytearray | memoryview | None]
ConnectionHandler = Callable[[Connection], None]

_ACCEPT_BURST = 64
"""Connections accepted per wake-up before waiting again."""

_ABORT_GRACE = 1.0
"""Seconds a reset connection's thread gets to finish after the shutdown deadline."""

_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_STAGE_READ = 64 * 1024
"""Bytes one read of a handshake stage may take when nothing has to stay in the socket."""


def _describe_tls_error(exc: OSError) -> str:
    """OpenSSL's words for a failed TLS handshake, without the ``(_ssl.c:NNN)`` source position."""
    if isinstance(exc, _ssl.SSLError):
        return ssl_error_text(exc)
    return _describe_os_error(exc)


class _StageFailed(Exception):
    """A handshake stage failed: ``peer`` and ``reason`` are for the log line."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(reason)
        self.peer = peer
        self.reason = reason


class _Pending:
    """A connection still in its handshake stages, as the shutdown sees it."""

    __slots__ = ("address", "lock", "sock", "woken")

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock  # the raw socket, then the TLS one
        self.address = address
        self.lock = threading.Lock()
        self.woken = False

    def wake(self) -> None:
        """Shutdown: end the stage's blocking call (a shutdown wakes it; a close would not)."""
        with self.lock:
            self.woken = True
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass


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


class ThreadedServer:
    """A message server with one thread per connection (SPEC §5.2; KB Q192570).

    Give exactly one of ``handler`` (called with each message; a non-None return value
    is sent back as one message, with its header fields when it is a
    :class:`~msgsock.framing.Message`, so ``lambda m: m`` echoes) and
    ``connection_handler`` (called once with the :class:`Connection`, on its thread,
    and owns it until it returns; the server then closes it gracefully).

    A body returned by ``handler`` is written without a copy after the other messages
    of the same read are handled: do not modify it afterwards.

    Args:
        handler: the per-message function.
        host: address to bind: a name, IPv4 or IPv6 literal; ``""`` for every interface.
        port: TCP port; 0 picks a free one (see :attr:`port`).
        connection_handler: the per-connection function.
        frame: the frame format of every connection.
        limits: limits in force (SPEC §7): ``max_connections``/``max_threads``,
            ``idle_timeout``, ``message_timeout``, ``close_timeout``, ``shutdown_timeout``.
        backlog: ``listen()`` backlog.
        reuse_port: set ``SO_REUSEPORT`` (several processes on one port).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.
        logger: where connection events go; default ``logging.getLogger("msgsock.server")``.
        ssl: a server TLS context, to serve TLS.  For mutual TLS give it the client
            CA (``load_verify_locations``) and ``verify_mode = ssl.CERT_REQUIRED``.
        auth_key: a shared key (at least 16 bytes; ``msgsock.auth.parse_key_file``
            reads a key file): every client must pass the authentication handshake
            (SPEC §4.2) before any frame.  A client that fails is sent the rejection
            byte, closed and logged ``PEER closed: authentication failed: ...``.
        proxy_protocol: every connection must begin with a PROXY protocol v1 or v2
            header; the peer logged and given to handlers is the client it names.  A
            connection without a valid header is closed and logged with the socket's
            peer and the reason.

    Per connection, the stages run on its thread in this order, all within one
    ``limits.handshake_timeout`` (SPEC §7): PROXY header, TLS, authentication, then
    frames.  A failed stage is logged at warning (no traceback) and counted in the
    statistics' ``errors``.

    Raises:
        ValueError: not exactly one of ``handler`` and ``connection_handler``,
            ``reuse_port`` where it is unavailable, or an ``auth_key`` shorter than
            16 bytes.
        TypeError: ``auth_key`` is not bytes.
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
        auth_key = check_server_key(auth_key)
        self._handler = handler
        self._connection_handler = connection_handler
        self.frame = frame
        self.limits = limits
        self._ssl = ssl
        self._auth_key = auth_key
        self._proxy_protocol = proxy_protocol
        self._staged = ssl is not None or auth_key is not None or proxy_protocol
        self._log = server_logger(logger)
        self._cap = min(limits.max_connections, limits.max_threads)
        self._listener = _bind(host, port, family, backlog, reuse_port)
        self._listener.setblocking(False)
        self._address: Any = self._listener.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()  # guards everything below
        self._stats = ServerStatistics()  # ended connections' counters + accept counters
        self._connections: dict[Connection, threading.Thread] = {}
        self._handshaking: dict[_Pending, threading.Thread] = {}
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
        """Return the counters so far: ended connections plus the live ones."""
        with self._lock:
            stats = dataclasses.replace(self._stats, error_kinds=dict(self._stats.error_kinds))
            for conn in self._connections:
                stats.add(conn._protocol.stats)
        return stats

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting on a background thread.  Does nothing if already started.

        Raises:
            InvalidState: the server was shut down.
        """
        with self._lock:
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
        (replies flushed), sends EOF and waits for the peer to close.  At the deadline
        the connections still open are reset.  Idempotent: a second call waits for
        the first to finish.  Callable from any thread; a signal handler or a message
        handler should hand it to a new thread (a handler calling it directly holds up
        its own connection until the deadline).

        Args:
            timeout: seconds for the whole drain; default ``limits.shutdown_timeout``.
        """
        with self._lock:
            first = not self._stop.is_set()
            self._stop.set()
            conns = list(self._connections.items())
            pending = list(self._handshaking.items())
        for slot, _ in pending:
            slot.wake()  # never served: nothing to drain
        if not first:
            self._done.wait()
            return
        try:
            if timeout is None:
                timeout = self.limits.shutdown_timeout
            deadline = time.monotonic() + timeout
            me = threading.current_thread()
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass
            if self._accept_thread is not None and self._accept_thread is not me:
                self._accept_thread.join(max(deadline - time.monotonic(), 0.0) + _ABORT_GRACE)
            self._listener.close()
            for conn, _ in conns:
                conn._request_stop()
            for _, thread in conns + pending:
                if thread is not me:
                    thread.join(max(deadline - time.monotonic(), 0.0))
            with self._lock:
                late = list(self._connections.items())
            for conn, _ in late:
                conn._abort(f"still open at the shutdown deadline ({timeout:g} s)")
            for _, thread in late:
                if thread is not me:
                    thread.join(_ABORT_GRACE)
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self._done.set()

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
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                selector.select()
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

    def _admit(self, sock: socket.socket, address: Any) -> None:
        peer = format_address(address)
        with self._lock:
            stopping = self._stop.is_set()
            active = self._stats.active
            rejected = not stopping and active >= self._cap
            if rejected:
                self._stats.rejected += 1
        if stopping or rejected:
            if rejected:
                self._log.warning("%s rejected: %d connections open (limit %d)", peer, active, self._cap)
            self._reset(sock)
            return
        if self._staged:
            self._admit_staged(sock, address, peer)
            return
        try:
            conn = Connection(sock, frame=self.frame, limits=self.limits)
        except OSError as exc:  # reset before we got to it
            self._log.warning("%s closed: %s", peer, exc)
            sock.close()
            return
        conn._peer_address = address
        conn._enforce_limits = True
        thread = threading.Thread(target=self._serve, args=(conn, peer), name=f"msgsock-{peer}", daemon=True)
        self._start_thread(self._connections, conn, thread, peer, conn.abort)

    def _admit_staged(self, sock: socket.socket, address: Any, peer: str) -> None:
        """Start the thread of a connection that has handshake stages to pass first."""
        slot = _Pending(sock, address)
        thread = threading.Thread(
            target=self._serve_staged, args=(slot,), name=f"msgsock-{peer}", daemon=True
        )
        self._start_thread(self._handshaking, slot, thread, peer, functools.partial(self._reset, sock))

    def _start_thread(
        self,
        table: dict[_T, threading.Thread],
        key: _T,
        thread: threading.Thread,
        peer: str,
        drop: Callable[[], None],
    ) -> None:
        """Count a new connection, list it in ``table`` under ``key`` and start its thread.

        ``drop`` closes the connection when it is not served: the server is stopping
        (shutdown() snapshotted the connections already), or the thread cannot start
        (then it counts as rejected).
        """
        with self._lock:
            if self._stop.is_set():
                drop()
                return
            self._stats.connections += 1
            self._stats.active += 1
            table[key] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread
            with self._lock:
                del table[key]
                self._stats.connections -= 1
                self._stats.active -= 1
                self._stats.rejected += 1
            self._log.warning("%s rejected: %s", peer, exc)
            drop()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        except OSError:
            pass
        sock.close()

    # -- one connection ---------------------------------------------------------------

    def _serve(self, conn: Connection, peer: str) -> None:
        log = self._log
        log.info("connection from %s", peer)
        failure: str | None = None
        logged = False
        try:
            try:
                if self._handler is not None:
                    self._pump(conn, self._handler)
                else:
                    assert self._connection_handler is not None
                    self._connection_handler(conn)
            except ConnectionClosed as exc:
                if not exc.clean:
                    failure = exc.reason or str(exc)
            except ProtocolError as exc:  # the peer's fault: its message says what and how much
                failure = str(exc)
            except Exception as exc:
                failure = f"handler raised {type(exc).__name__}: {exc}"
                log.error("%s closed: %s", peer, failure, exc_info=exc)
                logged = True
            if failure is None and conn._broken is not None:
                failure = conn._broken.reason  # a connection_handler swallowed the error
            if failure is None and conn._aborted and not conn._abort_by_user:
                failure = conn._abort_reason
            if failure is None:
                # A connection_handler may have closed or aborted it already: its call.
                if not conn._closing and not conn._close(None):
                    if conn._aborted:
                        failure = conn._abort_reason
                    elif conn._broken is not None:
                        failure = conn._broken.reason
                    else:
                        failure = "the peer did not close within close_timeout after our EOF"
            else:
                conn.abort()
        except BaseException as exc:  # never let a connection thread die silently
            failure = failure or f"internal error: {exc!r}"
            log.error("%s closed: %s", peer, failure, exc_info=exc)
            logged = True
            conn.abort()
        finally:
            stats = conn.statistics()
            with self._lock:
                self._connections.pop(conn, None)
                self._stats.add(stats)
                self._stats.active -= 1
                if failure is not None:
                    self._stats.count_error(failure)
            if failure is None:
                log.info(
                    "%s disconnected (%d messages in, %d out)",
                    peer,
                    stats.messages_received,
                    stats.messages_sent,
                )
            elif not logged:
                log.warning("%s closed: %s", peer, failure)

    def _serve_staged(self, slot: _Pending) -> None:
        """A connection's thread: the handshake stages, then :meth:`_serve`."""
        peer = format_address(slot.address)
        try:
            conn, peer = self._handshake(slot)
        except _StageFailed as exc:
            with self._lock:
                self._handshaking.pop(slot, None)
                self._stats.active -= 1
                if not slot.woken:
                    self._stats.count_error(exc.reason)
            if slot.woken:  # the server is stopping: not the peer's fault
                self._log.info("%s closed during the handshake: server shutting down", exc.peer)
            else:
                self._log.warning("%s closed: %s", exc.peer, exc.reason)
            return
        except BaseException as exc:  # never let a connection thread die silently
            with self._lock:
                self._handshaking.pop(slot, None)
                self._stats.active -= 1
                self._stats.count_error("internal error")
            self._log.error("%s closed: internal error: %r", peer, exc, exc_info=exc)
            self._reset(slot.sock)
            return
        with self._lock:
            self._handshaking.pop(slot, None)
            stopping = self._stop.is_set()
            if stopping:  # shutdown() took its snapshot during the handshake
                self._stats.active -= 1
            else:
                self._connections[conn] = threading.current_thread()
        if stopping:
            conn.abort()
            self._log.info("%s closed during the handshake: server shutting down", peer)
            return
        self._serve(conn, peer)

    def _handshake(self, slot: _Pending) -> tuple[Connection, str]:
        """Run the stages on ``slot.sock`` (SPEC §7 order); return the connection and its peer.

        Raises:
            _StageFailed: a stage failed (the socket is closed; the reason is for the log).
        """
        sock = slot.sock
        address: Any = slot.address
        peer = format_address(address)
        timeout = self.limits.handshake_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        stage = "proxy"
        info: ProxyInfo | None = None
        parser: ProxyHeaderParser | None = None
        rest = b""
        try:
            if self._proxy_protocol:
                parser = ProxyHeaderParser()
                while info is None:
                    # TLS starts right after the header: never read past it (docs/proxy.md).
                    size = parser.max_read if self._ssl is not None else _STAGE_READ
                    data = self._recv_stage(sock, size, deadline)
                    if not data:
                        parser.eof()
                    info = parser.feed(data)
                address = info.peer_address(address)  # LOCAL/UNKNOWN: the socket's peer
                peer = format_address(address)
                rest = parser.remaining
            if self._ssl is not None:
                stage = "tls"
                tls = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                with slot.lock:  # wrap_socket detached ``sock``: wake the new one
                    slot.sock = sock = tls
                    woken = slot.woken
                if woken:
                    raise OSError(errno.ESHUTDOWN, "server shutting down")
                sock.settimeout(_time_left(deadline))
                tls.do_handshake()
            if self._auth_key is not None:
                stage = "auth"
                handshake = ServerHandshake(self._auth_key, new_nonce())
                try:
                    rest = run_blocking(
                        handshake,
                        lambda out: self._send_stage(sock, out, deadline),
                        lambda: self._recv_stage(sock, _STAGE_READ, deadline),
                        rest,
                    )
                except HandshakeError:
                    out = handshake.data_to_send()  # the rejection byte: the client can say why
                    if out:
                        try:
                            self._send_stage(sock, out, deadline)
                        except OSError:
                            pass
                    raise
        except (ProxyProtocolError, HandshakeError) as exc:
            sock.close()
            raise _StageFailed(peer, str(exc)) from None
        except TimeoutError:
            self._reset(sock)
            raise _StageFailed(peer, timeout_reason(stage, parser, timeout or 0.0)) from None
        except OSError as exc:
            if stage == "tls":
                sock.close()  # not a reset: the TLS alert that says why must reach the client
                raise _StageFailed(peer, tls_failed(_describe_tls_error(exc))) from None
            self._reset(sock)
            raise _StageFailed(peer, stage_failed(_describe_os_error(exc), stage)) from None
        except BaseException:
            self._reset(sock)
            raise
        try:
            conn = Connection(sock, frame=self.frame, limits=self.limits)
        except OSError as exc:  # reset just now
            sock.close()
            raise _StageFailed(peer, _describe_os_error(exc)) from None
        conn._peer_address = address
        conn._proxy_info = info
        conn._enforce_limits = True
        try:
            conn._receive_initial(rest)
        except ProtocolError as exc:  # the socket is closed already
            raise _StageFailed(peer, str(exc)) from None
        return conn, peer

    def _recv_stage(self, sock: socket.socket, size: int, deadline: float | None) -> bytes:
        sock.settimeout(_time_left(deadline))
        return sock.recv(size)

    def _send_stage(self, sock: socket.socket, data: bytes, deadline: float | None) -> None:
        sock.settimeout(_time_left(deadline))
        sock.sendall(data)

    @staticmethod
    def _pump(conn: Connection, handler: Handler) -> None:
        """Handle messages until the peer closes: one read, its replies in one write."""
        if conn._messages:  # frames that arrived with the handshake's last read
            for message in conn._receive_batch():
                reply = handler(message)
                if reply is not None:
                    conn._protocol.send_message(reply)
            conn._flush()
        read_and_reply = conn._read_and_reply
        write = conn._write_reply
        while True:
            out = read_and_reply(handler)
            if out:
                write(out)
