"""The poll loop of one worker: phases, timeouts, interval ticks, and its result.

Theory of operation
-------------------
One worker runs **one event loop** (``epoll`` directly, ``selectors`` elsewhere) over
its share of the connections, a thin pump around the ledger: each poll's events go to
stream mode's round (:mod:`.hotloop`) or, in the general mode, to each connection's
flush and read; between polls the loop moves through its phases (run, then drain:
sending stopped, replies still owed are awaited), declares timed-out messages lost
(every ``_HOUSEKEEPING_NS``) and hands a snapshot of its counters to ``on_tick`` every
``--interval``.

Open loop timing: ``epoll`` timeouts have millisecond resolution, so for the last
millisecond before a send the loop waits in ``select()`` on the epoll descriptor, which
sleeps to the microsecond and still wakes for any reply.

Throughput is verified replies per second over the measurement window, whose end is the
moment sending stopped or the last verified reply arrived, whichever is later.
"""

from __future__ import annotations

import select
import ssl
import time
from collections.abc import Callable
from typing import Any

from .config import StressConfig, _Share
from .conn import _OPEN
from .hotloop import _StreamLoop
from .native import native_stream
from .poller import _ERR, _HUP, _IN, _OUT

_monotonic_ns = time.monotonic_ns
_HOUSEKEEPING_NS = 20_000_000
_RUN, _DRAIN = 1, 2  # the phases of the loop: sending, then only awaiting replies


class _Worker(_StreamLoop):
    """One event loop over a share of the connections; runs in the caller's process."""

    def __init__(
        self,
        cfg: StressConfig,
        share: _Share,
        address: tuple[int, Any],
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Set up the loop (no connection yet).

        Args:
            cfg: the run.
            share: this worker's part of it.
            address: ``(family, sockaddr)`` of the server.
            tls_context: the client TLS context; None builds one from ``cfg``
                when it asks for TLS.

        Raises:
            ValueError: a TLS certificate or key file of ``cfg`` is missing or invalid.
        """
        super().__init__(cfg, share, address, tls_context)
        self.phase = _RUN
        self.interrupted = False
        self.t_end: int | None = None
        self.t_stop_sending: int | None = None
        self.t_done = 0
        self.final_tick: dict[str, Any] | None = None

    def _check_timeouts(self, now: int) -> None:
        """Declare lost what had no reply within ``--timeout`` (stream mode: leave it first)."""
        limit = now - self.ledger.timeout_ns
        expire = self.ledger.expire
        for c in list(self.live):
            if c.stream:
                # The oldest unanswered message of a stream connection is the first of
                # the oldest write in its log; past the timeout, classify per message.
                if not c.wlog or c.wlog[0][1] > limit:
                    continue
                self._to_general(c)
            if expire(c, now) and c.state == _OPEN:
                self._refill(c, now)

    def snapshot(self, k: int, now: int, portable: bool) -> dict[str, Any]:
        """Cumulative counters for the live interval lines (``portable``: picklable)."""
        return self.ledger.snapshot(k, now, portable)

    def _start_drain(self, now: int) -> None:
        """The duration is over: stop sending, and wait only for the replies still owed."""
        self.phase = _DRAIN
        self.sending = False
        self.t_stop_sending = now
        for c in self.live:
            if c.backlog:  # open loop, duration over: never sent
                self.unsent += len(c.backlog)
                self.backlogged -= len(c.backlog)
                c.backlog.clear()

    def run(self, t0: int, on_tick: Callable[[dict[str, Any]], None], portable: bool = False) -> None:
        """Run the load from time ``t0`` (monotonic ns) until done or stopped."""
        cfg = self.cfg
        self.t0 = t0
        ledger = self.ledger
        ledger.t_start = t0 + int(cfg.warmup * 1e9)
        self.t_end = None if cfg.duration is None else ledger.t_start + int(cfg.duration * 1e9)
        rate_mode = cfg.rate is not None
        interval_ns = int(cfg.interval * 1e9)
        poll = self.ep.poll
        conns = self.conns
        control_fd = self.control_fd
        udp = self.udp
        on_read = self._on_read_udp if udp else self._on_read
        stream = self.layout is not None
        stream_round = self._stream_round
        native = native_stream(self) if stream else None  # the C hot loop (.native), if available
        flush = self._flush_udp if udp else self._flush
        ep_fd = self.ep.fileno() if hasattr(self.ep, "fileno") else -1
        ev_in, ev_out, is_open = _IN | _ERR | _HUP, _OUT, _OPEN
        while not self.stop_requested:  # wait for the common start time
            now = time.monotonic_ns()
            if now >= t0:
                break
            time.sleep(min(0.05, (t0 - now) / 1e9))
        now = time.monotonic_ns()
        self.sending = True
        if not rate_mode:
            for c in list(self.live):
                self._refill(c, now)
        next_tick = t0 + interval_ns
        k = 1
        next_hk = now + _HOUSEKEEPING_NS
        while True:
            now = time.monotonic_ns()
            # phase changes
            if self.stop_requested:
                self.interrupted = True
                break
            if not self.live:
                break
            if self.phase == _RUN:
                if self.t_end is not None and now >= self.t_end:
                    self._start_drain(now)
                elif self.budget == 0 and self.backlogged == 0:
                    if self.t_stop_sending is None:
                        self.t_stop_sending = now
                    if ledger.inflight == 0:
                        break
            if self.phase == _DRAIN and ledger.inflight == 0:
                break
            if rate_mode and self.phase == _RUN:
                self._schedule(now)
            if now >= next_hk:
                self._check_timeouts(now)
                next_hk = now + _HOUSEKEEPING_NS
            if now >= next_tick:
                on_tick(self.snapshot(k, now, portable))
                k += 1
                next_tick += interval_ns
                if next_tick <= now:  # the loop stalled: skip missed ticks
                    skipped = (now - next_tick) // interval_ns + 1
                    next_tick += skipped * interval_ns
                    k += skipped
            # how long may we sleep?
            wake = min(next_hk, next_tick)
            if self.phase == _RUN and self.t_end is not None:
                wake = min(wake, self.t_end)
            spin = False
            if rate_mode and self.phase == _RUN and self.sending and self.budget != 0:
                due = self._next_due()
                if due < wake:
                    wake = due
                    spin = True
            left = wake - time.monotonic_ns()
            if left <= 0:
                timeout = 0.0
            elif spin and left < 1_500_000:
                # epoll rounds its timeout up to whole milliseconds; select() on the epoll
                # fd sleeps to the microsecond and still wakes for any socket event.
                if 0 <= ep_fd < 1024:  # select() takes descriptors below FD_SETSIZE only
                    select.select([ep_fd], [], [], left / 1e9)
                    timeout = 0.0
                else:
                    timeout = left / 1e9
            elif spin:
                timeout = (left // 1_000_000 - 1) / 1000  # whole ms, so it never oversleeps
            else:
                timeout = -(-left // 1_000_000) / 1000
            # The C hot loop (.native) polls and runs stream mode's rounds until `wake`;
            # False: an event it leaves to Python is waiting, polled for right here.
            if native is not None and native.round(wake):
                continue
            events = poll(timeout)
            if not events:
                continue
            # One clock reading per poll: the time of every reply read and every message
            # written in this round, as in the C load generator.
            now = _monotonic_ns()
            if stream:
                stream_round(events, now)
                continue
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is None:
                    if fd == control_fd:
                        self._on_control()
                    continue
                if ev & ev_out:
                    flush(conn)
                if ev & ev_in and conn.state == is_open:
                    on_read(conn, now)
        now = time.monotonic_ns()
        if self.t_stop_sending is None:
            self.t_stop_sending = now
        self.t_done = now
        self.sending = False
        self.final_tick = self.snapshot(k, now, portable)

    def close(self) -> None:
        """Close every socket and the poller."""
        self.live = []  # (so _kill does not search it once per connection)
        for c in list(self.conns.values()):
            self._kill(c, None)
        self.ep.close()

    def result(self) -> dict[str, Any]:
        """Everything the report needs from this worker (picklable)."""
        ledger = self.ledger
        hist = ledger.histogram()
        end = max(self.t_stop_sending or self.t_done, ledger.last_ok)
        return {
            "t0": self.t0,
            "t_start": ledger.t_start,
            "t_end": end,
            "interrupted": self.interrupted,
            "established": self.established,
            "failed": self.failed,
            "connect_ns": self.connect_ns,
            "sent": ledger.sent,
            "sent_all": ledger.sent_all,
            "done": ledger.done,
            "done_all": ledger.done_all,
            "payload": ledger.payload,
            "wire_out": self.wire_out,
            "wire_in": self.wire_in,
            "in_flight": ledger.inflight,
            "unsent": self.unsent + self.backlogged,
            "errors": dict(ledger.errors),
            "examples": list(ledger.examples),
            "reasons": dict(self.reasons),
            "hist": hist.to_dict(),
            "final_tick": self.final_tick,
        }
