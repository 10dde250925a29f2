"""The CAsyncSocket model: a reactor thread and event-callback sockets (SPEC §5.3).

::

    from msgsock.callback import Reactor, MessageSocket

    class Echo(MessageSocket):
        def on_message(self, message):
            self.send_message(message)

    with Reactor() as reactor:
        listener = ListenSocket(reactor)      # an AsyncSocket whose on_accept accepts
        listener.create(0, address="127.0.0.1")
        listener.listen()
        ...

- :class:`Reactor`: one selector loop on its own thread; sockets register with it.
- :class:`AsyncSocket`: ``create``/``connect``/``listen``/``accept``/``send``/
  ``receive``/``send_to``/``receive_from``/``shutdown``/``close`` and the callbacks
  ``on_accept``, ``on_connect``, ``on_receive``, ``on_send``, ``on_close``,
  ``on_out_of_band``, with the notification rules of Winsock's ``WSAAsyncSelect``
  (see :mod:`msgsock.callback.socket`).
- :class:`MessageSocket`: whole framed messages, ``on_message`` and a thread-safe
  ``send_message`` that never loses the unsent part of a write (KB Q185728); a pump
  over the sans-I/O core, which runs TLS (``ssl=``), shared-key authentication
  (``auth_key=``), flow control and the timeouts.
- :class:`MessageServer`: the callback layer's server (a per-message handler, echo
  by default), with the same limits, log lines, counts and graceful shutdown as the
  asyncio and threaded servers (SPEC §5.0).
- Dispatchers (:class:`QueueDispatcher`, :func:`direct`) deliver callbacks to
  another thread, e.g. a UI thread (KB Q192570).
- :class:`WouldBlock`: Winsock's ``WSAEWOULDBLOCK``, a :class:`BlockingIOError`.
"""

from __future__ import annotations

from .dispatch import Dispatcher, QueueDispatcher, direct
from .message import MessageSocket
from .reactor import Reactor, TimerHandle
from .server import MessageServer
from .socket import (
    DATAGRAM,
    FD_ACCEPT,
    FD_ALL,
    FD_CLOSE,
    FD_CONNECT,
    FD_OOB,
    FD_READ,
    FD_WRITE,
    STREAM,
    AsyncSocket,
    Event,
    SocketKind,
    WouldBlock,
)

__all__ = [
    "DATAGRAM",
    "FD_ACCEPT",
    "FD_ALL",
    "FD_CLOSE",
    "FD_CONNECT",
    "FD_OOB",
    "FD_READ",
    "FD_WRITE",
    "STREAM",
    "AsyncSocket",
    "Dispatcher",
    "Event",
    "MessageServer",
    "MessageSocket",
    "QueueDispatcher",
    "Reactor",
    "SocketKind",
    "TimerHandle",
    "WouldBlock",
    "direct",
]
