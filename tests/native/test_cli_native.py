"""``msgsock serve --engine native`` and ``--engine auto`` as real subprocesses (SPEC §6.1)."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys

import pytest

from tests.cli_helpers import ENV, MSGSOCK, run_cli, serve
from tests.helpers import unit, wait_for
from tests.native.conftest import REASON, requires_native

pytestmark = pytest.mark.timeout(unit(60))

SUMMARY = re.compile(r"summary: (\d+) connections .* (\d+) messages in / (\d+) out")


def exchange(port: int, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=unit(10)) as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "EOF before the reply"
            data += chunk
        return data[4:]


@requires_native
@pytest.mark.parametrize("backend", ["epoll", "io_uring"])
def test_native_ready_line_echo_reverse_and_summary(backend: str) -> None:
    """--engine native names its backend (io_uring falls back to epoll where refused), echoes and summarises."""
    env = {**ENV, "MSGSOCK_NATIVE_BACKEND": backend}
    program = ["env", f"MSGSOCK_NATIVE_BACKEND={backend}", *MSGSOCK]
    with serve("--engine", "native", "--handler", "reverse", program=program) as server:
        match = re.fullmatch(
            r"listening on 127\.0\.0\.1:\d+ \(native (epoll|io_uring), u32be\)", server.ready
        )
        assert match, server.ready
        if backend == "epoll":
            assert match[1] == "epoll"
        assert exchange(server.port, b"hello") == b"olleh"
        assert exchange(server.port, b"") == b""
        wait_for(lambda: server.log.count("disconnected") >= 2, unit(10))
        assert server.stop() == 0
    del env
    summary = [line for line in server.stdout if line.startswith("summary:")]
    assert len(summary) == 1, server.output
    assert "2 connections (0 rejected), 2 messages in / 2 out" in summary[0]
    assert "connection from 127.0.0.1:" in server.log
    assert "Traceback" not in server.log


@requires_native
def test_auto_is_native_for_plain_tcp() -> None:
    with serve() as server:
        assert re.search(r"\(native (epoll|io_uring), u32be\)$", server.ready), server.ready
        assert exchange(server.port, b"x") == b"x"
        assert server.stop() == 0


def test_auto_is_asyncio_for_the_proxy_protocol() -> None:
    """TLS, auth and PROXY stay with asyncio: auto picks it and says so."""
    with serve("--proxy-protocol") as server:
        assert server.ready.endswith("(asyncio, u32be, proxy protocol)"), server.ready
        assert server.stop() == 0


def test_auto_without_extensions_is_asyncio() -> None:
    program = ["env", "MSGSOCK_NO_EXTENSIONS=1", *MSGSOCK]
    with serve(program=program) as server:
        assert server.ready.endswith("(asyncio, u32be)"), server.ready
        assert exchange(server.port, b"y") == b"y"
        assert server.stop() == 0


def test_native_refusals_are_usage_errors() -> None:
    """--engine native with PROXY, or without the extension: one line, exit 2, nothing listens."""
    done = run_cli("serve", "--port", "0", "--engine", "native", "--proxy-protocol")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        "msgsock serve: error: --engine native: --proxy-protocol is served by the asyncio engine only "
        "(--engine asyncio) (see 'msgsock serve --help')"
    ), done.stderr
    done = subprocess.run(
        [*MSGSOCK, "serve", "--port", "0", "--engine", "native"],
        env={**ENV, "MSGSOCK_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        timeout=unit(30),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert "--engine native: MSGSOCK_NO_EXTENSIONS=1 disables the compiled extensions" in done.stderr
    assert done.stdout == ""
    done = run_cli("serve", "--port", "0", "--engine", "native", "--udp")
    assert done.returncode == 2 and "--udp cannot be combined with --engine native" in done.stderr


@requires_native
def test_native_workers_share_the_port() -> None:
    """--engine native --workers 2: two native loops on one SO_REUSEPORT port, one summary of both."""
    with serve("--engine", "native", "--workers", "2", "--log-level", "info") as server:
        assert re.search(r"\(native (epoll|io_uring) x 2, u32be\)$", server.ready), server.ready
        for i in range(20):
            assert exchange(server.port, b"%d" % i) == b"%d" % i
        wait_for(lambda: server.log.count("disconnected") >= 20, unit(10))
        pids = set(re.findall(r"worker (\d+): connection from", server.log))
        assert server.stop() == 0
    summary = [line for line in server.stdout if line.startswith("summary:")]
    assert len(summary) == 1, server.output
    assert "20 connections (0 rejected), 20 messages in / 20 out" in summary[0]
    assert pids, server.log


@requires_native
def test_native_sigint_drains() -> None:
    with serve("--engine", "native") as server:
        assert exchange(server.port, b"z") == b"z"
        assert server.stop(signal.SIGINT) == 0
    assert any(line.startswith("summary: 1 connections") for line in server.stdout), server.output


def test_engine_builds_where_it_can() -> None:
    """With gcc here and the extensions not disabled, msgsock._engine must import (it is built)."""
    if os.environ.get("MSGSOCK_NO_EXTENSIONS") == "1":
        pytest.skip("MSGSOCK_NO_EXTENSIONS=1: the pure-Python fallback is under test")
    gcc = subprocess.run(["sh", "-c", "command -v gcc"], capture_output=True, text=True)
    if gcc.returncode != 0:
        pytest.skip("no gcc here: the extension cannot be built")
    done = subprocess.run(
        [sys.executable, "-c", "import msgsock._engine"], capture_output=True, text=True, timeout=unit(30)
    )
    assert done.returncode == 0, f"gcc is here but msgsock._engine does not import: {done.stderr}"
    assert REASON is None


@pytest.mark.parametrize("extensions", ["on", "off"])
def test_auto_workers_picks_native_or_processes(extensions: str) -> None:
    """--workers 2 alone (engine auto): two native loops, or two asyncio processes without the extension."""
    if extensions == "on" and REASON is not None:
        pytest.skip(REASON)
    program = [*MSGSOCK] if extensions == "on" else ["env", "MSGSOCK_NO_EXTENSIONS=1", *MSGSOCK]
    with serve("--workers", "2", program=program) as server:
        expected = r"native (epoll|io_uring) x 2" if extensions == "on" else r"processes x 2"
        assert re.search(rf"\({expected}, u32be\)$", server.ready), server.ready
        assert exchange(server.port, b"w") == b"w"
        assert server.stop() == 0
