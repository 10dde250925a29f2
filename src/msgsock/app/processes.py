"""The ``processes`` engine: N worker processes on one port under a supervising parent (SPEC §2, §7).

Theory of operation.  The parent binds first -- one socket per address of ``host``,
with ``SO_REUSEPORT``, *not* listening -- so a bad address is reported before anything starts, the real port of ``--port 0`` is known,
and the port stays reserved while workers come and go.  A socket that does not
listen receives no connections; each worker binds its own listening socket to the
same address, and the kernel spreads new connections over the workers.  (Where
``SO_REUSEPORT`` does not balance -- anything but Linux -- the parent listens and
the workers inherit its socket instead.)  Workers are started with the ``spawn``
method (a fresh interpreter: no event loop state is copied from the parent), with
SIGINT blocked, so a Ctrl-C in a terminal, which reaches the whole process group,
is handled by the parent alone.  Each worker reports ``ready`` over a pipe once it
listens, and its statistics when it stops; it also stops when that pipe reaches
EOF, so a killed parent leaves no orphans.  The parent prints the ready line once
every worker listens, restarts a worker that dies with exponential backoff
(:data:`RESTART_DELAY_MIN` doubling to :data:`RESTART_DELAY_MAX`, back to the
minimum after :data:`RESTART_RESET_AFTER` seconds of good service), and on SIGINT or
SIGTERM sends SIGTERM to every worker, waits for them to drain (their
``shutdown_timeout`` plus :data:`DRAIN_MARGIN`), kills stragglers and prints one
summary of all workers' counters.

A worker runs the asyncio engine, or with ``engine="native"`` the native loop
(:func:`msgsock.native.serve`); :func:`msgsock.app.server.run_server` starts the
supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

from ..protocol import format_address
from ..serving import ServerStatistics
from ._signals import stop_signals
from .server import ServerConfig, _log, _native_name, _ready_line, _serve_asyncio, _serve_native

__all__ = ["DRAIN_MARGIN", "RESTART_DELAY_MAX", "RESTART_DELAY_MIN", "RESTART_RESET_AFTER", "Supervisor"]

RESTART_DELAY_MIN = 0.1
"""Seconds before the first restart of a worker that died."""
RESTART_DELAY_MAX = 5.0
"""The restart delay doubles after each death up to this many seconds."""
RESTART_RESET_AFTER = 30.0
"""A worker that served this long before it died is restarted after the minimum delay again."""
START_TIMEOUT = 60.0
"""Seconds the workers have to start listening before the server gives up (exit 1)."""
DRAIN_MARGIN = 5.0
"""Seconds the parent waits beyond ``shutdown_timeout`` for workers to drain, before killing them."""

# Per-worker listening sockets need SO_REUSEPORT *with load balancing*: Linux has it;
# elsewhere SO_REUSEPORT only lets the last socket bound take every connection.
_PER_WORKER_SOCKETS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


# -- the processes engine: the parent ---------------------------------------------------------


def _reserve(config: ServerConfig, *, listen: bool) -> list[socket.socket]:
    """Bind one socket per address of ``config.host`` (all on one port), as asyncio would.

    With ``listen`` False the sockets only reserve the port (``SO_REUSEPORT`` lets the
    workers bind it too); with True they listen, to be shared by the workers.

    Raises:
        OSError: an address cannot be resolved or bound (``socket.gaierror`` included).
    """
    infos = socket.getaddrinfo(
        config.host or None, config.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    seen: set[tuple[int, Any]] = set()
    socks: list[socket.socket] = []
    port = config.port
    try:
        for family, type_, proto, _canonname, address in infos:
            if family not in (socket.AF_INET, socket.AF_INET6) or (family, address) in seen:
                continue
            seen.add((family, address))
            if port != config.port:  # --port 0: every address on the port the first one got
                address = (address[0], port, *address[2:])
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            # The options asyncio's create_server(reuse_port=True) sets on the workers' sockets.
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if not listen:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            port = sock.getsockname()[1]
            if listen:
                sock.listen(config.backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(errno.EADDRNOTAVAIL, f"no IPv4 or IPv6 address for {config.host!r}")
    return socks


def _logging_setup() -> tuple[int, logging.Formatter | None]:
    """The parent's log level and formatter, for the workers to log alike."""
    root = logging.getLogger()
    for handler in root.handlers:
        formatter = handler.formatter
        if formatter is not None:
            try:
                pickle.dumps(formatter)
            except Exception:  # a formatter that cannot travel: the workers use the default
                break
            return root.getEffectiveLevel(), formatter
    return root.getEffectiveLevel(), None


@dataclass
class _Worker:
    """One worker slot: its current process, pipe and restart bookkeeping."""

    index: int
    process: BaseProcess | None = None
    pipe: Pipe | None = None
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    stats_received: bool = False
    delay: float = RESTART_DELAY_MIN
    restart_at: float | None = None
    restarts: int = 0
    error: tuple[int | None, str] | None = None


class Supervisor:
    """The parent of the ``processes`` engine (see the module docstring)."""

    def __init__(self, config: ServerConfig, out: TextIO) -> None:
        self.config = config
        self.out = out
        self.count = config.worker_count()
        self.workers = [_Worker(n) for n in range(1, self.count + 1)]
        self.totals = ServerStatistics()
        self.stopping = False
        self.context = multiprocessing.get_context("spawn")
        self.log_setup = _logging_setup()
        self.shared: list[socket.socket] | None = None
        self.worker_config = config
        self.wake_r, self.wake_w = socket.socketpair()
        self.engine_name = "processes"
        """The ready line's engine (``processes``; ``native BACKEND`` as the workers report)."""

    # -- the run ------------------------------------------------------------------------

    def run(self) -> ServerStatistics:
        """Bind, start the workers, print the ready line, supervise, drain; return the totals.

        Raises:
            OSError: binding failed, or a worker could not start listening.
        """
        reserved: list[socket.socket] = []
        try:
            reserved = _reserve(self.config, listen=not _PER_WORKER_SOCKETS)
            self.worker_config = replace(self.config, port=reserved[0].getsockname()[1])
            self.shared = None if _PER_WORKER_SOCKETS else reserved
            with self._signals():
                try:
                    for worker in self.workers:
                        self._start(worker)
                    if self._wait_ready():
                        engine = f"{self.engine_name} x {self.count}"
                        print(
                            _ready_line(self.config, reserved[0].getsockname(), engine),
                            file=self.out,
                            flush=True,
                        )
                        self._supervise()
                finally:
                    self._stop_all()
        finally:
            for sock in reserved:
                sock.close()
            self.wake_r.close()
            self.wake_w.close()
        return self.totals

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

        def on_stop() -> None:
            self.stopping = True
            try:  # wake the wait() in the main loop
                self.wake_w.send(b"\0")
            except OSError:
                pass

        with stop_signals(on_stop):
            yield

    def _wait_ready(self) -> bool:
        """Wait until every worker listens; False if a stop was asked for meanwhile.

        Raises:
            OSError: a worker failed to listen, died first, or took :data:`START_TIMEOUT`.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self.workers):
            if self.stopping:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(errno.ETIMEDOUT, f"the workers did not listen within {START_TIMEOUT:g} s")
            for worker, code in self._poll(remaining):
                if worker.error is not None:  # report it as the bind error it is (exit 1, SPEC §6)
                    raise OSError(*worker.error)
                raise OSError(f"worker {worker.index} exited with code {_describe_exit(code)} while starting")
        return not self.stopping

    def _supervise(self) -> None:
        """Serve until a stop is asked for: restart each worker that dies, with backoff."""
        while not self.stopping:
            pending = [w.restart_at for w in self.workers if w.restart_at is not None]
            timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
            for worker, code in self._poll(timeout):
                self._schedule_restart(worker, code)
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now and not self.stopping:
                    worker.restart_at = None
                    worker.restarts += 1
                    try:
                        self._start(worker)
                    except OSError as exc:  # e.g. out of processes: keep serving, try again later
                        worker.restart_at = now + worker.delay
                        _log.error(
                            "worker %d could not be started (%s); retrying in %g s",
                            worker.index,
                            exc.strerror or exc,
                            worker.delay,
                        )
                        worker.delay = min(worker.delay * 2, RESTART_DELAY_MAX)

    def _schedule_restart(self, worker: _Worker, code: int | None) -> None:
        ran = time.monotonic() - worker.started
        if ran >= RESTART_RESET_AFTER:  # it served well for a while: this is not a crash loop
            worker.delay = RESTART_DELAY_MIN
        delay = worker.delay
        worker.delay = min(delay * 2, RESTART_DELAY_MAX)
        worker.restart_at = time.monotonic() + delay
        lost = "" if worker.stats_received else "; its counters are lost"
        _log.warning(
            "worker %d (pid %d) exited unexpectedly with code %s after %.1f s%s; restarting in %g s",
            worker.index,
            worker.pid,
            _describe_exit(code),
            ran,
            lost,
            delay,
        )

    def _stop_all(self) -> None:
        """Forward SIGTERM to every worker, wait for them to drain, kill the stragglers."""
        self.stopping = True
        for worker in self.workers:
            worker.restart_at = None
            if worker.process is not None and worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: the worker drains (SPEC §6.1)
        limit = self.config.limits.shutdown_timeout + DRAIN_MARGIN
        deadline = time.monotonic() + limit
        while any(w.process is not None for w in self.workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for worker, code in self._poll(remaining):
                if code not in (0, -signal.SIGTERM):
                    _log.warning(
                        "worker %d (pid %d) exited with code %s while stopping",
                        worker.index,
                        worker.pid,
                        _describe_exit(code),
                    )
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            _log.warning(
                "worker %d (pid %d) did not stop within %g s; killed", worker.index, worker.pid, limit
            )
            process.kill()
            process.join(5.0)
            self._reap(worker)

    # -- workers ------------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        parent_end, child_end = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=_worker_main,
            args=(worker.index, self.worker_config, child_end, self.log_setup, self.shared),
            name=f"msgsock-worker-{worker.index}",
            daemon=True,  # multiprocessing's exit handler terminates it if the parent fails
        )
        # The blocked mask is inherited through exec: the workers never see SIGINT (a
        # Ctrl-C reaches the whole process group); the parent stops them with SIGTERM.
        # Blocking (not ignoring) keeps a SIGINT sent to the parent meanwhile pending.
        blocking = hasattr(signal, "pthread_sigmask")
        if blocking:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            if blocking:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            child_end.close()  # the worker's copy is its own; ours would hide its EOF
        worker.process = process
        worker.pipe = parent_end
        worker.pid = process.pid or 0
        worker.started = time.monotonic()
        worker.ready = False
        worker.stats_received = False
        worker.error = None
        _log.debug("worker %d started (pid %d)", worker.index, worker.pid)

    def _poll(self, timeout: float | None) -> list[tuple[_Worker, int | None]]:
        """Wait for a message, a worker's exit or a signal; return the workers that exited."""
        waitables: list[Any] = [self.wake_r]
        for worker in self.workers:
            if worker.pipe is not None:
                waitables.append(worker.pipe)
            if worker.process is not None:
                waitables.append(worker.process.sentinel)
        ready = wait_any(waitables, timeout)
        if self.wake_r in ready:
            with contextlib.suppress(OSError):
                self.wake_r.recv(4096)
        exited: list[tuple[_Worker, int | None]] = []
        for worker in self.workers:
            if worker.pipe is not None and worker.pipe in ready:
                self._receive(worker)
            if worker.process is not None and worker.process.sentinel in ready:
                exited.append((worker, self._reap(worker)))
        return exited

    def _receive(self, worker: _Worker) -> None:
        """Handle what one worker sent: ``ready``, ``stats`` or ``error`` (bounded per call)."""
        pipe = worker.pipe
        assert pipe is not None
        for _ in range(16):
            try:
                if not pipe.poll():
                    return
                message = pipe.recv()
            except (EOFError, OSError):
                pipe.close()
                worker.pipe = None
                return
            kind = message[0]
            if kind == "ready":
                worker.ready = True
                if len(message) > 2:  # a native worker names its backend
                    self.engine_name = str(message[2])
                if worker.restarts:
                    _log.info("worker %d restarted (pid %d)", worker.index, worker.pid)
            elif kind == "stats":
                worker.stats_received = True
                self.totals.add_server(ServerStatistics(**message[1]))
            elif kind == "error":  # it could not listen; it exits next
                worker.error = (message[1], message[2])

    def _reap(self, worker: _Worker) -> int | None:
        """Collect a dead worker's last messages and exit code; free its slot."""
        process = worker.process
        assert process is not None
        process.join(1.0)
        if worker.pipe is not None:
            self._receive(worker)  # what it sent before it exited is still in the pipe
            if worker.pipe is not None:
                worker.pipe.close()
                worker.pipe = None
        code = process.exitcode
        worker.process = None
        with contextlib.suppress(ValueError):
            process.close()
        return code


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


# -- the processes engine: a worker -----------------------------------------------------------


class _WorkerPrefix(logging.Filter):
    """Start every log line of a worker with ``worker N:`` so the lines can be told apart."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format call: let the handler report it as usual
            return True
        record.msg = self.prefix + message
        record.args = None
        return True


def _worker_main(
    index: int,
    config: ServerConfig,
    pipe: Pipe,
    log_setup: tuple[int, logging.Formatter | None],
    shared: list[socket.socket] | None,
) -> None:
    """A worker process: the asyncio engine on its own socket (or the shared ones)."""
    with contextlib.suppress(ValueError, OSError):  # the parent stops us with SIGTERM
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    level, formatter = log_setup
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_WorkerPrefix(index))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    from .. import aio

    try:
        if config.engine == "native":
            stats = _worker_native(config, pipe, shared)
        else:
            stats = aio.run(_worker_serve(config, pipe, shared))
    except OSError as exc:
        _log.error("cannot listen on %s:%s: %s", config.host, config.port, exc.strerror or exc)
        with contextlib.suppress(OSError):
            pipe.send(("error", exc.errno, exc.strerror or str(exc)))
        sys.exit(1)
    with contextlib.suppress(OSError):  # the parent may be gone
        pipe.send(("stats", stats.as_dict()))
    pipe.close()


async def _worker_serve(
    config: ServerConfig, pipe: Pipe, shared: list[socket.socket] | None
) -> ServerStatistics:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before binding: a SIGTERM from here on is a graceful stop, never a kill.
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_pipe() -> None:
        # The parent never writes; readable means EOF: it is gone, so stop (no orphans).
        try:
            pipe.recv()
        except (EOFError, OSError):
            if not stop.is_set():
                _log.warning("the supervising parent is gone; stopping")
            loop.remove_reader(pipe.fileno())
            stop.set()

    if shared is None:
        servers = [await _serve_asyncio(config, reuse_port=True)]
    else:
        servers = [await _serve_asyncio(config, sock) for sock in shared]
    try:
        addresses = ", ".join(format_address(a) for s in servers for a in s.addresses)
        _log.info("listening on %s (pid %d)", addresses, os.getpid())
        loop.add_reader(pipe.fileno(), on_pipe)
        pipe.send(("ready", os.getpid()))
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(pipe.fileno())
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
    totals = ServerStatistics()
    for server in servers:
        totals.add_server(server.statistics())
    return totals


def _worker_native(config: ServerConfig, pipe: Pipe, shared: list[socket.socket] | None) -> ServerStatistics:
    """A worker of ``native`` with ``workers``: one native loop on its own ``SO_REUSEPORT`` socket.

    SIGTERM (from the parent) and the pipe's EOF (the parent is gone) both stop it.

    Raises:
        OSError: it cannot listen.
    """
    stopping: list[Any] = []
    servers: list[Any] = []

    def stop() -> None:
        stopping.append(True)
        for running in servers:
            running.close()

    # Before binding: a SIGTERM from here on is a graceful stop, never a kill.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop())
    server = _serve_native(config, reuse_port=shared is None, sock=shared[0] if shared else None)
    servers.append(server)
    if stopping:
        server.close()

    def watch_parent() -> None:
        # The parent never writes; readable means EOF: it is gone, so stop (no orphans).
        try:
            pipe.recv()
        except (EOFError, OSError):
            if not stopping:
                _log.warning("the supervising parent is gone; stopping")
                stop()

    addresses = ", ".join(format_address(a) for a in server.addresses)
    _log.info("listening on %s (pid %d)", addresses, os.getpid())
    pipe.send(("ready", os.getpid(), _native_name(server)))
    import threading

    threading.Thread(target=watch_parent, name="msgsock-parent-watch", daemon=True).start()
    stats: ServerStatistics = server.serve_forever()
    return stats
