"""Tests of ``msgsock stress`` (SPEC §6.3): the real command against servers that misbehave on purpose.

Each test server echoes (or reverses) frames and injects one fault: drop, duplicate,
swap, flip a byte, or close the connection early.  The stress command runs as a
subprocess and must count exactly what it sent and classify each fault correctly.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msgsock.exceptions import ProtocolError
from msgsock.framing import DEFAULT_FORMAT, FrameDecoder, FrameFormat, Message

from .helpers import free_loopback6, unit

STRESS = [sys.executable, "-m", "msgsock.app.stress"]
ERROR_KINDS = (
    "lost",
    "duplicated",
    "reordered",
    "corrupted",
    "aborted",
    "refused",
    "timeout",
    "tls",
    "auth",
    "closed",
    "reset",
    "protocol",
)


# -- test servers -----------------------------------------------------------------------


class FaultyServer:
    """Thread-per-connection frame server that echoes or reverses, with one deliberate fault.

    The fault hits message number ``at`` (0-based) of the first connection only:
    ``drop`` never answers it, ``dup`` answers it twice, ``swap`` answers it after the
    next one, ``flip`` flips a bit of its last byte, ``header`` flips a bit of its extra
    header fields, ``truncate`` half-closes the connection after answering ``at``
    messages (and reads on until the client closes), ``cut`` sends half of the reply to
    ``at`` and then half-closes, ``garbage`` answers ``at`` with a frame header above
    any max_size, ``reset`` resets the connection instead of answering ``at``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        fault: str | None = None,
        at: int = 3,
        handler: str = "echo",
        frame: FrameFormat = DEFAULT_FORMAT,
    ) -> None:
        self.fault = fault
        self.at = at
        self.handler = handler
        self.frame = frame
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family, backlog=128)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                first = self.accepted == 0
                self.accepted += 1
                self.conns.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, first), daemon=True)
            with self.lock:
                self.threads.append(t)
            t.start()

    def _reply(self, m: bytes) -> bytes:
        if self.handler == "reverse":
            if type(m) is Message:
                return Message(m[::-1], m.header)
            return m[::-1]
        return m

    def _serve(self, sock: socket.socket, first: bool) -> None:
        decoder = FrameDecoder(self.frame)
        fault = self.fault if first else None
        count = 0
        held: bytes | None = None
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                out = bytearray()
                for m in decoder.feed(data):
                    i = count
                    count += 1
                    reply = self._reply(m)
                    if fault == "drop" and i == self.at:
                        continue
                    if fault == "garbage" and i == self.at:
                        out += b"\xff\xff\xff\xff"
                        continue
                    if fault == "reset" and i == self.at:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # (closed by the finally clause: a reset)
                    if fault == "cut" and i == self.at:
                        frame = self.frame.encode(reply)
                        sock.sendall(out + frame[: len(frame) // 2])
                        sock.shutdown(socket.SHUT_WR)
                        while sock.recv(65536):  # read on until the client closes
                            pass
                        return
                    if fault == "swap" and i == self.at:
                        held = reply
                        continue
                    if fault == "header" and i == self.at and type(reply) is Message:
                        reply = Message(reply, {k: v ^ 1 for k, v in reply.header.items()})
                    if fault == "flip" and i == self.at:
                        body = bytearray(reply)
                        body[-1] ^= 0x01
                        reply = Message(bytes(body), reply.header) if type(reply) is Message else bytes(body)
                    out += self.frame.encode(reply)
                    if fault == "dup" and i == self.at:
                        out += self.frame.encode(reply)
                    if fault == "swap" and i == self.at + 1 and held is not None:
                        out += self.frame.encode(held)
                    if fault == "truncate" and count == self.at:
                        sock.sendall(out)
                        sock.shutdown(socket.SHUT_WR)
                        while sock.recv(65536):  # read on until the client closes
                            pass
                        return
                if out:
                    sock.sendall(out)
        except (OSError, ProtocolError):
            return
        finally:
            sock.close()

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.acceptor.join(timeout=unit(5))
        with self.lock:
            conns = list(self.conns)
            threads = list(self.threads)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(timeout=unit(5))


class UdpServer:
    """UDP echo server; with ``drop`` it swallows datagram number ``at``."""

    def __init__(self, host: str = "127.0.0.1", *, fault: str | None = None, at: int = 3) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.fault = fault
        self.at = at
        self.count = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            i = self.count
            self.count += 1
            if self.fault == "drop" and i == self.at:
                continue
            try:
                self.sock.sendto(data, peer)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=unit(5))
        self.sock.close()


@pytest.fixture
def make_server() -> Iterator[Any]:
    """Factory of TCP test servers, all closed at the end of the test."""
    servers: list[FaultyServer] = []

    def make(**kwargs: Any) -> FaultyServer:
        s = FaultyServer(**kwargs)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.close()


@pytest.fixture
def make_udp_server() -> Iterator[Any]:
    """Factory of UDP test servers, all closed at the end of the test."""
    servers: list[UdpServer] = []

    def make(**kwargs: Any) -> UdpServer:
        s = UdpServer(**kwargs)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.close()


# -- running the command ----------------------------------------------------------------


def stress(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real stress command; never hangs past ``timeout``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [*STRESS, *args], capture_output=True, text=True, timeout=timeout or unit(40), env=env, check=False
    )


def stress_json(*args: str) -> tuple[int, dict[str, Any], str]:
    proc = stress(*args, "--json", "--quiet")
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def only_errors(report: dict[str, Any], **expected: int) -> None:
    """Assert the error counts are exactly ``expected`` and zero for every other kind."""
    want = dict.fromkeys(ERROR_KINDS, 0) | expected
    assert report["errors"] == want


# -- correct servers --------------------------------------------------------------------


def test_echo_exact_counts(make_server: Any) -> None:
    """Against a correct echo server, --messages N sends and verifies exactly N messages, exit 0."""
    server = make_server()
    code, report, err = stress_json(
        "127.0.0.1", "--port", str(server.port), "-c", "4", "-d", "8", "-n", "1000"
    )
    assert code == 0, err
    assert report["messages"]["sent"] == 1000
    assert report["messages"]["verified"] == 1000
    assert report["latency_us"]["count"] == 1000
    assert report["bytes"]["payload"] == 1000 * 64
    assert report["connections"]["established"] == 4
    only_errors(report)
    assert report["ok"] is True


def test_through_the_msgsock_command(make_server: Any) -> None:
    """``python -m msgsock stress`` runs the same command (options, counts, exit status)."""
    server = make_server()
    proc = subprocess.run(
        [sys.executable, "-m", "msgsock", "stress", "--port", str(server.port), "-n", "100", "--json", "-q"],
        capture_output=True,
        text=True,
        timeout=unit(40),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["messages"]["verified"] == 100


def test_echo_ipv6(make_server: Any) -> None:
    """The stress command works over IPv6 loopback."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    server = make_server(host="::1")
    code, report, err = stress_json("::1", "--port", str(server.port), "-c", "2", "-d", "2", "-n", "200")
    assert code == 0, err
    assert report["messages"]["verified"] == 200
    assert report["target"]["address"] == f"[::1]:{server.port}"


def test_text_report_and_plain_interval_lines(make_server: Any) -> None:
    """Without a terminal the live output is plain interval lines, then the report and an OK line."""
    server = make_server()
    proc = stress("--port", str(server.port), "-n", "300", "--interval", "0.05", "-d", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "msg/s" in out and "MB/s" in out and "p99" in out
    lines = out.splitlines()
    assert any(line.startswith("[") and "/300]" in line for line in lines), out
    assert "300 sent, 300 verified byte for byte" in out
    assert "latency      p50" in out
    assert lines[-1].startswith("OK: 300 replies verified")
    assert "\x1b[" not in out  # no terminal escapes when stdout is not a terminal


def test_quiet_has_no_live_lines(make_server: Any) -> None:
    """--quiet prints only the final report."""
    server = make_server()
    proc = stress("--port", str(server.port), "-n", "100", "--interval", "0.01", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not any(line.startswith("[") for line in proc.stdout.splitlines())
    assert proc.stdout.startswith("msgsock stress:")


def test_random_sizes_from_empty_to_large(make_server: Any) -> None:
    """--size MIN-MAX draws sizes per message (empty and > 32 KiB included) and verifies them all."""
    server = make_server()
    code, report, err = stress_json(
        "--port", str(server.port), "-c", "3", "-d", "4", "-n", "600", "--size", "0-70000", "--seed", "5"
    )
    assert code == 0, err
    assert report["messages"]["verified"] == 600
    assert report["config"]["size_min"] == 0 and report["config"]["size_max"] == 70000
    # uniform sizes: the mean payload is near 35000
    assert 25_000 < report["bytes"]["payload"] / 600 < 45_000


@pytest.mark.parametrize("size", ["1", "5", "12", "13"])
def test_messages_around_the_id_size(make_server: Any, size: str) -> None:
    """Messages shorter than, equal to and just above the 12-byte id are verified."""
    server = make_server()
    code, report, err = stress_json("--port", str(server.port), "-d", "3", "-n", "200", "--size", size)
    assert code == 0, err
    assert report["messages"]["verified"] == 200


def test_frame_presets_and_header_fields(make_server: Any) -> None:
    """Other frame formats work, and echoed extra header fields are checked too."""
    for spec in ("u16le", "u32be+kind:B+flags:h"):
        frame = FrameFormat.parse(spec)
        server = make_server(frame=frame)
        code, report, err = stress_json("--port", str(server.port), "-d", "4", "-n", "300", "--frame", spec)
        assert code == 0, err
        assert report["target"]["frame"] == spec
        assert report["messages"]["verified"] == 300


def test_header_field_mismatch_is_corruption(make_server: Any) -> None:
    """A reply whose body is right but whose extra header field changed is counted as corrupted."""
    spec = "u32be+kind:B"
    server = make_server(frame=FrameFormat.parse(spec), fault="header", at=2)
    code, report, _ = stress_json("--port", str(server.port), "-n", "10", "--frame", spec)
    assert code == 1
    only_errors(report, corrupted=1)
    assert report["messages"]["verified"] == 9
    assert any("header fields" in e for e in report["error_examples"]), report["error_examples"]


def test_server_with_another_frame_format_is_caught(make_server: Any) -> None:
    """Talking to a server that uses another frame format fails loudly, never silently passes."""
    server = make_server(frame=FrameFormat.parse("u32le"))
    code, report, _ = stress_json("--port", str(server.port), "-n", "10", "--timeout", str(unit(1)))
    assert code == 1
    assert report["messages"]["verified"] == 0
    assert report["errors_total"] > 0


def test_reverse_handler(make_server: Any) -> None:
    """--expect reverse verifies a reversing server; an echo server then fails as corrupted."""
    rev = make_server(handler="reverse")
    code, report, err = stress_json(
        "--port", str(rev.port), "-d", "2", "-n", "200", "--expect", "reverse", "--size", "5-100"
    )
    assert code == 0, err
    assert report["messages"]["verified"] == 200
    echo = make_server()
    code, report, _ = stress_json("--port", str(echo.port), "-n", "20", "--expect", "reverse")
    assert code == 1
    only_errors(report, corrupted=20)


def test_workers_merge_their_results(make_server: Any) -> None:
    """--workers 2 splits connections and messages over two processes and merges the counts."""
    server = make_server()
    code, report, err = stress_json(
        "--port", str(server.port), "-c", "4", "-d", "4", "-n", "800", "--workers", "2"
    )
    assert code == 0, err
    assert report["config"]["workers"] == 2
    assert report["messages"]["sent"] == 800
    assert report["messages"]["verified"] == 800
    assert report["latency_us"]["count"] == 800
    assert report["connections"]["established"] == 4
    assert server.accepted == 4


def test_warmup_is_not_counted(make_server: Any) -> None:
    """Messages of the warmup are verified but not counted; exactly N are measured after it."""
    server = make_server()
    code, report, err = stress_json("--port", str(server.port), "-n", "200", "--warmup", "0.2", "-d", "2")
    assert code == 0, err
    assert report["messages"]["verified"] == 200
    assert report["messages"]["warmup"] > 0


def test_connect_rate(make_server: Any) -> None:
    """--connect-rate opens the connections gradually and the run still completes."""
    server = make_server()
    code, report, err = stress_json("--port", str(server.port), "-c", "3", "--connect-rate", "30", "-n", "60")
    assert code == 0, err
    assert report["connections"]["established"] == 3
    assert report["connections"]["connect_s"] >= 2 / 30 * 0.5


def test_rate_open_loop(make_server: Any) -> None:
    """--rate runs open loop on a fixed schedule and prints the achieved and target rates."""
    server = make_server()
    proc = stress(
        "--port", str(server.port), "--rate", "200", "--duration", "0.5", "-c", "2", "-d", "2", "--quiet"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(target 200 msg/s)" in proc.stdout
    assert "from intended send times" in proc.stdout


def test_rate_with_exact_messages(make_server: Any) -> None:
    """Open loop with --messages sends exactly N messages."""
    server = make_server()
    code, report, err = stress_json("--port", str(server.port), "--rate", "500", "-n", "100", "-c", "2")
    assert code == 0, err
    assert report["messages"]["sent"] == 100
    assert report["messages"]["verified"] == 100
    assert report["rate"]["target_msgs_per_s"] == 500


def test_long_run_wraps_the_stream_windows(make_server: Any) -> None:
    """Thousands of messages per connection (ids past 256, every window slot reused) all verify."""
    server = make_server()
    code, report, err = stress_json(
        "--port", str(server.port), "-c", "2", "-d", "16", "-n", "6000", "--size", "1000"
    )
    assert code == 0, err
    assert report["messages"]["verified"] == 6000
    assert report["latency_us"]["count"] == 6000
    only_errors(report)


# -- faults -----------------------------------------------------------------------------


def test_dropped_message_is_lost_within_the_timeout(make_server: Any) -> None:
    """A swallowed message is reported as lost once --timeout passes (not waited on forever), exit 1."""
    server = make_server(fault="drop", at=3)
    timeout = unit(1)
    start = time.monotonic()
    code, report, err = stress_json("--port", str(server.port), "-n", "20", "--timeout", str(timeout))
    took = time.monotonic() - start
    assert code == 1
    only_errors(report, lost=1)
    assert report["messages"]["sent"] == 20
    assert report["messages"]["verified"] == 19
    assert "1 message lost: no reply within" in err
    assert took < timeout + unit(10)


def test_duplicated_message(make_server: Any) -> None:
    """A reply sent twice is counted as duplicated; every message is still verified once."""
    server = make_server(fault="dup", at=3)
    code, report, err = stress_json("--port", str(server.port), "-n", "20")
    assert code == 1
    only_errors(report, duplicated=1)
    assert report["messages"]["verified"] == 20
    assert "1 message duplicated" in err


def test_swapped_messages_are_reordered(make_server: Any) -> None:
    """Two replies swapped are counted as one reordering; none is lost or corrupted."""
    server = make_server(fault="swap", at=5)
    code, report, err = stress_json("--port", str(server.port), "-n", "40", "-d", "4")
    assert code == 1
    only_errors(report, reordered=1)
    assert report["messages"]["verified"] == 40
    assert "1 message reordered" in err


def test_flipped_byte_is_corrupted(make_server: Any) -> None:
    """A reply with one bit flipped is counted as corrupted, with the position in the examples."""
    server = make_server(fault="flip", at=3)
    code, report, err = stress_json("--port", str(server.port), "-n", "20", "--size", "100")
    assert code == 1
    only_errors(report, corrupted=1)
    assert report["messages"]["verified"] == 19
    assert any("seq 3: byte 99" in e for e in report["error_examples"]), report["error_examples"]
    assert "1 message corrupted" in err


def test_flipped_byte_in_a_large_message(make_server: Any) -> None:
    """Corruption is caught in large (zero-copy) messages too."""
    server = make_server(fault="flip", at=2)
    code, report, _ = stress_json("--port", str(server.port), "-n", "8", "--size", "100000", "-d", "2")
    assert code == 1
    only_errors(report, corrupted=1)
    assert report["messages"]["verified"] == 7


@pytest.mark.parametrize(
    ("fault", "errors", "verified"),
    [("flip", {"corrupted": 1}, 2999), ("dup", {"duplicated": 1}, 3000), ("swap", {"reordered": 1}, 3000)],
)
def test_faults_late_in_a_deep_run(
    make_server: Any, fault: str, errors: dict[str, int], verified: int
) -> None:
    """A fault long after the start, with many messages in flight, is still classified exactly."""
    server = make_server(fault=fault, at=1500)
    code, report, _ = stress_json("--port", str(server.port), "-n", "3000", "-d", "8", "--size", "1000")
    assert code == 1
    only_errors(report, **errors)
    assert report["messages"]["verified"] == verified


def test_late_drop_in_a_deep_run_is_lost(make_server: Any) -> None:
    """A message swallowed late in a deep run is lost once; the later replies all verify."""
    server = make_server(fault="drop", at=700)
    code, report, _ = stress_json(
        "--port", str(server.port), "-n", "1000", "-d", "8", "--timeout", str(unit(1))
    )
    assert code == 1
    only_errors(report, lost=1)
    assert report["messages"]["verified"] == 999


GENERAL_AND_STREAM = [pytest.param([], id="stream"), pytest.param(["--size", "20-100"], id="general")]


@pytest.mark.parametrize("mode", GENERAL_AND_STREAM)
def test_bad_frame_header_from_the_server(make_server: Any, mode: list[str]) -> None:
    """A reply whose header declares a frame above max_size: one `protocol` connection with the
    core's reason (the replies before it verify), its unanswered message aborted."""
    server = make_server(fault="garbage", at=3)
    code, report, err = stress_json("--port", str(server.port), "-n", "20", *mode)
    assert code == 1
    only_errors(report, protocol=1, aborted=1)
    assert report["messages"]["verified"] == 3
    assert report["error_examples"] == [
        "conn 0: bad frame from the server: message size 4294967295 exceeds max_size 16777216"
    ]
    assert "1 connection broke the frame format" in err


@pytest.mark.parametrize("mode", GENERAL_AND_STREAM)
def test_reply_cut_short_by_the_server(make_server: Any, mode: list[str]) -> None:
    """A server that ends its stream in the middle of a reply: `closed`, the core saying how far
    the frame got (an incomplete message); the message it was answering is aborted."""
    server = make_server(fault="cut", at=3)
    code, report, _ = stress_json("--port", str(server.port), "-n", "20", *mode)
    assert code == 1
    only_errors(report, closed=1, aborted=1)
    assert report["messages"]["verified"] == 3
    [example] = report["error_examples"]
    assert example.startswith("conn 0: closed by the server after 3 messages (stream ended after ")
    assert example.endswith(" of an unfinished frame)")


@pytest.mark.parametrize("mode", GENERAL_AND_STREAM)
def test_reset_by_the_server(make_server: Any, mode: list[str]) -> None:
    """A server that resets the connection: `reset`, worded once by the core."""
    server = make_server(fault="reset", at=3)
    code, report, err = stress_json("--port", str(server.port), "-n", "20", *mode)
    assert code == 1
    only_errors(report, reset=1, aborted=1)
    assert report["messages"]["verified"] == 3
    assert report["error_examples"] == ["conn 0: receive: connection reset by peer"]
    assert "1 connection reset" in err


def test_truncated_connection(make_server: Any) -> None:
    """A server that closes after K replies: one connection closed, its unanswered message aborted."""
    server = make_server(fault="truncate", at=5)
    code, report, err = stress_json("--port", str(server.port), "-n", "20")
    assert code == 1
    only_errors(report, closed=1, aborted=1)
    assert report["messages"]["verified"] == 5
    assert "1 connection closed by the server" in err


def test_refused_connection() -> None:
    """Nothing listening: the connection is reported refused and the exit status is 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = stress("--port", str(port), "-n", "5")
    assert proc.returncode == 1
    assert "1 connection refused" in proc.stdout
    assert "FAILED" in proc.stdout.splitlines()[-1]


# -- UDP --------------------------------------------------------------------------------


def test_udp_echo(make_udp_server: Any) -> None:
    """--udp sends one datagram per message and verifies every reply."""
    server = make_udp_server()
    code, report, err = stress_json(
        "--port", str(server.port), "--udp", "-c", "2", "-d", "4", "-n", "400", "--size", "1-1400"
    )
    assert code == 0, err
    assert report["target"]["transport"] == "udp"
    assert report["target"]["frame"] is None
    assert report["messages"]["verified"] == 400


def test_udp_dropped_datagram_is_lost(make_udp_server: Any) -> None:
    """A datagram the server swallows is reported as lost after --timeout."""
    server = make_udp_server(fault="drop", at=4)
    code, report, _ = stress_json("--port", str(server.port), "--udp", "-n", "20", "--timeout", str(unit(1)))
    assert code == 1
    only_errors(report, lost=1)
    assert report["messages"]["verified"] == 19


def test_udp_ipv6(make_udp_server: Any) -> None:
    """UDP mode works over IPv6 loopback."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    server = make_udp_server(host="::1")
    code, report, err = stress_json("::1", "--port", str(server.port), "--udp", "-n", "100")
    assert code == 0, err
    assert report["messages"]["verified"] == 100


# -- JSON, plot, usage ------------------------------------------------------------------


def test_json_schema(make_server: Any) -> None:
    """--json prints one object whose documented keys have the documented types."""
    server = make_server()
    code, r, err = stress_json("--port", str(server.port), "-n", "100", "--interval", "0.02")
    assert code == 0, err
    assert r["schema"] == "msgsock.stress/1"
    assert set(r) >= {
        "target", "config", "connections", "elapsed_s", "interrupted", "messages", "bytes", "rate",
        "latency_us", "errors", "errors_total", "error_examples", "intervals", "histogram", "ok", "exit_status",
    }  # fmt: skip
    assert set(r["target"]) == {"host", "port", "address", "transport", "frame"}
    assert set(r["messages"]) == {"sent", "verified", "in_flight", "unsent", "warmup"}
    assert all(isinstance(v, int) for v in r["messages"].values())
    assert set(r["bytes"]) == {"payload", "sent", "received"}
    assert set(r["rate"]) == {"msgs_per_s", "mb_per_s", "target_msgs_per_s"}
    assert set(r["latency_us"]) == {"count", "min", "mean", "p50", "p90", "p99", "p99_9", "max"}
    lat = r["latency_us"]
    assert all(isinstance(lat[k], float) for k in ("min", "mean", "p50", "p90", "p99", "p99_9", "max"))
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert set(r["errors"]) == set(ERROR_KINDS)
    assert isinstance(r["elapsed_s"], float) and r["elapsed_s"] > 0
    assert r["exit_status"] == 0 and r["ok"] is True and r["interrupted"] is False
    assert set(r["config"]) == {
        "connections", "size_min", "size_max", "seed", "depth", "duration_s", "messages", "warmup_s",
        "rate", "connect_rate", "workers", "timeout_s", "expect",
    }  # fmt: skip
    assert r["intervals"], "at least the final interval"
    for iv in r["intervals"]:
        assert set(iv) == {
            "start_s",
            "end_s",
            "msgs",
            "bytes",
            "msgs_per_s",
            "mb_per_s",
            "p99_us",
            "errors",
            "warmup",
        }
        assert iv["end_s"] >= iv["start_s"]
    assert sum(iv["msgs"] for iv in r["intervals"]) == 100
    assert r["histogram"]["count"] == 100


def test_plot_writes_a_png(make_server: Any, tmp_path: Path) -> None:
    """--plot writes a PNG file with the latency distribution and the throughput over time."""
    pytest.importorskip("matplotlib")
    server = make_server()
    out = tmp_path / "stress.png"
    proc = stress(
        "--port", str(server.port), "-n", "300", "--plot", str(out), "--quiet", "--interval", "0.02"
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_without_matplotlib_is_a_usage_error(make_server: Any, tmp_path: Path) -> None:
    """Without matplotlib, --plot exits 2 and says how to install it (before any load is sent)."""
    server = make_server()
    code = (
        "import sys; sys.modules['matplotlib'] = None; from msgsock.app import stress; "
        f"sys.exit(stress._main(['--port', '{server.port}', '-n', '5', '--plot', sys.argv[1]]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=unit(30),
        check=False,
    )
    assert proc.returncode == 2
    assert "pip install 'msgsock[plot]'" in proc.stderr
    assert server.accepted == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "300", "--frame", "u8"],
        ["--size", "70000", "--udp"],
        ["--size", "10-5"],
        ["--duration", "1", "--messages", "5"],
        ["--workers", "3", "--connections", "2"],
        ["--frame", "u32be+bad"],
        ["--depth", "0"],
        ["--rate", "-5"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    """Impossible options are usage errors: exit 2 with a message, no traceback."""
    proc = stress("--port", "9", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error" in proc.stderr


# -- stopping early ---------------------------------------------------------------------


def _start(*args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen(
        [*STRESS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for_interval_line(lines: queue.Queue[str]) -> list[str]:
    seen = []
    deadline = time.monotonic() + unit(20)
    while time.monotonic() < deadline:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        seen.append(line)
        if line.startswith("["):
            return seen
        assert line, f"stress ended early: {seen}"
    raise AssertionError(f"no interval line: {seen}")


def _rest(lines: queue.Queue[str]) -> str:
    out = []
    while (line := lines.get(timeout=unit(20))) != "":
        out.append(line)
    return "".join(out)


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGINT, "1"), (signal.SIGTERM, "2")])
def test_signal_stops_early_and_reports(make_server: Any, sig: signal.Signals, workers: str) -> None:
    """SIGINT or SIGTERM stops a long run early and still prints the report for what ran."""
    server = make_server()
    proc, lines = _start(
        "--port", str(server.port), "--duration", "60", "-c", "2", "--interval", "0.1", "--workers", workers
    )
    try:
        _wait_for_interval_line(lines)
        proc.send_signal(sig)
        rest = _rest(lines)
        code = proc.wait(timeout=unit(20))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0, rest
    assert "(interrupted)" in rest
    assert "verified byte for byte" in rest
    assert rest.splitlines()[-1].startswith("OK:")


# -- internals (in process, fast) -------------------------------------------------------


def test_payload_layout_and_matchers() -> None:
    """Bodies start with seq and conn id; the matchers accept exactly the expected reply."""
    from msgsock.app.stress import StressConfig
    from msgsock.app.stress.payload import _Payloads

    cfg = StressConfig(size_min=40, size_max=40)
    p = _Payloads(cfg)
    body = b"".join(p.body_parts(7, 1234, 40))
    assert body[:12] == (1234).to_bytes(8, "little") + (7).to_bytes(4, "little")
    assert len(body) == 40
    match = p.matcher()
    assert match(body, 7, 1234)
    assert not match(body, 7, 1235)
    assert not match(body[:-1] + bytes([body[-1] ^ 1]), 7, 1234)
    rev = _Payloads(StressConfig(size_min=0, size_max=100, expect="reverse"))
    for seq in range(50):
        n = rev.size_of(3, seq)
        assert 0 <= n <= 100
        assert n == rev.size_of(3, seq)  # deterministic
        exp = rev.expected(3, seq)
        assert exp == b"".join(rev.body_parts(3, seq, n))[::-1]
        assert rev.matcher()(exp, 3, seq)


def test_every_end_kind_counts_under_a_report_kind() -> None:
    """How a connection ended is the core's EndKind; each one counts under one kind of the report."""
    from msgsock.app.stress.kinds import _report_kind
    from msgsock.exceptions import EndKind

    assert {_report_kind(kind) for kind in EndKind} <= set(ERROR_KINDS)
    assert _report_kind(EndKind.CLEAN) == _report_kind(EndKind.INCOMPLETE_MESSAGE) == "closed"
    assert _report_kind(EndKind.MESSAGE_TOO_LARGE) == _report_kind(EndKind.FRAME_ERROR) == "protocol"
    assert _report_kind(EndKind.RESET) == _report_kind(EndKind.OS_ERROR) == "reset"
    assert _report_kind(EndKind.TLS) == "tls"
    assert _report_kind(EndKind.AUTHENTICATION) == "auth"
    assert _report_kind(EndKind.HANDSHAKE_TIMEOUT) == "timeout"


def test_first_difference() -> None:
    """The byte position reported for a corruption is the first one that differs."""
    from msgsock.app.stress import _first_difference

    a = bytes(range(200))
    for i in (0, 1, 99, 199):
        b = bytearray(a)
        b[i] ^= 0xFF
        assert _first_difference(bytes(b), a) == i
    assert _first_difference(a, a) == 200
    assert _first_difference(a[:50], a) == 50


def test_stream_mode_split_replies_and_fallback() -> None:
    """Replies split anywhere verify in stream mode; a bad byte after a split reply is classified per
    message (the verified half is not lost), and an EOF then aborts exactly what is still owed."""
    from msgsock.app.stress import StressConfig
    from msgsock.app.stress.config import _shares
    from msgsock.app.stress.conn import _Conn
    from msgsock.app.stress.poller import _IN
    from msgsock.app.stress.pump import _Worker

    cfg = StressConfig(size_min=40, size_max=40, depth=4, duration=1000.0)
    w = _Worker(cfg, _shares(cfg)[0], (socket.AF_INET, ("127.0.0.1", 0)))
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.settimeout(unit(5))
        c = _Conn(0, a)
        w.conns[c.fd] = c
        w._connected(c, time.monotonic_ns())
        assert c.stream
        w.sending = True
        w.ledger.t_start = time.monotonic_ns()
        w._refill(c, w.ledger.t_start)
        ml = 44

        def take(n: int) -> bytes:
            data = b""
            while len(data) < n:
                data += b.recv(n - len(data))
            return data

        def reply(data: bytes) -> None:
            b.sendall(data)
            w._stream_round([(c.fd, _IN)], time.monotonic_ns())

        sent = take(4 * ml)
        reply(sent[:66])  # one and a half replies
        assert c.stream and c.next_rx == 1 and c.rx == 66
        sent += take(ml)  # the replacement of message 0
        reply(sent[66:100])
        assert c.stream and c.next_rx == 2
        sent += take(ml)
        bad = bytearray(sent[100 : 4 * ml])
        bad[-5] ^= 0x40  # in message 3, after the rest of message 2
        reply(bytes(bad))
        assert not c.stream  # classified per message from here on
        ledger = w.ledger
        ledger.fold()
        assert ledger.errors["corrupted"] == 1
        assert ledger.done_all == 3  # messages 0, 1 and 2
        assert any("conn 0 seq 3: byte 35" in e for e in ledger.examples), ledger.examples
        b.shutdown(socket.SHUT_WR)  # EOF with messages 4 and 5 (and their refills) unanswered
        w._stream_round([(c.fd, _IN)], time.monotonic_ns())
        ledger.fold()
        assert ledger.errors["closed"] == 1
        assert ledger.errors["aborted"] == ledger.sent_all - 4 > 0
        assert ledger.inflight == 0
    finally:
        a.close()
        b.close()
        w.ep.close()
