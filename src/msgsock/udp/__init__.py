"""Datagram endpoints: one UDP datagram is one message (SPEC §5.4; the simples/simplec samples).

Theory of operation.  UDP keeps message boundaries itself, so there is no frame
header here: every datagram is one message, delivered whole or not at all.  What
this package adds is what datagram programs tend to get wrong, decided once in a
sans-I/O core and pumped by a blocking and an asyncio layer (STYLE §1, §11):

- :mod:`msgsock.udp.core` -- :class:`~msgsock.udp.core.DatagramServerProtocol`:
  a server's size checks, its handler's reply check, its counters and every log
  line, rate-limited;
- :mod:`msgsock.udp.request` -- :class:`~msgsock.udp.request.DatagramClientProtocol`
  and :class:`~msgsock.udp.request.Request`: a client's limits, which datagram is
  the reply, resends and the final :class:`~msgsock.exceptions.Timeout`;
- :mod:`msgsock.udp.sync` -- :class:`UdpServer` (a thread) and :class:`UdpClient`;
- :mod:`msgsock.udp.aio` -- :func:`serve_udp` and :func:`open_udp_client` (stock
  asyncio or uvloop).

What they do, whichever layer:

- **Sizes.**  ``max_size`` (default 65507, the largest UDP payload over IPv4) is
  checked *before* anything is sent: a datagram of ours above it is API misuse
  (:class:`~msgsock.exceptions.OversizeMessage`, nothing leaves).  On receipt the
  buffer is one byte larger than ``max_size``, so a datagram that fills it was too
  large -- the system would otherwise truncate it silently.  On Linux ``MSG_TRUNC``
  also gives its real size, which is logged.  A server drops such a datagram,
  counts it in ``errors`` (``message too large``) and logs a warning with the peer
  and both sizes; a client's receive raises
  :class:`~msgsock.exceptions.MessageTooLarge` (the peer's fault).
- **Loss.**  :meth:`UdpClient.request` sends, waits ``timeout`` seconds for the
  reply, resends up to ``retries`` times (so ``retries + 1`` tries in all), then
  raises :class:`~msgsock.exceptions.Timeout` saying ``no reply from HOST:PORT after
  N tries of T s``.  Before each try the datagrams still queued (late replies to an
  earlier request) are discarded, so a late echo is not taken for the new reply.
- **ICMP.**  A client's socket is *connected* to the server address: the kernel
  then delivers only that server's datagrams, and reports an ICMP "port
  unreachable" as ``ConnectionRefusedError`` on the next send or receive.
  ``request`` counts it as no reply (its Timeout message then says "port
  unreachable"); when the host name has further addresses, the next one is tried,
  so ``localhost`` reaches a server bound to either ``::1`` or ``127.0.0.1``.
- **Servers never die on a datagram.**  Oversize datagrams, handler exceptions,
  replies that cannot be sent and ICMP errors are logged (logger
  ``msgsock.server``, like the TCP servers) and counted by
  :class:`~msgsock.exceptions.EndKind` in :class:`~msgsock.serving.ServerStatistics`;
  the next datagram is served.  A handler's reply gets the TCP servers' check
  (:func:`msgsock.protocol.check_reply`): a handler that raises, or returns
  anything but bytes-like or None (a ``str``, a coroutine on the blocking server),
  is logged at error level -- ``PEER: handler raised ValueError: boom; no reply``,
  with the traceback of a raise -- and counted as a ``handler error``.  Each kind
  of repeated line is rate-limited: the first 5 of a quiet spell in full, then one
  summary per 10 s (``... and 12,345 more handler errors from 3 senders in the
  last 10 s``), so a flood cannot fill the disk.

``msgsock serve --udp`` and ``msgsock client --udp`` are the applications of
:mod:`msgsock.app.udp` (SPEC §6.1, §6.2).
"""

from __future__ import annotations

from .._net import DEFAULT_LOGGER as DEFAULT_LOGGER
from .aio import AsyncUdpClient, AsyncUdpServer, open_udp_client, serve_udp
from .core import DEFAULT_MAX_SIZE, MAX_DATAGRAM, AsyncHandler, Handler
from .core import DEFAULT_RETRIES as DEFAULT_RETRIES  # the command line's defaults (not in __all__)
from .core import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from .core import Reply as Reply
from .sync import UdpClient, UdpServer

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_DATAGRAM",
    "AsyncHandler",
    "AsyncUdpClient",
    "AsyncUdpServer",
    "Handler",
    "UdpClient",
    "UdpServer",
    "open_udp_client",
    "serve_udp",
]
