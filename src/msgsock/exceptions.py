"""The one exception tree of msgsock.

Every exception says whose fault it was (STYLE §4)::

    MsgsockError
    ├── ProtocolError            the peer sent bytes that break the wire format
    │   ├── MessageTooLarge      a frame length above max_size (or one the field cannot hold)
    │   ├── FrameError           a header that cannot be valid (e.g. length < header size)
    │   ├── IncompleteMessage    the stream ended in the middle of a frame
    │   ├── ArchiveError         malformed CArchive data (archive.py)
    │   │   └── EndOfData        the archive ran out of bytes mid-value
    │   ├── HandshakeError       the authentication handshake failed
    │   └── ProxyProtocolError   a malformed or missing PROXY protocol header
    ├── InvalidFormat            a FrameFormat (or --frame string) that cannot exist; also ValueError
    ├── InvalidState             the API was used in a state that forbids it (send after close)
    ├── ConcurrencyError         two blocking calls at once on one connection
    ├── Cancelled                a blocking call was cancelled from another thread
    ├── ConnectionClosed         the connection ended; ``clean`` tells how
    └── Timeout                  a wait ran out of time; also TimeoutError

``OSError`` is translated into these once, at the I/O boundary: a reset becomes
``ConnectionClosed(clean=False)``, a timed-out wait becomes ``Timeout``.  Connection
refused and name resolution failures stay ``OSError`` subclasses (the standard
``ConnectionRefusedError`` and ``socket.gaierror``) because callers already know them.
"""

from __future__ import annotations

__all__ = [
    "ArchiveError",
    "Cancelled",
    "ConcurrencyError",
    "ConnectionClosed",
    "EndOfData",
    "FrameError",
    "HandshakeError",
    "IncompleteMessage",
    "InvalidFormat",
    "InvalidState",
    "MessageTooLarge",
    "MsgsockError",
    "ProtocolError",
    "ProxyProtocolError",
    "Timeout",
]


class MsgsockError(Exception):
    """Base class of every exception msgsock raises on purpose."""


class ProtocolError(MsgsockError):
    """The peer sent bytes that violate the wire format; the connection cannot go on."""


class MessageTooLarge(ProtocolError):
    """A message is larger than the limit in force.

    Raised by the decoder when a peer declares a length above ``max_size`` (before any
    of the body is buffered), and by the encoder when asked to send a body that is
    above ``max_size`` or that the length field cannot express.

    Attributes:
        size: the message size in bytes (declared or requested).
        max_size: the limit that was exceeded.
    """

    def __init__(self, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(f"message size {size} exceeds max_size {max_size}")

    def __reduce__(self) -> tuple[type[MessageTooLarge], tuple[int, int]]:
        return (type(self), (self.size, self.max_size))


class FrameError(ProtocolError):
    """A frame header that no valid sender could produce."""


class IncompleteMessage(ProtocolError):
    """The stream ended after ``received`` bytes of a frame that needed ``expected``.

    Attributes:
        received: bytes of the unfinished frame that arrived (header included).
        expected: bytes the frame needed, when the header was complete; else None.
    """

    def __init__(self, received: int, expected: int | None) -> None:
        self.received = received
        self.expected = expected
        need = f"of {expected} " if expected is not None else ""
        super().__init__(f"stream ended after {received} bytes {need}of an unfinished frame")

    def __reduce__(self) -> tuple[type[IncompleteMessage], tuple[int, int | None]]:
        return (type(self), (self.received, self.expected))


class ArchiveError(ProtocolError):
    """Malformed CArchive data.

    Attributes:
        offset: position in the archive stream where the problem starts.
    """

    def __init__(self, message: str, offset: int) -> None:
        self.offset = offset
        super().__init__(f"{message} at offset {offset}")

    def __reduce__(self) -> tuple[type[ArchiveError], tuple[str, int]]:
        return (type(self), (str(self).rsplit(" at offset ", 1)[0], self.offset))


class EndOfData(ArchiveError):
    """The archive ended before a complete value could be read."""


class HandshakeError(ProtocolError):
    """The authentication handshake (SPEC §4.2) failed."""


class ProxyProtocolError(ProtocolError):
    """A PROXY protocol header (v1 or v2) was malformed or missing."""


class InvalidFormat(MsgsockError, ValueError):
    """A frame format, preset name or ``--frame`` string that cannot exist."""


class InvalidState(MsgsockError):
    """An operation was attempted in a state that forbids it (e.g. send after close)."""


class ConcurrencyError(MsgsockError):
    """Two blocking operations of the same kind were attempted at once on one object."""


class Cancelled(MsgsockError):
    """A blocking call was cancelled by another thread; only ``close()`` remains valid."""


class ConnectionClosed(MsgsockError):
    """The connection is closed.

    Attributes:
        clean: True when the peer closed gracefully at a frame boundary (or we closed
            it ourselves); False for a reset, a protocol error or a truncated frame.
        reason: a short human-readable explanation.
    """

    def __init__(self, clean: bool, reason: str = "") -> None:
        self.clean = clean
        self.reason = reason
        how = "cleanly" if clean else "abnormally"
        super().__init__(f"connection closed {how}" + (f": {reason}" if reason else ""))

    def __reduce__(self) -> tuple[type[ConnectionClosed], tuple[bool, str]]:
        return (type(self), (self.clean, self.reason))


class Timeout(MsgsockError, TimeoutError):
    """A wait ran out of time."""
