"""The engines and handlers behind ``msgsock serve`` (SPEC §6.1).

An engine is one way of running the same server: ``native`` on
:func:`msgsock.native.serve` (the C event loop; epoll or io_uring); ``asyncio``
(uvloop when installed) on :func:`msgsock.aio.serve`; ``threads`` on
:class:`msgsock.sync.ThreadedServer` (one thread per connection: the MFCAsync
AsyncServer model); and ``processes``: N worker processes, each running the asyncio
engine on its own socket bound to the same port with ``SO_REUSEPORT``, under a
supervising parent (the iocpserver successor, SPEC §2, §7); ``native`` with
``workers`` runs N native loops the same way.  ``auto``, the default, is ``native``
for plain TCP when the extension is built (:func:`msgsock.native.available`) and
``asyncio`` otherwise, or when TLS, authentication, the PROXY protocol or UDP are
asked for (:func:`resolve_engine`); the ready line names the engine chosen.  Every
engine takes the
same :class:`ServerConfig`, keeps the same limits, logs the same lines and ends with
the same summary.  ``ServerConfig(udp=True)`` serves datagrams instead
(:func:`msgsock.app.udp.run_udp_server`, SPEC §5.4).

Life of a run: bind (errors surface before the ready line), print the ready line
``listening on HOST:PORT (engine, frame)``, serve until SIGINT or SIGTERM, then shut
down gracefully (stop accepting, let every connection finish what it has received,
half-close, wait up to ``limits.shutdown_timeout``) and print the summary.

Theory of operation of the ``processes`` engine.  The parent binds first -- one
socket per address of ``host``, with ``SO_REUSEPORT``, *not* listening -- so a bad
address is reported before anything starts, the real port of ``--port 0`` is known,
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
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, TextIO

from ..framing import DEFAULT_FORMAT, FrameFormat, Message
from ..protocol import DEFAULT_LIMITS, Limits, format_address
from ..serving import ServerStatistics
from ..udp import DEFAULT_MAX_SIZE as DEFAULT_UDP_MAX_SIZE
from ._signals import STOP_SIGNALS, run_until_stopped, stop_signals

if TYPE_CHECKING:
    from .. import aio

__all__ = [
    "DRAIN_MARGIN",
    "ENGINES",
    "HANDLERS",
    "MAX_WORKERS",
    "RESTART_DELAY_MAX",
    "RESTART_DELAY_MIN",
    "RESTART_RESET_AFTER",
    "ServerConfig",
    "echo",
    "resolve_engine",
    "reverse",
    "run_server",
]

UDP_MAX_SIZE = DEFAULT_UDP_MAX_SIZE
"""Default ``max_datagram_size``: the largest UDP payload over IPv4 (as ``msgsock.udp``)."""

MAX_WORKERS = 1024
"""Upper bound of ``workers``: a typo must not start a million processes."""

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

_log = logging.getLogger("msgsock.server")


def echo(message: bytes) -> bytes:
    """Return the message unchanged (with its header fields, if any)."""
    return message


def reverse(message: bytes) -> bytes:
    """Return the message reversed byte by byte (the MultiSoc server), keeping header fields."""
    if type(message) is Message:
        return Message(message[::-1], message.header)
    return message[::-1]


HANDLERS: dict[str, Callable[[bytes], bytes]] = {"echo": echo, "reverse": reverse}
ENGINES = ("auto", "asyncio", "threads", "processes", "native")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``msgsock serve`` needs to run one server.

    Attributes:
        host: address to bind.
        port: port to bind; 0 picks a free one (printed in the ready line).
        engine: one of :data:`ENGINES` (``auto``: see :func:`resolve_engine`).
        handler: one of :data:`HANDLERS`.
        frame: the frame format (TCP); its ``max_size`` is the message size limit.
        limits: the limits in force (SPEC §7).
        backlog: the listen backlog.
        workers: worker processes of the ``processes`` engine (None = ``os.cpu_count()``),
            or of the ``native`` engine (None = one loop in this process).
        udp: serve UDP datagrams instead of framed TCP (engine ``asyncio`` only; the
            frame and connection limits do not apply).
        max_datagram_size: largest datagram accepted or sent with ``udp`` (0-65535).
        tls_cert: serve TLS with this certificate chain (PEM); ``tls_key`` its key.
        tls_client_ca: require client certificates signed by these CAs (mutual TLS).
        auth_key: require the shared-key handshake (SPEC §4.2) before any frame.
        proxy_protocol: require a PROXY protocol v1/v2 header on every connection and
            log the proxied client's address (SPEC §7).
    """

    host: str = "127.0.0.1"
    port: int = 9898
    engine: str = "auto"
    handler: str = "echo"
    frame: FrameFormat = DEFAULT_FORMAT
    limits: Limits = field(default=DEFAULT_LIMITS)
    backlog: int = 1024
    workers: int | None = None
    udp: bool = False
    max_datagram_size: int = UDP_MAX_SIZE
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_key: bytes | None = field(default=None, repr=False)
    proxy_protocol: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context of ``tls_cert``, or None for plain TCP.

        Built where it is used: a context cannot be sent to a worker process.

        Raises:
            ValueError: a certificate or key file is missing or invalid.
        """
        if self.tls_cert is None:
            return None
        from ..tls import server_context

        return server_context(self.tls_cert, self.tls_key, self.tls_client_ca)

    def security(self) -> dict[str, Any]:
        """The TLS, authentication and PROXY keyword arguments of the servers."""
        options: dict[str, Any] = {"ssl": self.ssl_context()}
        if self.auth_key is not None:
            options["auth_key"] = self.auth_key
        if self.proxy_protocol:
            options["proxy_protocol"] = True
        return options

    def worker_count(self) -> int:
        """The number of worker processes the ``processes`` engine starts."""
        return self.workers if self.workers is not None else os.cpu_count() or 1


def resolve_engine(config: ServerConfig) -> str:
    """The engine ``config`` runs on: its own, or for ``auto`` ``native`` when it can serve it, else
    ``asyncio`` (``processes`` when ``workers`` is given).

    ``native`` serves plain TCP only: TLS, authentication, the PROXY protocol and UDP
    stay with the asyncio engine, as does everything when the extension is missing
    or disabled (``MSGSOCK_NO_EXTENSIONS=1``).
    """
    if config.engine != "auto":
        return config.engine
    if native_refusal(config) is None:
        return "native"
    # --workers N asks for several event loops: the processes engine has them too.
    return "asyncio" if config.workers is None or config.udp else "processes"


def native_refusal(config: ServerConfig) -> str | None:
    """Why the ``native`` engine cannot run ``config`` (None when it can)."""
    from .. import native

    asked = [
        name
        for name, on in (
            ("--udp", config.udp),
            ("--tls-cert", config.tls_cert),
            ("--auth-key-file", config.auth_key is not None),
            ("--proxy-protocol", config.proxy_protocol),
        )
        if on
    ]
    if asked:
        return f"{', '.join(asked)} is served by the asyncio engine only (--engine asyncio)"
    return native.unavailable_reason()


def _ready_line(config: ServerConfig, address: tuple[object, ...], engine: str | None = None) -> str:
    extras = [
        name
        for name, on in (
            ("mutual tls" if config.tls_client_ca else "tls", config.tls_cert),
            ("auth", config.auth_key),
            ("proxy protocol", config.proxy_protocol),
        )
        if on
    ]
    details = ", ".join([engine or config.engine, str(config.frame), *extras])
    return f"listening on {format_address(address)} ({details})"


def run_server(config: ServerConfig, *, out: TextIO | None = None) -> ServerStatistics:
    """Run a server until SIGINT/SIGTERM, then drain it and return its statistics.

    The ready line and the summary are written to ``out`` (stdout by default).  Must be
    called from the main thread (it installs signal handlers).  The ``processes``
    engine starts its workers with multiprocessing's ``spawn`` method, which imports
    the main module again: a program that calls this must guard its entry point with
    ``if __name__ == "__main__":`` (``msgsock serve`` does).

    Raises:
        OSError: the address cannot be bound (in use, not local, unresolvable), or
            the workers of the ``processes`` engine could not start listening.
        ValueError: an unknown engine or handler name, a worker count outside
            1-:data:`MAX_WORKERS`, an engine other than asyncio with ``udp``, a
            ``max_datagram_size`` outside 0-65535, or ``native`` asked for where it
            cannot run (:func:`native_refusal` says why).
    """
    out = out or sys.stdout
    if config.handler not in HANDLERS:
        raise ValueError(f"unknown handler {config.handler!r}; choose from {', '.join(HANDLERS)}")
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose from {', '.join(ENGINES)}")
    engine = resolve_engine(config)
    if engine == "native":
        refusal = native_refusal(config)
        if refusal is not None:
            raise ValueError(f"--engine native: {refusal}")
    config = replace(config, engine=engine)
    if config.udp:
        if config.engine != "asyncio":
            raise ValueError(f"engine {config.engine!r} does not serve UDP; UDP has one engine")
        stats = _run_udp(config, out)
    elif config.engine == "asyncio":
        stats = _run_asyncio(config, out)
    elif config.engine == "threads":
        stats = _run_threads(config, out)
    elif config.engine == "native" and config.workers is None:
        stats = _run_native(config, out)
    else:
        if not 1 <= config.worker_count() <= MAX_WORKERS:
            raise ValueError(f"workers must be 1-{MAX_WORKERS}, not {config.workers}")
        stats = _Supervisor(config, out).run()
    print(f"summary: {stats.summary()}", file=out, flush=True)
    return stats


async def _serve_asyncio(
    config: ServerConfig, sock: socket.socket | None = None, *, reuse_port: bool = False
) -> aio.Server:
    """Start the asyncio engine's server for ``config`` (on ``sock`` when given).

    Raises:
        OSError: the address cannot be bound.
    """
    from .. import aio

    return await aio.serve(
        # None is aio's built-in echo, which echoes whole frames without re-encoding them.
        None if config.handler == "echo" else HANDLERS[config.handler],
        None if sock is not None else config.host,
        config.port,
        frame=config.frame,
        limits=config.limits,
        backlog=config.backlog,
        reuse_port=reuse_port,
        sock=sock,
        **config.security(),
    )


def _run_asyncio(config: ServerConfig, out: TextIO) -> ServerStatistics:
    from .. import aio

    async def main() -> ServerStatistics:
        server = await _serve_asyncio(config)
        print(_ready_line(config, server.addresses[0]), file=out, flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            try:
                # The handlers stay while the server drains: a second signal changes nothing.
                server.close()
                await server.wait_closed()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
        return server.statistics()

    return aio.run(main())


def _serve_native(
    config: ServerConfig, *, reuse_port: bool = False, sock: socket.socket | None = None
) -> Any:
    """Bind the native engine's server for ``config`` (on ``sock`` when given).

    Raises:
        OSError: the address cannot be bound.
    """
    from .. import native

    return native.serve(
        config.handler,  # "echo" and "reverse" run natively
        None if sock is not None else config.host,
        config.port,
        frame=config.frame,
        limits=config.limits,
        backlog=config.backlog,
        reuse_port=reuse_port,
        sock=sock,
    )


def _native_name(server: Any) -> str:
    return f"native {server.backend}"


def _run_native(config: ServerConfig, out: TextIO) -> ServerStatistics:
    server = _serve_native(config)
    with stop_signals(server.close):
        print(_ready_line(config, server.addresses[0], _native_name(server)), file=out, flush=True)
        stats: ServerStatistics = server.serve_forever()
    return stats


def _run_threads(config: ServerConfig, out: TextIO) -> ServerStatistics:
    from ..sync import ThreadedServer

    server = ThreadedServer(
        HANDLERS[config.handler],
        config.host,
        config.port,
        frame=config.frame,
        limits=config.limits,
        backlog=config.backlog,
        **config.security(),
    )

    def start() -> None:
        server.start()
        print(_ready_line(config, server.address), file=out, flush=True)

    run_until_stopped(start, server.shutdown)
    return server.statistics()


def _run_udp(config: ServerConfig, out: TextIO) -> ServerStatistics:
    from .udp import run_udp_server

    return run_udp_server(
        config.host, config.port, HANDLERS[config.handler], max_size=config.max_datagram_size, out=out
    )


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


class _Supervisor:
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
