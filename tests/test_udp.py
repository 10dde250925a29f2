"""Tests of the datagram endpoints (msgsock.udp; SPEC §5.4): sync and asyncio, IPv4 and IPv6."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from msgsock.app.udp import run_udp_client, run_udp_server
from msgsock.exceptions import MessageTooLarge, OversizeMessage, Timeout
from msgsock.framing import Message
from msgsock.udp import (
    DEFAULT_MAX_SIZE,
    AsyncUdpClient,
    UdpClient,
    UdpServer,
    open_udp_client,
    serve_udp,
)
from msgsock.udp.core import DatagramServerProtocol
from tests.helpers import free_loopback6, unit, wait_for

T = TypeVar("T")

LOGGER = "msgsock.server"
LINUX = sys.platform.startswith("linux")

HOSTS = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param(
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available"),
    ),
]


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Plain sockets a test opens; closed at the end whatever happens."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def silent_socket(host: str, sockets: list[socket.socket]) -> socket.socket:
    """A bound UDP socket that never replies (what a lost reply looks like)."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sockets.append(sock)
    sock.bind((host, 0))
    return sock


def closed_port(host: str) -> int:
    """A UDP port nothing is bound to (bound once, then closed): ICMP port unreachable."""
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def reverse(message: bytes) -> bytes:
    return message[::-1]


class DropFirst:
    """A handler that ignores the first datagram and echoes the rest (a lost datagram)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, message: bytes) -> bytes | None:
        self.calls += 1
        return None if self.calls == 1 else message


@pytest.fixture
def server_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


BODIES = [b"hello", b"", b"a\x00b\x00", os.urandom(1200), bytes(range(256)) * 255 + b"xy"]  # last: 65282 B


# -- blocking server and client -------------------------------------------------------------------


def test_sync_echo_round_trip(host: str) -> None:
    """Each datagram comes back whole, NUL bytes, empty and near-maximal ones included; counters add up."""
    with UdpServer(lambda m: m, host, 0) as server, UdpClient(host, server.port, timeout=unit(2)) as client:
        assert server.address[0] == host
        for body in BODIES:
            assert client.request(body) == body
        wait_for(lambda: server.statistics().messages_sent == len(BODIES))
        stats = server.statistics()
    assert stats.messages_received == len(BODIES)
    assert stats.bytes_received == stats.bytes_sent == sum(len(b) for b in BODIES)
    assert stats.errors == 0


def test_sync_largest_datagram_round_trip(host: str) -> None:
    """A datagram of exactly max_size (65507 bytes) goes through both ways."""
    body = os.urandom(DEFAULT_MAX_SIZE)
    with UdpServer(lambda m: m, host, 0) as server, UdpClient(host, server.port, timeout=unit(2)) as client:
        assert client.request(body) == body


def test_sync_reverse_handler(host: str) -> None:
    """The server sends back whatever the handler returns: here the message reversed (MultiSoc)."""
    with UdpServer(reverse, host, 0) as server, UdpClient(host, server.port, timeout=unit(2)) as client:
        assert client.request(b"stressed") == b"desserts"
        assert client.request(b"a\x00b") == b"b\x00a"


def test_sync_send_to_and_receive_from(host: str) -> None:
    """send_to and receive_from give the reply and the server's address."""
    with UdpServer(reverse, host, 0) as server, UdpClient(host, server.port, timeout=unit(2)) as client:
        client.send_to(b"abc")
        data, address = client.receive_from()
        assert data == b"cba"
        assert address[:2] == server.address[:2]
        client.send_to(b"xyz", server.address)
        assert client.receive_from(unit(2))[0] == b"zyx"


def test_sync_receive_from_times_out(host: str, sockets: list[socket.socket]) -> None:
    """receive_from raises Timeout when nothing arrives."""
    silent = silent_socket(host, sockets)
    with UdpClient(host, silent.getsockname()[1]) as client, pytest.raises(Timeout, match="within"):
        client.receive_from(unit(0.05))


def test_sync_oversize_send_is_rejected_before_sending(host: str, sockets: list[socket.socket]) -> None:
    """A datagram of ours above max_size raises OversizeMessage (API misuse) and nothing reaches the peer."""
    peer = silent_socket(host, sockets)
    with UdpClient(host, peer.getsockname()[1], max_size=100) as client:
        with pytest.raises(OversizeMessage) as info:
            client.request(b"x" * 101)
        assert (info.value.size, info.value.max_size) == (101, 100)
        assert not isinstance(info.value, MessageTooLarge)  # not the peer's fault
        with pytest.raises(OversizeMessage):
            client.send_to(b"y" * 101)
        client.send_to(b"z" * 100)  # exactly max_size is fine
    peer.settimeout(unit(2))
    assert peer.recv(1000) == b"z" * 100  # the first datagram the peer got


def test_sync_oversize_datagram_is_dropped_and_logged(
    host: str, sockets: list[socket.socket], server_logs: pytest.LogCaptureFixture
) -> None:
    """A received datagram above max_size is dropped, counted and logged with peer and sizes; serving goes on."""
    with UdpServer(lambda m: m, host, 0, max_size=100) as server:
        raw = socket.socket(family_of(host), socket.SOCK_DGRAM)
        sockets.append(raw)
        raw.bind((host, 0))
        raw.sendto(b"x" * 1000, server.address)
        raw.sendto(b"y" * 101, server.address)
        with UdpClient(host, server.port, timeout=unit(2), max_size=100) as client:
            assert client.request(b"z" * 100) == b"z" * 100
        stats = server.statistics()
    assert stats.errors == 2
    assert stats.error_kinds == {"message too large": 2}
    assert stats.messages_received == 1
    warnings = [r.getMessage() for r in server_logs.records if r.levelno == logging.WARNING]
    peer = raw.getsockname()
    where = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
    assert len(warnings) == 2
    assert all(where in w and "max_size 100" in w for w in warnings)
    if LINUX:  # MSG_TRUNC gives the real size
        assert "1000 bytes" in warnings[0] and "101 bytes" in warnings[1]


def test_sync_client_rejects_oversize_reply(host: str) -> None:
    """A reply above the client's max_size raises MessageTooLarge instead of being truncated."""
    with (
        UdpServer(lambda m: b"r" * 50, host, 0) as server,
        UdpClient(host, server.port, timeout=unit(2), max_size=10) as client,
        pytest.raises(MessageTooLarge),
    ):
        client.request(b"hi")


def test_sync_timeout_and_retries_against_silent_socket(host: str, sockets: list[socket.socket]) -> None:
    """Against a socket that never replies, request sends retries + 1 times, then a clear Timeout."""
    silent = silent_socket(host, sockets)
    port = silent.getsockname()[1]
    timeout = unit(0.1)
    with UdpClient(host, port, timeout=timeout, retries=2) as client, pytest.raises(Timeout) as info:
        client.request(b"anyone?")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert str(info.value) == f"no reply from {where} after 3 tries of {timeout:g} s"
    silent.settimeout(unit(2))
    assert [silent.recv(100) for _ in range(3)] == [b"anyone?"] * 3
    silent.setblocking(False)
    with pytest.raises(BlockingIOError):
        silent.recv(100)


def test_sync_port_unreachable(host: str) -> None:
    """ICMP port unreachable counts as no reply, and the Timeout says the port was unreachable."""
    port = closed_port(host)
    with UdpClient(host, port, timeout=unit(0.1), retries=1) as client, pytest.raises(Timeout) as info:
        client.request(b"hello?")
    assert "after 2 tries" in str(info.value)
    assert str(info.value).endswith("(port unreachable)")


def test_sync_retry_gets_reply_after_lost_datagram(host: str) -> None:
    """When the server drops the first datagram, the client's resend gets the reply."""
    handler = DropFirst()
    with (
        UdpServer(handler, host, 0) as server,
        UdpClient(host, server.port, timeout=unit(0.3), retries=3) as client,
    ):
        assert client.request(b"second time lucky") == b"second time lucky"
    assert handler.calls >= 2


def test_sync_handler_exception_is_logged_and_serving_goes_on(
    host: str, server_logs: pytest.LogCaptureFixture
) -> None:
    """A handler that raises costs that datagram its reply (logged, counted), not the server."""

    def picky(message: bytes) -> bytes:
        if message == b"bad":
            raise ValueError("no thanks")
        return message

    with UdpServer(picky, host, 0) as server, UdpClient(host, server.port, timeout=unit(0.1), retries=0) as c:
        with pytest.raises(Timeout):
            c.request(b"bad")
        c.timeout = unit(2)
        assert c.request(b"good") == b"good"
        stats = server.statistics()
        assert stats.errors == 1 and stats.error_kinds == {"handler error": 1}
    errors = [r for r in server_logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().endswith(": handler raised ValueError: no thanks; no reply")
    assert errors[0].exc_info is not None


def test_sync_reply_above_max_size_is_dropped(host: str, server_logs: pytest.LogCaptureFixture) -> None:
    """A handler reply above the server's max_size is not sent; it is logged and counted."""
    with (
        UdpServer(lambda m: m * 20, host, 0, max_size=100) as server,
        UdpClient(host, server.port, timeout=unit(0.1), retries=0) as client,
    ):
        with pytest.raises(Timeout):
            client.request(b"0123456789")
        stats = server.statistics()
        assert stats.errors == 1 and stats.error_kinds == {"handler error": 1}  # the handler's fault
    errors = [r.getMessage() for r in server_logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "reply dropped" in errors[0] and "200 bytes" in errors[0]


class Picky:
    """A handler that answers ``good`` and gets ``bad`` wrong: it returns ``str`` (or raises)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __call__(self, message: bytes) -> Any:
        if message != b"bad":
            return message
        if self.fault == "raise":
            raise ValueError("boom")
        if self.fault == "int":
            return 42
        return "not bytes"


WRONG_REPLIES = [
    pytest.param("str", "handler returned str; expected bytes, bytearray, memoryview or None", id="str"),
    pytest.param("int", "handler returned int; expected bytes, bytearray, memoryview or None", id="int"),
    pytest.param("raise", "handler raised ValueError: boom", id="raise"),
]


@pytest.mark.parametrize(("fault", "reason"), WRONG_REPLIES)
def test_sync_wrong_reply_never_kills_the_server(
    host: str, server_logs: pytest.LogCaptureFixture, fault: str, reason: str
) -> None:
    """A handler that returns str (or another wrong type, or raises) gets the TCP servers' reply check:
    that datagram gets no reply, one error line, one `handler error`; the server thread serves on."""
    with (
        UdpServer(Picky(fault), host, 0) as server,
        UdpClient(host, server.port, timeout=unit(0.1), retries=0) as client,
    ):
        for _ in range(2):
            with pytest.raises(Timeout):
                client.request(b"bad")
        client.timeout = unit(2)
        assert client.request(b"good") == b"good"  # the thread is alive
        wait_for(lambda: server.statistics().messages_sent == 1)  # counted just after the send
        stats = server.statistics()
    assert (stats.errors, stats.error_kinds) == (2, {"handler error": 2})
    assert stats.messages_received == 3 and stats.messages_sent == 1
    errors = [r for r in server_logs.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().split(": ", 1)[1] for r in errors] == [f"{reason}; no reply"] * 2
    assert all(r.getMessage().split(": ", 1)[0].startswith(("127.0.0.1:", "[::1]:")) for r in errors)
    assert all((r.exc_info is not None) == (fault == "raise") for r in errors)  # a traceback for a raise


def test_sync_server_refuses_a_coroutine_handler(
    server_logs: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """A coroutine function on the blocking server is a wrong reply (counted, logged), never a dead thread
    or a "coroutine was never awaited" warning."""

    async def echo(message: bytes) -> bytes:
        return message

    with (
        UdpServer(echo, "127.0.0.1", 0) as server,  # type: ignore[arg-type]  # the misuse under test
        UdpClient("127.0.0.1", server.port, timeout=unit(0.1), retries=0) as client,
    ):
        with pytest.raises(Timeout):
            client.request(b"x")
        wait_for(lambda: server.statistics().errors == 1)
        assert server.statistics().error_kinds == {"handler error": 1}
    errors = [r.getMessage() for r in server_logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "an async handler needs the asyncio server" in errors[0]
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_sync_message_reply_keeps_working() -> None:
    """A handler may return a msgsock Message (a bytes subclass): it is sent as its bytes."""
    with (
        UdpServer(lambda m: Message(m.upper(), {"kind": 1}), "127.0.0.1", 0) as server,
        UdpClient("127.0.0.1", server.port, timeout=unit(2)) as client,
    ):
        assert client.request(b"abc") == b"ABC"


def test_sync_host_name_is_resolved() -> None:
    """A host name is resolved and its addresses tried in order (ICMP refusals move to the next)."""
    with (
        UdpServer(reverse, "127.0.0.1", 0) as server,
        UdpClient("localhost", server.port, timeout=unit(2)) as c,
    ):
        assert c.request(b"name") == b"eman"
        assert c.server_address[0] == "127.0.0.1"


def two_addresses(port: int) -> list[tuple[int, Any]]:
    """``::1`` first (nothing listens there), then ``127.0.0.1``: what a name like localhost may give."""
    return [(socket.AF_INET6, ("::1", port, 0, 0)), (socket.AF_INET, ("127.0.0.1", port))]


@pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available")
def test_sync_refused_address_gives_way_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host's addresses are tried in order: one whose port is unreachable gives way to the next."""
    from msgsock.udp import _endpoint

    with UdpServer(reverse, "127.0.0.1", 0) as server:
        monkeypatch.setattr(_endpoint, "resolve", lambda host, port, family: two_addresses(port))
        with UdpClient("dual", server.port, timeout=unit(2), retries=0) as client:
            assert client.server_address[0] == "::1"
            assert client.request(b"ipv4 after all") == b"lla retfa 4vpi"
            assert client.server_address[0] == "127.0.0.1"


@pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available")
def test_async_refused_address_gives_way_to_the_next(runner: asyncio.Runner) -> None:
    """The asyncio client also moves to the host's next address on port unreachable."""

    async def main() -> None:
        async with await serve_udp(reverse, "127.0.0.1", 0) as server:
            client = AsyncUdpClient("dual", two_addresses(server.port), unit(2), 0, DEFAULT_MAX_SIZE)
            async with client:
                assert await client.request(b"abc") == b"cba"
                assert client.server_address[0] == "127.0.0.1"

    run(runner, main())


def test_sync_server_lifecycle() -> None:
    """shutdown is idempotent, start after shutdown is refused, a closed client refuses requests."""
    from msgsock.exceptions import InvalidState

    server = UdpServer(lambda m: m, "127.0.0.1", 0)
    server.start()
    server.start()
    done = threading.Event()

    def serve() -> None:
        server.serve_forever()
        done.set()

    waiter = threading.Thread(target=serve, daemon=True)
    waiter.start()
    server.shutdown()
    server.shutdown()
    assert done.wait(unit(5))
    with pytest.raises(InvalidState):
        server.start()
    client = UdpClient("127.0.0.1", server.port)
    client.close()
    client.close()
    with pytest.raises(InvalidState):
        client.request(b"x")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": math.nan},
        {"timeout": math.inf},
        {"retries": -1},
        {"max_size": 70000},
        {"max_size": -1},
    ],
)
def test_bad_options_are_value_errors(kwargs: dict[str, Any]) -> None:
    """Impossible timeouts, retry counts and sizes are rejected at construction, naming the argument and value."""
    (name, value), *_ = kwargs.items()
    with pytest.raises(ValueError, match=rf"^{name} {re.escape(repr(value))}: must be"):
        UdpClient("127.0.0.1", 9, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": "1"}, r"^timeout must be a number of seconds, got str$"),
        ({"retries": 2.0}, r"^retries must be an int, got float$"),
        ({"max_size": "100"}, r"^max_size must be an int, got str$"),
    ],
)
def test_wrong_typed_options_are_type_errors(kwargs: dict[str, Any], match: str) -> None:
    """An option of the wrong type is a TypeError naming it, before any name is resolved."""
    with pytest.raises(TypeError, match=match):
        UdpClient("no-such-host.invalid", 9, **kwargs)
    if "max_size" in kwargs:
        with pytest.raises(TypeError, match=match):
            UdpServer(reverse, "127.0.0.1", 0, max_size=kwargs["max_size"])


def test_server_max_size_is_checked_before_binding() -> None:
    """UdpServer(max_size=70000) names the value and the bound; nothing is bound."""
    with pytest.raises(ValueError, match=r"^max_size 70000: must be 0\.\.65535, the largest UDP payload$"):
        UdpServer(reverse, "127.0.0.1", 0, max_size=70000)


BAD_WAITS: list[tuple[Any, type[Exception], str]] = [
    (-1, ValueError, r"^timeout -1: must be >= 0 seconds or None$"),
    (math.nan, ValueError, r"^timeout nan: must be >= 0 seconds or None$"),
    ("1", TypeError, r"^timeout must be a number of seconds or None, got str$"),
    (True, TypeError, r"^timeout must be a number of seconds or None, got bool$"),
]


@pytest.mark.parametrize(("timeout", "error", "match"), BAD_WAITS, ids=[repr(t) for t, _, _ in BAD_WAITS])
def test_sync_shutdown_refuses_a_bad_timeout_and_serves_on(
    timeout: Any, error: type[Exception], match: str
) -> None:
    """shutdown(timeout=-1, nan, "1") is refused at the call; the server goes on serving."""
    with UdpServer(reverse, "127.0.0.1", 0) as server:
        with pytest.raises(error, match=match):
            server.shutdown(timeout)
        with UdpClient("127.0.0.1", server.port, timeout=unit(2)) as client:
            assert client.request(b"still here") == b"ereh llits"


@pytest.mark.parametrize(("timeout", "error", "match"), BAD_WAITS, ids=[repr(t) for t, _, _ in BAD_WAITS])
def test_sync_receive_from_refuses_a_bad_timeout(timeout: Any, error: type[Exception], match: str) -> None:
    """receive_from(timeout=-1, nan, "1") is refused at the call, and nothing queued is lost."""
    with UdpServer(reverse, "127.0.0.1", 0) as server, UdpClient("127.0.0.1", server.port) as client:
        client.send_to(b"kept")
        with pytest.raises(error, match=match):
            client.receive_from(timeout)
        assert client.receive_from(unit(2))[0] == b"tpek"


def test_sync_receive_from_zero_and_infinite_waits(sockets: list[socket.socket]) -> None:
    """receive_from(0) takes only what is queued (Timeout at once); receive_from(inf) waits for the datagram."""
    with UdpServer(reverse, "127.0.0.1", 0) as server, UdpClient("127.0.0.1", server.port) as client:
        with pytest.raises(Timeout, match=r"within 0 s$"):
            client.receive_from(0)
        client.send_to(b"forever")
        assert client.receive_from(math.inf)[0] == b"reverof"


def test_sync_send_to_checks_its_arguments(sockets: list[socket.socket]) -> None:
    """send_to refuses a non-bytes message, an address that is no (host, port) tuple, a port above 65535."""
    peer = silent_socket("127.0.0.1", sockets)
    with UdpClient("127.0.0.1", peer.getsockname()[1]) as client:
        with pytest.raises(TypeError, match=r"^message must be bytes-like, got str$"):
            client.send_to("text")  # type: ignore[arg-type]  # the misuse under test
        with pytest.raises(TypeError, match=r"^message must be bytes-like, got str$"):
            client.request("text")  # type: ignore[arg-type]  # the misuse under test
        with pytest.raises(TypeError, match=r"^address must be a \(host, port\) tuple, got str$"):
            client.send_to(b"x", "127.0.0.1:9")
        with pytest.raises(ValueError, match=r"^port 70000: must be 0\.\.65535$"):
            client.send_to(b"x", ("127.0.0.1", 70000))
        client.send_to(b"ok", peer.getsockname())
    peer.settimeout(unit(2))
    assert peer.recv(100) == b"ok"  # the first datagram the peer got


def flood(
    server_port: int, host: str, count: int, sockets: list[socket.socket], body: bytes = b"bad"
) -> None:
    """Send ``count`` datagrams of ``body``, each batch of 25 followed by a probe; return once all were handled.

    The server reads its socket in order: once a probe is echoed, every datagram
    before it was handled (and the kernel's buffer never overflows).
    """
    raw = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sockets.append(raw)
    raw.settimeout(unit(10))
    raw.connect((host, server_port))
    for start in range(0, count, 25):
        for _ in range(min(25, count - start)):
            raw.send(body)
        raw.send(b"probe")
        assert raw.recv(1000) == b"probe"


def raises_on_bad(message: bytes) -> bytes:
    if message == b"bad":
        raise ValueError("boom")
    return message


def check_flood_log(records: list[logging.LogRecord], count: int) -> None:
    """5 handler errors in full (with tracebacks), then summaries that count the rest exactly."""
    errors = [r for r in records if r.levelno == logging.ERROR]
    full = [r for r in errors if r.getMessage().endswith("handler raised ValueError: boom; no reply")]
    summaries = [r.getMessage() for r in errors if r.getMessage().startswith("... and ")]
    assert len(full) == 5 and all(r.exc_info is not None for r in full)
    assert len(errors) == 5 + len(summaries) and summaries, [r.getMessage() for r in errors]
    pattern = re.compile(
        r"^\.\.\. and (\d+) more handler errors from (127\.0\.0\.1|\[::1\]):\d+ in the last [\d.]+ s$"
    )
    matches = [pattern.match(text) for text in summaries]
    assert all(matches), summaries
    assert sum(int(m.group(1)) for m in matches if m) == count - 5


def test_sync_handler_error_flood_is_rate_limited(
    host: str, sockets: list[socket.socket], server_logs: pytest.LogCaptureFixture
) -> None:
    """200 datagrams whose handler raises: 5 error lines in full, then one summary, not 200 tracebacks."""
    with UdpServer(raises_on_bad, host, 0) as server:
        flood(server.port, host, 200, sockets)
        stats = server.statistics()
    assert (stats.errors, stats.error_kinds) == (200, {"handler error": 200})
    check_flood_log(server_logs.records, 200)


def test_sync_flood_summary_is_logged_without_more_traffic(
    sockets: list[socket.socket], server_logs: pytest.LogCaptureFixture
) -> None:
    """The server thread wakes when a summary is due: a flood that stopped is reported while serving."""
    server = UdpServer(raises_on_bad, "127.0.0.1", 0, max_size=100)
    try:
        # A short interval in place of 10 s, so the test need not wait (the pump reads it from its protocol).
        server._protocol = DatagramServerProtocol(
            100, log=logging.getLogger(LOGGER).log, lock=threading.Lock(), warning_interval=unit(0.2)
        )
        server.start()
        flood(server.port, "127.0.0.1", 20, sockets, body=b"o" * 200)
        wait_for(
            lambda: any("more datagrams above max_size 100" in r.getMessage() for r in server_logs.records)
        )
        assert server.statistics().error_kinds == {"message too large": 20}
    finally:
        server.shutdown()
    summaries = [r.getMessage() for r in server_logs.records if r.getMessage().startswith("... and ")]
    port = sockets[0].getsockname()[1]
    expected = rf"\.\.\. and 15 more datagrams above max_size 100 dropped from 127\.0\.0\.1:{port} in the last [\d.]+ s"
    assert len(summaries) == 1 and re.fullmatch(expected, summaries[0]), summaries


def test_bind_failure_is_oserror(sockets: list[socket.socket]) -> None:
    """A port already in use fails in the constructor with OSError."""
    taken = silent_socket("127.0.0.1", sockets)
    with pytest.raises(OSError):
        UdpServer(lambda m: m, "127.0.0.1", taken.getsockname()[1])


# -- asyncio --------------------------------------------------------------------------------------

LOOPS = ["asyncio", "uvloop"]


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@pytest.fixture(params=LOOPS)
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    """An asyncio.Runner on the stock event loop and on uvloop."""
    with asyncio.Runner(loop_factory=_loop_factory(request.param)) as r:
        yield r


def run(runner: asyncio.Runner, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` with an overall (scaled) deadline."""
    return runner.run(asyncio.wait_for(coro, unit(20)))


def test_async_echo_round_trip(runner: asyncio.Runner, host: str) -> None:
    """The asyncio server and client exchange whole datagrams, empty and NUL-laden ones included."""

    async def main() -> None:
        async with await serve_udp(lambda m: m, host, 0) as server:
            assert server.address[0] == host and server.is_serving()
            async with await open_udp_client(host, server.port, timeout=unit(2)) as client:
                for body in BODIES:
                    assert await client.request(body) == body
                await client.send_to(b"raw")
                data, address = await client.receive_from()
                assert data == b"raw" and address[:2] == server.address[:2]
            stats = server.statistics()
        assert stats.messages_received == stats.messages_sent == len(BODIES) + 1
        assert not server.is_serving()

    run(runner, main())


def test_async_reverse_and_coroutine_handler(runner: asyncio.Runner, host: str) -> None:
    """A coroutine handler's result is the reply; a plain one works alongside."""

    async def slow_reverse(message: bytes) -> bytes:
        await asyncio.sleep(0)
        return message[::-1]

    async def main() -> None:
        async with (
            await serve_udp(slow_reverse, host, 0) as server,
            await open_udp_client(host, server.port, timeout=unit(2)) as client,
        ):
            assert await client.request(b"stressed") == b"desserts"
            assert await client.request(b"a\x00b") == b"b\x00a"

    run(runner, main())


def test_async_oversize_send_is_rejected(
    runner: asyncio.Runner, host: str, sockets: list[socket.socket]
) -> None:
    """An async send above max_size raises OversizeMessage before anything is sent."""
    peer = silent_socket(host, sockets)

    async def main() -> None:
        async with await open_udp_client(host, peer.getsockname()[1], max_size=10) as client:
            with pytest.raises(OversizeMessage):
                await client.request(b"x" * 11)
            with pytest.raises(OversizeMessage):
                await client.send_to(b"x" * 11)
            await client.send_to(b"ok")

    run(runner, main())
    peer.settimeout(unit(2))
    assert peer.recv(100) == b"ok"


def test_async_client_rejects_oversize_reply(runner: asyncio.Runner, host: str) -> None:
    """A reply above the async client's max_size raises MessageTooLarge: the peer's fault, not ours."""

    async def main() -> None:
        async with (
            await serve_udp(lambda m: b"r" * 50, host, 0) as server,
            await open_udp_client(host, server.port, timeout=unit(2), max_size=10) as client,
        ):
            with pytest.raises(MessageTooLarge) as info:
                await client.request(b"hi")
            assert not isinstance(info.value, OversizeMessage)

    run(runner, main())


def test_async_oversize_datagram_dropped_and_logged(
    runner: asyncio.Runner, host: str, sockets: list[socket.socket], server_logs: pytest.LogCaptureFixture
) -> None:
    """The asyncio server drops a datagram above max_size, logs peer and sizes, and keeps serving."""
    raw = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sockets.append(raw)
    raw.bind((host, 0))

    async def main() -> None:
        async with await serve_udp(lambda m: m, host, 0, max_size=100) as server:
            raw.sendto(b"x" * 500, server.address)
            async with await open_udp_client(host, server.port, timeout=unit(2), max_size=100) as client:
                assert await client.request(b"fine") == b"fine"
            stats = server.statistics()
            assert stats.errors == 1 and stats.error_kinds == {"message too large": 1}

    run(runner, main())
    warnings = [r.getMessage() for r in server_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "max_size 100" in warnings[0]
    assert str(raw.getsockname()[1]) in warnings[0]
    if LINUX:
        assert "500 bytes" in warnings[0]


@pytest.mark.parametrize("coroutine", [False, True], ids=["plain", "coroutine"])
@pytest.mark.parametrize(("fault", "reason"), WRONG_REPLIES)
def test_async_wrong_reply_is_counted_and_serving_goes_on(
    runner: asyncio.Runner, server_logs: pytest.LogCaptureFixture, fault: str, reason: str, coroutine: bool
) -> None:
    """serve_udp checks a handler's reply (or a coroutine's result) as the TCP servers do: one error line,
    one `handler error`, no reply, no uncounted asyncio traceback; the next datagram is served."""
    server_logs.set_level(logging.WARNING, logger="asyncio")
    picky = Picky(fault)

    async def coro(message: bytes) -> Any:
        await asyncio.sleep(0)
        return picky(message)

    handler: Any = coro if coroutine else picky
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        async with await serve_udp(handler, "127.0.0.1", 0) as server:
            async with await open_udp_client(
                "127.0.0.1", server.port, timeout=unit(0.1), retries=0
            ) as client:
                with pytest.raises(Timeout):
                    await client.request(b"bad")
                client.timeout = unit(2)
                assert await client.request(b"good") == b"good"
            stats = server.statistics()
            assert (stats.errors, stats.error_kinds) == (1, {"handler error": 1})

    run(runner, main())
    assert not loop_errors
    errors = [r for r in server_logs.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().split(": ", 1)[1] for r in errors] == [f"{reason}; no reply"]
    assert (errors[0].exc_info is not None) == (fault == "raise")


def test_async_timeout_and_retries(runner: asyncio.Runner, host: str, sockets: list[socket.socket]) -> None:
    """Against a silent socket, the async request tries retries + 1 times, then raises a clear Timeout."""
    silent = silent_socket(host, sockets)
    port = silent.getsockname()[1]
    timeout = unit(0.1)

    async def main() -> None:
        async with await open_udp_client(host, port, timeout=timeout, retries=1) as client:
            with pytest.raises(Timeout) as info:
                await client.request(b"anyone?")
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            assert str(info.value) == f"no reply from {where} after 2 tries of {timeout:g} s"
            with pytest.raises(Timeout):
                await client.receive_from(unit(0.05))

    run(runner, main())
    silent.settimeout(unit(2))
    assert [silent.recv(100) for _ in range(2)] == [b"anyone?"] * 2


def test_async_port_unreachable(runner: asyncio.Runner, host: str) -> None:
    """The async client reports ICMP port unreachable in its Timeout message."""
    port = closed_port(host)

    async def main() -> None:
        async with await open_udp_client(host, port, timeout=unit(0.1), retries=1) as client:
            with pytest.raises(Timeout, match=r"after 2 tries .*\(port unreachable\)$"):
                await client.request(b"hello?")

    run(runner, main())


def test_async_retry_gets_reply_after_lost_datagram(runner: asyncio.Runner, host: str) -> None:
    """When the asyncio server drops the first datagram, the client's resend gets the reply."""
    handler = DropFirst()

    async def main() -> None:
        async with (
            await serve_udp(handler, host, 0) as server,
            await open_udp_client(host, server.port, timeout=unit(0.3), retries=3) as client,
        ):
            assert await client.request(b"again") == b"again"

    run(runner, main())
    assert handler.calls >= 2


def test_async_close_waits_for_running_handlers(runner: asyncio.Runner) -> None:
    """close() stops receiving; wait_closed lets coroutine handlers in progress send their replies."""

    async def main() -> None:
        release = asyncio.Event()
        started = asyncio.Event()

        async def gated(message: bytes) -> bytes:
            started.set()
            await release.wait()
            return message

        server = await serve_udp(gated, "127.0.0.1", 0)
        client = await open_udp_client("127.0.0.1", server.port, timeout=unit(5), retries=0)
        try:
            request = asyncio.ensure_future(client.request(b"late"))
            await started.wait()
            server.close()
            closing = asyncio.ensure_future(server.wait_closed())
            await asyncio.sleep(0)
            assert not closing.done()
            release.set()
            assert await request == b"late"
            await closing
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    run(runner, main())


def test_async_handler_error_flood_is_rate_limited(
    runner: asyncio.Runner, sockets: list[socket.socket], server_logs: pytest.LogCaptureFixture
) -> None:
    """A flood of failing coroutine handlers on serve_udp: 5 error lines in full, then a summary."""

    async def handler(message: bytes) -> bytes:
        await asyncio.sleep(0)
        return raises_on_bad(message)

    async def main() -> Any:
        async with await serve_udp(handler, "127.0.0.1", 0) as server:
            await asyncio.to_thread(flood, server.port, "127.0.0.1", 100, sockets)
        return server.statistics()

    stats = run(runner, main())
    assert (stats.errors, stats.error_kinds) == (100, {"handler error": 100})
    check_flood_log(server_logs.records, 100)


def test_async_flood_summary_is_logged_without_more_traffic(
    runner: asyncio.Runner, sockets: list[socket.socket], server_logs: pytest.LogCaptureFixture
) -> None:
    """serve_udp arms a timer for a due summary: a flood that stopped is reported while serving."""

    async def main() -> None:
        async with await serve_udp(raises_on_bad, "127.0.0.1", 0) as server:
            # A short interval in place of 10 s (the pump reads it from its protocol).
            server._protocol = DatagramServerProtocol(
                DEFAULT_MAX_SIZE, log=logging.getLogger(LOGGER).log, warning_interval=unit(0.2)
            )
            await asyncio.to_thread(flood, server.port, "127.0.0.1", 20, sockets)
            for _ in range(1000):  # bounded: the timer fires within about 0.2 units
                if any("more handler errors" in r.getMessage() for r in server_logs.records):
                    break
                await asyncio.sleep(unit(0.01))
            else:
                raise AssertionError("no summary while serving")

    run(runner, main())


@pytest.mark.parametrize(("timeout", "error", "match"), BAD_WAITS, ids=[repr(t) for t, _, _ in BAD_WAITS])
def test_async_bad_timeouts_are_refused_at_the_call(
    runner: asyncio.Runner, timeout: Any, error: type[Exception], match: str
) -> None:
    """receive_from(timeout=) and serve_udp(shutdown_timeout=) refuse negative, NaN and non-numbers, naming them."""

    async def main() -> None:
        with pytest.raises(error, match=match.replace("timeout", "shutdown_timeout", 1)):
            await serve_udp(reverse, "127.0.0.1", 0, shutdown_timeout=timeout)
        async with (
            await serve_udp(reverse, "127.0.0.1", 0) as server,
            await open_udp_client("127.0.0.1", server.port, timeout=unit(2)) as client,
        ):
            await client.send_to(b"kept")
            with pytest.raises(error, match=match):
                await client.receive_from(timeout)
            assert (await client.receive_from())[0] == b"tpek"
            with pytest.raises(Timeout, match=r"within 0 s$"):
                await client.receive_from(0)
            await client.send_to(b"forever")
            assert (await client.receive_from(math.inf))[0] == b"reverof"
            with pytest.raises(ValueError, match=r"^port 70000: must be 0\.\.65535$"):
                await client.send_to(b"x", ("127.0.0.1", 70000))

    run(runner, main())


# -- the command-line functions -------------------------------------------------------------------


def test_run_udp_client_prints_replies() -> None:
    """run_udp_client prints each reply as escaped text and returns the count; silence raises Timeout."""
    out = io.StringIO()
    with UdpServer(lambda m: m, "127.0.0.1", 0) as server:
        count = run_udp_client(
            "127.0.0.1",
            server.port,
            [b"hello", b"a\x00b", "é".encode()],
            timeout=unit(2),
            retries=1,
            max_size=DEFAULT_MAX_SIZE,
            out=out,
        )
    assert count == 3
    assert out.getvalue() == "hello\na\\x00b\né\n"
    with pytest.raises(Timeout, match="port unreachable"):
        run_udp_client(
            "127.0.0.1",
            closed_port("127.0.0.1"),
            [b"x"],
            timeout=unit(0.1),
            retries=0,
            max_size=DEFAULT_MAX_SIZE,
            out=out,
        )


class _Lines(io.StringIO):
    """A text stream a test can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        self.written.set()
        return n


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_run_udp_server_serves_until_sigterm() -> None:
    """run_udp_server prints the ready line with the real port, serves, and returns its statistics on SIGTERM."""
    out = _Lines()
    replies: list[bytes] = []
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            assert out.written.wait(unit(10)), "no ready line"
            match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+) \(udp, datagram\)\n", out.getvalue())
            assert match, out.getvalue()
            with UdpClient("127.0.0.1", int(match.group(1)), timeout=unit(2)) as client:
                replies.append(client.request(b"via the cli"))
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    stats = run_udp_server("127.0.0.1", 0, reverse, max_size=DEFAULT_MAX_SIZE, out=out)
    driver.join(unit(10))
    assert not failure, failure
    assert replies == [b"ilc eht aiv"]
    assert stats.messages_received == stats.messages_sent == 1
    assert out.getvalue().count("\n") == 1  # nothing but the ready line
    assert signal.getsignal(signal.SIGTERM) == before
