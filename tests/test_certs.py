"""Tests of the test PKI helper (tests/certs.py): its files load into ``ssl`` and handshake as intended."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from .certs import CLIENT_NAME, Pki, make_pki
from .helpers import free_loopback6, unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the module: making it takes a few milliseconds, but once is enough."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Outcome:
    """What each side of one TLS connection saw."""

    client_error: BaseException | None = None
    server_error: BaseException | None = None
    reply: bytes = b""
    client_cert_seen: dict[str, Any] | None = None
    server_cert_seen: dict[str, Any] | None = None


def _strict(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # Python 3.13 turns strict X.509 checks on by default; hold the certificates to it now.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


@contextmanager
def _connected(kind: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Yield (server side, client side) of a connected pair: a socketpair or loopback TCP."""
    if kind == "socketpair":
        server, client = socket.socketpair()
    else:
        family = socket.AF_INET6 if ":" in kind else socket.AF_INET
        with socket.create_server((kind, 0), family=family) as listener:
            listener.settimeout(unit(5))
            client = socket.create_connection(listener.getsockname()[:2], timeout=unit(5))
            try:
                server, _ = listener.accept()
            except BaseException:
                client.close()
                raise
    try:
        server.settimeout(unit(5))
        client.settimeout(unit(5))
        yield server, client
    finally:
        server.close()
        client.close()


def run_tls(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str = "localhost",
    kind: str = "socketpair",
) -> Outcome:
    """Handshake over a fresh connection (server on a thread), send b"ping", expect it echoed."""
    outcome = Outcome()

    def serve(sock: socket.socket) -> None:
        try:
            with server_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False) as tls:
                tls.do_handshake()
                outcome.client_cert_seen = tls.getpeercert() or None
                data = tls.recv(4)
                tls.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            outcome.server_error = exc

    with _connected(kind) as (server_sock, client_sock):
        thread = threading.Thread(target=serve, args=(server_sock,), daemon=True)
        thread.start()
        try:
            with client_ctx.wrap_socket(
                client_sock, server_hostname=server_hostname, do_handshake_on_connect=False
            ) as tls:
                tls.do_handshake()
                outcome.server_cert_seen = tls.getpeercert() or None
                tls.sendall(b"ping")
                while len(outcome.reply) < 4:
                    data = tls.recv(4 - len(outcome.reply))
                    if not data:
                        raise ConnectionError("server closed the connection")
                    outcome.reply += data
        except (ssl.SSLError, OSError) as exc:
            outcome.client_error = exc
        finally:
            # The client socket is closed by now, so a server blocked in recv wakes up.
            client_sock.close()
            thread.join(unit(5))
        assert not thread.is_alive(), "the TLS server thread did not finish"
    return outcome


def _subject_cn(cert: dict[str, Any] | None) -> str:
    assert cert is not None
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise AssertionError(f"no commonName in {cert}")


# -- the files ----------------------------------------------------------------------------------


def test_files_are_pem_certificates_with_the_documented_names(pki: Pki) -> None:
    """make_pki writes PEM certificates: server names in the SAN, CA flags, and an expired certificate."""
    load = x509.load_pem_x509_certificate
    server = load(pki.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    ca = load(pki.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    other = load(pki.other_ca_cert.read_bytes())
    assert other.subject != ca.subject
    assert load(pki.other_client_cert.read_bytes()).issuer == other.subject
    expired = load(pki.expired_cert.read_bytes())
    assert expired.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    for path in vars(pki).values():
        if isinstance(path, Path) and path.suffix in (".crt", ".key"):
            assert path.read_bytes().startswith(b"-----BEGIN ")


# -- handshakes ---------------------------------------------------------------------------------


def test_mutual_tls_over_socketpair(pki: Pki) -> None:
    """Server and client certificates from the test CA complete a mutual TLS handshake and carry data."""
    server_ctx = _strict(pki.server_context(client_ca=pki.ca_cert, require_client_cert=True))
    client_ctx = _strict(pki.client_context(cert="client"))
    outcome = run_tls(server_ctx, client_ctx)
    assert outcome.client_error is None and outcome.server_error is None
    assert outcome.reply == b"ping"
    assert _subject_cn(outcome.client_cert_seen) == CLIENT_NAME
    assert _subject_cn(outcome.server_cert_seen) == "localhost"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1",
            marks=pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available"),
        ),
    ],
)
def test_server_certificate_is_valid_for_loopback_ips(pki: Pki, host: str) -> None:
    """Over loopback TCP, the server certificate verifies for the IP address the client dialled."""
    outcome = run_tls(
        _strict(pki.server_context()), _strict(pki.client_context()), server_hostname=host, kind=host
    )
    assert outcome.client_error is None and outcome.server_error is None
    assert outcome.reply == b"ping"


def _verify_message(exc: BaseException | None) -> str:
    assert isinstance(exc, ssl.SSLCertVerificationError), repr(exc)
    return str(exc.verify_message)


def test_expired_certificate_is_refused(pki: Pki) -> None:
    """A client refuses the expired server certificate, saying it has expired."""
    outcome = run_tls(pki.server_context(cert="expired"), pki.client_context())
    assert "expired" in _verify_message(outcome.client_error)
    assert outcome.server_error is not None


def test_certificate_from_an_unrelated_ca_is_refused(pki: Pki) -> None:
    """A client trusting only the unrelated CA refuses the server; so does one meeting the other CA's server."""
    outcome = run_tls(pki.server_context(), pki.client_context(ca=pki.other_ca_cert))
    assert "issuer" in _verify_message(outcome.client_error)
    outcome = run_tls(pki.server_context(cert="other_server"), pki.client_context())
    assert "issuer" in _verify_message(outcome.client_error)


def test_wrong_host_name_is_refused(pki: Pki) -> None:
    """The server certificate does not verify for a name it does not carry."""
    outcome = run_tls(pki.server_context(), pki.client_context(), server_hostname="example.com")
    assert "mismatch" in _verify_message(outcome.client_error).lower()


@pytest.mark.parametrize("cert", ["other_client", None], ids=["unrelated-ca", "no-certificate"])
def test_server_requiring_client_certificates_refuses(pki: Pki, cert: str | None) -> None:
    """A server requiring client certificates from the test CA refuses other ones, and clients without one."""
    server_ctx = pki.server_context(client_ca=pki.ca_cert, require_client_cert=True)
    outcome = run_tls(server_ctx, pki.client_context(cert=cert))
    assert isinstance(outcome.server_error, ssl.SSLError), repr(outcome.server_error)
    # With TLS 1.3 the client learns of it from the alert on its next read (or a closed connection).
    assert outcome.client_error is not None
    assert outcome.reply == b""
