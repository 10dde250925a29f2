"""The network half of the interactive client: a reactor thread and one connection (SPEC §6.2).

Theory of operation.  :class:`NetworkClient` owns a :class:`~msgsock.callback.Reactor`
thread -- the MFCAsync AsyncClient's socket thread (KB Q192570, seed 002) -- and at
most one :class:`~msgsock.callback.MessageSocket`.  Every callback and the reverse
loop run on that thread; requests from the UI are handed over with
:meth:`~msgsock.callback.Reactor.call_soon_threadsafe` and never wait.  What happens
is queued as :mod:`~msgsock.app.tui.events` values for the UI to take; the queue is
bounded by :data:`MAX_PENDING_EVENTS`.  This module uses neither textual nor rich
(the package's ``__init__`` imports them, for the app).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from ..._histogram import Histogram
from ...callback import MessageSocket, Reactor, TimerHandle
from ...exceptions import ConnectionClosed, InvalidState, MsgsockError, Timeout
from ...framing import Message
from ...protocol import format_address
from ..client import ClientConfig
from ..reverse import Mismatch, ReverseLoop
from .events import (
    LoopEvent,
    LoopStats,
    MessageEvent,
    MismatchEvent,
    NetEvent,
    NoteEvent,
    State,
    StatusEvent,
)

__all__ = ["DEFAULT_LOOP_MESSAGE", "MAX_PENDING_EVENTS", "NetworkClient"]

MAX_PENDING_EVENTS = 500
"""Message lines buffered for the UI; beyond this they are dropped and counted (a flood
must cost neither unbounded memory nor a UI that never catches up, SPEC §7)."""

DEFAULT_LOOP_MESSAGE = b"Hello from msgsock"
"""First payload of the reverse loop when the send box is empty (as ``--message``)."""

_WATCHDOG_INTERVAL = 0.25
"""How often the network thread looks for a reply older than ``reply_timeout``."""


class _Pending:
    """One message waiting for its reply (replies come in order, one per message)."""

    __slots__ = ("late", "loop", "number", "payload", "start")

    def __init__(self, loop: bool, payload: bytes, start: float, number: int) -> None:
        self.loop = loop
        self.payload = payload  # kept for loop messages only (they are verified)
        self.start = start
        self.number = number
        self.late = False  # the "no reply within reply_timeout" line was shown


class _ClientSocket(MessageSocket):
    """The connection; its callbacks run on the reactor thread and go to the owner."""

    def __init__(self, owner: NetworkClient, reactor: Reactor, config: ClientConfig) -> None:
        # TLS and authentication run on the reactor too; on_connect(0) comes after them.
        super().__init__(
            reactor,
            config.frame,
            config.limits,
            ssl=config.ssl,
            server_hostname=config.server_hostname,
            auth_key=config.auth_key,
        )
        self._owner = owner

    def on_connect(self, error: int) -> None:
        self._owner._on_connect(self, error)

    def on_message(self, message: bytes) -> None:
        self._owner._on_message(self, message)

    def on_close(self, error: int) -> None:
        self._owner._on_close(self, error)


def _reason(exc: BaseException | None, err: int = 0) -> str:
    """A short human reason for a failure: the core's words for how a connection ended, the OS's for an errno."""
    if isinstance(exc, ConnectionClosed) and exc.reason:
        return exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if exc is not None and str(exc):
        return str(exc)
    return os.strerror(err) if err else "unknown error"


class NetworkClient:
    """The network half of the interactive client: a reactor thread and one connection.

    Every method may be called from any thread and returns at once (except
    :meth:`close`, which waits for the graceful disconnect).  Events for the UI
    accumulate until :meth:`take_events`; ``notify`` is called (on the network
    thread, so it must not block) when the first one arrives after a
    :meth:`take_events`.

    Args:
        config: host, port, frame, limits, header fields, timeouts, TLS and auth key.
        notify: wakes the consumer of the events; must not block.

    Attributes:
        messages_sent: messages sent on the current connection (loop included).
        bytes_sent: body bytes of those messages.
        messages_received: messages received on the current connection; updated on
            the network thread as each one arrives, whatever the UI is doing.
        bytes_received: body bytes of those messages.
    """

    def __init__(self, config: ClientConfig, notify: Callable[[], object] | None = None) -> None:
        self.config = config
        self._notify = notify
        self.reactor = Reactor(name="msgsock-tui-network")
        # Shared with the UI thread (guarded by _lock).
        self._lock = threading.Lock()
        self._events: deque[NetEvent] = deque()
        self._dropped = 0
        self._notified = False
        self._loop_hist = Histogram()  # guarded by _lock too: the UI reads percentiles
        self._loop = ReverseLoop(b"")  # the rounds verified, the payload in flight
        self._loop_running = False
        self._loop_start = 0.0
        # Written on the reactor thread only; plain ints, read by the UI for display.
        self.messages_sent = 0
        self.bytes_sent = 0
        self.messages_received = 0
        self.bytes_received = 0
        self.state = State.DISCONNECTED
        # Reactor-thread state.
        self._sock: _ClientSocket | None = None
        self._target = ""
        self._peer = ""
        self._pending: deque[_Pending] = deque()
        self._connect_timer: TimerHandle | None = None
        self._watchdog: TimerHandle | None = None
        self._started = False
        self._closed = False

    # -- life cycle (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Start the network thread (idempotent)."""
        if not self._started:
            self._started = True
            self.reactor.start()

    def close(self, timeout: float | None = None) -> None:
        """Disconnect gracefully, then stop the network thread.  Idempotent.

        The graceful close (flush, half-close, wait for the server's EOF) is bounded by
        ``limits.close_timeout``; after ``timeout`` (default: that plus one second)
        the reactor closes whatever is left at once.
        """
        if self._closed:
            return
        self._closed = True
        if timeout is None:
            timeout = self.config.limits.close_timeout + 1.0
        deadline = time.monotonic() + timeout
        if self.reactor.running:
            try:
                sock = self.reactor.run_sync(self._disconnect_for_close, timeout=timeout)
            except (Timeout, InvalidState):
                sock = None
            if sock is not None:
                sock.wait_closed(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Timeout):
            self.reactor.stop(max(0.1, deadline - time.monotonic()))

    # -- requests (any thread; run on the reactor thread) ------------------------------------

    def connect(self, host: str, port: int) -> None:
        """Start connecting to ``host``:``port``; the outcome arrives as a :class:`StatusEvent`."""
        self._call(self._connect, host, port)

    def disconnect(self) -> None:
        """Close the connection gracefully (stops the loop; unanswered messages are dropped)."""
        self._call(self._disconnect)

    def send(self, body: bytes) -> None:
        """Send one message carrying ``config.header``; logged as a :class:`MessageEvent`."""
        self._call(self._send_user, body)

    def start_loop(self, first: bytes = DEFAULT_LOOP_MESSAGE) -> None:
        """Start the MFCAsync reverse loop with ``first`` as its first payload."""
        self._call(self._start_loop, first)

    def stop_loop(self) -> None:
        """Stop the reverse loop after the echo in flight (which is still verified)."""
        self._call(self._stop_loop, "by request")

    def note(self, text: str, level: Literal["info", "warning", "error"] = "info") -> None:
        """Add a line to the log (thread-safe; used for forwarded log records)."""
        self._emit(NoteEvent(time.time(), text, level))

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self.reactor.call_soon_threadsafe(fn, *args)
        except InvalidState:  # closed: the app is quitting, nothing to do
            pass

    # -- what the UI reads (any thread) ----------------------------------------------------

    def take_events(self) -> tuple[list[NetEvent], int]:
        """Return the events since the last call and how many message lines were dropped."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            dropped, self._dropped = self._dropped, 0
            self._notified = False
        return events, dropped

    def loop_stats(self) -> LoopStats:
        """The reverse loop's rounds, elapsed time and RTT p50/p99 so far."""
        hist = Histogram()
        with self._lock:
            # A C-level list copy under the lock; the percentiles are computed outside it.
            hist.counts[:] = self._loop_hist.counts
            hist.add_summary(
                self._loop_hist.count, self._loop_hist.total, self._loop_hist.min, self._loop_hist.max
            )
            rounds, running, start = self._loop.rounds, self._loop_running, self._loop_start
        elapsed = time.perf_counter() - start if start else 0.0
        p50, p99 = hist.percentiles([50, 99])
        return LoopStats(running, rounds, elapsed, p50 / 1e9, p99 / 1e9)

    @property
    def loop_running(self) -> bool:
        """True while the reverse loop runs."""
        return self._loop_running

    # -- event buffer ------------------------------------------------------------------------

    def _emit(self, event: NetEvent, *, droppable: bool = False) -> None:
        with self._lock:
            if droppable and len(self._events) >= MAX_PENDING_EVENTS:
                self._dropped += 1
                return
            self._events.append(event)
            if self._notified:
                return
            self._notified = True
        if self._notify is not None:
            try:
                self._notify()
            except Exception:  # the UI is gone (quitting): the events are not needed
                pass

    def _set_state(self, state: State, detail: str) -> None:
        self.state = state
        self._emit(StatusEvent(state, detail))

    # -- reactor thread ------------------------------------------------------------------------

    def _connect(self, host: str, port: int) -> None:
        if self._sock is not None:
            self.note(f"already {self.state.value}; disconnect first", "warning")
            return
        self.messages_sent = self.bytes_sent = self.messages_received = self.bytes_received = 0
        self._pending.clear()
        self._target = format_address((host, port))
        self._set_state(State.CONNECTING, f"connecting to {self._target}…")
        sock = _ClientSocket(self, self.reactor, self.config)
        self._sock = sock
        try:
            sock.create()
            # May resolve a name: it blocks this thread, never the UI (seed 002).
            sock.connect(host, port)
        except socket.gaierror as exc:
            self._connect_failed(sock, f"cannot resolve {host!r}: {_reason(exc)}")
            return
        except (OSError, MsgsockError) as exc:
            self._connect_failed(sock, f"cannot connect to {self._target}: {_reason(exc)}")
            return
        if self.config.connect_timeout:
            self._connect_timer = self.reactor.call_later(
                self.config.connect_timeout, self._connect_timed_out, sock
            )

    def _connect_failed(self, sock: _ClientSocket, reason: str) -> None:
        self._cancel_timers()
        sock.abort()
        self._sock = None
        self._set_state(State.ERROR, f"error: {reason}")

    def _connect_timed_out(self, sock: _ClientSocket) -> None:
        if sock is self._sock and self.state is State.CONNECTING:
            self._connect_failed(
                sock, f"cannot connect to {self._target}: timed out after {self.config.connect_timeout:g} s"
            )

    def _on_connect(self, sock: _ClientSocket, error: int) -> None:
        if sock is not self._sock:
            return
        if error:
            self._connect_failed(sock, self._connect_error(sock, error))
            return
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        try:
            self._peer = format_address(sock.peer_name)
        except (OSError, MsgsockError):
            self._peer = self._target
        details = []
        session = sock.ssl_object
        if session is not None:
            details.append(session.version() or "TLS")
        if self.config.auth_key is not None:
            details.append("authenticated")
        details.append(f"frame {self.config.frame}")
        self._set_state(State.CONNECTED, f"connected to {self._peer} ({', '.join(details)})")
        self._watchdog = self.reactor.call_later(_WATCHDOG_INTERVAL, self._watch, sock)

    def _connect_error(self, sock: _ClientSocket, error: int) -> str:
        """The status line of a failed connect: the TCP connect, or a stage (TLS, authentication)."""
        if isinstance(sock.error, ConnectionClosed):  # the stages ended it: the core's reason says how
            return f"{sock.error.reason} ({self._target})"
        return f"cannot connect to {self._target}: {os.strerror(error)}"

    def _send(self, body: bytes, *, loop: bool) -> bool:
        sock = self._sock
        if sock is None or self.state is not State.CONNECTED:
            self.note("not connected: connect first (F2)", "warning")
            return False
        try:
            sock.send_message(body, self.config.header or None)
        except MsgsockError as exc:  # MessageTooLarge, InvalidFormat, a closed connection
            self.note(f"cannot send: {exc}", "error")
            return False
        self.messages_sent += 1
        self.bytes_sent += len(body)
        self._pending.append(_Pending(loop, body if loop else b"", time.perf_counter(), self.messages_sent))
        return True

    def _send_user(self, body: bytes) -> None:
        if self._send(body, loop=False):
            self._emit(
                MessageEvent.of("sent", self.messages_sent, body, self.config.header),
                droppable=True,
            )

    def _on_message(self, sock: _ClientSocket, message: bytes) -> None:
        if sock is not self._sock:
            return
        now = time.perf_counter()
        self.messages_received += 1
        self.bytes_received += len(message)
        pending = self._pending.popleft() if self._pending else None
        if pending is not None and pending.loop:
            self._loop_echo(pending, bytes(message), now - pending.start)
            return
        header = message.header if type(message) is Message else {}
        rtt = now - pending.start if pending is not None else None
        self._emit(
            MessageEvent.of("received", self.messages_received, message, header, rtt),
            droppable=True,
        )

    def _loop_echo(self, pending: _Pending, echo: bytes, rtt: float) -> None:
        # The MFCAsync flow (seed 002, steps 5-6): verify the echo, reverse it, send it back.
        # pending.payload is the loop's payload in flight: the loop sends only that.
        try:
            with self._lock:
                after = self._loop.verify(echo)
                self._loop_hist.record(int(rtt * 1e9))
        except Mismatch as exc:
            self._emit(MismatchEvent(time.time(), exc.round, exc.sent, exc.got))
            self._stop_loop(f"mismatch at round {exc.round}")
            return
        if self._loop_running:
            self._send(after, loop=True)

    def _start_loop(self, first: bytes) -> None:
        if self._sock is None or self.state is not State.CONNECTED:
            self.note("not connected: connect first (F2)", "warning")
            return
        if self._loop_running:
            return
        with self._lock:
            self._loop_hist = Histogram()
            self._loop = ReverseLoop(first)
            self._loop_running = True
            self._loop_start = time.perf_counter()
        self._emit(LoopEvent(time.time(), True, self.loop_stats(), first=first))
        if not self._send(first, loop=True):
            self._stop_loop("the first message could not be sent")

    def _stop_loop(self, reason: str) -> None:
        if not self._loop_running:
            return
        stats = self.loop_stats()
        with self._lock:
            self._loop_running = False
        self._emit(
            LoopEvent(
                time.time(),
                False,
                LoopStats(False, stats.rounds, stats.elapsed, stats.p50, stats.p99),
                reason=reason,
            )
        )

    def _watch(self, sock: _ClientSocket) -> None:
        # One periodic check instead of a timer per message: the loop may run tens of
        # thousands of rounds a second.
        if sock is not self._sock:
            return
        timeout = self.config.reply_timeout
        if self._pending and timeout:
            oldest = self._pending[0]
            if not oldest.late and time.perf_counter() - oldest.start > timeout:
                oldest.late = True
                if oldest.loop:
                    self._stop_loop(f"no echo within {timeout:g} s")
                else:
                    self.note(f"no reply to message #{oldest.number} within {timeout:g} s", "warning")
        self._watchdog = self.reactor.call_later(_WATCHDOG_INTERVAL, self._watch, sock)

    def _on_close(self, sock: _ClientSocket, error: int) -> None:
        if sock is not self._sock:
            return
        unanswered = len(self._pending)
        if error == 0:
            why = "the server closed the connection"
        else:
            why = f"connection to {self._peer} lost: {_reason(sock.error, error)}"
        self._stop_loop(why)
        self._drop_connection()
        if unanswered:
            self.note(f"{unanswered} message(s) got no reply", "warning")
        if error == 0:
            self._set_state(State.DISCONNECTED, f"disconnected: {why}")
        else:
            self._set_state(State.ERROR, f"error: {why}")

    def _disconnect(self) -> None:
        if self._sock is None:
            return
        self._stop_loop("disconnected")
        self._drop_connection()
        self._set_state(State.DISCONNECTED, "disconnected")

    def _disconnect_for_close(self) -> MessageSocket | None:
        sock = self._sock
        self._disconnect()
        return sock

    def _drop_connection(self) -> None:
        sock = self._sock
        self._sock = None
        self._cancel_timers()
        self._pending.clear()
        if sock is None:
            return
        if self.state is State.CONNECTING:
            sock.abort()  # nothing was sent: no need to finish the handshake first
        else:
            sock.close()  # graceful: flush, half-close, read to the server's EOF

    def _cancel_timers(self) -> None:
        for timer in (self._connect_timer, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._connect_timer = self._watchdog = None
