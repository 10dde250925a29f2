"""The interactive client (SPEC §6.2) driven by Textual's pilot against real loopback servers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from rich.style import Style
from textual.pilot import Pilot
from textual.widgets import Input, RichLog, Static

from msgsock.app.client import ClientConfig
from msgsock.app.tui import LOG_TEXT_LIMIT, ClientApp, MessageEvent, State
from msgsock.exceptions import MsgsockError
from msgsock.framing import FrameFormat, Message
from msgsock.sync import Connection, ThreadedServer
from tests.certs import Pki
from tests.helpers import free_loopback6, unit

Scenario = Callable[[ClientApp, Pilot[int]], Awaitable[None]]
ServerFactory = Callable[..., ThreadedServer]


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """Start ThreadedServers on port 0; every one is shut down at teardown."""
    servers: list[ThreadedServer] = []
    stop = threading.Event()

    def factory(*args: Any, **kwargs: Any) -> ThreadedServer:
        kwargs.setdefault("port", 0)
        server = ThreadedServer(*args, **kwargs)
        servers.append(server)
        server.start()
        server.stop_event = stop  # type: ignore[attr-defined]  # for pushing handlers
        return server

    try:
        yield factory
    finally:
        stop.set()
        for server in servers:
            server.shutdown(unit(5))


def _run(app: ClientApp, scenario: Scenario, *, size: tuple[int, int] = (120, 36)) -> ClientApp:
    """Run ``scenario`` against ``app`` under the pilot; the app quits (or is torn down) after."""

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(app, pilot)

    asyncio.run(asyncio.wait_for(main(), unit(30)))
    assert not app.network.reactor.running, "the network thread must be stopped when the app ends"
    return app


async def _until(pilot: Pilot[int], predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Let the app run until ``predicate()`` holds (a condition wait, bounded by ``unit(timeout)``)."""
    deadline = time.monotonic() + unit(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)


def _log_text(app: ClientApp) -> str:
    return "\n".join(strip.text for strip in app.query_one("#log", RichLog).lines)


def _status(app: ClientApp) -> str:
    return str(app.query_one("#status", Static).content)


async def _connect(app: ClientApp, pilot: Pilot[int]) -> None:
    await pilot.press("f2")
    await _until(
        pilot, lambda: app.state is not State.CONNECTING and app.state is not State.DISCONNECTED, "connect"
    )
    assert app.state is State.CONNECTED, _status(app)


async def _send(app: ClientApp, pilot: Pilot[int], text: str) -> None:
    app.query_one("#message", Input).value = text
    await pilot.press("enter")


def test_echo_loop_disconnect_reconnect_quit(start_server: ServerFactory) -> None:
    """Three messages are echoed with RTTs, the reverse loop verifies rounds, and disconnect/reconnect/quit are graceful."""
    server = start_server(lambda m: m, "127.0.0.1")
    rounds = 50

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        net = app.network
        await _connect(app, pilot)
        assert f"connected to 127.0.0.1:{server.port}" in _status(app)
        assert app.focused is app.query_one("#message", Input)
        await pilot.press(*"hello", "enter")  # typed for real
        await _send(app, pilot, "second one")
        await _send(app, pilot, "third")
        await _until(pilot, lambda: _log_text(app).count("← #") == 3, "three echoes in the log")
        log = _log_text(app)
        for text in ("hello", "second one", "third"):
            assert log.count(text) == 2, log  # sent and received
        assert log.count("rtt ") == 3
        assert (net.messages_sent, net.messages_received) == (3, 3)

        # Started through the action F4 runs: pilot.press waits for an idle *process*,
        # which it is not while the loop runs (seconds lost); F4 stops it below.
        app.action_toggle_loop()
        await _until(pilot, lambda: net.loop_stats().rounds >= rounds, f"{rounds} loop rounds")
        await pilot.press("f4")
        await _until(pilot, lambda: not net.loop_running and "stopped" in _log_text(app), "loop stop")
        await _until(pilot, lambda: net.messages_received == net.messages_sent, "the echo in flight")
        stats = net.loop_stats()
        assert stats.rounds >= rounds and stats.p50 > 0 and stats.p99 >= stats.p50
        assert net.messages_sent == 3 + stats.rounds
        assert net.bytes_received == net.bytes_sent
        assert "MISMATCH" not in _log_text(app)
        assert "Hello from msgsock" in _log_text(app)  # the loop's first payload is named once
        assert _log_text(app).count("← #") == 3  # loop messages are not logged one by one
        await pilot.pause()
        assert f"{net.messages_received:,} msgs" in str(app.query_one("#counters", Static).content)

        await pilot.press("f3")
        await _until(pilot, lambda: app.state is State.DISCONNECTED, "disconnect")
        assert _status(app).endswith("disconnected")
        await _connect(app, pilot)
        assert net.messages_sent == 0  # counters are per connection
        await _send(app, pilot, "again")
        await _until(pilot, lambda: _log_text(app).count("← #") == 4, "echo after reconnect")

        await pilot.press("ctrl+q")
        await _until(pilot, lambda: app.return_code is not None, "quit")

    app = _run(ClientApp(ClientConfig(port=server.port)), scenario)
    assert app.return_code == 0
    stats = server.statistics()
    deadline = time.monotonic() + unit(5)
    while stats.active and time.monotonic() < deadline:  # the server thread notices the EOF
        time.sleep(0.01)
        stats = server.statistics()
    assert (stats.connections, stats.active, stats.errors) == (2, 0, 0)


def test_refused_connection_shows_error() -> None:
    """A refused connection shows the reason in the status line, not a traceback, and Connect works again."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = blocker.getsockname()[1]

        async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
            await pilot.press("f2")
            await _until(pilot, lambda: app.state is State.ERROR, "the error")
            assert "refused" in _status(app).lower(), _status(app)
            assert f"127.0.0.1:{port}" in _status(app)
            assert not app.query_one("#connect").disabled
            assert app.query_one("#message").disabled

        _run(ClientApp(ClientConfig(port=port)), scenario)


def test_bad_port_field_is_an_error_line() -> None:
    """A port that is not 1-65535 is reported in the status line without connecting."""

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        app.query_one("#port", Input).value = "70000"
        await pilot.press("f2")
        assert app.state is State.ERROR
        assert "port must be 1-65535" in _status(app)

    _run(ClientApp(ClientConfig(port=1)), scenario)


def test_network_thread_keeps_receiving_while_ui_blocked(start_server: ServerFactory) -> None:
    """While the UI thread is blocked for a second, the network thread goes on receiving pushed messages."""

    def pusher(conn: Connection) -> None:
        stop: threading.Event = server.stop_event  # type: ignore[attr-defined]
        for i in range(5000):
            try:
                conn.send(f"push {i}".encode())
            except (MsgsockError, OSError):
                return
            if stop.wait(0.005):  # pacing, so messages keep arriving during the block
                return

    server = start_server(host="127.0.0.1", connection_handler=pusher)
    seen: dict[str, int] = {}

    def block_ui() -> None:
        seen["ui_thread"] = threading.get_ident()
        seen["before"] = app.network.messages_received
        time.sleep(unit(1))  # the busy UI under test (seed 002), not a synchronization
        seen["after"] = app.network.messages_received

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        # Not pilot.press: under a steady stream the pilot waits seconds for an idle screen.
        app.action_connect()
        await _until(pilot, lambda: app.network.messages_received >= 5, "the first pushes")
        app.call_next(block_ui)
        await _until(pilot, lambda: "after" in seen, "the blocking callback")
        assert seen["ui_thread"] == threading.get_ident()  # it really ran on the UI thread
        assert seen["after"] > seen["before"], seen
        first_during_block = seen["before"] + 1
        await _until(pilot, lambda: f"← #{first_during_block} push" in _log_text(app), "the log to catch up")
        assert "rtt" not in _log_text(app)  # pushed, not answers: no round-trip time
        server.stop_event.set()  # type: ignore[attr-defined]  # the server ends the connection
        await _until(pilot, lambda: app.state is State.DISCONNECTED, "the server's close")
        assert "the server closed the connection" in _status(app)

    app = ClientApp(ClientConfig(port=server.port))
    _run(app, scenario)


def test_non_printables_escaped_markup_plain_long_truncated(start_server: ServerFactory) -> None:
    """Received control bytes are escaped, markup is shown literally, and long messages are cut with their length."""
    server = start_server(lambda m: m, "127.0.0.1")
    evil = b"\x1b[31mred\x07\x00 [bold]not bold[/bold] [link=x]y"
    long = b"z" * 5000

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        app.network.send(evil)
        app.network.send(long)
        await _until(pilot, lambda: _log_text(app).count("← #") == 2, "two echoes")
        log = _log_text(app)
        assert "\\x1b[31mred\\x07\\x00 [bold]not bold[/bold] [link=x]y" in log, log
        assert "\x1b" not in log and "\x07" not in log and "\x00" not in log
        assert f"{'z' * LOG_TEXT_LIMIT}… (5000 bytes)" in log.replace("\n", "")
        assert "z" * (LOG_TEXT_LIMIT + 1) not in log.replace("\n", "")

    _run(ClientApp(ClientConfig(port=server.port)), scenario, size=(200, 40))


def test_header_fields_sent_and_shown(start_server: ServerFactory) -> None:
    """Sent messages carry config.header and the received header fields are shown in the log."""
    frame = FrameFormat.parse("u32be+kind:B+flags:H")
    got: list[dict[str, int]] = []

    def handler(message: bytes) -> bytes:
        assert isinstance(message, Message)
        got.append(dict(message.header))
        return Message(message, {"kind": message.header["kind"] + 1, "flags": 512})

    server = start_server(handler, "127.0.0.1", frame=frame)

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        await _send(app, pilot, "with header")
        await _until(pilot, lambda: "← #1" in _log_text(app), "the reply")
        log = _log_text(app)
        assert "→ #1 [kind=7 flags=3] with header" in log, log
        assert "← #1 [kind=8 flags=512] with header" in log, log

    _run(ClientApp(ClientConfig(port=server.port, frame=frame, header={"kind": 7, "flags": 3})), scenario)
    assert got == [{"kind": 7, "flags": 3}]


def test_mismatch_stops_loop_in_red(start_server: ServerFactory) -> None:
    """A server that does not echo exactly stops the loop at the first round, in red, with both payloads."""
    server = start_server(lambda m: m.upper(), "127.0.0.1")

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        app.query_one("#message", Input).value = "abc"
        await pilot.press("f4")
        await _until(pilot, lambda: "MISMATCH" in _log_text(app) and not app.network.loop_running, "mismatch")
        log = _log_text(app)
        assert "MISMATCH at round 1" in log
        assert "sent     (3 B): abc" in log and "received (3 B): ABC" in log
        assert "mismatch at round 1" in str(app.query_one("#loopline", Static).content)
        strips = [s for s in app.query_one("#log", RichLog).lines if "MISMATCH" in s.text]
        styles = [seg.style for seg in strips[0] if seg.text.strip()]
        assert all(isinstance(st, Style) and st.color is not None and st.color.name == "red" for st in styles)
        assert app.network.loop_stats().rounds == 0
        assert app.state is State.CONNECTED  # a mismatch stops the loop, not the connection

    _run(ClientApp(ClientConfig(port=server.port)), scenario)


def test_loop_without_echo_times_out(start_server: ServerFactory) -> None:
    """A server that never answers stops the loop after reply_timeout with the reason shown."""
    server = start_server(lambda m: None, "127.0.0.1")

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        await pilot.press("f4")
        await _until(pilot, lambda: "no echo within" in _log_text(app), "the reply timeout")
        assert not app.network.loop_running

    _run(ClientApp(ClientConfig(port=server.port, reply_timeout=unit(0.3))), scenario)


def test_server_reset_shows_error(start_server: ServerFactory) -> None:
    """A connection reset by the server appears in the status line as an error."""

    def resetter(conn: Connection) -> None:
        conn.receive(timeout=unit(5))
        conn.abort()

    server = start_server(host="127.0.0.1", connection_handler=resetter)

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        await _send(app, pilot, "please reset")
        await _until(pilot, lambda: app.state is State.ERROR, "the reset")
        assert "reset" in _status(app).lower(), _status(app)
        assert "1 message(s) got no reply" in _log_text(app)

    _run(ClientApp(ClientConfig(port=server.port)), scenario)


def test_ipv6_loopback(start_server: ServerFactory) -> None:
    """The client connects to ::1 and shows the bracketed address."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback is not available here")
    server = start_server(lambda m: m, "::1")

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        assert f"connected to [::1]:{server.port}" in _status(app)
        await _send(app, pilot, "over six")
        await _until(pilot, lambda: "← #1 over six" in _log_text(app), "the echo")

    _run(ClientApp(ClientConfig(host="::1", port=server.port)), scenario)


AUTH_KEY = b"tui-test-key-0123456789"


def test_tls_and_auth_connect_and_echo(start_server: ServerFactory, pki: Pki) -> None:
    """Over TLS with the shared key, the status line names both once connected and messages are echoed."""
    server = start_server(lambda m: m, "127.0.0.1", ssl=pki.server_context(), auth_key=AUTH_KEY)

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await _connect(app, pilot)
        status = _status(app)
        assert f"connected to 127.0.0.1:{server.port} (TLSv1." in status, status
        assert "authenticated" in status
        await _send(app, pilot, "over tls")
        await _until(pilot, lambda: "← #1 over tls" in _log_text(app), "the echo")
        await pilot.press("ctrl+q")
        await _until(pilot, lambda: app.return_code is not None, "quit")

    config = ClientConfig(port=server.port, ssl=pki.client_context(), auth_key=AUTH_KEY)
    app = _run(ClientApp(config), scenario)
    assert app.return_code == 0
    deadline = time.monotonic() + unit(5)
    while server.statistics().active and time.monotonic() < deadline:  # the server notices the EOF
        time.sleep(0.01)
    stats = server.statistics()
    assert (stats.connections, stats.active, stats.errors, stats.messages_received) == (1, 0, 0, 1)


def test_tls_failure_shows_in_status_line(start_server: ServerFactory, pki: Pki) -> None:
    """A server certificate the client does not trust shows as a TLS error in the status line, not a traceback."""
    server = start_server(lambda m: m, "127.0.0.1", ssl=pki.server_context())

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await pilot.press("f2")
        await _until(pilot, lambda: app.state is State.ERROR, "the error")
        status = _status(app)
        assert "error: TLS handshake failed: " in status, status
        assert "certificate verify failed" in status, status
        assert f"127.0.0.1:{server.port}" in status
        assert "Traceback" not in _log_text(app)
        assert not app.query_one("#connect").disabled
        assert app.query_one("#message").disabled

    _run(ClientApp(ClientConfig(port=server.port, ssl=pki.client_context(ca=pki.other_ca_cert))), scenario)


def test_auth_failure_shows_in_status_line(start_server: ServerFactory) -> None:
    """A key the server rejects shows as an authentication error in the status line."""
    server = start_server(lambda m: m, "127.0.0.1", auth_key=AUTH_KEY)

    async def scenario(app: ClientApp, pilot: Pilot[int]) -> None:
        await pilot.press("f2")
        await _until(pilot, lambda: app.state is State.ERROR, "the error")
        status = _status(app)
        assert "error: authentication failed: the server rejected our key" in status, status
        assert "Traceback" not in _log_text(app)

    _run(ClientApp(ClientConfig(port=server.port, auth_key=b"not-the-right-key-at-all")), scenario)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"short", "short"),
        (b"a\x00b", "a\\x00b"),
        ("😀".encode() * 300, "😀" * LOG_TEXT_LIMIT + "… (1200 bytes)"),
        (b"\xff" * 1000, "\\xff" * (LOG_TEXT_LIMIT // 4) + "… (1000 bytes)"),
        (b"q" * 10**6, "q" * LOG_TEXT_LIMIT + "… (1000000 bytes)"),
    ],
)
def test_message_event_keeps_a_bounded_prefix(body: bytes, expected: str) -> None:
    """A log event keeps only a prefix of a large body yet shows the cut text and the real length."""
    event = MessageEvent.of("received", 1, body, {})
    assert len(event.body) <= 4 * LOG_TEXT_LIMIT and event.size == len(body)
    assert event.body_text() == expected
    assert event.truncated == (len(body) > LOG_TEXT_LIMIT and expected.endswith(" bytes)"))
