"""The Winsock "accept" sample server (seed 004), in Python: non-blocking accept by notification.

The listening socket never blocks in ``accept``: the reactor calls ``on_accept``
when connections wait, and the handler accepts every one of them until
``WouldBlock`` (the notification is level-triggered, so none is left behind).
Each connection echoes the raw bytes it reads -- exactly the bytes read, NULs
included -- and the server reports how each one ended: a *graceful close* (the
client's end of stream, FIN) or an *abortive close* (a reset or another error).
Run ``accept_client.py`` against it to see the five ways a client can leave.

    python examples/accept_server.py --port 5150
    python examples/accept_client.py --port 5150 --scenario all
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading

from msgsock.callback import AsyncSocket, Reactor, WouldBlock

HIGH_WATER = 256 * 1024  # stop reading from a client whose echo we cannot send


_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print one whole line (callbacks and the main thread both print)."""
    with _print_lock:
        print(text, flush=True)


def where(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:5150`` or ``[::1]:5150``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class Echo(AsyncSocket):
    """One client: echo what it sends; once it has sent everything, finish the echo and close."""

    def __init__(self, server: Server) -> None:
        super().__init__(server.reactor)
        self.server = server
        self.peer = "unknown peer"
        self.pending = bytearray()
        self.bytes_in = 0
        self.peer_done = False  # the client's end of stream was read
        self.paused = False
        self.reported = False

    def on_receive(self) -> None:
        if len(self.pending) >= HIGH_WATER:
            self.paused = True  # no receive() call: no more on_receive until we re-enable it
            return
        try:
            data = self.receive()
        except WouldBlock:
            return
        except OSError as exc:
            self.failed(exc.errno)
            return
        self.bytes_in += len(data)
        self.pending += data
        self.flush()

    def on_send(self) -> None:
        self.flush()

    def flush(self) -> None:
        while self.pending:
            try:
                n = self.send(self.pending)
            except WouldBlock:
                return  # on_send fires when there is room again
            except OSError as exc:
                self.failed(exc.errno)
                return
            del self.pending[:n]
        if self.paused:
            self.paused = False
            self.async_select(self.events)  # re-enables on_receive, like a second WSAAsyncSelect
        if self.peer_done:
            try:
                self.shutdown()  # our end of stream, after the last echoed byte
            except OSError:
                pass  # already reset: closing is all that is left
            self.close()

    def on_close(self, error: int) -> None:
        if error:
            self.failed(error)
            return
        self.report("graceful close (end of stream)")
        self.peer_done = True
        self.flush()

    def failed(self, error: int | None) -> None:
        name = errno.errorcode.get(error or 0, str(error))
        self.report(f"abortive close ({name})")
        self.close()

    def report(self, how: str) -> None:
        if not self.reported:  # once per connection, whichever error is seen first
            self.reported = True
            self.server.ended(how.split()[0])
            say(f"{self.peer}: {how} after {self.bytes_in} bytes in")


class Server(AsyncSocket):
    def __init__(self, reactor: Reactor) -> None:
        super().__init__(reactor)
        self.connections = 0
        self.endings: dict[str, int] = {"graceful": 0, "abortive": 0}

    def on_accept(self) -> None:
        for _ in range(64):  # every waiting connection, bounded per notification
            conn = Echo(self)
            try:
                self.accept(conn)
            except WouldBlock:
                return
            except OSError as exc:  # e.g. out of file descriptors; the next notification retries
                say(f"accept failed: {exc}")
                return
            self.connections += 1
            try:
                conn.peer = where(conn.peer_name)
            except OSError:
                # Reset while it waited to be accepted: it is over before it began (and,
                # having no peer, it would get no notification), so report it here.
                say(f"{conn.peer}: accepted (connection {self.connections})")
                conn.failed(errno.ECONNRESET)
                continue
            say(f"{conn.peer}: accepted (connection {self.connections})")

    def ended(self, how: str) -> None:
        self.endings[how] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5150, help="TCP port; 0 picks a free one (default 5150)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    with Reactor(name="accept") as reactor:
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
    # Leaving the with-block stopped the reactor, which closed any connection still open.
    endings = server.endings
    say(f"{server.connections} connections: {endings['graceful']} graceful, {endings['abortive']} abortive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
