"""Cancelling blocking calls from another thread (SPEC §5.2, ``CSocket::CancelBlockingCall``).

:class:`CancelToken` is the handle given to :func:`~msgsock.sync.connect`: its
:meth:`~CancelToken.cancel` aborts a connect (or its handshake) in progress and,
the token staying attached to the new connection, later cancels that connection's
blocking calls.  :class:`_CancellableWait` is the connect's wait on one socket
that such a cancel, or the connect deadline, ends: a wake-up socket pair the
token's callback writes to, so a cancel that lands before the wait starts is seen
too.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..exceptions import Cancelled
from ..protocol import format_address

__all__ = ["CancelToken"]


class CancelToken:
    """A one-shot cancel switch that another thread flips (``CSocket::CancelBlockingCall``).

    Pass it to :func:`connect` to make the connect (and its handshake) cancellable;
    the token then stays attached to the :class:`Connection`, so the same
    :meth:`cancel` also cancels the connection's blocking calls (see
    :meth:`Connection.cancel`).  It can also be given to
    :class:`~msgsock.sync.SocketFile`.  One token may serve several objects: cancelling
    it cancels all of them.  It cannot be reset; make a new token for new work.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next_key = 0

    def __repr__(self) -> str:
        return f"<CancelToken {'cancelled' if self._cancelled else 'active'}>"

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Cancel, from any thread, everything this token is attached to.  Idempotent; never blocks."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            callback()

    def _subscribe(self, callback: Callable[[], object]) -> int | None:
        """Call ``callback`` on :meth:`cancel` (at once if already cancelled: then None is returned)."""
        with self._lock:
            if not self._cancelled:
                key = self._next_key
                self._next_key += 1
                self._callbacks[key] = callback
                return key
        callback()
        return None

    def _unsubscribe(self, key: int | None) -> None:
        """Forget a callback (a closed object must not be kept alive by a long-lived token)."""
        if key is not None:
            with self._lock:
                self._callbacks.pop(key, None)


class _CancellableWait:
    """Waits on one socket for a connect, until a deadline or a token's cancel.

    The socket is non-blocking; a wake-up socket pair is the second thing waited on,
    and the token's callback writes to it.  A byte in a socket is state, so a cancel
    that lands before the wait starts is seen too (no lost wake-up).
    """

    def __init__(self, token: CancelToken, timeout: float | None) -> None:
        self._token = token
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()  # not select(): no FD_SETSIZE limit
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._key = token._subscribe(self._wake)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (already woken) or closed (already done)

    def check(self, address: Any) -> None:
        """Raise Cancelled if the token was cancelled."""
        if self._token.cancelled:
            raise Cancelled(f"connecting to {format_address(address)} was cancelled")

    def wait(self, sock: socket.socket, address: Any, *, write: bool) -> None:
        """Wait until ``sock`` is writable (``write``) or readable.

        Raises:
            Cancelled: the token was cancelled.
            TimeoutError: the deadline passed.
        """
        # On Windows a failed connect shows only as "exceptional"; the selector then
        # watches that too for EVENT_WRITE (SelectSelector passes the write set twice).
        self._selector.register(sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ)
        try:
            while True:
                self.check(address)
                timeout = None if self._deadline is None else self._deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                events = self._selector.select(timeout)
                self.check(address)
                if any(key.fileobj is sock for key, _ in events):
                    return
        finally:
            self._selector.unregister(sock)

    def close(self) -> None:
        self._token._unsubscribe(self._key)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
