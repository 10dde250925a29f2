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
    ├── OversizeMessage          a message *we* asked to send is too large for the frame; also ValueError
    ├── InvalidState             the API was used in a state that forbids it (send after close)
    ├── ConcurrencyError         two blocking calls at once on one connection
    ├── Cancelled                a blocking call was cancelled from another thread
    ├── ConnectionClosed         the connection ended; ``kind`` (an :class:`EndKind`) tells how
    └── Timeout                  a wait ran out of time; also TimeoutError

How a connection ended is one :class:`EndKind`, decided by the sans-I/O core
(:mod:`msgsock.protocol`) and carried as a field, never recovered from message text:
the same value is on ``ConnectionClosed.kind``, in the servers' statistics and in
their log lines.

``OSError`` is translated into these once, at the I/O boundary: a reset becomes
``ConnectionClosed(clean=False)``, a timed-out wait becomes ``Timeout``.  Connection
refused and name resolution failures stay ``OSError`` subclasses (the standard
``ConnectionRefusedError`` and ``socket.gaierror``) because callers already know them.
"""

from __future__ import annotations

import enum

__all__ = [
    "ArchiveError",
    "Cancelled",
    "ConcurrencyError",
    "ConnectionClosed",
    "EndKind",
    "EndOfData",
    "FrameError",
    "HandshakeError",
    "IncompleteMessage",
    "InvalidFormat",
    "InvalidState",
    "MessageTooLarge",
    "MsgsockError",
    "OversizeMessage",
    "ProtocolError",
    "ProxyProtocolError",
    "Timeout",
]


class EndKind(enum.Enum):
    """How a connection ended (SPEC §5.0, §7): one value for every layer and engine.

    The value is the short name the servers' summaries count under
    (``3 errors (2 idle timeout, 1 reset)``).
    """

    CLEAN = "clean"
    """An orderly close at a frame boundary, by either side."""
    HEALTH_CHECK = "health check"
    """A load balancer's check: a PROXY v2 ``LOCAL`` header, then the end (no error)."""
    SHUTDOWN = "shutdown"
    """The server stopped before the connection finished its handshake stages (no error)."""
    ABORTED = "aborted"
    """This side reset the connection on the application's request (``abort()``)."""
    REJECTED = "rejected"
    """Refused on arrival: ``max_connections`` (or the thread cap) was reached."""
    RESET = "reset"
    """The peer reset the connection, or the network broke it."""
    INCOMPLETE_MESSAGE = "incomplete message"
    """The peer's stream ended in the middle of a frame."""
    MESSAGE_TOO_LARGE = "message too large"
    """The peer declared a frame above ``max_size``."""
    FRAME_ERROR = "frame error"
    """The peer sent a frame header no valid sender could produce."""
    IDLE_TIMEOUT = "idle timeout"
    """Nothing arrived for ``idle_timeout`` seconds."""
    MESSAGE_TIMEOUT = "message timeout"
    """A frame that had started did not complete within ``message_timeout`` seconds."""
    HANDSHAKE_TIMEOUT = "handshake timeout"
    """The PROXY header, TLS and authentication stages did not finish in time."""
    CLOSE_TIMEOUT = "close timeout"
    """A graceful close did not finish within ``close_timeout`` seconds."""
    SHUTDOWN_DEADLINE = "shutdown deadline"
    """The server's graceful shutdown deadline passed with the connection still open."""
    HANDLER_ERROR = "handler error"
    """The application's handler raised, or returned something that is not a reply."""
    PROXY_PROTOCOL = "proxy protocol"
    """A missing or malformed PROXY protocol header."""
    TLS = "tls"
    """The TLS handshake (or a TLS record) failed."""
    AUTHENTICATION = "authentication"
    """The shared-key authentication handshake failed."""
    OS_ERROR = "os error"
    """Any other failure of the socket."""

    @property
    def is_error(self) -> bool:
        """True for an abnormal end (counted in a server's ``errors``)."""
        return self not in _NOT_ERRORS

    @property
    def clean(self) -> bool:
        """True for an orderly end (``ConnectionClosed.clean``)."""
        return self in _CLEAN_KINDS

    @property
    def resets(self) -> bool:
        """True when this side ends the connection with a reset (RST) rather than a FIN.

        A handler error, a timeout and a rejection reset (SPEC §5.0): the peer sees an
        abnormal end at once, and nothing more is sent.  A peer's protocol error and
        a failed stage close after flushing what is owed (replies to the messages
        before the bad one, a TLS alert, the authentication rejection byte).
        """
        return self in _RESET_KINDS


_NOT_ERRORS = frozenset({EndKind.CLEAN, EndKind.HEALTH_CHECK, EndKind.SHUTDOWN, EndKind.ABORTED})
_CLEAN_KINDS = frozenset({EndKind.CLEAN, EndKind.HEALTH_CHECK})
_RESET_KINDS = frozenset(
    {
        EndKind.ABORTED,
        EndKind.REJECTED,
        EndKind.HANDLER_ERROR,
        EndKind.IDLE_TIMEOUT,
        EndKind.MESSAGE_TIMEOUT,
        EndKind.HANDSHAKE_TIMEOUT,
        EndKind.CLOSE_TIMEOUT,
        EndKind.SHUTDOWN_DEADLINE,
        EndKind.SHUTDOWN,
    }
)


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
    """A connection's opening stages failed: the authentication handshake (SPEC §4.2),
    or, on a client, the TLS handshake.

    ``sync.connect`` and ``aio.connect`` raise it for both; its message is the
    core's reason (``TLS handshake failed: certificate verify failed: ...``,
    ``authentication failed: ...``) and its ``__cause__`` the
    :class:`ConnectionClosed` that ended the connection.
    """


class ProxyProtocolError(ProtocolError):
    """A PROXY protocol header (v1 or v2) was malformed or missing."""


class InvalidFormat(MsgsockError, ValueError):
    """A frame format, preset name or ``--frame`` string that cannot exist."""


class OversizeMessage(MsgsockError, ValueError):
    """A message this side asked to send is too large for the frame format (API misuse).

    Not a :class:`ProtocolError`: the peer did nothing wrong and the connection goes
    on; nothing of the message was queued.

    Attributes:
        size: the body size asked for, in bytes.
        max_size: the largest body the frame (``max_size`` or the length field) allows.
    """

    def __init__(self, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(f"cannot send a message of {size} bytes: the frame allows at most {max_size}")

    def __reduce__(self) -> tuple[type[OversizeMessage], tuple[int, int]]:
        return (type(self), (self.size, self.max_size))


class InvalidState(MsgsockError):
    """An operation was attempted in a state that forbids it (e.g. send after close)."""


class ConcurrencyError(MsgsockError):
    """Two blocking operations of the same kind were attempted at once on one object."""


class Cancelled(MsgsockError):
    """A blocking call was cancelled by another thread; only ``close()`` remains valid."""


class ConnectionClosed(MsgsockError):
    """The connection is closed.

    Attributes:
        kind: how it ended (:class:`EndKind`), as the core decided it.
        clean: True when it ended in order (``kind.clean``): the peer closed
            gracefully at a frame boundary, or we closed it ourselves; False for a
            reset, a protocol error, a timeout or a truncated frame.
        reason: a short human-readable explanation (the same words the servers log).
    """

    def __init__(self, clean: bool, reason: str = "", kind: EndKind | None = None) -> None:
        if kind is None:
            kind = EndKind.CLEAN if clean else EndKind.OS_ERROR
        self.kind = kind
        self.clean = clean
        self.reason = reason
        how = "cleanly" if clean else "abnormally"
        super().__init__(f"connection closed {how}" + (f": {reason}" if reason else ""))

    def __reduce__(self) -> tuple[type[ConnectionClosed], tuple[bool, str, EndKind]]:
        return (type(self), (self.clean, self.reason, self.kind))


class Timeout(MsgsockError, TimeoutError):
    """A wait ran out of time."""
