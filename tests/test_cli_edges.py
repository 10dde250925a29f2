"""Edges of the command line (issue 11): raw message bytes, one-line usage errors, checks of
``--header`` and ``--max-size`` against the frame before connecting or listening, and the
rate-limited log of a ``serve --udp`` flooded with oversize datagrams."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading

import pytest

from tests.cli_helpers import ENV, MSGSOCK, run_cli, serve
from tests.helpers import unit

pytestmark = pytest.mark.timeout(120)


def _help(cmd: str) -> str:
    return f" (see '{cmd} --help')"


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class _Recorder:
    """A one-connection TCP echo peer (u32be frames) that records each message body it got."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(unit(20))
        self.port: int = self.listener.getsockname()[1]
        self.bodies: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(unit(20))
            stream = conn.makefile("rb")
            while head := stream.read(4):
                body = stream.read(struct.unpack(">I", head)[0])
                self.bodies.append(body)
                conn.sendall(head + body)

    def close(self) -> None:
        self.thread.join(unit(20))
        self.listener.close()


def _client_bytes(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*MSGSOCK, "client", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env=env or ENV,
        timeout=unit(30),
    )


# -- 1. message bytes exactly as given -------------------------------------------------------


def test_non_utf8_send_argument_is_sent_raw() -> None:
    """`--send "$(printf 'a\\xffb')"` sends the bytes a, 0xff, b (no traceback) and prints the echo escaped."""
    peer = _Recorder()
    try:
        # Popen encodes str arguments with os.fsencode: "\udcff" becomes the byte 0xff,
        # exactly what a shell passes for $(printf 'a\xffb').
        done = _client_bytes("--port", str(peer.port), "--send", "a\udcffb", "--send", "ok")
    finally:
        peer.close()
    assert done.returncode == 0, done.stderr
    assert peer.bodies == [b"a\xffb", b"ok"]
    assert done.stdout == b"a\\xffb\nok\n"
    assert b"Traceback" not in done.stderr


def test_non_utf8_stdin_lines_are_sent_raw() -> None:
    """Lines on stdin are read as bytes: a Latin-1 line goes out as it is, line ends removed."""
    peer = _Recorder()
    try:
        done = _client_bytes("--port", str(peer.port), "--no-tui", input=b"caf\xe9\r\nplain\n\xff\xfe\n")
    finally:
        peer.close()
    assert done.returncode == 0, done.stderr
    assert peer.bodies == [b"caf\xe9", b"plain", b"\xff\xfe"]
    assert done.stdout.splitlines() == [b"caf\\xe9", b"plain", b"\\xff\\xfe"]


def test_rounds_message_bytes_and_replies_on_an_ascii_terminal() -> None:
    """`--rounds --message` takes raw bytes too; a UTF-8 reply printed to an ASCII-only stdout is escaped."""
    with serve() as server:
        port = str(server.port)
        done = _client_bytes("--port", port, "--rounds", "3", "--message", "x\udcfe")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"3 rounds, all verified")
        ascii_env = {**ENV, "PYTHONIOENCODING": "ascii"}
        done = _client_bytes("--port", port, "--send", "caf\u00e9 \u2713", env=ascii_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"caf\\xe9 \\u2713\n"
        assert b"Traceback" not in done.stderr


def test_udp_client_sends_non_utf8_raw() -> None:
    """`client --udp` sends argv and stdin bytes as they are, too."""
    with serve("--udp") as server:
        done = _client_bytes("--udp", "--port", str(server.port), "--send", "a\udcffb")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"a\\xffb\n"
        done = _client_bytes("--udp", "--port", str(server.port), input=b"\xe9t\xe9\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"\\xe9t\\xe9\n"


# -- 3. usage errors: one line, exit 2 ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "70000"], "--port 70000: must be 0..65535"),
        (["serve", "--port", "x"], "--port x: not a whole number"),
        (["client", "--port", "0", "--send", "x"], "--port 0: must be 1..65535"),
        (["serve", "--max-size", "-5"], "--max-size -5: must be 0 or more"),
        (["serve", "--max-size", "lots"], "--max-size lots: not a byte count (e.g. 65536, 64KiB, 16MiB)"),
        (["serve", "--max-connections", "-1"], "--max-connections -1: must be 0 or more"),
        (["serve", "--idle-timeout", "nan"], "--idle-timeout nan: not a finite number"),
        (["stress", "-c", "0"], "--connections 0: must be at least 1"),
        (["stress", "--seed", "x"], "--seed x: not a whole number"),
        (["stress", "-t", "1", "-n", "5"], "--messages: not allowed with --duration"),
        (["client", "--rounds", "0"], "--rounds 0: must be at least 1"),
        (["client", "--header", "kind", "--send", "x"], "--header kind: not NAME=VALUE"),
        (
            ["serve", "--engine", "fast"],
            "--engine: invalid choice: 'fast' (choose from 'auto', 'asyncio', 'threads', 'processes', 'native')",
        ),
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["serve", "--port"], "--port: expected one argument"),
        (["client", "--send"], "--send: expected one argument"),
    ],
)
def test_usage_error_is_one_line(args: list[str], message: str) -> None:
    """A bad option value, an unknown option or a missing value: exactly one line naming option and value, exit 2."""
    done = run_cli(*args)
    cmd = f"msgsock {args[0]}"
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"{cmd}: error: {message}{_help(cmd)}\n"
    assert done.stdout == ""


def test_bad_frame_is_one_line_naming_the_part() -> None:
    """`--frame u24be` is one line that names the option and the bad part."""
    done = run_cli("serve", "--frame", "u24be")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("msgsock serve: error: --frame u24be: bad part 'u24be' in frame format")
    assert done.stderr.endswith(_help("msgsock serve") + "\n")


def test_top_level_and_module_usage_errors_are_one_line() -> None:
    """`msgsock` with no or an unknown command, and `python -m msgsock.app.stress`, word errors the same way."""
    done = run_cli()
    assert (
        done.stderr
        == "msgsock: error: the following arguments are required: COMMAND (see 'msgsock --help')\n"
    )
    done = run_cli("launch")
    assert done.returncode == 2
    assert done.stderr.startswith("msgsock: error: COMMAND: invalid choice: 'launch'")
    done = subprocess.run(
        [MSGSOCK[0], "-m", "msgsock.app.stress", "-c", "0"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=unit(30),
    )
    assert done.returncode == 2
    prog = "python -m msgsock.app.stress"
    assert done.stderr == f"{prog}: error: --connections 0: must be at least 1{_help(prog)}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--workers", "2", "--engine", "threads"],
            "--workers needs --engine auto, processes or native, not --engine threads",
        ),
        (["client", "--retries", "1", "--send", "x"], "--retries needs --udp"),
        (["client", "--rounds", "2", "--send", "x"], "--rounds and --send cannot be combined"),
        (["client", "--auth-key-file", "/nonexistent/k", "--send", "x"], "--auth-key-file: /nonexistent/k:"),
        (
            ["stress", "--workers", "3", "--connections", "2"],
            "--workers 3 needs at least as many --connections",
        ),
    ],
)
def test_errors_found_after_parsing_have_the_same_format(args: list[str], message: str) -> None:
    """Usage errors a command finds after parsing (combinations, unreadable files) are the same one line."""
    done = run_cli(*args)
    cmd = f"msgsock {args[0]}"
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"{cmd}: error: {message}")
    assert done.stderr.endswith(_help(cmd) + "\n")


# -- 4. --header checked against the frame before connecting ---------------------------------


@pytest.mark.parametrize(
    ("frame", "header", "message"),
    [
        ("u32be+kind:B", "kind=300", "--header kind=300: field kind:B holds 0..255"),
        ("u32be+kind:B", "kind=-1", "--header kind=-1: field kind:B holds 0..255"),
        ("u32be+kind:b", "kind=128", "--header kind=128: field kind:b holds -128..127"),
        ("magic:H+u16be", "magic=0x10000", "--header magic=65536: field magic:H holds 0..65535"),
        ("u32be+kind:B", "flags=1", "--header flags: frame u32be+kind:B has fields kind"),
        ("u32be", "kind=1", "--header kind: frame u32be has no header fields"),
    ],
)
def test_header_is_checked_before_connecting(frame: str, header: str, message: str) -> None:
    """A --header the frame cannot carry is a usage error, and the client never connects."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = str(listener.getsockname()[1])
        done = run_cli("client", "--port", port, "--frame", frame, "--header", header, "--send", "x")
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"msgsock client: error: {message}{_help('msgsock client')}\n"
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # a connect would have completed into the backlog
            listener.accept()
    # With nothing listening, still the usage error (not "connection refused").
    done = run_cli(
        "client", "--port", str(_closed_port()), "--frame", frame, "--header", header, "--send", "x"
    )
    assert done.returncode == 2 and message in done.stderr


def test_header_at_the_field_limits_is_sent() -> None:
    """Values at the edges of a field's range pass the check and are echoed."""
    with serve("--frame", "u32be+kind:B+delta:h") as server:
        done = run_cli(
            "client", "--port", str(server.port), "--frame", "u32be+kind:B+delta:h",
            "--header", "kind=255", "--header", "delta=-32768", "--send", "x",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[kind=255 delta=-32768] x\n"


# -- 5. --max-size checked against the frame's length field ----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--frame", "u16be", "--max-size", "17GiB"], "--max-size 18253611008: above 65535, the largest body frame u16be can carry"),
        (["serve", "--frame", "u8", "--max-size", "1000"], "--max-size 1000: above 255, the largest body frame u8 can carry"),
        (["serve", "--frame", "u8!", "--max-size", "255"], "--max-size 255: above 254, the largest body frame u8! can carry"),
        (["client", "--frame", "u8", "--max-size", "256", "--send", "x"], "--max-size 256: above 255, the largest body frame u8 can carry"),
        (["stress", "--frame", "u16le", "--max-size", "64KiB"], "--max-size 65536: above 65535, the largest body frame u16le can carry"),
    ],
)  # fmt: skip
def test_max_size_above_the_length_field_is_a_usage_error(args: list[str], message: str) -> None:
    """serve, client and stress refuse a --max-size the frame's length field cannot count, before any socket."""
    port = ["--port", "0"] if args[0] == "serve" else ["--port", str(_closed_port())]
    done = run_cli(args[0], *port, *args[1:])
    cmd = f"msgsock {args[0]}"
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"{cmd}: error: {message}{_help(cmd)}\n"
    assert done.stdout == ""


def test_max_size_that_fits_the_frame_starts() -> None:
    """--max-size at the field's limit, or none with a small frame (capped silently), serves."""
    for args in (("--frame", "u8", "--max-size", "255"), ("--frame", "u8")):
        with serve(*args) as server:
            assert server.ready.endswith(", u8)")  # whatever engine auto chose
            done = run_cli("client", "--port", str(server.port), "--frame", "u8", "--send", "y" * 255)
            assert done.returncode == 0 and done.stdout == "y" * 255 + "\n", done.stderr
            assert server.stop() == 0


# -- 9. a flood of oversize datagrams is not one log line each -------------------------------

_SUMMARY = re.compile(
    r"\.\.\. and ([\d,]+) more datagrams above max_size 100 dropped from (.+?) in the last [\d.]+ s"
)


def test_oversize_datagram_flood_is_rate_limited() -> None:
    """600 oversize datagrams from 3 senders: 5 lines in full, then summaries that count the rest exactly."""
    batches, per_sender, senders = 20, 10, 3
    total = batches * per_sender * senders
    with serve("--udp", "--max-size", "100") as server:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(senders + 1)]
        try:
            *floods, probe = socks
            probe.settimeout(unit(10))
            for n in range(batches):
                for _ in range(per_sender):
                    for s in floods:
                        s.sendto(b"o" * 200, ("127.0.0.1", server.port))
                # The server reads its one socket in order: once the probe is echoed, every
                # datagram before it was handled (and the kernel's buffer never overflows).
                probe.sendto(b"probe %d" % n, ("127.0.0.1", server.port))
                assert probe.recvfrom(1000)[0] == b"probe %d" % n
        finally:
            for s in socks:
                s.close()
        assert server.stop() == 0
    lines = [line for line in server.stderr if "max_size 100" in line]
    full = [line for line in lines if "dropped a datagram of" in line]
    summaries = [m for m in map(_SUMMARY.search, lines) if m]
    assert len(full) == 5, lines
    assert len(summaries) == len(lines) - 5 >= 1, lines
    assert sum(int(m.group(1).replace(",", "")) for m in summaries) == total - 5
    if len(summaries) == 1:  # the whole flood in one 10 s window: the summary came at shutdown
        assert summaries[0].group(1) == f"{total - 5:,}" and summaries[0].group(2) == "3 senders"
    assert len(server.log) < 4000, f"{len(server.log)} bytes of log"
    assert f"{total} errors ({total} message too large)" in server.output
    assert "Traceback" not in server.log
