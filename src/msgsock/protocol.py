"""Sans-I/O state of one framed connection, shared by every I/O layer.

Theory of operation.  A :class:`MessageProtocol` sits between a byte stream and the
application.  The I/O layer is a pump (STYLE §1):

1. bytes read from the socket go to :meth:`~MessageProtocol.receive_data`, which
   returns the complete messages; end of stream goes to
   :meth:`~MessageProtocol.receive_eof`;
2. the application's messages go to :meth:`~MessageProtocol.send_message`, which
   encodes them into the outgoing buffer;
3. the I/O layer writes what :meth:`~MessageProtocol.data_to_send` returns (all of it)
   or, for partial writes, :meth:`~MessageProtocol.peek_output` then
   :meth:`~MessageProtocol.consume_output` with the count the kernel took;
4. once the buffer is empty and :attr:`~MessageProtocol.eof_pending` is set, it shuts
   down the write side of the socket.

Close states: each direction closes once.  ``send_eof()`` marks our side done (the
Winsock "shutdown send side" of a graceful close); ``receive_eof()`` marks theirs.
The state is ``OPEN`` until either happens, ``CLOSED`` when both have, or at once
when the peer breaks the protocol (``error`` then holds why).

Limits live in :class:`Limits` so every layer reads the same numbers (SPEC §7).  The
core never reads a clock: it tells the I/O layer when a frame is in progress
(:attr:`~MessageProtocol.in_frame`) so that layer can run the message timeout.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import InvalidState, MessageTooLarge, ProtocolError
from .framing import DEFAULT_FORMAT, FrameDecoder, FrameFormat

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "MessageProtocol",
    "ServerStatistics",
    "State",
    "Statistics",
    "error_kind",
]


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-server limits (SPEC §7).  Timeouts in seconds; None = off.

    Args:
        write_high_water: outgoing bytes above which reading from the peer pauses and
            ``send`` waits (256 KiB).
        write_low_water: outgoing bytes below which it resumes (64 KiB).
        max_connections: concurrent connections a server accepts (10,000).
        idle_timeout: close a connection with no traffic for this long (300 s).
        message_timeout: close a connection whose started frame does not finish (30 s).
        handshake_timeout: TLS, authentication and PROXY header deadline (10 s).
        close_timeout: a graceful close waits this long for the peer's EOF (5 s).
        shutdown_timeout: a stopping server drains connections this long (5 s).
        max_threads: thread cap of the thread-per-connection server (1,000).

    Raises:
        ValueError: a negative value, or low water above high water.
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
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")
        if self.write_low_water > self.write_high_water:
            raise ValueError(
                f"write_low_water {self.write_low_water} is above write_high_water {self.write_high_water}"
            )
        for name in ("idle_timeout", "message_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, not {value!r}")
            if value == 0:  # 0 means off, as on the command line
                object.__setattr__(self, name, None)
        for name in ("close_timeout", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")


DEFAULT_LIMITS = Limits()

_JOIN_LIMIT = 16384
"""Frames up to this size are copied into one chunk with their header (one write);
larger bodies are queued as they are, after their header, so they are not copied."""
_BYTES_TYPES = (bytes, bytearray, memoryview)


class State(enum.Enum):
    """Connection state as the core sees it."""

    OPEN = "open"
    CLOSING = "closing"  # one direction has closed
    CLOSED = "closed"


@dataclass
class Statistics:
    """Counters of one connection (or, summed, of a server)."""

    messages_received: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0

    def add(self, other: Statistics) -> None:
        """Add another set of counters into this one."""
        self.messages_received += other.messages_received
        self.messages_sent += other.messages_sent
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return {
            "messages_received": self.messages_received,
            "messages_sent": self.messages_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }


class MessageProtocol:
    """Framing, outgoing buffer and close state of one connection.  Sans-I/O.

    Args:
        frame: the frame format both peers use.
        limits: the limits in force (the core uses the write water marks).
    """

    __slots__ = (
        "_active_since",
        "_decoder",
        "_frame_messages",
        "_frame_since",
        "_max_body",
        "_out",
        "_out_size",
        "_pack",
        "_seen_bytes",
        "eof_received",
        "eof_sent",
        "error",
        "frame",
        "limits",
        "stats",
    )

    def __init__(self, frame: FrameFormat = DEFAULT_FORMAT, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.frame = frame
        self.limits = limits
        self._decoder = FrameDecoder(frame)
        # Hot-path constants: a plain format (length only, counting the body) encodes
        # with one pack; others go through FrameFormat.encode_parts.
        plain = not frame.field_names and not frame.length_includes_header
        self._pack = frame._struct.pack if plain else None
        self._max_body = frame.max_body
        self._out: deque[bytes | bytearray | memoryview] = deque()
        self._out_size = 0
        self.eof_received = False
        self.eof_sent = False  # send_eof() was called; the EOF goes out after the buffer
        self.error: ProtocolError | None = None
        self.stats = Statistics()
        # Timeout bookkeeping, updated only by check_timeouts() (never on the hot path).
        self._seen_bytes = -1
        self._active_since = 0.0
        self._frame_messages = -1
        self._frame_since = 0.0

    # -- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """OPEN, CLOSING (one direction closed) or CLOSED (both, or a protocol error)."""
        if self.error is not None or (self.eof_received and self.eof_sent):
            return State.CLOSED
        if self.eof_received or self.eof_sent:
            return State.CLOSING
        return State.OPEN

    @property
    def in_frame(self) -> bool:
        """True while a frame has started arriving but is not complete."""
        return self._decoder.in_frame

    @property
    def eof_pending(self) -> bool:
        """True when the I/O layer should shut down its write side now: EOF requested
        and nothing left to send."""
        return self.eof_sent and not self._out

    def check_timeouts(self, now: float) -> str | None:
        """Decide the idle and message-completion timeouts (SPEC §7) at time ``now``.

        The core reads no clock: the I/O layer calls this periodically (one sweep over
        all connections every fraction of the shortest timeout) with its clock's time.
        Activity is seen by comparing the counters with the previous call, so the hot
        path does no timekeeping at all.  A timeout fires between its value and its
        value plus one sweep interval after the last activity.

        Returns:
            The reason to close the connection, or None.
        """
        received = self.stats.bytes_received
        if received != self._seen_bytes:
            self._seen_bytes = received
            self._active_since = now
        limits = self.limits
        if self._decoder._buf:
            # A frame is in progress; it is "the same frame" while no message completes.
            done = self.stats.messages_received
            if done != self._frame_messages:
                self._frame_messages = done
                self._frame_since = now
            elif limits.message_timeout is not None and now - self._frame_since > limits.message_timeout:
                return f"message timeout: a frame was not completed within {limits.message_timeout:g} s"
        else:
            self._frame_messages = -1
        if limits.idle_timeout is not None and now - self._active_since > limits.idle_timeout:
            return f"idle timeout: nothing received for {limits.idle_timeout:g} s"
        return None

    # -- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Feed bytes read from the peer; return the complete messages.

        When the data holds complete messages followed by a bad header, the messages are
        returned and :attr:`error` is set at once (state CLOSED): the I/O layer handles
        the messages, then closes the connection and reports ``error``.  Check ``error``
        after every call.

        Raises:
            ProtocolError: the peer broke the format (the connection is then CLOSED;
                the I/O layer should close the socket and report ``error``).
            InvalidState: data after EOF.
        """
        if self.eof_received:
            raise InvalidState("data received after end of stream")
        decoder = self._decoder
        try:
            messages = decoder.feed(data)
        except ProtocolError as exc:
            self.error = exc
            raise
        stats = self.stats
        stats.bytes_received += len(data)
        stats.messages_received += len(messages)
        if decoder._error is not None:
            self.error = decoder._error
        return messages

    def receive_echo(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes read from the peer; return every complete frame, unchanged, to send back.

        The echo fast path (SPEC §8): headers are checked as :meth:`receive_data`
        checks them, but the frames come back as one span instead of being split into
        messages and re-encoded (the bytes are the same, header fields included).  The
        span is counted as sent; the caller writes it at once, after anything already
        queued (so call :meth:`data_to_send` first if the queue may hold data).

        Returns:
            The bytes to send back (``b""`` when no frame completed).

        Raises:
            As :meth:`receive_data`; InvalidState after ``send_eof()``.
        """
        if self.eof_received:
            raise InvalidState("data received after end of stream")
        if self.eof_sent:
            raise InvalidState("cannot send after the sending side was closed")
        decoder = self._decoder
        try:
            count, span = decoder.feed_span(data)
        except ProtocolError as exc:
            self.error = exc
            raise
        stats = self.stats
        stats.bytes_received += len(data)
        if count:
            stats.messages_received += count
            stats.messages_sent += count
            stats.bytes_sent += len(span)
        if decoder._error is not None:
            self.error = decoder._error
        return span

    def receive_eof(self) -> None:
        """Record that the peer closed its sending side.

        Raises:
            IncompleteMessage: the stream ended inside a frame (recorded as ``error``).
        """
        if self.eof_received:
            return
        self.eof_received = True
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            self.error = exc
            raise

    # -- sending ----------------------------------------------------------------------

    def send_message(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Encode one message into the outgoing buffer.

        A large body is queued as is, not copied; the caller must not change it until
        it has been written.

        Raises:
            InvalidState: after ``send_eof()``.
            MessageTooLarge: the body is above ``max_size`` or the field's range.
            InvalidFormat: bad header fields.
        """
        if self.eof_sent:
            raise InvalidState("cannot send after the sending side was closed")
        pack = self._pack
        if pack is not None and header is None and type(message) is bytes:
            # The common case: plain format, a bytes body (Message needs encode_parts).
            size = len(message)
            if size > self._max_body:
                raise MessageTooLarge(size, self._max_body)
            if size <= _JOIN_LIMIT:
                self._out.append(pack(size) + message)
            else:
                self._out.append(pack(size))
                self._out.append(message)
            size += self._decoder._hsize
        else:
            head, body = self.frame.encode_parts(message, header)
            size = len(head) + (body.nbytes if isinstance(body, memoryview) else len(body))
            if size <= _JOIN_LIMIT:
                # Small frames are joined so a burst of replies becomes one write.
                self._out.append(head + body)
            else:
                self._out.append(head)
                self._out.append(body)
        self._out_size += size
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += size

    def receive_and_reply(
        self, data: bytes | bytearray | memoryview, handler: Callable[[Any], Any]
    ) -> tuple[bytes, Any, list[Any]]:
        """Decode ``data``, call ``handler`` on each message, and encode its replies.

        The per-message server loop in one place (SPEC §8): the replies to one read
        come back as one ``bytes`` to write at once (the outgoing queue is bypassed, so
        it must be empty).  A reply of None means no reply; a ``Message`` keeps its
        header fields.  The loop stops at the first reply that is neither None nor
        bytes-like (for instance an awaitable): it is returned with the messages not
        yet handled, for the I/O layer to deal with.  When the handler raises, the
        replies computed before are queued (see :meth:`data_to_send`) and the
        exception propagates.

        Returns:
            ``(to_send, other, rest)``: the encoded replies; the reply that stopped the
            loop (None if none did); the messages after it.

        Raises:
            As :meth:`receive_data` and :meth:`send_message`, and whatever ``handler`` raises.
        """
        messages = self.receive_data(data)
        if not messages:
            return b"", None, []
        if self.eof_sent:
            raise InvalidState("cannot send after the sending side was closed")
        pack = self._pack
        max_body = self._max_body
        hsize = self._decoder._hsize
        parts: list[Any] = []
        count = total = 0  # replies encoded so far, and their bytes on the wire
        try:
            for i, message in enumerate(messages):
                reply = handler(message)
                if reply is None:
                    continue
                if pack is not None and type(reply) is bytes:
                    size = len(reply)
                    if size > max_body:
                        raise MessageTooLarge(size, max_body)
                    parts.append(pack(size))
                    parts.append(reply)
                    total += hsize + size
                elif isinstance(reply, _BYTES_TYPES):
                    head, body = self.frame.encode_parts(reply)
                    parts.append(head)
                    parts.append(body)
                    total += hsize + (body.nbytes if isinstance(body, memoryview) else len(body))
                else:
                    return b"".join(parts), reply, messages[i + 1 :]
                count += 1
        except BaseException:
            if parts:  # the replies before the failure still go out
                self._out.append(b"".join(parts))
                self._out_size += total
            raise
        finally:
            stats = self.stats
            stats.messages_sent += count
            stats.bytes_sent += total
        return b"".join(parts), None, []

    def send_eof(self) -> None:
        """Close our sending side once the outgoing buffer has been written."""
        self.eof_sent = True

    @property
    def outgoing_size(self) -> int:
        """Bytes queued and not yet handed to the I/O layer."""
        return self._out_size

    @property
    def writing_paused(self) -> bool:
        """True when the outgoing buffer is above the high-water mark."""
        return self._out_size > self.limits.write_high_water

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Take everything queued for sending (for ``writelines`` or ``sendmsg``)."""
        chunks = list(self._out)
        self._out.clear()
        self._out_size = 0
        return chunks

    def peek_output(self) -> bytes | bytearray | memoryview:
        """Return the first queued chunk without taking it (for partial writes); b"" if none."""
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
                out[0] = memoryview(chunk)[n:]
                n = 0


_ERROR_KINDS = (
    ("message size", "message too large"),
    ("idle timeout", "idle timeout"),
    ("message timeout", "message timeout"),
    ("handshake timeout", "handshake timeout"),
    ("did not complete within", "handshake timeout"),
    ("shutdown_timeout", "shutdown deadline"),
    ("authentication", "authentication"),
    ("TLS", "tls"),
    ("PROXY", "proxy protocol"),
    ("handler raised", "handler error"),
    ("reset", "reset"),
    ("broken pipe", "reset"),
    ("stream ended", "incomplete message"),
    ("incomplete", "incomplete message"),
    ("close_timeout", "close timeout"),
)


def error_kind(reason: str) -> str:
    """The kind of an abnormal end, from the reason the servers log (for the summary).

    The servers' reasons start with the limit or the check that fired (SPEC §7): this
    maps them to a short name such as ``idle timeout`` or ``message too large``.
    """
    for needle, kind in _ERROR_KINDS:
        if needle in reason:
            return kind
    return "other"


@dataclass
class ServerStatistics(Statistics):
    """Counters of a server, for its shutdown summary (SPEC §6.1)."""

    connections: int = 0
    """Connections accepted in all."""
    active: int = 0
    """Connections open now."""
    rejected: int = 0
    """Connections closed at once because a limit (max connections, threads) was reached."""
    errors: int = 0
    """Connections that ended abnormally: protocol errors, resets, timeouts, handler errors."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    """``errors`` by kind (see :func:`error_kind`)."""

    def count_error(self, reason: str) -> None:
        """Count one abnormal end, under the kind of ``reason``."""
        self.errors += 1
        kind = error_kind(reason)
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def add_server(self, other: ServerStatistics) -> None:
        """Add every counter of another server's statistics into these."""
        self.add(other)
        self.connections += other.connections
        self.active += other.active
        self.rejected += other.rejected
        self.errors += other.errors
        for kind, n in other.error_kinds.items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + n

    def summary(self) -> str:
        """One line: connections, messages, bytes, errors (by kind)."""
        kinds = ", ".join(
            f"{n} {kind}" for kind, n in sorted(self.error_kinds.items(), key=lambda kv: -kv[1])
        )
        return (
            f"{self.connections} connections ({self.rejected} rejected), "
            f"{self.messages_received} messages in / {self.messages_sent} out, "
            f"{self.bytes_received} bytes in / {self.bytes_sent} out, {self.errors} errors"
            + (f" ({kinds})" if kinds else "")
        )

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (``error_kinds`` as a nested dict)."""
        return {
            "connections": self.connections,
            "active": self.active,
            "rejected": self.rejected,
            "errors": self.errors,
            "error_kinds": dict(self.error_kinds),
            **super().as_dict(),
        }
