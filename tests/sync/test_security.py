"""TLS, authentication and the PROXY protocol on msgsock.sync (ThreadedServer, connect) (SPEC §4.2, §7).

Real loopback sockets.  Clients that must do something the library client does not
(send a PROXY header, stop half-way through a handshake, replay recorded bytes) are
plain sockets driving the sans-I/O cores.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from msgsock import ConnectionClosed, EndKind, HandshakeError, Limits, Timeout
from msgsock.auth import HELLO_SIZE, ClientHandshake, new_nonce
from msgsock.exceptions import Cancelled
from msgsock.protocol import format_address
from msgsock.proxy import (
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    ProxyInfo,
    SslTlv,
    serialize,
    serialize_ssl_tlv,
)
from msgsock.sync import CancelToken, Connection, ThreadedServer, connect
from tests.certs import Pki
from tests.helpers import free_loopback6, unit, wait_for
from tests.tls_helpers import MemoryTls

KEY = b"0123456789abcdef-shared-test-key"
OTHER_KEY = b"fedcba9876543210-another-key"
_ids = itertools.count()

PROXIED = {
    "v1-tcp4": ProxyInfo(1, "PROXY", "TCP4", ("192.0.2.10", 40001), ("198.51.100.1", 9898)),
    "v1-tcp6": ProxyInfo(1, "PROXY", "TCP6", ("2001:db8::10", 40002), ("2001:db8::1", 9898)),
    "v2-tcp4-tlvs": ProxyInfo(
        2,
        "PROXY",
        "TCP4",
        ("192.0.2.20", 40003),
        ("198.51.100.1", 9898),
        {PP2_TYPE_AUTHORITY: b"msgsock.example", PP2_TYPE_UNIQUE_ID: b"req-1", PP2_TYPE_CRC32C: b"\0" * 4},
    ),
    "v2-tcp6-tlvs": ProxyInfo(
        2,
        "PROXY",
        "TCP6",
        ("2001:db8::20", 40004),
        ("2001:db8::1", 9898),
        {
            PP2_TYPE_ALPN: b"msgsock",
            PP2_TYPE_SSL: serialize_ssl_tlv(SslTlv(PP2_CLIENT_SSL, 0, {PP2_SUBTYPE_SSL_VERSION: b"TLSv1.3"})),
        },
    ),
    "v2-local": ProxyInfo(2, "LOCAL"),
}


# -- fixtures and helpers ---------------------------------------------------------------


class LogRecords(logging.Handler):
    """Collects log records and lets a test wait for one that matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def lines(self, level: int | None = None) -> list[str]:
        with self.changed:
            return [r.getMessage() for r in self.records if level is None or r.levelno == level]

    def wait(self, *parts: str, level: int = logging.WARNING) -> logging.LogRecord:
        """Wait for a record of ``level`` whose message holds every one of ``parts``."""
        found: list[logging.LogRecord] = []

        def match() -> bool:
            found[:] = [
                r for r in self.records if r.levelno == level and all(p in r.getMessage() for p in parts)
            ]
            return bool(found)

        with self.changed:
            if not self.changed.wait_for(match, unit(5)):
                raise AssertionError(f"no log line with {parts} in {[r.getMessage() for r in self.records]}")
        return found[0]


class Harness:
    """Servers and sockets of one test, all cleaned up at teardown."""

    def __init__(self) -> None:
        self.log = LogRecords()
        self.logger = logging.getLogger(f"msgsock.test.sync.security.{next(_ids)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self.log)
        self.servers: list[ThreadedServer] = []
        self.items: list[Any] = []

    def server(self, host: str = "127.0.0.1", **kwargs: Any) -> ThreadedServer:
        if "connection_handler" not in kwargs:
            kwargs["handler"] = _echo
        server = ThreadedServer(host=host, port=0, logger=self.logger, **kwargs)
        self.servers.append(server)
        server.start()
        return server

    def add(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def connect(self, server: ThreadedServer, **kwargs: Any) -> Connection:
        conn: Connection = self.add(
            connect(server.address[0], server.port, connect_timeout=unit(5), **kwargs)
        )
        return conn

    def raw(
        self,
        server: ThreadedServer,
        *,
        header: bytes = b"",
        tls: ssl.SSLContext | None = None,
        key: bytes | None = None,
    ) -> socket.socket:
        """A raw client: TCP connect, then a PROXY header, TLS and authentication as asked."""
        host = server.address[0]
        sock: socket.socket = self.add(socket.create_connection((host, server.port), timeout=unit(5)))
        if header:
            sock.sendall(header)
        if tls is not None:
            sock = self.add(tls.wrap_socket(sock, server_hostname=host))
        if key is not None:
            authenticate(sock, key)
        return sock

    def close(self) -> None:
        for item in reversed(self.items):
            try:
                if isinstance(item, Connection):
                    item.abort()
                else:
                    item.close()
            except OSError:
                pass
        for server in self.servers:
            server.shutdown(timeout=unit(1))
        self.logger.removeHandler(self.log)


def _echo(message: bytes) -> bytes:
    return message


@pytest.fixture
def env() -> Iterator[Harness]:
    """A harness whose servers and sockets are closed at teardown."""
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(params=["127.0.0.1", "::1"])
def host(request: pytest.FixtureRequest) -> str:
    """The loopback address to serve on: IPv4, and IPv6 where the machine has it."""
    if request.param == "::1" and not free_loopback6():
        pytest.skip("IPv6 loopback is not available")
    return str(request.param)


def frame(body: bytes) -> bytes:
    """The default frame of ``body``."""
    return struct.pack(">I", len(body)) + body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes (the socket has a timeout)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def read_to_end(sock: socket.socket) -> bytes:
    """Read until EOF (a reset also ends it)."""
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return bytes(data)


def authenticate(sock: socket.socket, key: bytes) -> bytes:
    """The client side of the handshake over a socket; return every byte we sent."""
    handshake = ClientHandshake(key, new_nonce())
    sent = bytearray()
    while True:
        out = handshake.data_to_send()
        if out:
            sent += out
            sock.sendall(out)
        if handshake.done:
            assert handshake.remaining == b""
            return bytes(sent)
        data = sock.recv(4096)
        if not data:
            handshake.receive_eof()
        handshake.receive_data(data)


def echo_ok(sock: socket.socket, body: bytes) -> None:
    """Send one frame and check its echo byte for byte."""
    sock.sendall(frame(body))
    assert recv_exactly(sock, 4 + len(body)) == frame(body)


def local_peer(sock: socket.socket | Connection) -> str:
    """How the server logs this client when it knows no better: its socket address."""
    if isinstance(sock, Connection):
        return format_address(sock.local_address)
    return format_address(sock.getsockname())


def exchange(conn: Connection, bodies: list[bytes]) -> None:
    """Send bodies and check each echo, byte for byte, in order."""
    for body in bodies:
        conn.send(body)
        assert conn.receive(timeout=unit(5)) == body


def silent_listener() -> socket.socket:
    """A listening socket that accepts (in the kernel) and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    return listener


# -- TLS ----------------------------------------------------------------------------------


def test_tls_round_trip(env: Harness, host: str, pki: Pki) -> None:
    """The server's certificate verifies against the test CA; messages round-trip; nothing is logged as a failure."""
    server = env.server(host, ssl=pki.server_context())
    conn = env.connect(server, ssl=pki.client_context())
    exchange(conn, [b"", b"over tls", b"x" * 100_000])
    peer = local_peer(conn)
    conn.close()
    env.log.wait(f"{peer} disconnected (3 messages in, 3 out)", level=logging.INFO)
    assert f"connection from {peer}" in env.log.lines(logging.INFO)
    assert not env.log.lines(logging.WARNING)
    assert server.statistics().errors == 0


def test_mutual_tls(env: Harness, pki: Pki) -> None:
    """A server requiring client certificates refuses a client without one (logged) and serves one with it."""
    context = pki.server_context(client_ca=pki.ca_cert, require_client_cert=True)
    server = env.server(ssl=context)
    # TLS 1.3: the client learns of the refusal on its first read, not in connect().
    with pytest.raises((ssl.SSLError, ConnectionClosed)):
        conn = env.connect(server, ssl=pki.client_context())
        conn.send(b"no certificate")
        conn.receive(timeout=unit(5))
    record = env.log.wait("closed: TLS handshake failed:")
    assert "certificate" in record.getMessage()
    assert record.exc_info is None
    conn = env.connect(server, ssl=pki.client_context(cert="client"))
    exchange(conn, [b"with a certificate"])
    conn.close()
    assert server.statistics().errors == 1


@pytest.mark.parametrize(
    ("cert", "trust", "why"),
    [
        ("server", "other_ca", "unable to get local issuer certificate"),
        ("expired", "ca", "certificate has expired"),
        ("other_server", "ca", "unable to get local issuer certificate"),
    ],
    ids=["wrong-ca", "expired", "untrusted-server"],
)
def test_tls_verification_failures(env: Harness, pki: Pki, cert: str, trust: str, why: str) -> None:
    """A certificate the client cannot trust fails connect() with the reason; the server logs the peer and counts an error."""
    server = env.server(ssl=pki.server_context(cert=cert))
    ca = pki.other_ca_cert if trust == "other_ca" else pki.ca_cert
    with pytest.raises(HandshakeError) as caught:
        env.connect(server, ssl=pki.client_context(ca=ca))
    assert str(caught.value) == (
        f"TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {why}"
    )
    record = env.log.wait("127.0.0.1:", "closed: TLS handshake failed:")
    assert record.exc_info is None
    wait_for(lambda: server.statistics().active == 0)
    stats = server.statistics()
    assert (stats.connections, stats.errors) == (1, 1)
    assert not any("connection from" in line for line in env.log.lines())


def test_plaintext_client_to_tls_port(env: Harness, pki: Pki) -> None:
    """A plain framed client on a TLS port fails; the server logs it with its peer and goes on serving TLS clients."""
    server = env.server(ssl=pki.server_context())
    plain = env.connect(server)
    plain.send(b"hello")
    with pytest.raises(ConnectionClosed) as info:  # the TLS alert read as a frame header, or a reset
        plain.receive(timeout=unit(5))
    assert info.value.kind in (EndKind.MESSAGE_TOO_LARGE, EndKind.RESET, EndKind.CLEAN)
    env.log.wait(f"{local_peer(plain)} closed: TLS handshake failed:")
    conn = env.connect(server, ssl=pki.client_context())
    exchange(conn, [b"still serving"])
    conn.close()
    assert server.statistics().errors == 1


# -- authentication -------------------------------------------------------------------


def test_auth_right_key(env: Harness, host: str) -> None:
    """A client with the server's key is authenticated, then messages round-trip."""
    server = env.server(host, auth_key=KEY)
    conn = env.connect(server, auth_key=KEY)
    exchange(conn, [b"authenticated", b""])
    peer = local_peer(conn)
    conn.close()
    env.log.wait(f"{peer} disconnected (2 messages in, 2 out)", level=logging.INFO)
    assert f"connection from {peer}" in env.log.lines(logging.INFO)
    assert server.statistics().errors == 0


def test_auth_wrong_key(env: Harness) -> None:
    """A wrong key makes connect() raise HandshakeError; the server logs the refusal at warning and counts it."""
    server = env.server(auth_key=KEY)
    with pytest.raises(HandshakeError, match=r"^authentication failed: the server rejected our key$"):
        env.connect(server, auth_key=OTHER_KEY)
    record = env.log.wait("127.0.0.1:", "closed: authentication failed: the peer does not know the key")
    assert record.exc_info is None
    wait_for(lambda: server.statistics().active == 0)
    assert server.statistics().errors == 1
    conn = env.connect(server, auth_key=KEY)  # still serving the right key
    exchange(conn, [b"ok"])


def test_auth_and_tls(env: Harness, pki: Pki) -> None:
    """The handshake runs inside TLS: right key works, wrong key is refused."""
    server = env.server(ssl=pki.server_context(), auth_key=KEY)
    conn = env.connect(server, ssl=pki.client_context(), auth_key=KEY)
    exchange(conn, [b"tls and key"])
    conn.close()
    with pytest.raises(HandshakeError, match="rejected our key"):
        env.connect(server, ssl=pki.client_context(), auth_key=OTHER_KEY)
    env.log.wait("closed: authentication failed: the peer does not know the key")


def test_auth_with_cancel_token(env: Harness) -> None:
    """The cancellable connect authenticates too (non-blocking waits), and reports a wrong key the same way."""
    server = env.server(auth_key=KEY)
    conn = env.connect(server, auth_key=KEY, cancel=CancelToken())
    exchange(conn, [b"cancellable"])
    with pytest.raises(HandshakeError, match="rejected our key"):
        env.connect(server, auth_key=OTHER_KEY, cancel=CancelToken())


def test_auth_cancelled_and_timed_out(env: Harness) -> None:
    """A server that never answers the handshake: a token's cancel() ends connect(), and so does connect_timeout."""
    listener = env.add(silent_listener())
    port = listener.getsockname()[1]
    token = CancelToken()
    timer = threading.Timer(unit(0.2), token.cancel)
    timer.start()
    try:
        with pytest.raises(Cancelled):
            connect("127.0.0.1", port, auth_key=KEY, cancel=token, connect_timeout=unit(10))
    finally:
        timer.cancel()
    start = time.monotonic()
    with pytest.raises(
        Timeout,
        match=r"^connecting to 127\.0\.0\.1:\d+: handshake timeout: the authentication handshake did not complete",
    ):
        connect("127.0.0.1", port, auth_key=KEY, connect_timeout=unit(0.3))
    assert time.monotonic() - start < unit(5)


def test_plain_client_to_auth_server(env: Harness) -> None:
    """A client without a key fails on the server's hello; the server logs that the client does not speak the handshake."""
    server = env.server(auth_key=KEY)
    sock = env.raw(server)
    sock.sendall(frame(b"hello"))
    record = env.log.wait(f"{local_peer(sock)} closed: bad handshake magic")
    assert "does not speak the msgsock authentication handshake" in record.getMessage()
    assert server.statistics().errors == 1
    # The library client without a key sees the server's hello as a bad frame.
    conn = env.connect(server)
    with pytest.raises(ConnectionClosed, match="exceeds max_size") as info:
        conn.receive(timeout=unit(5))
    assert info.value.kind is EndKind.MESSAGE_TOO_LARGE


def test_keyed_client_to_plain_server(env: Harness) -> None:
    """A client with a key meeting a server without one raises HandshakeError saying the server has no key."""
    server = env.server()
    with pytest.raises(HandshakeError, match="before its authentication hello"):
        env.connect(server, auth_key=KEY)
    env.log.wait("exceeds max_size")


def test_truncated_handshake(env: Harness) -> None:
    """A client that sends half its hello and closes is logged with how far it got."""
    server = env.server(auth_key=KEY)
    sock = env.raw(server)
    sock.sendall(ClientHandshake(KEY, new_nonce()).data_to_send()[:20])
    sock.shutdown(socket.SHUT_WR)
    assert len(read_to_end(sock)) == HELLO_SIZE  # the server's hello, then its close
    env.log.wait(f"{local_peer(sock)} closed:", "after 20 of the 45 bytes")
    assert server.statistics().errors == 1


def test_replayed_response_is_rejected(env: Harness) -> None:
    """The bytes of a successful client, replayed on a new connection, are refused (the server's nonce is new)."""
    server = env.server(auth_key=KEY)
    first = env.raw(server)
    recorded = authenticate(first, KEY)
    echo_ok(first, b"genuine")
    replay = env.raw(server)
    replay.sendall(recorded)
    assert read_to_end(replay)[HELLO_SIZE:] == b"\x00"  # the rejection byte, then the close
    env.log.wait(f"{local_peer(replay)} closed: authentication failed")
    assert server.statistics().errors == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"proxy_protocol": True}, "handshake timeout: no PROXY header within"),
        ({"tls": True}, "handshake timeout: the TLS handshake did not complete within"),
        ({"auth_key": KEY}, "handshake timeout: the authentication handshake did not complete within"),
    ],
    ids=["proxy", "tls", "auth"],
)
def test_silent_client_times_out(env: Harness, pki: Pki, options: dict[str, Any], expected: str) -> None:
    """A client that connects and says nothing is closed at the handshake timeout and logged with the stage."""
    timeout = unit(0.3)
    kwargs = dict(options)
    if kwargs.pop("tls", False):
        kwargs["ssl"] = pki.server_context()
    server = env.server(limits=Limits(handshake_timeout=timeout), **kwargs)
    start = time.monotonic()
    sock = env.raw(server)
    read_to_end(sock)
    elapsed = time.monotonic() - start
    env.log.wait(f"{local_peer(sock)} closed: {expected} {timeout:g} s")
    assert timeout * 0.9 <= elapsed < timeout + unit(5)
    assert server.statistics().errors == 1


def test_shutdown_during_handshake(env: Harness) -> None:
    """Shutting the server down drops connections still in their handshake at once, without counting errors."""
    server = env.server(auth_key=KEY, proxy_protocol=True)
    sock = env.raw(server)
    wait_for(lambda: server.statistics().active == 1)
    start = time.monotonic()
    server.shutdown(timeout=unit(5))
    assert time.monotonic() - start < unit(2)
    assert read_to_end(sock) == b""
    env.log.wait("closed during the handshake: server shutting down", level=logging.INFO)
    assert server.statistics().errors == 0
    assert server.statistics().active == 0


# -- PROXY protocol -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROXIED))
def test_proxy_header_gives_the_peer(env: Harness, name: str) -> None:
    """After a valid header the logged peer is the proxied client (the socket's own for LOCAL) and echo works."""
    info = PROXIED[name]
    server = env.server(proxy_protocol=True)
    sock = env.raw(server, header=serialize(info))
    peer = format_address(info.source) if info.source is not None else local_peer(sock)
    echo_ok(sock, b"through the balancer")
    echo_ok(sock, b"")
    sock.shutdown(socket.SHUT_WR)
    assert read_to_end(sock) == b""
    env.log.wait(f"{peer} disconnected (2 messages in, 2 out)", level=logging.INFO)
    # A LOCAL header (a load balancer's own connection) is opened at debug level (serving.py).
    assert f"connection from {peer}" in env.log.lines(
        logging.DEBUG if info.command == "LOCAL" else logging.INFO
    )
    assert server.statistics().errors == 0


def test_proxy_header_frames_in_the_same_write(env: Harness) -> None:
    """Frames sent in the same write as the header are served (the bytes after the header are kept)."""
    server = env.server(proxy_protocol=True)
    sock = env.raw(server, header=serialize(PROXIED["v1-tcp4"]) + frame(b"one") + frame(b"two"))
    assert recv_exactly(sock, 14) == frame(b"one") + frame(b"two")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_proxy_connection_handler_sees_the_client(env: Harness, pki: Pki, host: str, tls: bool) -> None:
    """A per-connection handler gets the proxied client as peer_address and the header as proxy_info."""
    info = PROXIED["v2-tcp6-tlvs"]
    seen: list[Connection] = []

    def handler(conn: Connection) -> None:
        seen.append(conn)
        for message in conn:
            conn.send(message[::-1])

    server = env.server(
        host, proxy_protocol=True, ssl=pki.server_context() if tls else None, connection_handler=handler
    )
    sock = env.raw(server, header=serialize(info), tls=pki.client_context() if tls else None)
    sock.sendall(frame(b"abc"))
    assert recv_exactly(sock, 7) == frame(b"cba")
    (conn,) = seen
    assert conn.peer_address == info.source
    assert conn.proxy_info is not None
    assert (conn.proxy_info.source, conn.proxy_info.tlvs[PP2_TYPE_ALPN]) == (info.source, b"msgsock")


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 TCP4 source address"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unsupported PROXY v1 family"),
        (frame(b"hello"), "bad PROXY header signature"),
        (b"PROXY TCP4 1.2", "connection closed after 14 bytes of a PROXY header"),
    ],
    ids=["bad-address", "bad-family", "missing", "truncated"],
)
def test_bad_proxy_header_is_refused(env: Harness, sent: bytes, reason: str) -> None:
    """A malformed, truncated or missing header closes the connection, logged with the socket's peer and why."""
    server = env.server(proxy_protocol=True)
    sock = env.raw(server)
    sock.sendall(sent)
    sock.shutdown(socket.SHUT_WR)
    assert read_to_end(sock) == b""
    env.log.wait(f"{local_peer(sock)} closed: {reason}")
    good = env.raw(server, header=serialize(PROXIED["v1-tcp4"]))  # others are unaffected
    echo_ok(good, b"fine")
    assert server.statistics().errors == 1


@pytest.mark.parametrize("name", ["v1-tcp4", "v2-tcp6-tlvs", "v2-local"])
def test_proxy_then_tls(env: Harness, pki: Pki, name: str) -> None:
    """A PROXY header in clear, then TLS: the header is not read past, the TLS peer is the proxied client."""
    info = PROXIED[name]
    server = env.server(proxy_protocol=True, ssl=pki.server_context())
    sock = env.raw(server, header=serialize(info), tls=pki.client_context())
    peer = format_address(info.source) if info.source is not None else local_peer(sock)
    echo_ok(sock, b"proxied and encrypted")
    env.log.wait(f"connection from {peer}", level=logging.DEBUG if info.command == "LOCAL" else logging.INFO)


@pytest.mark.parametrize("name", ["v1-tcp4", "v2-tcp4-tlvs"])
def test_proxy_header_and_client_hello_in_one_write(env: Harness, pki: Pki, name: str) -> None:
    """The header and the ClientHello in one segment: the server reads only the header before TLS starts."""
    info = PROXIED[name]
    server = env.server(proxy_protocol=True, ssl=pki.server_context())
    sock = env.raw(server)
    client = MemoryTls(sock, pki.client_context(), "127.0.0.1")
    client.handshake(prefix=serialize(info))
    client.send(frame(b"coalesced"))
    assert client.recv_exactly(13) == frame(b"coalesced")
    env.log.wait(f"connection from {format_address(info.source)}", level=logging.INFO)


def test_proxy_then_tls_failure_logs_the_proxied_peer(env: Harness, pki: Pki) -> None:
    """A TLS failure after a valid header is logged with the proxied client."""
    info = PROXIED["v1-tcp4"]
    server = env.server(proxy_protocol=True, ssl=pki.server_context())
    with pytest.raises(ssl.SSLCertVerificationError):  # the raw test client is an ssl socket
        env.raw(server, header=serialize(info), tls=pki.client_context(ca=pki.other_ca_cert))
    env.log.wait(f"{format_address(info.source)} closed: TLS handshake failed")


def test_proxy_then_auth(env: Harness) -> None:
    """PROXY header then authentication: the right key is served, a wrong one is logged with the proxied client."""
    info = PROXIED["v2-tcp4-tlvs"]
    peer = format_address(info.source)
    server = env.server(proxy_protocol=True, auth_key=KEY)
    good = env.raw(server, header=serialize(info), key=KEY)
    echo_ok(good, b"proxied and authenticated")
    good.close()
    env.log.wait(f"{peer} disconnected (1 messages in, 1 out)", level=logging.INFO)
    with pytest.raises(HandshakeError, match="rejected our key"):
        env.raw(server, header=serialize(info), key=OTHER_KEY)
    env.log.wait(f"{peer} closed: authentication failed: the peer does not know the key")
    assert server.statistics().errors == 1


def test_proxy_tls_and_auth(env: Harness, pki: Pki) -> None:
    """All three stages in order (PROXY, TLS, auth), then frames, with one handshake deadline."""
    info = PROXIED["v1-tcp6"]
    server = env.server(proxy_protocol=True, ssl=pki.server_context(), auth_key=KEY)
    sock = env.raw(server, header=serialize(info), tls=pki.client_context(), key=KEY)
    echo_ok(sock, b"all three")
    env.log.wait(f"connection from {format_address(info.source)}", level=logging.INFO)


def test_short_auth_key_is_refused_at_construction(env: Harness) -> None:
    """A key under 16 bytes is refused when the server or the client is made, before any I/O."""
    with pytest.raises(ValueError, match="at least 16"):
        ThreadedServer(_echo, "127.0.0.1", 0, auth_key=b"short")
    server = env.server()
    with pytest.raises(ValueError, match="at least 16"):
        connect("127.0.0.1", server.port, auth_key=b"short")
