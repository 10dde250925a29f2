"""Tests of the sans-I/O connection lifecycle (protocol.py; SPEC §5.0, §7, STYLE §8, §11).

Each state of the theory of operation (OPEN -> DRAINING -> CLOSING -> CLOSED), the
``close_action`` a pump reads at each step, the end kinds and their wording, flow
control, and the timeouts with an injected clock.  The stages (PROXY/TLS/auth) have
their own tests in ``test_stages.py``; the server's bookkeeping in ``test_serving.py``.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgsock.exceptions import (
    ConnectionClosed,
    EndKind,
    IncompleteMessage,
    InvalidFormat,
    InvalidState,
    MessageTooLarge,
    OversizeMessage,
    ProtocolError,
)
from msgsock.framing import FrameFormat, Message, encode
from msgsock.protocol import (
    DEFAULT_LIMITS,
    MESSAGE_OVERHEAD,
    Action,
    End,
    Limits,
    MessageProtocol,
    State,
    Statistics,
    check_reply,
    describe_os_error,
    format_address,
)
from msgsock.stages import Stages

# -- helpers ------------------------------------------------------------------------------


def _state(proto: MessageProtocol) -> State:
    # A call, so the type checker does not narrow ``state`` across the steps of a test.
    return proto.state


def _action(proto: MessageProtocol) -> Action | None:
    return proto.close_action


def _wire(proto: MessageProtocol) -> bytes:
    """Everything data_to_send() hands the pump, joined as it goes on the wire."""
    return b"".join(bytes(chunk) for chunk in proto.data_to_send())


def _drain_partially(proto: MessageProtocol, step: int) -> bytes:
    """Write the outgoing buffer the way a non-blocking socket does: ``step`` bytes per call."""
    out = bytearray()
    for _ in range(10_000_000):  # bounded: one iteration per accepted slice
        chunk = proto.peek_output()
        if not chunk:
            break
        accepted = bytes(chunk)[:step]
        out += accepted
        proto.consume_output(len(accepted))
    return bytes(out)


class Observer:
    """A ConnectionObserver that records what it is told."""

    def __init__(self) -> None:
        self.opened: list[MessageProtocol] = []
        self.ended: list[MessageProtocol] = []

    def connection_opened(self, proto: MessageProtocol) -> None:
        self.opened.append(proto)

    def connection_ended(self, proto: MessageProtocol) -> None:
        self.ended.append(proto)


NO_TIMEOUTS = Limits(idle_timeout=None, message_timeout=None, handshake_timeout=None)

RESET_KINDS = [kind for kind in EndKind if kind.resets]
FLUSH_KINDS = [kind for kind in EndKind if not kind.resets]


# -- receiving ----------------------------------------------------------------------------


def test_receive_data_returns_messages_and_counts() -> None:
    """receive_data returns the complete messages and counts bytes and messages received."""
    proto = MessageProtocol()
    stream = encode(b"one") + encode(b"two") + encode(b"three")[:5]
    assert proto.receive_data(stream[:3]) == []
    assert proto.in_frame
    assert proto.receive_data(memoryview(stream)[3:]) == [b"one", b"two"]
    assert proto.in_frame
    assert proto.receive_data(bytearray(encode(b"three")[5:])) == [b"three"]
    assert not proto.in_frame
    assert proto.stats.messages_received == 3
    assert proto.stats.bytes_received == len(encode(b"one") + encode(b"two") + encode(b"three"))
    assert _state(proto) is State.OPEN and proto.end is None


def test_receive_with_header_fields() -> None:
    """With extra header fields, received messages carry their header."""
    fmt = FrameFormat.parse("u16le+kind:B")
    proto = MessageProtocol(fmt)
    (msg,) = proto.receive_data(bytes.fromhex("0100 04 78"))
    assert isinstance(msg, Message)
    assert (bytes(msg), msg.header) == (b"x", {"kind": 4})


@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
def test_oversize_frame_becomes_state_not_an_exception(as_view: bool) -> None:
    """An oversize header does not raise: the good frames before it come back and the end is MESSAGE_TOO_LARGE."""
    proto = MessageProtocol(FrameFormat(max_size=4))
    data = bytes.fromhex("00000002 6f6b 00000005 3132333435")
    assert proto.receive_data(memoryview(data) if as_view else data) == [b"ok"]
    assert _state(proto) is State.DRAINING
    assert proto.end is not None
    assert proto.end.kind is EndKind.MESSAGE_TOO_LARGE
    assert proto.end.reason == "message size 5 exceeds max_size 4"
    assert isinstance(proto.end.error, MessageTooLarge)
    assert _action(proto) is Action.CLOSE  # nothing owed: close now
    assert proto.stats.messages_received == 1
    # What follows is neither raised nor counted: the stream position is lost.
    assert proto.receive_data(encode(b"ok")) == []
    assert proto.stats.messages_received == 1
    assert proto.stats.messages_discarded == 0


def test_oversize_header_alone_becomes_state() -> None:
    """An oversize header with nothing before it ends the connection without raising and returns no message."""
    proto = MessageProtocol(FrameFormat(max_size=4))
    assert proto.receive_data(bytes.fromhex("00000002 6f6b")) == [b"ok"]
    assert proto.receive_data(bytes.fromhex("0000")) == []
    assert proto.receive_data(bytes.fromhex("0005")) == []
    assert proto.end is not None and proto.end.kind is EndKind.MESSAGE_TOO_LARGE
    exc = proto.closed_error()
    assert (exc.clean, exc.kind, exc.reason) == (False, EndKind.MESSAGE_TOO_LARGE, proto.end.reason)
    assert exc.__cause__ is proto.end.error


def test_frame_error_with_length_including_header() -> None:
    """A length below the header size (``!`` formats) is a FRAME_ERROR; the frames before it come back."""
    fmt = FrameFormat.parse("u16be!")
    proto = MessageProtocol(fmt)
    assert proto.receive_data(bytes.fromhex("0004 6f6b 0001 ff")) == [b"ok"]
    assert proto.end is not None
    assert proto.end.kind is EndKind.FRAME_ERROR
    assert proto.end.reason == "frame length 1 is smaller than the 2-byte header"
    assert _state(proto) is State.DRAINING


def test_protocol_error_flushes_the_replies_owed_then_closes() -> None:
    """After a bad frame a server still answers the messages before it (counted as owed), then closes with a FIN."""
    proto = MessageProtocol(FrameFormat(max_size=4), server_side=True, close_on_eof=True)
    messages = proto.receive_data(encode(b"ok") + struct.pack(">I", 5))
    assert messages == [b"ok"]
    proto.replies_owed += len(messages)  # as a pump does for the messages it hands to its handler
    assert _action(proto) is None
    proto.send_message(messages[0])
    proto.replies_done()
    assert _action(proto) is None  # the reply is not written yet
    assert _wire(proto) == encode(b"ok")
    assert _action(proto) is Action.CLOSE
    proto.connection_lost(None)
    assert proto.end is not None and proto.end.kind is EndKind.MESSAGE_TOO_LARGE


def test_eof_at_a_frame_boundary_keeps_a_client_open() -> None:
    """A peer's EOF at a frame boundary ends nothing by itself without close_on_eof: the application decides."""
    proto = MessageProtocol()
    proto.receive_data(encode(b"last"))
    proto.receive_eof()
    assert proto.eof_received
    assert _state(proto) is State.OPEN
    assert _action(proto) is None
    assert proto.end is None
    proto.receive_eof()  # a second EOF changes nothing
    assert _state(proto) is State.OPEN


@pytest.mark.parametrize(
    ("stream", "received", "expected", "reason"),
    [
        (bytes.fromhex("00000006 616263"), 7, 10, "stream ended after 7 bytes of 10 of an unfinished frame"),
        (bytes.fromhex("0000"), 2, None, "stream ended after 2 bytes of an unfinished frame"),
    ],
)
def test_frame_cut_by_eof_is_incomplete_message(
    stream: bytes, received: int, expected: int | None, reason: str
) -> None:
    """EOF inside a frame ends the connection as INCOMPLETE_MESSAGE (no exception), with the byte counts."""
    proto = MessageProtocol(close_on_eof=True)
    proto.receive_data(stream)
    proto.receive_eof()
    end = proto.end
    assert end is not None
    assert end.kind is EndKind.INCOMPLETE_MESSAGE
    assert end.reason == reason
    assert isinstance(end.error, IncompleteMessage)
    assert (end.error.received, end.error.expected) == (received, expected)
    assert _state(proto) is State.DRAINING
    assert _action(proto) is Action.CLOSE
    exc = proto.closed_error()
    assert (exc.clean, exc.kind) == (False, EndKind.INCOMPLETE_MESSAGE)


# -- close states: our close, the peer's close --------------------------------------------


def test_our_close_walks_every_state() -> None:
    """send_eof: DRAINING until written, HALF_CLOSE, CLOSING after eof_written, CLOSED at the peer's EOF."""
    proto = MessageProtocol()
    proto.send_message(b"bye")
    assert (_state(proto), _action(proto)) == (State.OPEN, None)
    proto.send_eof()
    assert (_state(proto), _action(proto)) == (State.DRAINING, None)  # "bye" is still queued
    assert proto.close_expected
    assert _wire(proto) == encode(b"bye")
    assert _action(proto) is Action.HALF_CLOSE
    proto.eof_written()
    assert (_state(proto), _action(proto)) == (State.CLOSING, None)  # read to the peer's EOF
    proto.receive_eof()
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.CLOSE)
    assert proto.end == End(EndKind.CLEAN, "connection closed locally")
    proto.connection_lost(None)
    assert proto.end == End(EndKind.CLEAN, "connection closed locally")
    exc = proto.closed_error()
    assert (exc.clean, exc.kind, exc.reason) == (True, EndKind.CLEAN, "connection closed locally")


def test_send_eof_is_idempotent_and_later_sends_fail() -> None:
    """A second send_eof changes nothing; send_message after it raises ConnectionClosed and queues nothing."""
    proto = MessageProtocol()
    proto.send_eof()
    proto.send_eof()
    assert _state(proto) is State.DRAINING
    with pytest.raises(ConnectionClosed) as info:
        proto.send_message(b"late")
    assert (info.value.clean, info.value.kind, info.value.reason) == (
        True,
        EndKind.CLEAN,
        "connection closed locally",
    )
    assert proto.outgoing_size == 0
    assert proto.stats.messages_sent == 0


def test_peer_close_first_then_ours() -> None:
    """The peer's EOF first (no close_on_eof): replies can still be sent; our send_eof then closes at once once written."""
    proto = MessageProtocol()
    proto.receive_eof()
    proto.send_message(b"reply")  # a half-closed peer still reads our replies
    proto.send_eof()
    assert (_state(proto), _action(proto)) == (State.DRAINING, None)
    assert _wire(proto) == encode(b"reply")
    assert _action(proto) is Action.CLOSE  # the peer's EOF is in: no half-close, no wait
    proto.connection_lost(None)
    assert _state(proto) is State.CLOSED
    assert proto.end == End(EndKind.CLEAN, "peer closed the connection")


def test_close_on_eof_closes_after_the_peer_eof() -> None:
    """A per-message server (close_on_eof) closes once the peer's EOF is in and nothing is owed."""
    proto = MessageProtocol(server_side=True, close_on_eof=True)
    proto.receive_data(encode(b"a"))
    proto.receive_eof()
    assert (_state(proto), _action(proto)) == (State.DRAINING, Action.CLOSE)
    assert proto.end == End(EndKind.CLEAN, "peer closed the connection")
    with pytest.raises(ConnectionClosed) as info:
        proto.send_message(b"too late")
    assert (info.value.kind, info.value.reason) == (EndKind.CLEAN, "peer closed the connection")


def test_peer_eof_while_draining_closes_without_waiting() -> None:
    """The peer's EOF while we drain: CLOSE (no half-close) once the queue is written."""
    proto = MessageProtocol()
    proto.send_message(b"bye")
    proto.send_eof()
    proto.receive_eof()
    assert (_state(proto), _action(proto)) == (State.DRAINING, None)
    proto.data_to_send()
    assert _action(proto) is Action.CLOSE
    assert proto.end == End(EndKind.CLEAN, "connection closed locally")


def test_eof_written_after_the_peer_eof_is_closed() -> None:
    """eof_written when the peer's EOF already arrived goes straight to CLOSED."""
    proto = MessageProtocol()
    proto.send_eof()
    assert _action(proto) is Action.HALF_CLOSE
    proto.receive_eof()
    proto.eof_written()
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.CLOSE)


def test_eof_written_outside_draining_changes_nothing() -> None:
    """eof_written is only meaningful in DRAINING: elsewhere it does nothing."""
    proto = MessageProtocol()
    proto.eof_written()
    assert _state(proto) is State.OPEN
    proto.abort()
    proto.eof_written()
    assert _state(proto) is State.CLOSED


def test_replies_owed_delay_the_close() -> None:
    """With replies owed (an async handler), close_action stays None and sending stays allowed until they are done."""
    proto = MessageProtocol(server_side=True, close_on_eof=True)
    assert proto.receive_data(encode(b"1") + encode(b"2")) == [b"1", b"2"]
    proto.replies_owed += 2
    proto.receive_eof()
    assert (_state(proto), _action(proto)) == (State.DRAINING, None)
    proto.send_message(b"1")
    proto.replies_done()
    assert _action(proto) is None  # one owed, one queued
    assert _wire(proto) == encode(b"1")
    assert _action(proto) is None  # one still owed
    proto.send_message(b"2")
    proto.replies_done()
    assert _action(proto) is None  # queued
    assert _wire(proto) == encode(b"2")
    assert _action(proto) is Action.CLOSE
    proto.replies_done(5)
    assert proto.replies_owed == 0  # never below zero
    with pytest.raises(ConnectionClosed):
        proto.send_message(b"3")  # nothing owed any more
    assert proto.stats.messages_sent == 2


def test_close_action_of_a_half_closing_client_waits_for_the_queue() -> None:
    """HALF_CLOSE is said only once every queued byte was taken, partial writes included."""
    proto = MessageProtocol()
    proto.send_message(b"bye")
    proto.send_eof()
    proto.consume_output(6)
    assert _action(proto) is None
    proto.consume_output(1)
    assert _action(proto) is Action.HALF_CLOSE


# -- fail, abort, reject --------------------------------------------------------------------


@pytest.mark.parametrize("kind", RESET_KINDS, ids=[k.name for k in RESET_KINDS])
def test_fail_with_a_reset_kind_closes_at_once(kind: EndKind) -> None:
    """A kind that resets: CLOSED at once, the queue dropped, close_action ABORT."""
    proto = MessageProtocol()
    proto.send_message(b"queued")
    cause = RuntimeError("why")
    end = proto.fail(kind, "the reason", cause)
    assert end == End(kind, "the reason", cause)
    assert proto.end is end
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.ABORT)
    assert proto.outgoing_size == 0
    assert proto.data_to_send() == []
    assert proto.peek_output() == b""
    assert not proto.reading_paused
    assert proto.check_timeouts(1e9) is None and proto.next_deadline(0.0) is None


@pytest.mark.parametrize("kind", FLUSH_KINDS, ids=[k.name for k in FLUSH_KINDS])
def test_fail_with_a_flush_kind_writes_what_is_queued_then_closes(kind: EndKind) -> None:
    """A kind that does not reset: DRAINING, the queue still goes out, then CLOSE (never HALF_CLOSE)."""
    proto = MessageProtocol()
    proto.send_message(b"queued")
    end = proto.fail(kind, "the reason")
    assert (end.kind, end.reason, end.error) == (kind, "the reason", None)
    assert (_state(proto), _action(proto)) == (State.DRAINING, None)
    assert _wire(proto) == encode(b"queued")
    assert _action(proto) is Action.CLOSE


def test_the_first_end_decided_is_kept() -> None:
    """fail() after an end was decided returns the first one; after CLOSED nothing changes at all."""
    proto = MessageProtocol()
    first = proto.fail(EndKind.MESSAGE_TOO_LARGE, "first")
    assert proto.fail(EndKind.FRAME_ERROR, "second") is first
    assert proto.end is first
    closed = MessageProtocol()
    aborted = closed.abort()
    assert closed.fail(EndKind.IDLE_TIMEOUT, "later") is aborted
    assert closed.fail_handler(ValueError("boom")) is aborted
    assert _state(closed) is State.CLOSED


def test_abort_resets_and_says_so() -> None:
    """abort(): ABORTED, reset at once; the application's error says it was aborted locally."""
    proto = MessageProtocol()
    proto.send_message(b"x")
    end = proto.abort()
    assert end == End(EndKind.ABORTED, "connection aborted locally")
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.ABORT)
    with pytest.raises(ConnectionClosed) as info:
        proto.send_message(b"y")
    assert (info.value.clean, info.value.kind, info.value.reason) == (
        False,
        EndKind.ABORTED,
        "connection aborted locally",
    )


def test_reject_resets_with_the_reason() -> None:
    """reject(): REJECTED with the given reason, reset at once."""
    proto = MessageProtocol(server_side=True)
    end = proto.reject("2 connections open (limit 2)")
    assert end == End(EndKind.REJECTED, "2 connections open (limit 2)")
    assert _action(proto) is Action.ABORT


def test_fail_handler_words_the_exception() -> None:
    """fail_handler(): HANDLER_ERROR, a reset, the reason naming the exception type and text."""
    proto = MessageProtocol(server_side=True)
    exc = ValueError("boom")
    end = proto.fail_handler(exc)
    assert end == End(EndKind.HANDLER_ERROR, "handler raised ValueError: boom", exc)
    assert _action(proto) is Action.ABORT


def test_fail_protocol_maps_each_error_to_its_kind() -> None:
    """fail_protocol() maps each ProtocolError to its end kind and keeps the error's words."""
    cases: list[tuple[ProtocolError, EndKind]] = [
        (MessageTooLarge(5, 4), EndKind.MESSAGE_TOO_LARGE),
        (IncompleteMessage(3, 10), EndKind.INCOMPLETE_MESSAGE),
        (ProtocolError("odd"), EndKind.FRAME_ERROR),
    ]
    for exc, kind in cases:
        proto = MessageProtocol()
        assert proto.fail_protocol(exc) == End(kind, str(exc), exc)


# -- connection_lost ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (None, EndKind.RESET, "connection lost"),
        (
            ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
            EndKind.RESET,
            "connection reset by peer",
        ),
        (ConnectionAbortedError(errno.ECONNABORTED, "aborted"), EndKind.RESET, "connection reset by peer"),
        (
            BrokenPipeError(errno.EPIPE, "Broken pipe"),
            EndKind.RESET,
            "broken pipe (peer closed while we were sending)",
        ),
        (OSError(errno.EHOSTUNREACH, "No route to host"), EndKind.OS_ERROR, "OSError: No route to host"),
        (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), EndKind.OS_ERROR, "timed out"),
        (OSError("odd"), EndKind.OS_ERROR, "OSError: odd"),
        (OSError(), EndKind.OS_ERROR, "OSError"),
    ],
    ids=["none", "reset", "aborted", "broken-pipe", "unreachable", "timeout", "text", "bare"],
)
def test_connection_lost_words_the_os_error_once(
    exc: BaseException | None, kind: EndKind, reason: str
) -> None:
    """connection_lost on an open connection: the OSError (or none) becomes the end, worded here."""
    observer = Observer()
    proto = MessageProtocol(observer=observer)
    proto.send_message(b"never written")
    proto.connection_lost(exc)
    assert proto.end == End(kind, reason, exc)
    assert _state(proto) is State.CLOSED
    assert proto.outgoing_size == 0
    assert observer.ended == [proto]
    error = proto.closed_error()
    assert (error.clean, error.kind) == (False, kind)


def test_connection_lost_keeps_an_end_already_decided() -> None:
    """A reset after an end was decided does not replace it; the observer is told exactly once."""
    observer = Observer()
    proto = MessageProtocol(server_side=True, observer=observer)
    proto.fail_handler(ValueError("boom"))
    proto.connection_lost(ConnectionResetError())
    proto.connection_lost(None)
    assert proto.end is not None and proto.end.kind is EndKind.HANDLER_ERROR
    assert observer.ended == [proto]
    assert proto.observer is None


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda p: p.receive_eof(), "peer closed the connection"),
        (lambda p: p.send_eof(), "connection closed locally"),
    ],
    ids=["after-peer-eof", "after-our-eof"],
)
def test_connection_lost_after_an_eof_is_clean(setup: Callable[[MessageProtocol], None], reason: str) -> None:
    """The socket gone after an EOF either way, with no error: a clean end, worded by who closed."""
    proto = MessageProtocol()
    setup(proto)
    proto.connection_lost(None)
    assert proto.end == End(EndKind.CLEAN, reason)


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (ConnectionResetError(), EndKind.RESET, "connection reset by peer"),
        (ConnectionAbortedError(), EndKind.RESET, "connection reset by peer"),
        (BrokenPipeError(), EndKind.RESET, "broken pipe (peer closed while we were sending)"),
        (TimeoutError(), EndKind.OS_ERROR, "timed out"),
        (OSError(errno.ENETDOWN, "Network is down"), EndKind.OS_ERROR, "OSError: Network is down"),
        (
            ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            EndKind.OS_ERROR,
            "ConnectionRefusedError: Connection refused",
        ),
        (ValueError("not an OSError"), EndKind.OS_ERROR, "ValueError: not an OSError"),
    ],
)
def test_describe_os_error(exc: BaseException, kind: EndKind, reason: str) -> None:
    """describe_os_error words each OSError once, for every layer, and keeps the exception."""
    assert describe_os_error(exc) == End(kind, reason, exc)


# -- discarded messages ---------------------------------------------------------------------


def test_messages_after_send_eof_are_discarded_not_received() -> None:
    """Messages that arrive after send_eof are counted as discarded, never as received, and not returned."""
    proto = MessageProtocol()
    assert proto.receive_data(encode(b"kept") + encode(b"half")[:5]) == [b"kept"]
    proto.send_eof()
    proto.data_to_send()
    proto.eof_written()
    assert proto.receive_data(encode(b"half")[5:] + encode(b"a") + encode(b"b")) == []
    assert proto.receive_echo(encode(b"c")) == b""
    stats = proto.stats
    assert (stats.messages_received, stats.messages_discarded) == (1, 3 + 1)
    assert stats.bytes_received == len(encode(b"kept") + encode(b"half") + encode(b"a") * 3)
    assert stats.messages_sent == 0


def test_messages_after_a_handler_error_are_discarded() -> None:
    """Bytes read after the end is decided are discarded; bad bytes then are neither raised nor counted."""
    proto = MessageProtocol(FrameFormat(max_size=4), server_side=True)
    proto.fail(EndKind.OS_ERROR, "x")
    assert proto.receive_data(encode(b"ok") + encode(b"ok")) == []
    assert proto.receive_data(encode(b"toolong")) == []
    assert proto.receive_data(encode(b"ok")) == []
    assert (proto.stats.messages_received, proto.stats.messages_discarded) == (0, 2)


def test_statistics_add_and_as_dict() -> None:
    """Statistics add field by field (discarded included) and export as a dict."""
    a = Statistics(1, 2, 3, 4, 5)
    a.add(Statistics(10, 20, 30, 40, 50))
    assert a.as_dict() == {
        "messages_received": 11,
        "messages_sent": 22,
        "bytes_received": 33,
        "bytes_sent": 44,
        "messages_discarded": 55,
    }


# -- receive_echo -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["u32be", "u16le", "u32be+kind:B", "magic:H+u16be!"])
def test_receive_echo_returns_exactly_the_frames_received_in_any_split(spec: str) -> None:
    """The echo fast path returns byte-identical frames, whatever the split of the input."""
    fmt = FrameFormat.parse(spec)
    header = {name: 7 for name in fmt.field_names}
    stream = b"".join(fmt.encode(b"x" * size, header) for size in (0, 1, 5, 300))
    for split in range(len(stream) + 1):
        proto = MessageProtocol(fmt, server_side=True)
        assert proto.receive_echo(stream[:split]) + proto.receive_echo(memoryview(stream)[split:]) == stream
        assert proto.stats.messages_received == proto.stats.messages_sent == 4
        assert proto.stats.bytes_received == proto.stats.bytes_sent == len(stream)


def test_receive_echo_checks_headers_and_keeps_earlier_frames() -> None:
    """An oversize header stops the echo without raising; the frames before it are still echoed."""
    fmt = FrameFormat(max_size=10)
    proto = MessageProtocol(fmt, server_side=True)
    good = fmt.encode(b"ok")
    assert proto.receive_echo(good + struct.pack(">I", 11) + b"rest") == good
    assert proto.end is not None and proto.end.kind is EndKind.MESSAGE_TOO_LARGE
    assert _action(proto) is Action.CLOSE
    assert proto.receive_echo(good) == b""
    alone = MessageProtocol(fmt, server_side=True)
    assert alone.receive_echo(memoryview(struct.pack(">I", 11))) == b""
    assert alone.end is not None and alone.end.reason == "message size 11 exceeds max_size 10"


def test_receive_echo_frame_error() -> None:
    """A header no sender could produce ends the echo as FRAME_ERROR, after the good frames."""
    proto = MessageProtocol(FrameFormat.parse("u16be!"), server_side=True)
    assert proto.receive_echo(bytes.fromhex("0003 41 0000")) == bytes.fromhex("0003 41")
    assert proto.end is not None and proto.end.kind is EndKind.FRAME_ERROR


# -- receive_and_reply ----------------------------------------------------------------------


def test_receive_and_reply_encodes_replies_in_one_chunk() -> None:
    """Replies to one read come back as one bytes; None is no reply; a Message keeps its header."""
    fmt = FrameFormat.parse("u32be+kind:B")
    proto = MessageProtocol(fmt, server_side=True)
    data = fmt.encode(b"a", {"kind": 1}) + fmt.encode(b"skip") + fmt.encode(b"bc", {"kind": 2})
    out, other, rest = proto.receive_and_reply(data, lambda m: None if m == b"skip" else m)
    assert out == bytes.fromhex("00000001 01 61 00000002 02 6263")
    assert (other, rest) == (None, [])
    assert proto.stats.messages_received == 3
    assert proto.stats.messages_sent == 2 and proto.stats.bytes_sent == len(out)


@pytest.mark.parametrize(
    "reply",
    [b"pong", bytearray(b"pong"), memoryview(b"pong"), Message(b"pong")],
    ids=["bytes", "bytearray", "memoryview", "Message"],
)
def test_receive_and_reply_accepts_every_bytes_like_reply(reply: Any) -> None:
    """bytes, bytearray, memoryview and Message replies are all encoded the same."""
    proto = MessageProtocol(server_side=True)
    out, other, rest = proto.receive_and_reply(encode(b"ping"), lambda m: reply)
    assert (out, other, rest) == (encode(b"pong"), None, [])


def test_receive_and_reply_no_message_no_call() -> None:
    """Without a complete message the handler is not called and nothing is returned."""
    proto = MessageProtocol(server_side=True)
    calls: list[bytes] = []
    assert proto.receive_and_reply(encode(b"abc")[:3], calls.append) == (b"", None, [])
    assert calls == []


def test_receive_and_reply_handler_raising_resets_after_the_earlier_replies() -> None:
    """A handler that raises: the replies before it come back, then HANDLER_ERROR, a reset, with the exception."""
    proto = MessageProtocol(server_side=True)
    boom = ValueError("boom")
    seen: list[bytes] = []

    def handler(m: bytes) -> bytes:
        seen.append(m)
        if m == b"boom":
            raise boom
        return m

    out, other, rest = proto.receive_and_reply(encode(b"ok") + encode(b"boom") + encode(b"never"), handler)
    assert out == encode(b"ok")
    assert (other, rest) == (None, [])
    assert seen == [b"ok", b"boom"]
    assert proto.end == End(EndKind.HANDLER_ERROR, "handler raised ValueError: boom", boom)
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.ABORT)
    assert proto.stats.messages_sent == 1 and proto.stats.bytes_sent == len(encode(b"ok"))
    error = proto.closed_error()
    assert (error.clean, error.kind) == (False, EndKind.HANDLER_ERROR)
    assert error.__cause__ is boom


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("text", "handler returned str; expected bytes, bytearray, memoryview or None"),
        (5, "handler returned int; expected bytes, bytearray, memoryview or None"),
        ([b"a"], "handler returned list; expected bytes, bytearray, memoryview or None"),
    ],
    ids=["str", "int", "list"],
)
@pytest.mark.parametrize("spec", ["u32be", "u32be+kind:B"])
def test_receive_and_reply_wrong_reply_type_is_a_handler_error(reply: object, reason: str, spec: str) -> None:
    """A reply that is not bytes-like or None is HANDLER_ERROR (a reset), naming the type; earlier replies stay."""
    fmt = FrameFormat.parse(spec)
    proto = MessageProtocol(fmt, server_side=True)
    out, other, rest = proto.receive_and_reply(
        fmt.encode(b"ok") + fmt.encode(b"bad"), lambda m: reply if m == b"bad" else m
    )
    assert out == fmt.encode(b"ok")
    assert (other, rest) == (None, [])
    assert proto.end is not None
    assert (proto.end.kind, proto.end.reason) == (EndKind.HANDLER_ERROR, reason)
    assert isinstance(proto.end.error, TypeError)
    assert _action(proto) is Action.ABORT


def test_receive_and_reply_coroutine_is_a_handler_error_and_is_closed() -> None:
    """An async handler on a synchronous server: HANDLER_ERROR saying so, and the coroutine is closed unawaited."""
    made: list[Any] = []

    async def handler(m: bytes) -> bytes:
        return m

    def calling(m: bytes) -> Any:
        made.append(handler(m))
        return made[-1]

    proto = MessageProtocol(server_side=True)
    out, other, rest = proto.receive_and_reply(encode(b"x"), calling)
    assert (out, other, rest) == (b"", None, [])
    assert proto.end is not None
    assert proto.end.kind is EndKind.HANDLER_ERROR
    assert proto.end.reason == (
        "handler returned coroutine; expected bytes or None (an async handler needs the asyncio server)"
    )
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED


def test_receive_and_reply_awaitable_ok_returns_the_awaitable_and_the_rest() -> None:
    """With awaitable_ok the loop stops at the first awaitable reply: it comes back with the messages after it."""

    async def later(m: bytes) -> bytes:
        return m

    made: list[Any] = []

    def handler(m: bytes) -> Any:
        if m == b"2":
            made.append(later(m))
            return made[-1]
        return m

    proto = MessageProtocol(server_side=True)
    out, other, rest = proto.receive_and_reply(
        encode(b"1") + encode(b"2") + encode(b"3") + encode(b"4"), handler, awaitable_ok=True
    )
    assert out == encode(b"1")
    assert other is made[0]
    assert rest == [b"3", b"4"]
    assert _state(proto) is State.OPEN and proto.end is None
    assert proto.stats.messages_received == 4 and proto.stats.messages_sent == 1
    made[0].close()


def test_receive_and_reply_awaitable_ok_still_refuses_a_str() -> None:
    """awaitable_ok admits awaitables only: a str reply is still a handler error."""
    proto = MessageProtocol(server_side=True)
    proto.receive_and_reply(encode(b"x"), lambda m: "text", awaitable_ok=True)
    assert proto.end is not None and proto.end.kind is EndKind.HANDLER_ERROR


@pytest.mark.parametrize(
    ("spec", "reply"),
    [("u32be", b"12345"), ("u32be", bytearray(b"12345")), ("u32be+kind:B", b"12345")],
    ids=["plain-bytes", "plain-bytearray", "header-fields"],
)
def test_receive_and_reply_oversize_reply_is_a_handler_error(spec: str, reply: Any) -> None:
    """A reply too large for the frame is the handler's fault: HANDLER_ERROR naming OversizeMessage."""
    fmt = FrameFormat.parse(spec, max_size=4)
    proto = MessageProtocol(fmt, server_side=True)
    out, _, _ = proto.receive_and_reply(
        fmt.encode(b"ok") + fmt.encode(b"big"), lambda m: reply if m == b"big" else m
    )
    assert out == fmt.encode(b"ok")
    assert proto.end is not None
    assert proto.end.kind is EndKind.HANDLER_ERROR
    assert proto.end.reason == (
        "handler raised OversizeMessage: cannot send a message of 5 bytes: the frame allows at most 4"
    )
    assert isinstance(proto.end.error, OversizeMessage)


def test_receive_and_reply_bad_header_reply_is_a_handler_error() -> None:
    """A reply whose header the format cannot hold is a handler error naming InvalidFormat."""
    fmt = FrameFormat.parse("u32be+kind:B")
    proto = MessageProtocol(fmt, server_side=True)
    proto.receive_and_reply(fmt.encode(b"x"), lambda m: Message(b"y", {"kind": 300}))
    assert proto.end is not None
    assert proto.end.kind is EndKind.HANDLER_ERROR
    assert proto.end.reason.startswith("handler raised InvalidFormat: ")


def test_receive_and_reply_returns_good_replies_before_a_bad_header() -> None:
    """The messages before a bad header are handled and answered; the end is the peer's protocol error."""
    proto = MessageProtocol(FrameFormat(max_size=4), server_side=True)
    out, _, _ = proto.receive_and_reply(encode(b"ok") + struct.pack(">I", 99), bytes.upper)
    assert out == encode(b"OK")
    assert proto.end is not None and proto.end.kind is EndKind.MESSAGE_TOO_LARGE
    assert _state(proto) is State.DRAINING


@pytest.mark.parametrize(
    "reply",
    [
        "text",
        5,
        pytest.param(None, id="none"),
        b"bytes",
        bytearray(b"ba"),
    ],
)
def test_check_reply(reply: object) -> None:
    """check_reply passes bytes-like and None through and raises TypeError naming anything else."""
    if reply is None or isinstance(reply, bytes | bytearray):
        assert check_reply(reply) is reply
    else:
        with pytest.raises(TypeError, match=f"handler returned {type(reply).__name__}"):
            check_reply(reply)


# -- sending ------------------------------------------------------------------------------


def test_send_message_queues_encoded_frames() -> None:
    """send_message queues exactly the encoded frames; data_to_send takes them all."""
    proto = MessageProtocol()
    proto.send_message(b"hi")
    proto.send_message(bytearray(b"there"))
    proto.send_message(memoryview(b"!"))
    expected = bytes.fromhex("00000002 6869 00000005 7468657265 00000001 21")
    assert proto.outgoing_size == len(expected)
    assert _wire(proto) == expected
    assert proto.outgoing_size == 0
    assert proto.data_to_send() == []
    assert proto.peek_output() == b""
    assert proto.stats.messages_sent == 3
    assert proto.stats.bytes_sent == len(expected)


def test_send_message_with_header() -> None:
    """send_message encodes header fields, from the argument or from a Message."""
    fmt = FrameFormat.parse("u32be+kind:B")
    proto = MessageProtocol(fmt)
    proto.send_message(b"a", {"kind": 2})
    proto.send_message(Message(b"b", {"kind": 5}))
    assert _wire(proto) == bytes.fromhex("00000001 02 61 00000001 05 62")


def test_large_body_is_queued_without_copy() -> None:
    """A body above the small-frame threshold is queued as its own object, not copied."""
    proto = MessageProtocol()
    body = bytes(100_000)
    proto.send_message(body)
    chunks = proto.data_to_send()
    assert chunks[0] == (100_000).to_bytes(4, "big")
    assert chunks[1] is body


@pytest.mark.parametrize(
    ("spec", "size", "limit"),
    [("u32be", 5, 4), ("u8+kind:B", 256, 255), ("u16be!", 65534, 65533)],
)
def test_send_message_too_large_is_oversize_message(spec: str, size: int, limit: int) -> None:
    """A body too large for the frame raises OversizeMessage (our mistake, not the peer's); nothing is queued."""
    fmt = FrameFormat.parse(spec, max_size=4 if spec == "u32be" else None)
    proto = MessageProtocol(fmt)
    with pytest.raises(OversizeMessage) as info:
        proto.send_message(bytes(size))
    assert (info.value.size, info.value.max_size) == (size, limit)
    assert not isinstance(info.value, ProtocolError)
    assert proto.outgoing_size == 0 and proto.stats.messages_sent == 0
    assert _state(proto) is State.OPEN and proto.end is None
    proto.send_message(bytes(limit))  # the connection goes on
    assert proto.stats.messages_sent == 1


def test_send_errors_leave_the_buffer_unchanged() -> None:
    """A bad header raises InvalidFormat before anything is queued."""
    proto = MessageProtocol(FrameFormat.parse("u8+kind:B"))
    with pytest.raises(InvalidFormat):
        proto.send_message(b"x", {"kind": 300})
    with pytest.raises(InvalidFormat):
        proto.send_message(b"x", {"nope": 1})
    assert proto.outgoing_size == 0
    assert proto.data_to_send() == []
    assert proto.stats.messages_sent == 0


@pytest.mark.parametrize("spec", ["u32be", "u32be+kind:B"])
@pytest.mark.parametrize("message", ["text", 5, None], ids=["str", "int", "none"])
def test_send_message_refuses_what_is_not_bytes_like(spec: str, message: Any) -> None:
    """send_message of a str (or anything not bytes-like) raises TypeError naming the type."""
    proto = MessageProtocol(FrameFormat.parse(spec))
    with pytest.raises(TypeError, match=f"^message must be bytes-like, got {type(message).__name__}$"):
        proto.send_message(message)
    assert proto.outgoing_size == 0


@pytest.mark.parametrize(
    ("end", "kind", "clean"),
    [
        (lambda p: p.abort(), EndKind.ABORTED, False),
        (lambda p: p.fail(EndKind.IDLE_TIMEOUT, "idle"), EndKind.IDLE_TIMEOUT, False),
        (lambda p: p.fail(EndKind.FRAME_ERROR, "bad"), EndKind.FRAME_ERROR, False),
        (lambda p: p.send_eof(), EndKind.CLEAN, True),
    ],
    ids=["abort", "idle", "frame-error", "send-eof"],
)
def test_send_message_after_the_end_is_connection_closed(
    end: Callable[[MessageProtocol], object], kind: EndKind, clean: bool
) -> None:
    """send_message once the end is decided raises ConnectionClosed with the end's kind."""
    proto = MessageProtocol()
    end(proto)
    with pytest.raises(ConnectionClosed) as info:
        proto.send_message(b"late")
    assert (info.value.kind, info.value.clean) == (kind, clean)
    assert proto.outgoing_size == 0


@pytest.mark.parametrize("exc", [ConnectionResetError(), None], ids=["reset", "none"])
def test_send_message_after_connection_lost_is_connection_closed(exc: BaseException | None) -> None:
    """send_message once the socket is gone raises ConnectionClosed with the end's kind, and queues nothing."""
    proto = MessageProtocol()
    proto.connection_lost(exc)
    with pytest.raises(ConnectionClosed) as info:
        proto.send_message(b"late")
    assert (info.value.kind, info.value.clean) == (EndKind.RESET, False)
    assert proto.outgoing_size == 0


@pytest.mark.parametrize("step", [1, 2, 3, 7, 4096, 16385, 1 << 20])
def test_partial_writes_reassemble_the_stream(step: int) -> None:
    """peek_output/consume_output with any partial write size deliver exactly the queued bytes."""
    proto = MessageProtocol()
    bodies = [b"a", b"", bytes(range(256)) * 100, b"tail"]  # the 25,600-byte body is queued apart
    for body in bodies:
        proto.send_message(body)
    size = proto.outgoing_size
    out = _drain_partially(proto, step)
    assert out == b"".join(encode(b) for b in bodies)
    assert len(out) == size
    assert proto.outgoing_size == 0


def test_consume_across_chunks_then_data_to_send() -> None:
    """consume_output may span several chunks; data_to_send then returns exactly the rest."""
    proto = MessageProtocol()
    proto.send_message(b"abc")
    proto.send_message(bytes(20_000))
    proto.send_message(b"xyz")
    expected = encode(b"abc") + encode(bytes(20_000)) + encode(b"xyz")
    proto.consume_output(7 + 4 + 100)  # first frame, the next header, 100 body bytes
    assert proto.outgoing_size == len(expected) - 111
    assert _wire(proto) == expected[111:]


@pytest.mark.parametrize("n", [-1, 8, 100])
def test_consume_more_than_queued_is_refused(n: int) -> None:
    """consume_output refuses a negative count or more than is queued and leaves the buffer intact."""
    proto = MessageProtocol()
    proto.send_message(b"abc")
    with pytest.raises(ValueError, match=str(n)):
        proto.consume_output(n)
    assert proto.outgoing_size == 7
    assert _wire(proto) == encode(b"abc")


def test_consume_zero_is_a_no_op() -> None:
    """consume_output(0) changes nothing, even with nothing queued."""
    proto = MessageProtocol()
    proto.consume_output(0)
    proto.send_message(b"a")
    proto.consume_output(0)
    assert bytes(proto.peek_output()) == encode(b"a")


# -- flow control -------------------------------------------------------------------------

WATER = Limits(write_high_water=100, write_low_water=40)


def test_writing_paused_follows_high_water() -> None:
    """writing_paused is true exactly while the outgoing buffer is above the high-water mark."""
    proto = MessageProtocol(limits=WATER)
    proto.send_message(bytes(96))  # 100 bytes: at the mark, not above it
    assert not proto.writing_paused
    proto.send_message(b"")  # 104 bytes
    assert proto.writing_paused
    proto.consume_output(4)
    assert not proto.writing_paused
    proto.send_message(b"x")
    assert proto.writing_paused
    proto.data_to_send()
    assert not proto.writing_paused


def test_server_pauses_reading_above_high_water_and_resumes_at_low_water() -> None:
    """Server side: reading pauses while unread replies are above high water, and resumes only at low water."""
    proto = MessageProtocol(limits=WATER, server_side=True)
    proto.send_message(bytes(96))
    assert not proto.reading_paused  # 100: at the mark
    proto.send_message(b"")
    assert proto.reading_paused  # 104
    proto.consume_output(50)
    assert proto.reading_paused  # 54: between the marks, still paused
    proto.consume_output(13)
    assert proto.reading_paused  # 41
    proto.consume_output(1)
    assert not proto.reading_paused  # 40: at low water
    proto.send_message(bytes(200))
    assert proto.reading_paused
    proto.data_to_send()
    assert not proto.reading_paused


def test_server_pauses_while_the_pump_buffer_is_full() -> None:
    """set_write_paused(True) pauses a server's reading; False resumes it once its own queue is at low water."""
    proto = MessageProtocol(limits=WATER, server_side=True)
    proto.set_write_paused(True)
    assert proto.reading_paused and proto.writing_paused
    proto.set_write_paused(False)
    assert not proto.reading_paused and not proto.writing_paused
    proto.send_message(bytes(56))  # 60 queued: between the marks
    proto.set_write_paused(True)
    proto.set_write_paused(False)
    assert proto.reading_paused  # 60 > low water: hysteresis
    proto.consume_output(20)
    assert not proto.reading_paused


def test_client_never_pauses_reading_for_its_own_output() -> None:
    """Client side: queued output far above high water, or a full pump buffer, never pauses reading."""
    proto = MessageProtocol(limits=WATER)
    for _ in range(40):
        proto.send_message(bytes(1000))
    assert proto.writing_paused
    assert not proto.reading_paused
    proto.set_write_paused(True)
    assert not proto.reading_paused
    proto.consume_output(proto.outgoing_size)
    assert proto.writing_paused  # the pump's buffer is still full
    proto.set_write_paused(False)
    assert not proto.writing_paused


def test_a_closing_server_reads_again() -> None:
    """A paused server that begins to close reads again (to see the peer's EOF), even with its queue full."""
    proto = MessageProtocol(limits=WATER, server_side=True)
    proto.send_message(bytes(200))
    assert proto.reading_paused
    proto.send_eof()
    assert not proto.reading_paused
    peer_closed = MessageProtocol(limits=WATER, server_side=True, close_on_eof=True)
    peer_closed.replies_owed = 1
    peer_closed.send_message(bytes(200))
    peer_closed.receive_eof()
    assert not peer_closed.reading_paused


@pytest.mark.parametrize("server_side", [False, True])
def test_inbox_hysteresis(server_side: bool) -> None:
    """inbox_add pauses reading above high water (bodies plus overhead); inbox_take resumes it at low water."""
    proto = MessageProtocol(limits=WATER, server_side=server_side)
    proto.inbox_add(1, 100 - MESSAGE_OVERHEAD)  # 100: at the mark
    assert not proto.reading_paused
    proto.inbox_add(1, 0)  # 132
    assert proto.reading_paused
    proto.inbox_take(1, 0)  # 100
    assert proto.reading_paused
    proto.inbox_take(1, 100 - MESSAGE_OVERHEAD - 40)  # 40: at low water
    assert not proto.reading_paused
    proto.inbox_take(10, 1000)  # never below zero
    proto.inbox_add(3, 4)  # 3 * 32 + 4 = 100
    assert not proto.reading_paused


def test_empty_messages_count_against_the_inbox() -> None:
    """A flood of empty messages pauses reading too: each is charged MESSAGE_OVERHEAD bytes."""
    proto = MessageProtocol(limits=WATER)
    proto.inbox_add(4, 0)
    assert proto.reading_paused


# -- timeouts (an injected clock) ---------------------------------------------------------


def test_idle_timeout() -> None:
    """Nothing received for idle_timeout: IDLE_TIMEOUT, a reset, worded with the limit."""
    proto = MessageProtocol(server_side=True, limits=Limits(idle_timeout=1, message_timeout=None))
    assert proto.check_timeouts(100.0) is None
    assert proto.check_timeouts(101.0) is None  # exactly the limit: not yet
    end = proto.check_timeouts(101.01)
    assert end == End(EndKind.IDLE_TIMEOUT, "idle timeout: nothing received for 1 s")
    assert proto.end is end
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.ABORT)
    assert proto.check_timeouts(200.0) is None


def test_activity_resets_the_idle_timeout() -> None:
    """Bytes received between two checks count as activity at the later check."""
    proto = MessageProtocol(server_side=True, limits=Limits(idle_timeout=1, message_timeout=None))
    proto.check_timeouts(0.0)
    proto.receive_data(encode(b"x"))
    assert proto.check_timeouts(0.9) is None
    assert proto.check_timeouts(1.8) is None
    proto.receive_data(encode(b""))
    assert proto.check_timeouts(2.5) is None
    assert proto.check_timeouts(3.5) is None
    end = proto.check_timeouts(3.6)
    assert end is not None and end.kind is EndKind.IDLE_TIMEOUT


def test_sending_is_not_activity() -> None:
    """Only what the peer sends resets the idle timer: our own output does not keep a connection alive."""
    proto = MessageProtocol(server_side=True, limits=Limits(idle_timeout=1, message_timeout=None))
    proto.check_timeouts(0.0)
    proto.send_message(b"ping")
    proto.data_to_send()
    end = proto.check_timeouts(1.5)
    assert end is not None and end.kind is EndKind.IDLE_TIMEOUT


def test_message_timeout_with_a_trickling_peer() -> None:
    """A started frame that does not complete within message_timeout: MESSAGE_TIMEOUT, even while bytes trickle in."""
    proto = MessageProtocol(server_side=True, limits=Limits(idle_timeout=None, message_timeout=2))
    frame = encode(b"abcdef")
    proto.check_timeouts(0.0)
    proto.receive_data(frame[:1])
    assert proto.check_timeouts(0.5) is None  # the frame starts counting here
    for i, now in enumerate((1.0, 1.5, 2.0, 2.5), start=1):
        proto.receive_data(frame[i : i + 1])
        assert proto.check_timeouts(now) is None
    end = proto.check_timeouts(2.51)
    assert end == End(
        EndKind.MESSAGE_TIMEOUT,
        "message timeout: a frame was not completed within 2 s (5 bytes of it received)",
    )
    assert _action(proto) is Action.ABORT


def test_a_completed_message_restarts_the_message_timeout() -> None:
    """Each frame gets its own message_timeout: one completing restarts the clock for the next."""
    proto = MessageProtocol(server_side=True, limits=Limits(idle_timeout=None, message_timeout=2))
    stream = encode(b"one") + encode(b"two")
    proto.receive_data(stream[:3])
    assert proto.check_timeouts(0.0) is None
    proto.receive_data(stream[3:10])  # completes "one", starts "two"
    assert proto.check_timeouts(1.9) is None
    assert proto.check_timeouts(3.8) is None
    assert proto.check_timeouts(3.95) is not None


def test_no_message_timeout_between_frames() -> None:
    """At a frame boundary there is no message timeout, however long it lasts."""
    proto = MessageProtocol(limits=Limits(idle_timeout=None, message_timeout=1))
    proto.receive_data(encode(b"whole"))
    assert proto.check_timeouts(0.0) is None
    assert proto.check_timeouts(1000.0) is None


def test_handshake_timeout_with_stages() -> None:
    """Stages not passed within handshake_timeout: HANDSHAKE_TIMEOUT worded by the stage, even with bytes arriving."""
    limits = Limits(idle_timeout=None, message_timeout=None, handshake_timeout=2)
    proto = MessageProtocol(
        limits=limits, server_side=True, stages=Stages(server_side=True, proxy_protocol=True)
    )
    assert proto.check_timeouts(10.0) is None
    proto.receive_data(b"PROXY ")
    assert proto.check_timeouts(11.9) is None
    assert proto.check_timeouts(12.0) is None
    end = proto.check_timeouts(12.01)
    assert end == End(
        EndKind.HANDSHAKE_TIMEOUT,
        "handshake timeout: the PROXY header was not complete within 2 s (6 bytes received)",
    )
    assert _action(proto) is Action.ABORT


def test_handshake_timeout_stops_once_the_stages_pass() -> None:
    """Once every stage has passed, the handshake deadline no longer applies."""
    limits = Limits(idle_timeout=None, message_timeout=None, handshake_timeout=2)
    proto = MessageProtocol(
        limits=limits, server_side=True, stages=Stages(server_side=True, proxy_protocol=True)
    )
    proto.check_timeouts(0.0)
    proto.receive_data(b"PROXY UNKNOWN\r\n")
    assert proto.handshake_complete
    assert proto.check_timeouts(100.0) is None
    assert proto.next_deadline(100.0) is None


def test_no_handshake_timeout_without_stages() -> None:
    """Without stages, handshake_timeout never fires."""
    proto = MessageProtocol(limits=Limits(idle_timeout=None, message_timeout=None, handshake_timeout=1))
    proto.check_timeouts(0.0)
    assert proto.check_timeouts(50.0) is None


@pytest.mark.parametrize("closing", [False, True], ids=["draining", "closing"])
def test_close_timeout(closing: bool) -> None:
    """A graceful close not done within close_timeout (counted from the first check after it began): CLOSE_TIMEOUT."""
    proto = MessageProtocol(limits=Limits(idle_timeout=1, message_timeout=None, close_timeout=3))
    proto.check_timeouts(0.0)
    proto.send_message(b"unwritten")
    proto.send_eof()
    if closing:
        proto.data_to_send()
        proto.eof_written()
        assert _state(proto) is State.CLOSING
    assert proto.check_timeouts(5.0) is None  # no idle timeout while closing; the close clock starts
    assert proto.check_timeouts(8.0) is None
    end = proto.check_timeouts(8.01)
    assert end == End(EndKind.CLOSE_TIMEOUT, "close timeout: the connection did not close within 3 s")
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.ABORT)


def test_close_timeout_resets_a_close_stuck_on_replies_owed() -> None:
    """A close that cannot finish (an async reply never comes after the peer's EOF) is reset by the close timeout."""
    proto = MessageProtocol(limits=Limits(close_timeout=3), server_side=True, close_on_eof=True)
    proto.receive_data(encode(b"q"))
    proto.replies_owed = 1
    proto.receive_eof()
    proto.check_timeouts(0.0)
    assert proto.check_timeouts(3.5) is not None
    assert _action(proto) is Action.ABORT


def test_next_deadline() -> None:
    """next_deadline is now before the first check, then a quarter of the shortest timeout (10 ms..1 s), None when closed."""
    proto = MessageProtocol(server_side=True)
    assert proto.next_deadline(5.0) == 5.0  # not started: check now
    proto.check_timeouts(5.0)
    assert proto.next_deadline(5.0) == 6.0  # default limits: clamped to 1 s
    client = MessageProtocol()  # a client runs no idle or message timeout
    client.check_timeouts(5.0)
    assert client.next_deadline(5.0) is None
    short = MessageProtocol(server_side=True, limits=Limits(idle_timeout=0.2, message_timeout=0.8))
    short.check_timeouts(0.0)
    assert short.next_deadline(1.0) == pytest.approx(1.05)
    tiny = MessageProtocol(server_side=True, limits=Limits(idle_timeout=0.001, message_timeout=None))
    tiny.check_timeouts(0.0)
    assert tiny.next_deadline(1.0) == pytest.approx(1.01)
    off = MessageProtocol(limits=NO_TIMEOUTS)
    off.check_timeouts(0.0)
    assert off.next_deadline(1.0) is None
    off.send_eof()  # the close timeout always applies
    assert off.next_deadline(1.0) == 2.0
    fast_close = MessageProtocol(limits=Limits(close_timeout=0.4))
    fast_close.check_timeouts(0.0)
    fast_close.send_eof()
    assert fast_close.next_deadline(1.0) == pytest.approx(1.1)
    fast_close.abort()
    assert fast_close.next_deadline(1.0) is None


def test_next_deadline_counts_the_handshake_only_during_the_stages() -> None:
    """The handshake timeout sets the pace only while stages are running."""
    limits = Limits(idle_timeout=None, message_timeout=None, handshake_timeout=2)
    proto = MessageProtocol(
        limits=limits, server_side=True, stages=Stages(server_side=True, proxy_protocol=True)
    )
    proto.check_timeouts(0.0)
    assert proto.next_deadline(0.0) == 0.5
    proto.receive_data(b"PROXY UNKNOWN\r\n")
    assert proto.next_deadline(0.0) is None


# -- closed_error, End, addresses, limits ---------------------------------------------------


def test_closed_error_before_an_end() -> None:
    """closed_error before any end: a clean close, worded by who closed first."""
    proto = MessageProtocol()
    assert proto.closed_error().reason == "connection closed locally"
    proto.receive_eof()
    exc = proto.closed_error()
    assert (exc.clean, exc.kind, exc.reason) == (True, EndKind.CLEAN, "peer closed the connection")


@pytest.mark.parametrize("kind", list(EndKind), ids=[k.name for k in EndKind])
def test_end_exception_carries_kind_and_cleanliness(kind: EndKind) -> None:
    """End.exception() is a ConnectionClosed with the kind, kind.clean, the reason, and the error as cause."""
    cause = OSError("x")
    exc = End(kind, "the reason", cause).exception()
    assert isinstance(exc, ConnectionClosed)
    assert (exc.kind, exc.clean, exc.reason) == (kind, kind.clean, "the reason")
    assert exc.__cause__ is cause


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (("127.0.0.1", 9898), "127.0.0.1:9898"),
        (("::1", 9898, 0, 0), "[::1]:9898"),
        (None, "unknown peer"),
        ("/run/msgsock.sock", "/run/msgsock.sock"),
    ],
)
def test_format_address(address: Any, text: str) -> None:
    """Peers are named host:port, [v6]:port, the path, or "unknown peer" when the address was never known."""
    assert format_address(address) == text
    assert MessageProtocol(peer_address=address).peer == text


def test_default_limits_match_spec() -> None:
    """The defaults are the SPEC §7 table."""
    assert Limits() == DEFAULT_LIMITS
    assert (DEFAULT_LIMITS.write_high_water, DEFAULT_LIMITS.write_low_water) == (256 * 1024, 64 * 1024)
    assert DEFAULT_LIMITS.max_connections == 10_000
    assert DEFAULT_LIMITS.idle_timeout == 300.0
    assert DEFAULT_LIMITS.message_timeout == 30.0
    assert DEFAULT_LIMITS.handshake_timeout == 10.0
    assert DEFAULT_LIMITS.close_timeout == 5.0
    assert DEFAULT_LIMITS.shutdown_timeout == 5.0
    assert MessageProtocol().limits is DEFAULT_LIMITS


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"write_high_water": -1}, "write_high_water"),
        ({"write_low_water": -1}, "write_low_water"),
        ({"max_connections": -5}, "max_connections"),
        ({"write_high_water": 10, "write_low_water": 11}, "above write_high_water"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"message_timeout": -0.1}, "message_timeout"),
        ({"handshake_timeout": -2}, "handshake_timeout"),
        ({"close_timeout": -1}, "close_timeout"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
        ({"idle_timeout": math.nan}, "idle_timeout must be >= 0 or None, not nan"),
        ({"shutdown_timeout": math.nan}, "shutdown_timeout must be >= 0, not nan"),
    ],
)
def test_limits_validation(kwargs: dict[str, float], pattern: str) -> None:
    """Negative or NaN limits and low water above high water raise ValueError naming the limit."""
    with pytest.raises(ValueError, match=pattern):
        Limits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_threads": 1.5}, "max_threads must be an int, got float"),
        ({"max_connections": True}, "max_connections must be an int, got bool"),
        ({"idle_timeout": "30"}, "idle_timeout must be a number of seconds or None, got str"),
        ({"close_timeout": None}, "close_timeout must be a number of seconds, got NoneType"),
    ],
)
def test_limits_types(kwargs: dict[str, object], pattern: str) -> None:
    """A limit of the wrong type is a TypeError naming the limit and the type received."""
    with pytest.raises(TypeError, match=pattern):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_zero_timeouts_mean_off() -> None:
    """A timeout of 0 means off (None), as on the command line; None stays None."""
    limits = Limits(idle_timeout=0, message_timeout=0.0, handshake_timeout=None)
    assert (limits.idle_timeout, limits.message_timeout, limits.handshake_timeout) == (None, None, None)
    assert Limits(write_high_water=0, write_low_water=0).write_high_water == 0


def test_state_and_action_values() -> None:
    """State has the four documented values and Action the three."""
    assert [s.value for s in State] == ["open", "draining", "closing", "closed"]
    assert [a.value for a in Action] == ["half-close", "close", "abort"]


# -- hypothesis: any split ------------------------------------------------------------------

SPLIT_SPECS = [
    "u32be",
    "u32le",
    "u16be",
    "u16le",
    "u8",
    "u64be",
    "u64le",
    "u32be+kind:B+flags:H",
    "magic:H+u16be!",
]


def _frames(fmt: FrameFormat) -> st.SearchStrategy[list[tuple[bytes, dict[str, int]]]]:
    header = st.fixed_dictionaries({name: st.integers(0, 255) for name in fmt.field_names})
    body = st.binary(max_size=min(300, fmt.max_body))
    return st.lists(st.tuples(body, header), max_size=12)


def _feed_views(feed: Callable[[memoryview], Any], stream: bytes, cuts: list[int]) -> list[Any]:
    """Feed the stream as memoryview slices of one buffer that every later read overwrites."""
    buffer = bytearray(len(stream) + 1)
    view = memoryview(buffer)
    results = []
    for a, b in itertools.pairwise(cuts):
        buffer[: b - a] = stream[a:b]
        results.append(feed(view[: b - a]))
        buffer[:] = b"\xee" * len(buffer)  # the next read overwrites what the core was given
    return results


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("spec", SPLIT_SPECS)
@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
@given(data=st.data())
def test_hypothesis_any_split_gives_the_same_messages(spec: str, as_view: bool, data: st.DataObject) -> None:
    """Any split of any stream of frames gives exactly those frames, fed as bytes or as views of one reused buffer."""
    fmt = FrameFormat.parse(spec)
    frames = data.draw(_frames(fmt))
    stream = b"".join(fmt.encode(body, header) for body, header in frames)
    cuts = [0, *sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12))), len(stream)]
    proto = MessageProtocol(fmt)
    got: list[Any] = []
    if as_view:
        for messages in _feed_views(proto.receive_data, stream, cuts):
            got += messages
    else:
        for a, b in itertools.pairwise(cuts):
            got += proto.receive_data(stream[a:b])
    assert [bytes(m) for m in got] == [body for body, _ in frames]
    if fmt.field_names:
        assert [m.header for m in got] == [header for _, header in frames]
    assert all(type(m) is (Message if fmt.field_names else bytes) for m in got)
    assert proto.stats.messages_received == len(frames)
    assert proto.stats.bytes_received == len(stream)
    assert _state(proto) is State.OPEN and not proto.in_frame


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("spec", ["u32be", "u8", "u16le", "u32be+kind:B+flags:H", "magic:H+u16be!"])
@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
@given(data=st.data())
def test_hypothesis_receive_echo_returns_exactly_the_complete_frames(
    spec: str, as_view: bool, data: st.DataObject
) -> None:
    """For any split, receive_echo gives back exactly the complete frames so far, and all of them at the end."""
    fmt = FrameFormat.parse(spec)
    frames = data.draw(_frames(fmt))
    encoded = [fmt.encode(body, header) for body, header in frames]
    stream = b"".join(encoded)
    ends = [sum(len(f) for f in encoded[: i + 1]) for i in range(len(encoded))]
    cuts = [0, *sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12))), len(stream)]
    proto = MessageProtocol(fmt, server_side=True)
    if as_view:
        echoed = _feed_views(proto.receive_echo, stream, cuts)
    else:
        echoed = [proto.receive_echo(stream[a:b]) for a, b in itertools.pairwise(cuts)]
    total = 0
    for b, out in zip(cuts[1:], echoed, strict=True):
        total += len(out)
        # After each read, what came back is exactly the frames complete within it.
        assert total == max([0, *(e for e in ends if e <= b)])
    assert b"".join(echoed) == stream
    assert proto.stats.messages_sent == proto.stats.messages_received == len(frames)


@settings(max_examples=40, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=40), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_hypothesis_discarded_plus_received_is_every_message(bodies: list[bytes], cut: int) -> None:
    """Whenever send_eof falls in a stream, each message is counted once: received before, discarded after."""
    stream = b"".join(encode(b) for b in bodies)
    cut %= len(stream) + 1
    proto = MessageProtocol()
    got = proto.receive_data(stream[:cut])
    proto.send_eof()
    assert proto.receive_data(stream[cut:]) == []
    assert proto.stats.messages_received == len(got)
    assert proto.stats.messages_received + proto.stats.messages_discarded == len(bodies)


# -- a reset asked for after the end was decided ------------------------------------------------


def test_abort_after_a_protocol_error_resets_and_keeps_the_cause() -> None:
    """abort() after a peer's protocol error resets at once; the end still says what the peer did."""
    proto = MessageProtocol(server_side=True, close_on_eof=True)
    proto.receive_data(b"\xff\xff\xff\xff")
    assert _action(proto) is Action.CLOSE  # a flush kind: close once written
    end = proto.abort()
    assert end.kind is EndKind.MESSAGE_TOO_LARGE
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.ABORT)


def test_a_close_that_does_not_finish_in_closed_is_reset_by_the_close_timeout() -> None:
    """A CLOSE still flushing (a peer that sent its EOF and does not read) is reset after close_timeout."""
    proto = MessageProtocol(server_side=True, close_on_eof=True, limits=Limits(close_timeout=2.0))
    proto.check_timeouts(0.0)
    proto.receive_data(encode(b"x"))
    proto.receive_eof()
    assert _action(proto) is Action.CLOSE
    proto.eof_written()  # not a half-close: the pump closes, and the close has to flush
    assert proto.check_timeouts(1.0) is None
    assert proto.next_deadline(1.0) is not None
    end = proto.check_timeouts(3.5)
    assert end is not None and end.kind is EndKind.CLOSE_TIMEOUT
    assert _action(proto) is Action.ABORT
    proto.connection_lost(None)
    assert proto.check_timeouts(10.0) is None and proto.next_deadline(10.0) is None


def test_an_error_overrides_an_orderly_end_still_finishing() -> None:
    """The peer's EOF decided a clean end; a close timeout before it finished makes it a close timeout."""
    proto = MessageProtocol(server_side=True, close_on_eof=True, limits=Limits(close_timeout=1.0))
    proto.check_timeouts(0.0)
    proto.replies_owed = 1  # an async handler never answers
    proto.receive_eof()
    assert proto.end is not None and proto.end.kind is EndKind.CLEAN
    proto.check_timeouts(0.5)
    end = proto.check_timeouts(2.0)
    assert end is not None and end.kind is EndKind.CLOSE_TIMEOUT and not end.kind.clean
    assert _action(proto) is Action.ABORT


# -- half-close that keeps receiving -----------------------------------------------------------


def test_half_close_keeps_receiving_then_the_peers_eof_ends_cleanly() -> None:
    """send_eof(keep_receiving=True): HALF_CLOSE once written, replies still received, the peer's EOF closes cleanly."""
    proto = MessageProtocol()
    proto.send_message(b"last")
    proto.send_eof(keep_receiving=True)
    assert _state(proto) is State.OPEN and _action(proto) is None  # the frame is not written yet
    with pytest.raises(InvalidState):
        proto.send_message(b"more")
    assert proto.data_to_send() == [encode(b"last")]
    assert _action(proto) is Action.HALF_CLOSE
    proto.eof_written()
    assert _action(proto) is None
    assert proto.receive_data(encode(b"reply")) == [b"reply"]  # still received, not discarded
    assert proto.stats.messages_discarded == 0
    proto.receive_eof()
    assert (_state(proto), _action(proto)) == (State.CLOSED, Action.CLOSE)
    assert proto.end is not None and proto.end.kind is EndKind.CLEAN


def test_close_after_a_half_close_waits_for_the_peer() -> None:
    """send_eof() after a half-close: no second EOF, messages from then on discarded, CLOSING until the peer's EOF."""
    proto = MessageProtocol()
    proto.send_eof(keep_receiving=True)
    assert _action(proto) is Action.HALF_CLOSE
    proto.eof_written()
    proto.send_eof()
    assert (_state(proto), _action(proto)) == (State.CLOSING, None)
    proto.receive_data(encode(b"late"))
    assert proto.stats.messages_discarded == 1
    proto.receive_eof()
    assert _action(proto) is Action.CLOSE
