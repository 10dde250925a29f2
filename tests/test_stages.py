"""Tests of the sans-I/O connection stages: PROXY header, TLS, shared-key auth (stages.py; SPEC §3, §4.2, §7).

Client and server are joined in memory (no socket): what one side's
``data_to_send()`` returns is fed to the other, whole, split, or byte by byte.
Alone (:class:`Stages`) and inside :class:`MessageProtocol`, which is how every
I/O layer uses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from msgsock.auth import MAGIC
from msgsock.exceptions import EndKind, HandshakeError
from msgsock.framing import encode
from msgsock.protocol import Action, End, Limits, MessageProtocol, State
from msgsock.proxy import ProxyInfo, serialize
from msgsock.stages import Stage, StageFailure, Stages, ssl_error_text
from tests.certs import Pki

KEY = b"0123456789abcdef-shared"
OTHER_KEY = b"another-key-of-16+bytes"
CLIENT_NONCE = bytes(range(32))
SERVER_NONCE = bytes(range(100, 132))

PROXY_V1 = ProxyInfo(1, "PROXY", "TCP4", ("203.0.113.7", 4242), ("198.51.100.1", 9898))
PROXY_V2 = ProxyInfo(2, "PROXY", "TCP6", ("2001:db8::7", 4242), ("2001:db8::1", 9898))
PROXY_PEERS = {1: "203.0.113.7:4242", 2: "[2001:db8::7]:4242"}
LOCAL = serialize(ProxyInfo(2, "LOCAL"))


def _hmac(*parts: bytes) -> bytes:
    return hmac.new(KEY, b"".join(parts), hashlib.sha256).digest()


def _wire(proto: MessageProtocol) -> bytes:
    return b"".join(bytes(chunk) for chunk in proto.data_to_send())


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _whole(data: bytes) -> list[bytes]:
    return [data]


def client_stages(pki: Pki | None = None, key: bytes | None = None, **kwargs: Any) -> Stages:
    """A client's stages: TLS trusting the test CA when ``pki`` is given, auth when ``key`` is."""
    if pki is not None:
        kwargs.setdefault("ssl_context", pki.client_context())
        kwargs.setdefault("server_hostname", "localhost")
    return Stages(server_side=False, auth_key=key, nonce=CLIENT_NONCE if key else None, **kwargs)


def server_stages(pki: Pki | None = None, key: bytes | None = None, **kwargs: Any) -> Stages:
    """A server's stages: TLS with the test certificate when ``pki`` is given, auth when ``key`` is."""
    if pki is not None:
        kwargs.setdefault("ssl_context", pki.server_context())
    return Stages(server_side=True, auth_key=key, nonce=SERVER_NONCE if key else None, **kwargs)


def run_stages(
    client: Stages, server: Stages, *, prefix: bytes = b"", reads: Callable[[bytes], list[bytes]] = _whole
) -> tuple[bytes, bytes]:
    """Move raw bytes between two Stages until both are quiet; return the application bytes each side got."""
    got_client = bytearray()
    got_server = bytearray()
    first = True
    for _ in range(20):
        out = client.data_to_send()
        if first:
            out, first = prefix + out, False
        for piece in reads(out) if out else []:
            got_server += server.receive_data(piece)
        back = server.data_to_send()
        if back:
            got_client += client.receive_data(back)
        if not out and not back:
            break
    return bytes(got_client), bytes(got_server)


class Link:
    """A client and a server MessageProtocol joined in memory; the server echoes through receive_echo."""

    def __init__(
        self,
        client: MessageProtocol,
        server: MessageProtocol,
        *,
        prefix: bytes = b"",
        reads: Callable[[bytes], list[bytes]] = _whole,
        echo: bool = True,
    ) -> None:
        self.client = client
        self.server = server
        self.prefix = prefix
        self.reads = reads
        self.echo = echo
        self.at_client: list[Any] = []
        self.at_server: list[Any] = []
        self.flights: list[tuple[str, int]] = []

    def run(self) -> Link:
        """Move bytes both ways until neither side has anything to send."""
        for _ in range(30):
            out = _wire(self.client)
            if self.prefix:
                out, self.prefix = self.prefix + out, b""
            back = b""
            for piece in self.reads(out) if out else []:
                if self.echo:
                    before = self.server.stats.messages_received
                    back += self.server.receive_echo(piece)
                    self.at_server += [None] * (self.server.stats.messages_received - before)
                else:
                    self.at_server += self.server.receive_data(piece)
            back += _wire(self.server)
            if back:
                self.at_client += self.client.receive_data(back)
            if out:
                self.flights.append(("client", len(out)))
            if back:
                self.flights.append(("server", len(back)))
            if not out and not back:
                break
        return self


# -- no stages ----------------------------------------------------------------------------


def test_no_stages_pass_at_once() -> None:
    """Stages with nothing to do are done at once, pass bytes through, and MessageProtocol drops them (fast path)."""
    stages = Stages(server_side=True)
    assert stages.done and stages.stage is Stage.DONE and not stages.encrypted
    assert stages.receive_data(memoryview(b"abc")) == b"abc"
    assert stages.data_to_send() == b""
    assert stages.encrypt(b"xyz") == b"xyz"
    assert stages.close_notify() == b""
    assert MessageProtocol(stages=stages).stages is None


def test_constructor_errors() -> None:
    """A PROXY header on the client side, a context that is not an SSLContext, a short key: refused at once."""
    with pytest.raises(ValueError, match="servers only"):
        Stages(server_side=False, proxy_protocol=True)
    with pytest.raises(TypeError, match=r"ssl\.SSLContext"):
        Stages(server_side=True, ssl_context=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Stages(server_side=True, auth_key=b"short")


# -- TLS ----------------------------------------------------------------------------------


def test_tls_only(pki: Pki) -> None:
    """TLS alone: both sides pass, then application bytes go both ways as records, not in the clear."""
    client, server = client_stages(pki), server_stages(pki)
    assert client.stage is Stage.TLS and server.stage is Stage.TLS
    run_stages(client, server)
    assert client.done and server.done and client.encrypted
    assert client.tls is not None and client.tls.version() == "TLSv1.3"
    record = client.encrypt(b"secret message")
    assert b"secret message" not in record
    assert server.receive_data(record) == b"secret message"
    assert client.receive_data(server.encrypt(b"reply")) == b"reply"


def test_tls_through_message_protocols(pki: Pki) -> None:
    """A message queued before the TLS handshake is held, then sent encrypted; the echo comes back."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, stages=server_stages(pki))
    client.send_message(b"secret early")
    assert not client.handshake_complete
    link = Link(client, server).run()
    assert client.handshake_complete and server.handshake_complete
    assert link.at_client == [b"secret early"]
    assert server.stats.messages_received == 1
    assert server.stats.bytes_received == len(encode(b"secret early"))  # frame bytes, not record bytes


def test_application_bytes_in_the_last_tls_flight_are_not_lost(pki: Pki) -> None:
    """The client's Finished and its first frame travel in one flight; the server returns the frame from that read."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, stages=server_stages(pki))
    client.send_message(b"first")
    hello = _wire(client)
    assert server.receive_data(hello) == []
    client.receive_data(_wire(server))
    assert client.handshake_complete
    finished = _wire(client)
    assert server.receive_data(finished) == [b"first"]
    assert server.handshake_complete


def test_wrong_ca_fails_both_sides(pki: Pki) -> None:
    """A client that does not trust the server's CA fails TLS and its alert fails the server too."""
    client = client_stages(pki, ssl_context=pki.client_context(ca=pki.other_ca_cert))
    server = server_stages(pki)
    run_stages(client, server)
    assert client.failure is not None and server.failure is not None
    assert (client.failure.stage, client.failure.kind) == (Stage.TLS, EndKind.TLS)
    assert client.failure.reason.startswith("TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] ")
    assert (
        server.failure.reason == "TLS handshake failed: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"
    )
    assert not client.failure.by_peer_close and not server.failure.by_peer_close


@pytest.mark.parametrize("plaintext", [encode(b"hello, server"), b"GET / HTTP/1.0\r\n\r\n"])
def test_plaintext_to_a_tls_server(pki: Pki, plaintext: bytes) -> None:
    """Frames (or HTTP) sent in the clear to a TLS server fail its TLS stage: kind TLS, OpenSSL's words without the source line."""
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki))
    assert server.receive_data(plaintext) == []
    end = server.end
    assert end is not None and end.kind is EndKind.TLS
    assert end.reason.startswith("TLS handshake failed: [SSL: ")
    assert "_ssl.c" not in end.reason
    assert (server.state, server.close_action) == (State.DRAINING, Action.CLOSE)


def test_plaintext_server_to_a_tls_client(pki: Pki) -> None:
    """A TLS client answered in the clear fails its TLS stage (kind TLS)."""
    client = MessageProtocol(stages=client_stages(pki))
    _wire(client)
    client.receive_data(encode(b"hello there"))
    assert client.end is not None and client.end.kind is EndKind.TLS
    assert client.closed_error().kind is EndKind.TLS


def test_a_corrupted_record_after_the_handshake(pki: Pki) -> None:
    """A record that fails to decrypt after the handshake ends the connection as TLS, with an alert to flush."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, stages=server_stages(pki))
    Link(client, server).run()
    client.send_message(b"hello")
    record = bytearray(_wire(client))
    record[-3] ^= 0xFF
    assert server.receive_data(bytes(record)) == []
    assert server.end is not None
    assert server.end.kind is EndKind.TLS
    assert server.end.reason.startswith("TLS error: [SSL: ")
    assert _wire(server)  # the alert
    assert server.close_action is Action.CLOSE


def test_ssl_error_text_drops_the_source_position() -> None:
    """ssl_error_text keeps OpenSSL's words and drops the ``(_ssl.c:NNN)`` suffix."""
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert ssl_error_text(exc) == "[SSL: WRONG_VERSION_NUMBER] wrong version number"


def test_close_notify(pki: Pki) -> None:
    """close_notify: nothing before the handshake or without TLS; after it, the peer sees the end of its stream."""
    client, server = client_stages(pki), server_stages(pki)
    assert client.close_notify() == b""
    run_stages(client, server)
    notify = client.close_notify()
    assert notify
    assert server.receive_data(notify) == b""
    assert server.tls_eof
    assert server.receive_data(b"anything") == b""


def test_close_notify_through_message_protocols(pki: Pki) -> None:
    """A client's send_eof sends close_notify; a close_on_eof server takes it as the peer's EOF and closes."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki))
    Link(client, server).run()
    client.send_eof()
    notify = _wire(client)
    assert notify
    assert client.close_action is Action.HALF_CLOSE
    client.eof_written()
    assert server.receive_data(notify) == []
    assert server.eof_received
    assert server.end == End(EndKind.CLEAN, "peer closed the connection")
    assert server.close_action is Action.CLOSE
    client.receive_eof()  # the server closed its socket
    assert client.state is State.CLOSED


def test_last_message_in_the_flight_of_close_notify_is_not_lost(pki: Pki) -> None:
    """A frame and the close_notify after it in one read: the frame is still returned, then the peer's EOF counts."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki))
    Link(client, server).run()
    client.send_message(b"last")
    flight = _wire(client)
    client.send_eof()
    flight += _wire(client)
    assert server.receive_data(flight) == [b"last"]
    assert server.stats.messages_received == 1
    assert server.eof_received


def test_close_notify_during_authentication_fails_the_stage(pki: Pki) -> None:
    """A client without a key that closes TLS cleanly during the auth stage fails it, with the hint about the key."""
    client = client_stages(pki)  # TLS, no key
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki, key=KEY))
    for _ in range(3):
        out = client.data_to_send()
        if out:
            server.receive_data(out)
        back = _wire(server)
        if back:
            client.receive_data(back)
    assert client.done and server.stages is not None and server.stages.stage is Stage.AUTH
    assert server.receive_data(client.close_notify()) == []
    assert server.end == End(
        EndKind.AUTHENTICATION,
        "connection closed by the peer before its authentication hello: "
        "the peer may not be configured with an auth key",
    )


def test_send_then_close_with_tls_before_writing(pki: Pki) -> None:
    """send_message then send_eof, before the pump writes: the frame goes out encrypted, then close_notify."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki))
    Link(client, server).run()
    client.send_message(b"bye")
    client.send_eof()
    flight = _wire(client)
    assert client.close_action is Action.HALF_CLOSE
    got = server.receive_data(flight)
    got += server.receive_data(b"")
    assert got == [b"bye"]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "auth"])
def test_peek_output_never_returns_held_plaintext(pki: Pki, tls: bool) -> None:
    """With partial writes, a frame queued before the stages pass is never offered to the pump until they do."""
    stages = client_stages(pki) if tls else client_stages(key=KEY)
    client = MessageProtocol(stages=stages)
    client.send_message(b"secret")
    first = bytes(client.peek_output())
    client.consume_output(len(first))
    assert b"secret" not in first
    assert client.peek_output() == b""


def test_partial_write_of_the_hello_keeps_the_order() -> None:
    """The auth hellos cross: our proof, made while our hello is half written, goes out after the rest of it."""
    client = MessageProtocol(stages=client_stages(key=KEY))
    server = server_stages(key=KEY)
    hello = bytes(client.peek_output())
    assert hello == MAGIC + CLIENT_NONCE
    client.consume_output(10)  # the kernel took 10 bytes
    client.receive_data(server.data_to_send())  # the server's hello: our proof is due
    wire = hello[:10]
    while chunk := client.peek_output():
        wire += bytes(chunk)
        client.consume_output(len(chunk))
    assert wire == MAGIC + CLIENT_NONCE + _hmac(MAGIC, b"client", SERVER_NONCE, CLIENT_NONCE)


def test_receive_and_reply_with_tls(pki: Pki) -> None:
    """A TLS server's receive_and_reply returns its replies as records the client decrypts."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, stages=server_stages(pki))
    Link(client, server).run()
    client.send_message(b"one")
    client.send_message(b"two")
    out, other, rest = server.receive_and_reply(_wire(client), bytes.upper)
    assert (other, rest) == (None, [])
    assert b"ONE" not in out
    assert client.receive_data(out) == [b"ONE", b"TWO"]
    assert server.stats.bytes_sent == 2 * len(encode(b"ONE"))


def test_partial_writes_with_tls(pki: Pki) -> None:
    """peek_output/consume_output in small steps carry the handshake and then the records intact."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, stages=server_stages(pki))
    got: list[Any] = []
    for _ in range(10):
        out = bytearray()
        while chunk := client.peek_output():
            step = bytes(chunk)[:7]
            out += step
            client.consume_output(len(step))
        got += server.receive_data(bytes(out))
        back = _wire(server)
        if back:
            client.receive_data(back)
        if client.handshake_complete and not got:
            client.send_message(b"after")
        if not out and not back and got:
            break
    assert got == [b"after"]


# -- authentication -----------------------------------------------------------------------


def test_auth_only_exact_bytes() -> None:
    """The shared-key handshake sends exactly the bytes docs/handshake.md draws, with injected nonces."""
    client, server = client_stages(key=KEY), server_stages(key=KEY)
    client_hello = client.data_to_send()
    server_hello = server.data_to_send()
    assert client_hello == MAGIC + CLIENT_NONCE
    assert server_hello == MAGIC + SERVER_NONCE
    assert server.receive_data(client_hello) == b""
    assert client.receive_data(server_hello) == b""
    proof = client.data_to_send()
    assert proof == _hmac(MAGIC, b"client", SERVER_NONCE, CLIENT_NONCE)
    assert server.receive_data(proof) == b""
    assert server.done and server.stage is Stage.DONE
    confirm = server.data_to_send()
    assert confirm == b"\x01" + _hmac(MAGIC, b"server", CLIENT_NONCE, SERVER_NONCE)
    assert client.receive_data(confirm) == b""
    assert client.done
    assert not client.encrypted and client.encrypt(b"x") == b"x"


def test_application_bytes_after_the_auth_handshake_are_not_lost() -> None:
    """Bytes after the last handshake bytes in the same read go to the application, on both sides."""
    client, server = client_stages(key=KEY), server_stages(key=KEY)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert server.receive_data(client.data_to_send() + encode(b"first")) == encode(b"first")
    assert client.receive_data(server.data_to_send() + encode(b"reply")) == encode(b"reply")


def test_auth_server_confirmation_and_reply_in_one_flight() -> None:
    """A server's confirmation and its first reply reach the client in one read; the client returns the reply."""
    client = MessageProtocol(stages=client_stages(key=KEY))
    server = MessageProtocol(server_side=True, stages=server_stages(key=KEY))
    server.receive_data(_wire(client))
    client.receive_data(_wire(server))
    assert server.receive_data(_wire(client)) == []
    assert server.handshake_complete
    server.send_message(b"welcome")
    flight = _wire(server)
    assert flight[:1] == b"\x01" and flight.endswith(encode(b"welcome"))
    assert client.receive_data(flight) == [b"welcome"]
    assert client.handshake_complete


def test_auth_echo_after_the_confirmation() -> None:
    """A frame right behind the client's proof: the server's wire carries its confirmation, then the echo."""
    client = client_stages(key=KEY)
    server = MessageProtocol(server_side=True, stages=server_stages(key=KEY))
    server.receive_data(client.data_to_send())
    client.receive_data(_wire(server))
    echoed = server.receive_echo(client.data_to_send() + encode(b"ping"))
    wire = echoed + _wire(server)
    assert wire == b"\x01" + _hmac(MAGIC, b"server", CLIENT_NONCE, SERVER_NONCE) + encode(b"ping")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_wrong_key_fails_both_sides(pki: Pki, tls: bool) -> None:
    """Different keys: the server refuses the proof and sends the rejection byte; the client says it was rejected."""
    client = client_stages(pki if tls else None, key=OTHER_KEY)
    server = server_stages(pki if tls else None, key=KEY)
    if tls:
        run_stages(client, server)
    else:
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
        assert server.data_to_send() == b"\x00"  # the rejection byte, then nothing
        assert server.data_to_send() == b""
        client.receive_data(b"\x00")
    assert server.failure is not None
    assert isinstance(server.failure.error, HandshakeError)
    assert dataclasses.replace(server.failure, error=None) == StageFailure(
        Stage.AUTH, EndKind.AUTHENTICATION, "authentication failed: the peer does not know the key"
    )
    assert client.failure is not None
    assert dataclasses.replace(client.failure, error=None) == StageFailure(
        Stage.AUTH, EndKind.AUTHENTICATION, "authentication failed: the server rejected our key"
    )
    assert not server.done and not client.done
    assert server.receive_data(b"more") == b""  # a failed stage takes nothing more


def test_wrong_key_through_message_protocols(pki: Pki) -> None:
    """Different keys through MessageProtocol: both ends AUTHENTICATION; the server flushes the rejection then closes."""
    client = MessageProtocol(stages=client_stages(pki, key=OTHER_KEY))
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki, key=KEY))
    Link(client, server).run()
    for proto in (client, server):
        assert proto.end is not None
        assert proto.end.kind is EndKind.AUTHENTICATION
        assert proto.state is State.DRAINING
        assert proto.close_action is Action.CLOSE
    assert (
        client.end is not None and client.end.reason == "authentication failed: the server rejected our key"
    )
    error = client.closed_error()
    assert (error.clean, error.kind) == (False, EndKind.AUTHENTICATION)


def test_wrong_key_with_a_queued_message_still_closes() -> None:
    """A client that queued a message before its key was rejected still gets a close_action."""
    client = MessageProtocol(stages=client_stages(key=OTHER_KEY))
    server = MessageProtocol(server_side=True, stages=server_stages(key=KEY))
    client.send_message(b"early")
    Link(client, server).run()
    assert client.end is not None and client.end.kind is EndKind.AUTHENTICATION
    assert client.close_action is Action.CLOSE


# -- PROXY header --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("reads", [_whole, _bytewise], ids=["one-chunk", "byte-by-byte"])
def test_proxy_tls_and_auth_together(pki: Pki, version: int, reads: Callable[[bytes], list[bytes]]) -> None:
    """A PROXY header and the ClientHello in one chunk (or byte by byte), then TLS, then auth: all pass, the peer is the proxied one."""
    info = PROXY_V1 if version == 1 else PROXY_V2
    opened: list[str] = []

    class Observer:
        def connection_opened(self, proto: MessageProtocol) -> None:
            opened.append(proto.peer)

        def connection_ended(self, proto: MessageProtocol) -> None:
            pass

    client = MessageProtocol(stages=client_stages(pki, key=KEY))
    server = MessageProtocol(
        server_side=True,
        stages=server_stages(pki, key=KEY, proxy_protocol=True),
        peer_address=("127.0.0.1", 50000),
        observer=Observer(),
    )
    assert server.peer == "127.0.0.1:50000"
    client.send_message(b"through everything")
    link = Link(client, server, prefix=serialize(info), reads=reads).run()
    assert server.proxy_info == info
    assert server.peer == PROXY_PEERS[version]
    assert server.peer_address == info.source
    assert opened == [PROXY_PEERS[version]]
    assert link.at_client == [b"through everything"]
    assert client.handshake_complete and server.handshake_complete


def test_proxy_header_and_frames_in_one_read() -> None:
    """Frames right behind a PROXY header in the same read are the application's."""
    server = MessageProtocol(server_side=True, stages=server_stages(proxy_protocol=True))
    assert server.receive_data(serialize(PROXY_V1) + encode(b"a") + encode(b"b")) == [b"a", b"b"]
    assert server.stats.bytes_received == 2 * len(encode(b"a"))


def test_bad_proxy_header() -> None:
    """Bytes that are no PROXY header fail the first stage: PROXY_PROTOCOL with the parser's words."""
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(proxy_protocol=True))
    assert server.receive_data(b"GET / HTTP/1.0\r\n") == []
    assert server.end is not None
    assert server.end.kind is EndKind.PROXY_PROTOCOL
    assert server.end.reason.startswith("bad PROXY header signature: b'GET / HTTP/1.0\\r\\n' starts neither")
    assert server.close_action is Action.CLOSE


# -- EOF in each stage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "feed", "stage", "kind", "reason"),
    [
        (
            lambda pki: server_stages(proxy_protocol=True),
            b"",
            Stage.PROXY,
            EndKind.PROXY_PROTOCOL,
            "connection closed after 0 bytes of a PROXY header: b''",
        ),
        (
            lambda pki: server_stages(proxy_protocol=True),
            b"PROXY TCP4",
            Stage.PROXY,
            EndKind.PROXY_PROTOCOL,
            "connection closed after 10 bytes of a PROXY header: b'PROXY TCP4'",
        ),
        (
            lambda pki: server_stages(pki),
            b"",
            Stage.TLS,
            EndKind.TLS,
            "connection closed by the peer during the TLS handshake",
        ),
        (
            lambda pki: client_stages(pki),
            b"",
            Stage.TLS,
            EndKind.TLS,
            "connection closed by the peer during the TLS handshake",
        ),
        (
            lambda pki: server_stages(key=KEY),
            b"",
            Stage.AUTH,
            EndKind.AUTHENTICATION,
            "connection closed by the peer before its authentication hello: "
            "the peer may not be configured with an auth key",
        ),
        (
            lambda pki: server_stages(key=KEY),
            MAGIC[:7],
            Stage.AUTH,
            EndKind.AUTHENTICATION,
            "connection closed by the peer during the authentication handshake, "
            "after 7 of the 45 bytes of the peer's hello",
        ),
        (
            lambda pki: client_stages(key=KEY),
            MAGIC + SERVER_NONCE,
            Stage.AUTH,
            EndKind.AUTHENTICATION,
            "connection closed by the peer during the authentication handshake, "
            "after 0 of the 33 bytes of the server's confirmation",
        ),
    ],
    ids=[
        "proxy-empty",
        "proxy-partial",
        "tls-server",
        "tls-client",
        "auth-empty",
        "auth-partial",
        "auth-confirm",
    ],
)
def test_eof_during_each_stage(
    pki: Pki, make: Callable[[Pki], Stages], feed: bytes, stage: Stage, kind: EndKind, reason: str
) -> None:
    """The peer's EOF in the middle of a stage fails it as a close by the peer, worded by the stage."""
    stages = make(pki)
    if feed:
        stages.receive_data(feed)
    stages.receive_eof()
    assert stages.failure == StageFailure(stage, kind, reason, by_peer_close=True)
    stages.receive_eof()  # once failed, nothing changes
    assert stages.failure == StageFailure(stage, kind, reason, by_peer_close=True)
    # Through MessageProtocol: the same end, flushed then closed.
    proto = MessageProtocol(server_side=stages.server_side, close_on_eof=True, stages=make(pki))
    if feed:
        proto.receive_data(feed)
    proto.receive_eof()
    assert proto.end == End(kind, reason)
    assert proto.close_action is Action.CLOSE


def test_reset_during_a_stage(pki: Pki) -> None:
    """A reset during the TLS handshake is a TLS end worded with the OS error and the stage."""
    proto = MessageProtocol(server_side=True, stages=server_stages(pki))
    proto.connection_lost(ConnectionResetError())
    assert proto.end == End(EndKind.TLS, "connection reset by peer during the TLS handshake")
    closed = MessageProtocol(server_side=True, stages=server_stages(pki))
    closed.connection_lost(None)
    assert closed.end == End(EndKind.TLS, "connection closed during the TLS handshake")


def test_eof_after_the_stages_is_an_ordinary_eof(pki: Pki) -> None:
    """Once the stages passed, the peer's EOF is the end of the stream like any other (CLEAN at a frame boundary)."""
    client = MessageProtocol(stages=client_stages(pki))
    server = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(pki))
    Link(client, server).run()
    server.receive_eof()
    assert server.end == End(EndKind.CLEAN, "peer closed the connection")


def test_send_eof_during_the_stages_drops_the_connection(pki: Pki) -> None:
    """send_eof before the stages passed: nothing was served, so the connection ends at once as SHUTDOWN (a reset)."""
    proto = MessageProtocol(server_side=True, stages=server_stages(pki))
    proto.send_eof()
    assert proto.end == End(EndKind.SHUTDOWN, "closed during the handshake: server shutting down")
    assert (proto.state, proto.close_action) == (State.CLOSED, Action.ABORT)


# -- health checks (PROXY v2 LOCAL) -----------------------------------------------------------


def test_proxy_local_then_eof_is_a_health_check() -> None:
    """A PROXY v2 LOCAL header then the peer's EOF (HAProxy check-send-proxy) is a HEALTH_CHECK, not a connection."""
    proto = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(proxy_protocol=True))
    assert proto.receive_data(LOCAL) == []
    proto.receive_eof()
    proto.connection_lost(None)
    assert proto.end == End(EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)")


def test_proxy_local_then_reset_is_a_health_check() -> None:
    """A PROXY v2 LOCAL header then a reset is a HEALTH_CHECK: clean, no error."""
    proto = MessageProtocol(server_side=True, close_on_eof=True, stages=server_stages(proxy_protocol=True))
    proto.receive_data(LOCAL)
    proto.connection_lost(ConnectionResetError())
    assert proto.end == End(EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)")
    assert proto.end.kind.clean and not proto.end.kind.is_error


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_proxy_local_then_the_end_during_tls_is_a_health_check(pki: Pki, how: str) -> None:
    """A PROXY v2 LOCAL header, then EOF or reset during the TLS stage: a HEALTH_CHECK, ended at once."""
    proto = MessageProtocol(
        server_side=True, close_on_eof=True, stages=server_stages(pki, proxy_protocol=True)
    )
    proto.receive_data(LOCAL)
    if how == "eof":
        proto.receive_eof()
        assert (proto.state, proto.close_action) == (State.CLOSED, Action.CLOSE)
    else:
        proto.connection_lost(ConnectionResetError())
    assert proto.end == End(EndKind.HEALTH_CHECK, "health check (PROXY LOCAL)")


def test_proxy_local_with_traffic_is_not_a_health_check() -> None:
    """A LOCAL connection that carried messages is an ordinary one: its reset is a RESET."""
    proto = MessageProtocol(server_side=True, stages=server_stages(proxy_protocol=True))
    assert proto.receive_data(LOCAL + encode(b"real")) == [b"real"]
    proto.connection_lost(ConnectionResetError())
    assert proto.end is not None and proto.end.kind is EndKind.RESET


def test_proxy_v1_then_reset_is_not_a_health_check() -> None:
    """Only a LOCAL header makes a health check: a PROXY v1 header then a reset is a RESET."""
    proto = MessageProtocol(server_side=True, stages=server_stages(proxy_protocol=True))
    proto.receive_data(serialize(PROXY_V1))
    proto.connection_lost(ConnectionResetError())
    assert proto.end is not None and proto.end.kind is EndKind.RESET


# -- timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "feed", "timeout", "reason"),
    [
        (
            lambda pki: server_stages(proxy_protocol=True),
            b"",
            10,
            "handshake timeout: no PROXY header within 10 s",
        ),
        (
            lambda pki: server_stages(proxy_protocol=True),
            b"PROXY",
            2.5,
            "handshake timeout: the PROXY header was not complete within 2.5 s (5 bytes received)",
        ),
        (
            lambda pki: server_stages(pki, proxy_protocol=True),
            serialize(PROXY_V1),
            10,
            "handshake timeout: the TLS handshake did not complete within 10 s",
        ),
        (
            lambda pki: server_stages(pki),
            b"",
            0.5,
            "handshake timeout: the TLS handshake did not complete within 0.5 s",
        ),
        (
            lambda pki: server_stages(key=KEY),
            b"",
            10,
            "handshake timeout: the authentication handshake did not complete within 10 s",
        ),
        (
            lambda pki: client_stages(key=KEY),
            b"",
            3,
            "handshake timeout: the authentication handshake did not complete within 3 s",
        ),
    ],
    ids=["proxy-none", "proxy-partial", "tls-after-proxy", "tls", "auth", "auth-client"],
)
def test_timeout_reason_wording(
    pki: Pki, make: Callable[[Pki], Stages], feed: bytes, timeout: float, reason: str
) -> None:
    """timeout_reason names the stage that did not finish, and how far a PROXY header got."""
    stages = make(pki)
    if feed:
        stages.receive_data(feed)
    assert stages.timeout_reason(timeout) == reason
    proto = MessageProtocol(
        server_side=stages.server_side,
        limits=Limits(idle_timeout=None, message_timeout=None, handshake_timeout=timeout),
        stages=make(pki),
    )
    proto.check_timeouts(0.0)
    if feed:
        proto.receive_data(feed)
    assert proto.check_timeouts(timeout + 0.01) == End(EndKind.HANDSHAKE_TIMEOUT, reason)
    assert proto.close_action is Action.ABORT
