"""The verification ledger: what each connection still owes, and what every reply was.

Theory of operation
-------------------
The ledger is sans-I/O: it never touches a socket and never reads a clock; every call
that needs the time takes ``now`` (monotonic nanoseconds).  The pump tells it what was
written (:meth:`_Ledger.issue`) and what came back (:meth:`_Ledger.verify`, one list of
replies per read), asks it which messages timed out (:meth:`_Ledger.expire`), and tells
it when a connection ended (:meth:`_Ledger.abort`).

Per connection (an :class:`_Account`), messages ``[next_rx, tx_seq)`` that are still
owed a reply are in ``pending`` (sequence number -> intended send time).  A reply that
equals what ``next_rx`` should look like is accepted at once.  Otherwise it is
classified:

- it names (by its id, or by matching content) a pending message: accepted; if a
  later message already arrived, it counts as **reordered**;
- it names a message already answered: **duplicated** (a reply arriving after its
  message was declared lost is ignored, not counted twice);
- anything else is **corrupted**, and it settles the message it names, or else the
  oldest pending one (a stream reply is in order).

A pending message with no reply ``--timeout`` seconds after it was written is **lost**;
the messages a connection still owed when it ended are **aborted**.

Latency is counted in an HDR-style log-linear histogram (:mod:`msgsock._histogram`) for
messages whose intended send time is at or after ``t_start`` (the end of the warmup).
Stream mode (:mod:`.stream`) settles whole reads without the per-message calls: it adds
to the histogram's buckets itself and reports its totals through
:meth:`_Ledger.issued_in_stream` and :meth:`_Ledger.settled_in_stream`, which
:meth:`_Ledger.fold` moves into the counters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from ..._histogram import SUB_BITS, Histogram, bucket_index
from .kinds import ERROR_KINDS
from .payload import _ID, _ID_SIZE, _Payloads

_MAX_EXAMPLES = 8
_MAX_LOST_REMEMBERED = 4096
_HIST_SIZE = len(Histogram().counts)
_HALF_BITS = SUB_BITS - 1


class _Account:
    """The ledger's record of one connection: what was written and what is still owed."""

    __slots__ = ("cid", "lost", "next_rx", "pending", "rx_max", "sent_log", "tx_seq")

    def __init__(self, cid: int) -> None:
        """Start the record of connection ``cid``: nothing sent yet."""
        self.cid = cid
        self.pending: dict[int, int] = {}  # seq -> intended send time (ns)
        self.next_rx = 0  # lowest seq not settled; in pending unless == tx_seq
        self.tx_seq = 0  # next seq to send
        self.rx_max = -1  # highest seq accepted out of order (for reorder detection)
        # open loop only: (first seq of a write, time written)
        self.sent_log: deque[tuple[int, int]] = deque()
        self.lost: set[int] = set()  # seqs declared lost, so a late reply is not a duplicate


class _Ledger:
    """The counters of one worker, and the checks that feed them (sans-I/O, takes ``now``)."""

    def __init__(self, payloads: _Payloads, timeout: float) -> None:
        """An empty ledger.

        Args:
            payloads: what every message and its reply look like.
            timeout: seconds after which an unanswered message is lost.
        """
        self.payloads = payloads
        self.match = payloads.matcher()
        self.timeout = timeout
        self.timeout_ns = int(timeout * 1e9)
        self.t_start = 0  # messages intended at or after this are measured
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.examples: list[str] = []
        self.hist = Histogram()
        self.sent = 0  # measured messages written
        self.sent_all = 0
        self.done = 0  # measured verified replies
        self.done_all = 0
        self.payload = 0  # measured verified payload bytes
        self.payload_all = 0
        self.inflight = 0
        self.last_ok = 0  # when the last verified reply arrived
        self.lat_min: int | None = None
        self.lat_max: int | None = None
        # Stream mode counts into these plain ints; fold() moves them into the counters
        # above and the histogram summary.
        self.lat_sum = 0
        self.lat_lo = 1 << 62
        self.lat_hi = -1
        self.measured = 0
        self.ok_fast = 0
        self.sent_fast = 0

    # -- errors -------------------------------------------------------------------------

    def error(self, kind: str, example: str | None = None, n: int = 1) -> None:
        """Count ``n`` errors of ``kind``, keeping ``example`` among the first few."""
        self.errors[kind] += n
        if example is not None and len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(example)

    def abort(self, acct: _Account, *, count: bool) -> None:
        """The connection of ``acct`` ended: forget what it still owed.

        Args:
            acct: the connection.
            count: count what it owed as **aborted** (not when we closed it ourselves).
        """
        if count and acct.pending:
            self.error("aborted", n=len(acct.pending))
        self.inflight -= len(acct.pending)
        acct.pending.clear()

    # -- sending ------------------------------------------------------------------------

    def issue(self, acct: _Account, count: int, now: int, times: Sequence[int] | None = None) -> None:
        """Record ``count`` new messages written on ``acct`` at ``now``.

        Args:
            acct: the connection; its messages ``[tx_seq, tx_seq + count)`` are written.
            count: how many.
            now: when they were written.
            times: open loop: their intended send times (else ``now`` for all).
        """
        pending = acct.pending
        s0 = acct.tx_seq
        t_start = self.t_start
        measured = 0
        if times is None:
            for s in range(s0, s0 + count):
                pending[s] = now
            if now >= t_start:
                measured = count
        else:  # open loop: intended times differ from the write time
            for i in range(count):
                t = times[i]
                pending[s0 + i] = t
                if t >= t_start:
                    measured += 1
            acct.sent_log.append((s0, now))
        acct.tx_seq = s0 + count
        self.inflight += count
        self.sent_all += count
        self.sent += measured

    def issued_in_stream(self, count: int, now: int) -> None:
        """Stream mode: ``count`` messages written at ``now`` (their times are in the write log)."""
        self.inflight += count
        self.sent_fast += count
        if now >= self.t_start:
            self.sent += count

    # -- receiving ----------------------------------------------------------------------

    def verify(self, acct: _Account, msgs: list[Any], now: int) -> None:
        """Check every reply of one read (received at ``now``).  The general mode's hot path."""
        pending = acct.pending
        match = self.match
        cid = acct.cid
        t_start = self.t_start
        counts = self.hist.counts
        last = _HIST_SIZE - 1
        sub = SUB_BITS
        half = _HALF_BITS
        ok_all = ok = pay_all = pay = lsum = 0
        lmin = self.lat_min
        lmax = self.lat_max
        if lmin is None or lmax is None:
            lmin, lmax = 1 << 62, -1
        for m in msgs:
            s = acct.next_rx
            tx = acct.tx_seq
            if s < tx and match(m, cid, s):
                t = pending.pop(s)
                if s < acct.rx_max:
                    self.error("reordered", f"conn {cid} seq {s}: reply after that of seq {acct.rx_max}")
                s += 1
                while s < tx and s not in pending:
                    s += 1
                acct.next_rx = s
                ok_all += 1
                size = len(m)
                pay_all += size
                if t >= t_start:
                    lat = now - t
                    shift = lat.bit_length() - sub
                    if shift > 0:
                        idx = (shift << half) + (lat >> shift)
                        counts[idx if idx < last else last] += 1
                    else:
                        counts[lat if lat >= 0 else 0] += 1
                    lsum += lat
                    if lat > lmax:
                        lmax = lat
                    if lat < lmin:
                        lmin = lat
                    ok += 1
                    pay += size
            else:
                self._classify(acct, m, now)
        if ok_all:
            self.inflight -= ok_all
            self.done_all += ok_all
            self.payload_all += pay_all
            self.last_ok = now
            if ok:
                self.done += ok
                self.payload += pay
                self.hist.count += ok
                self.hist.total += lsum
                self.lat_min = lmin
                self.lat_max = lmax

    def settled_in_stream(self, got: int, now: int, measured: int, lsum: int, lo: int, hi: int) -> None:
        """Stream mode: ``got`` replies verified at ``now``, of which ``measured`` were
        measured (their latencies summing to ``lsum``, between ``lo`` and ``hi``; the
        caller already added them to the histogram's buckets)."""
        self.inflight -= got
        self.ok_fast += got
        self.last_ok = now
        if measured:
            self.lat_sum += lsum
            self.measured += measured
            self.lat_hi = hi
            self.lat_lo = lo

    def _settle(self, acct: _Account, s: int) -> int | None:
        """Remove message ``s`` from ``pending``; return its intended time (None if absent)."""
        t = acct.pending.pop(s, None)
        if t is None:
            return None
        self.inflight -= 1
        if s == acct.next_rx:
            tx = acct.tx_seq
            s += 1
            while s < tx and s not in acct.pending:
                s += 1
            acct.next_rx = s
        return t

    def _accept(self, acct: _Account, s: int, m: bytes, now: int) -> None:
        """A correct reply for pending message ``s`` that is not the oldest pending one."""
        t = self._settle(acct, s)
        assert t is not None
        if s < acct.rx_max:
            self.error("reordered", f"conn {acct.cid} seq {s}: reply after that of seq {acct.rx_max}")
        else:
            acct.rx_max = s
        self.done_all += 1
        self.payload_all += len(m)
        self.last_ok = now
        if t >= self.t_start:
            lat = max(0, now - t)
            self.done += 1
            self.payload += len(m)
            self._record(lat)

    def _record(self, lat: int) -> None:
        # Outside the hot path; the hot path inlines the same bucket arithmetic and keeps
        # min/max in lat_min/lat_max, which histogram() folds into the histogram.
        h = self.hist
        h.counts[bucket_index(lat)] += 1
        h.count += 1
        h.total += lat
        if self.lat_min is None or lat < self.lat_min:
            self.lat_min = lat
        if self.lat_max is None or lat > self.lat_max:
            self.lat_max = lat

    def _classify(self, acct: _Account, m: bytes, now: int) -> None:
        """The slow path: a reply that is not exactly the oldest pending message's."""
        cid = acct.cid
        match = self.match
        pending = acct.pending
        candidate: int | None = None
        if len(m) >= _ID_SIZE:
            s2, cid2 = _ID.unpack_from(m)
            if cid2 == cid and s2 < acct.tx_seq:
                candidate = s2
                if match(m, cid, s2):
                    self._settled_match(acct, s2, m, now)
                    return
        else:
            # Too short to name itself: look for it among the messages in flight, then
            # among the recently settled ones (bounded: this is the error path).
            for s2 in list(pending)[:64]:
                if match(m, cid, s2):
                    self._settled_match(acct, s2, m, now)
                    return
            for s2 in range(acct.next_rx - 1, max(-1, acct.next_rx - 65), -1):
                if s2 not in pending and match(m, cid, s2):
                    self._settled_match(acct, s2, m, now)
                    return
        # Corrupted: it settles the message it names, or else the oldest pending one.
        target = candidate if candidate is not None and candidate in pending else None
        if target is None and acct.next_rx < acct.tx_seq:
            target = acct.next_rx
        example = None
        if len(self.examples) < _MAX_EXAMPLES:
            example = self.payloads.describe(m, cid, target)
        self.error("corrupted", example)
        if target is not None:
            self._settle(acct, target)

    def _settled_match(self, acct: _Account, s: int, m: bytes, now: int) -> None:
        if s in acct.pending:
            self._accept(acct, s, m, now)
        elif s in acct.lost:
            acct.lost.discard(s)  # already counted as lost; a late reply is not a second error
        else:
            self.error("duplicated", f"conn {acct.cid} seq {s}: a second reply")

    # -- timeouts -----------------------------------------------------------------------

    def expire(self, acct: _Account, now: int) -> bool:
        """Declare **lost** every message of ``acct`` written more than the timeout before ``now``.

        Returns:
            True when any was (the connection has room for more).
        """
        if not acct.pending:
            return False
        limit = now - self.timeout_ns
        # The clock of a message starts when it is written: in closed loop that is its
        # intended time; in open loop it may have waited, and sent_log says when.
        log = acct.sent_log
        changed = False
        while acct.pending:
            s0 = acct.next_rx
            if log:
                while len(log) > 1 and log[1][0] <= s0:
                    log.popleft()
                written = log[0][1]
            else:
                written = acct.pending[s0]
            if written > limit:
                break
            self._settle(acct, s0)
            self.error("lost", f"conn {acct.cid} seq {s0}: no reply within {self.timeout:g} s")
            if len(acct.lost) >= _MAX_LOST_REMEMBERED:
                acct.lost.clear()
            acct.lost.add(s0)
            changed = True
        if not acct.pending:
            while len(log) > 1:
                log.popleft()
        return changed

    # -- totals -------------------------------------------------------------------------

    def fold(self) -> None:
        """Move stream mode's plain counters into the real ones."""
        if self.ok_fast:
            size = self.payloads.size_min
            self.done_all += self.ok_fast
            self.payload_all += self.ok_fast * size
            self.ok_fast = 0
        if self.measured:
            size = self.payloads.size_min
            self.done += self.measured
            self.payload += self.measured * size
            self.hist.count += self.measured
            self.hist.total += self.lat_sum
            self.measured = 0
            self.lat_sum = 0
            if self.lat_min is None or self.lat_lo < self.lat_min:
                self.lat_min = self.lat_lo
            if self.lat_max is None or self.lat_hi > self.lat_max:
                self.lat_max = self.lat_hi
        if self.sent_fast:
            self.sent_all += self.sent_fast
            self.sent_fast = 0

    def histogram(self) -> Histogram:
        """The latency histogram so far, every counter folded in."""
        self.fold()
        h = self.hist
        h.min = self.lat_min
        h.max = self.lat_max
        return h

    def snapshot(self, k: int, now: int, portable: bool) -> dict[str, Any]:
        """Cumulative counters at ``now`` for live interval ``k`` (``portable``: picklable)."""
        hist = self.histogram()  # folds the fast path's counters first
        return {
            "k": k,
            "t": now,
            "done_all": self.done_all,
            "payload_all": self.payload_all,
            "done": self.done,
            "errors": sum(self.errors.values()),
            "hist": hist.to_dict() if portable else hist,
        }
