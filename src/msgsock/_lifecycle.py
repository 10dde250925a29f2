"""How a connection ends, and how that is worded and counted: the base of :class:`~msgsock.protocol.MessageProtocol`.

:class:`Lifecycle` holds every decision of a connection that is not about frames: the
stages passing, the close state machine (``OPEN``, ``DRAINING``, ``CLOSING``,
``CLOSED``) and its :attr:`~Lifecycle.close_action`, the timeouts, the peer's EOF, a
lost socket, and the one :class:`End` each connection gets.
:class:`~msgsock.protocol.MessageProtocol` adds the frames (decoding what arrives,
encoding and queueing what is sent, flow control) on top; the module notes of
:mod:`msgsock.protocol` are the theory of operation of both.  The types here
(:class:`State`, :class:`Action`, :class:`End`, :class:`Statistics`, ...) are
re-exported, and documented, by :mod:`msgsock.protocol`.
"""

from __future__ import annotations

import enum
import inspect
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from .exceptions import (
    ConnectionClosed,
    EndKind,
    FrameError,
    IncompleteMessage,
    InvalidState,
    MessageTooLarge,
    ProtocolError,
)
from .stages import StageFailure, Stages

if TYPE_CHECKING:
    from .framing import FrameDecoder
    from .protocol import Limits, MessageProtocol

_BYTES_TYPES = (bytes, bytearray, memoryview)

_MIN_GRANULARITY = 0.01
_MAX_GRANULARITY = 1.0


class State(enum.Enum):
    """Connection state as the core sees it (see the module's theory of operation)."""

    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"
    CLOSED = "closed"


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


class Lifecycle:
    """The lifecycle of one connection: its stages, its end, its timeouts.  Sans-I/O.

    The base of :class:`~msgsock.protocol.MessageProtocol`, which documents the
    arguments; used through it, never alone.  It holds the state of the connection
    (every attribute but the frame format's), so the frames part only reads it.
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
        "_notify_due",
        "_out",
        "_out_paused",
        "_out_size",
        "_proxy_info",
        "_reset",
        "_seen_bytes",
        "_started",
        "_then_close",
        "_transport_paused",
        "close_on_eof",
        "end",
        "eof_received",
        "limits",
        "observer",
        "peer",
        "peer_address",
        "replies_owed",
        "server_side",
        "stages",
        "state",
        "stats",
    )

    _decoder: FrameDecoder
    """The frame decoder (set by the subclass): read here only to see a frame in progress."""

    def __init__(
        self,
        *,
        limits: Limits,
        server_side: bool,
        stages: Stages | None,
        close_on_eof: bool,
        peer_address: Any,
        observer: ConnectionObserver | None,
    ) -> None:
        self.limits = limits
        self.server_side = server_side
        self.close_on_eof = close_on_eof
        self.observer = observer
        self.peer_address = peer_address
        self.peer = format_address(peer_address)
        """The peer as log lines name it (the proxied client once a PROXY header named one)."""
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

    # -- stages -----------------------------------------------------------------------

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
                self.observer.connection_opened(cast("MessageProtocol", self))
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

    # -- the peer's end, the socket's end --------------------------------------------

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
            observer.connection_ended(cast("MessageProtocol", self))

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


def _passthrough(stages: Stages) -> bool:
    """True for stages that do nothing (no PROXY, TLS or auth): the fast path, as without."""
    return stages.done and not stages.encrypted
