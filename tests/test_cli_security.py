"""TLS, authentication and the PROXY protocol through the real ``msgsock`` commands (SPEC §4.2, §7)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Literal

import pytest

from msgsock.proxy import ProxyInfo, serialize_v1, serialize_v2
from tests.certs import Pki
from tests.cli_helpers import run_cli, serve
from tests.helpers import unit, wait_for

ENGINES = ["asyncio", "threads", "processes"]


def _engine_args(engine: str) -> list[str]:
    return ["--engine", engine, *(["--workers", "2"] if engine == "processes" else [])]


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[str, str]:
    """Two shared-key files with different keys."""
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_bytes(b"correct horse battery staple\n")
    wrong.write_bytes(b"incorrect donkey battery staple\n")
    return str(right), str(wrong)


@pytest.mark.parametrize("engine", ENGINES)
def test_tls_round_trip_and_plaintext_client_refused(engine: str, pki: Pki) -> None:
    """serve --tls-cert: a verifying client exchanges messages; a plaintext client is logged, others unaffected."""
    with serve(
        *_engine_args(engine), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)
    ) as server:
        assert server.ready.endswith(", tls)")
        with socket.create_connection(("127.0.0.1", server.port), timeout=unit(10)) as plain:
            plain.sendall(struct.pack(">I", 5) + b"hello")
            try:
                plain.recv(100)
            except ConnectionResetError:
                pass
        done = run_cli("client", "--port", str(server.port), "--tls-ca", str(pki.ca_cert), "--send", "secret")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "secret"
        wait_for(lambda: "closed:" in server.log, unit(10))
        assert server.stop() == 0
        assert "Traceback" not in server.log


def test_tls_failures_are_one_clear_line(pki: Pki) -> None:
    """Wrong CA and an expired server certificate fail the client with one line, exit 1."""
    with serve("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)) as server:
        done = run_cli(
            "client", "--port", str(server.port), "--tls-ca", str(pki.other_ca_cert), "--send", "x"
        )
        assert done.returncode == 1
        assert "TLS" in done.stderr and "Traceback" not in done.stderr
    with serve("--tls-cert", str(pki.expired_cert), "--tls-key", str(pki.expired_key)) as server:
        done = run_cli("client", "--port", str(server.port), "--tls-ca", str(pki.ca_cert), "--send", "x")
        assert done.returncode == 1
        assert "expired" in done.stderr.lower() and "Traceback" not in done.stderr


@pytest.mark.parametrize("engine", ["asyncio", "threads"])
def test_mutual_tls(engine: str, pki: Pki) -> None:
    """--tls-client-ca: a client certificate is required; with one the exchange works."""
    with serve(
        *_engine_args(engine),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca_cert),
    ) as server:
        assert server.ready.endswith(", mutual tls)")
        base = ["client", "--port", str(server.port), "--tls-ca", str(pki.ca_cert), "--send", "x"]
        done = run_cli(*base, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
        assert done.returncode == 0, done.stderr
        done = run_cli(*base)
        assert done.returncode == 1 and "Traceback" not in done.stderr


def test_bad_tls_files_are_usage_errors(tmp_path: Path) -> None:
    """A missing certificate or key file is a usage error naming it (exit 2)."""
    missing = str(tmp_path / "nope.pem")
    done = run_cli("serve", "--port", "0", "--tls-cert", missing)
    assert done.returncode == 2 and "nope.pem" in done.stderr
    done = run_cli("client", "--tls-ca", missing, "--send", "x")
    assert done.returncode == 2 and "nope.pem" in done.stderr
    short = tmp_path / "short.key"
    short.write_bytes(b"short")
    done = run_cli("serve", "--port", "0", "--auth-key-file", str(short))
    assert done.returncode == 2 and "short.key" in done.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_auth_key(engine: str, key_files: tuple[str, str]) -> None:
    """--auth-key-file: the right key works; a wrong key and no key fail clearly on both sides."""
    right, wrong = key_files
    with serve(*_engine_args(engine), "--auth-key-file", right) as server:
        assert server.ready.endswith(", auth)")
        base = ["client", "--port", str(server.port), "--send", "x"]
        done = run_cli(*base, "--auth-key-file", right)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "x"
        done = run_cli(*base, "--auth-key-file", wrong)
        assert done.returncode == 1
        assert "authentication failed" in done.stderr and "Traceback" not in done.stderr
        done = run_cli(*base)  # no key: the server's handshake is not a frame we can read
        assert done.returncode == 1 and "Traceback" not in done.stderr
        wait_for(lambda: server.log.count("authentication failed") >= 1, unit(10))
        assert server.stop() == 0
        assert "Traceback" not in server.log


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("version", [1, 2])
def test_proxy_protocol_logs_the_proxied_client(engine: str, version: Literal[1, 2]) -> None:
    """--proxy-protocol: the logged peer is the address in the header; a missing header is closed and logged."""
    info = ProxyInfo(version, "PROXY", "TCP4", ("203.0.113.7", 40000), ("127.0.0.1", 9898))
    header = serialize_v1(info) if version == 1 else serialize_v2(info)
    with serve(*_engine_args(engine), "--proxy-protocol") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=unit(10)) as s:
            s.sendall(header + struct.pack(">I", 2) + b"hi")
            assert s.recv(6) == struct.pack(">I", 2) + b"hi"
        with socket.create_connection(("127.0.0.1", server.port), timeout=unit(10)) as s:
            s.sendall(struct.pack(">I", 2) + b"hi")  # no header
            try:
                assert s.recv(6) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: "203.0.113.7:40000 disconnected" in server.log, unit(10))
        wait_for(lambda: "closed:" in server.log, unit(10))
        assert "connection from 203.0.113.7:40000" in server.log
        assert server.stop() == 0
        assert "Traceback" not in server.log


def test_tls_file_errors_name_the_option(tmp_path: Path) -> None:
    """The library names the argument; the command line words it with the option given."""
    missing = str(tmp_path / "gone.pem")
    done = run_cli("serve", "--port", "0", "--tls-cert", missing)
    assert done.returncode == 2
    assert f"--tls-cert: {missing}: no such file" in done.stderr
    done = run_cli("client", "--tls-ca", missing, "--send", "x")
    assert done.returncode == 2
    assert f"--tls-ca: {missing}: no such file" in done.stderr
