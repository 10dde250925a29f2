"""Limits (SPEC §7): oversize frames, slowloris, idle and handshake timeouts, max connections, a flooder."""

from __future__ import annotations

import logging
import select
import struct

import pytest

from msgsock.framing import DEFAULT_FORMAT
from msgsock.protocol import Limits, MessageProtocol
from tests.conformance.conftest import PeerFactory, ServerFactory
from tests.helpers import unit

pytestmark = pytest.mark.timeout(unit(30))

WARNING = logging.WARNING
T = unit(0.3)
"""The timeout under test: short, and scaled like every other (STYLE §8)."""


def core_timeout_reason(data: bytes, limits: Limits) -> str:
    """The reason the core words for a connection that received ``data`` and then nothing."""
    proto = MessageProtocol(DEFAULT_FORMAT, limits=limits, server_side=True)
    proto.check_timeouts(0.0)
    proto.receive_data(data)
    now = 0.0
    for _ in range(1000):
        now += 0.05
        end = proto.check_timeouts(now)
        if end is not None:
            return end.reason
    raise AssertionError("the core never timed the connection out")


def test_oversize_frame_closes_only_that_connection(
    server_factory: ServerFactory, peer_factory: PeerFactory
) -> None:
    """A frame above max_size ends its own connection after the replies owed; a concurrent client is unaffected."""
    frame = DEFAULT_FORMAT.with_max_size(1024)
    server = server_factory(frame=frame)
    good = peer_factory(server.port, frame)
    good.send(b"before")
    assert good.receive() == b"before"
    bad = peer_factory(server.port, frame)
    bad.send_raw(frame.encode(b"owed") + struct.pack(">I", 2048))
    replies, end = bad.read_to_end()
    assert replies == [b"owed"], "the reply to the message before the bad header must be flushed first"
    assert end == "eof", "an oversize frame closes (after the flush), it does not reset"
    good.send(b"after")
    assert good.receive() == b"after"
    server.log.wait_line(f"{bad.address} closed: message size 2048 exceeds max_size 1024", WARNING)
    good.shutdown_write()
    assert good.read_to_end() == ([], "eof")
    stats = server.final_statistics()
    assert stats.error_kinds == {"message too large": 1}
    assert stats.errors == 1
    assert (stats.messages_received, stats.messages_sent) == (3, 3)


def test_slowloris_message_timeout(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A frame started and never finished is reset after message_timeout, logged and counted as a message timeout."""
    limits = Limits(message_timeout=T, idle_timeout=None)
    server = server_factory(limits=limits)
    peer = peer_factory(server.port)
    peer.send(b"complete")
    assert peer.receive() == b"complete"
    started = struct.pack(">I", 100) + b"abc"
    peer.send_raw(started)
    replies, end = peer.read_to_end(timeout=unit(10))
    assert (replies, end) == ([], "reset")
    reason = core_timeout_reason(started, limits)
    assert reason.startswith(f"message timeout: a frame was not completed within {T:g} s")
    server.log.wait_line(f"{peer.address} closed: {reason}", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {"message timeout": 1}
    assert stats.errors == 1


def test_idle_timeout(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A connection with no traffic for idle_timeout is reset, logged ``idle timeout: nothing received for T s`` and counted."""
    server = server_factory(limits=Limits(idle_timeout=T, message_timeout=None))
    peer = peer_factory(server.port)
    peer.send(b"one")
    assert peer.receive() == b"one"
    replies, end = peer.read_to_end(timeout=unit(10))
    assert (replies, end) == ([], "reset")
    server.log.wait_line(f"{peer.address} closed: idle timeout: nothing received for {T:g} s", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {"idle timeout": 1}
    assert stats.errors == 1
    assert (stats.messages_received, stats.messages_sent) == (1, 1)


def test_handshake_timeout(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A peer that never sends its PROXY header is reset after handshake_timeout, logged and counted."""
    server = server_factory(limits=Limits(handshake_timeout=T), proxy_protocol=True)
    peer = peer_factory(server.port)
    data, end = peer.drain_to_end(timeout=unit(10))
    assert (data, end) == (b"", "reset")
    server.log.wait_line(f"{peer.address} closed: handshake timeout: no PROXY header within {T:g} s", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {"handshake timeout": 1}
    assert stats.errors == 1


def test_max_connections_rejects_the_next(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """Over max_connections a new connection is reset at once and logged; the open one is served on."""
    server = server_factory(limits=Limits(max_connections=1), needs=("connection_limit",))
    first = peer_factory(server.port)
    first.send(b"in")
    assert first.receive() == b"in"
    second = peer_factory(server.port)
    data, end = second.drain_to_end(timeout=unit(10))
    assert (data, end) == (b"", "reset")
    server.log.wait_line(f"{second.address} rejected: 1 connections open (limit 1)", WARNING)
    first.send(b"still")
    assert first.receive() == b"still"
    first.shutdown_write()
    assert first.read_to_end() == ([], "eof")
    stats = server.final_statistics()
    assert stats.rejected == 1
    assert stats.connections == 1
    assert stats.errors == 0


MiB = 1024 * 1024


@pytest.mark.timeout(unit(40))
def test_non_reading_flooder_keeps_memory_bounded(
    server_factory: ServerFactory, peer_factory: PeerFactory
) -> None:
    """A peer that sends without reading makes the server stop reading from it (bounded memory); others are served."""
    server = server_factory(needs=("live_statistics",))
    flooder = peer_factory(server.port, rcvbuf=64 * 1024)
    chunk = DEFAULT_FORMAT.encode(b"f" * (64 * 1024)) * 16  # 1 MiB of frames
    budget = 128 * MiB
    sock = flooder.sock
    sock.setblocking(False)
    sent = 0
    view = memoryview(chunk)
    offset = 0
    while sent < budget:
        _, writable, _ = select.select([], [sock], [], unit(0.25))
        if not writable:
            break  # the server no longer reads from us: what we want to see
        try:
            n = sock.send(view[offset:])
        except BlockingIOError:
            continue
        sent += n
        offset = (offset + n) % len(chunk)
    stats = server.statistics()
    bound = 16 * MiB  # the water marks, the read buffer and the kernel's socket buffers, with room to spare
    assert stats.bytes_received < bound, (
        f"the server read {stats.bytes_received} bytes from a peer that reads nothing "
        f"(it sent {sent}): it did not stop reading"
    )
    assert sent > stats.bytes_received
    other = peer_factory(server.port)
    other.send(b"unaffected")
    assert other.receive() == b"unaffected"
    assert server.statistics().bytes_received - stats.bytes_received < bound
    flooder.reset()
