"""The Winsock basic and MFCAsync examples, run as real programs against each other (SPEC §2, §9)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgsock.sync import Connection, ThreadedServer
from tests.helpers import free_loopback6, unit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Program:
    """A running example: its ready line parsed, its output collected, killed at teardown."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=EXAMPLES.parent,
        )

    def ready_port(self) -> int:
        """Read the ``listening on HOST:PORT`` line (with a deadline) and return the port."""
        stdout = self.process.stdout
        assert stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(unit(15))
        assert lines, "no ready line"
        match = re.fullmatch(r"listening on (\S+):(\d+)\n", lines[0])
        assert match, f"unexpected first line {lines[0]!r}"
        return int(match.group(2))

    def finish(self, timeout: float | None = None) -> tuple[int, str, str]:
        """Wait for exit; return (exit code, rest of stdout, stderr)."""
        out, err = self.process.communicate(timeout=unit(15) if timeout is None else timeout)
        return self.process.returncode, out, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.communicate(timeout=unit(5))
        except (subprocess.TimeoutExpired, ValueError):
            pass


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    """Programs started by a test, killed at teardown if still running."""
    started: list[Program] = []
    try:
        yield started
    finally:
        for program in started:
            program.kill()


def start(programs: list[Program], name: str, *args: str) -> Program:
    program = Program(str(EXAMPLES / name), *args)
    programs.append(program)
    return program


def run(name: str, *args: str) -> tuple[int, str, str]:
    """Run an example to completion; return (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=EXAMPLES.parent,
        timeout=unit(30),
    )
    return result.returncode, result.stdout, result.stderr


def bytes_received(output: str) -> int:
    return sum(int(n) for n in re.findall(r"^Bytes received: (\d+)$", output, re.MULTILINE))


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("127.0.0.1", id="ipv4"),
        pytest.param("::1", id="ipv6"),
        pytest.param("localhost", id="name"),
    ],
)
def test_basic_client_and_server(programs: list[Program], host: str) -> None:
    """The Winsock basic pair: the client's text comes back whole, both shut down gracefully and exit 0."""
    if host == "::1" and not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    server_host = "127.0.0.1" if host == "localhost" else host
    server = start(programs, "basic_server.py", "--host", server_host, "--port", "0")
    port = server.ready_port()
    code, out, err = run("basic_client.py", "--host", host, "--port", str(port))
    assert code == 0, err
    assert "Bytes Sent: 14" in out
    assert bytes_received(out) == 14
    assert out.rstrip().endswith("Connection closed\nthis is a test")
    code, out, err = server.finish()
    assert code == 0, err
    assert bytes_received(out) == 14
    assert sum(int(n) for n in re.findall(r"^Bytes sent: (\d+)$", out, re.MULTILINE)) == 14
    assert out.rstrip().endswith("Connection closing...")


def test_basic_client_cannot_connect() -> None:
    """The basic client exits 1 with one line when nothing listens."""
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        code, out, err = run("basic_client.py", "--port", str(closed.getsockname()[1]))
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "Unable to connect" in err


def test_mfcasync_client_and_server(programs: list[Program]) -> None:
    """The MFCAsync pair: 200 verified rounds from two clients; SIGINT stops the server with a summary."""
    server = start(programs, "mfcasync_server.py", "--port", "0")
    port = server.ready_port()
    for message in ("Hello, MFCAsync", "x"):
        code, out, err = run(
            "mfcasync_client.py", "--port", str(port), "--rounds", "100", "--message", message
        )
        assert code == 0, err
        assert re.fullmatch(r"100 rounds, all verified, RTT p50 [\d.]+ ms, p99 [\d.]+ ms\n", out)
    server.process.send_signal(signal.SIGINT)
    code, out, err = server.finish()
    assert code == 0, err
    assert "2 connections (0 rejected), 200 messages in / 200 out" in out
    assert out.rstrip().endswith("0 errors")


def test_mfcasync_server_stops_on_sigterm(programs: list[Program]) -> None:
    """SIGTERM stops the MFCAsync server cleanly too."""
    server = start(programs, "mfcasync_server.py", "--port", "0")
    server.ready_port()
    server.process.send_signal(signal.SIGTERM)
    code, out, err = server.finish()
    assert code == 0, err
    assert "0 connections (0 rejected)" in out


def test_mfcasync_client_detects_mismatch() -> None:
    """The client exits 1 when an echo differs from what it sent."""
    with ThreadedServer(lambda m: m.upper(), port=0) as server:
        code, out, err = run("mfcasync_client.py", "--port", str(server.port), "--message", "lower")
    assert code == 1 and out == ""
    assert "round 1" in err and "differs" in err


def test_mfcasync_client_detects_early_disconnect() -> None:
    """The client exits 1 when the server closes before all rounds are done."""

    def two_then_stop(conn: Connection) -> None:
        for _ in range(2):
            conn.send(conn.receive(unit(10)))

    with ThreadedServer(connection_handler=two_then_stop, port=0) as server:
        code, out, err = run("mfcasync_client.py", "--port", str(server.port), "--rounds", "5")
    assert code == 1 and out == ""
    assert "after 2 rounds" in err


def test_mfcasync_client_cannot_connect() -> None:
    """The client exits 1 with one line when nothing listens."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        code, out, err = run("mfcasync_client.py", "--port", str(closed.getsockname()[1]))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot connect" in err
