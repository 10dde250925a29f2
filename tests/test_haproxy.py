"""Scale-out behind a real load balancer (SPEC §7): HAProxy sends PROXY v2 to two instances."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from msgsock import sync
from tests.cli_helpers import serve
from tests.helpers import unit, wait_for

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)

pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs it with apt-get where it can)"
)

CONFIG = """\
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend msgsock
    bind 127.0.0.1:{port}
    default_backend instances
backend instances
    balance roundrobin
    server one 127.0.0.1:{one} send-proxy-v2
    server two 127.0.0.1:{two} send-proxy-v2
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_two_instances_behind_haproxy_see_the_real_clients(tmp_path: Path) -> None:
    """Clients through HAProxy reach both instances, which log each client's own address and port."""
    assert HAPROXY is not None
    with serve("--proxy-protocol") as one, serve("--proxy-protocol") as two:
        port = _free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(CONFIG.format(port=port, one=one.port, two=two.port))
        proxy = subprocess.Popen(
            [HAPROXY, "-f", str(config), "-db"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for(lambda: proxy.poll() is not None or _listening(port), unit(10))
            assert proxy.poll() is None, proxy.communicate()[0]
            client_ports = []
            for i in range(8):
                with sync.connect("127.0.0.1", port) as conn:
                    client_ports.append(conn.local_address[1])
                    body = f"through haproxy {i}".encode()
                    conn.send(body)
                    assert conn.receive(timeout=unit(10)) == body
            wait_for(lambda: one.log.count("disconnected") + two.log.count("disconnected") >= 8, unit(10))
        finally:
            proxy.terminate()
            try:
                proxy.wait(timeout=unit(10))
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        logs = one.log + two.log
        for client_port in client_ports:
            assert f"connection from 127.0.0.1:{client_port}" in logs
        assert "connection from 127.0.0.1:" in one.log and "connection from 127.0.0.1:" in two.log
        assert one.stop() == 0 and two.stop() == 0
        assert "Traceback" not in logs
