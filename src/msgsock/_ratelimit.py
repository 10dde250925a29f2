"""A rate limit for repeated log lines: the first few in full, then one summary per interval.

Why: a line logged per event lets any sender write the disk full (a flood of oversize
datagrams to ``msgsock serve --udp`` once wrote 19 MB of log in 8 s).  With a
:class:`LogRateLimiter` the first ``burst`` events of a quiet spell are logged in full;
while events keep coming, they are only counted, and at most one summary per
``interval`` says how many there were and from how many sources::

    ... and 12,345 more oversize datagrams from 3 senders in the last 10 s

Theory of operation.  Events are counted in windows of ``interval`` seconds.  In a
window, the first ``burst`` events are logged; the rest are counted (with their
distinct sources, up to ``max_sources`` of them, so a flood from spoofed addresses
cannot grow memory).  The first event after a window has ended closes it: the
returned decision carries the window's :class:`Suppressed` count, to be logged
first.  If events were still arriving (the previous one less than ``interval`` ago),
the flood goes on and the new window starts counting at once, with no line in full;
after a quiet spell it starts with ``burst`` lines in full again.  :meth:`flush`
returns what is still counted (at shutdown, or from a timer).

Pure: the caller passes ``now`` (any monotonic clock, in seconds); nothing here reads a
clock, sleeps or logs, so it is tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Decision", "LogRateLimiter", "Suppressed"]

DEFAULT_INTERVAL = 10.0
"""Seconds between summary lines."""

DEFAULT_MAX_SOURCES = 1024
"""Distinct sources counted exactly per window; beyond, the summary says "N+"."""


@dataclass(frozen=True)
class Suppressed:
    """Events counted but not logged, over ``seconds`` up to the time of the summary."""

    count: int
    sources: int
    """Distinct sources among them, at most ``max_sources`` (see ``more_sources``)."""
    more_sources: bool
    """True when there were more distinct sources than were counted."""
    seconds: float
    source: Hashable | None
    """The source, when all of them came from one."""

    def text(self, what: str, *, source: str = "sender", via: str = "from", name: str | None = None) -> str:
        """The summary line: ``... and 12,345 more WHAT from 3 senders in the last 10 s``.

        Args:
            what: the events, plural (``"oversize datagrams"``).
            source: what a source is called, singular.
            via: the word before the sources.
            name: the source's name, shown instead of "1 sender" when there was one.
        """
        if self.sources == 1 and name is not None:
            where = name
        else:
            plural = "" if self.sources == 1 and not self.more_sources else "s"
            where = f"{self.sources:,}{'+' if self.more_sources else ''} {source}{plural}"
        seconds = f"{self.seconds:.0f}" if self.seconds >= 1 else f"{self.seconds:.1f}"
        return f"... and {self.count:,} more {what} {via} {where} in the last {seconds} s"


class Decision(NamedTuple):
    """What to log for one event."""

    log: bool
    """Log this event in full."""
    summary: Suppressed | None
    """Log this summary of earlier events first."""


class LogRateLimiter:
    """Decide, per event, whether to log it, and when to log a summary of those that were not.

    Args:
        interval: seconds a window lasts: at most one summary line per window.
        burst: events logged in full at the start of a quiet spell (at least 1).
        max_sources: distinct sources counted per window (memory bound).

    Raises:
        ValueError: ``interval`` negative, ``burst`` or ``max_sources`` below 1.
    """

    def __init__(
        self, interval: float = DEFAULT_INTERVAL, *, burst: int = 1, max_sources: int = DEFAULT_MAX_SOURCES
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval {interval!r} must be 0 or more")
        if burst < 1 or max_sources < 1:
            raise ValueError(f"burst {burst} and max_sources {max_sources} must be at least 1")
        self.interval = interval
        self.burst = burst
        self.max_sources = max_sources
        self._start: float | None = None  # start of the current window; None before any event
        self._last = 0.0  # time of the previous event
        self._logged = 0  # events logged in full in this window
        self._count = 0  # events counted, not logged, in this window
        self._sources: set[Hashable] = set()
        self._more_sources = False
        self._source: Hashable | None = None

    def hit(self, now: float, source: Hashable | None = None) -> Decision:
        """One event at time ``now`` from ``source``: what to log."""
        summary = None
        flooding = False
        if self._start is None or now - self._start >= self.interval:
            flooding = self._count > 0 and now - self._last < self.interval
            summary = self._take(now)
            self._start = now
            self._logged = self.burst if flooding else 0
        self._last = now
        if self._logged < self.burst:
            self._logged += 1
            return Decision(True, summary)
        self._count += 1
        self._source = source
        if len(self._sources) < self.max_sources:
            self._sources.add(source)
        elif source not in self._sources:
            self._more_sources = True
        return Decision(False, summary)

    def flush(self, now: float) -> Suppressed | None:
        """The summary of the events counted and not yet summarised, if any (then forgotten)."""
        return self._take(now)

    @property
    def pending(self) -> int:
        """Events counted and not yet summarised."""
        return self._count

    def _take(self, now: float) -> Suppressed | None:
        if not self._count:
            return None
        start = self._start if self._start is not None else now
        summary = Suppressed(
            count=self._count,
            sources=len(self._sources),
            more_sources=self._more_sources,
            seconds=max(0.0, now - start),
            source=self._source if len(self._sources) == 1 and not self._more_sources else None,
        )
        self._count = 0
        self._sources = set()
        self._more_sources = False
        self._source = None
        self._start = now
        return summary
