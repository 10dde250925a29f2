"""The CArchive packet demo and the simples/simplec echo pair, run as real programs (SPEC §2, §9)."""

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

from msgsock import ArchiveReader, ArchiveWriter
from msgsock.sync import SocketFile, ThreadedServer
from msgsock.udp import UdpServer
from tests.helpers import free_loopback6, unit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The demo prints non-ASCII strings: make the children's stdout UTF-8 whatever the locale.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
READY = re.compile(r"listening on (\S+):(\d+)( \((tcp|udp)\))?\n")

HOSTS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")]


def skip_without_ipv6(host: str) -> None:
    if ":" in host and not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")


class Program:
    """A running example: its ready line parsed, its output collected, killed at teardown."""

    def __init__(self, name: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
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
        match = READY.fullmatch(lines[0])
        assert match, f"unexpected first line {lines[0]!r}"
        return int(match.group(2))

    def finish(self) -> tuple[int, str, str]:
        """Wait for exit; return (exit code, rest of stdout, stderr)."""
        out, err = self.process.communicate(timeout=unit(15))
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
    program = Program(name, *args)
    programs.append(program)
    return program


def run(name: str, *args: str) -> tuple[int, str, str]:
    """Run an example to completion; return (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=ENV,
        cwd=EXAMPLES.parent,
        timeout=unit(30),
    )
    return result.returncode, result.stdout, result.stderr


def dead_port() -> tuple[socket.socket, int]:
    """A TCP port that refuses connections: bound (so nobody takes it), not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


# -- the CArchive packet demo --------------------------------------------------------------


def test_archive_demo_in_one_run() -> None:
    """Server and client in one run exchange the packet and the ack over loopback and exit 0."""
    code, out, err = run("archive_demo.py")
    assert code == 0, err
    packet = "value=65 copies=3 bytes=414141 narrow='Hello, CArchive' wide='Grüße, 世界'"
    ack = "status=1 checked=3 text='3 copies of 65 received'"
    assert f"client: sent {packet} (44 bytes)" in out
    assert f"server: received {packet}\n" in out
    assert f"server: sent ack {ack}\n" in out
    assert f"client: received ack {ack}\n" in out


@pytest.mark.parametrize("host", HOSTS)
def test_archive_demo_server_and_client(programs: list[Program], host: str) -> None:
    """The demo's server and client as two processes (IPv4 and IPv6): the server loads what the client stored."""
    skip_without_ipv6(host)
    server = start(programs, "archive_demo.py", "server", "--host", host, "--port", "0")
    port = server.ready_port()
    code, out, err = run(
        "archive_demo.py",
        "client",
        "--host",
        host,
        "--port",
        str(port),
        "--value",
        "200",
        "--copies",
        "5",
        "--narrow",
        "café",
        "--wide",
        "ω",
    )
    assert code == 0, err
    packet = "value=200 copies=5 bytes=c8c8c8c8c8 narrow='café' wide='ω'"
    assert f"client: sent {packet}" in out
    assert "client: received ack status=1 checked=5 text='5 copies of 200 received'" in out
    code, out, err = server.finish()
    assert code == 0, err
    assert f"server: received {packet}\n" in out


def test_archive_demo_client_checks_the_ack(programs: list[Program]) -> None:
    """The demo client exits 1 when the server's ack says the packet was wrong."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(unit(10))

        def bad_server() -> None:
            sock, _ = listener.accept()
            sock.settimeout(unit(10))
            with sock, SocketFile(sock) as file:
                reader = ArchiveReader(file)
                reader.read_byte()
                reader.read_bytes(reader.read_word())
                reader.read_string(), reader.read_string()
                with ArchiveWriter(file) as ack:
                    ack.write_byte(0)
                    ack.write_word(0)
                    ack.write_string("rejected")

        thread = threading.Thread(target=bad_server, daemon=True)
        thread.start()
        code, out, _err = run("archive_demo.py", "client", "--port", str(listener.getsockname()[1]))
        thread.join(unit(10))
    assert code == 1
    assert "client: received ack status=0 checked=0 text='rejected'" in out


def test_archive_demo_client_cannot_connect() -> None:
    """The demo client exits 1 with one line when nothing listens."""
    sock, port = dead_port()
    with sock:
        code, out, err = run("archive_demo.py", "client", "--port", str(port))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "archive demo failed" in err


# -- simples / simplec ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "udp"])
@pytest.mark.parametrize("host", HOSTS)
def test_simple_echo(programs: list[Program], transport: str, host: str) -> None:
    """simplec sends 3 messages with a NUL byte to simples (TCP/UDP, IPv4/IPv6); every byte comes back."""
    skip_without_ipv6(host)
    family = "-6" if ":" in host else "-4"
    udp = ["--udp"] if transport == "udp" else []
    server = start(programs, "simple_server.py", family, *udp, "--port", "0")
    port = server.ready_port()
    code, out, err = run(
        "simple_client.py", family, *udp, "--port", str(port), "--count", "3", "--message", r"hello\0world"
    )
    assert code == 0, err
    echoed = r"received 11 bytes: b'hello\x00world' (verified)"
    assert out.count(echoed) == 3
    assert out.rstrip().endswith("3 messages echoed, all verified")
    server.process.send_signal(signal.SIGTERM)
    code, out, err = server.finish()
    assert code == 0, err
    assert out.count(r"received 11 bytes: b'hello\x00world'") == 3
    # TCP byte counts include the 4-byte frame headers.
    kind, size = ("datagrams", 33) if transport == "udp" else ("messages", 45)
    assert out.rstrip().endswith(f"3 {kind} in / 3 out, {size} bytes in / {size} out, 0 errors")


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_simple_client_detects_a_wrong_echo(transport: str) -> None:
    """simplec exits 1 when an echo differs from what it sent."""
    server: ThreadedServer | UdpServer
    if transport == "udp":
        server = UdpServer(lambda m: m.upper(), "127.0.0.1", 0)
    else:
        server = ThreadedServer(lambda m: m.upper(), "127.0.0.1", 0)
    udp = ["--udp"] if transport == "udp" else []
    with server:
        code, _out, err = run("simple_client.py", *udp, "--port", str(server.port), "--message", "lower")
    assert code == 1
    assert "message 1: the echo differs: sent b'lower', received b'LOWER'" in err


def test_simple_client_cannot_connect() -> None:
    """simplec exits 1 with one line when nothing listens (TCP)."""
    sock, port = dead_port()
    with sock:
        code, out, err = run("simple_client.py", "--port", str(port))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "refused" in err.lower()
