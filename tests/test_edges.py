"""Argument checks at the API edges of every layer (issue 11): ports, timeouts, handlers, message types.

Each check is written once (``msgsock._net``, ``msgsock.framing.bytes_like_error``)
and called at each edge.  These tables call every edge with the same bad values,
so an edge that forgets its check fails here, whatever layer it is in.
"""

from __future__ import annotations

import asyncio
import functools
import math
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from msgsock import Timeout, sync, udp
from msgsock import aio as aio_layer
from msgsock.callback import DATAGRAM, AsyncSocket, MessageServer, MessageSocket, QueueDispatcher, Reactor
from msgsock.framing import FrameDecoder, FrameFormat, Message
from msgsock.protocol import MessageProtocol
from tests.helpers import unit, wait_for

pytestmark = pytest.mark.timeout(unit(60))

BAD_PORTS: list[tuple[Any, str]] = [
    (70000, r"^port 70000: must be 0\.\.65535$"),
    (65536, r"^port 65536: must be 0\.\.65535$"),
    (-1, r"^port -1: must be 0\.\.65535$"),
    (True, r"^port True: must be an int 0\.\.65535, not bool$"),
    ("80", r"^port '80': must be an int 0\.\.65535, not str$"),
    (80.0, r"^port 80\.0: must be an int 0\.\.65535, not float$"),
]

BAD_TIMEOUTS: list[tuple[Any, type[Exception], str]] = [
    (-1, ValueError, r"timeout -1: must be >= 0 seconds or None$"),
    (-0.5, ValueError, r"timeout -0\.5: must be >= 0 seconds or None$"),
    (math.nan, ValueError, r"timeout nan: must be >= 0 seconds or None$"),
    ("1", TypeError, r"timeout must be a number of seconds or None, got str$"),
    (True, TypeError, r"timeout must be a number of seconds or None, got bool$"),
]

NOT_BYTES: list[tuple[Any, str]] = [("abc", "str"), (5, "int"), (None, "NoneType"), ([1, 2], "list")]


def _echo(message: bytes) -> bytes:
    return message


def _run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, unit(10))

    return asyncio.run(bounded())


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(name="test-edges-reactor")
    r.start()
    try:
        yield r
    finally:
        r.stop(timeout=unit(5))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain listening socket on 127.0.0.1:0 (a peer that records the bytes it gets)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(unit(5))
        yield sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(unit(5))
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


# -- ports ---------------------------------------------------------------------------------
#
# Each edge is called with a bad port; if it wrongly succeeds (before issue 11 most
# did: the C library wraps 70000 to 4464) what it opened is closed again.


def _sync_connect(port: Any, reactor: Reactor) -> None:
    sync.connect("127.0.0.1", port, connect_timeout=unit(2)).abort()


def _threaded_server(port: Any, reactor: Reactor) -> None:
    sync.ThreadedServer(_echo, "127.0.0.1", port).shutdown(0)


def _aio_connect(port: Any, reactor: Reactor) -> None:
    async def go() -> None:
        (await aio_layer.connect("127.0.0.1", port, connect_timeout=unit(2))).abort()

    _run(go())


def _aio_serve(port: Any, reactor: Reactor) -> None:
    async def go() -> None:
        server = await aio_layer.serve(None, "127.0.0.1", port)
        server.close()
        await server.wait_closed()

    _run(go())


def _callback_connect(port: Any, reactor: Reactor) -> None:
    sock = MessageSocket(reactor)
    sock.create()
    try:
        sock.connect("127.0.0.1", port)
    finally:
        sock.abort()


def _callback_create(port: Any, reactor: Reactor) -> None:
    sock = AsyncSocket(reactor)
    try:
        sock.create(port, address="127.0.0.1")
    finally:
        sock.close()


def _callback_server(port: Any, reactor: Reactor) -> None:
    MessageServer(reactor, None, "127.0.0.1", port)  # the check is at construction, before start()


def _udp_server(port: Any, reactor: Reactor) -> None:
    udp.UdpServer(_echo, "127.0.0.1", port).shutdown()


def _udp_serve(port: Any, reactor: Reactor) -> None:
    async def go() -> None:
        server = await udp.serve_udp(_echo, "127.0.0.1", port)
        server.close()
        await server.wait_closed()

    _run(go())


def _udp_client(port: Any, reactor: Reactor) -> None:
    udp.UdpClient("127.0.0.1", port).close()


def _udp_open_client(port: Any, reactor: Reactor) -> None:
    async def go() -> None:
        (await udp.open_udp_client("127.0.0.1", port)).close()

    _run(go())


PORT_EDGES: dict[str, Callable[[Any, Reactor], None]] = {
    "sync.connect": _sync_connect,
    "sync.ThreadedServer": _threaded_server,
    "aio.connect": _aio_connect,
    "aio.serve": _aio_serve,
    "callback.MessageSocket.connect": _callback_connect,
    "callback.AsyncSocket.create": _callback_create,
    "callback.MessageServer": _callback_server,
    "udp.UdpServer": _udp_server,
    "udp.serve_udp": _udp_serve,
    "udp.UdpClient": _udp_client,
    "udp.open_udp_client": _udp_open_client,
}


@pytest.mark.parametrize(("port", "match"), BAD_PORTS, ids=[repr(p) for p, _ in BAD_PORTS])
@pytest.mark.parametrize("edge", list(PORT_EDGES))
def test_every_api_that_takes_a_port_refuses_one_outside_0_to_65535(
    edge: str, port: Any, match: str, reactor: Reactor
) -> None:
    """A port that is not an int 0..65535 (a bool neither) is a ValueError naming it, at every edge."""
    with pytest.raises(ValueError, match=match):
        PORT_EDGES[edge](port, reactor)


def test_sync_connect_does_not_wrap_a_port_above_65535() -> None:
    """sync.connect(port + 65536) is refused; it used to reach ``port`` (getaddrinfo wraps it)."""
    with sync.ThreadedServer(_echo, "127.0.0.1", 0) as server:
        with pytest.raises(ValueError, match=rf"^port {server.port + 65536}: must be 0\.\.65535$"):
            sync.connect("127.0.0.1", server.port + 65536, connect_timeout=unit(2))
        assert server.statistics().connections == 0


def test_aio_connect_refuses_a_large_port_with_value_error_not_overflow() -> None:
    """aio.connect to port 70000 is the same ValueError as sync.connect, not asyncio's OverflowError."""
    with pytest.raises(ValueError, match=r"^port 70000: must be 0\.\.65535$"):
        _aio_connect(70000, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [70000, -1])
def test_callback_send_to_names_a_bad_port(reactor: Reactor, port: int) -> None:
    """A datagram AsyncSocket's send_to an address with a port out of range is the same ValueError."""
    sock = AsyncSocket(reactor)
    sock.create(0, DATAGRAM, "127.0.0.1")
    try:
        with pytest.raises(ValueError, match=rf"^port {port}: must be 0\.\.65535$"):
            sock.send_to(b"x", ("127.0.0.1", port))
    finally:
        sock.close()


def test_valid_ports_pass() -> None:
    """0 and 65535 are ports; an int subclass (not bool) is taken as its int value."""
    from msgsock._net import check_port

    class Port(int):
        pass

    assert check_port(0) == 0
    assert check_port(65535) == 65535
    assert type(check_port(Port(80))) is int


# -- timeouts ------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[sync.Connection, socket.socket]]:
    """A sync Connection over one end of a socketpair, and the raw other end."""
    a, b = socket.socketpair()
    conn = sync.Connection(a)
    try:
        yield conn, b
    finally:
        conn.abort()
        b.close()


TIMEOUT_EDGES: dict[str, Callable[[Any, Any], object]] = {
    "sync.Connection.receive": lambda env, t: env["conn"].receive(timeout=t),
    "sync.Connection.close": lambda env, t: env["conn"].close(timeout=t),
    "sync.connect(connect_timeout)": lambda env, t: sync.connect("127.0.0.1", env["port"], connect_timeout=t),
    "sync.ThreadedServer.shutdown": lambda env, t: env["server"].shutdown(t),
    "aio.connect(connect_timeout)": lambda env, t: _run(
        aio_layer.connect("127.0.0.1", env["port"], connect_timeout=t)
    ),
    "callback.Reactor.stop": lambda env, t: env["reactor"].stop(t),
    "callback.Reactor.run_sync": lambda env, t: env["reactor"].run_sync(int, timeout=t),
    "callback.AsyncSocket.wait_closed": lambda env, t: AsyncSocket(env["reactor"]).wait_closed(t),
    "callback.MessageServer.wait_closed": lambda env, t: MessageServer(env["reactor"], port=0).wait_closed(t),
    "callback.QueueDispatcher.run_pending": lambda env, t: QueueDispatcher().run_pending(t),
    "callback.QueueDispatcher.run_forever": lambda env, t: QueueDispatcher().run_forever(t),
}


@pytest.mark.parametrize(
    ("timeout", "error", "match"), BAD_TIMEOUTS, ids=[repr(t) for t, _, _ in BAD_TIMEOUTS]
)
@pytest.mark.parametrize("edge", list(TIMEOUT_EDGES))
def test_every_timeout_parameter_refuses_negative_nan_and_non_numbers(
    edge: str,
    timeout: Any,
    error: type[Exception],
    match: str,
    pair: tuple[sync.Connection, socket.socket],
    reactor: Reactor,
) -> None:
    """A negative or NaN timeout is a ValueError, a non-number a TypeError, both naming what was given."""
    with sync.ThreadedServer(_echo, "127.0.0.1", 0) as server:
        env = {"conn": pair[0], "port": server.port, "server": server, "reactor": reactor}
        with pytest.raises(error, match=match):
            TIMEOUT_EDGES[edge](env, timeout)
    assert reactor.running  # a refused stop() stopped nothing


def test_aio_connection_close_refuses_a_negative_timeout(listener: socket.socket) -> None:
    """aio Connection.close(timeout=-1) is a ValueError and the connection stays open and usable."""

    async def go() -> None:
        conn = await aio_layer.connect("127.0.0.1", listener.getsockname()[1], connect_timeout=unit(5))
        peer, _ = listener.accept()
        with peer:
            for bad in (-1, math.nan):
                with pytest.raises(ValueError, match=r"^timeout .*: must be >= 0 seconds or None$"):
                    await conn.close(timeout=bad)
            await conn.send(b"ok")
            assert _recv_exactly(peer, 6) == b"\0\0\0\x02ok"
            conn.abort()

    _run(go())


def test_a_refused_receive_timeout_leaves_the_connection_usable(
    pair: tuple[sync.Connection, socket.socket],
) -> None:
    """receive(timeout=-1) no longer reports "within -1 s": it is refused at the call, and nothing is lost."""
    conn, peer = pair
    peer.sendall(b"\0\0\0\x01a")
    with pytest.raises(ValueError, match=r"^timeout -1: must be >= 0 seconds or None$"):
        conn.receive(timeout=-1)
    assert conn.receive(timeout=unit(5)) == b"a"
    with pytest.raises(Timeout):  # 0 is a timeout (do not wait), not an error
        conn.receive(timeout=0)


# -- handlers ------------------------------------------------------------------------------


def _threaded(handler: Any, reactor: Reactor) -> None:
    sync.ThreadedServer(handler, "127.0.0.1", 0).shutdown(0)


def _threaded_conn(handler: Any, reactor: Reactor) -> None:
    sync.ThreadedServer(connection_handler=handler, host="127.0.0.1", port=0).shutdown(0)


def _aio(handler: Any, reactor: Reactor) -> None:
    async def go() -> None:
        server = await aio_layer.serve(handler, "127.0.0.1", 0)
        server.close()
        await server.wait_closed()

    _run(go())


def _callback(handler: Any, reactor: Reactor) -> None:
    MessageServer(reactor, handler, "127.0.0.1", 0)


def _udp(handler: Any, reactor: Reactor) -> None:
    udp.UdpServer(handler, "127.0.0.1", 0).shutdown()


def _udp_async(handler: Any, reactor: Reactor) -> None:
    async def go() -> None:
        server = await udp.serve_udp(handler, "127.0.0.1", 0)
        server.close()
        await server.wait_closed()

    _run(go())


HANDLER_EDGES: dict[str, tuple[Callable[[Any, Reactor], None], str]] = {
    "sync.ThreadedServer(handler)": (_threaded, "handler"),
    "sync.ThreadedServer(connection_handler)": (_threaded_conn, "connection_handler"),
    "aio.serve(handler)": (_aio, "handler"),
    "callback.MessageServer(handler)": (_callback, "handler"),
    "udp.UdpServer(handler)": (_udp, "handler"),
    "udp.serve_udp(handler)": (_udp_async, "handler"),
}


@pytest.mark.parametrize(("handler", "kind"), [(b"x", "bytes"), (5, "int"), ("echo", "str")])
@pytest.mark.parametrize("edge", list(HANDLER_EDGES))
def test_every_server_refuses_a_handler_that_is_not_callable(
    edge: str, handler: Any, kind: str, reactor: Reactor
) -> None:
    """A handler that cannot be called is a TypeError naming its type when the server is made, not per connection."""
    make, name = HANDLER_EDGES[edge]
    with pytest.raises(TypeError, match=rf"^{name} must be callable, got {kind}$"):
        make(handler, reactor)


def _plain(conn: Any) -> None:
    pass


class _SyncCallable:
    def __call__(self, conn: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "described"),
    [
        (_plain, "function '_plain'"),
        (lambda conn: None, "function '<lambda>'"),
        (_SyncCallable(), "_SyncCallable object"),
        (_SyncCallable, "class '_SyncCallable'"),
        (functools.partial(_plain), "functools.partial of function '_plain'"),
        (b"x", "bytes"),
    ],
    ids=["function", "lambda", "callable-object", "class", "partial", "bytes"],
)
def test_aio_serve_refuses_a_connection_handler_that_is_not_async(handler: Any, described: str) -> None:
    """A plain function as connection_handler is a TypeError at serve(), not "NoneType can't be used in 'await'" per connection."""

    async def go() -> None:
        with pytest.raises(TypeError) as info:
            await aio_layer.serve(connection_handler=handler, host="127.0.0.1", port=0)
        assert str(info.value) == f"connection_handler must be an async function (async def); got {described}"

    _run(go())


# -- message types -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "kind"), NOT_BYTES, ids=[k for _, k in NOT_BYTES])
def test_sync_send_refuses_a_message_that_is_not_bytes_like(
    pair: tuple[sync.Connection, socket.socket], value: Any, kind: str
) -> None:
    """sync Connection.send("abc") is TypeError("message must be bytes-like, got str"); nothing is sent."""
    conn, peer = pair
    with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
        conn.send(value)
    conn.send(b"ok")
    assert _recv_exactly(peer, 6) == b"\0\0\0\x02ok"  # the bad message left no trace


@pytest.mark.parametrize(("value", "kind"), NOT_BYTES, ids=[k for _, k in NOT_BYTES])
def test_aio_send_refuses_a_message_that_is_not_bytes_like(
    listener: socket.socket, value: Any, kind: str
) -> None:
    """aio Connection.send and send_nowait raise the same TypeError; the connection goes on."""

    async def go() -> None:
        conn = await aio_layer.connect("127.0.0.1", listener.getsockname()[1], connect_timeout=unit(5))
        peer, _ = listener.accept()
        with peer:
            with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
                await conn.send(value)
            with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
                conn.send_nowait(value)
            await conn.send(b"ok")
            assert _recv_exactly(peer, 6) == b"\0\0\0\x02ok"
            conn.abort()

    _run(go())


@pytest.mark.parametrize(("value", "kind"), NOT_BYTES, ids=[k for _, k in NOT_BYTES])
def test_callback_send_message_refuses_a_message_that_is_not_bytes_like(
    reactor: Reactor, value: Any, kind: str
) -> None:
    """MessageSocket.send_message raises the same TypeError from another thread and on the reactor thread."""
    a, b = socket.socketpair()
    sock = MessageSocket(reactor)
    sock.attach(a)
    try:
        with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
            sock.send_message(value)  # handed over: checked on the caller's thread
        with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
            reactor.run_sync(sock.send_message, value)  # inline: the core refuses it
        sock.send_message(b"ok")
        assert _recv_exactly(b, 6) == b"\0\0\0\x02ok"
    finally:
        sock.abort()
        b.close()


@pytest.mark.parametrize(("value", "kind"), NOT_BYTES, ids=[k for _, k in NOT_BYTES])
def test_core_refuses_a_message_that_is_not_bytes_like(value: Any, kind: str) -> None:
    """The sans-I/O core (protocol, format, decoder) names the type it got, and its state is untouched."""
    proto = MessageProtocol(FrameFormat.parse("u8+k:B"))
    with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
        proto.send_message(value)
    assert proto.data_to_send() == [] and proto.stats.messages_sent == 0
    with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
        FrameFormat().encode(value)
    decoder = FrameDecoder()
    assert decoder.feed(b"\0\0") == []
    with pytest.raises(TypeError, match=rf"^data must be bytes-like, got {kind}$"):
        decoder.feed(value)
    with pytest.raises(TypeError, match=rf"^data must be bytes-like, got {kind}$"):
        decoder.feed_span(value)
    assert decoder.feed(b"\0\x01a") == [b"a"]  # the bad chunks changed nothing


# -- a Message subclass keeps its header (issue 11, defect 7) ------------------------------


class Request(Message):
    """An application's own message type."""


FORMAT_U8_K = FrameFormat.parse("u8+k:B")
REQUEST_WIRE = bytes.fromhex("010561")


def test_sync_send_keeps_the_header_of_a_message_subclass(listener: socket.socket) -> None:
    """A subclass of Message sent on a sync connection goes out with its header: u8+k:B, k=5 is 010561."""
    with sync.connect("127.0.0.1", listener.getsockname()[1], frame=FORMAT_U8_K) as conn:
        peer, _ = listener.accept()
        with peer:
            conn.send(Request(b"a", {"k": 5}))
            assert _recv_exactly(peer, 3) == REQUEST_WIRE


def test_aio_send_keeps_the_header_of_a_message_subclass(listener: socket.socket) -> None:
    """The same over an aio connection."""

    async def go() -> None:
        conn = await aio_layer.connect(
            "127.0.0.1", listener.getsockname()[1], frame=FORMAT_U8_K, connect_timeout=unit(5)
        )
        peer, _ = listener.accept()
        with peer:
            await conn.send(Request(b"a", {"k": 5}))
            assert _recv_exactly(peer, 3) == REQUEST_WIRE
            conn.abort()

    _run(go())


def test_callback_send_message_keeps_the_header_of_a_message_subclass(
    reactor: Reactor, listener: socket.socket
) -> None:
    """The same over a callback MessageSocket."""
    sock = MessageSocket(reactor, FORMAT_U8_K)
    sock.create()
    sock.connect("127.0.0.1", listener.getsockname()[1])
    try:
        sock.send_message(Request(b"a", {"k": 5}))
        peer, _ = listener.accept()
        with peer:
            assert _recv_exactly(peer, 3) == REQUEST_WIRE
    finally:
        sock.abort()
        wait_for(lambda: sock.wait_closed(0))


def test_threaded_server_refuses_an_async_connection_handler() -> None:
    """A coroutine function would return a coroutine no thread ever awaits: refused at construction."""
    from msgsock.sync import ThreadedServer

    async def handle(conn: object) -> None:
        pass

    with pytest.raises(TypeError, match="must be a plain function, not async def"):
        ThreadedServer(connection_handler=handle, host="127.0.0.1", port=0)  # type: ignore[arg-type]
