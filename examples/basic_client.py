"""The Winsock "Getting Started" client (seed 004), in Python.

Connect (host name, IPv4 or IPv6: every resolved address is tried in order), send
"this is a test", shut down the sending side, then read until the server closes,
printing what arrives.  Raw TCP, not framed: this is the basic Winsock sample.

    python examples/basic_client.py --host localhost --port 27015
"""

from __future__ import annotations

import argparse
import socket
import sys

BUFFER_SIZE = 512  # DEFAULT_BUFLEN of the sample
MESSAGE = b"this is a test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server name or address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="server port (default 9898)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to connect and for each read")
    args = parser.parse_args(argv)

    try:
        # create_connection tries every address getaddrinfo returns, in order.
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as exc:
        print(f"Unable to connect to server {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    with sock:
        try:
            sock.sendall(MESSAGE)
            print(f"Bytes Sent: {len(MESSAGE)}", flush=True)
            # No more data to send: the server sees EOF after our message.
            sock.shutdown(socket.SHUT_WR)
            echoed = bytearray()
            while data := sock.recv(BUFFER_SIZE):
                print(f"Bytes received: {len(data)}", flush=True)
                echoed += data
            print("Connection closed", flush=True)
        except OSError as exc:
            print(f"connection failed: {exc}", file=sys.stderr)
            return 1
    print(echoed.decode("utf-8", "replace"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
