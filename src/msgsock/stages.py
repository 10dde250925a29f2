"""Sans-I/O connection stages: PROXY header, TLS and the shared-key handshake (SPEC §3, §4.2, §7).

Theory of operation.  Before its first frame a connection may have to pass, in this
order: a PROXY protocol header (server side only, :mod:`msgsock.proxy`), a TLS
handshake (:class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`), and the mutual
shared-key handshake (:mod:`msgsock.auth`).  :class:`Stages` runs all of them as one
state machine, for either side: raw bytes in (:meth:`Stages.receive_data`), raw
bytes out (:meth:`Stages.data_to_send`), application bytes out once every stage has
passed.  With TLS it stays in the stream after the handshake as the record layer:
it decrypts what arrives and :meth:`Stages.encrypt` encrypts what leaves.

So every I/O layer drives every stage the same way, with no TLS of its own: it
gives a :class:`~msgsock.protocol.MessageProtocol` its ``Stages`` and only moves
bytes.  Bytes that follow one stage in the same read go to the next one (a PROXY
header followed at once by a ClientHello is fine: nothing has to stay in the
socket).

A failure never raises out of :meth:`receive_data`: it becomes :attr:`Stages.failure`
(the stage, the :class:`~msgsock.exceptions.EndKind`, the reason to log), and
:meth:`data_to_send` still holds what the peer should be told (a TLS alert, the
authentication rejection byte).  The core reads no clock: the one
``handshake_timeout`` deadline is kept by
:meth:`~msgsock.protocol.MessageProtocol.check_timeouts`, worded here by
:meth:`Stages.timeout_reason`.

This module imports :mod:`ssl` (for ``SSLObject`` and ``MemoryBIO`` only, which do no
I/O of their own); it touches no socket.
"""

from __future__ import annotations

import enum
import re
import ssl
from dataclasses import dataclass

from .auth import ClientHandshake, ServerHandshake, new_nonce
from .exceptions import EndKind, HandshakeError, ProxyProtocolError
from .proxy import ProxyHeaderParser, ProxyInfo

__all__ = ["Stage", "StageFailure", "Stages", "ssl_error_text"]

_TLS_READ = 256 * 1024
"""Plaintext bytes one ``SSLObject.read`` may return."""

_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


class Stage(enum.Enum):
    """Where a connection is in its stages (SPEC §7 order)."""

    PROXY = "proxy"
    TLS = "tls"
    AUTH = "auth"
    DONE = "done"

    @property
    def title(self) -> str:
        """The stage as log lines name it (``the TLS handshake``)."""
        return _TITLES[self]


_TITLES = {
    Stage.PROXY: "the PROXY header",
    Stage.TLS: "the TLS handshake",
    Stage.AUTH: "the authentication handshake",
    Stage.DONE: "the handshake",
}


@dataclass(frozen=True)
class StageFailure:
    """Why a connection failed in its stages.

    Attributes:
        stage: the stage that failed.
        kind: how the connection ends (``PROXY_PROTOCOL``, ``TLS``, ``AUTHENTICATION``).
        reason: the reason to log (``TLS handshake failed: [SSL: ...] ...``).
        by_peer_close: the peer closed or reset in the middle of the stage (rather
            than sending bad bytes): after a PROXY ``LOCAL`` header, a health check.
        error: the exception behind it (``ssl.SSLCertVerificationError`` keeps its
            ``verify_message``), when there is one.
    """

    stage: Stage
    kind: EndKind
    reason: str
    by_peer_close: bool = False
    error: BaseException | None = None


def ssl_error_text(exc: ssl.SSLError) -> str:
    """OpenSSL's words for a TLS failure, without the ``(_ssl.c:NNN)`` source position.

    E.g. ``[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca``, or the
    verification failure for a certificate we refused (``certificate verify failed:
    certificate has expired``).
    """
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return _SSL_SOURCE.sub("", text) or type(exc).__name__


class Stages:
    """The stages of one connection, and its TLS record layer afterwards.  Sans-I/O.

    Args:
        server_side: True for an accepted connection, False for one we opened.
        proxy_protocol: expect a PROXY v1/v2 header first (server side only).
        ssl_context: speak TLS with this context (a server or a client context).
        server_hostname: the name to verify the server's certificate against and
            send as SNI (client side; None sends none and needs a context that
            does not check host names).
        auth_key: run the shared-key authentication handshake with this key
            (at least 16 bytes).
        nonce: the authentication nonce (32 random bytes); None draws a fresh one.
            Injected so that tests are deterministic.

    Raises:
        ValueError: a PROXY header asked for on the client side, or a bad ``auth_key``.
        TypeError: ``ssl_context`` is not an :class:`ssl.SSLContext`, or ``auth_key``
            is not bytes.
    """

    __slots__ = (
        "_auth",
        "_auth_key",
        "_in",
        "_nonce",
        "_out",
        "_parser",
        "_pending",
        "_plain",
        "_tls_eof",
        "failure",
        "proxy_info",
        "server_side",
        "stage",
        "tls",
    )

    def __init__(
        self,
        *,
        server_side: bool,
        proxy_protocol: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        auth_key: bytes | None = None,
        nonce: bytes | None = None,
    ) -> None:
        if proxy_protocol and not server_side:
            raise ValueError("a PROXY protocol header is read by servers only")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        self.server_side = server_side
        self._auth_key = auth_key
        self._nonce = nonce if nonce is not None else (new_nonce() if auth_key is not None else b"")
        if auth_key is not None:  # a bad key fails here, not in the middle of the handshake
            (ServerHandshake if server_side else ClientHandshake)(auth_key, self._nonce)
        self._parser = ProxyHeaderParser() if proxy_protocol else None
        self.proxy_info: ProxyInfo | None = None
        """The PROXY header, once read."""
        self.tls: ssl.SSLObject | None = None
        """The TLS session (for ``getpeercert()``, ``version()``), when TLS is in use."""
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        if ssl_context is not None:
            self._in = ssl.MemoryBIO()
            self._out = ssl.MemoryBIO()
            self.tls = ssl_context.wrap_bio(
                self._in, self._out, server_side=server_side, server_hostname=server_hostname
            )
        self._auth: ClientHandshake | ServerHandshake | None = None
        self._pending = bytearray()  # raw bytes of our own to send (no TLS under them)
        self._plain = bytearray()  # application bytes that followed the last stage
        self._tls_eof = False
        self.failure: StageFailure | None = None
        """Why a stage failed (None while none has)."""
        self.stage = Stage.PROXY
        """The stage running now; ``DONE`` once all have passed."""
        self._advance(b"")

    # -- state ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once every stage has passed (and none failed)."""
        return self.stage is Stage.DONE and self.failure is None

    @property
    def encrypted(self) -> bool:
        """True when application bytes go through TLS."""
        return self.tls is not None

    @property
    def has_output(self) -> bool:
        """True while :meth:`data_to_send` has bytes to give."""
        return bool(self._pending) or (self._out is not None and self._out.pending > 0)

    @property
    def tls_eof(self) -> bool:
        """True once the peer's TLS ``close_notify`` arrived (its end of stream)."""
        return self._tls_eof

    def timeout_reason(self, timeout: float) -> str:
        """The log reason of stages that did not finish within ``timeout`` seconds."""
        parser = self._parser
        if self.stage is Stage.PROXY and parser is not None:
            if parser.buffered == 0:
                return f"handshake timeout: no PROXY header within {timeout:g} s"
            return (
                f"handshake timeout: the PROXY header was not complete within {timeout:g} s "
                f"({parser.buffered} bytes received)"
            )
        return f"handshake timeout: {self.stage.title} did not complete within {timeout:g} s"

    # -- bytes in ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take raw bytes from the peer; return the application bytes they carry.

        Returns ``b""`` while a stage is running, and after a failure (see
        :attr:`failure`); check :attr:`failure` and :meth:`data_to_send` after each call.
        """
        if self.failure is not None or self._tls_eof:
            return b""
        if self.stage is Stage.DONE:
            if self.tls is None:
                return bytes(data)
            self._in.write(data)  # type: ignore[union-attr]
            return self._read_tls()
        if self.tls is not None and self.stage is Stage.AUTH:
            # The TLS handshake is done: what arrives is records, decrypted first.
            self._in.write(data)  # type: ignore[union-attr]
            data = self._read_tls()
            if self.failure is not None:
                return b""
        self._advance(data)
        if self.done and self._plain:
            plain = bytes(self._plain)
            self._plain.clear()
            return plain
        return b""

    def receive_eof(self) -> None:
        """The peer closed its sending side: a stage still running fails."""
        if self.failure is not None or self.stage is Stage.DONE:
            return
        stage = self.stage
        why: str | None = None
        try:
            if stage is Stage.PROXY:
                assert self._parser is not None
                self._parser.eof()
            elif stage is Stage.AUTH:
                assert self._auth is not None
                self._auth.receive_eof()
        except (ProxyProtocolError, HandshakeError) as exc:
            why = str(exc)
        if why is None:
            why = f"connection closed by the peer during {stage.title}"
        self._fail(stage, why, by_peer_close=True)

    def connection_lost(self, reason: str) -> StageFailure | None:
        """The connection broke (``reason`` says how) in the middle of a stage.

        Returns:
            The failure, when a stage was running (else None: nothing to add).
        """
        if self.failure is not None or self.stage is Stage.DONE:
            return None
        why = f"{reason} during {self.stage.title}"
        if self.stage is Stage.AUTH and self._auth is not None and not self._auth.heard_from_peer:
            why += ": the peer may not be configured with an auth key"
        self._fail(self.stage, why, by_peer_close=True)
        return self.failure

    # -- bytes out --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return the raw bytes to write now (handshake bytes, TLS records), and forget them."""
        out = b""
        if self._pending:
            out = bytes(self._pending)
            self._pending.clear()
        if self._out is not None and self._out.pending:
            out += self._out.read()
        return out

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """Return ``data`` as it goes on the wire: TLS records, or the bytes themselves."""
        tls = self.tls
        if tls is None:
            if self._pending:  # our last stage bytes (the auth confirmation) go first
                out = bytes(self._pending) + bytes(data)
                self._pending.clear()
                return out
            return bytes(data)
        if data:
            tls.write(data)
        return self._out.read()  # type: ignore[union-attr]

    def close_notify(self) -> bytes:
        """Return TLS's ``close_notify`` to send before our EOF (``b""`` without TLS)."""
        tls = self.tls
        if tls is None or self.stage is not Stage.DONE or self.failure is not None:
            return b""
        try:
            tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # the peer's close_notify is not needed: we only say we are done
        return self._out.read()  # type: ignore[union-attr]

    # -- internals --------------------------------------------------------------------------

    def _fail(
        self, stage: Stage, reason: str, *, by_peer_close: bool = False, error: BaseException | None = None
    ) -> None:
        kind = {
            Stage.PROXY: EndKind.PROXY_PROTOCOL,
            Stage.TLS: EndKind.TLS,
            Stage.AUTH: EndKind.AUTHENTICATION,
            Stage.DONE: EndKind.TLS,
        }[stage]
        self.failure = StageFailure(stage, kind, reason, by_peer_close, error)

    def _advance(self, data: bytes | bytearray | memoryview) -> None:
        """Feed ``data`` to the running stage and start the next ones as far as they go."""
        while self.failure is None:
            stage = self.stage
            if stage is Stage.PROXY:
                parser = self._parser
                if parser is None:
                    self.stage = Stage.TLS
                    continue
                if not data:
                    return
                try:
                    info = parser.feed(data)
                except ProxyProtocolError as exc:
                    self._fail(stage, str(exc), error=exc)
                    return
                if info is None:
                    return
                self.proxy_info = info
                data = parser.remaining
                self.stage = Stage.TLS
            elif stage is Stage.TLS:
                tls = self.tls
                if tls is None:
                    self.stage = Stage.AUTH
                    continue
                if data:
                    self._in.write(data)  # type: ignore[union-attr]
                    data = b""
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    return
                except ssl.SSLError as exc:
                    self._fail(stage, f"TLS handshake failed: {ssl_error_text(exc)}", error=exc)
                    return
                self.stage = Stage.AUTH
                data = self._read_tls()  # application bytes that came with the last flight
                if self.failure is not None:
                    return
            elif stage is Stage.AUTH:
                key = self._auth_key
                if key is None:
                    self.stage = Stage.DONE
                    continue
                auth = self._auth
                if auth is None:  # our hello goes out at once: the hellos cross
                    auth = self._auth = (ServerHandshake if self.server_side else ClientHandshake)(
                        key, self._nonce
                    )
                    self._send(auth.data_to_send())
                if not data:
                    return
                try:
                    auth.receive_data(data)
                except HandshakeError as exc:
                    self._send(auth.data_to_send())  # the rejection byte: the client can say why
                    self._fail(stage, str(exc), error=exc)
                    return
                self._send(auth.data_to_send())
                if not auth.done:
                    return
                data = auth.remaining
                self.stage = Stage.DONE
            else:  # DONE
                if data:
                    self._plain += data
                return

    def _send(self, data: bytes) -> None:
        """Queue our own stage bytes (through TLS when it runs under them)."""
        if not data:
            return
        if self.tls is not None:
            self.tls.write(data)
        else:
            self._pending += data

    def _read_tls(self) -> bytes:
        """Decrypt every whole record received so far."""
        tls = self.tls
        assert tls is not None
        parts: list[bytes] = []
        while True:
            try:
                chunk = tls.read(_TLS_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._tls_eof = True  # the peer's close_notify: its end of stream
                break
            except ssl.SSLError as exc:
                self._fail(Stage.DONE, f"TLS error: {ssl_error_text(exc)}", error=exc)
                break
            if not chunk:
                self._tls_eof = True
                break
            parts.append(chunk)
        return b"".join(parts)
