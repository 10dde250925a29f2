"""The command line of ``msgsock stress``: its options, their checks, and the run.

``python -m msgsock stress`` and ``python -m msgsock.app.stress`` are the same command
(the latter names itself so in its error lines).  Exit status: 0 when every reply was
verified and nothing went wrong, 1 when any error was detected, 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any

from ...framing import DEFAULT_MAX_SIZE, FrameFormat
from ...protocol import format_address
from ...udp import DEFAULT_MAX_SIZE as DEFAULT_UDP_MAX_SIZE
from .. import _args
from .config import StressConfig
from .fmt import _security_text, _size_text
from .live import _Live, _silence
from .merge import _Aggregator
from .plot import _plot, _plot_available
from .report import _build_report, _format_report, _reasons, _verdict
from .workers import _run_inprocess, _run_processes, _Stopper

_UDP_MAX = DEFAULT_UDP_MAX_SIZE  # the library's: the largest UDP payload over IPv4


class _UsageError(Exception):
    """A bad combination of options: exit status 2."""


def _size_range(text: str) -> tuple[int, int]:
    """Parse ``--size``: ``BYTES`` or ``MIN-MAX``.

    Raises:
        argparse.ArgumentTypeError: not a size, or MIN above MAX.
    """
    low, sep, high = text.partition("-")
    if not sep:
        n = _args.byte_size(text)
        return n, n
    a, b = _args.byte_size(low), _args.byte_size(high)
    if a > b:
        raise argparse.ArgumentTypeError(f"size range {text!r} has MIN above MAX")
    return a, b


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``msgsock stress`` options (SPEC §6.3) to ``parser``."""
    parser.add_argument(
        "host",
        nargs="?",
        default="127.0.0.1",
        metavar="HOST",
        help="server host name or address (default 127.0.0.1)",
    )
    parser.add_argument("--port", type=_args.port, default=9898, help="server port (default 9898)")
    parser.add_argument(
        "-c", "--connections", type=_args.positive_int, default=1, metavar="N", help="connections (default 1)"
    )
    parser.add_argument(
        "-s",
        "--size",
        type=_size_range,
        default=(64, 64),
        metavar="BYTES|MIN-MAX",
        help="message body size, or a range drawn uniformly per message (default 64)",
    )
    parser.add_argument(
        "--seed",
        type=_args.whole_number,
        default=1,
        help="seed of the random sizes of --size MIN-MAX (default 1)",
    )
    parser.add_argument(
        "-d",
        "--depth",
        type=_args.positive_int,
        default=1,
        metavar="D",
        help="messages in flight per connection (default 1)",
    )
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument(
        "-t", "--duration", type=_args.positive_float, metavar="S", help="seconds to measure (default 10)"
    )
    how_long.add_argument(
        "-n",
        "--messages",
        type=_args.positive_int,
        metavar="N",
        help="total messages to measure, across connections",
    )
    parser.add_argument(
        "--warmup",
        type=_args.non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds of unmeasured traffic first",
    )
    parser.add_argument(
        "--rate",
        type=_args.positive_float,
        metavar="R",
        help="open loop: R messages/s overall on a fixed schedule; latency from intended send times",
    )
    parser.add_argument(
        "--connect-rate", type=_args.positive_float, metavar="R", help="open at most R connections per second"
    )
    # The same --frame and --max-size as serve and client (one definition, in _args).
    _args.add_frame_options(
        parser,
        max_size_help="largest reply accepted (default 16MiB, or what the frame's length field can count)",
    )
    parser.add_argument("--udp", action="store_true", help="UDP: one datagram per message, no length header")
    parser.add_argument(
        "-w",
        "--workers",
        type=_args.positive_int,
        default=1,
        metavar="N",
        help="processes to run (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=_args.positive_float,
        default=5.0,
        metavar="S",
        help="a reply later than S counts as lost; also the deadline of each connect, TLS and "
        "authentication handshakes included (default 5)",
    )
    parser.add_argument(
        "--expect", choices=("echo", "reverse"), default="echo", help="what the server replies (default echo)"
    )
    parser.add_argument(
        "--interval",
        type=_args.positive_float,
        default=1.0,
        metavar="S",
        help="seconds between live lines (default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write latency and throughput plots (needs matplotlib)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no live output")
    # The same TLS and authentication options as `msgsock client` (SPEC §4.2, §7).
    _args.add_client_security_options(parser)


def _config(args: argparse.Namespace) -> StressConfig:
    """Build and check the configuration.

    Raises:
        _UsageError: a combination of options that cannot work.
    """
    size_min, size_max = args.size
    if args.udp:
        # No frames over UDP (--frame is ignored), so nothing to check the size against.
        max_size = DEFAULT_MAX_SIZE if args.max_size is None else args.max_size
        frame: FrameFormat = (args.frame or FrameFormat()).with_max_size(max_size)
        if size_max > _UDP_MAX:
            raise _UsageError(f"--size {size_max} is above the largest UDP datagram ({_UDP_MAX} bytes)")
    else:
        try:  # the check serve and client make too
            frame = _args.frame_with_max_size(args.frame, args.max_size)
        except _args.UsageError as exc:
            raise _UsageError(str(exc)) from None
        if size_max > frame.max_body:
            limit = "" if args.max_size is None else f" with --max-size {args.max_size}"
            raise _UsageError(
                f"--size {size_max} does not fit frame {frame}{limit} (largest body {frame.max_body})"
            )
    if args.workers > args.connections:
        raise _UsageError(
            f"--workers {args.workers} needs at least as many --connections (have {args.connections})"
        )
    if args.messages is not None and args.workers > args.messages:
        raise _UsageError(f"--workers {args.workers} is more than --messages {args.messages}")
    duration = args.duration if args.duration is not None or args.messages is not None else 10.0
    tls = bool(args.tls or args.tls_ca or args.tls_cert or args.tls_server_name)
    if args.udp and (tls or args.tls_key or args.auth_key_file):
        raise _UsageError("--udp cannot be combined with TLS or --auth-key-file (datagrams have neither)")
    try:
        # Checks the files once here (a usage error), though every worker builds its own
        # context: an SSLContext cannot be sent to a worker process.
        context, auth_key = _args.client_security(args)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    assert tls == (context is not None)
    return StressConfig(
        host=args.host,
        port=args.port,
        connections=args.connections,
        size_min=size_min,
        size_max=size_max,
        seed=args.seed,
        depth=args.depth,
        duration=duration,
        messages=args.messages,
        warmup=args.warmup,
        rate=args.rate,
        connect_rate=args.connect_rate,
        frame=frame,
        udp=args.udp,
        workers=args.workers,
        timeout=args.timeout,
        expect=args.expect,
        interval=args.interval,
        tls=tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        server_hostname=args.tls_server_name,
        auth_key=auth_key,
    )


def _resolve(cfg: StressConfig) -> tuple[int, Any]:
    """Return ``(family, sockaddr)`` of the server.

    Raises:
        OSError: the name does not resolve.
    """
    kind = socket.SOCK_DGRAM if cfg.udp else socket.SOCK_STREAM
    infos = socket.getaddrinfo(cfg.host, cfg.port, type=kind)
    if not infos:
        raise OSError(f"no address for {cfg.host}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft open-files limit to ``needed`` (as far as the hard limit allows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _prog(args: argparse.Namespace) -> str:
    """The command's name in error lines: ``msgsock stress`` or ``python -m msgsock.app.stress``."""
    return str(getattr(args, "prog", "msgsock stress"))


def run(args: argparse.Namespace) -> int:
    """Run ``msgsock stress``: load, verify, report.

    Returns:
        0 when every reply was verified and nothing went wrong; 1 when any error was
        detected (lost, duplicated, reordered, corrupted, aborted messages; refused,
        timed-out, TLS-failed, unauthenticated, closed, reset or protocol-breaking
        connections) or the server could not be reached; 2 for bad options (including
        unreadable TLS or key files).
    """
    try:
        cfg = _config(args)
    except _UsageError as exc:
        return _args.usage_error(_prog(args), str(exc))
    if args.plot and not _plot_available():
        return _args.usage_error(
            _prog(args), "--plot needs matplotlib: pip install 'msgsock[plot]'", hint=False
        )
    try:
        address = _resolve(cfg)
    except OSError as exc:
        print(f"msgsock stress: error: cannot resolve {cfg.host!r}: {exc}", file=sys.stderr)
        return 1
    _raise_fd_limit(cfg.connections // cfg.workers + 64)
    live_stream = sys.stderr if args.json else sys.stdout
    live = _Live(cfg, live_stream, enabled=not args.quiet)
    agg = _Aggregator(cfg, cfg.workers, live)
    what = f"{cfg.messages:,} messages" if cfg.messages is not None else f"{cfg.duration:g} s"
    live.line(
        f"stress {format_address(address[1])} "
        f"({'udp' if cfg.udp else 'tcp' + _security_text(cfg) + ', frame ' + str(cfg.frame)}): "
        f"{cfg.connections} connection(s) x depth {cfg.depth}, {_size_text(cfg)}, {what}"
        + (f", rate {cfg.rate:,.0f} msg/s" if cfg.rate is not None else "")
        + (f", {cfg.workers} workers" if cfg.workers > 1 else "")
    )
    problems: list[str] = []
    try:
        with _Stopper() as stopper:
            if cfg.workers == 1:
                results = _run_inprocess(cfg, address, agg, stopper)
            else:
                results, problems = _run_processes(cfg, address, agg, stopper)
        agg.close()
    finally:
        live.stop()
    report, hist = _build_report(cfg, format_address(address[1]), results, agg.intervals, problems)
    reasons = _reasons(results)
    try:
        if args.json:
            print(json.dumps(report))
        else:
            print(_format_report(cfg, report, reasons))
        verdict = _verdict(report, cfg.timeout, reasons)
        if args.json:
            if not report["ok"]:
                print(f"msgsock stress: {verdict}", file=sys.stderr)
        else:
            print(verdict)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)
    if args.plot:
        try:
            _plot(args.plot, cfg, report, hist)
        except ImportError:
            return _args.usage_error(
                _prog(args), "--plot needs matplotlib: pip install 'msgsock[plot]'", hint=False
            )
        except OSError as exc:
            print(f"msgsock stress: error: cannot write {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not args.json and not args.quiet:
            try:
                print(f"plot written to {args.plot}")
            except BrokenPipeError:
                _silence(sys.stdout)
    return int(report["exit_status"])


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m msgsock.app.stress``: the command on its own, with its own name in errors."""
    parser = _args.ArgumentParser(
        prog="python -m msgsock.app.stress",
        description="Verifying load generator (the iocpclient successor).",
    )
    configure_parser(parser)
    parser.set_defaults(prog=parser.prog)
    return run(parser.parse_args(argv))
