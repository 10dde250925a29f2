"""Stream mode's hot loop in C (``msgsock._stressloop``), beside the Python one in :mod:`.hotloop`.

Theory of operation
-------------------
When the compiled extension is importable (and ``MSGSOCK_NO_EXTENSIONS=1`` is not set,
see :mod:`msgsock.extensions`), a worker whose run is in stream mode over plain TCP and
``epoll`` gets a :class:`NativeStream`.  Instead of one ``poll`` and one Python round,
the pump then calls :meth:`NativeStream.round` with the time it would wake up anyway
(the next housekeeping, interval tick or end of the run): the C loop polls the worker's
own ``epoll`` descriptor with the GIL released and runs exactly
:meth:`.hotloop._StreamLoop._stream_round` for every connection in stream mode -- one
read, one comparison with the window, the latencies from the write log into the same
histogram buckets, one write of the replacements -- round after round until then.

The Python objects stay the truth between calls: each call passes every stream
connection's state (``tx_seq``, ``next_rx``, ``rx``, ``wtop``, ``out``, ``events``,
``wlog``, the window ``win``, which the C loop builds and reads in place) and writes
back what the Python round would have left, then tells the ledger and the worker what
the rounds did (replies verified, latencies, messages and bytes written and read).  A
connection that needs Python -- a read that does not match, an EOF, a socket error -- is
handed back with the state just before that event and goes through the same method
the Python round calls (``_stream_mismatch``, ``_eof``, ``_io_failed``).  An event for
any other descriptor (the control pipe of ``--workers``, a connection in the general
mode) makes :meth:`NativeStream.round` return False, and the pump polls and handles it
in Python as usual (epoll is level-triggered, so nothing is lost).  The C loop also
returns after a signal interrupts its poll, after every round once sending stopped or
the ``--messages`` budget is spent, and at the latest after 50 ms, so the pump's phase
changes, timeouts, live view and signal handling work unchanged.
"""

from __future__ import annotations

import os
import select
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ... import extensions
from .conn import _OPEN

if TYPE_CHECKING:
    from .conn import _Conn
    from .pump import _Worker

__all__ = ["REASON", "NativeStream", "native_stream"]


_MODULE: ModuleType | None = extensions.stressloop
REASON = extensions.reason("stressloop")
"""Why the native loop is not available (None when it is)."""


class NativeStream:
    """The C hot loop of one worker in stream mode (see the module docstring)."""

    def __init__(self, worker: _Worker, module: ModuleType) -> None:
        """Prepare the loop's constant arguments for ``worker`` (whose run is in stream mode)."""
        layout = worker.layout
        assert layout is not None
        self.worker = worker
        self._run = module.run
        self._mismatch = module.HANDOFF_MISMATCH
        self._eof = module.HANDOFF_EOF
        self._recv_error = module.HANDOFF_RECV_ERROR
        head = layout.frame.encode_header(worker.payloads.size_min)
        self._layout = (layout.mlen, layout.hlen, layout.block, layout.window, head, worker.payloads.pattern)
        self._wbytes = layout.wbytes
        self._epfd = worker.ep.fileno()

    def _window(self, c: _Conn) -> bytearray:
        if len(c.win) != self._wbytes:  # never built yet: the C loop builds it in place
            c.win = bytearray(self._wbytes)
            c.wmv = memoryview(c.win)
        return c.win

    def round(self, wake: int) -> bool:
        """Run stream mode's rounds in C until ``wake`` (monotonic ns) or an event for Python.

        Returns:
            False when an event for a descriptor the C loop does not handle is waiting
            (or no connection is in stream mode): the caller polls for it itself.

        Raises:
            OSError: ``epoll_wait`` failed (after the state was written back).
        """
        w = self.worker
        conns = [c for c in w.live if c.stream and c.stages is None]
        if not conns:
            return False
        window = self._window
        states = [
            (
                c.fd,
                c.cid,
                c.tx_seq,
                c.next_rx,
                c.rx,
                c.wtop,
                b"".join(c.out) if c.out else None,
                c.events,
                c.wlog,
                window(c),
            )
            for c in conns
        ]
        ledger = w.ledger
        budget = w.budget
        params = (
            w._depth,
            ledger.t_start,
            w.sending,
            -1 if budget is None else budget,
            ledger.lat_lo,
            ledger.lat_hi,
        )
        results, totals = self._run(self._epfd, wake, states, self._layout, params, ledger.hist.counts)
        got, measured, lsum, lo, hi, last_ok = totals[:6]
        sent, sent_measured, bytes_in, left, foreign, errno_, last = totals[6:]
        if budget is not None:
            w.budget = left
        handoffs: list[tuple[_Conn, int, Any]] = []
        for c, r in zip(conns, results, strict=True):
            c.tx_seq, c.next_rx, c.rx, c.wtop, out, c.events, wlog, status, detail = r
            c.wlog.clear()
            c.wlog.extend(wlog)
            c.out = [out] if out is not None else []
            if status:
                handoffs.append((c, status, detail))
        # As in the Python round: what was written is counted with the round, and a
        # round's verified replies are told to the ledger after its handoffs.
        ledger.inflight += sent
        ledger.sent_fast += sent
        ledger.sent += sent_measured
        w.wire_out += sent * self._layout[0]
        w.wire_in += bytes_in
        # When the last round verified replies, they are settled after its handoffs.
        settle_last = bool(got) and last_ok == last
        if got and not settle_last:
            ledger.settled_in_stream(got, last_ok, measured, lsum, lo, hi)
        for c, status, detail in handoffs:
            if c.state != _OPEN:
                continue
            if status == self._mismatch:
                w._stream_mismatch(c, memoryview(detail))
            elif status == self._eof:
                w._eof(c)
            else:
                what = "receive" if status == self._recv_error else "send"
                w._io_failed(c, OSError(detail, os.strerror(detail)), what)
        if settle_last:
            ledger.settled_in_stream(got, last_ok, measured, lsum, lo, hi)
        if errno_:
            raise OSError(errno_, f"epoll_wait: {os.strerror(errno_)}")
        return not foreign


def native_stream(worker: _Worker) -> NativeStream | None:
    """The native hot loop for ``worker``, or None when its run does not qualify.

    It qualifies in stream mode (:func:`.stream._stream_eligible`) over plain TCP (no
    TLS record layer) with ``epoll``, when the extension is available.
    """
    if _MODULE is None or worker.layout is None or worker.udp or worker.tls:
        return None
    epoll = getattr(select, "epoll", None)  # (Linux only)
    if epoll is None or not isinstance(worker.ep, epoll):
        return None
    return NativeStream(worker, _MODULE)
