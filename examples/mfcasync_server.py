"""The MFCAsync AsyncServer (KB Q192570), in Python: a framed echo server, one thread per client.

Listens on port 9898 (like the original); every client gets its own thread, which
sends each message back as received.  Ctrl-C or SIGTERM stops it gracefully: it stops
accepting, lets each client finish what it has sent, and prints a summary.

    python examples/mfcasync_server.py
    python examples/mfcasync_client.py --rounds 10
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from msgsock.sync import ThreadedServer


def echo(message: bytes) -> bytes:
    """Send every message back unchanged (header fields included)."""
    return message


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:9898`` or ``[::1]:9898``."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="TCP port; 0 picks a free one (default 9898)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connect and disconnect")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )

    try:
        server = ThreadedServer(echo, args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    # A signal handler must not block, so it hands the graceful shutdown to a thread;
    # serve_forever() returns once that shutdown is complete.
    def on_signal(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, name="shutdown").start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    print(f"listening on {format_address(server.address)}", flush=True)
    server.serve_forever()
    print(server.statistics().summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
