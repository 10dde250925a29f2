"""MessageSocket follows the core's lifecycle: flow control and timeouts (SPEC §5.0, §7; issue 10).

- A client never stops reading because of what it queued itself, so 40 x 1 MiB queued
  at once against any echo server all come back (issue 10, defect 1).
- The callback layer's server enforces the idle and message timeouts (defect 5; see
  tests/callback/test_server.py and the conformance suite); a client has none.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from msgsock.callback import MessageServer, Reactor
from msgsock.exceptions import EndKind
from msgsock.protocol import Limits
from tests.callback.test_message_socket import Collector, client_to_plain_peer
from tests.callback.test_reactor import Recorder
from tests.helpers import unit

MiB = 1024 * 1024


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor(name="test-lifecycle-reactor")
    r.start()
    try:
        yield r
    finally:
        r.stop(timeout=unit(5))


@pytest.fixture
def peers() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


# -- echo servers of every layer -------------------------------------------------------------


def threads_echo() -> tuple[int, Callable[[], None]]:
    from msgsock.sync import ThreadedServer

    server = ThreadedServer(lambda m: m, "127.0.0.1", 0)
    server.start()
    return server.port, lambda: server.shutdown(unit(5))


def aio_echo() -> tuple[int, Callable[[], None]]:
    from msgsock import aio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="aio-echo", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(aio.serve(None, "127.0.0.1", 0), loop).result(unit(10))

    def stop() -> None:
        async def close() -> None:
            server.close()
            await server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(unit(10))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(unit(5))
            loop.close()

    return server.port, stop


def callback_echo() -> tuple[int, Callable[[], None]]:
    reactor = Reactor(name="callback-echo").start()
    server = MessageServer(reactor, None, "127.0.0.1", 0)
    server.start()

    def stop() -> None:
        server.close()
        try:
            assert server.wait_closed(unit(10))
        finally:
            reactor.stop(timeout=unit(5))

    return server.port, stop


ECHO_SERVERS = {"threads": threads_echo, "aio": aio_echo, "callback": callback_echo}


@pytest.fixture(params=list(ECHO_SERVERS))
def echo_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """The port of an echo server of each layer (msgsock's own ThreadedServer included)."""
    port, stop = ECHO_SERVERS[request.param]()
    try:
        yield port
    finally:
        stop()


@pytest.mark.timeout(unit(60))
def test_forty_mib_queued_at_once_all_come_back(reactor: Reactor, echo_port: int) -> None:
    """40 x 1 MiB queued with send_message before reading any reply all come back, in order (no deadlock)."""
    rec = Recorder()
    client = Collector(reactor, rec)
    client.create()
    client.connect("127.0.0.1", echo_port)
    bodies = [os.urandom(MiB) for _ in range(40)]
    for body in bodies:
        client.send_message(body)  # far above write_high_water: the client must keep reading meanwhile
    rec.wait_count("message", 40, unit(30))
    got = [e[1] for e in rec.events if e[0] == "message"]
    assert got == bodies
    client.close()
    assert client.wait_closed(unit(10))


# -- timeouts (SPEC §7) ------------------------------------------------------------------------


def test_a_client_has_no_idle_or_message_timeout(reactor: Reactor, peers: list[socket.socket]) -> None:
    """Idle and message timeouts guard a server from its peers (SPEC §7); a client waits as its user asks.

    A client MessageSocket with short timeouts outlives them on a silent peer and on a
    half-sent frame, then still receives the frame when it completes.
    """
    timeout = unit(0.3)
    rec = Recorder()
    limits = Limits(idle_timeout=timeout, message_timeout=timeout)
    client, peer = client_to_plain_peer(reactor, "127.0.0.1", peers, rec, limits=limits)
    peer.sendall(struct.pack(">I", 5) + b"he")
    time.sleep(3 * timeout)  # the silence under test, not a synchronization
    assert rec.count("close") == 0 and client.protocol.end is None
    peer.sendall(b"llo")
    rec.wait_count("message", 1)
    assert rec.count("close") == 0


def test_close_timeout_without_other_timeouts(reactor: Reactor, peers: list[socket.socket]) -> None:
    """With every other timeout off, a graceful close whose peer never closes still ends at close_timeout."""
    limits = Limits(idle_timeout=None, message_timeout=None, close_timeout=unit(0.3))
    client, peer = client_to_plain_peer(reactor, "127.0.0.1", peers, Recorder(), limits=limits)
    client.close()
    assert peer.recv(10) == b""  # our FIN; the peer keeps its side open
    assert client.wait_closed(unit(5))
    assert client.protocol.end is not None and client.protocol.end.kind is EndKind.CLOSE_TIMEOUT


def test_client_keeps_reading_above_the_water_mark(reactor: Reactor, peers: list[socket.socket]) -> None:
    """A client with more than write_high_water queued still delivers what the peer sends (it never pauses itself)."""
    limits = Limits(write_high_water=64 * 1024, write_low_water=16 * 1024)
    rec = Recorder()
    client, peer = client_to_plain_peer(reactor, "127.0.0.1", peers, rec, limits=limits)
    client.send_message(os.urandom(8 * MiB))  # the peer reads none of it
    peer.sendall(struct.pack(">I", 5) + b"hello")
    rec.wait_count("message", 1)
    assert client.outgoing_size > limits.write_high_water
    assert not client.protocol.reading_paused
