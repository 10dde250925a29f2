"""Tests of the reactor thread, handoffs, timers and dispatchers (msgsock.callback; SPEC §5.3).

Also holds the small helpers the other callback tests import (``Recorder``,
``settle``, ``plain_listener``, ``HOSTS``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock.callback import (
    AsyncSocket,
    MessageSocket,
    QueueDispatcher,
    Reactor,
    direct,
)
from msgsock.exceptions import InvalidState
from msgsock.framing import FrameDecoder, encode
from tests.helpers import free_loopback6, unit

# -- helpers shared by the callback tests -------------------------------------------------

HOSTS = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param(
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available"),
    ),
]


class Recorder:
    """A thread-safe list of events that tests wait on (a condition, never a sleep)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.cond = threading.Condition()

    def add(self, *event: Any) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def names(self) -> list[Any]:
        with self.cond:
            return [e[0] for e in self.events]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def wait_for(
        self, predicate: Callable[[list[tuple[Any, ...]]], object], timeout: float | None = None
    ) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.events), unit(5) if timeout is None else timeout)
            assert ok, f"condition not met; events: {self.events[-20:]}"

    def wait_count(self, name: str, n: int, timeout: float | None = None) -> None:
        self.wait_for(lambda events: sum(1 for e in events if e[0] == name) >= n, timeout)


def settle(*reactors: Reactor, turns: int = 3) -> None:
    """Let each reactor go through a few full loop turns (for "nothing more happened" checks)."""
    for reactor in reactors:
        for _ in range(turns):
            reactor.run_sync(lambda: None, timeout=unit(5))


def plain_listener(host: str) -> socket.socket:
    """A blocking loopback listening socket on a free port (the test's peer side)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(16)
    sock.settimeout(unit(5))
    return sock


def recv_frames(sock: socket.socket, count: int, decoder: FrameDecoder | None = None) -> list[bytes]:
    """Read from a blocking socket until ``count`` frames have arrived."""
    decoder = decoder or FrameDecoder()
    frames: list[bytes] = []
    for _ in range(1_000_000):  # bounded; each recv has the socket's timeout
        if len(frames) >= count:
            break
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"EOF after {len(frames)} of {count} frames")
        frames += decoder.feed(data)
    return frames


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(name="test-reactor")
    r.start()
    try:
        yield r
    finally:
        r.stop(timeout=unit(5))


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- life cycle ---------------------------------------------------------------------------------


def test_context_manager_starts_and_stops_the_thread() -> None:
    """The reactor runs its loop on its own named thread between __enter__ and __exit__."""
    with Reactor(name="ctx-reactor") as r:
        assert r.running
        name = r.run_sync(lambda: threading.current_thread().name)
        assert name == "ctx-reactor"
        assert not r.in_reactor_thread()
        assert r.run_sync(r.in_reactor_thread)
    assert not r.running
    assert not any(t.name == "ctx-reactor" for t in threading.enumerate())


def test_reactor_runs_once_and_stop_is_idempotent() -> None:
    """A stopped reactor cannot be restarted, and stopping twice is harmless."""
    r = Reactor().start()
    r.stop(timeout=unit(5))
    r.stop(timeout=unit(5))
    with pytest.raises(InvalidState):
        r.start()
    with pytest.raises(InvalidState):
        r.call_soon_threadsafe(print)


def test_stop_without_start_releases_resources() -> None:
    """A reactor that never started can be stopped (closing its selector and sockets)."""
    r = Reactor()
    s = AsyncSocket(r)
    s.create(0, address="127.0.0.1")
    r.stop()
    assert s.closed
    assert s.wait_closed(0)


def test_run_sync_returns_results_and_raises_exceptions(reactor: Reactor) -> None:
    """run_sync runs on the reactor thread and carries back the value or the exception."""
    assert reactor.run_sync(lambda a, b: a + b, 2, 3) == 5

    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        reactor.run_sync(boom)


def test_call_soon_threadsafe_keeps_order_per_thread(reactor: Reactor) -> None:
    """Functions handed off from many threads all run, each thread's in its order."""
    seen: list[tuple[int, int]] = []

    def hand_off(t: int) -> None:
        for i in range(300):
            reactor.call_soon_threadsafe(seen.append, (t, i))

    threads = [threading.Thread(target=hand_off, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(unit(5))
    settle(reactor)
    assert len(seen) == 6 * 300
    for t in range(6):
        assert [i for (tt, i) in seen if tt == t] == list(range(300))


def test_call_later_runs_in_time_order_and_cancel_works(reactor: Reactor) -> None:
    """Timers fire in deadline order on the reactor thread; a cancelled one never fires."""
    fired = Recorder()
    reactor.call_later(unit(0.2), fired.add, "late")
    cancelled = reactor.call_later(unit(0.1), fired.add, "cancelled")
    reactor.call_later(0.0, fired.add, "soon")
    cancelled.cancel()
    fired.wait_count("late", 1)
    settle(reactor)
    assert fired.names() == ["soon", "late"]


def test_a_raising_handoff_is_logged_and_the_reactor_lives(
    reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in a function handed to the reactor is logged; the loop goes on."""

    def boom() -> None:
        raise RuntimeError("handoff failure")

    with caplog.at_level(logging.ERROR, logger="msgsock.callback"):
        reactor.call_soon_threadsafe(boom)
        settle(reactor)
    assert any("handoff failure" in (r.exc_text or "") for r in caplog.records)
    assert reactor.run_sync(lambda: 42) == 42


def test_stop_closes_registered_sockets(host: str) -> None:
    """Sockets still registered when the reactor stops are closed."""
    with Reactor() as r:
        s = AsyncSocket(r)
        s.create(0, address=host)
        s.listen()
    assert s.closed
    with pytest.raises(InvalidState):
        s.listen()


def test_run_sync_after_stop_runs_inline() -> None:
    """With no reactor thread left, run_sync runs the function in the caller's thread."""
    r = Reactor().start()
    r.stop(timeout=unit(5))
    assert r.run_sync(threading.current_thread) is threading.current_thread()


# -- dispatchers -------------------------------------------------------------------------------


def test_queue_dispatcher_runs_pending_in_order_and_stops() -> None:
    """QueueDispatcher runs queued callbacks on the consumer thread, in order, until stop()."""
    ui = QueueDispatcher()
    seen: list[int] = []
    for i in range(5):
        ui(seen.append, i)
    assert ui.run_pending(0) == 5
    assert seen == [0, 1, 2, 3, 4]
    assert ui.run_pending(0) == 0
    ui(seen.append, 5)
    ui.stop()
    ui.run_forever(timeout=unit(5))
    assert ui.stopped
    assert seen[-1] == 5


def test_queue_dispatcher_survives_a_raising_callback(caplog: pytest.LogCaptureFixture) -> None:
    """A callback that raises is logged and the following callbacks still run."""
    ui = QueueDispatcher()
    seen: list[str] = []

    def boom() -> None:
        raise ValueError("ui failure")

    ui(boom)
    ui(seen.append, "after")
    with caplog.at_level(logging.ERROR, logger="msgsock.callback"):
        assert ui.run_pending(0) == 2
    assert seen == ["after"]
    assert any("ui failure" in (r.exc_text or "") for r in caplog.records)


def test_reactor_dispatcher_delivers_callbacks_on_the_consumer_thread(host: str) -> None:
    """With Reactor(dispatcher=...), callbacks run on the thread that runs the dispatcher;
    a socket with dispatcher=direct keeps its callbacks on the reactor thread."""
    ui = QueueDispatcher()
    rec = Recorder()

    class Listener(AsyncSocket):
        def on_accept(self) -> None:
            rec.add("accept", threading.current_thread().name)
            self.accept(Conn(self.reactor))

    class Conn(AsyncSocket):
        def on_receive(self) -> None:
            rec.add("receive", threading.current_thread().name, self.receive(100))

    consumer = threading.Thread(target=ui.run_forever, kwargs={"timeout": unit(10)}, name="ui-thread")
    consumer.start()
    try:
        with Reactor(dispatcher=ui, name="disp-reactor") as r:
            listener = Listener(r, dispatcher=direct)
            listener.create(0, address=host)
            listener.listen()
            with socket.create_connection((host, listener.sock_name[1]), timeout=unit(5)) as peer:
                peer.sendall(b"hi")
                rec.wait_count("receive", 1)
        assert rec.events[0] == ("accept", "disp-reactor")
        assert rec.events[1] == ("receive", "ui-thread", b"hi")
    finally:
        ui.stop()
        consumer.join(unit(5))


# -- attach / detach: the MultiSoc pattern --------------------------------------------------------


def test_detach_and_attach_hand_a_connection_to_another_reactor(host: str) -> None:
    """A connection accepted on one reactor, detached and attached on another, is served there."""
    rec = Recorder()

    class Worker(MessageSocket):
        def on_message(self, message: bytes) -> None:
            rec.add("message", threading.current_thread().name)
            self.send_message(message[::-1])  # MultiSoc reverses the message

    with Reactor(name="accept-reactor") as front, Reactor(name="worker-reactor") as back:

        class Listener(AsyncSocket):
            def on_accept(self) -> None:
                conn = self.accept()  # a plain AsyncSocket on this reactor
                assert conn.reactor is front
                raw = conn.detach()
                assert conn.closed
                worker = Worker(back)
                worker.attach(raw)
                rec.add("handed", worker)

        listener = Listener(front)
        listener.create(0, address=host)
        listener.listen()
        with socket.create_connection((host, listener.sock_name[1]), timeout=unit(5)) as peer:
            rec.wait_count("handed", 1)
            peer.sendall(encode(b"stressed"))
            assert recv_frames(peer, 1) == [b"desserts"]
        rec.wait_count("message", 1)
        assert ("message", "worker-reactor") in rec.events
        worker = rec.events[0][1]
        assert worker.reactor is back
        assert not worker.closed


def test_detach_without_a_socket_raises(reactor: Reactor) -> None:
    """detach() on an object that holds no socket is an InvalidState."""
    with pytest.raises(InvalidState):
        AsyncSocket(reactor).detach()
