"""Writing messages: building their wire bytes, the closed and open loops, flushing.

Closed loop (default): each connection keeps ``--depth`` messages in flight and sends
the replacements for all the replies of one read in one write.  Open loop (``--rate
R``): message ``k`` is due at ``t0 + k / R``, assigned to connections round robin; a
connection that already has ``--depth`` in flight queues it (its ``backlog``), and
latency is measured from the **intended** send time, so a stalled server cannot hide
its stall by slowing the client down (coordinated omission, as corrected by wrk2).

Under TLS each write is encrypted in one call and the ciphertext goes out like
plaintext (``send``/``sendmsg``; a partial write keeps the rest of the ciphertext: the
socket never sees TLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from .config import StressConfig, _Share
from .conn import _OPEN, _Conn, _Endpoint
from .payload import _BIG, _ID, _ID_SIZE
from .poller import _IN, _OUT

_IOV_MAX = 512


class _Sender(_Endpoint):
    """The writing side of a worker: what to send when, and getting it onto the sockets."""

    def __init__(
        self,
        cfg: StressConfig,
        share: _Share,
        address: tuple[int, Any],
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Set up the loop (no connection yet); see :class:`.conn._Endpoint`.

        Raises:
            ValueError: a TLS certificate or key file of ``cfg`` is missing or invalid.
        """
        super().__init__(cfg, share, address, tls_context)
        # header bytes by body size (no extra fields): encoding is the core's job
        self._headers: dict[int, bytes] = {}
        self._depth = cfg.depth
        self.budget: int | None = share.messages  # measured messages still to send
        self.sending = False
        self.t0 = 0  # the start of the run (open loop: message 0 is due then)
        self.issued = 0  # open loop: messages handed out so far
        self._rr = 0

    def _header_bytes(self, n: int, seq: int) -> bytes:
        if self.payloads.fields:
            return self.frame.encode_header(n, self.payloads.header(seq))
        head = self._headers.get(n)
        if head is None:
            head = self.frame.encode_header(n)
            if len(self._headers) < 65536:
                self._headers[n] = head
        return head

    def _send_new(self, c: _Conn, count: int, now: int, times: Sequence[int] | None = None) -> None:
        """Write ``count`` new messages on ``c`` (intended times ``times``, else ``now``)."""
        cid = c.cid
        s0 = c.tx_seq
        payloads = self.payloads
        pack = _ID.pack
        pat = payloads.pat
        wire = 0
        if self.udp:
            grams = c.out
            for s in range(s0, s0 + count):
                n = payloads.size_of(cid, s)
                gram = b"".join(payloads.body_parts(cid, s, n))
                wire += n
                grams.append(gram)
        else:
            pieces: list[bytes | memoryview] = []
            ap = pieces.append
            simple = payloads.fixed and not payloads.fields and _ID_SIZE < payloads.size_min < _BIG
            if simple:
                n = payloads.size_min
                k = n - _ID_SIZE
                head = self._header_bytes(n, 0)
                for s in range(s0, s0 + count):
                    off = (s * 167 + cid * 29) & 255
                    ap(head)
                    ap(pack(s, cid))
                    ap(pat[off : off + k])
                wire = count * (len(head) + n)
                chunks: list[bytes | memoryview] = [b"".join(pieces)]
            else:
                chunks = []
                for s in range(s0, s0 + count):
                    n = payloads.size_of(cid, s)
                    head = self._header_bytes(n, s)
                    parts = payloads.body_parts(cid, s, n)
                    wire += len(head) + n
                    if n >= _BIG:  # big body: the pattern view goes out as its own iovec
                        if pieces:
                            chunks.append(b"".join(pieces))
                            pieces = []
                            ap = pieces.append
                        chunks.append(head + parts[0])
                        chunks.extend(parts[1:])
                    else:
                        ap(head)
                        for p in parts:
                            ap(p)
                if pieces:
                    chunks.append(b"".join(pieces))
            stages = c.stages
            if stages is not None:  # TLS: the records of the whole write, in one call
                chunks = [stages.encrypt(chunks[0] if len(chunks) == 1 else b"".join(chunks))]
            if c.out:
                c.out.extend(chunks)
            else:
                c.out = chunks
        self.ledger.issue(c, count, now, times)
        self.wire_out += wire
        if self.udp:
            self._flush_udp(c)
        else:
            self._flush(c)

    def _flush(self, c: _Conn) -> None:
        """Write what ``c`` holds (wire bytes: ciphertext under TLS) as far as the socket takes it."""
        out = c.out
        sock = c.sock
        try:
            while out:
                n = sock.send(out[0]) if len(out) == 1 else sock.sendmsg(out[:_IOV_MAX])
                i = 0
                while n:
                    size = len(out[i])
                    if n >= size:
                        n -= size
                        i += 1
                    else:
                        out[i] = memoryview(out[i])[n:]
                        n = 0
                if i:
                    del out[:i]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._io_failed(c, exc, "send")
            return
        want = _IN | _OUT if out else _IN
        if want != c.events:
            c.events = want
            self.ep.modify(c.fd, want)

    def _flush_udp(self, c: _Conn) -> None:
        """Write the datagrams ``c`` holds as far as the socket takes them."""
        out = c.out
        sock = c.sock
        i = 0
        try:
            for gram in out:
                sock.send(gram)
                i += 1
        except BlockingIOError:
            pass
        except ConnectionRefusedError:
            del out[:i]
            self._kill(c, "refused", "port unreachable (ICMP)")
            return
        except OSError as exc:
            del out[:i]
            self._io_failed(c, exc, "send")
            return
        del out[:i]
        want = _IN | _OUT if out else _IN
        if want != c.events:
            c.events = want
            self.ep.modify(c.fd, want)

    def _refill(self, c: _Conn, now: int) -> None:
        """Top ``c`` up to ``--depth`` messages in flight (open loop: from its backlog)."""
        if c.stream:
            if self.sending:
                self._fill_stream(c, now)
            return
        room = self.cfg.depth - len(c.pending)
        if room <= 0 or c.state != _OPEN:
            return
        if self.cfg.rate is not None:
            backlog = c.backlog
            if backlog:
                take = min(room, len(backlog))
                times = [backlog.popleft() for _ in range(take)]
                self.backlogged -= take
                self._send_new(c, take, now, times)
            return
        if not self.sending:
            return
        if self.budget is not None and now >= self.ledger.t_start:
            room = min(room, self.budget)
            if room <= 0:
                return
            self.budget -= room
        self._send_new(c, room, now)

    def _schedule(self, now: int) -> None:
        """Open loop: hand out every message due by ``now`` (SPEC §6.3 ``--rate``)."""
        if not self.sending or not self.live:
            return
        rate = self.share.rate
        assert rate is not None
        t0 = self.t0
        due = int((now - t0) * rate / 1e9) + 1 - self.issued
        if due <= 0:
            return
        batches: dict[_Conn, list[int]] = {}
        live = self.live
        depth = self.cfg.depth
        t_start = self.ledger.t_start
        for _ in range(due):
            intended = t0 + int(self.issued * 1e9 / rate)
            if self.budget is not None and intended >= t_start:
                if self.budget <= 0:
                    break
                self.budget -= 1
            self.issued += 1
            c = live[self._rr % len(live)]
            self._rr += 1
            batch = batches.get(c)
            if not c.backlog and len(c.pending) + (len(batch) if batch else 0) < depth:
                if batch is None:
                    batches[c] = [intended]
                else:
                    batch.append(intended)
            else:
                c.backlog.append(intended)
                self.backlogged += 1
        for c, times in batches.items():
            if c.state == _OPEN:
                self._send_new(c, len(times), now, times)

    def _next_due(self) -> int:
        """Open loop: the intended time of the next message to hand out."""
        rate = self.share.rate
        assert rate is not None
        return self.t0 + int(self.issued * 1e9 / rate)

    # -- stream mode (see .stream) -------------------------------------------------------

    def _fill_stream(self, c: _Conn, now: int) -> None:
        """Stream mode: top ``c`` up to ``--depth`` messages in flight, in one write."""
        room = self._depth - (c.tx_seq - c.next_rx)
        if room <= 0 or c.state != _OPEN:
            return
        if self.budget is not None and now >= self.ledger.t_start:
            room = min(room, self.budget)
            if room <= 0:
                return
            self.budget -= room
        layout = self.layout
        assert layout is not None
        s0 = c.tx_seq
        s1 = s0 + room
        if s1 > c.wtop:
            layout.extend(c, s1)
        c.wlog.append((s1, now))
        c.tx_seq = s1
        self.ledger.issued_in_stream(room, now)
        self.wire_out += room * layout.mlen
        self._write_window(c, s0, s1)

    def _write_window(self, c: _Conn, s0: int, s1: int) -> None:
        """Send messages ``[s0, s1)`` from the window (queued behind unsent bytes)."""
        layout = self.layout
        assert layout is not None
        ml = layout.mlen
        wbytes = layout.wbytes
        a = s0 % layout.window * ml
        b = a + (s1 - s0) * ml
        wmv = c.wmv
        pieces: list[bytes | memoryview] = [wmv[a:b]] if b <= wbytes else [wmv[a:], wmv[: b - wbytes]]
        size = b - a
        stages = c.stages
        if stages is not None:  # TLS: the records of the whole write, in one call
            record = stages.encrypt(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            pieces = [record]
            size = len(record)
        if c.out:
            c.out.extend(bytes(p) for p in pieces)
            self._flush(c)
            return
        try:
            w = c.sock.send(pieces[0]) if len(pieces) == 1 else c.sock.sendmsg(pieces)
        except BlockingIOError:
            w = 0
        except OSError as exc:
            self._io_failed(c, exc, "send")
            return
        if w < size:
            self._queue(c, b"".join(pieces)[w:])

    def _queue(self, c: _Conn, rest: bytes) -> None:
        """Keep bytes the socket did not take (a copy: window slots are rebuilt later)."""
        c.out.append(rest)
        if c.events != _IN | _OUT:
            c.events = _IN | _OUT
            self.ep.modify(c.fd, _IN | _OUT)
