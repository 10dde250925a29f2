"""The report of a run: built from the workers' results, as text, verdict or JSON.

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

from typing import Any

from ..._histogram import Histogram
from .config import StressConfig
from .fmt import _fmt_ns, _plural, _security_text, _size_text
from .kinds import _ERROR_TEXT, ERROR_KINDS
from .ledger import _MAX_EXAMPLES
from .merge import _merge_hists

SCHEMA = "msgsock.stress/1"


def _build_report(
    cfg: StressConfig,
    address: str,
    results: list[dict[str, Any]],
    intervals: list[dict[str, Any]],
    problems: list[str],
) -> tuple[dict[str, Any], Histogram]:
    """The report (the ``--json`` object) and the merged latency histogram of a run.

    Args:
        cfg: the run.
        address: the server's address as shown.
        results: each worker's :meth:`.pump._Worker.result`.
        intervals: the interval records of the live lines.
        problems: what went wrong with the workers themselves (each counts as an error).
    """
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


def _reasons(results: list[dict[str, Any]]) -> dict[str, str]:
    """The first reason of each tls/auth failure, over all workers."""
    out: dict[str, str] = {}
    for r in results:
        for kind, why in r.get("reasons", {}).items():
            out.setdefault(kind, why)
    return out


def _error_lines(report: dict[str, Any], timeout: float, reasons: dict[str, str] | None = None) -> list[str]:
    """One line per kind of error that happened, in report order."""
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


def _format_report(cfg: StressConfig, report: dict[str, Any], reasons: dict[str, str] | None = None) -> str:
    """The human report: target, connections, messages, throughput, latency, errors."""
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


def _verdict(report: dict[str, Any], timeout: float, reasons: dict[str, str] | None = None) -> str:
    """The last line: ``OK: ...`` or ``FAILED: ...`` with every kind of error."""
    if report["ok"]:
        return f"OK: {report['messages']['verified']:,} replies verified, no errors"
    errs = _error_lines(report, timeout, reasons)
    extra = [e for e in report["error_examples"] if e.startswith("worker")]
    return "FAILED: " + "; ".join(errs + extra)
