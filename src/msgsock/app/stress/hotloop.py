"""Stream mode's hot loop: one read, one comparison, one write per readable connection.

Theory of operation
-------------------
This is the loop the SPEC §8 benchmark measures, kept in one method,
:meth:`_StreamLoop._stream_round`, so that a native implementation can take its place
beside it.  Its interface:

- **in**: the events of one poll (``[(fd, event bits)]``, the bits of :mod:`.poller`)
  and ``now``, the one clock reading of the round (monotonic ns): the time of every
  reply read and every message written in it, as in the C load generator;
- **state it reads and writes**: each connection's stream fields
  (:class:`.stream._StreamAccount`: ``rx``, ``next_rx``, ``tx_seq``, ``wlog``,
  ``wtop``, the window ``win``/``wmv``), the layout of every window
  (:class:`.stream._StreamLayout`), the ledger's histogram buckets
  (``ledger.hist.counts``);
- **out**, once per round: :meth:`.ledger._Ledger.settled_in_stream` (replies verified,
  latency sum, min, max), :meth:`.ledger._Ledger.issued_in_stream` (messages written),
  and the worker's ``wire_in``/``wire_out``;
- **anything else** (a read that does not match, an EOF, a socket error, TLS, a budget
  of ``--messages``, a partial write) is handed back to the Python methods it calls
  (``_stream_mismatch``, ``_eof``, ``_io_failed``, ``_decrypt``, ``_fill_stream``,
  ``_write_window``, ``_queue``), which leave stream mode or finish the job.

State lives in locals, the ledger is told once per round, and no method is called for
a read that verifies.
"""

from __future__ import annotations

from ..._histogram import SUB_BITS, bucket_table
from .conn import _OPEN
from .connect import _Connector
from .ledger import _HALF_BITS, _HIST_SIZE
from .poller import _ERR, _HUP, _IN, _OUT

_LAT_GRANULE = 6
_LAT_HIGH = 1 << 22  # ns; latencies in [_LAT_LOW, _LAT_HIGH) are bucketed by table lookup
_LAT_LOW, _LAT_TABLE = bucket_table(_LAT_GRANULE, 22)


class _StreamLoop(_Connector):
    """A worker with stream mode's hot loop (see the module docstring for its interface)."""

    def _stream_round(self, events: list[tuple[int, int]], now: int) -> None:
        """Handle the events of one poll in stream mode: per readable connection, one
        read verified with one comparison, then one write of the replacements.

        The hot path (SPEC §8): state lives in locals, the ledger's and the worker's
        counters are updated once per round, and no method is called for a read that
        verifies.  Its interface is the module docstring's.
        """
        conns = self.conns
        buf = self._buf
        mv = self._mv
        layout = self.layout
        assert layout is not None
        extend = layout.extend
        ml = layout.mlen
        depth = self._depth
        window = layout.window
        wbytes = layout.wbytes
        ledger = self.ledger
        t_start = ledger.t_start
        counts = ledger.hist.counts
        table = _LAT_TABLE
        refill = self.sending
        plain = self.budget is None  # with --messages, refills go through _fill_stream
        ev_in = _IN | _ERR | _HUP
        ev_out = _OUT
        is_open = _OPEN
        got = sent = bytes_in = 0
        lsum = measured = 0
        hi = ledger.lat_hi
        lo = ledger.lat_lo
        for fd, ev in events:
            c = conns.get(fd)
            if c is None:
                if fd == self.control_fd:
                    self._on_control()
                continue
            if ev & ev_out:
                self._flush(c)
            if not ev & ev_in or c.state != is_open:
                continue
            if not c.stream:
                self._on_read(c, now)
                continue
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._io_failed(c, exc, "receive")
                continue
            if n == 0:
                self._eof(c)
                continue
            stages = c.stages
            if stages is None:
                view = mv[:n]
            else:  # TLS: the plaintext of what was read
                got_view = self._decrypt(c, stages, n)
                if got_view is None:
                    continue
                view = got_view
                n = len(view)
            bytes_in += n
            rx = c.rx
            # Never more than is owed (a duplicate, say), and byte for byte what was sent.
            if n > c.tx_seq * ml - rx:
                self._stream_mismatch(c, view)
                continue
            off = rx % wbytes
            if off + n <= wbytes:
                if not c.win.startswith(view, off):
                    self._stream_mismatch(c, view)
                    continue
            elif not (c.win.startswith(view[: wbytes - off], off) and c.win.startswith(view[wbytes - off :])):
                self._stream_mismatch(c, view)
                continue
            rx += n
            c.rx = rx
            done = rx // ml
            s = c.next_rx
            if done == s:  # only part of a reply so far
                continue
            c.next_rx = done
            got += done - s
            log = c.wlog
            while s < done:
                end, t = log[0]
                if end <= done:
                    log.popleft()
                    k = end - s
                    s = end
                else:
                    k = done - s
                    s = done
                if t >= t_start:
                    # The messages of one write share one latency, so they are counted
                    # once with their multiplicity.  Bucket: a table lookup for the usual
                    # 8 us - 4 ms, else _histogram.bucket_index inlined.
                    lat = now - t
                    if _LAT_LOW <= lat < _LAT_HIGH:
                        counts[table[lat >> _LAT_GRANULE]] += k
                    else:
                        shift = lat.bit_length() - SUB_BITS
                        if shift > 0:
                            idx = (shift << _HALF_BITS) + (lat >> shift)
                            counts[idx if idx < _HIST_SIZE else _HIST_SIZE - 1] += k
                        else:
                            counts[lat if lat > 0 else 0] += k
                    lsum += lat * k
                    measured += k
                    if lat > hi:
                        hi = lat
                    if lat < lo:
                        lo = lat
            if not refill:
                continue
            if not plain:
                self._fill_stream(c, now)
                continue
            # Refill: the replacements of every reply of this read, in one write.
            s0 = c.tx_seq
            s1 = done + depth
            if s1 > c.wtop:
                extend(c, s1)
            log.append((s1, now))
            c.tx_seq = s1
            sent += s1 - s0
            a = s0 % window * ml
            b = a + (s1 - s0) * ml
            if b > wbytes or c.out or stages is not None:
                self._write_window(c, s0, s1)
                continue
            try:
                w = c.sock.send(c.wmv[a:b])
            except BlockingIOError:
                w = 0
            except OSError as exc:
                self._io_failed(c, exc, "send")
                continue
            if w < b - a:
                self._queue(c, c.wmv[a + w : b].tobytes())
        self.wire_in += bytes_in
        if got:
            ledger.settled_in_stream(got, now, measured, lsum, lo, hi)
        if sent:
            ledger.issued_in_stream(sent, now)
            self.wire_out += sent * ml
