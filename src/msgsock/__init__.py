"""msgsock: whole messages over TCP and UDP.

The top-level package holds the sans-I/O core (frames, per-connection protocol state,
exceptions).  The I/O layers are subpackages, imported on demand:

- :mod:`msgsock.sync`: blocking connections and a thread-per-connection server;
- :mod:`msgsock.aio`: asyncio connections and servers;
- :mod:`msgsock.callback`: the CAsyncSocket event-callback model;
- :mod:`msgsock.udp`: datagram endpoints.
"""

from __future__ import annotations

from .archive import ArchiveReader, ArchiveWriter
from .exceptions import (
    ArchiveError,
    Cancelled,
    ConcurrencyError,
    ConnectionClosed,
    EndKind,
    EndOfData,
    FrameError,
    HandshakeError,
    IncompleteMessage,
    InvalidFormat,
    InvalidState,
    MessageTooLarge,
    MsgsockError,
    OversizeMessage,
    ProtocolError,
    ProxyProtocolError,
    Timeout,
)
from .framing import (
    DEFAULT_FORMAT,
    DEFAULT_MAX_SIZE,
    PRESETS,
    FrameDecoder,
    FrameFormat,
    HeaderField,
    Message,
    encode,
)
from .protocol import DEFAULT_LIMITS, Action, End, Limits, MessageProtocol, State, Statistics
from .serving import ServerProtocol, ServerStatistics
from .stages import Stage, Stages

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_SIZE",
    "PRESETS",
    "Action",
    "ArchiveError",
    "ArchiveReader",
    "ArchiveWriter",
    "Cancelled",
    "ConcurrencyError",
    "ConnectionClosed",
    "End",
    "EndKind",
    "EndOfData",
    "FrameDecoder",
    "FrameError",
    "FrameFormat",
    "HandshakeError",
    "HeaderField",
    "IncompleteMessage",
    "InvalidFormat",
    "InvalidState",
    "Limits",
    "Message",
    "MessageProtocol",
    "MessageTooLarge",
    "MsgsockError",
    "OversizeMessage",
    "ProtocolError",
    "ProxyProtocolError",
    "ServerProtocol",
    "ServerStatistics",
    "Stage",
    "Stages",
    "State",
    "Statistics",
    "Timeout",
    "__version__",
    "encode",
]
