"""msgsock.aio.connect() and Connection over real loopback sockets (SPEC §5.1, §7, §9)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from msgsock import (
    ConcurrencyError,
    ConnectionClosed,
    EndKind,
    FrameFormat,
    IncompleteMessage,
    InvalidState,
    Limits,
    Message,
    MessageTooLarge,
    OversizeMessage,
    aio,
)
from msgsock.aio.connection import READ_BUFFER_SIZE
from tests.helpers import free_loopback6, unit

T = TypeVar("T")

LOOPS = ["asyncio", "uvloop"]


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@pytest.fixture(params=LOOPS)
def any_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    """An asyncio.Runner on the stock event loop and on uvloop."""
    with asyncio.Runner(loop_factory=_loop_factory(request.param)) as runner:
        yield runner


@pytest.fixture
def stock_loop() -> Iterator[asyncio.Runner]:
    """An asyncio.Runner on the stock event loop."""
    with asyncio.Runner() as runner:
        yield runner


def run(runner: asyncio.Runner, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run ``coro`` on ``runner`` with an overall (scaled) deadline."""
    return runner.run(asyncio.wait_for(coro, unit(timeout)))


async def wait_until(predicate: Callable[[], object], timeout: float | None = None) -> None:
    """Wait for a condition, checking it on every loop turn and then with short pauses."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (timeout if timeout is not None else unit(5))
    delay = 0.0
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(delay)
        delay = min(delay * 2 + 0.001, 0.05)


def frame(body: bytes) -> bytes:
    """The default frame of ``body``: 4-byte big-endian length, then the body."""
    return struct.pack(">I", len(body)) + body


class RawPeer:
    """A plain non-blocking socket on the other end of a Connection, driven by the loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv_exactly(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = await self.loop.sock_recv(self.sock, min(n - len(chunks), 1 << 20))
            if not chunk:
                raise AssertionError(f"EOF after {len(chunks)} of {n} bytes")
            chunks += chunk
        return bytes(chunks)

    async def recv_frame(self) -> bytes:
        (size,) = struct.unpack(">I", await self.recv_exactly(4))
        return await self.recv_exactly(size)

    async def recv_until_eof(self) -> bytes:
        data = bytearray()
        while chunk := await self.loop.sock_recv(self.sock, 1 << 16):
            data += chunk
        return bytes(data)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def raw_pair(
    host: str = "127.0.0.1", *, rcvbuf: int | None = None, **connect_kwargs: Any
) -> tuple[aio.Connection, RawPeer, socket.socket]:
    """A msgsock Connection to a plain listening socket; returns (conn, peer, listener)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:  # inherited by the accepted socket
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind((host, 0))
        listener.listen()
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        accepted = loop.create_task(loop.sock_accept(listener))
        conn = await aio.connect(host, listener.getsockname()[1], **connect_kwargs)
        sock, _ = await accepted
    except BaseException:
        listener.close()
        raise
    sock.setblocking(False)
    return conn, RawPeer(sock), listener


class RawPair:
    """Async context manager around :func:`raw_pair` that always closes everything."""

    def __init__(self, host: str = "127.0.0.1", **kwargs: Any) -> None:
        self.host = host
        self.kwargs = kwargs

    async def __aenter__(self) -> tuple[aio.Connection, RawPeer]:
        self.conn, self.peer, self.listener = await raw_pair(self.host, **self.kwargs)
        return self.conn, self.peer

    async def __aexit__(self, *exc: object) -> None:
        self.conn.abort()
        self.peer.sock.close()
        self.listener.close()
        await self.conn.wait_closed()


async def echo_round_trips(host: str, bodies: list[bytes], **kwargs: Any) -> None:
    """Send each body to an echo server on ``host`` and check the replies and statistics."""
    async with await aio.serve(host=host, port=0, **kwargs) as server:
        conn = await aio.connect(host, server.port, **kwargs)
        try:
            assert conn.peer_address[1] == server.port
            for body in bodies:
                await conn.send(body)
                assert await conn.receive() == body
            stats = conn.statistics()
            assert stats.messages_sent == stats.messages_received == len(bodies)
            assert stats.bytes_sent == stats.bytes_received == sum(len(b) + 4 for b in bodies)
        finally:
            await conn.close()
        assert conn.closed


BODIES = [b"", b"x", b"hello world", bytes(range(256)) * 40, b"\x00" * 65536, bytes(1 << 20)]


def test_round_trip_ipv4(any_loop: asyncio.Runner) -> None:
    """Messages of 0 B to 1 MiB come back unchanged over IPv4, and the counters are exact."""
    run(any_loop, echo_round_trips("127.0.0.1", BODIES))


def test_round_trip_ipv6(any_loop: asyncio.Runner) -> None:
    """Messages of 0 B to 1 MiB come back unchanged over IPv6 loopback."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")
    run(any_loop, echo_round_trips("::1", BODIES))


def test_zero_length_messages(any_loop: asyncio.Runner) -> None:
    """Zero-length messages are real messages: each one is sent as a bare header and received as b""."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            for _ in range(3):
                await conn.send(b"")
            assert await peer.recv_exactly(12) == bytes(12)
            await peer.send(bytes(8))
            assert [await conn.receive(), await conn.receive()] == [b"", b""]
            assert conn.statistics().messages_received == 2

    run(any_loop, main())


def test_one_mebibyte_message_split_by_the_network() -> None:
    """A 1 MiB message written by a raw peer in uneven pieces arrives whole."""

    async def main() -> None:
        body = bytes(i % 251 for i in range(1 << 20))
        data = frame(body)
        async with RawPair() as (conn, peer):
            for start in range(0, len(data), 77_777):
                await peer.send(data[start : start + 77_777])
            assert await conn.receive() == body

    with asyncio.Runner() as runner:
        run(runner, main())


def test_header_fields_round_trip(any_loop: asyncio.Runner) -> None:
    """With u32be+kind:B the echo returns the header fields, received as Message.header."""
    fmt = FrameFormat.parse("u32be+kind:B")

    async def main() -> None:
        async with await aio.serve(port=0, frame=fmt) as server:
            conn = await aio.connect("127.0.0.1", server.port, frame=fmt)
            try:
                await conn.send(b"typed", {"kind": 7})
                reply = await conn.receive()
                assert isinstance(reply, Message)
                assert reply == b"typed" and reply.header == {"kind": 7}
                await conn.send(reply)  # a Message sent back keeps its header
                again = await conn.receive()
                assert again.header == {"kind": 7}
                await conn.send(b"plain")  # missing fields are 0
                assert (await conn.receive()).header == {"kind": 0}
            finally:
                await conn.close()

    run(any_loop, main())


def test_header_fields_on_the_wire(stock_loop: asyncio.Runner) -> None:
    """The header field is written right after the length, as the format string says."""
    fmt = FrameFormat.parse("u32be+kind:B")

    async def main() -> None:
        async with RawPair(frame=fmt) as (conn, peer):
            await conn.send(b"ab", {"kind": 9})
            assert await peer.recv_exactly(7) == b"\x00\x00\x00\x02\x09ab"
            await peer.send(b"\x00\x00\x00\x01\x05z")
            message = await conn.receive()
            assert message == b"z" and message.header == {"kind": 5}

    run(stock_loop, main())


def test_many_frames_in_one_write(any_loop: asyncio.Runner) -> None:
    """Hundreds of frames written by the peer in one call are all received, in order."""

    async def main() -> None:
        bodies = [f"message {i}".encode() * (i % 7) for i in range(500)]
        async with RawPair() as (conn, peer):
            await peer.send(b"".join(frame(b) for b in bodies))
            assert [await conn.receive() for _ in bodies] == bodies

    run(any_loop, main())


def test_frames_split_byte_by_byte(any_loop: asyncio.Runner) -> None:
    """Frames written one byte at a time (the loop running between bytes) are received exactly."""

    async def main() -> None:
        bodies = [b"", b"a", b"split me", bytes(300)]
        data = b"".join(frame(b) for b in bodies)
        async with RawPair() as (conn, peer):
            peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(data)):
                await peer.send(data[i : i + 1])
                await asyncio.sleep(0)  # let the connection read what has arrived
            assert [await conn.receive() for _ in bodies] == bodies

    run(any_loop, main())


def test_clean_close_ends_iteration(any_loop: asyncio.Runner) -> None:
    """The peer's EOF at a frame boundary delivers what came before, then ConnectionClosed(clean=True)."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            await peer.send(frame(b"one") + frame(b"two"))
            peer.sock.shutdown(socket.SHUT_WR)
            assert [m async for m in conn] == [b"one", b"two"]
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert info.value.clean and info.value.kind is EndKind.CLEAN
            assert info.value.reason == "peer closed the connection"
            # Half-closed by the peer: we may still send, and the peer reads it.
            await conn.send(b"after")
            assert await peer.recv_frame() == b"after"

    run(any_loop, main())


def test_reset_is_an_unclean_close(any_loop: asyncio.Runner) -> None:
    """A reset by the peer raises ConnectionClosed(clean=False) from receive, and send refuses afterwards."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            await peer.send(frame(b"before"))
            assert await conn.receive() == b"before"
            peer.reset()
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert not info.value.clean and info.value.kind is EndKind.RESET
            assert info.value.reason == "connection reset by peer"
            await conn.wait_closed()
            with pytest.raises(ConnectionClosed):
                await conn.send(b"late")

    run(any_loop, main())


def test_eof_mid_frame_is_an_unclean_close(any_loop: asyncio.Runner) -> None:
    """EOF inside a frame raises ConnectionClosed(clean=False) with IncompleteMessage as the cause."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            await peer.send(frame(b"whole") + struct.pack(">I", 100) + b"partial")
            peer.sock.shutdown(socket.SHUT_WR)
            assert await conn.receive() == b"whole"
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert not info.value.clean and info.value.kind is EndKind.INCOMPLETE_MESSAGE
            assert isinstance(info.value.__cause__, IncompleteMessage)
            assert info.value.__cause__.received == 11 and info.value.__cause__.expected == 104
            with pytest.raises(ConnectionClosed):  # and again: the end is final
                async for _ in conn:
                    pass

    run(any_loop, main())


def test_oversize_frame_ends_the_connection(stock_loop: asyncio.Runner) -> None:
    """A declared length above max_size ends the connection: ConnectionClosed(kind MESSAGE_TOO_LARGE), the socket closed."""
    fmt = FrameFormat(max_size=1000)

    async def main() -> None:
        async with RawPair(frame=fmt) as (conn, peer):
            await peer.send(frame(b"fine"))
            assert await conn.receive() == b"fine"
            await peer.send(struct.pack(">I", 1001))
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            closed = info.value
            assert not closed.clean and closed.kind is EndKind.MESSAGE_TOO_LARGE
            assert closed.reason == "message size 1001 exceeds max_size 1000"
            assert isinstance(closed.__cause__, MessageTooLarge)
            assert (closed.__cause__.size, closed.__cause__.max_size) == (1001, 1000)
            with pytest.raises(ConnectionClosed) as again:  # and again: the end is final
                await conn.receive()
            assert again.value.kind is EndKind.MESSAGE_TOO_LARGE
            try:  # the transport was closed: the peer sees EOF or a reset
                assert await peer.recv_until_eof() == b""
            except ConnectionResetError:
                pass

    run(stock_loop, main())


def test_graceful_close_flushes_then_half_closes(any_loop: asyncio.Runner) -> None:
    """close() delivers every byte, then EOF; it waits for the peer's EOF before returning."""

    async def main() -> None:
        bodies = [bytes([i]) * (i * 1000) for i in range(40)]
        async with RawPair() as (conn, peer):
            for body in bodies:
                conn.send_nowait(body)
            closing = asyncio.ensure_future(conn.close(timeout=unit(30)))
            data = await peer.recv_until_eof()  # everything, then EOF (half-close)
            assert data == b"".join(frame(b) for b in bodies)
            assert not closing.done()  # still waiting for our EOF
            peer.sock.shutdown(socket.SHUT_WR)
            await closing
            assert conn.closed
            with pytest.raises(ConnectionClosed) as info:
                await conn.send(b"after close")
            assert info.value.clean and info.value.kind is EndKind.CLEAN
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert info.value.clean
            await conn.close()  # idempotent

    run(any_loop, main())


def test_graceful_close_gives_up_after_timeout(stock_loop: asyncio.Runner) -> None:
    """A peer that never sends EOF does not hold close() beyond its timeout: the core resets it (close timeout)."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            await conn.send(b"x")
            loop = asyncio.get_running_loop()
            start = loop.time()
            await conn.close(timeout=unit(0.3))
            assert unit(0.3) * 0.9 <= loop.time() - start < unit(0.3) + unit(2)
            assert conn.closed
            end = conn.protocol.end
            assert end is not None and end.kind is EndKind.CLOSE_TIMEOUT
            assert end.reason == f"close timeout: the connection did not close within {unit(0.3):g} s"
            assert await peer.recv_frame() == b"x"


def test_close_timeout_from_limits(stock_loop: asyncio.Runner) -> None:
    """Without a timeout argument, close() is bounded by limits.close_timeout."""
    limits = Limits(close_timeout=unit(0.2))

    async def main() -> None:
        async with RawPair(limits=limits) as (conn, peer):
            loop = asyncio.get_running_loop()
            start = loop.time()
            await conn.close()
            assert unit(0.2) * 0.9 <= loop.time() - start < unit(0.2) + unit(2)
            end = conn.protocol.end
            assert end is not None and end.kind is EndKind.CLOSE_TIMEOUT
            assert await peer.recv_until_eof() == b""  # our half-close came first

    run(stock_loop, main())


def test_send_waits_while_peer_does_not_read(any_loop: asyncio.Runner) -> None:
    """send() of several MiB does not complete while the peer is not reading, and completes once it reads."""

    async def main() -> None:
        body = bytes(8 << 20)
        async with RawPair(rcvbuf=64 * 1024) as (conn, peer):
            sending = asyncio.ensure_future(conn.send(body))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sending), unit(0.5))
            assert not sending.done()
            reading = asyncio.ensure_future(peer.recv_exactly(len(body) + 4))
            await sending
            assert (await reading)[4:] == body

    run(any_loop, main())


def test_reading_pauses_when_the_application_does_not_receive(any_loop: asyncio.Runner) -> None:
    """Unread messages are bounded: reading from the socket pauses, then everything arrives once received."""
    limits = Limits(write_high_water=64 * 1024, write_low_water=16 * 1024)

    async def main() -> None:
        body = bytes(1000)
        count = 20_000  # about 20 MB offered; far more than the bound
        async with RawPair(limits=limits) as (conn, peer):
            writer = asyncio.ensure_future(peer.send(frame(body) * count))
            transport = conn.transport
            assert transport is not None
            await wait_until(lambda: not transport.is_reading())
            # Bounded by the high-water mark plus at most one read.
            unread = sum(len(m) + 32 for m in conn._messages)
            assert unread <= limits.write_high_water + READ_BUFFER_SIZE + 32 * 300
            received = 0
            while received < count:
                assert await conn.receive() == body
                received += 1
            await writer
            assert conn.statistics().messages_received == count

    run(any_loop, main(), timeout=60)


def test_receive_nowait_and_concurrent_receive(stock_loop: asyncio.Runner) -> None:
    """receive_nowait raises InvalidState when nothing is ready; a second concurrent receive is refused."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            with pytest.raises(InvalidState, match="no message ready"):
                conn.receive_nowait()
            first = asyncio.ensure_future(conn.receive())
            await asyncio.sleep(0)
            with pytest.raises(ConcurrencyError):
                await conn.receive()
            await peer.send(frame(b"a") + frame(b"b"))
            assert await first == b"a"
            await wait_until(lambda: conn.statistics().messages_received == 2)
            assert conn.receive_nowait() == b"b"

    run(stock_loop, main())


def test_abort_ends_receive(stock_loop: asyncio.Runner) -> None:
    """abort() closes at once; a waiting receive raises ConnectionClosed and the peer sees the end."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            waiting = asyncio.ensure_future(conn.receive())
            await asyncio.sleep(0)
            conn.abort()
            with pytest.raises(ConnectionClosed) as info:
                await waiting
            assert info.value.kind is EndKind.ABORTED and not info.value.clean
            assert info.value.reason == "connection aborted locally"
            await conn.wait_closed()
            assert conn.closed
            try:
                assert await peer.recv_until_eof() == b""
            except ConnectionResetError:
                pass

    run(stock_loop, main())


def test_send_too_large_raises_oversize_message(stock_loop: asyncio.Runner) -> None:
    """Sending a body above max_size raises OversizeMessage (our misuse, not the peer's fault); the connection goes on."""
    fmt = FrameFormat(max_size=100)

    async def main() -> None:
        async with RawPair(frame=fmt) as (conn, peer):
            with pytest.raises(OversizeMessage) as info:
                await conn.send(bytes(101))
            assert (info.value.size, info.value.max_size) == (101, 100)
            assert isinstance(info.value, ValueError) and not isinstance(info.value, MessageTooLarge)
            with pytest.raises(OversizeMessage):
                conn.send_nowait(bytes(1000))
            assert not conn.closed
            await conn.send(b"fine")
            assert await peer.recv_frame() == b"fine"
            assert conn.statistics().messages_sent == 1

    run(stock_loop, main())


def test_connect_refused(stock_loop: asyncio.Runner) -> None:
    """Connecting to a port where nothing listens raises ConnectionRefusedError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await aio.connect("127.0.0.1", port)

    run(stock_loop, main())


def test_nodelay_and_addresses(stock_loop: asyncio.Runner) -> None:
    """Connections set TCP_NODELAY and report both socket addresses."""

    async def main() -> None:
        async with RawPair() as (conn, peer):
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert conn.local_address == peer.sock.getpeername()
            assert conn.peer_address == peer.sock.getsockname()

    run(stock_loop, main())


def test_run_and_install_uvloop() -> None:
    """aio.run runs a coroutine on uvloop when available; install_uvloop reports whether it set the policy."""
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert aio.run(loop_type()) is uvloop.Loop
    before = asyncio.get_event_loop_policy()
    try:
        assert aio.install_uvloop() is True
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    finally:
        asyncio.set_event_loop_policy(before)
