"""The reactor: one selector loop on its own thread (SPEC §5.3).

Theory of operation.  A :class:`Reactor` owns a :class:`selectors.DefaultSelector`
(epoll on Linux) and a thread that runs it.  Every
:class:`~msgsock.callback.AsyncSocket` belongs to one reactor, and **all socket state
changes happen on that reactor's thread** -- the rule that makes the CAsyncSocket
model safe without a lock per socket (MultiSoc, KB Q175668: a socket is used by the
thread that owns it).

One turn of the loop:

1. *sync*: every socket whose state changed since the last turn ("dirty") writes
   what it has buffered and tells the selector which events it now wants.  Doing
   this once per turn, not on every change, is what keeps a callback that disarms
   and re-arms a notification (``on_receive`` then ``receive``) from costing two
   ``epoll_ctl`` calls, and it batches the replies of one read into one write;
2. *wait* in ``select()`` (not at all when work is queued; else until the next
   timer);
3. *events*: hand each ready socket its readiness (it decides which callback, if
   any, that means -- see :mod:`msgsock.callback.socket` for the rules);
4. *timers* that are due;
5. *handoffs*: functions other threads queued with :meth:`Reactor.call_soon_threadsafe`
   (a ``deque`` plus one byte on a wakeup ``socketpair`` so a sleeping ``select``
   returns).  Only the functions queued before the turn started run in it.

Urgent (TCP out-of-band) data is not something ``selectors`` can wait for, so on
Linux the reactor keeps a second ``epoll`` object for ``EPOLLPRI`` and registers
*its* file descriptor in the main selector: the nested epoll becomes readable when
any watched socket has urgent data.  Elsewhere it checks ``select()``'s exceptional
set each turn and caps the wait at 50 ms while any socket asks for urgent data.

Calls from other threads: :meth:`Reactor.run_sync` runs a function on the reactor
thread and waits for its result (the socket methods use it); before :meth:`start`
and after :meth:`stop` there is no reactor thread, so it runs the function in the
caller's thread.  A reactor runs once: ``stop()`` closes every socket still
registered and ends the thread.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import select
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .._net import check_timeout
from ..exceptions import InvalidState, Timeout
from .dispatch import Dispatcher

if TYPE_CHECKING:
    from ._engine import _SocketEngine

__all__ = ["Reactor", "TimerHandle"]

log = logging.getLogger("msgsock.callback")

T = TypeVar("T")

READ_BUFFER_SIZE = 256 * 1024
"""Bytes a :class:`~msgsock.callback.MessageSocket` may read at once: many frames per read."""

_OOB_POLL_CAP = 0.05
"""Longest wait while urgent data is watched without epoll (exceptional-set polling)."""

_WAKE = object()  # selector data of the wakeup socket
_OOB = object()  # selector data of the nested EPOLLPRI epoll

_HAS_EPOLL = hasattr(select, "epoll")


class TimerHandle:
    """A call scheduled with :meth:`Reactor.call_later`; :meth:`cancel` it if unneeded."""

    __slots__ = ("_args", "_cancelled", "_fn", "_seq", "when")

    _counter = itertools.count()

    def __init__(self, when: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when = when
        self._fn = fn
        self._args = args
        self._cancelled = False
        self._seq = next(self._counter)  # ties run in the order they were scheduled

    def cancel(self) -> None:
        """Do not run the call (callable from any thread; a no-op once it ran)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled

    def __lt__(self, other: TimerHandle) -> bool:
        return (self.when, self._seq) < (other.when, other._seq)


class Reactor:
    """One event loop on its own thread; :class:`~msgsock.callback.AsyncSocket` objects register with it.

    Use it as a context manager (``with Reactor() as reactor:``) or call
    :meth:`start` and :meth:`stop`.

    Args:
        dispatcher: how socket callbacks are delivered by default: None runs them
            on the reactor thread; anything else is called as ``dispatcher(fn,
            *args)`` (see :mod:`msgsock.callback.dispatch`).  A socket may override it.
        name: the thread's name (shows in logs and debuggers).
    """

    def __init__(self, *, dispatcher: Dispatcher | None = None, name: str = "msgsock-reactor") -> None:
        self.dispatcher = dispatcher
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r.fileno(), selectors.EVENT_READ, _WAKE)
        self._oob_epoll: Any = None  # select.epoll on Linux, created on first use
        self._oob_socks: dict[int, _SocketEngine] = {}
        self._lock = threading.Lock()
        self._ready: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._wake_pending = False
        self._timers: list[TimerHandle] = []
        self._dirty: set[_SocketEngine] = set()
        self._sockets: set[_SocketEngine] = set()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._stopping = False
        self._closed = False  # the loop is over: no more handoffs
        self._read_buffer: memoryview | None = None

    def __repr__(self) -> str:
        state = "stopped" if self._closed else "running" if self._thread is not None else "new"
        return f"<Reactor {self.name} {state}, {len(self._sockets)} sockets>"

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Reactor:
        """Start the reactor thread; returns self.

        Raises:
            InvalidState: the reactor was started before (a reactor runs once).
        """
        with self._lock:
            if self._thread is not None or self._closed:
                raise InvalidState(f"{self!r} was already started")
            started = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(started,), name=self.name, daemon=True)
        self._thread.start()
        started.wait()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop, close every socket still registered, and end the thread.

        Functions already handed off with :meth:`call_soon_threadsafe` run first.
        Sockets are closed at once (no graceful flush): close them yourself first
        (:meth:`~msgsock.callback.MessageSocket.close` then ``wait_closed``) for a
        graceful end.  Idempotent; callable from any thread, including a callback on
        the reactor thread (then it returns without waiting).

        Args:
            timeout: seconds to wait for the thread to end; None waits as long as it takes.

        Raises:
            Timeout: the thread did not end within ``timeout``.
            ValueError: ``timeout`` is negative or NaN (nothing is stopped then).
            TypeError: ``timeout`` is not a number.
        """
        check_timeout(timeout)
        with self._lock:
            thread = self._thread
            self._stopping = True
            never_started = thread is None and not self._closed
        if never_started:
            self._finish()
            return
        if thread is None:
            return
        self._wakeup()
        if threading.get_ident() == self._thread_id:
            return
        thread.join(timeout)
        if thread.is_alive():
            raise Timeout(f"{self!r} did not stop within {timeout} s")

    def __enter__(self) -> Reactor:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and the end of :meth:`stop`."""
        return self._thread is not None and not self._closed

    def in_reactor_thread(self) -> bool:
        """True when called from this reactor's own thread."""
        return threading.get_ident() == self._thread_id

    def _inline(self) -> bool:
        # Run an operation in the caller's thread: there is no other thread to hand
        # it to (not started, or stopped), or we are that thread.
        return self._thread_id is None or self._closed or threading.get_ident() == self._thread_id

    # -- handing work to the reactor thread ---------------------------------------------

    def call_soon_threadsafe(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor thread, in call order, at its next turn.

        Callable from any thread (this is the thread-safe queue + wakeup socketpair
        of SPEC §5.3).  An exception raised by ``fn`` is logged.

        Raises:
            InvalidState: the reactor was stopped.
        """
        with self._lock:
            if self._closed:
                raise InvalidState(f"{self!r} is stopped")
            self._ready.append((fn, args))
            if self._wake_pending or threading.get_ident() == self._thread_id:
                return
            self._wake_pending = True
        self._wakeup()

    call_soon = call_soon_threadsafe

    def _call_soon_quiet(self, fn: Callable[..., object], /, *args: Any) -> bool:
        # Internal handoffs that may race with stop(): dropping them then is right
        # (every socket is being closed anyway).
        try:
            self.call_soon_threadsafe(fn, *args)
        except InvalidState:
            return False
        return True

    def call_later(self, delay: float, fn: Callable[..., object], /, *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` on the reactor thread after ``delay`` seconds.

        Callable from any thread.

        Raises:
            InvalidState: the reactor was stopped.
        """
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn, args)
        if self.in_reactor_thread() or self._thread_id is None:
            heapq.heappush(self._timers, handle)
        else:
            self.call_soon_threadsafe(heapq.heappush, self._timers, handle)
        return handle

    def run_sync(self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None) -> T:
        """Run ``fn(*args)`` on the reactor thread and return its result (or raise its exception).

        From the reactor thread itself, and when there is no reactor thread (before
        :meth:`start`, after :meth:`stop`), ``fn`` runs at once in the caller's
        thread.  Calling this from one reactor's thread for another reactor blocks
        the first until the second answers: never let two reactors wait on each
        other.

        Raises:
            Timeout: ``fn`` had not finished after ``timeout`` seconds (it may still run).
            ValueError: ``timeout`` is negative or NaN (``fn`` is not run).
            TypeError: ``timeout`` is not a number.
        """
        if timeout is not None:
            check_timeout(timeout)
        if self._inline():
            return fn(*args)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        try:
            self.call_soon_threadsafe(run)
        except InvalidState:
            return fn(*args)  # the loop just ended: nobody else touches the sockets now
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Timeout(f"{fn!r} did not run on {self!r} within {timeout} s") from None

    def _wakeup(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wakeup is already pending) or closed (stopping)
            pass

    # -- socket bookkeeping (reactor thread, or inline) --------------------------------

    def _add(self, sock: _SocketEngine) -> None:
        self._sockets.add(sock)

    def _remove(self, sock: _SocketEngine) -> None:
        self._sockets.discard(sock)
        self._dirty.discard(sock)

    def _mark_dirty(self, sock: _SocketEngine) -> None:
        self._dirty.add(sock)

    def _watch_oob(self, sock: _SocketEngine, fd: int) -> None:
        self._oob_socks[fd] = sock
        if _HAS_EPOLL:
            if self._oob_epoll is None:
                self._oob_epoll = select.epoll()
                self._selector.register(self._oob_epoll.fileno(), selectors.EVENT_READ, _OOB)
            self._oob_epoll.register(fd, select.EPOLLPRI)

    def _unwatch_oob(self, fd: int) -> None:
        if self._oob_socks.pop(fd, None) is not None and self._oob_epoll is not None:
            try:
                self._oob_epoll.unregister(fd)
            except OSError:  # already gone from the epoll set
                pass

    def _get_read_buffer(self) -> memoryview:
        # One read buffer per reactor thread, shared by its MessageSockets: reads and
        # parsing run back to back on this thread and the decoder copies what it keeps,
        # so an idle connection costs no buffer (SPEC §8).
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
        return self._read_buffer

    # -- the loop ---------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        self._thread_id = threading.get_ident()
        started.set()
        try:
            while not self._stopping:
                self._run_once()
        except BaseException:
            log.critical("%r: the event loop failed; closing every socket", self, exc_info=True)
            raise
        finally:
            self._finish()

    def _run_once(self) -> None:
        self._sync_dirty()
        timeout: float | None
        if self._ready or self._dirty:
            timeout = 0.0
        else:
            timers = self._timers
            while timers and timers[0].cancelled:
                heapq.heappop(timers)
            timeout = max(0.0, timers[0].when - time.monotonic()) if timers else None
        if self._oob_socks and not _HAS_EPOLL:
            timeout = _OOB_POLL_CAP if timeout is None else min(timeout, _OOB_POLL_CAP)
        for key, mask in self._selector.select(timeout):
            data = key.data
            if data is _WAKE:
                self._drain_wakeup()
            elif data is _OOB:
                self._poll_oob()
            else:
                data._handle_events(mask)
        if self._oob_socks and not _HAS_EPOLL:
            self._poll_oob_fallback()
        if self._timers:
            self._run_timers()
        if self._ready:
            self._run_ready()

    def _sync_dirty(self) -> None:
        # Swap the set first: a socket that dirties itself again goes to the next turn.
        dirty, self._dirty = self._dirty, set()
        for sock in dirty:
            sock._sync_guarded()

    def _drain_wakeup(self) -> None:
        # Read the bytes first, then clear the flag: a thread that saw the flag set
        # queued its function before the clear, and the handoffs of this turn run
        # after this.  (Clearing first could swallow the byte of a handoff that set
        # the flag again, and the loop would sleep with work queued.)
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass
        with self._lock:
            self._wake_pending = False

    def _poll_oob(self) -> None:
        for fd, events in self._oob_epoll.poll(0):
            sock = self._oob_socks.get(fd)
            if sock is not None:
                sock._handle_oob(bool(events & select.EPOLLPRI))

    def _poll_oob_fallback(self) -> None:
        fds = list(self._oob_socks)
        try:
            _, _, urgent = select.select([], [], fds, 0)
        except (OSError, ValueError):
            return
        for fd in urgent:
            sock = self._oob_socks.get(fd)
            if sock is not None:
                sock._handle_oob(True)

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        due: list[TimerHandle] = []
        while timers and timers[0].when <= now:
            due.append(heapq.heappop(timers))
        for handle in due:
            if not handle.cancelled:
                handle._cancelled = True  # ran: a later cancel() is a no-op
                self._call_guarded(handle._fn, handle._args)

    def _run_ready(self) -> None:
        ready = self._ready
        for _ in range(len(ready)):
            fn, args = ready.popleft()
            self._call_guarded(fn, args)

    @staticmethod
    def _call_guarded(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:  # never let one function kill the reactor
            log.exception("function %r run by the reactor raised", fn)

    def _finish(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Run what was handed off before the stop so every run_sync caller gets an answer.
        while self._ready:
            fn, args = self._ready.popleft()
            self._call_guarded(fn, args)
        for sock in list(self._sockets):
            try:
                sock._close_now()
            except Exception:
                log.exception("closing %r at reactor stop failed", sock)
        self._sockets.clear()
        self._dirty.clear()
        self._timers.clear()
        if self._oob_epoll is not None:
            self._oob_epoll.close()
        self._oob_socks.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
