"""simples (Windows SDK sample) in Python: a TCP or UDP echo server, IPv4 or IPv6.

TCP: msgsock frames, one thread per client (msgsock.sync.ThreadedServer).  UDP: one
datagram is one message (msgsock.udp.UdpServer).  Every message goes back exactly as
received -- all its bytes, NUL bytes included (the C sample printed and echoed them as
C strings, so it stopped at the first NUL).  Ctrl-C or SIGTERM stops it with a summary.

    python examples/simple_server.py                 # TCP on 127.0.0.1:9898
    python examples/simple_server.py -6 --udp        # UDP on [::1]:9898
    python examples/simple_client.py -6 --udp --count 5
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import Any

from msgsock.sync import Connection, ThreadedServer
from msgsock.udp import UdpServer

_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line (client threads print at the same time)."""
    with _print_lock:
        print(line, flush=True)


def format_address(address: Any) -> str:
    """``127.0.0.1:9898`` or ``[::1]:9898``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def serve_tcp_client(conn: Connection) -> None:
    """One client's thread: echo each message until the client closes."""
    peer = format_address(conn.peer_address)
    say(f"tcp: connection from {peer}")
    for message in conn:
        say(f"tcp: {peer}: received {len(message)} bytes: {bytes(message)!r}")
        conn.send(message)
        say(f"tcp: {peer}: echoed {len(message)} bytes")
    say(f"tcp: {peer} closed the connection")


def echo_datagram(message: bytes) -> bytes:
    """Each datagram goes back to its sender unchanged."""
    say(f"udp: received {len(message)} bytes: {message!r}; echoing them")
    return message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    family = parser.add_mutually_exclusive_group()
    family.add_argument(
        "-4", dest="family", action="store_const", const=socket.AF_INET, help="IPv4 (default)"
    )
    family.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1, or ::1 with -6)")
    parser.add_argument("--port", type=int, default=9898, help="port; 0 picks a free one (default 9898)")
    parser.add_argument("--udp", action="store_true", help="echo UDP datagrams instead of TCP messages")
    args = parser.parse_args(argv)
    af = args.family or socket.AF_INET
    host = args.host or ("::1" if af == socket.AF_INET6 else "127.0.0.1")

    server: ThreadedServer | UdpServer
    try:
        if args.udp:
            server = UdpServer(echo_datagram, host, args.port, family=af)
        else:
            server = ThreadedServer(host=host, port=args.port, connection_handler=serve_tcp_client, family=af)
    except OSError as exc:
        print(f"cannot listen on {host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    # A signal handler must not block: the graceful shutdown runs on a thread, and
    # serve_forever() returns once it is complete.
    def on_signal(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, name="shutdown").start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    say(f"listening on {format_address(server.address)} ({'udp' if args.udp else 'tcp'})")
    server.serve_forever()
    stats = server.statistics()
    kind = "datagrams" if args.udp else "messages"
    say(
        f"{stats.messages_received} {kind} in / {stats.messages_sent} out, "
        f"{stats.bytes_received} bytes in / {stats.bytes_sent} out, {stats.errors} errors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
