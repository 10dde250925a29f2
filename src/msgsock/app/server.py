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
engine takes the same :class:`ServerConfig`, keeps the same limits, logs the same
lines and ends with the same summary.  ``ServerConfig(udp=True)`` serves datagrams instead
(:func:`msgsock.app.udp.run_udp_server`, SPEC §5.4).

Life of a run: bind (errors surface before the ready line), print the ready line
``listening on HOST:PORT (engine, frame)``, serve until SIGINT or SIGTERM, then shut
down gracefully (stop accepting, let every connection finish what it has received,
half-close, wait up to ``limits.shutdown_timeout``) and print the summary.

The ``processes`` engine (and ``native`` with ``workers``) runs under the supervisor of
:mod:`msgsock.app.processes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TextIO

from ..framing import DEFAULT_FORMAT, FrameFormat, Message
from ..protocol import DEFAULT_LIMITS, Limits, format_address
from ..serving import ServerStatistics
from ..udp import DEFAULT_MAX_SIZE as DEFAULT_UDP_MAX_SIZE
from ._signals import STOP_SIGNALS, run_until_stopped, stop_signals

if TYPE_CHECKING:
    from .. import aio

__all__ = [
    "ENGINES",
    "HANDLERS",
    "MAX_WORKERS",
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
        from .processes import Supervisor

        stats = Supervisor(config, out).run()
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
