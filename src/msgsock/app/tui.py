"""The interactive client of ``msgsock client`` (SPEC §6.2): a Textual TUI over a network thread.

Theory of operation.  The MFCAsync AsyncClient (KB Q192570, seed 002) keeps its
socket on a thread of its own "so the blocking of the GUI message pump does not
affect the delivery of socket messages".  Here that split is two objects:

- :class:`NetworkClient` owns a :class:`~msgsock.callback.Reactor` thread and at most
  one :class:`~msgsock.callback.MessageSocket`.  Every callback (``on_connect``,
  ``on_message``, ``on_close``) runs **on the reactor thread**, and so does the
  reverse loop: receive the echo, verify it, reverse it, send it back -- the UI is
  never on that path.  The counters (messages and bytes each way, loop rounds and
  RTT histogram) are updated there too.  Requests from the UI (connect, send,
  start/stop the loop, disconnect) are handed over with
  :meth:`~msgsock.callback.Reactor.call_soon_threadsafe` and never wait.  TLS and
  the authentication handshake (``config.ssl``, ``config.auth_key``; SPEC §4.2)
  are pumped by that socket on the same thread, so ``on_connect(0)`` -- and the
  "connected" status -- come only once they passed; a failed stage shows as
  ``error: TLS handshake failed: ...`` or ``error: authentication failed: ...``.
- :class:`ClientApp` (Textual) only *receives* events.  The network thread appends
  them to a bounded buffer and, when the buffer was empty, wakes the UI with one
  :meth:`textual.app.App.post_message` -- which only queues, unlike
  ``call_from_thread``, which waits for the UI to run the call and would let a busy
  UI stall the network thread.  The UI drains the whole buffer per wake-up, so a
  flood of messages costs one wake-up per UI turn, and a buffer that outgrows
  :data:`MAX_PENDING_EVENTS` drops message lines (counted, and said in the log)
  rather than memory.  Live figures (counters, loop rate, RTT p50/p99) are read by a
  UI timer, not pushed per message.

Round-trip times pair each reply with the oldest unanswered message: an echo server
answers in order, one reply per message (SPEC §6.1).  A message that arrives with
nothing outstanding (a server that pushes) is shown without an RTT.

Received bytes reach the terminal only through :func:`msgsock.app.client.escape_text`
(non-printables escaped, long bodies truncated with their length) inside
:class:`rich.text.Text` objects, so a peer can neither send terminal control
sequences nor Rich/Textual markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypeAlias

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message as UIMessage
from textual.widgets import Button, Footer, Input, Label, RichLog, Static

from .._histogram import Histogram
from ..callback import MessageSocket, Reactor, TimerHandle
from ..exceptions import ConnectionClosed, InvalidState, MsgsockError, Timeout
from ..framing import Message
from ..protocol import format_address
from .client import ClientConfig, escape_text
from .reverse import Mismatch, ReverseLoop

__all__ = [
    "DEFAULT_LOOP_MESSAGE",
    "LOG_TEXT_LIMIT",
    "MAX_PENDING_EVENTS",
    "ClientApp",
    "LoopEvent",
    "LoopStats",
    "MessageEvent",
    "MismatchEvent",
    "NetEvent",
    "NetworkClient",
    "NoteEvent",
    "State",
    "StatusEvent",
    "run_tui",
]

LOG_TEXT_LIMIT = 200
"""Characters of a message body shown in the log; longer ones end with ``… (N bytes)``."""

_KEEP_BYTES = 4 * LOG_TEXT_LIMIT
"""Bytes of a body kept for its log line (a character is at most 4 UTF-8 bytes)."""

MAX_LOG_LINES = 5000
"""Lines the log widget keeps (older ones scroll away for good)."""

MAX_PENDING_EVENTS = 500
"""Message lines buffered for the UI; beyond this they are dropped and counted (a flood
must cost neither unbounded memory nor a UI that never catches up, SPEC §7)."""

DEFAULT_LOOP_MESSAGE = b"Hello from msgsock"
"""First payload of the reverse loop when the send box is empty (as ``--message``)."""

_WATCHDOG_INTERVAL = 0.25
"""How often the network thread looks for a reply older than ``reply_timeout``."""

_STATS_INTERVAL = 0.5
"""How often the UI refreshes the counters and the loop's rate and RTT."""


class State(enum.StrEnum):
    """What the status line says about the connection."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    ERROR = "error"


# -- events (network thread -> UI) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """The connection changed state; ``detail`` is the status line to show."""

    state: State
    detail: str


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A message was sent or received (``rtt`` in seconds when it answered one of ours).

    ``body`` holds at most :data:`_KEEP_BYTES` of the message (enough for the log
    line), ``size`` its real length: a queue of events never holds whole large bodies.
    """

    direction: Literal["sent", "received"]
    when: float
    number: int
    body: bytes
    size: int
    header: Mapping[str, int] = field(default_factory=dict)
    rtt: float | None = None

    @classmethod
    def of(
        cls,
        direction: Literal["sent", "received"],
        number: int,
        body: bytes,
        header: Mapping[str, int],
        rtt: float | None = None,
    ) -> MessageEvent:
        """The event for ``body``, now, keeping only the prefix the log can show."""
        return cls(direction, time.time(), number, bytes(body[:_KEEP_BYTES]), len(body), dict(header), rtt)

    def body_text(self) -> str:
        """The body for the terminal: escaped, cut at :data:`LOG_TEXT_LIMIT` characters with its full length."""
        shown = escape_text(self.body, LOG_TEXT_LIMIT)
        if len(self.body) == self.size:
            return shown
        marker = f"… ({len(self.body)} bytes)"  # escape_text counted the prefix only
        if shown.endswith(marker):
            shown = shown[: -len(marker)]
        return f"{shown}… ({self.size} bytes)"

    @property
    def truncated(self) -> bool:
        """True when the log line shows only the start of the body."""
        return self.size > LOG_TEXT_LIMIT and (
            self.size > len(self.body) or len(self.body.decode("utf-8", "backslashreplace")) > LOG_TEXT_LIMIT
        )


@dataclass(frozen=True, slots=True)
class NoteEvent:
    """A line for the log that is not a message (``level``: info, warning or error)."""

    when: float
    text: str
    level: Literal["info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class LoopEvent:
    """The reverse loop started (``first`` is its first payload) or stopped (``reason``)."""

    when: float
    running: bool
    stats: LoopStats
    first: bytes = b""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class MismatchEvent:
    """An echo of the reverse loop differed from what was sent (SPEC §6.2)."""

    when: float
    round: int
    sent: bytes
    received: bytes


NetEvent: TypeAlias = StatusEvent | MessageEvent | NoteEvent | LoopEvent | MismatchEvent


@dataclass(frozen=True, slots=True)
class LoopStats:
    """The reverse loop's figures so far (RTT percentiles in seconds, 0 before the first round)."""

    running: bool = False
    rounds: int = 0
    elapsed: float = 0.0
    p50: float = 0.0
    p99: float = 0.0

    @property
    def rate(self) -> float:
        """Average rounds per second since the loop started."""
        return self.rounds / self.elapsed if self.elapsed > 0 else 0.0


# -- the network side ------------------------------------------------------------------------


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


# -- the UI ------------------------------------------------------------------------------------


class NetworkActivity(UIMessage):
    """Posted (from the network thread) when events wait in :meth:`NetworkClient.take_events`."""


class _LogForwarder(logging.Handler):
    """Shows the network layer's warnings (``msgsock.callback``) in the log, not on the terminal."""

    def __init__(self, network: NetworkClient) -> None:
        super().__init__(logging.WARNING)
        self._network = network

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        self._network.note(text, "error" if record.levelno >= logging.ERROR else "warning")


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _header_text(header: Mapping[str, int]) -> str:
    return "[" + " ".join(f"{k}={v}" for k, v in header.items()) + "] " if header else ""


_STATE_STYLE = {
    State.DISCONNECTED: "dim",
    State.CONNECTING: "bold yellow",
    State.CONNECTED: "bold green",
    State.ERROR: "bold red",
}
_NOTE_STYLE = {"info": "cyan", "warning": "yellow", "error": "bold red"}


class ClientApp(App[int], inherit_bindings=False):
    """The interactive client (SPEC §6.2): connect, send, watch the log, run the reverse loop.

    Args:
        config: the client settings; host and port prefill the fields.
        handle_signals: stop gracefully on SIGTERM (only for the real program: it
            needs the main thread).

    Attributes:
        network: the network side (its counters are live, whatever the UI is doing).
        state: the connection state as last shown.
    """

    TITLE = "msgsock client"
    ENABLE_COMMAND_PALETTE = False

    CSS = """
    #connect-row, #send-row { height: 3; }
    .field-label { width: auto; padding: 1 1 0 1; }
    #host { width: 1fr; }
    #port { width: 12; }
    #status { height: 1; padding: 0 1; }
    #log { height: 1fr; border: round $primary; overflow-y: auto; }
    #counters, #loopline { height: 1; padding: 0 1; }
    #message { width: 1fr; }
    Button { min-width: 12; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f2", "connect", "Connect", priority=True),
        Binding("f3", "disconnect", "Disconnect", priority=True),
        Binding("f4", "toggle_loop", "Reverse loop", priority=True),
        Binding("f5", "clear_log", "Clear log", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, config: ClientConfig, *, handle_signals: bool = False) -> None:
        super().__init__()
        self.config = config
        self.network = NetworkClient(config, notify=self._wake)
        self.state = State.DISCONNECTED
        self._handle_signals = handle_signals
        self._forwarder = _LogForwarder(self.network)
        self._saved_propagate = True
        self._quitting = False
        self._last_rounds = 0
        self._last_tick = time.perf_counter()
        self._rate = 0.0
        self._loop_summary = "reverse loop: off (F4 starts it)"

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        """Build the dialog of seed 002: server, port, Connect/Disconnect, log, send box."""
        with Horizontal(id="connect-row"):
            yield Label("Server", classes="field-label")
            yield Input(self.config.host, placeholder="host name or address", id="host")
            yield Label("Port", classes="field-label")
            yield Input(str(self.config.port), placeholder="port", id="port", type="integer")
            yield Button("Connect", id="connect", variant="primary")
            yield Button("Disconnect", id="disconnect", variant="error", disabled=True)
        yield Static(Text("● disconnected", style=_STATE_STYLE[State.DISCONNECTED]), id="status")
        yield RichLog(id="log", max_lines=MAX_LOG_LINES, wrap=True, markup=False, highlight=False)
        yield Static(id="counters")
        yield Static(Text(self._loop_summary, style="dim"), id="loopline")
        with Horizontal(id="send-row"):
            yield Input(placeholder="message to send (Enter sends)", id="message", disabled=True)
            yield Button("Send", id="send", disabled=True)
            yield Button("Loop ▶", id="loop", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        """Start the network thread, the stats timer, and route msgsock's log records here."""
        logger = logging.getLogger("msgsock.callback")
        self._saved_propagate = logger.propagate
        logger.addHandler(self._forwarder)
        logger.propagate = False  # a stray line on stderr would tear the screen
        self.network.start()
        self.set_interval(_STATS_INTERVAL, self._refresh_stats)
        self._refresh_stats()
        if self._handle_signals and hasattr(signal, "SIGTERM"):
            # SPEC §6: stop cleanly on SIGTERM too (Ctrl-C is a key binding here).
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self.query_one("#connect", Button).focus()

    def _on_sigterm(self) -> None:
        self.call_next(self.action_quit)

    def on_unmount(self) -> None:
        """Make sure the network thread is gone, however the app ended."""
        self.network.close(timeout=1.0)
        logger = logging.getLogger("msgsock.callback")
        logger.removeHandler(self._forwarder)
        logger.propagate = self._saved_propagate

    # -- network events ------------------------------------------------------------------------

    def _wake(self) -> None:
        # Called on the network thread: post_message only queues (never waits for the UI).
        self.post_message(NetworkActivity())

    def on_network_activity(self, _message: NetworkActivity) -> None:
        """Drain the network's events into the status line and the log."""
        events, dropped = self.network.take_events()
        log = self.query_one("#log", RichLog)
        for event in events:
            if isinstance(event, StatusEvent):
                self._show_state(event.state, event.detail)
            elif isinstance(event, MessageEvent):
                log.write(self._message_line(event))
            elif isinstance(event, NoteEvent):
                log.write(
                    Text.assemble((_clock(event.when), "dim"), "  ", (event.text, _NOTE_STYLE[event.level]))
                )
            elif isinstance(event, LoopEvent):
                self._show_loop_event(log, event)
            else:
                self._show_mismatch(log, event)
        if dropped:
            log.write(
                Text.assemble(
                    (_clock(time.time()), "dim"),
                    "  ",
                    (f"… {dropped} message line(s) not shown (the UI fell behind)", "yellow"),
                )
            )

    def _message_line(self, event: MessageEvent) -> Text:
        sent = event.direction == "sent"
        line = Text(overflow="fold")
        line.append(_clock(event.when), "dim")
        line.append("  → " if sent else "  ← ", "bold cyan" if sent else "bold green")
        line.append(f"#{event.number} ", "dim")
        if event.header:
            line.append(_header_text(event.header), "magenta")
        # Plain text only: escaped non-printables, never markup (Text.append does not parse it).
        line.append(event.body_text())
        # A truncated body already ends with its full length ("… (N bytes)").
        extra = [] if event.truncated else [_size(event.size)]
        if event.rtt is not None:
            extra.append(f"rtt {_duration(event.rtt)}")
        if extra:
            line.append(f"  ({', '.join(extra)})", "dim")
        return line

    def _show_loop_event(self, log: RichLog, event: LoopEvent) -> None:
        button = self.query_one("#loop", Button)
        stats = event.stats
        if event.running:
            button.label = "Loop ■"
            self._last_rounds, self._last_tick, self._rate = 0, time.perf_counter(), 0.0
            text = f"reverse loop started: {escape_text(event.first, 60)}"
            log.write(Text.assemble((_clock(event.when), "dim"), "  ", (text, "cyan")))
        else:
            button.label = "Loop ▶"
            self._loop_summary = (
                f"reverse loop: stopped ({event.reason}) after {stats.rounds:,} rounds, "
                f"{stats.rate:,.0f}/s, RTT p50 {_duration(stats.p50)} p99 {_duration(stats.p99)}"
            )
            style = "bold red" if event.reason.startswith(("mismatch", "no echo", "connection")) else "cyan"
            log.write(Text.assemble((_clock(event.when), "dim"), "  ", (self._loop_summary, style)))
        self._refresh_stats()

    def _show_mismatch(self, log: RichLog, event: MismatchEvent) -> None:
        line = Text(overflow="fold", style="bold red")
        line.append(f"{_clock(event.when)}  MISMATCH at round {event.round}\n")
        line.append(f"    sent     ({len(event.sent)} B): {escape_text(event.sent, LOG_TEXT_LIMIT)}\n")
        line.append(f"    received ({len(event.received)} B): {escape_text(event.received, LOG_TEXT_LIMIT)}")
        log.write(line)

    def _show_state(self, state: State, detail: str) -> None:
        self.state = state
        symbol = "✖" if state is State.ERROR else "●"
        self.query_one("#status", Static).update(Text(f"{symbol} {detail}", style=_STATE_STYLE[state]))
        busy = state in (State.CONNECTING, State.CONNECTED)
        connected = state is State.CONNECTED
        self.query_one("#connect", Button).disabled = busy
        self.query_one("#disconnect", Button).disabled = not busy
        for name in ("#message", "#send", "#loop"):
            self.query_one(name).disabled = not connected
        if connected:
            self.query_one("#message", Input).focus()
        elif not busy:
            self.query_one("#loop", Button).label = "Loop ▶"
            self.query_one("#connect", Button).focus()

    def _refresh_stats(self) -> None:
        net = self.network
        self.query_one("#counters", Static).update(
            Text(
                f"sent {net.messages_sent:,} msgs / {_size(net.bytes_sent)}    "
                f"received {net.messages_received:,} msgs / {_size(net.bytes_received)}"
            )
        )
        if not net.loop_running:
            self.query_one("#loopline", Static).update(Text(self._loop_summary, style="dim"))
            return
        stats = net.loop_stats()
        now = time.perf_counter()
        if now - self._last_tick >= _STATS_INTERVAL / 2:
            self._rate = (stats.rounds - self._last_rounds) / (now - self._last_tick)
            self._last_rounds, self._last_tick = stats.rounds, now
        self.query_one("#loopline", Static).update(
            Text(
                f"reverse loop: running  {stats.rounds:,} rounds verified  {self._rate:,.0f} rounds/s  "
                f"RTT p50 {_duration(stats.p50)}  p99 {_duration(stats.p99)}",
                style="bold cyan",
            )
        )

    # -- user actions ----------------------------------------------------------------------------

    def action_connect(self) -> None:
        """Connect to the host and port in the fields."""
        if self.state in (State.CONNECTING, State.CONNECTED) or self._quitting:
            return
        host = self.query_one("#host", Input).value.strip()
        port_text = self.query_one("#port", Input).value.strip()
        try:
            port = int(port_text)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            self._show_state(State.ERROR, f"error: port must be 1-65535, not {port_text!r}")
            return
        if not host:
            self._show_state(State.ERROR, "error: enter a server name or address")
            return
        self.network.connect(host, port)

    def action_disconnect(self) -> None:
        """Close the connection gracefully."""
        self.network.disconnect()

    def action_toggle_loop(self) -> None:
        """Start or stop the reverse loop (the send box's text is the first payload)."""
        if self.network.loop_running:
            self.network.stop_loop()
            return
        if self.state is not State.CONNECTED:
            self.network.note("not connected: connect first (F2)", "warning")
            return
        text = self.query_one("#message", Input).value
        self.network.start_loop(text.encode("utf-8") if text else DEFAULT_LOOP_MESSAGE)

    def action_clear_log(self) -> None:
        """Empty the log (the counters keep counting)."""
        self.query_one("#log", RichLog).clear()

    async def action_quit(self) -> None:
        """Disconnect gracefully (off the UI thread), then exit with status 0."""
        if self._quitting:
            return
        self._quitting = True
        self.query_one("#status", Static).update(Text("● disconnecting…", style="bold yellow"))
        self.run_worker(self._quit_worker, thread=True, exclusive=True, group="quit")

    def _quit_worker(self) -> None:
        self.network.close()
        self.call_from_thread(self.exit, 0)

    @on(Button.Pressed, "#connect")
    def _connect_pressed(self) -> None:
        self.action_connect()

    @on(Button.Pressed, "#disconnect")
    def _disconnect_pressed(self) -> None:
        self.action_disconnect()

    @on(Button.Pressed, "#loop")
    def _loop_pressed(self) -> None:
        self.action_toggle_loop()

    @on(Button.Pressed, "#send")
    def _send_pressed(self) -> None:
        self._send_from_box()

    @on(Input.Submitted, "#message")
    def _message_submitted(self) -> None:
        self._send_from_box()

    @on(Input.Submitted, "#host, #port")
    def _address_submitted(self) -> None:
        self.action_connect()

    def _send_from_box(self) -> None:
        box = self.query_one("#message", Input)
        if not box.value:
            return
        if self.state is not State.CONNECTED:
            self.network.note("not connected: connect first (F2)", "warning")
            return
        self.network.send(box.value.encode("utf-8"))
        box.value = ""


def run_tui(config: ClientConfig) -> int:
    """Run the interactive client on the terminal until the user quits.

    Args:
        config: host, port (prefilled in the fields), frame, limits, header, timeouts,
            TLS context and server name, authentication key.

    Returns:
        The exit status: 0 after a normal quit, 1 if the app failed.
    """
    app = ClientApp(config, handle_signals=True)
    try:
        result = app.run()
    finally:
        app.network.close(timeout=1.0)
    if app.return_code not in (None, 0):
        return 1
    return 0 if result is None else int(result)


if __name__ == "__main__":  # pragma: no cover - manual run: python -m msgsock.app.tui
    sys.exit(run_tui(ClientConfig()))
