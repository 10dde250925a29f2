"""The MFCSocs chat (KB Q185728), in Python, on the callback layer.

    python examples/chat.py serve --port 9899      # waits for one peer
    python examples/chat.py connect --port 9899    # in another terminal

Type a line and press Enter: it goes to the peer as one message, and the peer
prints ``peer: TEXT``.  ``bye`` from either side ends the session gracefully --
the other side prints it and closes too -- and so does the end of input (Ctrl-D).
Lines can be piped in, so the program is scriptable.

MFCSocs exists to show two mistakes, and ``MessageSocket`` makes both impossible:
each read notification does **one** receive, and the messages it completes are
delivered whole (a message split across reads waits for the rest, several in one
read each get their own ``on_message``); and a send the kernel takes only part
of is **resumed** when ``on_send`` says there is room, so nothing is lost.  The
text is sent as bytes with a length header, so a NUL in a line is just a byte.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import threading

from msgsock.app.client import escape_text
from msgsock.callback import AsyncSocket, MessageSocket, Reactor, WouldBlock

Event = tuple[str, object]


_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print one whole line (callbacks and the main thread both print)."""
    with _print_lock:
        print(text, flush=True)


def where(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:9899`` or ``[::1]:9899``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class ChatSocket(MessageSocket):
    """The connection to the peer; its callbacks run on the reactor thread and report to the main thread."""

    def __init__(self, reactor: Reactor, events: queue.Queue[Event]) -> None:
        super().__init__(reactor)
        self.inbox = events

    def on_connect(self, error: int) -> None:
        if error:
            say(f"cannot connect: {os.strerror(error)}")
            self.inbox.put(("end", 1))
        else:
            self.inbox.put(("connected", self))  # before the line: input typed after it finds us connected
            say(f"connected to {where(self.peer_name)}")

    def on_message(self, message: bytes) -> None:
        say(f"peer: {escape_text(message)}")
        if message == b"bye":
            say("peer said bye; closing")
            self.close()  # graceful: anything we still had queued goes out first
            self.inbox.put(("end", 0))

    def on_close(self, error: int) -> None:
        if error:
            say(f"connection failed: {os.strerror(error)}")
            self.inbox.put(("end", 1))
        else:
            say("peer closed the connection")
            self.close()
            self.inbox.put(("end", 0))


class Listener(AsyncSocket):
    """Accepts one peer, then stops listening (a chat is one to one)."""

    def __init__(self, reactor: Reactor, events: queue.Queue[Event]) -> None:
        super().__init__(reactor)
        self.inbox = events

    def on_accept(self) -> None:
        conn = ChatSocket(self.reactor, self.inbox)
        try:
            self.accept(conn)
            peer = where(conn.peer_name)
        except WouldBlock:
            return
        except OSError:  # reset while it waited to be accepted: wait for another peer
            conn.close()
            return
        self.close()
        self.inbox.put(("connected", conn))
        say(f"connection from {peer}")


def read_stdin(events: queue.Queue[Event]) -> None:
    """The input thread: each line becomes an event; then one for the end of input."""
    for line in sys.stdin:
        events.put(("line", line.rstrip("\r\n")))
    events.put(("eof", None))


def chat(reactor: Reactor, args: argparse.Namespace, events: queue.Queue[Event]) -> int:
    if args.role == "serve":
        listener = Listener(reactor, events)
        listener.create(args.port, address=args.host)
        listener.listen(1)
        say(f"listening on {where(listener.sock_name)}")
    else:
        client = ChatSocket(reactor, events)
        client.create()
        client.connect(args.host, args.port)
    threading.Thread(target=read_stdin, args=(events,), name="stdin", daemon=True).start()

    conn: ChatSocket | None = None
    early: list[Event] = []  # input that came before the peer did: replayed once connected
    while True:
        kind, value = early.pop(0) if conn is not None and early else events.get()
        if kind in ("line", "eof") and conn is None:
            early.append((kind, value))
        elif kind == "connected":
            assert isinstance(value, ChatSocket)
            conn = value
        elif kind == "line":
            assert isinstance(value, str) and conn is not None
            conn.send_message(value.encode("utf-8"))  # thread-safe: handed to the reactor
            if value == "bye":
                say("you said bye; closing")
                break
        elif kind == "eof":
            say("end of input; closing")
            break
        elif kind == "end":
            assert isinstance(value, int)
            if conn is not None:
                conn.wait_closed(args.timeout)
            return value
    if conn is not None:
        conn.close()  # graceful: send what is queued, half-close, wait for the peer's end
        if not conn.wait_closed(args.timeout):
            say("the peer did not close in time")
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["serve", "connect"], help="wait for a peer, or connect to one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on or connect to")
    parser.add_argument("--port", type=int, default=9899, help="TCP port; 0 (serve) picks a free one")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a graceful close")
    args = parser.parse_args(argv)

    # SIGTERM behaves like Ctrl-C: KeyboardInterrupt in the main thread.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    events: queue.Queue[Event] = queue.Queue()
    with Reactor(name="chat") as reactor:
        try:
            return chat(reactor, args, events)
        except KeyboardInterrupt:
            say("interrupted")
            return 0
        except OSError as exc:
            print(f"chat: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
