"""The Winsock "WSAPoll" sample (seed 004), in Python: a non-blocking client and server in one program.

Both ends live on one reactor (the poll loop) over IPv6 loopback (``::1``; IPv4
when IPv6 is unavailable, with a note).  Neither ever blocks: each acts only when
the reactor says its socket is ready -- ``on_accept``, ``on_connect``,
``on_send`` (writable), ``on_receive`` (readable), ``on_close`` -- and prints the
step.  The client sends a message and shuts down its sending side; the server
reads to the end, sends everything back and closes; the client checks the reply.
Unlike the C sample, sends resume where a partial send stopped and the data is
bytes, not a C string: the NUL in the message travels like any other byte.

    python examples/poll_demo.py
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from msgsock.callback import AsyncSocket, Reactor, WouldBlock

MESSAGE = b"Hello from the WSAPoll demo!\x00(and after the NUL)"


_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print one whole line (callbacks and the main thread both print)."""
    with _print_lock:
        print(text, flush=True)


def where(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:9898`` or ``[::1]:9898``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class Sender(AsyncSocket):
    """Keeps what a send did not take, and sends it when the socket is writable again."""

    def __init__(self, reactor: Reactor, name: str) -> None:
        super().__init__(reactor)
        self.name = name
        self.pending = b""
        self.failed: str | None = None

    def on_send(self) -> None:
        if self.pending:
            self.push()

    def push(self) -> None:
        try:
            n = self.send(self.pending)
        except WouldBlock:
            return  # on_send says when there is room
        say(f"{self.name}: writable, sent {n} bytes")
        self.pending = self.pending[n:]
        if not self.pending:
            self.sent_all()

    def sent_all(self) -> None:
        """Everything handed to push() is with the kernel."""


class ServerConnection(Sender):
    """The accepted connection: read to the client's end of stream, then echo it all back."""

    def __init__(self, reactor: Reactor) -> None:
        super().__init__(reactor, "server")
        self.received = bytearray()

    def on_receive(self) -> None:
        try:
            data = self.receive()
        except WouldBlock:
            return
        self.received += data  # exactly the bytes read, whatever they are
        say(f"server: readable, received {len(data)} bytes")

    def on_close(self, error: int) -> None:
        if error:
            self.failed = os.strerror(error)
            say(f"server: connection failed: {self.failed}")
            self.close()
            return
        say(f"server: the client finished sending; echoing {len(self.received)} bytes")
        self.pending = bytes(self.received)
        self.push()

    def sent_all(self) -> None:
        self.shutdown()  # graceful: the client reads everything, then end of stream
        say("server: reply sent; shut down sending and closed")
        self.close()


class Client(Sender):
    """Connects, sends the message, shuts down sending, reads the reply to the end."""

    def __init__(self, reactor: Reactor, done: threading.Event) -> None:
        super().__init__(reactor, "client")
        self.pending = MESSAGE
        self.reply = bytearray()
        self.done = done

    def on_connect(self, error: int) -> None:
        if error:
            self.failed = os.strerror(error)
            say(f"client: connect failed: {self.failed}")
            self.close()
            self.done.set()
        else:
            say(f"client: connected to {where(self.peer_name)}")

    def sent_all(self) -> None:
        self.shutdown()
        say("client: message sent; shut down sending")

    def on_receive(self) -> None:
        try:
            data = self.receive()
        except WouldBlock:
            return
        self.reply += data
        say(f"client: readable, received {len(data)} bytes")

    def on_close(self, error: int) -> None:
        if error:
            self.failed = os.strerror(error)
        say(f"client: the server closed the connection{f' ({self.failed})' if error else ''}")
        self.close()
        self.done.set()


class Listener(AsyncSocket):
    def on_accept(self) -> None:
        conn = ServerConnection(self.reactor)
        try:
            self.accept(conn)
        except WouldBlock:
            return
        say(f"server: accepted a connection from {where(conn.peer_name)}")
        self.close()  # one client, as in the sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=10.0, help="give up after this many seconds")
    args = parser.parse_args(argv)

    done = threading.Event()
    with Reactor(name="poll-demo") as reactor:
        listener = Listener(reactor)
        host = "::1"
        try:
            listener.create(0, address=host)
        except OSError as exc:
            say(f"note: IPv6 loopback is not available ({exc}); using 127.0.0.1")
            host = "127.0.0.1"
            listener.create(0, address=host)
        listener.listen(1)
        port = listener.sock_name[1]
        say(f"server: listening on {where(listener.sock_name)}")
        client = Client(reactor, done)
        client.create()
        say(f"client: connecting to {where((host, port))} (non-blocking)")
        client.connect(host, port)
        finished = done.wait(args.timeout)
    if not finished:
        print(f"poll_demo: no reply within {args.timeout:g} s", file=sys.stderr)
        return 1
    if client.failed:
        print(f"poll_demo: {client.failed}", file=sys.stderr)
        return 1
    if bytes(client.reply) != MESSAGE:
        print(f"poll_demo: the reply differs: sent {MESSAGE!r}, got {bytes(client.reply)!r}", file=sys.stderr)
        return 1
    say(f"client: the reply is exactly the {len(MESSAGE)} bytes sent: {bytes(client.reply)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
