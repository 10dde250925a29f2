"""The Winsock "simples_ioctl" sample (seed 004), in Python: a select-style non-blocking echo server.

The original makes every socket non-blocking (``ioctlsocket(FIONBIO)``) and loops
on ``select()`` over the listening socket and all clients, up to ``FD_SETSIZE``
of them.  Here the reactor is that loop (``selectors``: epoll, kqueue or select)
and every socket is non-blocking; the program only says what to do when a socket
is ready.  Messages are framed (4-byte big-endian length + body).  Beyond
``--max-clients`` a new connection is accepted and closed at once, as the
original does when its ``fd_set`` is full.

    python examples/select_server.py --port 9898
    msgsock client --port 9898 --send hello
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


class Client(MessageSocket):
    """A client socket: echo every message; report when it goes away."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener.reactor)
        self.listener = listener
        self.peer = "?"

    def on_message(self, message: bytes) -> None:
        self.send_message(message)

    def on_close(self, error: int) -> None:
        self.listener.clients.discard(self)
        stats = self.statistics()
        how = "closed" if error == 0 else f"failed ({self.error})"
        print(f"{self.peer} {how}: {stats.messages_received} messages echoed", flush=True)
        self.close()


class Listener(AsyncSocket):
    """The listening socket: ready for reading means a connection waits."""

    def __init__(self, reactor: Reactor, max_clients: int) -> None:
        super().__init__(reactor)
        self.max_clients = max_clients
        self.clients: set[Client] = set()

    def on_accept(self) -> None:
        client = Client(self)
        try:
            self.accept(client)
        except WouldBlock:
            return
        except OSError as exc:
            print(f"accept failed: {exc}", flush=True)
            return
        try:
            client.peer = where(client.peer_name)
        except OSError:  # reset before we accepted it: nothing to serve
            client.close()
            return
        if len(self.clients) >= self.max_clients:
            print(f"{client.peer} refused: {self.max_clients} clients already", flush=True)
            client.abort()
            return
        self.clients.add(client)
        print(f"{client.peer} connected ({len(self.clients)} clients)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="TCP port; 0 picks a free one (default 9898)")
    parser.add_argument("--max-clients", type=int, default=64, help="FD_SETSIZE of the original (default 64)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    with Reactor(name="select") as reactor:
        listener = Listener(reactor, args.max_clients)
        try:
            listener.create(args.port, address=args.host)
            listener.listen(128)
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(f"listening on {where(listener.sock_name)}", flush=True)
        while not stop.wait(0.5):  # a timed wait, so the signal handler runs promptly everywhere
            pass

        def close_all() -> list[Client]:
            listener.close()
            clients = list(listener.clients)
            for client in clients:
                client.close()  # graceful: queued echoes go out first
            return clients

        clients = reactor.run_sync(close_all)
        for client in clients:
            client.wait_closed(5.0)
    print(f"stopped ({len(clients)} clients were still connected)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
