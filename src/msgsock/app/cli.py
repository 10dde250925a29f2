"""The ``msgsock`` command line (SPEC §6): ``serve``, ``client``, ``stress`` and ``demo``.

Exit status: 0 success, 1 failure, 2 usage.  Bad input gets one clear line on stderr,
never a traceback.  ``python -m msgsock`` and the ``msgsock`` script both call :func:`main`.

``serve --udp`` and ``client --udp`` speak datagrams (SPEC §5.4): one datagram is one
message, so the options about frames and connections do not apply and are usage
errors; ``--max-size`` defaults to 65507 there (the largest UDP payload over IPv4).
Options whose default depends on the mode default to None here and are resolved in
the command, which is how an explicitly given one is told apart.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .. import __version__, extensions
from ..framing import FrameFormat
from ..udp import DEFAULT_MAX_SIZE as UDP_MAX_SIZE
from ..udp import DEFAULT_RETRIES as UDP_RETRIES
from ..udp import DEFAULT_TIMEOUT as UDP_TIMEOUT
from ..udp import MAX_DATAGRAM as UDP_MAX_DATAGRAM
from . import _args

if TYPE_CHECKING:
    from .client import RoundsResult

__all__ = ["main"]


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
    _args.add_frame_options(
        p, max_size_help=f"largest message body accepted or sent (default 16MiB; {UDP_MAX_SIZE} with --udp)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the ``msgsock`` argument parser."""
    # Imported here, not at the top: ``msgsock.app.stress`` imports this module for the
    # security options and has no use for the server engines.
    from .server import ENGINES

    # One parser class for all commands: every usage error is one line (see _args).
    parser = _args.ArgumentParser(
        prog="msgsock", description="Whole messages over TCP and UDP: servers, clients and a load generator."
    )
    parser.add_argument(
        "--version", action="version", version=f"msgsock {__version__} ({extensions.describe()})"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_args.ArgumentParser
    )

    serve = sub.add_parser(
        "serve", help="run an echo/reverse message server", description="Run a message server."
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 or :: to expose)"
    )
    serve.add_argument(
        "--port",
        type=_args.server_port,
        default=9898,
        help="port (default 9898; 0 = any, printed when ready)",
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="server engine: auto (the default: native for plain TCP when the extension is built, "
        "else asyncio), native (the C event loop; --workers N loops sharing the port), "
        "asyncio (uvloop), threads (one per connection) or processes "
        "(--workers event loops sharing the port)",
    )
    serve.add_argument(
        "--workers",
        type=_args.positive_int,
        default=None,
        metavar="N",
        help="worker processes of --engine processes (default: the number of CPUs, "
        f"{os.cpu_count()} here) or --engine native (default: one loop, no workers)",
    )
    serve.add_argument(
        "--udp",
        action="store_true",
        help=f"serve UDP datagrams, one message each (--max-size defaults to {UDP_MAX_SIZE})",
    )
    serve.add_argument(
        "--handler",
        choices=("echo", "reverse"),
        default="echo",
        help="what the server replies (default echo)",
    )
    _add_frame_options(serve)
    _args.add_limit_options(serve, per_worker=True)
    _args.add_server_security_options(serve)
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
    client.add_argument("--port", type=_args.port, default=9898)
    client.add_argument(
        "--udp",
        action="store_true",
        help="send each message as one UDP datagram and wait for the reply (resent on silence)",
    )
    client.add_argument(
        "--retries",
        type=_args.non_negative_int,
        default=None,
        metavar="N",
        help=f"--udp: resend a message N times when no reply comes (default {UDP_RETRIES})",
    )
    _add_frame_options(client)
    client.add_argument(
        "--header",
        type=_args.header_field,
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
        type=_args.positive_int,
        metavar="N",
        help="MFCAsync loop: send, verify the echo, reverse, send back; N times",
    )
    client.add_argument("--message", default="Hello from msgsock", help="first message of --rounds")
    client.add_argument(
        "--timeout",
        type=_args.non_negative_float,
        default=None,
        metavar="S",
        help=f"how long to wait for each reply (default 10; with --udp {UDP_TIMEOUT:g}, per try)",
    )
    client.add_argument(
        "--connect-timeout",
        type=_args.non_negative_float,
        default=None,
        metavar="S",
        help="TCP connect deadline (default 10)",
    )
    _args.add_client_security_options(client)
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


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_bytes(text: str) -> bytes:
    """The bytes of a command-line argument exactly as given (SPEC §6.2: messages are bytes).

    Python decodes argv with the file system encoding and ``surrogateescape``;
    ``os.fsencode`` undoes that, so ``--send "$(printf 'a\\xffb')"`` sends a, 0xff, b.
    """
    return os.fsencode(text)


def _stdin_lines() -> Iterator[bytes]:
    """Standard input's lines as bytes, line ends removed: a non-UTF-8 line is sent raw."""
    for line in sys.stdin.buffer:
        yield line.rstrip(b"\r\n")


def _printable_stdout() -> None:
    """Never fail to print a reply: escape what the terminal's encoding cannot show."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def _frame_of(args: argparse.Namespace) -> FrameFormat:
    """``--frame`` with ``--max-size``.

    Raises:
        _args.UsageError: ``--max-size`` above what the frame's length field can count.
    """
    return _args.frame_with_max_size(args.frame, args.max_size)


def _udp_conflicts(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options given with ``--udp`` that only mean something over TCP."""
    conflicts = []
    if getattr(args, "engine", None) not in (None, "auto", "asyncio"):
        conflicts.append(f"--engine {args.engine}")
    if args.frame is not None and args.frame != FrameFormat():
        conflicts.append(f"--frame {args.frame}")
    conflicts += [_option(name) for name in names if getattr(args, name) not in (None, [], False)]
    return conflicts


def _udp_max_size(args: argparse.Namespace) -> int | str:
    """The datagram size limit of ``--udp``, or the usage error to print."""
    if args.max_size is None:
        return UDP_MAX_SIZE
    if args.max_size > UDP_MAX_DATAGRAM:
        return f"--max-size {args.max_size} is above {UDP_MAX_DATAGRAM}, the largest UDP datagram"
    return int(args.max_size)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import MAX_WORKERS, ServerConfig, run_server

    def usage(message: str) -> int:
        return _args.usage_error("msgsock serve", message)

    _setup_logging(args.log_level, args.json)
    max_datagram = UDP_MAX_SIZE
    if args.udp:
        # A datagram is one message: no frame header, no connections, one engine (SPEC §6.1).
        conflicts = _udp_conflicts(args, ("workers", *_args.LIMIT_OPTIONS))
        if conflicts:
            return usage(
                f"--udp cannot be combined with {', '.join(conflicts)} "
                "(UDP has no frames, no connections and one engine)"
            )
        size = _udp_max_size(args)
        if isinstance(size, str):
            return usage(size)
        max_datagram = size
    elif args.workers is not None and args.engine not in (None, "auto", "processes", "native"):
        return usage(f"--workers needs --engine auto, processes or native, not --engine {args.engine}")
    elif args.workers is not None and args.workers > MAX_WORKERS:
        return usage(f"--workers {args.workers} is above {MAX_WORKERS}")
    if args.udp:
        given = [
            o
            for o in ("tls_cert", "tls_key", "tls_client_ca", "auth_key_file", "proxy_protocol")
            if getattr(args, o)
        ]
        if given:
            return usage(f"--udp cannot be combined with {', '.join(map(_option, given))}")
    if (args.tls_key or args.tls_client_ca) and not args.tls_cert:
        return usage("--tls-key and --tls-client-ca need --tls-cert")
    try:
        frame = _frame_of(args)
        limits = _args.limits_of(args)
        auth_key = _args.read_auth_key(args.auth_key_file)
    except (ValueError, _args.UsageError) as exc:
        return usage(str(exc))
    config = ServerConfig(
        host=args.host,
        port=args.port,
        engine=args.engine or "auto",
        handler=args.handler,
        frame=frame,
        limits=limits,
        workers=args.workers,
        udp=args.udp,
        max_datagram_size=max_datagram,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_key=auth_key,
        proxy_protocol=args.proxy_protocol,
    )
    try:
        config.ssl_context()  # a bad certificate is a usage error, before anything listens
    except ValueError as exc:
        return usage(_args.tls_file_message(exc))
    try:
        run_server(config)
    except OSError as exc:
        print(
            f"msgsock serve: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except ValueError as exc:  # a combination run_server refuses (already checked above)
        return usage(str(exc))
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from .client import ClientConfig, ClientError, run_lines, run_rounds

    def usage(message: str) -> int:
        return _args.usage_error("msgsock client", message)

    _printable_stdout()
    if args.rounds is not None and args.send:
        return usage("--rounds and --send cannot be combined")
    if args.udp:
        return _cmd_client_udp(args)
    if args.retries is not None:
        return usage("--retries needs --udp")
    header = dict(args.header)
    try:
        # Checked against the frame before anything connects (a usage error, not a
        # connection failure): the frame's size limit and each --header value.
        frame = _frame_of(args)
        _args.check_header(frame, header)
        context, auth_key = _args.client_security(args)
    except (ValueError, _args.UsageError) as exc:
        return usage(str(exc))
    config = ClientConfig(
        host=args.host,
        port=args.port,
        frame=frame,
        header=header,
        connect_timeout=args.connect_timeout or 10.0,
        reply_timeout=args.timeout or 10.0,
        ssl=context,
        server_hostname=args.tls_server_name,
        auth_key=auth_key,
    )
    scripted = args.rounds is not None or bool(args.send)
    if args.tui and scripted:
        return usage("--tui cannot be combined with --send or --rounds")
    interactive = not scripted and not args.no_tui and sys.stdin.isatty() and sys.stdout.isatty()
    if args.tui or interactive:
        if importlib.util.find_spec("textual") is not None:
            from .tui import run_tui

            return run_tui(config)
        if args.tui:
            return _args.usage_error(
                "msgsock client", "--tui needs textual and rich: pip install 'msgsock[cli]'", hint=False
            )
        print(
            "msgsock client: line mode (pip install 'msgsock[cli]' for the interactive client)",
            file=sys.stderr,
        )
    try:
        if args.rounds is not None:
            result = run_rounds(config, args.rounds, _arg_bytes(args.message))
            print(
                f"{result.rounds} rounds, all verified; RTT p50 {result.percentile(0.5) * 1e6:.0f} us, "
                f"p99 {result.percentile(0.99) * 1e6:.0f} us"
            )
        elif args.send:
            run_lines(config, [_arg_bytes(text) for text in args.send])
        else:
            if sys.stdin.isatty():
                print("type a message and press Enter; Ctrl-D to quit", file=sys.stderr)
            run_lines(config, _stdin_lines())
    except ClientError as exc:
        print(f"msgsock client: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_client_udp(args: argparse.Namespace) -> int:
    """``msgsock client --udp``: each message one datagram, resent on silence (SPEC §6.2, §5.4)."""
    conflicts = _udp_conflicts(args, ("header", "connect_timeout", "tui"))
    if conflicts:
        return _args.usage_error(
            "msgsock client",
            f"--udp cannot be combined with {', '.join(conflicts)} "
            "(a datagram is one message: no frame header, no connection)",
        )
    max_size = _udp_max_size(args)
    if isinstance(max_size, str):
        return _args.usage_error("msgsock client", max_size)
    timeout = args.timeout or UDP_TIMEOUT  # 0 means the default, as for TCP
    retries = UDP_RETRIES if args.retries is None else args.retries
    try:
        if args.rounds is not None:
            result = _udp_rounds(args, args.rounds, timeout=timeout, retries=retries, max_size=max_size)
            print(
                f"{result.rounds} rounds, all verified; RTT p50 {result.percentile(0.5) * 1e6:.0f} us, "
                f"p99 {result.percentile(0.99) * 1e6:.0f} us"
            )
            return 0
        if args.send:
            messages: Iterable[bytes] = [_arg_bytes(text) for text in args.send]
        else:
            # No interactive client over UDP: a terminal gets line mode.
            if sys.stdin.isatty():
                print("type a message and press Enter; Ctrl-D to quit", file=sys.stderr)
            messages = _stdin_lines()
        _udp_lines(args, messages, timeout=timeout, retries=retries, max_size=max_size)
    except _UdpClientError as exc:
        print(f"msgsock client: error: {exc}", file=sys.stderr)
        return 1
    return 0


class _UdpClientError(Exception):
    """A failure of ``client --udp``, with the one line to show."""


@contextlib.contextmanager
def _udp_client(args: argparse.Namespace, *, timeout: float, retries: int, max_size: int) -> Iterator[Any]:
    """Open a :class:`msgsock.udp.UdpClient`; translate what can go wrong to one line.

    Raises:
        _UdpClientError: the host does not resolve, no reply, a size or system error.
    """
    from ..exceptions import MessageTooLarge, OversizeMessage, Timeout
    from ..udp import UdpClient

    where = f"{args.host}:{args.port}"
    try:
        client = UdpClient(args.host, args.port, timeout=timeout, retries=retries, max_size=max_size)
    except socket.gaierror as exc:
        raise _UdpClientError(f"cannot resolve {args.host!r}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise _UdpClientError(f"cannot send to {where}: {exc.strerror or exc}") from None
    try:
        with client:
            yield client
    except Timeout as exc:  # "no reply from HOST:PORT after N tries of T s"
        raise _UdpClientError(str(exc)) from None
    except MessageTooLarge as exc:  # the server's reply was too large (its fault)
        raise _UdpClientError(f"a reply of {exc.size} bytes is above --max-size {exc.max_size}") from None
    except OversizeMessage as exc:  # not reached: _udp_request checks a request first, naming it
        raise _UdpClientError(f"a message of {exc.size} bytes is above --max-size {exc.max_size}") from None
    except OSError as exc:
        raise _UdpClientError(f"cannot send to {where}: {exc.strerror or exc}") from None


def _udp_request(client: Any, data: bytes, what: str, max_size: int) -> bytes:
    # Checked here, not only by request(), so the error says which message.
    if len(data) > max_size:
        raise _UdpClientError(
            f"{what} is {len(data)} bytes, above --max-size {max_size} (the largest datagram to send)"
        )
    reply: bytes = client.request(data)
    return reply


def _udp_lines(
    args: argparse.Namespace, messages: Iterable[bytes], *, timeout: float, retries: int, max_size: int
) -> None:
    from .client import escape_text

    with _udp_client(args, timeout=timeout, retries=retries, max_size=max_size) as client:
        for n, data in enumerate(messages, 1):
            reply = _udp_request(client, data, f"message {n}", max_size)
            print(escape_text(reply), flush=True)


def _udp_rounds(
    args: argparse.Namespace, rounds: int, *, timeout: float, retries: int, max_size: int
) -> RoundsResult:
    """The MFCAsync loop over datagrams: send, verify the echo, reverse, send back."""
    from .client import RoundsResult
    from .reverse import Mismatch, ReverseLoop

    rtts: list[float] = []
    loop = ReverseLoop(_arg_bytes(args.message))
    with _udp_client(args, timeout=timeout, retries=retries, max_size=max_size) as client:
        for n in range(1, rounds + 1):
            start = time.perf_counter()
            echo = _udp_request(client, loop.payload, f"round {n}", max_size)
            rtts.append(time.perf_counter() - start)
            try:
                loop.verify(echo)
            except Mismatch as exc:
                raise _UdpClientError(str(exc)) from None
    return RoundsResult(rounds, rtts)


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
            ["stress", "--port", port, "-c", "8", "-d", "4", "-n", "20000", "--quiet"],
        ]
        for step in steps:
            print("$ msgsock " + " ".join(a if " " not in a else repr(a) for a in step), flush=True)
            done = subprocess.run([*me, *step], capture_output=True, text=True, env=env, timeout=60)
            for line in (done.stdout + done.stderr).splitlines():
                print(f"  {line}", flush=True)
            if done.returncode != 0:
                return 1
        print("$ kill -TERM <server>    # the server drains, then prints its log and summary:", flush=True)
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
