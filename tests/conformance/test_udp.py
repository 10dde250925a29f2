"""Datagram servers (SPEC §5.0, §5.4; issue 10 defect 7): a handler's bad reply is counted and logged, and serving goes on."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock.protocol import check_reply
from tests.conformance.adapters import LogCapture, LoopThread, captured_logger
from tests.helpers import unit, wait_for

pytestmark = pytest.mark.timeout(unit(30))

ERROR = logging.ERROR


def faulty(fault: str) -> Callable[[Any], Any]:
    """Echo, except for ``bad``: raise ``ValueError: boom`` or return a str."""

    def handler(message: Any) -> Any:
        if message == b"bad":
            if fault == "raises":
                raise ValueError("boom")
            return "not bytes"
        return message

    return handler


class UdpAdapter:
    """A running datagram server: port, captured log, statistics, stop."""

    def __init__(self, kind: str, handler: Callable[[Any], Any]) -> None:
        self.kind = kind
        self.log = LogCapture()
        logger = captured_logger(self.log)
        from msgsock import udp

        if kind == "threads":
            self.server: Any = udp.UdpServer(handler, "127.0.0.1", 0, logger=logger)
            self.server.start()
            self.loop: LoopThread | None = None
        else:
            self.loop = LoopThread("udp-server")

            async def serve() -> Any:
                return await udp.serve_udp(handler, "127.0.0.1", 0, logger=logger)

            self.server = self.loop.run(serve())
        self.port = int(self.server.port)

    def statistics(self) -> Any:
        if self.loop is not None:
            return self.loop.call(self.server.statistics)
        return self.server.statistics()

    def stop(self) -> None:
        if self.loop is None:
            self.server.shutdown()
            return

        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        try:
            self.loop.run(close())
        finally:
            self.loop.close()


@pytest.fixture(params=["threads", "asyncio"])
def udp_kind(request: pytest.FixtureRequest) -> str:
    """The datagram server under test: ``UdpServer`` (a thread) or ``serve_udp`` (asyncio)."""
    return str(request.param)


@pytest.fixture
def udp_client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(unit(5))
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("fault", ["raises", "str"])
def test_bad_reply_keeps_the_server_serving(udp_kind: str, udp_client: socket.socket, fault: str) -> None:
    """After a handler that raises or returns a str, the server answers the next datagram; the fault is an ERROR, counted."""
    server = UdpAdapter(udp_kind, faulty(fault))
    try:
        address = ("127.0.0.1", server.port)
        udp_client.connect(address)
        udp_client.send(b"bad")
        udp_client.send(b"good")
        try:
            reply = udp_client.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server stopped answering; it logged:\n{server.log.dump()}") from None
        assert reply == b"good"
        udp_client.send(b"again")
        assert udp_client.recv(65536) == b"again"
        if fault == "raises":
            words = "handler raised ValueError: boom"
        else:
            try:
                check_reply("not bytes")
            except TypeError as exc:
                words = str(exc)
        errors = [ln for ln in server.log.lines() if words in ln.message]
        assert errors, f"no log line with {words!r}:\n{server.log.dump()}"
        assert errors[0].level == ERROR
        assert f"127.0.0.1:{udp_client.getsockname()[1]}" in errors[0].message, "logged without the peer"
        if fault == "raises":
            assert errors[0].traceback is not None, "a handler's exception is logged with its traceback"
        assert not [ln for ln in server.log.lines() if ln.level >= logging.CRITICAL]
        # The reply can reach us before the server thread has counted it sent.
        wait_for(lambda: server.statistics().messages_sent == 2, unit(5))
        stats = server.statistics()
        assert stats.error_kinds == {"handler error": 1}
        assert stats.errors == 1
        assert (stats.messages_received, stats.messages_sent) == (3, 2)
    finally:
        server.stop()


@pytest.mark.parametrize("fault", ["raises", "str"])
def test_a_flood_of_bad_replies_is_a_few_lines_and_a_summary(
    udp_kind: str, udp_client: socket.socket, fault: str
) -> None:
    """100 datagrams the handler gets wrong: 5 error lines in full, then one summary counting the other 95 (issue 11)."""
    server = UdpAdapter(udp_kind, faulty(fault))
    try:
        udp_client.connect(("127.0.0.1", server.port))
        for _ in range(4):  # in batches, so that the kernel's buffer never overflows
            for _ in range(25):
                udp_client.send(b"bad")
            udp_client.send(b"good")
            assert udp_client.recv(65536) == b"good"  # handled in order: every bad one was handled before
        wait_for(lambda: server.statistics().errors == 100, unit(5))
        assert server.statistics().error_kinds == {"handler error": 100}
    finally:
        server.stop()  # flushes the summary
    errors = [ln for ln in server.log.lines() if ln.level >= ERROR]
    peer = f"127.0.0.1:{udp_client.getsockname()[1]}"
    assert len(errors) == 6, server.log.dump()
    assert all(ln.message.startswith(f"{peer}: ") for ln in errors[:5])
    assert errors[5].message.startswith(f"... and 95 more handler errors from {peer} in the last "), (
        server.log.dump()
    )
