"""Running the workers: one in this process, or ``--workers N`` processes, and stopping them.

``--workers N`` runs N worker processes (``spawn``: each a clean interpreter) over
disjoint sets of connections (:func:`.config._shares`).  Each connects, says "ready",
waits for a common "go" time, runs, and sends its result; the parent merges their
interval snapshots as they come (:class:`.merge._Aggregator`) and stops them all on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from .._signals import STOP_SIGNALS, stop_signals
from .config import StressConfig, _Share, _shares
from .fmt import _fmt_ns
from .live import _Live
from .merge import _Aggregator
from .poller import _IN
from .pump import _Worker


def _worker_process(cfg: StressConfig, share: _Share, address: tuple[int, Any], pipe: Any) -> None:
    """Entry point of a ``--workers`` process: connect, wait for "go", run, send the result."""
    try:
        worker = _Worker(cfg, share, address)  # builds its own TLS context (not picklable)
    except ValueError as exc:  # a TLS file that changed since the parent checked it
        pipe.send(("crash", str(exc)))
        pipe.close()
        return

    def stop(signum: int, frame: Any) -> None:
        worker.stop_requested = True

    for signum in STOP_SIGNALS:  # a worker process: its handlers live as long as it does
        signal.signal(signum, stop)
    try:
        worker.control = pipe
        worker.connect_all()
        pipe.send(("ready", worker.established, worker.failed))
        t0 = None
        deadline = time.monotonic() + 3600
        while t0 is None and not worker.stop_requested and time.monotonic() < deadline:
            if pipe.poll(0.05):
                msg = pipe.recv()
                if msg[0] == "go":
                    t0 = msg[1]
                elif msg[0] == "stop":
                    worker.stop_requested = True
        worker.control_fd = pipe.fileno()
        worker.ep.register(worker.control_fd, _IN)
        worker.run(
            t0 if t0 is not None else time.monotonic_ns(), lambda snap: pipe.send(("tick", snap)), True
        )
        pipe.send(("result", worker.result()))
    except BaseException as exc:  # report, never die silently
        try:
            pipe.send(("crash", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        worker.close()
        pipe.close()


class _Stopper:
    """SIGINT/SIGTERM handlers that ask the run to stop (and restore the old ones)."""

    def __init__(self) -> None:
        self.requested = False
        self.targets: list[_Worker] = []

    def __enter__(self) -> _Stopper:
        self._signals = stop_signals(self._handle)
        self._signals.__enter__()
        return self

    def _handle(self) -> None:
        self.requested = True
        for w in self.targets:
            w.stop_requested = True

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(None, None, None)


def _run_inprocess(
    cfg: StressConfig, address: tuple[int, Any], agg: _Aggregator, stopper: _Stopper
) -> list[dict[str, Any]]:
    """Run the whole load in this process (``--workers 1``); return its one result."""
    worker = _Worker(cfg, _shares(cfg)[0], address)
    stopper.targets.append(worker)
    if stopper.requested:
        worker.stop_requested = True
    try:
        worker.connect_all()
        _announce_connected(agg.live, cfg, worker.established, worker.failed, worker.connect_ns)
        t0 = time.monotonic_ns()
        agg.start(t0)
        if worker.established:
            worker.run(t0, lambda snap: agg.tick(0, snap))
        else:
            worker.final_tick = worker.snapshot(1, t0, False)
            worker.t0 = worker.ledger.t_start = worker.t_done = t0
        result = worker.result()
        agg.finished(0, worker.final_tick)
        return [result]
    finally:
        worker.close()


def _announce_connected(
    live: _Live, cfg: StressConfig, established: int, failed: int, connect_ns: int
) -> None:
    """The live line that says how many connections opened, and how fast."""
    live.line(
        f"connected {established}/{cfg.connections} in {_fmt_ns(connect_ns)}"
        + (f" ({failed} failed)" if failed else "")
    )


def _run_processes(
    cfg: StressConfig, address: tuple[int, Any], agg: _Aggregator, stopper: _Stopper
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the load in ``cfg.workers`` processes; return their results and what went wrong."""
    import multiprocessing
    import multiprocessing.connection as mpc

    # spawn: no inherited locks or threads; each worker is a clean interpreter.
    ctx = multiprocessing.get_context("spawn")
    shares = _shares(cfg)
    pipes = []
    procs = []
    problems: list[str] = []
    for share in shares:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_process, args=(cfg, share, address, child_end), name=f"stress-{share.index}"
        )
        proc.daemon = True
        proc.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(proc)
    by_pipe = {id(p): i for i, p in enumerate(pipes)}
    stopped = {"sent": False}

    def send_stop() -> None:
        if stopped["sent"]:
            return
        stopped["sent"] = True
        for p in pipes:
            try:
                p.send(("stop",))
            except OSError:
                pass

    results: dict[int, dict[str, Any]] = {}
    ready: dict[int, tuple[int, int]] = {}
    gone: set[int] = set()
    crashed: set[int] = set()
    open_pipes = list(pipes)
    begin = time.monotonic_ns()
    connect_budget = cfg.timeout + 10 + (cfg.connections / cfg.connect_rate if cfg.connect_rate else 0)
    go_sent = False
    stop_deadline: float | None = None
    try:
        while open_pipes:
            if stopper.requested:
                send_stop()
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + cfg.timeout + 5
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                problems.append("workers did not stop in time; terminated")
                break
            if not go_sent and all(i in ready or i in gone for i in range(len(pipes))):
                established = sum(r[0] for r in ready.values())
                failed = sum(r[1] for r in ready.values())
                _announce_connected(agg.live, cfg, established, failed, time.monotonic_ns() - begin)
                t0 = time.monotonic_ns() + 20_000_000  # a common start shortly ahead
                agg.start(t0)
                for p in pipes:
                    try:
                        p.send(("go", t0))
                    except OSError:
                        pass
                go_sent = True
            elif not go_sent and (time.monotonic_ns() - begin) / 1e9 > connect_budget:
                problems.append("workers did not finish connecting in time")
                send_stop()
            for ready_end in mpc.wait(open_pipes, timeout=0.1):
                assert isinstance(ready_end, mpc.Connection)
                p = ready_end
                w = by_pipe[id(p)]
                try:
                    msg = p.recv()
                except (EOFError, OSError):
                    open_pipes.remove(p)
                    gone.add(w)
                    if w not in results and w not in crashed:
                        problems.append(f"worker {w} exited without a result")
                        agg.finished(w, None)
                    continue
                if msg[0] == "ready":
                    ready[w] = (msg[1], msg[2])
                elif msg[0] == "tick":
                    agg.tick(w, msg[1])
                elif msg[0] == "result":
                    results[w] = msg[1]
                    agg.finished(w, msg[1]["final_tick"])
                elif msg[0] == "crash":
                    crashed.add(w)
                    problems.append(f"worker {w} failed: {msg[1]}")
                    agg.finished(w, None)
    finally:
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
        for p in pipes:
            p.close()
    return [results[i] for i in sorted(results)], problems
