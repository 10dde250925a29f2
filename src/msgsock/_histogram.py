"""A log-linear latency histogram in the style of HdrHistogram (SPEC §6.3).  Pure: no I/O.

Theory of operation.  Values are non-negative integers (the stress tool records
nanoseconds).  Values below ``2**SUB_BITS`` each have their own bucket.  Above that,
every power-of-two range ``[2**e, 2**(e+1))`` is split into ``2**(SUB_BITS-1)`` equal
buckets, so a bucket is never wider than ``1 / 2**(SUB_BITS-1)`` of the values in it.
A percentile is reported as the middle of its bucket, clamped to the exact minimum
and maximum, so the relative error is at most ``1 / 2**SUB_BITS`` (0.4 % with the
default 8 bits) whatever the range, in a fixed few thousand counters: recording is
O(1), memory does not grow with the number of samples, and two histograms (one per
worker process) merge by adding their counters.

Index of a value ``v``::

    shift = max(0, v.bit_length() - SUB_BITS)
    index = (shift << (SUB_BITS - 1)) + (v >> shift)

For ``shift == 0`` that is ``v`` itself; for ``shift >= 1`` the top ``SUB_BITS`` bits of
``v`` lie in ``[2**(SUB_BITS-1), 2**SUB_BITS)``, so consecutive shifts tile the index
space without gaps.  Values beyond ``2**MAX_BITS`` are counted in the last bucket
(their exact maximum is still kept).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

__all__ = ["MAX_BITS", "SUB_BITS", "Histogram", "bucket_bounds", "bucket_index", "bucket_table"]

SUB_BITS = 8
"""Precision: buckets are at most 1/128 of their values wide (0.4 % error at the midpoint)."""
MAX_BITS = 46
"""Values up to 2**46 (about 19.5 hours in nanoseconds) get their own bucket."""

_HALF = 1 << (SUB_BITS - 1)
_SIZE = ((MAX_BITS - SUB_BITS + 1) << (SUB_BITS - 1)) + (1 << SUB_BITS)


def bucket_index(value: int) -> int:
    """Return the bucket index of a non-negative integer ``value``.

    Raises:
        ValueError: ``value`` is negative.
    """
    if value < 0:
        raise ValueError(f"histogram values must be >= 0, not {value}")
    shift = value.bit_length() - SUB_BITS
    if shift <= 0:
        return value
    index = (shift << (SUB_BITS - 1)) + (value >> shift)
    return index if index < _SIZE else _SIZE - 1


def bucket_bounds(index: int) -> tuple[int, int]:
    """Return the range ``[low, high)`` of values counted in bucket ``index``.

    Raises:
        ValueError: ``index`` is outside the histogram.
    """
    if not 0 <= index < _SIZE:
        raise ValueError(f"bucket index {index} is outside 0..{_SIZE - 1}")
    if index < (1 << SUB_BITS):
        return index, index + 1
    shift = (index >> (SUB_BITS - 1)) - 1
    top = index - (shift << (SUB_BITS - 1))
    return top << shift, (top + 1) << shift


def bucket_table(granule_bits: int, limit_bits: int) -> tuple[int, list[int]]:
    """Return ``(low, table)`` with ``table[v >> granule_bits] == bucket_index(v)`` for
    every ``low <= v < 2**limit_bits``: one list lookup instead of the arithmetic, for
    hot loops (``low`` is where buckets become at least ``2**granule_bits`` wide).

    Raises:
        ValueError: ``limit_bits`` is not above ``low``'s bit length or beyond
            :data:`MAX_BITS`, or ``granule_bits`` is negative.
    """
    if granule_bits < 0:
        raise ValueError(f"granule_bits must be >= 0, not {granule_bits}")
    low = 1 << (granule_bits + SUB_BITS - 1)
    if not low < 1 << limit_bits <= 1 << MAX_BITS:
        raise ValueError(
            f"limit_bits {limit_bits} must be above {low.bit_length() - 1} and at most {MAX_BITS}"
        )
    # Entries below low >> granule_bits are never looked up; they are filled so the list
    # is indexable from 0.  Above it every bucket spans a whole number of granules.
    table = [0] * (low >> granule_bits)
    index = bucket_index(low)
    end = 1 << limit_bits
    while True:
        lo, hi = bucket_bounds(index)
        if lo >= end:
            break
        table.extend([index] * ((min(hi, end) - lo) >> granule_bits))
        index += 1
    return low, table


class Histogram:
    """Counts of non-negative integer values in log-linear buckets; mergeable.

    The hot loop of the stress tool inlines :meth:`record` using :data:`SUB_BITS` and
    :attr:`counts` directly (a method call per message is measurable there); the
    inlined code must stay identical to :func:`bucket_index`.
    """

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * _SIZE
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    # -- recording -------------------------------------------------------------------

    def record(self, value: int, n: int = 1) -> None:
        """Count ``value`` (``n`` times).

        Raises:
            ValueError: ``value`` is negative.
        """
        self.counts[bucket_index(value)] += n
        self.count += n
        self.total += value * n
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def record_many(self, values: Iterable[int]) -> None:
        """Count every value of ``values``.

        Raises:
            ValueError: a value is negative.
        """
        for value in values:
            self.record(value)

    def add_summary(self, count: int, total: int, low: int | None, high: int | None) -> None:
        """Add the count, sum, min and max of samples whose buckets were counted directly.

        Used by code that increments :attr:`counts` itself (the inlined hot path).
        """
        self.count += count
        self.total += total
        if low is not None and (self.min is None or low < self.min):
            self.min = low
        if high is not None and (self.max is None or high > self.max):
            self.max = high

    def merge(self, other: Histogram) -> None:
        """Add every count of ``other`` into this histogram."""
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.add_summary(other.count, other.total, other.min, other.max)

    def copy(self) -> Histogram:
        """Return an independent copy."""
        new = Histogram()
        new.merge(self)
        return new

    # -- reading ---------------------------------------------------------------------

    @property
    def mean(self) -> float:
        """The exact mean of the recorded values (0.0 when empty)."""
        return self.total / self.count if self.count else 0.0

    def percentile(self, p: float) -> int:
        """Return the value at percentile ``p`` (0-100), nearest-rank, 0 when empty.

        The result is the middle of the bucket holding the rank, clamped to the exact
        minimum and maximum.

        Raises:
            ValueError: ``p`` outside 0..100.
        """
        return self.percentiles([p])[0]

    def percentiles(self, ps: Iterable[float]) -> list[int]:
        """Return :meth:`percentile` for each of ``ps`` in one pass over the buckets.

        Raises:
            ValueError: a percentile outside 0..100.
        """
        wanted = list(ps)
        for p in wanted:
            if not 0 <= p <= 100:
                raise ValueError(f"percentile {p} is outside 0..100")
        if not self.count or self.min is None or self.max is None:
            return [0 for _ in wanted]
        # Nearest rank: the smallest value with at least ceil(p/100 * count) values <= it.
        count = self.count
        ranks = sorted((max(1, math.ceil(Fraction(str(p)) * count / 100)), i) for i, p in enumerate(wanted))
        out = [0] * len(wanted)
        low, high = self.min, self.max
        seen = 0
        r = 0
        for index, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            while r < len(ranks) and ranks[r][0] <= seen:
                if index == _SIZE - 1:  # the overflow bucket: only the exact max is known
                    out[ranks[r][1]] = high
                else:
                    lo, hi = bucket_bounds(index)
                    out[ranks[r][1]] = min(max((lo + hi - 1) // 2, low), high)
                r += 1
            if r == len(ranks):
                break
        while r < len(ranks):  # only reachable through rounding at p == 100
            out[ranks[r][1]] = high
            r += 1
        return out

    def nonzero(self) -> Iterable[tuple[int, int]]:
        """Yield ``(bucket_index, count)`` of every non-empty bucket, in order."""
        return ((i, c) for i, c in enumerate(self.counts) if c)

    # -- transport (between worker processes, and into --json) -----------------------

    def to_dict(self) -> dict[str, object]:
        """Return a compact, JSON-friendly form: summary plus sparse ``[index, count]`` pairs."""
        return {
            "sub_bits": SUB_BITS,
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": [[i, c] for i, c in self.nonzero()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Histogram:
        """Rebuild a histogram from :meth:`to_dict` output.

        Raises:
            ValueError: the data was made with another precision, or is malformed.
        """
        if data.get("sub_bits") != SUB_BITS:
            raise ValueError(f"histogram precision {data.get('sub_bits')!r} is not {SUB_BITS}")
        new = cls()
        buckets = data.get("buckets")
        if not isinstance(buckets, list):
            raise ValueError("histogram data has no bucket list")
        for pair in buckets:
            index, c = pair
            if not 0 <= index < _SIZE:
                raise ValueError(f"bucket index {index} is outside 0..{_SIZE - 1}")
            new.counts[index] += c
        count, total, low, high = data.get("count"), data.get("total"), data.get("min"), data.get("max")
        if not isinstance(count, int) or not isinstance(total, int):
            raise ValueError("histogram data has no integer count and total")
        if low is not None and not isinstance(low, int):
            raise ValueError("histogram min is not an integer")
        if high is not None and not isinstance(high, int):
            raise ValueError("histogram max is not an integer")
        new.add_summary(count, total, low, high)
        return new
