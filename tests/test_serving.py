"""Tests of the sans-I/O server core: admission, log lines, counting, shutdown (serving.py; SPEC §5.0, §6.1, §7).

No socket: each "connection" is the MessageProtocol that ``ServerProtocol.accept``
returns, fed bytes by the test as a pump would feed it, with an injected clock.
Log lines are collected by a list-backed log function with ``logger.log``'s
signature.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import pytest

from msgsock.auth import MAGIC
from msgsock.exceptions import EndKind
from msgsock.framing import encode
from msgsock.protocol import Action, End, Limits, MessageProtocol, State
from msgsock.proxy import ProxyInfo, serialize
from msgsock.serving import DEBUG, ERROR, INFO, WARNING, ServerProtocol, ServerStatistics, log_end
from msgsock.stages import Stages
from tests.certs import Pki

PEER = ("127.0.0.1", 50000)
KEY = b"0123456789abcdef-shared"
NONCE = bytes(range(100, 132))
LOCAL = serialize(ProxyInfo(2, "LOCAL"))
PROXIED = serialize(ProxyInfo(1, "PROXY", "TCP4", ("203.0.113.7", 4242), ("198.51.100.1", 9898)))


class Log:
    """A log function (``logger.log``'s signature) that keeps (level, text, exc_info) per line."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str, BaseException | None]] = []

    def __call__(self, level: int, msg: str, *args: Any, exc_info: BaseException | None = None) -> None:
        self.lines.append((level, msg % args, exc_info))

    def texts(self) -> list[tuple[int, str]]:
        """The lines without exc_info."""
        return [(level, text) for level, text, _ in self.lines]


def _peer(n: int) -> tuple[str, int]:
    return ("127.0.0.1", 50000 + n)


def _server(**kwargs: Any) -> tuple[ServerProtocol, Log]:
    log = Log()
    return ServerProtocol(log=log, **kwargs), log


def _action(proto: MessageProtocol) -> Action | None:
    # A call, so the type checker does not narrow ``close_action`` across the steps of a test.
    return proto.close_action


def _wire(proto: MessageProtocol) -> bytes:
    return b"".join(bytes(chunk) for chunk in proto.data_to_send())


def _echo_one(proto: MessageProtocol, body: bytes) -> None:
    """One request and its echo, as the per-message pump does it."""
    out = proto.receive_echo(encode(body))
    assert out == encode(body)


# -- accept, max_connections ------------------------------------------------------------------


def test_accept_returns_a_served_protocol_and_logs_it() -> None:
    """accept() gives an open server-side protocol observed by the server, and logs the connection."""
    server, log = _server()
    proto = server.accept(PEER, 0.0)
    assert proto.state is State.OPEN
    assert proto.server_side and proto.close_on_eof
    assert proto.peer == "127.0.0.1:50000"
    assert proto.observer is server
    assert proto.next_deadline(0.0) is not None  # its timeouts were started
    assert log.texts() == [(INFO, "connection from 127.0.0.1:50000")]
    assert proto in server.connections
    stats = server.statistics()
    assert (stats.connections, stats.active) == (1, 1)


def test_accept_of_an_unknown_peer() -> None:
    """A peer whose address could not be read is logged as the unknown peer."""
    server, log = _server()
    server.accept(None, 0.0)
    assert log.texts() == [(INFO, "connection from unknown peer")]


def test_close_on_eof_follows_the_server() -> None:
    """A per-connection server (close_on_eof=False) gives protocols that wait for the application's close."""
    server, _ = _server(close_on_eof=False)
    assert not server.accept(PEER, 0.0).close_on_eof


def test_max_connections_rejects_and_logs() -> None:
    """Above max_connections a connection is CLOSED at once (REJECTED, a reset), logged and counted, not served."""
    server, log = _server(limits=Limits(max_connections=2))
    first = server.accept(_peer(1), 0.0)
    server.accept(_peer(2), 0.0)
    refused = server.accept(_peer(3), 0.0)
    assert (refused.state, refused.close_action) == (State.CLOSED, Action.ABORT)
    assert refused.end == End(EndKind.REJECTED, "2 connections open (limit 2)")
    assert refused.observer is None
    assert refused not in server.connections
    assert log.texts()[-1] == (WARNING, "127.0.0.1:50003 rejected: 2 connections open (limit 2)")
    refused.connection_lost(None)  # the pump's last call: nothing more is logged or counted
    assert len(log.lines) == 3
    stats = server.statistics()
    assert (stats.connections, stats.rejected, stats.errors, stats.active) == (2, 1, 0, 2)
    first.receive_eof()
    first.connection_lost(None)
    again = server.accept(_peer(4), 0.0)
    assert again.state is State.OPEN


def test_reject_counts_a_connection_refused_before_its_protocol() -> None:
    """reject() (the thread cap) logs and counts a refused connection that never had a protocol."""
    server, log = _server()
    server.reject(_peer(9), "1000 threads busy (limit 1000)")
    assert log.texts() == [(WARNING, "127.0.0.1:50009 rejected: 1000 threads busy (limit 1000)")]
    stats = server.statistics()
    assert (stats.connections, stats.rejected, stats.errors) == (0, 1, 0)


def test_opened_log_names_the_proxied_peer() -> None:
    """With PROXY headers, the connection is logged once its header is read, under the proxied client."""
    server, log = _server(proxy_protocol=True)
    proto = server.accept(PEER, 0.0)
    assert log.lines == []
    assert proto.receive_data(PROXIED + encode(b"hi")) == [b"hi"]
    assert log.texts() == [(INFO, "connection from 203.0.113.7:4242")]
    proto.receive_eof()
    proto.connection_lost(None)
    assert log.texts()[-1] == (INFO, "203.0.113.7:4242 disconnected (1 messages in, 0 out)")


def test_nonce_and_key_are_used_per_connection() -> None:
    """Each connection's authentication stage uses the key and a nonce from the injected function."""
    server, _ = _server(auth_key=KEY, nonce=lambda: NONCE)
    proto = server.accept(PEER, 0.0)
    assert not proto.handshake_complete
    assert _wire(proto) == MAGIC + NONCE


def test_bad_stage_configuration_fails_at_construction() -> None:
    """A key too short fails when the server is made, not at the first connection."""
    with pytest.raises(ValueError):
        ServerProtocol(auth_key=b"short")


def test_the_lock_is_held_around_changes() -> None:
    """A server given a lock takes it around its bookkeeping (for servers with one thread per connection)."""

    class CountingLock:
        def __init__(self) -> None:
            self.inner = threading.Lock()
            self.entered = 0

        def __enter__(self) -> None:
            self.inner.acquire()
            self.entered += 1

        def __exit__(
            self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
        ) -> None:
            self.inner.release()

    lock = CountingLock()
    server = ServerProtocol(lock=lock)
    proto = server.accept(PEER, 0.0)
    proto.connection_lost(None)
    server.statistics()
    assert lock.entered >= 3
    assert not lock.inner.locked()


# -- end log lines ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason", "level", "text"),
    [
        (EndKind.CLEAN, "peer closed the connection", INFO, "P disconnected (3 messages in, 2 out)"),
        (EndKind.ABORTED, "connection aborted locally", INFO, "P aborted (3 messages in, 2 out)"),
        (EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)", DEBUG, "P health check (PROXY LOCAL)"),
        (
            EndKind.SHUTDOWN,
            "closed during the handshake: server shutting down",
            INFO,
            "P closed during the handshake: server shutting down",
        ),
        (
            EndKind.REJECTED,
            "2 connections open (limit 2)",
            WARNING,
            "P rejected: 2 connections open (limit 2)",
        ),
        (
            EndKind.IDLE_TIMEOUT,
            "idle timeout: nothing received for 1 s",
            WARNING,
            "P closed: idle timeout: nothing received for 1 s",
        ),
        (EndKind.RESET, "connection reset by peer", WARNING, "P closed: connection reset by peer"),
        (
            EndKind.MESSAGE_TOO_LARGE,
            "message size 9 exceeds max_size 4",
            WARNING,
            "P closed: message size 9 exceeds max_size 4",
        ),
        (
            EndKind.TLS,
            "TLS handshake failed: [SSL: X] x",
            WARNING,
            "P closed: TLS handshake failed: [SSL: X] x",
        ),
    ],
    ids=lambda v: v.name if isinstance(v, EndKind) else None,
)
def test_log_end_wording(kind: EndKind, reason: str, level: int, text: str) -> None:
    """log_end words each end kind once, at its level; only a handler error carries a traceback."""
    log = Log()
    proto = MessageProtocol(peer_address="P")
    proto.stats.messages_received, proto.stats.messages_sent = 3, 2
    proto.end = End(kind, reason)
    log_end(log, proto)
    assert log.lines == [(level, text, None)]


def test_handler_error_is_logged_with_its_exception() -> None:
    """A handler error is logged at ERROR, with the handler's exception for the traceback."""
    server, log = _server()
    proto = server.accept(PEER, 0.0)
    boom = ValueError("boom")

    def handler(message: bytes) -> bytes:
        raise boom

    proto.receive_and_reply(encode(b"x"), handler)
    assert proto.close_action is Action.ABORT
    proto.connection_lost(None)
    assert log.lines[-1] == (ERROR, "127.0.0.1:50000 closed: handler raised ValueError: boom", boom)
    assert server.statistics().error_kinds == {"handler error": 1}


def test_discarded_messages_are_in_the_disconnect_line() -> None:
    """Messages read after the close began are named as discarded in the disconnect line."""
    server, log = _server()
    proto = server.accept(PEER, 0.0)
    _echo_one(proto, b"a")
    server.begin_shutdown(0.0)
    proto.eof_written()
    assert proto.receive_echo(encode(b"late") + encode(b"later")) == b""
    proto.receive_eof()
    proto.connection_lost(None)
    assert log.texts()[-1] == (INFO, "127.0.0.1:50000 disconnected (1 messages in, 1 out, 2 discarded)")


def test_stage_failure_is_logged_under_the_socket_peer(pki: Pki) -> None:
    """A connection that fails its TLS stage is logged with its socket address and counted under tls."""
    server, log = _server(ssl_context=pki.server_context())
    proto = server.accept(PEER, 0.0)
    assert log.lines == []  # not opened: no stage passed
    proto.receive_data(encode(b"plaintext"))
    proto.connection_lost(None)
    level, text = log.texts()[-1]
    assert level == WARNING
    assert text.startswith("127.0.0.1:50000 closed: TLS handshake failed: [SSL: ")
    assert server.statistics().error_kinds == {"tls": 1}


def test_health_check_is_counted_apart_and_logged_at_debug() -> None:
    """A PROXY v2 LOCAL connection that resets is a health check: DEBUG, counted apart, no error."""
    server, log = _server(proxy_protocol=True)
    proto = server.accept(PEER, 0.0)
    proto.receive_data(LOCAL)
    proto.connection_lost(ConnectionResetError())
    assert log.texts()[-1] == (DEBUG, "127.0.0.1:50000 health check (PROXY LOCAL)")
    stats = server.statistics()
    assert (stats.health_checks, stats.errors, stats.connections) == (1, 0, 1)
    assert not any(level >= WARNING for level, _, _ in log.lines)


# -- counting and summary ---------------------------------------------------------------------


def test_count_end_by_kind() -> None:
    """count_end puts errors under their kind, health checks and rejections apart, and clean ends nowhere."""
    stats = ServerStatistics()
    for kind in [EndKind.RESET, EndKind.RESET, EndKind.HANDLER_ERROR, EndKind.HEALTH_CHECK, EndKind.REJECTED]:
        stats.count_end(kind)
    for kind in [EndKind.CLEAN, EndKind.SHUTDOWN, EndKind.ABORTED]:
        stats.count_end(kind)
    assert stats.error_kinds == {"reset": 2, "handler error": 1}
    assert (stats.errors, stats.health_checks, stats.rejected) == (3, 1, 1)


@pytest.mark.parametrize(
    ("stats", "line"),
    [
        (
            ServerStatistics(),
            "0 connections (0 rejected), 0 messages in / 0 out, 0 bytes in / 0 out, 0 errors",
        ),
        (
            ServerStatistics(
                messages_received=2331,
                messages_sent=2331,
                bytes_received=158508,
                bytes_sent=158508,
                messages_discarded=11,
                connections=16,
            ),
            "16 connections (0 rejected), 2331 messages in / 2331 out (11 discarded), "
            "158508 bytes in / 158508 out, 0 errors",
        ),
        (
            ServerStatistics(connections=5, rejected=2, health_checks=3),
            "5 connections (2 rejected, 3 health checks), 0 messages in / 0 out, 0 bytes in / 0 out, 0 errors",
        ),
        (
            ServerStatistics(
                connections=4,
                errors=4,
                error_kinds={"handler error": 1, "reset": 2, "idle timeout": 1},
            ),
            "4 connections (0 rejected), 0 messages in / 0 out, 0 bytes in / 0 out, "
            "4 errors (2 reset, 1 handler error, 1 idle timeout)",
        ),
    ],
    ids=["empty", "discarded", "health-checks", "kinds"],
)
def test_summary_lines(stats: ServerStatistics, line: str) -> None:
    """summary() is one line, byte for byte: discarded and health checks only when there are some; kinds by count."""
    assert stats.summary() == line


def test_server_summary_after_a_mixed_run() -> None:
    """The server's summary counts served, rejected, health-check and failed connections, and discarded messages."""
    server, _ = _server(proxy_protocol=True, limits=Limits(max_connections=3, idle_timeout=1))
    served = server.accept(_peer(1), 0.0)
    served.receive_data(LOCAL)  # LOCAL then traffic: an ordinary connection
    _echo_one(served, b"abc")
    check = server.accept(_peer(2), 0.0)
    check.receive_data(LOCAL)
    idle = server.accept(_peer(3), 0.0)
    idle.receive_data(PROXIED)
    server.accept(_peer(4), 0.0).connection_lost(None)  # rejected
    check.connection_lost(ConnectionResetError())
    assert server.check_timeouts(0.5) == []
    assert set(server.check_timeouts(1.6)) == {served, idle}  # served: active until the check at 0.5
    for proto in (served, idle):
        assert proto.close_action is Action.ABORT
        proto.connection_lost(None)
    assert server.summary() == (
        "3 connections (1 rejected, 1 health checks), 1 messages in / 1 out, "
        "7 bytes in / 7 out, 2 errors (2 idle timeout)"
    )


def test_statistics_sum_live_and_ended_connections() -> None:
    """statistics() adds the counters of open connections to those of ended ones, each counted once."""
    server, _ = _server()
    ended = server.accept(_peer(1), 0.0)
    _echo_one(ended, b"12")
    ended.receive_eof()
    ended.connection_lost(None)
    live = server.accept(_peer(2), 0.0)
    _echo_one(live, b"3")
    _echo_one(live, b"45")
    stats = server.statistics()
    assert (stats.connections, stats.active) == (2, 1)
    assert (stats.messages_received, stats.messages_sent) == (3, 3)
    assert stats.bytes_received == stats.bytes_sent == len(encode(b"12") + encode(b"3") + encode(b"45"))
    live.receive_eof()
    live.connection_lost(None)
    live.connection_lost(None)  # a second call changes nothing
    after = server.statistics()
    assert (after.active, after.messages_received) == (0, 3)


def test_server_statistics_add_server_and_as_dict() -> None:
    """add_server merges every counter, error kinds included; as_dict round-trips through the constructor."""
    a = ServerStatistics(connections=2, messages_discarded=1, health_checks=1)
    a.count_end(EndKind.IDLE_TIMEOUT)
    b = ServerStatistics(connections=1, rejected=1, messages_received=4)
    b.count_end(EndKind.RESET)
    b.count_end(EndKind.IDLE_TIMEOUT)
    a.add_server(b)
    assert a.as_dict() == {
        "connections": 3,
        "active": 0,
        "rejected": 1,
        "errors": 3,
        "error_kinds": {"idle timeout": 2, "reset": 1},
        "health_checks": 1,
        "messages_received": 4,
        "messages_sent": 0,
        "bytes_received": 0,
        "bytes_sent": 0,
        "messages_discarded": 1,
    }
    assert ServerStatistics(**a.as_dict()) == a


# -- shutdown -------------------------------------------------------------------------------


def test_begin_shutdown_drains_served_connections_and_drops_staged_ones(pki: Pki) -> None:
    """begin_shutdown: served connections drain (DRAINING); those still in their stages end SHUTDOWN (no error)."""
    server, log = _server(ssl_context=pki.server_context())
    staged = server.accept(_peer(1), 0.0)
    served = server.accept(_peer(2), 0.0)
    client = MessageProtocol(  # a TLS client, to bring one connection through its stages
        stages=Stages(server_side=False, ssl_context=pki.client_context(), server_hostname="localhost")
    )
    for _ in range(5):
        out = _wire(client)
        if out:
            served.receive_data(out)
        back = _wire(served)
        if back:
            client.receive_data(back)
    assert served.handshake_complete and not staged.handshake_complete
    acted = server.begin_shutdown(10.0)
    assert set(acted) == {staged, served}
    assert server.deadline == 15.0
    assert (staged.state, staged.close_action) == (State.CLOSED, Action.ABORT)
    assert staged.end == End(EndKind.SHUTDOWN, "closed during the handshake: server shutting down")
    assert served.state is State.DRAINING
    assert _wire(served)  # TLS close_notify
    assert served.close_action is Action.HALF_CLOSE
    assert server.begin_shutdown(11.0) == []  # once
    staged.connection_lost(None)
    assert log.texts()[-1] == (INFO, "127.0.0.1:50001 closed during the handshake: server shutting down")
    assert not server.all_closed
    served.eof_written()
    served.receive_eof()
    served.connection_lost(None)
    assert server.all_closed
    stats = server.statistics()
    assert (stats.connections, stats.errors) == (2, 0)


def test_accept_while_shutting_down() -> None:
    """A connection that arrives during the shutdown is closed at once (SHUTDOWN), neither counted nor logged."""
    server, log = _server()
    server.begin_shutdown(0.0)
    proto = server.accept(PEER, 1.0)
    assert (proto.state, proto.close_action) == (State.CLOSED, Action.ABORT)
    assert proto.end is not None and proto.end.kind is EndKind.SHUTDOWN
    proto.connection_lost(None)
    assert log.lines == []
    assert server.statistics().connections == 0
    assert server.all_closed


def test_messages_after_the_shutdown_began_are_discarded() -> None:
    """After begin_shutdown, messages that still arrive are counted as discarded, never as received."""
    server, _ = _server()
    proto = server.accept(PEER, 0.0)
    _echo_one(proto, b"before")
    server.begin_shutdown(1.0)
    assert _action(proto) is Action.HALF_CLOSE
    proto.eof_written()
    assert proto.receive_echo(encode(b"after") * 3) == b""
    proto.receive_eof()
    assert _action(proto) is Action.CLOSE
    proto.connection_lost(None)
    stats = server.statistics()
    assert (stats.messages_received, stats.messages_sent, stats.messages_discarded) == (1, 1, 3)
    assert server.summary() == (
        "1 connections (0 rejected), 1 messages in / 1 out (3 discarded), 37 bytes in / 10 out, 0 errors"
    )


def test_shutdown_deadline_resets_what_is_left() -> None:
    """At the shutdown deadline the sweep resets every connection still open, as SHUTDOWN_DEADLINE errors."""
    server, log = _server(limits=Limits(shutdown_timeout=5, close_timeout=100, idle_timeout=None))
    slow = server.accept(_peer(1), 0.0)
    slow.send_message(b"x" * 10)  # the peer reads nothing: the drain never ends
    gone = server.accept(_peer(2), 0.0)
    server.begin_shutdown(10.0)
    gone.data_to_send()
    gone.eof_written()
    gone.receive_eof()
    gone.connection_lost(None)
    assert server.check_timeouts(14.99) == []
    assert slow.state is State.DRAINING
    assert server.check_timeouts(15.0) == [slow]
    assert slow.end == End(
        EndKind.SHUTDOWN_DEADLINE, "shutdown deadline: still open 5 s after the server began to stop"
    )
    assert slow.close_action is Action.ABORT
    slow.connection_lost(None)
    assert log.texts()[-1] == (
        WARNING,
        "127.0.0.1:50001 closed: shutdown deadline: still open 5 s after the server began to stop",
    )
    assert server.all_closed
    assert server.statistics().error_kinds == {"shutdown deadline": 1}


def test_shutdown_deadline_resets_a_drain_stuck_on_replies_owed() -> None:
    """A connection whose asynchronous reply never comes is reset at the deadline even after the peer's EOF."""
    server, _ = _server()
    proto = server.accept(PEER, 0.0)
    proto.receive_data(encode(b"q"))
    proto.replies_owed = 1
    server.begin_shutdown(0.0)
    proto.receive_eof()
    server.check_timeouts(100.0)
    assert proto.close_action is Action.ABORT


# -- timeouts: one sweep ----------------------------------------------------------------------


def test_check_timeouts_returns_the_connections_it_ended() -> None:
    """One sweep checks every connection and returns those whose end it decided; they are logged when lost."""
    server, log = _server(limits=Limits(idle_timeout=1, message_timeout=None))
    quiet = server.accept(_peer(1), 0.0)
    busy = server.accept(_peer(2), 0.0)
    assert server.check_timeouts(0.5) == []
    _echo_one(busy, b"ping")
    assert server.check_timeouts(1.2) == [quiet]
    assert (quiet.state, quiet.close_action) == (State.CLOSED, Action.ABORT)
    assert busy.state is State.OPEN
    assert server.check_timeouts(1.3) == []  # already ended: not returned twice
    quiet.connection_lost(None)
    assert log.texts()[-1] == (WARNING, "127.0.0.1:50001 closed: idle timeout: nothing received for 1 s")


def test_handshake_timeout_through_the_sweep() -> None:
    """A connection that sends no PROXY header within handshake_timeout is reset by the sweep and logged."""
    server, log = _server(proxy_protocol=True, limits=Limits(handshake_timeout=2))
    proto = server.accept(PEER, 0.0)
    assert server.check_timeouts(2.0) == []
    assert server.check_timeouts(2.1) == [proto]
    proto.connection_lost(None)
    assert log.texts() == [(WARNING, "127.0.0.1:50000 closed: handshake timeout: no PROXY header within 2 s")]
    assert server.statistics().error_kinds == {"handshake timeout": 1}


@pytest.mark.parametrize(
    ("limits", "interval"),
    [
        (Limits(), 1.0),
        (Limits(idle_timeout=0.2, message_timeout=None), 0.05),
        (Limits(idle_timeout=0.001), 0.01),
        (Limits(idle_timeout=None, message_timeout=None, handshake_timeout=None, close_timeout=0), 1.0),
        (Limits(idle_timeout=None, message_timeout=None, handshake_timeout=None, close_timeout=2), 0.5),
    ],
    ids=["defaults", "short-idle", "tiny", "none", "close-only"],
)
def test_sweep_interval(limits: Limits, interval: float) -> None:
    """The sweep runs every quarter of the shortest timeout in force, between 10 ms and 1 s."""
    assert ServerProtocol(limits=limits).sweep_interval == pytest.approx(interval)
