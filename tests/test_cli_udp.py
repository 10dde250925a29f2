"""``msgsock serve --udp`` and ``msgsock client --udp`` as real subprocesses (SPEC §6.1, §6.2, §5.4)."""

from __future__ import annotations

import socket

import pytest

from tests.cli_helpers import ServerProcess, run_cli, serve
from tests.helpers import free_loopback6, unit, wait_for


def _summary(server: ServerProcess) -> list[str]:
    return [line.strip() for line in server.stdout if line.startswith("summary:")]


def test_serve_udp_echoes_datagrams_and_summarises() -> None:
    """`serve --udp` prints its ready line, `client --udp --send` prints each reply, SIGTERM prints a summary."""
    with serve("--udp") as server:
        assert server.ready == f"listening on 127.0.0.1:{server.port} (udp, datagram)"
        done = run_cli("client", "--udp", "--port", str(server.port), "--send", "x", "--send", "y z")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["x", "y z"]
        assert server.stop() == 0
        assert _summary(server) == [
            "summary: 0 connections (0 rejected), 2 messages in / 2 out, 4 bytes in / 4 out, 0 errors"
        ]
        assert "Traceback" not in server.log


def test_udp_over_ipv6() -> None:
    """Server and client speak datagrams over ::1."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    with serve("--udp", "--host", "::1") as server:
        assert server.ready == f"listening on [::1]:{server.port} (udp, datagram)"
        done = run_cli("client", "::1", "--udp", "--port", str(server.port), "--send", "hello six")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hello six"
        assert server.stop() == 0


def test_reverse_handler_stdin_and_rounds() -> None:
    """`--handler reverse` over UDP: stdin lines come back reversed, and `--rounds` reports the mismatch."""
    with serve("--udp", "--handler", "reverse") as server:
        port = str(server.port)
        done = run_cli("client", "--udp", "--port", port, input="stressed\n\nabc\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["desserts", "", "cba"]
        done = run_cli("client", "--udp", "--port", port, "--rounds", "3", "--message", "abc")
        assert done.returncode == 1
        assert "mismatch at round 1: sent 'abc', got 'cba'" in done.stderr
        assert "Traceback" not in done.stderr
        assert server.stop() == 0


def test_rounds_over_udp() -> None:
    """`client --udp --rounds N` runs the MFCAsync loop over datagrams against the echo server."""
    with serve("--udp") as server:
        done = run_cli("client", "--udp", "--port", str(server.port), "--rounds", "50", "--message", "abc")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("50 rounds, all verified; RTT p50 ")
        assert server.stop() == 0
        assert "50 messages in / 50 out" in _summary(server)[0]


def test_silence_is_exit_1_with_a_clear_message() -> None:
    """A server that never replies: the client resends, then exits 1 naming the address and the tries."""
    timeout = f"{unit(0.2):g}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        done = run_cli(
            "client", "--udp", "--port", str(port), "--timeout", timeout, "--retries", "2", "--send", "x"
        )
        received = []
        silent.settimeout(0)
        for _ in range(10):  # bounded: the client sent 3 tries
            try:
                received.append(silent.recv(100))
            except BlockingIOError:
                break
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"msgsock client: error: no reply from 127.0.0.1:{port} after 3 tries of {timeout} s"
    )
    assert received == [b"x", b"x", b"x"]
    assert done.stdout == ""


def test_oversize_messages_are_clear_errors() -> None:
    """Above the client's --max-size nothing is sent (exit 1); above the server's, it drops and logs it."""
    with serve("--udp", "--max-size", "100") as server:
        port = str(server.port)
        done = run_cli("client", "--udp", "--port", port, "--max-size", "10", "--send", "x" * 20)
        assert done.returncode == 1
        assert done.stderr.strip() == (
            "msgsock client: error: message 1 is 20 bytes, above --max-size 10 (the largest datagram to send)"
        )
        timeout = f"{unit(0.2):g}"
        done = run_cli(
            "client", "--udp", "--port", port, "--timeout", timeout, "--retries", "0", "--send", "y" * 200
        )
        assert done.returncode == 1
        assert f"no reply from 127.0.0.1:{port} after 1 tries" in done.stderr
        wait_for(lambda: "above max_size 100" in server.log, unit(10))
        line = next(line for line in server.stderr if "above max_size 100" in line)
        assert "127.0.0.1:" in line and "200 bytes" in line
        done = run_cli("client", "--udp", "--port", port, "--send", "fits")
        assert done.returncode == 0 and done.stdout.strip() == "fits"
        assert server.stop() == 0
        assert _summary(server)[0].endswith(
            "1 messages in / 1 out, 4 bytes in / 4 out, 1 errors (1 message too large)"
        )
        assert "Traceback" not in server.log


def test_udp_usage_conflicts_exit_2() -> None:
    """Options that only mean something over TCP are usage errors with --udp, naming the conflict."""
    for args, words in (
        (["serve", "--udp", "--engine", "threads"], "--engine threads"),
        (["serve", "--udp", "--engine", "processes"], "--engine processes"),
        (["serve", "--udp", "--workers", "2"], "--workers"),
        (["serve", "--udp", "--frame", "u16be"], "--frame u16be"),
        (["serve", "--udp", "--idle-timeout", "3"], "--idle-timeout"),
        (["serve", "--udp", "--max-connections", "3"], "--max-connections"),
        (["serve", "--udp", "--max-size", "70000"], "65535"),
        (["client", "--udp", "--header", "kind=1", "--send", "x"], "--header"),
        (["client", "--udp", "--frame", "u32be+kind:B", "--send", "x"], "--frame u32be+kind:B"),
        (["client", "--udp", "--connect-timeout", "1", "--send", "x"], "--connect-timeout"),
        (["client", "--udp", "--max-size", "70000", "--send", "x"], "65535"),
        (["client", "--retries", "2", "--send", "x"], "--retries needs --udp"),
        (["client", "--udp", "--retries", "-1", "--send", "x"], "--retries"),
    ):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "error:" in done.stderr and words in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stdout == ""


def test_udp_port_in_use_is_exit_1() -> None:
    """A UDP port already bound is one error line and exit 1, before any ready line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        done = run_cli("serve", "--udp", "--port", str(busy.getsockname()[1]))
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1:" in done.stderr and "in use" in done.stderr
    assert "listening on" not in done.stdout and "Traceback" not in done.stderr
