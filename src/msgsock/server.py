"""The engines and handlers behind ``msgsock serve`` (SPEC §6.1).

An engine is one way of running the same server: ``asyncio`` (the default; uvloop
when installed) on :func:`msgsock.aio.serve`, and ``threads`` on
:class:`msgsock.sync.ThreadedServer` (one thread per connection: the MFCAsync
AsyncServer model).  Every engine takes the same :class:`ServerConfig`, keeps the same
limits, logs the same lines and ends with the same summary.

Life of a run: bind (errors surface before the ready line), print the ready line
``listening on HOST:PORT (engine, frame)``, serve until SIGINT or SIGTERM, then shut
down gracefully (stop accepting, let every connection finish what it has received,
half-close, wait up to ``limits.shutdown_timeout``) and print the summary.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ._net import format_address
from .framing import DEFAULT_FORMAT, FrameFormat, Message
from .protocol import DEFAULT_LIMITS, Limits, ServerStatistics

__all__ = ["ENGINES", "HANDLERS", "ServerConfig", "echo", "reverse", "run_server"]


def echo(message: bytes) -> bytes:
    """Return the message unchanged (with its header fields, if any)."""
    return message


def reverse(message: bytes) -> bytes:
    """Return the message reversed byte by byte (the MultiSoc server), keeping header fields."""
    if type(message) is Message:
        return Message(message[::-1], message.header)
    return message[::-1]


HANDLERS: dict[str, Callable[[bytes], bytes]] = {"echo": echo, "reverse": reverse}
ENGINES = ("asyncio", "threads")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``msgsock serve`` needs to run one server."""

    host: str = "127.0.0.1"
    port: int = 9898
    engine: str = "asyncio"
    handler: str = "echo"
    frame: FrameFormat = DEFAULT_FORMAT
    limits: Limits = field(default=DEFAULT_LIMITS)
    backlog: int = 1024


def _ready_line(config: ServerConfig, address: tuple[object, ...]) -> str:
    return f"listening on {format_address(address)} ({config.engine}, {config.frame})"


def run_server(config: ServerConfig, *, out: TextIO | None = None) -> ServerStatistics:
    """Run a server until SIGINT/SIGTERM, then drain it and return its statistics.

    The ready line and the summary are written to ``out`` (stdout by default).  Must be
    called from the main thread (it installs signal handlers).

    Raises:
        OSError: the address cannot be bound (in use, not local, unresolvable).
        ValueError: an unknown engine or handler name.
    """
    out = out or sys.stdout
    if config.handler not in HANDLERS:
        raise ValueError(f"unknown handler {config.handler!r}; choose from {', '.join(HANDLERS)}")
    if config.engine == "asyncio":
        stats = _run_asyncio(config, out)
    elif config.engine == "threads":
        stats = _run_threads(config, out)
    else:
        raise ValueError(f"unknown engine {config.engine!r}; choose from {', '.join(ENGINES)}")
    print(f"summary: {stats.summary()}", file=out, flush=True)
    return stats


def _run_asyncio(config: ServerConfig, out: TextIO) -> ServerStatistics:
    from . import aio

    async def main() -> ServerStatistics:
        server = await aio.serve(
            # None is aio's built-in echo, which echoes whole frames without re-encoding them.
            None if config.handler == "echo" else HANDLERS[config.handler],
            config.host,
            config.port,
            frame=config.frame,
            limits=config.limits,
            backlog=config.backlog,
        )
        print(_ready_line(config, server.addresses[0]), file=out, flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            server.close()
            await server.wait_closed()
        return server.statistics()

    return aio.run(main())


def _run_threads(config: ServerConfig, out: TextIO) -> ServerStatistics:
    from .sync import ThreadedServer

    server = ThreadedServer(
        HANDLERS[config.handler],
        config.host,
        config.port,
        frame=config.frame,
        limits=config.limits,
        backlog=config.backlog,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(_ready_line(config, server.address), file=out, flush=True)
        # Event.wait with a timeout so the main thread wakes to run the signal handler.
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return server.statistics()
