"""Tests of the log-linear latency histogram behind ``msgsock stress`` (SPEC §6.3)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import msgsock
from msgsock._histogram import MAX_BITS, SUB_BITS, Histogram, bucket_bounds, bucket_index, bucket_table

from .helpers import unit


def _exact(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of sorted samples: the reference the histogram approximates."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _rel_error(got: int, want: int) -> float:
    return abs(got - want) / want if want else float(got != want)


def test_the_module_is_pure() -> None:
    """Importing the histogram imports no I/O module (it is as pure as the core, STYLE §1).

    The module alone, without the package's ``__init__``, which imports the core's
    ``stages`` and so :mod:`ssl` (and ``ssl`` loads ``socket``): see tests/test_core_purity.py.
    """
    src = str(Path(msgsock.__file__).parent)
    code = (
        "import importlib, sys, types; "
        f"package = types.ModuleType('msgsock'); package.__path__ = [{src!r}]; "
        "sys.modules['msgsock'] = package; importlib.import_module('msgsock._histogram'); "
        "print(','.join(m for m in ('socket', 'select', 'selectors', 'asyncio', 'threading', 'ssl') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=unit(30)
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "exponential", "bimodal"])
def test_percentiles_within_one_percent_of_exact(dist: str) -> None:
    """Percentiles of random samples are within 1 % of the exact nearest-rank values."""
    rng = random.Random(dist)
    if dist == "lognormal":
        values = [int(rng.lognormvariate(11, 1.2)) for _ in range(50_000)]
    elif dist == "uniform":
        values = [rng.randrange(0, 10_000_000) for _ in range(50_000)]
    elif dist == "exponential":
        values = [int(rng.expovariate(1 / 80_000)) for _ in range(50_000)]
    else:
        values = [
            rng.choice((rng.randrange(20_000, 30_000), rng.randrange(5_000_000, 9_000_000)))
            for _ in range(50_000)
        ]
    h = Histogram()
    h.record_many(values)
    values.sort()
    ps = [1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100]
    for p, got in zip(ps, h.percentiles(ps), strict=True):
        want = _exact(values, p)
        assert _rel_error(got, want) < 0.01, (p, got, want)
        assert h.percentile(p) == got
    assert h.min == values[0]
    assert h.max == values[-1]
    assert h.count == len(values)
    assert h.mean == pytest.approx(sum(values) / len(values))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=300), st.floats(0, 100))
def test_any_samples_any_percentile(values: list[int], p: float) -> None:
    """For any samples and any percentile the answer is within 1 % of the exact one."""
    h = Histogram()
    h.record_many(values)
    want = _exact(sorted(values), p)
    got = h.percentile(p)
    assert _rel_error(got, want) < 0.01 or abs(got - want) <= 1


def test_small_values_are_exact() -> None:
    """Values below 2**SUB_BITS each have their own bucket, so their percentiles are exact."""
    values = list(range(1 << SUB_BITS))
    h = Histogram()
    h.record_many(values)
    for p in (1, 50, 99, 100):
        assert h.percentile(p) == _exact(values, p)


def test_buckets_tile_the_value_range() -> None:
    """Consecutive buckets are contiguous, and every value falls inside its own bucket's bounds."""
    previous_high = 0
    for index in range(bucket_index(2**40) + 1):
        low, high = bucket_bounds(index)
        assert low == previous_high
        assert high > low
        # no bucket is wider than 1/2**(SUB_BITS-1) of its values
        assert (high - low) <= max(1, low / 2 ** (SUB_BITS - 1))
        previous_high = high
    rng = random.Random(7)
    for _ in range(10_000):
        v = rng.randrange(0, 2**44)
        low, high = bucket_bounds(bucket_index(v))
        assert low <= v < high


def test_merge_equals_recording_everything_in_one() -> None:
    """Merging per-worker histograms gives the same counts, summary and percentiles as one histogram."""
    rng = random.Random(3)
    parts = [[int(rng.lognormvariate(10 + i, 1)) for _ in range(5_000)] for i in range(3)]
    whole = Histogram()
    merged = Histogram()
    for part in parts:
        whole.record_many(part)
        h = Histogram()
        h.record_many(part)
        merged.merge(h)
    assert merged.counts == whole.counts
    assert (merged.count, merged.total, merged.min, merged.max) == (
        whole.count,
        whole.total,
        whole.min,
        whole.max,
    )
    assert merged.percentiles([50, 99, 99.9]) == whole.percentiles([50, 99, 99.9])


def test_dict_round_trip_through_json() -> None:
    """to_dict/from_dict (the form workers send and --json prints) keeps every count."""
    h = Histogram()
    h.record_many([0, 5, 300, 70_000, 70_001, 2**35])
    data = json.loads(json.dumps(h.to_dict()))
    back = Histogram.from_dict(data)
    assert back.counts == h.counts
    assert (back.count, back.total, back.min, back.max) == (h.count, h.total, h.min, h.max)


def test_from_dict_rejects_other_precision() -> None:
    """A histogram made with another precision is refused, not silently mis-merged."""
    data = Histogram().to_dict()
    data["sub_bits"] = SUB_BITS + 1
    with pytest.raises(ValueError, match="precision"):
        Histogram.from_dict(data)


def test_empty_and_invalid_inputs() -> None:
    """An empty histogram reports zeros; negative values and percentiles outside 0..100 raise."""
    h = Histogram()
    assert h.percentiles([50, 99]) == [0, 0]
    assert h.mean == 0.0
    with pytest.raises(ValueError):
        h.record(-1)
    with pytest.raises(ValueError):
        h.percentile(100.5)
    with pytest.raises(ValueError):
        bucket_bounds(-1)


def test_huge_values_land_in_the_last_bucket_with_exact_max() -> None:
    """Values beyond the tracked range are counted (last bucket) and the exact maximum is kept."""
    h = Histogram()
    h.record(2**60)
    h.record(10)
    assert h.count == 2
    assert h.max == 2**60
    assert h.percentile(100) == 2**60


@pytest.mark.parametrize(("granule", "limit"), [(0, 12), (6, 22), (3, 20)])
def test_bucket_table_agrees_with_bucket_index(granule: int, limit: int) -> None:
    """The lookup table gives the same bucket as bucket_index for every value in its range."""
    low, table = bucket_table(granule, limit)
    assert low == 1 << (granule + SUB_BITS - 1)
    assert len(table) == 1 << (limit - granule)
    rng = random.Random(limit)
    edges = [
        b for i in range(bucket_index(low), bucket_index((1 << limit) - 1) + 1) for b in bucket_bounds(i)
    ]
    values = [low, (1 << limit) - 1, *(v for e in edges for v in (e - 1, e) if low <= v < 1 << limit)]
    values += [rng.randrange(low, 1 << limit) for _ in range(20_000)]
    for v in values:
        assert table[v >> granule] == bucket_index(v), v


def test_bucket_table_rejects_impossible_ranges() -> None:
    """A table whose range is empty, too large, or with a negative granule is refused."""
    with pytest.raises(ValueError):
        bucket_table(-1, 20)
    with pytest.raises(ValueError):
        bucket_table(6, 13)  # buckets are 64 wide only from 2**13 on: nothing below the limit
    with pytest.raises(ValueError):
        bucket_table(6, MAX_BITS + 1)
