"""Closing (SPEC §5.0, §6.1): graceful from either side, reset, half-close, and the shutdown drain's exact counts."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from msgsock.exceptions import ConnectionClosed, EndKind
from msgsock.framing import DEFAULT_FORMAT, FrameDecoder
from msgsock.protocol import format_address
from tests.conformance.adapters import LINGER_RESET
from tests.conformance.conftest import ClientFactory, PeerFactory, ServerFactory
from tests.helpers import unit, wait_for

pytestmark = pytest.mark.timeout(unit(30))

INFO, WARNING = logging.INFO, logging.WARNING


def test_graceful_close_from_the_client(server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """A client's close() is a clean end: ``PEER disconnected (3 messages in, 3 out)``, no error."""
    server = server_factory()
    client = client_factory(server.port)
    for i in range(3):
        client.send(b"m%d" % i)
        assert client.receive(unit(5)) == b"m%d" % i
    address = client.local_address
    client.close()
    server.log.wait_line(f"{address} disconnected (3 messages in, 3 out)", INFO)
    stats = server.final_statistics()
    assert stats.errors == 0, stats.error_kinds
    assert (stats.messages_received, stats.messages_sent, stats.messages_discarded) == (3, 3, 0)


def test_shutdown_from_the_server(server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """When the server stops, a client gets every reply, then ConnectionClosed(clean=True); logged as a clean end."""
    server = server_factory()
    client = client_factory(server.port)
    for i in range(5):
        client.send(b"r%d" % i)
    assert [client.receive(unit(5)) for _ in range(5)] == [b"r%d" % i for i in range(5)]
    address = client.local_address
    server.begin_stop()
    with pytest.raises(ConnectionClosed) as info:
        client.receive(unit(10))
    assert info.value.clean is True, f"a server's shutdown is a clean end; the client saw {info.value!r}"
    assert info.value.kind is EndKind.CLEAN
    client.close()
    server.wait_stopped()
    server.log.wait_line(f"{address} disconnected (5 messages in, 5 out)", INFO)
    stats = server.statistics()
    assert stats.errors == 0, stats.error_kinds
    assert (stats.messages_received, stats.messages_sent) == (5, 5)


def test_peer_reset(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A peer that resets is logged ``PEER closed: connection reset by peer`` and counted as a reset."""
    server = server_factory()
    peer = peer_factory(server.port)
    peer.send(b"x")
    assert peer.receive() == b"x"
    peer.reset()
    server.log.wait_line(f"{peer.address} closed: connection reset by peer", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {"reset": 1}
    assert stats.errors == 1


def test_half_close(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """After the peer's EOF (shutdown SHUT_WR) it still gets every reply, then the server's EOF; a clean end."""
    server = server_factory()
    peer = peer_factory(server.port)
    bodies = [b"h%d" % i for i in range(5)]
    peer.send_raw(b"".join(DEFAULT_FORMAT.encode(b) for b in bodies))
    peer.shutdown_write()
    assert peer.read_to_end() == (bodies, "eof")
    server.log.wait_line(f"{peer.address} disconnected (5 messages in, 5 out)", INFO)
    stats = server.final_statistics()
    assert stats.errors == 0, stats.error_kinds
    assert (stats.messages_received, stats.messages_sent, stats.messages_discarded) == (5, 5, 0)


@pytest.mark.timeout(unit(40))
def test_shutdown_drain_exact_counts(server_factory: ServerFactory) -> None:
    """A shutdown under load answers every message it counted as in; what it reads after its EOF is discarded."""
    server = server_factory()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=unit(10))
    try:
        address = format_address(sock.getsockname())
        frame = DEFAULT_FORMAT.encode(b"d" * 32)
        replies = 0
        server_eof = threading.Event()
        failure: list[BaseException] = []

        def read() -> None:
            nonlocal replies
            decoder = FrameDecoder(DEFAULT_FORMAT)
            try:
                while True:
                    data = sock.recv(1 << 16)
                    if not data:
                        break
                    replies += len(decoder.feed(data))
            except BaseException as exc:
                failure.append(exc)
            finally:
                server_eof.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0
        stopping = False
        while not server_eof.is_set():
            sock.sendall(frame * 10)
            sent += 10
            if not stopping and replies >= 200:
                server.begin_stop()
                stopping = True
            assert sent < 2_000_000, "the server never sent its EOF"
        assert not failure, f"the reader failed: {failure[0]!r} (the drain must end with an EOF, not a reset)"
        assert stopping
        # After the server's EOF: read only to see ours, never handled, counted as discarded.
        sock.sendall(frame * 3)
        sent += 3
        sock.shutdown(socket.SHUT_WR)
        reader.join(unit(10))
        server.wait_stopped()
    finally:
        sock.close()
    stats = server.statistics()
    assert stats.errors == 0, stats.error_kinds
    assert stats.messages_received == stats.messages_sent == replies, (
        f"in {stats.messages_received}, out {stats.messages_sent}, replies received {replies}"
    )
    assert stats.messages_received + stats.messages_discarded == sent
    assert stats.messages_discarded >= 3
    n, k = stats.messages_received, stats.messages_discarded
    server.log.wait_line(f"{address} disconnected ({n} messages in, {n} out, {k} discarded)", INFO)


def test_early_resets_are_logged_with_the_peer(server_factory: ServerFactory) -> None:
    """Peers that reset right after connecting are each logged with their address (never ``unknown peer``) and counted."""
    server = server_factory()
    addresses = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=unit(10))
        addresses.append(format_address(s.getsockname()))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        s.close()

    def all_logged() -> bool:
        messages = {ln.message for ln in server.log.lines()}
        return all(f"{a} closed: connection reset by peer" in messages for a in addresses)

    try:
        wait_for(all_logged, unit(5))
    except AssertionError:
        raise AssertionError(f"not every reset was logged with its peer:\n{server.log.dump()}") from None
    unknown = [ln for ln in server.log.lines() if "unknown peer" in ln.message]
    assert not unknown, f"logged without the peer's address: {unknown}"
    stats = server.final_statistics()
    assert stats.connections == 10
    assert stats.error_kinds == {"reset": 10}
