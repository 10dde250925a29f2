"""Tests of MessageServer, the callback layer's server (SPEC §5.0, §5.3, §6.1, §7).

The peers are plain blocking sockets (and the callback layer's own client for TLS and
authentication); the conformance suite runs the behaviours every server shares.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock.callback import MessageServer, Reactor
from msgsock.exceptions import EndKind
from msgsock.framing import DEFAULT_FORMAT, FrameDecoder, FrameFormat, Message, encode
from msgsock.protocol import Limits
from msgsock.proxy import ProxyInfo, serialize_v1, serialize_v2
from tests.callback.test_message_socket import Collector
from tests.callback.test_reactor import Recorder
from tests.certs import Pki
from tests.helpers import unit, wait_for

KEY = b"k" * 32
LINGER_RESET = struct.pack("ii", 1, 0)
DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR


class Logged:
    """The records of one server's logger, waited on by message."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def lines(self) -> list[tuple[int, str, bool]]:
        return [
            (r.levelno, r.getMessage(), r.exc_info is not None)
            for r in self.caplog.records
            if r.name == "msgsock.server"
        ]

    def wait(self, message: str, level: int) -> tuple[int, str, bool]:
        found: list[tuple[int, str, bool]] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines() if line[1] == message and line[0] == level]
            return bool(found)

        wait_for(seen, unit(10), message=f"log line {message!r}; got {self.lines()}")
        return found[0]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Logged:
    caplog.set_level(logging.DEBUG, logger="msgsock.server")
    return Logged(caplog)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(name="test-server-reactor")
    r.start()
    try:
        yield r
    finally:
        r.stop(timeout=unit(5))


ServerFactory = Callable[..., MessageServer]


@pytest.fixture
def start_server(reactor: Reactor) -> Iterator[ServerFactory]:
    """Start MessageServers on 127.0.0.1:0; each is shut down at teardown."""
    servers: list[MessageServer] = []

    def start(handler: Any = None, **kwargs: Any) -> MessageServer:
        server = MessageServer(reactor, handler, "127.0.0.1", 0, **kwargs)
        server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()
            server.wait_closed(unit(10))


class Peer:
    """A blocking socket to a server that speaks frames."""

    def __init__(self, port: int, frame: FrameFormat = DEFAULT_FORMAT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=unit(10))
        host, local_port = self.sock.getsockname()[:2]
        self.address = f"{host}:{local_port}"
        self.decoder = FrameDecoder(frame)
        self.frame = frame
        self.messages: list[Any] = []

    def send(self, body: bytes, header: dict[str, int] | None = None) -> None:
        self.sock.sendall(self.frame.encode(body, header))

    def receive(self) -> Any:
        while not self.messages:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.messages += self.decoder.feed(data)
        return self.messages.pop(0)

    def read_to_end(self) -> tuple[list[Any], str]:
        """Every message until the end, and how it ended: ``eof`` or ``reset``."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return self.messages, "reset"
            if not data:
                return self.messages, "eof"
            self.messages += self.decoder.feed(data)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    opened: list[Peer] = []

    def open_peer(port: int, frame: FrameFormat = DEFAULT_FORMAT) -> Peer:
        peer = Peer(port, frame)
        opened.append(peer)
        return peer

    try:
        yield open_peer
    finally:
        for peer in opened:
            peer.sock.close()


# -- serving ------------------------------------------------------------------------------------


def test_echo_by_default_with_header_fields(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged
) -> None:
    """Without a handler every message comes back unchanged, header fields included; logged and counted."""
    frame = FrameFormat.parse("u32be+kind:B")
    server = start_server(frame=frame)
    peer = peers(server.port, frame)
    for i in range(3):
        peer.send(b"m%d" % i, {"kind": i})
    got = [peer.receive() for _ in range(3)]
    assert got == [b"m0", b"m1", b"m2"] and [m.header["kind"] for m in got] == [0, 1, 2]
    logged.wait(f"connection from {peer.address}", INFO)
    peer.sock.shutdown(socket.SHUT_WR)
    assert peer.read_to_end() == ([], "eof")
    logged.wait(f"{peer.address} disconnected (3 messages in, 3 out)", INFO)
    stats = server.statistics()
    assert (stats.connections, stats.messages_received, stats.messages_sent, stats.errors) == (1, 3, 3, 0)


def test_handler_replies_and_none_means_no_reply(
    start_server: ServerFactory, peers: Callable[..., Peer]
) -> None:
    """The handler's return value is the reply (a Message keeps its header); None sends nothing."""
    frame = FrameFormat.parse("u32le+kind:B")

    def handler(message: Message) -> Message | None:
        if message == b"quiet":
            return None
        return Message(bytes(message)[::-1], {"kind": message.header["kind"] + 1})

    server = start_server(handler, frame=frame)
    peer = peers(server.port, frame)
    peer.send(b"quiet", {"kind": 0})
    peer.send(b"abc", {"kind": 4})
    reply = peer.receive()
    assert reply == b"cba" and reply.header == {"kind": 5}
    stats = server.statistics()
    assert (stats.messages_received, stats.messages_sent) == (2, 1)


@pytest.mark.parametrize("bad", ["raises", "str"])
def test_a_bad_handler_resets_and_logs_an_error(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged, bad: str
) -> None:
    """A handler that raises (or returns a str) resets that connection, logs the error with its traceback and counts it."""

    def handler(message: bytes) -> Any:
        if message == b"boom":
            if bad == "raises":
                raise ValueError("boom")
            return "not bytes"
        return message

    server = start_server(handler)
    peer = peers(server.port)
    other = peers(server.port)
    peer.send(b"fine")
    assert peer.receive() == b"fine"
    peer.send(b"boom")
    assert peer.read_to_end() == ([], "reset")  # a reset: nothing more is sent
    if bad == "raises":
        reason = "handler raised ValueError: boom"
    else:
        reason = "handler returned str; expected bytes, bytearray, memoryview or None"
    _, _, traceback = logged.wait(f"{peer.address} closed: {reason}", ERROR)
    assert traceback
    other.send(b"unaffected")
    assert other.receive() == b"unaffected"
    stats = server.statistics()
    assert stats.error_kinds == {"handler error": 1}


# -- limits (SPEC §7) ----------------------------------------------------------------------------


def test_idle_timeout_resets_with_the_core_reason(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged
) -> None:
    """Limits(idle_timeout=T): a silent peer is reset, logged ``idle timeout: nothing received for T s``, counted."""
    timeout = unit(1)
    server = start_server(limits=Limits(idle_timeout=timeout))
    peer = peers(server.port)
    peer.send(b"one")
    assert peer.receive() == b"one"
    assert peer.read_to_end() == ([], "reset")
    logged.wait(f"{peer.address} closed: idle timeout: nothing received for {timeout:g} s", WARNING)
    assert server.statistics().error_kinds == {"idle timeout": 1}


def test_traffic_keeps_an_idle_timeout_away(start_server: ServerFactory, peers: Callable[..., Peer]) -> None:
    """Messages arriving more often than idle_timeout keep the connection open past it."""
    timeout = unit(0.5)
    server = start_server(limits=Limits(idle_timeout=timeout))
    peer = peers(server.port)
    for n in range(8):  # 8 messages, timeout/4 apart: twice the timeout in all
        peer.send(b"x%d" % n)
        assert peer.receive() == b"x%d" % n
        time.sleep(timeout / 4)  # the traffic's pace under test, not a synchronization
    assert server.statistics().error_kinds == {}


def test_message_timeout_resets_a_slowloris(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged
) -> None:
    """A frame started and never finished is reset after message_timeout, logged with the core's reason."""
    timeout = unit(0.5)
    server = start_server(limits=Limits(message_timeout=timeout, idle_timeout=None))
    peer = peers(server.port)
    peer.sock.sendall(struct.pack(">I", 100) + b"abc")
    assert peer.read_to_end() == ([], "reset")
    reason = f"message timeout: a frame was not completed within {timeout:g} s (7 bytes of it received)"
    logged.wait(f"{peer.address} closed: {reason}", WARNING)
    assert server.statistics().error_kinds == {"message timeout": 1}


def test_oversize_frame_flushes_the_replies_owed_then_closes(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged
) -> None:
    """A frame above max_size: the replies to the messages before it go out, then the server's EOF."""
    frame = DEFAULT_FORMAT.with_max_size(1024)
    server = start_server(frame=frame)
    peer = peers(server.port, frame)
    peer.sock.sendall(frame.encode(b"owed") + struct.pack(">I", 2048))
    assert peer.read_to_end() == ([b"owed"], "eof")
    logged.wait(f"{peer.address} closed: message size 2048 exceeds max_size 1024", WARNING)
    assert server.statistics().error_kinds == {"message too large": 1}


def test_max_connections_rejects_with_a_reset(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged
) -> None:
    """Over limits.max_connections a new connection is reset at once and logged; the open one goes on."""
    server = start_server(limits=Limits(max_connections=1))
    first = peers(server.port)
    first.send(b"in")
    assert first.receive() == b"in"
    second = socket.socket()
    try:
        second.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{second.getsockname()[1]}"
        # The reset comes at once: during connect() itself, or at the first read.
        with pytest.raises(ConnectionResetError):
            second.settimeout(unit(10))
            second.connect(("127.0.0.1", server.port))
            second.recv(10)
    finally:
        second.close()
    logged.wait(f"{address} rejected: 1 connections open (limit 1)", WARNING)
    first.send(b"still")
    assert first.receive() == b"still"
    stats = server.statistics()
    assert (stats.connections, stats.rejected, stats.errors) == (1, 1, 0)


def test_a_peer_that_does_not_read_stops_being_read(
    start_server: ServerFactory, peers: Callable[..., Peer]
) -> None:
    """A peer that floods without reading its replies makes the server stop reading it (bounded memory)."""
    server = start_server(limits=Limits(write_high_water=64 * 1024, write_low_water=16 * 1024))
    flooder = peers(server.port)
    flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    flooder.sock.settimeout(unit(1))
    chunk = encode(b"f" * 65536) * 16
    sent = 0
    try:
        while sent < 256 * 1024 * 1024:  # bounded: the send blocks once the server stops reading
            flooder.sock.sendall(chunk)
            sent += len(chunk)
    except TimeoutError:
        pass
    received = server.statistics().bytes_received
    assert received < 32 * 1024 * 1024 < sent or received < sent
    other = peers(server.port)
    other.send(b"unaffected")
    assert other.receive() == b"unaffected"
    flooder.reset()


# -- stages ---------------------------------------------------------------------------------------


def test_tls_and_auth_with_the_callback_client(
    reactor: Reactor, start_server: ServerFactory, pki: Pki, logged: Logged
) -> None:
    """TLS then the shared-key handshake, both ends on the callback layer; a wrong key is logged and counted."""
    server = start_server(ssl=pki.server_context(), auth_key=KEY)
    rec = Recorder()
    client = Collector(reactor, rec, ssl=pki.client_context(), auth_key=KEY)
    client.create()
    client.send_message(b"queued before the stages")
    client.connect("127.0.0.1", server.port)
    rec.wait_count("message", 1)
    assert rec.events == [("connect", 0), ("message", b"queued before the stages")]
    client.close()
    assert client.wait_closed(unit(10))

    bad_rec = Recorder()
    bad = Collector(reactor, bad_rec, ssl=pki.client_context(), auth_key=b"w" * 32)
    bad.create()
    bad.connect("127.0.0.1", server.port)
    bad_rec.wait_count("connect", 1)
    assert bad_rec.events == [("connect", errno.ECONNABORTED)]
    assert bad.protocol.end is not None and bad.protocol.end.kind is EndKind.AUTHENTICATION
    wait_for(lambda: server.statistics().errors == 1)
    assert server.statistics().error_kinds == {"authentication": 1}
    lines = [m for level, m, _ in logged.lines() if level == WARNING]
    assert any(m.endswith("closed: authentication failed: the peer does not know the key") for m in lines), (
        lines
    )


def test_proxy_header_names_the_peer_and_local_is_a_health_check(
    start_server: ServerFactory, peers: Callable[..., Peer], logged: Logged
) -> None:
    """Behind a PROXY header the client it names is the logged peer; LOCAL then a reset is a health check."""
    server = start_server(proxy_protocol=True)
    peer = peers(server.port)
    info = ProxyInfo(1, "PROXY", "TCP4", ("203.0.113.7", 40000), ("127.0.0.1", server.port))
    peer.sock.sendall(serialize_v1(info) + encode(b"proxied"))
    assert peer.receive() == b"proxied"
    logged.wait("connection from 203.0.113.7:40000", INFO)
    check = peers(server.port)
    address = check.address
    check.sock.sendall(serialize_v2(ProxyInfo(2, "LOCAL")))
    check.reset()
    logged.wait(f"{address} health check (PROXY LOCAL)", DEBUG)
    stats = server.statistics()
    assert (stats.health_checks, stats.errors) == (1, 0)


# -- shutdown (SPEC §6.1) ----------------------------------------------------------------------------


def test_shutdown_drains_then_ends_cleanly(
    reactor: Reactor, peers: Callable[..., Peer], logged: Logged
) -> None:
    """close() answers what was received, half-closes, waits for the peers; wait_closed() says when it is over."""
    server = MessageServer(reactor, None, "127.0.0.1", 0)
    server.start()
    peer = peers(server.port)
    for i in range(5):
        peer.send(b"r%d" % i)
    assert [peer.receive() for _ in range(5)] == [b"r%d" % i for i in range(5)]
    closer = threading.Thread(target=server.close)  # from any thread
    closer.start()
    closer.join(unit(5))
    with pytest.raises(EOFError):
        peer.receive()  # the server's FIN after every reply
    peer.send(b"late")  # after the shutdown began: discarded, never handled
    assert not server.wait_closed(unit(0.2))  # it waits for the peer's EOF
    peer.sock.shutdown(socket.SHUT_WR)
    assert server.wait_closed(unit(10))
    logged.wait(f"{peer.address} disconnected (5 messages in, 5 out, 1 discarded)", INFO)
    stats = server.statistics()
    assert (stats.messages_received, stats.messages_sent, stats.messages_discarded) == (5, 5, 1)
    assert stats.errors == 0
    assert server.summary() == stats.summary()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=unit(5)).close()


def test_shutdown_deadline_resets_what_is_left(
    reactor: Reactor, peers: Callable[..., Peer], logged: Logged
) -> None:
    """A peer that never closes after the server's FIN is reset at limits.shutdown_timeout, and counted."""
    limits = Limits(shutdown_timeout=unit(0.5))
    server = MessageServer(reactor, None, "127.0.0.1", 0, limits=limits)
    server.start()
    peer = peers(server.port)
    peer.send(b"x")
    assert peer.receive() == b"x"
    server.close()
    assert server.wait_closed(unit(10))
    stats = server.statistics()
    assert stats.error_kinds == {"shutdown deadline": 1}
    logged.wait(
        f"{peer.address} closed: shutdown deadline: still open {unit(0.5):g} s after the server began to stop",
        WARNING,
    )
