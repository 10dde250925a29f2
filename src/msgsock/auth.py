"""Sans-I/O mutual shared-key authentication handshake (SPEC §4.2).

Before any application frame, a client and a server that share a secret key each
prove they know it, with HMAC-SHA256 over fresh nonces.  Neither side reveals the
key, a recorded exchange cannot be replayed (each side's nonce is new), and a
proof cannot be reflected back (each direction's MAC has its own label).

The exact bytes (version 1; ``|`` is concatenation; see also ``docs/handshake.md``)::

    MAGIC  = b"MSGSOCK-AUTH" + b"\\x01"                       13 bytes (name, version)
    HELLO  = MAGIC | nonce                                     45 bytes (32-byte nonce)

    client -> server   HELLO(Nc)                               at once, on connect
    server -> client   HELLO(Ns)                               at once, on accept
    client -> server   MACc                                    32 bytes, after HELLO(Ns)
    server -> client   0x01 | MACs                             33 bytes, if MACc is right
                   or  0x00                                    1 byte, then it closes

    MACc = HMAC-SHA256(key, MAGIC | b"client" | Ns | Nc)
    MACs = HMAC-SHA256(key, MAGIC | b"server" | Nc | Ns)

The client checks MACs before it sends any application frame; the server checks
MACc before it sends MACs, so a peer without the key learns nothing that helps it.
Both compare MACs in constant time (``hmac.compare_digest``).  A side that receives
its own nonce as the peer's fails at once (a reflected hello).  Bytes that follow
the handshake in the same read are application bytes: :attr:`remaining`.

Why these choices:

- The hellos are sent at once by both sides, so a mismatch shows without a round
  trip: a client that sends frames instead fails on its first byte at the server
  ("bad handshake magic"), and a client with a key that meets a server without one
  has its hello read as a frame header whose length (``b"MSGS"`` as a 4-byte length,
  in either byte order, is over 1 GiB) exceeds the default max_size, so that server
  closes at once and the client reports the early close.
- The labels ``client``/``server`` and the opposite nonce orders give each
  direction its own MAC (domain separation); ``MAGIC`` in the MAC input binds the
  version, so a future version cannot be downgraded into this one.
- The explicit rejection byte lets the client say "the server rejected our key"
  rather than guess from a closed connection.

Theory of operation: :class:`ClientHandshake` and :class:`ServerHandshake` are
plain state machines.  The I/O layer writes :meth:`~_Handshake.data_to_send` (the
hello is queued at construction), feeds every received chunk to
:meth:`~_Handshake.receive_data`, writes again, and stops when :attr:`~_Handshake.done`
is true; then it hands :attr:`~_Handshake.remaining` to the frame decoder.  On a
:class:`~msgsock.exceptions.HandshakeError` it writes whatever
:meth:`~_Handshake.data_to_send` still returns (the server's rejection byte), then
closes.  Randomness is the caller's: each side takes its nonce as an argument
(:func:`new_nonce` gives one), so the core stays deterministic and testable.

What it does not do: it authenticates the peer at connect time only.  It neither
encrypts nor protects the frames that follow, so an active man-in-the-middle can
relay the handshake and then take over the stream.  On an untrusted network, run it
inside TLS.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from typing import Final

from .exceptions import HandshakeError, InvalidState

__all__ = [
    "ACCEPTED",
    "HELLO_SIZE",
    "MAC_SIZE",
    "MAGIC",
    "MIN_KEY_SIZE",
    "NONCE_SIZE",
    "REJECTED",
    "ClientHandshake",
    "ServerHandshake",
    "client_proof",
    "new_nonce",
    "parse_key_file",
    "server_proof",
]

MAGIC: Final = b"MSGSOCK-AUTH\x01"
"""Protocol name and version byte: the first bytes each side sends."""

NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32  # HMAC-SHA256
HELLO_SIZE: Final = len(MAGIC) + NONCE_SIZE
MIN_KEY_SIZE: Final = 16
"""Shortest key accepted, in bytes (128 bits)."""

ACCEPTED: Final = 0x01
REJECTED: Final = 0x00

_NAME = MAGIC[:-1]  # the part before the version byte


def parse_key_file(data: bytes) -> bytes:
    """Return the key held in a key file's contents.

    The key is the file's bytes, less one trailing newline (``\\n`` or ``\\r\\n``)
    so a key written by an editor or ``echo`` works.  Any bytes are allowed; a
    random key such as ``python -c "import secrets; print(secrets.token_hex(32))"``
    is recommended.  Reading the file is the caller's I/O.

    Raises:
        ValueError: the key is shorter than :data:`MIN_KEY_SIZE` bytes.
    """
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    return _check_key(data)


def new_nonce() -> bytes:
    """Return a fresh random nonce for one handshake (``secrets.token_bytes``)."""
    return secrets.token_bytes(NONCE_SIZE)


def client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Return MACc, the client's proof that it knows ``key``."""
    return hmac.new(key, MAGIC + b"client" + server_nonce + client_nonce, hashlib.sha256).digest()


def server_proof(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """Return MACs, the server's proof that it knows ``key``."""
    return hmac.new(key, MAGIC + b"server" + client_nonce + server_nonce, hashlib.sha256).digest()


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"auth key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(
            f"auth key is {len(key)} bytes; at least {MIN_KEY_SIZE} are required "
            "(a key file holds the key's bytes; one trailing newline is ignored)"
        )
    return key


class _State(enum.Enum):
    HELLO = "the peer's hello"
    PROOF = "the client's proof"
    CONFIRM = "the server's confirmation"
    DONE = "nothing"


class _Handshake:
    """What both sides share: the hello, buffering, errors, and the output queue."""

    _role = ""

    def __init__(self, key: bytes, nonce: bytes) -> None:
        self._key = _check_key(key)
        if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} random bytes (use new_nonce())")
        self.nonce = bytes(nonce)
        """Our nonce."""
        self.peer_nonce: bytes | None = None
        """The peer's nonce, once its hello arrived."""
        self.remaining = b""
        """Application bytes that arrived after the handshake, once :attr:`done`."""
        self._state = _State.HELLO
        self._buf = bytearray()
        self._out = bytearray(MAGIC + self.nonce)
        self._error: HandshakeError | None = None

    @property
    def done(self) -> bool:
        """True once both sides have proved they know the key."""
        return self._state is _State.DONE

    @property
    def heard_from_peer(self) -> bool:
        """True once any byte of the peer's handshake has arrived."""
        return self.peer_nonce is not None or bool(self._buf)

    @property
    def error(self) -> HandshakeError | None:
        """Why the handshake failed, if it did."""
        return self._error

    def data_to_send(self) -> bytes:
        """Return the bytes to write to the peer now, and forget them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes received from the peer.

        Raises:
            HandshakeError: the peer's bytes are not a valid handshake, or its proof
                is wrong (and again on every later call).
            InvalidState: the handshake is already done (bytes after it belong to
                the application).
        """
        if self._error is not None:
            raise self._error
        if self._state is _State.DONE:
            raise InvalidState("the handshake is done; pass later bytes to the application")
        self._buf += data
        try:
            self._advance()
        except HandshakeError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def receive_eof(self) -> None:
        """Tell the handshake the peer closed its side.

        Raises:
            HandshakeError: the handshake was not finished (or had already failed).
        """
        if self._error is not None:
            raise self._error
        if self._state is not _State.DONE:
            self._error = HandshakeError(self._eof_reason())
            raise self._error

    def _eof_reason(self) -> str:
        got = len(self._buf)
        if self._state is _State.HELLO and got == 0:
            return (
                "connection closed by the peer before its authentication hello: "
                "the peer may not be configured with an auth key"
            )
        need = {_State.HELLO: HELLO_SIZE, _State.PROOF: MAC_SIZE, _State.CONFIRM: 1 + MAC_SIZE}[self._state]
        return (
            f"connection closed by the peer during the authentication handshake, "
            f"after {got} of the {need} bytes of {self._state.value}"
        )

    def _take_hello(self) -> bool:
        """Check the peer's hello as far as it arrived; True once it is complete.

        Raises:
            HandshakeError: bad magic, another version, or our own nonce sent back.
        """
        buf = self._buf
        k = min(len(buf), len(MAGIC))
        if buf[:k] != MAGIC[:k]:
            if k == len(MAGIC) and buf[: len(_NAME)] == _NAME:
                raise HandshakeError(
                    f"unsupported authentication handshake version {buf[len(_NAME)]} from the peer "
                    f"(this side speaks {MAGIC[-1]})"
                )
            raise HandshakeError(
                f"bad handshake magic: expected {MAGIC!r}, got {bytes(buf[:k])!r}: the peer does not "
                "speak the msgsock authentication handshake (is it configured with an auth key?)"
            )
        if len(buf) < HELLO_SIZE:
            return False
        peer_nonce = bytes(buf[len(MAGIC) : HELLO_SIZE])
        del buf[:HELLO_SIZE]
        if hmac.compare_digest(peer_nonce, self.nonce):
            raise HandshakeError("the peer sent our own nonce back: a reflected handshake")
        self.peer_nonce = peer_nonce
        return True

    def _advance(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} state={self._state.name} error={self._error!r}>"


class ClientHandshake(_Handshake):
    """The client side of the handshake.  Sans-I/O.

    Args:
        key: the shared key (at least :data:`MIN_KEY_SIZE` bytes).
        nonce: :data:`NONCE_SIZE` fresh random bytes (:func:`new_nonce`).

    Raises:
        ValueError: a short key or a nonce of the wrong size.
        TypeError: a key that is not bytes.
    """

    def _advance(self) -> None:
        if self._state is _State.HELLO:
            if not self._take_hello():
                return
            assert self.peer_nonce is not None
            self._out += client_proof(self._key, self.peer_nonce, self.nonce)
            self._state = _State.CONFIRM
        buf = self._buf
        if not buf:
            return
        status = buf[0]
        if status == REJECTED:
            raise HandshakeError("authentication failed: the server rejected our key")
        if status != ACCEPTED:
            raise HandshakeError(f"bad handshake status byte 0x{status:02x} from the server")
        if len(buf) < 1 + MAC_SIZE:
            return
        assert self.peer_nonce is not None
        expected = server_proof(self._key, self.nonce, self.peer_nonce)
        if not hmac.compare_digest(bytes(buf[1 : 1 + MAC_SIZE]), expected):
            raise HandshakeError("authentication failed: the peer does not know the key (bad server proof)")
        self.remaining = bytes(buf[1 + MAC_SIZE :])
        self._buf = bytearray()
        self._state = _State.DONE


class ServerHandshake(_Handshake):
    """The server side of the handshake.  Sans-I/O.

    Args:
        key: the shared key (at least :data:`MIN_KEY_SIZE` bytes).
        nonce: :data:`NONCE_SIZE` fresh random bytes (:func:`new_nonce`).

    Raises:
        ValueError: a short key or a nonce of the wrong size.
        TypeError: a key that is not bytes.
    """

    def _advance(self) -> None:
        if self._state is _State.HELLO:
            if not self._take_hello():
                return
            self._state = _State.PROOF
        buf = self._buf
        if len(buf) < MAC_SIZE:
            return
        assert self.peer_nonce is not None
        expected = client_proof(self._key, self.nonce, self.peer_nonce)
        if not hmac.compare_digest(bytes(buf[:MAC_SIZE]), expected):
            # Tell the client why before the I/O layer closes: the byte reveals
            # nothing it does not learn from the close itself.
            self._out.append(REJECTED)
            raise HandshakeError("authentication failed: the peer does not know the key")
        self._out.append(ACCEPTED)
        self._out += server_proof(self._key, self.peer_nonce, self.nonce)
        self.remaining = bytes(buf[MAC_SIZE:])
        self._buf = bytearray()
        self._state = _State.DONE
