"""asyncio datagram endpoints: :func:`serve_udp` and :func:`open_udp_client` (SPEC §5.4).

Theory of operation.  Both are pumps (STYLE §1) over the sans-I/O core, on the
running loop (stock asyncio or uvloop); the core decides and words everything.

- :class:`AsyncUdpServer` reads its socket from a reader callback (``add_reader``):
  a burst of up to 64 datagrams into one reusable buffer, each checked by its
  :class:`~msgsock.udp.core.DatagramServerProtocol`.  A plain handler's reply is
  sent at once; a coroutine handler is awaited in a task, and its result goes
  through the same check when it is ready.  While the protocol says
  :attr:`~msgsock.udp.core.DatagramServerProtocol.reading_paused` (too many
  handler calls in progress) the reader is removed and the kernel queues (and, when
  full, drops) what arrives.  A timer at the protocol's
  :meth:`~msgsock.udp.core.DatagramServerProtocol.next_deadline` logs the summary
  of a flood of bad datagrams within 10 s of it.
- :class:`AsyncUdpClient` steps a :class:`~msgsock.udp.request.Request` with the
  loop's clock, waiting for its socket with ``add_reader``/``add_writer`` (which
  uvloop and every selector loop support) instead of a datagram transport, whose
  ``error_received`` would separate ICMP errors from the receive they belong to.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import socket
import threading
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, cast

from .._net import check_callable, check_port, check_timeout, server_logger
from ..protocol import format_address
from . import _endpoint
from ._endpoint import BURST, TRUNC, BoundServer, ClientEndpoint, check_address
from .core import DEFAULT_MAX_SIZE, DEFAULT_RETRIES, DEFAULT_TIMEOUT, AsyncHandler, DatagramServerProtocol
from .request import DatagramClientProtocol, Step, check_client_options

__all__ = ["AsyncUdpClient", "AsyncUdpServer", "open_udp_client", "serve_udp"]


class AsyncUdpServer(BoundServer):
    """A datagram server on an asyncio loop (SPEC §5.4); made by :func:`serve_udp`.

    Use ``async with`` or call :meth:`close` then ``await`` :meth:`wait_closed`.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: AsyncHandler,
        protocol: DatagramServerProtocol,
        shutdown_timeout: float | None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._handler = handler
        self._protocol = protocol
        self._address: Any = sock.getsockname()
        self._shutdown_timeout = shutdown_timeout
        self._buffer = bytearray(protocol.buffer_size)
        self._view = memoryview(self._buffer)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = self._loop.create_future()
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
        self._protocol.begin_shutdown()
        self._pump(ignore_pause=True)  # what was queued before the close
        self._stop_reading()
        self._closer = self._loop.create_task(self._finish_close())

    async def _finish_close(self) -> None:
        try:
            if self._tasks:
                _, late = await asyncio.wait(set(self._tasks), timeout=self._shutdown_timeout)
                for task in late:
                    task.cancel()
                if late:
                    self._protocol.handlers_cancelled(
                        repr(self), len(late), cast(float, self._shutdown_timeout)
                    )
                    await asyncio.wait(late)
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._protocol.flush_warnings(self._loop.time())
            self._sock.close()
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

    # -- the pump -----------------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._sock.fileno(), self._pump)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _pump(self, ignore_pause: bool = False) -> None:
        """Handle up to one burst of waiting datagrams; return early when none is left."""
        protocol, sock, buffer, view = self._protocol, self._sock, self._buffer, self._view
        now = self._loop.time()
        for _ in range(BURST):
            if protocol.reading_paused and not ignore_pause:
                self._stop_reading()
                break
            try:
                n, peer = sock.recvfrom_into(buffer, 0, TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if protocol.receive_failed(exc, now):
                    continue
                break
            message = protocol.receive_datagram(view[:n], peer, now, size=n)
            if message is not None:
                self._handle(message, peer, now)
        self._arm_timer()

    def _handle(self, message: bytes, peer: Any, now: float) -> None:
        protocol = self._protocol
        try:
            result = self._handler(message)
        except Exception as exc:
            protocol.handler_failed(exc, peer, now)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._finish(cast(Awaitable[object], result), peer))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            protocol.handler_started()
        else:
            self._send(protocol.handler_returned(result, peer, now), peer, now)

    async def _finish(self, awaitable: Awaitable[object], peer: Any) -> None:
        protocol = self._protocol
        try:
            result = await awaitable
        except Exception as exc:
            protocol.handler_failed(exc, peer, self._loop.time())
        else:
            now = self._loop.time()
            self._send(protocol.handler_returned(result, peer, now), peer, now)
        self._arm_timer()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._protocol.handler_finished()
        if not self._protocol.reading_paused and not self._protocol.closing:
            self._start_reading()

    def _send(self, reply: bytes | bytearray | memoryview | None, peer: Any, now: float) -> None:
        if reply is None or self._sock.fileno() < 0:
            return
        try:
            self._sock.sendto(reply, peer)
        except OSError as exc:
            self._protocol.send_failed(exc, peer, now)
        else:
            self._protocol.reply_sent(reply)

    def _arm_timer(self) -> None:
        """Wake at the protocol's next deadline (a summary of suppressed log lines is due)."""
        due = self._protocol.next_deadline()
        if due is not None and self._timer is None and self._closer is None:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._protocol.check_timeouts(self._loop.time())
        self._arm_timer()


async def serve_udp(
    handler: AsyncHandler,
    host: str | None = "127.0.0.1",
    port: int = 9898,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    family: int = socket.AF_UNSPEC,
    shutdown_timeout: float | None = 5.0,
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
        shutdown_timeout: seconds coroutine handlers get to finish at
            :meth:`~AsyncUdpServer.close`; None waits as long as they take.
        logger: where to log (default ``logging.getLogger("msgsock.server")``).

    Returns:
        The running :class:`AsyncUdpServer`.

    Raises:
        ValueError: ``max_size`` outside 0..65535, ``port`` not an int 0..65535, or
            ``shutdown_timeout`` negative or NaN.
        TypeError: ``handler`` is not callable (``handler must be callable, got bytes``),
            ``max_size`` is not an int, or ``shutdown_timeout`` not a number.
        OSError: the address cannot be resolved or bound.
    """
    check_callable(handler, "handler")
    check_timeout(shutdown_timeout, "shutdown_timeout")
    log = server_logger(logger)
    # A lock: statistics() may be read from another thread than the loop's.
    protocol = DatagramServerProtocol(max_size, log=log.log, lock=threading.Lock(), exact_sizes=bool(TRUNC))
    sock = _endpoint.bind(host, port, family)
    try:
        server = AsyncUdpServer(sock, handler, protocol, shutdown_timeout)
        server._start_reading()
    except BaseException:
        sock.close()
        raise
    return server


class AsyncUdpClient(ClientEndpoint):
    """An asyncio datagram client (SPEC §5.4); made by :func:`open_udp_client`.

    The same behaviour as :class:`~msgsock.udp.UdpClient` (addresses in order,
    resends, ICMP handling), on the running loop (stock asyncio or uvloop).  One
    request or receive at a time (``ConcurrencyError``).

    Args:
        where: the server as named, for messages (``localhost:9898``).
        candidates: the server's ``(family, address)`` pairs, tried in order.
        timeout: seconds to wait for each reply before resending.
        retries: resends after the first try.
        max_size: the largest datagram sent or accepted.

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range, naming it.
        OSError: no address could be connected to.
    """

    def __init__(
        self, where: str, candidates: list[tuple[int, Any]], timeout: float, retries: int, max_size: int
    ) -> None:
        super().__init__(DatagramClientProtocol(where, candidates, timeout, retries, max_size))

    async def send_to(self, data: bytes | bytearray | memoryview, address: Any = None) -> None:
        """Send one datagram to the server (or to ``address``, a ``(host, port)`` tuple).

        Raises:
            TypeError: ``data`` is not bytes-like, or ``address`` is not a tuple.
            ValueError: ``address`` has a port outside 0..65535.
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            InvalidState: the client is closed.
            Timeout: the send buffer stayed full for ``timeout`` seconds.
            OSError: from the system.
        """
        self._protocol.check_send(data)
        address = check_address(address)
        deadline = asyncio.get_running_loop().time() + self._protocol.timeout
        if not await self._send(self._require_sock(), data, address, deadline):
            raise self._protocol.send_timeout()

    async def receive_from(self, timeout: float | None = None) -> tuple[bytes, Any]:
        """Wait for one datagram from the server; return it and the sender's address.

        Args:
            timeout: seconds to wait (0: only what is queued; ``inf``: forever);
                None uses the client's ``timeout``.

        Raises:
            ValueError: ``timeout`` is negative or NaN (``timeout -1: must be >= 0 seconds or None``).
            TypeError: ``timeout`` is not a number.
            Timeout: nothing arrived in time.
            MessageTooLarge: a datagram above ``max_size`` arrived (it is discarded).
            ConnectionRefusedError: the server's port is unreachable (ICMP).
            ConcurrencyError: another receive or request is in progress.
            InvalidState: the client is closed.
        """
        check_timeout(timeout)
        wait = self._protocol.receive_wait(timeout)
        loop = asyncio.get_running_loop()
        with self._exclusive("receive_from") as sock:
            result = await self._receive(sock, loop.time() + wait)
        if result is None:
            raise self._protocol.receive_timeout(wait)
        return result

    async def request(self, data: bytes | bytearray | memoryview) -> bytes:
        """Send ``data`` and return the server's reply, resending on silence.

        Raises:
            TypeError: ``data`` is not bytes-like.
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            MessageTooLarge: the reply was above ``max_size``.
            Timeout: no reply after ``retries + 1`` tries of ``timeout`` seconds
                (``(port unreachable)`` added when ICMP said so).
            ConcurrencyError: another request or receive is in progress.
            InvalidState: the client is closed.
            OSError: from the system.
        """
        req = self._protocol.request(data)
        loop = asyncio.get_running_loop()
        with self._exclusive("request"):
            while True:
                now = loop.time()
                step = req.next_step(now)
                if step is Step.DONE:
                    assert req.reply is not None
                    return req.reply
                if step is Step.FAILED:
                    raise req.error()
                sock = self._require_sock()
                if step is Step.SEND:
                    self._drain(sock)
                    req.try_started(now)
                deadline = req.deadline if req.deadline is not None else now
                try:
                    if step is Step.SEND:
                        if not await self._send(sock, data, None, deadline):
                            req.send_blocked()
                    elif (result := await self._receive(sock, deadline)) is not None:
                        req.datagram_received(result[0])
                except ConnectionRefusedError:
                    # Switched: the try starts again at the next address; else the error
                    # is consumed and the try is waited out.
                    req.refused(switched=self._next_address())

    async def _send(
        self, sock: socket.socket, data: bytes | bytearray | memoryview, address: Any, deadline: float
    ) -> bool:
        """Send one datagram, waiting until ``deadline`` for room; False if there was none."""
        while True:
            try:
                self._send_now(sock, data, address)
                return True
            except BlockingIOError:
                if not await self._wait(sock, deadline, write=True):
                    return False

    async def _receive(self, sock: socket.socket, deadline: float) -> tuple[bytes, Any] | None:
        """The next datagram, or None at the deadline.

        Raises:
            ConnectionRefusedError: port unreachable.
            MessageTooLarge: a datagram above ``max_size``.
        """
        while True:
            try:
                return self._receive_nowait(sock)
            except BlockingIOError:
                if not await self._wait(sock, deadline):
                    return None

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
            await asyncio.wait_for(ready, None if math.isinf(remaining) else remaining)
        except TimeoutError:
            return False
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
        return True

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
    in order as for :class:`~msgsock.udp.UdpClient`.

    Args:
        host: the server's name or address.
        port: the server's UDP port.
        timeout: seconds to wait for each reply before resending.
        retries: resends after the first try; ``retries + 1`` tries in all.
        max_size: the largest datagram sent or accepted (default 65507).
        family: ``socket.AF_INET`` or ``AF_INET6`` to restrict name resolution.

    Raises:
        ValueError: ``timeout`` not a finite number above 0, ``retries`` < 0,
            ``max_size`` outside 0..65535, or ``port`` not an int 0..65535
            (``port 70000: must be 0..65535``); each names the argument and value.
        TypeError: ``timeout``, ``retries`` or ``max_size`` of the wrong type.
        OSError: ``socket.gaierror`` for a name that does not resolve; no address usable.
    """
    check_client_options(timeout, retries, max_size)
    port = check_port(port)
    loop = asyncio.get_running_loop()
    # getaddrinfo may block on DNS: in the loop's executor, not on the loop.
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    candidates = _endpoint.inet_addresses(infos, host)
    return AsyncUdpClient(format_address((host, port)), candidates, timeout, retries, max_size)
