"""``msgsock stress`` over TLS and with the shared-key handshake (SPEC §4.2, §6.3, §7).

Every test runs the real ``msgsock stress`` against a real ``msgsock serve`` (or a bare
listener that never answers) in subprocesses, with the session's test certificates.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msgsock.app.stress import ERROR_KINDS
from tests.certs import Pki
from tests.cli_helpers import run_cli, serve
from tests.helpers import free_loopback6, unit

HOSTS = [
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not free_loopback6(), reason="no IPv6 loopback")),
]


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[str, str]:
    """Two shared-key files with different keys."""
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_bytes(b"correct horse battery staple\n")
    wrong.write_bytes(b"incorrect donkey battery staple\n")
    return str(right), str(wrong)


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port whose listener completes TCP connects (backlog) but never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield listener.getsockname()[1]


def stress(port: int, *args: str, host: str = "127.0.0.1") -> tuple[int, dict[str, Any], str]:
    """Run ``msgsock stress HOST --port PORT ARGS --json -q``; return status, report, stderr."""
    done = run_cli("stress", host, "--port", str(port), *args, "--json", "-q", timeout=unit(40))
    assert done.stdout.strip(), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def only_errors(report: dict[str, Any], **expected: int) -> None:
    """Assert the error counts are exactly ``expected`` and zero for every other kind."""
    assert report["errors"] == dict.fromkeys(ERROR_KINDS, 0) | expected, report["error_examples"]


def tls_server_args(pki: Pki) -> list[str]:
    """The ``msgsock serve`` options of a TLS server with the test CA's server certificate."""
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]


@pytest.mark.parametrize("host", HOSTS)
def test_tls_exact_counts(pki: Pki, host: str) -> None:
    """Over TLS, stream mode and the general path (sizes up to 64 KiB, several TLS records
    per message) send and verify exactly --messages messages, exit 0."""
    with serve("--host", host, *tls_server_args(pki)) as server:
        code, report, err = stress(
            server.port, "--tls-ca", str(pki.ca_cert), "-n", "2000", "-c", "4", "-d", "4", host=host
        )
        assert code == 0, err
        assert report["messages"]["sent"] == report["messages"]["verified"] == 2000
        assert report["connections"]["established"] == 4
        assert report["security"] == {"tls": True, "client_cert": False, "auth": False}
        only_errors(report)
        code, report, err = stress(
            server.port, "--tls-ca", str(pki.ca_cert), "-n", "300", "-c", "2", "-d", "8", "-s", "1-64KiB",
            host=host,
        )  # fmt: skip
        assert code == 0, err
        assert report["messages"]["verified"] == 300
        only_errors(report)
        assert server.stop() == 0
        assert "Traceback" not in server.log


def test_tls_failures_are_counted_with_the_reason(pki: Pki) -> None:
    """An untrusted server certificate, or one for another --tls-server-name, fails every
    connection as `tls` with the reason, exit 1; a client without --tls fails too, no traceback."""
    with serve(*tls_server_args(pki)) as server:
        code, report, err = stress(server.port, "--tls-ca", str(pki.other_ca_cert), "-n", "100", "-c", "3")
        assert code == 1
        only_errors(report, tls=3)
        assert report["connections"]["established"] == 0
        # The core's words for the failure (stages.py), the same as a server logs.
        assert (
            "FAILED: 3 connections failed TLS (TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]" in err
        )
        assert "certificate verify failed" in err and "_ssl.c" not in err
        named = ["--tls-ca", str(pki.ca_cert), "-n", "10", "--tls-server-name"]
        code, report, err = stress(server.port, *named, "nothere.invalid")
        assert code == 1
        only_errors(report, tls=1)
        assert "nothere.invalid" in err
        code, report, err = stress(server.port, *named, "localhost")
        assert code == 0, err
        done = run_cli("stress", "--port", str(server.port), "-n", "100", "-c", "2", "-q", timeout=unit(40))
        assert done.returncode == 1
        assert "FAILED" in done.stdout and "Traceback" not in done.stderr + done.stdout


def test_tls_against_a_plaintext_server(pki: Pki) -> None:
    """--tls against a server that does not speak TLS fails each connection as `tls`, saying so."""
    with serve() as server:
        code, report, err = stress(server.port, "--tls-ca", str(pki.ca_cert), "-n", "10", "-c", "2")
        assert code == 1
        only_errors(report, tls=2)
        assert "does the server serve TLS?" in err


def test_tls_handshake_timeout(pki: Pki, silent_listener: int) -> None:
    """A server that never answers the TLS handshake fails each connection as `timeout` after --timeout."""
    code, report, _ = stress(
        silent_listener, "--tls-ca", str(pki.ca_cert), "-n", "10", "-c", "2", "--timeout", str(unit(0.5))
    )
    assert code == 1
    only_errors(report, timeout=2)
    assert any(
        e.endswith("handshake timeout: the TLS handshake did not complete within " + f"{unit(0.5):g} s")
        for e in report["error_examples"]
    ), report["error_examples"]


def test_mutual_tls(pki: Pki) -> None:
    """--tls-cert presents a client certificate to a server that requires one; without it the run fails."""
    with serve(*tls_server_args(pki), "--tls-client-ca", str(pki.ca_cert)) as server:
        base = ["--tls-ca", str(pki.ca_cert), "-n", "500", "-c", "2", "-d", "4"]
        client = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        code, report, err = stress(server.port, *base, *client)
        assert code == 0, err
        assert report["messages"]["verified"] == 500
        assert report["security"] == {"tls": True, "client_cert": True, "auth": False}
        only_errors(report)
        # TLS 1.3: the refusal comes after the client's handshake: an alert, or a close or
        # reset (with a hint about the certificate).
        code, report, err = stress(server.port, *base)
        assert code == 1
        errors = report["errors"]
        assert errors["tls"] + errors["reset"] + errors["closed"] == 2, report["error_examples"]
        assert all("certificate" in e for e in report["error_examples"]), report["error_examples"]
        assert report["messages"]["verified"] == 0
        assert server.stop() == 0


def test_auth_key(key_files: tuple[str, str]) -> None:
    """--auth-key-file: the right key runs clean; a wrong key and no key fail as `auth`, exit 1."""
    right, wrong = key_files
    with serve("--auth-key-file", right) as server:
        code, report, err = stress(server.port, "--auth-key-file", right, "-n", "1000", "-c", "2", "-d", "4")
        assert code == 0, err
        assert report["messages"]["verified"] == 1000
        assert report["security"] == {"tls": False, "client_cert": False, "auth": True}
        only_errors(report)
        code, report, err = stress(server.port, "--auth-key-file", wrong, "-n", "100", "-c", "2")
        assert code == 1
        only_errors(report, auth=2)
        assert "authentication failed: the server rejected our key" in err
        assert report["connections"]["established"] == 0
        code, report, err = stress(server.port, "-n", "100", "-c", "2")
        assert code == 1
        assert report["errors"]["auth"] == 2, report["error_examples"]
        assert "use --auth-key-file" in err
        assert server.stop() == 0
        assert "Traceback" not in server.log


def test_auth_against_a_server_without_a_key(key_files: tuple[str, str]) -> None:
    """--auth-key-file against a server that has no key fails each connection as `auth`."""
    with serve() as server:
        code, report, err = stress(server.port, "--auth-key-file", key_files[0], "-n", "10", "-c", "2")
        assert code == 1
        only_errors(report, auth=2)
        assert "authentication" in err


def test_tls_and_auth_with_workers(pki: Pki, key_files: tuple[str, str]) -> None:
    """TLS plus the shared key with --workers 2: each worker handshakes its own connections; exact counts."""
    right, _ = key_files
    with serve(*tls_server_args(pki), "--auth-key-file", right) as server:
        code, report, err = stress(
            server.port, "--tls-ca", str(pki.ca_cert), "--auth-key-file", right,
            "-n", "2000", "-c", "4", "-d", "4", "--workers", "2",
        )  # fmt: skip
        assert code == 0, err
        assert report["messages"]["sent"] == report["messages"]["verified"] == 2000
        assert report["connections"]["established"] == 4
        assert report["security"] == {"tls": True, "client_cert": False, "auth": True}
        only_errors(report)
        assert server.stop() == 0
        assert "Traceback" not in server.log


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--udp", "--tls"], "--udp cannot be combined"),
        (["--udp", "--auth-key-file", "x.key"], "--udp cannot be combined"),
        (["--tls-ca", "{missing}"], "nope.pem"),
        (["--tls-key", "{missing}"], "--tls-key needs --tls-cert"),
        (["--auth-key-file", "{short}"], "short.key"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    """Bad TLS or key options are usage errors (exit 2) with one line naming the problem."""
    short = tmp_path / "short.key"
    short.write_bytes(b"short")
    names = {"missing": str(tmp_path / "nope.pem"), "short": str(short)}
    done = run_cli("stress", "--port", "9", "-n", "1", *(a.format(**names) for a in args))
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
