"""TLS, authentication and the PROXY protocol on msgsock.aio servers and clients (SPEC §4.2, §7).

Real loopback sockets, on the stock event loop and on uvloop.  Clients that must do
something the library client does not (send a PROXY header, stop half-way through a
handshake, replay recorded bytes) are asyncio streams driving the sans-I/O cores.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from msgsock import ConnectionClosed, EndKind, HandshakeError, Limits, Timeout, aio
from msgsock.auth import HELLO_SIZE, ClientHandshake, new_nonce
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
from tests.certs import Pki
from tests.helpers import free_loopback6, unit
from tests.tls_helpers import MemoryTls

T = TypeVar("T")

LOOPS = ["asyncio", "uvloop"]
LOGGER = "msgsock.server"
KEY = b"0123456789abcdef-shared-test-key"
OTHER_KEY = b"fedcba9876543210-another-key"

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


@pytest.fixture(params=["127.0.0.1", "::1"])
def host(request: pytest.FixtureRequest) -> str:
    """The loopback address to serve on: IPv4, and IPv6 where the machine has it."""
    if request.param == "::1" and not free_loopback6():
        pytest.skip("IPv6 loopback is not available")
    return str(request.param)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Server log records at info level and above."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def run(runner: asyncio.Runner, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
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


def lines(logs: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    """The server's log lines (optionally of one level)."""
    return [
        r.getMessage() for r in logs.records if r.name == LOGGER and (level is None or r.levelno == level)
    ]


async def wait_log(logs: pytest.LogCaptureFixture, *parts: str, level: int = logging.WARNING) -> str:
    """Wait for a server log line of ``level`` holding every one of ``parts``; return it."""
    found: list[str] = []

    def match() -> bool:
        found[:] = [line for line in lines(logs, level) if all(p in line for p in parts)]
        return bool(found)

    try:
        await wait_until(match)
    except AssertionError:
        raise AssertionError(f"no log line with {parts} in {lines(logs)}") from None
    return found[0]


def frame(body: bytes) -> bytes:
    """The default frame of ``body``."""
    return struct.pack(">I", len(body)) + body


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_stream(
    port: int,
    host: str = "127.0.0.1",
    *,
    header: bytes = b"",
    tls: ssl.SSLContext | None = None,
    key: bytes | None = None,
) -> Stream:
    """A raw client: TCP connect, then a PROXY header, TLS and authentication as asked."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if header:
            writer.write(header)
            await writer.drain()
        if tls is not None:
            await writer.start_tls(tls, server_hostname=host)
        if key is not None:
            await authenticate(reader, writer, key)
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer


async def authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes) -> bytes:
    """The client side of the handshake over a stream; return every byte we sent."""
    handshake = ClientHandshake(key, new_nonce())
    sent = bytearray()
    while True:
        out = handshake.data_to_send()
        if out:
            sent += out
            writer.write(out)
        if handshake.done:
            return bytes(sent)
        data = await reader.read(4096)
        if not data:
            handshake.receive_eof()
        handshake.receive_data(data)


async def echo_ok(stream: Stream, body: bytes) -> None:
    """Send one frame and check its echo byte for byte."""
    reader, writer = stream
    writer.write(frame(body))
    assert await reader.readexactly(4 + len(body)) == frame(body)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Read until EOF (a reset also ends it)."""
    data = bytearray()
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return bytes(data)


def close_stream(stream: Stream) -> None:
    """Close a raw client at once."""
    stream[1].transport.abort()


def local_peer(stream: Stream) -> str:
    """How the server logs this client when it knows no better: its socket address."""
    return format_address(stream[1].get_extra_info("sockname"))


async def exchange(conn: aio.Connection, bodies: list[bytes]) -> None:
    """Send bodies and check each echo, byte for byte, in order."""
    for body in bodies:
        await conn.send(body)
        assert await conn.receive() == body


# -- TLS ----------------------------------------------------------------------------------


def test_tls_round_trip(
    any_loop: asyncio.Runner, host: str, pki: Pki, logs: pytest.LogCaptureFixture
) -> None:
    """The server's certificate verifies against the test CA; messages round-trip; nothing is logged as a failure."""

    async def main() -> None:
        async with await aio.serve(host=host, port=0, ssl=pki.server_context()) as server:
            conn = await aio.connect(host, server.port, ssl=pki.client_context())
            assert conn.get_extra_info("peercert") is not None
            await exchange(conn, [b"", b"over tls", b"x" * 100_000])
            peer = format_address(conn.local_address)
            await conn.close()
            await wait_log(logs, f"{peer} disconnected (3 messages in, 3 out)", level=logging.INFO)
            assert server.statistics().errors == 0
        assert f"connection from {peer}" in lines(logs, logging.INFO)
        assert not lines(logs, logging.WARNING)

    run(any_loop, main())


def test_mutual_tls(any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture) -> None:
    """A server requiring client certificates refuses a client without one (logged) and serves one with it."""

    async def main() -> None:
        context = pki.server_context(client_ca=pki.ca_cert, require_client_cert=True)
        async with await aio.serve(port=0, ssl=context, connection_handler=handler) as server:
            # TLS 1.3: the client learns of the refusal on its first read, not in connect().
            with pytest.raises((HandshakeError, ConnectionClosed)) as refused:
                conn = await aio.connect("127.0.0.1", server.port, ssl=pki.client_context())
                try:
                    await conn.send(b"no certificate")
                    await conn.receive()
                finally:
                    conn.abort()
            if isinstance(refused.value, ConnectionClosed):
                assert refused.value.kind is EndKind.TLS and not refused.value.clean
            line = await wait_log(logs, "closed: TLS handshake failed:")
            assert "certificate" in line
            conn = await aio.connect("127.0.0.1", server.port, ssl=pki.client_context(cert="client"))
            await conn.send(b"who am i")
            assert await conn.receive() == b"msgsock-test-client"
            await conn.close()
            assert server.statistics().errors == 1

    async def handler(conn: aio.Connection) -> None:
        subject = dict(item[0] for item in conn.get_extra_info("peercert")["subject"])
        async for _ in conn:
            await conn.send(subject["commonName"].encode())

    run(any_loop, main())


@pytest.mark.parametrize(
    ("cert", "trust", "why"),
    [
        ("server", "other_ca", "unable to get local issuer certificate"),
        ("expired", "ca", "certificate has expired"),
        ("other_server", "ca", "unable to get local issuer certificate"),
    ],
    ids=["wrong-ca", "expired", "untrusted-server"],
)
def test_tls_verification_failures(
    any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture, cert: str, trust: str, why: str
) -> None:
    """A certificate the client cannot trust fails connect() with the reason; the server logs the peer and counts an error."""

    async def main() -> None:
        async with await aio.serve(port=0, ssl=pki.server_context(cert=cert)) as server:
            ca = pki.other_ca_cert if trust == "other_ca" else pki.ca_cert
            with pytest.raises(HandshakeError) as caught:
                await aio.connect("127.0.0.1", server.port, ssl=pki.client_context(ca=ca))
            assert str(caught.value) == (
                f"TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {why}"
            )
            cause = caught.value.__cause__
            assert isinstance(cause, ConnectionClosed) and cause.kind is EndKind.TLS
            line = await wait_log(logs, "127.0.0.1:", "closed: TLS handshake failed:")
            assert "Traceback" not in line
            await wait_until(lambda: server.statistics().active == 0)
            stats = server.statistics()
            assert (stats.connections, stats.errors) == (1, 1)
        assert not any("connection from" in line for line in lines(logs))

    run(any_loop, main())


def test_plaintext_client_to_tls_port(
    any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture
) -> None:
    """A plain framed client on a TLS port fails; the server logs it with its peer and goes on serving TLS clients."""

    async def main() -> None:
        async with await aio.serve(port=0, ssl=pki.server_context()) as server:
            plain = await aio.connect("127.0.0.1", server.port)
            peer = format_address(plain.local_address)
            await plain.send(b"hello")
            with pytest.raises(ConnectionClosed):
                await plain.receive()
            plain.abort()
            await wait_log(logs, f"{peer} closed: TLS handshake failed:")
            conn = await aio.connect("127.0.0.1", server.port, ssl=pki.client_context())
            await exchange(conn, [b"still serving"])
            await conn.close()
            assert server.statistics().errors == 1

    run(any_loop, main())


# -- authentication -------------------------------------------------------------------


def test_auth_right_key(any_loop: asyncio.Runner, host: str, logs: pytest.LogCaptureFixture) -> None:
    """A client with the server's key is authenticated, then messages round-trip."""

    async def main() -> None:
        async with await aio.serve(host=host, port=0, auth_key=KEY) as server:
            conn = await aio.connect(host, server.port, auth_key=KEY)
            await exchange(conn, [b"authenticated", b""])
            peer = format_address(conn.local_address)
            await conn.close()
            await wait_log(logs, f"{peer} disconnected (2 messages in, 2 out)", level=logging.INFO)
            assert server.statistics().errors == 0
        assert f"connection from {peer}" in lines(logs, logging.INFO)

    run(any_loop, main())


def test_auth_wrong_key(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """A wrong key makes connect() raise HandshakeError; the server logs the refusal at warning and counts it."""

    async def main() -> None:
        async with await aio.serve(port=0, auth_key=KEY) as server:
            with pytest.raises(HandshakeError, match=r"^authentication failed: the server rejected our key$"):
                await aio.connect("127.0.0.1", server.port, auth_key=OTHER_KEY)
            await wait_log(
                logs, "127.0.0.1:", "closed: authentication failed: the peer does not know the key"
            )
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().errors == 1
            # The server goes on serving the right key.
            conn = await aio.connect("127.0.0.1", server.port, auth_key=KEY)
            await exchange(conn, [b"ok"])
            await conn.close()
        records = [r for r in logs.records if "authentication failed" in r.getMessage()]
        assert all(r.exc_info is None for r in records)

    run(any_loop, main())


def test_auth_and_tls(any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture) -> None:
    """The handshake runs inside TLS: right key works, wrong key is refused."""

    async def main() -> None:
        async with await aio.serve(port=0, ssl=pki.server_context(), auth_key=KEY) as server:
            conn = await aio.connect("127.0.0.1", server.port, ssl=pki.client_context(), auth_key=KEY)
            await exchange(conn, [b"tls and key"])
            await conn.close()
            with pytest.raises(HandshakeError, match="rejected our key"):
                await aio.connect("127.0.0.1", server.port, ssl=pki.client_context(), auth_key=OTHER_KEY)
            await wait_log(logs, "closed: authentication failed: the peer does not know the key")

    run(any_loop, main())


def test_plain_client_to_auth_server(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """A client without a key fails on the server's hello; the server logs that the client does not speak the handshake."""

    async def main() -> None:
        async with await aio.serve(port=0, auth_key=KEY) as server:
            stream = await open_stream(server.port)
            stream[1].write(frame(b"hello"))
            line = await wait_log(logs, f"{local_peer(stream)} closed: bad handshake magic")
            assert "got b'\\x00\\x00\\x00\\x05hello'" in line
            assert "does not speak the msgsock authentication handshake" in line
            close_stream(stream)
            assert server.statistics().errors == 1
            # The library client without a key sees the server's hello as a bad frame.
            conn = await aio.connect("127.0.0.1", server.port)
            with pytest.raises(ConnectionClosed, match="exceeds max_size") as info:
                await conn.receive()
            assert info.value.kind is EndKind.MESSAGE_TOO_LARGE
            conn.abort()

    run(any_loop, main())


def test_keyed_client_to_plain_server(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """A client with a key meeting a server without one raises HandshakeError saying the server has no key."""

    async def main() -> None:
        async with await aio.serve(port=0) as server:
            with pytest.raises(HandshakeError, match="before its authentication hello"):
                await aio.connect("127.0.0.1", server.port, auth_key=KEY)
            await wait_log(logs, "exceeds max_size")

    run(any_loop, main())


def test_truncated_handshake(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """A client that sends half its hello and closes is logged with how far it got."""

    async def main() -> None:
        async with await aio.serve(port=0, auth_key=KEY) as server:
            stream = await open_stream(server.port)
            hello = ClientHandshake(KEY, new_nonce()).data_to_send()
            stream[1].write(hello[:20])
            stream[1].write_eof()
            data = await read_to_end(stream[0])
            assert len(data) == HELLO_SIZE  # the server's hello, then its close
            await wait_log(logs, f"{local_peer(stream)} closed:", "after 20 of the 45 bytes")
            close_stream(stream)
            assert server.statistics().errors == 1

    run(any_loop, main())


def test_replayed_response_is_rejected(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """The bytes of a successful client, replayed on a new connection, are refused (the server's nonce is new)."""

    async def main() -> None:
        async with await aio.serve(port=0, auth_key=KEY) as server:
            first = await open_stream(server.port)
            recorded = await authenticate(*first, KEY)
            await echo_ok(first, b"genuine")
            close_stream(first)
            replay = await open_stream(server.port)
            replay[1].write(recorded)
            data = await read_to_end(replay[0])
            assert data[HELLO_SIZE:] == b"\x00"  # the rejection byte, then the close
            await wait_log(logs, f"{local_peer(replay)} closed: authentication failed")
            close_stream(replay)
            assert server.statistics().errors == 1

    run(any_loop, main())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"proxy_protocol": True}, "handshake timeout: no PROXY header within"),
        ({"tls": True}, "handshake timeout: the TLS handshake did not complete within"),
        ({"auth_key": KEY}, "handshake timeout: the authentication handshake did not complete within"),
    ],
    ids=["proxy", "tls", "auth"],
)
def test_silent_client_times_out(
    any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture, options: dict[str, Any], expected: str
) -> None:
    """A client that connects and says nothing is closed at the handshake timeout and logged with the stage."""
    timeout = unit(0.3)

    async def main() -> None:
        kwargs = dict(options)
        if kwargs.pop("tls", False):
            kwargs["ssl"] = pki.server_context()
        limits = Limits(handshake_timeout=timeout)
        async with await aio.serve(port=0, limits=limits, **kwargs) as server:
            loop = asyncio.get_running_loop()
            start = loop.time()
            stream = await open_stream(server.port)
            await read_to_end(stream[0])
            elapsed = loop.time() - start
            line = await wait_log(logs, f"{local_peer(stream)} closed: {expected} {timeout:g} s")
            close_stream(stream)
            assert timeout * 0.9 <= elapsed < timeout + unit(5), line
            assert server.statistics().errors == 1

    run(any_loop, main())


def test_shutdown_during_handshake(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """Closing the server drops connections still in their handshake at once, without counting errors."""

    async def main() -> None:
        server = await aio.serve(port=0, auth_key=KEY, proxy_protocol=True)
        stream = await open_stream(server.port)
        try:
            await wait_until(lambda: server.statistics().active == 1)
            server.close()
            await asyncio.wait_for(server.wait_closed(), unit(5))
            assert await read_to_end(stream[0]) == b""
        finally:
            close_stream(stream)
            server.close()
        await wait_log(logs, "closed during the handshake: server shutting down", level=logging.INFO)
        assert server.statistics().errors == 0

    run(any_loop, main())


# -- PROXY protocol -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROXIED))
def test_proxy_header_gives_the_peer(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture, name: str
) -> None:
    """After a valid header the logged peer is the proxied client (the socket's own for LOCAL) and echo works.

    A ``LOCAL`` connection (a load balancer's own) is logged on arrival at debug level only.
    """
    info = PROXIED[name]
    logs.set_level(logging.DEBUG, logger=LOGGER)
    arrival = logging.DEBUG if info.command == "LOCAL" else logging.INFO

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True) as server:
            stream = await open_stream(server.port, header=serialize(info))
            peer = format_address(info.source) if info.source is not None else local_peer(stream)
            await echo_ok(stream, b"through the balancer")
            await echo_ok(stream, b"")
            stream[1].write_eof()
            assert await read_to_end(stream[0]) == b""
            close_stream(stream)
            await wait_log(logs, f"{peer} disconnected (2 messages in, 2 out)", level=logging.INFO)
            assert server.statistics().errors == 0
        assert f"connection from {peer}" in lines(logs, arrival)

    run(any_loop, main())


def test_proxy_header_frames_in_the_same_write(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture
) -> None:
    """Frames sent in the same write as the header are served (the bytes after the header are kept)."""

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True) as server:
            header = serialize(PROXIED["v1-tcp4"])
            stream = await open_stream(server.port, header=header + frame(b"one") + frame(b"two"))
            assert await stream[0].readexactly(14) == frame(b"one") + frame(b"two")
            close_stream(stream)

    run(any_loop, main())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_proxy_connection_handler_sees_the_client(
    any_loop: asyncio.Runner, pki: Pki, host: str, tls: bool
) -> None:
    """A per-connection handler gets the proxied client as peer_address and the header as proxy_info."""
    info = PROXIED["v2-tcp6-tlvs"]
    seen: list[aio.Connection] = []

    async def handler(conn: aio.Connection) -> None:
        seen.append(conn)
        async for message in conn:
            await conn.send(message[::-1])

    async def main() -> None:
        context = pki.server_context() if tls else None
        async with await aio.serve(
            host=host, port=0, proxy_protocol=True, ssl=context, connection_handler=handler
        ) as server:
            client_context = pki.client_context() if tls else None
            stream = await open_stream(server.port, host, header=serialize(info), tls=client_context)
            stream[1].write(frame(b"abc"))
            assert await stream[0].readexactly(7) == frame(b"cba")
            close_stream(stream)
        (conn,) = seen
        assert conn.peer_address == info.source
        assert conn.proxy_info is not None
        assert (conn.proxy_info.source, conn.proxy_info.tlvs[PP2_TYPE_ALPN]) == (info.source, b"msgsock")

    run(any_loop, main())


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
def test_bad_proxy_header_is_refused(
    any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture, sent: bytes, reason: str
) -> None:
    """A malformed, truncated or missing header closes the connection, logged with the socket's peer and why."""

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True) as server:
            stream = await open_stream(server.port)
            stream[1].write(sent)
            stream[1].write_eof()
            assert await read_to_end(stream[0]) == b""
            await wait_log(logs, f"{local_peer(stream)} closed: {reason}")
            close_stream(stream)
            # Other connections are unaffected.
            good = await open_stream(server.port, header=serialize(PROXIED["v1-tcp4"]))
            await echo_ok(good, b"fine")
            close_stream(good)
            assert server.statistics().errors == 1

    run(any_loop, main())


@pytest.mark.parametrize("name", ["v1-tcp4", "v2-tcp6-tlvs", "v2-local"])
def test_proxy_then_tls(
    any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture, name: str
) -> None:
    """A PROXY header in clear, then TLS: the header is not read past, the TLS peer is the proxied client."""
    info = PROXIED[name]
    logs.set_level(logging.DEBUG, logger=LOGGER)
    arrival = logging.DEBUG if info.command == "LOCAL" else logging.INFO

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True, ssl=pki.server_context()) as server:
            stream = await open_stream(server.port, header=serialize(info), tls=pki.client_context())
            peer = format_address(info.source) if info.source is not None else local_peer(stream)
            await echo_ok(stream, b"proxied and encrypted")
            close_stream(stream)
            await wait_until(lambda: server.statistics().active == 0)
            assert server.statistics().messages_received == 1
        assert f"connection from {peer}" in lines(logs, arrival)

    run(any_loop, main())


@pytest.mark.parametrize("name", ["v1-tcp4", "v2-tcp4-tlvs"])
def test_proxy_header_and_client_hello_in_one_write(
    any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture, name: str
) -> None:
    """The header and the ClientHello in one segment: the server reads only the header before TLS starts."""
    info = PROXIED[name]

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=unit(5)) as sock:
            tls = MemoryTls(sock, pki.client_context(), "127.0.0.1")
            tls.handshake(prefix=serialize(info))
            tls.send(frame(b"coalesced"))
            return tls.recv_exactly(13)

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True, ssl=pki.server_context()) as server:
            assert await asyncio.to_thread(client, server.port) == frame(b"coalesced")
            await wait_log(logs, f"connection from {format_address(info.source)}", level=logging.INFO)

    run(any_loop, main())


def test_max_connections_counts_handshakes(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """Connections still in their handshake count against max_connections; one over is refused and logged."""

    async def main() -> None:
        limits = Limits(max_connections=1)
        async with await aio.serve(port=0, proxy_protocol=True, limits=limits) as server:
            first = await open_stream(server.port)
            await wait_until(lambda: server.statistics().active == 1)
            second = await open_stream(server.port)
            assert await read_to_end(second[0]) == b""
            await wait_log(logs, f"{local_peer(second)} rejected: 1 connections open (limit 1)")
            assert server.statistics().rejected == 1
            close_stream(second)
            first[1].write(serialize(PROXIED["v1-tcp4"]))
            await echo_ok(first, b"admitted")
            close_stream(first)

    run(any_loop, main())


def test_proxy_then_tls_failure_logs_the_proxied_peer(
    any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture
) -> None:
    """A TLS failure after a valid header is logged with the proxied client."""
    info = PROXIED["v1-tcp4"]

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True, ssl=pki.server_context()) as server:
            with pytest.raises(ssl.SSLCertVerificationError):
                await open_stream(
                    server.port, header=serialize(info), tls=pki.client_context(ca=pki.other_ca_cert)
                )
            # asyncio's client closes without sending its alert: the server sees the end.
            line = await wait_log(logs, "during the TLS handshake")
            assert line.startswith(f"{format_address(info.source)} closed: ")

    run(any_loop, main())


def test_proxy_then_auth(any_loop: asyncio.Runner, logs: pytest.LogCaptureFixture) -> None:
    """PROXY header then authentication: the right key is served, a wrong one is logged with the proxied client."""
    info = PROXIED["v2-tcp4-tlvs"]
    peer = format_address(info.source)

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True, auth_key=KEY) as server:
            good = await open_stream(server.port, header=serialize(info), key=KEY)
            await echo_ok(good, b"proxied and authenticated")
            close_stream(good)
            await wait_log(logs, f"{peer} disconnected (1 messages in, 1 out)", level=logging.INFO)
            with pytest.raises(HandshakeError, match="rejected our key"):
                await open_stream(server.port, header=serialize(info), key=OTHER_KEY)
            line = await wait_log(logs, "closed: authentication failed: the peer does not know the key")
            assert line.startswith(f"{peer} closed: ")
            assert server.statistics().errors == 1

    run(any_loop, main())


def test_proxy_tls_and_auth(any_loop: asyncio.Runner, pki: Pki, logs: pytest.LogCaptureFixture) -> None:
    """All three stages in order (PROXY, TLS, auth), then frames, with one handshake deadline."""
    info = PROXIED["v1-tcp6"]

    async def main() -> None:
        async with await aio.serve(
            port=0, proxy_protocol=True, ssl=pki.server_context(), auth_key=KEY
        ) as server:
            stream = await open_stream(server.port, header=serialize(info), tls=pki.client_context(), key=KEY)
            await echo_ok(stream, b"all three")
            close_stream(stream)
            await wait_until(lambda: server.statistics().active == 0)
        assert f"connection from {format_address(info.source)}" in lines(logs, logging.INFO)

    run(any_loop, main())


@pytest.mark.parametrize("ending", ["reset", "close"])
def test_health_check_is_no_error(
    any_loop: asyncio.Runner, caplog: pytest.LogCaptureFixture, ending: str
) -> None:
    """A PROXY v2 LOCAL header then the end (HAProxy's check-send-proxy) is a health check: debug log, no error."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def main() -> None:
        async with await aio.serve(port=0, proxy_protocol=True) as server:
            sock = socket.create_connection(("127.0.0.1", server.port))
            try:
                peer = format_address(sock.getsockname())
                await wait_until(lambda: server.statistics().active == 1)  # its address is known
                sock.sendall(serialize(PROXIED["v2-local"]))
                if ending == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()
            await wait_until(lambda: server.statistics().active == 0)
            assert f"{peer} health check (PROXY LOCAL)" in lines(caplog, logging.DEBUG)
            stats = server.statistics()
            assert (stats.health_checks, stats.errors, stats.connections) == (1, 0, 1)
            assert "1 health checks" in stats.summary()
        assert not lines(caplog, logging.WARNING)
        assert not lines(caplog, logging.INFO)  # nothing but debug lines for a health check

    run(any_loop, main())


def test_connect_timeout_names_the_stage(any_loop: asyncio.Runner) -> None:
    """A server that accepts but never answers the handshake makes connect() raise Timeout naming the stage."""

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        try:
            port = listener.getsockname()[1]
            with pytest.raises(Timeout) as info:
                await aio.connect("127.0.0.1", port, auth_key=KEY, connect_timeout=unit(0.2))
            assert str(info.value) == (
                f"connecting to 127.0.0.1:{port}: handshake timeout: "
                f"the authentication handshake did not complete within {unit(0.2):g} s"
            )
        finally:
            listener.close()

    run(any_loop, main())
