"""``msgsock serve --engine processes``: supervised workers sharing one port (SPEC §6.1, §7).

Real subprocesses throughout; the worker processes are found through their log lines,
which carry the worker number and, at start, the PID.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from msgsock.app.processes import RESTART_DELAY_MAX, RESTART_DELAY_MIN, Supervisor
from msgsock.app.server import ServerConfig
from tests.cli_helpers import ServerProcess, run_cli, serve
from tests.helpers import free_loopback6, unit, wait_for

PROCESSES = ("--engine", "processes", "--workers", "2")

# "worker 1: listening on 127.0.0.1:PORT (pid 1234)", as each worker logs it when it listens.
_LISTENING = re.compile(r"worker (\d+): listening on \S+ \(pid (\d+)\)")


def _exchange(sock: socket.socket, body: bytes) -> bytes:
    """Send one default-format frame and return the reply body."""
    sock.sendall(struct.pack(">I", len(body)) + body)
    (size,) = struct.unpack(">I", _read_exactly(sock, 4))
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def _worker_pids(server: ServerProcess) -> dict[int, list[int]]:
    """Worker number -> the PIDs it has had, in order of start."""
    pids: dict[int, list[int]] = {}
    for match in _LISTENING.finditer(server.log):
        pids.setdefault(int(match.group(1)), []).append(int(match.group(2)))
    return pids


def _summaries(server: ServerProcess) -> list[str]:
    return [line.strip() for line in server.stdout if line.startswith("summary:")]


def _converse(port: int, index: int, host: str = "127.0.0.1") -> None:
    """One connection: three messages, each echoed exactly."""
    with socket.create_connection((host, port), timeout=unit(10)) as sock:
        for n in range(3):
            body = f"connection {index} message {n}".encode()
            assert _exchange(sock, body) == body


def test_workers_share_the_port_and_summary_totals_are_exact() -> None:
    """Two workers serve 20 concurrent connections between them; SIGTERM gives one exact summary, exit 0."""
    with serve(*PROCESSES) as server:
        assert server.ready == f"listening on 127.0.0.1:{server.port} (processes x 2, u32be)"
        wait_for(lambda: set(_worker_pids(server)) == {1, 2}, unit(10), message=server.log)
        # All 20 open at once: SO_REUSEPORT spreads them by address hash, so both
        # workers get some (the chance that one gets all 20 is 2 in a million).
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(pool.map(lambda i: _converse(server.port, i), range(20)))
        wait_for(lambda: server.log.count("disconnected") >= 20, unit(10), message=server.log)
        assert "worker 1: connection from 127.0.0.1:" in server.log
        assert "worker 2: connection from 127.0.0.1:" in server.log
        assert server.stop() == 0
        body_bytes = sum(len(f"connection {i} message {n}") for i in range(20) for n in range(3))
        assert _summaries(server) == [
            f"summary: 20 connections (0 rejected), 60 messages in / 60 out, "
            f"{body_bytes + 60 * 4} bytes in / {body_bytes + 60 * 4} out, 0 errors"
        ]
        assert "Traceback" not in server.log
        assert "did not stop" not in server.log


def test_killed_worker_is_restarted_and_serving_goes_on() -> None:
    """kill -9 of a worker: the parent logs its exit code, starts a new one, and the server keeps serving."""
    with serve(*PROCESSES) as server:
        wait_for(lambda: set(_worker_pids(server)) == {1, 2}, unit(10), message=server.log)
        victim = _worker_pids(server)[1][0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: f"worker 1 (pid {victim}) exited unexpectedly with code -9" in server.log,
            unit(10),
            message=server.log,
        )
        wait_for(lambda: len(_worker_pids(server)[1]) == 2, unit(20), message=server.log)
        replacement = _worker_pids(server)[1][1]
        assert replacement != victim
        wait_for(lambda: f"worker 1 restarted (pid {replacement})" in server.log, unit(10))
        for i in range(20):
            _converse(server.port, i)
        assert server.stop() == 0
        summaries = _summaries(server)
        assert len(summaries) == 1 and summaries[0].endswith(" 0 errors"), server.output
        assert "Traceback" not in server.log


def test_ctrl_c_to_the_process_group_stops_cleanly() -> None:
    """A terminal's Ctrl-C reaches parent and workers: the parent alone drains them; one summary, exit 0."""
    with serve(*PROCESSES) as server:
        wait_for(lambda: set(_worker_pids(server)) == {1, 2}, unit(10), message=server.log)
        _converse(server.port, 0)
        os.killpg(server.proc.pid, signal.SIGINT)  # the server runs in a session of its own
        assert server.stop() == 0
        summaries = _summaries(server)
        assert len(summaries) == 1 and "3 messages in / 3 out" in summaries[0], server.output
        assert "Traceback" not in server.log and "KeyboardInterrupt" not in server.log


def test_sigterm_half_closes_open_connections_then_exits() -> None:
    """On SIGTERM each worker half-closes its open connections (the graceful drain) and the parent exits 0."""
    with serve(*PROCESSES, "--shutdown-timeout", str(unit(10))) as server:
        wait_for(lambda: set(_worker_pids(server)) == {1, 2}, unit(10), message=server.log)
        with socket.create_connection(("127.0.0.1", server.port), timeout=unit(10)) as sock:
            assert _exchange(sock, b"before") == b"before"
            server.proc.send_signal(signal.SIGTERM)
            assert sock.recv(1) == b""  # the worker's half-close: it waits for ours
        assert server.stop() == 0
        assert _summaries(server) == [
            "summary: 1 connections (0 rejected), 1 messages in / 1 out, 10 bytes in / 10 out, 0 errors"
        ]
        assert "did not stop" not in server.log and "shutdown_timeout" not in server.log


def test_ipv6_reverse_handler_and_json_logs() -> None:
    """Workers serve IPv6 with the reverse handler, and log JSON lines that name the worker."""
    if not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available")
    with serve(*PROCESSES, "--host", "::1", "--handler", "reverse", "--json") as server:
        assert server.ready == f"listening on [::1]:{server.port} (processes x 2, u32be)"
        with socket.create_connection(("::1", server.port), timeout=unit(10)) as sock:
            assert _exchange(sock, b"stressed") == b"desserts"
        wait_for(lambda: "disconnected" in server.log, unit(10))
        assert server.stop() == 0
        entries = [json.loads(line) for line in server.stderr]
        workers = {m.group(1) for e in entries if (m := re.match(r"worker (\d+): ", e["message"]))}
        assert workers == {"1", "2"}
        assert any("connection from [::1]:" in e["message"] for e in entries)


def test_shared_socket_fallback_serves() -> None:
    """Where SO_REUSEPORT does not balance, the workers share the parent's listening socket."""
    patched = [
        sys.executable,
        "-c",
        "import sys, msgsock.app.processes as s; s._PER_WORKER_SOCKETS = False; "
        "from msgsock.app.cli import main; sys.exit(main())",
    ]
    with serve(*PROCESSES, program=patched) as server:
        assert server.ready.endswith("(processes x 2, u32be)")
        for i in range(10):
            _converse(server.port, i)
        assert server.stop() == 0
        assert "10 connections (0 rejected), 30 messages in / 30 out" in _summaries(server)[0]


def test_usage_errors_exit_2() -> None:
    """A worker count below 1 or not a number, and --workers with an engine of one loop: exit 2."""
    for args, words in (
        (["serve", "--engine", "processes", "--workers", "0"], "--workers"),
        (["serve", "--engine", "processes", "--workers", "many"], "--workers"),
        (["serve", "--engine", "threads", "--workers", "2"], "needs --engine auto, processes or native"),
        (["serve", "--engine", "asyncio", "--workers", "2"], "not --engine asyncio"),
        (["serve", "--engine", "processes", "--workers", "100000"], "--workers"),
    ):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "error:" in done.stderr and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""


def test_port_in_use_is_exit_1_before_any_worker_starts() -> None:
    """The parent binds first: a port in use is one error line and exit 1, with no ready line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_cli("serve", *PROCESSES, "--port", str(busy.getsockname()[1]))
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1:" in done.stderr and "in use" in done.stderr
    assert "listening on" not in done.stdout and "worker" not in done.stderr
    assert "Traceback" not in done.stderr


def test_restart_delay_doubles_to_the_cap_and_resets_after_good_service() -> None:
    """Backoff: 0.1 s doubling up to 5 s for a crash loop; back to 0.1 s after 30 s of service."""
    supervisor = Supervisor(ServerConfig(engine="processes", workers=1), io.StringIO())
    try:
        worker = supervisor.workers[0]
        delays = []
        for _ in range(8):
            worker.started = time.monotonic()
            before = time.monotonic()
            supervisor._schedule_restart(worker, -9)
            assert worker.restart_at is not None
            delays.append(round(worker.restart_at - before, 1))
        assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
        assert delays[0] == RESTART_DELAY_MIN and delays[-1] == RESTART_DELAY_MAX
        worker.started = time.monotonic() - 31  # it had served 31 s before it died
        before = time.monotonic()
        supervisor._schedule_restart(worker, -9)
        assert worker.restart_at is not None
        assert round(worker.restart_at - before, 1) == RESTART_DELAY_MIN
    finally:
        supervisor.wake_r.close()
        supervisor.wake_w.close()
