"""The verification ledger (``msgsock.app.stress.ledger``): sans-I/O, driven with ``now`` by hand."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from msgsock.app.stress import ERROR_KINDS, StressConfig
from msgsock.app.stress.ledger import _MAX_EXAMPLES, _Account, _Ledger
from msgsock.app.stress.payload import _Payloads

MS = 1_000_000  # ns


def _ledger(size: tuple[int, int] = (40, 40), timeout: float = 1.0) -> _Ledger:
    return _Ledger(_Payloads(StressConfig(size_min=size[0], size_max=size[1])), timeout)


def _replies(ledger: _Ledger, acct: _Account, seqs: list[int]) -> list[bytes]:
    return [ledger.payloads.expected(acct.cid, s) for s in seqs]


def _others(ledger: _Ledger) -> dict[str, int]:
    return {k: v for k, v in ledger.errors.items() if v}


def test_in_order_replies_are_verified_with_their_latencies() -> None:
    """Replies in order settle their messages; latency is reply time minus intended send time."""
    ledger, acct = _ledger(), _Account(3)
    ledger.issue(acct, 4, now=10 * MS)
    assert acct.tx_seq == 4 and ledger.inflight == 4 and ledger.sent == ledger.sent_all == 4
    ledger.verify(acct, _replies(ledger, acct, [0, 1]), now=11 * MS)
    ledger.verify(acct, _replies(ledger, acct, [2, 3]), now=13 * MS)
    assert acct.next_rx == 4 and not acct.pending and ledger.inflight == 0
    assert ledger.done == ledger.done_all == 4 and ledger.payload == 160
    assert ledger.last_ok == 13 * MS
    hist = ledger.histogram()
    assert hist.count == 4 and hist.min == 1 * MS and hist.max == 3 * MS
    assert hist.total == 2 * 1 * MS + 2 * 3 * MS
    assert _others(ledger) == {}


def test_messages_intended_before_the_start_are_not_measured() -> None:
    """Warmup: messages intended before ``t_start`` are verified but not measured."""
    ledger, acct = _ledger(), _Account(0)
    ledger.t_start = 5 * MS
    ledger.issue(acct, 2, now=4 * MS)
    ledger.issue(acct, 1, now=5 * MS)
    assert ledger.sent == 1 and ledger.sent_all == 3
    ledger.verify(acct, _replies(ledger, acct, [0, 1, 2]), now=6 * MS)
    assert ledger.done_all == 3 and ledger.done == 1 and ledger.histogram().count == 1


def test_open_loop_latency_counts_from_the_intended_time() -> None:
    """Open loop: a message that waited for a slot still counts its latency from its intended time."""
    ledger, acct = _ledger(), _Account(0)
    ledger.issue(acct, 2, now=50 * MS, times=[10 * MS, 20 * MS])
    assert list(acct.sent_log) == [(0, 50 * MS)]
    ledger.verify(acct, _replies(ledger, acct, [0, 1]), now=60 * MS)
    hist = ledger.histogram()
    assert hist.min == 40 * MS and hist.max == 50 * MS


@given(order=st.permutations(list(range(8))))
def test_any_order_of_replies_verifies_each_once(order: list[int]) -> None:
    """Any order of the replies verifies every message once; a reply counts as reordered exactly
    when a later message's reply arrived before it."""
    ledger, acct = _ledger(), _Account(1)
    ledger.issue(acct, 8, now=0)
    for s in order:
        ledger.verify(acct, _replies(ledger, acct, [s]), now=MS)
    assert ledger.done_all == 8 and ledger.inflight == 0 and acct.next_rx == 8
    errors = _others(ledger)
    assert set(errors) <= {"reordered"}
    late = sum(1 for i, s in enumerate(order) if any(j > s for j in order[:i]))
    assert errors.get("reordered", 0) == late


def test_a_second_reply_is_duplicated() -> None:
    """A reply for a message already answered counts as **duplicated** and settles nothing."""
    ledger, acct = _ledger(), _Account(0)
    ledger.issue(acct, 2, now=0)
    ledger.verify(acct, _replies(ledger, acct, [0, 0, 1]), now=MS)
    assert _others(ledger) == {"duplicated": 1}
    assert ledger.done_all == 2 and ledger.inflight == 0
    assert ledger.examples == ["conn 0 seq 0: a second reply"]


def test_a_corrupted_reply_settles_the_message_it_names() -> None:
    """A reply that names a pending message but differs settles that message as **corrupted**."""
    ledger, acct = _ledger(), _Account(0)
    ledger.issue(acct, 3, now=0)
    bad = bytearray(ledger.payloads.expected(0, 1))
    bad[20] ^= 0xFF
    ledger.verify(acct, [*_replies(ledger, acct, [0]), bytes(bad), *_replies(ledger, acct, [2])], now=MS)
    assert _others(ledger) == {"corrupted": 1}
    assert ledger.done_all == 2 and ledger.inflight == 0 and not acct.pending
    assert ledger.examples[0].startswith("conn 0 seq 1: byte 20 is ")


def test_garbage_settles_the_oldest_pending_message() -> None:
    """A reply that names nothing settles the oldest pending message (a stream reply is in order)."""
    ledger, acct = _ledger(), _Account(0)
    ledger.issue(acct, 2, now=0)
    ledger.verify(acct, [b"\xff" * 40], now=MS)
    assert _others(ledger) == {"corrupted": 1}
    assert acct.next_rx == 1 and list(acct.pending) == [1]
    ledger.verify(acct, [b"\xff" * 40], now=MS)
    ledger.verify(acct, [b"\xff" * 40], now=MS)  # nothing in flight any more
    assert ledger.errors["corrupted"] == 3 and ledger.inflight == 0
    assert ledger.examples[-1] == "conn 0: unexpected reply of 40 bytes with nothing in flight"


def test_short_replies_are_found_among_the_messages_in_flight() -> None:
    """Replies too short to name themselves are matched by content among those in flight."""
    ledger, acct = _ledger(size=(4, 4)), _Account(0)
    ledger.issue(acct, 3, now=0)
    ledger.verify(acct, _replies(ledger, acct, [1, 0, 2, 2]), now=MS)
    assert _others(ledger) == {"reordered": 1, "duplicated": 1}
    assert ledger.done_all == 3 and ledger.inflight == 0


def test_unanswered_messages_are_lost_after_the_timeout_and_late_replies_ignored() -> None:
    """``expire(now)`` declares lost what is older than the timeout; a late reply is not a duplicate."""
    ledger, acct = _ledger(timeout=1.0), _Account(5)
    ledger.issue(acct, 2, now=0)
    ledger.issue(acct, 1, now=600 * MS)
    assert not ledger.expire(acct, now=999 * MS)
    assert ledger.expire(acct, now=1000 * MS)
    assert ledger.errors["lost"] == 2 and list(acct.pending) == [2] and ledger.inflight == 1
    assert ledger.examples == ["conn 5 seq 0: no reply within 1 s", "conn 5 seq 1: no reply within 1 s"]
    ledger.verify(acct, _replies(ledger, acct, [0, 2]), now=1001 * MS)
    assert _others(ledger) == {"lost": 2}
    assert ledger.done_all == 1 and ledger.inflight == 0
    assert not ledger.expire(acct, now=10_000 * MS)


def test_open_loop_timeouts_run_from_the_write_time() -> None:
    """Open loop: the timeout runs from when a message was written, not from its intended time."""
    ledger, acct = _ledger(timeout=1.0), _Account(0)
    ledger.issue(acct, 1, now=5000 * MS, times=[0])
    assert not ledger.expire(acct, now=5999 * MS)
    assert ledger.expire(acct, now=6000 * MS)


def test_abort_counts_what_was_still_owed() -> None:
    """A connection that ended owes nothing any more; counted as **aborted** unless we closed it."""
    ledger, a, b = _ledger(), _Account(0), _Account(1)
    ledger.issue(a, 3, now=0)
    ledger.issue(b, 2, now=0)
    ledger.abort(a, count=True)
    ledger.abort(b, count=False)
    assert _others(ledger) == {"aborted": 3}
    assert ledger.inflight == 0 and not a.pending and not b.pending


def test_examples_are_bounded() -> None:
    """Only the first few errors keep an example; all of them are counted."""
    ledger, acct = _ledger(), _Account(0)
    for _ in range(3 * _MAX_EXAMPLES):
        ledger.verify(acct, [b"\x00" * 40], now=0)
    assert ledger.errors["corrupted"] == 3 * _MAX_EXAMPLES
    assert len(ledger.examples) == _MAX_EXAMPLES


def test_stream_totals_fold_into_the_counters() -> None:
    """Stream mode's once-per-round totals end up in the same counters and histogram summary."""
    ledger = _ledger()
    ledger.issued_in_stream(10, now=0)
    ledger.hist.counts[5] += 4  # stream mode buckets its latencies itself
    ledger.settled_in_stream(4, now=2 * MS, measured=4, lsum=8 * MS, lo=1 * MS, hi=3 * MS)
    snap = ledger.snapshot(1, 2 * MS, portable=True)
    assert snap["done_all"] == snap["done"] == 4 and snap["payload_all"] == 160 and snap["errors"] == 0
    assert snap["hist"]["count"] == 4
    assert ledger.sent_all == 10 and ledger.inflight == 6
    hist = ledger.histogram()
    assert (hist.min, hist.max, hist.total) == (1 * MS, 3 * MS, 8 * MS)
    assert set(ledger.errors) == set(ERROR_KINDS)
