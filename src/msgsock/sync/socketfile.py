"""A file over a connected stream socket, like MFC's ``CSocketFile`` (SPEC §4.3, §5.2).

Theory of operation.  :class:`SocketFile` is the ``CSocketFile`` of the CSocket
"sequence of operations" (seed 001): create, listen/connect, accept, then a file
over the socket and a ``CArchive`` (here :class:`~msgsock.archive.ArchiveReader` /
:class:`~msgsock.archive.ArchiveWriter`) over the file::

    sock = socket.create_connection(("127.0.0.1", port))
    with SocketFile(sock) as file:
        out = ArchiveWriter(file)
        out.write_byte(7)
        out.write_string("hello")
        out.flush()                          # the bytes leave here
        reply = ArchiveReader(file).read_string()

It is an unbuffered :class:`io.RawIOBase`:

- ``read(n)``/``readinto`` make one ``recv`` of at most ``n`` bytes and return what
  it gave (``b""`` at the peer's EOF).  There is no buffer, so **no byte is ever read
  ahead and lost** (MFC's ``CArchive`` discards its read-ahead on close; SPEC §4.3):
  the archive reader asks for exactly the bytes of each value, and whatever follows
  stays in the socket for the next reader.  (Wrapping the file in
  ``io.BufferedReader`` would bring read-ahead back.)
- ``write(b)`` sends until all of ``b`` is sent and returns ``len(b)``.  If the
  socket's timeout runs out after some bytes were sent it returns their count (a
  short write, as ``RawIOBase`` allows), and raises
  :class:`~msgsock.exceptions.Timeout` only when nothing was sent -- so the caller
  always knows exactly which bytes left, and ``ArchiveWriter`` keeps the rest
  buffered (never lost, never sent twice).
- Timeouts are the socket's own (``sock.settimeout``), per call.  A non-blocking
  socket (timeout 0) is refused: ``CSocketFile`` needs a blocking ``CSocket``.
- Seeking makes no sense on a socket (seed 001: "``CFile`` members such as ``Seek``
  ... are unavailable"): ``seek``, ``tell``, ``truncate`` and ``fileno`` raise
  :class:`io.UnsupportedOperation` naming the operation.  Datagram sockets are refused
  at construction, as MFC forbids a ``CArchive`` over a datagram socket.
- :meth:`SocketFile.cancel` (or a :class:`~msgsock.sync.CancelToken`) cancels a
  blocked read or write from another thread the way
  :meth:`msgsock.sync.Connection.cancel` does: the socket is shut down both ways and
  the call raises :class:`~msgsock.exceptions.Cancelled`; only ``close()`` remains.

``OSError`` is translated here (STYLE §4): a socket timeout becomes ``Timeout``, a
reset or broken pipe ``ConnectionClosed(clean=False)``.  Not for two threads reading
(or two writing) at once.
"""

from __future__ import annotations

import io
import socket
import ssl as _ssl
import threading
from typing import TYPE_CHECKING, Any, NoReturn

from ..exceptions import Cancelled, ConnectionClosed, Timeout
from ..protocol import format_address
from .connection import CancelToken, Connection

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["SocketFile"]

# What a send or receive raises when the socket's timeout runs out (or, for a socket
# made non-blocking after the SocketFile was made, when it would block).
_TIMED_OUT = (TimeoutError, BlockingIOError, _ssl.SSLWantReadError, _ssl.SSLWantWriteError)


class SocketFile(io.RawIOBase):
    """A binary file over a connected stream socket (``CSocketFile``; SPEC §4.3).

    Args:
        sock: a connected ``SOCK_STREAM`` socket (TCP, Unix stream, ``socket.socketpair()``
            or ``ssl.SSLSocket``), blocking or with a timeout.  Its timeout bounds each
            read and write.
        close_socket: close the socket when the file is closed.  By default it is
            left open (``CSocketFile(pSocket, bArchiveCompatible)`` does not own it).
        cancel: a :class:`~msgsock.sync.CancelToken` whose ``cancel()`` calls
            :meth:`cancel` (at once if already cancelled).

    Raises:
        TypeError: ``sock`` is not a socket (a framed :class:`~msgsock.sync.Connection`
            is refused too: its bytes are frames, and its decoder may hold bytes that
            a raw reader would never see).
        ValueError: a datagram (or other non-stream) socket, a non-blocking one
            (timeout 0), or a closed one.
    """

    def __init__(
        self, sock: socket.socket, *, close_socket: bool = False, cancel: CancelToken | None = None
    ) -> None:
        super().__init__()
        # Set first: io.IOBase.__del__ calls close() even when __init__ raised.
        self._lock = threading.Lock()  # orders cancel() against close()
        self._close_socket = False
        self._token: CancelToken | None = None
        self._token_key: int | None = None
        if isinstance(sock, Connection):
            raise TypeError(
                "SocketFile needs a raw stream socket, not a framed msgsock Connection: send an "
                "archive as one message instead (conn.send(writer.getvalue()), ArchiveReader(conn.receive()))"
            )
        if not isinstance(sock, socket.socket):
            raise TypeError(f"SocketFile needs a socket.socket, not {type(sock).__name__}")
        if sock.fileno() < 0:
            raise ValueError("SocketFile needs an open socket; this one is closed")
        if sock.type != socket.SOCK_STREAM:
            kind = getattr(sock.type, "name", str(sock.type))
            raise ValueError(
                f"SocketFile needs a stream socket (SOCK_STREAM), not {kind}: an archive is a byte "
                "stream, which datagrams would split, reorder or drop (MFC: no CArchive over a "
                "datagram socket)"
            )
        if sock.gettimeout() == 0.0:
            raise ValueError(
                "SocketFile needs a blocking socket (timeout None or above 0), not a non-blocking one: "
                "reads and writes must be complete or fail, as CSocketFile over a CSocket"
            )
        self._sock = sock
        self._close_socket = close_socket
        self._peer = _peer_name(sock)
        self._cancelled = False
        if cancel is not None:
            self._token = cancel
            self._token_key = cancel._subscribe(self.cancel)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "cancelled" if self._cancelled else "open"
        return f"<SocketFile {self._peer} {state}>"

    @property
    def socket(self) -> socket.socket:
        """The socket the file reads and writes."""
        return self._sock

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled

    # -- what a socket can do ---------------------------------------------------------

    def readable(self) -> bool:
        """True: a socket file reads."""
        return True

    def writable(self) -> bool:
        """True: a socket file writes."""
        return True

    def seekable(self) -> bool:
        """False: a socket is a stream, with no position."""
        return False

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        """Receive at most ``len(buffer)`` bytes into ``buffer``; return how many (0 at EOF).

        Raises:
            Timeout: nothing arrived within the socket's timeout.
            ConnectionClosed: the connection was reset (``clean=False``).
            Cancelled: :meth:`cancel` was called.
            ValueError: the file is closed.
        """
        self._check_usable("read")
        try:
            n = self._sock.recv_into(buffer)
        except _TIMED_OUT as exc:
            if self._cancelled:
                raise self._cancel_error("read") from exc
            raise Timeout(f"no data from {self._peer} within {self._timeout_text()}") from None
        except OSError as exc:
            raise self._failed(exc, "read") from exc
        if n == 0 and self._cancelled:  # our shutdown(), not the peer's EOF
            raise self._cancel_error("read")
        return n

    def write(self, data: ReadableBuffer, /) -> int:
        """Send ``data``; return the number of bytes sent (all of them unless a timeout cut in).

        Raises:
            Timeout: not one byte could be sent within the socket's timeout.
            ConnectionClosed: the connection was reset or the peer is gone (``clean=False``).
            Cancelled: :meth:`cancel` was called.
            ValueError: the file is closed.
        """
        self._check_usable("write")
        view = memoryview(data).cast("B")
        total = view.nbytes
        sent = 0
        try:
            # send(), not sendall(): sendall cannot say how much went out before a timeout.
            while sent < total:
                sent += self._sock.send(view[sent:])
        except _TIMED_OUT as exc:
            if self._cancelled:
                raise self._cancel_error("write") from exc
            if sent:
                return sent  # a short write: the caller still holds the rest
            raise Timeout(f"could not send to {self._peer} within {self._timeout_text()}") from None
        except OSError as exc:
            raise self._failed(exc, "write") from exc
        return total

    # -- what it cannot ---------------------------------------------------------------

    def _unsupported(self, operation: str) -> NoReturn:
        raise io.UnsupportedOperation(
            f"SocketFile does not support {operation}: a socket is not seekable and has no file "
            "descriptor of its own (CSocketFile)"
        )

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> NoReturn:
        """Not supported.

        Raises:
            io.UnsupportedOperation: always.
        """
        self._unsupported("seek")

    def tell(self) -> NoReturn:
        """Not supported.

        Raises:
            io.UnsupportedOperation: always.
        """
        self._unsupported("tell")

    def truncate(self, size: int | None = None, /) -> NoReturn:
        """Not supported.

        Raises:
            io.UnsupportedOperation: always.
        """
        self._unsupported("truncate")

    def fileno(self) -> NoReturn:
        """Not supported: reading the descriptor directly would bypass the file (use :attr:`socket`).

        Raises:
            io.UnsupportedOperation: always.
        """
        self._unsupported("fileno")

    # -- cancelling and closing -------------------------------------------------------

    def cancel(self) -> None:
        """Cancel, from any thread, a read or write blocked on this file (``CancelBlockingCall``).

        The socket is shut down both ways (see :meth:`msgsock.sync.Connection.cancel`
        for why and what the peer sees); the blocked call and every later read or
        write raise :class:`~msgsock.exceptions.Cancelled`.  Only :meth:`close`
        remains.  Idempotent; never blocks; does nothing once the file is closed.
        """
        with self._lock:
            if self._cancelled or self.closed:
                return
            self._cancelled = True
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already reset or closed: a blocked call has seen that itself

    def close(self) -> None:
        """Close the file; the socket too when ``close_socket`` was given.  Idempotent.

        No bytes are lost: the file holds none (nothing is buffered either way).
        """
        with self._lock:
            if self.closed:
                return
            try:
                super().close()
            finally:
                if self._token is not None:
                    self._token._unsubscribe(self._token_key)
                if self._close_socket:
                    self._sock.close()

    # -- helpers ----------------------------------------------------------------------

    def _check_usable(self, operation: str) -> None:
        if self.closed:
            raise ValueError(f"{operation} on a closed SocketFile")
        if self._cancelled:
            raise self._cancel_error(operation)

    def _cancel_error(self, operation: str) -> Cancelled:
        return Cancelled(f"{operation}: the SocketFile was cancelled; only close() is valid now")

    def _timeout_text(self) -> str:
        timeout = self._sock.gettimeout()
        return "0 s (the socket is non-blocking)" if not timeout else f"{timeout:g} s"

    def _failed(self, exc: OSError, operation: str) -> Cancelled | ConnectionClosed | OSError:
        """Translate an OSError of a read or write (once, here: STYLE §4)."""
        if self._cancelled:
            return self._cancel_error(operation)
        if isinstance(exc, ConnectionResetError | ConnectionAbortedError):
            return ConnectionClosed(False, f"{operation}: connection reset by {self._peer}")
        if isinstance(exc, BrokenPipeError):
            return ConnectionClosed(False, f"{operation}: broken pipe: {self._peer} is gone")
        return exc  # anything else (e.g. ENOTCONN) is the caller's to see as is


def _peer_name(sock: socket.socket) -> str:
    try:
        peer: Any = sock.getpeername()
    except OSError:
        return "the peer"
    if isinstance(peer, tuple):
        return format_address(peer)
    return repr(peer) if peer else "the peer"  # AF_UNIX (a socketpair's peer has no name)
