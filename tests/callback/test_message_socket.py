"""Tests of MessageSocket: framing over the callback layer (SPEC §5.3, KB Q185728)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from msgsock.callback import (
    AsyncSocket,
    MessageSocket,
    QueueDispatcher,
    Reactor,
    direct,
)
from msgsock.exceptions import (
    ConnectionClosed,
    EndKind,
    IncompleteMessage,
    InvalidState,
    MessageTooLarge,
    OversizeMessage,
)
from msgsock.framing import FrameDecoder, FrameFormat, Message, encode
from msgsock.protocol import Limits
from tests.callback.test_reactor import HOSTS, Recorder, plain_listener, recv_frames, settle
from tests.helpers import unit, wait_for


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


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    """Plain sockets a test opens; closed at the end whatever happens."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


class Collector(MessageSocket):
    """Records messages and closes; echoes when ``echo`` is set."""

    def __init__(self, reactor: Reactor, rec: Recorder, *, echo: bool = False, **kwargs: Any) -> None:
        super().__init__(reactor, **kwargs)
        self.rec = rec
        self.echo = echo

    def on_connect(self, error: int) -> None:
        self.rec.add("connect", error)

    def on_message(self, message: bytes) -> None:
        self.rec.add("message", message)
        if self.echo:
            self.send_message(message)

    def on_close(self, error: int) -> None:
        self.rec.add("close", error)


def client_to_plain_peer(
    reactor: Reactor, host: str, peers: list[socket.socket], rec: Recorder, **kwargs: Any
) -> tuple[Collector, socket.socket]:
    """A Collector connected to a plain blocking peer socket."""
    listener = plain_listener(host)
    peers.append(listener)
    client = Collector(reactor, rec, **kwargs)
    client.create()
    client.connect(host, listener.getsockname()[1])
    peer, _ = listener.accept()
    peer.settimeout(unit(5))
    peers.append(peer)
    rec.wait_count("connect", 1)
    return client, peer


def recv_until_eof(sock: socket.socket) -> bytes:
    """Read a blocking socket to end of stream."""
    chunks: list[bytes] = []
    for _ in range(1_000_000):  # bounded; each recv has a timeout
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError("no end of stream")


# -- round trips -------------------------------------------------------------------------------------


def test_echo_round_trip_between_two_message_sockets(reactor: Reactor, host: str) -> None:
    """A MessageSocket client and an accepted MessageSocket echo exchange whole messages."""
    rec = Recorder()
    server_rec = Recorder()

    class Listener(AsyncSocket):
        def on_accept(self) -> None:
            self.accept(Collector(self.reactor, server_rec, echo=True))

    listener = Listener(reactor)
    listener.create(0, address=host)
    listener.listen()
    client = Collector(reactor, rec)
    client.create()
    client.connect(host, listener.sock_name[1])
    bodies = [b"", b"x", b"hello" * 1000, os.urandom(300_000)]
    for body in bodies:
        client.send_message(body)  # before the connection completes: queued
    rec.wait_count("message", len(bodies))
    assert [e[1] for e in rec.events if e[0] == "message"] == bodies
    assert rec.events[0] == ("connect", 0)
    stats = client.statistics()
    assert stats.messages_sent == stats.messages_received == len(bodies)


def test_byte_by_byte_peer_gives_whole_messages(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Frames written one byte per send arrive as whole messages (one Receive is not one message)."""
    rec = Recorder()
    _, peer = client_to_plain_peer(reactor, host, peers, rec)
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bodies = [b"first", b"", b"third message"]
    stream = b"".join(encode(b) for b in bodies)
    for i in range(len(stream)):
        peer.sendall(stream[i : i + 1])
    rec.wait_count("message", 3)
    assert [e[1] for e in rec.events if e[0] == "message"] == bodies


def test_many_frames_in_one_write(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """Hundreds of frames in one write each become one on_message, in order."""
    rec = Recorder()
    _, peer = client_to_plain_peer(reactor, host, peers, rec)
    bodies = [f"message {i}".encode() for i in range(500)]
    peer.sendall(b"".join(encode(b) for b in bodies))
    rec.wait_count("message", 500)
    assert [e[1] for e in rec.events if e[0] == "message"] == bodies


def test_extra_header_fields_round_trip(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """With a frame format with extra fields, messages carry .header both ways."""
    fmt = FrameFormat.parse("u32le+kind:B")
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec, frame=fmt)
    client.send_message(b"typed", header={"kind": 7})
    [frame] = recv_frames(peer, 1, fmt.decoder())
    assert isinstance(frame, Message)
    assert frame == b"typed" and frame.header == {"kind": 7}
    peer.sendall(fmt.encode(b"back", {"kind": 9}))
    rec.wait_count("message", 1)
    message = rec.events[-1][1]
    assert isinstance(message, Message)
    assert message == b"back" and message.header == {"kind": 9}


# -- sending: partial writes, threads, closing ---------------------------------------------------------


def test_big_message_to_a_slow_peer_loses_no_bytes(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Messages larger than the socket buffers, to a peer that reads late, arrive intact (KB Q185728)."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    bodies = [os.urandom(3 * 1024 * 1024), b"after", os.urandom(1024 * 1024)]
    for body in bodies:
        client.send_message(body)
    settle(reactor)
    assert client.outgoing_size > 0  # the kernel took only part: the rest waits in the socket
    assert recv_frames(peer, 3) == bodies
    settle(reactor)
    assert client.outgoing_size == 0


def test_close_after_big_message_delivers_everything_then_eof(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """close() right after send_message of a big message: the peer gets all of it, then EOF."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    body = os.urandom(8 * 1024 * 1024)
    client.send_message(body)
    client.close()  # from this (non-reactor) thread
    with pytest.raises(InvalidState):
        client.send_message(b"too late")
    data = recv_until_eof(peer)
    assert FrameDecoder().feed(data) == [body]
    peer.close()
    assert client.wait_closed(unit(5))
    settle(reactor)
    assert rec.names() == ["connect"]  # no callback after close()


def test_close_while_connecting_sends_queued_messages_first(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """send_message and close() right after connect(): the messages go out once connected, then EOF."""
    listener = plain_listener(host)
    peers.append(listener)
    client = Collector(reactor, Recorder())
    client.create()
    client.connect(host, listener.getsockname()[1])
    client.send_message(b"one")
    client.send_message(b"two")
    client.close()
    peer, _ = listener.accept()
    peers.append(peer)
    peer.settimeout(unit(5))
    assert FrameDecoder().feed(recv_until_eof(peer)) == [b"one", b"two"]
    peer.close()
    assert client.wait_closed(unit(5))


def test_a_peer_that_does_not_read_pauses_reading(host: str, peers: list[socket.socket]) -> None:
    """Above write_high_water the echo stops reading, so its buffer stays bounded (SPEC §7)."""
    limits = Limits(write_high_water=65536, write_low_water=16384)
    accepted: list[MessageSocket] = []

    class Listener(AsyncSocket):
        def on_accept(self) -> None:
            collector = Collector(self.reactor, Recorder(), echo=True, limits=limits)
            self.accept(collector)
            accepted.append(collector)

    frames = [b"%08d" % i + b"." * 1016 for i in range(32 * 1024)]  # 32 MiB: more than the kernel buffers
    stream = b"".join(encode(f) for f in frames)
    with Reactor() as reactor:
        listener = Listener(reactor)
        listener.create(0, address=host)
        listener.listen()
        peer = socket.create_connection((host, listener.sock_name[1]), timeout=unit(10))
        peers.append(peer)
        sender = threading.Thread(target=peer.sendall, args=(stream,))
        sender.start()
        try:
            wait_for(lambda: accepted and accepted[0].outgoing_size > limits.write_high_water)
            settle(reactor)
            # Without the pause the echo would read the whole flood and queue most of it.
            assert accepted[0].outgoing_size < 1024 * 1024
            assert recv_frames(peer, len(frames)) == frames
        finally:
            sender.join(unit(10))


def test_graceful_close_gives_up_after_close_timeout(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """A graceful close whose peer never sends EOF ends by a reset after limits.close_timeout."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec, limits=Limits(close_timeout=unit(0.3)))
    client.send_message(b"bye")
    client.close()
    assert recv_frames(peer, 1) == [b"bye"]
    assert peer.recv(10) == b""  # our half-close arrived; the peer keeps its side open
    assert client.wait_closed(unit(5))
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        for _ in range(100):  # bounded: the reset is noticed on the first write or two
            peer.sendall(b"x" * 65536)


def test_send_message_from_many_threads_keeps_frames_whole_and_ordered(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Concurrent send_message calls from many threads: every frame intact, each thread's in order."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    threads_n, per_thread = 8, 300
    start = threading.Barrier(threads_n)

    def sender(t: int) -> None:
        start.wait(unit(5))
        for i in range(per_thread):
            client.send_message(f"{t}:{i}:".encode() + bytes([t]) * (i % 50))

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    frames = recv_frames(peer, threads_n * per_thread)
    for thread in threads:
        thread.join(unit(5))
    seen: dict[int, list[int]] = {t: [] for t in range(threads_n)}
    for frame in frames:
        t_s, i_s, rest = frame.split(b":", 2)
        t, i = int(t_s), int(i_s)
        assert rest == bytes([t]) * (i % 50)
        seen[t].append(i)
    assert all(seen[t] == list(range(per_thread)) for t in range(threads_n))


def test_raw_send_and_receive_are_refused(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """A MessageSocket refuses raw send()/receive(), which would break the framing."""
    rec = Recorder()
    client, _ = client_to_plain_peer(reactor, host, peers, rec)
    with pytest.raises(InvalidState):
        client.send(b"raw")
    with pytest.raises(InvalidState):
        client.receive()


def test_oversize_message_is_refused_before_sending(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """send_message above max_size raises OversizeMessage (our mistake), from any thread, and sends nothing."""
    rec = Recorder()
    client, _ = client_to_plain_peer(reactor, host, peers, rec, frame=FrameFormat(max_size=10))
    with pytest.raises(OversizeMessage):
        client.send_message(b"x" * 11)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            client.send_message(b"y" * 11)
        except OversizeMessage as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(unit(5))
    assert len(errors) == 1
    assert client.outgoing_size == 0


# -- the peer ending the connection ---------------------------------------------------------------------


def test_peer_graceful_close_gives_on_close_zero(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Messages before the peer's FIN are delivered, then on_close(0); we may still reply."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    peer.sendall(encode(b"request"))
    peer.shutdown(socket.SHUT_WR)
    rec.wait_count("close", 1)
    assert rec.events[1:] == [("message", b"request"), ("close", 0)]
    client.send_message(b"reply")  # half-closed: our side still sends
    client.close()
    assert FrameDecoder().feed(recv_until_eof(peer)) == [b"reply"]
    assert client.wait_closed(unit(5))


def test_peer_reset_gives_on_close_with_errno(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """A peer reset gives on_close(ECONNRESET) and closes the socket; send_message then fails with the same end."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    rec.wait_count("close", 1)
    assert rec.events[-1] == ("close", errno.ECONNRESET)
    assert client.wait_closed(unit(5))
    assert isinstance(client.error, ConnectionClosed) and client.error.kind is EndKind.RESET
    assert isinstance(client.error.__cause__, ConnectionResetError)
    with pytest.raises(ConnectionClosed) as info:
        client.send_message(b"anyone?")
    assert info.value.kind is EndKind.RESET and not info.value.clean


def test_protocol_error_closes_with_eproto(reactor: Reactor, host: str, peers: list[socket.socket]) -> None:
    """A frame length above max_size closes the socket with on_close(EPROTO); .error says why."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec, frame=FrameFormat(max_size=100))
    peer.sendall(encode(b"fine"))
    rec.wait_count("message", 1)
    peer.sendall(struct.pack(">I", 101))
    rec.wait_count("close", 1)
    assert rec.events[1:] == [("message", b"fine"), ("close", errno.EPROTO)]
    assert isinstance(client.error, ConnectionClosed)
    assert client.error.kind is EndKind.MESSAGE_TOO_LARGE
    assert client.error.reason == "message size 101 exceeds max_size 100"
    assert isinstance(client.error.__cause__, MessageTooLarge)
    assert client.wait_closed(unit(5))


def test_messages_before_a_bad_header_in_one_write_are_delivered(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """Whole frames sent in the same write as a bad header reach on_message before on_close(EPROTO)."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec, frame=FrameFormat(max_size=100))
    peer.sendall(encode(b"one") + encode(b"two") + struct.pack(">I", 101))
    rec.wait_count("close", 1)
    assert rec.events[1:] == [("message", b"one"), ("message", b"two"), ("close", errno.EPROTO)]
    assert isinstance(client.error, ConnectionClosed)
    assert client.error.kind is EndKind.MESSAGE_TOO_LARGE


def test_stream_ending_mid_frame_closes_with_eproto(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """EOF in the middle of a frame is a protocol error: on_close(EPROTO), IncompleteMessage."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    peer.sendall(encode(b"complete") + encode(b"incomplete")[:7])
    peer.shutdown(socket.SHUT_WR)
    rec.wait_count("close", 1)
    assert rec.events[-1] == ("close", errno.EPROTO)
    assert isinstance(client.error, ConnectionClosed)
    assert client.error.kind is EndKind.INCOMPLETE_MESSAGE
    assert isinstance(client.error.__cause__, IncompleteMessage)


# -- dispatcher: a sleeping UI thread does not stall the reactor ------------------------------------------


def test_blocked_dispatcher_does_not_delay_other_sockets(host: str, peers: list[socket.socket]) -> None:
    """While one socket's dispatcher thread sleeps in a callback, the reactor keeps receiving
    and acknowledging another socket's messages (KB Q192570)."""
    ui = QueueDispatcher()
    slow_started = threading.Event()
    slow_done = threading.Event()
    slow_messages: list[bytes] = []

    class Slow(MessageSocket):
        def on_message(self, message: bytes) -> None:
            slow_messages.append(message)
            if not slow_started.is_set():
                slow_started.set()
                time.sleep(unit(1))  # the blocked UI thread under test, not a synchronization
                slow_done.set()

    class Acker(MessageSocket):
        def on_message(self, message: bytes) -> None:
            self.send_message(b"ack " + message)

    class Listener(AsyncSocket):
        def __init__(self, reactor: Reactor, kind: type[MessageSocket]) -> None:
            super().__init__(reactor, dispatcher=direct)
            self.kind = kind

        def on_accept(self) -> None:
            conn = self.kind(self.reactor)
            if self.kind is Acker:
                conn.dispatcher = direct  # keep the acknowledgements on the reactor thread
            self.accept(conn)

    consumer = threading.Thread(target=ui.run_forever, kwargs={"timeout": unit(10)}, name="ui")
    consumer.start()
    try:
        with Reactor(dispatcher=ui) as reactor:
            slow_listener = Listener(reactor, Slow)
            slow_listener.create(0, address=host)
            slow_listener.listen()
            fast_listener = Listener(reactor, Acker)
            fast_listener.create(0, address=host)
            fast_listener.listen()
            slow_peer = socket.create_connection((host, slow_listener.sock_name[1]), timeout=unit(5))
            peers.append(slow_peer)
            fast_peer = socket.create_connection((host, fast_listener.sock_name[1]), timeout=unit(5))
            peers.append(fast_peer)
            slow_peer.sendall(encode(b"block the ui"))
            assert slow_started.wait(unit(5))
            slow_peer.sendall(encode(b"queued behind it"))
            decoder = FrameDecoder()
            for i in range(20):  # request/acknowledge round trips on the other socket
                fast_peer.sendall(encode(b"%d" % i))
                assert recv_frames(fast_peer, 1, decoder) == [b"ack %d" % i]
            assert not slow_done.is_set(), "the acknowledgements waited for the sleeping dispatcher"
            assert slow_done.wait(unit(5))
            for _ in range(2):  # the second message, received meanwhile, is delivered next
                if len(slow_messages) == 2:
                    break
                ui_idle = threading.Event()
                ui(ui_idle.set)
                assert ui_idle.wait(unit(5))
            assert slow_messages == [b"block the ui", b"queued behind it"]
    finally:
        ui.stop()
        consumer.join(unit(5))


def test_detach_with_pending_output_is_refused(
    reactor: Reactor, host: str, peers: list[socket.socket]
) -> None:
    """detach() of a MessageSocket with unsent bytes raises InvalidState instead of losing them."""
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, host, peers, rec)
    client.send_message(os.urandom(4 * 1024 * 1024))
    settle(reactor)
    with pytest.raises(InvalidState):
        client.detach()
    assert len(recv_frames(peer, 1)[0]) == 4 * 1024 * 1024
    settle(reactor)
    raw = client.detach()
    try:
        assert client.closed
        assert raw.getpeername() == peer.getsockname()
    finally:
        raw.close()
