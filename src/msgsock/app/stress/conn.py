"""One worker's connections: their sockets and states, and how a connection ends.

Theory of operation
-------------------
A worker is one event loop over a share of the connections.  It is built in layers,
each a class in its own module, each adding one job to the one below:

=======================  =======================================================
:class:`_Endpoint`       (here) the connections, the poller, ending a connection
``send._Sender``         building and writing messages; closed and open loop
``receive._Receiver``    reading, decrypting and checking replies (general mode)
``connect._Connector``   opening connections and running the client stages
``hotloop._StreamLoop``  stream mode's read-compare-write round (the hot loop)
``pump._Worker``         the poll loop: phases, timeouts, ticks, the result
=======================  =======================================================

What was written and what came back is the ledger's (:mod:`.ledger`, sans-I/O); how a
connection ended is decided by the sans-I/O core, never read from message text: a
socket error is worded and classified by :func:`msgsock.protocol.describe_os_error`, a
failed stage by its :class:`~msgsock.stages.StageFailure`, a bad frame or a stream cut
mid-frame by the connection's :class:`~msgsock.protocol.MessageProtocol`; each
:class:`~msgsock.exceptions.EndKind` counts under one kind of the report
(:func:`.kinds._report_kind`).
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from typing import Any

from ...protocol import MessageProtocol, describe_os_error
from ...stages import Stages
from .config import StressConfig, _Share
from .kinds import _report_kind
from .ledger import _Ledger
from .payload import _Payloads
from .poller import _poller
from .stream import _stream_eligible, _StreamAccount, _StreamLayout

_RECV_SIZE = 256 * 1024
_CONNECTING, _OPEN, _DEAD, _SECURING = 0, 1, 2, 3


class _Conn(_StreamAccount):
    """One connection: its socket and state, on top of its ledger record."""

    __slots__ = (
        "backlog",
        "connect_deadline",
        "events",
        "fd",
        "hs_head",
        "hs_out",
        "out",
        "proto",
        "sock",
        "stages",
        "state",
    )

    def __init__(self, cid: int, sock: socket.socket) -> None:
        """A new connection ``cid`` over the non-blocking ``sock``, still connecting."""
        super().__init__(cid)
        self.sock = sock
        self.fd = sock.fileno()
        self.state = _CONNECTING
        self.connect_deadline = 0
        # The core's stages (TLS, authentication) while _SECURING; afterwards the TLS
        # record layer, or None (plain TCP, or authentication only: frames as they are).
        self.stages: Stages | None = None
        self.hs_out = b""  # stage bytes not yet written
        self.hs_head = b""  # the first bytes the server sent during the stages
        # General mode: the frames and how they end (a bad frame, a stream cut mid-frame).
        self.proto: MessageProtocol | None = None
        self.out: list[bytes | memoryview] = []  # TCP: byte chunks; UDP: whole datagrams
        self.events = 0
        self.backlog: deque[int] = deque()  # open loop: intended times waiting for a depth slot


class _Endpoint:
    """The connections of one worker, their poller, and how a connection ends."""

    def __init__(
        self,
        cfg: StressConfig,
        share: _Share,
        address: tuple[int, Any],
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Set up the loop (no connection yet).

        Args:
            cfg: the run.
            share: this worker's part of it.
            address: ``(family, sockaddr)`` of the server.
            tls_context: the client TLS context; None builds one from ``cfg``
                when it asks for TLS.

        Raises:
            ValueError: a TLS certificate or key file of ``cfg`` is missing or invalid.
        """
        self.cfg = cfg
        self.share = share
        self.family, self.sockaddr = address
        self.udp = cfg.udp
        self.tls_context = tls_context if tls_context is not None else cfg.tls_context()
        self.tls = self.tls_context is not None
        self.server_hostname = cfg.server_hostname or cfg.host
        self.auth_key = cfg.auth_key
        self.secure = self.tls or self.auth_key is not None  # handshakes before the load
        self.reasons: dict[str, str] = {}  # the first reason of each tls/auth failure
        self.frame = cfg.frame
        self.payloads = _Payloads(cfg)
        self.ledger = _Ledger(self.payloads, cfg.timeout)
        # Stream mode (the common case): see .stream.  None: every connection is checked
        # message by message.
        self.layout = (
            _StreamLayout(cfg.frame, cfg.depth, share.connections, self.payloads)
            if _stream_eligible(cfg, self.payloads)
            else None
        )
        self.ep = _poller()
        self.conns: dict[int, _Conn] = {}
        self.live: list[_Conn] = []
        self.control_fd = -1
        self.control: Any = None
        self.stop_requested = False
        self._buf = bytearray(_RECV_SIZE)
        self._mv = memoryview(self._buf)
        self.wire_out = 0
        self.wire_in = 0
        self.backlogged = 0  # open loop: messages waiting for a depth slot
        self.unsent = 0  # open loop: messages that never got one
        self.established = 0
        self.failed = 0
        self.connect_ns = 0

    def _io_failed(self, c: _Conn, exc: OSError, what: str) -> None:
        """End ``c`` after a failed send or receive, as the core words and classifies it."""
        end = describe_os_error(exc)
        self._kill(c, _report_kind(end.kind), f"{what}: {end.reason}{self._cert_hint(c)}")

    def _to_general(self, c: _Conn, *, decode: bool = True) -> None:
        """Leave stream mode for good (see :meth:`.stream._StreamLayout.leave`).

        ``decode``: give it a protocol holding the verified start of an unfinished
        reply (not needed when the connection is ending on our side).
        """
        if not c.stream:
            return
        assert self.layout is not None
        proto = self.layout.leave(c, decode=decode)
        if proto is not None:
            c.proto = proto

    def _kill(self, c: _Conn, kind: str | None, why: str = "") -> None:
        """End a connection; ``kind`` None means we closed it ourselves (end of run)."""
        if c.state == _DEAD:
            return
        if c.stream:
            self._to_general(c, decode=False)  # so what it still owed is counted below
        was_open = c.state == _OPEN
        c.state = _DEAD
        counted = False
        if kind is not None and not self.stop_requested:
            self.ledger.error(kind, f"conn {c.cid}: {why or kind}")
            counted = True
        self.ledger.abort(c, count=counted)
        if c.backlog:
            self.backlogged -= len(c.backlog)
            self.unsent += len(c.backlog)
            c.backlog.clear()
        c.out = []
        try:
            self.ep.unregister(c.fd)
        except (OSError, KeyError, ValueError):
            pass
        self.conns.pop(c.fd, None)
        if was_open:
            try:
                self.live.remove(c)
            except ValueError:
                pass
        try:
            c.sock.close()
        except OSError:
            pass

    def _setup_failed(self, c: _Conn, kind: str, why: str) -> None:
        """Count a connection that could not be opened (``kind``), and close it."""
        self.failed += 1
        self.ledger.error(kind, f"conn {c.cid}: {why}")
        if kind in ("tls", "auth"):
            self.reasons.setdefault(kind, why)
        c.state = _DEAD
        c.stages = None
        try:
            self.ep.unregister(c.fd)
        except (OSError, KeyError, ValueError):
            pass
        self.conns.pop(c.fd, None)
        c.sock.close()

    def _want(self, c: _Conn, events: int) -> None:
        """Wait for ``events`` on ``c`` (registering it on first use)."""
        if not c.events:
            self.ep.register(c.fd, events)
        elif c.events != events:
            self.ep.modify(c.fd, events)
        c.events = events

    def _closed_text(self, c: _Conn) -> str:
        """Why a connection read the end of the stream, as far as the client can tell."""
        return f"closed by the server after {c.next_rx} messages{self._cert_hint(c)}"

    def _cert_hint(self, c: _Conn) -> str:
        """A hint for a TLS connection without a client certificate that ends before any reply."""
        if self.tls and self.cfg.tls_cert is None and c.next_rx == 0:
            # TLS 1.3: a server that requires a client certificate refuses the client only
            # after the client's handshake is over, often without an alert we could read.
            return " (does the server require a client certificate? --tls-cert)"
        return ""

    def _on_control(self) -> None:
        """Read the parent's messages on the control pipe (``--workers``): a stop, or its end."""
        try:
            while self.control.poll():
                msg = self.control.recv()
                if msg and msg[0] == "stop":
                    self.stop_requested = True
        except (EOFError, OSError):
            self.stop_requested = True  # the parent is gone
