"""Blocking I/O (SPEC §5.2): :func:`connect`, :class:`Connection`, :class:`ThreadedServer`.

The CSocket model of the seeds: every call blocks the calling thread until it is done
(or its timeout runs out).  One thread may send while another receives on the same
:class:`Connection`.  :class:`ThreadedServer` runs one thread per connection, the
MFCAsync AsyncServer model (KB Q192570).
"""

from __future__ import annotations

from .connection import Connection, connect
from .server import ThreadedServer

__all__ = ["Connection", "ThreadedServer", "connect"]
