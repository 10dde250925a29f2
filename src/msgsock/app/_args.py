"""The command line's parser class, value types and shared checks (SPEC §6).

Every usage error is one line on stderr and exit status 2 (README: "Errors are one line
on stderr"), in one format whether argparse or a command finds it::

    msgsock serve: error: --port 70000: must be 0..65535 (see 'msgsock serve --help')

:class:`ArgumentParser` prints argparse's own errors that way (never the usage block);
:func:`usage_error` prints the errors a command finds after parsing.  The value types
raise ``ArgumentTypeError`` with what is wrong with the value; the parser names the
option and the value in front of it.  :func:`frame_with_max_size` and
:func:`check_header` are the checks of ``--max-size`` and ``--header`` against
``--frame`` that serve, client and stress share, made before anything connects or
listens.

The options more than one command takes are defined here, once: the frame options
(:func:`add_frame_options`), the server's limits (:func:`add_limit_options`,
:func:`limits_of`), the server's and the clients' TLS and shared-key options
(:func:`add_server_security_options`, :func:`add_client_security_options`,
:func:`client_security`, :func:`read_auth_key`), and how a TLS file error is worded
in the options' terms (:func:`tls_file_message`).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ..exceptions import InvalidFormat
from ..framing import DEFAULT_MAX_SIZE, PRESETS, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits

if TYPE_CHECKING:
    import ssl

__all__ = [
    "LIMIT_OPTIONS",
    "ArgumentParser",
    "UsageError",
    "add_client_security_options",
    "add_frame_options",
    "add_limit_options",
    "add_server_security_options",
    "byte_size",
    "check_header",
    "client_security",
    "frame",
    "frame_with_max_size",
    "header_field",
    "limits_of",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "read_auth_key",
    "server_port",
    "tls_file_message",
    "usage_error",
    "whole_number",
]


class UsageError(Exception):
    """A bad option or combination of options, found after parsing: exit status 2."""


def usage_line(prog: str, message: str, *, hint: bool = True) -> str:
    """The one line of a usage error of command ``prog``."""
    return f"{prog}: error: {message}" + (f" (see '{prog} --help')" if hint else "")


def usage_error(prog: str, message: str, *, hint: bool = True) -> int:
    """Print the usage error ``message`` of command ``prog`` as one line; return 2.

    Args:
        hint: end with ``(see 'PROG --help')``; not for a missing extra (``--plot
            needs matplotlib: pip install ...``), whose fix is an install, not an option.
    """
    print(usage_line(prog, message, hint=hint), file=sys.stderr)
    return 2


# argparse words its errors "argument -c/--connections: MESSAGE" and "not allowed with
# argument -t/--duration"; we say "--connections: MESSAGE", "not allowed with --duration".
_ARGUMENT_PREFIX = re.compile(r"^argument (\S+): ")
_ARGUMENT_OPTION = re.compile(r"\bargument (-\S+)")
# Where a subcommand's parser leaves itself in the namespace, so that the top parser
# can report an unknown option as that subcommand's error (see parse_args).
_PARSER_ATTR = "_msgsock_parser"


def _option_name(names: str) -> str:
    """The long form of ``-c/--connections`` (or a positional's name)."""
    return max(names.split("/"), key=len)


def _reword(message: str) -> str:
    message = _ARGUMENT_PREFIX.sub(lambda m: _option_name(m.group(1)) + ": ", message)
    return _ARGUMENT_OPTION.sub(lambda m: _option_name(m.group(1)), message)


def _action_name(action: argparse.Action) -> str:
    if action.option_strings:
        return max(action.option_strings, key=len)
    return str(action.metavar or action.dest)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line (see the module docstring).

    Subparsers made with ``add_subparsers(parser_class=ArgumentParser)`` behave alike.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as the one line of a usage error and exit with status 2."""
        self.exit(2, usage_line(self.prog, _reword(message)) + "\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """As argparse's; the innermost (sub)parser that ran is noted in the namespace."""
        parsed, extras = super().parse_known_args(args, namespace)
        if not hasattr(parsed, _PARSER_ATTR):
            setattr(parsed, _PARSER_ATTR, self)
        return parsed, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but an unknown option is the error of the subcommand it was given to.

        ``msgsock serve --bogus`` says ``msgsock serve: error: unrecognized arguments:
        --bogus``, pointing at ``msgsock serve --help`` (argparse's own would say ``msgsock``).
        """
        parsed, extras = self.parse_known_args(args, namespace)
        parser: ArgumentParser = getattr(parsed, _PARSER_ATTR, self)
        delattr(parsed, _PARSER_ATTR)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # The one place argparse converts a value: name the option and the value given,
        # "--port 70000: must be 0..65535", whatever the type function says is wrong.
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as exc:
            raise argparse.ArgumentError(
                None, f"{_action_name(action)} {shlex.quote(arg_string)}: {exc.message}"
            ) from None


_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}

# The parser puts "--option VALUE: " in front of these messages, so they say only what
# is wrong with the value.


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError("not a finite number")
    return value


def _port_in(text: str, low: int) -> int:
    value = _int(text)
    if not low <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be {low}..65535")
    return value


def port(text: str) -> int:
    """A port to connect to: 1-65535."""
    return _port_in(text, 1)


def server_port(text: str) -> int:
    """A port to listen on: 0-65535 (0 = any free port)."""
    return _port_in(text, 0)


def frame(text: str) -> FrameFormat:
    """A ``--frame`` preset or format string (SPEC §4.1)."""
    try:
        return FrameFormat.parse(text)
    except InvalidFormat as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def byte_size(text: str) -> int:
    """A byte count: ``65536``, ``64k``, ``64KiB``, ``16MiB``, ``1g``; never negative."""
    body = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _UNITS.get(body[-1:], 1)
    if scale != 1:
        body = body[:-1]
    try:
        value = int(body) * scale
    except ValueError:
        raise argparse.ArgumentTypeError("not a byte count (e.g. 65536, 64KiB, 16MiB)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def whole_number(text: str) -> int:
    """Any whole number."""
    return _int(text)


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (seconds, where 0 often means off)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def header_field(text: str) -> tuple[str, int]:
    """A ``--header NAME=VALUE`` (VALUE an integer: ``3``, ``-1``, ``0x10``)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("not NAME=VALUE")
    try:
        return name, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


# -- checks against the frame, shared by serve, client and stress ------------------------------


def frame_with_max_size(frame: FrameFormat | None, max_size: int | None) -> FrameFormat:
    """The ``--frame`` format with ``--max-size`` applied, checked against its length field.

    Args:
        frame: the ``--frame`` given, or None for the default (u32be).
        max_size: the ``--max-size`` given, or None: then the default 16 MiB, capped
            by what the length field can count (``--frame u8`` alone carries 255).

    Raises:
        UsageError: an explicit ``max_size`` above the largest body the length field
            can count (``--frame u16be --max-size 17GiB``: at most 65535).
    """
    frame = frame or FrameFormat()
    if max_size is None:
        return frame.with_max_size(DEFAULT_MAX_SIZE)
    # The format caps max_size by its length field itself (max_body); unlimited, that
    # cap is the field's own limit (less the header when the length counts it).
    limit = frame.with_max_size(None).max_body
    if max_size > limit:
        raise UsageError(f"--max-size {max_size}: above {limit}, the largest body frame {frame} can carry")
    return frame.with_max_size(max_size)


def _field_range(code: str) -> tuple[int, int]:
    bits = 8 * struct.calcsize("<" + code)  # standard sizes: what the frame puts on the wire
    if code.islower():
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_header(frame: FrameFormat, header: Mapping[str, int]) -> None:
    """Check ``--header`` values against the frame's extra fields, before anything connects.

    Raises:
        UsageError: a field the frame does not have, or a value out of its field's
            range (``--header kind=300`` for ``kind:B``, which holds 0..255).
    """
    unknown = sorted(set(header) - set(frame.field_names))
    if unknown:
        has = f"fields {', '.join(frame.field_names)}" if frame.field_names else "no header fields"
        raise UsageError(f"--header {', '.join(unknown)}: frame {frame} has {has}")
    for f in (*frame.fields_before, *frame.fields_after):
        if f.name in header:
            low, high = _field_range(f.code)
            if not low <= header[f.name] <= high:
                raise UsageError(
                    f"--header {f.name}={header[f.name]}: field {f.name}:{f.code} holds {low}..{high}"
                )


# -- the options several commands share -------------------------------------------------------

FRAME_HELP = (
    f"frame format: a preset ({', '.join(PRESETS)}) or a format string such as "
    "'u32be+kind:B+flags:H', 'magic:H+u16be' or 'u32be!' (length counts the header); default u32be"
)


def add_frame_options(p: argparse.ArgumentParser, *, max_size_help: str | None = None) -> None:
    """Add ``--frame`` and ``--max-size`` (checked together by :func:`frame_with_max_size`)."""
    p.add_argument("--frame", type=frame, default=None, help=FRAME_HELP)
    p.add_argument(
        "--max-size",
        type=byte_size,
        default=None,
        metavar="BYTES",
        help=max_size_help or "largest message body accepted or sent (default 16MiB)",
    )


LIMIT_OPTIONS = (
    "max_connections",
    "idle_timeout",
    "message_timeout",
    "handshake_timeout",
    "shutdown_timeout",
)
"""The attributes :func:`add_limit_options` adds, as :class:`~msgsock.protocol.Limits` names them."""


def add_limit_options(p: argparse.ArgumentParser, *, per_worker: bool = False) -> None:
    """Add a server's limits (SPEC §7): ``--max-connections`` and the four timeouts."""
    where = "; per worker with processes" if per_worker else ""
    p.add_argument(
        "--max-connections",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"more are closed at once (default {DEFAULT_LIMITS.max_connections}{where})",
    )
    p.add_argument(
        "--idle-timeout",
        type=non_negative_float,
        default=None,
        metavar="S",
        help=f"close a connection that sends nothing for S seconds (default {DEFAULT_LIMITS.idle_timeout:g}; 0 = off)",
    )
    p.add_argument(
        "--message-timeout",
        type=non_negative_float,
        default=None,
        metavar="S",
        help=f"a started message must complete within S (default {DEFAULT_LIMITS.message_timeout:g}; 0 = off)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=non_negative_float,
        default=None,
        metavar="S",
        help="the PROXY header, TLS and authentication must complete within S "
        f"(default {DEFAULT_LIMITS.handshake_timeout:g})",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=non_negative_float,
        default=None,
        metavar="S",
        help=f"graceful shutdown deadline (default {DEFAULT_LIMITS.shutdown_timeout:g})",
    )


def limits_of(args: argparse.Namespace) -> Limits:
    """The :class:`~msgsock.protocol.Limits` of the limit options given (the library's defaults else)."""
    given = {name: getattr(args, name) for name in LIMIT_OPTIONS if getattr(args, name) is not None}
    return Limits(**given)


def add_server_security_options(p: argparse.ArgumentParser) -> None:
    """Add the server's TLS, shared-key and PROXY protocol options (SPEC §4.2, §7)."""
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (if not in it)")
    p.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by these CAs (mutual TLS)"
    )
    p.add_argument(
        "--auth-key-file", metavar="FILE", help="require the shared-key handshake (docs/handshake.md)"
    )
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="require a PROXY protocol v1/v2 header (behind HAProxy); log the real client address",
    )


def add_client_security_options(p: argparse.ArgumentParser) -> None:
    """Add the clients' TLS and shared-key options (SPEC §4.2, §7): client and stress."""
    p.add_argument("--tls", action="store_true", help="connect with TLS (verifying the server)")
    p.add_argument(
        "--tls-ca", metavar="FILE", help="trust these CA certificates instead of the system's (implies --tls)"
    )
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (implies --tls)")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (if not in it)")
    p.add_argument("--tls-server-name", metavar="NAME", help="the name to verify in the server's certificate")
    p.add_argument("--auth-key-file", metavar="FILE", help="answer the server's shared-key handshake")


# The option each TLSFileError.argument of msgsock.tls was given as.
_TLS_OPTIONS = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca", "client_ca": "--tls-client-ca"}


def tls_file_message(exc: ValueError) -> str:
    """``exc`` worded for the command line: ``--tls-cert: FILE: no such file``."""
    from ..tls import TLSFileError

    if isinstance(exc, TLSFileError):
        return f"{_TLS_OPTIONS.get(exc.argument, exc.argument)}: {exc.path}: {exc.problem}"
    return str(exc)


def client_security(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, bytes | None]:
    """The TLS context and shared key the client options ask for.

    Raises:
        ValueError: an unreadable or invalid file (worded with its option), or
            ``--tls-key`` without ``--tls-cert``.
    """
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert")
    context = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_server_name:
        from ..tls import client_context

        try:
            context = client_context(args.tls_ca, args.tls_cert, args.tls_key)
        except ValueError as exc:
            raise ValueError(tls_file_message(exc)) from None
    return context, read_auth_key(args.auth_key_file)


def read_auth_key(path: str | None) -> bytes | None:
    """The shared key in the file at ``path`` (None for no file).

    Raises:
        ValueError: the file cannot be read or holds too short a key.
    """
    if path is None:
        return None
    from ..auth import parse_key_file

    try:
        with open(path, "rb") as f:
            return parse_key_file(f.read())
    except OSError as exc:
        raise ValueError(f"--auth-key-file: {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"--auth-key-file: {path}: {exc}") from None
