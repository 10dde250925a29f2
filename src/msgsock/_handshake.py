"""What the asyncio and the blocking layers' handshakes share (SPEC §4.2, §7; ``docs/handshake.md``).

Each layer pumps the handshake stages its own way -- the asyncio server with a
protocol object swapped onto the transport, the threaded server on the
connection's own thread, the clients inside ``connect()`` -- but the two layers
must check keys the same way and tell the operator the same thing: the stage
names, the timeout reasons and the TLS failure text of the server log lines
(``PEER closed: REASON``), and the client's connect timeouts.  Those live here,
once.  Not public, and not part of the sans-I/O core (it knows :mod:`ssl`'s
exceptions).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable

from .auth import ClientHandshake, ServerHandshake, new_nonce
from .exceptions import Timeout
from .proxy import ProxyHeaderParser

__all__ = [
    "check_server_key",
    "connect_timeout_error",
    "run_blocking",
    "ssl_error_text",
    "stage_failed",
    "stage_name",
    "timeout_reason",
    "tls_failed",
]

STAGE_NAMES = {
    "proxy": "the PROXY header",
    "tls": "the TLS handshake",
    "auth": "the authentication handshake",
}
"""Each stage (SPEC §7 order) as the log lines name it."""

_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def check_server_key(auth_key: bytes | None) -> bytes | None:
    """Check a server's shared key once, at start-up, and return it as ``bytes``.

    Raises:
        ValueError: the key is shorter than 16 bytes.
        TypeError: the key is not bytes.
    """
    if auth_key is None:
        return None
    ServerHandshake(auth_key, new_nonce())  # a bad key fails here, not per connection
    return bytes(auth_key)


def run_blocking(
    handshake: ClientHandshake | ServerHandshake,
    send: Callable[[bytes], None],
    receive: Callable[[], bytes],
    data: bytes = b"",
) -> bytes:
    """Run the authentication handshake (SPEC §4.2) over blocking ``send`` and ``receive`` calls.

    Our hello goes out at once (the hellos cross); then each read is fed to the
    handshake and what it answers is sent, until it is done.

    Args:
        handshake: a fresh client or server handshake.
        send: writes all of the bytes given.
        receive: one read; ``b""`` at the peer's EOF.
        data: bytes already read that belong to the handshake (they followed a
            PROXY header in the same read).

    Returns:
        The bytes that followed the handshake: the start of the frames.

    Raises:
        HandshakeError: the peer's bytes or proof are wrong, or it closed first
            (``handshake.data_to_send()`` may then hold the rejection byte).
        Whatever ``send`` and ``receive`` raise.
    """
    send(handshake.data_to_send())
    while True:
        if data:
            handshake.receive_data(data)
            out = handshake.data_to_send()
            if out:
                send(out)
            if handshake.done:
                return handshake.remaining
        data = receive()
        if not data:
            handshake.receive_eof()  # raises: the handshake is not done


def stage_name(stage: str) -> str:
    """The log name of ``stage`` (``"the handshake"`` for one before or after the stages)."""
    return STAGE_NAMES.get(stage, "the handshake")


def timeout_reason(stage: str, parser: ProxyHeaderParser | None, timeout: float) -> str:
    """The log reason of a handshake that ran out of time in ``stage``."""
    if stage == "proxy" and parser is not None:
        if parser.buffered == 0:
            return f"handshake timeout: no PROXY header within {timeout:g} s"
        return (
            f"handshake timeout: the PROXY header was not complete within {timeout:g} s "
            f"({parser.buffered} bytes received)"
        )
    return f"handshake timeout: {stage_name(stage)} did not complete within {timeout:g} s"


def stage_failed(why: str, stage: str) -> str:
    """The log reason of a connection lost (``why``) in the middle of ``stage``."""
    return f"{why} during {stage_name(stage)}"


def tls_failed(why: str) -> str:
    """The log reason of a failed server-side TLS handshake; ``why`` says what OpenSSL said."""
    return f"TLS handshake failed: {why}"


def ssl_error_text(exc: ssl.SSLError) -> str:
    """OpenSSL's words for a TLS failure, without the ``(_ssl.c:NNN)`` source position.

    E.g. ``[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca``, or the
    verification failure for a certificate we refused (``certificate verify failed:
    certificate has expired``).
    """
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return _SSL_SOURCE.sub("", text) or type(exc).__name__


def connect_timeout_error(where: str, timeout: float | None, *, authenticating: bool) -> Timeout:
    """The error of a client's ``connect()`` that ran out of ``connect_timeout``.

    ``authenticating``: the TCP connect (and TLS) succeeded and the authentication
    handshake did not finish: the server is there, so it is said apart.
    """
    if authenticating:
        return Timeout(f"authentication with {where} did not complete within {timeout:g} s")
    return Timeout(f"connecting to {where} timed out after {timeout:g} s")
