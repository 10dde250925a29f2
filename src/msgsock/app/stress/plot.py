"""``--plot``: latency and throughput of a run as a PNG (matplotlib, imported only here, lazily)."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from ..._histogram import Histogram, bucket_bounds
from .config import StressConfig
from .fmt import _plural, _size_text


def _plot_available() -> bool:
    """True when matplotlib can be imported."""
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
