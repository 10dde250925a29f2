"""Small socket helpers shared by the I/O layers (not part of the sans-I/O core)."""

from __future__ import annotations

import logging
import socket

__all__ = ["DEFAULT_LOGGER", "server_logger", "set_nodelay"]

DEFAULT_LOGGER = "msgsock.server"
"""The logger every server (asyncio, threaded, UDP) writes to unless given another."""


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
