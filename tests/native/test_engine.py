"""The native engine over real sockets: echo, reverse, handlers, every limit, shutdown, bad input, many peers.

The conformance suite (tests/conformance, server kind ``native``) states the behaviours
every engine shares; these tests cover what is the native engine's own: the hot path
in C and its hand-over to the core (partial frames, bad headers, counters), both
backends, and the built-in reverse.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from msgsock import native
from msgsock.exceptions import MessageTooLarge, OversizeMessage
from msgsock.framing import FrameFormat, HeaderField, Message
from msgsock.protocol import Limits
from tests.conformance.adapters import RawPeer
from tests.helpers import unit, wait_for
from tests.native.conftest import REASON, StartServer, requires_native

pytestmark = [pytest.mark.timeout(unit(60)), requires_native]

WARNING, ERROR, INFO = logging.WARNING, logging.ERROR, logging.INFO
FIELDS = FrameFormat(
    length_size=2,
    byteorder="little",
    fields_before=(HeaderField("magic", "H"),),
    fields_after=(HeaderField("kind", "B"), HeaderField("flags", "I")),
)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_echo_in_every_split(start_server: StartServer) -> None:
    """Frames split anywhere (byte by byte, many per write, a large one) come back whole, counted."""
    run = start_server()
    peer = RawPeer(run.port)
    bodies = [b"", b"a", b"hello", bytes(range(256)) * 4, os.urandom(300_000)]
    stream = b"".join(frame(b) for b in bodies)
    for i in range(0, 64):  # the first bytes one at a time: a partial header, then a partial body
        peer.send_raw(stream[i : i + 1])
    peer.send_raw(stream[64:])
    assert [peer.receive() for _ in bodies] == bodies
    peer.send_raw(frame(b"x") * 1000)  # pipelined: one read, one write back
    assert [peer.receive() for _ in range(1000)] == [b"x"] * 1000
    peer.shutdown_write()
    assert peer.read_to_end() == ([], "eof")
    peer.close()
    stats = run.stop()
    assert stats.messages_received == stats.messages_sent == len(bodies) + 1000
    assert stats.bytes_received == stats.bytes_sent == len(stream) + 5000
    assert stats.errors == 0
    run.log.wait_line(
        f"{peer.address} disconnected ({len(bodies) + 1000} messages in, {len(bodies) + 1000} out)", INFO
    )


def test_builtin_reverse_keeps_header_fields(start_server: StartServer) -> None:
    """``reverse`` runs natively for every format: each body reversed, its header fields unchanged."""
    run = start_server("reverse", frame=FIELDS)
    peer = RawPeer(run.port, FIELDS)
    peer.send(b"abc", {"magic": 7, "kind": 2, "flags": 99})
    peer.send(b"", {"magic": 1, "kind": 0, "flags": 0})
    got = peer.receive()
    assert (bytes(got), got.header) == (b"cba", {"magic": 7, "kind": 2, "flags": 99})
    assert bytes(peer.receive()) == b""
    peer.close()
    run.stop()


def test_builtin_echo_with_length_counting_the_header(start_server: StartServer) -> None:
    fmt = FrameFormat(length_includes_header=True, max_size=1000)
    run = start_server(frame=fmt)
    peer = RawPeer(run.port, fmt)
    peer.send(b"whole")
    assert peer.receive() == b"whole"
    peer.send_raw(struct.pack(">I", 3))  # shorter than its own header: the core's FrameError
    assert peer.read_to_end() == ([], "eof")
    run.log.wait_line(f"{peer.address} closed: frame length 3 is smaller than the 4-byte header", WARNING)
    assert run.stop().error_kinds == {"frame error": 1}


def test_python_handler_per_message(start_server: StartServer) -> None:
    """A handler gets bytes; bytes, bytearray, memoryview and None are replies, in order."""
    seen: list[Any] = []

    def handler(message: Any) -> Any:
        seen.append(type(message))
        if message == b"none":
            return None
        if message == b"ba":
            return bytearray(b"from bytearray")
        if message == b"mv":
            return memoryview(b"from memoryview")
        return message.upper()

    run = start_server(handler)
    peer = RawPeer(run.port)
    peer.send_raw(frame(b"abc") + frame(b"none") + frame(b"ba") + frame(b"mv") + frame(b"z"))
    assert [peer.receive() for _ in range(4)] == [b"ABC", b"from bytearray", b"from memoryview", b"Z"]
    peer.shutdown_write()
    assert peer.read_to_end() == ([], "eof")
    peer.close()
    stats = run.stop()
    assert set(seen) == {bytes}
    assert (stats.messages_received, stats.messages_sent) == (5, 4)


def test_handler_gets_messages_when_frames_have_fields(start_server: StartServer) -> None:
    """With header fields a handler gets a Message (the core frames those connections), as in every engine."""

    def handler(message: Any) -> Any:
        assert type(message) is Message
        return Message(bytes(message)[::-1], {**message.header, "kind": message.header["kind"] + 1})

    run = start_server(handler, frame=FIELDS)
    peer = RawPeer(run.port, FIELDS)
    peer.send(b"xyz", {"magic": 5, "kind": 1, "flags": 2})
    got = peer.receive()
    assert (bytes(got), got.header) == (b"zyx", {"magic": 5, "kind": 2, "flags": 2})
    peer.close()
    run.stop()


def test_handler_reply_too_large_is_a_handler_error(start_server: StartServer) -> None:
    fmt = FrameFormat(max_size=10)
    run = start_server(lambda m: m * 100, frame=fmt)
    peer = RawPeer(run.port, fmt)
    peer.send(b"ab")
    assert peer.read_to_end()[1] == "reset"
    line = run.log.wait_line(
        f"{peer.address} closed: handler raised OversizeMessage: {OversizeMessage(200, 10)}", ERROR
    )
    assert line.traceback is not None
    assert run.stop().error_kinds == {"handler error": 1}


def test_max_size_is_checked_on_the_header(start_server: StartServer) -> None:
    """A header claiming 4 GiB is refused before anything is buffered; the frames before it are answered."""
    fmt = FrameFormat(max_size=1 << 20)
    run = start_server(frame=fmt)
    peer = RawPeer(run.port, fmt)
    other = RawPeer(run.port, fmt)
    peer.send_raw(frame(b"first") + struct.pack(">I", 0xFFFFFFFF) + b"junk")
    messages, end = peer.read_to_end()
    assert (messages, end) == ([b"first"], "eof")
    run.log.wait_line(f"{peer.address} closed: {MessageTooLarge(0xFFFFFFFF, 1 << 20)}", WARNING)
    other.send(b"unaffected")
    assert other.receive() == b"unaffected"
    other.close()
    stats = run.stop()
    assert stats.error_kinds == {"message too large": 1}
    assert stats.messages_received == 2


def test_incomplete_frame_at_eof(start_server: StartServer) -> None:
    """A stream that ends inside a frame is the core's IncompleteMessage, worded with the bytes held."""
    run = start_server()
    peer = RawPeer(run.port)
    peer.send_raw(frame(b"ok") + struct.pack(">I", 10) + b"abc")
    assert peer.receive() == b"ok"
    peer.shutdown_write()
    assert peer.read_to_end()[1] == "eof"
    wait_for(lambda: any(ln.message.startswith(f"{peer.address} closed: ") for ln in run.log.lines()))
    line = next(ln for ln in run.log.lines() if ln.message.startswith(f"{peer.address} closed: "))
    assert "7 bytes" in line.message and line.level == WARNING, line
    stats = run.stop()
    assert stats.error_kinds == {"incomplete message": 1}
    assert stats.bytes_received == 6 + 7


def test_message_timeout_words_the_bytes_received(start_server: StartServer) -> None:
    t = 0.3
    run = start_server(limits=Limits(message_timeout=t, idle_timeout=None))
    peer = RawPeer(run.port)
    peer.send_raw(struct.pack(">I", 100) + b"12345")
    assert peer.drain_to_end(timeout=unit(10)) == (b"", "reset")
    run.log.wait_line(
        f"{peer.address} closed: message timeout: a frame was not completed within {t:g} s (9 bytes of it received)",
        WARNING,
    )
    assert run.stop().error_kinds == {"message timeout": 1}


def test_idle_timeout_sees_native_traffic(start_server: StartServer) -> None:
    """An active connection outlives the idle timeout (the loop's counters reach the core); an idle one does not."""
    t = 0.4
    run = start_server(limits=Limits(idle_timeout=t, message_timeout=None))
    active = RawPeer(run.port)
    idle = RawPeer(run.port)
    deadline = time.monotonic() + 4 * t
    while time.monotonic() < deadline:
        active.send(b"ping")
        assert active.receive() == b"ping"
        time.sleep(t / 8)  # the pace of the traffic under test, not a synchronisation
    assert idle.drain_to_end(timeout=unit(10)) == (b"", "reset")
    active.send(b"still")
    assert active.receive() == b"still"
    active.close()
    run.log.wait_line(f"{idle.address} closed: idle timeout: nothing received for {t:g} s", WARNING)
    assert run.stop().error_kinds == {"idle timeout": 1}


def test_garbage_never_takes_the_server_down(start_server: StartServer) -> None:
    """Random bytes from many peers end those connections; a good peer is served throughout."""
    run = start_server(frame=FrameFormat(max_size=4096))
    good = RawPeer(run.port)
    rng = random.Random(12)
    for i in range(40):
        bad = RawPeer(run.port)
        try:
            bad.send_raw(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))))
            if i % 3 == 0:
                bad.reset()
        except OSError:
            pass  # the server may have closed already: what we want
        bad.close()
        good.send(b"%d" % i)
        assert good.receive() == b"%d" % i
    good.close()
    stats = run.stop()
    assert stats.connections == 41
    assert stats.active == 0


def test_many_connections(start_server: StartServer) -> None:
    """200 concurrent peers, 20 pipelined messages each, all answered in order."""
    run = start_server()
    peers = [RawPeer(run.port) for _ in range(200)]
    for n, peer in enumerate(peers):
        peer.send_raw(b"".join(frame(b"%d-%d" % (n, i)) for i in range(20)))
    for n, peer in enumerate(peers):
        assert [peer.receive() for _ in range(20)] == [b"%d-%d" % (n, i) for i in range(20)]
        peer.close()
    stats = run.stop()
    assert stats.connections == 200
    assert stats.messages_received == stats.messages_sent == 4000


def test_shutdown_answers_what_was_received(start_server: StartServer) -> None:
    """On close() the frames already received are answered, then our EOF; the peer's EOF ends it cleanly."""
    run = start_server()
    peer = RawPeer(run.port)
    peer.send(b"before")
    assert peer.receive() == b"before"
    stopper = threading.Thread(target=run.stop)
    stopper.start()
    assert peer.read_to_end() == ([], "eof")  # the server half-closed
    peer.close()
    stopper.join(unit(20))
    assert not stopper.is_alive()
    assert run.result.errors == 0
    assert run.result.messages_sent == 1


def test_live_statistics_count_native_traffic(start_server: StartServer) -> None:
    run = start_server()
    peer = RawPeer(run.port)
    for _ in range(10):
        peer.send(b"0123456789")
        assert peer.receive() == b"0123456789"
    stats = run.server.statistics()
    assert (stats.messages_received, stats.bytes_received, stats.active) == (10, 140, 1)
    peer.close()
    run.stop()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown native backend 'kqueue'; choose from epoll, io_uring"):
        native.serve(None, "127.0.0.1", 0, backend="kqueue")


def test_bad_handler_is_refused() -> None:
    with pytest.raises(TypeError, match="handler must be callable"):
        native.serve(b"echo", "127.0.0.1", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'shout'"):
        native.serve("shout", "127.0.0.1", 0)


def test_environment_selects_the_backend() -> None:
    """MSGSOCK_NATIVE_BACKEND=epoll gives epoll; the backend is named."""
    code = "from msgsock import native\nwith native.serve(None, '127.0.0.1', 0) as s: print(s.backend)\n"
    env = {**os.environ, "MSGSOCK_NATIVE_BACKEND": "epoll"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=unit(30)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "epoll"


def test_reason_when_disabled() -> None:
    code = "from msgsock import native; print(native.available(), native.unavailable_reason())"
    env = {**os.environ, "MSGSOCK_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=unit(30)
    )
    assert done.stdout.strip() == "False MSGSOCK_NO_EXTENSIONS=1 disables the compiled extensions", (
        done.stderr
    )
    assert REASON is None


def test_a_stopped_server_is_freed(backend: str) -> None:
    """serve_forever() releases the loop (and the loop's references to the server): no cycle, no leak."""
    import gc
    import weakref

    server = native.serve(None, "127.0.0.1", 0, backend=backend)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    peer = RawPeer(server.port)
    peer.send(b"x")
    assert peer.receive() == b"x"
    peer.close()
    server.close()
    thread.join(unit(20))
    assert not thread.is_alive()
    ref = weakref.ref(server)
    gc.disable()
    try:
        del server
        assert ref() is None, "the stopped server is still referenced (a cycle with its loop?)"
    finally:
        gc.enable()
