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

The class is built in two parts: its base ``Lifecycle`` (in ``msgsock._lifecycle``)
holds the stages, the close state machine, the timeouts and the end;
:class:`MessageProtocol` adds the frames in and out and the flow control.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._lifecycle import (
    _BYTES_TYPES,
    Action,
    ConnectionObserver,
    End,
    Lifecycle,
    State,
    Statistics,
    check_reply,
    describe_os_error,
    format_address,
    handler_end,
)
from .exceptions import InvalidState, OversizeMessage, ProtocolError
from .framing import DEFAULT_FORMAT, FrameDecoder, FrameFormat, bytes_like_error
from .stages import Stages

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

MESSAGE_OVERHEAD = 32
"""Bytes charged per message waiting for the application, on top of its body, so
that a flood of empty messages is bounded too."""

_OPEN = State.OPEN  # a module global is read faster than an enum member, on the hot path


class MessageProtocol(Lifecycle):
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

    __slots__ = ("_max_body", "_pack", "frame", "pump")

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
        self.pump: Any = None
        """Free for the I/O layer: the object that owns the socket of this protocol."""
        self._decoder = FrameDecoder(frame)
        # Hot-path constants: a plain format (length only, counting the body) encodes
        # with one pack; others go through FrameFormat.encode_parts.
        plain = not frame.field_names and not frame.length_includes_header
        self._pack = frame._struct.pack if plain else None
        self._max_body = frame.max_body
        super().__init__(
            limits=limits,
            server_side=server_side,
            stages=stages,
            close_on_eof=close_on_eof,
            peer_address=peer_address,
            observer=observer,
        )
        if self.stages is not None:
            self._check_stages()  # a client's first flight, or a stage that is already done

    @property
    def in_frame(self) -> bool:
        """True while a frame has started arriving but is not complete."""
        return self._decoder.in_frame

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
