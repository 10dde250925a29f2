"""Echo: every client gets back exactly what it sent, from every server (SPEC §4.1, §5, §6.3)."""

from __future__ import annotations

import logging

import pytest

from msgsock.framing import FrameFormat, Message
from tests.conformance.adapters import AUTH_KEY, payload, run_stress
from tests.conformance.conftest import ClientFactory, ServerFactory
from tests.helpers import unit

pytestmark = pytest.mark.timeout(unit(30))

SIZES = [0, 1, 64 * 1024, 8 * 1024 * 1024]
SIZE_IDS = ["0B", "1B", "64KiB", "8MiB"]

HEADER_FRAME = FrameFormat.parse("u32be+kind:B+flags:H")


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_echo(shared_server: ServerFactory, client_factory: ClientFactory, size: int) -> None:
    """A message of 0 B, 1 B, 64 KiB or 8 MiB comes back byte for byte, and the connection goes on."""
    server = shared_server()
    client = client_factory(server.port)
    body = payload(size)
    client.send(body)
    reply = client.receive(unit(20))
    assert len(reply) == size
    assert reply == body
    client.send(b"after")
    assert client.receive(unit(5)) == b"after"
    client.close()


def test_header_fields(shared_server: ServerFactory, client_factory: ClientFactory) -> None:
    """With frame ``u32be+kind:B+flags:H`` the echo carries the header fields back, values at their limits included."""
    server = shared_server(frame=HEADER_FRAME)
    client = client_factory(server.port, frame=HEADER_FRAME)
    cases = [
        ({"kind": 7, "flags": 0x1234}, b"fields"),
        ({"kind": 255, "flags": 0xFFFF}, b""),
        ({"kind": 0, "flags": 0}, b"x"),
    ]
    for header, body in cases:
        client.send(body, header)
    for header, body in cases:
        reply = client.receive(unit(5))
        assert isinstance(reply, Message)
        assert bytes(reply) == body
        assert reply.header == header
    client.close()


def test_echo_over_tls_and_authentication(
    shared_server: ServerFactory, client_factory: ClientFactory
) -> None:
    """Through TLS and the shared-key handshake (SPEC §4.2, §7) the echo and the graceful close are as in the clear."""
    server = shared_server(tls=True, auth_key=AUTH_KEY)
    client = client_factory(server.port, tls=True, auth_key=AUTH_KEY)
    for size in (0, 1, 100_000):
        body = payload(size, seed=size)
        client.send(body)
        assert client.receive(unit(10)) == body
    address = client.local_address
    client.close()
    # A clean end, not a reset after the client's close timeout ran out.
    server.log.wait_line(f"{address} disconnected (3 messages in, 3 out)", logging.INFO)


STRESS_RUNS = {
    # size: (messages, connections, depth)
    0: (200, 2, 4),
    1: (200, 2, 4),
    64 * 1024: (40, 2, 2),
    8 * 1024 * 1024: (3, 1, 1),
}


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_stress_verifies_every_echo(shared_server: ServerFactory, size: int) -> None:
    """``msgsock stress`` verifies every echo byte for byte and reports no error of any kind."""
    server = shared_server()
    messages, connections, depth = STRESS_RUNS[size]
    code, report, err = run_stress(
        server.port, "--size", str(size), "-n", str(messages), "-c", str(connections), "-d", str(depth)
    )
    assert report["errors"] == dict.fromkeys(report["errors"], 0), (
        report["errors"],
        report["error_examples"],
    )
    assert report["messages"]["verified"] == messages, report["messages"]
    assert code == 0, err
    assert report["ok"] is True


def test_stress_verifies_header_fields(shared_server: ServerFactory) -> None:
    """``msgsock stress --frame u32be+kind:B+flags:H`` gets every field back from every server."""
    server = shared_server(frame=HEADER_FRAME)
    code, report, err = run_stress(
        server.port, "--frame", str(HEADER_FRAME), "-n", "200", "-c", "2", "-d", "4"
    )
    assert report["errors"] == dict.fromkeys(report["errors"], 0), (
        report["errors"],
        report["error_examples"],
    )
    assert report["messages"]["verified"] == 200
    assert code == 0, err


def test_stress_over_tls_and_authentication(
    shared_server: ServerFactory, pki: object, tmp_path: object
) -> None:
    """``msgsock stress --tls-ca ... --auth-key-file ...`` passes the stages of every server and verifies every echo."""
    from pathlib import Path

    server = shared_server(tls=True, auth_key=AUTH_KEY)
    key_file = Path(str(tmp_path)) / "stress.key"
    key_file.write_bytes(AUTH_KEY + b"\n")
    code, report, err = run_stress(
        server.port,
        "--tls-ca",
        str(pki.ca_cert),  # type: ignore[attr-defined]
        "--auth-key-file",
        str(key_file),
        "-n",
        "200",
        "-c",
        "2",
        "-d",
        "4",
    )
    assert report["errors"] == dict.fromkeys(report["errors"], 0), (
        report["errors"],
        report["error_examples"],
    )
    assert report["messages"]["verified"] == 200
    assert code == 0, err
