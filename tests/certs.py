"""A throwaway PKI for TLS tests, made with ``cryptography`` (SPEC §3: test-only dependency).

:func:`make_pki` writes PEM files into a directory and returns their paths:

- ``ca``: the test CA, which signs ``server``, ``client`` and ``expired``;
- ``server``: a server certificate for ``localhost``, ``127.0.0.1`` and ``::1``;
- ``client``: a client certificate (CN ``msgsock-test-client``) for mutual TLS;
- ``expired``: a server certificate like ``server`` whose validity ended yesterday;
- ``other_ca``: an unrelated CA, with its own ``other_server`` and ``other_client``
  certificates, for "signed by someone we do not trust" tests.

Keys are ECDSA P-256 (fast to make) in unencrypted PKCS#8.  Certificates carry the
extensions strict verifiers ask for (basic constraints, key usage, extended key usage,
subject and authority key identifiers), so they also pass ``ssl.VERIFY_X509_STRICT``,
the default from Python 3.13.

Use :meth:`Pki.server_context` and :meth:`Pki.client_context` for ready-made contexts.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CLIENT_NAME", "SERVER_NAMES", "Pki", "make_pki"]

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
"""What the server certificates are valid for."""

CLIENT_NAME = "msgsock-test-client"
"""Common name of the client certificates."""


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files :func:`make_pki` wrote (certificates and their keys)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_cert: Path
    expired_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    other_server_cert: Path
    other_server_key: Path
    other_client_cert: Path
    other_client_key: Path

    def server_context(
        self, *, cert: str = "server", client_ca: Path | None = None, require_client_cert: bool = False
    ) -> ssl.SSLContext:
        """Return a server context with the named certificate (``server``, ``expired``, ``other_server``).

        Args:
            cert: which certificate and key to serve.
            client_ca: CA file to verify client certificates against (mutual TLS).
            require_client_cert: refuse clients without a certificate (needs ``client_ca``).
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(getattr(self, f"{cert}_cert"), getattr(self, f"{cert}_key"))
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self, *, ca: Path | None = None, cert: str | None = None) -> ssl.SSLContext:
        """Return a client context trusting ``ca`` (default: the test CA).

        Args:
            ca: CA file to trust.
            cert: a client certificate to present (``client`` or ``other_client``).
        """
        ctx = ssl.create_default_context(cafile=str(ca or self.ca_cert))
        if cert is not None:
            ctx.load_cert_chain(getattr(self, f"{cert}_cert"), getattr(self, f"{cert}_key"))
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "msgsock tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(common_name: str, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    server: bool,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    issuer_cert, issuer_key = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(directory: Path | str) -> Pki:
    """Create the test CAs, certificates and keys as PEM files in ``directory``.

    Args:
        directory: an existing directory (e.g. from ``tmp_path_factory.mktemp``).

    Returns:
        The paths, as a :class:`Pki`.
    """
    base = Path(directory)
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_before": now - datetime.timedelta(days=1), "not_after": now + datetime.timedelta(days=30)}
    expired = {"not_before": now - datetime.timedelta(days=30), "not_after": now - datetime.timedelta(days=1)}

    ca = _make_ca("msgsock test CA", now)
    other_ca = _make_ca("msgsock unrelated CA", now)
    pairs = {
        "ca": ca,
        "server": _make_leaf(ca, "localhost", server=True, **valid),
        "client": _make_leaf(ca, CLIENT_NAME, server=False, **valid),
        "expired": _make_leaf(ca, "localhost", server=True, **expired),
        "other_ca": other_ca,
        "other_server": _make_leaf(other_ca, "localhost", server=True, **valid),
        "other_client": _make_leaf(other_ca, CLIENT_NAME, server=False, **valid),
    }
    paths: dict[str, Path] = {}
    for name, (cert, key) in pairs.items():
        paths[f"{name}_cert"] = base / f"{name}.crt"
        paths[f"{name}_key"] = base / f"{name}.key"
        _write_cert(paths[f"{name}_cert"], cert)
        _write_key(paths[f"{name}_key"], key)
    return Pki(directory=base, **paths)
