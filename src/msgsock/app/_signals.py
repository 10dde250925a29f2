"""SIGINT and SIGTERM for the commands: one way to ask a run to stop (SPEC §6).

Every command that runs until stopped -- ``serve`` (threads, processes, UDP) and
``stress`` -- installs the same two handlers for the length of the run and puts back
what was there before, so an embedding program (or a test) keeps its own handlers.
The asyncio engine uses ``loop.add_signal_handler`` instead, inside its loop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "run_until_stopped", "stop_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that ask a command to stop gracefully."""

_WAKE_INTERVAL = 0.5
"""Seconds between wake-ups of a main thread waiting for a stop (so it runs the handler)."""


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[], None]) -> Iterator[None]:
    """Call ``on_stop()`` on SIGINT or SIGTERM inside the block; restore the old handlers after.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    ``on_stop`` runs in the main thread between bytecodes: keep it to setting a flag
    or an event, or writing to a wake-up socket.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        on_stop()

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_until_stopped(start: Callable[[], None], shutdown: Callable[[], None]) -> None:
    """``start()``, then wait for SIGINT or SIGTERM, then ``shutdown()`` (always, once started).

    What a threaded server's command does: the main thread only waits, waking every
    half second so the signal handler runs on every platform.
    """
    stop = threading.Event()
    with stop_signals(stop.set):
        try:
            start()
            while not stop.wait(_WAKE_INTERVAL):
                pass
        finally:
            shutdown()
