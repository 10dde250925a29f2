"""Handlers (SPEC §5.0): one that raises or returns a wrong type resets its connection and is logged with its traceback."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from msgsock.exceptions import ConnectionClosed, EndKind
from msgsock.protocol import check_reply
from tests.conformance.adapters import SERVERS
from tests.conformance.conftest import ClientFactory, PeerFactory, ServerFactory
from tests.helpers import unit

pytestmark = pytest.mark.timeout(unit(30))

ERROR = logging.ERROR


def boom(message: Any) -> Any:
    """Echo, except ``boom``, which raises ``ValueError: boom``."""
    if message == b"boom":
        raise ValueError("boom")
    return message


def wrong_type(message: Any) -> Any:
    """Echo, except ``str``, which returns a str."""
    if message == b"str":
        return "not bytes"
    return message


async def async_reverse(message: Any) -> Any:
    """Reverse, after giving the loop a turn (a real coroutine)."""
    await asyncio.sleep(0)
    return bytes(message)[::-1]


async def async_boom(message: Any) -> Any:
    """An async handler that raises ``ValueError: boom`` for ``boom``."""
    await asyncio.sleep(0)
    if message == b"boom":
        raise ValueError("boom")
    return message


def test_handler_raises(server_factory: ServerFactory, client_factory: ClientFactory) -> None:
    """A raising handler resets the connection: ConnectionClosed(clean=False); ERROR log with traceback; ``handler error``."""
    server = server_factory(boom)
    client = client_factory(server.port)
    client.send(b"ok")
    assert client.receive(unit(5)) == b"ok"
    client.send(b"boom")
    with pytest.raises(ConnectionClosed) as info:
        client.receive(unit(10))
    assert info.value.clean is False, f"a handler error must reset, the client saw {info.value!r}"
    assert info.value.kind is EndKind.RESET
    line = server.log.wait_line(f"{client.local_address} closed: handler raised ValueError: boom", ERROR)
    assert line.traceback is not None and "ValueError: boom" in line.traceback, "logged without its traceback"
    stats = server.final_statistics()
    assert stats.error_kinds == {"handler error": 1}
    assert stats.errors == 1


def core_reply_reason(reply: object) -> str:
    """The reason the core words for a handler that returned ``reply``."""
    try:
        check_reply(reply)
    except TypeError as exc:
        return str(exc)
    raise AssertionError(f"the core accepts {reply!r} as a reply")


def test_handler_returns_str(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A handler returning str is a handler error like a raise: reset, ERROR ``handler returned str``, counted."""
    server = server_factory(wrong_type, needs=("reply_check",))
    peer = peer_factory(server.port)
    peer.send(b"ok")
    assert peer.receive() == b"ok"
    peer.send(b"str")
    replies, end = peer.read_to_end()
    assert (replies, end) == ([], "reset")
    reason = core_reply_reason("not bytes")
    assert reason.startswith("handler returned str")
    line = server.log.wait_line(f"{peer.address} closed: {reason}", ERROR)
    assert line.traceback is not None, "logged without its traceback"
    stats = server.final_statistics()
    assert stats.error_kinds == {"handler error": 1}
    assert stats.errors == 1


def test_async_handler(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """On the asyncio server a coroutine handler's replies come back in order, pipelined."""
    server = server_factory(async_reverse, needs=("async_handler",))
    peer = peer_factory(server.port)
    bodies = [b"abc", b"defg", b"", b"h" * 70_000]
    for body in bodies:
        peer.send(body)
    for body in bodies:
        assert peer.receive() == body[::-1]
    peer.shutdown_write()
    assert peer.read_to_end() == ([], "eof")
    stats = server.final_statistics()
    assert stats.errors == 0
    assert (stats.messages_received, stats.messages_sent) == (4, 4)


def test_async_handler_raises(server_factory: ServerFactory, peer_factory: PeerFactory) -> None:
    """A coroutine handler that raises is the same handler error: reset, ERROR with traceback, counted."""
    server = server_factory(async_boom, needs=("async_handler",))
    peer = peer_factory(server.port)
    peer.send(b"ok")
    assert peer.receive() == b"ok"
    peer.send(b"boom")
    assert peer.read_to_end() == ([], "reset")
    line = server.log.wait_line(f"{peer.address} closed: handler raised ValueError: boom", ERROR)
    assert line.traceback is not None
    stats = server.final_statistics()
    assert stats.error_kinds == {"handler error": 1}


def test_async_handler_without_an_event_loop(
    server_kind: str, server_factory: ServerFactory, peer_factory: PeerFactory
) -> None:
    """A server that cannot await rejects a coroutine handler's reply as a wrong type (handler error)."""
    if "async_handler" in SERVERS[server_kind].capabilities:
        pytest.skip(f"the {server_kind} server awaits coroutine handlers")
    server = server_factory(async_reverse, needs=("reply_check",))
    peer = peer_factory(server.port)
    peer.send(b"abc")
    assert peer.read_to_end() == ([], "reset")
    reason = core_reply_reason(async_reverse(b""))
    assert reason.startswith("handler returned coroutine")
    line = server.log.wait_line(f"{peer.address} closed: {reason}", ERROR)
    assert line.traceback is not None
    stats = server.final_statistics()
    assert stats.error_kinds == {"handler error": 1}
