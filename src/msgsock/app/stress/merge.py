"""Merging the workers' results: histograms bucket by bucket, snapshots into interval lines.

Counters add up; latency histograms merge bucket by bucket.  Each worker sends a
snapshot of its cumulative counters every ``--interval`` (tick ``k``); an interval line
is printed once every worker still running has passed tick ``k`` (a worker whose loop
stalled skips ticks, and counts as having passed them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..._histogram import Histogram
from .config import StressConfig
from .fmt import _fmt_ns
from .live import _Live


def _merge_hists(items: Iterable[Histogram | dict[str, Any]]) -> Histogram:
    """One histogram of several (histograms, or their ``to_dict()`` form)."""
    out = Histogram()
    for h in items:
        out.merge(h if isinstance(h, Histogram) else Histogram.from_dict(h))
    return out


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
