"""Message identity: how each message body is built, and how a reply is matched to it.

Theory of operation
-------------------
Every message carries its identity, so each reply can be checked **byte for byte**::

    bytes [0, 8)    sequence number, u64 little-endian
    bytes [8, 12)   connection id, u32 little-endian
    bytes [12, n)   pattern[off : off + n - 12], off = (seq * 167 + conn * 29) % 256

``pattern`` is a fixed pseudo-random byte string.  The sequence number comes first and
little-endian so that a message shorter than 12 bytes keeps the changing low bytes of
the sequence number.  Sizes drawn with ``--size MIN-MAX`` are a deterministic function
of ``(--seed, conn, seq)``, so either side of a comparison can be recomputed.  With
``--frame`` formats that have extra header fields, field ``f`` of message ``seq`` holds
``seq mod 2**(bits(f) - 1)`` and the echoed fields are checked too.  With ``--expect
reverse`` the expected body is the same bytes reversed.  Comparisons are bulk
(``startswith`` on slices of the pattern, no copies).

Pure: no sockets, no clock.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import StressConfig

_ID = struct.Struct("<QI")  # seq, conn id: the first 12 bytes of every message
_ID_SIZE = _ID.size
_ID_CID = 8  # where the connection id starts in the id
_PATTERN_SEED = 0x6D736773  # "msgs": the pattern is the same in every run and every version
_BIG = 32 * 1024  # bodies at least this large are written from the pattern without a copy
_TAILS_MAX = 4096  # fixed sizes up to 12 + this use 256 prebuilt tails (at most 1 MiB)
_M64 = (1 << 64) - 1


def _offset(cid: int, seq: int) -> int:
    """Where in the pattern the body of message ``seq`` of connection ``cid`` starts."""
    return (seq * 167 + cid * 29) & 255


class _Payloads:
    """Builds and checks message bodies; see the module docstring for the layout."""

    def __init__(self, cfg: StressConfig) -> None:
        """Prepare the pattern (and, for a fixed size, its 256 possible tails).

        Args:
            cfg: the run: sizes, seed, ``expect``, frame (its extra header fields).
        """
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

    def describe(self, m: bytes, cid: int, target: int | None) -> str:
        """Say how reply ``m`` differs from the reply expected for message ``target``.

        Args:
            m: the reply (a :class:`~msgsock.framing.Message` with its header fields, or
                bytes).
            cid: its connection.
            target: the message it settles, or None when nothing was in flight.

        Returns:
            One line for the report's examples, naming connection and sequence number.
        """
        if target is None:
            return f"conn {cid}: unexpected reply of {len(m)} bytes with nothing in flight"
        want = self.expected(cid, target)
        where = f"conn {cid} seq {target}"
        if len(m) != len(want):
            return f"{where}: reply of {len(m)} bytes, expected {len(want)}"
        i = _first_difference(bytes(m), want)
        if i < len(want):
            return f"{where}: byte {i} is 0x{m[i]:02x}, expected 0x{want[i]:02x}"
        return f"{where}: header fields {getattr(m, 'header', {})}, expected {self.header(target)}"

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
