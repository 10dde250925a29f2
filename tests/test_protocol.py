"""Tests of the sans-I/O per-connection state (protocol.py; SPEC §3, §7)."""

from __future__ import annotations

import struct

import pytest

from msgsock.exceptions import (
    IncompleteMessage,
    InvalidFormat,
    InvalidState,
    MessageTooLarge,
)
from msgsock.framing import FrameFormat, Message, encode
from msgsock.protocol import (
    DEFAULT_LIMITS,
    Limits,
    MessageProtocol,
    ServerStatistics,
    State,
    Statistics,
    error_kind,
)


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


def _state(proto: MessageProtocol) -> State:
    # A call, so the type checker does not narrow ``state`` across the steps of a test.
    return proto.state


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


def test_receive_with_header_fields() -> None:
    """With extra header fields, received messages carry their header."""
    fmt = FrameFormat.parse("u16le+kind:B")
    proto = MessageProtocol(fmt)
    (msg,) = proto.receive_data(fmt.encode(b"x", {"kind": 4}))
    assert isinstance(msg, Message)
    assert msg.header == {"kind": 4}


def test_protocol_error_is_recorded_and_sticky() -> None:
    """A peer's protocol error is recorded in ``error``, closes the state, and every later feed raises it."""
    proto = MessageProtocol(FrameFormat(max_size=4))
    with pytest.raises(MessageTooLarge) as info:
        proto.receive_data(encode(b"12345"))
    assert proto.error is info.value
    assert _state(proto) is State.CLOSED
    with pytest.raises(MessageTooLarge):
        proto.receive_data(encode(b"ok"))
    assert proto.stats.messages_received == 0


def test_data_after_eof_is_invalid_state() -> None:
    """Data fed after receive_eof() raises InvalidState."""
    proto = MessageProtocol()
    proto.receive_eof()
    with pytest.raises(InvalidState):
        proto.receive_data(encode(b"late"))


def test_eof_mid_frame_records_incomplete_message() -> None:
    """receive_eof() inside a frame raises IncompleteMessage, records it and closes the state."""
    proto = MessageProtocol()
    proto.receive_data(encode(b"abcdef")[:7])
    with pytest.raises(IncompleteMessage) as info:
        proto.receive_eof()
    assert (info.value.received, info.value.expected) == (7, 10)
    assert proto.error is info.value
    assert _state(proto) is State.CLOSED
    assert proto.eof_received
    proto.receive_eof()  # a second EOF is a no-op, not a second error


def test_receive_eof_twice_is_a_no_op() -> None:
    """A second receive_eof() changes nothing."""
    proto = MessageProtocol()
    proto.receive_eof()
    proto.receive_eof()
    assert _state(proto) is State.CLOSING
    assert proto.error is None


# -- sending ------------------------------------------------------------------------------


def test_send_message_queues_encoded_frames() -> None:
    """send_message queues exactly the encoded frames; data_to_send takes them all."""
    proto = MessageProtocol()
    proto.send_message(b"hi")
    proto.send_message(bytearray(b"there"))
    proto.send_message(memoryview(b"!"))
    expected = encode(b"hi") + encode(b"there") + encode(b"!")
    assert proto.outgoing_size == len(expected)
    assert b"".join(bytes(c) for c in proto.data_to_send()) == expected
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
    data = b"".join(bytes(c) for c in proto.data_to_send())
    assert data == fmt.encode(b"a", {"kind": 2}) + fmt.encode(b"b", {"kind": 5})


def test_large_body_is_queued_without_copy() -> None:
    """A body above the small-frame threshold is queued as its own object, not copied."""
    proto = MessageProtocol()
    body = bytearray(100_000)
    proto.send_message(body)
    chunks = proto.data_to_send()
    assert chunks[0] == encode(b"")[:0] + (100_000).to_bytes(4, "big")
    assert chunks[1] is body


def test_send_errors_leave_the_buffer_unchanged() -> None:
    """A too-large body or bad header raises before anything is queued."""
    proto = MessageProtocol(FrameFormat.parse("u8+kind:B"))
    with pytest.raises(MessageTooLarge):
        proto.send_message(bytes(256))
    with pytest.raises(InvalidFormat):
        proto.send_message(b"x", {"kind": 300})
    with pytest.raises(InvalidFormat):
        proto.send_message(b"x", {"nope": 1})
    assert proto.outgoing_size == 0
    assert proto.data_to_send() == []
    assert proto.stats.messages_sent == 0


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
    rest = b"".join(bytes(c) for c in proto.data_to_send())
    assert rest == expected[111:]


@pytest.mark.parametrize("n", [-1, 8, 100])
def test_consume_more_than_queued_is_refused(n: int) -> None:
    """consume_output refuses a negative count or more than is queued and leaves the buffer intact."""
    proto = MessageProtocol()
    proto.send_message(b"abc")
    with pytest.raises(ValueError, match=str(n)):
        proto.consume_output(n)
    assert proto.outgoing_size == 7
    assert b"".join(bytes(c) for c in proto.data_to_send()) == encode(b"abc")


def test_consume_zero_is_a_no_op() -> None:
    """consume_output(0) changes nothing, even with nothing queued."""
    proto = MessageProtocol()
    proto.consume_output(0)
    proto.send_message(b"a")
    proto.consume_output(0)
    assert bytes(proto.peek_output()) == encode(b"a")


def test_writing_paused_follows_high_water() -> None:
    """writing_paused is true exactly while the outgoing buffer is above the high-water mark."""
    proto = MessageProtocol(limits=Limits(write_high_water=10, write_low_water=5))
    proto.send_message(b"123456")  # 10 bytes: at the mark, not above it
    assert not proto.writing_paused
    proto.send_message(b"")  # 14 bytes
    assert proto.writing_paused
    proto.consume_output(4)
    assert not proto.writing_paused
    proto.send_message(b"x")
    assert proto.writing_paused
    proto.data_to_send()
    assert not proto.writing_paused


# -- close states -------------------------------------------------------------------------


def test_close_states_send_first() -> None:
    """OPEN, then CLOSING after send_eof, then CLOSED after the peer's EOF."""
    proto = MessageProtocol()
    assert _state(proto) is State.OPEN
    assert not proto.eof_pending
    proto.send_eof()
    assert _state(proto) is State.CLOSING
    assert proto.eof_pending  # nothing queued: shut down the write side now
    proto.receive_eof()
    assert _state(proto) is State.CLOSED
    assert proto.error is None


def test_close_states_receive_first() -> None:
    """OPEN, then CLOSING after the peer's EOF, then CLOSED after send_eof; sending still works in between."""
    proto = MessageProtocol()
    proto.receive_data(encode(b"last"))
    proto.receive_eof()
    assert _state(proto) is State.CLOSING
    proto.send_message(b"reply")  # a half-closed peer can still read our replies
    proto.send_eof()
    assert _state(proto) is State.CLOSED
    assert not proto.eof_pending  # the reply must go out first
    proto.data_to_send()
    assert proto.eof_pending


def test_eof_pending_waits_for_the_buffer() -> None:
    """eof_pending becomes true only once everything queued before send_eof has been consumed."""
    proto = MessageProtocol()
    proto.send_message(b"bye")
    proto.send_eof()
    assert not proto.eof_pending
    proto.consume_output(6)
    assert not proto.eof_pending
    proto.consume_output(1)
    assert proto.eof_pending


def test_send_after_send_eof_is_invalid_state() -> None:
    """send_message after send_eof raises InvalidState and queues nothing."""
    proto = MessageProtocol()
    proto.send_eof()
    with pytest.raises(InvalidState):
        proto.send_message(b"late")
    assert proto.outgoing_size == 0
    proto.send_eof()  # idempotent
    assert _state(proto) is State.CLOSING


def test_state_values() -> None:
    """State has the three documented values."""
    assert [s.value for s in State] == ["open", "closing", "closed"]


# -- limits -------------------------------------------------------------------------------


def test_default_limits_match_spec() -> None:
    """The defaults are the SPEC §7 table."""
    assert Limits() == DEFAULT_LIMITS
    assert (DEFAULT_LIMITS.write_high_water, DEFAULT_LIMITS.write_low_water) == (256 * 1024, 64 * 1024)
    assert DEFAULT_LIMITS.max_connections == 10_000
    assert DEFAULT_LIMITS.idle_timeout == 300.0
    assert DEFAULT_LIMITS.message_timeout == 30.0
    assert DEFAULT_LIMITS.handshake_timeout == 10.0
    assert DEFAULT_LIMITS.shutdown_timeout == 5.0
    assert MessageProtocol().limits is DEFAULT_LIMITS


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"write_high_water": -1}, "write_high_water"),
        ({"write_low_water": -1}, "write_low_water"),
        ({"max_connections": -5}, "max_connections"),
        ({"max_threads": 1.5}, "max_threads"),
        ({"write_high_water": 10, "write_low_water": 11}, "above write_high_water"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"message_timeout": -0.1}, "message_timeout"),
        ({"handshake_timeout": -2}, "handshake_timeout"),
        ({"close_timeout": -1}, "close_timeout"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
    ],
)
def test_limits_validation(kwargs: dict[str, float], pattern: str) -> None:
    """Negative limits, non-integer counts and low water above high water raise ValueError naming the limit."""
    with pytest.raises(ValueError, match=pattern):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_zero_timeouts_mean_off() -> None:
    """A timeout of 0 means off (None), as on the command line; None stays None."""
    limits = Limits(idle_timeout=0, message_timeout=0.0, handshake_timeout=None)
    assert (limits.idle_timeout, limits.message_timeout, limits.handshake_timeout) == (None, None, None)
    assert Limits(write_high_water=0, write_low_water=0).write_high_water == 0


# -- statistics ---------------------------------------------------------------------------


def test_statistics_add_and_as_dict() -> None:
    """Statistics add field by field and export as a dict."""
    a = Statistics(1, 2, 3, 4)
    a.add(Statistics(10, 20, 30, 40))
    assert a.as_dict() == {
        "messages_received": 11,
        "messages_sent": 22,
        "bytes_received": 33,
        "bytes_sent": 44,
    }


def test_server_statistics_summary() -> None:
    """ServerStatistics sums connection counters and prints a one-line summary with every count."""
    server = ServerStatistics(connections=3, rejected=1, errors=2, active=1)
    proto = MessageProtocol()
    proto.receive_data(encode(b"ab"))
    proto.send_message(b"ab")
    server.add(proto.stats)
    assert server.as_dict() == {
        "connections": 3,
        "active": 1,
        "rejected": 1,
        "errors": 2,
        "error_kinds": {},
        "messages_received": 1,
        "messages_sent": 1,
        "bytes_received": 6,
        "bytes_sent": 6,
    }
    assert server.summary() == (
        "3 connections (1 rejected), 1 messages in / 1 out, 6 bytes in / 6 out, 2 errors"
    )


def test_messages_before_a_bad_header_are_returned_and_error_is_set() -> None:
    """receive_data returns the good messages and sets error (CLOSED) when a bad header follows them."""
    proto = MessageProtocol(FrameFormat(max_size=10))
    data = FrameFormat().encode(b"ok") + struct.pack(">I", 1000)
    assert proto.receive_data(data) == [b"ok"]
    assert isinstance(proto.error, MessageTooLarge)
    assert proto.state is State.CLOSED


@pytest.mark.parametrize("spec", ["u32be", "u16le", "u32be+kind:B", "magic:H+u16be!"])
def test_receive_echo_queues_exactly_the_frames_received_in_any_split(spec: str) -> None:
    """The echo fast path sends back byte-identical frames, whatever the split of the input."""
    fmt = FrameFormat.parse(spec)
    header = {name: 7 for name in fmt.field_names}
    stream = b"".join(fmt.encode(b"x" * size, header) for size in (0, 1, 5, 300))
    for split in range(len(stream) + 1):
        proto = MessageProtocol(fmt)
        assert proto.receive_echo(stream[:split]) + proto.receive_echo(stream[split:]) == stream
        assert proto.stats.messages_received == proto.stats.messages_sent == 4
        assert proto.stats.bytes_received == proto.stats.bytes_sent == len(stream)


def test_receive_echo_checks_headers_and_keeps_earlier_frames() -> None:
    """An oversize header stops the echo; the frames before it are still echoed and error is set."""
    fmt = FrameFormat(max_size=10)
    proto = MessageProtocol(fmt)
    good = fmt.encode(b"ok")
    assert proto.receive_echo(good + struct.pack(">I", 11) + b"rest") == good
    assert isinstance(proto.error, MessageTooLarge)
    proto = MessageProtocol(fmt)
    with pytest.raises(MessageTooLarge):
        proto.receive_echo(struct.pack(">I", 11))


def test_receive_and_reply_encodes_replies_in_one_chunk() -> None:
    """Replies to one read come back as one bytes; None is no reply; a Message keeps its header."""
    fmt = FrameFormat.parse("u32be+kind:B")
    proto = MessageProtocol(fmt)
    data = fmt.encode(b"a", {"kind": 1}) + fmt.encode(b"skip") + fmt.encode(b"bc", {"kind": 2})
    out, other, rest = proto.receive_and_reply(data, lambda m: None if m == b"skip" else m)
    assert out == fmt.encode(b"a", {"kind": 1}) + fmt.encode(b"bc", {"kind": 2})
    assert (other, rest) == (None, [])
    assert proto.stats.messages_sent == 2 and proto.stats.bytes_sent == len(out)


def test_receive_and_reply_stops_at_a_reply_it_cannot_encode() -> None:
    """A reply that is not bytes-like stops the loop: it comes back with the messages after it."""
    proto = MessageProtocol()
    data = encode(b"1") + encode(b"2") + encode(b"3")
    marker = object()
    out, other, rest = proto.receive_and_reply(data, lambda m: marker if m == b"2" else m)
    assert out == encode(b"1")
    assert other is marker and rest == [b"3"]


def test_receive_and_reply_keeps_replies_before_a_handler_error() -> None:
    """When the handler raises, the replies computed before it are queued and the error propagates."""
    proto = MessageProtocol()

    def handler(m: bytes) -> bytes:
        if m == b"boom":
            raise RuntimeError("boom")
        return m

    with pytest.raises(RuntimeError):
        proto.receive_and_reply(encode(b"ok") + encode(b"boom"), handler)
    assert b"".join(proto.data_to_send()) == encode(b"ok")


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("message size 4000000000 exceeds max_size 1000", "message too large"),
        ("idle timeout: nothing received for 1 s", "idle timeout"),
        ("message timeout: a frame was not completed within 30 s", "message timeout"),
        ("handshake timeout: no PROXY header within 10 s", "handshake timeout"),
        ("authentication failed: the peer does not know the key", "authentication"),
        ("TLS handshake failed: certificate unknown", "tls"),
        ("bad PROXY header signature", "proxy protocol"),
        ("handler raised ValueError: boom", "handler error"),
        ("connection reset by peer", "reset"),
        ("something new", "other"),
    ],
)
def test_error_kind_names_the_limit_or_check(reason: str, kind: str) -> None:
    """error_kind maps the servers' close reasons to the short kinds of the summary."""
    assert error_kind(reason) == kind


def test_server_statistics_summary_and_merge_count_errors_by_kind() -> None:
    """count_error counts by kind; summary lists the kinds; add_server merges them."""
    a = ServerStatistics(connections=2)
    a.count_error("idle timeout: nothing received for 1 s")
    a.count_error("idle timeout: nothing received for 1 s")
    b = ServerStatistics(connections=1)
    b.count_error("connection reset by peer")
    a.add_server(b)
    assert (a.connections, a.errors) == (3, 3)
    assert a.error_kinds == {"idle timeout": 2, "reset": 1}
    assert a.summary().endswith("3 errors (2 idle timeout, 1 reset)")
    assert ServerStatistics(**a.as_dict()) == a
