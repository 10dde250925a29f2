"""Interop with a real Twisted ``Int32StringReceiver`` peer, both ways (SPEC §4.1, §9).

msgsock's default frame (4-byte unsigned big-endian length, then the body) must be
byte-identical to Twisted's ``Int32StringReceiver``.  Twisted runs in a subprocess
(a small script), so its reactor never mixes with the event loop under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgsock import aio
from tests.helpers import free_loopback6, unit

pytest.importorskip("twisted")

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

# Sizes exchanged: empty, tiny, around Twisted's default MAX_LENGTH (99,999), 100 KiB, 1 MiB.
SIZES = [0, 1, 5, 255, 256, 1000, 65535, 99_999, 100_000, 100 * 1024, 0, 7, 1 << 20]


def body(index: int, size: int) -> bytes:
    """Message ``index`` of ``size`` bytes: a pattern that differs per message (same rule in the scripts)."""
    start = (index * 37) % 256
    return (bytes(range(256)) * (size // 256 + 2))[start : start + size]


BODIES = [body(i, size) for i, size in enumerate(SIZES)]

_BODY_SOURCE = """
def body(index, size):
    start = (index * 37) % 256
    return (bytes(range(256)) * (size // 256 + 2))[start : start + size]
"""

TWISTED_SERVER = textwrap.dedent(
    """
    import sys
    from twisted.internet import protocol, reactor
    from twisted.protocols.basic import Int32StringReceiver

    class Echo(Int32StringReceiver):
        MAX_LENGTH = 16 * 1024 * 1024  # Twisted's default is 99,999

        def stringReceived(self, data):
            self.sendString(data)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface=sys.argv[1])
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)

TWISTED_CLIENT = (
    textwrap.dedent(
        """
    import sys
    from twisted.internet import protocol, reactor
    from twisted.protocols.basic import Int32StringReceiver
    """
    )
    + _BODY_SOURCE
    + textwrap.dedent(
        """
    host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sizes = [int(s) for s in sys.argv[4].split(",")]
    bodies = [body(i, s) for i, s in enumerate(sizes)]
    result = {"status": 1, "why": "no connection"}

    class Client(Int32StringReceiver):
        MAX_LENGTH = 16 * 1024 * 1024

        def connectionMade(self):
            self.got = []
            for b in bodies:
                self.sendString(b)

        def stringReceived(self, data):
            self.got.append(data)
            if len(self.got) == len(bodies):
                self.transport.loseConnection()

        def connectionLost(self, reason):
            if self.got == bodies:
                result.update(status=0, why="all %d echoes verified" % len(bodies))
            else:
                bad = [i for i, (a, b) in enumerate(zip(self.got, bodies)) if a != b]
                result.update(why="got %d of %d echoes; mismatched: %s" % (len(self.got), len(bodies), bad))
            if reactor.running:
                reactor.stop()

    class Factory(protocol.ClientFactory):
        protocol = Client

        def clientConnectionFailed(self, connector, reason):
            result.update(why=str(reason))
            reactor.stop()

    def give_up():
        result.update(why="timed out")
        reactor.stop()

    reactor.connectTCP(host, port, Factory())
    reactor.callLater(timeout, give_up)
    reactor.run()
    print(result["why"], flush=True)
    sys.exit(result["status"])
    """
    )
)


def _hosts() -> list[str]:
    return ["127.0.0.1", "::1"]


@pytest.fixture(params=_hosts())
def twisted_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Twisted Int32StringReceiver echo server in a subprocess; yields (host, port)."""
    host: str = request.param
    if host == "::1" and not free_loopback6():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")
    script = tmp_path / "twisted_server.py"
    script.write_text(TWISTED_SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), host],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(unit(30)):
                raise AssertionError("the Twisted server did not start in time")
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            _, err = proc.communicate(timeout=unit(10))
            raise AssertionError(f"the Twisted server failed to start: {line!r} {err}")
        yield host, int(line)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=unit(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()


def test_aio_client_with_twisted_server(twisted_server: tuple[str, int]) -> None:
    """msgsock.aio messages (0 B to 1 MiB) are echoed by a Twisted Int32StringReceiver unchanged."""
    host, port = twisted_server

    async def main() -> None:
        conn = await aio.connect(host, port)
        try:
            for b in BODIES:  # one at a time
                await conn.send(b)
                assert await conn.receive() == b
            for b in BODIES:  # pipelined: all frames back to back
                conn.send_nowait(b)
            for b in BODIES:
                assert await conn.receive() == b
        finally:
            await conn.close()

    with asyncio.Runner() as runner:
        runner.run(asyncio.wait_for(main(), unit(30)))


def test_sync_client_with_twisted_server(twisted_server: tuple[str, int]) -> None:
    """msgsock.sync messages (0 B to 1 MiB) are echoed by a Twisted Int32StringReceiver unchanged."""
    sync = pytest.importorskip("msgsock.sync")
    host, port = twisted_server
    with sync.connect(host, port) as conn:
        for b in BODIES:
            conn.send(b)
            assert conn.receive(timeout=unit(30)) == b
        for b in BODIES:
            conn.send(b)
        for b in BODIES:
            assert conn.receive(timeout=unit(30)) == b


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_twisted_client_with_aio_server(loop: str, tmp_path: Path) -> None:
    """A Twisted Int32StringReceiver client's messages reach a msgsock.aio server intact and its echoes verify."""
    script = tmp_path / "twisted_client.py"
    script.write_text(TWISTED_CLIENT)
    received: list[bytes] = []

    def record(message: bytes) -> bytes:
        received.append(message)
        return message

    async def main() -> None:
        async with await aio.serve(record, port=0) as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                "127.0.0.1",
                str(server.port),
                str(unit(20)),
                ",".join(map(str, SIZES)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=ENV,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), unit(40))
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, (out, err)
            assert out.decode().strip() == f"all {len(SIZES)} echoes verified"
            assert received == BODIES  # Twisted's frames decoded by msgsock, byte for byte
            stats = server.statistics()
            assert stats.messages_received == stats.messages_sent == len(SIZES)
            assert stats.bytes_received == sum(SIZES) + 4 * len(SIZES)

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(main(), unit(50)))
