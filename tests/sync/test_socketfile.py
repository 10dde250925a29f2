"""Tests of SocketFile, the CSocketFile of msgsock, with the CArchive reader/writer (SPEC §4.3, §5.2).

The CSocket "sequence of operations" (seed 001): create, listen, connect, accept, a
file over each socket, archives over the files.  No byte read ahead is ever lost.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock.archive import ArchiveReader, ArchiveWriter
from msgsock.exceptions import Cancelled, ConnectionClosed, EndOfData, Timeout
from msgsock.sync import CancelToken, Connection, SocketFile
from tests.helpers import free_loopback6, unit, wait_for

HOSTS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")]

# -- fixtures and helpers ---------------------------------------------------------------


class Registry:
    """Sockets, files and threads a test opens: closed and joined at teardown even on failure."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.threads: list[threading.Thread] = []

    def add(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        for sock in (a, b):
            sock.settimeout(unit(5))
            self.add(sock)
        return a, b

    def tcp_pair(self, host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
        """The CSocket sequence: create + listen (server), connect (client), accept."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = self.add(socket.socket(family, socket.SOCK_STREAM))
        listener.bind((host, 0))
        listener.listen(1)
        listener.settimeout(unit(5))
        client = self.add(socket.create_connection(listener.getsockname()[:2], timeout=unit(5)))
        server, _ = listener.accept()
        server.settimeout(unit(5))
        return client, self.add(server)

    def thread(self, target: Callable[[], object]) -> threading.Thread:
        thread = threading.Thread(target=target, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        for item in reversed(self.items):
            try:
                # A Connection is aborted: a graceful close would wait for the peer's EOF.
                getattr(item, "abort", item.close)()
            except OSError:
                pass
        for thread in self.threads:
            thread.join(unit(5))


@pytest.fixture
def registry() -> Iterator[Registry]:
    """A registry of sockets closed at teardown."""
    items = Registry()
    try:
        yield items
    finally:
        items.close()


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    """A loopback address; IPv6 skips when ::1 cannot be bound."""
    value: str = request.param
    if ":" in value and not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    return value


def write_packet(writer: ArchiveWriter, value: int, text: str) -> None:
    """One record of every kind of field (the archive demo's packet and more)."""
    writer.write_byte(value)
    writer.write_count(3)
    writer.write_bytes(bytes([value]) * 3)
    writer.write_string(text, wide=False)
    writer.write_string(text + " \u4e16\u754c", wide=True)
    writer.write_long(-123456)
    writer.write_double(2.5)
    writer.write_ulonglong(2**64 - 1)


def read_packet(reader: ArchiveReader) -> tuple[Any, ...]:
    value = reader.read_byte()
    copies = reader.read_count()
    return (
        value,
        reader.read_bytes(copies),
        reader.read_string(),
        reader.read_string(),
        reader.read_long(),
        reader.read_double(),
        reader.read_ulonglong(),
    )


def expected_packet(value: int, text: str) -> tuple[Any, ...]:
    return (value, bytes([value]) * 3, text, text + " \u4e16\u754c", -123456, 2.5, 2**64 - 1)


def packet_bytes(value: int, text: str) -> bytes:
    writer = ArchiveWriter()
    write_packet(writer, value, text)
    return writer.getvalue()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


# -- the CSocket sequence of operations --------------------------------------------------


def test_archive_round_trip_over_a_socketpair(registry: Registry) -> None:
    """An archive stored through one SocketFile loads through the other, and a reply comes back."""
    a, b = registry.pair()
    with SocketFile(a) as file_a, SocketFile(b) as file_b:
        out = ArchiveWriter(file_a)
        write_packet(out, 0x41, "café")
        out.flush()
        assert read_packet(ArchiveReader(file_b)) == expected_packet(0x41, "café")
        ack = ArchiveWriter(file_b)
        ack.write_bool32(True)
        ack.write_string("ack")
        ack.close()
        reader = ArchiveReader(file_a)
        assert (reader.read_bool32(), reader.read_string()) == (True, "ack")


def test_archive_round_trip_over_loopback_tcp(registry: Registry, host: str) -> None:
    """Over real loopback TCP (IPv4 and IPv6), both sides store and load in the CSocket sequence."""
    client, server = registry.tcp_pair(host)
    replies: list[tuple[Any, ...]] = []

    def serve() -> None:
        with SocketFile(server) as file:
            packet = read_packet(ArchiveReader(file))
            replies.append(packet)
            with ArchiveWriter(file) as ack:  # closing the archive flushes it
                ack.write_byte(1)
                ack.write_word(len(packet[1]))

    thread = registry.thread(serve)
    with SocketFile(client) as file:
        with ArchiveWriter(file) as out:
            write_packet(out, 7, "hello")
        reader = ArchiveReader(file)
        assert (reader.read_byte(), reader.read_word()) == (1, 3)
    thread.join(unit(5))
    assert replies == [expected_packet(7, "hello")]


def test_byte_at_a_time_peer(registry: Registry) -> None:
    """A peer that sends the archive one byte per send still gives every value whole."""
    a, b = registry.pair()
    data = packet_bytes(200, "slow")
    sent = threading.Event()

    def trickle() -> None:
        for i in range(len(data)):
            a.sendall(data[i : i + 1])
        sent.set()

    registry.thread(trickle)
    reader = ArchiveReader(SocketFile(b))
    assert read_packet(reader) == expected_packet(200, "slow")
    assert sent.wait(unit(5))
    assert reader.unread_bytes() == b""


def test_read_returns_at_most_what_was_asked(registry: Registry) -> None:
    """read(n) makes one receive of at most n bytes: nothing more is taken from the socket."""
    a, b = registry.pair()
    a.sendall(b"0123456789")
    file = SocketFile(b)
    wait_for(lambda: len(b.recv(16, socket.MSG_PEEK)) == 10)
    assert file.read(3) == b"012"
    assert b.recv(16, socket.MSG_PEEK) == b"3456789"
    buffer = bytearray(4)
    assert file.readinto(buffer) == 4 and buffer == b"3456"
    assert file.read(100) == b"789"


def test_read_ahead_is_never_discarded(registry: Registry) -> None:
    """Two archives sent back to back in one write: a reader of the first leaves the second's bytes readable."""
    a, b = registry.pair()
    first, second = packet_bytes(1, "first"), packet_bytes(2, "second")
    a.sendall(first + second)
    file = SocketFile(b)
    reader = ArchiveReader(file)
    assert read_packet(reader) == expected_packet(1, "first")
    assert reader.unread_bytes() == b""
    del reader  # like a CArchive going out of scope: nothing it held is lost
    assert b.recv(len(second), socket.MSG_PEEK) == second
    assert read_packet(ArchiveReader(file)) == expected_packet(2, "second")


def test_eof_is_end_of_data(registry: Registry) -> None:
    """At the peer's EOF read() returns b"" and an archive value cut short raises EndOfData."""
    a, b = registry.pair()
    a.sendall(packet_bytes(9, "cut")[:5])
    a.shutdown(socket.SHUT_WR)
    file = SocketFile(b)
    reader = ArchiveReader(file)
    assert reader.read_byte() == 9
    assert reader.read_count() == 3
    with pytest.raises(EndOfData):
        reader.read_bytes(3)
    assert reader.unread_bytes() == bytes([9, 9]), "the bytes read for the unfinished value are kept"
    assert file.read(10) == b""


def test_readall_reads_to_eof(registry: Registry) -> None:
    """read() with no size reads until the peer's EOF (RawIOBase.readall)."""
    a, b = registry.pair()
    a.sendall(b"x" * 100_000)
    a.shutdown(socket.SHUT_WR)
    assert SocketFile(b).read() == b"x" * 100_000


# -- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)], id="udp"),
        pytest.param(lambda: list(socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)), id="unix-dgram"),
    ],
)
def test_datagram_socket_is_refused(registry: Registry, make: Callable[[], list[socket.socket]]) -> None:
    """A datagram socket is refused with a ValueError that says why (no CArchive over datagrams)."""
    sock, *_others = [registry.add(s) for s in make()]
    with pytest.raises(ValueError, match=r"SOCK_STREAM.*SOCK_DGRAM"):
        SocketFile(sock)


def test_other_misuse_is_refused(registry: Registry) -> None:
    """A Connection, a non-socket, a non-blocking socket and a closed socket are refused with clear errors."""
    a, b = registry.pair()
    with pytest.raises(TypeError, match="framed msgsock Connection"):
        SocketFile(registry.add(Connection(a)))
    with pytest.raises(TypeError, match=r"socket\.socket"):
        SocketFile(io.BytesIO())  # type: ignore[arg-type]
    b.setblocking(False)
    with pytest.raises(ValueError, match="blocking"):
        SocketFile(b)
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        SocketFile(closed)


@pytest.mark.parametrize("operation", ["seek", "tell", "truncate", "fileno"])
def test_unsupported_operations_name_themselves(registry: Registry, operation: str) -> None:
    """seek, tell, truncate and fileno raise io.UnsupportedOperation naming the operation."""
    a, _b = registry.pair()
    file = SocketFile(a)
    args = {"seek": (0,), "truncate": (0,)}.get(operation, ())
    with pytest.raises(io.UnsupportedOperation, match=f"SocketFile does not support {operation}"):
        getattr(file, operation)(*args)


def test_file_capabilities(registry: Registry) -> None:
    """A SocketFile reads and writes but does not seek; it is a RawIOBase."""
    a, _b = registry.pair()
    file = SocketFile(a)
    assert isinstance(file, io.RawIOBase)
    assert (file.readable(), file.writable(), file.seekable()) == (True, True, False)
    assert file.socket is a


def test_close_leaves_the_socket_open_unless_asked(registry: Registry) -> None:
    """close() keeps the socket open by default, closes it with close_socket=True; I/O after close is refused."""
    a, b = registry.pair()
    file = SocketFile(a)
    file.close()
    file.close()
    assert a.fileno() >= 0
    a.sendall(b"still usable")
    assert recv_exactly(b, 12) == b"still usable"
    with pytest.raises(ValueError, match="closed"):
        file.write(b"x")
    with pytest.raises(ValueError, match="closed"):
        file.read(1)
    owning = SocketFile(b, close_socket=True)
    owning.close()
    assert b.fileno() == -1


# -- timeouts and failures -----------------------------------------------------------------


def test_read_timeout_raises_and_keeps_the_partial_value(registry: Registry) -> None:
    """The socket's timeout gives msgsock.Timeout; the bytes of a partial value wait for the rest."""
    a, b = registry.pair()
    b.settimeout(unit(0.1))
    file = SocketFile(b)
    with pytest.raises(Timeout) as info:
        file.read(1)
    assert isinstance(info.value, TimeoutError)
    reader = ArchiveReader(file)
    a.sendall(b"\x01\x02")  # half of a DWORD
    with pytest.raises(Timeout):
        reader.read_dword()
    a.sendall(b"\x03\x04")
    b.settimeout(unit(5))
    assert reader.read_dword() == 0x04030201


def test_write_timeout_loses_nothing(registry: Registry) -> None:
    """A write timeout to a peer that does not read keeps the unsent bytes in the ArchiveWriter: none lost, none twice."""
    a, b = registry.pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(unit(0.1))
    payload = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold
    writer = ArchiveWriter(SocketFile(a), buffer_size=len(payload) + 1)
    writer.write_bytes(payload)
    with pytest.raises(Timeout):
        writer.flush()
    received = bytearray()

    def drain() -> None:
        while len(received) < len(payload):
            chunk = b.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    thread = registry.thread(drain)
    a.settimeout(unit(5))
    writer.flush()
    thread.join(unit(5))
    assert bytes(received) == payload


def test_reset_is_connection_closed(registry: Registry) -> None:
    """A reset by the peer reads as ConnectionClosed(clean=False)."""
    client, server = registry.tcp_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.close()
    file = SocketFile(client)
    with pytest.raises(ConnectionClosed) as info:
        while file.read(10):
            pass
    assert not info.value.clean


def test_write_to_a_closed_peer_is_connection_closed(registry: Registry) -> None:
    """Writing to a peer that is gone raises ConnectionClosed(clean=False)."""
    a, b = registry.pair()
    b.close()
    file = SocketFile(a)
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(100):
            file.write(b"x" * 65536)
    assert not info.value.clean


# -- cancelling ----------------------------------------------------------------------------


def test_cancel_wakes_a_blocked_archive_read(registry: Registry) -> None:
    """cancel() from another thread makes an archive read blocked on the socket raise Cancelled."""
    _a, b = registry.pair()
    b.settimeout(None)
    file = SocketFile(b)
    errors: list[BaseException] = []
    started = threading.Event()

    def read() -> None:
        started.set()
        try:
            ArchiveReader(file).read_dword()
        except BaseException as exc:
            errors.append(exc)

    thread = registry.thread(read)
    assert started.wait(unit(5))
    file.cancel()
    thread.join(unit(2))
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    with pytest.raises(Cancelled):
        file.write(b"x")
    file.close()


def test_cancel_token_wakes_a_blocked_write(registry: Registry) -> None:
    """A CancelToken given to SocketFile cancels a write blocked on a peer that does not read."""
    a, b = registry.pair()
    a.settimeout(None)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    token = CancelToken()
    file = SocketFile(a, cancel=token)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            file.write(b"w" * (4 << 20))
        except BaseException as exc:
            errors.append(exc)

    thread = registry.thread(write)
    wait_for(lambda: b.recv(1, socket.MSG_PEEK) == b"w")
    token.cancel()
    thread.join(unit(2))
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert file.cancelled
