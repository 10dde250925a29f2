"""Reading replies in the general mode: receive, decrypt, parse, hand to the ledger.

Each read goes to the connection's :class:`~msgsock.protocol.MessageProtocol`; its
messages go to the ledger (:meth:`.ledger._Ledger.verify`), then the connection is
refilled.  Under TLS each read is decrypted in one call first (the stages stay on as the
record layer).  The protocol never raises for the server's bytes: when they break the
frame format, the replies before the bad header are checked, then the connection ends
as the protocol decided (**protocol**, or **auth**/**tls** when the bytes are a
handshake this side does not speak).
"""

from __future__ import annotations

import time
from typing import Any

from ...auth import MAGIC as _AUTH_MAGIC
from ...exceptions import EndKind
from ...protocol import End, State
from ...stages import StageFailure, Stages
from .conn import _DEAD, _OPEN, _Conn
from .kinds import _report_kind
from .send import _Sender

_TLS_RECORD_HEADS = (b"\x15\x03", b"\x16\x03")  # a TLS alert or handshake record
_SPEAKS_TLS = "the server speaks TLS (a TLS record arrived): use --tls or --tls-ca"
_OPEN_STATE = State.OPEN


class _Receiver(_Sender):
    """The reading side of a worker in the general mode, and the ends a read can reveal."""

    def _decrypt(self, c: _Conn, stages: Stages, n: int) -> memoryview | None:
        """TLS: the plaintext of the ``n`` bytes just read into the receive buffer.

        Returns None when there is nothing to check yet (a partial record), or when the
        connection ended (the server's close_notify, a TLS alert): then it is counted.
        """
        plain = stages.receive_data(self._mv[:n])
        extra = stages.data_to_send()  # rare after the handshake (a TLS key update)
        if extra:
            c.out.append(extra)
            self._flush(c)
            if c.state != _OPEN:
                return None
        if stages.failure is not None:
            self._tls_failed(c, stages.failure, plain)
            return None
        if stages.tls_eof:
            if plain:
                self._to_general(c)
                self._on_plain(c, plain, time.monotonic_ns(), refill=False)
            if c.state == _OPEN:
                self._eof(c)
            return None
        return memoryview(plain) if plain else None

    def _on_read(self, c: _Conn, now: int = 0) -> None:
        """``c`` is readable (TCP, general mode): read once and check what arrived."""
        try:
            n = c.sock.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._io_failed(c, exc, "receive")
            return
        if n == 0:
            self._eof(c)
            return
        stages = c.stages
        if stages is None:
            data = self._mv[:n]
        else:
            view = self._decrypt(c, stages, n)
            if view is None:
                return
            data = view
        self.wire_in += len(data)
        self._on_plain(c, data, time.monotonic_ns())

    def _on_plain(self, c: _Conn, data: bytes | memoryview, now: int, *, refill: bool = True) -> None:
        """General mode: check the replies in ``data`` (plaintext), then refill ``c``.

        Its protocol never raises for the server's bytes: when they break the frame
        format, the replies before the bad header are checked (without a refill), then
        the connection ends as the protocol decided.
        """
        proto = c.proto
        assert proto is not None
        msgs = proto.receive_data(data)
        if proto.state is _OPEN_STATE:
            if msgs:
                self._on_messages(c, msgs, now, refill)
            return
        if msgs:
            self._on_messages(c, msgs, now, False)
        end = proto.end
        if c.state != _DEAD and end is not None:
            self._bad_frame(c, end, data)

    def _on_read_udp(self, c: _Conn, now: int = 0) -> None:
        """``c`` is readable (UDP): read up to 64 datagrams and check them."""
        sock = c.sock
        msgs = []
        try:
            for _ in range(64):
                data = sock.recv(65536)
                self.wire_in += len(data)
                msgs.append(data)
        except BlockingIOError:
            pass
        except ConnectionRefusedError:
            self._kill(c, "refused", "port unreachable (ICMP)")
            return
        except OSError as exc:
            self._io_failed(c, exc, "receive")
            return
        if msgs:
            self._on_messages(c, msgs, time.monotonic_ns())

    def _on_messages(self, c: _Conn, msgs: list[Any], now: int, refill: bool = True) -> None:
        """Check every reply of one read; refill the connection (unless it is ending)."""
        self.ledger.verify(c, msgs, now)
        if refill and c.state == _OPEN:
            self._refill(c, now)

    def _stream_mismatch(self, c: _Conn, view: memoryview) -> None:
        """A read that is not the next expected bytes: parse and classify it per message."""
        data = view.tobytes()
        self._to_general(c)
        self._on_plain(c, data, time.monotonic_ns())

    # -- ends a read reveals ------------------------------------------------------------

    def _eof(self, c: _Conn) -> None:
        """The server closed the connection (EOF, or TLS's close_notify) mid-run: **closed**.

        Its protocol says whether that cut a reply short (an incomplete message).
        """
        self._to_general(c)  # so a reply begun in stream mode is in the protocol's decoder
        proto = c.proto
        assert proto is not None
        proto.receive_eof()
        proto.connection_lost()
        end = proto.end
        assert end is not None
        why = self._closed_text(c)
        if end.kind is not EndKind.CLEAN:
            why += f" ({end.reason})"
        self._kill(c, _report_kind(end.kind), why)

    def _bad_frame(self, c: _Conn, end: End, data: bytes | memoryview) -> None:
        """End ``c`` after bytes that broke the frame format (``end``, as its protocol decided),
        saying so when they are a handshake this side does not speak (a server that requires
        TLS or a key)."""
        head = bytes(data[: len(_AUTH_MAGIC)])
        if head == _AUTH_MAGIC and self.auth_key is None:
            why = "the server requires authentication (its handshake hello arrived): use --auth-key-file"
            self.reasons.setdefault("auth", why)
            self._kill(c, "auth", why)
        elif head[:2] in _TLS_RECORD_HEADS and not self.tls:
            self.reasons.setdefault("tls", _SPEAKS_TLS)
            self._kill(c, "tls", _SPEAKS_TLS)
        else:
            self._kill(c, _report_kind(end.kind), f"bad frame from the server: {end.reason}")

    def _tls_failed(self, c: _Conn, failure: StageFailure, data: bytes) -> None:
        """The TLS record layer failed after the stages (an alert, a bad record): **tls**.

        ``data`` is what it decrypted before the failure: checked first, like any reply.
        """
        if data:
            self._to_general(c)
            self._on_plain(c, data, time.monotonic_ns(), refill=False)
            if c.state == _DEAD:
                return
        why = failure.reason + self._cert_hint(c)
        self.reasons.setdefault("tls", why)
        self._kill(c, _report_kind(failure.kind), why)
