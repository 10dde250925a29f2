"""Where callbacks run: on the reactor thread, or handed to another thread (SPEC §5.3).

A *dispatcher* is any callable ``dispatcher(fn, *args)`` that arranges for
``fn(*args)`` to run somewhere.  The reactor calls it instead of calling a socket's
callback itself, so a UI thread can receive ``on_message`` and friends while the
reactor thread goes on reading and writing every socket (the MFCAsync design of KB
Q192570: "the blocking of the GUI message pump does not affect the delivery of
socket messages").

- ``None`` (the default of :class:`~msgsock.callback.Reactor`) and :func:`direct`
  run callbacks on the reactor thread, as they are produced.
- :class:`QueueDispatcher` queues them for the thread that calls
  :meth:`~QueueDispatcher.run_pending` or :meth:`~QueueDispatcher.run_forever`.
- Anything else with the same call signature works, e.g. a GUI toolkit's
  "call this on the UI thread" function.  A dispatcher must not block for long: the
  reactor thread calls it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any, TypeAlias

from .._net import check_timeout

__all__ = ["Dispatcher", "QueueDispatcher", "direct"]

log = logging.getLogger("msgsock.callback")

Dispatcher: TypeAlias = Callable[..., object]
"""``dispatcher(fn, *args)``: run ``fn(*args)`` now or later, on some thread."""


def direct(fn: Callable[..., object], /, *args: Any) -> None:
    """The dispatcher that calls ``fn(*args)`` at once, on the calling (reactor) thread.

    Pass it as a socket's ``dispatcher`` to keep that socket's callbacks on the
    reactor thread when the reactor's default dispatcher sends them elsewhere.
    """
    fn(*args)


_Item: TypeAlias = "tuple[Callable[..., object], tuple[Any, ...]] | None"


class QueueDispatcher:
    """Queue callbacks for a consumer thread (a UI thread) to run.

    The reactor thread only puts ``(fn, args)`` on an unbounded :class:`queue.Queue`,
    which never blocks, so a consumer that is busy (or asleep) delays only its own
    callbacks, never the reactor.

    Example::

        ui = QueueDispatcher()
        with Reactor(dispatcher=ui) as reactor:
            ...
            ui.run_forever()        # on the UI thread, until ui.stop()
    """

    def __init__(self) -> None:
        self.queue: queue.Queue[_Item] = queue.Queue()
        self._stopped = False

    def __call__(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Queue ``fn(*args)`` for the consumer thread (called by the reactor)."""
        self.queue.put((fn, args))

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was processed by the consumer."""
        return self._stopped

    def run_pending(self, timeout: float | None = 0.0) -> int:
        """Run the callbacks that are queued, waiting up to ``timeout`` for the first.

        Runs at most the callbacks queued when the first one is taken (plus that
        one), so a producer that never stops cannot keep the caller here forever.
        An exception raised by a callback is logged and does not stop the others.

        Args:
            timeout: seconds to wait for a first callback; 0 does not wait; None
                waits until one arrives (or :meth:`stop`).

        Returns:
            The number of callbacks run.

        Raises:
            ValueError: ``timeout`` is negative or NaN.
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        if self._stopped:
            return 0
        try:
            if timeout is None:
                item = self.queue.get()
            elif timeout <= 0:
                item = self.queue.get_nowait()
            else:
                item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return 0
        count = 0
        budget = self.queue.qsize()
        while True:
            if item is None:
                self._stopped = True
                return count
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("dispatched callback %r raised", fn)
            count += 1
            if budget <= 0:
                return count
            budget -= 1
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return count

    def run_forever(self, timeout: float | None = None) -> None:
        """Run callbacks as they arrive until :meth:`stop` is called (or ``timeout``).

        Args:
            timeout: give up after this many seconds; None runs until :meth:`stop`.

        Raises:
            ValueError: ``timeout`` is negative or NaN.
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped:
            if deadline is None:
                self.run_pending(None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.run_pending(remaining)

    def stop(self) -> None:
        """Make :meth:`run_forever` return once the callbacks queued before it have run.

        Callable from any thread.
        """
        self.queue.put(None)
