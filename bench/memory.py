#!/usr/bin/env python3
"""Memory checks of SPEC §8 for the default engine (asyncio on uvloop, built-in echo).

1. **Idle connections**: a child process runs the default-engine server (what ``msgsock
   serve`` runs: :func:`msgsock.aio.serve` with the built-in echo, under
   :func:`msgsock.aio.run`) with :mod:`tracemalloc` on.  This process opens ``--warm``
   connections (100) and exchanges one 64-byte message on each, the child measures
   its traced Python heap; then ``--connections`` (10,000) more, each also echoing one
   message and then left idle, and the child measures again.  Heap growth divided by
   the number of new connections is the cost of a connection at rest.  Target:
   <= 16 KiB.  A second child without tracemalloc gives the RSS growth per connection
   for information (it includes what uvloop/libuv allocate in C, which tracemalloc
   does not see, but not kernel socket buffers).
2. **One large message**: ``python -m msgsock serve --max-size 128MiB`` in a child; one
   64 MiB message is echoed and verified.  The server's peak RSS (``VmHWM`` of
   ``/proc/PID/status``, reset through ``/proc/PID/clear_refs`` after the idle
   baseline; ``VmRSS`` sampled every 2 ms as a fallback) minus its idle RSS.
   Target: <= 2.5x the message size.

Everything is on 127.0.0.1.  RLIMIT_NOFILE is raised (soft to hard) for the
connections; if the hard limit is too low, fewer connections are measured and the
report says so.  Each part is bounded to about a minute.  Exit status 0 when every
target passes, 1 otherwise.

Usage::

    .venv/bin/python bench/memory.py [--part idle|large|all] [--connections 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import queue
import re
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * 1024
IDLE_TARGET = 16 * KiB  # SPEC §8: a connection at rest costs <= 16 KiB of Python heap
LARGE_FACTOR = 2.5  # SPEC §8: peak RSS <= 2.5x the message size above idle
PART_TIMEOUT = 60.0  # seconds per part
HEADER = struct.Struct(">I")  # the default frame (SPEC §4.1): u32 big-endian body length
SMALL_BODY = bytes(range(64))


# -- helpers --------------------------------------------------------------------------------


def proc_status(pid: int | str, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM, ...) in bytes, 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def raise_nofile(needed: int) -> tuple[int, str | None]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one when ``needed`` descriptors do not fit.

    Returns:
        The soft limit now in force, and a note when it was raised or is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    note = None
    if soft < needed:
        new = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        note = f"RLIMIT_NOFILE soft limit raised from {soft} to {new}"
        soft = new
        if soft != resource.RLIM_INFINITY and soft < needed:
            note += f"; still below the {needed} descriptors wanted (hard limit {hard})"
    return soft, note


def read_lines(stream: IO[str]) -> queue.Queue[str | None]:
    """Lines of a child's stdout, through a queue (``None`` at EOF), so reads can time out."""
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def next_json(lines: queue.Queue[str | None], deadline: float, what: str) -> dict[str, Any]:
    """The next JSON line of a child, skipping anything else.

    Raises:
        RuntimeError: the child ended or said nothing in time.
    """
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"timed out waiting for {what}") from None
        if line is None:
            raise RuntimeError(f"the child ended while waiting for {what}")
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``.

    Raises:
        ConnectionError: the peer closed first.
    """
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


# -- part 1: idle connections ---------------------------------------------------------------


def child_idle(trace: bool, use_uvloop: bool) -> int:
    """The server side of part 1 (runs in the child): serve, and measure on request.

    Reads ``measure K`` lines on stdin; waits until K connections are open and have
    each echoed a message, collects garbage and prints one JSON line with the traced
    heap and the RSS.  ``quit`` (or EOF) ends it.
    """
    if trace:
        tracemalloc.start()
    import msgsock.aio
    from msgsock.app.server import HANDLERS
    from msgsock.protocol import Limits

    async def main() -> None:
        # Like `msgsock serve` (SPEC §6.1) but with room for the measured connections
        # above the 10,000 default limit.
        limits = Limits(max_connections=1_000_000)
        server = await msgsock.aio.serve(HANDLERS["echo"], HOST, 0, limits=limits, backlog=1024)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"event": "ready", "port": server.port, "loop": type(loop).__module__}), flush=True)
        while True:
            line = (await reader.readline()).decode().split()
            if not line or line[0] != "measure":
                break
            want = int(line[1])
            deadline = loop.time() + PART_TIMEOUT
            while True:
                stats = server.statistics()
                if stats.active >= want and stats.messages_sent >= want:
                    break
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)  # polling a counter, bounded by the deadline
            del stats
            gc.collect()
            stats = server.statistics()
            result = {
                "event": "measured",
                "active": stats.active,
                "messages": stats.messages_sent,
                "traced": tracemalloc.get_traced_memory()[0] if trace else None,
                "rss": proc_status("self", "VmRSS"),
            }
            print(json.dumps(result), flush=True)
        server.close()
        await server.wait_closed()

    if use_uvloop:
        msgsock.aio.run(main())
    else:
        asyncio.run(main())
    return 0


def open_and_echo(port: int, count: int, deadline: float, batch: int = 250) -> list[socket.socket]:
    """Open ``count`` connections, each echoing one 64-byte message, in batches.

    Each batch waits for its echoes, which paces the connects to the server's accept
    rate (an overflowing accept queue would cost 1 s SYN retransmits).

    Raises:
        RuntimeError: the deadline passed.
        OSError: a connection failed.
    """
    frame = HEADER.pack(len(SMALL_BODY)) + SMALL_BODY
    socks: list[socket.socket] = []
    reply = bytearray(len(frame))
    try:
        while len(socks) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(socks)} of {count} connections opened in time")
            group = []
            for _ in range(min(batch, count - len(socks))):
                s = socket.create_connection((HOST, port), timeout=10)
                socks.append(s)
                group.append(s)
                s.sendall(frame)
            for s in group:
                recv_exactly(s, memoryview(reply))
                if reply != frame:
                    raise RuntimeError("echo mismatch")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@dataclass
class IdleResult:
    connections: int
    heap_per_conn: float | None
    rss_per_conn: float | None
    loop: str
    notes: list[str]


def measure_idle(connections: int, warm: int, trace: bool, use_uvloop: bool) -> tuple[int, float, str]:
    """One child run of part 1.

    Returns:
        (connections measured, growth per connection in bytes, event loop module);
        growth is of the traced heap when ``trace``, else of the RSS.

    Raises:
        RuntimeError: the child failed or a step timed out.
    """
    deadline = time.monotonic() + PART_TIMEOUT
    argv = [sys.executable, os.path.abspath(__file__), "--child-idle"]
    if trace:
        argv.append("--trace")
    if not use_uvloop:
        argv.append("--no-uvloop")
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    lines = read_lines(child.stdout)
    socks: list[socket.socket] = []
    try:
        ready = next_json(lines, deadline, "the server to start")
        port = int(ready["port"])
        socks += open_and_echo(port, warm, deadline)
        child.stdin.write(f"measure {warm}\n")
        child.stdin.flush()
        before = next_json(lines, deadline, "the baseline")
        socks += open_and_echo(port, connections, deadline)
        child.stdin.write(f"measure {warm + connections}\n")
        child.stdin.flush()
        after = next_json(lines, deadline, "the measurement")
        if after["active"] < warm + connections:
            raise RuntimeError(f"server has {after['active']} of {warm + connections} connections")
        key = "traced" if trace else "rss"
        return connections, (after[key] - before[key]) / connections, str(ready["loop"])
    finally:
        for s in socks:
            s.close()
        try:
            child.stdin.write("quit\n")
            child.stdin.close()
        except OSError:
            pass
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def part_idle(connections: int, warm: int, use_uvloop: bool) -> IdleResult:
    """Part 1: Python heap (tracemalloc) and RSS per idle connection."""
    notes: list[str] = []
    # This process holds every client socket, and the child every server socket.
    soft, note = raise_nofile(connections + warm + 200)
    if note:
        notes.append(note)
    if soft != resource.RLIM_INFINITY and soft < connections + warm + 200:
        connections = max(0, soft - warm - 200)
        notes.append(f"measuring {connections} connections (RLIMIT_NOFILE too low for more)")
    n, heap, loop = measure_idle(connections, warm, trace=True, use_uvloop=use_uvloop)
    _, rss, _ = measure_idle(connections, warm, trace=False, use_uvloop=use_uvloop)
    return IdleResult(n, heap, rss, loop, notes)


# -- part 2: one large message --------------------------------------------------------------


@dataclass
class LargeResult:
    size: int
    idle_rss: int
    peak_above_idle: int
    method: str
    seconds: float
    notes: list[str]


def part_large(size: int, python: str) -> LargeResult:
    """Part 2: peak RSS of ``msgsock serve`` echoing one ``size``-byte message.

    Raises:
        RuntimeError: the server did not start, or the echo was wrong or late.
    """
    notes: list[str] = []
    deadline = time.monotonic() + PART_TIMEOUT
    max_size = max(128 * MiB, 2 * size)
    argv = [python, "-m", "msgsock", "serve", "--port", "0", "--max-size", str(max_size)]
    argv += ["--log-level", "warning"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    lines = read_lines(server.stdout)
    try:
        port = 0
        while not port:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("msgsock serve did not print its ready line") from None
            if line is None:
                raise RuntimeError("msgsock serve exited before listening")
            m = re.search(r"listening on \S+:(\d+)", line)
            port = int(m.group(1)) if m else 0
        pid = server.pid
        with socket.create_connection((HOST, port), timeout=30) as sock:
            small = HEADER.pack(1024) + bytes(1024)  # warm the connection's code paths
            sock.sendall(small)
            recv_exactly(sock, memoryview(bytearray(len(small))))
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            reply = bytearray(HEADER.size + size)
            gc.collect()
            idle = proc_status(pid, "VmRSS")
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
                hwm_reset = True
            except OSError as exc:
                hwm_reset = False
                notes.append(f"cannot reset VmHWM ({exc}); using sampled VmRSS only")
            sampled = [idle]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.002):
                    try:
                        sampled.append(proc_status(pid, "VmRSS"))
                    except OSError:
                        return

            def send() -> None:
                sock.sendall(HEADER.pack(size))
                sock.sendall(payload)

            sampler = threading.Thread(target=sample, daemon=True)
            sender = threading.Thread(target=send, daemon=True)
            t0 = time.monotonic()
            sampler.start()
            sender.start()
            sock.settimeout(max(1.0, deadline - time.monotonic()))
            recv_exactly(sock, memoryview(reply))
            seconds = time.monotonic() - t0
            sender.join(timeout=10)
            done.set()
            sampler.join(timeout=10)
            hwm = proc_status(pid, "VmHWM")
        if HEADER.unpack_from(reply)[0] != size or reply[HEADER.size :] != payload:
            raise RuntimeError("the 64 MiB echo came back different")
        # VmHWM is only folded in by the kernel at some events (unmaps, exit), so a
        # peak can slip past it; the sampled VmRSS can miss a short one.  Take both.
        peak_sampled = max(sampled)
        if hwm_reset and hwm >= peak_sampled:
            peak, method = hwm, "VmHWM"
        else:
            peak, method = peak_sampled, "sampled VmRSS"
        notes.append(
            f"server VmHWM after the echo {fmt_bytes(hwm)}{'' if hwm_reset else ' (not reset)'}, "
            f"highest sampled VmRSS {fmt_bytes(peak_sampled)} ({len(sampled)} samples)"
        )
        return LargeResult(size, idle, peak - idle, method, seconds, notes)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- report ---------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.2f} KiB"
    return f"{n:.0f} B"


def run_part(name: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    try:
        return fn()
    except (RuntimeError, OSError) as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
        return None


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts, print the table; 0 when every target passed, else 1."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("idle", "large", "all"), default="all")
    ap.add_argument("--connections", type=int, default=10_000, help="idle connections (default 10000)")
    ap.add_argument("--warm", type=int, default=100, help="connections open before the baseline (100)")
    ap.add_argument("--message-size", type=int, default=64 * MiB, help="large message bytes (64 MiB)")
    ap.add_argument("--no-uvloop", action="store_true", help="part 1 on the stock asyncio loop")
    ap.add_argument("--python", default=sys.executable, help="interpreter running msgsock serve (part 2)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    ap.add_argument("--child-idle", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_idle:
        return child_idle(args.trace, not args.no_uvloop)

    errors: dict[str, str] = {}
    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    out: dict[str, Any] = {}
    passed = True
    if args.part in ("idle", "all"):
        t0 = time.monotonic()
        idle = run_part("idle", lambda: part_idle(args.connections, args.warm, not args.no_uvloop), errors)
        if idle is not None:
            ok = idle.heap_per_conn is not None and idle.heap_per_conn <= IDLE_TARGET
            passed &= ok
            rows.append(
                (
                    f"idle connection, Python heap (tracemalloc, {idle.connections} conns, {idle.loop})",
                    fmt_bytes(idle.heap_per_conn or 0),
                    f"<= {fmt_bytes(IDLE_TARGET)}",
                    "pass" if ok else "FAIL",
                )
            )
            rows.append(
                (
                    "idle connection, RSS (no tracemalloc; info)",
                    fmt_bytes(idle.rss_per_conn or 0),
                    "-",
                    "info",
                )
            )
            notes += idle.notes
            out["idle"] = {**idle.__dict__, "target": IDLE_TARGET, "passed": ok}
            out["idle"]["seconds"] = round(time.monotonic() - t0, 1)
        else:
            passed = False
    if args.part in ("large", "all"):
        large = run_part("large", lambda: part_large(args.message_size, args.python), errors)
        if large is not None:
            limit = LARGE_FACTOR * large.size
            ok = large.peak_above_idle <= limit
            passed &= ok
            rows.append(
                (
                    f"{fmt_bytes(large.size)} echo, server peak RSS above idle ({large.method})",
                    f"{fmt_bytes(large.peak_above_idle)} ({large.peak_above_idle / large.size:.2f}x)",
                    f"<= {LARGE_FACTOR:g}x ({fmt_bytes(limit)})",
                    "pass" if ok else "FAIL",
                )
            )
            notes += large.notes
            notes.append(
                f"large echo took {large.seconds:.2f} s; server idle RSS {fmt_bytes(large.idle_rss)}"
            )
            out["large"] = {**large.__dict__, "target_factor": LARGE_FACTOR, "passed": ok}
        else:
            passed = False
    print("| measurement | value | target | result |")
    print("|---|---:|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for name, err in errors.items():
        print(f"| {name} | error | - | FAIL |")
        notes.append(f"{name}: {err}")
    for note in notes:
        print(f"- {note}")
    if args.json:
        print(json.dumps({**out, "errors": errors, "notes": notes, "passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
