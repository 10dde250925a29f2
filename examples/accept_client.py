"""The test client of the Winsock "accept" sample (seed 004): five ways for a connection to end.

Run it against ``accept_server.py``; the server must survive every one and say how
each connection ended.  The scenarios, as in the original client:

1. **Graceful.**  Send data, shut down the sending side (``SD_SEND``: a FIN), read
   the echo to end of stream, close.  The server sees a graceful close after all
   the data and echoes every byte; the client checks the echo is identical.
2. **Close without shutdown.**  Send data and close at once.  The server still
   sees a FIN (a graceful close), but its echo reaches a closed socket, whose
   system answers with a reset; the server must cope with the failing send.
3. **Connect and close.**  Close without sending anything: a graceful close after
   0 bytes.
4. **Abortive close.**  Send data, then close with ``SO_LINGER`` on and a zero
   timeout (:meth:`~msgsock.callback.AsyncSocket.abort`): a reset (RST) instead of a
   FIN, and unsent data is discarded.  The server sees an abortive close
   (``ECONNRESET``).
5. **Shut down both directions.**  ``shutdown(SD_BOTH)`` right after connecting,
   then close: a FIN with nothing before it, a graceful close after 0 bytes.

Usage:
    python examples/accept_client.py --port 5150 --scenario 1
    python examples/accept_client.py --port 5150 --scenario all

Each scenario prints one line; the exit status is 1 if a connection could not be
made or the echo of scenario 1 was wrong.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from msgsock.callback import AsyncSocket, Reactor, WouldBlock

DATA = b"accept sample data\x00 that goes on after a NUL\n" * 64  # 2880 bytes


def where(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``127.0.0.1:5150`` or ``[::1]:5150``."""
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class Probe(AsyncSocket):
    """A client socket the main thread drives; the callbacks only record what happened."""

    def __init__(self, reactor: Reactor) -> None:
        super().__init__(reactor)
        self.connected = threading.Event()
        self.connect_error = 0
        self.writable = threading.Event()
        self.echo = bytearray()
        self.ended = threading.Event()
        self.end_error = 0

    def on_connect(self, error: int) -> None:
        self.connect_error = error
        self.connected.set()

    def on_send(self) -> None:
        self.writable.set()

    def on_receive(self) -> None:
        try:
            self.echo += self.receive()
        except (WouldBlock, OSError):
            pass  # an error is reported once more through on_close

    def on_close(self, error: int) -> None:
        self.end_error = error
        self.ended.set()

    def send_all(self, data: bytes, timeout: float) -> None:
        """Send everything, waiting for on_send whenever the kernel takes only part."""
        view = memoryview(data)
        while view:
            self.writable.clear()  # before send(): an on_send it arms must not be missed
            try:
                view = view[self.send(view) :]
            except WouldBlock:
                pass
            if view and not self.writable.wait(timeout):
                raise TimeoutError(f"could not send within {timeout:g} s")


def run_scenario(number: int, reactor: Reactor, host: str, port: int, timeout: float) -> tuple[str, bool]:
    """Run one scenario; return its report line and whether it went as expected."""
    probe = Probe(reactor)
    probe.create()
    probe.connect(host, port)
    if not probe.connected.wait(timeout):
        probe.close()
        raise TimeoutError(f"no connection to {where((host, port))} within {timeout:g} s")
    if probe.connect_error:
        probe.close()
        raise OSError(probe.connect_error, f"cannot connect to {where((host, port))}")
    me = where(probe.sock_name)
    ok = True
    if number == 1:
        probe.send_all(DATA, timeout)
        probe.shutdown(socket.SHUT_WR)
        finished = probe.ended.wait(timeout)
        ok = finished and probe.end_error == 0 and bytes(probe.echo) == DATA
        verdict = "identical" if ok else "NOT identical" if finished else "no end of stream"
        what = (
            f"sent {len(DATA)} bytes, shut down sending, read {len(probe.echo)} bytes of echo "
            f"to end of stream: {verdict}"
        )
        probe.close()
    elif number == 2:
        probe.send_all(DATA, timeout)
        probe.close()
        what = f"sent {len(DATA)} bytes and closed without shutdown"
    elif number == 3:
        probe.close()
        what = "connected and closed without sending"
    elif number == 4:
        probe.send_all(DATA, timeout)
        probe.abort()
        what = f"sent {len(DATA)} bytes, then abortive close (SO_LINGER 0: reset)"
    else:
        probe.shutdown(socket.SHUT_RDWR)
        probe.close()
        what = "shut down both directions at once, then closed"
    probe.wait_closed(timeout)
    return f"scenario {number} from {me}: {what}", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5150, help="server port (default 5150)")
    parser.add_argument("--scenario", choices=["1", "2", "3", "4", "5", "all"], default="all")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for each wait (default 10)")
    args = parser.parse_args(argv)

    numbers = range(1, 6) if args.scenario == "all" else [int(args.scenario)]
    all_ok = True
    with Reactor(name="accept-client") as reactor:
        for number in numbers:
            try:
                line, ok = run_scenario(number, reactor, args.host, args.port, args.timeout)
            except OSError as exc:
                print(f"scenario {number}: {exc}", file=sys.stderr)
                return 1
            print(line, flush=True)
            all_ok = all_ok and ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
