"""How ``msgsock stress`` words numbers and its run in the live lines, the report and the plot."""

from __future__ import annotations

from .config import StressConfig


def _fmt_ns(ns: float | None) -> str:
    """A duration in nanoseconds, in the unit that suits it (``-`` for None)."""
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} us" if ns >= 10_000 else f"{ns / 1000:.1f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def _plural(n: int, word: str) -> str:
    """``n`` and ``word``, made plural unless ``n`` is 1."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _size_text(cfg: StressConfig) -> str:
    """The message size of the run: ``64 B``, or a range with its seed."""
    if cfg.size_min == cfg.size_max:
        return f"{cfg.size_min:,} B"
    return f"{cfg.size_min:,}-{cfg.size_max:,} B (uniform, seed {cfg.seed})"


def _security_text(cfg: StressConfig) -> str:
    """``, tls``, ``, mutual tls``, ``, auth``: what the connections ran besides TCP."""
    parts = []
    if cfg.tls:
        parts.append("mutual tls" if cfg.tls_cert is not None else "tls")
    if cfg.auth_key is not None:
        parts.append("auth")
    return "".join(", " + p for p in parts)
