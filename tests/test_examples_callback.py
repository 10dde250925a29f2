"""The Winsock and MFC samples rebuilt on the callback layer, run as real programs (SPEC §2, §9).

Each example runs as a subprocess of ``sys.executable`` on a port chosen by the
system (``--port 0``; the ready line gives the real one); the test checks what it
prints and its exit status.  Every process is killed at teardown if still running,
and every wait has a (scaled) deadline.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgsock.exceptions import ConnectionClosed
from msgsock.sync import Connection, connect
from tests.helpers import free_loopback6, unit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

HOSTS = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param(
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available"),
    ),
]


class Program:
    """A running example: its output lines as they come, stdin to write to, a deadline on every wait."""

    def __init__(self, name: str, *args: str, stdin: bool = False) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=EXAMPLES.parent,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.errors.append(line)

    def expect(self, pattern: str, timeout: float | None = None) -> re.Match[str]:
        """Read output lines until one matches ``pattern`` (re.search); fail at end of output or deadline."""
        wait = unit(15) if timeout is None else timeout
        while True:
            try:
                line = self.lines.get(timeout=wait)
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no line matching {pattern!r} in time; got {self.seen}"
                ) from None
            if line is None:
                self.lines.put(None)  # keep the end marker for later calls
                raise AssertionError(
                    f"{self.name}: output ended before {pattern!r}; got {self.seen}, stderr {self.stderr}"
                )
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def ready_port(self) -> int:
        """The port of the ``listening on HOST:PORT`` line."""
        return int(self.expect(r"^listening on \S+:(\d+)$").group(1))

    def write(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def signal(self, sig: int) -> None:
        """Send ``sig`` without waiting."""
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def finish(self, sig: int | None = None) -> int:
        """Optionally signal the program, wait for it to exit, collect the rest of its output."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=unit(20))
        for reader in self._readers:
            reader.join(unit(5))
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                break
            self.seen.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.seen)

    @property
    def stderr(self) -> str:
        return "".join(self.errors)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=unit(5))
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    """Programs a test starts; killed at teardown if still running."""
    started: list[Program] = []
    try:
        yield started
    finally:
        for program in started:
            program.kill()


def start(programs: list[Program], name: str, *args: str, stdin: bool = False) -> Program:
    program = Program(name, *args, stdin=stdin)
    programs.append(program)
    return program


@pytest.fixture
def connections() -> Iterator[list[Connection]]:
    """Framed client connections a test opens; aborted at teardown if still open."""
    opened: list[Connection] = []
    try:
        yield opened
    finally:
        for conn in opened:
            conn.abort()


def client(connections: list[Connection], host: str, port: int) -> Connection:
    conn = connect(host, port, connect_timeout=unit(10))
    connections.append(conn)
    return conn


def closed_gracefully_by_server(conn: Connection) -> None:
    """The server half-closed ``conn`` cleanly (its graceful shutdown); close our side so it can finish."""
    with pytest.raises(ConnectionClosed) as info:
        conn.receive(unit(10))
    assert info.value.clean
    conn.close()


BODIES = [b"hello", b"", b"a\x00b\x00c", os.urandom(1 << 20)]  # a NUL is a byte; 1 MiB forces partial sends


# -- overlapped_server.py, select_server.py ---------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_overlapped_server_echoes_on_one_thread(
    programs: list[Program], connections: list[Connection], host: str
) -> None:
    """The single-thread overlapped server echoes framed messages to two clients; SIGINT ends it with a summary."""
    server = start(programs, "overlapped_server.py", "--host", host, "--port", "0")
    port = server.ready_port()
    first, second = client(connections, host, port), client(connections, host, port)
    for body in BODIES:
        first.send(body)
        second.send(body[::-1])
    for body in BODIES:
        assert first.receive(unit(10)) == body
        assert second.receive(unit(10)) == body[::-1]
    first.close()
    server.signal(signal.SIGINT)
    closed_gracefully_by_server(second)
    assert server.finish() == 0, server.stderr
    assert server.seen[-1] == f"2 connections, {2 * len(BODIES)} messages echoed"


def test_overlapped_server_stops_on_sigterm(programs: list[Program]) -> None:
    """SIGTERM stops the overlapped server cleanly."""
    server = start(programs, "overlapped_server.py", "--port", "0")
    server.ready_port()
    assert server.finish(signal.SIGTERM) == 0, server.stderr
    assert server.seen[-1] == "0 connections, 0 messages echoed"


@pytest.mark.parametrize("host", HOSTS)
def test_select_server_multiplexes_clients(
    programs: list[Program], connections: list[Connection], host: str
) -> None:
    """The select-style server echoes every client's messages and reports each connect and close."""
    server = start(programs, "select_server.py", "--host", host, "--port", "0")
    port = server.ready_port()
    clients = [client(connections, host, port) for _ in range(3)]
    for n, conn in enumerate(clients):
        for body in BODIES:
            conn.send(body + bytes([n]))
    for n, conn in enumerate(clients):
        for body in BODIES:
            assert conn.receive(unit(10)) == body + bytes([n])
    server.expect(r"connected \(3 clients\)$")
    clients[0].close()
    server.expect(rf"closed: {len(BODIES)} messages echoed$")
    server.signal(signal.SIGTERM)
    for conn in clients[1:]:
        closed_gracefully_by_server(conn)
    assert server.finish() == 0, server.stderr
    assert server.seen[-1] == "stopped (2 clients were still connected)"


def test_select_server_refuses_beyond_max_clients(
    programs: list[Program], connections: list[Connection]
) -> None:
    """Beyond --max-clients a connection is closed at once and reported; the others keep working."""
    server = start(programs, "select_server.py", "--port", "0", "--max-clients", "1")
    port = server.ready_port()
    kept = client(connections, "127.0.0.1", port)
    server.expect(r"connected \(1 clients\)$")
    # The extra connection is reset at once: during connect() itself, or at the first read.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=unit(10)) as extra:
            assert extra.recv(100) == b""
    except ConnectionResetError:
        pass
    server.expect(r"refused: 1 clients already$")
    kept.send(b"still here")
    assert kept.receive(unit(10)) == b"still here"
    server.signal(signal.SIGINT)
    closed_gracefully_by_server(kept)
    assert server.finish() == 0, server.stderr


# -- poll_demo.py -----------------------------------------------------------------------------------


def test_poll_demo_runs_client_and_server_in_one_program(programs: list[Program]) -> None:
    """The WSAPoll demo prints each non-blocking step in order, gets its message back byte for byte, exits 0."""
    demo = start(programs, "poll_demo.py")
    host = r"\[::1\]" if free_loopback6() else r"127\.0\.0\.1"
    if not free_loopback6():
        demo.expect(r"^note: IPv6 loopback is not available")
    steps = [
        rf"^server: listening on {host}:\d+$",
        rf"^client: connecting to {host}:\d+ \(non-blocking\)$",
        r"^client: writable, sent 48 bytes$",
        r"^client: message sent; shut down sending$",
        r"^server: the client finished sending; echoing 48 bytes$",
        r"^server: reply sent; shut down sending and closed$",
        r"^client: the server closed the connection$",
        r"^client: the reply is exactly the 48 bytes sent: b'Hello from the WSAPoll demo!\\x00\(and after the NUL\)'$",
    ]
    for step in steps:
        demo.expect(step)
    assert demo.finish() == 0, demo.stderr
    assert any(re.fullmatch(rf"server: accepted a connection from {host}:\d+", line) for line in demo.seen)
    assert any(re.fullmatch(rf"client: connected to {host}:\d+", line) for line in demo.seen)
    received = [int(n) for n in re.findall(r"^server: readable, received (\d+) bytes$", demo.output, re.M)]
    assert sum(received) == 48


# -- accept_server.py + accept_client.py ------------------------------------------------------------

ACCEPT_DATA = 2880  # len(accept_client.DATA)


def run_client(port: int, scenario: str) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "accept_client.py"), "--port", str(port), "--scenario", scenario],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=EXAMPLES.parent,
        timeout=unit(30),
    )
    return result.returncode, result.stdout, result.stderr


def test_accept_server_survives_the_five_scenarios(programs: list[Program]) -> None:
    """Every client scenario ends as expected on the server (graceful vs abortive), which keeps serving."""
    server = start(programs, "accept_server.py", "--port", "0")
    port = server.ready_port()
    ending = r"^(.+?): (graceful|abortive) close \((end of stream|E[A-Z]+)\) after (\d+) bytes in$"
    expected = {
        "1": ("graceful", ACCEPT_DATA),
        "2": (None, ACCEPT_DATA),  # FIN, then our echo meets a closed socket: either may be seen first
        "3": ("graceful", 0),
        "4": ("abortive", None),  # a reset: the data may or may not have been read first
        "5": ("graceful", 0),
    }
    for scenario, (how, count) in expected.items():
        code, out, err = run_client(port, scenario)
        assert code == 0, err
        assert re.fullmatch(rf"scenario {scenario} from 127\.0\.0\.1:\d+: .+\n", out), out
        end = server.expect(ending)
        if how is not None:
            assert end.group(2) == how, (scenario, end.group(0))
        if count is not None:
            assert int(end.group(4)) == count, (scenario, end.group(0))
        if scenario == "4":
            assert end.group(3) in ("ECONNRESET", "EPIPE"), end.group(0)
    assert "identical" in run_client(port, "1")[1]
    server.expect(ending)
    # All five in one run, then the server still echoes.
    code, out, err = run_client(port, "all")
    assert code == 0, err
    assert [line.split()[1] for line in out.splitlines()] == ["1", "2", "3", "4", "5"]
    for _ in range(5):
        server.expect(ending)
    code, out, _ = run_client(port, "1")
    assert code == 0 and out.rstrip().endswith("identical")
    server.expect(ending)
    assert server.finish(signal.SIGTERM) == 0, server.stderr
    match = re.fullmatch(r"12 connections: (\d+) graceful, (\d+) abortive", server.seen[-1])
    assert match, server.seen[-1]
    assert int(match.group(2)) >= 2  # scenario 4, twice


def test_accept_client_reports_refused_connection() -> None:
    """The accept client exits 1 with one line on stderr when nothing listens."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        code, out, err = run_client(closed.getsockname()[1], "3")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot connect" in err


# -- multisoc_server.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_multisoc_server_reverses_on_per_connection_threads(
    programs: list[Program], connections: list[Connection], host: str
) -> None:
    """Each connection is handed to its own thread, which reverses every message; threads end with their clients."""
    server = start(programs, "multisoc_server.py", "--host", host, "--port", "0")
    port = server.ready_port()
    first, second = client(connections, host, port), client(connections, host, port)
    for body in BODIES:
        first.send(body)
        second.send(b"2" + body)
    for body in BODIES:
        assert first.receive(unit(10)) == body[::-1]
        assert second.receive(unit(10)) == (b"2" + body)[::-1]
    threads = set()
    handed = set()
    for _ in range(4):
        line = server.expect(r": (handed to thread (\S+)|first message reversed on thread (\S+))$")
        if line.group(2):
            handed.add(line.group(2))
        else:
            threads.add(line.group(3))
    assert handed == {"connection-1", "connection-2"}
    assert threads == {"connection-1-reactor", "connection-2-reactor"}
    first.close()
    server.expect(rf": closed; thread connection-\d ends after {len(BODIES)} replies$")
    # The second client is still connected at SIGTERM: it is closed gracefully.
    server.signal(signal.SIGTERM)
    closed_gracefully_by_server(second)
    assert server.finish() == 0, server.stderr
    assert server.seen[-1] == "stopped after 2 connections"


# -- chat.py ----------------------------------------------------------------------------------------


def start_chat(programs: list[Program], host: str = "127.0.0.1") -> tuple[Program, Program]:
    server = start(programs, "chat.py", "serve", "--host", host, "--port", "0", stdin=True)
    port = server.ready_port()
    peer = start(programs, "chat.py", "connect", "--host", host, "--port", str(port), stdin=True)
    peer.expect(r"^connected to \S+$")
    server.expect(r"^connection from \S+$")
    return server, peer


@pytest.mark.parametrize("host", HOSTS)
def test_chat_lines_both_ways_and_client_says_bye(programs: list[Program], host: str) -> None:
    """Typed lines reach the peer whole (NUL included); "bye" from the connecting side ends both gracefully."""
    server, peer = start_chat(programs, host)
    peer.write("hello server\n")
    server.expect(r"^peer: hello server$")
    server.write("hi client, a\x00b and é\n")
    peer.expect(r"^peer: hi client, a\\x00b and é$")
    for n in range(20):  # several lines at once: each is one message
        peer.write(f"line {n}\n")
    for n in range(20):
        server.expect(rf"^peer: line {n}$")
    peer.write("bye\n")
    peer.expect(r"^you said bye; closing$")
    server.expect(r"^peer: bye$")
    server.expect(r"^peer said bye; closing$")
    assert peer.finish() == 0, peer.stderr
    assert server.finish() == 0, server.stderr


def test_chat_server_says_bye(programs: list[Program]) -> None:
    """ "bye" typed on the serving side ends the session for both."""
    server, peer = start_chat(programs)
    server.write("bye\n")
    peer.expect(r"^peer: bye$")
    peer.expect(r"^peer said bye; closing$")
    assert server.finish() == 0, server.stderr
    assert peer.finish() == 0, peer.stderr
    assert "you said bye; closing" in server.seen


def test_chat_end_of_input_closes_gracefully(programs: list[Program]) -> None:
    """When one side's input ends, it closes gracefully and the other side reports the peer closed."""
    server, peer = start_chat(programs)
    peer.write("last words\n")
    peer.close_stdin()
    server.expect(r"^peer: last words$")
    server.expect(r"^peer closed the connection$")
    assert peer.finish() == 0, peer.stderr
    assert server.finish() == 0, server.stderr
    assert "end of input; closing" in peer.seen


def test_chat_connect_refused(programs: list[Program]) -> None:
    """Connecting to a port nobody listens on prints why and exits 1."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        peer = start(programs, "chat.py", "connect", "--port", str(closed.getsockname()[1]), stdin=True)
        peer.expect(r"^cannot connect: ")
        assert peer.finish() == 1
