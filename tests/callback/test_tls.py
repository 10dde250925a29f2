"""Tests of MessageSocket over TLS and with the shared-key handshake (SPEC §4.2, §5.3, §7).

The peers are the blocking layer's real ``ThreadedServer`` and ``connect()``, so these
also check that the callback layer's pump interoperates with another layer.  Every
failure shows as the core's end: ``on_connect``/``on_close`` with an errno, and a
``ConnectionClosed`` in ``.error`` whose ``kind`` and ``reason`` say what happened.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock.callback import AsyncSocket, MessageSocket, Reactor
from msgsock.exceptions import ConnectionClosed, EndKind, HandshakeError
from msgsock.protocol import Limits
from msgsock.sync import Connection, ThreadedServer, connect
from tests.callback.test_message_socket import Collector
from tests.callback.test_reactor import HOSTS, Recorder, plain_listener
from tests.certs import Pki
from tests.helpers import unit, wait_for

KEY = b"k" * 32
OTHER_KEY = b"o" * 32

ServerFactory = Callable[..., ThreadedServer]


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(name="test-tls-reactor")
    r.start()
    try:
        yield r
    finally:
        r.stop(timeout=unit(5))


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """Start ThreadedServers on port 0; every one is shut down at teardown."""
    servers: list[ThreadedServer] = []

    def factory(*args: Any, **kwargs: Any) -> ThreadedServer:
        kwargs.setdefault("port", 0)
        server = ThreadedServer(*args, **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.shutdown(unit(5))


@pytest.fixture
def cleanup() -> Iterator[list[AsyncSocket | socket.socket]]:
    """Sockets a test opens; closed at the end whatever happens."""
    socks: list[AsyncSocket | socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            if isinstance(s, AsyncSocket):
                s.abort()
            else:
                s.close()


def open_client(
    reactor: Reactor,
    host: str,
    port: int,
    cleanup: list[Any],
    *,
    queued: tuple[bytes, ...] = (),
    **kwargs: Any,
) -> tuple[Collector, Recorder]:
    """A Collector connecting to ``host``:``port`` with the given MessageSocket options.

    ``queued`` messages are sent between ``create()`` and ``connect()``: they are
    surely queued before the handshake, however fast it fails.
    """
    rec = Recorder()
    client = Collector(reactor, rec, **kwargs)
    cleanup.append(client)
    client.create()
    for message in queued:
        client.send_message(message)
    client.connect(host, port)
    return client, rec


def messages(rec: Recorder) -> list[bytes]:
    return [e[1] for e in rec.events if e[0] == "message"]


def server_stats_settled(server: ThreadedServer) -> Any:
    """The server's statistics once no connection is active any more."""
    wait_for(lambda: server.statistics().active == 0, unit(5), message="the server's connections to end")
    return server.statistics()


# -- client side against the blocking server ------------------------------------------------------


def test_tls_round_trip(
    reactor: Reactor, host: str, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """Over TLS, on_connect(0) comes after the handshake and messages queued before it are echoed in order."""
    server = start_server(lambda m: m, host, ssl=pki.server_context())
    client, rec = open_client(reactor, host, server.port, cleanup, ssl=pki.client_context())
    bodies = [b"", b"one", b"two" * 1000, os.urandom(70_000)]
    for body in bodies:
        client.send_message(body)  # before the handshake: held until it completes
    rec.wait_count("message", len(bodies))
    assert rec.events[0] == ("connect", 0)
    assert messages(rec) == bodies
    session = client.ssl_object
    assert session is not None and (session.version() or "").startswith("TLS")
    assert client.handshake_stage is None
    stats = client.statistics()
    assert stats.messages_sent == stats.messages_received == len(bodies)


def test_wrong_ca_fails_connect_with_ssl_error(
    reactor: Reactor, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """A server certificate from an untrusted CA gives on_connect(ECONNABORTED), a TLS end, and nothing is sent."""
    server = start_server(lambda m: m, "127.0.0.1", ssl=pki.server_context())
    client, rec = open_client(
        reactor,
        "127.0.0.1",
        server.port,
        cleanup,
        queued=(b"must not leave",),
        ssl=pki.client_context(ca=pki.other_ca_cert),
    )
    rec.wait_count("connect", 1)
    assert rec.events == [("connect", errno.ECONNABORTED)]
    assert isinstance(client.error, ConnectionClosed) and client.error.kind is EndKind.TLS
    assert client.error.reason.startswith("TLS handshake failed: ")
    assert "certificate verify failed" in client.error.reason
    assert client.handshake_stage == "tls"
    with pytest.raises(ConnectionClosed):
        client.send_message(b"after the failure")
    assert client.wait_closed(unit(5))
    stats = server_stats_settled(server)
    assert (stats.connections, stats.messages_received, stats.errors) == (1, 0, 1)


def test_tls_against_plain_server_fails_in_tls_stage(
    reactor: Reactor, start_server: ServerFactory, pki: Pki, cleanup: list[Any]
) -> None:
    """A TLS client meeting a server that does not speak TLS fails on_connect in the TLS stage, no callback else."""
    server = start_server(lambda m: m, "127.0.0.1")
    client, rec = open_client(reactor, "127.0.0.1", server.port, cleanup, ssl=pki.client_context())
    rec.wait_count("connect", 1)
    [(name, err)] = rec.events
    assert name == "connect" and err in (errno.ECONNABORTED, errno.ECONNRESET)
    assert client.handshake_stage == "tls"
    assert isinstance(client.error, ConnectionClosed) and client.error.kind is EndKind.TLS
    assert "during the TLS handshake" in client.error.reason  # closed or reset by the peer


def test_auth_right_key(reactor: Reactor, host: str, start_server: ServerFactory, cleanup: list[Any]) -> None:
    """With the server's key, the authentication handshake passes and messages are echoed."""
    server = start_server(lambda m: m, host, auth_key=KEY)
    client, rec = open_client(reactor, host, server.port, cleanup, auth_key=KEY)
    client.send_message(b"authenticated")
    rec.wait_count("message", 1)
    assert rec.events == [("connect", 0), ("message", b"authenticated")]
    assert client.ssl_object is None and client.handshake_stage is None


def test_auth_wrong_key(reactor: Reactor, start_server: ServerFactory, cleanup: list[Any]) -> None:
    """With the wrong key, on_connect reports ECONNABORTED and .error says the server rejected our key."""
    server = start_server(lambda m: m, "127.0.0.1", auth_key=KEY)
    client, rec = open_client(
        reactor, "127.0.0.1", server.port, cleanup, queued=(b"never sent",), auth_key=OTHER_KEY
    )
    rec.wait_count("connect", 1)
    assert rec.events == [("connect", errno.ECONNABORTED)]
    assert isinstance(client.error, ConnectionClosed) and client.error.kind is EndKind.AUTHENTICATION
    assert client.error.reason == "authentication failed: the server rejected our key"
    assert client.handshake_stage == "auth"
    stats = server_stats_settled(server)
    assert (stats.messages_received, stats.errors) == (0, 1)


def test_auth_against_server_without_key(
    reactor: Reactor, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """A server without a key drops our hello: on_connect fails with an authentication end."""
    server = start_server(lambda m: m, "127.0.0.1")
    client, rec = open_client(reactor, "127.0.0.1", server.port, cleanup, auth_key=KEY)
    rec.wait_count("connect", 1)
    [(name, err)] = rec.events
    assert name == "connect" and err in (errno.ECONNABORTED, errno.ECONNRESET)  # closed, or reset
    assert isinstance(client.error, ConnectionClosed), repr(client.error)
    assert client.error.kind is EndKind.AUTHENTICATION
    assert "authentication" in client.error.reason


def test_tls_and_auth(
    reactor: Reactor, host: str, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """TLS then the authentication handshake inside it: echoes flow, and a wrong key still fails in the auth stage."""
    server = start_server(lambda m: m, host, ssl=pki.server_context(), auth_key=KEY)
    client, rec = open_client(reactor, host, server.port, cleanup, ssl=pki.client_context(), auth_key=KEY)
    client.send_message(b"secret")
    rec.wait_count("message", 1)
    assert rec.events == [("connect", 0), ("message", b"secret")]
    assert client.ssl_object is not None

    bad, bad_rec = open_client(
        reactor, host, server.port, cleanup, ssl=pki.client_context(), auth_key=OTHER_KEY
    )
    bad_rec.wait_count("connect", 1)
    assert bad_rec.events == [("connect", errno.ECONNABORTED)]
    assert isinstance(bad.error, ConnectionClosed) and bad.error.kind is EndKind.AUTHENTICATION
    assert bad.handshake_stage == "auth"


def test_large_message_over_tls(
    reactor: Reactor, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """A 1 MiB message (many TLS records each way) and the small ones around it arrive intact and in order."""
    server = start_server(lambda m: m, "127.0.0.1", ssl=pki.server_context())
    client, rec = open_client(reactor, "127.0.0.1", server.port, cleanup, ssl=pki.client_context())
    bodies = [b"before", os.urandom(1024 * 1024), b"after", os.urandom(300_000)]
    for body in bodies:
        client.send_message(body)
    rec.wait_count("message", len(bodies), unit(10))
    assert messages(rec) == bodies


def test_graceful_close_over_tls(
    reactor: Reactor, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """close() right after sending: the server gets every message, then close_notify and EOF; no reset, no error."""
    got: list[bytes] = []
    server = start_server(got.append, "127.0.0.1", ssl=pki.server_context())
    limits = Limits(close_timeout=unit(30))  # a timed-out close would reset: it must not come to that
    client, _rec = open_client(
        reactor, "127.0.0.1", server.port, cleanup, ssl=pki.client_context(), limits=limits
    )
    bodies = [f"message {i}".encode() for i in range(100)] + [os.urandom(200_000)]
    for body in bodies:
        client.send_message(body)
    client.close()  # possibly still in the handshake: it completes, the messages go, then the close
    assert client.wait_closed(unit(5))
    stats = server_stats_settled(server)
    assert got == bodies
    assert (stats.connections, stats.errors) == (1, 0), stats.error_kinds


def test_server_close_over_tls_gives_on_close_zero(
    reactor: Reactor, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """A TLS server that sends a message and closes gives on_message, then on_close(0)."""

    def greet(conn: Connection) -> None:
        conn.send(b"bye")

    server = start_server(host="127.0.0.1", connection_handler=greet, ssl=pki.server_context())
    _client, rec = open_client(reactor, "127.0.0.1", server.port, cleanup, ssl=pki.client_context())
    rec.wait_count("close", 1)
    assert rec.events == [("connect", 0), ("message", b"bye"), ("close", 0)]


def test_handshake_timeout(reactor: Reactor, pki: Pki, cleanup: list[Any]) -> None:
    """A peer that accepts and never answers the TLS hello fails on_connect(ETIMEDOUT) after handshake_timeout."""
    listener = plain_listener("127.0.0.1")
    cleanup.append(listener)
    limits = Limits(handshake_timeout=unit(0.3))
    client, rec = open_client(
        reactor, "127.0.0.1", listener.getsockname()[1], cleanup, ssl=pki.client_context(), limits=limits
    )
    peer, _ = listener.accept()
    cleanup.append(peer)
    rec.wait_count("connect", 1)
    assert rec.events == [("connect", errno.ETIMEDOUT)]
    assert isinstance(client.error, ConnectionClosed) and client.error.kind is EndKind.HANDSHAKE_TIMEOUT
    assert (
        client.error.reason == f"handshake timeout: the TLS handshake did not complete within {unit(0.3):g} s"
    )


def test_bad_auth_key_is_refused_at_construction(reactor: Reactor) -> None:
    """A key shorter than 16 bytes raises ValueError when the socket is made, before any I/O."""
    with pytest.raises(ValueError, match="16"):
        MessageSocket(reactor, auth_key=b"short")


# -- server side: accepted MessageSockets ------------------------------------------------------------


class SecureListener(AsyncSocket):
    """Accepts into echoing Collectors with the given MessageSocket options."""

    def __init__(self, reactor: Reactor, rec: Recorder, **options: Any) -> None:
        super().__init__(reactor)
        self.rec = rec
        self.options = options
        self.accepted: list[Collector] = []

    def on_accept(self) -> None:
        conn = Collector(self.reactor, self.rec, echo=True, **self.options)
        self.accepted.append(conn)
        self.accept(conn)


def secure_listener(
    reactor: Reactor, host: str, cleanup: list[Any], **options: Any
) -> tuple[SecureListener, Recorder]:
    rec = Recorder()
    listener = SecureListener(reactor, rec, **options)
    cleanup.append(listener)
    listener.create(0, address=host)
    listener.listen()
    return listener, rec


def test_server_side_tls_and_auth_with_blocking_client(
    reactor: Reactor, host: str, pki: Pki, cleanup: list[Any]
) -> None:
    """An accepted MessageSocket runs the server side of TLS and authentication for the blocking client."""
    listener, rec = secure_listener(reactor, host, cleanup, ssl=pki.server_context(), auth_key=KEY)
    with connect(
        host, listener.sock_name[1], ssl=pki.client_context(), auth_key=KEY, connect_timeout=unit(5)
    ) as conn:
        conn.send(b"ping")
        assert conn.receive(timeout=unit(5)) == b"ping"
    rec.wait_count("close", 1)
    assert rec.events == [("message", b"ping"), ("close", 0)]


def test_callback_client_and_server_over_tls_and_auth(reactor: Reactor, pki: Pki, cleanup: list[Any]) -> None:
    """Both ends on the callback layer: TLS plus authentication, a round trip and a graceful close."""
    listener, server_rec = secure_listener(
        reactor, "127.0.0.1", cleanup, ssl=pki.server_context(), auth_key=KEY
    )
    client, rec = open_client(
        reactor, "127.0.0.1", listener.sock_name[1], cleanup, ssl=pki.client_context(), auth_key=KEY
    )
    client.send_message(b"both ends ours")
    rec.wait_count("message", 1)
    assert rec.events == [("connect", 0), ("message", b"both ends ours")]
    client.close()  # close_notify, then our EOF
    server_rec.wait_count("close", 1)
    assert server_rec.events == [("message", b"both ends ours"), ("close", 0)]
    [conn] = listener.accepted
    conn.close()  # the server's own graceful close ends the client's wait for EOF
    assert client.wait_closed(unit(5))
    assert conn.wait_closed(unit(5))


def test_server_side_wrong_key_closes_with_an_authentication_end(
    reactor: Reactor, cleanup: list[Any]
) -> None:
    """A client with the wrong key gets the rejection; the accepted socket reports on_close(ECONNABORTED) and why."""
    listener, rec = secure_listener(reactor, "127.0.0.1", cleanup, auth_key=KEY)
    with pytest.raises(HandshakeError, match="rejected our key"):
        connect("127.0.0.1", listener.sock_name[1], auth_key=OTHER_KEY, connect_timeout=unit(5))
    rec.wait_count("close", 1)
    assert rec.events == [("close", errno.ECONNABORTED)]
    [conn] = listener.accepted
    assert isinstance(conn.error, ConnectionClosed) and conn.error.kind is EndKind.AUTHENTICATION
    assert conn.error.reason == "authentication failed: the peer does not know the key"
    assert conn.handshake_stage == "auth"


def test_send_from_other_threads_over_tls(
    reactor: Reactor, pki: Pki, start_server: ServerFactory, cleanup: list[Any]
) -> None:
    """Messages handed over by several threads during and after the handshake all arrive, each thread's in order."""
    server = start_server(lambda m: m, "127.0.0.1", ssl=pki.server_context())
    client, rec = open_client(reactor, "127.0.0.1", server.port, cleanup, ssl=pki.client_context())

    def sender(t: int) -> None:
        for i in range(200):
            client.send_message(f"{t}:{i}".encode())

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(unit(5))
    rec.wait_count("message", 800)
    got = messages(rec)
    for t in range(4):
        assert [m for m in got if m.startswith(f"{t}:".encode())] == [f"{t}:{i}".encode() for i in range(200)]
