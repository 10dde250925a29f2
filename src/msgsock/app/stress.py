"""``msgsock stress``: the verifying load generator, successor of iocpclient (SPEC §6.3).

Theory of operation
-------------------
One process runs **one event loop** (``epoll`` directly, ``selectors`` elsewhere) over
many non-blocking connections; ``--workers N`` runs N such processes over disjoint
sets of connections and merges their results (counters add up, latency histograms
merge bucket by bucket).

Every message carries its identity, so each reply can be checked **byte for byte**::

    bytes [0, 8)    sequence number, u64 little-endian
    bytes [8, 12)   connection id, u32 little-endian
    bytes [12, n)   pattern[off : off + n - 12], off = (seq * 167 + conn * 29) % 256

``pattern`` is a fixed pseudo-random byte string.  The sequence number comes first and
little-endian so that a message shorter than 12 bytes keeps the changing low bytes of
the sequence number; such a message cannot name itself in full, so it is checked
against what the connection expects next in order (and, when that fails, against the
other messages in flight).  Sizes drawn with ``--size MIN-MAX`` are a deterministic
function of ``(--seed, conn, seq)``, so either side of a comparison can be recomputed.
With ``--frame`` formats that have extra header fields, field ``f`` of message ``seq``
holds ``seq mod 2**(bits(f) - 1)`` and the echoed fields are checked too.  With
``--expect reverse`` the expected body is the same bytes reversed (the ``reverse``
handler).  Comparisons are bulk (``startswith`` on slices of the pattern, no copies).

**Stream mode** (TCP, closed loop, echo, one fixed size of 13 bytes to 32 KiB, no
extra header fields: the common case, and every cell of the SPEC §8 benchmark) checks
replies without parsing them: an echo returns exactly the bytes written on the
connection, in order, so each read is compared with the next unanswered bytes of what
was sent in one ``memcmp`` (see ``_Worker._stream_round``).  The first read that does
not match, a timeout, or the end of the connection moves that connection to the
general mode below, where the read is parsed and classified message by message; the
counts are the same as if the general mode had run from the start.

In the general mode, messages ``[next_rx, tx_seq)`` that are still owed a reply are in
``pending`` (sequence number -> intended send time).  A reply that equals what
``next_rx`` should look like is accepted at once.  Otherwise it is classified:

- it names (by its id, or by matching content) a pending message: accepted; if a
  later message already arrived, it counts as **reordered**;
- it names a message already answered: **duplicated** (a reply arriving after its
  message was declared lost is ignored, not counted twice);
- anything else is **corrupted**, and it settles the message it names, or else the
  oldest pending one (a stream reply is in order).

A pending message with no reply ``--timeout`` seconds after it was written is **lost**
(so a server that swallows a message is reported within seconds, never waited on).
Connections that are **refused**, **timeout** while connecting, are **closed** (EOF)
or **reset** by the server mid-run, or send bytes that break the frame format
(**protocol**) are counted per connection; the messages they still owed are
**aborted**.  Every kind is counted separately; any of them makes the exit status 1.

How a connection ended is decided by the sans-I/O core, never read from message
text: a socket error is worded and classified by
:func:`msgsock.protocol.describe_os_error`, a failed stage by its
:class:`~msgsock.stages.StageFailure`, a bad frame or a stream cut mid-frame by the
connection's :class:`~msgsock.protocol.MessageProtocol` (general mode).  Each
:class:`~msgsock.exceptions.EndKind` counts under one kind of this report
(``_REPORT_KIND``): ``reset`` and ``os error`` as **reset**, a clean end or an
incomplete message as **closed**, ``message too large`` and ``frame error`` as
**protocol**, ``tls`` as **tls**, ``authentication`` as **auth**, ``handshake
timeout`` as **timeout**.

TLS and authentication (``--tls``/``--tls-ca``/``--tls-cert``, ``--auth-key-file``;
SPEC §4.2, §7): after its TCP connect each connection runs the client side of the
core's stages (:class:`msgsock.stages.Stages`: the TLS handshake through an
``ssl.SSLObject`` over memory BIOs, then the shared-key handshake), non-blocking in
the same poll loop as the connects: the bytes read go to the stages, what they want
sent is written.  So many connections handshake at once and ``--connect-rate`` still
paces them; TCP connect and stages together must finish within ``--timeout``.  A
connection whose TLS handshake fails (an untrusted or expired certificate, a server
that does not speak TLS) counts as **tls**, one whose authentication fails (a wrong
key, a server without a key) as **auth**; the first reason of each (the core's words,
with a hint of what to try) is printed with the verdict.  After the stages the same
object is the TLS record layer: each read is decrypted in one call and stream mode
compares the plaintext; each write is encrypted in one call and the ciphertext goes
out like plaintext (``send``/``sendmsg``; a partial write keeps the rest of the
ciphertext: the socket never sees TLS).  With TLS 1.3 a server that refuses *our*
certificate says so only after the client's handshake: that shows on the
connection's first read, as **tls** (an alert) or as **closed**/**reset** with a hint
about the client certificate.

Closed loop (default): each connection keeps ``--depth`` messages in flight and sends
the replacements for all the replies of one read in one write.  Open loop
(``--rate R``): message ``k`` is due at ``t0 + k / R``, assigned to connections round
robin; a connection that already has ``--depth`` in flight queues it, and latency is
measured from the **intended** send time, so a stalled server cannot hide its stall by
slowing the client down (coordinated omission, as corrected by wrk2).  ``epoll``
timeouts have millisecond resolution, so for the last millisecond before a send the
loop waits in ``select()`` on the epoll descriptor, which sleeps to the microsecond and
still wakes for any reply.

Latency is counted in an HDR-style log-linear histogram (:mod:`msgsock._histogram`,
< 0.4 % error) for messages whose intended send time is after the warmup; throughput
is verified replies per second over the measurement window, whose end is the moment
sending stopped or the last verified reply arrived, whichever is later.

JSON schema (``--json``; one object on stdout; keys are stable, ``schema`` changes
when they do)::

    {
      "schema": "msgsock.stress/1",
      "target": {"host": str, "port": int, "address": str,
                 "transport": "tcp" | "udp", "frame": str | null},
      "config": {"connections": int, "size_min": int, "size_max": int, "seed": int,
                 "depth": int, "duration_s": float | null, "messages": int | null,
                 "warmup_s": float, "rate": float | null, "connect_rate": float | null,
                 "workers": int, "timeout_s": float, "expect": "echo" | "reverse"},
      "connections": {"requested": int, "established": int, "failed": int,
                      "connect_s": float},
      "security": {"tls": bool, "client_cert": bool, "auth": bool},
      "elapsed_s": float,             # measurement window
      "interrupted": bool,            # stopped by SIGINT/SIGTERM
      "messages": {"sent": int, "verified": int, "in_flight": int, "unsent": int,
                   "warmup": int},    # sent/verified count the measurement window only
      "bytes": {"payload": int,       # bodies of verified replies (window)
                "sent": int, "received": int},   # wire bytes, whole run
      "rate": {"msgs_per_s": float, "mb_per_s": float,   # MB = 10**6 payload bytes
               "target_msgs_per_s": float | null},
      "latency_us": {"count": int, "min": float, "mean": float, "p50": float,
                     "p90": float, "p99": float, "p99_9": float, "max": float},
      "errors": {"lost": int, "duplicated": int, "reordered": int, "corrupted": int,
                 "aborted": int, "refused": int, "timeout": int, "tls": int, "auth": int,
                 "closed": int, "reset": int, "protocol": int},
      "errors_total": int,
      "error_examples": [str, ...],   # the first few, with connection and sequence
      "intervals": [{"start_s": float, "end_s": float, "msgs": int, "bytes": int,
                     "msgs_per_s": float, "mb_per_s": float, "p99_us": float | null,
                     "errors": int, "warmup": bool}, ...],
      "histogram": {"sub_bits": int, "count": int, "total": int, "min": int | null,
                    "max": int | null, "buckets": [[index, count], ...]},  # nanoseconds
      "ok": bool,
      "exit_status": 0 | 1
    }
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import random
import select
import selectors
import signal
import socket
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .._histogram import SUB_BITS, Histogram, bucket_bounds, bucket_index, bucket_table
from .._net import set_nodelay
from ..auth import MAGIC as _AUTH_MAGIC
from ..exceptions import EndKind
from ..framing import DEFAULT_FORMAT, DEFAULT_MAX_SIZE, PRESETS, FrameFormat
from ..protocol import End, MessageProtocol, State, describe_os_error, format_address
from ..stages import Stage, StageFailure, Stages
from ..udp import DEFAULT_MAX_SIZE as DEFAULT_UDP_MAX_SIZE
from . import _args
from ._signals import STOP_SIGNALS, stop_signals

__all__ = ["ERROR_KINDS", "StressConfig", "configure_parser", "run"]

SCHEMA = "msgsock.stress/1"

ERROR_KINDS = (
    "lost",
    "duplicated",
    "reordered",
    "corrupted",
    "aborted",
    "refused",
    "timeout",
    "tls",
    "auth",
    "closed",
    "reset",
    "protocol",
)
"""Every kind of error the stress tool counts, in report order (keys of ``errors``)."""

_ERROR_TEXT = {
    "lost": ("message", "lost: no reply within {timeout:g} s"),
    "duplicated": ("message", "duplicated: the same reply arrived again"),
    "reordered": ("message", "reordered: the reply arrived after a later message's"),
    "corrupted": ("message", "corrupted: the reply differs from what was sent"),
    "aborted": ("message", "aborted: still owed a reply when its connection ended"),
    "refused": ("connection", "refused"),
    "timeout": ("connection", "timed out while connecting (--timeout {timeout:g} s)"),
    "tls": ("connection", "failed TLS"),
    "auth": ("connection", "failed authentication"),
    "closed": ("connection", "closed by the server before the end of the run"),
    "reset": ("connection", "reset (or failed with a socket error) during the run"),
    "protocol": ("connection", "broke the frame format (the server sent a bad frame header)"),
}

_ID = struct.Struct("<QI")  # seq, conn id: the first 12 bytes of every message
_ID_SIZE = _ID.size
_ID_CID = 8  # where the connection id starts in the id
_monotonic_ns = time.monotonic_ns
_PATTERN_SEED = 0x6D736773  # "msgs": the pattern is the same in every run and every version
_UDP_MAX = DEFAULT_UDP_MAX_SIZE  # the library's: the largest UDP payload over IPv4
_BIG = 32 * 1024  # bodies at least this large are written from the pattern without a copy
_TAILS_MAX = 4096  # fixed sizes up to 12 + this use 256 prebuilt tails (at most 1 MiB)
_RECV_SIZE = 256 * 1024
_BLOCK_BYTES = 64 * 1024  # stream mode: most wire bytes in one block of messages ...
_WINDOWS_TOTAL = 64 * 1024 * 1024  # ... and in all windows, unless --depth needs more
_IOV_MAX = 512
_HOUSEKEEPING_NS = 20_000_000
_MAX_EXAMPLES = 8
_MAX_LOST_REMEMBERED = 4096
_TLS_RECORD_HEADS = (b"\x15\x03", b"\x16\x03")  # a TLS alert or handshake record
_SPEAKS_TLS = "the server speaks TLS (a TLS record arrived): use --tls or --tls-ca"
_OPEN_STATE = State.OPEN

_M64 = (1 << 64) - 1
_LOWS = bytes(range(256))
_HIST_SIZE = len(Histogram().counts)
_HALF_BITS = SUB_BITS - 1
_LAT_GRANULE = 6
_LAT_HIGH = 1 << 22  # ns; latencies in [_LAT_LOW, _LAT_HIGH) are bucketed by table lookup
_LAT_LOW, _LAT_TABLE = bucket_table(_LAT_GRANULE, 22)

# Event bits; equal to the epoll ones where epoll exists, and used with the fallback too.
_IN = getattr(select, "EPOLLIN", 1)
_OUT = getattr(select, "EPOLLOUT", 4)
_ERR = getattr(select, "EPOLLERR", 8)
_HUP = getattr(select, "EPOLLHUP", 16)

_REPORT_KIND = {
    EndKind.CLEAN: "closed",
    EndKind.INCOMPLETE_MESSAGE: "closed",
    EndKind.RESET: "reset",
    EndKind.OS_ERROR: "reset",
    EndKind.MESSAGE_TOO_LARGE: "protocol",
    EndKind.FRAME_ERROR: "protocol",
    EndKind.TLS: "tls",
    EndKind.AUTHENTICATION: "auth",
    EndKind.HANDSHAKE_TIMEOUT: "timeout",
}
"""The report's kind (``ERROR_KINDS``) of each way a connection can end (the core's
:class:`~msgsock.exceptions.EndKind`); any other end of the server's counts as **reset**."""


def _report_kind(kind: EndKind) -> str:
    return _REPORT_KIND.get(kind, "reset")


class _UsageError(Exception):
    """A bad combination of options: exit status 2."""


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class StressConfig:
    """Everything one stress run needs (built from the command line by :func:`run`).

    Args:
        host: server host name or address.
        port: server port.
        connections: connections to open (UDP: connected sockets).
        size_min: smallest message body in bytes.
        size_max: largest message body (equal to ``size_min`` for a fixed size).
        seed: seed of the per-message random sizes.
        depth: messages in flight per connection.
        duration: seconds of measurement (None with ``messages``).
        messages: total measured messages across connections (None with ``duration``).
        warmup: seconds of traffic before the measurement starts.
        rate: open-loop messages per second overall, or None for closed loop.
        connect_rate: connections opened per second, or None for all at once.
        frame: the frame format (TCP only).
        udp: datagrams instead of a framed stream.
        workers: processes to run.
        timeout: seconds after which an unanswered message counts as lost (and a
            connection attempt as timed out).
        expect: ``"echo"`` or ``"reverse"``: what the server replies.
        interval: seconds between live interval lines.
        tls: speak TLS, verifying the server (TCP only).
        tls_ca: CA certificates (PEM file) to trust instead of the system's.
        tls_cert: a client certificate chain (PEM file), for mutual TLS.
        tls_key: its private key, when not in ``tls_cert``.
        server_hostname: the name to verify in the server's certificate (default
            ``host``).
        auth_key: the shared key of a server that requires the authentication
            handshake (SPEC §4.2), or None.

    Each worker process builds its own TLS context from the file names (an
    ``ssl.SSLContext`` cannot be sent to another process).
    """

    host: str = "127.0.0.1"
    port: int = 9898
    connections: int = 1
    size_min: int = 64
    size_max: int = 64
    seed: int = 1
    depth: int = 1
    duration: float | None = 10.0
    messages: int | None = None
    warmup: float = 0.0
    rate: float | None = None
    connect_rate: float | None = None
    frame: FrameFormat = DEFAULT_FORMAT
    udp: bool = False
    workers: int = 1
    timeout: float = 5.0
    expect: str = "echo"
    interval: float = 1.0
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    server_hostname: str | None = None
    auth_key: bytes | None = field(default=None, repr=False)

    def tls_context(self) -> ssl.SSLContext | None:
        """Return a new client TLS context for this run (None without TLS).

        Raises:
            ValueError: a certificate or key file is missing or invalid.
        """
        if not self.tls:
            return None
        from ..tls import client_context

        return client_context(self.tls_ca, self.tls_cert, self.tls_key)


@dataclass(frozen=True)
class _Share:
    """The part of a run one worker process does."""

    index: int
    first_cid: int
    connections: int
    messages: int | None
    rate: float | None
    connect_rate: float | None


def _shares(cfg: StressConfig) -> list[_Share]:
    w = cfg.workers
    shares = []
    first = 0
    for i in range(w):
        conns = cfg.connections // w + (1 if i < cfg.connections % w else 0)
        msgs = None if cfg.messages is None else cfg.messages // w + (1 if i < cfg.messages % w else 0)
        shares.append(
            _Share(
                index=i,
                first_cid=first,
                connections=conns,
                messages=msgs,
                rate=None if cfg.rate is None else cfg.rate / w,
                connect_rate=None if cfg.connect_rate is None else cfg.connect_rate / w,
            )
        )
        first += conns
    return shares


# -- message contents ---------------------------------------------------------------------


def _offset(cid: int, seq: int) -> int:
    return (seq * 167 + cid * 29) & 255


class _Payloads:
    """Builds and checks message bodies; see the module docstring for the layout."""

    def __init__(self, cfg: StressConfig) -> None:
        self.size_min = cfg.size_min
        self.size_max = cfg.size_max
        self.fixed = cfg.size_min == cfg.size_max
        self.reverse = cfg.expect == "reverse"
        self.pattern = random.Random(_PATTERN_SEED).randbytes(max(cfg.size_max - _ID_SIZE, 0) + 256)
        self.pat = memoryview(self.pattern)
        self.rpattern = self.pattern[::-1] if self.reverse else b""
        self.rpat = memoryview(self.rpattern)
        self._span = cfg.size_max - cfg.size_min + 1
        self._seed_mix = (cfg.seed * 0xD6E8FEB86659FD93 + 0x9E3779B97F4A7C15) & _M64
        # For a fixed size, the 256 possible pattern parts as bytes: building the expected
        # reply is then one concatenation, and checking it one memcmp.
        k = cfg.size_min - _ID_SIZE
        self.tails: list[bytes] = []
        if self.fixed and 0 < k <= _TAILS_MAX:
            self.tails = [self.pattern[off : off + k] for off in range(256)]
        frame = None if cfg.udp else cfg.frame
        self.fields: tuple[tuple[str, int], ...] = ()
        if frame is not None:
            fields = (*frame.fields_before, *frame.fields_after)
            self.fields = tuple((f.name, 1 << (8 * struct.calcsize(f.code) - 1)) for f in fields)

    def size_of(self, cid: int, seq: int) -> int:
        """Body size of message ``seq`` of connection ``cid``: uniform in [min, max]."""
        if self.fixed:
            return self.size_min
        # splitmix64 of (seed, cid, seq): cheap, deterministic, well spread.
        x = (self._seed_mix + cid * 0xBF58476D1CE4E5B9 + seq * 0x94D049BB133111EB) & _M64
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 29
        return self.size_min + x % self._span

    def header(self, seq: int) -> dict[str, int]:
        """Extra header field values of message ``seq`` (empty without fields)."""
        return {name: seq % limit for name, limit in self.fields}

    def body_parts(self, cid: int, seq: int, n: int) -> list[bytes | memoryview]:
        """The body of a message as parts (the pattern part is a view, not a copy)."""
        idb = _ID.pack(seq, cid)
        if n <= _ID_SIZE:
            return [idb[:n]]
        off = _offset(cid, seq)
        return [idb, self.pat[off : off + n - _ID_SIZE]]

    def ring(self, head: bytes, count: int) -> bytes:
        """Wire bytes of ``count`` fixed-size messages with zero ids: message ``i`` is
        ``head``, 12 zero bytes, then the pattern at offset ``i * 167 mod 256``.

        Connection ``cid``'s message ``seq`` is message ``(seq + rotation(cid)) mod 256``
        of this ring with its id written in (see :meth:`rotation`).
        """
        k = self.size_min - _ID_SIZE
        zero = bytes(_ID_SIZE)
        pat = self.pattern
        return b"".join(head + zero + pat[(i * 167) & 255 : ((i * 167) & 255) + k] for i in range(count))

    @staticmethod
    def rotation(cid: int) -> int:
        """The ``r`` with ``(seq + r) * 167 = seq * 167 + cid * 29 (mod 256)`` for every seq."""
        return (cid * 29 * pow(167, -1, 256)) & 255

    def expected(self, cid: int, seq: int) -> bytes:
        """The exact reply expected for message ``seq`` (for error reports)."""
        body = b"".join(self.body_parts(cid, seq, self.size_of(cid, seq)))
        return body[::-1] if self.reverse else body

    def matcher(self) -> Callable[[bytes, int, int], bool]:
        """Return ``match(reply, cid, seq) -> bool``: is ``reply`` exactly message seq's reply."""
        pack = _ID.pack
        size_of = self.size_of
        fixed = self.size_min if self.fixed else -1
        idsize = _ID_SIZE
        fields = self.fields
        header = self.header
        tails = self.tails
        if tails and not fields:
            if not self.reverse:

                def match_fixed(m: bytes, cid: int, s: int) -> bool:
                    return m == pack(s, cid) + tails[(s * 167 + cid * 29) & 255]

                return match_fixed
            rtails = [t[::-1] for t in tails]

            def match_fixed_reverse(m: bytes, cid: int, s: int) -> bool:
                return m == rtails[(s * 167 + cid * 29) & 255] + pack(s, cid)[::-1]

            return match_fixed_reverse
        if not self.reverse:
            pat = self.pat

            def match(m: bytes, cid: int, s: int) -> bool:
                n = fixed if fixed >= 0 else size_of(cid, s)
                if len(m) != n:
                    return False
                idb = pack(s, cid)
                if n <= idsize:
                    ok = m == idb[:n]
                else:
                    off = (s * 167 + cid * 29) & 255
                    ok = m.startswith(idb) and m.startswith(pat[off : off + n - idsize], idsize)
                if ok and fields:
                    return getattr(m, "header", None) == header(s)
                return ok

            return match

        rpat = self.rpat
        total = len(self.rpattern)

        def match_reverse(m: bytes, cid: int, s: int) -> bool:
            n = fixed if fixed >= 0 else size_of(cid, s)
            if len(m) != n:
                return False
            idb = pack(s, cid)
            if n <= idsize:
                ok = m == idb[:n][::-1]
            else:
                off = (s * 167 + cid * 29) & 255
                k = n - idsize
                ok = m.endswith(idb[::-1]) and m.startswith(rpat[total - off - k : total - off])
            if ok and fields:
                return getattr(m, "header", None) == header(s)
            return ok

        return match_reverse


def _first_difference(got: bytes, want: bytes) -> int:
    """Index of the first byte where two strings differ (bulk compares, O(n log n))."""
    lo, hi = 0, min(len(got), len(want))
    if got[:hi] == want[:hi]:
        return hi
    while hi - lo > 1:  # invariant: got[:lo] == want[:lo] and got[:hi] != want[:hi]
        mid = (lo + hi) // 2
        if got[:mid] == want[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# -- polling ------------------------------------------------------------------------------


class _SelectorPoller:
    """The subset of ``select.epoll`` the loop uses, over :mod:`selectors` (non-Linux)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    @staticmethod
    def _mask(events: int) -> int:
        return (selectors.EVENT_READ if events & _IN else 0) | (selectors.EVENT_WRITE if events & _OUT else 0)

    def register(self, fd: int, events: int) -> None:
        self._sel.register(fd, self._mask(events))

    def modify(self, fd: int, events: int) -> None:
        self._sel.modify(fd, self._mask(events))

    def unregister(self, fd: int) -> None:
        self._sel.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        out = []
        for key, mask in self._sel.select(timeout):
            ev = (_IN if mask & selectors.EVENT_READ else 0) | (_OUT if mask & selectors.EVENT_WRITE else 0)
            out.append((key.fd, ev))
        return out

    def close(self) -> None:
        self._sel.close()


def _poller() -> Any:
    if hasattr(select, "epoll"):
        return select.epoll()
    return _SelectorPoller()  # pragma: no cover - non-Linux


# -- one connection -----------------------------------------------------------------------

_CONNECTING, _OPEN, _DEAD, _SECURING = 0, 1, 2, 3


class _Conn:
    __slots__ = (
        "backlog",
        "cid",
        "connect_deadline",
        "events",
        "fd",
        "hs_head",
        "hs_out",
        "lost",
        "next_rx",
        "out",
        "pending",
        "proto",
        "rot",
        "rx",
        "rx_max",
        "sent_log",
        "sock",
        "stages",
        "state",
        "stream",
        "tx_seq",
        "win",
        "wlog",
        "wmv",
        "wtop",
    )

    def __init__(self, cid: int, sock: socket.socket) -> None:
        self.cid = cid
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
        self.pending: dict[int, int] = {}  # seq -> intended send time (ns)
        self.next_rx = 0  # lowest seq not settled; in pending unless == tx_seq
        self.tx_seq = 0  # next seq to send
        self.rx_max = -1  # highest seq accepted out of order (for reorder detection)
        self.out: list[bytes | memoryview] = []  # TCP: byte chunks; UDP: whole datagrams
        self.events = 0
        # open loop only: (first seq of a write, time written)
        self.sent_log: deque[tuple[int, int]] = deque()
        self.backlog: deque[int] = deque()  # open loop: intended times waiting for a depth slot
        self.lost: set[int] = set()  # seqs declared lost, so a late reply is not a duplicate
        # Stream mode (see _Worker._stream_round); off until _connected turns it on.
        self.stream = False
        self.win = bytearray()  # circular: message s at slot s mod window (_extend_window)
        self.wmv = memoryview(self.win)
        self.wtop = 0  # messages below this are built in the window
        self.rx = 0  # verified bytes of the reply stream
        self.wlog: deque[tuple[int, int]] = deque()  # (end seq of a write, time written)
        self.rot = _Payloads.rotation(cid)  # pattern rotation of this connection, in messages


# -- the worker: one event loop -----------------------------------------------------------

_RUN, _DRAIN, _DONE = 1, 2, 3


class _Worker:
    """One event loop over a share of the connections; runs in the caller's process."""

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
        self._match = self.payloads.matcher()
        self.timeout_ns = int(cfg.timeout * 1e9)
        self.ep = _poller()
        self.conns: dict[int, _Conn] = {}
        self.live: list[_Conn] = []
        self.control_fd = -1
        self.control: Any = None
        self.stop_requested = False
        self.interrupted = False
        self._buf = bytearray(_RECV_SIZE)
        self._mv = memoryview(self._buf)
        # header bytes by body size (no extra fields): encoding is the core's job
        self._headers: dict[int, bytes] = {}
        # counters
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.examples: list[str] = []
        self.hist = Histogram()
        self.sent = 0  # measured messages written
        self.sent_all = 0
        self.done = 0  # measured verified replies
        self.done_all = 0
        self.payload = 0  # measured verified payload bytes
        self.payload_all = 0
        self.wire_out = 0
        self.wire_in = 0
        self.inflight = 0
        self.backlogged = 0
        self.unsent = 0
        self.established = 0
        self.failed = 0
        self.connect_ns = 0
        self.budget: int | None = share.messages
        self.phase = _RUN
        self.sending = False
        self.t0 = 0
        self.t_start = 0
        self.t_end: int | None = None
        self.t_stop_sending: int | None = None
        self.t_done = 0
        self.last_ok = 0
        self.issued = 0
        self._rr = 0
        self._lat_min: int | None = None
        self._lat_max: int | None = None
        # Stream mode counts into these plain ints; _fold() moves them into the counters
        # above and the histogram summary.
        self._lat_sum = 0
        self._lat_lo = 1 << 62
        self._lat_hi = -1
        self._measured = 0
        self._ok_fast = 0
        self._sent_fast = 0
        self._depth = cfg.depth
        # Stream mode (the common case): TCP, closed loop, echo, one fixed size, no extra
        # header fields.  See _stream_round.
        self.stream = (
            not cfg.udp
            and cfg.rate is None
            and cfg.expect == "echo"
            and cfg.size_min == cfg.size_max
            and _ID_SIZE < cfg.size_min < _BIG
            and not self.payloads.fields
        )
        self._mlen = 0  # wire bytes of one message (header + body)
        self._hlen = 0  # wire bytes of the frame header (where the id starts)
        self._consts: list[bytes] = []  # _block copies of each byte value (id columns)
        self._block = 0  # messages per block
        self._window = 0  # messages per connection window (a multiple of _block)
        self._wbytes = 0
        self._ring = memoryview(b"")
        if self.stream:
            head = cfg.frame.encode_header(cfg.size_min)
            ml = len(head) + cfg.size_min
            self._hlen = len(head)
            self._mlen = ml
            # Blocks big enough that building one is rare, small enough that the windows
            # of many connections stay in memory (and the busy part of them in cache).
            budget = _WINDOWS_TOTAL // max(1, share.connections)
            block = 256
            while block > 1 and (block * ml > _BLOCK_BYTES or 2 * block * ml > budget):
                block //= 2
            self._block = block
            # The smallest multiple of block that holds depth messages in flight plus the
            # block being built: slots are rewritten only once their replies are verified.
            self._window = -(-(cfg.depth + block) // block) * block
            self._wbytes = self._window * ml
            self._ring = memoryview(self.payloads.ring(head, 256 + block))
            self._consts = [bytes([v]) * block for v in range(256)]
        self.final_tick: dict[str, Any] | None = None

    # -- errors -------------------------------------------------------------------------

    def _error(self, kind: str, example: str | None = None, n: int = 1) -> None:
        self.errors[kind] += n
        if example is not None and len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(example)

    def _io_failed(self, c: _Conn, exc: OSError, what: str) -> None:
        """End ``c`` after a failed send or receive, as the core words and classifies it."""
        end = describe_os_error(exc)
        self._kill(c, _report_kind(end.kind), f"{what}: {end.reason}{self._cert_hint(c)}")

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

    def _kill(self, c: _Conn, kind: str | None, why: str = "") -> None:
        """End a connection; ``kind`` None means we closed it ourselves (end of run)."""
        if c.state == _DEAD:
            return
        if c.stream:
            self._to_general(c, decode=False)  # so what it still owed is counted below
        was_open = c.state == _OPEN
        c.state = _DEAD
        if kind is not None and not self.stop_requested:
            self._error(kind, f"conn {c.cid}: {why or kind}")
            if c.pending:
                self._error("aborted", n=len(c.pending))
        self.inflight -= len(c.pending)
        c.pending.clear()
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

    # -- connecting ---------------------------------------------------------------------

    def _open(self, cid: int, now: int) -> None:
        kind = socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM
        try:
            sock = socket.socket(self.family, kind)
        except OSError as exc:
            self.failed += 1
            hint = " (raise the open-files limit: ulimit -n)" if exc.errno == errno.EMFILE else ""
            why = describe_os_error(exc).reason
            self._error("refused", f"conn {cid}: cannot create a socket: {why}{hint}")
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
        c.connect_deadline = now + self.timeout_ns
        err = sock.connect_ex(self.sockaddr)
        if err in (0, errno.EISCONN):
            self._tcp_connected(c, now)
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY):
            c.events = _OUT
            self.ep.register(c.fd, _OUT)
        else:
            self._connect_failed(c, OSError(err, os.strerror(err)))

    def _connected(self, c: _Conn, now: int) -> None:
        c.state = _OPEN
        if not self.udp:
            set_nodelay(c.sock)
            if self.stream:
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

    def _setup_failed(self, c: _Conn, kind: str, why: str) -> None:
        """Count a connection that could not be opened (``kind``), and close it."""
        self.failed += 1
        self._error(kind, f"conn {c.cid}: {why}")
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

    # -- sending ------------------------------------------------------------------------

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
        pending = c.pending
        cid = c.cid
        s0 = c.tx_seq
        t_start = self.t_start
        payloads = self.payloads
        pack = _ID.pack
        pat = payloads.pat
        measured = 0
        wire = 0
        if self.udp:
            grams = c.out
            for i in range(count):
                s = s0 + i
                t = now if times is None else times[i]
                pending[s] = t
                if t >= t_start:
                    measured += 1
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
                    t = now if times is None else times[s - s0]
                    pending[s] = t
                    if t >= t_start:
                        measured += 1
                    off = (s * 167 + cid * 29) & 255
                    ap(head)
                    ap(pack(s, cid))
                    ap(pat[off : off + k])
                wire = count * (len(head) + n)
                chunks: list[bytes | memoryview] = [b"".join(pieces)]
            else:
                chunks = []
                for i in range(count):
                    s = s0 + i
                    t = now if times is None else times[i]
                    pending[s] = t
                    if t >= t_start:
                        measured += 1
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
        c.tx_seq = s0 + count
        if times is not None:  # open loop: intended times differ from the write time
            c.sent_log.append((s0, now))
        self.inflight += count
        self.sent_all += count
        self.sent += measured
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
        if self.budget is not None and now >= self.t_start:
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
        t_start = self.t_start
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
        rate = self.share.rate
        assert rate is not None
        return self.t0 + int(self.issued * 1e9 / rate)

    # -- receiving ----------------------------------------------------------------------

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

    # -- stream mode ----------------------------------------------------------------------
    #
    # The common case (TCP, closed loop, echo, one fixed size of 13 bytes to 32 KiB, no
    # extra header fields) does not parse replies one by one.  An echo server returns,
    # on each connection, exactly the bytes that were written, in order.  So each
    # connection has a circular *window* holding the wire bytes of its messages, message
    # ``s`` in slot ``s mod _window``, built ahead a block at a time (_extend_window).  A
    # write sends the next slots; a read is verified with one comparison against the
    # window (a whole read's worth of replies, headers included, in one memcmp; two where
    # the window wraps).  A read that verifies costs no per-message Python work: messages
    # completed = verified bytes // message size, and latencies come from the write log,
    # one entry per write (every message of a write shares its send time and every message
    # completed by a read its read time, as in the C load generator).  A slot is rebuilt
    # only after its reply was verified, so the window is depth + one block, which keeps
    # the busy part of every window small enough to stay in cache.
    #
    # The first read that does not match, a timeout, or the end of the connection turns
    # the connection into the general mode for good (_to_general): the verified part of
    # an unfinished reply is fed to a fresh MessageProtocol, ``pending`` is rebuilt from
    # the write log, and the mismatching read is parsed and classified message by message,
    # exactly as if the general mode had been used from the start (SPEC §6.3).  Under TLS
    # the same holds for the plaintext: each read is decrypted in one call first.

    def _stream_round(self, events: list[tuple[int, int]], now: int) -> None:
        """Handle the events of one poll in stream mode: per readable connection, one
        read verified with one comparison, then one write of the replacements.

        The hot path (SPEC §8): state lives in locals, the worker's counters are
        updated once per round, and no method is called for a read that verifies.
        """
        conns = self.conns
        buf = self._buf
        mv = self._mv
        ml = self._mlen
        depth = self._depth
        window = self._window
        wbytes = self._wbytes
        t_start = self.t_start
        counts = self.hist.counts
        table = _LAT_TABLE
        refill = self.sending
        plain = self.budget is None  # with --messages, refills go through _fill_stream
        ev_in = _IN | _ERR | _HUP
        ev_out = _OUT
        is_open = _OPEN
        got = sent = bytes_in = 0
        lsum = measured = 0
        hi = self._lat_hi
        lo = self._lat_lo
        for fd, ev in events:
            c = conns.get(fd)
            if c is None:
                if fd == self.control_fd:
                    self._on_control()
                continue
            if ev & ev_out:
                self._flush(c)
            if not ev & ev_in or c.state != is_open:
                continue
            if not c.stream:
                self._on_read(c, now)
                continue
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._io_failed(c, exc, "receive")
                continue
            if n == 0:
                self._eof(c)
                continue
            stages = c.stages
            if stages is None:
                view = mv[:n]
            else:  # TLS: the plaintext of what was read
                got_view = self._decrypt(c, stages, n)
                if got_view is None:
                    continue
                view = got_view
                n = len(view)
            bytes_in += n
            rx = c.rx
            # Never more than is owed (a duplicate, say), and byte for byte what was sent.
            if n > c.tx_seq * ml - rx:
                self._stream_mismatch(c, view)
                continue
            off = rx % wbytes
            if off + n <= wbytes:
                if not c.win.startswith(view, off):
                    self._stream_mismatch(c, view)
                    continue
            elif not (c.win.startswith(view[: wbytes - off], off) and c.win.startswith(view[wbytes - off :])):
                self._stream_mismatch(c, view)
                continue
            rx += n
            c.rx = rx
            done = rx // ml
            s = c.next_rx
            if done == s:  # only part of a reply so far
                continue
            c.next_rx = done
            got += done - s
            log = c.wlog
            while s < done:
                end, t = log[0]
                if end <= done:
                    log.popleft()
                    k = end - s
                    s = end
                else:
                    k = done - s
                    s = done
                if t >= t_start:
                    # The messages of one write share one latency, so they are counted
                    # once with their multiplicity.  Bucket: a table lookup for the usual
                    # 8 us - 4 ms, else _histogram.bucket_index inlined.
                    lat = now - t
                    if _LAT_LOW <= lat < _LAT_HIGH:
                        counts[table[lat >> _LAT_GRANULE]] += k
                    else:
                        shift = lat.bit_length() - SUB_BITS
                        if shift > 0:
                            idx = (shift << _HALF_BITS) + (lat >> shift)
                            counts[idx if idx < _HIST_SIZE else _HIST_SIZE - 1] += k
                        else:
                            counts[lat if lat > 0 else 0] += k
                    lsum += lat * k
                    measured += k
                    if lat > hi:
                        hi = lat
                    if lat < lo:
                        lo = lat
            if not refill:
                continue
            if not plain:
                self._fill_stream(c, now)
                continue
            # Refill: the replacements of every reply of this read, in one write.
            s0 = c.tx_seq
            s1 = done + depth
            if s1 > c.wtop:
                self._extend_window(c, s1)
            log.append((s1, now))
            c.tx_seq = s1
            sent += s1 - s0
            a = s0 % window * ml
            b = a + (s1 - s0) * ml
            if b > wbytes or c.out or stages is not None:
                self._write_window(c, s0, s1)
                continue
            try:
                w = c.sock.send(c.wmv[a:b])
            except BlockingIOError:
                w = 0
            except OSError as exc:
                self._io_failed(c, exc, "send")
                continue
            if w < b - a:
                self._queue(c, c.wmv[a + w : b].tobytes())
        self.wire_in += bytes_in
        if got:
            self.inflight -= got
            self._ok_fast += got
            self.last_ok = now
            if measured:
                self._lat_sum += lsum
                self._measured += measured
                self._lat_hi = hi
                self._lat_lo = lo
        if sent:
            self.inflight += sent
            self._sent_fast += sent
            self.wire_out += sent * ml
            if now >= t_start:
                self.sent += sent

    def _fill_stream(self, c: _Conn, now: int) -> None:
        """Stream mode: top ``c`` up to ``--depth`` messages in flight, in one write."""
        room = self._depth - (c.tx_seq - c.next_rx)
        if room <= 0 or c.state != _OPEN:
            return
        if self.budget is not None and now >= self.t_start:
            room = min(room, self.budget)
            if room <= 0:
                return
            self.budget -= room
        s0 = c.tx_seq
        s1 = s0 + room
        if s1 > c.wtop:
            self._extend_window(c, s1)
        c.wlog.append((s1, now))
        c.tx_seq = s1
        self.inflight += room
        self._sent_fast += room
        if now >= self.t_start:
            self.sent += room
        self.wire_out += room * self._mlen
        self._write_window(c, s0, s1)

    def _write_window(self, c: _Conn, s0: int, s1: int) -> None:
        """Send messages ``[s0, s1)`` from the window (queued behind unsent bytes)."""
        ml = self._mlen
        wbytes = self._wbytes
        a = s0 % self._window * ml
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

    def _extend_window(self, c: _Conn, s1: int) -> None:
        """Build blocks in ``c``'s window until it holds message ``s1 - 1``.

        A block is ``_block`` messages starting at a multiple of ``_block`` (at most
        256), so within it only the low byte of the sequence number changes: it is one
        copy from the shared ring (``_Payloads.ring``, rotated for this connection) and
        one strided write per nonzero id byte.  Its slots held messages a whole window
        earlier, whose replies were verified (``s1 <= next_rx + depth``).
        """
        ml = self._mlen
        block = self._block
        window = self._window
        first = self._hlen  # where the id starts in each message
        size = block * ml
        if not c.win:
            c.win = bytearray(self._wbytes)
            c.wmv = memoryview(c.win)
        win = c.win
        ring = self._ring
        consts = self._consts
        # (position, value) of the nonzero connection id bytes; zero bytes come with the ring
        cid_columns = [(first + _ID_CID + i, v) for i, v in enumerate(c.cid.to_bytes(4, "little")) if v]
        while c.wtop < s1:
            b = c.wtop
            off = b % window * ml
            end = off + size
            j = (b + c.rot) & 255
            win[off:end] = ring[j * ml : j * ml + size]
            low = b & 255
            win[off + first : end : ml] = _LOWS[low : low + block]
            high = b >> 8  # the other sequence bytes, the same in the whole block
            p = off + first + 1
            while high:
                if high & 255:
                    win[p:end:ml] = consts[high & 255]
                high >>= 8
                p += 1
            for p, v in cid_columns:
                win[off + p : end : ml] = consts[v]
            c.wtop = b + block

    def _stream_mismatch(self, c: _Conn, view: memoryview) -> None:
        """A read that is not the next expected bytes: parse and classify it per message."""
        data = view.tobytes()
        self._to_general(c)
        self._on_plain(c, data, time.monotonic_ns())

    def _to_general(self, c: _Conn, *, decode: bool = True) -> None:
        """Leave stream mode for good: rebuild the general mode's per-message state.

        ``decode``: give it a protocol holding the verified start of an unfinished
        reply (not needed when the connection is ending on our side).
        """
        if not c.stream:
            return
        c.stream = False
        if decode:
            proto = MessageProtocol(self.frame)
            part = c.rx % self._mlen
            if part:  # the verified start of an unfinished reply
                a = (c.rx - part) % self._wbytes
                b = a + part
                head = (
                    c.wmv[a:b].tobytes()
                    if b <= self._wbytes
                    else c.wmv[a:].tobytes() + c.wmv[: b - self._wbytes]
                )
                proto.receive_data(head)
            c.proto = proto
        pending = c.pending
        s = c.next_rx
        for end, t in c.wlog:
            for x in range(s, end):
                pending[x] = t
            s = end
        c.wlog.clear()
        c.win = bytearray()
        c.wmv = memoryview(c.win)

    def _on_read_udp(self, c: _Conn, now: int = 0) -> None:
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
        """Check every reply of one read; refill the connection (unless it is ending).  The hot path."""
        pending = c.pending
        match = self._match
        cid = c.cid
        t_start = self.t_start
        counts = self.hist.counts
        last = _HIST_SIZE - 1
        sub = SUB_BITS
        half = _HALF_BITS
        ok_all = ok = pay_all = pay = lsum = 0
        lmin = self._lat_min
        lmax = self._lat_max
        if lmin is None or lmax is None:
            lmin, lmax = 1 << 62, -1
        for m in msgs:
            s = c.next_rx
            tx = c.tx_seq
            if s < tx and match(m, cid, s):
                t = pending.pop(s)
                if s < c.rx_max:
                    self._error("reordered", f"conn {cid} seq {s}: reply after that of seq {c.rx_max}")
                s += 1
                while s < tx and s not in pending:
                    s += 1
                c.next_rx = s
                ok_all += 1
                size = len(m)
                pay_all += size
                if t >= t_start:
                    lat = now - t
                    shift = lat.bit_length() - sub
                    if shift > 0:
                        idx = (shift << half) + (lat >> shift)
                        counts[idx if idx < last else last] += 1
                    else:
                        counts[lat if lat >= 0 else 0] += 1
                    lsum += lat
                    if lat > lmax:
                        lmax = lat
                    if lat < lmin:
                        lmin = lat
                    ok += 1
                    pay += size
            else:
                self._classify(c, m, now)
        if ok_all:
            self.inflight -= ok_all
            self.done_all += ok_all
            self.payload_all += pay_all
            self.last_ok = now
            if ok:
                self.done += ok
                self.payload += pay
                self.hist.count += ok
                self.hist.total += lsum
                self._lat_min = lmin
                self._lat_max = lmax
        if refill and c.state == _OPEN:
            self._refill(c, now)

    def _settle(self, c: _Conn, s: int) -> int | None:
        """Remove message ``s`` from ``pending``; return its intended time (None if absent)."""
        t = c.pending.pop(s, None)
        if t is None:
            return None
        self.inflight -= 1
        if s == c.next_rx:
            tx = c.tx_seq
            s += 1
            while s < tx and s not in c.pending:
                s += 1
            c.next_rx = s
        return t

    def _accept(self, c: _Conn, s: int, m: bytes, now: int) -> None:
        """A correct reply for pending message ``s`` that is not the oldest pending one."""
        t = self._settle(c, s)
        assert t is not None
        if s < c.rx_max:
            self._error("reordered", f"conn {c.cid} seq {s}: reply after that of seq {c.rx_max}")
        else:
            c.rx_max = s
        self.done_all += 1
        self.payload_all += len(m)
        self.last_ok = now
        if t >= self.t_start:
            lat = max(0, now - t)
            self.done += 1
            self.payload += len(m)
            self._record(lat)

    def _record(self, lat: int) -> None:
        # Outside the hot path; the hot path inlines the same bucket arithmetic and keeps
        # min/max in _lat_min/_lat_max, which _hist_now() folds into the histogram.
        h = self.hist
        h.counts[bucket_index(lat)] += 1
        h.count += 1
        h.total += lat
        if self._lat_min is None or lat < self._lat_min:
            self._lat_min = lat
        if self._lat_max is None or lat > self._lat_max:
            self._lat_max = lat

    def _classify(self, c: _Conn, m: bytes, now: int) -> None:
        """The slow path: a reply that is not exactly the oldest pending message's."""
        cid = c.cid
        match = self._match
        pending = c.pending
        candidate: int | None = None
        if len(m) >= _ID_SIZE:
            s2, cid2 = _ID.unpack_from(m)
            if cid2 == cid and s2 < c.tx_seq:
                candidate = s2
                if match(m, cid, s2):
                    self._settled_match(c, s2, m, now)
                    return
        else:
            # Too short to name itself: look for it among the messages in flight, then
            # among the recently settled ones (bounded: this is the error path).
            for s2 in list(pending)[:64]:
                if match(m, cid, s2):
                    self._settled_match(c, s2, m, now)
                    return
            for s2 in range(c.next_rx - 1, max(-1, c.next_rx - 65), -1):
                if s2 not in pending and match(m, cid, s2):
                    self._settled_match(c, s2, m, now)
                    return
        # Corrupted: it settles the message it names, or else the oldest pending one.
        target = candidate if candidate is not None and candidate in pending else None
        if target is None and c.next_rx < c.tx_seq:
            target = c.next_rx
        example = None
        if len(self.examples) < _MAX_EXAMPLES:
            example = self._describe(c, m, target)
        self._error("corrupted", example)
        if target is not None:
            self._settle(c, target)

    def _settled_match(self, c: _Conn, s: int, m: bytes, now: int) -> None:
        if s in c.pending:
            self._accept(c, s, m, now)
        elif s in c.lost:
            c.lost.discard(s)  # already counted as lost; a late reply is not a second error
        else:
            self._error("duplicated", f"conn {c.cid} seq {s}: a second reply")

    def _describe(self, c: _Conn, m: bytes, target: int | None) -> str:
        if target is None:
            return f"conn {c.cid}: unexpected reply of {len(m)} bytes with nothing in flight"
        want = self.payloads.expected(c.cid, target)
        where = f"conn {c.cid} seq {target}"
        if len(m) != len(want):
            return f"{where}: reply of {len(m)} bytes, expected {len(want)}"
        i = _first_difference(bytes(m), want)
        if i < len(want):
            return f"{where}: byte {i} is 0x{m[i]:02x}, expected 0x{want[i]:02x}"
        return f"{where}: header fields {getattr(m, 'header', {})}, expected {self.payloads.header(target)}"

    # -- timeouts -----------------------------------------------------------------------

    def _check_timeouts(self, now: int) -> None:
        limit = now - self.timeout_ns
        for c in list(self.live):
            if c.stream:
                # The oldest unanswered message of a stream connection is the first of
                # the oldest write in its log; past the timeout, classify per message.
                if not c.wlog or c.wlog[0][1] > limit:
                    continue
                self._to_general(c)
            if not c.pending:
                continue
            # The clock of a message starts when it is written: in closed loop that is its
            # intended time; in open loop it may have waited, and sent_log says when.
            log = c.sent_log
            changed = False
            while c.pending:
                s0 = c.next_rx
                if log:
                    while len(log) > 1 and log[1][0] <= s0:
                        log.popleft()
                    written = log[0][1]
                else:
                    written = c.pending[s0]
                if written > limit:
                    break
                self._settle(c, s0)
                self._error("lost", f"conn {c.cid} seq {s0}: no reply within {self.cfg.timeout:g} s")
                if len(c.lost) >= _MAX_LOST_REMEMBERED:
                    c.lost.clear()
                c.lost.add(s0)
                changed = True
            if not c.pending:
                while len(log) > 1:
                    log.popleft()
            if changed and c.state == _OPEN:
                self._refill(c, now)

    # -- the loop -----------------------------------------------------------------------

    def snapshot(self, k: int, now: int, portable: bool) -> dict[str, Any]:
        """Cumulative counters for the live interval lines (``portable``: picklable)."""
        hist = self._hist_now()  # folds the fast path's counters first
        return {
            "k": k,
            "t": now,
            "done_all": self.done_all,
            "payload_all": self.payload_all,
            "done": self.done,
            "errors": sum(self.errors.values()),
            "hist": hist.to_dict() if portable else hist,
        }

    def _hist_now(self) -> Histogram:
        self._fold()
        h = self.hist
        h.min = self._lat_min
        h.max = self._lat_max
        return h

    def _fold(self) -> None:
        """Move the fast path's plain counters into the real ones."""
        if self._ok_fast:
            size = self.cfg.size_min
            self.done_all += self._ok_fast
            self.payload_all += self._ok_fast * size
            self._ok_fast = 0
        if self._measured:
            size = self.cfg.size_min
            self.done += self._measured
            self.payload += self._measured * size
            self.hist.count += self._measured
            self.hist.total += self._lat_sum
            self._measured = 0
            self._lat_sum = 0
            if self._lat_min is None or self._lat_lo < self._lat_min:
                self._lat_min = self._lat_lo
            if self._lat_max is None or self._lat_hi > self._lat_max:
                self._lat_max = self._lat_hi
        if self._sent_fast:
            self.sent_all += self._sent_fast
            self._sent_fast = 0

    def _start_drain(self, now: int) -> None:
        self.phase = _DRAIN
        self.sending = False
        self.t_stop_sending = now
        for c in self.live:
            if c.backlog:  # open loop, duration over: never sent
                self.unsent += len(c.backlog)
                self.backlogged -= len(c.backlog)
                c.backlog.clear()

    def run(self, t0: int, on_tick: Callable[[dict[str, Any]], None], portable: bool = False) -> None:
        """Run the load from time ``t0`` (monotonic ns) until done or stopped."""
        cfg = self.cfg
        self.t0 = t0
        self.t_start = t0 + int(cfg.warmup * 1e9)
        self.t_end = None if cfg.duration is None else self.t_start + int(cfg.duration * 1e9)
        rate_mode = cfg.rate is not None
        interval_ns = int(cfg.interval * 1e9)
        poll = self.ep.poll
        conns = self.conns
        control_fd = self.control_fd
        udp = self.udp
        on_read = self._on_read_udp if udp else self._on_read
        stream = self.stream
        stream_round = self._stream_round
        flush = self._flush_udp if udp else self._flush
        ep_fd = self.ep.fileno() if hasattr(self.ep, "fileno") else -1
        ev_in, ev_out, is_open = _IN | _ERR | _HUP, _OUT, _OPEN
        while not self.stop_requested:  # wait for the common start time
            now = time.monotonic_ns()
            if now >= t0:
                break
            time.sleep(min(0.05, (t0 - now) / 1e9))
        now = time.monotonic_ns()
        self.sending = True
        if not rate_mode:
            for c in list(self.live):
                self._refill(c, now)
        next_tick = t0 + interval_ns
        k = 1
        next_hk = now + _HOUSEKEEPING_NS
        while True:
            now = time.monotonic_ns()
            # phase changes
            if self.stop_requested:
                self.interrupted = True
                break
            if not self.live:
                break
            if self.phase == _RUN:
                if self.t_end is not None and now >= self.t_end:
                    self._start_drain(now)
                elif self.budget == 0 and self.backlogged == 0:
                    if self.t_stop_sending is None:
                        self.t_stop_sending = now
                    if self.inflight == 0:
                        break
            if self.phase == _DRAIN and self.inflight == 0:
                break
            if rate_mode and self.phase == _RUN:
                self._schedule(now)
            if now >= next_hk:
                self._check_timeouts(now)
                next_hk = now + _HOUSEKEEPING_NS
            if now >= next_tick:
                on_tick(self.snapshot(k, now, portable))
                k += 1
                next_tick += interval_ns
                if next_tick <= now:  # the loop stalled: skip missed ticks
                    skipped = (now - next_tick) // interval_ns + 1
                    next_tick += skipped * interval_ns
                    k += skipped
            # how long may we sleep?
            wake = min(next_hk, next_tick)
            if self.phase == _RUN and self.t_end is not None:
                wake = min(wake, self.t_end)
            spin = False
            if rate_mode and self.phase == _RUN and self.sending and self.budget != 0:
                due = self._next_due()
                if due < wake:
                    wake = due
                    spin = True
            left = wake - time.monotonic_ns()
            if left <= 0:
                timeout = 0.0
            elif spin and left < 1_500_000:
                # epoll rounds its timeout up to whole milliseconds; select() on the epoll
                # fd sleeps to the microsecond and still wakes for any socket event.
                if 0 <= ep_fd < 1024:  # select() takes descriptors below FD_SETSIZE only
                    select.select([ep_fd], [], [], left / 1e9)
                    timeout = 0.0
                else:
                    timeout = left / 1e9
            elif spin:
                timeout = (left // 1_000_000 - 1) / 1000  # whole ms, so it never oversleeps
            else:
                timeout = -(-left // 1_000_000) / 1000
            events = poll(timeout)
            if not events:
                continue
            # One clock reading per poll: the time of every reply read and every message
            # written in this round, as in the C load generator.
            now = _monotonic_ns()
            if stream:
                stream_round(events, now)
                continue
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is None:
                    if fd == control_fd:
                        self._on_control()
                    continue
                if ev & ev_out:
                    flush(conn)
                if ev & ev_in and conn.state == is_open:
                    on_read(conn, now)
        now = time.monotonic_ns()
        if self.t_stop_sending is None:
            self.t_stop_sending = now
        self.t_done = now
        self.sending = False
        self.final_tick = self.snapshot(k, now, portable)

    def _on_control(self) -> None:
        try:
            while self.control.poll():
                msg = self.control.recv()
                if msg and msg[0] == "stop":
                    self.stop_requested = True
        except (EOFError, OSError):
            self.stop_requested = True  # the parent is gone

    def close(self) -> None:
        """Close every socket and the poller."""
        self.live = []  # (so _kill does not search it once per connection)
        for c in list(self.conns.values()):
            self._kill(c, None)
        self.ep.close()

    def result(self) -> dict[str, Any]:
        """Everything the report needs from this worker (picklable)."""
        hist = self._hist_now()
        end = max(self.t_stop_sending or self.t_done, self.last_ok)
        in_flight = self.inflight
        return {
            "t0": self.t0,
            "t_start": self.t_start,
            "t_end": end,
            "interrupted": self.interrupted,
            "established": self.established,
            "failed": self.failed,
            "connect_ns": self.connect_ns,
            "sent": self.sent,
            "sent_all": self.sent_all,
            "done": self.done,
            "done_all": self.done_all,
            "payload": self.payload,
            "wire_out": self.wire_out,
            "wire_in": self.wire_in,
            "in_flight": in_flight,
            "unsent": self.unsent + self.backlogged,
            "errors": dict(self.errors),
            "examples": list(self.examples),
            "reasons": dict(self.reasons),
            "hist": hist.to_dict(),
            "final_tick": self.final_tick,
        }


# -- worker processes ---------------------------------------------------------------------


def _worker_process(cfg: StressConfig, share: _Share, address: tuple[int, Any], pipe: Any) -> None:
    """Entry point of a ``--workers`` process: connect, wait for "go", run, send the result."""
    try:
        worker = _Worker(cfg, share, address)  # builds its own TLS context (not picklable)
    except ValueError as exc:  # a TLS file that changed since the parent checked it
        pipe.send(("crash", str(exc)))
        pipe.close()
        return

    def stop(signum: int, frame: Any) -> None:
        worker.stop_requested = True

    for signum in STOP_SIGNALS:  # a worker process: its handlers live as long as it does
        signal.signal(signum, stop)
    try:
        worker.control = pipe
        worker.connect_all()
        pipe.send(("ready", worker.established, worker.failed))
        t0 = None
        deadline = time.monotonic() + 3600
        while t0 is None and not worker.stop_requested and time.monotonic() < deadline:
            if pipe.poll(0.05):
                msg = pipe.recv()
                if msg[0] == "go":
                    t0 = msg[1]
                elif msg[0] == "stop":
                    worker.stop_requested = True
        worker.control_fd = pipe.fileno()
        worker.ep.register(worker.control_fd, _IN)
        worker.run(
            t0 if t0 is not None else time.monotonic_ns(), lambda snap: pipe.send(("tick", snap)), True
        )
        pipe.send(("result", worker.result()))
    except BaseException as exc:  # report, never die silently
        try:
            pipe.send(("crash", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        worker.close()
        pipe.close()


# -- merging and live output --------------------------------------------------------------


def _merge_hists(items: Iterable[Histogram | dict[str, Any]]) -> Histogram:
    out = Histogram()
    for h in items:
        out.merge(h if isinstance(h, Histogram) else Histogram.from_dict(h))
    return out


def _fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} us" if ns >= 10_000 else f"{ns / 1000:.1f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


class _Live:
    """Interval lines (iperf3-like) and a progress bar: rich on a terminal, plain lines otherwise."""

    def __init__(self, cfg: StressConfig, stream: TextIO, enabled: bool) -> None:
        self.cfg = cfg
        self.stream = stream
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._console: Any = None
        if enabled and stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

                self._console = Console(file=stream, highlight=False)
                total = cfg.messages if cfg.messages is not None else (cfg.duration or 0) + cfg.warmup
                label = "messages" if cfg.messages is not None else "seconds"
                self._progress = Progress(
                    TextColumn("[bold]stress"),
                    BarColumn(),
                    TaskProgressColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + label),
                    console=self._console,
                    auto_refresh=False,  # refreshed on each interval: no thread competing with the loop
                    transient=True,
                )
                self._task = self._progress.add_task("stress", total=total)
                self._progress.start()
            except ImportError:  # pragma: no cover - rich is a dependency
                self._console = None

    @property
    def has_bar(self) -> bool:
        """True when a rich progress bar is shown."""
        return self._progress is not None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            if self._progress is not None:
                self._progress.console.print(text, markup=False)
                self._progress.refresh()
            else:
                print(text, file=self.stream, flush=True)
        except BrokenPipeError:  # the reader went away (| head): stop live output, keep running
            self.enabled = False
            _silence(self.stream)

    def progress(self, value: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=value)
            self._progress.refresh()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _Aggregator:
    """Merges the interval snapshots of all workers into interval lines and a series."""

    def __init__(self, cfg: StressConfig, workers: int, live: _Live) -> None:
        self.cfg = cfg
        self.live = live
        self.waiting = set(range(workers))
        self.all = list(range(workers))
        self.ticks: dict[int, dict[int, dict[str, Any]]] = {}
        self.latest: dict[int, dict[str, Any]] = {}
        self.next_k = 1
        self.t0: int | None = None
        self.prev = {"t": 0, "done_all": 0, "payload_all": 0, "errors": 0}
        self.intervals: list[dict[str, Any]] = []

    def start(self, t0: int) -> None:
        self.t0 = t0
        self.prev["t"] = t0

    def tick(self, w: int, snap: dict[str, Any]) -> None:
        self.latest[w] = snap
        self.ticks.setdefault(snap["k"], {})[w] = snap
        self._flush()

    def finished(self, w: int, final: dict[str, Any] | None) -> None:
        if final is not None:
            self.latest[w] = final
        self.waiting.discard(w)
        self._flush()

    def _flush(self) -> None:
        while self.ticks:
            k = min(self.ticks)
            snaps = self.ticks[k]
            # A worker that skipped tick k (its loop stalled) has passed it all the same.
            if any(self.latest.get(w, {"k": 0})["k"] < k for w in self.waiting):
                return
            del self.ticks[k]
            self._emit([snaps.get(w) or self.latest.get(w) for w in self.all], final=False)

    def close(self) -> None:
        """Emit the last, partial interval from the final snapshots."""
        self.ticks.clear()
        snaps = [self.latest.get(w) for w in self.all]
        if any(s is not None for s in snaps):
            t = max(s["t"] for s in snaps if s is not None)
            if t - self.prev["t"] > 0.05 * self.cfg.interval * 1e9:
                self._emit(snaps, final=True)

    def _emit(self, snaps: list[dict[str, Any] | None], final: bool) -> None:
        present = [s for s in snaps if s is not None]
        if not present or self.t0 is None:
            return
        t = max(s["t"] for s in present)
        done_all = sum(s["done_all"] for s in present)
        payload_all = sum(s["payload_all"] for s in present)
        errors = sum(s["errors"] for s in present)
        done = sum(s["done"] for s in present)
        hists = [s["hist"] for s in present]
        hist = hists[0] if len(hists) == 1 and isinstance(hists[0], Histogram) else _merge_hists(hists)
        dt = max(t - self.prev["t"], 1)
        msgs = done_all - self.prev["done_all"]
        nbytes = payload_all - self.prev["payload_all"]
        start_s = (self.prev["t"] - self.t0) / 1e9
        end_s = (t - self.t0) / 1e9
        p99 = hist.percentile(99) if hist.count else None
        rec = {
            "start_s": round(start_s, 6),
            "end_s": round(end_s, 6),
            "msgs": msgs,
            "bytes": nbytes,
            "msgs_per_s": msgs * 1e9 / dt,
            "mb_per_s": nbytes * 1e3 / dt,
            "p99_us": None if p99 is None else p99 / 1000,
            "errors": errors - self.prev["errors"],
            "warmup": start_s < self.cfg.warmup - 1e-9,
        }
        self.intervals.append(rec)
        self.prev = {"t": t, "done_all": done_all, "payload_all": payload_all, "errors": errors}
        line = (
            f"[{start_s:6.2f}-{end_s:6.2f} s] {rec['msgs_per_s']:>10,.0f} msg/s {rec['mb_per_s']:>8.2f} MB/s"
            f"  p99 {_fmt_ns(p99):>8}  errors {errors}"
        )
        if rec["warmup"]:
            line += "  (warmup)"
        if self.cfg.messages is not None:
            if not self.live.has_bar:  # the bar shows the count on a terminal
                line += f"  [{done:,}/{self.cfg.messages:,}]"
            self.live.progress(done)
        else:
            self.live.progress(min(end_s, (self.cfg.duration or 0) + self.cfg.warmup))
        self.live.line(line)


# -- running ------------------------------------------------------------------------------


class _Stopper:
    """SIGINT/SIGTERM handlers that ask the run to stop (and restore the old ones)."""

    def __init__(self) -> None:
        self.requested = False
        self.targets: list[_Worker] = []

    def __enter__(self) -> _Stopper:
        self._signals = stop_signals(self._handle)
        self._signals.__enter__()
        return self

    def _handle(self) -> None:
        self.requested = True
        for w in self.targets:
            w.stop_requested = True

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(None, None, None)


def _run_inprocess(
    cfg: StressConfig, address: tuple[int, Any], agg: _Aggregator, stopper: _Stopper
) -> list[dict[str, Any]]:
    worker = _Worker(cfg, _shares(cfg)[0], address)
    stopper.targets.append(worker)
    if stopper.requested:
        worker.stop_requested = True
    try:
        worker.connect_all()
        _announce_connected(agg.live, cfg, worker.established, worker.failed, worker.connect_ns)
        t0 = time.monotonic_ns()
        agg.start(t0)
        if worker.established:
            worker.run(t0, lambda snap: agg.tick(0, snap))
        else:
            worker.final_tick = worker.snapshot(1, t0, False)
            worker.t0 = worker.t_start = worker.t_done = t0
        result = worker.result()
        agg.finished(0, worker.final_tick)
        return [result]
    finally:
        worker.close()


def _announce_connected(
    live: _Live, cfg: StressConfig, established: int, failed: int, connect_ns: int
) -> None:
    live.line(
        f"connected {established}/{cfg.connections} in {_fmt_ns(connect_ns)}"
        + (f" ({failed} failed)" if failed else "")
    )


def _run_processes(
    cfg: StressConfig, address: tuple[int, Any], agg: _Aggregator, stopper: _Stopper
) -> tuple[list[dict[str, Any]], list[str]]:
    import multiprocessing
    import multiprocessing.connection as mpc

    # spawn: no inherited locks or threads; each worker is a clean interpreter.
    ctx = multiprocessing.get_context("spawn")
    shares = _shares(cfg)
    pipes = []
    procs = []
    problems: list[str] = []
    for share in shares:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_process, args=(cfg, share, address, child_end), name=f"stress-{share.index}"
        )
        proc.daemon = True
        proc.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(proc)
    by_pipe = {id(p): i for i, p in enumerate(pipes)}
    stopped = {"sent": False}

    def send_stop() -> None:
        if stopped["sent"]:
            return
        stopped["sent"] = True
        for p in pipes:
            try:
                p.send(("stop",))
            except OSError:
                pass

    results: dict[int, dict[str, Any]] = {}
    ready: dict[int, tuple[int, int]] = {}
    gone: set[int] = set()
    crashed: set[int] = set()
    open_pipes = list(pipes)
    begin = time.monotonic_ns()
    connect_budget = cfg.timeout + 10 + (cfg.connections / cfg.connect_rate if cfg.connect_rate else 0)
    go_sent = False
    stop_deadline: float | None = None
    try:
        while open_pipes:
            if stopper.requested:
                send_stop()
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + cfg.timeout + 5
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                problems.append("workers did not stop in time; terminated")
                break
            if not go_sent and all(i in ready or i in gone for i in range(len(pipes))):
                established = sum(r[0] for r in ready.values())
                failed = sum(r[1] for r in ready.values())
                _announce_connected(agg.live, cfg, established, failed, time.monotonic_ns() - begin)
                t0 = time.monotonic_ns() + 20_000_000  # a common start shortly ahead
                agg.start(t0)
                for p in pipes:
                    try:
                        p.send(("go", t0))
                    except OSError:
                        pass
                go_sent = True
            elif not go_sent and (time.monotonic_ns() - begin) / 1e9 > connect_budget:
                problems.append("workers did not finish connecting in time")
                send_stop()
            for ready_end in mpc.wait(open_pipes, timeout=0.1):
                assert isinstance(ready_end, mpc.Connection)
                p = ready_end
                w = by_pipe[id(p)]
                try:
                    msg = p.recv()
                except (EOFError, OSError):
                    open_pipes.remove(p)
                    gone.add(w)
                    if w not in results and w not in crashed:
                        problems.append(f"worker {w} exited without a result")
                        agg.finished(w, None)
                    continue
                if msg[0] == "ready":
                    ready[w] = (msg[1], msg[2])
                elif msg[0] == "tick":
                    agg.tick(w, msg[1])
                elif msg[0] == "result":
                    results[w] = msg[1]
                    agg.finished(w, msg[1]["final_tick"])
                elif msg[0] == "crash":
                    crashed.add(w)
                    problems.append(f"worker {w} failed: {msg[1]}")
                    agg.finished(w, None)
    finally:
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
        for p in pipes:
            p.close()
    return [results[i] for i in sorted(results)], problems


# -- the report ---------------------------------------------------------------------------


def _build_report(
    cfg: StressConfig,
    address: str,
    results: list[dict[str, Any]],
    intervals: list[dict[str, Any]],
    problems: list[str],
) -> tuple[dict[str, Any], Histogram]:
    hist = _merge_hists(r["hist"] for r in results)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    examples: list[str] = []
    for r in results:
        for kind, n in r["errors"].items():
            errors[kind] += n
        examples.extend(r["examples"])
    established = sum(r["established"] for r in results)
    failed = cfg.connections - established
    if results:
        t_start = min(r["t_start"] for r in results)
        t_end = max(r["t_end"] for r in results)
        elapsed = max(0.0, (t_end - t_start) / 1e9)
    else:
        elapsed = 0.0
    done = sum(r["done"] for r in results)
    payload = sum(r["payload"] for r in results)
    msgs_per_s = done / elapsed if elapsed > 0 else 0.0
    p50, p90, p99, p999 = hist.percentiles([50, 90, 99, 99.9])
    total_errors = sum(errors.values()) + len(problems)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "target": {
            "host": cfg.host,
            "port": cfg.port,
            "address": address,
            "transport": "udp" if cfg.udp else "tcp",
            "frame": None if cfg.udp else str(cfg.frame),
        },
        "config": {
            "connections": cfg.connections,
            "size_min": cfg.size_min,
            "size_max": cfg.size_max,
            "seed": cfg.seed,
            "depth": cfg.depth,
            "duration_s": cfg.duration,
            "messages": cfg.messages,
            "warmup_s": cfg.warmup,
            "rate": cfg.rate,
            "connect_rate": cfg.connect_rate,
            "workers": cfg.workers,
            "timeout_s": cfg.timeout,
            "expect": cfg.expect,
        },
        "connections": {
            "requested": cfg.connections,
            "established": established,
            "failed": failed,
            "connect_s": max((r["connect_ns"] for r in results), default=0) / 1e9,
        },
        "security": {
            "tls": cfg.tls,
            "client_cert": cfg.tls and cfg.tls_cert is not None,
            "auth": cfg.auth_key is not None,
        },
        "elapsed_s": elapsed,
        "interrupted": any(r["interrupted"] for r in results),
        "messages": {
            "sent": sum(r["sent"] for r in results),
            "verified": done,
            "in_flight": sum(r["in_flight"] for r in results),
            "unsent": sum(r["unsent"] for r in results),
            "warmup": sum(r["done_all"] - r["done"] for r in results),
        },
        "bytes": {
            "payload": payload,
            "sent": sum(r["wire_out"] for r in results),
            "received": sum(r["wire_in"] for r in results),
        },
        "rate": {
            "msgs_per_s": msgs_per_s,
            "mb_per_s": payload / elapsed / 1e6 if elapsed > 0 else 0.0,
            "target_msgs_per_s": cfg.rate,
        },
        "latency_us": {
            "count": hist.count,
            "min": (hist.min or 0) / 1000,
            "mean": hist.mean / 1000,
            "p50": p50 / 1000,
            "p90": p90 / 1000,
            "p99": p99 / 1000,
            "p99_9": p999 / 1000,
            "max": (hist.max or 0) / 1000,
        },
        "errors": errors,
        "errors_total": sum(errors.values()),
        "error_examples": examples[:_MAX_EXAMPLES] + problems,
        "intervals": intervals,
        "histogram": hist.to_dict(),
        "ok": total_errors == 0,
        "exit_status": 0 if total_errors == 0 else 1,
    }
    return report, hist


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _reasons(results: list[dict[str, Any]]) -> dict[str, str]:
    """The first reason of each tls/auth failure, over all workers."""
    out: dict[str, str] = {}
    for r in results:
        for kind, why in r.get("reasons", {}).items():
            out.setdefault(kind, why)
    return out


def _error_lines(report: dict[str, Any], timeout: float, reasons: dict[str, str] | None = None) -> list[str]:
    lines = []
    for kind in ERROR_KINDS:
        n = report["errors"][kind]
        if n:
            noun, text = _ERROR_TEXT[kind]
            line = f"{_plural(n, noun)} {text.format(timeout=timeout)}"
            if reasons and kind in reasons:  # tls, auth: the cause varies; say the first
                line += f" ({reasons[kind]})"
            lines.append(line)
    return lines


def _size_text(cfg: StressConfig) -> str:
    if cfg.size_min == cfg.size_max:
        return f"{cfg.size_min:,} B"
    return f"{cfg.size_min:,}-{cfg.size_max:,} B (uniform, seed {cfg.seed})"


def _format_report(cfg: StressConfig, report: dict[str, Any], reasons: dict[str, str] | None = None) -> str:
    t = report["target"]
    m = report["messages"]
    lat = report["latency_us"]
    rate = report["rate"]
    conns = report["connections"]
    mode = f"rate {cfg.rate:,.0f} msg/s" if cfg.rate is not None else "closed loop"
    lines = [
        f"msgsock stress: {t['address']} {t['transport']}"
        + _security_text(cfg)
        + (f", frame {t['frame']}" if t["frame"] else "")
        + f", expect {cfg.expect}, {mode}",
        f"  connections  {conns['established']:,} of {conns['requested']:,} established"
        f" (in {_fmt_ns(conns['connect_s'] * 1e9)}), depth {cfg.depth}, {cfg.workers} worker(s)",
        f"  size         {_size_text(cfg)}",
        f"  time         {report['elapsed_s']:.3f} s"
        + (f" after {cfg.warmup:g} s warmup" if cfg.warmup else "")
        + (" (interrupted)" if report["interrupted"] else ""),
        f"  messages     {m['sent']:,} sent, {m['verified']:,} verified byte for byte"
        + (f", {m['in_flight']:,} in flight at stop" if m["in_flight"] else "")
        + (f", {m['unsent']:,} scheduled but never sent" if m["unsent"] else ""),
        f"  bytes        {report['bytes']['payload']:,} payload verified;"
        f" {report['bytes']['sent']:,} sent, {report['bytes']['received']:,} received on the wire",
        f"  throughput   {rate['msgs_per_s']:,.0f} msg/s, {rate['mb_per_s']:,.2f} MB/s"
        + (f" (target {cfg.rate:,.0f} msg/s)" if cfg.rate is not None else ""),
    ]
    if lat["count"]:
        lines.append(
            "  latency      "
            + ", ".join(
                f"{name} {_fmt_ns(lat[key] * 1000)}"
                for name, key in (
                    ("p50", "p50"),
                    ("p90", "p90"),
                    ("p99", "p99"),
                    ("p99.9", "p99_9"),
                    ("max", "max"),
                )
            )
            + f" (mean {_fmt_ns(lat['mean'] * 1000)}, {lat['count']:,} samples"
            + (", from intended send times)" if cfg.rate is not None else ")")
        )
    else:
        lines.append("  latency      no samples")
    errs = _error_lines(report, cfg.timeout, reasons)
    if errs:
        lines.append("  errors       " + errs[0])
        lines.extend("               " + e for e in errs[1:])
    else:
        lines.append("  errors       none")
    for ex in report["error_examples"]:
        lines.append("    e.g.       " + ex)
    return "\n".join(lines)


def _security_text(cfg: StressConfig) -> str:
    """``, tls``, ``, mutual tls``, ``, auth``: what the connections ran besides TCP."""
    parts = []
    if cfg.tls:
        parts.append("mutual tls" if cfg.tls_cert is not None else "tls")
    if cfg.auth_key is not None:
        parts.append("auth")
    return "".join(", " + p for p in parts)


def _verdict(report: dict[str, Any], timeout: float, reasons: dict[str, str] | None = None) -> str:
    if report["ok"]:
        return f"OK: {report['messages']['verified']:,} replies verified, no errors"
    errs = _error_lines(report, timeout, reasons)
    extra = [e for e in report["error_examples"] if e.startswith("worker")]
    return "FAILED: " + "; ".join(errs + extra)


# -- plotting -----------------------------------------------------------------------------


def _plot_available() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _plot(path: str, cfg: StressConfig, report: dict[str, Any], hist: Histogram) -> None:
    """Write a PNG: latency histogram, latency by percentile, throughput over time.

    Raises:
        ImportError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig = plt.figure(figsize=(11, 8), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    ax_hist = fig.add_subplot(grid[0, 0])
    ax_pct = fig.add_subplot(grid[0, 1])
    ax_tp = fig.add_subplot(grid[1, :])
    t = report["target"]
    fig.suptitle(
        f"msgsock stress: {t['address']} {t['transport']}, {cfg.connections} conn x depth {cfg.depth}, "
        f"{_size_text(cfg)}, {report['rate']['msgs_per_s']:,.0f} msg/s, "
        f"{_plural(report['errors_total'], 'error')}"
    )
    if hist.count:
        # Latency distribution: share of samples per log-spaced bin (µs, log x axis).
        lo = max(hist.min or 1, 1)
        hi = max(hist.max or 1, lo + 1)
        nbins = 60
        edges = [lo * (hi / lo) ** (i / nbins) for i in range(nbins + 1)]
        shares = [0.0] * nbins
        span = math.log(hi / lo)
        for index, count in hist.nonzero():
            a, b = bucket_bounds(index)
            mid = max(lo, min(hi, (a + b) / 2))
            i = min(nbins - 1, int(math.log(mid / lo) / span * nbins)) if span > 0 else 0
            shares[i] += 100.0 * count / hist.count
        ax_hist.bar(
            [e / 1000 for e in edges[:-1]],
            shares,
            width=[(edges[i + 1] - edges[i]) / 1000 for i in range(nbins)],
            align="edge",
            color="tab:blue",
        )
        ax_hist.set_xscale("log")
        ax_hist.set_yscale("log")  # so the tail, where the trouble is, stays visible
        ax_hist.set_xlabel("latency (µs)")
        ax_hist.set_ylabel("% of messages (log)")
        ax_hist.set_title("latency distribution")
        # Latency by percentile, HdrHistogram style: x = number of nines.
        nines_max = max(1.0, min(6.0, math.log10(hist.count)))
        xs = [nines_max * i / 200 for i in range(201)]
        ps = [100.0 * (1 - 10 ** (-x)) for x in xs]
        ys = [v / 1000 for v in hist.percentiles(ps)]
        ax_pct.plot(xs, ys, color="tab:red")
        ticks = [x for x in range(int(nines_max) + 1)]
        ax_pct.set_xticks(ticks)
        ax_pct.set_xticklabels(["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"][: len(ticks)])
        ax_pct.set_xlabel("percentile")
        ax_pct.set_ylabel("latency (µs)")
        ax_pct.set_title("latency by percentile")
        ax_pct.grid(True, alpha=0.3)
    else:
        for ax in (ax_hist, ax_pct):
            ax.text(0.5, 0.5, "no latency samples", ha="center", va="center", transform=ax.transAxes)
    intervals = report["intervals"]
    if intervals:
        mids = [(iv["start_s"] + iv["end_s"]) / 2 for iv in intervals]
        widths = [iv["end_s"] - iv["start_s"] for iv in intervals]
        colors = ["tab:gray" if iv["warmup"] else "tab:green" for iv in intervals]
        ax_tp.bar(mids, [iv["msgs_per_s"] for iv in intervals], width=widths, color=colors, edgecolor="white")
        ax_tp.set_ylabel("verified messages/s")
        ax_tp.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        bad = [(m, iv["errors"]) for m, iv in zip(mids, intervals, strict=True) if iv["errors"]]
        for n, (m, count) in enumerate(bad):  # a red band where errors happened
            ax_tp.axvline(m, color="tab:red", alpha=0.35, linewidth=6, label="errors" if n == 0 else None)
            ax_tp.annotate(f"{count}", (m, 0), color="tab:red", ha="center", va="bottom")
        if bad:
            ax_tp.legend(loc="lower right")
        p99s = [(m, iv["p99_us"]) for m, iv in zip(mids, intervals, strict=True) if iv["p99_us"] is not None]
        if p99s:
            ax2 = ax_tp.twinx()
            ax2.plot([p[0] for p in p99s], [p[1] for p in p99s], color="tab:red", marker=".")
            ax2.set_ylabel("p99 so far (µs)", color="tab:red")
            ax2.set_ylim(0, max(p[1] for p in p99s) * 1.15 or 1)
    else:
        ax_tp.text(0.5, 0.5, "no intervals", ha="center", va="center", transform=ax_tp.transAxes)
    ax_tp.set_xlabel("time since start (s)" + (" — gray: warmup" if cfg.warmup else ""))
    ax_tp.set_title("throughput over time")
    ax_tp.grid(True, axis="y", alpha=0.3)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# -- command line -------------------------------------------------------------------------


def _size_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep:
        n = _args.byte_size(text)
        return n, n
    a, b = _args.byte_size(low), _args.byte_size(high)
    if a > b:
        raise argparse.ArgumentTypeError(f"size range {text!r} has MIN above MAX")
    return a, b


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``msgsock stress`` options (SPEC §6.3) to ``parser``."""
    parser.add_argument(
        "host",
        nargs="?",
        default="127.0.0.1",
        metavar="HOST",
        help="server host name or address (default 127.0.0.1)",
    )
    parser.add_argument("--port", type=_args.port, default=9898, help="server port (default 9898)")
    parser.add_argument(
        "-c", "--connections", type=_args.positive_int, default=1, metavar="N", help="connections (default 1)"
    )
    parser.add_argument(
        "-s",
        "--size",
        type=_size_range,
        default=(64, 64),
        metavar="BYTES|MIN-MAX",
        help="message body size, or a range drawn uniformly per message (default 64)",
    )
    parser.add_argument(
        "--seed",
        type=_args.whole_number,
        default=1,
        help="seed of the random sizes of --size MIN-MAX (default 1)",
    )
    parser.add_argument(
        "-d",
        "--depth",
        type=_args.positive_int,
        default=1,
        metavar="D",
        help="messages in flight per connection (default 1)",
    )
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument(
        "-t", "--duration", type=_args.positive_float, metavar="S", help="seconds to measure (default 10)"
    )
    how_long.add_argument(
        "-n",
        "--messages",
        type=_args.positive_int,
        metavar="N",
        help="total messages to measure, across connections",
    )
    parser.add_argument(
        "--warmup",
        type=_args.non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds of unmeasured traffic first",
    )
    parser.add_argument(
        "--rate",
        type=_args.positive_float,
        metavar="R",
        help="open loop: R messages/s overall on a fixed schedule; latency from intended send times",
    )
    parser.add_argument(
        "--connect-rate", type=_args.positive_float, metavar="R", help="open at most R connections per second"
    )
    parser.add_argument(
        "--frame",
        type=_args.frame,
        default=FrameFormat(),
        help=f"frame format: a preset ({', '.join(PRESETS)}) or a format string such as "
        "'u32be+kind:B' (default u32be; ignored with --udp)",
    )
    parser.add_argument(
        "--max-size",
        type=_args.byte_size,
        default=None,
        metavar="BYTES",
        help="largest reply accepted (default 16MiB, or what the frame's length field can count)",
    )
    parser.add_argument("--udp", action="store_true", help="UDP: one datagram per message, no length header")
    parser.add_argument(
        "-w",
        "--workers",
        type=_args.positive_int,
        default=1,
        metavar="N",
        help="processes to run (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=_args.positive_float,
        default=5.0,
        metavar="S",
        help="a reply later than S counts as lost; also the deadline of each connect, TLS and "
        "authentication handshakes included (default 5)",
    )
    parser.add_argument(
        "--expect", choices=("echo", "reverse"), default="echo", help="what the server replies (default echo)"
    )
    parser.add_argument(
        "--interval",
        type=_args.positive_float,
        default=1.0,
        metavar="S",
        help="seconds between live lines (default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write latency and throughput plots (needs matplotlib)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no live output")
    # The same TLS and authentication options as `msgsock client` (SPEC §4.2, §7).  Imported
    # here, not at the top: cli imports this module to build its parser.
    from ._args import add_client_security_options

    add_client_security_options(parser)


def _config(args: argparse.Namespace) -> StressConfig:
    """Build and check the configuration.

    Raises:
        _UsageError: a combination of options that cannot work.
    """
    size_min, size_max = args.size
    if args.udp:
        # No frames over UDP (--frame is ignored), so nothing to check the size against.
        max_size = DEFAULT_MAX_SIZE if args.max_size is None else args.max_size
        frame: FrameFormat = args.frame.with_max_size(max_size)
        if size_max > _UDP_MAX:
            raise _UsageError(f"--size {size_max} is above the largest UDP datagram ({_UDP_MAX} bytes)")
    else:
        try:  # the check serve and client make too
            frame = _args.frame_with_max_size(args.frame, args.max_size)
        except _args.UsageError as exc:
            raise _UsageError(str(exc)) from None
        if size_max > frame.max_body:
            limit = "" if args.max_size is None else f" with --max-size {args.max_size}"
            raise _UsageError(
                f"--size {size_max} does not fit frame {frame}{limit} (largest body {frame.max_body})"
            )
    if args.workers > args.connections:
        raise _UsageError(
            f"--workers {args.workers} needs at least as many --connections (have {args.connections})"
        )
    if args.messages is not None and args.workers > args.messages:
        raise _UsageError(f"--workers {args.workers} is more than --messages {args.messages}")
    duration = args.duration if args.duration is not None or args.messages is not None else 10.0
    tls = bool(args.tls or args.tls_ca or args.tls_cert or args.tls_server_name)
    if args.udp and (tls or args.tls_key or args.auth_key_file):
        raise _UsageError("--udp cannot be combined with TLS or --auth-key-file (datagrams have neither)")
    from ._args import client_security

    try:
        # Checks the files once here (a usage error), though every worker builds its own
        # context: an SSLContext cannot be sent to a worker process.
        context, auth_key = client_security(args)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    assert tls == (context is not None)
    return StressConfig(
        host=args.host,
        port=args.port,
        connections=args.connections,
        size_min=size_min,
        size_max=size_max,
        seed=args.seed,
        depth=args.depth,
        duration=duration,
        messages=args.messages,
        warmup=args.warmup,
        rate=args.rate,
        connect_rate=args.connect_rate,
        frame=frame,
        udp=args.udp,
        workers=args.workers,
        timeout=args.timeout,
        expect=args.expect,
        interval=args.interval,
        tls=tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        server_hostname=args.tls_server_name,
        auth_key=auth_key,
    )


def _resolve(cfg: StressConfig) -> tuple[int, Any]:
    """Return ``(family, sockaddr)`` of the server.

    Raises:
        OSError: the name does not resolve.
    """
    kind = socket.SOCK_DGRAM if cfg.udp else socket.SOCK_STREAM
    infos = socket.getaddrinfo(cfg.host, cfg.port, type=kind)
    if not infos:
        raise OSError(f"no address for {cfg.host}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _raise_fd_limit(needed: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _prog(args: argparse.Namespace) -> str:
    """The command's name in error lines: ``msgsock stress`` or ``python -m msgsock.app.stress``."""
    return str(getattr(args, "prog", "msgsock stress"))


def run(args: argparse.Namespace) -> int:
    """Run ``msgsock stress``: load, verify, report.

    Returns:
        0 when every reply was verified and nothing went wrong; 1 when any error was
        detected (lost, duplicated, reordered, corrupted, aborted messages; refused,
        timed-out, TLS-failed, unauthenticated, closed, reset or protocol-breaking
        connections) or the server could not be reached; 2 for bad options (including
        unreadable TLS or key files).
    """
    try:
        cfg = _config(args)
    except _UsageError as exc:
        return _args.usage_error(_prog(args), str(exc))
    if args.plot and not _plot_available():
        return _args.usage_error(
            _prog(args), "--plot needs matplotlib: pip install 'msgsock[plot]'", hint=False
        )
    try:
        address = _resolve(cfg)
    except OSError as exc:
        print(f"msgsock stress: error: cannot resolve {cfg.host!r}: {exc}", file=sys.stderr)
        return 1
    _raise_fd_limit(cfg.connections // cfg.workers + 64)
    live_stream = sys.stderr if args.json else sys.stdout
    live = _Live(cfg, live_stream, enabled=not args.quiet)
    agg = _Aggregator(cfg, cfg.workers, live)
    what = f"{cfg.messages:,} messages" if cfg.messages is not None else f"{cfg.duration:g} s"
    live.line(
        f"stress {format_address(address[1])} "
        f"({'udp' if cfg.udp else 'tcp' + _security_text(cfg) + ', frame ' + str(cfg.frame)}): "
        f"{cfg.connections} connection(s) x depth {cfg.depth}, {_size_text(cfg)}, {what}"
        + (f", rate {cfg.rate:,.0f} msg/s" if cfg.rate is not None else "")
        + (f", {cfg.workers} workers" if cfg.workers > 1 else "")
    )
    problems: list[str] = []
    try:
        with _Stopper() as stopper:
            if cfg.workers == 1:
                results = _run_inprocess(cfg, address, agg, stopper)
            else:
                results, problems = _run_processes(cfg, address, agg, stopper)
        agg.close()
    finally:
        live.stop()
    report, hist = _build_report(cfg, format_address(address[1]), results, agg.intervals, problems)
    reasons = _reasons(results)
    try:
        if args.json:
            print(json.dumps(report))
        else:
            print(_format_report(cfg, report, reasons))
        verdict = _verdict(report, cfg.timeout, reasons)
        if args.json:
            if not report["ok"]:
                print(f"msgsock stress: {verdict}", file=sys.stderr)
        else:
            print(verdict)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)
    if args.plot:
        try:
            _plot(args.plot, cfg, report, hist)
        except ImportError:
            return _args.usage_error(
                _prog(args), "--plot needs matplotlib: pip install 'msgsock[plot]'", hint=False
            )
        except OSError as exc:
            print(f"msgsock stress: error: cannot write {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not args.json and not args.quiet:
            try:
                print(f"plot written to {args.plot}")
            except BrokenPipeError:
                _silence(sys.stdout)
    return int(report["exit_status"])


def _silence(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null, so exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: Sequence[str] | None = None) -> int:
    parser = _args.ArgumentParser(
        prog="python -m msgsock.app.stress",
        description="Verifying load generator (the iocpclient successor).",
    )
    configure_parser(parser)
    parser.set_defaults(prog=parser.prog)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # Re-import under the package name so worker processes (spawned) find every
    # function as msgsock.app.stress.*, not __main__.*.
    from msgsock.app import stress as _self

    sys.exit(_self._main())
