"""asyncio I/O for msgsock (SPEC §5.1): :func:`connect`, :func:`serve` and helpers.

Works on the stock asyncio event loop and on uvloop.  Importing this package never
changes the event loop policy; :func:`install_uvloop` and :func:`run` are the
explicit ways to use uvloop (SPEC §3: uvloop when present, stock asyncio otherwise).

Both are thin pumps over the sans-I/O core (STYLE §1, §11): a connection's
:class:`~msgsock.protocol.MessageProtocol` and a server's
:class:`~msgsock.serving.ServerProtocol` decide what happens; the asyncio code only
moves bytes, so these behave as every other layer and engine does (SPEC §5.0).

Security options (SPEC §4.2, §7): ``serve(ssl=..., auth_key=..., proxy_protocol=True)``
and ``connect(ssl=..., auth_key=...)``.  The stages (PROXY header, TLS through
``ssl.SSLObject`` over memory BIOs, authentication) run inside the core, in that
order and within one ``limits.handshake_timeout`` on a server; the transport is
always plain TCP.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .connection import Connection, connect
from .server import ConnectionHandler, Handler, Server, serve

__all__ = [
    "Connection",
    "ConnectionHandler",
    "Handler",
    "Server",
    "connect",
    "install_uvloop",
    "run",
    "serve",
]

T = TypeVar("T")


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if sys.platform == "win32":  # uvloop does not support Windows
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def install_uvloop() -> bool:
    """Make uvloop the event loop policy when uvloop is importable (not on Windows).

    The library never does this on its own; the command line calls it.

    Returns:
        True when uvloop's policy was installed, False when stock asyncio stays.
    """
    if _uvloop_factory() is None:
        return False
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion like :func:`asyncio.run`, on uvloop when available.

    Falls back to the stock asyncio event loop when uvloop cannot be imported.

    Args:
        main: the coroutine to run.

    Returns:
        What ``main`` returned.

    Raises:
        Whatever ``main`` raises.
    """
    factory = _uvloop_factory()
    if factory is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
