"""Small helpers shared by the I/O layers (not part of the sans-I/O core).

Socket helpers, and the argument checks of the I/O layers' API edges (``connect``,
``serve``, the servers' constructors, the ``timeout=`` parameters): each check is
written once here so that every layer rejects the same arguments with the same
words, before any I/O (issue 11).
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket

__all__ = [
    "DEFAULT_LOGGER",
    "check_async_function",
    "check_callable",
    "check_port",
    "check_timeout",
    "is_async_function",
    "server_logger",
    "set_nodelay",
]

DEFAULT_LOGGER = "msgsock.server"
"""The logger every server (asyncio, threaded, UDP) writes to unless given another."""

MAX_PORT = 65535

_NUMBER = (int, float)  # a tuple: ``int | float`` would be built anew at each call


def server_logger(logger: logging.Logger | None) -> logging.Logger:
    """Return ``logger``, or the servers' shared default ``logging.getLogger("msgsock.server")``."""
    return logger if logger is not None else logging.getLogger(DEFAULT_LOGGER)


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle on a TCP socket: messages are written whole, so batching is ours to do."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the socket may already be reset; the next I/O call will report it
            pass


# -- argument checks ----------------------------------------------------------------------


def check_port(port: object) -> int:
    """Return ``port`` as an int if it is a TCP/UDP port number, 0..65535.

    The C library takes a port modulo 65536 (``getaddrinfo`` of 75535 is port
    10000) and ``socket.connect`` raises ``OverflowError``; every API that takes a
    port calls this first so that neither happens.

    Raises:
        ValueError: ``port`` is out of range (``port 70000: must be 0..65535``), a
            bool, or not an int (``port '80': must be an int 0..65535, not str``).
    """
    if isinstance(port, int) and not isinstance(port, bool):
        if 0 <= port <= MAX_PORT:
            return int(port)
        raise ValueError(f"port {port}: must be 0..{MAX_PORT}")
    raise ValueError(f"port {port!r}: must be an int 0..{MAX_PORT}, not {type(port).__name__}")


def check_timeout(value: float | None, name: str = "timeout") -> float | None:
    """Return ``value`` if it is None or a number of seconds >= 0 (``inf`` included).

    Raises:
        TypeError: not a number (a bool neither), naming the type received.
        ValueError: negative or NaN (``timeout -1: must be >= 0 seconds or None``).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if not value >= 0:  # NaN compares false too
        raise ValueError(f"{name} {value!r}: must be >= 0 seconds or None")
    return value


def _describe(obj: object) -> str:
    """``function 'name'``, ``Echo object``, ``bytes``: what a wrong handler is, for an error message."""
    if isinstance(obj, functools.partial):
        return f"functools.partial of {_describe(obj.func)}"
    kind = type(obj).__name__
    name = getattr(obj, "__name__", None)
    if isinstance(name, str) and not isinstance(obj, type):
        return f"{kind} {name!r}"
    if isinstance(obj, type):
        return f"class {obj.__name__!r}"
    return f"{kind} object" if callable(obj) else kind


def check_callable(value: object, name: str) -> None:
    """Check that a handler given to a server is callable (None is the caller's business).

    Raises:
        TypeError: it is not (``handler must be callable, got bytes``).
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {_describe(value)}")


def is_async_function(value: object) -> bool:
    """True for an ``async def`` function or method, a ``functools.partial`` of one, or an
    object whose ``__call__`` is one: what calling returns is a coroutine."""
    while isinstance(value, functools.partial):
        value = value.func
    if inspect.iscoroutinefunction(value):
        return True
    if isinstance(value, type) or not callable(value):
        return False  # calling a class makes an instance, never a coroutine
    return inspect.iscoroutinefunction(type(value).__call__)


def check_async_function(value: object, name: str) -> None:
    """Check that a handler that is awaited is an async function (see :func:`is_async_function`).

    A plain function would only fail once called, on every connection, with
    "object NoneType can't be used in 'await' expression".

    Raises:
        TypeError: it is not (``connection_handler must be an async function (async
            def); got function 'handle'``).
    """
    if not is_async_function(value):
        raise TypeError(f"{name} must be an async function (async def); got {_describe(value)}")
