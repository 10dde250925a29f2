"""Atheris harness for the authentication handshake (msgsock.auth; SPEC §4.2).

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_auth.py -max_total_time=60 fuzz/corpus/auth

Two modes, chosen by the first input byte:

- **stranger**: arbitrary bytes, in arbitrary chunks, sent to a client or a server
  handshake.  Only HandshakeError may come out, and the handshake must never
  complete (nobody can forge an HMAC-SHA256 without the key).
- **tamper**: an honest handshake whose messages the input may change (flip bytes,
  cut, append, swap keys).  Either both sides complete with the original transcript
  and the appended bytes as ``remaining``, or a side raises HandshakeError; a side
  never completes on a changed proof.

Any other exception, or a broken invariant (AssertionError), is a crash.
"""

from __future__ import annotations

import sys

import atheris
from _common import split, take_cuts

with atheris.instrument_imports():
    from msgsock.auth import MAGIC, NONCE_SIZE, ClientHandshake, ServerHandshake
    from msgsock.exceptions import HandshakeError

KEY = b"fuzzing-key-0123456789"
PREFIXES = [b"", MAGIC[:6], MAGIC, MAGIC + bytes(NONCE_SIZE), MAGIC + bytes(NONCE_SIZE) + b"\x01"]


def stranger(fdp: atheris.FuzzedDataProvider) -> None:
    server_side = fdp.ConsumeBool()
    prefix = PREFIXES[fdp.ConsumeIntInRange(0, len(PREFIXES) - 1)]
    raw_cuts = take_cuts(fdp)
    stream = prefix + fdp.ConsumeBytes(fdp.remaining_bytes())
    handshake = (
        ServerHandshake(KEY, b"S" * NONCE_SIZE) if server_side else ClientHandshake(KEY, b"C" * NONCE_SIZE)
    )
    handshake.data_to_send()
    try:
        for chunk in split(stream, raw_cuts):
            handshake.receive_data(chunk)
            handshake.data_to_send()
    except HandshakeError:
        return
    assert not handshake.done, "a handshake completed without the key"
    try:
        handshake.receive_eof()
    except HandshakeError:
        return
    raise AssertionError("receive_eof accepted an unfinished handshake")


def tamper(fdp: atheris.FuzzedDataProvider) -> None:
    client_key = KEY if fdp.ConsumeIntInRange(0, 7) else b"another-fuzzing-key!!"
    client = ClientHandshake(client_key, fdp.ConsumeBytes(NONCE_SIZE).ljust(NONCE_SIZE, b"c"))
    server = ServerHandshake(KEY, fdp.ConsumeBytes(NONCE_SIZE).ljust(NONCE_SIZE, b"s"))
    changed = {"client": False, "server": False}
    appended = {"client": b"", "server": b""}

    def mangle(message: bytes, sender: str) -> bytes:
        if not message or not fdp.ConsumeBool():
            return message
        op = fdp.ConsumeIntInRange(0, 2)
        if op == 0:
            i = fdp.ConsumeIntInRange(0, len(message) - 1)
            flip = fdp.ConsumeIntInRange(1, 255)
            out = message[:i] + bytes([message[i] ^ flip]) + message[i + 1 :]
        elif op == 1:
            out = message[: fdp.ConsumeIntInRange(0, len(message) - 1)]
        else:
            extra = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
            appended[sender] += extra
            return message + extra
        changed[sender] = True
        return out

    try:
        for _ in range(4):
            to_server = mangle(client.data_to_send(), "client") if not server.done else b""
            to_client = mangle(server.data_to_send(), "server") if not client.done else b""
            if not to_server and not to_client:
                break
            if to_server and not server.done:
                for chunk in split(to_server, take_cuts(fdp)):
                    if server.done:
                        break
                    server.receive_data(chunk)
            if to_client and not client.done:
                for chunk in split(to_client, take_cuts(fdp)):
                    if client.done:
                        break
                    client.receive_data(chunk)
    except HandshakeError:
        return
    if server.done:
        # The server accepted: the client's proof must have been the genuine one.
        assert client_key == KEY and not changed["client"], "server accepted a forged proof"
    if client.done:
        assert server.done and not changed["server"], "client accepted a forged confirmation"


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        stranger(fdp)
    else:
        tamper(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
