"""Client flow control (SPEC §5.0, issue 10 defect 1): a client never stops reading because of what it queued itself."""

from __future__ import annotations

import threading

import pytest

from msgsock.exceptions import ConnectionClosed
from tests.conformance.adapters import CLIENT_QUEUES_WITHOUT_WAITING
from tests.conformance.conftest import ClientFactory, ServerFactory
from tests.helpers import unit

pytestmark = pytest.mark.timeout(unit(40))

MiB = 1024 * 1024
COUNT = 40


def messages() -> list[bytes]:
    """40 distinct messages of 1 MiB each: far above every write high-water mark."""
    return [bytes([i]) * MiB for i in range(COUNT)]


def check_all_back(got: list[bytes], sent: list[bytes]) -> None:
    assert len(got) == len(sent), f"{len(got)} of {len(sent)} echoes came back"
    for i, (a, b) in enumerate(zip(got, sent, strict=True)):
        assert a == b, f"echo {i} differs (len {len(a)}, first byte {a[:1]!r})"


def receive_all(client: object, count: int) -> list[bytes]:
    got: list[bytes] = []
    try:
        for _ in range(count):
            got.append(client.receive(unit(20)))  # type: ignore[attr-defined]
    except (TimeoutError, ConnectionClosed) as exc:
        raise AssertionError(f"only {len(got)} of {count} echoes came back: {exc!r}") from None
    return got


def test_sending_while_receiving_40_mib(shared_server: ServerFactory, client_factory: ClientFactory) -> None:
    """One thread sends 40 x 1 MiB while another receives: all 40 echoes come back (no deadlock)."""
    server = shared_server()
    client = client_factory(server.port)
    sent = messages()
    failure: list[BaseException] = []

    def send() -> None:
        try:
            for message in sent:
                client.send(message)
        except BaseException as exc:
            failure.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = receive_all(client, COUNT)
    sender.join(unit(20))
    assert not sender.is_alive()
    assert not failure, f"send failed: {failure[0]!r}"
    check_all_back(got, sent)
    client.close()


def test_queued_burst_all_echoes_return(
    client_kind: str, shared_server: ServerFactory, client_factory: ClientFactory
) -> None:
    """40 x 1 MiB queued at once, before reading anything (defect 1): all 40 echoes still come back."""
    if not CLIENT_QUEUES_WITHOUT_WAITING[client_kind]:
        pytest.skip(f"the {client_kind} client's send waits for the socket (see the concurrent test)")
    server = shared_server()
    client = client_factory(server.port)
    sent = messages()
    client.queue_all(sent)
    check_all_back(receive_all(client, COUNT), sent)
    client.close()
