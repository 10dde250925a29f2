"""The CArchive packet demo: CSocket + CSocketFile + CArchive, in Python (seed 001, SPEC §4.3).

The client sends one packet -- a BYTE value, a WORD count of copies, that many copies
of the value, and a CString twice (narrow CStringA and wide CStringW) -- and the
server answers with an ack: a BYTE status, the WORD count of bytes it checked and a
CString.  Both follow the CSocket "sequence of operations": create, listen, connect,
accept, a SocketFile over each socket, and archives to load and store.  The bytes are
MFC's, so either side can be an MFC program.

    python examples/archive_demo.py                      # server and client, one run
    python examples/archive_demo.py server --port 9899
    python examples/archive_demo.py client --port 9899 --value 200 --copies 5
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from typing import Any

from msgsock import ArchiveReader, ArchiveWriter, MsgsockError
from msgsock.sync import SocketFile

_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line (in a run of both roles, two threads print)."""
    with _print_lock:
        print(line, flush=True)


def format_address(address: Any) -> str:
    """``127.0.0.1:9899`` or ``[::1]:9899``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def number(low: int, high: int) -> Any:
    """An argparse type: an int from low to high."""

    def parse(text: str) -> int:
        value = int(text, 0)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def listen(host: str, port: int) -> socket.socket:
    """CSocket::Create(nPort) + Listen(): a stream socket bound to host:port."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address, family=family, backlog=1)


def serve_one(listener: socket.socket, timeout: float) -> bool:
    """Accept one client, load its packet, store the ack.  True when the packet was consistent."""
    sock, peer = listener.accept()  # CSocket::Accept(sockRecv)
    sock.settimeout(timeout)
    say(f"server: connection from {format_address(peer)}")
    with sock, SocketFile(sock) as file:  # CSocketFile file(&sockRecv)
        ar_in = ArchiveReader(file)  # CArchive arIn(&file, CArchive::load)
        value = ar_in.read_byte()  # arIn >> m_value
        copies = ar_in.read_word()  # arIn >> m_copies (a WORD count)
        data = ar_in.read_bytes(copies)
        narrow, wide = ar_in.read_string(), ar_in.read_string()
        say(
            f"server: received value={value} copies={copies} bytes={data.hex()} narrow={narrow!r} wide={wide!r}"
        )
        ok = data == bytes([value]) * copies
        text = f"{copies} copies of {value} received" if ok else "the copies do not match the value"
        ar_out = ArchiveWriter(file)  # CArchive arOut(&file, CArchive::store)
        ar_out.write_byte(1 if ok else 0)
        ar_out.write_word(len(data))
        ar_out.write_string(text, wide=True)
        ar_out.flush()  # arOut.Flush(): the bytes leave now
        say(f"server: sent ack status={int(ok)} checked={len(data)} text={text!r}")
    return ok


def run_client(host: str, port: int, value: int, copies: int, narrow: str, wide: str, timeout: float) -> bool:
    """Connect, store the packet, load the ack.  True when the server acknowledged it."""
    sock = socket.create_connection((host, port), timeout=timeout)  # Create() + Connect(strAddr, nPort)
    say(f"client: connected to {format_address(sock.getpeername())}")
    with sock, SocketFile(sock) as file:
        ar_out = ArchiveWriter(file)
        ar_out.write_byte(value)
        ar_out.write_word(copies)
        ar_out.write_bytes(bytes([value]) * copies)
        ar_out.write_string(narrow, wide=False)
        ar_out.write_string(wide, wide=True)
        ar_out.flush()
        say(
            f"client: sent value={value} copies={copies} bytes={(bytes([value]) * copies).hex()} "
            f"narrow={narrow!r} wide={wide!r} ({ar_out.offset} bytes)"
        )
        ar_in = ArchiveReader(file)
        status, checked, text = ar_in.read_byte(), ar_in.read_word(), ar_in.read_string()
        say(f"client: received ack status={status} checked={checked} text={text!r}")
    return status == 1 and checked == copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=["both", "server", "client"], default="both")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; ::1 for IPv6)")
    parser.add_argument("--port", type=int, default=9899, help="TCP port; 0 picks a free one (default 9899)")
    parser.add_argument("--value", type=number(0, 0xFF), default=65, help="the BYTE, 0-255 (default 65)")
    parser.add_argument("--copies", type=number(0, 0xFFFF), default=3, help="the WORD count (default 3)")
    parser.add_argument("--narrow", default="Hello, CArchive", help="text sent as a narrow CString (cp1252)")
    parser.add_argument("--wide", default="Grüße, 世界", help="text sent as a wide CString (UTF-16)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for each socket operation")
    args = parser.parse_args(argv)
    packet = (args.value, args.copies, args.narrow, args.wide, args.timeout)
    try:
        if args.role == "client":
            return 0 if run_client(args.host, args.port, *packet) else 1
        with listen(args.host, 0 if args.role == "both" else args.port) as listener:
            listener.settimeout(args.timeout)
            say(f"listening on {format_address(listener.getsockname())}")
            if args.role == "server":
                return 0 if serve_one(listener, args.timeout) else 1
            # Both roles in one run: the server on a thread, the client here.
            results: list[bool] = []
            server = threading.Thread(
                target=lambda: results.append(serve_one(listener, args.timeout)), daemon=True
            )
            server.start()
            acknowledged = run_client(args.host, listener.getsockname()[1], *packet)
            server.join(args.timeout)
            return 0 if acknowledged and results == [True] else 1
    except (OSError, MsgsockError, ValueError) as exc:
        print(f"archive demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
