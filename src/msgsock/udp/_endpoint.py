"""What the blocking and the asyncio datagram endpoints share: sockets, addresses, checks.

Not part of the sans-I/O core (:mod:`msgsock.udp.core`, :mod:`msgsock.udp.request`):
binding and resolving, a client's *connected* socket moved along the host's
addresses, and the checks of the API edges that need :mod:`msgsock._net`.

A client's socket is connected to the server's address: the kernel then delivers
only that server's datagrams (the matching rule of :mod:`msgsock.udp.request`) and
reports an ICMP "port unreachable" as ``ConnectionRefusedError`` on the next send
or receive.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .._net import check_port
from ..exceptions import ConcurrencyError, InvalidState
from ..protocol import format_address
from ..serving import ServerStatistics
from .core import DatagramServerProtocol
from .request import DatagramClientProtocol

__all__ = ["BoundServer", "ClientEndpoint", "bind", "check_address", "inet_addresses", "resolve"]

BURST = 64
"""Datagrams a server handles per wake-up before it looks at its other work."""

DRAIN_LIMIT = 1024
"""Stale datagrams a client discards at most before a try (a bounded loop)."""

TRUNC = socket.MSG_TRUNC if sys.platform.startswith("linux") else 0
"""recvfrom flag: on Linux, return a datagram's real size even when it was truncated."""


def bind(host: str | None, port: object, family: int) -> socket.socket:
    """Bind a non-blocking datagram socket to the first address of ``host`` that works.

    Raises:
        ValueError: ``port`` is not an int 0..65535 (``port 70000: must be 0..65535``).
        OSError: no address could be bound (the last error), or ``socket.gaierror``.
    """
    checked = check_port(port)  # getaddrinfo would take it modulo 65536
    infos = socket.getaddrinfo(host or None, checked, family, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE)
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


def resolve(host: str, port: int, family: int) -> list[tuple[int, Any]]:
    """The addresses of ``host``, in getaddrinfo's order (SPEC §5.2: all are tried in order).

    Raises:
        socket.gaierror: the name does not resolve.
        OSError: it resolves to no IPv4 or IPv6 address.
    """
    return inet_addresses(socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM), host)


def inet_addresses(infos: Iterable[tuple[Any, ...]], host: str) -> list[tuple[int, Any]]:
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


def check_address(address: object) -> Any:
    """Check a ``send_to`` address: None (the server) or a ``(host, port, ...)`` tuple.

    Raises:
        TypeError: not a tuple of at least a host and a port.
        ValueError: its port is not an int 0..65535.
    """
    if address is None:
        return None
    if not isinstance(address, tuple) or len(address) < 2:
        raise TypeError(f"address must be a (host, port) tuple, got {type(address).__name__}")
    check_port(address[1])
    return address


class BoundServer:
    """What the blocking and the asyncio datagram servers share: a bound address and a protocol."""

    _address: Any
    _protocol: DatagramServerProtocol

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
        return self._protocol.max_size

    def statistics(self) -> ServerStatistics:
        """Datagrams and bytes in and out, and ``errors`` by kind (dropped datagrams, failed handlers or replies)."""
        return self._protocol.statistics()


class ClientEndpoint:
    """What both clients share: the connected socket, moved along the host's addresses.

    Args:
        protocol: the client's sans-I/O state (limits, addresses, errors).

    Raises:
        OSError: no address could be connected to (the last error).
    """

    def __init__(self, protocol: DatagramClientProtocol) -> None:
        self._protocol = protocol
        self._buffer = bytearray(protocol.max_size + 1)  # a datagram that fills it was too large
        self._view = memoryview(self._buffer)
        self._busy = False
        self._busy_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._connect_from(0)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else format_address(self.server_address)
        return f"<{type(self).__name__} {state}>"

    @property
    def timeout(self) -> float:
        """Seconds to wait for each reply before resending; settable (a finite number above 0)."""
        return self._protocol.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._protocol.timeout = value

    @property
    def retries(self) -> int:
        """Resends after the first try; settable (an int >= 0)."""
        return self._protocol.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._protocol.retries = value

    @property
    def max_size(self) -> int:
        """The largest datagram sent or accepted."""
        return self._protocol.max_size

    @property
    def server_address(self) -> Any:
        """The server address in use (the first of the host's addresses that worked)."""
        return self._protocol.server_address

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

    def close(self) -> None:
        """Close the socket; idempotent (nothing is buffered, so there is nothing to wait for)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _connect_from(self, start: int) -> None:
        """Use the first address from ``start`` on that a socket can be connected to.

        Raises:
            OSError: none could (the last error).
        """
        error: OSError | None = None
        candidates = self._protocol.candidates
        for index in range(start, len(candidates)):
            family, address = candidates[index]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                # connect() on UDP sends nothing: it fixes the peer, so the kernel filters
                # other senders out and reports ICMP errors (port unreachable) to us.
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.setblocking(False)
            old, self._sock = self._sock, sock
            self._protocol.index = index
            if old is not None:
                old.close()
            return
        assert error is not None
        raise error

    def _next_address(self) -> bool:
        """Move to the next address after a "port unreachable"; False when there is none."""
        start = self._protocol.index + 1
        if start >= len(self._protocol.candidates):
            return False
        try:
            self._connect_from(start)
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
        n, address = sock.recvfrom_into(self._buffer, 0, TRUNC)
        self._protocol.check_received(n)
        return bytes(self._view[:n]), address

    def _drain(self, sock: socket.socket) -> None:
        """Discard the datagrams already queued: late replies to an earlier try (the matching rule)."""
        for _ in range(DRAIN_LIMIT):
            try:
                sock.recv_into(self._buffer, 0)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # a stale ICMP error: it concerned an earlier datagram
                continue

    @staticmethod
    def _send_now(sock: socket.socket, data: bytes | bytearray | memoryview, address: Any) -> None:
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
