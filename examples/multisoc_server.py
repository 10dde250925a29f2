"""The MultiSoc sample (KB Q175668), in Python: a server that reverses messages, one thread per connection.

An MFC socket belongs to the thread that made it, so MultiSoc accepts on the main
thread, *detaches* the accepted socket's handle, hands the bare handle to a new
thread, and *attaches* it to a socket object there.  The same here: the listening
socket lives on one reactor; each accepted socket is ``detach()``-ed from it and
``attach()``-ed to a ``MessageSocket`` on a reactor of its own, run by the
connection's thread, which closes the connection gracefully and ends when the
client leaves.  Messages are framed (4-byte big-endian length + body), and each
comes back reversed byte by byte (``msgsock serve --handler reverse``).

    python examples/multisoc_server.py --port 9898
    msgsock client --port 9898 --send stressed      # prints "desserts"
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from msgsock.callback import AsyncSocket, MessageSocket, Reactor, WouldBlock

_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print one whole line (callbacks and the main thread both print)."""
    with _print_lock:
        print(text, flush=True)


def where(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:9898`` or ``[::1]:9898``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class Reverse(MessageSocket):
    """One connection, on its own thread's reactor: send every message back reversed."""

    def __init__(self, reactor: Reactor, peer: str) -> None:
        super().__init__(reactor)
        self.peer = peer
        self.finished = threading.Event()  # the client left (or the server is stopping)
        self.greeted = False

    def on_message(self, message: bytes) -> None:
        if not self.greeted:
            self.greeted = True
            say(f"{self.peer}: first message reversed on thread {threading.current_thread().name}")
        self.send_message(message[::-1])

    def on_close(self, error: int) -> None:
        self.finished.set()


class Server(AsyncSocket):
    """The listening socket: accept, detach, hand the socket to a new thread."""

    def __init__(self, reactor: Reactor) -> None:
        super().__init__(reactor)
        self.lock = threading.Lock()
        self.live: set[Reverse] = set()
        self.threads: list[threading.Thread] = []
        self.stopping = False

    def on_accept(self) -> None:
        for _ in range(64):  # every waiting connection, bounded per notification
            try:
                accepted = self.accept()  # a plain AsyncSocket on this (the listening) reactor
            except WouldBlock:
                return
            except OSError as exc:
                say(f"accept failed: {exc}")
                return
            try:
                peer = where(accepted.peer_name)
            except OSError:  # reset while it waited to be accepted: nothing to serve
                accepted.close()
                continue
            sock = accepted.detach()  # CAsyncSocket::Detach: the bare handle leaves this thread
            number = len(self.threads) + 1
            thread = threading.Thread(
                target=self.connection_thread, args=(sock, peer), name=f"connection-{number}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def connection_thread(self, sock: socket.socket, peer: str) -> None:
        """The connection's own thread: attach the handle to a socket on its own reactor."""
        name = threading.current_thread().name
        with Reactor(name=f"{name}-reactor") as reactor:
            conn = Reverse(reactor, peer)
            conn.attach(sock)  # CAsyncSocket::Attach, in the thread that now owns it
            with self.lock:
                self.live.add(conn)
                if self.stopping:
                    conn.finished.set()
            say(f"{peer}: handed to thread {name}")
            conn.finished.wait()
            conn.close()  # graceful: the replies already queued go out first
            conn.wait_closed(10.0)
            with self.lock:
                self.live.discard(conn)
        say(f"{peer}: closed; thread {name} ends after {conn.statistics().messages_sent} replies")

    def stop(self) -> list[threading.Thread]:
        """Tell every connection thread to finish; return them (call with the listener closed)."""
        with self.lock:
            self.stopping = True
            for conn in self.live:
                conn.finished.set()
            return list(self.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="TCP port; 0 picks a free one (default 9898)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    with Reactor(name="listener") as reactor:
        server = Server(reactor)
        try:
            server.create(args.port, address=args.host)
            server.listen(128)
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        say(f"listening on {where(server.sock_name)}")
        while not stop.wait(0.5):  # a timed wait, so the signal handler runs promptly everywhere
            pass
        server.close()
    # The listener's reactor is stopped: no new threads.  End the connection threads.
    threads = server.stop()
    for thread in threads:
        thread.join(15.0)
    say(f"stopped after {len(threads)} connections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
