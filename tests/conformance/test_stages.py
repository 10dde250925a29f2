"""Stages (SPEC §4.2, §7): every failure is logged and counted alike on every server; a health check is no error."""

from __future__ import annotations

import logging
import socket

import pytest

from msgsock.exceptions import ConnectionClosed, EndKind, HandshakeError
from msgsock.framing import DEFAULT_FORMAT
from msgsock.proxy import ProxyInfo, serialize_v1, serialize_v2
from msgsock.stages import Stages
from tests.certs import Pki
from tests.conformance.adapters import AUTH_KEY, WRONG_KEY
from tests.conformance.conftest import ClientFactory, PeerFactory, ServerFactory
from tests.helpers import unit

pytestmark = pytest.mark.timeout(unit(30))

DEBUG, INFO, WARNING = logging.DEBUG, logging.INFO, logging.WARNING


def core_failure(server: Stages, data: bytes) -> tuple[str, str]:
    """The (end kind, reason) the core decides for a server's stages fed ``data``."""
    server.receive_data(data)
    failure = server.failure
    assert failure is not None, "the core accepts these bytes"
    return failure.kind.value, failure.reason


def test_bad_proxy_header(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A connection that does not start with a PROXY header is closed, logged with the core's reason, counted."""
    server = server_factory(proxy_protocol=True)
    peer = peer_factory(server.port)
    garbage = b"GET / HTTP/1.0\r\n\r\n"
    peer.send_raw(garbage)
    data, end = peer.drain_to_end()
    assert (data, end) == (b"", "eof"), "a failed stage closes (it does not reset)"
    kind, reason = core_failure(Stages(server_side=True, proxy_protocol=True), garbage)
    server.log.wait_line(f"{peer.address} closed: {reason}", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {kind: 1} == {"proxy protocol": 1}
    assert stats.errors == 1


def test_plaintext_to_a_tls_port(server_factory: ServerFactory, peer_factory: PeerFactory, pki: Pki) -> None:
    """Plaintext frames sent to a TLS server fail its TLS stage: closed, logged with OpenSSL's words, counted ``tls``."""
    server = server_factory(tls=True)
    peer = peer_factory(server.port)
    plaintext = DEFAULT_FORMAT.encode(b"hello, this is not TLS")
    peer.send_raw(plaintext)
    _, end = peer.drain_to_end()
    assert end == "eof", "a failed stage closes after the alert (it does not reset)"
    kind, reason = core_failure(Stages(server_side=True, ssl_context=pki.server_context()), plaintext)
    assert reason.startswith("TLS handshake failed: ") and "_ssl.c" not in reason
    server.log.wait_line(f"{peer.address} closed: {reason}", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {kind: 1} == {"tls": 1}
    assert stats.errors == 1


def _run_client_stages(sock: socket.socket, stages: Stages) -> str:
    """Drive a client's stages over ``sock`` until they end; return how (``done``, a failure reason, ``eof``)."""
    sock.settimeout(unit(10))
    while True:
        out = stages.data_to_send()
        if out:
            sock.sendall(out)
        if stages.failure is not None:
            return stages.failure.reason
        if stages.done:
            return "done"
        data = sock.recv(1 << 16)
        if not data:
            stages.receive_eof()
            return stages.failure.reason if stages.failure is not None else "eof"
        stages.receive_data(data)


def test_wrong_auth_key(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A client with the wrong key is refused: it learns why, the server logs the core's reason and counts it."""
    server = server_factory(auth_key=AUTH_KEY)
    peer = peer_factory(server.port)
    told = _run_client_stages(peer.sock, Stages(server_side=False, auth_key=WRONG_KEY))
    assert told == "authentication failed: the server rejected our key"
    _, end = peer.drain_to_end()
    assert end == "eof"
    # The same handshake in memory, core to core: what the server side decides.
    client, core_server = (
        Stages(server_side=False, auth_key=WRONG_KEY),
        Stages(server_side=True, auth_key=AUTH_KEY),
    )
    for _ in range(10):
        core_server.receive_data(client.data_to_send())
        if core_server.failure is not None:
            break
        client.receive_data(core_server.data_to_send())
    assert core_server.failure is not None
    server.log.wait_line(f"{peer.address} closed: {core_server.failure.reason}", WARNING)
    stats = server.final_statistics()
    assert stats.error_kinds == {"authentication": 1}
    assert stats.errors == 1


def test_client_with_the_wrong_key(shared_server: ServerFactory, client_factory: ClientFactory) -> None:
    """A client whose key the server refuses fails to connect, saying the core's words, with the AUTHENTICATION kind."""
    server = shared_server(auth_key=AUTH_KEY)
    with pytest.raises((HandshakeError, ConnectionClosed)) as info:
        client_factory(server.port, auth_key=WRONG_KEY)
    exc = info.value
    if isinstance(exc, ConnectionClosed):
        assert exc.kind is EndKind.AUTHENTICATION
        assert exc.clean is False
    assert "authentication failed: the server rejected our key" in str(exc)


@pytest.mark.parametrize("ending", ["reset", "close"])
def test_health_check(server_factory: ServerFactory, peer_factory: PeerFactory, ending: str) -> None:
    """A PROXY v2 LOCAL header then a reset (or a close) is a health check: DEBUG line, counted, no warning, no error."""
    server = server_factory(proxy_protocol=True)
    peer = peer_factory(server.port)
    address = peer.address
    peer.send_raw(serialize_v2(ProxyInfo(2, "LOCAL")))
    if ending == "reset":
        peer.reset()
    else:
        peer.shutdown_write()
        assert peer.drain_to_end() == (b"", "eof")
        peer.close()
    server.log.wait_line(f"{address} health check (PROXY LOCAL)", DEBUG)
    stats = server.final_statistics()
    assert stats.health_checks == 1
    assert stats.errors == 0, stats.error_kinds
    assert stats.error_kinds == {}
    loud = [
        ln for ln in server.log.at_least(WARNING) if address in ln.message or "unknown peer" in ln.message
    ]
    assert not loud, f"a health check must not be logged as a problem: {loud}"


def test_proxy_header_names_the_peer(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """Behind a PROXY v1 header the client it names is the peer of every log line."""
    server = server_factory(proxy_protocol=True)
    peer = peer_factory(server.port)
    info = ProxyInfo(1, "PROXY", "TCP4", ("203.0.113.7", 40000), ("127.0.0.1", server.port))
    peer.send_raw(serialize_v1(info) + DEFAULT_FORMAT.encode(b"proxied"))
    assert peer.receive() == b"proxied"
    peer.shutdown_write()
    assert peer.read_to_end() == ([], "eof")
    server.log.wait_line("connection from 203.0.113.7:40000", INFO)
    server.log.wait_line("203.0.113.7:40000 disconnected (1 messages in, 1 out)", INFO)
    stats = server.final_statistics()
    assert stats.errors == 0, stats.error_kinds
