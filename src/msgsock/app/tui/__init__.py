"""The interactive client of ``msgsock client`` (SPEC §6.2): a Textual TUI over a network thread.

Theory of operation.  The MFCAsync AsyncClient (KB Q192570, seed 002) keeps its
socket on a thread of its own "so the blocking of the GUI message pump does not
affect the delivery of socket messages".  Here that split is two objects:

- :class:`NetworkClient` owns a :class:`~msgsock.callback.Reactor` thread and at most
  one :class:`~msgsock.callback.MessageSocket`.  Every callback (``on_connect``,
  ``on_message``, ``on_close``) runs **on the reactor thread**, and so does the
  reverse loop: receive the echo, verify it, reverse it, send it back -- the UI is
  never on that path.  The counters (messages and bytes each way, loop rounds and
  RTT histogram) are updated there too.  Requests from the UI (connect, send,
  start/stop the loop, disconnect) are handed over with
  :meth:`~msgsock.callback.Reactor.call_soon_threadsafe` and never wait.  TLS and
  the authentication handshake (``config.ssl``, ``config.auth_key``; SPEC §4.2)
  are pumped by that socket on the same thread, so ``on_connect(0)`` -- and the
  "connected" status -- come only once they passed; a failed stage shows as
  ``error: TLS handshake failed: ...`` or ``error: authentication failed: ...``.
- :class:`ClientApp` (Textual) only *receives* events.  The network thread appends
  them to a bounded buffer and, when the buffer was empty, wakes the UI with one
  :meth:`textual.app.App.post_message` -- which only queues, unlike
  ``call_from_thread``, which waits for the UI to run the call and would let a busy
  UI stall the network thread.  The UI drains the whole buffer per wake-up, so a
  flood of messages costs one wake-up per UI turn, and a buffer that outgrows
  :data:`MAX_PENDING_EVENTS` drops message lines (counted, and said in the log)
  rather than memory.  Live figures (counters, loop rate, RTT p50/p99) are read by a
  UI timer, not pushed per message.

Round-trip times pair each reply with the oldest unanswered message: an echo server
answers in order, one reply per message (SPEC §6.1).  A message that arrives with
nothing outstanding (a server that pushes) is shown without an RTT.

Received bytes reach the terminal only through :func:`msgsock.app.client.escape_text`
(non-printables escaped, long bodies truncated with their length) inside
:class:`rich.text.Text` objects, so a peer can neither send terminal control
sequences nor Rich/Textual markup.

The package: :mod:`.events` (the values passed from the network thread to the UI),
:mod:`.network` (:class:`NetworkClient`, no textual or rich) and :mod:`.app` (the
Textual :class:`ClientApp` and :func:`run_tui`).  Importing the package imports
textual and rich, as the ``cli`` extra provides them; ``msgsock client`` imports it
only when the interactive client is used.
"""

from __future__ import annotations

from .app import ClientApp, run_tui
from .events import (
    LOG_TEXT_LIMIT,
    LoopEvent,
    LoopStats,
    MessageEvent,
    MismatchEvent,
    NetEvent,
    NoteEvent,
    State,
    StatusEvent,
)
from .network import DEFAULT_LOOP_MESSAGE, MAX_PENDING_EVENTS, NetworkClient

__all__ = [
    "DEFAULT_LOOP_MESSAGE",
    "LOG_TEXT_LIMIT",
    "MAX_PENDING_EVENTS",
    "ClientApp",
    "LoopEvent",
    "LoopStats",
    "MessageEvent",
    "MismatchEvent",
    "NetEvent",
    "NetworkClient",
    "NoteEvent",
    "State",
    "StatusEvent",
    "run_tui",
]
