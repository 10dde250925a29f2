"""Atheris harness for the server side of the connection stages (msgsock.stages; SPEC §3, §7).

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_stages.py -max_total_time=60 fuzz/corpus/stages
    .venv/bin/python fuzz/fuzz_stages.py --smoke 2000      # no atheris: random inputs, a quick check

A stranger's bytes go to a server's :class:`~msgsock.stages.Stages` (PROXY header,
TLS, shared-key authentication, in any combination), alone or inside a
:class:`~msgsock.protocol.MessageProtocol`, as a pump feeds it.

Input: the byte stream, then two control bytes: the first picks the stages, whether
they run alone or in a MessageProtocol (``receive_data`` or ``receive_echo``), and a
prefix that steers past the first stage (a PROXY header, a real ClientHello, an
authentication hello); the second picks how the stream is cut into reads.

Checks, for any input:

- nothing raises: bad bytes become ``Stages.failure`` / ``MessageProtocol.end``;
- no application byte comes out before every stage has passed, nor after a failure;
- a stranger never passes TLS or the authentication handshake (no key, no certificate);
- the outcome (passed, failed in which stage with which kind, the application
  bytes) is the same whether the bytes arrive whole or split;
- with a PROXY header only, the header plus the application bytes are every byte;
- the peer's EOF in a running stage fails it as a close by the peer; a failure's
  reason is non-empty and carries no ``(_ssl.c:NNN)``;
- through MessageProtocol: after the peer's EOF the connection is ending, and after
  ``connection_lost`` it has an end whose ``ConnectionClosed`` has the same kind.
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import split_pattern, tail_controls

try:
    import atheris
except ImportError:  # --smoke runs without it
    atheris = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.certs (the test PKI; needs cryptography)

with atheris.instrument_imports() if atheris is not None else contextlib.nullcontext():
    from msgsock.auth import MAGIC
    from msgsock.exceptions import ConnectionClosed, EndKind
    from msgsock.framing import FrameFormat, encode
    from msgsock.protocol import Limits, MessageProtocol, State
    from msgsock.proxy import ProxyHeaderParser, ProxyInfo, serialize
    from msgsock.stages import Stage, Stages

from tests.certs import make_pki  # noqa: E402

KEY = b"fuzzing-key-0123456789"
NONCE = bytes(range(32))
PKI = make_pki(tempfile.mkdtemp(prefix="msgsock-fuzz-pki-"))
SERVER_CONTEXT = PKI.server_context()
FORMAT = FrameFormat(max_size=4096)
LIMITS = Limits(write_high_water=1 << 30, write_low_water=0)


def _client_hello() -> bytes:
    client = Stages(server_side=False, ssl_context=PKI.client_context(), server_hostname="localhost")
    return client.data_to_send()


V1 = serialize(ProxyInfo(1, "PROXY", "TCP4", ("192.0.2.1", 1234), ("192.0.2.2", 9898)))
V2 = serialize(ProxyInfo(2, "PROXY", "TCP6", ("2001:db8::1", 1), ("2001:db8::2", 2)))
LOCAL = serialize(ProxyInfo(2, "LOCAL"))
HELLO = _client_hello()
AUTH_HELLO = MAGIC + bytes(range(64, 96))
PREFIXES = [b"", V1, LOCAL, V2, HELLO, AUTH_HELLO, V1 + HELLO, LOCAL + AUTH_HELLO]
KIND_OF_STAGE = {
    Stage.PROXY: EndKind.PROXY_PROTOCOL,
    Stage.TLS: EndKind.TLS,
    Stage.AUTH: EndKind.AUTHENTICATION,
    Stage.DONE: EndKind.TLS,
}


def make_stages(config: int) -> Stages:
    proxy, tls, auth = bool(config & 1), bool(config & 2), bool(config & 4)
    if not (proxy or tls or auth):
        proxy = True  # no stage at all is a pass-through, tested elsewhere
    return Stages(
        server_side=True,
        proxy_protocol=proxy,
        ssl_context=SERVER_CONTEXT if tls else None,
        auth_key=KEY if auth else None,
        nonce=NONCE if auth else None,
    )


def check_failure(stages: Stages) -> None:
    failure = stages.failure
    if failure is None:
        return
    assert failure.kind is KIND_OF_STAGE[failure.stage], failure
    assert failure.reason and "_ssl.c" not in failure.reason, failure
    assert not stages.done


def run_stages(config: int, chunks: list[bytes]) -> tuple[bool, Any, Any, bytes]:
    """Feed the chunks to a server's Stages; return (passed, failed stage, kind, application bytes)."""
    stages = make_stages(config)
    app = bytearray()
    for chunk in chunks:
        failed_before = stages.failure
        out = stages.receive_data(chunk)
        assert type(out) is bytes
        if failed_before is not None:
            assert out == b"" and stages.failure is failed_before
        if out:
            assert stages.done, "application bytes before the stages passed"
        app += out
        assert type(stages.data_to_send()) is bytes
        assert stages.timeout_reason(1.5)
        check_failure(stages)
    if stages.tls is not None or config & 4:
        assert not stages.done, "a stranger passed TLS or the authentication handshake"
    passed = stages.done
    stages.receive_eof()
    if not passed:
        assert stages.failure is not None, "EOF in a running stage did not fail it"
    check_failure(stages)
    failure = stages.failure
    return passed, failure and failure.stage, failure and failure.kind, bytes(app)


def run_protocol(config: int, chunks: list[bytes], echo: bool) -> None:
    """Feed the chunks to a server's MessageProtocol with those stages, as a pump does."""
    stages = make_stages(config)
    proto = MessageProtocol(FORMAT, limits=LIMITS, server_side=True, close_on_eof=True, stages=stages)
    proto.check_timeouts(0.0)
    for i, chunk in enumerate(chunks):
        if echo:
            out = proto.receive_echo(memoryview(chunk))
            assert type(out) is bytes
        else:
            messages = proto.receive_data(memoryview(chunk))
            assert isinstance(messages, list)
        for piece in proto.data_to_send():
            assert isinstance(piece, bytes | bytearray | memoryview)
        proto.check_timeouts(i * 0.001)
        _ = proto.close_action
        if proto.state is State.CLOSED:
            break
    if stages.tls is not None or config & 4:
        assert proto.stats.messages_received == 0
    proto.receive_eof()
    proto.data_to_send()
    assert proto.state is not State.OPEN, "a close_on_eof server still open after the peer's EOF"
    _ = proto.close_action
    proto.connection_lost(None)
    end = proto.end
    assert end is not None and proto.state is State.CLOSED
    error = proto.closed_error()
    assert isinstance(error, ConnectionClosed) and error.kind is end.kind


def test_one_input(data: bytes) -> None:
    # Input layout: the stream, then 2 control bytes (stages + mode + prefix, split pattern).
    stream, controls = tail_controls(data, 2)
    config = controls[0] & 7
    mode = controls[0] >> 3 & 3  # 0, 1: Stages alone; 2: receive_data; 3: receive_echo
    stream = PREFIXES[controls[0] >> 5] + stream
    chunks = split_pattern(stream, controls[1])
    if mode >= 2:
        run_protocol(config, chunks, echo=mode == 3)
        return
    whole = run_stages(config, [stream])
    split = run_stages(config, chunks)
    assert whole == split, (whole, split)
    passed, _, _, app = whole
    if passed and config in (0, 1):  # a PROXY header only: every byte is accounted for
        parser = ProxyHeaderParser()
        assert parser.feed(stream) is not None
        assert stream[parser.header_size :] == app


def smoke(runs: int) -> None:
    """Without atheris: random streams behind each prefix, in every configuration."""
    rng = random.Random(1234)
    for i in range(runs):
        size = rng.choice([0, 1, 5, 40, 300])
        body = rng.randbytes(size)
        if rng.random() < 0.3:
            body = encode(body[:50]) + body
        if rng.random() < 0.3:  # a prefix cut short, or with a flipped byte
            prefix = rng.choice(PREFIXES[1:])
            cut = rng.randrange(len(prefix) + 1)
            body = prefix[:cut] + bytes([rng.randrange(256)]) + prefix[cut + 1 :] + body
        test_one_input(body + bytes([rng.randrange(256), rng.randrange(256)]))
        if i and i % 500 == 0:
            print(f"{i} inputs", flush=True)
    print(f"{runs} inputs, no crash")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--smoke":
        smoke(int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
        return
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris, or run with --smoke N")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
