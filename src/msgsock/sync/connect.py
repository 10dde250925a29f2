"""Opening a blocking connection (SPEC §5.2): :func:`connect`.

Resolve the address, try each resolved address in turn within ``connect_timeout``
(cancellable with a :class:`~msgsock.sync.CancelToken`: the socket is then
non-blocking and the wait is a :class:`~msgsock.sync.cancel._CancellableWait`),
then pump the new :class:`~msgsock.sync.Connection`'s protocol through its stages
(TLS, authentication) within the same timeout, and translate an end in the stages
to :class:`~msgsock.exceptions.HandshakeError` or
:class:`~msgsock.exceptions.Timeout` as ``aio.connect`` does.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import ssl as _ssl
import time
from typing import Any

from .._net import check_port, check_timeout
from ..exceptions import (
    Cancelled,
    EndKind,
    HandshakeError,
    Timeout,
)
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, format_address
from ..stages import Stages
from .cancel import CancelToken, _CancellableWait
from .connection import Connection

__all__ = ["connect"]

_STAGE_KINDS = frozenset({EndKind.TLS, EndKind.AUTHENTICATION})
"""Ends that :func:`connect` reports as a :class:`~msgsock.exceptions.HandshakeError`."""

# What a non-blocking connect() answers while the handshake is under way.
# (Not EWOULDBLOCK on POSIX: there it is EAGAIN, which connect() uses for "no free local port".)
_IN_PROGRESS = frozenset({errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", errno.EINPROGRESS)})


def _open_socket(
    info: tuple[Any, ...], connect_timeout: float | None, cancel: CancelToken | None
) -> socket.socket:
    """A TCP socket connected to ``info``'s address (cancellable with ``cancel``).

    Raises:
        Cancelled, TimeoutError: from the waits.
        OSError: the connect failed (e.g. ``ConnectionRefusedError``).
    """
    family, type_, proto, _canonname, address = info
    sock = socket.socket(family, type_, proto)
    try:
        if cancel is None:
            sock.settimeout(connect_timeout)
            sock.connect(address)
            return sock
        waiter = _CancellableWait(cancel, connect_timeout)
        try:
            sock.setblocking(False)
            waiter.check(address)
            error = sock.connect_ex(address)
            if error in _IN_PROGRESS:
                waiter.wait(sock, address, write=True)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        finally:
            waiter.close()
        return sock
    except BaseException:
        sock.close()
        raise


def _stage_error(proto: MessageProtocol, address: Any, connect_timeout: float | None) -> Exception:
    """The error :func:`connect` raises for a connection that ended in its stages (as ``aio.connect``)."""
    end = proto.end
    error = proto.closed_error()
    if end is not None and end.kind is EndKind.HANDSHAKE_TIMEOUT and proto.stages is not None:
        timeout = Timeout(
            f"connecting to {format_address(address)}: {proto.stages.timeout_reason(connect_timeout or 0.0)}"
        )
        timeout.__cause__ = error
        return timeout
    if end is not None and end.kind in _STAGE_KINDS:
        failed = HandshakeError(end.reason)
        failed.__cause__ = error
        return failed
    return error


def connect(
    host: str = "127.0.0.1",
    port: int = 9898,
    *,
    frame: FrameFormat = DEFAULT_FORMAT,
    limits: Limits = DEFAULT_LIMITS,
    connect_timeout: float | None = 10.0,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    cancel: CancelToken | None = None,
    auth_key: bytes | None = None,
) -> Connection:
    """Connect to a message server and return the :class:`Connection`.

    ``host`` may be a name, a dotted IPv4 address or an IPv6 address; every address it
    resolves to is tried in order (SPEC §5.2, seed 001 note 4).  With ``ssl`` the TLS
    handshake, then with ``auth_key`` the authentication handshake (SPEC §4.2), run
    before this returns, as the :class:`~msgsock.stages.Stages` of the connection's
    protocol.

    A failed stage is raised as :class:`~msgsock.exceptions.HandshakeError` with the
    core's reason, the one the server logs too ("TLS handshake failed: [SSL:
    CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has
    expired"); its ``__cause__`` is the :class:`~msgsock.exceptions.ConnectionClosed`
    (``kind`` ``TLS`` or ``AUTHENTICATION``).  With TLS 1.3 a server that refuses
    *our* certificate says so only after the handshake: without ``auth_key`` that
    shows on the first :meth:`~Connection.receive` as ``ConnectionClosed`` (``kind``
    ``TLS``); with ``auth_key`` it is raised here.

    Args:
        host: where to connect.
        port: TCP port.
        frame: the frame format both peers use.
        limits: limits for the connection (SPEC §7).
        connect_timeout: seconds allowed for each address (TCP connect, TLS
            handshake and authentication handshake); None waits for ever.
        ssl: a client ``SSLContext`` to speak TLS.
        server_hostname: name to check the server certificate against; default ``host``.
        cancel: a :class:`CancelToken`: another thread's ``cancel.cancel()`` aborts
            the connect or handshake in progress (name resolution itself is not
            interruptible; the token is checked before and after it), and the token
            stays attached to the returned connection (see :meth:`Connection.cancel`).
        auth_key: the shared key (at least 16 bytes) of a server that requires
            authentication (``msgsock.auth.parse_key_file`` reads a key file).

    Returns:
        The connected :class:`Connection` (``TCP_NODELAY`` on).

    Raises:
        socket.gaierror: ``host`` cannot be resolved.
        ConnectionRefusedError: nothing listens there (the last address's error).
        Timeout: the last address tried timed out, or a handshake did not finish
            within ``connect_timeout`` (not retried on other addresses).
        Cancelled: ``cancel`` was cancelled before the connection was made (no other
            address is tried).
        HandshakeError: the TLS or the authentication handshake failed (not
            retried on other addresses): "TLS handshake failed: ...", "authentication
            failed: the server rejected our key", "...the peer does not know the key
            (bad server proof)", or a server that does not speak the handshake ("bad
            handshake magic ...", "connection closed by the peer before its
            authentication hello ...").
        ConnectionClosed: the connection ended otherwise before its stages passed.
        ValueError: ``auth_key`` is shorter than 16 bytes; ``port`` is not an int
            0..65535 (``port 70000: must be 0..65535``); ``connect_timeout`` is
            negative or NaN.
        TypeError: ``connect_timeout`` is not a number.
        OSError: any other failure of the last address tried.
    """
    port = check_port(port)
    check_timeout(connect_timeout, "connect_timeout")
    if cancel is not None and cancel.cancelled:
        raise Cancelled(f"connecting to {format_address((host, port))} was cancelled")
    staged = ssl is not None or auth_key is not None
    if auth_key is not None:
        Stages(server_side=False, auth_key=auth_key)  # a bad key fails here, before any I/O
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    hostname = server_hostname if server_hostname is not None else host
    error: OSError | None = None
    for info in infos:
        address = info[4]
        started = time.monotonic()
        try:
            sock = _open_socket(info, connect_timeout, cancel)
        except TimeoutError:
            error = Timeout(f"connecting to {format_address(address)} timed out after {connect_timeout:g} s")
            continue
        except OSError as exc:
            error = exc
            continue
        protocol: MessageProtocol | None = None
        if staged:
            # The stages share the address's connect_timeout: the protocol's handshake
            # deadline is what is left of it.
            left = (
                None if connect_timeout is None else max(connect_timeout - (time.monotonic() - started), 1e-3)
            )
            protocol = MessageProtocol(
                frame,
                limits=dataclasses.replace(limits, handshake_timeout=left),
                stages=Stages(
                    server_side=False, ssl_context=ssl, server_hostname=hostname, auth_key=auth_key
                ),
                peer_address=address,
            )
        conn = Connection(sock, frame=frame, limits=limits, cancel=cancel, protocol=protocol)
        try:
            if staged and not conn._pass_stages():
                raise _stage_error(conn.protocol, address, connect_timeout)
            if conn.cancelled:  # cancelled before we return: the caller never gets a dead connection
                raise Cancelled(f"connecting to {format_address(address)} was cancelled")
        except Cancelled:
            conn.abort()
            raise Cancelled(f"connecting to {format_address(address)} was cancelled") from None
        except BaseException:
            conn.abort()
            raise
        return conn
    assert error is not None  # getaddrinfo never returns an empty list
    raise error
