"""The sans-I/O datagram core alone, without a socket (msgsock.udp.core, msgsock.udp.request; SPEC §5.4).

Time is what the test passes as ``now``; the log is a list of the calls the core
made to its ``log`` function.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgsock.exceptions import MessageTooLarge, OversizeMessage, Timeout
from msgsock.framing import Message
from msgsock.serving import ERROR, WARNING
from msgsock.udp.core import (
    CRITICAL,
    DEFAULT_MAX_SIZE,
    MAX_DATAGRAM,
    WARNING_BURST,
    WARNING_INTERVAL,
    DatagramServerProtocol,
    check_max_size,
)
from msgsock.udp.request import DatagramClientProtocol, Request, Step, check_client_options
from tests.helpers import unit

PEER = ("127.0.0.1", 5000)
PEERS = [("127.0.0.1", 5000 + i) for i in range(3)]
SRC = Path(__file__).resolve().parent.parent / "src" / "msgsock"


@dataclass
class Line:
    level: int
    text: str
    exc_info: Any


@dataclass
class Log:
    """A ``log`` function that records what the core logged."""

    lines: list[Line] = field(default_factory=list)

    def __call__(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        self.lines.append(Line(level, msg % args, exc_info))

    def texts(self, level: int | None = None) -> list[str]:
        return [ln.text for ln in self.lines if level is None or ln.level == level]


def server(max_size: int = 100, **kwargs: Any) -> tuple[DatagramServerProtocol, Log]:
    log = Log()
    return DatagramServerProtocol(max_size, log=log, **kwargs), log


def echo(message: bytes) -> bytes:
    return message


def boom(message: bytes) -> bytes:
    raise ValueError("boom")


# -- the server: sizes and counting -----------------------------------------------------------


def test_a_datagram_within_max_size_is_counted_and_returned() -> None:
    """A datagram up to max_size comes back as bytes, counted in messages and bytes received."""
    proto, log = server(100)
    assert proto.buffer_size == 101
    assert proto.receive_datagram(memoryview(b"hello"), PEER, 0.0) == b"hello"
    assert proto.receive_datagram(b"x" * 100, PEER, 0.0) == b"x" * 100
    assert proto.receive_datagram(b"", PEER, 0.0) == b""
    stats = proto.statistics()
    assert (stats.messages_received, stats.bytes_received, stats.errors) == (3, 105, 0)
    assert not log.lines


@pytest.mark.parametrize(("exact", "words"), [(True, "1000 bytes"), (False, "more than 100 bytes")])
def test_an_oversize_datagram_is_dropped_counted_and_logged(exact: bool, words: str) -> None:
    """A datagram that filled the buffer is dropped, counted as `message too large`, logged with peer and sizes."""
    proto, log = server(100, exact_sizes=exact)
    assert proto.receive_datagram(b"x" * 101, PEER, 0.0, size=1000) is None
    stats = proto.statistics()
    assert (stats.errors, stats.error_kinds, stats.messages_received) == (1, {"message too large": 1}, 0)
    assert log.texts(WARNING) == [f"127.0.0.1:5000: dropped a datagram of {words}: above max_size 100"]


def test_the_largest_datagram_is_accepted() -> None:
    """max_size may be the largest UDP payload, 65535; the default is 65507."""
    proto, _ = server(MAX_DATAGRAM)
    assert proto.receive_datagram(bytes(MAX_DATAGRAM), PEER, 0.0) == bytes(MAX_DATAGRAM)
    assert DatagramServerProtocol().max_size == DEFAULT_MAX_SIZE == 65507


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (70000, ValueError, r"^max_size 70000: must be 0\.\.65535, the largest UDP payload$"),
        (-1, ValueError, r"^max_size -1: must be 0\.\.65535"),
        ("5", TypeError, r"^max_size must be an int, got str$"),
        (True, TypeError, r"^max_size must be an int, got bool$"),
        (5.0, TypeError, r"^max_size must be an int, got float$"),
    ],
)
def test_bad_max_size_names_the_argument(value: Any, error: type[Exception], match: str) -> None:
    """A max_size that is no datagram size is refused, naming the argument and value."""
    with pytest.raises(error, match=match):
        check_max_size(value)
    with pytest.raises(error, match=match):
        DatagramServerProtocol(value)


# -- the server: the handler ----------------------------------------------------------------


def test_a_reply_is_returned_and_counted_when_sent() -> None:
    """The handler's reply is what to send; reply_sent counts it (a memoryview by its nbytes)."""
    proto, log = server()
    assert proto.handle(echo, b"abc", PEER, 0.0) == b"abc"
    assert proto.handle(lambda m: None, b"abc", PEER, 0.0) is None
    assert proto.handle(lambda m: Message(m, {"k": 1}), b"abc", PEER, 0.0) == b"abc"
    wide = memoryview(array("I", [1, 2, 3]))  # 3 items, 12 bytes
    assert proto.handle(lambda m: wide, b"abc", PEER, 0.0) is wide
    proto.reply_sent(b"abc")
    proto.reply_sent(wide)
    stats = proto.statistics()
    assert (stats.messages_sent, stats.bytes_sent, stats.errors) == (2, 15, 0)
    assert not log.lines


def test_a_handler_that_raises_is_logged_with_its_traceback() -> None:
    """A raise: no reply, one error line with the exception, a `handler error`."""
    proto, log = server()
    assert proto.handle(boom, b"x", PEER, 0.0) is None
    assert [(ln.level, ln.text) for ln in log.lines] == [
        (ERROR, "127.0.0.1:5000: handler raised ValueError: boom; no reply")
    ]
    assert isinstance(log.lines[0].exc_info, ValueError)
    assert proto.statistics().error_kinds == {"handler error": 1}


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        ("text", "handler returned str; expected bytes, bytearray, memoryview or None"),
        (42, "handler returned int; expected bytes, bytearray, memoryview or None"),
    ],
)
def test_a_wrong_reply_is_a_handler_error_without_traceback(reply: Any, words: str) -> None:
    """A reply that is not bytes-like or None: no reply, one error line (no traceback), a `handler error`."""
    proto, log = server()
    assert proto.handle(lambda m: reply, b"x", PEER, 0.0) is None
    assert [(ln.level, ln.text, ln.exc_info) for ln in log.lines] == [
        (ERROR, f"127.0.0.1:5000: {words}; no reply", None)
    ]
    assert proto.statistics().error_kinds == {"handler error": 1}


def test_a_coroutine_on_the_blocking_path_is_closed_and_refused(recwarn: pytest.WarningsRecorder) -> None:
    """A coroutine returned to handle() is closed (no "never awaited" warning) and is a handler error."""

    async def coro(message: bytes) -> bytes:
        return message

    proto, log = server()
    assert proto.handle(coro, b"x", PEER, 0.0) is None  # the misuse under test
    assert "an async handler needs the asyncio server" in log.texts(ERROR)[0]
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_reply_above_max_size_is_the_handlers_error() -> None:
    """A reply that cannot be one datagram is not sent: a `handler error`, never the peer's `message too large`."""
    proto, log = server(10)
    assert proto.handler_returned(b"y" * 11, PEER, 0.0) is None
    assert proto.handler_returned(b"y" * 10, PEER, 0.0) == b"y" * 10
    assert log.texts(ERROR) == [
        "127.0.0.1:5000: reply dropped: cannot send a message of 11 bytes: the frame allows at most 10"
    ]
    assert proto.statistics().error_kinds == {"handler error": 1}


def test_handler_failed_counts_an_awaited_handlers_raise() -> None:
    """handler_failed (an awaited coroutine raised) logs and counts as a raise does."""
    proto, log = server()
    proto.handler_failed(KeyError("k"), PEER, 0.0)
    assert log.texts(ERROR) == ["127.0.0.1:5000: handler raised KeyError: 'k'; no reply"]
    assert proto.statistics().errors == 1


# -- the server: socket errors -----------------------------------------------------------------


def test_icmp_errors_on_receive_are_neither_counted_nor_logged() -> None:
    """An ICMP error concerns an earlier reply: read on, count nothing."""
    proto, log = server()
    assert proto.receive_failed(ConnectionRefusedError(), 0.0) is True
    assert proto.receive_failed(ConnectionResetError(), 0.0) is True
    assert proto.statistics().errors == 0 and not log.lines


def test_other_receive_errors_stop_the_burst_and_are_counted() -> None:
    """Another receive error: stop this burst, count an `os error`, log a warning with the reason."""
    proto, log = server()
    assert proto.receive_failed(OSError(12, "Cannot allocate memory"), 0.0) is False
    assert proto.statistics().error_kinds == {"os error": 1}
    assert log.texts(WARNING) == ["udp receive failed: OSError: Cannot allocate memory"]


def test_a_failed_send_is_counted_and_logged() -> None:
    """A reply that could not be sent (a full buffer included) is counted by kind and logged with the peer."""
    proto, log = server()
    proto.send_failed(BlockingIOError(11, "Resource temporarily unavailable"), PEER, 0.0)
    assert proto.statistics().error_kinds == {"os error": 1}
    assert log.texts(WARNING) == [
        "127.0.0.1:5000: reply dropped: BlockingIOError: Resource temporarily unavailable"
    ]


def test_pump_lines_are_worded_here() -> None:
    """The shutdown deadline's cancellations and a pump's own failure are worded by the core."""
    proto, log = server()
    proto.handlers_cancelled("<AsyncUdpServer 127.0.0.1:1>", 3, 0.5)
    error = RuntimeError("bug")
    proto.pump_failed("<UdpServer 127.0.0.1:1>", error)
    assert [(ln.level, ln.text) for ln in log.lines] == [
        (
            WARNING,
            "<AsyncUdpServer 127.0.0.1:1>: 3 handler calls still running at the shutdown deadline (0.5 s); cancelled",
        ),
        (CRITICAL, "<UdpServer 127.0.0.1:1>: the server thread failed"),
    ]
    assert log.lines[1].exc_info is error


# -- the server: the rate-limited log ------------------------------------------------------------


def test_a_flood_of_handler_errors_is_one_burst_then_one_summary() -> None:
    """100 failing datagrams from 3 senders: 5 lines in full, then one summary counting the other 95."""
    proto, log = server()
    for i in range(100):
        assert proto.handle(boom, b"x", PEERS[i % 3], i * 0.01) is None
    assert len(log.lines) == WARNING_BURST == 5
    assert all(ln.exc_info is not None for ln in log.lines)
    proto.flush_warnings(1.0)
    assert len(log.lines) == 6
    assert log.lines[-1].level == ERROR
    assert log.lines[-1].text == "... and 95 more handler errors from 3 senders in the last 1 s"
    stats = proto.statistics()
    assert stats.errors == 100 and stats.error_kinds == {"handler error": 100}


def test_bad_replies_and_raises_share_one_limit() -> None:
    """Wrong reply types, oversize replies and raises are all handler errors: one rate limit."""
    proto, log = server(2)
    handlers = [boom, lambda m: "str", lambda m: b"too long"]
    for i in range(30):
        proto.handle(handlers[i % 3], b"x", PEER, 0.0)
    assert len(log.lines) == 5
    proto.flush_warnings(0.0)
    assert log.lines[-1].text == "... and 25 more handler errors from 127.0.0.1:5000 in the last 0.0 s"


def test_each_kind_of_line_has_its_own_limit() -> None:
    """An oversize flood does not silence handler errors, nor the other way round."""
    proto, log = server(10)
    for _ in range(20):
        proto.receive_datagram(b"x" * 11, PEER, 0.0)
        proto.handle(boom, b"x", PEER, 0.0)
        proto.send_failed(OSError(1, "no"), PEER, 0.0)
    assert len(log.lines) == 15
    proto.flush_warnings(2.0)
    assert log.texts()[15:] == [
        "... and 15 more datagrams above max_size 10 dropped from 127.0.0.1:5000 in the last 2 s",
        "... and 15 more handler errors from 127.0.0.1:5000 in the last 2 s",
        "... and 15 more replies dropped to 127.0.0.1:5000 in the last 2 s",
    ]
    assert proto.statistics().errors == 60


def test_a_summary_is_due_an_interval_after_the_first_suppressed_line() -> None:
    """next_deadline says when a pending summary is due; check_timeouts logs it then, not before."""
    proto, log = server(10)
    assert proto.next_deadline() is None
    for i in range(5):
        proto.receive_datagram(b"x" * 11, PEER, 1.0 + i * 0.01)
    assert proto.next_deadline() is None  # all logged in full: nothing pending
    proto.receive_datagram(b"x" * 11, PEER, 2.0)
    assert proto.next_deadline() == 2.0 + WARNING_INTERVAL
    proto.check_timeouts(2.0 + WARNING_INTERVAL - 0.001)
    assert len(log.lines) == 5
    proto.check_timeouts(2.0 + WARNING_INTERVAL)
    assert (
        log.texts()[-1]
        == "... and 1 more datagrams above max_size 10 dropped from 127.0.0.1:5000 in the last 11 s"
    )
    assert proto.next_deadline() is None
    proto.flush_warnings(100.0)
    assert len(log.lines) == 6  # nothing left to summarise


def test_a_quiet_spell_logs_in_full_again() -> None:
    """After a quiet interval, the next bad datagrams are logged in full again (burst of 5)."""
    proto, log = server(10)
    for i in range(10):
        proto.receive_datagram(b"x" * 11, PEER, i * 0.01)
    proto.check_timeouts(WARNING_INTERVAL + 1)
    assert len(log.lines) == 6
    for i in range(5):
        proto.receive_datagram(b"x" * 11, PEER, 3 * WARNING_INTERVAL + i)
    assert len(log.lines) == 11
    assert all("dropped a datagram of" in t for t in log.texts()[6:])


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["oversize", "handler", "send"]),
        st.integers(min_value=0, max_value=4),  # the sender
        st.floats(min_value=0.0, max_value=6.0),  # seconds since the previous event
        st.booleans(),  # the pump's timer fires before the event
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_every_event_is_logged_in_full_or_counted_in_one_summary(
    events: list[tuple[str, int, float, bool]],
) -> None:
    """Whatever the flood: each event is a full line or counted in exactly one summary, and lines stay few."""
    proto, log = server(10)
    now = 0.0
    counts = {"oversize": 0, "handler": 0, "send": 0}
    for kind, sender, gap, tick in events:
        now += gap
        peer = ("10.0.0.1", 1000 + sender)
        if tick and (due := proto.next_deadline()) is not None and due <= now:
            proto.check_timeouts(now)
        if kind == "oversize":
            proto.receive_datagram(b"x" * 11, peer, now)
        elif kind == "handler":
            proto.handle(boom, b"x", peer, now)
        else:
            proto.send_failed(OSError(1, "no"), peer, now)
        counts[kind] += 1
    proto.flush_warnings(now)
    words = {
        "oversize": "datagrams above max_size 10 dropped",
        "handler": "handler errors",
        "send": "replies dropped",
    }
    full = {"oversize": "dropped a datagram of", "handler": "handler raised", "send": ": reply dropped: "}
    for kind in counts:
        texts = log.texts()
        summaries = [t for t in texts if t.startswith("... and ") and f" more {words[kind]} " in t]
        logged = sum(1 for t in texts if full[kind] in t and not t.startswith("..."))
        suppressed = sum(int(t.split()[2].replace(",", "")) for t in summaries)
        assert logged + suppressed == counts[kind]
        # At most a burst in full per quiet spell and one summary per interval.
        assert len(summaries) <= now / WARNING_INTERVAL + 1 + logged
    assert proto.statistics().errors == sum(counts.values())
    assert proto.next_deadline() is None


# -- the server: work in progress ------------------------------------------------------------------


def test_reading_pauses_at_max_pending_and_resumes_at_half() -> None:
    """Reading pauses with max_pending handler calls in progress and resumes once half have finished."""
    proto, _ = server(max_pending=4)
    for _ in range(3):
        proto.handler_started()
    assert not proto.reading_paused
    proto.handler_started()
    assert proto.reading_paused
    proto.handler_finished()  # 3 left
    assert proto.reading_paused
    proto.handler_finished()  # 2 left: half
    assert not proto.reading_paused
    assert proto.pending == 2


def test_statistics_are_a_snapshot() -> None:
    """statistics() returns a copy: later counting does not change it."""
    proto, _ = server(10)
    proto.receive_datagram(b"x" * 11, PEER, 0.0)
    snapshot = proto.statistics()
    proto.receive_datagram(b"x" * 11, PEER, 0.0)
    assert snapshot.error_kinds == {"message too large": 1}
    assert proto.statistics().error_kinds == {"message too large": 2}


# -- the client: resends ---------------------------------------------------------------------------


def request(timeout: float = 1.0, retries: int = 2) -> Request:
    return Request(timeout, retries, "127.0.0.1:9")


def test_silence_is_retries_plus_one_tries_then_a_timeout() -> None:
    """With no reply: SEND, WAIT until the deadline, SEND again..., FAILED after retries + 1 tries."""
    req = request(timeout=1.0, retries=2)
    sends = []
    now = 0.0
    while (step := req.next_step(now)) is not Step.FAILED:
        if step is Step.SEND:
            sends.append(now)
            req.try_started(now)
        else:
            assert step is Step.WAIT
            assert 0 < req.remaining(now) <= 1.0
            now += 0.25
    assert sends == [0.0, 1.0, 2.0]
    assert now == 3.0 and req.tries == 3
    error = req.error()
    assert isinstance(error, Timeout)
    assert str(error) == "no reply from 127.0.0.1:9 after 3 tries of 1 s"


def test_a_reply_within_the_try_is_done() -> None:
    """A datagram that arrives while a try is open is the reply."""
    req = request()
    assert req.next_step(0.0) is Step.SEND
    req.try_started(0.0)
    assert req.next_step(0.5) is Step.WAIT
    assert req.datagram_received(b"pong") is True
    assert req.next_step(5.0) is Step.DONE  # even past the deadline: it came in time
    assert req.reply == b"pong"
    assert req.datagram_received(b"late") is False  # one reply per request
    assert req.reply == b"pong"


def test_a_datagram_with_no_try_open_is_stale() -> None:
    """A datagram before the first try (or between tries) is not the reply (the matching rule)."""
    req = request()
    assert req.datagram_received(b"stale") is False
    assert req.next_step(0.0) is Step.SEND


def test_a_lost_try_is_resent_and_the_second_reply_counts() -> None:
    """The first try times out; the reply to the second ends the request after 1 finished try."""
    req = request(timeout=0.5, retries=3)
    req.next_step(0.0)
    req.try_started(0.0)
    assert req.next_step(0.5) is Step.SEND
    req.try_started(0.5)
    req.datagram_received(b"ok")
    assert req.next_step(0.6) is Step.DONE and req.tries == 1


def test_a_full_send_buffer_costs_the_try() -> None:
    """A send that could not go out within the try ends the try (counted)."""
    req = request(retries=0)
    req.next_step(0.0)
    req.try_started(0.0)
    req.send_blocked()
    assert req.next_step(1.0) is Step.FAILED
    assert req.tries == 1


def test_port_unreachable_waits_out_the_try_and_says_so() -> None:
    """ICMP port unreachable with no other address: the try is waited out, and the Timeout says why."""
    req = request(retries=1)
    req.next_step(0.0)
    req.try_started(0.0)
    req.refused(switched=False)
    assert req.next_step(0.5) is Step.WAIT
    assert req.next_step(1.0) is Step.SEND
    req.try_started(1.0)
    assert req.next_step(2.0) is Step.FAILED
    assert str(req.error()) == "no reply from 127.0.0.1:9 after 2 tries of 1 s (port unreachable)"


def test_a_switch_to_the_next_address_starts_the_try_again_uncounted() -> None:
    """ICMP port unreachable and a next address: the try starts again there and is not counted."""
    req = request(retries=0)
    req.next_step(0.0)
    req.try_started(0.0)
    req.refused(switched=True)
    assert req.next_step(0.1) is Step.SEND and req.tries == 0
    req.try_started(0.1)
    req.datagram_received(b"from ipv4")
    assert req.next_step(0.2) is Step.DONE
    assert not req.unreachable


@settings(max_examples=200, deadline=None)
@given(
    retries=st.integers(min_value=0, max_value=6),
    timeout=st.floats(min_value=0.001, max_value=100.0),
    answered=st.one_of(st.none(), st.integers(min_value=0, max_value=8)),
    step=st.floats(min_value=0.0001, max_value=3.0),
)
def test_sends_and_outcome_for_any_limits(
    retries: int, timeout: float, answered: int | None, step: float
) -> None:
    """For any limits and clock step: one send per try, at most retries + 1, a reply to try k ends after k tries."""
    req = Request(timeout, retries, "h:1")
    now = 0.0
    sends = 0
    for _ in range(100_000):  # bounded: the request ends well before
        state = req.next_step(now)
        if state in (Step.DONE, Step.FAILED):
            break
        if state is Step.SEND:
            if sends == answered:
                req.try_started(now)
                req.datagram_received(b"r")
            else:
                req.try_started(now)
            sends += 1
        else:
            now = min(now + step * timeout, req.deadline or now)
    else:
        raise AssertionError("the request never ended")
    if answered is not None and answered <= retries:
        assert state is Step.DONE and sends == answered + 1 and req.tries == answered
    else:
        assert state is Step.FAILED and sends == retries + 1 and req.tries == retries + 1
        assert now == pytest.approx((retries + 1) * timeout)


# -- the client: limits and options ----------------------------------------------------------------


def client(**kwargs: Any) -> DatagramClientProtocol:
    options = {"timeout": 1.0, "retries": 3, "max_size": 10, **kwargs}
    return DatagramClientProtocol("h:1", [(2, ("127.0.0.1", 1))], **options)


def test_sizes_are_checked_both_ways() -> None:
    """Ours above max_size is OversizeMessage before sending; theirs above it is MessageTooLarge."""
    proto = client(max_size=10)
    assert proto.check_send(b"x" * 10) == 10
    assert proto.check_send(memoryview(array("H", [1] * 5))) == 10
    with pytest.raises(OversizeMessage) as info:
        proto.request(b"x" * 11)
    assert (info.value.size, info.value.max_size) == (11, 10)
    with pytest.raises(TypeError, match=r"^message must be bytes-like, got str$"):
        proto.check_send("text")
    proto.check_received(10)
    with pytest.raises(MessageTooLarge) as too_large:
        proto.check_received(11)
    assert not isinstance(too_large.value, OversizeMessage)


def test_a_request_takes_the_limits_in_force() -> None:
    """A request uses the timeout and retries set when it began; the timeout is settable and checked."""
    proto = client()
    proto.timeout = 0.25
    req = proto.request(b"x")
    assert (req.timeout, req.retries, req.where) == (0.25, 3, "h:1")
    with pytest.raises(ValueError, match=r"^timeout 0: must be a finite number of seconds > 0$"):
        proto.timeout = 0
    assert proto.timeout == 0.25
    assert proto.receive_wait(None) == 0.25 and proto.receive_wait(0) == 0.0
    assert math.isinf(proto.receive_wait(math.inf))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": 0}, ValueError, r"^timeout 0: must be a finite number of seconds > 0$"),
        ({"timeout": -1.5}, ValueError, r"^timeout -1\.5: must be"),
        ({"timeout": math.nan}, ValueError, r"^timeout nan: must be"),
        ({"timeout": math.inf}, ValueError, r"^timeout inf: must be"),
        ({"timeout": "1"}, TypeError, r"^timeout must be a number of seconds, got str$"),
        ({"timeout": True}, TypeError, r"^timeout must be a number of seconds, got bool$"),
        ({"retries": -1}, ValueError, r"^retries -1: must be >= 0$"),
        ({"retries": 1.0}, TypeError, r"^retries must be an int, got float$"),
        ({"retries": False}, TypeError, r"^retries must be an int, got bool$"),
        ({"max_size": 65536}, ValueError, r"^max_size 65536: must be 0\.\.65535"),
        ({"max_size": None}, TypeError, r"^max_size must be an int, got NoneType$"),
    ],
)
def test_bad_client_options_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each impossible option is a specific error naming the argument and the value."""
    options = {"timeout": 1.0, "retries": 3, "max_size": 10, **kwargs}
    with pytest.raises(error, match=match):
        check_client_options(**options)
    with pytest.raises(error, match=match):
        DatagramClientProtocol("h:1", [(2, ("127.0.0.1", 1))], **options)


def test_the_client_words_its_timeouts() -> None:
    """A receive or send that ran out of time says where and how long."""
    proto = client(timeout=2)
    assert str(proto.receive_timeout(0.5)) == "nothing received from h:1 within 0.5 s"
    assert str(proto.send_timeout()) == "could not send to h:1 within 2 s"
    assert proto.server_address == ("127.0.0.1", 1)
    with pytest.raises(ValueError, match="no address"):
        DatagramClientProtocol("h:1", [], 1.0, 0, 10)


# -- purity ------------------------------------------------------------------------------------------

CORE_MODULES = ["core", "request"]
FORBIDDEN = {"socket", "selectors", "asyncio", "threading", "time", "ssl", "select", "logging"}

_PROBE = """
import importlib, json, sys, types
# The module alone: neither msgsock's nor msgsock.udp's __init__ (they import the I/O layers).
for name, path in (("msgsock", {src!r}), ("msgsock.udp", {src!r} + "/udp")):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
before = set(sys.modules)
importlib.import_module("msgsock.protocol")  # what the TCP core loads (through stages, ssl's modules)
middle = set(sys.modules)
importlib.import_module("msgsock.udp." + {name!r})
print(json.dumps(sorted(set(sys.modules) - middle)))
"""


@pytest.mark.parametrize("name", CORE_MODULES)
def test_the_udp_core_source_imports_no_io_module(name: str) -> None:
    """core.py and request.py import no socket, thread, clock or logging module (STYLE §1)."""
    tree = ast.parse((SRC / "udp" / f"{name}.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            assert node.module in CORE_MODULES, f"{name}.py imports the I/O module .{node.module}"
    assert not imported & FORBIDDEN, f"{name}.py imports {sorted(imported & FORBIDDEN)}"


@pytest.mark.parametrize("name", CORE_MODULES)
def test_importing_the_udp_core_loads_nothing_beyond_the_tcp_core(name: str) -> None:
    """Imported alone, after msgsock.protocol, the UDP core adds no I/O, thread or clock module."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(src=str(SRC), name=name)],
        capture_output=True,
        text=True,
        timeout=unit(30),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    added = set(json.loads(result.stdout))
    assert f"msgsock.udp.{name}" in added
    assert not added & FORBIDDEN, f"msgsock.udp.{name} loaded {sorted(added & FORBIDDEN)}"
