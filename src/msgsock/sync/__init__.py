"""Blocking I/O (SPEC §5.2): :func:`connect`, :class:`Connection`, :class:`ThreadedServer`, :class:`SocketFile`.

The CSocket model of the seeds: every call blocks the calling thread until it is done
(or its timeout runs out).  One thread may send while another receives on the same
:class:`Connection`; a second send (or receive) at the same time raises
:class:`~msgsock.exceptions.ConcurrencyError`.  Another thread can cancel a blocked
call (``CSocket::CancelBlockingCall``): :meth:`Connection.cancel`, or a
:class:`CancelToken` given to :func:`connect` (it aborts the connect itself too).
:class:`ThreadedServer` runs one thread per connection, the MFCAsync AsyncServer
model (KB Q192570); a ``connection_handler`` is given its :class:`ServerConnection`.
:class:`SocketFile` is ``CSocketFile``: a file over a stream socket for
:class:`~msgsock.archive.ArchiveReader` / :class:`~msgsock.archive.ArchiveWriter`,
the CSocket + CSocketFile + CArchive sequence of operations (seed 001).

Both are pumps over the sans-I/O core (SPEC §5.0): a :class:`Connection` over one
:class:`~msgsock.protocol.MessageProtocol`, the server over one
:class:`~msgsock.serving.ServerProtocol`, so they end, time out, log and count
connections as every other layer does.

Security options (SPEC §4.2, §7): ``ThreadedServer(ssl=..., auth_key=...,
proxy_protocol=True)`` and ``connect(ssl=..., auth_key=...)``.  The stages (PROXY
header, TLS, authentication) are :class:`~msgsock.stages.Stages` inside the
protocol, run on the connection's own thread, in that order within one
``limits.handshake_timeout`` (``connect_timeout`` for a client), before the frames.
"""

from __future__ import annotations

from .connection import CancelToken, Connection, connect
from .server import ServerConnection, ThreadedServer
from .socketfile import SocketFile

__all__ = ["CancelToken", "Connection", "ServerConnection", "SocketFile", "ThreadedServer", "connect"]
