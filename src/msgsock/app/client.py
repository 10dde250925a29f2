"""The scripted modes of ``msgsock client`` (SPEC §6.2) over the blocking API.

- ``--send TEXT`` (repeatable) or lines from standard input: each becomes one message;
  each reply is printed on its own line (header fields first, when the frame has any).
- ``--rounds N``: the MFCAsync AsyncClient loop (KB Q192570): send a message, receive
  the echo, check it is exactly what was sent, reverse it and send that back; N times.
  Then a summary (rounds, all verified, RTT p50/p99) and a graceful disconnect.

Every failure (refused, unresolvable, mismatch, early disconnect, timeout) ends with
one line on stderr and exit status 1; no traceback.
"""

from __future__ import annotations

import math
import socket
import ssl as ssl_module
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from ..exceptions import ConnectionClosed, HandshakeError, MsgsockError, Timeout
from ..framing import DEFAULT_FORMAT, FrameFormat, Message
from ..protocol import DEFAULT_LIMITS, Limits, format_address
from ..sync import Connection, connect
from ._text import escape_text
from .reverse import Mismatch, ReverseLoop

__all__ = ["ClientConfig", "ClientError", "escape_text", "run_lines", "run_rounds"]


class ClientError(Exception):
    """A failure of a scripted client run, with the one line to show the user."""


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings shared by the scripted modes."""

    host: str = "127.0.0.1"
    port: int = 9898
    frame: FrameFormat = DEFAULT_FORMAT
    limits: Limits = DEFAULT_LIMITS
    header: Mapping[str, int] = field(default_factory=dict)
    connect_timeout: float = 10.0
    reply_timeout: float = 10.0
    ssl: ssl_module.SSLContext | None = None
    server_hostname: str | None = None
    auth_key: bytes | None = field(default=None, repr=False)


def _format_reply(reply: bytes) -> str:
    if type(reply) is Message and reply.header:
        fields = " ".join(f"{k}={v}" for k, v in reply.header.items())
        return f"[{fields}] {escape_text(reply)}"
    return escape_text(reply)


def _connect(config: ClientConfig) -> Connection:
    where = format_address((config.host, config.port))
    try:
        return connect(
            config.host,
            config.port,
            frame=config.frame,
            limits=config.limits,
            connect_timeout=config.connect_timeout,
            ssl=config.ssl,
            server_hostname=config.server_hostname,
            auth_key=config.auth_key,
        )
    except HandshakeError as exc:
        raise ClientError(f"{where}: {exc}") from None
    except ConnectionClosed as exc:  # a stage failed: the core's reason (TLS, authentication)
        raise ClientError(f"cannot connect to {where}: {exc.reason or exc}") from None
    except ssl_module.SSLCertVerificationError as exc:
        raise ClientError(f"TLS with {where} failed: {exc.verify_message or exc}") from None
    except ssl_module.SSLError as exc:
        raise ClientError(f"TLS with {where} failed: {exc.reason or exc}") from None
    except socket.gaierror as exc:
        raise ClientError(f"cannot resolve {config.host!r}: {exc.strerror or exc}") from None
    except Timeout as exc:
        raise ClientError(f"cannot connect to {where}: {exc}") from None
    except OSError as exc:
        raise ClientError(f"cannot connect to {where}: {exc.strerror or exc}") from None


def _receive(conn: Connection, timeout: float, what: str) -> bytes:
    try:
        reply: bytes = conn.receive(timeout=timeout)
    except Timeout:
        raise ClientError(f"no reply to {what} within {timeout:g} s") from None
    except ConnectionClosed as exc:
        raise ClientError(f"server disconnected before replying to {what} ({exc.reason or exc})") from None
    except MsgsockError as exc:
        raise ClientError(f"bad reply to {what}: {exc}") from None
    return reply


def run_lines(config: ClientConfig, messages: Iterable[bytes], out: TextIO | None = None) -> int:
    """Send each message (bytes, sent as they are) and print each reply.  Returns the number exchanged.

    Raises:
        ClientError: connection failure, timeout or early disconnect.
    """
    out = out or sys.stdout
    count = 0
    conn = _connect(config)
    try:
        for data in messages:
            what = f"message {count + 1}"
            try:
                conn.send(data, config.header or None)
            except (ConnectionClosed, OSError) as exc:
                raise ClientError(f"server disconnected before {what} was sent ({exc})") from None
            except MsgsockError as exc:
                raise ClientError(f"cannot send {what}: {exc}") from None
            print(_format_reply(_receive(conn, config.reply_timeout, what)), file=out, flush=True)
            count += 1
    finally:
        conn.close()
    return count


@dataclass
class RoundsResult:
    """What a ``--rounds`` run measured."""

    rounds: int
    rtts: list[float]

    def percentile(self, q: float) -> float:
        """RTT at quantile ``q`` (0..1) in seconds, nearest-rank."""
        ordered = sorted(self.rtts)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]


def run_rounds(config: ClientConfig, rounds: int, first: bytes) -> RoundsResult:
    """Run the MFCAsync loop: send, receive the echo, verify, reverse, send back.

    Raises:
        ClientError: mismatch (both payloads shown), timeout, or early disconnect.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    rtts: list[float] = []
    loop = ReverseLoop(first)
    conn = _connect(config)
    try:
        for n in range(1, rounds + 1):
            what = f"round {n}"
            start = time.perf_counter()
            try:
                conn.send(loop.payload, config.header or None)
            except (ConnectionClosed, OSError) as exc:
                raise ClientError(f"server disconnected at {what} ({exc})") from None
            echo = _receive(conn, config.reply_timeout, what)
            rtts.append(time.perf_counter() - start)
            try:
                loop.verify(echo)
            except Mismatch as exc:
                raise ClientError(str(exc)) from None
    finally:
        conn.close()
    return RoundsResult(rounds, rtts)
