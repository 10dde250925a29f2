"""simplec (Windows SDK sample) in Python: send messages to an echo server over TCP or UDP and verify each echo.

TCP uses msgsock frames (msgsock.sync.connect); UDP sends each message as one
datagram and resends on silence (msgsock.udp.UdpClient).  Each echo must equal what
was sent, byte for byte -- a NUL byte is just a byte (--message takes backslash
escapes such as \\0 and \\x00).  Exit status 1 on any mismatch or failure.

    python examples/simple_client.py --count 5 --message 'hello\\0world'
    python examples/simple_client.py -6 --udp --port 9898
"""

from __future__ import annotations

import argparse
import codecs
import socket
import sys
from collections.abc import Callable

from msgsock import MsgsockError
from msgsock.sync import connect
from msgsock.udp import UdpClient


def parse_message(text: str) -> bytes:
    """The message bytes: ``text`` in UTF-8 with backslash escapes (``\\0``, ``\\x00``, ``\\n``) decoded."""
    escaped = text.encode(
        "latin-1", "backslashreplace"
    )  # other characters become \\uXXXX, decoded back below
    return codecs.decode(escaped, "unicode_escape").encode("utf-8")


def exchange(send_and_receive: Callable[[bytes], bytes], message: bytes, count: int) -> bool:
    """Send ``message`` ``count`` times; print and verify each echo.  True when all matched."""
    for i in range(1, count + 1):
        print(f"sent {len(message)} bytes: {message!r}", flush=True)
        echo = send_and_receive(message)
        if echo != message:
            print(f"message {i}: the echo differs: sent {message!r}, received {echo!r}", file=sys.stderr)
            return False
        print(f"received {len(echo)} bytes: {echo!r} (verified)", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET, help="IPv4 only")
    family.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6 only")
    parser.add_argument("--host", help="server name or address (default 127.0.0.1, or ::1 with -6)")
    parser.add_argument("--port", type=int, default=9898, help="server port (default 9898)")
    parser.add_argument("--udp", action="store_true", help="use UDP datagrams instead of TCP")
    parser.add_argument("--count", type=int, default=3, help="messages to send (default 3)")
    parser.add_argument(
        "--message", default="This is a test message", help="text to send; backslash escapes allowed"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each echo (default 5)"
    )
    parser.add_argument("--retries", type=int, default=3, help="UDP: resends on silence (default 3)")
    args = parser.parse_args(argv)
    af = args.family or socket.AF_UNSPEC
    host = args.host or ("::1" if af == socket.AF_INET6 else "127.0.0.1")
    try:
        message = parse_message(args.message)
    except UnicodeDecodeError as exc:
        parser.error(f"--message: bad escape: {exc.reason}")

    try:
        if args.udp:
            with UdpClient(host, args.port, timeout=args.timeout, retries=args.retries, family=af) as client:
                print(f"sending to {host} port {args.port} (udp)", flush=True)
                ok = exchange(client.request, message, args.count)
        else:
            # The address of the chosen family (connect() itself tries every address of a name).
            address = str(socket.getaddrinfo(host, args.port, af, socket.SOCK_STREAM)[0][4][0])
            with connect(address, args.port, connect_timeout=args.timeout) as conn:
                print(f"connected to {address} port {args.port} (tcp)", flush=True)

                def round_trip(data: bytes) -> bytes:
                    conn.send(data)
                    return bytes(conn.receive(args.timeout))

                ok = exchange(round_trip, message, args.count)
    except (OSError, MsgsockError) as exc:
        print(f"{'udp' if args.udp else 'tcp'} {host} port {args.port}: {exc}", file=sys.stderr)
        return 1
    if ok:
        print(f"{args.count} messages echoed, all verified", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
