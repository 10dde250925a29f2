"""Tests of AsyncSocket's operations and its WSAAsyncSelect notification rules (SPEC §5.3)."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from msgsock.callback import (
    DATAGRAM,
    FD_ACCEPT,
    FD_ALL,
    FD_READ,
    AsyncSocket,
    Event,
    Reactor,
    WouldBlock,
)
from msgsock.exceptions import InvalidState
from tests.callback.test_reactor import HOSTS, Recorder, plain_listener, settle
from tests.helpers import free_loopback6, unit


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(name="test-reactor")
    r.start()
    try:
        yield r
    finally:
        r.stop(timeout=unit(5))


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Probe(AsyncSocket):
    """An AsyncSocket that records every callback; reads as told by ``read_size``."""

    def __init__(self, reactor: Reactor, rec: Recorder, read_size: int | None = 65536) -> None:
        super().__init__(reactor)
        self.rec = rec
        self.read_size = read_size  # None: do not read in on_receive

    def on_accept(self) -> None:
        self.rec.add("accept")

    def on_connect(self, error: int) -> None:
        self.rec.add("connect", error)

    def on_send(self) -> None:
        self.rec.add("send")

    def on_receive(self) -> None:
        if self.read_size is None:
            self.rec.add("receive")
            return
        try:
            data = self.receive(self.read_size)
        except WouldBlock:
            data = None
        self.rec.add("receive", data)

    def on_close(self, error: int) -> None:
        self.rec.add("close", error)

    def on_out_of_band(self) -> None:
        self.rec.add("oob", self.receive(1, socket.MSG_OOB))


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    """Plain sockets a test opens; closed at the end whatever happens."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def connected_pair(
    reactor: Reactor, host: str, peers: list[socket.socket], rec: Recorder, read_size: int | None = 65536
) -> tuple[Probe, socket.socket]:
    """A Probe connected (by connect()) to a plain peer socket; waits for on_connect."""
    listener = plain_listener(host)
    peers.append(listener)
    probe = Probe(reactor, rec, read_size)
    probe.create()
    probe.connect(host, listener.getsockname()[1])
    peer, _ = listener.accept()
    peer.settimeout(unit(5))
    peers.append(peer)
    rec.wait_count("connect", 1)
    return probe, peer


# -- WouldBlock ---------------------------------------------------------------------------------


def test_wouldblock_is_a_blocking_io_error(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """WouldBlock is a BlockingIOError with EAGAIN, raised by receive() when nothing waits."""
    assert issubclass(WouldBlock, BlockingIOError)
    assert issubclass(WouldBlock, OSError)
    rec = Recorder()
    probe, _ = connected_pair(reactor, host, peers, rec)
    with pytest.raises(WouldBlock) as info:
        probe.receive(10)
    assert info.value.errno == errno.EAGAIN


def test_operations_on_an_uncreated_socket_raise_invalid_state(reactor: Reactor) -> None:
    """Using a socket before create() (or after close()) raises InvalidState."""
    s = AsyncSocket(reactor)
    for call in (lambda: s.send(b"x"), lambda: s.receive(), lambda: s.listen(), lambda: s.sock_name):
        with pytest.raises(InvalidState):
            call()
    s.create(0, address="127.0.0.1")
    with pytest.raises(InvalidState):
        s.create()
    with pytest.raises(InvalidState):
        s.send(b"not connected")
    s.close()
    assert s.wait_closed(unit(5))
    with pytest.raises(InvalidState):
        s.connect("127.0.0.1", 9)


# -- accept -----------------------------------------------------------------------------------------


def test_on_accept_is_level_triggered_with_several_pending_connections(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """With three connections waiting, on_accept fires three times when each call accepts one."""
    rec = Recorder()
    accepted: list[AsyncSocket] = []

    class Listener(AsyncSocket):
        def on_accept(self) -> None:
            rec.add("accept")
            accepted.append(self.accept())

    listener = Listener(reactor)
    listener.create(0, address=host)
    listener.listen()
    listener.async_select(0)  # no notifications while the connections pile up
    port = listener.sock_name[1]
    for _ in range(3):
        peers.append(socket.create_connection((host, port), timeout=unit(5)))
    listener.async_select(FD_ALL)
    rec.wait_count("accept", 3)
    settle(reactor)
    assert rec.count("accept") == 3
    assert len(accepted) == 3
    assert all(a.reactor is reactor and not a.closed for a in accepted)
    assert sorted(a.peer_name[1] for a in accepted) == sorted(p.getsockname()[1] for p in peers)


def test_on_accept_waits_for_accept_before_firing_again(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """An on_accept that does not accept is not repeated until accept() is called."""
    rec = Recorder()
    listener = Probe(reactor, rec)
    listener.create(0, address=host)
    listener.listen()
    port = listener.sock_name[1]
    peers.append(socket.create_connection((host, port), timeout=unit(5)))
    peers.append(socket.create_connection((host, port), timeout=unit(5)))
    rec.wait_count("accept", 1)
    settle(reactor)
    assert rec.count("accept") == 1  # connections still wait, but no spin
    conn = listener.accept()  # from this thread: handed to the reactor, re-enables FD_ACCEPT
    assert isinstance(conn, AsyncSocket)
    rec.wait_count("accept", 2)  # the second connection is still waiting
    listener.accept()
    with pytest.raises(WouldBlock):
        listener.accept()


def test_accept_into_a_preconstructed_subclass_object(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """accept(sock) fills the given object (MFC's Accept(CAsyncSocket&)), which gets one on_send."""
    rec = Recorder()
    conn_rec = Recorder()

    class Listener(AsyncSocket):
        def on_accept(self) -> None:
            rec.add("accepted", self.accept(Probe(self.reactor, conn_rec)))

    listener = Listener(reactor)
    listener.create(0, address=host)
    listener.listen()
    peer = socket.create_connection((host, listener.sock_name[1]), timeout=unit(5))
    peers.append(peer)
    rec.wait_count("accepted", 1)
    conn = rec.events[0][1]
    assert isinstance(conn, Probe)
    conn_rec.wait_count("send", 1)
    peer.sendall(b"data")
    conn_rec.wait_for(lambda ev: ("receive", b"data") in ev)
    with pytest.raises(InvalidState):
        listener.accept(conn)  # already holds a socket


# -- connect ------------------------------------------------------------------------------------------


def test_on_connect_success_then_exactly_one_on_send(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """A successful connect gives on_connect(0) then a single on_send."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec)
    rec.wait_count("send", 1)
    settle(reactor)
    assert rec.names() == ["connect", "send"]
    assert rec.events[0] == ("connect", 0)
    assert probe.peer_name[:2] == peer.getsockname()[:2]
    assert probe.sock_name[:2] == peer.getpeername()[:2]


def test_on_connect_reports_connection_refused(reactor: Reactor, host: str) -> None:
    """Connecting to a port that was just closed gives on_connect(ECONNREFUSED) and no on_send."""
    gone = plain_listener(host)
    port = gone.getsockname()[1]
    gone.close()
    rec = Recorder()
    probe = Probe(reactor, rec)
    probe.create()
    probe.connect(host, port)
    rec.wait_count("connect", 1)
    settle(reactor)
    assert rec.events == [("connect", errno.ECONNREFUSED)]
    with pytest.raises(InvalidState):
        probe.send(b"x")
    probe.close()


def test_connect_on_default_socket_switches_family_and_keeps_options(
    reactor: Reactor, peers: list[socket.socket]
) -> None:
    """A socket created with defaults connects to an IPv6 host, replaying options set before."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    rec = Recorder()
    listener = plain_listener("::1")
    peers.append(listener)
    probe = Probe(reactor, rec)
    probe.create()  # IPv4 by default
    probe.set_option(socket.SO_SNDBUF, 32768)
    probe.connect("::1", listener.getsockname()[1])
    rec.wait_count("connect", 1)
    assert rec.events[0] == ("connect", 0)
    peers.append(listener.accept()[0])
    assert ":" in probe.sock_name[0]
    assert probe.get_option(socket.SO_SNDBUF) >= 32768  # type: ignore[operator]


# -- send -------------------------------------------------------------------------------------------


def test_partial_send_arms_on_send_until_the_peer_reads(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Under a full socket buffer send() takes less or raises WouldBlock, and on_send fires
    again only after that, once the peer reads."""
    rec = Recorder()
    chunk = b"x" * 65536
    target = 4 * 1024 * 1024
    sent = [0]

    class Writer(Probe):
        def on_send(self) -> None:
            rec.add("send")
            for _ in range(10_000):  # bounded: target / chunk iterations at most
                if sent[0] >= target:
                    return
                try:
                    n = self.send(chunk[: target - sent[0]])
                except WouldBlock:
                    rec.add("blocked", "wouldblock")
                    return
                sent[0] += n
                if n < len(chunk):
                    rec.add("blocked", "partial")
                    return

    listener = plain_listener(host)
    peers.append(listener)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    writer = Writer(reactor, rec)
    writer.create()
    writer.set_option(socket.SO_SNDBUF, 16384)
    writer.connect(host, listener.getsockname()[1])
    peer, _ = listener.accept()
    peers.append(peer)
    peer.settimeout(unit(5))
    rec.wait_count("blocked", 1)
    settle(reactor)
    assert sent[0] < target  # the peer reads nothing yet: the buffers are full
    received = 0
    for _ in range(100_000):  # bounded; each recv has a timeout
        if received >= target:
            break
        received += len(peer.recv(1 << 20))
    assert received == target
    assert rec.count("send") >= 2
    names = rec.names()
    assert names[:2] == ["connect", "send"]
    for i in range(2, len(names)):
        if names[i] == "send":  # every later on_send follows a blocked send
            assert names[i - 1] == "blocked", names


# -- receive ------------------------------------------------------------------------------------------


def test_on_receive_is_level_triggered_while_data_remains(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """A callback reading one byte per call is called again until every byte is read."""
    rec = Recorder()
    _, peer = connected_pair(reactor, host, peers, rec, read_size=1)
    peer.sendall(b"abcde")
    rec.wait_for(lambda ev: b"".join(e[1] or b"" for e in ev if e[0] == "receive") == b"abcde")
    peer.shutdown(socket.SHUT_WR)
    rec.wait_count("close", 1)
    assert rec.count("receive") == 5
    assert rec.events[-1] == ("close", 0)


def test_on_receive_waits_for_receive_before_firing_again(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """An on_receive that does not read is not repeated until receive() is called (no spin)."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec, read_size=None)
    peer.sendall(b"0123456789")
    rec.wait_count("receive", 1)
    peer.sendall(b"more")
    settle(reactor)
    assert rec.count("receive") == 1
    assert probe.receive(1) == b"0"  # re-enables FD_READ; 13 bytes still wait
    rec.wait_count("receive", 2)
    settle(reactor)
    assert rec.count("receive") == 2


def test_async_select_without_fd_read_stops_on_receive(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Turning FD_READ off with async_select stops on_receive; turning it on brings it back."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec)
    probe.async_select(FD_ALL & ~FD_READ)
    assert probe.events == FD_ALL & ~FD_READ
    peer.sendall(b"quiet")
    settle(reactor)
    assert rec.count("receive") == 0
    probe.async_select(FD_ALL)
    rec.wait_for(lambda ev: ("receive", b"quiet") in ev)


# -- close ------------------------------------------------------------------------------------------


def test_on_close_zero_after_all_data_on_graceful_close(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """A peer's graceful close gives on_close(0), after the data sent before it was read."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec, read_size=2)
    peer.sendall(b"last words")
    peer.close()
    rec.wait_count("close", 1)
    data = b"".join(e[1] or b"" for e in rec.events if e[0] == "receive")
    assert data == b"last words"
    assert rec.events[-1] == ("close", 0)
    assert probe.receive(10) == b""  # the end of stream, as Receive returning 0
    settle(reactor)
    assert rec.count("close") == 1
    probe.close()
    assert probe.wait_closed(unit(5))


def test_on_close_reports_a_reset(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """A peer that resets (SO_LINGER 0) gives on_close(ECONNRESET), once."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    rec.wait_count("close", 1)
    assert rec.events[-1] == ("close", errno.ECONNRESET)
    assert isinstance(probe.error, ConnectionResetError)
    settle(reactor)
    assert rec.count("close") == 1


def test_abort_resets_the_peer(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """abort() closes with SO_LINGER 0, so the peer sees a reset."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec)
    probe.abort()
    assert probe.wait_closed(unit(5))
    with pytest.raises(ConnectionResetError):
        peer.recv(10)


def test_shutdown_send_side_gives_the_peer_eof(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """shutdown() (SHUT_WR) lets the peer read everything sent, then end of stream."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec)
    assert probe.send(b"bye") == 3
    probe.shutdown()
    assert peer.recv(10) == b"bye"
    assert peer.recv(10) == b""


def test_no_callback_after_close(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """After close() no callback runs, even for data that arrives right then."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec)
    rec.wait_count("send", 1)
    probe.close()
    assert probe.wait_closed(unit(5))
    try:
        peer.sendall(b"late")
    except OSError:
        pass
    settle(reactor)
    assert rec.names() == ["connect", "send"]


# -- out-of-band -----------------------------------------------------------------------------------


def test_on_out_of_band_when_urgent_data_arrives(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Urgent data (MSG_OOB) gives on_out_of_band, and receive(1, MSG_OOB) reads it."""
    rec = Recorder()
    _, peer = connected_pair(reactor, host, peers, rec)
    peer.send(b"!", socket.MSG_OOB)
    rec.wait_count("oob", 1)
    assert ("oob", b"!") in rec.events
    peer.sendall(b"normal")
    rec.wait_for(lambda ev: ("receive", b"normal") in ev)
    assert rec.count("oob") == 1


# -- datagrams --------------------------------------------------------------------------------------


def test_datagram_send_to_and_receive_from(reactor: Reactor, host: str) -> None:
    """Datagram sockets exchange datagrams with send_to/receive_from; each gets one on_send."""
    rec = Recorder()

    class Echo(AsyncSocket):
        def on_receive(self) -> None:
            data, address = self.receive_from(2048)
            rec.add("echo-got", data, address)
            self.send_to(data.upper(), address)

    class Client(Probe):
        def on_receive(self) -> None:
            rec.add("client-got", *self.receive_from(2048))

    echo = Echo(reactor)
    echo.create(0, DATAGRAM, host)
    client = Client(reactor, rec)
    client.create(0, DATAGRAM, host)
    rec.wait_count("send", 1)
    assert client.send_to(b"ping", echo.sock_name) == 4
    rec.wait_count("client-got", 1)
    got = next(e for e in rec.events if e[0] == "echo-got")
    assert got[1] == b"ping"
    assert got[2][:2] == client.sock_name[:2]
    back = next(e for e in rec.events if e[0] == "client-got")
    assert back[1] == b"PING"
    assert back[2][:2] == echo.sock_name[:2]
    settle(reactor)
    assert rec.count("send") == 1


def test_connected_datagram_socket_uses_send_and_receive(reactor: Reactor, host: str) -> None:
    """A datagram socket may connect() (on_connect(0) at once) and then send()/receive()."""
    rec = Recorder()
    server = Probe(reactor, Recorder(), read_size=None)
    server.create(0, DATAGRAM, host)
    client = Probe(reactor, rec)
    client.create(0, DATAGRAM, host)
    client.connect(host, server.sock_name[1])
    rec.wait_count("connect", 1)
    assert ("connect", 0) in rec.events
    client.send(b"hello")
    server.rec.wait_count("receive", 1)
    data, address = server.receive_from(100)
    assert data == b"hello"
    server.send_to(b"world", address)
    rec.wait_for(lambda ev: ("receive", b"world") in ev)


# -- errors in callbacks ----------------------------------------------------------------------------


def test_a_raising_callback_closes_its_socket_but_not_the_reactor(
    reactor: Reactor, host: str, peers: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises is logged with its traceback and its socket closed; others go on."""
    rec = Recorder()

    class Faulty(AsyncSocket):
        def on_receive(self) -> None:
            raise RuntimeError("application bug")

    class Listener(AsyncSocket):
        def on_accept(self) -> None:
            rec.add(
                "accepted", self.accept(Faulty(self.reactor) if not rec.events else Probe(self.reactor, rec))
            )

    listener = Listener(reactor)
    listener.create(0, address=host)
    listener.listen()
    port = listener.sock_name[1]
    with caplog.at_level(logging.ERROR, logger="msgsock.callback"):
        first = socket.create_connection((host, port), timeout=unit(5))
        peers.append(first)
        rec.wait_count("accepted", 1)
        faulty = rec.events[0][1]
        first.sendall(b"trigger")
        assert faulty.wait_closed(unit(5))
    assert isinstance(faulty.error, RuntimeError)
    record = next(r for r in caplog.records if r.name == "msgsock.callback" and r.exc_info)
    assert "application bug" in (record.exc_text or "")
    try:
        assert first.recv(10) == b""
    except ConnectionResetError:
        pass  # closed with unread data: the system resets, which is fine too
    second = socket.create_connection((host, port), timeout=unit(5))
    peers.append(second)
    rec.wait_count("accepted", 2)
    second.sendall(b"still alive")
    rec.wait_for(lambda ev: ("receive", b"still alive") in ev)


def test_event_flags_match_winsock_values() -> None:
    """The FD_* flags have Winsock's values and combine as an IntFlag."""
    assert int(Event.READ) == 0x01 and int(Event.CLOSE) == 0x20
    assert FD_ALL == 0x3F
    assert FD_ACCEPT in FD_ALL


def test_send_from_another_thread_runs_on_the_reactor(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """send()/receive() called from other threads are handed to the reactor and work."""
    rec = Recorder()
    probe, peer = connected_pair(reactor, host, peers, rec, read_size=None)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(probe.send(b"abc"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(unit(5))
    assert results == [3, 3, 3, 3]
    got = b""
    for _ in range(100):
        if len(got) >= 12:
            break
        got += peer.recv(100)
    assert got == b"abc" * 4


def test_accept_of_a_connection_reset_in_the_queue_reports_on_close(reactor: Reactor) -> None:
    """A client that resets while still in the accept queue is accepted as open, then on_close(ECONNRESET)."""
    rec = Recorder()

    class Server(AsyncSocket):
        def on_accept(self) -> None:
            conn = Accepted(self.reactor)
            self.accept(conn)
            rec.add("accepted", conn.peer_name[0])

    class Accepted(AsyncSocket):
        def on_receive(self) -> None:
            try:
                self.receive()
            except OSError:
                pass

        def on_close(self, error: int) -> None:
            rec.add("close", error)

    server = Server(reactor)
    server.create(0, address="127.0.0.1")
    server.async_select(FD_ALL & ~FD_ACCEPT)  # hold on_accept until the client has reset
    server.listen()
    client = socket.create_connection(("127.0.0.1", server.sock_name[1]))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # reset while still in the accept queue
    server.async_select(FD_ALL)
    rec.wait_count("close", 1)
    assert ("accepted", "127.0.0.1") in rec.events
    assert ("close", errno.ECONNRESET) in rec.events
    server.close()
