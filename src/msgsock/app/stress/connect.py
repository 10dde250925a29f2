"""Opening a worker's connections: the TCP connect, then the client side of the core's stages.

TLS and authentication (``--tls``/``--tls-ca``/``--tls-cert``, ``--auth-key-file``;
SPEC §4.2, §7): after its TCP connect each connection runs the client side of the
core's stages (:class:`msgsock.stages.Stages`: the TLS handshake through an
``ssl.SSLObject`` over memory BIOs, then the shared-key handshake), non-blocking in the
same poll loop as the connects: the bytes read go to the stages, what they want sent is
written.  So many connections handshake at once and ``--connect-rate`` still paces
them; TCP connect and stages together must finish within ``--timeout``.  A connection
whose TLS handshake fails counts as **tls**, one whose authentication fails as
**auth**; the first reason of each (the core's words, with a hint of what to try) is
kept for the verdict.  With TLS 1.3 a server that refuses *our* certificate says so
only after the client's handshake: that shows on the connection's first read.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time

from ..._net import set_nodelay
from ...exceptions import EndKind
from ...protocol import MessageProtocol, describe_os_error, format_address
from ...stages import Stage, StageFailure, Stages
from .conn import _CONNECTING, _OPEN, _SECURING, _Conn
from .kinds import _report_kind
from .poller import _IN, _OUT
from .receive import _SPEAKS_TLS, _TLS_RECORD_HEADS, _Receiver


class _Connector(_Receiver):
    """Opens the connections of a worker and pumps their stages until each is open or failed."""

    def _open(self, cid: int, now: int) -> None:
        """Create connection ``cid``'s socket and start its connect (UDP: connect it at once)."""
        kind = socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM
        try:
            sock = socket.socket(self.family, kind)
        except OSError as exc:
            self.failed += 1
            hint = " (raise the open-files limit: ulimit -n)" if exc.errno == errno.EMFILE else ""
            why = describe_os_error(exc).reason
            self.ledger.error("refused", f"conn {cid}: cannot create a socket: {why}{hint}")
            return
        sock.setblocking(False)
        c = _Conn(cid, sock)
        self.conns[c.fd] = c
        if self.udp:
            try:
                sock.connect(self.sockaddr)  # no handshake: fixes the peer, enables ICMP errors
            except OSError as exc:
                self._connect_failed(c, exc)
                return
            self._connected(c, now)
            return
        # One deadline for the TCP connect and the stages that follow it.
        c.connect_deadline = now + self.ledger.timeout_ns
        err = sock.connect_ex(self.sockaddr)
        if err in (0, errno.EISCONN):
            self._tcp_connected(c, now)
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY):
            c.events = _OUT
            self.ep.register(c.fd, _OUT)
        else:
            self._connect_failed(c, OSError(err, os.strerror(err)))

    def _connected(self, c: _Conn, now: int) -> None:
        """``c`` is ready for the load: open it (in stream mode when the run allows)."""
        c.state = _OPEN
        if not self.udp:
            set_nodelay(c.sock)
            if self.layout is not None:
                c.stream = True  # the protocol is made if it ever leaves stream mode
            else:
                c.proto = MessageProtocol(self.frame)
        if c.events:
            self.ep.modify(c.fd, _IN)
        else:
            self.ep.register(c.fd, _IN)
        c.events = _IN
        self.established += 1
        self.live.append(c)

    def _connect_failed(self, c: _Conn, exc: OSError) -> None:
        # "timeout" for a connect that did not finish in --timeout; every other failure
        # (refused, unreachable, no ephemeral port left) is a refused connection.
        kind = "timeout" if isinstance(exc, TimeoutError) else "refused"
        self._setup_failed(
            c, kind, f"connect to {format_address(self.sockaddr)}: {describe_os_error(exc).reason}"
        )

    def _tcp_connected(self, c: _Conn, now: int) -> None:
        """The TCP connect succeeded: open ``c``, or first start its stages."""
        if not self.secure:
            self._connected(c, now)
            return
        set_nodelay(c.sock)  # the stages' small writes go out at once
        try:
            stages = Stages(
                server_side=False,
                ssl_context=self.tls_context,
                server_hostname=self.server_hostname if self.tls else None,
                auth_key=self.auth_key,
            )
        except (ValueError, ssl.SSLError) as exc:  # e.g. an invalid --tls-server-name
            self._setup_failed(c, "tls", f"TLS setup failed: {exc}")
            return
        c.stages = stages
        c.hs_out = stages.data_to_send()  # the ClientHello, or our authentication hello
        c.state = _SECURING
        self._secure_step(c, now)

    def _secure_step(self, c: _Conn, now: int) -> None:
        """Pump ``c``'s stages (TLS, then authentication) as far as the socket allows.

        Non-blocking: where the socket must wait, ``c`` waits for the event it needs and
        the poll loop calls again.  Once every stage has passed the connection is open;
        on a failure it is counted (**tls** or **auth**) and closed.
        """
        stages = c.stages
        assert stages is not None
        sock = c.sock
        mv = self._mv
        while True:
            while c.hs_out:
                try:
                    c.hs_out = c.hs_out[sock.send(c.hs_out) :]
                except BlockingIOError:
                    self._want(c, _OUT)
                    return
                except OSError as exc:
                    self._stages_lost(c, exc)
                    return
            try:
                n = sock.recv_into(self._buf)
            except BlockingIOError:
                self._want(c, _IN)
                return
            except OSError as exc:
                self._stages_lost(c, exc)
                return
            rest = b""
            if n:
                if len(c.hs_head) < 2:
                    c.hs_head += bytes(mv[: 2 - len(c.hs_head)])
                rest = stages.receive_data(mv[:n])
            else:
                stages.receive_eof()
            c.hs_out += stages.data_to_send()
            failure = stages.failure
            if failure is not None:
                try:  # what the peer should be told (a TLS alert), if the socket takes it now
                    sock.send(c.hs_out)
                except OSError:
                    pass
                self._stages_failed(c, failure)
                return
            if stages.done:
                self._secured(c, now, rest)
                return

    def _stages_lost(self, c: _Conn, exc: OSError) -> None:
        """The socket failed in the middle of the stages: the core words it (``... during
        the TLS handshake``)."""
        assert c.stages is not None
        failure = c.stages.connection_lost(describe_os_error(exc).reason)
        assert failure is not None  # the stages are running
        self._stages_failed(c, failure)

    def _stages_failed(self, c: _Conn, failure: StageFailure) -> None:
        """Count a connection whose stages failed, under the failure's kind (**tls**,
        **auth**), with its reason and a hint of what the server may want instead."""
        kind = _report_kind(failure.kind)
        why = failure.reason
        if failure.stage is Stage.AUTH and not self.tls and c.hs_head in _TLS_RECORD_HEADS:
            kind, why = "tls", _SPEAKS_TLS  # a TLS server's alert for our hello
        elif failure.by_peer_close:
            why += self._stage_hint(c, failure.stage)
        self._setup_failed(c, kind, why)

    def _stage_hint(self, c: _Conn, stage: Stage) -> str:
        """What a server that hung up in the middle of ``stage`` may want instead."""
        if stage is Stage.TLS:
            return " (does the server serve TLS?)"
        if stage is Stage.AUTH:
            if self.tls:
                if self.cfg.tls_cert is None:  # TLS 1.3: refused after our handshake
                    return ", or it requires a client certificate (--tls-cert)"
            elif not c.hs_head:
                # A TLS server reads our hello as a bad TLS record and hangs up, often silently.
                return ", or it requires TLS (--tls)"
        return ""

    def _secured(self, c: _Conn, now: int, rest: bytes) -> None:
        """Every stage has passed: open ``c`` for the load.

        ``rest`` is what the server sent after the stages, before any message of ours:
        an echo server sends nothing, so any frame in it is classified as an unexpected
        reply (corrupted), as the load would have.
        """
        stages = c.stages
        assert stages is not None
        # With TLS the stages stay as the record layer; authentication alone leaves the
        # frames as they are (no copy through the stages on the hot path).
        c.stages = stages if stages.encrypted else None
        if c.hs_out:  # the end of our last flight (the socket did not take it all)
            c.out.append(c.hs_out)
            c.hs_out = b""
        self._connected(c, now)
        if c.out:
            self._flush(c)
        if not rest or c.state != _OPEN:
            return
        self.wire_in += len(rest)
        self._to_general(c)
        self._on_plain(c, rest, now)

    def connect_all(self) -> None:
        """Open this worker's connections (at ``connect_rate``), until all are settled.

        A connection is settled when it is open (TCP connect, then the TLS and
        authentication handshakes when asked for, all within ``--timeout``) or failed.
        """
        share = self.share
        begin = time.monotonic_ns()
        step = 0 if not share.connect_rate else int(1e9 / share.connect_rate)
        opened = 0
        while not self.stop_requested:
            now = time.monotonic_ns()
            while opened < share.connections and now >= begin + opened * step:
                self._open(share.first_cid + opened, now)
                opened += 1
            connecting = [c for c in self.conns.values() if c.state in (_CONNECTING, _SECURING)]
            if opened == share.connections and not connecting:
                break
            for c in connecting:
                if now < c.connect_deadline:
                    continue
                if c.stages is None:
                    self._connect_failed(c, TimeoutError(errno.ETIMEDOUT, "connection timed out"))
                else:  # the core words it: the stage that did not finish
                    reason = c.stages.timeout_reason(self.cfg.timeout)
                    self._setup_failed(c, _report_kind(EndKind.HANDSHAKE_TIMEOUT), reason)
            wait = 0.05
            if opened < share.connections:
                wait = min(wait, max(0.0, (begin + opened * step - now) / 1e9))
            for fd, _ev in self.ep.poll(wait):
                ready = self.conns.get(fd)
                if ready is None:
                    continue
                c = ready
                if c.state == _SECURING:
                    self._secure_step(c, time.monotonic_ns())
                    continue
                if c.state != _CONNECTING:
                    continue
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._connect_failed(c, OSError(err, os.strerror(err)))
                else:
                    self._tcp_connected(c, time.monotonic_ns())
        # Connections still connecting when a stop came are just closed.
        for c in list(self.conns.values()):
            if c.state in (_CONNECTING, _SECURING):
                self._kill(c, None)
        self.connect_ns = time.monotonic_ns() - begin
