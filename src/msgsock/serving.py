"""Sans-I/O state of one server: admission, stages, bookkeeping, log lines, shutdown (SPEC §5.0, §6.1, §7).

Theory of operation.  Every server -- asyncio, threads, processes, the callback
layer's, the native engine -- owns one :class:`ServerProtocol` and is a pump around
it:

- for each accepted socket it calls :meth:`ServerProtocol.accept`, which returns the
  connection's :class:`~msgsock.protocol.MessageProtocol`, already ``CLOSED`` with a
  ``REJECTED`` end when ``max_connections`` are open (the pump then resets the
  socket, as for any end);
- it pumps that protocol (see :mod:`msgsock.protocol`) and calls
  ``proto.connection_lost()`` once its socket is gone;
- it calls :meth:`ServerProtocol.check_timeouts` every :attr:`~ServerProtocol.sweep_interval`
  (one sweep per server, not a timer per connection) and acts on the protocols it
  returns;
- to stop, :meth:`ServerProtocol.begin_shutdown`, then acts on the protocols it
  returns, and goes on sweeping until :attr:`~ServerProtocol.all_closed`; the sweep
  resets what is left at the shutdown deadline.

The server protocol is each connection's observer: it counts connections, ends by
kind, messages and bytes the same way in every engine, and words every log line
once, here.  It logs through the function it is given (``logger.log``: level,
message, arguments, ``exc_info``) so the core imports no logging.  A server whose
connections run on several threads gives it a lock.

Log lines (``PEER`` is the proxied client once a PROXY header named one):

- info: ``connection from PEER``; ``PEER disconnected (N messages in, M out)``
  (``, K discarded`` when messages arrived after the close began);
  ``PEER closed during the handshake: server shutting down``;
- debug: ``PEER health check (PROXY LOCAL)``;
- warning: ``PEER rejected: N connections open (limit L)``; ``PEER closed: REASON``
  for an abnormal end (no traceback);
- error: ``PEER closed: handler raised T: ...`` with the handler's traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import EndKind
from .framing import DEFAULT_FORMAT, FrameFormat
from .protocol import DEFAULT_LIMITS, Limits, MessageProtocol, Statistics
from .stages import Stages

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = ["DEBUG", "ERROR", "INFO", "WARNING", "LogFunction", "ServerProtocol", "ServerStatistics"]

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
"""The levels of :mod:`logging`, named here so the core need not import it."""

LogFunction = Callable[..., None]
"""``log(level, message, *args, exc_info=None)``: what :meth:`logging.Logger.log` takes."""


def _no_log(level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    pass


@dataclass
class ServerStatistics(Statistics):
    """Counters of a server, for its shutdown summary (SPEC §6.1)."""

    connections: int = 0
    """Connections accepted in all (rejected ones are not)."""
    active: int = 0
    """Connections open now."""
    rejected: int = 0
    """Connections closed at once because a limit (max connections, threads) was reached."""
    errors: int = 0
    """Connections that ended abnormally: protocol errors, resets, timeouts, handler errors."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    """``errors`` by kind (the value of its :class:`~msgsock.exceptions.EndKind`)."""
    health_checks: int = 0
    """Load balancers' health checks (PROXY ``LOCAL`` connections): no error."""

    def count_end(self, kind: EndKind) -> None:
        """Count one end of ``kind`` (an error under its kind; a health check apart)."""
        if kind is EndKind.HEALTH_CHECK:
            self.health_checks += 1
        elif kind is EndKind.REJECTED:
            self.rejected += 1
        elif kind.is_error:
            self.errors += 1
            self.error_kinds[kind.value] = self.error_kinds.get(kind.value, 0) + 1

    def add_server(self, other: ServerStatistics) -> None:
        """Add every counter of another server's statistics into these."""
        self.add(other)
        self.connections += other.connections
        self.active += other.active
        self.rejected += other.rejected
        self.errors += other.errors
        self.health_checks += other.health_checks
        for kind, n in other.error_kinds.items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + n

    def summary(self) -> str:
        """One line: connections, messages, bytes, errors (by kind)."""
        kinds = ", ".join(
            f"{n} {kind}" for kind, n in sorted(self.error_kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        discarded = f" ({self.messages_discarded} discarded)" if self.messages_discarded else ""
        checks = f", {self.health_checks} health checks" if self.health_checks else ""
        return (
            f"{self.connections} connections ({self.rejected} rejected{checks}), "
            f"{self.messages_received} messages in / {self.messages_sent} out{discarded}, "
            f"{self.bytes_received} bytes in / {self.bytes_sent} out, {self.errors} errors"
            + (f" ({kinds})" if kinds else "")
        )

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (``error_kinds`` as a nested dict)."""
        return {
            "connections": self.connections,
            "active": self.active,
            "rejected": self.rejected,
            "errors": self.errors,
            "error_kinds": dict(self.error_kinds),
            "health_checks": self.health_checks,
            **super().as_dict(),
        }


def log_end(log: LogFunction, proto: MessageProtocol) -> None:
    """Log how ``proto`` ended, in the one wording every server uses."""
    end = proto.end
    if end is None:
        return
    kind = end.kind
    stats = proto.stats
    if kind is EndKind.CLEAN or kind is EndKind.ABORTED:
        how = "disconnected" if kind is EndKind.CLEAN else "aborted"
        discarded = f", {stats.messages_discarded} discarded" if stats.messages_discarded else ""
        log(
            INFO,
            f"%s {how} (%d messages in, %d out{discarded})",
            proto.peer,
            stats.messages_received,
            stats.messages_sent,
        )
    elif kind is EndKind.HEALTH_CHECK:
        log(DEBUG, "%s health check (PROXY LOCAL)", proto.peer)
    elif kind is EndKind.SHUTDOWN:
        log(INFO, "%s %s", proto.peer, end.reason)
    elif kind is EndKind.REJECTED:
        log(WARNING, "%s rejected: %s", proto.peer, end.reason)
    elif kind is EndKind.HANDLER_ERROR:
        log(ERROR, "%s closed: %s", proto.peer, end.reason, exc_info=end.error)
    else:
        log(WARNING, "%s closed: %s", proto.peer, end.reason)


class ServerProtocol:
    """The decisions of one server, shared by every engine.  Sans-I/O.

    Args:
        frame: the frame format of every connection.
        limits: the limits in force (SPEC §7).
        log: where log lines go (``logger.log``); None logs nothing.
        proxy_protocol: every connection starts with a PROXY v1/v2 header.
        ssl_context: a server TLS context: every connection speaks TLS.
        auth_key: every client must pass the shared-key handshake (SPEC §4.2).
        close_on_eof: a per-message server (True) closes after the peer's EOF once it
            has answered; a per-connection handler (False) decides itself.
        lock: a lock held around every change, for servers whose connections run
            on several threads (``threading.Lock()``); None for one thread.
        nonce: a function returning a fresh 32-byte nonce per connection (tests
            inject one); None uses :func:`msgsock.auth.new_nonce`.
    """

    def __init__(
        self,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        *,
        log: LogFunction | None = None,
        proxy_protocol: bool = False,
        ssl_context: _ssl.SSLContext | None = None,
        auth_key: bytes | None = None,
        close_on_eof: bool = True,
        lock: AbstractContextManager[Any] | None = None,
        nonce: Callable[[], bytes] | None = None,
    ) -> None:
        self.frame = frame
        self.limits = limits
        self.log: LogFunction = log if log is not None else _no_log
        self.proxy_protocol = proxy_protocol
        self.ssl_context = ssl_context
        self.auth_key = bytes(auth_key) if auth_key is not None else None
        self.close_on_eof = close_on_eof
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._nonce = nonce
        self.staged = proxy_protocol or ssl_context is not None or auth_key is not None
        if self.staged:  # a bad key or context fails here, once, not per connection
            self._stages()
        self.connections: set[MessageProtocol] = set()
        """The connections open now (in their stages or served)."""
        self.closing = False
        self._deadline: float | None = None
        self._stats = ServerStatistics()  # counters of ended connections, connections, errors
        timeouts = [
            t
            for t in (
                limits.idle_timeout,
                limits.message_timeout,
                limits.handshake_timeout,
                limits.close_timeout,
            )
            if t
        ]
        self.sweep_interval = max(0.01, min(1.0, min(timeouts) / 4 if timeouts else 1.0))
        """Seconds between two :meth:`check_timeouts` sweeps."""

    def _stages(self) -> Stages:
        return Stages(
            server_side=True,
            proxy_protocol=self.proxy_protocol,
            ssl_context=self.ssl_context,
            auth_key=self.auth_key,
            nonce=self._nonce() if self._nonce is not None and self.auth_key is not None else None,
        )

    # -- connections --------------------------------------------------------------------

    def accept(self, peer_address: Any, now: float) -> MessageProtocol:
        """A socket was accepted from ``peer_address``: return its protocol.

        Over ``max_connections`` (or while shutting down) the protocol is already
        ``CLOSED`` with a ``REJECTED`` (``SHUTDOWN``) end: the pump resets the socket
        and calls ``connection_lost`` as for any end.
        """
        proto = MessageProtocol(
            self.frame,
            limits=self.limits,
            server_side=True,
            stages=self._stages() if self.staged else None,
            close_on_eof=self.close_on_eof,
            peer_address=peer_address,
            observer=self,
        )
        with self._lock:
            active = len(self.connections)
            limit = self.limits.max_connections
            if self.closing:
                proto.fail(EndKind.SHUTDOWN, "closed on arrival: server shutting down")
                proto.observer = None
                return proto
            if active >= limit:
                proto.reject(f"{active} connections open (limit {limit})")
                proto.observer = None  # not a connection of ours: logged and counted here
                self._stats.count_end(EndKind.REJECTED)
                log_end(self.log, proto)
                return proto
            self._stats.connections += 1
            self.connections.add(proto)
        proto.check_timeouts(now)
        if proto.handshake_complete:
            self.connection_opened(proto)
        return proto

    def reject(self, peer_address: Any, reason: str) -> None:
        """Count and log a connection refused before it had a protocol (the thread cap)."""
        proto = MessageProtocol(self.frame, limits=self.limits, server_side=True, peer_address=peer_address)
        proto.reject(reason)
        with self._lock:
            self._stats.count_end(EndKind.REJECTED)
        log_end(self.log, proto)

    def connection_opened(self, proto: MessageProtocol) -> None:
        """(Observer) every stage passed: log the connection, under its proxied peer.

        A load balancer's health check (a PROXY ``LOCAL`` header) is logged at debug
        level: one line per check interval per balancer is noise, not news.
        """
        info = proto.proxy_info
        level = DEBUG if info is not None and info.command == "LOCAL" else INFO
        self.log(level, "connection from %s", proto.peer)

    def connection_ended(self, proto: MessageProtocol) -> None:
        """(Observer) the socket is gone: count its end and its traffic, log it."""
        end = proto.end
        with self._lock:
            if proto not in self.connections:
                return
            self.connections.discard(proto)
            self._stats.add(proto.stats)
            if end is not None:
                self._stats.count_end(end.kind)
        log_end(self.log, proto)

    # -- time and shutdown --------------------------------------------------------------

    def check_timeouts(self, now: float) -> list[MessageProtocol]:
        """One sweep: every connection's timeouts, and the shutdown deadline.

        Returns:
            The protocols whose end was decided by this sweep: the pump acts on their
            :attr:`~msgsock.protocol.MessageProtocol.close_action`.
        """
        with self._lock:
            protos = list(self.connections)
        changed = []
        deadline = self._deadline
        past = deadline is not None and now >= deadline
        for proto in protos:  # every one not yet lost: a CLOSED one may still be flushing
            if past:
                proto.fail(
                    EndKind.SHUTDOWN_DEADLINE,
                    f"shutdown deadline: still open {self.limits.shutdown_timeout:g} s after the server began to stop",
                )
                changed.append(proto)
            elif proto.check_timeouts(now) is not None:
                changed.append(proto)
        return changed

    def begin_shutdown(self, now: float) -> list[MessageProtocol]:
        """Stop: every served connection finishes what it received, then closes (SPEC §6.1).

        Connections still in their stages are dropped (``SHUTDOWN``: no error, nothing
        of theirs was served).  The deadline is ``limits.shutdown_timeout`` from ``now``.

        Returns:
            The protocols the pump must act on now (all open ones).
        """
        with self._lock:
            if self.closing:
                return []
            self.closing = True
            self._deadline = now + self.limits.shutdown_timeout
            protos = list(self.connections)
        for proto in protos:
            proto.send_eof()
        return protos

    @property
    def deadline(self) -> float | None:
        """When the shutdown resets what is left (None before :meth:`begin_shutdown`)."""
        return self._deadline

    @property
    def all_closed(self) -> bool:
        """True once shutting down and no connection is left."""
        with self._lock:
            return self.closing and not self.connections

    # -- counters -----------------------------------------------------------------------

    def statistics(self) -> ServerStatistics:
        """Counters so far: connections, rejections, errors by kind, messages and bytes each way."""
        with self._lock:
            stats = ServerStatistics()
            stats.add_server(self._stats)
            stats.active = len(self.connections)
            for proto in self.connections:
                stats.add(proto.stats)
        return stats

    def summary(self) -> str:
        """The shutdown summary line (SPEC §6.1)."""
        return self.statistics().summary()
