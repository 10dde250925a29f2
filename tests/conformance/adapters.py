"""Every msgsock server and client behind one small interface, for the conformance suite.

A :class:`ServerAdapter` starts one server on ``127.0.0.1:0`` and exposes its
``port``, a captured log (:class:`LogCapture`: a handler on the server's logger, or
the JSON log lines of a subprocess), ``statistics()`` and a graceful stop.  A
:class:`ClientAdapter` gives every client layer the same blocking ``send`` /
``receive`` / ``close`` / ``abort``.  :class:`RawPeer` is a plain socket speaking
frames, for the behaviours a well-behaved client cannot show (a slowloris, a reset, a
half-close, a flooder).

Layers are imported inside the adapters, not at the top: a layer that does not
import (it is being rewritten) fails its own tests only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import json
import logging
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from msgsock.exceptions import ConnectionClosed, ProtocolError, Timeout
from msgsock.framing import DEFAULT_FORMAT, FrameDecoder, FrameFormat
from msgsock.protocol import DEFAULT_LIMITS, Limits, format_address
from msgsock.serving import ServerStatistics
from tests.helpers import unit, wait_for

T = TypeVar("T")

Handler = Callable[[Any], Any]
"""A per-message handler as the tests write it (sync or async)."""

AUTH_KEY = b"conformance-suite-shared-key-0123456789"
"""The servers' shared key (SPEC §4.2)."""
WRONG_KEY = b"conformance-suite-WRONG-key-9876543210"

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
MSGSOCK = [sys.executable, "-m", "msgsock"]

_names = itertools.count()


def echo(message: Any) -> Any:
    """The echo handler (a :class:`~msgsock.framing.Message` keeps its header fields)."""
    return message


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic bytes, different for each ``seed``."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(256))
    reps, rest = divmod(size, 256)
    return block * reps + block[:rest]


# -- logs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    """One log record: its level, its message (a worker's ``worker N:`` prefix removed), its traceback."""

    level: int
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        tb = " (with traceback)" if self.traceback else ""
        return f"{logging.getLevelName(self.level)} {self.message}{tb}"


class LogCapture:
    """The log lines one server wrote, in order (thread-safe)."""

    def __init__(self) -> None:
        self._lines: list[LogLine] = []
        self._raw: list[str] = []
        self._lock = threading.Lock()

    def add(self, line: LogLine) -> None:
        with self._lock:
            self._lines.append(line)

    def add_raw(self, text: str) -> None:
        """A line of output that is not a log record (a crash's traceback)."""
        with self._lock:
            self._raw.append(text)

    def lines(self) -> list[LogLine]:
        with self._lock:
            return list(self._lines)

    def dump(self) -> str:
        """Everything captured, for assertion messages."""
        with self._lock:
            text = "\n".join(f"  {line}" for line in self._lines)
            if self._raw:
                text += "\n  other output:\n" + "".join(f"    {r}" for r in self._raw)
        return text or "  (nothing)"

    def find(self, message: str, level: int | None = None) -> list[LogLine]:
        """The lines whose message is exactly ``message`` (at ``level``, when given)."""
        return [ln for ln in self.lines() if ln.message == message and (level is None or ln.level == level)]

    def wait_line(self, message: str, level: int | None = None, timeout: float | None = None) -> LogLine:
        """Wait for a line whose message is exactly ``message`` (at ``level``) and return it."""
        found: list[LogLine] = []

        def seen() -> bool:
            found[:] = self.find(message, level)
            return bool(found)

        try:
            wait_for(seen, timeout if timeout is not None else unit(5))
        except AssertionError:
            want = f"{logging.getLevelName(level)} " if level is not None else ""
            raise AssertionError(
                f"no log line {want}{message!r}; the server logged:\n{self.dump()}"
            ) from None
        return found[0]

    def at_least(self, level: int) -> list[LogLine]:
        """The lines at ``level`` or above."""
        return [ln for ln in self.lines() if ln.level >= level]


class _CaptureHandler(logging.Handler):
    def __init__(self, capture: LogCapture) -> None:
        super().__init__(logging.DEBUG)
        self.capture = capture
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        tb = self._formatter.formatException(record.exc_info) if record.exc_info else None
        self.capture.add(LogLine(record.levelno, record.getMessage(), tb))


def captured_logger(capture: LogCapture) -> logging.Logger:
    """A fresh logger, at debug level, whose records go to ``capture`` only."""
    logger = logging.getLogger(f"msgsock.conformance.{next(_names)}")
    logger.handlers[:] = [_CaptureHandler(capture)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


# -- the summary line (SPEC §6.1), parsed back into statistics --------------------------------

_SUMMARY = re.compile(
    r"(?P<connections>\d+) connections \((?P<rejected>\d+) rejected(?:, (?P<health>\d+) health checks)?\), "
    r"(?P<min>\d+) messages in / (?P<mout>\d+) out(?: \((?P<discarded>\d+) discarded\))?, "
    r"(?P<bin>\d+) bytes in / (?P<bout>\d+) out, (?P<errors>\d+) errors(?: \((?P<kinds>.*)\))?$"
)


def parse_summary(text: str) -> ServerStatistics:
    """Read :meth:`ServerStatistics.summary` back (``active`` is not in it: 0).

    Raises:
        AssertionError: the line is not a summary.
    """
    match = _SUMMARY.fullmatch(text.strip())
    assert match is not None, f"not a summary line: {text!r}"
    kinds: dict[str, int] = {}
    if match["kinds"]:
        for part in match["kinds"].split(", "):
            count, _, kind = part.partition(" ")
            kinds[kind] = int(count)
    return ServerStatistics(
        messages_received=int(match["min"]),
        messages_sent=int(match["mout"]),
        bytes_received=int(match["bin"]),
        bytes_sent=int(match["bout"]),
        messages_discarded=int(match["discarded"] or 0),
        connections=int(match["connections"]),
        rejected=int(match["rejected"]),
        errors=int(match["errors"]),
        error_kinds=kinds,
        health_checks=int(match["health"] or 0),
    )


# -- an event loop on a thread ----------------------------------------------------------------


class LoopThread:
    """A stock asyncio event loop running on its own thread, for the aio server and client."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (at most ``timeout``, default unit(20))."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout if timeout is not None else unit(20))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on the loop thread and return what it returned."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return done.result(unit(20))

    def close(self) -> None:
        """Cancel what still runs, stop the loop and end the thread."""
        if self.loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=unit(2))

        with contextlib.suppress(Exception):
            self.run(cancel_all(), unit(5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(unit(5))
        if not self._thread.is_alive():
            self.loop.close()


# -- servers ----------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    """What a test asks of a server (every adapter expresses it its own way, or skips)."""

    handler: Handler | None = None
    frame: FrameFormat = DEFAULT_FORMAT
    limits: Limits = DEFAULT_LIMITS
    tls: bool = False
    auth_key: bytes | None = None
    proxy_protocol: bool = False
    needs: frozenset[str] = frozenset()
    pki: Any = None  # tests.certs.Pki, when tls
    tmp_path: Path | None = None

    def library_kwargs(self, logger: logging.Logger) -> dict[str, Any]:
        """The keyword arguments every in-process server takes."""
        kwargs: dict[str, Any] = {"frame": self.frame, "limits": self.limits, "logger": logger}
        if self.tls:
            kwargs["ssl"] = self.pki.server_context()
        if self.auth_key is not None:
            kwargs["auth_key"] = self.auth_key
        if self.proxy_protocol:
            kwargs["proxy_protocol"] = True
        return kwargs


class ServerAdapter:
    """One running server, as the behaviours see it.

    Capabilities (``needs`` of a test; an adapter without one skips the test):
    ``handler`` (a Python handler), ``reply_check`` (the server itself checks what a
    per-message handler returns), ``async_handler`` (it awaits a handler's
    coroutine), ``live_statistics`` (counters while it runs),
    ``connection_limit`` (one ``max_connections`` for the whole server).
    """

    kind: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"handler", "reply_check", "live_statistics", "connection_limit"}
    )

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.log = LogCapture()
        self.port = 0
        self._stopper: threading.Thread | None = None
        self._stop_error: BaseException | None = None
        self._stopped = False

    @classmethod
    def check(cls, options: ServerOptions) -> None:
        """Skip the test when this server cannot express ``options``."""
        needs = set(options.needs)
        if options.handler is not None:
            needs.add("handler")
        missing = sorted(needs - cls.capabilities)
        if missing:
            pytest.skip(f"the {cls.kind} server has no {' and no '.join(missing)}")

    @property
    def handler(self) -> Handler:
        return self.options.handler if self.options.handler is not None else echo

    def start(self) -> None:
        raise NotImplementedError

    def statistics(self) -> ServerStatistics:
        raise NotImplementedError

    def _stop(self) -> None:
        """Stop gracefully and return when done (blocking)."""
        raise NotImplementedError

    def begin_stop(self) -> None:
        """Begin the graceful shutdown (returns at once)."""
        if self._stopper is not None:
            return

        def stop() -> None:
            try:
                self._stop()
            except BaseException as exc:
                self._stop_error = exc

        self._stopper = threading.Thread(target=stop, name=f"stop-{self.kind}", daemon=True)
        self._stopper.start()

    def wait_stopped(self, timeout: float | None = None) -> None:
        """Wait for the shutdown :meth:`begin_stop` began to finish."""
        assert self._stopper is not None, "begin_stop() first"
        self._stopper.join(timeout if timeout is not None else unit(20))
        assert not self._stopper.is_alive(), (
            f"the {self.kind} server did not stop; it logged:\n{self.log.dump()}"
        )
        self._stopped = True
        if self._stop_error is not None:
            raise self._stop_error

    def stop(self) -> None:
        """Stop gracefully (idempotent)."""
        self.begin_stop()
        self.wait_stopped()

    def final_statistics(self) -> ServerStatistics:
        """Stop, then return the counters of the whole run (the summary's numbers)."""
        self.stop()
        return self.statistics()

    def close(self) -> None:
        """Clean up whatever state the server is in (teardown)."""
        with contextlib.suppress(BaseException):
            self.stop()


class AioServer(ServerAdapter):
    """``msgsock.aio.serve(handler, ...)`` on a loop thread: a per-message handler."""

    kind = "aio"
    capabilities = ServerAdapter.capabilities | {"async_handler"}

    def start(self) -> None:
        from msgsock import aio

        self.loop = LoopThread(f"aio-server-{next(_names)}")
        kwargs = self.options.library_kwargs(captured_logger(self.log))
        # None: aio's built-in echo, the path the CLI takes (SPEC §8).
        self.server = self.loop.run(self._serve(aio, kwargs))
        self.port = int(self.server.port)

    async def _serve(self, aio: Any, kwargs: dict[str, Any]) -> Any:
        return await aio.serve(self.options.handler, "127.0.0.1", 0, **kwargs)

    def statistics(self) -> ServerStatistics:
        stats: ServerStatistics = self.loop.call(self.server.statistics)
        return stats

    def _stop(self) -> None:
        self.loop.call(self.server.close)
        self.loop.run(self.server.wait_closed(), unit(20))

    def close(self) -> None:
        super().close()
        self.loop.close()


def connection_handler_for(handler: Handler | None) -> Callable[[Any], Awaitable[None]]:
    """A ``connection_handler`` that serves every message with ``handler`` (echo when None)."""

    async def serve(conn: Any) -> None:
        async for message in conn:
            reply = message if handler is None else handler(message)
            if inspect.isawaitable(reply):
                reply = await reply
            if reply is not None:
                await conn.send(reply)

    return serve


class AioConnServer(AioServer):
    """``msgsock.aio.serve(connection_handler=...)``: the handler owns the connection."""

    kind = "aio-conn"
    capabilities = (AioServer.capabilities - {"reply_check"}) | {"async_handler"}

    async def _serve(self, aio: Any, kwargs: dict[str, Any]) -> Any:
        return await aio.serve(
            None, "127.0.0.1", 0, connection_handler=connection_handler_for(self.options.handler), **kwargs
        )


class ThreadsServer(ServerAdapter):
    """``msgsock.sync.ThreadedServer``: one thread per connection."""

    kind = "threads"

    def start(self) -> None:
        from msgsock.sync import ThreadedServer

        kwargs = self.options.library_kwargs(captured_logger(self.log))
        self.server = ThreadedServer(self.handler, "127.0.0.1", 0, **kwargs)
        self.server.start()
        self.port = int(self.server.port)

    def statistics(self) -> ServerStatistics:
        stats: ServerStatistics = self.server.statistics()
        return stats

    def _stop(self) -> None:
        self.server.shutdown()


class CallbackServer(ServerAdapter):
    """``msgsock.callback.MessageServer`` on a ``Reactor`` of its own."""

    kind = "callback"

    def start(self) -> None:
        from msgsock.callback import MessageServer, Reactor

        self.reactor = Reactor(name=f"conformance-reactor-{next(_names)}").start()
        kwargs = self.options.library_kwargs(captured_logger(self.log))
        # None: the callback server's built-in echo.
        self.server = MessageServer(self.reactor, self.options.handler, "127.0.0.1", 0, **kwargs)
        self.server.start()
        self.port = int(self.server.port)

    def statistics(self) -> ServerStatistics:
        return self.server.statistics()

    def _stop(self) -> None:
        self.server.close()
        assert self.server.wait_closed(unit(20)), "MessageServer.wait_closed() timed out"

    def close(self) -> None:
        super().close()
        reactor = getattr(self, "reactor", None)
        if reactor is not None:
            with contextlib.suppress(Exception):
                reactor.stop(timeout=unit(5))


_CLI_LIMITS = ("idle_timeout", "message_timeout", "handshake_timeout", "shutdown_timeout", "max_connections")


def _seconds(value: float | None) -> str:
    return "0" if value is None else f"{value:g}"


class ProcessesServer(ServerAdapter):
    """``msgsock serve --engine processes --workers 2`` in a subprocess: only what its flags express."""

    kind = "processes"
    capabilities = frozenset()

    @classmethod
    def check(cls, options: ServerOptions) -> None:
        super().check(options)
        for f in fields(Limits):
            if f.name not in _CLI_LIMITS and getattr(options.limits, f.name) != getattr(
                DEFAULT_LIMITS, f.name
            ):
                pytest.skip(f"processes server: --{f.name.replace('_', '-')} is not a command-line option")

    def start(self) -> None:
        opts = self.options
        frame, limits = opts.frame, opts.limits
        args = [
            *MSGSOCK,
            "serve",
            "--engine",
            "processes",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "debug",
            "--json",
            "--frame",
            str(frame),
            "--idle-timeout",
            _seconds(limits.idle_timeout),
            "--message-timeout",
            _seconds(limits.message_timeout),
            "--handshake-timeout",
            _seconds(limits.handshake_timeout),
            "--shutdown-timeout",
            _seconds(limits.shutdown_timeout),
            "--max-connections",
            str(limits.max_connections),
        ]
        if frame.max_size is not None:
            args += ["--max-size", str(frame.max_size)]
        if opts.tls:
            args += ["--tls-cert", str(opts.pki.server_cert), "--tls-key", str(opts.pki.server_key)]
        if opts.auth_key is not None:
            assert opts.tmp_path is not None
            key_file = opts.tmp_path / f"auth-{next(_names)}.key"
            key_file.write_bytes(opts.auth_key + b"\n")
            args += ["--auth-key-file", str(key_file)]
        if opts.proxy_protocol:
            args.append("--proxy-protocol")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        try:
            ready = self.stdout.get(timeout=unit(30))
        except queue.Empty:
            ready = None
        if ready is None or not ready.startswith("listening on "):
            self._kill()
            raise AssertionError(f"msgsock serve did not start: {ready!r}\n{self.log.dump()}")
        self.ready = ready.strip()
        self.port = int(self.ready.split()[2].rsplit(":", 1)[1])

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.stdout.put(line)
        self.stdout.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or "message" not in entry:
                self.log.add_raw(line)
                continue
            level = logging.getLevelName(str(entry.get("level", "info")).upper())
            message = re.sub(r"^worker \d+: ", "", str(entry["message"]))
            self.log.add(LogLine(level if isinstance(level, int) else 0, message, entry.get("exception")))

    def statistics(self) -> ServerStatistics:
        assert self._stopped, "the processes engine reports its counters only in its summary (stop first)"
        summaries = [line for line in self.output if line.startswith("summary: ")]
        assert summaries, f"no summary line; stdout: {self.output!r}\n{self.log.dump()}"
        return parse_summary(summaries[-1][len("summary: ") :])

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=unit(20))
        except subprocess.TimeoutExpired:
            self._kill()
            raise AssertionError(f"msgsock serve did not stop on SIGTERM\n{self.log.dump()}") from None
        for reader in self._readers:
            reader.join(unit(5))
        assert code == 0, f"msgsock serve exited {code}\n{self.log.dump()}"

    def _kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.proc.wait(unit(10))

    def close(self) -> None:
        super().close()
        self._kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


class NativeServer(ServerAdapter):
    """``msgsock.native.serve(handler, ...)`` on a thread of its own: the C event loop (epoll backend).

    TLS, authentication and the PROXY protocol are the asyncio engine's: skipped.  The
    built-in echo runs natively when the test gives no handler (the CLI's path).
    """

    kind = "native"
    backend = "epoll"

    @classmethod
    def check(cls, options: ServerOptions) -> None:
        from msgsock import native

        reason = native.unavailable_reason()
        if reason is not None:
            pytest.skip(f"native engine: {reason}")
        for name, on in (("TLS", options.tls), ("auth", options.auth_key), ("PROXY", options.proxy_protocol)):
            if on:
                pytest.skip(f"native engine: {name} is served by the asyncio engine only")
        super().check(options)

    def start(self) -> None:
        from msgsock import native

        kwargs = self.options.library_kwargs(captured_logger(self.log))
        self.server = native.serve(self.options.handler, "127.0.0.1", 0, backend=self.backend, **kwargs)
        self.port = int(self.server.port)
        self._thread = threading.Thread(
            target=self.server.serve_forever, name=f"native-server-{next(_names)}", daemon=True
        )
        self._thread.start()

    def statistics(self) -> ServerStatistics:
        stats: ServerStatistics = self.server.statistics()
        return stats

    def _stop(self) -> None:
        self.server.close()
        assert self.server.wait_closed(unit(20)), "NativeServer.serve_forever() did not return"
        self._thread.join(unit(5))


class NativeUringServer(NativeServer):
    """The native engine on its io_uring backend (skipped where the kernel refuses io_uring)."""

    kind = "native-uring"
    backend = "io_uring"

    @classmethod
    def check(cls, options: ServerOptions) -> None:
        super().check(options)
        from msgsock import native

        with native.serve(None, "127.0.0.1", 0, backend="io_uring") as probe:
            if probe.backend != "io_uring":
                pytest.skip("native engine: io_uring is not available here (epoll is used instead)")

    def start(self) -> None:
        super().start()
        assert self.server.backend == "io_uring"


SERVERS: dict[str, type[ServerAdapter]] = {
    cls.kind: cls
    for cls in (
        AioServer,
        AioConnServer,
        ThreadsServer,
        ProcessesServer,
        CallbackServer,
        NativeServer,
        NativeUringServer,
    )
}


# -- clients ----------------------------------------------------------------------------------


@dataclass
class ClientOptions:
    """What a test asks of a client."""

    frame: FrameFormat = DEFAULT_FORMAT
    tls: bool = False
    auth_key: bytes | None = None
    pki: Any = None

    def ssl_context(self) -> Any:
        return self.pki.client_context() if self.tls else None


class ClientAdapter:
    """One connected client, with a blocking interface whatever its layer.

    ``receive`` raises :class:`~msgsock.exceptions.ConnectionClosed` (with the core's
    ``kind``) once the connection has ended, and :class:`TimeoutError` when nothing
    came within ``timeout``.  ``queue_all`` (clients whose send never waits) queues
    every message at once, before anything is read.
    """

    kind: ClassVar[str]
    queues_without_waiting: ClassVar[bool] = False
    _done = False

    def send(self, message: bytes, header: Mapping[str, int] | None = None) -> None:
        raise NotImplementedError

    def receive(self, timeout: float) -> Any:
        raise NotImplementedError

    def queue_all(self, messages: Iterable[bytes]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close gracefully (flush, half-close, wait for the peer's EOF)."""
        if not self._done:
            self._done = True
            self._close()

    def abort(self) -> None:
        """Reset the connection (teardown); nothing once closed."""
        if not self._done:
            self._done = True
            self._abort()

    def _close(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    @property
    def local_address(self) -> str:
        """This end's address as the server logs it (``127.0.0.1:PORT``)."""
        raise NotImplementedError


class SyncClient(ClientAdapter):
    kind = "sync"

    def __init__(self, port: int, options: ClientOptions) -> None:
        from msgsock import sync

        kwargs: dict[str, Any] = {"frame": options.frame, "connect_timeout": unit(10)}
        if options.tls:
            kwargs["ssl"] = options.ssl_context()
        if options.auth_key is not None:
            kwargs["auth_key"] = options.auth_key
        self.conn = sync.connect("127.0.0.1", port, **kwargs)
        self._address = format_address(self.conn.local_address)

    def send(self, message: bytes, header: Mapping[str, int] | None = None) -> None:
        self.conn.send(message, header)

    def receive(self, timeout: float) -> Any:
        return self.conn.receive(timeout=timeout)

    def _close(self) -> None:
        self.conn.close(timeout=unit(5))

    def _abort(self) -> None:
        self.conn.abort()

    @property
    def local_address(self) -> str:
        return self._address


class AioClient(ClientAdapter):
    kind = "aio"
    queues_without_waiting = True

    def __init__(self, port: int, options: ClientOptions) -> None:
        from msgsock import aio

        self.loop = LoopThread(f"aio-client-{next(_names)}")
        kwargs: dict[str, Any] = {"frame": options.frame, "connect_timeout": unit(10)}
        if options.tls:
            kwargs["ssl"] = options.ssl_context()
        if options.auth_key is not None:
            kwargs["auth_key"] = options.auth_key
        try:
            self.conn = self.loop.run(aio.connect("127.0.0.1", port, **kwargs))
        except BaseException:
            self.loop.close()
            raise
        self._address = format_address(self.conn.local_address)

    def send(self, message: bytes, header: Mapping[str, int] | None = None) -> None:
        self.loop.run(self.conn.send(message, header), unit(30))

    def receive(self, timeout: float) -> Any:
        async def receive() -> Any:
            return await asyncio.wait_for(self.conn.receive(), timeout)

        return self.loop.run(receive(), timeout + unit(5))

    def queue_all(self, messages: Iterable[bytes]) -> None:
        def queue() -> None:
            for message in messages:
                self.conn.send_nowait(message)

        self.loop.call(queue)

    def _close(self) -> None:
        try:
            self.loop.run(self.conn.close(unit(5)), unit(10))
        finally:
            self.loop.close()

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.call(self.conn.abort)
        self.loop.close()

    @property
    def local_address(self) -> str:
        return self._address


_callback_socket_class: type[Any] | None = None


def _callback_socket() -> type[Any]:
    """The MessageSocket subclass of the callback client (made on first use: the import may fail)."""
    global _callback_socket_class
    if _callback_socket_class is None:
        from msgsock.callback import MessageSocket

        class Recorder(MessageSocket):
            record: queue.Queue[tuple[str, Any]]

            def on_connect(self, error: int) -> None:
                self.record.put(("connect", error))

            def on_message(self, message: bytes) -> None:
                self.record.put(("message", message))

            def on_close(self, error: int) -> None:
                self.record.put(("close", error))

        _callback_socket_class = Recorder
    return _callback_socket_class


class CallbackClient(ClientAdapter):
    """A ``MessageSocket`` client on its own ``Reactor``; callbacks feed a queue the test reads."""

    kind = "callback"
    queues_without_waiting = True

    def __init__(self, port: int, options: ClientOptions) -> None:
        from msgsock.callback import Reactor

        self.reactor = Reactor(name=f"conformance-client-{next(_names)}").start()
        try:
            kwargs: dict[str, Any] = {}
            if options.tls:
                kwargs["ssl"] = options.ssl_context()
            if options.auth_key is not None:
                kwargs["auth_key"] = options.auth_key
            sock = _callback_socket()(self.reactor, options.frame, **kwargs)
            sock.record = queue.Queue()
            self.sock = sock
            self._end: ConnectionClosed | None = None
            sock.create()
            sock.connect("127.0.0.1", port)
            kind, error = sock.record.get(timeout=unit(10))
            assert kind == "connect", f"the first callback was on_{kind}({error}), not on_connect"
            if error:
                if isinstance(sock.error, BaseException):
                    raise sock.error  # the core's end (ConnectionClosed with its kind)
                raise ConnectionError(error, f"on_connect({error}) without an error")
            name = sock.sock_name  # a property (it was a method before the lifecycle work)
            self._address = format_address(name() if callable(name) else name)
        except BaseException:
            self.reactor.stop(timeout=unit(5))
            raise

    def send(self, message: bytes, header: Mapping[str, int] | None = None) -> None:
        self.sock.send_message(message, header)

    def queue_all(self, messages: Iterable[bytes]) -> None:
        for message in messages:
            self.sock.send_message(message)

    def receive(self, timeout: float) -> Any:
        if self._end is not None:
            raise self._end
        try:
            kind, value = self.sock.record.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout:g} s") from None
        if kind == "message":
            return value
        assert kind == "close", f"unexpected callback on_{kind}({value})"
        # Rule 7: the application's error comes from the core, with its kind.  The peer's
        # EOF is on_close(0) before the end is final (FD_CLOSE; the socket stays open for
        # our replies): the core's closed_error() words that one.
        proto = self.sock.protocol
        assert proto.end is not None or proto.eof_received, f"on_close({value}) but the core saw no end"
        self._end = proto.end.exception() if proto.end is not None else proto.closed_error()
        raise self._end

    def _close(self) -> None:
        try:
            self.sock.close()
            assert self.sock.wait_closed(unit(10)), "MessageSocket.close() did not finish"
        finally:
            self.reactor.stop(timeout=unit(5))

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.abort()
            self.sock.wait_closed(unit(5))
        with contextlib.suppress(Exception):
            self.reactor.stop(timeout=unit(5))

    @property
    def local_address(self) -> str:
        return self._address


CLIENTS: dict[str, Callable[[int, ClientOptions], ClientAdapter]] = {
    "sync": SyncClient,
    "aio": AioClient,
    "callback": CallbackClient,
}
CLIENT_QUEUES_WITHOUT_WAITING = {
    kind: bool(getattr(cls, "queues_without_waiting", False)) for kind, cls in CLIENTS.items()
}


# -- the stress command -------------------------------------------------------------------------


def run_stress(port: int, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``msgsock stress 127.0.0.1 --port PORT ARGS --json -q``; return (exit status, report, stderr)."""
    proc = subprocess.run(
        [*MSGSOCK, "stress", "127.0.0.1", "--port", str(port), *args, "--json", "-q"],
        capture_output=True,
        text=True,
        env=ENV,
        stdin=subprocess.DEVNULL,
        timeout=unit(60),
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"stress printed no JSON report (exit {proc.returncode}): {proc.stderr}"
        ) from None
    return proc.returncode, report, proc.stderr


# -- a plain socket that speaks frames ----------------------------------------------------------


LINGER_RESET = struct.pack("ii", 1, 0)


class RawPeer:
    """A blocking socket to a server, with a frame codec: for peers no msgsock client would be."""

    def __init__(self, port: int, frame: FrameFormat = DEFAULT_FORMAT, *, rcvbuf: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._reset_at_connect = False
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind(("127.0.0.1", 0))  # our address is known even if the server resets at once
            self.address = format_address(sock.getsockname())
            """This end as the server logs it."""
            sock.settimeout(unit(10))
            try:
                sock.connect(("127.0.0.1", port))
            except ConnectionResetError:
                # Accepted and reset before connect() returned (a rejection): the reset is
                # what this peer sees, as its first read will say.
                self._reset_at_connect = True
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.frame = frame
        self._decoder = FrameDecoder(frame)
        self._messages: deque[Any] = deque()
        self.closed = False

    def send(self, body: bytes, header: Mapping[str, int] | None = None) -> None:
        self.sock.sendall(self.frame.encode(body, header))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, timeout: float | None) -> bytes:
        if self._reset_at_connect:
            raise ConnectionResetError("reset while connecting")
        self.sock.settimeout(timeout if timeout is not None else unit(10))
        try:
            return self.sock.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(f"nothing from the server within {self.sock.gettimeout():g} s") from None

    def receive(self, timeout: float | None = None) -> Any:
        """The next message.

        Raises:
            EOFError: the server closed the connection instead.
            ConnectionResetError: the server reset it.
        """
        while not self._messages:
            data = self._recv(timeout)
            if not data:
                raise EOFError("the server closed the connection")
            self._messages.extend(self._decoder.feed(data))
        return self._messages.popleft()

    def read_to_end(self, timeout: float | None = None) -> tuple[list[Any], str]:
        """Read every message until the connection ends; return them and how it ended: ``eof`` or ``reset``."""
        messages = list(self._messages)
        self._messages.clear()
        while True:
            try:
                data = self._recv(timeout)
            except ConnectionResetError:
                return messages, "reset"
            if not data:
                return messages, "eof"
            try:
                messages.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                raise AssertionError(f"the server sent bytes that are not frames: {exc}") from None

    def drain_to_end(self, timeout: float | None = None) -> tuple[bytes, str]:
        """Read raw bytes until the connection ends; return them and ``eof`` or ``reset``."""
        data = bytearray()
        while True:
            try:
                chunk = self._recv(timeout)
            except ConnectionResetError:
                return bytes(data), "reset"
            if not chunk:
                return bytes(data), "eof"
            data += chunk

    def shutdown_write(self) -> None:
        """Half-close: our EOF, reading goes on."""
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a reset (``SO_LINGER`` 0)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.sock.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


@dataclass
class Cleanup:
    """Teardown in reverse order of setup (clients before their servers), every step even if one fails."""

    steps: list[Callable[[], object]] = field(default_factory=list)

    def add(self, step: Callable[[], object]) -> None:
        self.steps.append(step)

    def run(self) -> None:
        errors: list[BaseException] = []
        while self.steps:
            step = self.steps.pop()
            try:
                step()
            except BaseException as exc:  # every server must be stopped, whatever failed before
                errors.append(exc)
        if errors:
            raise errors[0]


__all__ = [
    "AUTH_KEY",
    "CLIENTS",
    "SERVERS",
    "WRONG_KEY",
    "Cleanup",
    "ClientAdapter",
    "ClientOptions",
    "LogCapture",
    "LogLine",
    "RawPeer",
    "ServerAdapter",
    "ServerOptions",
    "Timeout",
    "echo",
    "parse_summary",
    "payload",
    "run_stress",
]
