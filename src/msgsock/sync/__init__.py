"""Blocking I/O (SPEC §5.2): :func:`connect`, :class:`Connection`, :class:`ThreadedServer`, :class:`SocketFile`.

The CSocket model of the seeds: every call blocks the calling thread until it is done
(or its timeout runs out).  One thread may send while another receives on the same
:class:`Connection`; a second send (or receive) at the same time raises
:class:`~msgsock.exceptions.ConcurrencyError`.  Another thread can cancel a blocked
call (``CSocket::CancelBlockingCall``): :meth:`Connection.cancel`, or a
:class:`CancelToken` given to :func:`connect` (it aborts the connect itself too).
:class:`ThreadedServer` runs one thread per connection, the MFCAsync AsyncServer
model (KB Q192570).  :class:`SocketFile` is ``CSocketFile``: a file over a stream
socket for :class:`~msgsock.archive.ArchiveReader` / :class:`~msgsock.archive.ArchiveWriter`,
the CSocket + CSocketFile + CArchive sequence of operations (seed 001).

Security options (SPEC §4.2, §7): ``ThreadedServer(ssl=..., auth_key=...,
proxy_protocol=True)`` and ``connect(ssl=..., auth_key=...)``.  A server runs the
stages PROXY header, TLS, authentication on the connection's own thread, in that
order within one ``limits.handshake_timeout``, before the framed loop.
"""

from __future__ import annotations

from .connection import CancelToken, Connection, connect
from .server import ThreadedServer
from .socketfile import SocketFile

__all__ = ["CancelToken", "Connection", "SocketFile", "ThreadedServer", "connect"]
