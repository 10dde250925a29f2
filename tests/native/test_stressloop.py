"""Tests of ``msgsock._stressloop``, stream mode's hot loop of ``msgsock stress`` in C.

The native loop must leave exactly the state the Python round (``hotloop._stream_round``)
leaves: each test drives two workers over real loopback TCP connections with the same
bytes from the "server" side, one through the Python round and one through
:meth:`msgsock.app.stress.native.NativeStream.round`, and compares everything that does
not depend on the clock.  The handoffs (a mismatching read, a duplicate, an EOF, a
reset) are checked the same way, and whole runs go through the real command against
the test servers of ``tests/test_stress.py``.  Skipped without the extension, except the
test that the extension is built where a compiler exists.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from msgsock._histogram import bucket_index
from msgsock.app.stress import StressConfig
from msgsock.app.stress import native as native_mod
from msgsock.app.stress.config import _shares
from msgsock.app.stress.conn import _Conn
from msgsock.app.stress.poller import _IN
from msgsock.app.stress.pump import _Worker
from tests.helpers import unit
from tests.test_stress import FaultyServer, only_errors

REASON = native_mod.REASON
requires_native = pytest.mark.skipif(REASON is not None, reason=f"native stress loop: {REASON}")


def test_extension_is_built_where_a_compiler_exists() -> None:
    """CI must not lose the native loop silently: with gcc here and not disabled, it imports."""
    if os.environ.get("MSGSOCK_NO_EXTENSIONS") == "1":
        pytest.skip("MSGSOCK_NO_EXTENSIONS=1: the Python loop is under test")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc here: the extension cannot be built")
    assert REASON is None, f"gcc is here but msgsock._stressloop does not import: {REASON}"


@requires_native
def test_buckets_are_the_histograms() -> None:
    """The C loop counts every latency in msgsock._histogram.bucket_index's bucket."""
    import random

    _stressloop: Any = importlib.import_module("msgsock._stressloop")

    rng = random.Random(5)
    values = [*range(4096), *(rng.getrandbits(rng.randint(1, 62)) for _ in range(50_000)), 2**46, 2**62]
    for v in values:
        assert _stressloop.bucket(v) == bucket_index(v), v
    with pytest.raises(ValueError, match="must be >= 0"):
        _stressloop.bucket(-1)


# -- one worker, one connection, driven by hand ------------------------------------------


class Pair:
    """A stream-mode worker with one real TCP connection; ``peer`` is the server's end."""

    def __init__(self, size: int = 40, depth: int = 4, messages: int | None = None, sndbuf: int = 0) -> None:
        cfg = StressConfig(
            size_min=size,
            size_max=size,
            depth=depth,
            duration=None if messages else 1000.0,
            messages=messages,
        )
        self.w = _Worker(cfg, _shares(cfg)[0], (socket.AF_INET, ("127.0.0.1", 0)))
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            a = socket.create_connection(listener.getsockname(), timeout=unit(5))
            self.peer, _ = listener.accept()
        finally:
            listener.close()
        self.peer.settimeout(unit(5))
        a.setblocking(False)
        if sndbuf:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.c = _Conn(0, a)
        self.w.conns[self.c.fd] = self.c
        self.w._connected(self.c, time.monotonic_ns())
        assert self.c.stream
        self.w.sending = True
        self.w.ledger.t_start = 0  # everything measured: the counts do not depend on the clock
        self.w._refill(self.c, time.monotonic_ns())
        self.ml = size + 4
        self.nat = native_mod.native_stream(self.w)

    def take(self, n: int) -> bytes:
        """Read exactly ``n`` bytes the client wrote."""
        data = b""
        while len(data) < n:
            chunk = self.peer.recv(n - len(data))
            assert chunk, "the client closed"
            data += chunk
        return data

    def round(self, native: bool) -> bool:
        """One round over what the peer sent: the Python one, or the C loop (briefly)."""
        c = self.c
        if not native:
            ready = select.select([c.sock], [], [], unit(5))[0]
            assert ready, "nothing to read"
            self.w._stream_round([(c.fd, _IN)], time.monotonic_ns())
            return True
        assert self.nat is not None
        return self.nat.round(time.monotonic_ns() + 20_000_000)

    def state(self) -> dict[str, Any]:
        """Everything the two loops must agree on (nothing that depends on the clock)."""
        c, w = self.c, self.w
        ledger = w.ledger
        hist = ledger.histogram()  # (folds the stream counters)
        return {
            "stream": c.stream,
            "tx_seq": c.tx_seq,
            "next_rx": c.next_rx,
            "rx": c.rx,
            "wtop": c.wtop,
            "wlog_ends": [end for end, _ in c.wlog],
            "win": bytes(c.win),
            "out": b"".join(bytes(p) for p in c.out),
            "events": c.events,
            "pending": sorted(c.pending),
            "state": c.state,
            "inflight": ledger.inflight,
            "sent": ledger.sent,
            "sent_all": ledger.sent_all,
            "done": ledger.done,
            "done_all": ledger.done_all,
            "payload": ledger.payload,
            "errors": dict(ledger.errors),
            "examples": list(ledger.examples),
            "count": hist.count,
            "buckets": sum(hist.counts),
            "wire_in": w.wire_in,
            "wire_out": w.wire_out,
            "budget": w.budget,
        }

    def close(self) -> None:
        self.w.close()
        self.peer.close()


@pytest.fixture
def pairs() -> Iterator[Any]:
    """Factory of ``(python, native)`` pairs of Pair, closed at the end."""
    made: list[Pair] = []

    def make(**kwargs: Any) -> tuple[Pair, Pair]:
        p, n = Pair(**kwargs), Pair(**kwargs)
        made.extend((p, n))
        assert n.nat is not None
        return p, n

    try:
        yield make
    finally:
        for pair in made:
            pair.close()


def both(p: Pair, n: Pair, reply: bytes) -> None:
    """Send ``reply`` to both clients, run one round each, compare their states."""
    for pair, native in ((p, False), (n, True)):
        pair.peer.sendall(reply)
        pair.round(native)
    assert n.state() == p.state()


@requires_native
def test_split_replies_round_trip_exactly(pairs: Any) -> None:
    """Replies split anywhere: the native loop leaves the Python round's state, window included."""
    p, n = pairs(size=40, depth=4)
    ml = p.ml
    sent_p, sent_n = p.take(4 * ml), n.take(4 * ml)
    assert sent_p == sent_n  # the same messages
    assert n.state() == p.state()
    both(p, n, sent_p[:66])  # one and a half replies
    assert n.c.next_rx == 1 and n.c.rx == 66
    owed = p.take(ml)  # the replacement of message 0
    assert n.take(ml) == owed
    both(p, n, sent_p[66 : 4 * ml])
    assert n.c.next_rx == 4
    owed += p.take(3 * ml)
    assert n.take(3 * ml) == owed[ml:]
    refill = owed
    # Many rounds past the end of the window: slots are rebuilt in place by C.
    for _ in range(200):
        both(p, n, refill)
        refill = p.take(len(refill))
        assert n.take(len(refill)) == refill
    state = n.state()
    assert state["stream"]
    only_errors(state)
    assert state["done_all"] == state["count"] == state["buckets"] == n.c.next_rx
    layout = n.w.layout
    assert layout is not None and n.c.next_rx > layout.window  # every slot rebuilt at least once


@requires_native
def test_partial_writes_are_finished_by_the_native_loop(pairs: Any) -> None:
    """Bytes the socket did not take (Python's ``out``) are written by C on EPOLLOUT, and what
    C could not write goes back to Python as ``out``: the peer receives the same stream."""
    p, n = pairs(size=30000, depth=16, sndbuf=4096)
    assert p.c.out and n.c.out  # the first refill did not fit
    total = 16 * p.ml
    streams = []
    for pair, native in ((p, False), (n, True)):
        got = b""
        pair.peer.setblocking(False)
        deadline = time.monotonic() + unit(10)
        while len(got) < total and time.monotonic() < deadline:
            try:
                got += pair.peer.recv(1 << 20)
                continue
            except BlockingIOError:
                pass
            if native:
                pair.round(True)
            else:
                pair.w._stream_round([(pair.c.fd, select.EPOLLOUT)], time.monotonic_ns())
        streams.append(got)
        assert not pair.c.out and pair.c.events == _IN
    assert streams[0] == streams[1] and len(streams[0]) == total
    assert n.state() == p.state()
    # Every reply at once (more than one read): C reads on round after round and writes
    # the replacements, partly again; the peer gets them in order.
    n.peer.setblocking(True)
    n.peer.sendall(streams[0])
    deadline = time.monotonic() + unit(10)
    while n.c.next_rx < 16 and time.monotonic() < deadline:
        n.round(True)
    state = n.state()
    assert state["done_all"] == state["count"] == 16 and state["stream"]
    assert state["tx_seq"] == 32
    only_errors(state)


@requires_native
def test_corrupted_read_is_handed_back_to_python(pairs: Any) -> None:
    """A read that does not match is classified per message by Python: the same error, state, example."""
    p, n = pairs(size=40, depth=4)
    ml = p.ml
    sent = p.take(4 * ml)
    n.take(4 * ml)
    both(p, n, sent[:66])
    p.take(ml)
    n.take(ml)
    bad = bytearray(sent[66 : 4 * ml])
    bad[-5] ^= 0x40  # in message 3, after the rest of message 1 and message 2
    both(p, n, bytes(bad))
    state = n.state()
    assert not state["stream"]
    assert state["errors"]["corrupted"] == 1
    assert state["done_all"] == 3
    assert any("conn 0 seq 3: byte 35" in e for e in state["examples"]), state["examples"]


@requires_native
def test_duplicate_bytes_are_handed_back(pairs: Any) -> None:
    """More bytes than are owed (a reply twice) leave stream mode and count as duplicated."""
    p, n = pairs(size=40, depth=1)
    ml = p.ml
    sent = p.take(ml)
    n.take(ml)
    both(p, n, sent + sent)
    assert n.state()["errors"]["duplicated"] == 1
    assert n.state()["done_all"] == 1


@requires_native
def test_eof_is_handed_back(pairs: Any) -> None:
    """The server's EOF in the middle of a reply: closed, what was owed aborted, as in Python."""
    p, n = pairs(size=40, depth=4)
    ml = p.ml
    sent = p.take(4 * ml)
    n.take(4 * ml)
    both(p, n, sent[: ml + 10])
    for pair, native in ((p, False), (n, True)):
        pair.peer.shutdown(socket.SHUT_WR)
        pair.round(native)
    state = n.state()
    assert state == p.state()
    assert state["state"] != 1 and state["errors"]["closed"] == 1
    assert state["errors"]["aborted"] == state["sent_all"] - 1 > 0
    assert state["inflight"] == 0
    assert "unfinished frame" in state["examples"][0]


@requires_native
def test_reset_is_handed_back(pairs: Any) -> None:
    """A reset connection: the receive error goes through Python's _io_failed (reset, aborted)."""
    p, n = pairs(size=40, depth=2)
    ml = p.ml
    for pair, native in ((p, False), (n, True)):
        pair.take(2 * ml)
        pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.peer.close()
        pair.round(native)
    state = n.state()
    assert state == p.state()
    assert state["errors"]["reset"] == 1 and state["errors"]["aborted"] == 2
    assert state["examples"] == ["conn 0: receive: connection reset by peer"]


@requires_native
def test_budget_of_messages_round_trips(pairs: Any) -> None:
    """With --messages the native loop spends the same budget and stops sending at zero."""
    p, n = pairs(size=40, depth=4, messages=6)
    ml = p.ml
    assert p.w.budget == n.w.budget == 2  # 4 went out with the first refill
    sent = p.take(4 * ml)
    n.take(4 * ml)
    both(p, n, sent)
    assert n.w.budget == 0
    more = p.take(2 * ml)
    assert n.take(2 * ml) == more
    both(p, n, more)
    state = n.state()
    assert state["done_all"] == state["sent_all"] == 6 and state["inflight"] == 0


@requires_native
def test_foreign_descriptor_returns_to_python(pairs: Any) -> None:
    """An event for a descriptor the C loop does not own makes round() return False, untouched."""
    _, n = pairs(size=40, depth=1)
    r, wr = socket.socketpair()
    try:
        n.w.ep.register(r.fileno(), select.EPOLLIN)
        wr.send(b"x")
        before = n.state()
        assert n.round(True) is False
        assert n.state() == before
        assert r.recv(1) == b"x"  # nobody read it
    finally:
        n.w.ep.unregister(r.fileno())
        r.close()
        wr.close()


@requires_native
def test_bad_state_is_refused_before_any_io() -> None:
    """Inconsistent arguments raise a clear error and change nothing."""
    _stressloop: Any = importlib.import_module("msgsock._stressloop")

    ep = select.epoll()
    try:
        counts = [0] * _stressloop.HIST_SIZE
        layout = (44, 4, 8, 16, b"\x00\x00\x00\x28", bytes(300))
        params = (4, 0, True, -1, 1 << 62, -1)
        win = bytearray(16 * 44)
        bad_rx: list[tuple[Any, ...]] = [(5, 0, 1, 0, 44, 0, None, 1, [], win)]  # rx ahead of next_rx
        with pytest.raises(ValueError, match="inconsistent stream state"):
            _stressloop.run(ep.fileno(), 0, bad_rx, layout, params, counts)
        short: list[tuple[Any, ...]] = [(5, 0, 0, 0, 0, 0, None, 1, [], bytearray(10))]
        with pytest.raises(ValueError, match="window of 10 bytes"):
            _stressloop.run(ep.fileno(), 0, short, layout, params, counts)
        with pytest.raises(ValueError, match="buckets"):
            _stressloop.run(ep.fileno(), 0, [], layout, params, [0])
        with pytest.raises(ValueError, match="layout"):
            _stressloop.run(ep.fileno(), 0, [], (44, 4, 8, 8, b"\x00" * 4, bytes(300)), params, counts)
        assert counts == [0] * _stressloop.HIST_SIZE
    finally:
        ep.close()


# -- whole runs of the command, in process (so the native loop can be watched) -------------


def _run_stress(args: list[str], capsys: Any) -> tuple[int, dict[str, Any]]:
    from msgsock.app.stress import _main

    code = _main([*args, "--json", "--quiet"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the native loop (so a test knows it ran)."""
    calls: list[int] = []
    real = native_mod.NativeStream.round

    def spy(self: native_mod.NativeStream, wake: int) -> bool:
        calls.append(1)
        return real(self, wake)

    monkeypatch.setattr(native_mod.NativeStream, "round", spy)
    return calls


@pytest.fixture
def server() -> Iterator[Any]:
    """Factory of the stress tests' faulty TCP servers, closed at the end."""
    made: list[FaultyServer] = []

    def make(**kwargs: Any) -> FaultyServer:
        s = FaultyServer(**kwargs)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


@requires_native
def test_exact_counts_through_the_native_loop(server: Any, watched: list[int], capsys: Any) -> None:
    """--messages N against a correct echo: N sent and verified, histogram count == verified."""
    s = server()
    code, report = _run_stress(["--port", str(s.port), "-c", "4", "-d", "8", "-n", "3000"], capsys)
    assert watched, "the native loop did not run"
    assert code == 0
    assert report["messages"]["sent"] == report["messages"]["verified"] == 3000
    assert report["latency_us"]["count"] == 3000
    assert report["bytes"]["payload"] == 3000 * 64
    only_errors(report)


@requires_native
def test_timed_run_with_partial_writes(server: Any, watched: list[int], capsys: Any) -> None:
    """Large messages deep in flight (partial writes, EPOLLOUT): everything sent is verified."""
    s = server()
    code, report = _run_stress(
        ["--port", str(s.port), "-c", "2", "-d", "16", "-s", "30000", "-t", str(unit(1))], capsys
    )
    assert watched
    assert code == 0
    msgs = report["messages"]
    assert msgs["sent"] == msgs["verified"] == report["latency_us"]["count"] > 0
    assert report["bytes"]["sent"] == report["bytes"]["received"]
    only_errors(report)


@requires_native
@pytest.mark.parametrize(
    ("fault", "extra", "errors", "verified"),
    [
        ("flip", [], {"corrupted": 1}, 1999),
        ("drop", ["--timeout", str(unit(1))], {"lost": 1}, 1999),
        ("dup", [], {"duplicated": 1}, 2000),
        ("truncate", [], {"closed": 1, "aborted": 1}, 700),
    ],
)
def test_faults_mid_run_are_handed_to_python(
    server: Any,
    watched: list[int],
    capsys: Any,
    fault: str,
    extra: list[str],
    errors: dict[str, int],
    verified: int,
) -> None:
    """A server that corrupts, drops, duplicates or closes mid-run: classified exactly as in Python."""
    s = server(fault=fault, at=700)
    code, report = _run_stress(["--port", str(s.port), "-n", "2000", "-d", "1", *extra], capsys)
    assert watched
    assert code == 1
    only_errors(report, **errors)
    assert report["messages"]["verified"] == verified
