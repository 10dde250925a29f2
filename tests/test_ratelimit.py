"""The log rate limiter (``msgsock._ratelimit``), driven by a fake clock."""

from __future__ import annotations

import pytest

from msgsock._ratelimit import Decision, LogRateLimiter, Suppressed

pytestmark = pytest.mark.timeout(10)


def test_first_event_is_logged_then_counted() -> None:
    """The first event is logged in full; the rest of the interval only counted."""
    limiter = LogRateLimiter(10.0)
    assert limiter.hit(0.0, "a") == Decision(True, None)
    for i in range(1, 1000):
        assert limiter.hit(i * 0.001, "a") == Decision(False, None)
    assert limiter.pending == 999


def test_one_summary_per_interval_while_flooding() -> None:
    """A flood gives one summary per interval, counting events and senders, and no more lines in full."""
    limiter = LogRateLimiter(10.0)
    lines: list[Decision] = []
    now = 0.0
    for i in range(30_000):  # 30 s of a flood from 3 senders, one event per ms
        now = i * 0.001
        decision = limiter.hit(now, ("10.0.0.1", i % 3))
        if decision.log or decision.summary:
            lines.append(decision)
    assert lines[0] == Decision(True, None)
    summaries = [d.summary for d in lines[1:]]
    assert [d.log for d in lines[1:]] == [False, False]  # in a flood, only summaries
    assert [s.count for s in summaries if s] == [9_999, 10_000]
    assert all(s is not None and s.sources == 3 and s.seconds == pytest.approx(10.0) for s in summaries)
    last = limiter.flush(now + 0.001)
    assert last is not None and last.count == 30_000 - 1 - 9_999 - 10_000


def test_quiet_spell_starts_over_with_a_full_line() -> None:
    """After a pause longer than the interval, the next event is logged in full again (after the summary)."""
    limiter = LogRateLimiter(10.0)
    limiter.hit(0.0, "a")
    limiter.hit(1.0, "a")
    decision = limiter.hit(100.0, "b")
    assert decision.log is True
    assert decision.summary == Suppressed(count=1, sources=1, more_sources=False, seconds=100.0, source="a")
    assert limiter.hit(200.0, "b") == Decision(True, None)  # nothing was counted in between


def test_burst_logs_the_first_few() -> None:
    """With burst=3, the first three of a quiet spell are logged in full."""
    limiter = LogRateLimiter(10.0, burst=3)
    assert [limiter.hit(t, "a").log for t in (0.0, 0.1, 0.2, 0.3, 0.4)] == [True, True, True, False, False]
    assert limiter.flush(1.0) == Suppressed(2, 1, False, 1.0, "a")
    assert limiter.flush(2.0) is None


def test_sources_are_bounded() -> None:
    """Distinct sources are counted up to max_sources; beyond, the summary says N+ (bounded memory)."""
    limiter = LogRateLimiter(10.0, max_sources=4)
    for i in range(101):
        limiter.hit(i * 0.01, i)
    summary = limiter.flush(5.0)
    assert summary is not None
    assert (summary.count, summary.sources, summary.more_sources, summary.source) == (100, 4, True, None)
    assert (
        summary.text("oversize datagrams")
        == "... and 100 more oversize datagrams from 4+ senders in the last 5 s"
    )


def test_summary_text() -> None:
    """The summary line names the count with separators, the senders (or the one sender) and the span."""
    many = Suppressed(12_345, 3, False, 10.0, None)
    assert (
        many.text("oversize datagrams")
        == "... and 12,345 more oversize datagrams from 3 senders in the last 10 s"
    )
    one = Suppressed(7, 1, False, 9.6, ("127.0.0.1", 5))
    assert one.text("replies dropped", source="peer", via="to", name="127.0.0.1:5") == (
        "... and 7 more replies dropped to 127.0.0.1:5 in the last 10 s"
    )
    assert one.text("x") == "... and 7 more x from 1 sender in the last 10 s"


def test_bad_arguments() -> None:
    """A negative interval, or burst / max_sources below 1, is refused."""
    for kwargs in ({"interval": -1.0}, {"burst": 0}, {"max_sources": 0}):
        with pytest.raises(ValueError):
            LogRateLimiter(**kwargs)
