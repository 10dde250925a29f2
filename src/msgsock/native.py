"""The native engine: framed TCP served by a C event loop (``msgsock._engine``), decided by the core.

Theory of operation (SPEC §5.0, §7, §8).  A :class:`NativeServer` owns one
:class:`~msgsock.serving.ServerProtocol` -- admission, every log line, the counters,
the timeouts and the shutdown are decided there, as in every other engine -- and one
``msgsock._engine.Loop``, which owns the sockets and moves the bytes.  The loop calls
back into Python per *connection event*, never per message for the built-in handlers:

- **accept**: :meth:`ServerProtocol.accept` gives the connection's
  :class:`~msgsock.protocol.MessageProtocol` (or rejects it: the loop resets the
  socket);
- **the hot path** stays in C: each read is framed there (the frame scanner of
  ``frame.h``, with the decoder's error semantics), the built-in echo sends the
  complete frames back as one span, ``reverse`` reverses each body (header fields
  kept), and a Python handler is called once per message with its body as ``bytes``
  and its reply checked like :func:`~msgsock.protocol.check_reply` does.  The
  messages and bytes each way are counted in C and written into the protocol's
  :class:`~msgsock.protocol.Statistics` at every sweep, so the core's idle timeout
  sees the activity; the message-completion timeout is checked by the loop at the
  same sweep, with the core's rule and wording
  (:meth:`~msgsock.protocol.MessageProtocol.fail_message_timeout`);
- **anything else** -- the peer's EOF, a bad header, a timeout, the shutdown, a
  handler error, a socket error -- hands the connection over to the core: the loop
  writes its counters into the protocol and gives it the bytes it has not framed (a
  partial frame, or the bad header and what follows it) through
  :meth:`~msgsock.protocol.MessageProtocol.receive_data`, so the core words a bad
  header or a frame cut short itself.  From then on every read goes to the protocol
  and the loop does what the protocol says (:meth:`NativeServer._act`, the pump rules
  of :mod:`msgsock.protocol`): write its output, pause reading, half-close, close or
  reset.  Frame formats whose messages carry header fields and a Python handler are
  served this way from the start (the handler gets a
  :class:`~msgsock.framing.Message`, as everywhere).

Time: one sweep every :attr:`ServerProtocol.sweep_interval`; the loop's ``run`` returns
when it is due.  Stopping (:meth:`NativeServer.close`, safe from a signal handler or
another thread) writes to a wake-up socket the loop watches; :meth:`serve_forever`
then stops accepting, hands every connection to the core and calls
:meth:`ServerProtocol.begin_shutdown` (each connection finishes what it received,
half-closes, waits for its peer; the sweep resets what is left at
``limits.shutdown_timeout``), and returns once every connection is gone.

TLS, shared-key authentication and the PROXY protocol are not served here (the
asyncio engine serves them); nor is UDP.  :func:`available` says whether the
extension is built (and not disabled with ``MSGSOCK_NO_EXTENSIONS=1``; see
:mod:`msgsock.extensions`).

Backends: ``epoll``; ``io_uring`` where the kernel allows (multishot receive into a
ring of provided buffers, batched sends, and eight accepts in flight per listening
socket -- single-shot, not multishot, because a multishot accept does not report each
peer's address, and a connection reset at once has none left to ask for), falling back
to epoll.  Choose with
``backend=`` or the environment variable ``MSGSOCK_NATIVE_BACKEND``
(``epoll`` | ``io_uring``); :attr:`NativeServer.backend` says which runs.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeAlias

from ._net import check_callable, check_port, server_logger
from .exceptions import OversizeMessage
from .framing import DEFAULT_FORMAT, FrameFormat, Message
from .protocol import DEFAULT_LIMITS, Action, Limits, MessageProtocol, State, check_reply, format_address
from .serving import ServerProtocol, ServerStatistics

__all__ = ["BACKENDS", "BUILTINS", "Handler", "NativeServer", "available", "serve", "unavailable_reason"]

Handler: TypeAlias = Callable[[Any], bytes | bytearray | memoryview | None]
"""A per-message handler: takes a message (``bytes``, or a :class:`~msgsock.framing.Message`
when the frame format has header fields), returns the reply or None for no reply."""

BACKENDS = ("epoll", "io_uring")
"""The event-loop backends of the native engine."""

BUILTINS = ("echo", "reverse")
"""The handlers the engine runs natively, named by a string."""

_OPEN = State.OPEN
_CLOSED = State.CLOSED
_ABORT = Action.ABORT
_CLOSE = Action.CLOSE


def _engine() -> ModuleType | None:
    from . import extensions  # the one place that loads the extensions and honours the switch

    module: ModuleType | None = extensions.engine
    return module


def unavailable_reason() -> str | None:
    """Why the native engine cannot run here (None when it can).

    The extension is found (or not) by :mod:`msgsock.extensions`, which also reads
    ``MSGSOCK_NO_EXTENSIONS`` (once, when msgsock is first imported).
    """
    from . import extensions

    if extensions.DISABLED:
        return "MSGSOCK_NO_EXTENSIONS=1 disables the compiled extensions"
    if extensions.engine is None:
        return f"the extension msgsock._engine is not built ({extensions.reason('engine')})"
    return None


def available() -> bool:
    """True when the native engine can run (the extension is built and not disabled)."""
    return unavailable_reason() is None


def _reverse(message: Any) -> Any:
    if type(message) is Message:
        return Message(message[::-1], message.header)
    return message[::-1]


def _echo(message: Any) -> Any:
    return message


def _bind(host: str | None, port: int, *, reuse_port: bool, backlog: int) -> list[socket.socket]:
    """One listening socket per address of ``host`` (all on one port), as asyncio binds.

    Raises:
        OSError: an address cannot be resolved or bound.
    """
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, type_, proto, _name, address in infos:
            if family not in (socket.AF_INET, socket.AF_INET6) or (family, address) in seen:
                continue
            seen.add((family, address))
            if socks and port == 0:  # port 0: every address on the port the first one got
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(errno.EADDRNOTAVAIL, f"no IPv4 or IPv6 address for {host!r}")
    return socks


class NativeServer:
    """A framed TCP server on the native event loop (see the module's theory of operation).

    Made by :func:`serve` (bound and listening); :meth:`serve_forever` runs it in the
    calling thread until :meth:`close`, then drains.

    Args:
        handler: None or ``"echo"``, ``"reverse"``, or a per-message function.
        sockets: the listening sockets (non-blocking); the server closes them.
        frame: the frame format of every connection.
        limits: the limits in force.
        logger: where to log.
        backend: ``"epoll"`` or ``"io_uring"``; None: see :func:`serve`.

    Raises:
        RuntimeError: the extension is not available.
        TypeError: a bad ``handler``.
        ValueError: an unknown backend.

    Attributes:
        frame: the frame format of every connection.
        limits: the limits in force (SPEC §7).
        logger: where connections, disconnections and errors are logged.
    """

    def __init__(
        self,
        handler: Handler | str | None,
        sockets: list[socket.socket],
        *,
        frame: FrameFormat,
        limits: Limits,
        logger: logging.Logger,
        backend: str | None = None,
    ) -> None:
        engine = _engine()
        if engine is None:
            raise RuntimeError(f"the native engine is not available: {unavailable_reason()}")
        self.frame = frame
        self.limits = limits
        self.logger = logger
        self._sockets = sockets
        self._addresses = [s.getsockname() for s in sockets]
        self._lock = threading.Lock()
        self._protocol = ServerProtocol(frame, limits, log=logger.log, lock=self._lock)
        self._handler: Callable[[Any], Any]
        if handler is None or handler == "echo":
            mode, self._handler = engine.MODE_ECHO, _echo
        elif handler == "reverse":
            mode, self._handler = engine.MODE_REVERSE, _reverse
        elif callable(handler):
            mode, self._handler = engine.MODE_HANDLER, handler
        else:
            raise TypeError(f"handler must be callable, 'echo', 'reverse' or None, got {handler!r}")
        self._builtin = mode != engine.MODE_HANDLER
        # A handler must see Message objects when frames carry header fields: those
        # connections are framed by the core from the start.
        python_frames = not self._builtin and bool(frame.field_names)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ev = engine
        self._loop = engine.Loop(
            server=self,
            listen_fds=[s.fileno() for s in sockets],
            wake_fd=self._wake_r.fileno(),
            mode=mode,
            handler=self._handler,
            frame=_descriptor(frame),
            high_water=limits.write_high_water,
            low_water=limits.write_low_water,
            python_frames=python_frames,
            check_reply=check_reply,
            oversize=OversizeMessage,
            backend=_backend_choice(backend),
        )
        self._stop = False
        self._running = False
        self._done = threading.Event()
        self._message_timeout = limits.message_timeout or 0.0

    # -- information --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The loop's backend: ``epoll`` or ``io_uring``."""
        return str(self._loop.backend)

    @property
    def addresses(self) -> list[Any]:
        """The listening addresses, e.g. ``[("127.0.0.1", 9898)]``."""
        return list(self._addresses)

    @property
    def port(self) -> int:
        """The listening port (the real one when port 0 was asked for)."""
        addresses = self.addresses
        return int(addresses[0][1]) if addresses else 0

    def statistics(self) -> ServerStatistics:
        """Counters so far (safe from another thread): connections, errors by kind, messages, bytes."""
        self._loop.sync()
        return self._protocol.statistics()

    def summary(self) -> str:
        """The shutdown summary line (SPEC §6.1)."""
        return self.statistics().summary()

    def __repr__(self) -> str:
        where = ", ".join(format_address(a) for a in self.addresses)
        return f"<NativeServer {where} {self.backend} {len(self._protocol.connections)} connections>"

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> NativeServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        if not self._running:
            self._release()

    def close(self) -> None:
        """Ask for a graceful shutdown: safe from a signal handler and from any thread.

        :meth:`serve_forever` then stops accepting, lets every connection finish what it
        received (within ``limits.shutdown_timeout``) and returns.
        """
        self._stop = True
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the buffer is full (a wake-up is pending) or we are closed
            pass

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`serve_forever` has returned; False on timeout."""
        return self._done.wait(timeout)

    def serve_forever(self) -> ServerStatistics:
        """Serve in this thread until :meth:`close`, then shut down gracefully.

        Returns:
            The final statistics.

        Raises:
            RuntimeError: it is already running (or has run).
        """
        if self._running or self._done.is_set():
            raise RuntimeError("serve_forever() runs once")
        self._running = True
        sp = self._protocol
        loop = self._loop
        interval = sp.sweep_interval
        try:
            next_sweep = time.monotonic() + interval
            while True:
                if self._stop and not sp.closing:
                    self._begin_shutdown()
                if sp.all_closed:
                    break
                loop.run(max(0.0, next_sweep - time.monotonic()))
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + interval
        finally:
            self._release()
            self._done.set()
        return self.statistics()

    def _release(self) -> None:
        self._loop.release()  # resets what is still open; drops the loop's references to us
        for sock in self._sockets:
            sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def _begin_shutdown(self) -> None:
        loop = self._loop
        loop.stop_accepting()
        for sock in self._sockets:
            sock.close()
        loop.handover_all()  # the core decides every close from here on
        for proto in self._protocol.begin_shutdown(time.monotonic()):
            self._act(proto)

    def _sweep(self, now: float) -> None:
        # One pass over all connections (SPEC §7): the loop's counters and message
        # timeouts first, then the core's idle, close and shutdown-deadline decisions.
        sp = self._protocol
        self._loop.sweep(now, self._message_timeout)
        for proto in sp.check_timeouts(now):
            self._act(proto)
        deadline = sp.deadline
        if deadline is not None and now >= deadline:
            # Every end is decided by now; a socket still open cannot flush: reset it.
            for proto in list(sp.connections):
                if proto.state is _CLOSED and proto.pump is not None:
                    self._loop.abort(proto.pump)

    # -- what the loop calls ------------------------------------------------------------

    def _accepted(self, peer: Any, now: float) -> MessageProtocol | None:
        proto = self._protocol.accept(peer, now)
        if proto.state is _CLOSED:
            return None  # rejected (logged and counted) or closed on arrival: the loop resets it
        return proto

    def _event(self, proto: MessageProtocol, code: int, partial: bytes | None, arg: Any) -> None:
        ev = self._ev
        if partial:
            # The connection leaves the hot path: the core frames what the loop held.
            proto.receive_data(partial)
        if code == ev.EV_DATA:
            if proto.state is _OPEN:
                if self._builtin and self._handler is _echo:
                    out = proto.receive_echo(arg)
                else:
                    out, _, _ = proto.receive_and_reply(arg, self._handler)
                if out:
                    self._loop.send(proto.pump, out)
            else:
                proto.receive_data(arg)  # counted as discarded (SPEC §5.0)
        elif code == ev.EV_EOF:
            proto.receive_eof()
        elif code == ev.EV_LOST:
            pump = proto.pump
            proto.pump = None
            proto.connection_lost(None if arg is None else OSError(arg, os.strerror(arg)))
            del pump
            return
        elif code == ev.EV_MSG_TIMEOUT:
            proto.fail_message_timeout(arg)
        elif code == ev.EV_HANDLER_ERROR:
            proto.fail_handler(arg)
        self._act(proto)

    def _act(self, proto: MessageProtocol) -> None:
        """Do what the core says now: write its output, apply its close action, (un)pause reading."""
        slot = proto.pump
        if slot is None:
            return
        loop = self._loop
        chunks = proto.data_to_send()
        if chunks:
            loop.send(slot, b"".join(chunks))
        if proto.state is not _OPEN:
            while True:
                action = proto.close_action
                if action is None:
                    break
                if action is _ABORT:
                    loop.abort(slot)
                    return
                if action is _CLOSE:
                    loop.close(slot)
                    return
                loop.half_close(slot)  # after what is pending, as a transport's write_eof()
                proto.eof_written()
        loop.set_reading(slot, proto.reading_paused, proto.state is _OPEN)


def _descriptor(frame: FrameFormat) -> tuple[int, bool, bool, int, int, int]:
    """The frame format as the loop takes it (frame.h's descriptor): sizes and offsets."""
    offset = struct.calcsize(">" + "".join(f.code for f in frame.fields_before))
    return (
        frame.length_size,
        frame.byteorder == "big",
        frame.length_includes_header,
        frame.header_size,
        offset,
        frame.max_body,
    )


def _backend_choice(backend: str | None) -> str:
    """The backend asked for: the argument, else ``MSGSOCK_NATIVE_BACKEND``, else ``io_uring``.

    Raises:
        ValueError: an unknown name.
    """
    choice = backend if backend is not None else os.environ.get("MSGSOCK_NATIVE_BACKEND") or "io_uring"
    if choice not in BACKENDS:
        raise ValueError(f"unknown native backend {choice!r}; choose from {', '.join(BACKENDS)}")
    return choice


def serve(
    handler: Handler | str | None = None,
    host: str | None = "127.0.0.1",
    port: int = 9898,
    *,
    frame: FrameFormat = DEFAULT_FORMAT,
    limits: Limits = DEFAULT_LIMITS,
    reuse_port: bool = False,
    backlog: int = 1024,
    sock: socket.socket | None = None,
    logger: logging.Logger | None = None,
    backend: str | None = None,
) -> NativeServer:
    """Bind a framed server on the native engine and return it, listening (not yet serving).

    Run it with :meth:`NativeServer.serve_forever` (in the calling thread); stop it
    with :meth:`NativeServer.close` (from a signal handler or another thread).

    A handler that raises, or returns anything but bytes-like or None, resets its
    connection and is logged at error level with its traceback (SPEC §5.0), as in
    every engine.  An async handler is refused the same way (it needs the asyncio
    server).

    Args:
        handler: None or ``"echo"`` (the built-in echo, run natively), ``"reverse"``
            (each body reversed, natively), or a function called once per message.
        host: the address to bind (loopback by default; None for every interface).
        port: the TCP port; 0 picks a free one (see :attr:`NativeServer.port`).
        frame: the frame format of every connection.
        limits: the limits in force (SPEC §7).
        reuse_port: set ``SO_REUSEPORT`` (several processes on one port).
        backlog: the listen backlog.
        sock: an already bound socket to serve on instead of ``host``/``port``
            (it is listened on and closed by the server).
        logger: where to log (default ``logging.getLogger("msgsock.server")``).
        backend: ``"epoll"`` or ``"io_uring"`` (default: ``MSGSOCK_NATIVE_BACKEND``,
            else io_uring where the kernel has it, else epoll).

    Returns:
        The bound :class:`NativeServer`.

    Raises:
        RuntimeError: the native engine is not available (:func:`unavailable_reason`).
        ValueError: ``port`` is not 0..65535, or an unknown backend.
        TypeError: ``handler`` is neither None, ``"echo"``, ``"reverse"`` nor callable.
        OSError: the address cannot be bound.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the native engine is not available: {reason}")
    if handler is not None and not isinstance(handler, str):
        check_callable(handler, "handler")
    elif isinstance(handler, str) and handler not in BUILTINS:
        raise TypeError(f"handler must be callable, 'echo', 'reverse' or None, got {handler!r}")
    _backend_choice(backend)
    if sock is not None:
        sock.listen(backlog)
        sock.setblocking(False)
        sockets = [sock]
    else:
        sockets = _bind(host, check_port(port), reuse_port=reuse_port, backlog=backlog)
    try:
        return NativeServer(
            handler, sockets, frame=frame, limits=limits, logger=server_logger(logger), backend=backend
        )
    except BaseException:
        for s in sockets:
            s.close()
        raise
