"""Tests of the sans-I/O shared-key authentication handshake (auth.py; SPEC §4.2, §9)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgsock.auth import (
    HELLO_SIZE,
    MAGIC,
    MIN_KEY_SIZE,
    NONCE_SIZE,
    ClientHandshake,
    ServerHandshake,
    client_proof,
    new_nonce,
    parse_key_file,
    server_proof,
)
from msgsock.exceptions import HandshakeError, InvalidState
from msgsock.framing import encode

from .helpers import free_loopback6, unit

HYPOTHESIS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

KEY = b"0123456789abcdef"
OTHER_KEY = b"fedcba9876543210"
NS = bytes(range(32))  # the server's nonce in the fixed vectors
NC = bytes(range(32, 64))  # the client's nonce

# The transcript of one handshake with KEY, NS and NC, written out from the documented
# format (docs/handshake.md), not computed by the code under test.
CLIENT_HELLO = b"MSGSOCK-AUTH\x01" + NC
SERVER_HELLO = b"MSGSOCK-AUTH\x01" + NS
CLIENT_PROOF = bytes.fromhex("9657fa8187c6db7a9271c9ad4f8a37b4125244b2d7efd8ba4c3a2373444e692a")
SERVER_CONFIRM = b"\x01" + bytes.fromhex("5b1d2dd67588003ae49a2d21b08dd8302567200a01944b754a01c4ffa3f55a33")
APP = encode(b"first frame")  # application bytes that may follow in the same read


def split_points(data: bytes) -> Iterator[list[bytes]]:
    """Every way to cut ``data`` in two, then one byte at a time."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def feed(handshake: ClientHandshake | ServerHandshake, chunks: list[bytes]) -> bytes:
    """Feed chunks as an I/O layer would; once done, return the application bytes (remaining + later chunks)."""
    for i, piece in enumerate(chunks):
        handshake.receive_data(piece)
        if handshake.done:
            return handshake.remaining + b"".join(chunks[i + 1 :])
    return b""


def pump(client: ClientHandshake, server: ServerHandshake, chunk: Callable[[bytes], list[bytes]]) -> None:
    """Move bytes both ways, cut by ``chunk``, until neither side has anything to say."""
    for _ in range(10):  # the handshake has four messages
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return
        if to_server:
            assert feed(server, chunk(to_server)) == b""
        if to_client:
            assert feed(client, chunk(to_client)) == b""
    raise AssertionError("the handshake did not settle")


def whole(data: bytes) -> list[bytes]:
    """No cutting."""
    return [data] if data else []


# -- the exact bytes --------------------------------------------------------------------------


def test_magic_and_sizes() -> None:
    """The magic is b'MSGSOCK-AUTH' then version byte 1; nonces are 32 bytes and keys at least 16."""
    assert MAGIC == b"MSGSOCK-AUTH\x01"
    assert NONCE_SIZE == 32 and HELLO_SIZE == 45 and MIN_KEY_SIZE == 16


def test_transcript_is_byte_exact() -> None:
    """With fixed nonces the four messages are exactly the documented bytes."""
    client = ClientHandshake(KEY, NC)
    server = ServerHandshake(KEY, NS)
    assert client.data_to_send() == CLIENT_HELLO
    assert server.data_to_send() == SERVER_HELLO
    assert client.data_to_send() == b""  # nothing more until the server's hello
    server.receive_data(CLIENT_HELLO)
    assert server.data_to_send() == b"" and not server.done
    client.receive_data(SERVER_HELLO)
    assert client.data_to_send() == CLIENT_PROOF
    assert not client.done
    server.receive_data(CLIENT_PROOF)
    assert server.done and server.remaining == b""
    assert server.data_to_send() == SERVER_CONFIRM
    client.receive_data(SERVER_CONFIRM)
    assert client.done and client.remaining == b""
    assert client.peer_nonce == NS and server.peer_nonce == NC


def test_proofs_follow_the_documented_formula() -> None:
    """MACc and MACs are HMAC-SHA256 over MAGIC, a role label and the nonces in opposite orders."""
    assert client_proof(KEY, NS, NC) == CLIENT_PROOF
    assert server_proof(KEY, NC, NS) == SERVER_CONFIRM[1:]
    assert hmac.new(KEY, MAGIC + b"client" + NS + NC, hashlib.sha256).digest() == CLIENT_PROOF


@pytest.mark.parametrize("part", ["server-hello", "client-proof", "server-confirm"])
def test_every_split(part: str) -> None:
    """Each message parsed in every split gives the same result, with application bytes kept as remaining."""
    message = {
        "server-hello": SERVER_HELLO,
        "client-proof": CLIENT_PROOF + APP,
        "server-confirm": SERVER_CONFIRM + APP,
    }[part]
    for chunks in split_points(message):
        client = ClientHandshake(KEY, NC)
        server = ServerHandshake(KEY, NS)
        server.receive_data(CLIENT_HELLO)
        if part == "server-hello":
            feed(client, chunks)
            assert client.data_to_send() == CLIENT_HELLO + CLIENT_PROOF
            continue
        client.receive_data(SERVER_HELLO)
        if part == "client-proof":
            assert feed(server, chunks) == APP
            assert server.done
            continue
        server.receive_data(CLIENT_PROOF)
        assert feed(client, chunks) == APP
        assert client.done


def test_client_hello_in_every_split() -> None:
    """The client's hello in every split leaves the server waiting for the proof."""
    for chunks in split_points(CLIENT_HELLO + CLIENT_PROOF):
        server = ServerHandshake(KEY, NS)
        assert feed(server, chunks) == b""
        assert server.done


@HYPOTHESIS
@given(data=st.data(), app=st.binary(max_size=30))
def test_any_chunking_completes(data: st.DataObject, app: bytes) -> None:
    """Random nonces and random chunking of both directions always complete with the same remaining bytes."""
    client = ClientHandshake(KEY, new_nonce())
    server = ServerHandshake(KEY, new_nonce())

    def chunk(payload: bytes) -> list[bytes]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        return [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]

    pump(client, server, chunk)
    assert client.done and server.done
    # Application bytes riding with the last server message land in client.remaining.
    client2 = ClientHandshake(KEY, NC)
    server2 = ServerHandshake(KEY, NS)
    server2.receive_data(client2.data_to_send())
    client2.receive_data(server2.data_to_send())
    server2.receive_data(client2.data_to_send())
    assert feed(client2, chunk(server2.data_to_send() + app)) == app
    assert client2.done


# -- failures -----------------------------------------------------------------------------------


def test_wrong_key_is_rejected_on_both_sides() -> None:
    """A client with another key fails at the server, which sends the rejection byte the client reports."""
    client = ClientHandshake(OTHER_KEY, NC)
    server = ServerHandshake(KEY, NS)
    with pytest.raises(HandshakeError, match="authentication failed: the peer does not know the key"):
        pump(client, server, whole)
    assert not server.done and server.error is not None
    reject = server.data_to_send()
    assert reject == b"\x00"
    with pytest.raises(HandshakeError, match="authentication failed: the server rejected our key"):
        client.receive_data(reject)
    assert not client.done


def test_server_without_the_key_is_detected_by_the_client() -> None:
    """A fake server that accepts anything but cannot compute MACs fails at the client."""
    client = ClientHandshake(KEY, NC)
    client.receive_data(SERVER_HELLO)
    client.data_to_send()
    with pytest.raises(HandshakeError, match="peer does not know the key"):
        client.receive_data(b"\x01" + bytes(32))


def test_replayed_client_response_fails() -> None:
    """A recorded client hello and proof, replayed to a server with a fresh nonce, fail authentication."""
    client = ClientHandshake(KEY, NC)
    server = ServerHandshake(KEY, NS)
    recorded = b""
    for _ in range(3):
        out = client.data_to_send()
        recorded += out
        server.receive_data(out)
        client.receive_data(server.data_to_send())
        if client.done:
            break
    assert client.done and server.done
    fresh = ServerHandshake(KEY, new_nonce())
    with pytest.raises(HandshakeError, match="the peer does not know the key"):
        fresh.receive_data(recorded)
    assert fresh.data_to_send().endswith(b"\x00")


def test_reflected_hello_fails() -> None:
    """A peer that sends our own hello back (our nonce as its nonce) fails at once, on either side."""
    server = ServerHandshake(KEY, NS)
    with pytest.raises(HandshakeError, match="reflected"):
        server.receive_data(server.data_to_send())
    client = ClientHandshake(KEY, NC)
    with pytest.raises(HandshakeError, match="reflected"):
        client.receive_data(client.data_to_send())


def test_reflected_proof_fails_at_the_client() -> None:
    """A fake server that returns the client's own proof as its confirmation is rejected."""
    client = ClientHandshake(KEY, NC)
    client.data_to_send()
    client.receive_data(SERVER_HELLO)
    proof = client.data_to_send()
    with pytest.raises(HandshakeError, match="peer does not know the key"):
        client.receive_data(b"\x01" + proof)


def test_domain_separation_stops_a_server_proof_posing_as_a_client_proof() -> None:
    """A server proof seen on the wire cannot be used as a client proof, even when the nonces line up.

    Without the role labels, MACs(Nc=A, Ns=B) = H(A|B) would equal MACc(Ns=A, Nc=B);
    an attacker who saw one session and met a server whose nonce is A could log in.
    """
    a, b = NC, NS
    seen = server_proof(KEY, a, b)  # from a session with client nonce A, server nonce B
    victim = ServerHandshake(KEY, a)  # worst case: this server's nonce is A
    victim.receive_data(MAGIC + b)
    with pytest.raises(HandshakeError, match="the peer does not know the key"):
        victim.receive_data(seen)
    assert client_proof(KEY, a, b) != server_proof(KEY, b, a)
    assert client_proof(KEY, a, a) != server_proof(KEY, a, a)


@pytest.mark.parametrize(
    "stream",
    [
        encode(b"hello"),  # a client without a key sends frames
        b"\x00",
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01",  # a TLS ClientHello: the client uses TLS, we do not
        b"MSGSOCK-AUTX",
    ],
)
def test_peer_without_the_handshake_fails_on_its_first_wrong_byte(stream: bytes) -> None:
    """A peer that sends frames (or anything else) instead of the hello fails at once with a clear reason."""
    for handshake in (ServerHandshake(KEY, NS), ClientHandshake(KEY, NC)):
        with pytest.raises(
            HandshakeError, match=r"bad handshake magic.*does not speak the msgsock authentication"
        ):
            handshake.receive_data(stream)


def test_bad_magic_is_found_on_the_first_byte() -> None:
    """Bytes of a correct magic prefix are accepted; the first wrong byte raises."""
    server = ServerHandshake(KEY, NS)
    for byte in MAGIC[:5]:
        server.receive_data(bytes([byte]))
    with pytest.raises(HandshakeError, match="got b'MSGSOX'"):
        server.receive_data(b"X")


def test_other_version_is_named() -> None:
    """A peer speaking another version of the handshake gets an error naming both versions."""
    with pytest.raises(HandshakeError, match=r"unsupported authentication handshake version 2 .*speaks 1"):
        ServerHandshake(KEY, NS).receive_data(b"MSGSOCK-AUTH\x02" + NC)


def test_bad_status_byte() -> None:
    """A status byte other than accept or reject is an error naming the byte."""
    client = ClientHandshake(KEY, NC)
    client.receive_data(SERVER_HELLO)
    with pytest.raises(HandshakeError, match="status byte 0x7f"):
        client.receive_data(b"\x7f")


@pytest.mark.parametrize("side", ["client", "server"])
def test_truncated_handshake_at_every_point(side: str) -> None:
    """A peer that closes at any point before the end gives a HandshakeError saying how far it got."""
    peer_bytes = SERVER_HELLO + SERVER_CONFIRM if side == "client" else CLIENT_HELLO + CLIENT_PROOF
    for cut in range(len(peer_bytes)):
        handshake: ClientHandshake | ServerHandshake = (
            ClientHandshake(KEY, NC) if side == "client" else ServerHandshake(KEY, NS)
        )
        handshake.receive_data(peer_bytes[:cut])
        with pytest.raises(HandshakeError, match="connection closed by the peer") as caught:
            handshake.receive_eof()
        if cut == 0:
            assert "before its authentication hello" in str(caught.value)
        else:
            assert "bytes of" in str(caught.value)
        assert handshake.error is caught.value


def test_eof_after_done_is_fine() -> None:
    """Once done, the peer's EOF is the application's business, not a handshake error."""
    client = ClientHandshake(KEY, NC)
    server = ServerHandshake(KEY, NS)
    pump(client, server, whole)
    client.receive_eof()
    server.receive_eof()


def test_errors_are_sticky_and_done_is_final() -> None:
    """After an error every call raises it again; after success more bytes are an API misuse."""
    server = ServerHandshake(KEY, NS)
    with pytest.raises(HandshakeError) as first:
        server.receive_data(b"junk")
    with pytest.raises(HandshakeError) as again:
        server.receive_data(CLIENT_HELLO)
    assert again.value is first.value
    client = ClientHandshake(KEY, NC)
    ok = ServerHandshake(KEY, NS)
    pump(client, ok, whole)
    with pytest.raises(InvalidState):
        client.receive_data(b"x")
    with pytest.raises(InvalidState):
        ok.receive_data(b"x")


def test_digests_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both proofs are checked with hmac.compare_digest (SPEC §4.2)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    pump(ClientHandshake(KEY, NC), ServerHandshake(KEY, NS), whole)
    assert (CLIENT_PROOF, CLIENT_PROOF) in calls
    assert (SERVER_CONFIRM[1:], SERVER_CONFIRM[1:]) in calls


# -- keys and nonces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contents", "key"),
    [
        (b"0123456789abcdef", b"0123456789abcdef"),
        (b"0123456789abcdef\n", b"0123456789abcdef"),
        (b"0123456789abcdef\r\n", b"0123456789abcdef"),
        (b"0123456789abcdef\n\n", b"0123456789abcdef\n"),
        (b" \x00\xff" * 20, b" \x00\xff" * 20),
    ],
)
def test_key_file_format(contents: bytes, key: bytes) -> None:
    """A key file holds the key's bytes; exactly one trailing newline is dropped."""
    assert parse_key_file(contents) == key


@pytest.mark.parametrize("contents", [b"", b"\n", b"short\n", b"0123456789abcde\n"])
def test_short_keys_are_refused(contents: bytes) -> None:
    """Keys under 16 bytes are refused with a message giving the length and the minimum."""
    with pytest.raises(ValueError, match=r"auth key is \d+ bytes; at least 16 are required"):
        parse_key_file(contents)
    with pytest.raises(ValueError, match="at least 16"):
        ServerHandshake(contents.rstrip(b"\n"), NS)


def test_bad_arguments() -> None:
    """A key that is not bytes and a nonce of the wrong size are refused."""
    with pytest.raises(TypeError, match="must be bytes"):
        ClientHandshake("0123456789abcdef", NC)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 random bytes"):
        ClientHandshake(KEY, b"short")
    assert len(new_nonce()) == 32 and new_nonce() != new_nonce()


# -- fuzz ---------------------------------------------------------------------------------------


@HYPOTHESIS
@given(
    start=st.sampled_from([b"", MAGIC[:5], MAGIC, MAGIC + NS, MAGIC + NC, SERVER_HELLO + b"\x01"]),
    tail=st.binary(max_size=120),
    data=st.data(),
)
def test_any_bytes_raise_only_handshake_error(start: bytes, tail: bytes, data: st.DataObject) -> None:
    """Arbitrary peer bytes, in any chunks, leave either side waiting or raise HandshakeError, never done."""
    stream = start + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for handshake in (ClientHandshake(KEY, NC), ServerHandshake(KEY, NS)):
        try:
            for piece in chunks:
                handshake.receive_data(piece)
        except HandshakeError:
            continue
        # Without the key nobody can complete it (the odds of a forged MAC are 2**-256).
        assert not handshake.done
        with pytest.raises(HandshakeError):
            handshake.receive_eof()


# -- over real sockets --------------------------------------------------------------------------


def _loopbacks() -> list[object]:
    return [
        "127.0.0.1",
        pytest.param(
            "::1",
            marks=pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available"),
        ),
    ]


def _run_server(listener: socket.socket, key: bytes, result: dict[str, object]) -> None:
    """A minimal server pump: accept, handshake, echo one frame's bytes."""
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(unit(5))
            server = ServerHandshake(key, new_nonce())
            conn.sendall(server.data_to_send())
            try:
                while not server.done:
                    data = conn.recv(4096)
                    if not data:
                        server.receive_eof()
                    server.receive_data(data)
                    conn.sendall(server.data_to_send())
            except HandshakeError as exc:
                conn.sendall(server.data_to_send())  # the rejection byte
                result["error"] = exc
                return
            pending = server.remaining
            while len(pending) < len(APP):
                data = conn.recv(4096)
                if not data:
                    break
                pending += data
            conn.sendall(pending)
            result["echoed"] = pending
    except Exception as exc:  # reported by the test, never lost in the thread
        result["crash"] = exc


@pytest.mark.parametrize("host", _loopbacks())
@pytest.mark.parametrize("same_key", [True, False], ids=["same-key", "other-key"])
def test_handshake_over_loopback(host: str, same_key: bool) -> None:
    """Over real TCP, the same key authenticates both sides and frames flow; another key fails on both sides."""
    result: dict[str, object] = {}
    with socket.create_server(
        (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET
    ) as listener:
        listener.settimeout(unit(5))
        thread = threading.Thread(target=_run_server, args=(listener, KEY, result), daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname()[:2], timeout=unit(5)) as sock:
                client = ClientHandshake(KEY if same_key else OTHER_KEY, new_nonce())
                sock.sendall(client.data_to_send())
                error: HandshakeError | None = None
                try:
                    for _ in range(100):  # bounded; each recv returns data or EOF
                        if client.done:
                            break
                        data = sock.recv(4096)
                        if not data:
                            client.receive_eof()
                        client.receive_data(data)
                        sock.sendall(client.data_to_send())
                except HandshakeError as exc:
                    error = exc
                if same_key:
                    assert error is None and client.done
                    sock.sendall(APP)
                    echoed = client.remaining
                    while len(echoed) < len(APP):
                        data = sock.recv(4096)
                        assert data, "server closed early"
                        echoed += data
                    assert echoed == APP
                else:
                    assert error is not None and "rejected our key" in str(error)
        finally:
            thread.join(unit(5))
    assert not thread.is_alive()
    assert "crash" not in result, result.get("crash")
    if same_key:
        assert result.get("echoed") == APP
    else:
        assert "does not know the key" in str(result.get("error"))
