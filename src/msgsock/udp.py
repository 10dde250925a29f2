"""Datagram endpoints: one UDP datagram is one message (SPEC §5.4; the simples/simplec samples).

Theory of operation.  UDP keeps message boundaries itself, so there is no frame
header here: every datagram is one message, delivered whole or not at all.  What
this module adds is what datagram programs tend to get wrong:

- **Sizes.**  ``max_size`` (default 65507, the largest UDP payload over IPv4) is
  checked *before* anything is sent: a datagram of ours above it is API misuse
  (:class:`~msgsock.exceptions.OversizeMessage`, nothing leaves).  On receipt the
  buffer is one byte larger than ``max_size``, so a datagram that fills it was too
  large -- the system would otherwise truncate it silently.  On Linux ``MSG_TRUNC``
  also gives its real size, which is logged.  A server drops such a datagram,
  counts it in ``errors`` (``message too large``) and logs a warning with the peer
  and both sizes (rate-limited: the first few in full, then at most one summary
  line per 10 s, so a flood cannot fill the disk); a client's receive raises
  :class:`~msgsock.exceptions.MessageTooLarge` (the peer's fault).
- **Loss.**  :meth:`UdpClient.request` sends, waits ``timeout`` seconds for the
  reply, resends up to ``retries`` times (so ``retries + 1`` tries in all), then
  raises :class:`~msgsock.exceptions.Timeout` saying ``no reply from HOST:PORT after
  N tries of T s``.  Before each request the datagrams still queued (late replies
  to an earlier try) are discarded, so a late echo is not taken for the new reply.
- **ICMP.**  A client's socket is *connected* to the server address: the kernel
  then delivers only that server's datagrams, and reports an ICMP "port
  unreachable" as ``ConnectionRefusedError`` on the next send or receive.
  ``request`` counts it as no reply (its Timeout message then says "port
  unreachable"); when the host name has further addresses, the next one is tried,
  so ``localhost`` reaches a server bound to either ``::1`` or ``127.0.0.1``.
- **Servers never die on a datagram.**  Oversize datagrams, handler exceptions,
  replies that cannot be sent and ICMP errors are logged (logger
  ``msgsock.server``, like the TCP servers) and counted by
  :class:`~msgsock.exceptions.EndKind` in :class:`~msgsock.serving.ServerStatistics`;
  the next datagram is served.  A handler's reply gets the TCP servers' check
  (:func:`msgsock.protocol.check_reply`): a handler that raises, or returns
  anything but bytes-like or None (a ``str``, a coroutine on the blocking server),
  is logged once at error level -- ``PEER: handler raised ValueError: boom; no
  reply``, with the traceback of a raise -- and counted as a ``handler error``.

The two servers -- :class:`UdpServer` (a thread, for blocking code) and
:func:`serve_udp` (asyncio, stock loop or uvloop) -- are thin drivers of one pump,
``_DatagramPump`` (receive a burst of datagrams into one reusable buffer, call the
handler, send each reply back to its sender), as every I/O layer of msgsock is a
pump (STYLE §1).  :func:`run_udp_server` and :func:`run_udp_client` are what
``msgsock serve --udp`` and ``msgsock client --udp`` run (SPEC §6.1, §6.2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeAlias, cast

from ._net import DEFAULT_LOGGER as DEFAULT_LOGGER
from ._net import check_callable, check_port, server_logger
from ._ratelimit import LogRateLimiter, Suppressed
from .exceptions import ConcurrencyError, EndKind, InvalidState, MessageTooLarge, OversizeMessage, Timeout
from .protocol import check_reply, describe_os_error, format_address, handler_end
from .serving import ServerStatistics

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_DATAGRAM",
    "AsyncHandler",
    "AsyncUdpClient",
    "AsyncUdpServer",
    "Handler",
    "UdpClient",
    "UdpServer",
    "open_udp_client",
    "serve_udp",
]

DEFAULT_MAX_SIZE = 65507
"""Largest UDP payload over IPv4 (65535 - 20 bytes of IP header - 8 of UDP header)."""

MAX_DATAGRAM = 65535
"""Upper bound of ``max_size``: no UDP payload can be larger."""

DEFAULT_TIMEOUT = 1.0
DEFAULT_RETRIES = 3

_BURST = 64
"""Datagrams a server handles per wake-up before it looks at its other work."""

_DRAIN_LIMIT = 1024
"""Stale datagrams a client discards at most before a request (bounded loop)."""

_MAX_PENDING = 1024
"""Async handler calls in progress above which the asyncio server stops reading."""

_TRUNC = socket.MSG_TRUNC if sys.platform.startswith("linux") else 0
"""recvfrom flag: on Linux, return a datagram's real size even when it was truncated."""

_WARNING_INTERVAL = 10.0
_WARNING_BURST = 5
"""Dropped datagrams are logged rate-limited: the first 5 of a quiet spell in full, then at
most one summary line per 10 s (any sender can send a flood, and must not fill the disk)."""

Reply: TypeAlias = bytes | bytearray | memoryview | None
Handler: TypeAlias = Callable[[bytes], Reply]
"""A per-datagram function: the message in, the reply out (None: no reply)."""
AsyncHandler: TypeAlias = Callable[[bytes], Reply | Awaitable[Reply]]
"""Like :data:`Handler`, or a coroutine function (asyncio server only)."""


# -- helpers ---------------------------------------------------------------------------------


def _check_max_size(max_size: int) -> int:
    if not 0 <= max_size <= MAX_DATAGRAM:
        raise ValueError(f"max_size {max_size} is outside 0-{MAX_DATAGRAM} (the largest UDP payload)")
    return max_size


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _check_send_size(data: bytes | bytearray | memoryview, max_size: int) -> None:
    size = _nbytes(data)
    if size > max_size:
        raise OversizeMessage(size, max_size)


def _size_text(received: int, max_size: int) -> str:
    # Without MSG_TRUNC the buffer (max_size + 1 bytes) caps what we learn of the size.
    return f"{received} bytes" if _TRUNC else f"more than {max_size} bytes"


def _bind(host: str | None, port: int, family: int) -> socket.socket:
    """Bind a non-blocking datagram socket to the first address of ``host`` that works.

    Raises:
        ValueError: ``port`` is not an int 0..65535 (``port 70000: must be 0..65535``).
        OSError: no address could be bound (the last error), or ``socket.gaierror``.
    """
    port = check_port(port)  # getaddrinfo would take it modulo 65536
    infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE)
    error: OSError | None = None
    for af, type_, proto, _canonname, address in infos:
        if af not in (socket.AF_INET, socket.AF_INET6):
            continue
        sock = socket.socket(af, type_, proto)
        try:
            # No SO_REUSEADDR: for UDP it would let two servers share (and split) a port.
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setblocking(False)
        return sock
    raise error or OSError(errno.EADDRNOTAVAIL, f"no IPv4 or IPv6 address for {host!r}")


def _resolve(host: str, port: int, family: int) -> list[tuple[int, Any]]:
    """The addresses of ``host``, in getaddrinfo's order (SPEC §5.2: all are tried in order).

    Raises:
        ValueError: ``port`` is not an int 0..65535 (``port 70000: must be 0..65535``).
        socket.gaierror: the name does not resolve.
        OSError: it resolves to no IPv4 or IPv6 address.
    """
    port = check_port(port)  # getaddrinfo would take it modulo 65536
    return _inet_addresses(socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM), host)


def _inet_addresses(infos: Iterable[tuple[Any, ...]], host: str) -> list[tuple[int, Any]]:
    """The (family, address) pairs of getaddrinfo's answer for ``host`` that are IPv4 or IPv6, in order.

    Raises:
        OSError: there is none.
    """
    addrs: list[tuple[int, Any]] = [
        (af, sa) for af, _, _, _, sa in infos if af in (socket.AF_INET, socket.AF_INET6)
    ]
    if not addrs:
        raise OSError(errno.EADDRNOTAVAIL, f"no IPv4 or IPv6 address for {host!r}")
    return addrs


# -- the server pump -------------------------------------------------------------------------


class _DatagramPump:
    """Receive → handler → reply, shared by both servers (STYLE §1: every layer is a pump)."""

    def __init__(
        self, sock: socket.socket, handler: Callable[[bytes], Any], max_size: int, log: logging.Logger
    ):
        self.sock = sock
        self.handler = handler
        self.max_size = max_size
        self.log = log
        # One reusable buffer, one byte larger than allowed: a datagram that fills it was too large.
        self.buffer = bytearray(max_size + 1)
        self.view = memoryview(self.buffer)
        self.stats = ServerStatistics()
        self.lock = threading.Lock()  # statistics() may be read from any thread
        self.paused = False
        self.oversize_log = LogRateLimiter(_WARNING_INTERVAL, burst=_WARNING_BURST)
        self.reply_log = LogRateLimiter(_WARNING_INTERVAL, burst=_WARNING_BURST)

    def statistics(self) -> ServerStatistics:
        with self.lock:
            return dataclasses.replace(self.stats, error_kinds=dict(self.stats.error_kinds))

    def pump(self, limit: int = _BURST) -> None:
        """Handle up to ``limit`` waiting datagrams; return early when none is left.

        Never raises for a datagram or a handler: each failure is logged and counted.
        """
        sock = self.sock
        buffer = self.buffer
        max_size = self.max_size
        for _ in range(limit):
            if self.paused:
                return
            try:
                n, peer = sock.recvfrom_into(buffer, 0, _TRUNC)
            except BlockingIOError:
                return
            except (ConnectionRefusedError, ConnectionResetError):
                # ICMP about an earlier reply of ours (Windows reports it on unconnected
                # sockets): the datagram it concerns is gone, there is nothing to answer.
                continue
            except OSError as exc:
                end = describe_os_error(exc)
                self.count(end.kind)
                self.log.warning("udp receive failed: %s", end.reason)
                return
            if n > max_size:
                self.count(EndKind.MESSAGE_TOO_LARGE)
                log, summary = self.oversize_log.hit(time.monotonic(), peer)
                if summary is not None:
                    self._log_oversize(summary)
                if log:
                    self.log.warning(
                        "%s: dropped a datagram of %s: above max_size %d",
                        format_address(peer),
                        _size_text(n, max_size),
                        max_size,
                    )
                continue
            message = bytes(self.view[:n])
            with self.lock:
                self.stats.messages_received += 1
                self.stats.bytes_received += n
            self.handle(message, peer)

    def handle(self, message: bytes, peer: Any) -> None:
        try:
            reply = self.handler(message)
        except Exception as exc:
            self.handler_failed(peer, exc)
            return
        self.reply(reply, peer)

    def reply(self, reply: object, peer: Any) -> None:
        """Check a handler's reply as every server does (SPEC §5.0), and send it."""
        try:
            checked = check_reply(reply)
        except TypeError as exc:  # a str, an int, a coroutine on the blocking server...
            self.handler_failed(peer, exc, returned=True)
            return
        if checked is not None:
            self.send_reply(checked, peer)

    def handler_failed(self, peer: Any, exc: BaseException, *, returned: bool = False) -> None:
        """Log (once, at error level; the traceback of a raise) and count a failed handler call."""
        end = handler_end(exc)
        self.count(end.kind)
        self.log.error(
            "%s: %s; no reply", format_address(peer), end.reason, exc_info=None if returned else exc
        )

    def send_reply(self, reply: bytes | bytearray | memoryview, peer: Any) -> None:
        size = _nbytes(reply)
        if size > self.max_size:
            # The handler's reply cannot be one datagram: its error, as an oversize reply is
            # on the TCP servers (never the peer's MESSAGE_TOO_LARGE).
            self.count(EndKind.HANDLER_ERROR)
            self.log.error(
                "%s: reply dropped: %s", format_address(peer), OversizeMessage(size, self.max_size)
            )
            return
        try:
            self.sock.sendto(reply, peer)
        except OSError as exc:
            # A full send buffer (BlockingIOError) included: UDP may drop, and the
            # client's retry covers it.
            end = describe_os_error(exc)
            self.count(end.kind)
            log, summary = self.reply_log.hit(time.monotonic(), peer)
            if summary is not None:
                self._log_replies(summary)
            if log:
                self.log.warning("%s: reply dropped: %s", format_address(peer), end.reason)
            return
        with self.lock:
            self.stats.messages_sent += 1
            self.stats.bytes_sent += size

    def count(self, kind: EndKind) -> None:
        """Count one failure of ``kind`` (a dropped datagram, a failed handler or reply)."""
        with self.lock:
            self.stats.count_end(kind)

    def flush_warnings(self) -> None:
        """Log the summaries of dropped datagrams not yet logged (at shutdown)."""
        now = time.monotonic()
        if (summary := self.oversize_log.flush(now)) is not None:
            self._log_oversize(summary)
        if (summary := self.reply_log.flush(now)) is not None:
            self._log_replies(summary)

    def _log_oversize(self, summary: Suppressed) -> None:
        name = None if summary.source is None else format_address(summary.source)
        what = f"datagrams above max_size {self.max_size} dropped"
        self.log.warning("%s", summary.text(what, name=name))

    def _log_replies(self, summary: Suppressed) -> None:
        name = None if summary.source is None else format_address(summary.source)
        self.log.warning("%s", summary.text("replies dropped", source="peer", via="to", name=name))


# -- the blocking server ---------------------------------------------------------------------


class _BoundServer:
    """What the blocking and the asyncio datagram servers share: a bound address and a pump."""

    _address: Any
    _pump: _DatagramPump

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {format_address(self._address)}>"

    @property
    def address(self) -> Any:
        """The bound address (the real port when 0 was asked)."""
        return self._address

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._address[1])

    @property
    def max_size(self) -> int:
        """The largest datagram accepted or sent."""
        return self._pump.max_size

    def statistics(self) -> ServerStatistics:
        """Datagrams and bytes in and out, and ``errors`` by kind (dropped datagrams, failed handlers or replies)."""
        return self._pump.statistics()


class UdpServer(_BoundServer):
    """A datagram server on its own thread: each datagram in, the handler's reply back (SPEC §5.4).

    The socket is bound in the constructor, so a bad address fails there and the
    real port is known at once.  Use it as a context manager, or call :meth:`start`
    (or :meth:`serve_forever`) and :meth:`shutdown`.

    Args:
        handler: called with each datagram's bytes on the server thread; a non-None
            return value is sent back to the sender as one datagram.
        host: address to bind: a name, IPv4 or IPv6 literal; ``""`` for every interface.
        port: UDP port; 0 picks a free one (see :attr:`port`).
        max_size: the largest datagram accepted or sent (default 65507).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.
        logger: where dropped datagrams and handler errors go; default
            ``logging.getLogger("msgsock.server")``.

    Raises:
        ValueError: ``max_size`` outside 0-65535, or ``port`` not an int 0..65535.
        TypeError: ``handler`` is not callable (``handler must be callable, got bytes``).
        OSError: the address cannot be resolved or bound.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 9898,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        family: int = socket.AF_UNSPEC,
        logger: logging.Logger | None = None,
    ) -> None:
        check_callable(handler, "handler")
        _check_max_size(max_size)
        self._log = server_logger(logger)
        self._sock = _bind(host, port, family)
        self._address: Any = self._sock.getsockname()
        self._pump = _DatagramPump(self._sock, handler, max_size, self._log)
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = threading.Event()

    def start(self) -> None:
        """Start serving on a background thread.  Does nothing if already started.

        Raises:
            InvalidState: the server was shut down.
        """
        with self._lock:
            if self._stop.is_set():
                raise InvalidState(f"{self!r} was shut down")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._serve, name=f"msgsock-udp-{self.port}", daemon=True)
            self._thread.start()

    def serve_forever(self) -> None:
        """Start if needed, then block until :meth:`shutdown` has completed."""
        if not self._stop.is_set():
            self.start()
        # A timed wait keeps the calling thread responsive to Ctrl-C on every platform.
        while not self._done.wait(0.5):
            pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; idempotent, callable from any thread.

        The datagrams already queued when the stop is seen are still answered (at
        most one burst); then the thread ends and the socket is closed.

        Args:
            timeout: seconds to wait for the server thread (a handler may be running).
        """
        with self._lock:
            first = not self._stop.is_set()
            self._stop.set()
            thread = self._thread
        if not first:
            self._done.wait(timeout)
            return
        try:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        finally:
            self._sock.close()
            self._wake_r.close()
            self._wake_w.close()
            self._done.set()

    def __enter__(self) -> UdpServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _serve(self) -> None:
        pump = self._pump
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._sock, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop.is_set():
                    selector.select()
                    pump.pump()
            pump.pump()  # answer what was queued when the stop came
            pump.flush_warnings()
        except BaseException:  # never let the server thread die silently
            self._log.critical("%r: the server thread failed", self, exc_info=True)
            raise


# -- the asyncio server ----------------------------------------------------------------------


class _AsyncPump(_DatagramPump):
    """The pump, plus coroutine handlers: each awaited in a task, its reply sent when ready."""

    def __init__(
        self,
        sock: socket.socket,
        handler: AsyncHandler,
        max_size: int,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(sock, handler, max_size, log)
        self.loop = loop
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading = False
        self.closing = False

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self.pump)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def handle(self, message: bytes, peer: Any) -> None:
        try:
            reply = self.handler(message)
        except Exception as exc:
            self.handler_failed(peer, exc)
            return
        if inspect.isawaitable(reply):
            task = self.loop.create_task(self._finish(cast(Awaitable[object], reply), peer))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
            if len(self.tasks) >= _MAX_PENDING and not self.paused:
                # Bounded work in progress (SPEC §7): stop reading, let the kernel queue (and drop).
                self.paused = True
                self.stop_reading()
        else:
            self.reply(reply, peer)

    async def _finish(self, awaitable: Awaitable[object], peer: Any) -> None:
        try:
            reply = await awaitable
        except Exception as exc:
            self.handler_failed(peer, exc)
            return
        if self.sock.fileno() >= 0:
            self.reply(reply, peer)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.paused and len(self.tasks) <= _MAX_PENDING // 2:
            self.paused = False
            if not self.closing:
                self.start_reading()


class AsyncUdpServer(_BoundServer):
    """A datagram server on an asyncio loop (SPEC §5.4); made by :func:`serve_udp`.

    Use ``async with`` or call :meth:`close` then ``await`` :meth:`wait_closed`.
    """

    _pump: _AsyncPump

    def __init__(self, pump: _AsyncPump, shutdown_timeout: float) -> None:
        self._pump = pump
        self._address: Any = pump.sock.getsockname()
        self._shutdown_timeout = shutdown_timeout
        self._closed = pump.loop.create_future()
        self._closer: asyncio.Task[None] | None = None

    def is_serving(self) -> bool:
        """True until :meth:`close` is called."""
        return self._closer is None

    def close(self) -> None:
        """Stop receiving; idempotent.  Call it on the server's loop.

        The datagrams already queued are still answered (at most one burst), and
        coroutine handlers in progress get ``shutdown_timeout`` seconds to finish;
        :meth:`wait_closed` waits for all of that and for the socket to close.
        """
        if self._closer is not None:
            return
        pump = self._pump
        pump.closing = True
        pump.paused = False
        pump.pump()  # what was queued before the close
        pump.flush_warnings()
        pump.stop_reading()
        self._closer = pump.loop.create_task(self._finish_close())

    async def _finish_close(self) -> None:
        pump = self._pump
        try:
            if pump.tasks:
                _, late = await asyncio.wait(set(pump.tasks), timeout=self._shutdown_timeout)
                for task in late:
                    task.cancel()
                if late:
                    pump.log.warning(
                        "%r: %d handler calls still running at the shutdown deadline (%g s); cancelled",
                        self,
                        len(late),
                        self._shutdown_timeout,
                    )
                    await asyncio.wait(late)
        finally:
            pump.sock.close()
            if not self._closed.done():
                self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished (forever if it is never called)."""
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        """Wait until the server is closed (it serves from the moment it was made)."""
        await self.wait_closed()

    async def __aenter__(self) -> AsyncUdpServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


async def serve_udp(
    handler: AsyncHandler,
    host: str | None = "127.0.0.1",
    port: int = 9898,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    family: int = socket.AF_UNSPEC,
    shutdown_timeout: float = 5.0,
    logger: logging.Logger | None = None,
) -> AsyncUdpServer:
    """Start a datagram server on the running loop and return it, serving.

    Args:
        handler: called with each datagram's bytes; a non-None return value (or the
            result of awaiting it, for a coroutine function) is sent back to the sender.
        host: the address to bind (loopback by default; None or ``""`` for every interface).
        port: the UDP port; 0 picks a free one (see :attr:`AsyncUdpServer.port`).
        max_size: the largest datagram accepted or sent (default 65507).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.
        shutdown_timeout: seconds coroutine handlers get to finish at :meth:`~AsyncUdpServer.close`.
        logger: where to log (default ``logging.getLogger("msgsock.server")``).

    Returns:
        The running :class:`AsyncUdpServer`.

    Raises:
        ValueError: ``max_size`` outside 0-65535, or ``port`` not an int 0..65535.
        TypeError: ``handler`` is not callable (``handler must be callable, got bytes``).
        OSError: the address cannot be resolved or bound.
    """
    check_callable(handler, "handler")
    _check_max_size(max_size)
    loop = asyncio.get_running_loop()
    log = server_logger(logger)
    sock = _bind(host, port, family)
    pump = _AsyncPump(sock, handler, max_size, log, loop)
    server = AsyncUdpServer(pump, shutdown_timeout)
    try:
        pump.start_reading()
    except BaseException:
        sock.close()
        raise
    return server


# -- clients ---------------------------------------------------------------------------------

_SWITCHED = object()  # request(): the address refused and the next one is now in use


def _check_client_options(timeout: float, retries: int, max_size: int) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, not {retries!r}")
    _check_max_size(max_size)


class _ClientBase:
    """What both clients share: addresses tried in order, the connected socket, sizes."""

    def __init__(
        self, where: str, candidates: list[tuple[int, Any]], timeout: float, retries: int, max_size: int
    ) -> None:
        self.max_size = max_size
        self.timeout = float(timeout)
        self.retries = retries
        self._where = where
        self._candidates = candidates
        self._buffer = bytearray(max_size + 1)
        self._view = memoryview(self._buffer)
        self._busy = False
        self._busy_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._index = -1
        self._connect_from(0)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else format_address(self.server_address)
        return f"<{type(self).__name__} {state}>"

    @property
    def server_address(self) -> Any:
        """The server address in use (the first of the host's addresses that worked)."""
        return self._candidates[self._index][1]

    @property
    def local_address(self) -> Any:
        """This client's own address.

        Raises:
            InvalidState: the client is closed.
        """
        return self._require_sock().getsockname()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._sock is None

    def _connect_from(self, start: int) -> None:
        """Use the first address from ``start`` on that a socket can be connected to.

        Raises:
            OSError: none could (the last error).
        """
        error: OSError | None = None
        for index in range(start, len(self._candidates)):
            family, address = self._candidates[index]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                # connect() on UDP sends nothing: it fixes the peer, so the kernel filters
                # other senders out and reports ICMP errors (port unreachable) to us.
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self._prepare(sock)
            old, self._sock, self._index = self._sock, sock, index
            if old is not None:
                old.close()
            return
        assert error is not None
        raise error

    def _prepare(self, sock: socket.socket) -> None:
        sock.setblocking(False)

    def _next_address(self) -> bool:
        """Move to the next address after a "port unreachable"; False when there is none."""
        if self._index + 1 >= len(self._candidates):
            return False
        try:
            self._connect_from(self._index + 1)
        except OSError:
            return False
        return True

    def _require_sock(self) -> socket.socket:
        if self._sock is None:
            raise InvalidState(f"{self!r} is closed")
        return self._sock

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[socket.socket]:
        # Two receivers would take each other's replies.
        with self._busy_lock:
            if self._busy:
                raise ConcurrencyError(f"another {what} or receive is in progress on {self!r}")
            self._busy = True
        try:
            yield self._require_sock()
        finally:
            self._busy = False

    def _receive_nowait(self, sock: socket.socket) -> tuple[bytes, Any]:
        """One waiting datagram.

        Raises:
            BlockingIOError: none is waiting.
            MessageTooLarge: it was above ``max_size`` (it is consumed).
            ConnectionRefusedError: ICMP port unreachable was reported.
        """
        n, address = sock.recvfrom_into(self._buffer, 0, _TRUNC)
        if n > self.max_size:
            raise MessageTooLarge(n, self.max_size)
        return bytes(self._view[:n]), address

    def _drain(self, sock: socket.socket) -> None:
        """Discard datagrams already queued: late replies to an earlier try."""
        for _ in range(_DRAIN_LIMIT):
            try:
                sock.recv_into(self._buffer, 0)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # a stale ICMP error: it concerned an earlier datagram
                continue

    def _send_now(self, sock: socket.socket, data: bytes | bytearray | memoryview, address: Any) -> None:
        """Send one datagram without waiting.

        Raises:
            BlockingIOError: the send buffer is full.
            OSError: from the system.
        """
        try:
            if address is None:
                sock.send(data)
            else:
                sock.sendto(data, address)
        except ConnectionRefusedError:
            # Linux reports an *earlier* datagram's ICMP error on this send, which then
            # did not go out; the error is consumed, so this one is sent now.
            if address is None:
                sock.send(data)
            else:
                sock.sendto(data, address)

    def _no_reply(self, tries: int, refused: bool) -> Timeout:
        why = " (port unreachable)" if refused else ""
        return Timeout(f"no reply from {self._where} after {tries} tries of {self.timeout:g} s{why}")

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class UdpClient(_ClientBase):
    """A blocking datagram client: send a message, get the server's reply (SPEC §5.4; simplec).

    The host's addresses (name, IPv4 or IPv6 literal) are tried in order: the first
    a socket can be connected to is used, and :meth:`request` moves on to the next
    when the server's port is unreachable.  Not for use by two threads at once
    (``ConcurrencyError``).

    Args:
        host: the server's name or address.
        port: the server's UDP port.
        timeout: seconds to wait for each reply before resending (or for :meth:`receive_from`).
        retries: resends after the first try; ``retries + 1`` tries in all.
        max_size: the largest datagram sent or accepted (default 65507).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.

    Raises:
        ValueError: ``timeout`` <= 0, ``retries`` < 0, ``max_size`` outside 0-65535,
            or ``port`` not an int 0..65535 (``port 70000: must be 0..65535``).
        OSError: ``socket.gaierror`` for a name that does not resolve; no address usable.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        max_size: int = DEFAULT_MAX_SIZE,
        family: int = socket.AF_UNSPEC,
    ) -> None:
        _check_client_options(timeout, retries, max_size)
        super().__init__(
            format_address((host, port)), _resolve(host, port, family), timeout, retries, max_size
        )

    def send_to(self, data: bytes | bytearray | memoryview, address: Any = None) -> None:
        """Send one datagram to the server (or to ``address``, a ``(host, port)`` tuple).

        The socket is connected to the server, so replies from another ``address``
        are not received.

        Raises:
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            InvalidState: the client is closed.
            Timeout: the send buffer stayed full for ``timeout`` seconds.
            OSError: from the system.
        """
        _check_send_size(data, self.max_size)
        sock = self._require_sock()
        sock.settimeout(self.timeout)
        try:
            self._send_now(sock, data, address)
        except TimeoutError:
            raise Timeout(f"could not send to {self._where} within {self.timeout:g} s") from None
        finally:
            sock.setblocking(False)

    def receive_from(self, timeout: float | None = None) -> tuple[bytes, Any]:
        """Wait for one datagram from the server; return it and the sender's address.

        Args:
            timeout: seconds to wait; None uses the client's ``timeout``.

        Raises:
            Timeout: nothing arrived in time.
            MessageTooLarge: a datagram above ``max_size`` arrived (it is discarded).
            ConnectionRefusedError: the server's port is unreachable (ICMP).
            ConcurrencyError: another thread is receiving.
            InvalidState: the client is closed.
        """
        wait = self.timeout if timeout is None else timeout
        with self._exclusive("receive_from") as sock:
            return self._receive(sock, time.monotonic() + wait, wait)

    def _receive(self, sock: socket.socket, deadline: float, wait: float) -> tuple[bytes, Any]:
        sock.settimeout(max(deadline - time.monotonic(), 0.0))
        try:
            n, address = sock.recvfrom_into(self._buffer, 0, _TRUNC)
        except BlockingIOError:  # timeout 0 left: the deadline has passed
            raise Timeout(f"nothing received from {self._where} within {wait:g} s") from None
        except TimeoutError:
            raise Timeout(f"nothing received from {self._where} within {wait:g} s") from None
        finally:
            sock.setblocking(False)
        if n > self.max_size:
            raise MessageTooLarge(n, self.max_size)
        return bytes(self._view[:n]), address

    def request(self, data: bytes | bytearray | memoryview) -> bytes:
        """Send ``data`` and return the server's reply, resending on silence.

        Waits ``timeout`` seconds per try, for ``retries + 1`` tries.  An ICMP port
        unreachable counts as no reply (and the host's next address, if any, is tried).

        Raises:
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            MessageTooLarge: the reply was above ``max_size``.
            Timeout: no reply after every try: ``no reply from HOST:PORT after N tries
                of T s`` (``(port unreachable)`` added when ICMP said so).
            ConcurrencyError: another thread is using the client.
            InvalidState: the client is closed.
            OSError: from the system.
        """
        _check_send_size(data, self.max_size)
        with self._exclusive("request"):
            tries = 0
            refused = False
            while tries <= self.retries:
                outcome = self._try_once(data)
                if outcome is _SWITCHED:
                    continue  # bounded: each switch moves to a later address
                if isinstance(outcome, bytes):
                    return outcome
                refused = refused or bool(outcome)
                tries += 1
            raise self._no_reply(tries, refused)

    def _try_once(self, data: bytes | bytearray | memoryview) -> bytes | bool | object:
        """One try: the reply, ``_SWITCHED``, or whether port unreachable was reported."""
        sock = self._require_sock()
        self._drain(sock)
        refused = False
        deadline = time.monotonic() + self.timeout
        sock.settimeout(self.timeout)
        try:
            self._send_now(sock, data, None)
        except TimeoutError:
            return False  # the send buffer stayed full: this try is lost
        except ConnectionRefusedError:  # a second ICMP error in a row
            if self._next_address():
                return _SWITCHED
            refused = True
        finally:
            sock.setblocking(False)
        while True:
            try:
                return self._receive(sock, deadline, self.timeout)[0]
            except Timeout:
                return refused
            except ConnectionRefusedError:
                if self._next_address():
                    return _SWITCHED
                refused = True  # the error is consumed: wait out this try

    def close(self) -> None:
        """Close the socket; idempotent."""
        self._close_socket()

    def __enter__(self) -> UdpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncUdpClient(_ClientBase):
    """An asyncio datagram client (SPEC §5.4); made by :func:`open_udp_client`.

    The same behaviour as :class:`UdpClient` (addresses in order, resends, ICMP
    handling), on the running loop (stock asyncio or uvloop).  One request or
    receive at a time (``ConcurrencyError``).
    """

    async def send_to(self, data: bytes | bytearray | memoryview, address: Any = None) -> None:
        """Send one datagram to the server (or to ``address``, a ``(host, port)`` tuple).

        Raises:
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            InvalidState: the client is closed.
            Timeout: the send buffer stayed full for ``timeout`` seconds.
            OSError: from the system.
        """
        _check_send_size(data, self.max_size)
        if not await self._send(self._require_sock(), data, address):
            raise Timeout(f"could not send to {self._where} within {self.timeout:g} s")

    async def receive_from(self, timeout: float | None = None) -> tuple[bytes, Any]:
        """Wait for one datagram from the server; return it and the sender's address.

        Args:
            timeout: seconds to wait; None uses the client's ``timeout``.

        Raises:
            Timeout: nothing arrived in time.
            MessageTooLarge: a datagram above ``max_size`` arrived (it is discarded).
            ConnectionRefusedError: the server's port is unreachable (ICMP).
            ConcurrencyError: another receive or request is in progress.
            InvalidState: the client is closed.
        """
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        with self._exclusive("receive_from") as sock:
            result = await self._receive(sock, loop.time() + wait)
        if result is None:
            raise Timeout(f"nothing received from {self._where} within {wait:g} s")
        return result

    async def request(self, data: bytes | bytearray | memoryview) -> bytes:
        """Send ``data`` and return the server's reply, resending on silence.

        Raises:
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            MessageTooLarge: the reply was above ``max_size``.
            Timeout: no reply after ``retries + 1`` tries of ``timeout`` seconds
                (``(port unreachable)`` added when ICMP said so).
            ConcurrencyError: another request or receive is in progress.
            InvalidState: the client is closed.
            OSError: from the system.
        """
        _check_send_size(data, self.max_size)
        loop = asyncio.get_running_loop()
        with self._exclusive("request"):
            tries = 0
            refused = False
            while tries <= self.retries:
                sock = self._require_sock()
                self._drain(sock)
                deadline = loop.time() + self.timeout
                try:
                    sent = await self._send(sock, data, None)
                    result = await self._receive(sock, deadline) if sent else None
                except ConnectionRefusedError:
                    if self._next_address():
                        continue  # bounded: each switch moves to a later address
                    refused = True  # the error is consumed: wait out this try
                    result = await self._receive(sock, deadline, refused_ok=True)
                if result is not None:
                    return result[0]
                tries += 1
            raise self._no_reply(tries, refused)

    async def _send(self, sock: socket.socket, data: bytes | bytearray | memoryview, address: Any) -> bool:
        """Send one datagram, waiting up to ``timeout`` for room; False if there was none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                self._send_now(sock, data, address)
                return True
            except BlockingIOError:
                if not await self._wait(sock, deadline, write=True):
                    return False

    async def _receive(
        self, sock: socket.socket, deadline: float, *, refused_ok: bool = False
    ) -> tuple[bytes, Any] | None:
        """The next datagram, or None at the deadline.

        Raises:
            ConnectionRefusedError: port unreachable (unless ``refused_ok``: then keep waiting).
            MessageTooLarge: a datagram above ``max_size``.
        """
        while True:
            try:
                return self._receive_nowait(sock)
            except BlockingIOError:
                if not await self._wait(sock, deadline):
                    return None
            except ConnectionRefusedError:
                if not refused_ok:
                    raise

    @staticmethod
    async def _wait(sock: socket.socket, deadline: float, *, write: bool = False) -> bool:
        """Wait until ``sock`` is readable (writable); False when the deadline passed first."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = sock.fileno()
        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, remaining)
        except TimeoutError:
            return False
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
        return True

    def close(self) -> None:
        """Close the socket; idempotent (nothing is buffered, so nothing to wait for)."""
        self._close_socket()

    async def __aenter__(self) -> AsyncUdpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def open_udp_client(
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    max_size: int = DEFAULT_MAX_SIZE,
    family: int = socket.AF_UNSPEC,
) -> AsyncUdpClient:
    """Make an :class:`AsyncUdpClient` for the server at ``host``:``port``.

    The name is resolved without blocking the loop; the host's addresses are tried
    in order as for :class:`UdpClient`.

    Args:
        host: the server's name or address.
        port: the server's UDP port.
        timeout: seconds to wait for each reply before resending.
        retries: resends after the first try; ``retries + 1`` tries in all.
        max_size: the largest datagram sent or accepted (default 65507).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.

    Raises:
        ValueError: ``timeout`` <= 0, ``retries`` < 0, ``max_size`` outside 0-65535,
            or ``port`` not an int 0..65535 (``port 70000: must be 0..65535``).
        OSError: ``socket.gaierror`` for a name that does not resolve; no address usable.
    """
    _check_client_options(timeout, retries, max_size)
    port = check_port(port)
    loop = asyncio.get_running_loop()
    # getaddrinfo may block on DNS: in the loop's executor, not on the loop.
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    candidates = _inet_addresses(infos, host)
    return AsyncUdpClient(format_address((host, port)), candidates, timeout, retries, max_size)


# -- the command line ------------------------------------------------------------------------
