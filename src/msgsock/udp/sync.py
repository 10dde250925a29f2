"""Blocking datagram endpoints: :class:`UdpServer` (a thread) and :class:`UdpClient` (SPEC §5.4).

Theory of operation.  Both are pumps (STYLE §1) over the sans-I/O core, which
decides and words everything; this module only moves datagrams.

- :class:`UdpServer` binds in its constructor (a bad address fails there, and the
  real port is known at once) and serves on one thread: it waits on the socket
  and on a wake-up socket pair (closing a socket does not wake a thread blocked on
  it), reads a burst of up to 64 datagrams into one reusable buffer, and for each
  one asks its :class:`~msgsock.udp.core.DatagramServerProtocol` whether to handle
  it, calls the handler through it, and sends back what it returns.  The wait ends
  at the protocol's :meth:`~msgsock.udp.core.DatagramServerProtocol.next_deadline`
  too, so the summary of a flood of bad datagrams is logged within 10 s of it.
- :class:`UdpClient` steps a :class:`~msgsock.udp.request.Request` with
  :func:`time.monotonic`: at ``SEND`` it discards the datagrams already queued and
  sends, at ``WAIT`` it blocks in one receive until the try's deadline, and reports
  what happened (a datagram, silence, ICMP port unreachable) back to the request.
"""

from __future__ import annotations

import logging
import math
import selectors
import socket
import threading
import time
from types import TracebackType
from typing import Any

from .._net import check_callable, check_port, check_timeout, server_logger
from ..exceptions import InvalidState
from ..protocol import format_address
from . import _endpoint
from ._endpoint import BURST, TRUNC, BoundServer, ClientEndpoint, check_address
from .core import DEFAULT_MAX_SIZE, DEFAULT_RETRIES, DEFAULT_TIMEOUT, DatagramServerProtocol, Handler
from .request import DatagramClientProtocol, Request, Step, check_client_options

__all__ = ["UdpClient", "UdpServer"]


def _settimeout(sock: socket.socket, seconds: float) -> None:
    """``sock.settimeout``, with an infinite wait as blocking (settimeout refuses ``inf``)."""
    sock.settimeout(None if math.isinf(seconds) else max(seconds, 0.0))


class UdpServer(BoundServer):
    """A datagram server on its own thread: each datagram in, the handler's reply back (SPEC §5.4).

    Use it as a context manager, or call :meth:`start` (or :meth:`serve_forever`)
    and :meth:`shutdown`.

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
        ValueError: ``max_size`` outside 0..65535, or ``port`` not an int 0..65535.
        TypeError: ``handler`` is not callable (``handler must be callable, got bytes``),
            or ``max_size`` is not an int.
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
        self._handler = handler
        self._log = server_logger(logger)
        self._protocol = DatagramServerProtocol(
            max_size, log=self._log.log, lock=threading.Lock(), exact_sizes=bool(TRUNC)
        )
        self._sock = _endpoint.bind(host, port, family)
        self._address: Any = self._sock.getsockname()
        self._buffer = bytearray(self._protocol.buffer_size)
        self._view = memoryview(self._buffer)
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

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop serving and close the socket; idempotent, callable from any thread.

        The datagrams already queued when the stop is seen are still answered (at
        most one burst); then the thread ends and the socket is closed.

        Args:
            timeout: seconds to wait for the server thread (a handler may be
                running); None waits as long as it takes.

        Raises:
            ValueError: ``timeout`` is negative or NaN (the server goes on).
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        with self._lock:
            first = not self._stop.is_set()
            self._stop.set()
            thread = self._thread
        if not first:
            self._done.wait(timeout)
            return
        self._protocol.begin_shutdown()
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
        protocol = self._protocol
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._sock, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop.is_set():
                    due = protocol.next_deadline()
                    if due is None:  # the common case: no clock read per wake-up
                        selector.select()
                        self._pump()
                    else:
                        selector.select(max(due - time.monotonic(), 0.0))
                        self._pump()
                        protocol.check_timeouts(time.monotonic())
            self._pump()  # answer what was queued when the stop came
            protocol.flush_warnings(time.monotonic())
        except BaseException as exc:  # never let the server thread die silently
            protocol.pump_failed(repr(self), exc)
            raise

    def _pump(self) -> None:
        """Handle up to one burst of waiting datagrams; return early when none is left."""
        protocol, sock, buffer, view = self._protocol, self._sock, self._buffer, self._view
        handler = self._handler
        now = time.monotonic()  # once per burst: the core needs it only for the log's rate limit
        for _ in range(BURST):
            try:
                n, peer = sock.recvfrom_into(buffer, 0, TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                if protocol.receive_failed(exc, now):
                    continue
                return
            message = protocol.receive_datagram(view[:n], peer, now, size=n)
            if message is None:
                continue
            reply = protocol.handle(handler, message, peer, now)
            if reply is None:
                continue
            try:
                sock.sendto(reply, peer)
            except OSError as exc:
                protocol.send_failed(exc, peer, now)
            else:
                protocol.reply_sent(reply)


class UdpClient(ClientEndpoint):
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
        ValueError: ``timeout`` not a finite number above 0, ``retries`` < 0,
            ``max_size`` outside 0..65535, or ``port`` not an int 0..65535
            (``port 70000: must be 0..65535``); each names the argument and value.
        TypeError: ``timeout``, ``retries`` or ``max_size`` of the wrong type.
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
        port = check_port(port)  # getaddrinfo would take it modulo 65536
        where = format_address((host, port))
        check_client_options(timeout, retries, max_size)  # before any DNS lookup
        candidates = _endpoint.resolve(host, port, family)
        super().__init__(DatagramClientProtocol(where, candidates, timeout, retries, max_size))

    def send_to(self, data: bytes | bytearray | memoryview, address: Any = None) -> None:
        """Send one datagram to the server (or to ``address``, a ``(host, port)`` tuple).

        The socket is connected to the server, so replies from another ``address``
        are not received.

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
        sock = self._require_sock()
        sock.settimeout(self._protocol.timeout)
        try:
            self._send_now(sock, data, address)
        except TimeoutError:
            raise self._protocol.send_timeout() from None
        finally:
            sock.setblocking(False)

    def receive_from(self, timeout: float | None = None) -> tuple[bytes, Any]:
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
            ConcurrencyError: another thread is receiving.
            InvalidState: the client is closed.
        """
        check_timeout(timeout)
        wait = self._protocol.receive_wait(timeout)
        with self._exclusive("receive_from") as sock:
            result = self._receive(sock, time.monotonic() + wait)
        if result is None:
            raise self._protocol.receive_timeout(wait)
        return result

    def _receive(self, sock: socket.socket, deadline: float) -> tuple[bytes, Any] | None:
        """One datagram, or None at the deadline.

        Raises:
            MessageTooLarge: it was above ``max_size``.
            ConnectionRefusedError: ICMP port unreachable.
        """
        _settimeout(sock, deadline - time.monotonic())
        try:
            return self._receive_nowait(sock)
        except (BlockingIOError, TimeoutError):  # BlockingIOError: no time was left
            return None
        finally:
            sock.setblocking(False)

    def request(self, data: bytes | bytearray | memoryview) -> bytes:
        """Send ``data`` and return the server's reply, resending on silence.

        Waits ``timeout`` seconds per try, for ``retries + 1`` tries.  An ICMP port
        unreachable counts as no reply (and the host's next address, if any, is tried).

        Raises:
            TypeError: ``data`` is not bytes-like.
            OversizeMessage: ``data`` is above ``max_size``; nothing was sent.
            MessageTooLarge: the reply was above ``max_size``.
            Timeout: no reply after every try: ``no reply from HOST:PORT after N tries
                of T s`` (``(port unreachable)`` added when ICMP said so).
            ConcurrencyError: another thread is using the client.
            InvalidState: the client is closed.
            OSError: from the system.
        """
        req = self._protocol.request(data)
        with self._exclusive("request"):
            while True:
                now = time.monotonic()
                step = req.next_step(now)
                if step is Step.DONE:
                    assert req.reply is not None
                    return req.reply
                if step is Step.FAILED:
                    raise req.error()
                if step is Step.SEND:
                    self._send_try(req, data, now)
                else:
                    self._wait_reply(req)

    def _send_try(self, req: Request, data: bytes | bytearray | memoryview, now: float) -> None:
        sock = self._require_sock()
        self._drain(sock)
        req.try_started(now)
        sock.settimeout(req.timeout)
        refused = False
        try:
            self._send_now(sock, data, None)
        except TimeoutError:
            req.send_blocked()
        except ConnectionRefusedError:  # a second ICMP error in a row
            refused = True
        finally:
            sock.setblocking(False)
        if refused:
            req.refused(switched=self._next_address())

    def _wait_reply(self, req: Request) -> None:
        sock = self._require_sock()
        try:
            result = self._receive(sock, req.deadline if req.deadline is not None else 0.0)
        except ConnectionRefusedError:
            req.refused(switched=self._next_address())  # the error is consumed: else wait out the try
            return
        if result is not None:
            req.datagram_received(result[0])

    def __enter__(self) -> UdpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
