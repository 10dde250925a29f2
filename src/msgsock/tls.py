"""TLS contexts for servers and clients, with modern defaults (SPEC §7).

Both sides require TLS 1.2 or newer and use the ``ssl`` module's default cipher
choices.  A server given a client CA requires and verifies client certificates
(mutual TLS).  A client verifies the server's certificate and host name against the
system's trust store, or against ``ca`` when given.

A file that is missing or cannot be loaded is a :class:`TLSFileError` (a
``ValueError``) that names the argument it came from and the path, so a caller --
the command line, a configuration loader -- can word it in its own terms.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["TLSFileError", "client_context", "server_context"]

_WHAT = {
    "cert": "certificate",
    "key": "private key",
    "ca": "CA certificates",
    "client_ca": "client CA certificates",
}


class TLSFileError(ValueError):
    """A certificate, key or CA file is missing or cannot be loaded.

    Attributes:
        argument: the parameter the path was given as: ``"cert"``, ``"key"``, ``"ca"``
            or ``"client_ca"``.
        path: the path as given.
        problem: what is wrong with it (``"no such file"``, the ``ssl`` module's reason).
    """

    def __init__(self, argument: str, path: str, problem: str) -> None:
        self.argument = argument
        self.path = path
        self.problem = problem
        super().__init__(f"{_WHAT.get(argument, argument)} {path}: {problem}")


def _exists(path: str, argument: str) -> None:
    # The ssl module's FileNotFoundError does not name the file; say which one it is.
    if not os.path.isfile(path):
        raise TLSFileError(argument, path, "no such file")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    _exists(cert, "cert")
    if key is not None:
        _exists(key, "key")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        with_key = f" with key {key}" if key is not None else ""
        raise TLSFileError("cert", cert, f"cannot load the certificate{with_key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, argument: str) -> None:
    _exists(ca, argument)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError(argument, ca, f"cannot load CA certificates: {exc}") from None


def server_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """Return a server context for ``cert`` (PEM, with ``key`` unless the key is in it).

    Args:
        cert: the server certificate chain (PEM).
        key: its private key (PEM); None when ``cert`` holds it too.
        client_ca: CA certificates to verify clients against; given, a client
            certificate is required (mutual TLS).

    Raises:
        TLSFileError: a file is missing or not a valid certificate or key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, client_ca, "client_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Return a client context that verifies the server (against ``ca`` or the system store).

    Args:
        ca: CA certificates to trust instead of the system's (PEM).
        cert: a client certificate chain, for servers that require one.
        key: its private key; None when ``cert`` holds it too.

    Raises:
        TLSFileError: a file is missing or not a valid certificate or key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(ctx, ca, "ca")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx
