"""The Winsock "overlap" sample (seed 004), in Python: a single-thread echo server on the callback layer.

One reactor thread serves every client: it accepts, reads, and writes for all of
them.  Each connection is a ``MessageSocket``: a read notification completes as
many whole messages as arrived (one ``on_message`` each), and ``send_message``
queues the echo -- the part the kernel cannot take at once is written when the
socket is writable again, the "overlapped" send of the original.  Messages are
framed (4-byte big-endian length + body), so ``msgsock client`` talks to it.

    python examples/overlapped_server.py --port 9898
    msgsock client --port 9898 --send hello

Ctrl-C or SIGTERM stops it: every connection is closed gracefully, then a summary.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from msgsock.callback import AsyncSocket, MessageSocket, Reactor, WouldBlock


def where(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:9898`` or ``[::1]:9898``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class Echo(MessageSocket):
    """One client: every message goes straight back."""

    def __init__(self, reactor: Reactor, server: Server) -> None:
        super().__init__(reactor)
        self.server = server

    def on_message(self, message: bytes) -> None:
        self.send_message(message)

    def on_close(self, error: int) -> None:
        # The client is done (or gone): close our side too, after the echoes already queued.
        self.server.finished(self, error)
        self.close()


class Server(AsyncSocket):
    """The listening socket: accepts every waiting connection (level-triggered on_accept)."""

    def __init__(self, reactor: Reactor) -> None:
        super().__init__(reactor)
        self.clients: set[Echo] = set()
        self.accepted = self.messages = 0

    def on_accept(self) -> None:
        conn = Echo(self.reactor, self)
        try:
            self.accept(conn)
        except WouldBlock:  # another notification already took it
            return
        except OSError as exc:  # e.g. out of file descriptors: this client only
            print(f"accept failed: {exc}", flush=True)
            return
        try:
            print(f"connection from {where(conn.peer_name)}", flush=True)
        except OSError:  # reset while it waited to be accepted: nothing to serve
            conn.close()
            return
        self.clients.add(conn)
        self.accepted += 1

    def finished(self, conn: Echo, error: int) -> None:
        self.clients.discard(conn)
        self.messages += conn.statistics().messages_received


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="TCP port; 0 picks a free one (default 9898)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    with Reactor(name="overlapped") as reactor:
        server = Server(reactor)
        try:
            server.create(args.port, address=args.host)
            server.listen(128)
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(f"listening on {where(server.sock_name)}", flush=True)
        while not stop.wait(0.5):  # a timed wait, so the signal handler runs promptly everywhere
            pass

        def close_all() -> list[Echo]:
            server.close()
            clients = list(server.clients)
            for conn in clients:
                server.finished(conn, 0)
                conn.close()  # graceful: queued echoes go out first
            return clients

        for conn in reactor.run_sync(close_all):
            conn.wait_closed(5.0)
    print(f"{server.accepted} connections, {server.messages} messages echoed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
