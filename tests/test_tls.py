"""msgsock.tls: contexts with modern defaults; file errors name the argument, not a flag."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from msgsock.tls import TLSFileError, client_context, server_context
from tests.certs import Pki


def test_server_and_client_contexts(pki: Pki) -> None:
    """Both sides require TLS 1.2+; a client CA makes the server require client certificates."""
    server = server_context(str(pki.server_cert), str(pki.server_key))
    assert server.minimum_version is ssl.TLSVersion.TLSv1_2
    assert server.verify_mode is ssl.CERT_NONE
    mutual = server_context(str(pki.server_cert), str(pki.server_key), client_ca=str(pki.ca_cert))
    assert mutual.verify_mode is ssl.CERT_REQUIRED
    client = client_context(str(pki.ca_cert), str(pki.client_cert), str(pki.client_key))
    assert client.verify_mode is ssl.CERT_REQUIRED and client.check_hostname


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda p, missing: server_context(missing), "cert"),
        (lambda p, missing: server_context(str(p.server_cert), missing), "key"),
        (lambda p, missing: server_context(str(p.server_cert), str(p.server_key), missing), "client_ca"),
        (lambda p, missing: client_context(missing), "ca"),
        (lambda p, missing: client_context(None, missing), "cert"),
    ],
)
def test_missing_file_names_its_argument(pki: Pki, tmp_path: Path, call: object, argument: str) -> None:
    """A missing file is a TLSFileError (a ValueError) with the argument and path; no option name."""
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSFileError) as info:
        call(pki, missing)  # type: ignore[operator]
    assert isinstance(info.value, ValueError)
    assert (info.value.argument, info.value.path, info.value.problem) == (argument, missing, "no such file")
    assert "--" not in str(info.value) and "nope.pem" in str(info.value)


def test_invalid_files(pki: Pki, tmp_path: Path) -> None:
    """A file that is not PEM: the ssl module's reason, under the argument it was given as."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSFileError) as info:
        server_context(str(junk))
    assert info.value.argument == "cert" and "cannot load the certificate" in info.value.problem
    with pytest.raises(TLSFileError) as info:
        client_context(str(junk))
    assert info.value.argument == "ca" and "cannot load CA certificates" in info.value.problem
    with pytest.raises(TLSFileError) as info:  # a key that does not match the certificate
        server_context(str(pki.server_cert), str(pki.client_key))
    assert info.value.argument == "cert" and "with key" in info.value.problem
