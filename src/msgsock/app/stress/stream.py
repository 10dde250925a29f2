"""Stream mode: checking a connection's replies without parsing them.

Theory of operation
-------------------
The common case (TCP, closed loop, echo, one fixed size of 13 bytes to 32 KiB, no extra
header fields: every cell of the SPEC §8 benchmark) does not parse replies one by one.
An echo server returns, on each connection, exactly the bytes that were written, in
order.  So each connection has a circular *window* holding the wire bytes of its
messages, message ``s`` in slot ``s mod window``, built ahead a block at a time
(:meth:`_StreamLayout.extend`).  A write sends the next slots; a read is verified with
one comparison against the window (a whole read's worth of replies, headers included,
in one memcmp; two where the window wraps).  A read that verifies costs no per-message
Python work: messages completed = verified bytes // message size, and latencies come
from the write log, one entry per write (every message of a write shares its send time
and every message completed by a read its read time, as in the C load generator).  A
slot is rebuilt only after its reply was verified, so the window is depth + one block,
which keeps the busy part of every window small enough to stay in cache.

The first read that does not match, a timeout, or the end of the connection turns the
connection into the general mode for good (:meth:`_StreamLayout.leave`): the verified
part of an unfinished reply is fed to a fresh :class:`~msgsock.protocol.MessageProtocol`,
``pending`` is rebuilt from the write log, and the mismatching read is parsed and
classified message by message by the ledger, exactly as if the general mode had been
used from the start (SPEC §6.3).

This module is pure (no sockets, no clock): the window, its layout and the change of
mode.  The loop that reads, compares and writes is :mod:`.hotloop`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ...framing import FrameFormat
from ...protocol import MessageProtocol
from .ledger import _Account
from .payload import _BIG, _ID_CID, _ID_SIZE, _Payloads

if TYPE_CHECKING:
    from .config import StressConfig

_BLOCK_BYTES = 64 * 1024  # most wire bytes in one block of messages ...
_WINDOWS_TOTAL = 64 * 1024 * 1024  # ... and in all windows, unless --depth needs more
_LOWS = bytes(range(256))


def _stream_eligible(cfg: StressConfig, payloads: _Payloads) -> bool:
    """True when a run can use stream mode: TCP, closed loop, echo, one fixed size of
    13 bytes to 32 KiB, no extra header fields."""
    return (
        not cfg.udp
        and cfg.rate is None
        and cfg.expect == "echo"
        and cfg.size_min == cfg.size_max
        and _ID_SIZE < cfg.size_min < _BIG
        and not payloads.fields
    )


class _StreamAccount(_Account):
    """A connection's record with its stream-mode window (see the module docstring)."""

    __slots__ = ("rot", "rx", "stream", "win", "wlog", "wmv", "wtop")

    def __init__(self, cid: int) -> None:
        """The record of connection ``cid``, not in stream mode until the pump says so."""
        super().__init__(cid)
        self.stream = False
        self.win = bytearray()  # circular: message s at slot s mod window (extend)
        self.wmv = memoryview(self.win)
        self.wtop = 0  # messages below this are built in the window
        self.rx = 0  # verified bytes of the reply stream
        self.wlog: deque[tuple[int, int]] = deque()  # (end seq of a write, time written)
        self.rot = _Payloads.rotation(cid)  # pattern rotation of this connection, in messages


class _StreamLayout:
    """The shape of every window of one worker, and the operations on a window."""

    def __init__(self, frame: FrameFormat, depth: int, connections: int, payloads: _Payloads) -> None:
        """Size the blocks and windows for ``connections`` connections at ``depth``.

        Args:
            frame: the frame format (its header is part of every message in the window).
            depth: messages in flight per connection.
            connections: connections of this worker (they share the memory budget).
            payloads: the run's bodies (one fixed size).
        """
        self.frame = frame
        head = frame.encode_header(payloads.size_min)
        ml = len(head) + payloads.size_min
        self.hlen = len(head)  # wire bytes of the frame header (where the id starts)
        self.mlen = ml  # wire bytes of one message (header + body)
        # Blocks big enough that building one is rare, small enough that the windows
        # of many connections stay in memory (and the busy part of them in cache).
        budget = _WINDOWS_TOTAL // max(1, connections)
        block = 256
        while block > 1 and (block * ml > _BLOCK_BYTES or 2 * block * ml > budget):
            block //= 2
        self.block = block  # messages per block
        # The smallest multiple of block that holds depth messages in flight plus the
        # block being built: slots are rewritten only once their replies are verified.
        self.window = -(-(depth + block) // block) * block  # messages per window
        self.wbytes = self.window * ml
        self.ring = memoryview(payloads.ring(head, 256 + block))
        self.consts = [bytes([v]) * block for v in range(256)]  # block copies of each byte value

    def extend(self, acct: _StreamAccount, s1: int) -> None:
        """Build blocks in ``acct``'s window until it holds message ``s1 - 1``.

        A block is ``block`` messages starting at a multiple of ``block`` (at most 256),
        so within it only the low byte of the sequence number changes: it is one copy
        from the shared ring (``_Payloads.ring``, rotated for this connection) and one
        strided write per nonzero id byte.  Its slots held messages a whole window
        earlier, whose replies were verified (``s1 <= next_rx + depth``).
        """
        ml = self.mlen
        block = self.block
        window = self.window
        first = self.hlen  # where the id starts in each message
        size = block * ml
        if not acct.win:
            acct.win = bytearray(self.wbytes)
            acct.wmv = memoryview(acct.win)
        win = acct.win
        ring = self.ring
        consts = self.consts
        # (position, value) of the nonzero connection id bytes; zero bytes come with the ring
        cid_columns = [(first + _ID_CID + i, v) for i, v in enumerate(acct.cid.to_bytes(4, "little")) if v]
        while acct.wtop < s1:
            b = acct.wtop
            off = b % window * ml
            end = off + size
            j = (b + acct.rot) & 255
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
            acct.wtop = b + block

    def leave(self, acct: _StreamAccount, *, decode: bool = True) -> MessageProtocol | None:
        """Take ``acct`` out of stream mode for good: rebuild the general mode's ``pending``.

        Args:
            acct: a connection in stream mode.
            decode: also return a protocol holding the verified start of an unfinished
                reply (not needed when the connection is ending on our side).

        Returns:
            The connection's protocol for the general mode, or None without ``decode``.
        """
        acct.stream = False
        proto = None
        if decode:
            proto = MessageProtocol(self.frame)
            part = acct.rx % self.mlen
            if part:  # the verified start of an unfinished reply
                a = (acct.rx - part) % self.wbytes
                b = a + part
                head = (
                    acct.wmv[a:b].tobytes()
                    if b <= self.wbytes
                    else acct.wmv[a:].tobytes() + acct.wmv[: b - self.wbytes]
                )
                proto.receive_data(head)
        pending = acct.pending
        s = acct.next_rx
        for end, t in acct.wlog:
            for x in range(s, end):
                pending[x] = t
            s = end
        acct.wlog.clear()
        acct.win = bytearray()
        acct.wmv = memoryview(acct.win)
        return proto
