"""The Textual face of the interactive client (SPEC §6.2): the dialog of seed 002.

:class:`ClientApp` only *receives* events: the network thread wakes it with one
:class:`NetworkActivity` message when its buffer was empty (``post_message`` only
queues, so a busy UI never stalls the network thread) and the UI drains the whole
buffer per wake-up.  Live figures are read by a UI timer, not pushed per message.
Received bytes reach the terminal only through :func:`msgsock.app.client.escape_text`
inside :class:`rich.text.Text` objects, so a peer can send neither terminal control
sequences nor markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message as UIMessage
from textual.widgets import Button, Footer, Input, Label, RichLog, Static

from ..client import ClientConfig, escape_text
from .events import (
    LOG_TEXT_LIMIT,
    LoopEvent,
    MessageEvent,
    MismatchEvent,
    NoteEvent,
    State,
    StatusEvent,
)
from .network import DEFAULT_LOOP_MESSAGE, NetworkClient

__all__ = ["ClientApp", "NetworkActivity", "run_tui"]


MAX_LOG_LINES = 5000
"""Lines the log widget keeps (older ones scroll away for good)."""


_STATS_INTERVAL = 0.5
"""How often the UI refreshes the counters and the loop's rate and RTT."""


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
