"""Tests of the thread-per-connection server, msgsock.sync.ThreadedServer (SPEC §5.2, §7)."""

from __future__ import annotations

import functools
import itertools
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from msgsock.exceptions import ConnectionClosed, EndKind
from msgsock.framing import FrameFormat, Message, encode
from msgsock.protocol import Limits, format_address
from msgsock.sync import Connection, ServerConnection, ThreadedServer, connect
from tests.helpers import free_loopback6, unit, wait_for

T = TypeVar("T")
_ids = itertools.count()


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

    def messages(self) -> list[str]:
        with self.changed:
            return [r.getMessage() for r in self.records]

    def wait_for(
        self, predicate: Callable[[logging.LogRecord], bool], timeout: float | None = None
    ) -> logging.LogRecord:
        """Return the first record matching ``predicate``, waiting up to ``timeout``."""
        found: list[logging.LogRecord] = []

        def match() -> bool:
            found[:] = [r for r in self.records if predicate(r)]
            return bool(found)

        with self.changed:
            if not self.changed.wait_for(match, unit(5) if timeout is None else timeout):
                raise AssertionError(f"no matching log record in {[r.getMessage() for r in self.records]}")
        return found[0]

    def wait_text(self, *parts: str) -> logging.LogRecord:
        """Wait for a record whose message contains every one of ``parts``."""
        return self.wait_for(lambda r: all(p in r.getMessage() for p in parts))


class Harness:
    """Servers, clients and threads of one test, all cleaned up at teardown."""

    def __init__(self) -> None:
        self.log = LogRecords()
        self.logger = logging.getLogger(f"msgsock.test.sync.{next(_ids)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self.log)
        self.servers: list[ThreadedServer] = []
        self.items: list[Any] = []
        self.threads: list[threading.Thread] = []

    def server(self, handler: Any = None, host: str = "127.0.0.1", **kwargs: Any) -> ThreadedServer:
        server = ThreadedServer(handler, host, 0, logger=self.logger, **kwargs)
        self.servers.append(server)
        server.start()
        return server

    def add(self, item: T) -> T:
        self.items.append(item)
        return item

    def connect(self, server: ThreadedServer, **kwargs: Any) -> Connection:
        host = server.address[0]
        return self.add(connect(host, server.port, connect_timeout=unit(5), **kwargs))

    def raw(self, server: ThreadedServer) -> socket.socket:
        sock = socket.create_connection(server.address[:2], timeout=unit(5))
        return self.add(sock)

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
        for server in self.servers:
            server.shutdown(timeout=unit(1))
        for thread in self.threads:
            thread.join(unit(5))
        self.logger.removeHandler(self.log)


@pytest.fixture
def harness() -> Iterator[Harness]:
    """A Harness torn down (servers shut down, sockets closed) even when the test fails."""
    h = Harness()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(params=[pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")])
def host(request: pytest.FixtureRequest) -> str:
    """A loopback address; IPv6 skips when ::1 cannot be bound."""
    value: str = request.param
    if ":" in value and not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    return value


def echo(message: bytes) -> bytes:
    """The echo handler: the message back, header fields included."""
    return message


def expect_closed(conn: Connection) -> ConnectionClosed:
    """Receive until the connection ends; return how it ended."""
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(1000):
            conn.receive(unit(5))
    return info.value


# -- handlers ---------------------------------------------------------------------------


def test_echo(harness: Harness, host: str) -> None:
    """The echo server returns every message; connect and disconnect are logged with the peer address."""
    server = harness.server(echo, host)
    client = harness.connect(server)
    peer = format_address(client.local_address)
    for body in (b"hello", b"", b"x" * 100_000):
        client.send(body)
        assert client.receive(unit(5)) == body
    client.close(unit(5))
    harness.log.wait_text(f"connection from {peer}")
    record = harness.log.wait_text(f"{peer} disconnected (3 messages in, 3 out)")
    assert record.levelno == logging.INFO


def test_reverse_handler(harness: Harness) -> None:
    """A handler's return value is the reply (the MultiSoc reverse server)."""
    server = harness.server(lambda m: m[::-1])
    client = harness.connect(server)
    client.send(b"stressed")
    assert client.receive(unit(5)) == b"desserts"


def test_handler_returning_none_sends_nothing(harness: Harness) -> None:
    """A handler that returns None sends no reply for that message."""
    server = harness.server(lambda m: None if m == b"quiet" else m.upper())
    client = harness.connect(server)
    client.send(b"quiet")
    client.send(b"loud")
    assert client.receive(unit(5)) == b"LOUD"
    client.send_eof()
    assert expect_closed(client).clean  # nothing came back for b"quiet"


def test_header_fields_are_echoed(harness: Harness) -> None:
    """With extra header fields, ``lambda m: m`` sends each message back with its header."""
    fmt = FrameFormat.parse("u32be+kind:B")
    server = harness.server(echo, frame=fmt)
    client = harness.connect(server, frame=fmt)
    client.send(b"typed", {"kind": 9})
    reply = client.receive(unit(5))
    assert isinstance(reply, Message)
    assert reply == b"typed" and reply.header == {"kind": 9}


def test_connection_handler(harness: Harness) -> None:
    """A connection_handler owns its Connection on the connection's thread."""
    threads: list[str] = []

    def handle(conn: Connection) -> None:
        threads.append(threading.current_thread().name)
        for message in conn:
            conn.send(message.upper())
        conn.send(b"done")

    server = harness.server(connection_handler=handle)
    client = harness.connect(server)
    client.send(b"abc")
    assert client.receive(unit(5)) == b"ABC"
    client.send_eof()
    assert client.receive(unit(5)) == b"done"
    assert expect_closed(client).clean
    harness.log.wait_text("disconnected (1 messages in, 2 out)")
    assert len(threads) == 1 and threads[0] != threading.current_thread().name


def test_exactly_one_handler_required() -> None:
    """Giving both handler kinds, or neither, is a ValueError."""
    with pytest.raises(ValueError):
        ThreadedServer(port=0)
    with pytest.raises(ValueError):
        ThreadedServer(echo, port=0, connection_handler=lambda c: None)


def test_bind_failure_raises_in_constructor(harness: Harness) -> None:
    """An address already in use fails in the constructor, and the real port is known there."""
    server = harness.server(echo)
    assert server.port != 0 and server.address[1] == server.port
    with pytest.raises(OSError):
        ThreadedServer(echo, "127.0.0.1", server.port)


def test_replies_of_one_read_leave_in_one_write(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """All replies to the messages decoded from one read are written with one call (SPEC §8)."""
    server = harness.server(echo)
    reads = 0
    writes: list[int] = []
    original_recv = socket.socket.recv_into
    original_sendall = socket.socket.sendall

    def ours(sock: socket.socket) -> bool:
        try:
            return bool(sock.getsockname()[1] == server.port)
        except OSError:
            return False

    def counting_recv(self: socket.socket, *args: Any) -> int:
        nonlocal reads
        n = original_recv(self, *args)
        if n and ours(self):
            reads += 1
        return n

    def counting_sendall(self: socket.socket, data: Any, *args: Any) -> None:
        if ours(self):
            writes.append(len(data))
        original_sendall(self, data, *args)

    monkeypatch.setattr(socket.socket, "recv_into", counting_recv)
    monkeypatch.setattr(socket.socket, "sendall", counting_sendall)
    raw = harness.raw(server)
    raw.sendall(b"".join(encode(b"msg %d" % i) for i in range(20)))
    expected = b"".join(encode(b"msg %d" % i) for i in range(20))
    received = bytearray()
    while len(received) < len(expected):
        received += raw.recv(65536)
    assert received == expected
    assert 1 <= len(writes) == reads
    assert sum(writes) == len(expected)


# -- limits and failures ----------------------------------------------------------------


def test_oversize_frame_closes_only_that_connection(harness: Harness) -> None:
    """A frame above max_size closes its connection (logged with both sizes and the peer); others go on."""
    fmt = FrameFormat(max_size=1024)
    server = harness.server(echo, frame=fmt)
    good = harness.connect(server, frame=fmt)
    good.send(b"before")
    assert good.receive(unit(5)) == b"before"
    bad = harness.raw(server)
    bad_peer = format_address(bad.getsockname())
    bad.sendall(struct.pack(">I", 1 << 20) + b"x" * 100)
    record = harness.log.wait_text(bad_peer, "exceeds max_size 1024")
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "message size 1048576" in record.getMessage()
    try:
        assert bad.recv(10) == b""
    except ConnectionResetError:
        pass
    bodies = [bytes([i]) * (i * 10) for i in range(1, 50)]
    for body in bodies:
        good.send(body)
    assert [good.receive(unit(5)) for _ in bodies] == bodies
    good.close(unit(5))
    wait_for(lambda: server.statistics().active == 0)
    stats = server.statistics()
    assert stats.errors == 1 and stats.connections == 2


def test_messages_before_a_bad_header_are_answered(harness: Harness) -> None:
    """Frames in the same read as an oversize header get their replies, then the connection closes."""
    fmt = FrameFormat(max_size=100)
    server = harness.server(echo, frame=fmt)
    bad = harness.raw(server)
    bad.sendall(fmt.encode(b"one") + fmt.encode(b"two") + struct.pack(">I", 101))
    expected = fmt.encode(b"one") + fmt.encode(b"two")
    got = bytearray()
    try:
        while chunk := bad.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    assert bytes(got) == expected
    harness.log.wait_text(format_address(bad.getsockname()), "exceeds max_size 100")


def test_connection_cap_rejects_and_logs(harness: Harness) -> None:
    """Beyond min(max_connections, max_threads) a new connection is closed at once and logged."""
    server = harness.server(echo, limits=Limits(max_connections=5, max_threads=2))
    first, second = harness.connect(server), harness.connect(server)
    for conn in (first, second):  # both admitted before the third arrives
        conn.send(b"hi")
        assert conn.receive(unit(5)) == b"hi"
    third = harness.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    third.bind(("127.0.0.1", 0))
    peer = format_address(third.getsockname())
    third.settimeout(unit(5))
    try:  # the reset may even arrive before connect() returns
        third.connect(server.address)
        assert third.recv(10) == b""
    except ConnectionResetError:
        pass
    record = harness.log.wait_text(peer, "rejected", "limit 2")
    assert record.levelno == logging.WARNING
    first.send(b"still here")
    assert first.receive(unit(5)) == b"still here"
    stats = server.statistics()
    assert (stats.rejected, stats.connections, stats.active) == (1, 2, 2)


def test_idle_timeout(harness: Harness) -> None:
    """A connection that sends nothing for idle_timeout is closed and logged; a busy one is not."""
    server = harness.server(echo, limits=Limits(idle_timeout=unit(0.3)))
    idle = harness.connect(server)
    peer = format_address(idle.local_address)
    start = time.monotonic()
    assert not expect_closed(idle).clean
    assert unit(0.25) <= time.monotonic() - start < unit(3)
    record = harness.log.wait_text(peer, "idle timeout")
    assert record.levelno == logging.WARNING and record.exc_info is None
    wait_for(lambda: server.statistics().errors == 1)


def test_message_timeout(harness: Harness) -> None:
    """A frame that starts and does not finish within message_timeout closes the connection (slowloris)."""
    server = harness.server(echo, limits=Limits(idle_timeout=None, message_timeout=unit(0.3)))
    raw = harness.raw(server)
    peer = format_address(raw.getsockname())
    raw.sendall(encode(b"whole"))
    assert raw.recv(100) == encode(b"whole")
    raw.sendall(struct.pack(">I", 100) + b"partial")
    record = harness.log.wait_text(peer, "message timeout")
    assert "7 bytes" in record.getMessage() or "11 bytes" in record.getMessage()
    try:
        assert raw.recv(10) == b""
    except ConnectionResetError:
        pass


def test_trickling_frame_hits_message_timeout(harness: Harness) -> None:
    """Bytes that keep arriving do not extend message_timeout: the frame must complete in time."""
    server = harness.server(echo, limits=Limits(idle_timeout=unit(10), message_timeout=unit(0.4)))
    raw = harness.raw(server)
    peer = format_address(raw.getsockname())
    raw.sendall(struct.pack(">I", 1000))
    for _ in range(100):
        try:
            raw.sendall(b"x")
        except OSError:
            break
        if any("message timeout" in m for m in harness.log.messages()):
            break
        time.sleep(unit(0.05))  # pacing the slowloris peer, not synchronisation
    harness.log.wait_text(peer, "message timeout")


def test_handler_exception_closes_only_that_connection(harness: Harness) -> None:
    """A handler exception closes its own connection and is logged at error with the traceback."""

    def handler(message: bytes) -> bytes:
        if message == b"boom":
            raise ValueError("bad input")
        return message

    server = harness.server(handler)
    victim = harness.connect(server)
    bystander = harness.connect(server)
    peer = format_address(victim.local_address)
    victim.send(b"boom")
    assert not expect_closed(victim).clean
    record = harness.log.wait_text(peer, "ValueError", "bad input")
    assert record.levelno == logging.ERROR and record.exc_info is not None
    bystander.send(b"fine")
    assert bystander.receive(unit(5)) == b"fine"
    wait_for(lambda: server.statistics().errors == 1)


def test_handler_exception_resets_and_is_counted(harness: Harness) -> None:
    """A handler that raises resets its connection (SPEC §5.0): the client sees a reset, the log the core's words."""

    def handler(message: bytes) -> bytes:
        raise ValueError("boom")

    server = harness.server(handler)
    client = harness.connect(server)
    peer = format_address(client.local_address)
    client.send(b"x")
    closed = expect_closed(client)
    assert not closed.clean and closed.kind is EndKind.RESET
    record = harness.log.wait_text(f"{peer} closed: handler raised ValueError: boom")
    assert record.levelno == logging.ERROR and record.exc_info is not None
    wait_for(lambda: server.statistics().active == 0)
    assert server.statistics().error_kinds == {"handler error": 1}


def test_handler_returning_a_wrong_type_resets(harness: Harness) -> None:
    """A handler that returns str (not bytes) resets its connection, logged with the type, counted as a handler error."""
    server = harness.server(lambda m: m.decode())
    client = harness.connect(server)
    peer = format_address(client.local_address)
    client.send(b"text")
    closed = expect_closed(client)
    assert not closed.clean and closed.kind is EndKind.RESET
    record = harness.log.wait_text(
        f"{peer} closed: handler returned str; expected bytes, bytearray, memoryview or None"
    )
    assert record.levelno == logging.ERROR and record.exc_info is not None
    wait_for(lambda: server.statistics().active == 0)
    assert server.statistics().error_kinds == {"handler error": 1}


def test_connection_handler_exception_resets(harness: Harness) -> None:
    """A connection_handler that raises resets its connection and is logged with its traceback."""

    def handle(conn: Connection) -> None:
        conn.send(conn.receive(unit(5)))
        raise RuntimeError("handler bug")

    server = harness.server(connection_handler=handle)
    client = harness.connect(server)
    peer = format_address(client.local_address)
    client.send(b"one")
    assert client.receive(unit(5)) == b"one"
    closed = expect_closed(client)
    assert not closed.clean and closed.kind is EndKind.RESET
    record = harness.log.wait_text(f"{peer} closed: handler raised RuntimeError: handler bug")
    assert record.levelno == logging.ERROR and record.exc_info is not None
    wait_for(lambda: server.statistics().active == 0)
    stats = server.statistics()
    assert stats.error_kinds == {"handler error": 1}
    assert (stats.messages_received, stats.messages_sent) == (1, 1)


def test_peer_reset_and_truncation_are_logged(harness: Harness) -> None:
    """A reset and an EOF mid-frame are each logged as abnormal ends, without traceback."""
    server = harness.server(echo)
    reset = harness.raw(server)
    reset_peer = format_address(reset.getsockname())
    reset.sendall(encode(b"x"))
    assert reset.recv(100) == encode(b"x")
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()
    record = harness.log.wait_text(f"{reset_peer} closed: connection reset by peer")
    assert record.levelno == logging.WARNING and record.exc_info is None
    cut = harness.raw(server)
    cut_peer = format_address(cut.getsockname())
    cut.sendall(struct.pack(">I", 50) + b"half")
    cut.shutdown(socket.SHUT_WR)
    record = harness.log.wait_text(
        f"{cut_peer} closed: stream ended after 8 bytes of 54 of an unfinished frame"
    )
    assert record.levelno == logging.WARNING and record.exc_info is None
    wait_for(lambda: server.statistics().errors == 2)
    assert server.statistics().error_kinds == {"reset": 1, "incomplete message": 1}


# -- shutdown and statistics ------------------------------------------------------------


def test_shutdown_drains_in_flight_messages(harness: Harness) -> None:
    """shutdown() lets a connection finish the message it is handling, then sends EOF and ends cleanly."""
    entered = threading.Event()
    release = threading.Event()

    def handler(message: bytes) -> bytes:
        if message == b"slow":
            entered.set()
            release.wait(unit(10))
        return message.upper()

    server = harness.server(handler)
    client = harness.connect(server)
    client.send(b"quick")
    assert client.receive(unit(5)) == b"QUICK"
    client.send(b"slow")
    assert entered.wait(unit(5))
    stopper = harness.thread(lambda: server.shutdown(timeout=unit(10)))
    wait_for(lambda: server._stop.is_set())
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        wait_for(lambda: _refused(server), unit(5))
        connect("127.0.0.1", server.port, connect_timeout=unit(5))
    release.set()
    assert client.receive(unit(5)) == b"SLOW"
    assert expect_closed(client).clean  # the server's EOF
    client.close(unit(5))
    stopper.join(unit(10))
    assert not stopper.is_alive()
    stats = server.statistics()
    assert (stats.connections, stats.active, stats.errors) == (1, 0, 0)
    assert (stats.messages_received, stats.messages_sent) == (2, 2)
    harness.log.wait_text("disconnected (2 messages in, 2 out)")


class Flooder:
    """A raw client that sends frames as fast as it can on one thread and reads the echoes on another."""

    FRAME = encode(b"f" * 60)
    BATCH = FRAME * 64

    def __init__(self, harness: Harness, server: ThreadedServer) -> None:
        self.sock = harness.raw(server)
        self.sent = 0
        self.echoed = 0
        self.eof = threading.Event()
        self.stop = threading.Event()
        self.sender = harness.thread(self._send)
        harness.thread(self._read)

    def _send(self) -> None:
        while not self.stop.is_set():
            self.sock.sendall(self.BATCH)
            self.sent += 64

    def _read(self) -> None:
        size = len(self.FRAME)
        pending = b""
        while chunk := self.sock.recv(1 << 16):
            pending += chunk
            whole = len(pending) // size
            pending = pending[whole * size :]
            self.echoed += whole
        assert pending == b""
        self.eof.set()

    def finish(self, extra: int) -> None:
        """After the server's EOF: stop flooding, send ``extra`` frames more, then our EOF."""
        assert self.eof.wait(unit(10)), "the server never sent its EOF"
        self.stop.set()
        self.sender.join(unit(10))
        self.sock.sendall(self.FRAME * extra)
        self.sent += extra
        self.sock.shutdown(socket.SHUT_WR)


def test_shutdown_under_load_counts_late_messages_as_discarded(harness: Harness) -> None:
    """Shutdown while a client keeps sending (issue 10 defect 3): messages in == out, what came after our EOF is discarded."""
    server = harness.server(echo)
    flooder = Flooder(harness, server)
    wait_for(lambda: server.statistics().messages_sent > 1000)
    stopper = harness.thread(lambda: server.shutdown(timeout=unit(10)))
    flooder.finish(extra=5)
    stopper.join(unit(15))
    assert not stopper.is_alive()
    stats = server.statistics()
    assert stats.messages_received == stats.messages_sent == flooder.echoed
    assert stats.messages_discarded >= 5
    assert stats.messages_received + stats.messages_discarded == flooder.sent
    assert (stats.errors, stats.active) == (0, 0)
    assert (
        f"{stats.messages_received} messages in / {stats.messages_sent} out ({stats.messages_discarded} discarded)"
        in stats.summary()
    )
    record = harness.log.wait_text(
        f"disconnected ({stats.messages_received} messages in, {stats.messages_sent} out, "
        f"{stats.messages_discarded} discarded)"
    )
    assert record.levelno == logging.INFO


def _receiving(conn: object) -> bool:
    """The server's connection is blocked in receive() (its handler waits for data)."""
    return isinstance(conn, ServerConnection) and conn._recv_lock.locked()


def _writing(conn: object) -> bool:
    """The server's connection is writing (a peer that does not read blocks it there)."""
    return isinstance(conn, ServerConnection) and conn._write_lock.locked()


def _refused(server: ThreadedServer) -> bool:
    try:
        socket.create_connection(server.address[:2], timeout=unit(1)).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # accepted while stopping, and reset
        return False
    return False


def test_shutdown_resets_connections_at_deadline(harness: Harness) -> None:
    """A peer that never closes after the server's EOF is reset at the shutdown deadline."""
    server = harness.server(echo)
    raw = harness.raw(server)
    raw.sendall(encode(b"x"))
    assert raw.recv(100) == encode(b"x")
    start = time.monotonic()
    server.shutdown(timeout=unit(0.3))
    assert time.monotonic() - start < unit(0.3) + 2.0
    try:
        assert raw.recv(100) == b""  # the server's EOF came before the reset
    except ConnectionResetError:
        pass
    record = harness.log.wait_text("shutdown deadline")
    assert record.levelno == logging.WARNING
    stats = server.statistics()
    assert (stats.active, stats.errors) == (0, 1)
    server.shutdown()  # idempotent


def test_shutdown_with_connection_handler(harness: Harness) -> None:
    """shutdown() ends a connection_handler waiting in receive(): the client gets EOF, then all close cleanly."""

    def handle(conn: Connection) -> None:
        for message in conn:
            conn.send(message)

    server = harness.server(connection_handler=handle)
    client = harness.connect(server)
    client.send(b"one")
    assert client.receive(unit(5)) == b"one"
    wait_for(lambda: all(_receiving(p.pump) for p in list(server._sp.connections)))
    stopper = harness.thread(lambda: server.shutdown(timeout=unit(10)))
    assert expect_closed(client).clean
    client.close(unit(5))
    stopper.join(unit(10))
    assert not stopper.is_alive()
    stats = server.statistics()
    assert (stats.active, stats.errors, stats.messages_sent) == (0, 0, 1)


def test_shutdown_wakes_a_connection_blocked_sending(harness: Harness) -> None:
    """A connection stuck writing to a peer that never reads is reset at the shutdown deadline."""
    server = harness.server(echo)
    raw = harness.raw(server)
    chunk = encode(b"z" * (256 * 1024))

    def flood() -> None:
        try:
            for _ in range(64):
                raw.sendall(chunk)
        except OSError:
            pass

    harness.thread(flood)
    wait_for(lambda: any(_writing(p.pump) for p in list(server._sp.connections)))
    start = time.monotonic()
    server.shutdown(timeout=unit(0.3))
    assert time.monotonic() - start < unit(0.3) + 2.0
    assert server.statistics().active == 0
    harness.log.wait_text("shutdown deadline")


def test_serve_forever_returns_after_shutdown(harness: Harness) -> None:
    """serve_forever() blocks until shutdown() from another thread has completed; start() after is refused."""
    server = ThreadedServer(echo, port=0, logger=harness.logger)
    harness.servers.append(server)
    thread = harness.thread(server.serve_forever)
    client = harness.connect(server)
    client.send(b"up")
    assert client.receive(unit(5)) == b"up"
    client.close(unit(0.1))
    shutters = [harness.thread(lambda: server.shutdown(unit(5))) for _ in range(2)]
    for shutter in shutters:
        shutter.join(unit(10))
    thread.join(unit(5))
    assert not thread.is_alive()
    with pytest.raises(Exception, match="shut down"):
        server.start()


def test_context_manager_and_summary(harness: Harness) -> None:
    """The with block starts and shuts down the server; the summary counts connections, messages, bytes."""
    with ThreadedServer(echo, port=0, logger=harness.logger) as server:
        for _ in range(3):
            with connect("127.0.0.1", server.port, connect_timeout=unit(5)) as client:
                client.send(b"12345")
                assert client.receive(unit(5)) == b"12345"
        wait_for(lambda: server.statistics().active == 0)
    stats = server.statistics()
    assert stats.as_dict() == {
        "connections": 3,
        "active": 0,
        "rejected": 0,
        "errors": 0,
        "error_kinds": {},
        "health_checks": 0,
        "messages_received": 3,
        "messages_sent": 3,
        "bytes_received": 27,
        "bytes_sent": 27,
        "messages_discarded": 0,
    }
    assert stats.summary() == (
        "3 connections (0 rejected), 3 messages in / 3 out, 27 bytes in / 27 out, 0 errors"
    )


# -- load -------------------------------------------------------------------------------


def _sizes(rng: random.Random, count: int) -> list[int]:
    """Mostly small sizes, some medium, a few up to 1 MiB."""
    sizes = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.90:
            sizes.append(rng.randint(0, 512))
        elif roll < 0.99:
            sizes.append(rng.randint(513, 64 * 1024))
        else:
            sizes.append(rng.randint(64 * 1024, 1 << 20))
    return sizes


def test_fifty_concurrent_clients(harness: Harness) -> None:
    """50 clients each pipeline 200 messages of 0 B to 1 MiB; every echo comes back byte for byte."""
    clients, per_client = 50, 200
    rng = random.Random(1234)
    pool = rng.randbytes(2 << 20)
    view = memoryview(pool)
    plans = []
    for c in range(clients):
        sizes = _sizes(rng, per_client)
        sizes[c % per_client] = 0
        if c % 10 == 0:
            sizes[(c + 1) % per_client] = 1 << 20
        plans.append([(rng.randrange(0, 1 << 20), size) for size in sizes])
    server = harness.server(echo, limits=Limits(max_connections=100))
    failures: list[str] = []
    done = threading.Semaphore(0)

    def run(plan: list[tuple[int, int]]) -> None:
        try:
            with connect("127.0.0.1", server.port, connect_timeout=unit(10)) as conn:
                # Send from a second thread so a large echo never waits on our own send.
                def send_all() -> None:
                    for off, size in plan:
                        conn.send(view[off : off + size])

                sender = threading.Thread(target=send_all, daemon=True)
                sender.start()
                for i, (off, size) in enumerate(plan):
                    reply = conn.receive(unit(30))
                    if reply != view[off : off + size]:
                        failures.append(f"message {i}: {len(reply)} bytes differ from the {size} sent")
                        return
                sender.join(unit(30))
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            done.release()

    for plan in plans:
        harness.thread(functools.partial(run, plan))
    for _ in plans:
        assert done.acquire(timeout=unit(50)), "a client did not finish"
    assert not failures
    wait_for(lambda: server.statistics().active == 0, unit(10))
    stats = server.statistics()
    total = sum(size for plan in plans for _, size in plan)
    assert stats.connections == clients and stats.errors == 0
    assert stats.messages_received == stats.messages_sent == clients * per_client
    assert stats.bytes_received == stats.bytes_sent == total + 4 * clients * per_client
