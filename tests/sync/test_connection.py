"""Tests of the blocking connection API, msgsock.sync.connect and Connection (SPEC §5.2)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from msgsock.exceptions import (
    ConcurrencyError,
    ConnectionClosed,
    EndKind,
    HandshakeError,
    IncompleteMessage,
    InvalidState,
    MessageTooLarge,
    OversizeMessage,
    Timeout,
)
from msgsock.framing import FrameFormat, Message, encode
from msgsock.sync import Connection, connect
from tests.helpers import free_loopback6, unit, wait_for

T = TypeVar("T")

HOSTS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")]


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    """A loopback address; IPv6 skips when ::1 cannot be bound."""
    value: str = request.param
    if ":" in value and not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    return value


class Sockets:
    """Every socket and Connection a test opens, closed at teardown even on failure."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.threads: list[threading.Thread] = []

    def add(self, item: T) -> T:
        self.items.append(item)
        return item

    def listener(self, host: str = "127.0.0.1", backlog: int = 16) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.add(socket.socket(family, socket.SOCK_STREAM))
        sock.bind((host, 0))
        sock.listen(backlog)
        sock.settimeout(unit(5))
        return sock

    def dead_address(self, host: str = "127.0.0.1") -> tuple[Any, ...]:
        """An address that refuses connections: bound (so nobody else takes it), not listening."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.add(socket.socket(family, socket.SOCK_STREAM))
        sock.bind((host, 0))
        address: tuple[Any, ...] = sock.getsockname()
        return address

    def accept(self, listener: socket.socket) -> socket.socket:
        raw, _ = listener.accept()
        raw.settimeout(unit(5))
        return self.add(raw)

    def thread(self, target: Callable[[], object]) -> threading.Thread:
        thread = threading.Thread(target=target, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def close(self) -> None:
        for item in reversed(self.items):
            try:
                if isinstance(item, Connection):
                    item.abort()
                else:
                    item.close()
            except OSError:
                pass
        for thread in self.threads:
            thread.join(unit(5))


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    """A registry of sockets closed at teardown."""
    registry = Sockets()
    try:
        yield registry
    finally:
        registry.close()


def client_and_raw(
    sockets: Sockets, host: str = "127.0.0.1", **kwargs: Any
) -> tuple[Connection, socket.socket]:
    """A msgsock client connected to a raw accepted socket the test drives byte by byte."""
    listener = sockets.listener(host)
    conn = sockets.add(connect(host, listener.getsockname()[1], connect_timeout=unit(5), **kwargs))
    return conn, sockets.accept(listener)


def connection_pair(
    sockets: Sockets, host: str = "127.0.0.1", **kwargs: Any
) -> tuple[Connection, Connection]:
    """A msgsock client and a msgsock Connection wrapping the accepted socket."""
    conn, raw = client_and_raw(sockets, host, **kwargs)
    server = sockets.add(Connection(raw, **kwargs))
    return conn, server


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes from a raw socket (or fail on EOF)."""
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise AssertionError(f"EOF after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    """Read one default-format frame from a raw socket."""
    (size,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, size)


def recv_to_eof(sock: socket.socket) -> bytes:
    """Read a raw socket until EOF."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


# -- connecting -------------------------------------------------------------------------


def test_round_trip(sockets: Sockets, host: str) -> None:
    """A message goes each way between connect() and a Connection over IPv4 and IPv6."""
    client, server = connection_pair(sockets, host)
    client.send(b"ping")
    assert server.receive(unit(5)) == b"ping"
    server.send(bytearray(b"pong"))
    assert client.receive(unit(5)) == b"pong"
    assert client.peer_address[:2] == server.local_address[:2]
    assert server.peer_address[:2] == client.local_address[:2]
    assert client.local_address[0] == host


def test_connect_resolves_host_name(sockets: Sockets) -> None:
    """connect() accepts a host name ("localhost") and reaches a server on 127.0.0.1."""
    listener = sockets.listener("127.0.0.1")
    conn = sockets.add(connect("localhost", listener.getsockname()[1], connect_timeout=unit(5)))
    raw = sockets.accept(listener)
    conn.send(b"by name")
    assert recv_frame(raw) == b"by name"


def test_connect_tries_every_address(sockets: Sockets, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the first resolved address refuses, connect() goes on to the next one."""
    listener = sockets.listener("127.0.0.1")
    dead = sockets.dead_address("127.0.0.1")
    live = listener.getsockname()
    tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    calls: list[tuple[Any, ...]] = []

    def fake_getaddrinfo(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append(args)
        return [(*tcp, dead), (*tcp, live)]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    conn = sockets.add(connect("example.invalid", 1, connect_timeout=unit(5)))
    assert calls and calls[0][0] == "example.invalid"
    assert conn.peer_address == live


def test_connect_refused(sockets: Sockets, host: str) -> None:
    """Connecting where nothing listens raises ConnectionRefusedError (an OSError)."""
    dead = sockets.dead_address(host)
    with pytest.raises(ConnectionRefusedError):
        connect(host, dead[1], connect_timeout=unit(5))


def test_connect_raises_last_error_when_all_fail(sockets: Sockets, monkeypatch: pytest.MonkeyPatch) -> None:
    """When every resolved address fails, the last address's error is raised."""
    dead1 = sockets.dead_address()
    dead2 = sockets.dead_address()
    tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(*tcp, dead1), (*tcp, dead2)])
    with pytest.raises(ConnectionRefusedError):
        connect("two.invalid", 1, connect_timeout=unit(5))


def test_connect_name_resolution_error_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that cannot be resolved raises socket.gaierror, unchanged."""

    def fail(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(socket.gaierror):
        connect("no-such-host.invalid", 9898)


def test_connect_timeout(sockets: Sockets) -> None:
    """A connect that gets no answer within connect_timeout raises msgsock.Timeout (a TimeoutError).

    The listener never accepts and has the smallest backlog, so once its queue is full
    Linux drops further SYNs: the connect hangs deterministically on loopback.
    """
    listener = sockets.listener("127.0.0.1", backlog=0)
    address = listener.getsockname()
    for _ in range(8):  # fill the accept queue (1 entry for backlog 0 on Linux)
        probe = sockets.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        probe.settimeout(unit(0.3))
        try:
            probe.connect(address)
        except TimeoutError:
            break
    else:
        pytest.skip("this kernel answers connects beyond the backlog; no way to make one hang")
    start = time.monotonic()
    with pytest.raises(Timeout) as info:
        connect("127.0.0.1", address[1], connect_timeout=unit(0.3))
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < unit(3)


# -- receiving --------------------------------------------------------------------------


def test_receive_timeout_keeps_partial_frame(sockets: Sockets) -> None:
    """A receive that times out mid-frame loses nothing: the rest completes the same message."""
    conn, raw = client_and_raw(sockets)
    body = bytes(range(200))
    frame = encode(body)
    raw.sendall(frame[:70])
    for _ in range(2):
        with pytest.raises(Timeout):
            conn.receive(timeout=unit(0.1))
    raw.sendall(frame[70:])
    assert conn.receive(timeout=unit(5)) == body
    raw.sendall(encode(b"next"))
    assert conn.receive(timeout=unit(5)) == b"next"


def test_receive_timeout_holds_while_bytes_trickle(sockets: Sockets) -> None:
    """A peer trickling bytes of an unfinished frame does not stretch a receive timeout."""
    conn, raw = client_and_raw(sockets)
    raw.sendall(struct.pack(">I", 10_000))
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(unit(0.01)):  # pacing the slow peer, not synchronisation
            try:
                raw.sendall(b"t")
            except OSError:
                return

    sockets.thread(trickle)
    try:
        start = time.monotonic()
        with pytest.raises(Timeout):
            conn.receive(timeout=unit(0.2))
        assert time.monotonic() - start < unit(1.5)
    finally:
        stop.set()


def test_receive_timeout_zero_polls(sockets: Sockets) -> None:
    """receive(timeout=0) returns a message already there and raises Timeout when none is."""
    conn, raw = client_and_raw(sockets)
    with pytest.raises(Timeout):
        conn.receive(timeout=0)
    raw.sendall(encode(b"ready"))
    wait_for(lambda: _readable(conn))
    assert conn.receive(timeout=0) == b"ready"


def _readable(conn: Connection) -> bool:
    import select

    return bool(select.select([conn._sock], [], [], 0)[0])


def test_zero_length_messages(sockets: Sockets) -> None:
    """Empty messages are frames of their own, in both directions."""
    conn, raw = client_and_raw(sockets)
    for _ in range(3):
        conn.send(b"")
    assert recv_exactly(raw, 12) == b"\0" * 12
    raw.sendall(b"\0" * 8 + encode(b"x"))
    assert [conn.receive(unit(5)) for _ in range(3)] == [b"", b"", b"x"]


class SpySocket(socket.socket):
    """A socket that records what it is asked to write."""

    calls: list[tuple[str, list[Any]]]

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        self.calls.append(("sendmsg", list(buffers)))
        return super().sendmsg(buffers, *args)

    def sendall(self, data: Any, *args: Any) -> None:
        self.calls.append(("sendall", [data]))
        super().sendall(data, *args)


def test_one_mib_message_is_written_without_copy(sockets: Sockets) -> None:
    """A 1 MiB body is handed to sendmsg as the caller's object next to its header, not joined."""
    listener = sockets.listener()
    raw_client = sockets.add(socket.create_connection(listener.getsockname(), timeout=unit(5)))
    raw_server = sockets.accept(listener)
    spy = sockets.add(SpySocket(fileno=raw_client.detach()))
    spy.calls = []
    conn = sockets.add(Connection(spy))
    peer = sockets.add(Connection(raw_server))
    body = bytes(range(256)) * 4096
    assert len(body) == 1 << 20
    received: list[bytes] = []
    reader = sockets.thread(lambda: received.append(peer.receive(unit(10))))
    conn.send(body)
    reader.join(unit(10))
    assert received == [body]
    kind, buffers = spy.calls[0]
    assert kind == "sendmsg"
    assert buffers[0] == struct.pack(">I", len(body))
    assert buffers[1] is body


def test_one_mib_message_round_trip(sockets: Sockets, host: str) -> None:
    """A 1 MiB message arrives intact in both directions."""
    client, server = connection_pair(sockets, host)
    body = bytes(range(251)) * 4177 + b"end"
    got: list[bytes] = []

    def echo() -> None:
        message = server.receive(unit(10))
        server.send(message)
        got.append(message)

    thread = sockets.thread(echo)
    client.send(memoryview(body))
    assert client.receive(unit(10)) == body
    thread.join(unit(10))
    assert got == [body]


def test_header_fields(sockets: Sockets) -> None:
    """With a format with extra fields, messages carry .header both ways and a Message echoes its header."""
    fmt = FrameFormat.parse("u32be+kind:B")
    client, server = connection_pair(sockets, frame=fmt)
    client.send(b"typed", {"kind": 7})
    message = server.receive(unit(5))
    assert isinstance(message, Message)
    assert message == b"typed" and message.header == {"kind": 7}
    server.send(message)
    reply = client.receive(unit(5))
    assert reply.header == {"kind": 7} and reply == b"typed"
    client.send(b"default")
    assert server.receive(unit(5)).header == {"kind": 0}


def test_clean_close_at_frame_boundary(sockets: Sockets) -> None:
    """The peer closing after whole frames gives the frames, then ConnectionClosed(clean=True), again and again."""
    conn, raw = client_and_raw(sockets)
    raw.sendall(encode(b"last"))
    raw.close()
    assert conn.receive(unit(5)) == b"last"
    for _ in range(2):
        with pytest.raises(ConnectionClosed) as info:
            conn.receive(unit(5))
        assert info.value.clean


def test_reset_is_unclean(sockets: Sockets) -> None:
    """A peer reset gives ConnectionClosed(clean=False) naming the reset."""
    conn, raw = client_and_raw(sockets)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    with pytest.raises(ConnectionClosed) as info:
        conn.receive(unit(5))
    assert not info.value.clean and info.value.kind is EndKind.RESET
    assert info.value.reason == "connection reset by peer"
    with pytest.raises(ConnectionClosed) as again:
        conn.send(b"after reset")
    assert again.value.kind is EndKind.RESET


def test_eof_mid_frame_is_unclean(sockets: Sockets) -> None:
    """EOF inside a frame gives ConnectionClosed(clean=False) caused by IncompleteMessage."""
    conn, raw = client_and_raw(sockets)
    raw.sendall(struct.pack(">I", 10) + b"abc")
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed) as info:
        conn.receive(unit(5))
    assert not info.value.clean and info.value.kind is EndKind.INCOMPLETE_MESSAGE
    assert isinstance(info.value.__cause__, IncompleteMessage)
    assert info.value.__cause__.received == 7 and info.value.__cause__.expected == 14


def test_oversize_frame_ends_the_connection(sockets: Sockets) -> None:
    """A frame above max_size ends the connection: ConnectionClosed(kind MESSAGE_TOO_LARGE), caused by MessageTooLarge."""
    conn, raw = client_and_raw(sockets, frame=FrameFormat(max_size=100))
    raw.sendall(encode(b"fine"))
    assert conn.receive(unit(5)) == b"fine"
    raw.sendall(struct.pack(">I", 1000))
    with pytest.raises(ConnectionClosed) as info:
        conn.receive(unit(5))
    assert not info.value.clean and info.value.kind is EndKind.MESSAGE_TOO_LARGE
    assert info.value.reason == "message size 1000 exceeds max_size 100"
    cause = info.value.__cause__
    assert isinstance(cause, MessageTooLarge) and (cause.size, cause.max_size) == (1000, 100)
    assert conn.closed
    with pytest.raises(ConnectionClosed) as closed:
        conn.receive(unit(5))
    assert closed.value.kind is EndKind.MESSAGE_TOO_LARGE
    with pytest.raises(ConnectionClosed):
        conn.send(b"x")
    try:
        assert raw.recv(10) == b""
    except ConnectionResetError:
        pass


def test_messages_before_a_bad_frame_are_delivered(sockets: Sockets) -> None:
    """Whole frames that arrive with a bad header are delivered before the connection's end is raised."""
    conn, raw = client_and_raw(sockets, frame=FrameFormat(max_size=100))
    raw.sendall(encode(b"one") + encode(b"two") + struct.pack(">I", 101))
    assert [conn.receive(unit(5)), conn.receive(unit(5))] == [b"one", b"two"]
    with pytest.raises(ConnectionClosed) as info:
        conn.receive(unit(5))
    assert info.value.kind is EndKind.MESSAGE_TOO_LARGE


def test_iteration_until_clean_close(sockets: Sockets) -> None:
    """Iterating a connection yields every message and stops when the peer closes cleanly."""
    conn, raw = client_and_raw(sockets)
    raw.sendall(b"".join(encode(b"m%d" % i) for i in range(5)))
    raw.shutdown(socket.SHUT_WR)
    assert list(conn) == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_iteration_raises_on_abnormal_close(sockets: Sockets) -> None:
    """Iteration raises ConnectionClosed when the stream ends mid-frame."""
    conn, raw = client_and_raw(sockets)
    raw.sendall(encode(b"ok") + b"\0\0")
    raw.shutdown(socket.SHUT_WR)
    seen: list[bytes] = []
    with pytest.raises(ConnectionClosed) as info:
        for message in conn:
            seen.append(message)
    assert seen == [b"ok"] and not info.value.clean


def test_two_receivers_raise_concurrency_error(sockets: Sockets) -> None:
    """A second thread calling receive() while one is blocked in it gets ConcurrencyError."""
    conn, raw = client_and_raw(sockets)
    got: list[bytes] = []
    thread = sockets.thread(lambda: got.append(conn.receive(unit(10))))
    wait_for(conn._recv_lock.locked)
    with pytest.raises(ConcurrencyError):
        conn.receive(unit(1))
    raw.sendall(encode(b"for the first"))
    thread.join(unit(5))
    assert got == [b"for the first"]


# -- sending and threads ----------------------------------------------------------------


def test_concurrent_send_and_receive(sockets: Sockets) -> None:
    """One thread sends while another receives (with timeouts) on the same connection; all echoes match."""
    client, server = connection_pair(sockets)

    def echo() -> None:
        for message in server:
            server.send(message)
        server.close(unit(5))

    sockets.thread(echo)
    bodies = [bytes([i % 256]) * ((i * 7919) % (300 * 1024)) for i in range(120)]
    errors: list[BaseException] = []

    def send_all() -> None:
        try:
            for body in bodies:
                client.send(body)
        except BaseException as exc:
            errors.append(exc)

    sender = sockets.thread(send_all)
    for body in bodies:
        assert client.receive(timeout=unit(10)) == body
    sender.join(unit(10))
    assert not errors
    client.close(unit(5))


def test_receive_timeout_does_not_break_a_concurrent_send(sockets: Sockets) -> None:
    """Receive timeouts bound reads only: a send blocked on a slow reader meanwhile still completes."""
    conn, raw = client_and_raw(sockets)
    body = b"s" * (8 << 20)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            conn.send(body)
        except BaseException as exc:
            errors.append(exc)

    sender = sockets.thread(send)
    wait_for(conn._write_lock.locked)
    for _ in range(3):
        with pytest.raises(Timeout):
            conn.receive(timeout=unit(0.1))
    assert sender.is_alive(), "the 8 MiB send should still be blocked on the unread peer"
    assert recv_frame(raw) == body
    sender.join(unit(10))
    assert not errors


def test_send_too_large_leaves_connection_usable(sockets: Sockets) -> None:
    """Sending a body above max_size raises OversizeMessage (our mistake, not the peer's) before writing anything."""
    conn, raw = client_and_raw(sockets, frame=FrameFormat(max_size=10))
    with pytest.raises(OversizeMessage) as info:
        conn.send(b"x" * 11)
    assert (info.value.size, info.value.max_size) == (11, 10)
    assert not isinstance(info.value, MessageTooLarge)
    conn.send(b"y" * 10)
    assert recv_frame(raw) == b"y" * 10


def test_send_eof_half_close(sockets: Sockets) -> None:
    """After send_eof() the peer sees EOF after our data and can still answer; sending again is InvalidState."""
    client, server = connection_pair(sockets)
    client.send(b"question")
    client.send_eof()
    assert list(server) == [b"question"]
    server.send(b"answer")
    assert client.receive(unit(5)) == b"answer"
    with pytest.raises(InvalidState):
        client.send(b"more")


# -- closing ----------------------------------------------------------------------------


def test_graceful_close(sockets: Sockets) -> None:
    """close() sends everything, then EOF, waits for the peer's EOF, and discards what arrives meanwhile."""
    conn, raw = client_and_raw(sockets)
    peer_got: list[bytes] = []

    def peer() -> None:
        peer_got.append(recv_to_eof(raw))
        raw.sendall(encode(b"too late"))
        raw.close()

    thread = sockets.thread(peer)
    for i in range(3):
        conn.send(b"bye %d" % i)
    start = time.monotonic()
    conn.close(timeout=unit(5))
    assert time.monotonic() - start < unit(4)
    thread.join(unit(5))
    assert peer_got == [b"".join(encode(b"bye %d" % i) for i in range(3))]
    assert conn.closed
    assert conn.discarded == 1
    conn.close()  # idempotent
    with pytest.raises(ConnectionClosed):
        conn.receive(unit(1))
    with pytest.raises(ConnectionClosed):
        conn.send(b"after close")


def test_close_gives_up_after_timeout(sockets: Sockets) -> None:
    """close() resets after its timeout when the peer never closes; the peer saw our EOF first."""
    conn, raw = client_and_raw(sockets)
    start = time.monotonic()
    closer = sockets.thread(lambda: conn.close(timeout=unit(0.3)))
    assert raw.recv(10) == b""  # our EOF, while close() waits for the peer's
    closer.join(unit(5))
    elapsed = time.monotonic() - start
    assert not closer.is_alive() and conn.closed
    assert unit(0.25) <= elapsed < unit(3)
    with pytest.raises(ConnectionClosed) as info:
        conn.receive(timeout=0)
    assert info.value.kind is EndKind.CLOSE_TIMEOUT
    assert info.value.reason == f"close timeout: the connection did not close within {unit(0.3):g} s"


def test_close_wakes_a_blocked_receiver(sockets: Sockets) -> None:
    """A thread blocked in receive() gets ConnectionClosed when another thread closes the connection."""
    conn, _raw = client_and_raw(sockets)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            conn.receive()
        except BaseException as exc:
            errors.append(exc)

    thread = sockets.thread(receive)
    wait_for(conn._recv_lock.locked)
    conn.close(timeout=unit(0.2))
    thread.join(unit(5))
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosed)


def test_abort_resets_the_peer(sockets: Sockets) -> None:
    """abort() closes at once with a reset that the peer sees as ConnectionResetError."""
    conn, raw = client_and_raw(sockets)
    conn.send(b"x")
    assert recv_frame(raw) == b"x"
    conn.abort()
    conn.abort()
    assert conn.closed
    with pytest.raises(ConnectionResetError):
        raw.recv(10)
    with pytest.raises(ConnectionClosed):
        conn.send(b"y")


def test_context_manager_closes(sockets: Sockets) -> None:
    """Leaving the with block closes gracefully: the peer reads the data, then EOF."""
    conn, raw = client_and_raw(sockets)
    with conn:
        conn.send(b"inside")
        raw.shutdown(socket.SHUT_WR)
    assert conn.closed
    assert recv_to_eof(raw) == encode(b"inside")


def test_statistics(sockets: Sockets) -> None:
    """statistics() counts messages and bytes (headers included) each way."""
    client, server = connection_pair(sockets)
    client.send(b"12345")
    client.send(b"")
    server.receive(unit(5))
    server.receive(unit(5))
    server.send(b"abc")
    client.receive(unit(5))
    stats = client.statistics()
    assert (stats.messages_sent, stats.bytes_sent) == (2, 13)
    assert (stats.messages_received, stats.bytes_received) == (1, 7)
    assert server.statistics().messages_received == 2


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A (server, client) pair of SSL contexts sharing a fresh self-signed certificate for 127.0.0.1."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "msgsock test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory: Path = tmp_path_factory.mktemp("tls")
    cert_file = directory / "cert.pem"
    key_file = directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


def test_tls_round_trip_and_timeout(
    sockets: Sockets, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Over TLS, messages round-trip, a receive timeout keeps a partial frame, a half-close keeps receiving, close() ends."""
    server_ctx, client_ctx = tls_contexts
    listener = sockets.listener()
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        raw, _ = listener.accept()
        raw.settimeout(unit(5))
        accepted.append(sockets.add(server_ctx.wrap_socket(raw, server_side=True)))

    thread = sockets.thread(accept)
    conn = sockets.add(
        connect("127.0.0.1", listener.getsockname()[1], ssl=client_ctx, connect_timeout=unit(5))
    )
    thread.join(unit(5))
    peer = accepted[0]
    conn.send(b"secret")
    assert recv_frame(peer) == b"secret"
    frame = encode(b"over tls")
    peer.sendall(frame[:6])
    with pytest.raises(Timeout):
        conn.receive(timeout=unit(0.1))
    peer.sendall(frame[6:])
    assert conn.receive(timeout=unit(5)) == b"over tls"
    conn.send_eof()  # a TLS half-close: close_notify, then our FIN; receiving goes on
    assert peer.recv(10) == b""
    peer.sendall(encode(b"after our eof"))
    assert conn.receive(timeout=unit(5)) == b"after our eof"
    conn.close(timeout=unit(1))
    assert conn.closed


def test_tls_bad_certificate_fails(
    sockets: Sockets, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A server certificate the client does not trust fails connect() with HandshakeError, in OpenSSL's words."""
    server_ctx, _ = tls_contexts
    listener = sockets.listener()

    def accept() -> None:
        raw, _ = listener.accept()
        raw.settimeout(unit(5))
        try:
            sockets.add(server_ctx.wrap_socket(raw, server_side=True))
        except (ssl.SSLError, OSError):
            raw.close()

    sockets.thread(accept)
    with pytest.raises(HandshakeError) as info:
        connect(
            "127.0.0.1", listener.getsockname()[1], ssl=ssl.create_default_context(), connect_timeout=unit(5)
        )
    assert str(info.value).startswith("TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]")
    cause = info.value.__cause__
    assert isinstance(cause, ConnectionClosed) and cause.kind is EndKind.TLS
