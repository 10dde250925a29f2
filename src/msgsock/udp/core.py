"""Sans-I/O datagram core: what every UDP server decides, and the limits both sides share (SPEC §5.4).

Theory of operation (STYLE §1, §11).  UDP keeps message boundaries itself, so
there is no frame here: one datagram is one message.  What the core decides is
what datagram programs tend to get wrong, once for the blocking and the asyncio
pumps (:mod:`msgsock.udp.sync`, :mod:`msgsock.udp.aio`), which only move
datagrams.  Nothing here touches a socket, a thread or a clock: the pump passes
``now`` (any monotonic clock, in seconds) and the sizes it read.

**Server** (:class:`DatagramServerProtocol`).  For each datagram the pump read into
its buffer (one byte larger than ``max_size``, see :attr:`~DatagramServerProtocol.buffer_size`):

1. :meth:`~DatagramServerProtocol.receive_datagram` checks the size: a datagram
   that filled the buffer was too large -- dropped, counted as ``message too
   large``, logged with the peer and the sizes -- else it is counted in and its
   bytes returned; a failed receive goes to :meth:`~DatagramServerProtocol.receive_failed`,
   which says whether to read on (an ICMP error about an earlier reply: nothing to
   answer);
2. the pump calls the handler (:meth:`~DatagramServerProtocol.handle` does both
   steps for a plain handler); a raise goes to
   :meth:`~DatagramServerProtocol.handler_failed`, a return value to
   :meth:`~DatagramServerProtocol.handler_returned`, which applies the TCP
   servers' :func:`~msgsock.protocol.check_reply` and the size limit and returns
   what to send (None: nothing);
3. the pump sends it to the peer and reports :meth:`~DatagramServerProtocol.reply_sent`
   or :meth:`~DatagramServerProtocol.send_failed`.

Nothing a peer sends makes these raise.  Every failure is counted by
:class:`~msgsock.exceptions.EndKind` in a :class:`~msgsock.serving.ServerStatistics`
and worded once, here.  Repeated lines -- oversize datagrams, handler errors,
replies that could not be sent, failed receives -- go through a
:class:`~msgsock._ratelimit.LogRateLimiter` each: the first 5 of a quiet spell in
full, then one summary per 10 s (``... and 12,345 more handler errors from 3
senders in the last 10 s``), so a flood from any sender cannot fill the disk.  A
summary still counted is due at :meth:`~DatagramServerProtocol.next_deadline`; the
pump calls :meth:`~DatagramServerProtocol.check_timeouts` then, and
:meth:`~DatagramServerProtocol.flush_warnings` when it stops.  Work in progress (an
asyncio server's coroutine handlers) is bounded: :attr:`~DatagramServerProtocol.reading_paused`
is true from ``max_pending`` calls in progress down to half of them.

Log lines (``PEER`` as :func:`~msgsock.protocol.format_address` writes it):

- warning: ``PEER: dropped a datagram of N bytes: above max_size M`` (``more than M
  bytes`` where the system cannot tell the real size); ``PEER: reply dropped:
  REASON`` (the send failed); ``udp receive failed: REASON``; ``SERVER: N handler
  calls still running at the shutdown deadline (T s); cancelled``;
- error: ``PEER: handler raised T: TEXT; no reply`` (with the traceback),
  ``PEER: handler returned str; expected ...; no reply``, ``PEER: reply dropped:
  cannot send a message of N bytes: ...`` (a reply above ``max_size`` is the
  handler's error, as on the TCP servers);
- critical: ``SERVER: the server thread failed`` (with the traceback).

The client side -- request/reply matching and resends -- is :mod:`msgsock.udp.request`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, TypeAlias

from .._ratelimit import LogRateLimiter, Suppressed
from ..exceptions import EndKind, OversizeMessage
from ..protocol import check_reply, describe_os_error, format_address, handler_end
from ..serving import ERROR, WARNING, LogFunction, ServerStatistics

__all__ = [
    "CRITICAL",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "MAX_DATAGRAM",
    "WARNING_BURST",
    "WARNING_INTERVAL",
    "AsyncHandler",
    "DatagramServerProtocol",
    "Handler",
    "Reply",
    "check_int",
    "check_max_size",
    "nbytes",
]

DEFAULT_MAX_SIZE = 65507
"""Largest UDP payload over IPv4 (65535 - 20 bytes of IP header - 8 of UDP header)."""

MAX_DATAGRAM = 65535
"""Upper bound of ``max_size``: no UDP payload can be larger."""

DEFAULT_TIMEOUT = 1.0
"""Seconds a client waits for each reply before resending."""

DEFAULT_RETRIES = 3
"""Resends after a client's first try: 4 tries in all."""

DEFAULT_MAX_PENDING = 1024
"""Handler calls in progress (coroutines) at which an asyncio server stops reading."""

WARNING_INTERVAL = 10.0
"""Seconds between two summary lines of one kind of repeated log line."""

WARNING_BURST = 5
"""Lines of one kind logged in full at the start of a quiet spell."""

CRITICAL = 50
"""The level of :data:`logging.CRITICAL` (the core imports no logging)."""

Reply: TypeAlias = bytes | bytearray | memoryview | None
Handler: TypeAlias = Callable[[bytes], Reply]
"""A per-datagram function: the message in, the reply out (None: no reply)."""
AsyncHandler: TypeAlias = Callable[[bytes], Reply | Awaitable[Reply]]
"""Like :data:`Handler`, or a coroutine function (asyncio server only)."""


def _no_log(level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    pass


def nbytes(data: bytes | bytearray | memoryview) -> int:
    """The size of a datagram in bytes (a memoryview's ``nbytes``, whatever its format)."""
    return data.nbytes if isinstance(data, memoryview) else len(data)


def check_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int (a bool is not one).

    Raises:
        TypeError: it is not (``retries must be an int, got str``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_max_size(max_size: object) -> int:
    """Return ``max_size`` if it is a datagram size, 0..65535.

    Raises:
        TypeError: not an int (a bool neither), naming the type received.
        ValueError: outside 0..65535 (``max_size 70000: must be 0..65535, the largest UDP payload``).
    """
    size = check_int(max_size, "max_size")
    if not 0 <= size <= MAX_DATAGRAM:
        raise ValueError(f"max_size {size}: must be 0..{MAX_DATAGRAM}, the largest UDP payload")
    return size


# -- the server ------------------------------------------------------------------------------


class DatagramServerProtocol:
    """The decisions of one datagram server, shared by every pump.  Sans-I/O.

    Args:
        max_size: the largest datagram accepted or sent.
        log: where log lines go (``logger.log``); None logs nothing.
        lock: held around every change, for a server read from several threads
            (``threading.Lock()``); None for one thread.
        exact_sizes: the pump learns a truncated datagram's real size (Linux
            ``MSG_TRUNC``); else the log says ``more than max_size bytes``.
        max_pending: handler calls in progress at which reading pauses.
        warning_interval: seconds between two summaries of one kind of line.
        warning_burst: lines of one kind logged in full in a quiet spell.

    Raises:
        TypeError, ValueError: ``max_size`` is not an int 0..65535, ``max_pending``
            not an int >= 1, ``warning_interval`` negative, ``warning_burst`` below 1.
    """

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        *,
        log: LogFunction | None = None,
        lock: AbstractContextManager[Any] | None = None,
        exact_sizes: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        warning_interval: float = WARNING_INTERVAL,
        warning_burst: int = WARNING_BURST,
    ) -> None:
        self.max_size = check_max_size(max_size)
        self.log: LogFunction = log if log is not None else _no_log
        self.exact_sizes = exact_sizes
        self.max_pending = check_int(max_pending, "max_pending")
        if max_pending < 1:
            raise ValueError(f"max_pending {max_pending}: must be >= 1")
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._stats = ServerStatistics()
        self._interval = warning_interval
        self._limits = {
            kind: LogRateLimiter(warning_interval, burst=warning_burst)
            for kind in ("oversize", "handler", "send", "receive")
        }
        self._due: dict[str, float] = {}  # when each kind's pending summary is to be logged
        self.pending = 0
        """Handler calls in progress (coroutines awaited by an asyncio server)."""
        self._paused = False
        self.closing = False
        """True once :meth:`begin_shutdown` was called."""

    @property
    def buffer_size(self) -> int:
        """Bytes of the pump's receive buffer: one more than allowed, so a datagram that fills it was too large."""
        return self.max_size + 1

    # -- receiving ------------------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, peer: Any, now: float, *, size: int | None = None
    ) -> bytes | None:
        """A datagram arrived from ``peer``: its bytes to handle, or None when it was dropped.

        Args:
            data: what the buffer holds (at most :attr:`buffer_size` bytes).
            peer: the sender's address.
            now: the time, for the rate limit of the log.
            size: the datagram's real size when the system reported it (``MSG_TRUNC``);
                default ``len(data)``.
        """
        n = nbytes(data) if size is None else size
        if n > self.max_size:
            with self._lock:
                self._stats.count_end(EndKind.MESSAGE_TOO_LARGE)
            text = f"{n} bytes" if self.exact_sizes else f"more than {self.max_size} bytes"
            self._warn(
                "oversize",
                now,
                peer,
                WARNING,
                "%s: dropped a datagram of %s: above max_size %d",
                format_address(peer),
                text,
                self.max_size,
            )
            return None
        with self._lock:
            self._stats.messages_received += 1
            self._stats.bytes_received += n
        return bytes(data)

    def receive_failed(self, exc: OSError, now: float) -> bool:
        """The socket's receive raised ``exc``: True to read on, False to stop this burst.

        An ICMP error (``ConnectionRefusedError``, ``ConnectionResetError``, which
        Windows reports on unconnected sockets) concerns an earlier reply of ours:
        the datagram it was about is gone and there is nothing to answer, so it is
        neither counted nor logged.  Any other error is counted and logged.
        """
        if isinstance(exc, ConnectionRefusedError | ConnectionResetError):
            return True
        end = describe_os_error(exc)
        with self._lock:
            self._stats.count_end(end.kind)
        self._warn("receive", now, end.reason, WARNING, "udp receive failed: %s", end.reason)
        return False

    # -- the handler ----------------------------------------------------------------------

    def handle(self, handler: Callable[[bytes], object], message: bytes, peer: Any, now: float) -> Reply:
        """Call a plain ``handler`` on ``message``; return the reply to send (None: none).

        A raise or a wrong return value (a coroutine included: the blocking server
        cannot await it) is logged and counted, and there is no reply.
        """
        try:
            reply = handler(message)
        except Exception as exc:
            self.handler_failed(exc, peer, now)
            return None
        return self.handler_returned(reply, peer, now)

    def handler_failed(self, exc: BaseException, peer: Any, now: float) -> None:
        """The handler raised ``exc`` for ``peer``'s datagram: log (with the traceback), count; no reply."""
        end = handler_end(exc)
        self._handler_error(peer, now, "%s: %s; no reply", end.reason, exc)

    def handler_returned(self, reply: object, peer: Any, now: float) -> Reply:
        """The handler returned ``reply`` for ``peer``: what to send, or None (nothing, or it was refused).

        The TCP servers' check (SPEC §5.0): bytes-like or None, anything else is a
        ``handler error``; and a reply above ``max_size`` cannot be one datagram,
        which is the handler's error too (never the peer's ``message too large``).
        """
        try:
            checked = check_reply(reply)
        except TypeError as exc:
            self._handler_error(peer, now, "%s: %s; no reply", handler_end(exc).reason, None)
            return None
        if checked is not None and nbytes(checked) > self.max_size:
            error = OversizeMessage(nbytes(checked), self.max_size)
            self._handler_error(peer, now, "%s: reply dropped: %s", str(error), None)
            return None
        return checked

    def _handler_error(self, peer: Any, now: float, msg: str, reason: str, exc: BaseException | None) -> None:
        with self._lock:
            self._stats.count_end(EndKind.HANDLER_ERROR)
        self._warn("handler", now, peer, ERROR, msg, format_address(peer), reason, exc_info=exc)

    # -- sending --------------------------------------------------------------------------

    def reply_sent(self, reply: bytes | bytearray | memoryview) -> None:
        """The pump sent ``reply``: count it."""
        with self._lock:
            self._stats.messages_sent += 1
            self._stats.bytes_sent += nbytes(reply)

    def send_failed(self, exc: OSError, peer: Any, now: float) -> None:
        """Sending a reply to ``peer`` raised ``exc``: count and log it; the client's resend covers it.

        A full send buffer (``BlockingIOError``) included: UDP may drop a datagram.
        """
        end = describe_os_error(exc)
        with self._lock:
            self._stats.count_end(end.kind)
        self._warn("send", now, peer, WARNING, "%s: reply dropped: %s", format_address(peer), end.reason)

    # -- work in progress and shutdown ------------------------------------------------------

    def handler_started(self) -> None:
        """A handler call goes on in the background (a coroutine being awaited)."""
        self.pending += 1
        if self.pending >= self.max_pending:
            self._paused = True

    def handler_finished(self) -> None:
        """A background handler call is over (its reply handled by :meth:`handler_returned`)."""
        self.pending -= 1
        if self.pending <= self.max_pending // 2:
            self._paused = False

    @property
    def reading_paused(self) -> bool:
        """True while too many handler calls are in progress (SPEC §7): the kernel queues, and drops."""
        return self._paused

    def begin_shutdown(self) -> None:
        """Stop: the pump answers what is already queued (one burst), then stops reading."""
        self.closing = True

    def handlers_cancelled(self, server: str, count: int, timeout: float) -> None:
        """Log that ``count`` handler calls were still running at the shutdown deadline and were cancelled."""
        self.log(
            WARNING,
            "%s: %d handler calls still running at the shutdown deadline (%g s); cancelled",
            server,
            count,
            timeout,
        )

    def pump_failed(self, server: str, exc: BaseException) -> None:
        """Log that the pump itself failed (a bug, never a datagram's fault), with the traceback."""
        self.log(CRITICAL, "%s: the server thread failed", server, exc_info=exc)

    # -- the rate-limited log -------------------------------------------------------------

    def _summary_text(self, kind: str, summary: Suppressed) -> str:
        if summary.source is None:
            name = None
        else:
            name = str(summary.source) if kind == "receive" else format_address(summary.source)
        if kind == "oversize":
            return summary.text(f"datagrams above max_size {self.max_size} dropped", name=name)
        if kind == "handler":
            return summary.text("handler errors", name=name)
        if kind == "send":
            return summary.text("replies dropped", source="peer", via="to", name=name)
        return summary.text("udp receive failures", source="error", via="with", name=name)

    def _warn(
        self,
        kind: str,
        now: float,
        source: Hashable,
        level: int,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        limiter = self._limits[kind]
        with self._lock:
            log, summary = limiter.hit(now, source)
            if summary is not None or kind not in self._due:
                # One summary per interval: the next is due an interval after this window began.
                self._due[kind] = now + self._interval
            if not limiter.pending:
                self._due.pop(kind, None)
        if summary is not None:
            self._summarise(kind, summary)
        if log:
            self.log(level, msg, *args, exc_info=exc_info)

    def _summarise(self, kind: str, summary: Suppressed) -> None:
        self.log(ERROR if kind == "handler" else WARNING, "%s", self._summary_text(kind, summary))

    def next_deadline(self) -> float | None:
        """When a summary of suppressed lines is due (:meth:`check_timeouts`); None when none is pending."""
        if not self._due:  # the common case, read without the lock (a stale answer only delays a summary)
            return None
        with self._lock:
            return min(self._due.values(), default=None)

    def check_timeouts(self, now: float) -> None:
        """Log the summaries due by ``now``: a flood that stopped is still reported within an interval."""
        with self._lock:
            due = [kind for kind, at in self._due.items() if at <= now]
            summaries = [(kind, self._limits[kind].flush(now)) for kind in due]
            for kind in due:
                del self._due[kind]
        for kind, summary in summaries:
            if summary is not None:
                self._summarise(kind, summary)

    def flush_warnings(self, now: float) -> None:
        """Log every summary still pending (when the server stops)."""
        with self._lock:
            summaries = [(kind, limiter.flush(now)) for kind, limiter in self._limits.items()]
            self._due.clear()
        for kind, summary in summaries:
            if summary is not None:
                self._summarise(kind, summary)

    def statistics(self) -> ServerStatistics:
        """Datagrams and bytes in and out, and ``errors`` by kind (dropped datagrams, failed handlers or replies)."""
        with self._lock:
            return replace(self._stats, error_kinds=dict(self._stats.error_kinds))
