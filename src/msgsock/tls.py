"""TLS contexts for servers and clients, with modern defaults (SPEC §7).

Both sides require TLS 1.2 or newer and use the ``ssl`` module's default cipher
choices.  A server given a client CA requires and verifies client certificates
(mutual TLS).  A client verifies the server's certificate and host name against the
system's trust store, or against ``ca`` when given.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["client_context", "server_context"]


def _exists(path: str, what: str) -> None:
    # The ssl module's FileNotFoundError does not name the file; say which one it is.
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path}: no such file")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None, what: str) -> None:
    _exists(cert, what)
    if key is not None:
        _exists(key, "--tls-key")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{what}: cannot load certificate {cert!r} / key {key!r}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, what: str) -> None:
    _exists(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{what}: cannot load CA certificates from {ca!r}: {exc}") from None


def server_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """Return a server context for ``cert`` (PEM, with ``key`` unless the key is in it).

    Args:
        cert: the server certificate chain (PEM).
        key: its private key (PEM); None when ``cert`` holds it too.
        client_ca: CA certificates to verify clients against; given, a client
            certificate is required (mutual TLS).

    Raises:
        ValueError: a file is missing or not a valid certificate or key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, "--tls-cert")
    if client_ca is not None:
        _load_ca(ctx, client_ca, "--tls-client-ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Return a client context that verifies the server (against ``ca`` or the system store).

    Args:
        ca: CA certificates to trust instead of the system's (PEM).
        cert: a client certificate chain, for servers that require one.
        key: its private key; None when ``cert`` holds it too.

    Raises:
        ValueError: a file is missing or not a valid certificate or key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(ctx, ca, "--tls-ca")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_chain(ctx, cert, key, "--tls-cert")
    return ctx
