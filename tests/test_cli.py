"""``msgsock serve`` and ``msgsock client`` as real subprocesses (SPEC §6.1, §6.2)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests.cli_helpers import ENV, run_cli, serve
from tests.helpers import unit, wait_for

ENGINES = ["asyncio", "threads", "processes"]


def _engine(engine: str) -> tuple[str, ...]:
    """The serve options selecting ``engine`` (two workers for processes: this machine may have one CPU)."""
    return ("--engine", engine, "--workers", "2") if engine == "processes" else ("--engine", engine)


def _label(engine: str) -> str:
    """The engine as the ready line names it."""
    return "processes x 2" if engine == "processes" else engine


def _exchange(port: int, body: bytes) -> bytes:
    """Send one default-format frame on a new connection and return the reply body."""
    with socket.create_connection(("127.0.0.1", port), timeout=unit(10)) as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        return _read_frame(s)


def _read_frame(s: socket.socket) -> bytes:
    head = _read_exactly(s, 4)
    return _read_exactly(s, struct.unpack(">I", head)[0])


def _read_exactly(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("engine", ENGINES)
def test_serve_ready_line_echo_and_summary(engine: str) -> None:
    """The server prints its ready line with the real port, echoes, logs peers and prints a summary on SIGTERM."""
    with serve(*_engine(engine)) as server:
        assert server.ready == f"listening on 127.0.0.1:{server.port} ({_label(engine)}, u32be)"
        assert _exchange(server.port, b"hello") == b"hello"
        assert _exchange(server.port, b"") == b""  # zero-length messages are valid
        wait_for(lambda: server.log.count("disconnected") >= 2, unit(10))
        assert server.stop() == 0
        assert "connection from 127.0.0.1:" in server.log
        summary = [line for line in server.stdout if line.startswith("summary:")]
        assert len(summary) == 1, server.output
        assert "2 connections" in summary[0]
        assert "2 messages in / 2 out" in summary[0]
        assert "0 errors" in summary[0]
        assert "Traceback" not in server.log


@pytest.mark.parametrize("engine", ENGINES)
def test_client_send_and_rounds(engine: str) -> None:
    """`client --send` prints each reply; `--rounds` runs the MFCAsync reverse loop and summarises."""
    with serve(*_engine(engine)) as server:
        done = run_cli("client", "--port", str(server.port), "--send", "one", "--send", "two words")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["one", "two words"]
        done = run_cli("client", "--port", str(server.port), "--rounds", "50", "--message", "abc")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("50 rounds, all verified; RTT p50 ")
        assert "p99" in done.stdout


def test_client_reads_stdin_lines() -> None:
    """Without --send, each stdin line is one message and each reply is printed."""
    with serve() as server:
        done = run_cli("client", "--port", str(server.port), input="alpha\nbeta\n\ngamma\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["alpha", "beta", "", "gamma"]


def test_rounds_against_reverse_handler_is_a_mismatch() -> None:
    """A reversed echo is a mismatch for --rounds: exit 1 with both payloads, no traceback."""
    with serve("--handler", "reverse") as server:
        done = run_cli("client", "--port", str(server.port), "--rounds", "3", "--message", "abc")
        assert done.returncode == 1
        assert "mismatch at round 1" in done.stderr
        assert "'abc'" in done.stderr and "'cba'" in done.stderr
        assert "Traceback" not in done.stderr


def test_reverse_handler() -> None:
    """--handler reverse replies with the message reversed."""
    with serve("--handler", "reverse") as server:
        assert _exchange(server.port, b"stressed") == b"desserts"


@pytest.mark.parametrize("engine", ENGINES)
def test_header_fields_are_echoed(engine: str) -> None:
    """A --frame format string with fields: the client sets them and the echo returns them."""
    fmt = "u32be+kind:B+flags:H"
    with serve(*_engine(engine), "--frame", fmt) as server:
        assert server.ready.endswith(f"({_label(engine)}, {fmt})")
        done = run_cli(
            "client",
            "--port",
            str(server.port),
            "--frame",
            fmt,
            "--header",
            "kind=3",
            "--header",
            "flags=0x10",
            "--send",
            "hi",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[kind=3 flags=16] hi"


@pytest.mark.parametrize("engine", ENGINES)
def test_oversize_frame_closes_only_that_connection(engine: str) -> None:
    """A declared length above --max-size closes that connection with a log line naming peer and both numbers."""
    with serve(*_engine(engine), "--max-size", "1000") as server:
        good = socket.create_connection(("127.0.0.1", server.port), timeout=unit(10))
        bad = socket.create_connection(("127.0.0.1", server.port), timeout=unit(10))
        with good, bad:
            good.sendall(struct.pack(">I", 3) + b"one")
            assert _read_frame(good) == b"one"
            bad_port = bad.getsockname()[1]
            bad.sendall(struct.pack(">I", 4_000_000_000))
            try:
                assert bad.recv(10) == b""  # closed by the server
            except ConnectionResetError:
                pass
            good.sendall(struct.pack(">I", 1000) + b"x" * 1000)
            assert _read_frame(good) == b"x" * 1000
        wait_for(lambda: "exceeds max_size" in server.log, unit(10))
        line = next(line for line in server.stderr if "exceeds max_size" in line)
        assert f"127.0.0.1:{bad_port}" in line
        assert "4000000000" in line and "1000" in line
        assert server.stop() == 0
        assert "Traceback" not in server.log
        summary = next(line for line in server.stdout if line.startswith("summary:"))
        assert summary.rstrip().endswith("1 errors (1 message too large)"), summary


@pytest.mark.parametrize("engine", ENGINES)
def test_misbehaving_peers_do_not_disturb_others(engine: str) -> None:
    """Mid-frame close and reset are logged without traceback; a concurrent client is unaffected."""
    with serve(*_engine(engine)) as server:
        good = socket.create_connection(("127.0.0.1", server.port), timeout=unit(10))
        with good:
            with socket.create_connection(("127.0.0.1", server.port)) as midframe:
                midframe.sendall(struct.pack(">I", 100) + b"partial")
            reset = socket.create_connection(("127.0.0.1", server.port))
            reset.sendall(struct.pack(">I", 100) + b"partial")
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()
            for i in range(20):
                body = f"message {i}".encode()
                good.sendall(struct.pack(">I", len(body)) + body)
                assert _read_frame(good) == body
        wait_for(lambda: server.log.count("closed:") >= 2, unit(10))
        assert server.stop() == 0
        assert "Traceback" not in server.log


def test_usage_errors_exit_2() -> None:
    """Unknown frame preset, bad port and unknown header field are usage errors: one line, exit 2."""
    for args in (
        ["serve", "--frame", "u33be"],
        ["serve", "--port", "70000"],
        ["client", "--port", "abc"],
        ["client", "--header", "kind=1", "--send", "x"],
        ["serve", "--frame", "u32be+kind:Z"],
    ):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "error:" in done.stderr
        assert "Traceback" not in done.stderr
    done = run_cli("serve", "--frame", "u32be+kind:Z")
    assert "kind:Z" in done.stderr


def test_runtime_errors_exit_1() -> None:
    """Refused connection, unresolvable host and a port in use are runtime errors: one line, exit 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    done = run_cli("client", "--port", str(closed_port), "--send", "x")
    assert done.returncode == 1
    assert "cannot connect" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("client", "no-such-host.invalid", "--send", "x")
    assert done.returncode == 1
    assert "cannot resolve" in done.stderr and "Traceback" not in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_cli("serve", "--port", str(busy.getsockname()[1]))
    assert done.returncode == 1
    assert "cannot listen" in done.stderr and "Traceback" not in done.stderr


def test_early_disconnect_is_exit_1() -> None:
    """A server that closes before replying makes the client exit 1 with one line."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "msgsock",
                "client",
                "--port",
                str(listener.getsockname()[1]),
                "--send",
                "x",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        try:
            conn, _ = listener.accept()
            conn.close()
            _out, err = proc.communicate(timeout=unit(20))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    assert "disconnected" in err and "Traceback" not in err


def test_console_script_matches_python_m() -> None:
    """The `msgsock` console script and `python -m msgsock` are the same program."""
    script = shutil.which("msgsock", path=os.path.dirname(sys.executable))
    assert script, "console script not installed"
    a = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=unit(30))
    b = run_cli("--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout.replace(os.path.basename(script), "msgsock") == b.stdout


def test_demo_runs_end_to_end() -> None:
    """`msgsock demo` (the README's first command) runs a server and clients and exits 0."""
    done = run_cli("demo", timeout=unit(90))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "listening on 127.0.0.1:" in done.stdout
    assert "Hello, msgsock!" in done.stdout
    assert "1000 rounds, all verified" in done.stdout
    assert "summary:" in done.stdout


class _Flood:
    """A client that sends frames as fast as it can on one thread and reads the echoes on another."""

    FRAME = struct.pack(">I", 60) + b"f" * 60

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=unit(10))
        self.sent = 0
        self.echoed = 0
        self.eof = threading.Event()
        self.stop = threading.Event()
        self.sender = threading.Thread(target=self._send, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.sender.start()
        self.reader.start()

    def _send(self) -> None:
        batch = self.FRAME * 64
        while not self.stop.is_set():
            self.sock.sendall(batch)
            self.sent += 64

    def _read(self) -> None:
        size = len(self.FRAME)
        pending = b""
        while chunk := self.sock.recv(1 << 16):
            pending += chunk
            whole = len(pending) // size
            pending = pending[whole * size :]
            self.echoed += whole
        self.eof.set()

    def finish(self, extra: int) -> None:
        """After the server's EOF: stop flooding, send ``extra`` frames more, then our EOF."""
        assert self.eof.wait(unit(10)), "the server never half-closed"
        self.stop.set()
        self.sender.join(unit(10))
        self.sock.sendall(self.FRAME * extra)
        self.sent += extra
        self.sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_under_load_counts_late_messages_as_discarded(engine: str) -> None:
    """SIGTERM while a client keeps sending (issue 10 defect 3): N messages in / N out, the rest discarded."""
    with serve(*_engine(engine), "--shutdown-timeout", str(unit(10))) as server:
        flood = _Flood(server.port)
        try:
            wait_for(lambda: flood.echoed > 1000, unit(10))
            server.proc.send_signal(signal.SIGTERM)
            flood.finish(extra=5)
            assert server.stop() == 0
            flood.reader.join(unit(10))
        finally:
            flood.sock.close()
        summary = next(line for line in server.stdout if line.startswith("summary:"))
        match = re.search(r"(\d+) messages in / (\d+) out \((\d+) discarded\)", summary)
        assert match is not None, summary
        received, sent, discarded = (int(n) for n in match.groups())
        assert received == sent == flood.echoed, summary
        assert discarded >= 5 and received + discarded == flood.sent, (summary, flood.sent)
        assert summary.rstrip().endswith(" 0 errors"), summary
        assert "Traceback" not in server.log
