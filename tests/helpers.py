"""Shared test helpers: scaled timeouts, condition waiting, IPv6 availability (STYLE §8)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

__all__ = ["free_loopback6", "unit", "wait_for"]


def unit(n: float = 1.0) -> float:
    """Return ``n`` timeout units, scaled by ``MSGSOCK_TEST_TIMEOUT_SCALE``.

    Slow CI machines set the environment variable to stretch every timeout
    uniformly instead of editing individual tests.

    Args:
        n: Number of units (seconds at scale 1).

    Returns:
        The scaled timeout in seconds.
    """
    return n * float(os.environ.get("MSGSOCK_TEST_TIMEOUT_SCALE", "1"))


def wait_for(predicate: Callable[[], object], timeout: float | None = None, *, message: str = "") -> None:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` expires.

    Waits on a condition with short, growing pauses (never a fixed sleep used
    as synchronization).

    Args:
        predicate: Zero-argument callable; polling stops when it is truthy.
        timeout: Seconds to wait; defaults to ``unit(5)``.
        message: Extra text for the assertion message.

    Raises:
        AssertionError: If the predicate is still false after ``timeout``.
    """
    if timeout is None:
        timeout = unit(5)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    # One last check so a condition that became true during the final pause counts.
    if predicate():
        return
    raise AssertionError(f"condition not met within {timeout:.3f}s" + (f": {message}" if message else ""))


_loopback6: bool | None = None


def free_loopback6() -> bool:
    """Return True when a socket can be bound to ``::1`` on this machine.

    The result is cached; IPv6 tests skip with a reason when it is False.

    Returns:
        Whether IPv6 loopback is usable.
    """
    global _loopback6
    if _loopback6 is None:
        if not socket.has_ipv6:
            _loopback6 = False
        else:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                    s.bind(("::1", 0))
                _loopback6 = True
            except OSError:
                _loopback6 = False
    return _loopback6
