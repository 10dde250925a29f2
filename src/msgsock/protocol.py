"""Sans-I/O state of one framed connection, shared by every I/O layer and engine.

Theory of operation (SPEC §5.0, STYLE §1, §11).  A :class:`MessageProtocol` decides
everything a connection does; the I/O layer around it is a pump that only moves
bytes:

1. bytes read from the socket go to :meth:`~MessageProtocol.receive_data` (or one of
   its server twins :meth:`~MessageProtocol.receive_echo` and
   :meth:`~MessageProtocol.receive_and_reply`), which returns the complete
   messages; the end of the stream goes to :meth:`~MessageProtocol.receive_eof`, a
   failed socket (or the socket's close) to :meth:`~MessageProtocol.connection_lost`.
   **Bytes from the peer never make these raise**: a bad frame, a failed handshake
   stage, a frame cut short become state (:attr:`~MessageProtocol.state`,
   :attr:`~MessageProtocol.end`);
2. the application's messages go to :meth:`~MessageProtocol.send_message`;
3. the pump writes everything :meth:`~MessageProtocol.data_to_send` returns (or
   :meth:`~MessageProtocol.peek_output` and :meth:`~MessageProtocol.consume_output`
   for partial writes), in order;
4. after every call it looks at :attr:`~MessageProtocol.state`; when it is not
   ``OPEN`` and the pump has written all it holds, :attr:`~MessageProtocol.close_action`
   says what to do with the socket (shut down the write side, close it, or reset it
   at once);
5. reading from the socket stops while :attr:`~MessageProtocol.reading_paused`;
6. it calls :meth:`~MessageProtocol.check_timeouts` once at the start and then at
   :meth:`~MessageProtocol.next_deadline` (or from one periodic sweep per server).

Close states::

    OPEN ──send_eof()/peer EOF (server)──> DRAINING ──written, HALF_CLOSE──> CLOSING
      │                                        │                               │
      │ fail(): a reset kind                    │ written, CLOSE                │ peer EOF
      └──────────────> CLOSED <────────────────┴───────────────────────────────┘

- ``DRAINING``: the end is decided; no new message is handled (those that still
  arrive are counted as *discarded*, never as received); what is owed is written.
- ``CLOSING``: our EOF is out; bytes are read only to see the peer's EOF, within
  ``limits.close_timeout``.
- ``CLOSED``: :attr:`~MessageProtocol.end` is final; the pump closes the socket (a
  reset when ``end.kind.resets``) and then calls ``connection_lost``.

Every end is one :class:`End`: an :class:`~msgsock.exceptions.EndKind` and the reason
worded once, here, for the log line and for ``ConnectionClosed``.

Stages (PROXY header, TLS, authentication) are a :class:`~msgsock.stages.Stages` the
protocol is given: it feeds them first, and once they pass frames flow through the
TLS record layer when there is one.  The pump never sees the difference.

Flow control: reading pauses while the application has more than the high-water
mark of received messages it has not taken (:meth:`~MessageProtocol.inbox_add`), and,
on the server side only, while the replies the peer has not read pile up above it
(our queue plus what the pump reports with
:meth:`~MessageProtocol.set_write_paused`).  A client never stops reading because of
what it queued itself: its peer could be waiting for it to read (the deadlock of a
client that sends more than the water mark at once).

Limits live in :class:`Limits` so every layer reads the same numbers (SPEC §7).  The
core never reads a clock: the pump passes ``now``.
"""

from __future__ import annotations

import enum
import inspect
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .exceptions import (
    ConnectionClosed,
    EndKind,
    FrameError,
    IncompleteMessage,
    InvalidState,
    MessageTooLarge,
    OversizeMessage,
    ProtocolError,
)
from .framing import DEFAULT_FORMAT, FrameDecoder, FrameFormat, bytes_like_error
from .stages import StageFailure, Stages

__all__ = [
    "DEFAULT_LIMITS",
    "Action",
    "ConnectionObserver",
    "End",
    "Limits",
    "MessageProtocol",
    "State",
    "Statistics",
    "check_reply",
    "describe_os_error",
    "format_address",
    "handler_end",
]


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-server limits (SPEC §7).  Timeouts in seconds; None = off.

    Args:
        write_high_water: outgoing bytes above which reading from the peer pauses and
            ``send`` waits (256 KiB).
        write_low_water: outgoing bytes below which it resumes (64 KiB).
        max_connections: concurrent connections a server accepts (10,000).
        idle_timeout: a server resets a connection with no traffic for this long (300 s).
        message_timeout: a server resets a connection whose started frame does not
            finish (30 s; slowloris).  Both protect servers: a client bounds its own
            waits (``receive(timeout=)``, ``connect_timeout``).
        handshake_timeout: TLS, authentication and PROXY header deadline (10 s).
        close_timeout: a graceful close waits this long for the peer's EOF (5 s).
        shutdown_timeout: a stopping server drains connections this long (5 s).
        max_threads: thread cap of the thread-per-connection server (1,000).

    Raises:
        ValueError: a negative or NaN value, or low water above high water.
        TypeError: a value that is not a number (a bool neither).
    """

    write_high_water: int = 256 * 1024
    write_low_water: int = 64 * 1024
    max_connections: int = 10_000
    idle_timeout: float | None = 300.0
    message_timeout: float | None = 30.0
    handshake_timeout: float | None = 10.0
    close_timeout: float = 5.0
    shutdown_timeout: float = 5.0
    max_threads: int = 1_000

    def __post_init__(self) -> None:
        for name in ("write_high_water", "write_low_water", "max_connections", "max_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")
        if self.write_low_water > self.write_high_water:
            raise ValueError(
                f"write_low_water {self.write_low_water} is above write_high_water {self.write_high_water}"
            )
        for name in (
            "idle_timeout",
            "message_timeout",
            "handshake_timeout",
            "close_timeout",
            "shutdown_timeout",
        ):
            value = getattr(self, name)
            optional = name in ("idle_timeout", "message_timeout", "handshake_timeout")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                none = " or None" if optional else ""
                raise TypeError(f"{name} must be a number of seconds{none}, got {type(value).__name__}")
            # NaN compares false with everything: it would switch the timeout off unnoticed.
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0{' or None' if optional else ''}, not {value!r}")
            if value == 0 and optional:  # 0 means off, as on the command line
                object.__setattr__(self, name, None)


DEFAULT_LIMITS = Limits()

_JOIN_LIMIT = 16384
"""Frames up to this size are copied into one chunk with their header (one write);
larger bodies are queued as they are, after their header, so they are not copied."""
_BYTES_TYPES = (bytes, bytearray, memoryview)

MESSAGE_OVERHEAD = 32
"""Bytes charged per message waiting for the application, on top of its body, so
that a flood of empty messages is bounded too."""

_MIN_GRANULARITY = 0.01
_MAX_GRANULARITY = 1.0


class State(enum.Enum):
    """Connection state as the core sees it (see the module's theory of operation)."""

    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"
    CLOSED = "closed"


_OPEN = State.OPEN  # a module global is read faster than an enum member, on the hot path


class Action(enum.Enum):
    """What the pump does with the socket once it has written everything (:attr:`MessageProtocol.close_action`)."""

    HALF_CLOSE = "half-close"
    """Shut down the write side (``shutdown(SHUT_WR)``, ``write_eof()``), then call
    :meth:`MessageProtocol.eof_written`, and go on reading."""
    CLOSE = "close"
    """Close the socket (after the bytes written so far)."""
    ABORT = "abort"
    """Reset the socket now (``SO_LINGER`` 0, ``transport.abort()``); nothing more is sent."""


@dataclass(frozen=True)
class End:
    """How one connection ended: the kind, and the reason in the words every layer logs.

    Attributes:
        kind: the :class:`~msgsock.exceptions.EndKind`.
        reason: the reason (``idle timeout: nothing received for 1 s``).
        error: the exception behind it, when there is one (a handler's, the peer's
            protocol error, the socket's ``OSError``); a handler's is logged with
            its traceback.
    """

    kind: EndKind
    reason: str
    error: BaseException | None = None

    def exception(self) -> ConnectionClosed:
        """The :class:`~msgsock.exceptions.ConnectionClosed` that tells the application of this end."""
        exc = ConnectionClosed(self.kind.clean, self.reason, self.kind)
        exc.__cause__ = self.error
        return exc


_CLOSED_BY_PEER = "peer closed the connection"
_CLOSED_LOCALLY = "connection closed locally"


@dataclass
class Statistics:
    """Counters of one connection (or, summed, of a server).

    ``messages_discarded`` counts the messages that arrived after this side began to
    close (a shutdown, ``close()``, a failure): read only to reach the peer's EOF,
    never handled, and so not in ``messages_received``.
    """

    messages_received: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    messages_discarded: int = 0

    def add(self, other: Statistics) -> None:
        """Add another set of counters into this one."""
        self.messages_received += other.messages_received
        self.messages_sent += other.messages_sent
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent
        self.messages_discarded += other.messages_discarded

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return {
            "messages_received": self.messages_received,
            "messages_sent": self.messages_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "messages_discarded": self.messages_discarded,
        }


class ConnectionObserver(Protocol):
    """What a server learns from its connections' protocols (see :mod:`msgsock.serving`)."""

    def connection_opened(self, proto: MessageProtocol) -> None:
        """Every stage passed: the connection is served from now on."""

    def connection_ended(self, proto: MessageProtocol) -> None:
        """The socket is gone; ``proto.end`` and ``proto.stats`` are final."""


def format_address(address: Any) -> str:
    """Format a socket address for logs: ``127.0.0.1:9898``, ``[::1]:9898``, or str() of anything else.

    ``None`` (a peer that reset the connection before its address could be read)
    becomes ``unknown peer``.
    """
    if address is None:
        return "unknown peer"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if ":" in str(host):
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    return str(address)


def describe_os_error(exc: BaseException) -> End:
    """Translate the ``OSError`` a socket raised into an :class:`End`, once for every layer (STYLE §4)."""
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError):
        return End(EndKind.RESET, "connection reset by peer", exc)
    if isinstance(exc, BrokenPipeError):
        return End(EndKind.RESET, "broken pipe (peer closed while we were sending)", exc)
    if isinstance(exc, TimeoutError):
        return End(EndKind.OS_ERROR, "timed out", exc)
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return End(EndKind.OS_ERROR, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, exc)


def _protocol_end(exc: ProtocolError) -> End:
    if isinstance(exc, MessageTooLarge):
        return End(EndKind.MESSAGE_TOO_LARGE, str(exc), exc)
    if isinstance(exc, IncompleteMessage):
        return End(EndKind.INCOMPLETE_MESSAGE, str(exc), exc)
    if isinstance(exc, FrameError):
        return End(EndKind.FRAME_ERROR, str(exc), exc)
    return End(EndKind.FRAME_ERROR, str(exc), exc)


class _WrongReply(TypeError):
    """A handler returned something that is not a reply (a TypeError naming the type)."""


def check_reply(reply: object) -> bytes | bytearray | memoryview | None:
    """Check what a handler returned: bytes-like (the reply) or None (no reply).

    The same check for every server, stream or datagram (SPEC §5.0).

    Raises:
        TypeError: anything else, naming the type received.
    """
    if reply is None or isinstance(reply, _BYTES_TYPES):
        return reply
    if inspect.isawaitable(reply):
        close = getattr(reply, "close", None)
        if close is not None:
            close()  # never awaited here: no "coroutine was never awaited" warning
        raise _WrongReply(
            f"handler returned {type(reply).__name__}; expected bytes or None "
            "(an async handler needs the asyncio server)"
        )
    raise _WrongReply(
        f"handler returned {type(reply).__name__}; expected bytes, bytearray, memoryview or None"
    )


def handler_end(exc: BaseException) -> End:
    """The :class:`End` of a handler that raised ``exc`` (or returned a wrong type): worded once for every server."""
    if isinstance(exc, _WrongReply):
        return End(EndKind.HANDLER_ERROR, str(exc), exc)
    return End(EndKind.HANDLER_ERROR, f"handler raised {type(exc).__name__}: {exc}", exc)


class MessageProtocol:
    """Everything one connection does, decided once for every layer.  Sans-I/O.

    Args:
        frame: the frame format both peers use.
        limits: the limits in force (water marks, timeouts).
        server_side: True for a connection a server accepted: its output is replies,
            so reading pauses while the peer leaves them unread.
        stages: the PROXY/TLS/authentication stages to pass before the frames (and
            the TLS record layer after them); None for none.
        close_on_eof: after the peer's EOF, finish what is owed and close (a
            per-message server); else wait for the application's ``send_eof()``.
        peer_address: the socket's peer address (a PROXY header may replace it).
        observer: told when the connection opens (every stage passed) and ends.
    """

    __slots__ = (
        "_active_since",
        "_close_when_open",
        "_closing_since",
        "_decoder",
        "_eof_sent",
        "_frame_messages",
        "_frame_since",
        "_half_close",
        "_half_closed",
        "_inbox",
        "_inbox_paused",
        "_lost",
        "_max_body",
        "_notify_due",
        "_out",
        "_out_paused",
        "_out_size",
        "_pack",
        "_proxy_info",
        "_reset",
        "_seen_bytes",
        "_started",
        "_then_close",
        "_transport_paused",
        "close_on_eof",
        "end",
        "eof_received",
        "frame",
        "limits",
        "observer",
        "peer",
        "peer_address",
        "pump",
        "replies_owed",
        "server_side",
        "stages",
        "state",
        "stats",
    )

    def __init__(
        self,
        frame: FrameFormat = DEFAULT_FORMAT,
        *,
        limits: Limits = DEFAULT_LIMITS,
        server_side: bool = False,
        stages: Stages | None = None,
        close_on_eof: bool = False,
        peer_address: Any = None,
        observer: ConnectionObserver | None = None,
    ) -> None:
        self.frame = frame
        self.limits = limits
        self.server_side = server_side
        self.close_on_eof = close_on_eof
        self.observer = observer
        self.peer_address = peer_address
        self.peer = format_address(peer_address)
        """The peer as log lines name it (the proxied client once a PROXY header named one)."""
        self.pump: Any = None
        """Free for the I/O layer: the object that owns the socket of this protocol."""
        self._decoder = FrameDecoder(frame)
        # Hot-path constants: a plain format (length only, counting the body) encodes
        # with one pack; others go through FrameFormat.encode_parts.
        plain = not frame.field_names and not frame.length_includes_header
        self._pack = frame._struct.pack if plain else None
        self._max_body = frame.max_body
        self._out: deque[bytes | bytearray | memoryview] = deque()
        self._out_size = 0
        self.stages = stages if stages is not None and not _passthrough(stages) else None
        self._proxy_info: Any = None  # kept when the stages are dropped (see _settle_stages)
        self.state = State.OPEN
        """See the module's theory of operation; a plain attribute, read on every call."""
        self.end: End | None = None
        """How the connection ended (or is ending), once that is decided."""
        self.eof_received = False
        self._eof_sent = False  # our EOF (or close) has been decided: nothing more is sent
        self._then_close = False  # DRAINING ends in CLOSE (not HALF_CLOSE + wait)
        self._reset = False  # CLOSED ends in a reset (RST), whatever the end's kind
        self._close_when_open = False  # a client's send_eof() during its stages, done after them
        self._half_close = False  # send_eof(keep_receiving=True): HALF_CLOSE due once written
        self._half_closed = False  # ...and done (eof_written): still OPEN for receiving
        self._lost = False  # connection_lost() was called: the socket is gone
        self._notify_due = False  # TLS close_notify to send once all queued frames are out
        self.replies_owed = 0
        """Messages handed to an asynchronous handler and not answered yet (the pump
        counts them); the connection does not close before they are."""
        self.stats = Statistics()
        # Flow control.
        self._inbox = 0
        self._inbox_paused = False
        self._out_paused = False
        self._transport_paused = False
        # Timeout bookkeeping, updated only by check_timeouts() (never on the hot path).
        self._started: float | None = None
        self._seen_bytes = -1
        self._active_since = 0.0
        self._frame_messages = -1
        self._frame_since = 0.0
        self._closing_since: float | None = None
        if self.stages is not None:
            self._check_stages()  # a client's first flight, or a stage that is already done

    # -- state ------------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        """True once every stage has passed (at once when there are none)."""
        stages = self.stages
        return stages is None or stages.done

    @property
    def proxy_info(self) -> Any:
        """The PROXY header (a :class:`~msgsock.proxy.ProxyInfo`), when one was read."""
        return self._proxy_info

    @property
    def in_frame(self) -> bool:
        """True while a frame has started arriving but is not complete."""
        return self._decoder.in_frame

    @property
    def close_expected(self) -> bool:
        """True once the end is decided (any state but ``OPEN``)."""
        return self.state is not State.OPEN

    @property
    def close_action(self) -> Action | None:
        """What the pump does with the socket now, once it has written all it holds.

        ``ABORT`` is to be done at once, whatever is unwritten.  None: nothing yet
        (open, still flushing, replies owed, or waiting for the peer's EOF).
        """
        state = self.state
        if state is State.OPEN:
            if self._half_close and not self._out and not self._notify_due:
                return Action.HALF_CLOSE
            return None
        if state is State.CLOSED:
            return Action.ABORT if self._reset else Action.CLOSE
        if state is State.CLOSING or self._out or self.replies_owed or self._notify_due:
            return None
        return Action.CLOSE if self._then_close else Action.HALF_CLOSE

    def closed_error(self) -> ConnectionClosed:
        """The :class:`~msgsock.exceptions.ConnectionClosed` for an operation after the end."""
        end = self.end
        if end is None:
            if self.eof_received:
                end = End(EndKind.CLEAN, _CLOSED_BY_PEER)
            else:
                end = End(EndKind.CLEAN, _CLOSED_LOCALLY)
        return end.exception()

    # -- timeouts ---------------------------------------------------------------------

    def check_timeouts(self, now: float) -> End | None:
        """Decide the handshake, idle, message-completion and close timeouts (SPEC §7) at ``now``.

        The core reads no clock: the pump calls this once when the connection starts,
        and then at :meth:`next_deadline` (or from one sweep over all connections).
        Activity is seen by comparing the counters with the previous call, so the hot
        path does no timekeeping at all; a timeout fires between its value and its
        value plus the checking interval after the last activity.

        Returns:
            The :class:`End` when a timeout fired now (the connection is then ending:
            act on :attr:`close_action`), else None.
        """
        if self._started is None:
            self._started = now
        state = self.state
        if self._lost or (state is State.CLOSED and self._reset):
            return None
        limits = self.limits
        if state is not State.OPEN:
            # DRAINING, CLOSING, and CLOSED with a close still flushing (a peer that
            # sent its EOF and does not read): all within one close_timeout.
            since = self._closing_since
            if since is None:
                self._closing_since = now
            elif now - since > limits.close_timeout:
                return self.fail(
                    EndKind.CLOSE_TIMEOUT,
                    f"close timeout: the connection did not close within {limits.close_timeout:g} s",
                )
            return None
        stages = self.stages
        if stages is not None and not stages.done:
            timeout = limits.handshake_timeout
            if timeout is not None and now - self._started > timeout:
                return self.fail(EndKind.HANDSHAKE_TIMEOUT, stages.timeout_reason(timeout))
        if not self.server_side:
            # Idle and message timeouts protect a server from its peers (SPEC §7); a
            # client bounds its own waits (receive(timeout=), connect_timeout).
            return None
        received = self.stats.bytes_received
        if received != self._seen_bytes:
            self._seen_bytes = received
            self._active_since = now
        if self._decoder._buf:
            # A frame is in progress; it is "the same frame" while no message completes.
            done = self.stats.messages_received
            if done != self._frame_messages:
                self._frame_messages = done
                self._frame_since = now
            elif limits.message_timeout is not None and now - self._frame_since > limits.message_timeout:
                return self.fail_message_timeout(len(self._decoder._buf))
        else:
            self._frame_messages = -1
        if limits.idle_timeout is not None and now - self._active_since > limits.idle_timeout:
            return self.fail(
                EndKind.IDLE_TIMEOUT, f"idle timeout: nothing received for {limits.idle_timeout:g} s"
            )
        return None

    def fail_message_timeout(self, received: int) -> End:
        """End the connection for its message-completion timeout, ``received`` bytes of the frame in.

        :meth:`check_timeouts` decides it here; a pump that frames natively (the
        native engine) decides it with the same rule and ends the connection with this,
        so the reason is worded once.
        """
        timeout = self.limits.message_timeout
        return self.fail(
            EndKind.MESSAGE_TIMEOUT,
            f"message timeout: a frame was not completed within {timeout or 0:g} s ({received} bytes of it received)",
        )

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`check_timeouts` should run next (a time on the pump's clock), or None.

        At most a quarter of the shortest timeout in force away (and between 10 ms and
        1 s), so that a timeout fires at most that late.
        """
        limits = self.limits
        state = self.state
        if self._lost or (state is State.CLOSED and self._reset):
            return None
        if self._started is None:
            return now
        if state is State.OPEN:
            timeouts = [limits.idle_timeout, limits.message_timeout] if self.server_side else []
            if self.stages is not None and not self.stages.done:
                timeouts.append(limits.handshake_timeout)
            active = [t for t in timeouts if t is not None]
        else:
            active = [limits.close_timeout]
        if not active:
            return None
        step = max(_MIN_GRANULARITY, min(_MAX_GRANULARITY, min(active) / 4))
        return now + step

    # -- flow control -------------------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        """True while the pump should not read from the socket (see the theory of operation)."""
        return self._inbox_paused or self._out_paused

    def set_write_paused(self, paused: bool) -> None:
        """The pump's own write buffer passed its high-water mark (True) or fell below its low one."""
        self._transport_paused = paused
        self._update_out_pause()

    def inbox_add(self, messages: int, nbytes: int) -> None:
        """``messages`` received messages (``nbytes`` of body) now wait for the application."""
        self._inbox += nbytes + MESSAGE_OVERHEAD * messages
        if self._inbox > self.limits.write_high_water:
            self._inbox_paused = True

    def inbox_take(self, messages: int, nbytes: int) -> None:
        """The application took ``messages`` waiting messages (``nbytes`` of body)."""
        self._inbox = max(0, self._inbox - nbytes - MESSAGE_OVERHEAD * messages)
        if self._inbox_paused and self._inbox <= self.limits.write_low_water:
            self._inbox_paused = False

    def _update_out_pause(self) -> None:
        if not self.server_side or self.state is not State.OPEN:
            self._out_paused = False  # a client keeps reading; so does a closing connection
            return
        size = self._out_size
        limits = self.limits
        if self._transport_paused or size > limits.write_high_water:
            self._out_paused = True
        elif size <= limits.write_low_water:
            self._out_paused = False

    # -- receiving --------------------------------------------------------------------

    def _through_stages(self, data: bytes | bytearray | memoryview) -> bytes:
        """Pass raw bytes through the stages; return the application bytes."""
        stages = self.stages
        assert stages is not None
        was_done = stages.done
        plain = stages.receive_data(data)
        self.stats.bytes_received += len(plain)  # frame bytes, as without stages
        self._check_stages(was_done)
        return plain

    def _check_tls_eof(self) -> None:
        """The peer's TLS close_notify is its end of stream: after the frames that came before it."""
        stages = self.stages
        if stages is not None and stages.tls_eof and not self.eof_received and self.state is not State.CLOSED:
            if stages.done:
                self._peer_eof()
            else:  # in the middle of a stage (authentication under TLS): that stage's EOF
                self.receive_eof()

    def _check_stages(self, was_done: bool = False) -> None:
        stages = self.stages
        assert stages is not None
        info = stages.proxy_info
        if info is not None and self._proxy_info is None:
            # The proxied client is the peer from the header on, for every line logged
            # after it (a later TLS or authentication failure included).
            self._proxy_info = info
            self.peer_address = info.peer_address(self.peer_address)
            self.peer = format_address(self.peer_address)
        failure = stages.failure
        if failure is not None:
            if self.end is None:
                self._stage_failed(failure)
            return
        if stages.done and not was_done:
            if self.observer is not None:
                self.observer.connection_opened(self)
            if self._close_when_open:
                self._close_when_open = False
                self.send_eof()

    def _stage_failed(self, failure: StageFailure) -> None:
        if failure.by_peer_close and self._is_health_check():
            self._finish(End(EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)"))
        else:
            self.fail(failure.kind, failure.reason, failure.error)

    def _is_health_check(self) -> bool:
        info = self.proxy_info
        return info is not None and info.command == "LOCAL" and self.stats.messages_received == 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Feed bytes read from the peer; return the complete messages to handle.

        Never raises for the peer's bytes: when they break the format, the messages
        before the bad header are returned and the connection is ending (check
        :attr:`state`).  Messages that arrive once the connection is ending are
        counted as discarded and not returned.
        """
        if self.stages is not None:
            messages = self._receive(self._through_stages(data))
            self._check_tls_eof()
            return messages
        self.stats.bytes_received += len(data)
        return self._receive(data)

    def _receive(self, data: bytes | bytearray | memoryview) -> list[Any]:
        if not data:
            return []
        if self.state is not _OPEN or self.eof_received:
            self._discard(data)
            return []
        decoder = self._decoder
        try:
            messages = decoder.feed(data)
        except ProtocolError as exc:
            self.fail_protocol(exc)
            return []
        self.stats.messages_received += len(messages)
        if decoder._error is not None:
            self.fail_protocol(decoder._error)
        return messages

    def _discard(self, data: bytes | bytearray | memoryview) -> None:
        """Count the messages in bytes that arrived while ending (never handled)."""
        decoder = self._decoder
        if decoder._error is not None or not data:
            return
        try:
            self.stats.messages_discarded += len(decoder.feed(data))
        except ProtocolError:
            pass  # bad bytes after our end decided: nothing more to count

    def receive_echo(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes read from the peer; return every complete frame, unchanged, to send back.

        The echo fast path (SPEC §8): headers are checked as :meth:`receive_data`
        checks them, but the frames come back as one span instead of being split into
        messages and re-encoded (the bytes are the same, header fields included).  The
        span is counted as sent, and is returned ready for the wire (encrypted under
        TLS); the caller writes it at once, after anything already queued.

        Returns:
            The bytes to send back (``b""`` when no frame completed).
        """
        stages = self.stages
        if stages is not None:
            data = self._through_stages(data)
            if not data:
                self._check_tls_eof()
                return b""
        else:
            self.stats.bytes_received += len(data)
        if self.state is not _OPEN or self.eof_received:
            self._discard(data)
            return b""
        decoder = self._decoder
        try:
            count, span = decoder.feed_span(data)
        except ProtocolError as exc:
            self.fail_protocol(exc)
            self._check_tls_eof()
            return b""
        if count:
            stats = self.stats
            stats.messages_received += count
            stats.messages_sent += count
            stats.bytes_sent += len(span)
        if decoder._error is not None:
            self.fail_protocol(decoder._error)
        if stages is not None:
            out = stages.encrypt(span) if span else b""
            self._check_tls_eof()
            self._settle_stages()
            return out
        return span

    def receive_and_reply(
        self,
        data: bytes | bytearray | memoryview,
        handler: Callable[[Any], Any],
        *,
        awaitable_ok: bool = False,
    ) -> tuple[bytes, Any, list[Any]]:
        """Decode ``data``, call ``handler`` on each message, and encode its replies.

        The per-message server loop in one place (SPEC §8): the replies to one read
        come back as one ``bytes`` ready for the wire, to write at once (the outgoing
        queue is bypassed, so it must be empty).  A reply of None means no reply; a
        ``Message`` keeps its header fields.  With ``awaitable_ok``, the loop stops at
        the first reply that is an awaitable: it is returned with the messages not
        yet handled, for the pump to await in order.

        A handler that raises, or returns anything else than bytes-like or None,
        ends the connection (``HANDLER_ERROR``, a reset: SPEC §5.0); the replies
        before it are still returned.  Never raises for the peer's bytes either.

        Returns:
            ``(to_send, awaitable, rest)``: the encoded replies; the awaitable that
            stopped the loop (None if none did); the messages after it.
        """
        messages = self.receive_data(data)
        if not messages:
            return b"", None, []
        pack = self._pack
        max_body = self._max_body
        hsize = self._decoder._hsize
        parts: list[Any] = []
        count = total = 0  # replies encoded so far, and their bytes on the wire
        other: Any = None
        rest: list[Any] = []
        try:
            for i, message in enumerate(messages):
                reply = handler(message)
                if reply is None:
                    continue
                if pack is not None and type(reply) is bytes:
                    size = len(reply)
                    if size > max_body:
                        raise OversizeMessage(size, max_body)
                    parts.append(pack(size))
                    parts.append(reply)
                    total += hsize + size
                elif isinstance(reply, _BYTES_TYPES):
                    head, body = self.frame.encode_parts(reply)
                    parts.append(head)
                    parts.append(body)
                    total += len(head) + (body.nbytes if isinstance(body, memoryview) else len(body))
                elif awaitable_ok and inspect.isawaitable(reply):
                    other, rest = reply, messages[i + 1 :]
                    break
                else:
                    check_reply(reply)  # raises, naming the type
                count += 1
        except Exception as exc:
            self.fail_handler(exc)
        stats = self.stats
        stats.messages_sent += count
        stats.bytes_sent += total
        out = b"".join(parts)
        if self.stages is not None and out:
            out = self.stages.encrypt(out)
            self._settle_stages()
        return out, other, rest

    def receive_eof(self) -> None:
        """Record that the peer closed its sending side (never raises: a frame cut short ends the connection)."""
        if self.eof_received or self.state is State.CLOSED:
            return
        self.eof_received = True
        stages = self.stages
        if stages is not None and not stages.done:
            was_done = stages.done
            stages.receive_eof()
            self._check_stages(was_done)
            return
        self._peer_eof()

    def _peer_eof(self) -> None:
        self.eof_received = True
        state = self.state
        if state is State.OPEN:
            if self._decoder._error is None:
                try:
                    self._decoder.eof()
                except ProtocolError as exc:
                    self.fail_protocol(exc)
                    return
            if self._is_health_check():
                self._finish(End(EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)"))
            elif self._half_closed:  # both sides have sent their EOF
                self._set_end(End(EndKind.CLEAN, _CLOSED_BY_PEER))
                self.state = State.CLOSED
            elif self.close_on_eof:
                self._set_end(End(EndKind.CLEAN, _CLOSED_BY_PEER))
                self._begin_end(then_close=True)
        elif state is State.DRAINING:
            self._set_end(End(EndKind.CLEAN, _CLOSED_LOCALLY))
            self._then_close = True
        elif state is State.CLOSING:
            self._set_end(End(EndKind.CLEAN, _CLOSED_LOCALLY))
            self.state = State.CLOSED

    def connection_lost(self, exc: BaseException | None = None) -> None:
        """The socket is gone (the pump closed it, or it failed with ``exc``); the end is final.

        Call it exactly once per connection, last; the observer is told here.
        """
        if self.end is None:
            if exc is not None:
                end = describe_os_error(exc)
                stages = self.stages
                failure = stages.connection_lost(end.reason) if stages is not None else None
                if failure is not None:
                    self._stage_failed(failure)
                elif end.kind is EndKind.RESET and self._is_health_check():
                    self._set_end(End(EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)"))
                else:
                    self._set_end(end)
            elif self.stages is not None and not self.stages.done:
                failure = self.stages.connection_lost("connection closed")
                if failure is not None:
                    self._stage_failed(failure)
            elif self.eof_received:
                self._set_end(End(EndKind.CLEAN, _CLOSED_BY_PEER))
            elif self._eof_sent:
                self._set_end(End(EndKind.CLEAN, _CLOSED_LOCALLY))
            else:
                self._set_end(End(EndKind.RESET, "connection lost"))
        self._eof_sent = True  # the socket is gone: nothing more can be sent
        self._lost = True
        if self.state is not State.CLOSED or self._out:
            self.state = State.CLOSED
            self._out.clear()
            self._out_size = 0
        observer, self.observer = self.observer, None  # told once
        if observer is not None:
            observer.connection_ended(self)

    # -- ending -------------------------------------------------------------------------

    def _set_end(self, end: End) -> None:
        if self.end is None:
            self.end = end

    def _begin_end(self, *, then_close: bool) -> None:
        """OPEN -> DRAINING: nothing new is handled; what is queued or owed goes out first."""
        self._eof_sent = True
        if self.state is State.OPEN:
            self.state = State.DRAINING
        if then_close or self.eof_received:
            self._then_close = True
        self._out_paused = False
        self._inbox_paused = False

    def _finish(self, end: End) -> None:
        """Decide an end that needs no flush: CLOSED at once."""
        self._set_end(end)
        self._eof_sent = True
        self.state = State.CLOSED
        self._out_paused = self._inbox_paused = False
        if end.kind.resets:
            self._reset = True
            self._out.clear()
            self._out_size = 0

    def fail(self, kind: EndKind, reason: str, error: BaseException | None = None) -> End:
        """End the connection abnormally (or for a reason of this side's): the one place an end is decided.

        A kind that resets (``kind.resets``) makes the state ``CLOSED`` at once and
        drops what is queued; any other flushes what is queued, then closes.  The
        first end decided is kept, except that an error overrides an orderly end that
        was still finishing (a close that timed out is not clean); and a reset asked
        for later (a timeout, the shutdown deadline, ``abort()``) still resets a
        connection whose end was decided as a flush, even once ``CLOSED``, as long as
        its socket is not gone.

        Returns:
            The connection's end.
        """
        current = self.end
        if current is not None and (self._lost or self._reset):
            return current  # the end is final: the socket is gone, or is being reset
        if current is None or (kind.is_error and not current.kind.is_error):
            self.end = current = End(kind, reason, error)
        if kind.resets or current.kind.resets:
            self._finish(current)
            self._reset = True
            self._out.clear()
            self._out_size = 0
        elif self.state is not State.CLOSED:
            self._begin_end(then_close=True)
        return current

    def fail_protocol(self, exc: ProtocolError) -> End:
        """The peer broke the wire format (``exc`` says how): flush the replies owed, then close."""
        end = _protocol_end(exc)
        return self.fail(end.kind, end.reason, exc)

    def fail_handler(self, exc: BaseException) -> End:
        """The application's handler raised ``exc`` (or returned a wrong type): reset (SPEC §5.0)."""
        end = handler_end(exc)
        return self.fail(end.kind, end.reason, exc)

    def abort(self) -> End:
        """The application resets the connection (``abort()``): nothing more is sent."""
        return self.fail(EndKind.ABORTED, "connection aborted locally")

    def reject(self, reason: str) -> End:
        """A server refuses this connection on arrival (``max_connections``): reset at once."""
        return self.fail(EndKind.REJECTED, reason)

    def send_eof(self, *, keep_receiving: bool = False) -> None:
        """Close gracefully (the Winsock "shutdown send side"): flush, send our EOF, read to the peer's.

        Messages that arrive from now on are counted as discarded.  Does nothing once
        the end is decided.  Stages still running are abandoned on the server side
        (``SHUTDOWN``); a client sends its EOF once they pass.

        Args:
            keep_receiving: only half-close: nothing more is sent, but the messages the
                peer still sends are received as usual (the seeds' client that shuts down
                its sending side, then reads every reply to the peer's EOF).  The state
                stays ``OPEN``; :attr:`close_action` says ``HALF_CLOSE`` once the queue is
                written, and the peer's EOF then ends the connection cleanly.  A later
                ``send_eof()`` (a ``close()``) stops receiving and waits for that EOF.

        Raises:
            InvalidState: ``keep_receiving`` before the stages have passed.
        """
        if self.state is not State.OPEN:
            return
        if keep_receiving:
            if self._eof_sent:
                return
            if not self.handshake_complete:
                raise InvalidState("cannot half-close before the handshake has completed")
            self._eof_sent = True
            self._half_close = True
            if self.stages is not None and self.stages.encrypted:
                self._notify_due = True
            return
        if self._half_closed:  # our EOF is out already: only wait for the peer's
            self._eof_sent = True
            self.state = State.CLOSING
            self._out_paused = self._inbox_paused = False
            return
        stages = self.stages
        if stages is not None and not stages.done:
            if self.server_side:
                self._finish(End(EndKind.SHUTDOWN, "closed during the handshake: server shutting down"))
            else:
                # A client closes what it sent in order: the frames queued so far go out
                # once the stages pass, then the EOF (see _check_stages).
                self._close_when_open = True
            return
        self._begin_end(then_close=False)
        if stages is not None and stages.encrypted:
            # Made when the queue is encrypted (_staged_output): after unwrap() no record can be.
            self._notify_due = True

    def eof_written(self) -> None:
        """The pump shut down the write side (after ``HALF_CLOSE``): wait for the peer's EOF."""
        if self.state is State.OPEN and self._half_close:
            self._half_close = False
            self._half_closed = True
            if self.eof_received:
                self._set_end(End(EndKind.CLEAN, _CLOSED_LOCALLY))
                self.state = State.CLOSED
            return
        if self.state is State.DRAINING:
            if self.eof_received:
                self.state = State.CLOSED
            else:
                self.state = State.CLOSING

    def replies_done(self, n: int = 1) -> None:
        """An asynchronous handler answered ``n`` of the messages counted in :attr:`replies_owed`."""
        self.replies_owed = max(0, self.replies_owed - n)

    # -- sending ----------------------------------------------------------------------

    def send_message(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Encode one message into the outgoing buffer.

        A large body is queued as is, not copied; the caller must not change it until
        it has been written.

        Raises:
            ConnectionClosed: the connection has ended (or is ending); ``kind`` says how.
            OversizeMessage: the body is above ``max_size`` or the field's range.
            InvalidFormat: bad header fields.
            TypeError: ``message`` is not bytes-like (``message must be bytes-like, got str``).
        """
        if self._eof_sent and not (self.state is State.DRAINING and self.replies_owed):
            if self.state is _OPEN:  # half-closed: the connection goes on, sending is misuse
                raise InvalidState("cannot send after send_eof(): the sending side is closed")
            raise self.closed_error()
        pack = self._pack
        if pack is not None and header is None and type(message) is bytes:
            # The common case: plain format, a bytes body (Message needs encode_parts).
            size = len(message)
            if size > self._max_body:
                raise OversizeMessage(size, self._max_body)
            if size <= _JOIN_LIMIT:
                chunk: bytes | bytearray | memoryview = pack(size) + message
                self._queue(chunk, size + self._decoder._hsize)
            else:
                self._queue(pack(size), self._decoder._hsize)
                self._queue(message, size)
            size += self._decoder._hsize
        else:
            if not isinstance(message, _BYTES_TYPES):  # off the fast path: bytes never get here
                raise bytes_like_error(message)
            head, body = self.frame.encode_parts(message, header)
            size = len(head) + (body.nbytes if isinstance(body, memoryview) else len(body))
            if size <= _JOIN_LIMIT:
                # Small frames are joined so a burst of replies becomes one write.
                self._queue(head + body, size)
            else:
                self._queue(head, len(head))
                self._queue(body, size - len(head))
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += size

    def _queue(self, chunk: bytes | bytearray | memoryview, size: int) -> None:
        # With stages, held as plaintext until every stage has passed (see _staged_output).
        self._out.append(chunk)
        self._out_size += size
        if self.server_side and self._out_size > self.limits.write_high_water:
            self._update_out_pause()

    @property
    def outgoing_size(self) -> int:
        """Bytes queued and not yet handed to the I/O layer."""
        return self._out_size

    @property
    def writing_paused(self) -> bool:
        """True when the outgoing buffer is above the high-water mark (``send`` should wait)."""
        return self._out_size > self.limits.write_high_water or self._transport_paused

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Take everything to write now, in order, ready for the wire (``writelines``, ``sendmsg``).

        Handshake bytes come first; application frames are held back until every
        stage has passed, then go out (through TLS when it is in use).
        """
        stages = self.stages
        if stages is not None:
            return self._staged_output(stages)
        if not self._out:
            return []
        chunks = list(self._out)
        self._out.clear()
        self._out_size = 0
        if self._out_paused:
            self._update_out_pause()
        return chunks

    def _staged_output(self, stages: Stages) -> list[bytes | bytearray | memoryview]:
        chunks: list[bytes | bytearray | memoryview] = []
        out = self._out
        while out and type(out[0]) is _Raw:  # made ready earlier (peek_output): older, so first
            chunk = out.popleft()
            self._out_size -= len(chunk)
            chunks.append(chunk)
        raw = stages.data_to_send()
        if raw:
            chunks.append(raw)
        if self._out and (stages.done or stages.failure is not None or self.state is State.CLOSED):
            if stages.done:
                plain: list[bytes | bytearray | memoryview] = []
                for chunk in self._out:
                    if type(chunk) is _Raw:
                        if plain:
                            chunks.append(stages.encrypt(b"".join(plain)))
                            plain = []
                        chunks.append(bytes(chunk))
                    else:
                        plain.append(chunk)
                if plain:
                    chunks.append(stages.encrypt(b"".join(plain)))
            self._out.clear()
            self._out_size = 0
            if self._out_paused:
                self._update_out_pause()
        if self._notify_due and not self._out and not self.replies_owed and stages.done:
            self._notify_due = False
            notify = stages.close_notify()
            if notify:
                chunks.append(notify)
        self._settle_stages()
        return chunks

    def _settle_stages(self) -> None:
        """Drop stages that have passed and leave nothing in the stream (no TLS): the fast path from now on."""
        stages = self.stages
        if stages is not None and stages.done and not stages.encrypted and not stages.has_output:
            self.stages = None

    def peek_output(self) -> bytes | bytearray | memoryview:
        """Return the first chunk to write without taking it (for partial writes); b"" if none.

        With stages, the queue is first made ready for the wire (as by
        :meth:`data_to_send`); then the chunks are taken with :meth:`consume_output`.
        """
        if self.stages is not None:
            ready = self._staged_output(self.stages)
            if ready:
                self._out.extendleft(_Raw(bytes(c)) for c in reversed(ready))
                self._out_size += sum(len(c) for c in ready)
            if self._out and type(self._out[0]) is not _Raw:
                return b""  # application frames wait until every stage has passed
        return self._out[0] if self._out else b""

    def consume_output(self, n: int) -> None:
        """Drop the first ``n`` bytes of the outgoing buffer (what the kernel accepted).

        Raises:
            ValueError: ``n`` is negative or more than is queued (a bookkeeping bug in
                the I/O layer; the buffer is left unchanged).
        """
        if not 0 <= n <= self._out_size:
            raise ValueError(f"cannot consume {n} bytes of {self._out_size} queued")
        out = self._out
        self._out_size -= n
        while n:
            chunk = out[0]
            size = chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
            if n >= size:
                out.popleft()
                n -= size
            else:
                rest = memoryview(chunk).cast("B")[n:]  # bytes, whatever the view's item size
                out[0] = _Raw(rest) if type(chunk) is _Raw else rest
                n = 0
        if self._out_paused:
            self._update_out_pause()


class _Raw(bytes):
    """A queued chunk that is already on-the-wire bytes (not to be encrypted again)."""

    __slots__ = ()


def _passthrough(stages: Stages) -> bool:
    """True for stages that do nothing (no PROXY, TLS or auth): the fast path, as without."""
    return stages.done and not stages.encrypted
