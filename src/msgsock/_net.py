"""Small socket helpers shared by the I/O layers (not part of the sans-I/O core)."""

from __future__ import annotations

import logging
import socket
from typing import Any

__all__ = ["DEFAULT_LOGGER", "format_address", "server_logger", "set_nodelay"]

DEFAULT_LOGGER = "msgsock.server"
"""The logger every server (asyncio, threaded, UDP) writes to unless given another."""


def server_logger(logger: logging.Logger | None) -> logging.Logger:
    """Return ``logger``, or the servers' shared default ``logging.getLogger("msgsock.server")``."""
    return logger if logger is not None else logging.getLogger(DEFAULT_LOGGER)


def format_address(address: Any) -> str:
    """Format a socket address for logs: ``127.0.0.1:9898``, ``[::1]:9898``, or str() of anything else.

    ``None`` (a peer that reset the connection before its address could be read)
    becomes ``unknown peer``.
    """
    if address is None:
        return "unknown peer"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if ":" in str(host):
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    return str(address)


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle on a TCP socket: messages are written whole, so batching is ours to do."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the socket may already be reset; the next I/O call will report it
            pass
