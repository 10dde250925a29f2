#!/usr/bin/env python3
"""Run the SPEC §8 benchmark: msgsock's rows next to the shared kit's references, in one run.

This drives the shared kit (``../shared/bench`` from the repository root, or ``--kit``):
its ``compare.py`` starts every server pinned to one CPU, runs the C load generator
``loadgen`` (which verifies every echoed byte) against it for each cell, tags every run
with the host placement (``c2c_probe``: fast / mixed / slow), and writes ``raw.jsonl``.
The kit is used as it is, never copied: msgsock's servers are added with
``--server 'NAME=CMD {port}'``.  Then this script reads the raw runs and prints, per
cell, messages/s, p99 latency, server CPU microseconds per message, the ratio to the C
echo server and to the **best Python reference for that cell**, and a table of the
SPEC §8 targets with pass/fail.

msgsock rows (``--rows``, all by default)::

    msgsock            python -m msgsock serve                      (default engine, built-in echo)
    msgsock_handler    bench/servers/msgsock_handler.py             (msgsock.aio.serve(lambda m: m, ...))
    msgsock_threads    python -m msgsock serve --engine threads
    msgsock_processes  python -m msgsock serve --engine processes --workers 2
    msgsock_native_echo_epoll      msgsock serve --engine native, MSGSOCK_NATIVE_BACKEND=epoll
    msgsock_native_echo_uring      msgsock serve --engine native, MSGSOCK_NATIVE_BACKEND=io_uring
    msgsock_native_handler_epoll   bench/servers/msgsock_handler.py --engine native --backend epoll
    msgsock_native_handler_uring   bench/servers/msgsock_handler.py --engine native --backend io_uring

(``msgsock`` itself runs the default engine, ``auto``: native where the extension is
built.  The native rows are compared with the C echo and the Python references like
the others; SPEC §8's native targets are evaluated on them.)

A row whose command does not start listening within 20 s (for example an engine that
does not exist yet) is left out of the run with a note; the run goes on.

Modes::

    bench/run.py                      # the full matrix (~1 h: 14 servers x 12 cells x 3 repeats x 6 s)
    bench/run.py --quick              # 3 cells, 5 references + msgsock rows, 1 s each (~1 min)
    bench/run.py --same-cpu [--quick] # server AND load generator on CPU 1 (placement-immune, ±2 %)
    bench/run.py --stress-vs-loadgen  # `msgsock stress` vs the kit's loadgen, same server, same run
    bench/run.py --report DIR         # rebuild the report of an earlier run from its raw files

Server CPU per message is ``server_cpu / msgs_per_s`` of each run: ``server_cpu`` is
the CPU time (user + system, every process of the server's process group) that
compare.py measured over the whole load-generator run divided by its wall time (warmup
and connection set-up included, when the server works at the same rate), and
``msgs_per_s`` is what the load generator verified in the measured window.  It is the
figure RESULTS.md of the kit calls "server CPU share / msgs/s".

Everything talks to 127.0.0.1 only.  Output goes to ``bench/results/<stamp>/``
(git-ignored): ``report.md``, ``summary.json``, ``run.json`` and one ``compare-N/``
directory per compare.py invocation (its ``raw.jsonl``, ``table.md`` and server logs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KIT = REPO.parent / "shared" / "bench"
HOST = "127.0.0.1"

C_REF = "c_epoll"
# Every hand-written Python server of the kit (SPEC §8 "the best Python reference").
PY_REFS = (
    "asyncio_proto",
    "asyncio_proto_uvloop",
    "asyncio_buffered",
    "asyncio_buffered_uvloop",
    "asyncio_streams",
    "asyncio_streams_uvloop",
    "twisted_int32",
    "threads",
    "selectors",
)
ALL_REFS = (C_REF, *PY_REFS)
QUICK_REFS = (C_REF, "selectors", "asyncio_proto_uvloop", "twisted_int32", "threads")
ROWS = (
    "msgsock",
    "msgsock_handler",
    "msgsock_threads",
    "msgsock_processes",
    "msgsock_native_echo_epoll",
    "msgsock_native_echo_uring",
    "msgsock_native_handler_epoll",
    "msgsock_native_handler_uring",
)
NATIVE_ECHO_ROWS = ("msgsock_native_echo_epoll", "msgsock_native_echo_uring")
NATIVE_HANDLER_ROWS = ("msgsock_native_handler_epoll", "msgsock_native_handler_uring")

# compare.py invocations of --quick: (sizes, conns, deep).  compare.py crosses sizes with
# conns, so the three quick cells need two invocations:
# 64 B c=16 d=1 and d=16, then 1 KiB c=256 d=1.
QUICK_GROUPS = (("64", "16", "64:16"), ("1024", "256", ""))
FULL_GROUP = ("64,1024,65536", "1,16,256", "64:16")  # compare.py's own default matrix

# --stress-vs-loadgen cells (the msgsock stress acceptance cells): sizes x conns x depths.
STRESS_SIZES = (64, 1024)
STRESS_CONNS = (16, 256)
STRESS_DEPTHS = (1, 16)
STRESS_SERVERS = ("msgsock", C_REF)
STRESS_TARGET = 0.9

START_TIMEOUT = 20.0  # seconds a server gets to start listening (compare.py's own limit)


# -- small helpers ------------------------------------------------------------------------


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def pick_port(start: int = 29898, count: int = 100) -> int:
    """A free port below the ephemeral range, so load-generator connections never take it.

    Raises:
        SystemExit: none of ``count`` ports from ``start`` is free.
    """
    for port in range(start, start + count):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        if not listening(port):
            return port
    raise SystemExit(f"no free port in {start}-{start + count - 1}; pass --port")


def fmt_rate(v: float | None) -> str:
    """Messages/s the way the kit's tables print them (``258.5k``, ``2.07M``)."""
    if v is None:
        return "ERR"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def fmt_us(v: float | None) -> str:
    """Microseconds, switching to ms above 10 ms like the kit's tables."""
    if v is None:
        return "-"
    return f"{v / 1000:.1f}ms" if v >= 10000 else f"{v:.0f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def cell_label(size: int, conns: int, depth: int) -> str:
    """The kit's cell name: ``64B c=16 d=1``, ``1KiB c=256 d=1``."""
    s = f"{size}B" if size < 1024 else f"{size // 1024}KiB"
    return f"{s} c={conns} d={depth}"


Cell = tuple[int, int, int]  # (size, conns, depth)


def python_can_import(python: str, modules: Iterable[str]) -> bool:
    code = "; ".join(f"import {m}" for m in modules)
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_kit(kit: Path) -> None:
    """Build the kit's C programs (loadgen, c_epoll_echo, c2c_probe) when missing or stale.

    Raises:
        SystemExit: the kit is not there or does not build.
    """
    if not (kit / "compare.py").is_file():
        raise SystemExit(f"no benchmark kit at {kit} (compare.py missing); pass --kit PATH")
    stale = []
    for exe in ("loadgen", "c_epoll_echo", "c2c_probe"):
        binary, source = kit / exe, kit / f"{exe}.c"
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            stale.append(exe)
    if stale:
        print(f"building {', '.join(stale)}: make -C {kit} {' '.join(stale)}", flush=True)
        if subprocess.run(["make", "-C", str(kit), *stale]).returncode != 0:
            raise SystemExit(f"make -C {kit} failed")


def reference_python(kit: Path, wanted: str | None, repo_python: str) -> str:
    """The interpreter for the kit's Python servers: --ref-python, else the repo's venv
    (it has uvloop and twisted, so references and msgsock run on the same interpreter),
    else the kit's own venv, built with ``make -C KIT .venv/bin/python``.

    Raises:
        SystemExit: no interpreter with uvloop and twisted can be found or built.
    """
    if wanted:
        return wanted
    if python_can_import(repo_python, ("uvloop", "twisted")):
        return repo_python
    kit_python = kit / ".venv" / "bin" / "python"
    if not kit_python.exists():
        print(f"{repo_python} lacks uvloop/twisted: make -C {kit} .venv/bin/python", flush=True)
        if subprocess.run(["make", "-C", str(kit), ".venv/bin/python"]).returncode != 0:
            raise SystemExit("could not build the kit's venv; pass --ref-python")
    return str(kit_python)


def row_commands(python: str, rows: Sequence[str], processes_cpus: str | None) -> dict[str, str]:
    """The ``compare.py --server`` command of each msgsock row (``{port}`` filled in later)."""
    py = shlex.quote(python)
    serve = f"{py} -m msgsock serve --port {{port}} --log-level warning"
    handler = shlex.quote(str(REPO / "bench" / "servers" / "msgsock_handler.py"))
    processes = f"{serve} --engine processes --workers 2"
    if processes_cpus:
        # compare.py pins the whole server to --server-cpu; a taskset inside the command widens it.
        processes = f"taskset -c {shlex.quote(processes_cpus)} {processes}"
    commands = {
        "msgsock": serve,
        "msgsock_handler": f"{py} {handler} --port {{port}}",
        "msgsock_threads": f"{serve} --engine threads",
        "msgsock_processes": processes,
        "msgsock_native_echo_epoll": f"env MSGSOCK_NATIVE_BACKEND=epoll {serve} --engine native",
        "msgsock_native_echo_uring": f"env MSGSOCK_NATIVE_BACKEND=io_uring {serve} --engine native",
        "msgsock_native_handler_epoll": f"{py} {handler} --port {{port}} --engine native --backend epoll",
        "msgsock_native_handler_uring": f"{py} {handler} --port {{port}} --engine native --backend io_uring",
    }
    return {name: commands[name] for name in rows}


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    # start_new_session=True: the process group id is the pid of the process we started.
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def preflight(name: str, command: str, port: int, kit: Path, logdir: Path) -> str | None:
    """Start one server command the way compare.py will, and stop it again.

    Returns:
        None when it listened on ``port`` within START_TIMEOUT, else why not (with the
        tail of its output), so the row can be skipped instead of ending the run.
    """
    if listening(port):
        return f"port {port} already has a listener"
    log_path = logdir / f"preflight-{name}.log"
    reason = None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", "exec " + command.format(port=port)],
            cwd=kit,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not listening(port):
                if proc.poll() is not None:
                    reason = f"exited with status {proc.returncode} before listening"
                    break
                if time.monotonic() > deadline:
                    reason = f"did not listen on {port} within {START_TIMEOUT:g} s"
                    break
                time.sleep(0.05)
        finally:
            _stop_group(proc)
    deadline = time.monotonic() + 10
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    if reason is None:
        return None
    tail = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return reason + (": " + tail[-1] if tail else "") + f" (log: {log_path})"


# -- aggregation --------------------------------------------------------------------------


@dataclass
class Agg:
    """One server in one cell, over its repeats (medians of the successful runs)."""

    runs: int = 0
    ok: int = 0
    msgs_per_s: float | None = None
    p99_us: float | None = None
    cpu_us: float | None = None  # server CPU µs per message
    server_cpu: float | None = None  # share of one core
    loadgen_cpu: float | None = None  # share of one core
    placements: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def cpu_pair(self) -> str:
        """Load generator % / server % of one core, like the kit's CPU table."""
        if self.server_cpu is None or self.loadgen_cpu is None:
            return "-"
        return f"{self.loadgen_cpu * 100:.0f}/{self.server_cpu * 100:.0f}"

    @property
    def placement_tag(self) -> str:
        """``F``/``M``/``S`` per repeat (fast / mixed / slow host placement), in run order."""
        return "".join({"fast": "F", "mixed": "M", "slow": "S"}.get(p, "?") for p in self.placements)


def cpu_us_per_msg(row: dict[str, Any]) -> float | None:
    """Server CPU microseconds per message of one run (see the module docstring)."""
    rate, share = row.get("msgs_per_s"), row.get("server_cpu")
    if not rate or share is None:
        return None
    return float(share) / float(rate) * 1e6


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, Cell], Agg]:
    """Group raw runs by (server, cell) and take medians of the runs without error."""
    groups: dict[tuple[str, Cell], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["server"], (r["size"], r["conns"], r["depth"])), []).append(r)
    out: dict[tuple[str, Cell], Agg] = {}
    for key, rs in groups.items():
        rs.sort(key=lambda r: r.get("rep", 0))
        agg = Agg(runs=len(rs), placements=[r.get("placement", "?") for r in rs])
        ok = [r for r in rs if "error" not in r and r.get("msgs_per_s")]
        agg.errors = [str(r["error"]) for r in rs if "error" in r]
        agg.ok = len(ok)
        if ok:
            agg.msgs_per_s = statistics.median(float(r["msgs_per_s"]) for r in ok)
            agg.p99_us = statistics.median(float(r["p99_us"]) for r in ok)
            agg.server_cpu = statistics.median(float(r["server_cpu"]) for r in ok)
            agg.loadgen_cpu = statistics.median(float(r.get("loadgen_cpu", 0)) for r in ok)
            cpus = [c for c in (cpu_us_per_msg(r) for r in ok) if c is not None]
            agg.cpu_us = statistics.median(cpus) if cpus else None
        out[key] = agg
    return out


def best_python(aggs: dict[tuple[str, Cell], Agg], cell: Cell) -> tuple[str | None, Agg | None]:
    """The hand-written Python server with the most messages/s in this cell."""
    best: tuple[str | None, Agg | None] = (None, None)
    for name in PY_REFS:
        a = aggs.get((name, cell))
        if a is None or a.msgs_per_s is None:
            continue
        if best[1] is None or a.msgs_per_s > (best[1].msgs_per_s or 0):
            best = (name, a)
    return best


def ratio(a: Agg | None, b: Agg | None) -> float | None:
    if a is None or b is None or a.msgs_per_s is None or not b.msgs_per_s:
        return None
    return a.msgs_per_s / b.msgs_per_s


def server_order(names: Iterable[str]) -> list[str]:
    """References in the kit's order, then msgsock rows in ROWS order, then anything else."""
    names = set(names)
    order = [n for n in (*ALL_REFS, *ROWS) if n in names]
    return order + sorted(names - set(order))


def cell_order(cells: Iterable[Cell]) -> list[Cell]:
    """Depth 1 first (by size, then connections), then deeper cells: the kit's order."""
    return sorted(set(cells), key=lambda c: (c[2] != 1, c[2], c[0], c[1]))


# -- SPEC §8 targets ----------------------------------------------------------------------


@dataclass
class Target:
    """One SPEC §8 target checked in one cell."""

    target: str
    cell: Cell
    value: float | None
    threshold: str
    passed: bool | None  # None: not measurable in this run (a row or reference is missing)
    placements: str


def _compare_tag(a: Agg | None, b: Agg | None, bname: str, same_cpu: bool) -> str:
    pa = a.placement_tag if a else "-"
    pb = b.placement_tag if b else "-"
    # Placement only matters when server and load generator are on different CPUs.
    note = "" if same_cpu or pa == pb or "-" in (pa, pb) else " (differ)"
    return f"{pa} vs {bname} {pb}{note}"


def check_targets(
    aggs: dict[tuple[str, Cell], Agg], cells: Sequence[Cell], same_cpu: bool = False
) -> list[Target]:
    """Evaluate the SPEC §8 throughput and CPU targets of the msgsock rows in every cell."""
    out: list[Target] = []

    def add(name: str, cell: Cell, what: str, ref_name: str | None, ref: Agg | None, minimum: float) -> None:
        a = aggs.get((name, cell))
        if a is None:
            return  # the row was not run
        r = ratio(a, ref)
        out.append(
            Target(
                target=f"{name} msgs/s >= {minimum:g}x {what}",
                cell=cell,
                value=r,
                threshold=f">= {minimum:g}",
                passed=None if r is None else r >= minimum,
                placements=_compare_tag(a, ref, ref_name or what, same_cpu),
            )
        )

    for cell in cells:
        _, conns, depth = cell
        py_name, py = best_python(aggs, cell)
        c = aggs.get((C_REF, cell))
        best_label = f"best Python ({py_name})" if py_name else "best Python (none ran)"
        add("msgsock", cell, best_label, py_name, py, 1.0)
        if depth == 1 and conns >= 16:
            add("msgsock", cell, "C (c_epoll)", C_REF, c, 0.5)
        if depth == 1:
            a = aggs.get(("msgsock", cell))
            if a is not None:
                value = a.cpu_us / c.cpu_us if c is not None and a.cpu_us is not None and c.cpu_us else None
                out.append(
                    Target(
                        target="msgsock server CPU µs/msg <= 1.6x C's",
                        cell=cell,
                        value=value,
                        threshold="<= 1.6",
                        passed=None if value is None else value <= 1.6,
                        placements=_compare_tag(a, c, C_REF, same_cpu),
                    )
                )
            add("msgsock_handler", cell, best_label, py_name, py, 1.0)
        else:
            add(
                "msgsock_handler",
                cell,
                "twisted_int32",
                "twisted_int32",
                aggs.get(("twisted_int32", cell)),
                1.0,
            )
        add("msgsock_threads", cell, "threads", "threads", aggs.get(("threads", cell)), 1.0)
        # SPEC §8, the native engine: built-in echo >= 0.9x C on every cell and <= 1.2x its
        # CPU per message; io_uring >= 1.0x C at 16 and 256 connections; a Python handler
        # >= 1.3x the best hand-written Python server at depth 1.
        for name in NATIVE_ECHO_ROWS:
            add(name, cell, "C (c_epoll)", C_REF, c, 0.9)
            a = aggs.get((name, cell))
            if a is not None:
                value = a.cpu_us / c.cpu_us if c is not None and a.cpu_us is not None and c.cpu_us else None
                out.append(
                    Target(
                        target=f"{name} server CPU µs/msg <= 1.2x C's",
                        cell=cell,
                        value=value,
                        threshold="<= 1.2",
                        passed=None if value is None else value <= 1.2,
                        placements=_compare_tag(a, c, C_REF, same_cpu),
                    )
                )
        if conns >= 16:
            add("msgsock_native_echo_uring", cell, "C (c_epoll), io_uring", C_REF, c, 1.0)
        if depth == 1:
            for name in NATIVE_HANDLER_ROWS:
                add(name, cell, best_label, py_name, py, 1.3)
    return out


# -- report -------------------------------------------------------------------------------


def render_report(
    rows: list[dict[str, Any]], meta: dict[str, Any]
) -> tuple[str, dict[str, Any], list[Target]]:
    """Markdown report, a JSON summary and the target checks of one matrix run."""
    aggs = aggregate(rows)
    cells = cell_order(cell for _, cell in aggs)
    names = server_order(name for name, _ in aggs)
    rows_run = [n for n in names if n in ROWS]
    md: list[str] = []
    md.append(f"# msgsock benchmark, {meta.get('stamp', '?')} ({meta.get('mode', '?')})\n")
    md.append(
        f"{meta.get('placement_note', '')} {meta.get('duration', '?')} s measured after "
        f"{meta.get('warmup', '?')} s warmup, median of {meta.get('repeats', '?')} interleaved "
        f"repeat(s); kit `{meta.get('kit', '?')}`; references on `{meta.get('ref_python', '?')}`.\n"
    )
    md.append(
        "Server CPU µs/msg = server CPU share of one core (compare.py `server_cpu`, whole "
        "loadgen run) / verified msgs/s, per run, then the median.  Placement per repeat: "
        "F fast / M mixed / S slow host placement of the two vCPUs (c2c probe before and "
        "after the run; see the kit's RESULTS.md: cross-CPU results swing ~3x with it; "
        'same-CPU runs are immune).  "best Py" is the maximum over the hand-written Python '
        "servers that ran in this cell.\n"
    )
    for note in meta.get("notes", []):
        md.append(f"- NOTE: {note}")
    if meta.get("notes"):
        md.append("")

    if rows_run:
        md.append("## msgsock rows: ratio to the best Python reference / ratio to C\n")
        md.append("| cell | best Python ref | " + " | ".join(rows_run) + " |")
        md.append("|---|---|" + "---:|" * len(rows_run))
        for cell in cells:
            py_name, py = best_python(aggs, cell)
            c = aggs.get((C_REF, cell))
            vals = []
            for n in rows_run:
                a = aggs.get((n, cell))
                vals.append(f"{fmt_ratio(ratio(a, py))} / {fmt_ratio(ratio(a, c))}" if a else "-")
            ref = f"{py_name} {fmt_rate(py.msgs_per_s)}" if py_name and py else "-"
            md.append(f"| {cell_label(*cell)} | {ref} | " + " | ".join(vals) + " |")
        md.append("")

    md.append("## Per cell\n")
    cells_json: dict[str, Any] = {}
    for cell in cells:
        py_name, py = best_python(aggs, cell)
        c = aggs.get((C_REF, cell))
        head = f"### {cell_label(*cell)}"
        if py_name and py:
            head += f" (best Python reference: {py_name}, {fmt_rate(py.msgs_per_s)} msgs/s)"
        md.append(head + "\n")
        md.append(
            "| server | msgs/s | p99 µs | server CPU µs/msg | x C | x best Py | CPU % lg/srv | placement | errors |"
        )
        md.append("|---|---:|---:|---:|---:|---:|---:|---|---|")
        cj: dict[str, Any] = {"best_python": py_name}
        for n in names:
            a = aggs.get((n, cell))
            if a is None:
                continue
            errs = f"{len(a.errors)}/{a.runs}: {a.errors[0]}" if a.errors else ""
            star = " *" if n == py_name else ""
            cpu = "-" if a.cpu_us is None else f"{a.cpu_us:.2f}"
            md.append(
                f"| {n}{star} | {fmt_rate(a.msgs_per_s)} | {fmt_us(a.p99_us)} | {cpu} | "
                f"{fmt_ratio(ratio(a, c))} | {fmt_ratio(ratio(a, py))} | {a.cpu_pair} | {a.placement_tag} | {errs} |"
            )
            cj[n] = {
                "msgs_per_s": a.msgs_per_s,
                "p99_us": a.p99_us,
                "server_cpu_us_per_msg": a.cpu_us,
                "server_cpu_share": a.server_cpu,
                "loadgen_cpu_share": a.loadgen_cpu,
                "ratio_to_c": ratio(a, c),
                "ratio_to_best_python": ratio(a, py),
                "runs": a.runs,
                "ok": a.ok,
                "placements": a.placements,
                "errors": a.errors,
            }
        md.append("")
        cells_json[cell_label(*cell)] = cj

    targets = check_targets(aggs, cells, bool(meta.get("same_cpu")))
    md.append("## SPEC §8 targets\n")
    if targets:
        md.append("| target | cell | value | threshold | result | placement (row vs reference) |")
        md.append("|---|---|---:|---|---|---|")
        for t in targets:
            result = "n/a" if t.passed is None else ("pass" if t.passed else "**FAIL**")
            md.append(
                f"| {t.target} | {cell_label(*t.cell)} | {fmt_ratio(t.value)} | {t.threshold} | "
                f"{result} | {t.placements} |"
            )
        checked = [t for t in targets if t.passed is not None]
        failed = [t for t in checked if not t.passed]
        md.append(
            f"\n{len(checked) - len(failed)} of {len(checked)} checked targets pass"
            + (
                f"; {len(targets) - len(checked)} not measurable in this run"
                if len(checked) < len(targets)
                else ""
            )
            + "."
        )
        if meta.get("same_cpu") is False:
            md.append(
                "Cross-CPU run: a comparison whose placements differ is not meaningful "
                "(RESULTS.md, noise section); confirm ratios with `--same-cpu`."
            )
    else:
        md.append("No msgsock row ran, so no target could be checked.")
    md.append("")
    summary = {
        "meta": meta,
        "cells": cells_json,
        "targets": [
            {
                "target": t.target,
                "cell": cell_label(*t.cell),
                "value": t.value,
                "threshold": t.threshold,
                "passed": t.passed,
                "placements": t.placements,
            }
            for t in targets
        ],
    }
    return "\n".join(md), summary, targets


# -- the matrix run -----------------------------------------------------------------------


def run_compare(argv: list[str], log_path: Path) -> int:
    """Run one compare.py invocation, echoing its output to stdout and to ``log_path``."""
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
        finally:
            rc = proc.wait()
    return rc


def read_raw(out: Path) -> list[dict[str, Any]]:
    """Every raw run of a matrix run directory (``compare-*/raw.jsonl``, or ``raw.jsonl``)."""
    rows: list[dict[str, Any]] = []
    files = sorted(out.glob("compare-*/raw.jsonl")) or sorted(out.glob("raw.jsonl"))
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[Target]:
    md, summary, targets = render_report(rows, meta)
    (out / "report.md").write_text(md + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n" + md, flush=True)
    print(f"written: {out / 'report.md'}, {out / 'summary.json'}", flush=True)
    return targets


def groups_for(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    if args.sizes or args.conns or args.deep is not None:
        sizes, conns, deep = FULL_GROUP
        return [(args.sizes or sizes, args.conns or conns, deep if args.deep is None else args.deep)]
    return list(QUICK_GROUPS) if args.quick else [FULL_GROUP]


def run_matrix(args: argparse.Namespace, out: Path, kit: Path, python: str, ref_python: str) -> int:
    """The compare.py matrix with msgsock's rows; returns the exit status."""
    port = args.port or pick_port()
    refs = args.refs.split(",") if args.refs is not None else list(QUICK_REFS if args.quick else ALL_REFS)
    refs = [r for r in refs if r]
    unknown = [r for r in refs if r not in ALL_REFS]
    if unknown:
        raise SystemExit(f"unknown reference(s) {', '.join(unknown)}; choose from {', '.join(ALL_REFS)}")
    notes: list[str] = []
    commands = row_commands(python, args.rows, args.processes_cpus)
    started: dict[str, str] = {}
    for name, command in commands.items():
        why = preflight(name, command, port, kit, out)
        if why is None:
            started[name] = command
        else:
            notes.append(f"row {name} skipped: `{command.format(port=port)}` {why}")
            print(f"SKIP {name}: {why}", flush=True)
    if not refs and not started:
        raise SystemExit("nothing to run: no reference selected and no msgsock row starts")
    duration, warmup, repeats = (1.0, 0.3, 1) if args.quick else (5.0, 1.0, 3)
    duration = args.duration if args.duration is not None else duration
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats if args.repeats is not None else repeats
    server_cpu, loadgen_cpu = (1, 1) if args.same_cpu else (args.server_cpu, args.loadgen_cpu)
    meta: dict[str, Any] = {
        "stamp": out.name,
        "mode": ("quick" if args.quick else "matrix") + (", same-CPU" if args.same_cpu else ""),
        "same_cpu": args.same_cpu,
        "placement_note": (
            f"Server and load generator both on CPU {server_cpu} (same-CPU, placement-immune)."
            if server_cpu == loadgen_cpu
            else f"Server on CPU {server_cpu}, load generator on CPU {loadgen_cpu} (cross-CPU)."
        ),
        "duration": duration,
        "warmup": warmup,
        "repeats": repeats,
        "kit": str(kit),
        "python": python,
        "ref_python": ref_python,
        "port": port,
        "references": refs,
        "rows": {name: cmd for name, cmd in started.items()},
        "notes": notes,
        "argv": sys.argv[1:],
    }
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    status = 0
    for i, (sizes, conns, deep) in enumerate(groups_for(args)):
        argv = [sys.executable, str(kit / "compare.py"), "--port", str(port), "--python", ref_python]
        argv += ["--only", ",".join([*refs, *started])]
        for name, command in started.items():
            argv += ["--server", f"{name}={command}"]
        argv += ["--sizes", sizes, "--conns", conns, "--deep", deep]
        argv += ["--duration", f"{duration:g}", "--warmup", f"{warmup:g}", "--repeats", str(repeats)]
        argv += ["--server-cpu", str(server_cpu), "--loadgen-cpu", str(loadgen_cpu)]
        argv += ["--out", str(out / f"compare-{i}")]
        rc = run_compare(argv, out / f"compare-{i}.log")
        if rc != 0:
            status = 1
            notes.append(f"compare.py invocation {i} exited with status {rc} (see compare-{i}.log)")
    rows = read_raw(out)
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    targets = write_report(out, rows, meta)
    if any("error" in r for r in rows):
        status = 1
    if args.check and any(t.passed is False for t in targets):
        status = 1
    return status


# -- msgsock stress vs the kit's loadgen --------------------------------------------------


def load_kit_compare(kit: Path) -> ModuleType:
    """Import the kit's compare.py as a module (its Server, run_cell and c2c_ns), uncopied."""
    spec = importlib.util.spec_from_file_location("msgsock_bench_kit_compare", kit / "compare.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {kit / 'compare.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stress_cell(
    kitmod: ModuleType,
    server: Any,
    python: str,
    port: int,
    cell: Cell,
    duration: float,
    warmup: float,
    cpu: int,
    workers: int,
) -> dict[str, Any]:
    """One ``msgsock stress`` run, recorded like compare.run_cell records a loadgen run."""
    size, conns, depth = cell
    probe0 = kitmod.c2c_ns()
    argv = ["taskset", "-c", str(cpu), python, "-m", "msgsock", "stress", HOST, "--port", str(port)]
    argv += ["--connections", str(conns), "--size", str(size), "--depth", str(depth)]
    argv += ["--duration", f"{duration:g}", "--warmup", f"{warmup:g}", "--json", "--quiet"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    c0, g0, t0 = server.cpu(), _children_cpu(), time.time()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
        stdout, rc, err = p.stdout, p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        stdout, rc, err = "", 124, "msgsock stress timed out"
    wall, c1, g1 = time.time() - t0, server.cpu(), _children_cpu()
    res: dict[str, Any] = {"rc": rc, "server_cpu": round((c1 - c0) / wall, 3)}
    res["generator_cpu"] = round((g1 - g0) / wall, 3)  # incl. interpreter start-up
    try:
        report = json.loads(stdout[stdout.index("{") :])
    except ValueError:
        report = None
    if report is not None:
        res["msgs_per_s"] = report.get("rate", {}).get("msgs_per_s")
        res["p99_us"] = report.get("latency_us", {}).get("p99")
        res["errors_total"] = report.get("errors_total")
        if not report.get("ok", rc == 0):
            res["error"] = f"stress reported errors {report.get('errors')}"
    else:
        res["error"] = f"no JSON from msgsock stress (rc={rc})"
    if rc != 0:
        res.setdefault("error", f"rc={rc}")
        res["stderr"] = err[-500:]
    res["c2c_ns"] = [probe0, kitmod.c2c_ns()]
    slow = kitmod.SLOW_C2C_NS
    res["placement"] = (
        "fast" if max(res["c2c_ns"]) < slow else "slow" if min(res["c2c_ns"]) >= slow else "mixed"
    )
    return res


def render_stress_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, list[Target]]:
    """Markdown of a --stress-vs-loadgen run: medians per (server, cell, generator) and the ratio."""
    by: dict[tuple[str, Cell, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["server"], (r["size"], r["conns"], r["depth"]), r["generator"]), []).append(r)

    def med(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [float(r[key]) for r in rs if "error" not in r and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def tag(rs: list[dict[str, Any]]) -> str:
        return "".join({"fast": "F", "mixed": "M", "slow": "S"}.get(r.get("placement", ""), "?") for r in rs)

    md = [f"# msgsock stress vs the kit's loadgen, {meta.get('stamp', '?')}\n"]
    md.append(
        f"{meta.get('placement_note', '')} {meta.get('duration')} s measured after {meta.get('warmup')} s "
        f"warmup, {meta.get('repeats')} repeat(s), the two generators alternating against the same "
        f"server process.  Target (SPEC §8): stress msgs/s >= {STRESS_TARGET:g}x loadgen's.\n"
    )
    for note in meta.get("notes", []):
        md.append(f"- NOTE: {note}")
    if meta.get("notes"):
        md.append("")
    md.append(
        "| server | cell | loadgen msgs/s | stress msgs/s | stress/loadgen | result | "
        "loadgen p99 µs | stress p99 µs | gen CPU % (loadgen/stress) | placement (lg/stress) | errors |"
    )
    md.append("|---|---|---:|---:|---:|---|---:|---:|---|---|---|")
    targets: list[Target] = []
    servers = [s for s in STRESS_SERVERS if any(k[0] == s for k in by)]
    cells = cell_order(k[1] for k in by)
    for server in servers:
        for cell in cells:
            lg, st = by.get((server, cell, "loadgen"), []), by.get((server, cell, "stress"), [])
            if not lg and not st:
                continue
            lg_rate, st_rate = med(lg, "msgs_per_s"), med(st, "msgs_per_s")
            gen_ratio = st_rate / lg_rate if st_rate is not None and lg_rate else None
            passed = None if gen_ratio is None else gen_ratio >= STRESS_TARGET
            result = "n/a" if passed is None else ("pass" if passed else "**FAIL**")
            lg_cpu, st_cpu = med(lg, "loadgen_cpu"), med(st, "generator_cpu")
            cpu = f"{(lg_cpu or 0) * 100:.0f}/{(st_cpu or 0) * 100:.0f}"
            errors = "; ".join(
                sorted(
                    {
                        f"{g}: {x['error']}"
                        for g, rs in (("loadgen", lg), ("stress", st))
                        for x in rs
                        if "error" in x
                    }
                )
            )
            md.append(
                f"| {server} | {cell_label(*cell)} | {fmt_rate(lg_rate)} | {fmt_rate(st_rate)} | "
                f"{fmt_ratio(gen_ratio)} | {result} | {fmt_us(med(lg, 'p99_us'))} | {fmt_us(med(st, 'p99_us'))} | "
                f"{cpu} | {tag(lg)}/{tag(st)} | {errors} |"
            )
            targets.append(
                Target(
                    f"msgsock stress >= {STRESS_TARGET:g}x loadgen vs {server}",
                    cell,
                    gen_ratio,
                    f">= {STRESS_TARGET:g}",
                    passed,
                    f"{tag(lg)}/{tag(st)}",
                )
            )
    checked = [t for t in targets if t.passed is not None]
    md.append(f"\n{sum(1 for t in checked if t.passed)} of {len(checked)} checked cells pass.\n")
    return "\n".join(md), targets


def run_stress_vs_loadgen(args: argparse.Namespace, out: Path, kit: Path, python: str) -> int:
    """Both load generators against the same servers, alternating, in one run."""
    kitmod = load_kit_compare(kit)
    port = args.port or pick_port()
    duration, warmup, repeats = (1.0, 0.3, 1) if args.quick else (5.0, 1.0, 3)
    duration = args.duration if args.duration is not None else duration
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats if args.repeats is not None else repeats
    server_cpu, gen_cpu = (1, 1) if args.same_cpu else (args.server_cpu, args.loadgen_cpu)
    notes: list[str] = []
    servers = {C_REF: "./c_epoll_echo {port}", **row_commands(python, ["msgsock"], None)}
    why = preflight("msgsock", servers["msgsock"], port, kit, out)
    if why is not None:
        notes.append(f"msgsock serve skipped: {why}")
        del servers["msgsock"]
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else STRESS_SIZES
    conn_counts = [int(x) for x in args.conns.split(",")] if args.conns else STRESS_CONNS
    depths = [int(x) for x in args.depths.split(",")] if args.depths else STRESS_DEPTHS
    cells = [(s, c, d) for s in sizes for c in conn_counts for d in depths]
    meta: dict[str, Any] = {
        "stamp": out.name,
        "mode": "stress-vs-loadgen" + (", same-CPU" if args.same_cpu else ""),
        "same_cpu": args.same_cpu,
        "placement_note": (
            f"Server and generator both on CPU {server_cpu} (same-CPU)."
            if server_cpu == gen_cpu
            else f"Server on CPU {server_cpu}, generators on CPU {gen_cpu} (cross-CPU)."
        ),
        "duration": duration,
        "warmup": warmup,
        "repeats": repeats,
        "stress_workers": args.stress_workers,
        "kit": str(kit),
        "python": python,
        "port": port,
        "servers": servers,
        "notes": notes,
        "argv": sys.argv[1:],
    }
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    n_runs = repeats * len(servers) * len(cells) * 2
    print(f"{n_runs} runs, ~{n_runs * (duration + warmup + 0.6) / 60:.1f} min; output {out}", flush=True)
    status = 0
    rows: list[dict[str, Any]] = []
    with open(out / "stress.jsonl", "w") as raw:
        for rep in range(repeats):
            for name, command in servers.items():
                try:
                    srv = kitmod.Server(name, command, port, str(out), server_cpu)
                except SystemExit as exc:  # compare.Server exits when a server does not start
                    notes.append(f"rep {rep}: {name} did not start: {exc}")
                    status = 1
                    continue
                try:
                    for i, cell in enumerate(cells):
                        size, conns, depth = cell
                        # Alternate which generator goes first, so slow drift favours neither.
                        order = ("loadgen", "stress") if (rep + i) % 2 == 0 else ("stress", "loadgen")
                        for gen in order:
                            if gen == "loadgen":
                                r = kitmod.run_cell(port, size, conns, depth, duration, warmup, srv, gen_cpu)
                            else:
                                r = run_stress_cell(
                                    kitmod,
                                    srv,
                                    python,
                                    port,
                                    cell,
                                    duration,
                                    warmup,
                                    gen_cpu,
                                    args.stress_workers,
                                )
                            r.update(server=name, generator=gen, rep=rep, size=size, conns=conns, depth=depth)
                            if not srv.alive():
                                r.setdefault("error", "server died")
                            rows.append(r)
                            raw.write(json.dumps(r) + "\n")
                            raw.flush()
                            cpu_gen = r.get("loadgen_cpu", r.get("generator_cpu", 0)) or 0
                            print(
                                f"rep{rep} {name:8s} {gen:7s} {cell_label(*cell):16s} "
                                f"{fmt_rate(r.get('msgs_per_s')):>8s} msg/s p99 {fmt_us(r.get('p99_us')):>7s} us "
                                f"gen {cpu_gen * 100:3.0f}% srv {r['server_cpu'] * 100:3.0f}% "
                                f"c2c {r['c2c_ns']} {r.get('error', '')}",
                                flush=True,
                            )
                            if not srv.alive():
                                break
                        if not srv.alive():
                            break
                finally:
                    with contextlib.suppress(SystemExit):
                        srv.stop()
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    md, targets = render_stress_report(rows, meta)
    (out / "report.md").write_text(md + "\n")
    print("\n" + md, flush=True)
    print(f"written: {out / 'report.md'}", flush=True)
    if any("error" in r for r in rows):
        status = 1
    if args.check and any(t.passed is False for t in targets):
        status = 1
    return status


# -- command line -------------------------------------------------------------------------


def report_only(path: Path) -> int:
    """Rebuild report.md (and summary.json) of an earlier run directory."""
    meta_path = path / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"stamp": path.name}
    if (path / "stress.jsonl").exists():
        rows = [json.loads(x) for x in (path / "stress.jsonl").read_text().splitlines() if x.strip()]
        md, _ = render_stress_report(rows, meta)
        (path / "report.md").write_text(md + "\n")
        print(md)
        return 0
    rows = read_raw(path)
    if not rows:
        print(f"no raw runs under {path}", file=sys.stderr)
        return 1
    write_report(path, rows, meta)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_argument_group("modes")
    mode.add_argument(
        "--quick",
        action="store_true",
        help="3 cells (64B c=16 d=1, 64B c=16 d=16, 1KiB c=256 d=1), 5 references, "
        "1 s after 0.3 s warmup, 1 repeat: about a minute",
    )
    mode.add_argument(
        "--same-cpu",
        action="store_true",
        help="server and load generator both on CPU 1 (stable ratios, ±2%%)",
    )
    mode.add_argument(
        "--stress-vs-loadgen",
        action="store_true",
        help="msgsock stress and the kit's loadgen against the same msgsock serve and C "
        "server, alternating: 64B/1KiB x c=16/256 x d=1/16",
    )
    mode.add_argument("--report", metavar="DIR", type=Path, help="only rebuild the report of run DIR")
    sel = ap.add_argument_group("what to run")
    sel.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"msgsock rows, comma-separated (default all: {','.join(ROWS)})",
    )
    sel.add_argument(
        "--refs",
        default=None,
        help="kit references, comma-separated ('' for none; default all, or 5 with --quick)",
    )
    sel.add_argument(
        "--sizes",
        help="payload sizes of a custom matrix (compare.py --sizes; a custom matrix takes the "
        "full matrix's value for --sizes/--conns/--deep not given, also with --quick)",
    )
    sel.add_argument("--conns", help="connection counts for a custom matrix (compare.py --conns)")
    sel.add_argument("--deep", default=None, help="SIZE:DEPTH cells for a custom matrix ('' for none)")
    sel.add_argument(
        "--depths", help="depths of --stress-vs-loadgen (default 1,16; --sizes/--conns apply too)"
    )
    sel.add_argument("--duration", type=float, help="measured seconds per run (default 5; 1 with --quick)")
    sel.add_argument("--warmup", type=float, help="warmup seconds per run (default 1; 0.3 with --quick)")
    sel.add_argument("--repeats", type=int, help="interleaved repeats (default 3; 1 with --quick)")
    env = ap.add_argument_group("environment")
    env.add_argument("--kit", type=Path, default=DEFAULT_KIT, help=f"the shared kit (default {DEFAULT_KIT})")
    env.add_argument(
        "--python",
        default=str(REPO / ".venv" / "bin" / "python"),
        help="interpreter of the msgsock rows (default the repo's .venv)",
    )
    env.add_argument(
        "--ref-python",
        default=None,
        help="interpreter of the kit's Python servers (default: --python when it has "
        "uvloop and twisted, else the kit's .venv)",
    )
    env.add_argument("--port", type=int, default=0, help="server port (default: a free one from 29898)")
    env.add_argument("--server-cpu", type=int, default=0, help="CPU of the servers (default 0)")
    env.add_argument("--loadgen-cpu", type=int, default=1, help="CPU of the load generators (default 1)")
    env.add_argument(
        "--processes-cpus",
        default=None,
        help="CPU list for the msgsock_processes row (e.g. 0,1); default: pinned like every server",
    )
    env.add_argument("--stress-workers", type=int, default=1, help="msgsock stress --workers (default 1)")
    env.add_argument("--out", type=Path, help="output directory (default bench/results/<stamp>)")
    env.add_argument("--check", action="store_true", help="exit 1 when a SPEC §8 target fails")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; choose from {', '.join(ROWS)}")
    args.rows = rows
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected mode.

    Returns:
        0 when every run completed without error (and, with --check, every target
        passed); 1 otherwise.
    """
    args = parse_args(argv)
    if args.report is not None:
        return report_only(args.report)
    kit = args.kit.resolve()
    ensure_kit(kit)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "bench" / "results" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"output: {out}", flush=True)
    try:
        if args.stress_vs_loadgen:
            return run_stress_vs_loadgen(args, out, kit, args.python)
        ref_python = reference_python(kit, args.ref_python, args.python)
        return run_matrix(args, out, kit, args.python, ref_python)
    except KeyboardInterrupt:
        # compare.py got the same SIGINT and stops its server in its own `finally`.
        print(f"\ninterrupted; partial results in {out} (bench/run.py --report {out})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
