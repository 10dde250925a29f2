"""The ``msgsock`` command line (SPEC §6): ``serve``, ``client``, ``stress`` and ``demo``.

Exit status: 0 success, 1 failure, 2 usage.  Bad input gets one clear line on stderr,
never a traceback.  ``python -m msgsock`` and the ``msgsock`` script both call :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from . import __version__
from .exceptions import InvalidFormat
from .framing import DEFAULT_MAX_SIZE, PRESETS, FrameFormat
from .protocol import DEFAULT_LIMITS, Limits

__all__ = ["main"]

_FRAME_HELP = (
    f"frame format: a preset ({', '.join(PRESETS)}) or a format string such as "
    "'u32be+kind:B+flags:H', 'magic:H+u16be' or 'u32be!' (length counts the header); default u32be"
)


# -- argument types: each raises ArgumentTypeError, which argparse turns into exit 2 ----------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def _frame(text: str) -> FrameFormat:
    try:
        return FrameFormat.parse(text)
    except InvalidFormat as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    body = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(body[-1:], 1)
    if scale != 1:
        body = body[:-1]
    try:
        value = int(body) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a byte count (e.g. 65536, 64KiB, 16MiB)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _header_field(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"header {text!r} is not NAME=VALUE")
    try:
        return name, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"header {name} value {value!r} is not an integer") from None


# -- logging ---------------------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- the parser ------------------------------------------------------------------------------


def _add_frame_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frame", type=_frame, default=FrameFormat(), help=_FRAME_HELP)
    p.add_argument(
        "--max-size",
        type=_size,
        default=DEFAULT_MAX_SIZE,
        metavar="BYTES",
        help="largest message body accepted or sent (default 16MiB)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the ``msgsock`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="msgsock", description="Whole messages over TCP and UDP: servers, clients and a load generator."
    )
    parser.add_argument("--version", action="version", version=f"msgsock {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="run an echo/reverse message server", description="Run a message server."
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 or :: to expose)"
    )
    serve.add_argument(
        "--port", type=_port, default=9898, help="port (default 9898; 0 = any, printed when ready)"
    )
    serve.add_argument(
        "--engine", choices=("asyncio", "threads"), default="asyncio", help="server engine (default asyncio)"
    )
    serve.add_argument(
        "--handler",
        choices=("echo", "reverse"),
        default="echo",
        help="what the server replies (default echo)",
    )
    _add_frame_options(serve)
    serve.add_argument("--max-connections", type=int, default=DEFAULT_LIMITS.max_connections, metavar="N")
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_LIMITS.idle_timeout,
        metavar="S",
        help="0 = off (default 300)",
    )
    serve.add_argument(
        "--message-timeout",
        type=_seconds,
        default=DEFAULT_LIMITS.message_timeout,
        metavar="S",
        help="a started message must complete within S (default 30; 0 = off)",
    )
    serve.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=DEFAULT_LIMITS.handshake_timeout,
        metavar="S",
        help="default 10",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=DEFAULT_LIMITS.shutdown_timeout,
        metavar="S",
        help="graceful shutdown deadline (default 5)",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.add_argument("--json", action="store_true", help="log JSON lines")

    client = sub.add_parser(
        "client",
        help="send messages to a server",
        description="Send messages to a server: --send TEXT, lines from stdin, or --rounds N (the MFCAsync reverse loop).",
    )
    client.add_argument(
        "host", nargs="?", default="127.0.0.1", help="server host name or address (default 127.0.0.1)"
    )
    client.add_argument("--port", type=_port, default=9898)
    _add_frame_options(client)
    client.add_argument(
        "--header",
        type=_header_field,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="header field value for sent messages (repeatable)",
    )
    client.add_argument(
        "--send",
        action="append",
        default=[],
        metavar="TEXT",
        help="send TEXT as one message and print the reply (repeatable)",
    )
    client.add_argument(
        "--rounds",
        type=_positive_int,
        metavar="N",
        help="MFCAsync loop: send, verify the echo, reverse, send back; N times",
    )
    client.add_argument("--message", default="Hello from msgsock", help="first message of --rounds")
    client.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="how long to wait for each reply (default 10)",
    )
    client.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="S")
    ui = client.add_mutually_exclusive_group()
    ui.add_argument(
        "--tui", action="store_true", help="force the interactive client (the default on a terminal)"
    )
    ui.add_argument("--no-tui", action="store_true", help="line mode even on a terminal")

    stress = sub.add_parser(
        "stress",
        help="verifying load generator",
        description="Verifying load generator (the iocpclient successor).",
    )
    try:
        from . import stress as stress_mod
    except ImportError:  # pragma: no cover - only while the module is being written
        stress_mod = None  # type: ignore[assignment]
    if stress_mod is not None:
        stress_mod.configure_parser(stress)

    sub.add_parser("demo", help="start a server and a client on loopback and show them talking")
    return parser


# -- commands --------------------------------------------------------------------------------


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        message_timeout=args.message_timeout,
        handshake_timeout=args.handshake_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServerConfig, run_server

    _setup_logging(args.log_level, args.json)
    try:
        limits = _limits(args)
    except ValueError as exc:
        print(f"msgsock serve: error: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        host=args.host,
        port=args.port,
        engine=args.engine,
        handler=args.handler,
        frame=args.frame.with_max_size(args.max_size),
        limits=limits,
    )
    try:
        run_server(config)
    except OSError as exc:
        print(
            f"msgsock serve: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from .client import ClientConfig, ClientError, run_lines, run_rounds

    if args.rounds is not None and args.send:
        print("msgsock client: error: --rounds and --send cannot be combined", file=sys.stderr)
        return 2
    frame = args.frame.with_max_size(args.max_size)
    header = dict(args.header)
    unknown = sorted(set(header) - set(frame.field_names))
    if unknown:
        print(
            f"msgsock client: error: --header {', '.join(unknown)}: frame {frame} has "
            f"{'fields ' + ', '.join(frame.field_names) if frame.field_names else 'no header fields'}",
            file=sys.stderr,
        )
        return 2
    config = ClientConfig(
        host=args.host,
        port=args.port,
        frame=frame,
        header=header,
        connect_timeout=args.connect_timeout or 10.0,
        reply_timeout=args.timeout or 10.0,
    )
    scripted = args.rounds is not None or bool(args.send)
    if args.tui and scripted:
        print("msgsock client: error: --tui cannot be combined with --send or --rounds", file=sys.stderr)
        return 2
    if args.tui or (not scripted and not args.no_tui and sys.stdin.isatty() and sys.stdout.isatty()):
        from .tui import run_tui

        return run_tui(config)
    try:
        if args.rounds is not None:
            result = run_rounds(config, args.rounds, args.message.encode("utf-8"))
            print(
                f"{result.rounds} rounds, all verified; RTT p50 {result.percentile(0.5) * 1e6:.0f} us, "
                f"p99 {result.percentile(0.99) * 1e6:.0f} us"
            )
        elif args.send:
            run_lines(config, args.send)
        else:
            if sys.stdin.isatty():
                print("type a message and press Enter; Ctrl-D to quit", file=sys.stderr)
            run_lines(config, (line.rstrip("\r\n") for line in sys.stdin))
    except ClientError as exc:
        print(f"msgsock client: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Start ``msgsock serve --port 0`` and run clients against it, as separate processes."""
    me = [sys.executable, "-m", "msgsock"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print("$ msgsock serve --port 0", flush=True)
    server = subprocess.Popen(
        [*me, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        ready = ""
        for _ in range(20):  # skip any warning a Python start-up may print before the ready line
            ready = server.stdout.readline().strip()
            print(f"  {ready}", flush=True)
            if ready.startswith("listening on ") or not ready:
                break
        if not ready.startswith("listening on "):
            print("msgsock demo: error: the server did not start", file=sys.stderr)
            return 1
        port = ready.split()[2].rsplit(":", 1)[1]
        steps = [
            ["client", "--port", port, "--send", "Hello, msgsock!", "--send", "Each message is one frame."],
            ["client", "--port", port, "--rounds", "1000", "--message", "stressed desserts"],
        ]
        for step in steps:
            print("$ msgsock " + " ".join(a if " " not in a else repr(a) for a in step), flush=True)
            done = subprocess.run([*me, *step], capture_output=True, text=True, env=env, timeout=60)
            for line in (done.stdout + done.stderr).splitlines():
                print(f"  {line}", flush=True)
            if done.returncode != 0:
                return 1
        print("$ kill -TERM <server>", flush=True)
        server.send_signal(signal.SIGTERM)
        rest, _ = server.communicate(timeout=30)
        for line in rest.splitlines():
            print(f"  {line}", flush=True)
        return 0 if server.returncode == 0 else 1
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "client":
            return _cmd_client(args)
        if args.command == "stress":
            from . import stress

            return stress.run(args)
        if args.command == "demo":
            return _cmd_demo(args)
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
