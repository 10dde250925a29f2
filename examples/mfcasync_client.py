"""The MFCAsync AsyncClient (KB Q192570) as a script: the reverse-and-send-back loop.

As in the original, all network work runs on its own thread, apart from the main
thread (the GUI thread there; here it only waits and handles Ctrl-C).  The worker
connects, sends the first message, then for each round receives the echo, checks it
is exactly what was sent, reverses it and sends that back.  Exit status 1 on a
mismatch, an early disconnect or a failure to connect.

    python examples/mfcasync_client.py --host localhost --rounds 100 --message "Hello, MFC"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from msgsock.exceptions import ConnectionClosed, MsgsockError
from msgsock.sync import Connection, connect


class Worker(threading.Thread):
    """The network thread: connect, send, then receive / verify / reverse / send back."""

    def __init__(self, host: str, port: int, message: bytes, rounds: int, timeout: float) -> None:
        super().__init__(name="network", daemon=True)
        self.host, self.port, self.message = host, port, message
        self.rounds, self.timeout = rounds, timeout
        self.done = 0
        self.rtts: list[float] = []
        self.error: str | None = None
        self.conn: Connection | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self.conn = connect(self.host, self.port, connect_timeout=self.timeout)
        except OSError as exc:
            self.error = f"cannot connect to {self.host}:{self.port}: {exc}"
            return
        with self.conn as conn:
            try:
                self.loop(conn)
            except ConnectionClosed as exc:
                if not self.stopping.is_set():
                    self.error = f"disconnected after {self.done} rounds: {exc}"
            except (MsgsockError, OSError) as exc:
                self.error = f"failed after {self.done} rounds: {exc}"

    def loop(self, conn: Connection) -> None:
        outgoing = self.message
        sent_at = time.perf_counter()
        conn.send(outgoing)
        while self.done < self.rounds and not self.stopping.is_set():
            echo = conn.receive(timeout=self.timeout)
            self.rtts.append(time.perf_counter() - sent_at)
            if echo != outgoing:
                self.error = f"round {self.done + 1}: echo {echo[:40]!r} differs from {outgoing[:40]!r}"
                return
            self.done += 1
            if self.done < self.rounds:
                outgoing = echo[::-1]
                sent_at = time.perf_counter()
                conn.send(outgoing)

    def stop(self) -> None:
        """Ask the loop to end (from the main thread); closing wakes a blocked receive."""
        self.stopping.set()
        if self.conn is not None:
            self.conn.close(timeout=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server name or address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9898, help="server port (default 9898)")
    parser.add_argument("--message", default="Hello from MFCAsync", help="the first message")
    parser.add_argument("--rounds", type=int, default=10, help="echoes to verify (default 10)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to connect and per echo")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    worker = Worker(args.host, args.port, args.message.encode("utf-8"), args.rounds, args.timeout)
    worker.start()
    try:
        # The main thread stays free, as the GUI thread of the original; a timed join
        # lets Ctrl-C through.
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        worker.stop()
        worker.join(5.0)
        print(f"interrupted after {worker.done} rounds", file=sys.stderr)
        return 1
    if worker.error is not None:
        print(worker.error, file=sys.stderr)
        return 1
    ms = sorted(rtt * 1000 for rtt in worker.rtts)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{worker.done} rounds, all verified, RTT p50 {p50:.3f} ms, p99 {p99:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
