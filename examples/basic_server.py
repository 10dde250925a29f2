"""The Winsock "Getting Started" server (seed 004), in Python.

Accept ONE client, echo every byte it sends (raw TCP, not framed), and when the client
shuts down its sending side, shut down ours and exit: the graceful shutdown of the
Winsock sample.  Unlike the original, it echoes exactly the bytes it read, whatever
their number, and reports any failure instead of ignoring it.

    python examples/basic_server.py --port 27015
    python examples/basic_client.py --port 27015
"""

from __future__ import annotations

import argparse
import socket
import sys

BUFFER_SIZE = 512  # DEFAULT_BUFLEN of the sample


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:9898`` or ``[::1]:9898``."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="TCP port; 0 picks a free one (default 9898)")
    args = parser.parse_args(argv)

    try:
        # getaddrinfo + socket + bind + listen, for IPv4 or IPv6 alike.
        family, _, _, _, address = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.create_server(address, family=family, backlog=1)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"listening on {format_address(listener.getsockname())}", flush=True)

    with listener:
        client, peer = listener.accept()
    # The sample closes the listening socket once its one client is in.
    with client:
        print(f"connection from {format_address(peer)}", flush=True)
        try:
            while data := client.recv(BUFFER_SIZE):
                print(f"Bytes received: {len(data)}", flush=True)
                client.sendall(data)
                print(f"Bytes sent: {len(data)}", flush=True)
            # recv returned 0: the client shut down its sending side.
            print("Connection closing...", flush=True)
            client.shutdown(socket.SHUT_WR)
        except OSError as exc:
            print(f"connection failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
