"""msgsock.aio.serve() and Server over real loopback sockets (SPEC §5.1, §6.1, §7, §9)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import logging
import random
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from msgsock import ConnectionClosed, EndKind, FrameFormat, Limits, aio
from msgsock.aio.connection import READ_BUFFER_SIZE
from tests.helpers import free_loopback6, unit

T = TypeVar("T")

LOOPS = ["asyncio", "uvloop"]
LOGGER = "msgsock.server"


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


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Server log records at info level and above."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


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
    """The default frame of ``body``."""
    return struct.pack(">I", len(body)) + body


async def open_raw(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A plain non-blocking client socket connected to ``port``."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_until_closed(sock: socket.socket) -> bytes:
    """Read until EOF (or a reset, which also ends the connection)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    try:
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def messages(logs: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    """The server's log lines (optionally of one level)."""
    return [
        r.getMessage() for r in logs.records if r.name == LOGGER and (level is None or r.levelno == level)
    ]


async def exchange(conn: aio.Connection, bodies: list[bytes]) -> None:
    """Send bodies and check each echo, byte for byte, in order."""
    for body in bodies:
        await conn.send(body)
        assert await conn.receive() == body


def test_echo_logs_and_statistics(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """The default handler echoes; connects and disconnects are logged with the peer; counters are exact."""

    async def main() -> None:
        async with await aio.serve(port=0) as server:
            assert server.addresses == [("127.0.0.1", server.port)]
            assert len(server.sockets) == 1
            conn = await aio.connect("127.0.0.1", server.port)
            peer = f"127.0.0.1:{conn.local_address[1]}"
            await exchange(conn, [b"a", b"", b"xyz" * 1000])
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert (stats.connections, stats.active, stats.rejected, stats.errors) == (1, 0, 0, 0)
            assert stats.messages_received == stats.messages_sent == 3
            assert stats.bytes_received == stats.bytes_sent == 1 + 0 + 3000 + 12
        lines = messages(logs, logging.INFO)
        assert f"connection from {peer}" in lines
        assert f"{peer} disconnected (3 messages in, 3 out)" in lines
        assert not messages(logs, logging.WARNING)

    run(any_loop, main())


def test_ipv6_server(any_loop: asyncio.Runner) -> None:
    """A server bound to ::1 serves IPv6 clients."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")

    async def main() -> None:
        async with await aio.serve(lambda m: m[::-1], host="::1", port=0) as server:
            assert server.addresses[0][:2] == ("::1", server.port)
            conn = await aio.connect("::1", server.port)
            await conn.send(b"stressed")
            assert await conn.receive() == b"desserts"
            await conn.close()

    run(any_loop, main())


def test_replies_of_one_read_are_batched(any_loop: asyncio.Runner) -> None:
    """Many requests in one write get all their replies, in order; None means no reply."""

    def handler(message: bytes) -> bytes | None:
        return None if message.startswith(b"skip") else message.upper()

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            sock = await open_raw(server.port)
            try:
                loop = asyncio.get_running_loop()
                bodies = [b"skip me" if i % 10 == 0 else f"request {i}".encode() for i in range(300)]
                await loop.sock_sendall(sock, b"".join(frame(b) for b in bodies))
                sock.shutdown(socket.SHUT_WR)
                data = await recv_until_closed(sock)
                expected = [b.upper() for b in bodies if not b.startswith(b"skip")]
                assert data == b"".join(frame(b) for b in expected)
            finally:
                sock.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert (stats.messages_received, stats.messages_sent) == (300, 270)

    run(any_loop, main())


def test_header_fields_echoed(stock_loop: asyncio.Runner) -> None:
    """With extra header fields, an echo handler (lambda m: m) returns the fields it received."""
    fmt = FrameFormat.parse("u32be+kind:B+flags:H")

    async def main() -> None:
        async with await aio.serve(lambda m: m, port=0, frame=fmt) as server:
            sock = await open_raw(server.port)
            loop = asyncio.get_running_loop()
            try:
                sent = fmt.encode(b"hi", {"kind": 3, "flags": 0x10})
                await loop.sock_sendall(sock, sent)
                sock.shutdown(socket.SHUT_WR)
                assert await recv_until_closed(sock) == sent  # byte-identical
            finally:
                sock.close()

    run(stock_loop, main())


def test_oversize_frame_closes_only_that_connection(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A too-large declared length closes that connection with a warning naming the peer and both numbers."""
    fmt = FrameFormat(max_size=100_000)

    async def main() -> None:
        async with await aio.serve(port=0, frame=fmt) as server:
            good = await aio.connect("127.0.0.1", server.port, frame=fmt)
            rng = random.Random(7)
            bodies = [rng.randbytes(rng.randrange(0, 100_001)) for _ in range(40)]
            for body in bodies[:20]:  # in flight while the bad peer misbehaves
                await good.send(body)
            bad = await open_raw(server.port)
            bad_port = bad.getsockname()[1]
            try:
                await asyncio.get_running_loop().sock_sendall(bad, struct.pack(">I", 4_000_000_000))
                assert await recv_until_closed(bad) == b""
            finally:
                bad.close()
            for body in bodies[20:]:
                await good.send(body)
            for body in bodies:
                assert await good.receive() == body
            await good.close()
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().errors == 1
        warnings = messages(logs, logging.WARNING)
        assert len(warnings) == 1
        assert warnings[0].startswith(f"127.0.0.1:{bad_port} closed: ")
        assert "exceeds max_size" in warnings[0]
        assert "4000000000" in warnings[0] and "100000" in warnings[0]
        assert not any(line.startswith(f"127.0.0.1:{bad_port} disconnected") for line in messages(logs))
        assert not any(r.exc_info for r in logs.records)

    run(any_loop, main())


def test_max_connections_rejects_and_logs(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """Over max_connections a new connection is closed at once, counted and logged with its address."""
    limits = Limits(max_connections=2)

    async def main() -> None:
        async with await aio.serve(port=0, limits=limits) as server:
            first = await aio.connect("127.0.0.1", server.port)
            second = await aio.connect("127.0.0.1", server.port)
            await exchange(first, [b"1"])
            await exchange(second, [b"2"])
            extra = await open_raw(server.port)
            extra_port = extra.getsockname()[1]
            try:
                await asyncio.get_running_loop().sock_sendall(extra, frame(b"ignored"))
                assert await recv_until_closed(extra) == b""
            finally:
                extra.close()
            stats = server.statistics()
            assert (stats.rejected, stats.active, stats.connections) == (1, 2, 2)
            await first.close()
            await wait_until(lambda: server.statistics().active == 1)
            third = await aio.connect("127.0.0.1", server.port)  # room again
            await exchange(third, [b"3"])
            await second.close()
            await third.close()
        warnings = messages(logs, logging.WARNING)
        assert warnings == [f"127.0.0.1:{extra_port} rejected: 2 connections open (limit 2)"]

    run(any_loop, main())


def test_idle_timeout(stock_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """A connection with no traffic for idle_timeout is closed and logged."""
    idle = unit(0.3)
    limits = Limits(idle_timeout=idle, message_timeout=None)

    async def main() -> None:
        async with await aio.serve(port=0, limits=limits) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            loop = asyncio.get_running_loop()
            await exchange(conn, [b"alive"])
            start = loop.time()
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.receive(), unit(10))
            assert loop.time() - start >= idle * 0.9
            assert not info.value.clean and info.value.kind is EndKind.RESET  # the server resets (SPEC §5.0)
            peer = f"127.0.0.1:{conn.local_address[1]}"
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert stats.errors == 1 and stats.error_kinds == {"idle timeout": 1}
        assert f"{peer} closed: idle timeout: nothing received for {idle:g} s" in messages(
            logs, logging.WARNING
        )

    run(stock_loop, main())


def test_message_timeout(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """A frame started but not finished within message_timeout closes the connection (slowloris)."""
    limits = Limits(idle_timeout=None, message_timeout=unit(0.3))

    async def main() -> None:
        async with await aio.serve(port=0, limits=limits) as server:
            sock = await open_raw(server.port)
            port = sock.getsockname()[1]
            try:
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(sock, frame(b"complete") + struct.pack(">I", 100) + b"partial")
                assert await recv_until_closed(sock) == frame(b"complete")
            finally:
                sock.close()
            # An idle connection between frames is not affected by message_timeout.
            quiet = await aio.connect("127.0.0.1", server.port)
            await exchange(quiet, [b"x"])
            await wait_until(lambda: server.statistics().errors == 1)
            await asyncio.sleep(unit(0.5))  # longer than message_timeout: must stay open
            await exchange(quiet, [b"still here"])
            await quiet.close()
        warnings = messages(logs, logging.WARNING)
        assert warnings == [
            f"127.0.0.1:{port} closed: message timeout: a frame was not completed within "
            f"{unit(0.3):g} s (11 bytes of it received)"
        ]

    run(any_loop, main())


def test_handler_exception_closes_only_that_connection(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A handler that raises resets that connection (replies before it still go out), logged with traceback."""

    def handler(message: bytes) -> bytes:
        if message == b"boom":
            raise RuntimeError("handler bug")
        return message

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            other = await aio.connect("127.0.0.1", server.port)
            bad = await aio.connect("127.0.0.1", server.port)
            for body in (b"first", b"boom", b"never"):
                bad.send_nowait(body)
            peer = f"127.0.0.1:{bad.local_address[1]}"
            assert await bad.receive() == b"first"
            with pytest.raises(ConnectionClosed) as info:
                await bad.receive()
            assert not info.value.clean and info.value.kind is EndKind.RESET
            await exchange(other, [b"unaffected"] * 5)
            await bad.close()
            await other.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert stats.errors == 1 and stats.error_kinds == {"handler error": 1}
        errors = [r for r in logs.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None
        assert errors[0].getMessage() == f"{peer} closed: handler raised RuntimeError: handler bug"

    run(any_loop, main())


def test_async_handler_keeps_order(any_loop: asyncio.Runner) -> None:
    """A coroutine handler whose calls finish after varying delays still replies in request order."""

    async def handler(message: bytes) -> bytes:
        for _ in range(message[0] % 5):
            await asyncio.sleep(0)
        return message

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            bodies = [bytes([i % 256]) + bytes(i % 300) for i in range(500)]
            sender = asyncio.ensure_future(_send_all(conn, bodies))
            for body in bodies:
                assert await conn.receive() == body
            await sender
            await conn.close()

    run(any_loop, main())


async def _send_all(conn: aio.Connection, bodies: list[bytes]) -> None:
    for body in bodies:
        await conn.send(body)


def test_mixed_sync_and_async_replies(stock_loop: asyncio.Runner) -> None:
    """A handler returning bytes for some messages and awaitables for others keeps replies in order."""

    def handler(message: bytes) -> Any:
        if message.startswith(b"a"):

            async def later() -> bytes:
                await asyncio.sleep(0)
                return message + b"!"

            return later()
        return message + b"."

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            sock = await open_raw(server.port)
            try:
                bodies = [(b"a%d" if i % 3 else b"s%d") % i for i in range(100)]
                await asyncio.get_running_loop().sock_sendall(sock, b"".join(frame(b) for b in bodies))
                sock.shutdown(socket.SHUT_WR)
                expected = [b + (b"!" if b.startswith(b"a") else b".") for b in bodies]
                assert await recv_until_closed(sock) == b"".join(frame(b) for b in expected)
            finally:
                sock.close()

    run(stock_loop, main())


def test_flooding_non_reader_is_bounded(any_loop: asyncio.Runner) -> None:
    """A client that floods and never reads makes the server stop reading it; its reply buffer stays bounded."""
    limits = Limits(write_high_water=64 * 1024, write_low_water=16 * 1024)
    chunk = frame(bytes(16 * 1024)) * 64  # 1 MiB of 16 KiB requests per write

    async def main() -> None:
        async with await aio.serve(port=0, limits=limits) as server:
            sock = await open_raw(server.port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            loop = asyncio.get_running_loop()
            flood = asyncio.ensure_future(_flood(loop, sock, chunk, 256))  # at most 256 MiB
            try:
                await wait_until(lambda: server.statistics().active == 1)
                (proto,) = server._protocol.connections  # the server side of this client
                transport = proto.pump.transport
                assert transport is not None
                await wait_until(lambda: not transport.is_reading() or flood.done(), unit(20))
                assert not flood.done(), "the server kept reading everything"
                bound = limits.write_high_water + READ_BUFFER_SIZE + 64 * 1024
                received = server.statistics().bytes_received
                for _ in range(5):  # stays paused and bounded while the client keeps pushing
                    assert transport.get_write_buffer_size() <= bound
                    await asyncio.sleep(unit(0.05))
                assert server.statistics().bytes_received == received
                assert transport.get_write_buffer_size() <= bound
            finally:
                flood.cancel()
                await asyncio.gather(flood, return_exceptions=True)
                sock.close()
            await wait_until(lambda: server.statistics().active == 0)

    run(any_loop, main())


async def _flood(loop: asyncio.AbstractEventLoop, sock: socket.socket, chunk: bytes, times: int) -> None:
    for _ in range(times):
        await loop.sock_sendall(sock, chunk)


def test_graceful_shutdown_drains_in_flight(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """Shutdown finishes messages already received, flushes their replies, half-closes; counters are exact."""
    release = asyncio.Event()

    async def slow_echo(message: bytes) -> bytes:
        await release.wait()
        return message

    async def main() -> None:
        server = await aio.serve(slow_echo, port=0)
        try:
            conns = [await aio.connect("127.0.0.1", server.port) for _ in range(3)]
            bodies = [f"in flight {i}".encode() * (i + 1) for i in range(5)]
            for conn in conns:
                for body in bodies:
                    await conn.send(body)
            await wait_until(lambda: server.statistics().messages_received == 15)
            server.close()
            closing = asyncio.ensure_future(server.wait_closed())
            await asyncio.sleep(0)
            release.set()
            for conn in conns:
                assert [m async for m in conn] == bodies  # every reply, then a clean EOF
                await conn.close()
            await closing
        finally:
            server.close()
            await server.wait_closed()
        stats = server.statistics()
        assert (stats.connections, stats.active, stats.errors, stats.rejected) == (3, 0, 0, 0)
        assert stats.messages_received == stats.messages_sent == 15
        assert stats.bytes_received == stats.bytes_sent == 3 * sum(len(b) + 4 for b in bodies)
        assert not messages(logs, logging.WARNING)

    run(any_loop, main())


def test_shutdown_aborts_peers_that_do_not_close(
    stock_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A peer that never closes is aborted once shutdown_timeout has passed."""
    limits = Limits(shutdown_timeout=unit(0.3))

    async def main() -> None:
        server = await aio.serve(port=0, limits=limits)
        sock = await open_raw(server.port)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, frame(b"x"))
            await wait_until(lambda: server.statistics().messages_sent == 1)
            server.close()
            start = loop.time()
            await server.wait_closed()
            assert loop.time() - start >= unit(0.3) * 0.9
            assert await recv_until_closed(sock) == frame(b"x")
        finally:
            sock.close()
        stats = server.statistics()
        assert stats.active == 0 and stats.error_kinds == {"shutdown deadline": 1}
        assert any(
            f"closed: shutdown deadline: still open {unit(0.3):g} s after the server began to stop" in line
            for line in messages(logs, logging.WARNING)
        )

    run(stock_loop, main())


def test_connection_handler_model(any_loop: asyncio.Runner) -> None:
    """A connection handler gets a Connection; when it returns, the connection is closed gracefully."""

    async def greet(conn: aio.Connection) -> None:
        name = await conn.receive()
        await conn.send(b"hello " + name)
        async for message in conn:
            if message == b"bye":
                return
            await conn.send(message[::-1])

    async def main() -> None:
        async with await aio.serve(connection_handler=greet, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            await conn.send(b"msgsock")
            assert await conn.receive() == b"hello msgsock"
            await exchange(conn, [])
            await conn.send(b"abc")
            assert await conn.receive() == b"cba"
            await conn.send(b"bye")
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert info.value.clean
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert (stats.messages_received, stats.messages_sent, stats.errors) == (3, 2, 0)

    run(any_loop, main())


def test_connection_handler_shutdown(stock_loop: asyncio.Runner) -> None:
    """On shutdown a connection handler's loop ends after the messages already received."""

    async def echo(conn: aio.Connection) -> None:
        async for message in conn:
            await conn.send(message)

    async def main() -> None:
        server = await aio.serve(connection_handler=echo, port=0)
        conn = await aio.connect("127.0.0.1", server.port)
        try:
            await exchange(conn, [b"one"])
            server.close()
            assert [m async for m in conn] == []
            await conn.close()
            await server.wait_closed()
            assert server.statistics().errors == 0
        finally:
            conn.abort()
            server.close()
            await server.wait_closed()

    run(stock_loop, main())


class _EchoCall:
    """A connection handler that is an object whose ``__call__`` is an async method."""

    async def __call__(self, conn: aio.Connection, prefix: bytes = b"") -> None:
        async for message in conn:
            await conn.send(prefix + message)

    async def method(self, conn: aio.Connection) -> None:
        await self(conn, b"m:")


async def _echo_prefixed(conn: aio.Connection, prefix: bytes) -> None:
    async for message in conn:
        await conn.send(prefix + message)


@pytest.mark.parametrize(
    ("handler", "prefix"),
    [
        (functools.partial(_echo_prefixed, prefix=b"p:"), b"p:"),
        (_EchoCall(), b""),
        (functools.partial(_EchoCall(), prefix=b"c:"), b"c:"),
        (_EchoCall().method, b"m:"),
    ],
    ids=["partial", "callable-object", "partial-of-callable-object", "bound-method"],
)
def test_connection_handler_kinds_that_are_async_are_served(
    stock_loop: asyncio.Runner, handler: Any, prefix: bytes
) -> None:
    """serve() takes, besides ``async def``, a partial of one, an object with an async ``__call__`` and a bound async method."""

    async def main() -> None:
        async with await aio.serve(connection_handler=handler, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            try:
                await conn.send(b"hi")
                assert await conn.receive() == prefix + b"hi"
            finally:
                await conn.close()
            assert server.statistics().errors == 0

    run(stock_loop, main())


def test_plain_connection_handler_is_refused_at_serve(stock_loop: asyncio.Runner) -> None:
    """A plain function as connection_handler is a TypeError at serve(), no longer a failure of every connection."""

    def handle(conn: aio.Connection) -> None:
        pass

    async def main() -> None:
        with pytest.raises(TypeError) as info:
            await aio.serve(connection_handler=handle, port=0)  # type: ignore[arg-type]  # the misuse under test
        assert (
            str(info.value)
            == "connection_handler must be an async function (async def); got function 'handle'"
        )

    run(stock_loop, main())


def test_reset_and_mid_frame_close_are_logged(
    stock_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A reset and an EOF inside a frame are each logged once as 'closed:' and counted as errors."""

    async def main() -> None:
        async with await aio.serve(port=0) as server:
            loop = asyncio.get_running_loop()
            mid = await open_raw(server.port)
            await loop.sock_sendall(mid, struct.pack(">I", 100) + b"partial")
            mid.shutdown(socket.SHUT_WR)
            assert await recv_until_closed(mid) == b""
            mid.close()
            reset = await open_raw(server.port)
            await loop.sock_sendall(reset, frame(b"ok"))
            assert await loop.sock_recv(reset, 100) == frame(b"ok")
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().errors == 2
        warnings = messages(logs, logging.WARNING)
        assert len(warnings) == 2
        assert any("stream ended after 11 bytes of 104" in w for w in warnings)
        assert any("reset" in w for w in warnings)
        assert not any(r.exc_info for r in logs.records)

    run(stock_loop, main())


def test_fifty_clients_random_sizes(any_loop: asyncio.Runner) -> None:
    """50 concurrent clients each exchange 200 messages of random sizes (0 B-1 MiB), all verified."""
    block = random.Random(1).randbytes(1 << 20)

    def sizes(rng: random.Random) -> Iterator[int]:
        for _ in range(200):
            p = rng.random()
            if p < 0.005:
                yield rng.randrange(64 * 1024, (1 << 20) - 8)  # a few large ones
            elif p < 0.1:
                yield rng.randrange(1024, 64 * 1024)
            else:
                yield rng.randrange(0, 1024)

    async def client(port: int, cid: int) -> int:
        rng = random.Random(cid)
        bodies = []
        for seq, size in enumerate(sizes(rng)):
            tag = struct.pack(">HH", cid, seq)  # who and which, against cross-talk and reordering
            offset = rng.randrange(0, len(block) - size + 1)
            bodies.append((tag + block[offset : offset + size])[:size])
        conn = await aio.connect("127.0.0.1", port)
        try:
            sender = asyncio.ensure_future(_send_all(conn, bodies))
            for body in bodies:
                assert await conn.receive() == body
            await sender
        finally:
            await conn.close()
        return sum(len(b) for b in bodies)

    async def main() -> None:
        async with await aio.serve(port=0) as server:
            totals = await asyncio.gather(*(client(server.port, cid) for cid in range(50)))
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert stats.messages_received == stats.messages_sent == 50 * 200
            assert stats.bytes_received == stats.bytes_sent == sum(totals) + 4 * 50 * 200
            assert stats.errors == 0

    run(any_loop, main(), timeout=50)


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A (server, client) pair of TLS contexts around a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "msgsock test")])
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
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
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


def test_tls_round_trip(
    any_loop: asyncio.Runner, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Over TLS, messages of 0 B to 1 MiB round-trip and both sides close cleanly."""
    server_ctx, client_ctx = tls_contexts

    async def main() -> None:
        async with await aio.serve(port=0, ssl=server_ctx) as server:
            conn = await aio.connect("127.0.0.1", server.port, ssl=client_ctx)
            assert conn.get_extra_info("peercert")
            assert conn.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            await exchange(conn, [b"", b"secret", bytes(1 << 20)])
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert (stats.messages_received, stats.errors) == (3, 0)

    run(any_loop, main())


def test_messages_before_a_bad_header_are_answered(any_loop: asyncio.Runner) -> None:
    """Frames in the same read as an oversize header are answered before the connection closes."""

    async def main() -> None:
        fmt = FrameFormat(max_size=100)
        async with await aio.serve(lambda m: m, "127.0.0.1", 0, frame=fmt) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(fmt.encode(b"one") + fmt.encode(b"two") + struct.pack(">I", 101))
            data = await asyncio.wait_for(reader.read(), unit(5))
            assert data == fmt.encode(b"one") + fmt.encode(b"two")
            writer.close()

    run(any_loop, main())


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("text", "handler returned str; expected bytes, bytearray, memoryview or None"),
        (42, "handler returned int; expected bytes, bytearray, memoryview or None"),
    ],
    ids=["str", "int"],
)
def test_handler_wrong_reply_type_resets(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture, reply: object, reason: str
) -> None:
    """A handler that returns a wrong type resets the connection and logs the handler error (SPEC §5.0)."""

    def handler(message: bytes) -> Any:
        return reply if message == b"bad" else message

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            peer = f"127.0.0.1:{conn.local_address[1]}"
            await exchange(conn, [b"good"])
            await conn.send(b"bad")
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert not info.value.clean
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert stats.error_kinds == {"handler error": 1}
            assert (stats.messages_received, stats.messages_sent) == (2, 1)
        (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
        assert error.getMessage() == f"{peer} closed: {reason}"
        assert error.exc_info is not None

    run(any_loop, main())


def test_async_handler_exception_resets(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """An async handler that raises resets the connection after the replies before it; logged with traceback."""

    async def handler(message: bytes) -> bytes:
        await asyncio.sleep(0)
        if message == b"boom":
            raise ValueError("boom")
        return message

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            peer = f"127.0.0.1:{conn.local_address[1]}"
            for body in (b"one", b"two", b"boom", b"never"):
                conn.send_nowait(body)
            assert [await conn.receive(), await conn.receive()] == [b"one", b"two"]
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert not info.value.clean
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().error_kinds == {"handler error": 1}
        (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
        assert error.getMessage() == f"{peer} closed: handler raised ValueError: boom"
        assert error.exc_info is not None

    run(any_loop, main())


def test_async_handler_wrong_reply_type_resets(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """An async handler whose result is not bytes-like or None resets the connection, logged as a handler error."""

    async def handler(message: bytes) -> Any:
        return "text"

    async def main() -> None:
        async with await aio.serve(handler, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            await conn.send(b"x")
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert not info.value.clean
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().error_kinds == {"handler error": 1}
        (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
        assert error.getMessage().endswith(
            "closed: handler returned str; expected bytes, bytearray, memoryview or None"
        )

    run(any_loop, main())


def test_connection_handler_exception_resets(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A connection handler that raises resets its connection, logged at error with the traceback."""

    async def handler(conn: aio.Connection) -> None:
        async for message in conn:
            if message == b"boom":
                raise ValueError("boom")
            await conn.send(message)

    async def main() -> None:
        async with await aio.serve(connection_handler=handler, port=0) as server:
            conn = await aio.connect("127.0.0.1", server.port)
            peer = f"127.0.0.1:{conn.local_address[1]}"
            await exchange(conn, [b"fine"])
            await conn.send(b"boom")
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert not info.value.clean and info.value.kind is EndKind.RESET
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().error_kinds == {"handler error": 1}
        (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
        assert error.getMessage() == f"{peer} closed: handler raised ValueError: boom"
        assert error.exc_info is not None

    run(any_loop, main())


def test_send_too_large_in_connection_handler(
    stock_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A connection handler's send of a body above max_size raises OversizeMessage; uncaught, it is a handler error."""
    fmt = FrameFormat(max_size=10)

    async def handler(conn: aio.Connection) -> None:
        await conn.receive()
        await conn.send(bytes(11))

    async def main() -> None:
        async with await aio.serve(connection_handler=handler, port=0, frame=fmt) as server:
            conn = await aio.connect("127.0.0.1", server.port, frame=fmt)
            await conn.send(b"go")
            with pytest.raises(ConnectionClosed):
                await conn.receive()
            await conn.close()
            await wait_until(lambda: server.statistics().active == 0)
        (error,) = [r for r in logs.records if r.levelno == logging.ERROR]
        assert (
            "closed: handler raised OversizeMessage: cannot send a message of 11 bytes" in error.getMessage()
        )

    run(stock_loop, main())


def test_shutdown_counts_late_messages_as_discarded(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """Messages that arrive after the shutdown began are counted as discarded, never as received (SPEC §5.0)."""

    async def main() -> None:
        server = await aio.serve(port=0)
        try:
            sock = await open_raw(server.port)
            port = sock.getsockname()[1]
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, frame(b"before"))
            assert await loop.sock_recv(sock, 100) == frame(b"before")
            server.close()
            assert await loop.sock_recv(sock, 100) == b""  # the server half-closed
            await loop.sock_sendall(sock, frame(b"late") * 3)
            sock.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(server.wait_closed(), unit(5))
            sock.close()
        finally:
            server.close()
            await server.wait_closed()
        stats = server.statistics()
        assert (stats.messages_received, stats.messages_sent, stats.messages_discarded) == (1, 1, 3)
        assert stats.errors == 0
        assert f"127.0.0.1:{port} disconnected (1 messages in, 1 out, 3 discarded)" in messages(
            logs, logging.INFO
        )
        assert "(3 discarded)" in stats.summary()

    run(any_loop, main())


def test_connection_handler_answers_what_it_received_before_shutdown(stock_loop: asyncio.Runner) -> None:
    """On shutdown a connection handler still gets, and may answer, the messages already received."""
    release = asyncio.Event()

    async def echo(conn: aio.Connection) -> None:
        async for message in conn:
            await release.wait()
            await conn.send(message)

    async def main() -> None:
        server = await aio.serve(connection_handler=echo, port=0)
        conn = await aio.connect("127.0.0.1", server.port)
        try:
            bodies = [b"one", b"two", b"three"]
            for body in bodies:
                await conn.send(body)
            await wait_until(lambda: server.statistics().messages_received == 3)
            server.close()
            release.set()
            assert [m async for m in conn] == bodies
            await conn.close()
            await asyncio.wait_for(server.wait_closed(), unit(5))
            stats = server.statistics()
            assert (stats.messages_received, stats.messages_sent, stats.errors) == (3, 3, 0)
        finally:
            conn.abort()
            server.close()
            await server.wait_closed()

    run(stock_loop, main())


def test_peer_address_is_known_for_a_peer_that_resets_at_once(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """A peer that resets right after connecting is logged with its address (stock asyncio keeps accept()'s).

    uvloop reads the address only when asked, after the reset for some of them: those
    are logged as ``unknown peer``, once each, as a reset (the platform gives no more).
    """
    uvloop_loop = False

    async def main() -> None:
        nonlocal uvloop_loop
        uvloop_loop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with await aio.serve(port=0) as server:
            ports = []
            for _ in range(20):
                sock = socket.socket()
                sock.connect(("127.0.0.1", server.port))
                ports.append(sock.getsockname()[1])
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            await wait_until(
                lambda: server.statistics().connections == 20 and server.statistics().active == 0
            )
            assert server.statistics().error_kinds == {"reset": 20}
        lines = messages(logs, logging.WARNING)
        unknown = lines.count("unknown peer closed: connection reset by peer")
        known = [port for port in ports if f"127.0.0.1:{port} closed: connection reset by peer" in lines]
        assert len(lines) == 20 and unknown + len(known) == 20, lines
        if not uvloop_loop:
            assert unknown == 0

    run(any_loop, main())
