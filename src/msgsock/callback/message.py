"""``MessageSocket``: whole messages over an :class:`AsyncSocket` (SPEC §5.3, KB Q185728).

Theory of operation.  A :class:`MessageSocket` is a pump over
:class:`~msgsock.protocol.MessageProtocol` (STYLE §1) that runs on the reactor
thread.  It makes the two mistakes of KB Q185728 ("MFCSocs avoids two common MFC
socket mistakes") impossible by construction:

1. *Never assume one Receive is one message.*  Each read notification does exactly
   one receive (the seeds' "one Receive per OnReceive") into the reactor's shared
   buffer and feeds the bytes to the core, which returns every complete frame,
   however the stream was split -- one byte at a time or many frames per read.  Each
   frame becomes one :meth:`~MessageSocket.on_message` call.
2. *Never lose the unsent part of a Send.*  :meth:`~MessageSocket.send_message`
   only queues the frame; the reactor writes the queue at the end of its turn (so
   the replies of one read go out in one ``sendmsg``), keeps whatever the kernel did
   not take, and resumes when the socket is writable again -- the ``OnSend`` of the
   MFC samples.

Backpressure (SPEC §7): while more than ``limits.write_high_water`` bytes wait to be
written, the socket stops reading from the peer, and resumes below
``limits.write_low_water``; a peer that does not read cannot make us buffer its
replies without bound.

Threads: :meth:`~MessageSocket.send_message`, :meth:`~MessageSocket.close` and
:meth:`~MessageSocket.abort` may be called from any thread and never wait for the
reactor.  Messages handed over by one thread keep their order; messages of different
threads interleave whole.  The user-facing callbacks (``on_message``,
``on_connect``, ``on_close``, ``on_accept``) go through the socket's dispatcher; the
reading and writing itself always stays on the reactor thread, so a slow dispatcher
thread delays only its own callbacks.  ``on_receive`` and ``on_send`` are used by
the pump and are not delivered.

Closing: :meth:`~MessageSocket.close` is graceful -- write everything queued, shut
down the sending side, read (and discard) until the peer's end of stream, then close;
``limits.close_timeout`` bounds the whole sequence, after which the connection is
reset.  A peer that breaks the frame format closes the socket at once:
``on_close(errno.EPROTO)``, with the :class:`~msgsock.exceptions.ProtocolError` in
:attr:`~AsyncSocket.error`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
from collections import deque
from collections.abc import Mapping

from .._net import format_address, set_nodelay
from ..exceptions import ConnectionClosed, InvalidState, ProtocolError
from ..framing import DEFAULT_FORMAT, FrameFormat
from ..protocol import DEFAULT_LIMITS, Limits, MessageProtocol, Statistics
from .dispatch import Dispatcher
from .reactor import Reactor
from .socket import (
    _EVENT_READ,
    _EVENT_WRITE,
    DATAGRAM,
    FD_ACCEPT,
    FD_CLOSE,
    FD_CONNECT,
    FD_READ,
    FD_WRITE,
    AsyncSocket,
    SocketKind,
    _State,
)

__all__ = ["MessageSocket"]

log = logging.getLogger("msgsock.callback")

_MAX_IOV = 64
"""Chunks per ``sendmsg`` (well under every system's IOV_MAX)."""

_Chunk = bytes | bytearray | memoryview


def _nbytes(data: _Chunk) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class MessageSocket(AsyncSocket):
    """A stream :class:`AsyncSocket` that sends and receives whole framed messages.

    Override :meth:`on_message` (and ``on_connect``, ``on_close``, ``on_accept`` as
    needed); do not override ``on_receive``/``on_send``, the pump does that work.
    Stream sockets only: ``create(kind=DATAGRAM)`` (or attaching a datagram socket)
    raises ``ValueError``.  Raw ``send``/``receive`` raise ``InvalidState``.

    Args:
        reactor: the reactor that owns this socket.
        frame: the frame format both peers use (SPEC §4.1).
        limits: write water marks and ``close_timeout`` (SPEC §7).
        dispatcher: where callbacks run; None uses the reactor's.

    Attributes:
        protocol: the sans-I/O state of the current connection (counters in ``protocol.stats``).
    """

    _default_events = FD_READ | FD_WRITE | FD_ACCEPT | FD_CONNECT | FD_CLOSE

    def __init__(
        self,
        reactor: Reactor,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        *,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__(reactor, dispatcher=dispatcher)
        self.frame = frame
        self.limits = limits
        self.protocol = MessageProtocol(frame, limits=limits)
        self._out: deque[_Chunk] = deque()  # taken from the protocol, not yet written
        self._out_size = 0
        self._want_write = False
        self._paused = False
        self._closing = False
        self._shut_wr = False

    # -- callbacks ------------------------------------------------------------------------

    def on_message(self, message: bytes) -> None:
        """A whole message arrived (a :class:`~msgsock.framing.Message` when the frame has extra fields)."""

    # -- sending --------------------------------------------------------------------------

    def send_message(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> None:
        """Queue one message for sending; callable from any thread, never waits.

        The bytes the kernel does not take at once are kept and written as it makes
        room.  A ``bytearray`` or ``memoryview`` is not copied: do not change it until
        it has been sent (pass ``bytes`` when in doubt).  May be called as soon as
        :meth:`connect` was called; the message goes out once connected.

        Args:
            message: the body; a :class:`~msgsock.framing.Message` brings its header.
            header: values of the frame's extra header fields.

        Raises:
            MessageTooLarge: the body is above the frame's ``max_size``.
            InvalidFormat: bad header fields.
            InvalidState: the socket was closed (or never created), or is listening.
            ConnectionClosed: the connection failed or broke the protocol.
        """
        self._check_can_send()
        reactor = self.reactor
        if reactor._inline():
            self.protocol.send_message(message, header)
            self._mark_dirty()
            return
        # Check the message here so the caller gets MessageTooLarge, not a log line.
        self.frame.encode_parts(message, header)
        if not reactor._call_soon_quiet(self._send_handed_off, message, header):
            raise InvalidState(f"{reactor!r} is stopped")

    def _check_can_send(self, *, caller: bool = True) -> None:
        # The caller's view includes close() already called from its thread; the
        # reactor's does not, since a message handed over before close() must go out
        # (the handoffs run in order, so _begin_close comes after it).
        closed = self._app_closed if caller else False
        if closed or self._closing or self._state in (_State.EMPTY, _State.CLOSED):
            if self._broken or self.error is not None:
                raise ConnectionClosed(False, f"{self!r} failed: {self.error}")
            raise InvalidState(f"cannot send on {self!r}: it is closed")
        if self._broken or self._state is _State.FAILED:
            raise ConnectionClosed(False, f"{self!r} failed: {self.error}")
        if self._state is _State.LISTENING:
            raise InvalidState(f"cannot send on listening {self!r}")

    def _send_handed_off(
        self, message: bytes | bytearray | memoryview, header: Mapping[str, int] | None
    ) -> None:
        try:
            self._check_can_send(caller=False)
        except (InvalidState, ConnectionClosed):
            log.debug("%r: dropping a message handed over after the socket closed", self)
            return
        self.protocol.send_message(message, header)
        self._mark_dirty()

    # The raw data calls would interleave bytes with the frames: not on a MessageSocket.

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Not available: raw bytes would break the framing; use :meth:`send_message`.

        Raises:
            InvalidState: always.
        """
        raise InvalidState("a MessageSocket sends whole messages: use send_message()")

    def receive(self, n: int = 65536, flags: int = 0) -> bytes:
        """Not available: the pump receives; messages arrive in :meth:`on_message`.

        Raises:
            InvalidState: always.
        """
        raise InvalidState("a MessageSocket receives whole messages: override on_message()")

    @property
    def outgoing_size(self) -> int:
        """Bytes queued and not yet taken by the kernel."""
        return self._out_size + self.protocol.outgoing_size

    def statistics(self) -> Statistics:
        """Messages and bytes sent and received on the current connection."""
        return self.protocol.stats

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close gracefully: send what is queued, half-close, wait for the peer's EOF, close.

        Callable from any thread; returns at once (:meth:`~AsyncSocket.wait_closed`
        waits).  No callback runs after it.  Bounded by ``limits.close_timeout``, after
        which the connection is reset.
        """
        self._app_closed = True
        self._run_or_queue(self._begin_close)

    def _begin_close(self) -> None:
        if self._sock is None:
            self._closed_event.set()
            return
        if self._closing:
            return
        if self._state not in (_State.OPEN, _State.CONNECTING) or self._broken:
            self._close_now()
            return
        # Still connecting: the queued messages go out once connected, then the close.
        self._closing = True
        self.protocol.send_eof()
        self._timers.append(self.reactor.call_later(self.limits.close_timeout, self._close_timed_out))
        self._mark_dirty()

    def _connect_failed(self, err: int) -> None:
        super()._connect_failed(err)
        if self._closing and self._state is _State.FAILED:
            self._close_now()  # close() was called while connecting: nothing left to flush

    def _close_timed_out(self) -> None:
        log.info("%r: graceful close timed out after %s s; resetting", self, self.limits.close_timeout)
        self._abort_now()

    def detach(self) -> socket.socket:
        """Hand the socket over, like :meth:`AsyncSocket.detach`.

        Raises:
            InvalidState: no socket, or bytes would be lost: a message is still queued
                for sending, or part of a frame was received.
        """
        return self.reactor.run_sync(self._detach_checked)

    def _detach_checked(self) -> socket.socket:
        # On the reactor thread, so the check and the detach see the same state.
        if self.outgoing_size or self.protocol.in_frame:
            raise InvalidState(f"cannot detach {self!r}: unsent or partly received data would be lost")
        return AsyncSocket.detach(self)

    # -- internals ----------------------------------------------------------------------------

    def _setup(self, sock: socket.socket, state: _State) -> None:
        if SocketKind(sock.type) == DATAGRAM:
            sock.close()
            raise ValueError("a MessageSocket needs a stream socket")
        self.protocol = MessageProtocol(self.frame, limits=self.limits)
        self._out.clear()
        self._out_size = 0
        self._want_write = self._paused = self._closing = self._shut_wr = False
        super()._setup(sock, state)

    def _opened(self) -> None:
        assert self._sock is not None
        set_nodelay(self._sock)  # whole frames are written at once; batching is ours (SPEC §5.1)

    def _notify_send(self) -> None:
        self._mark_dirty()  # connected: flush what was queued before (no user on_send)

    def _wanted_events(self) -> int:
        if self._state is not _State.OPEN:
            return super()._wanted_events()
        if self._broken:
            return 0
        want = 0
        if not self._eof_seen and (self._closing or (not self._paused and self._events & FD_READ)):
            want |= _EVENT_READ
        if self._want_write:
            want |= _EVENT_WRITE
        return want

    def _sync(self) -> None:
        if self._sock is not None and self._state is _State.OPEN and not self._broken:
            self._flush()
        super()._sync()

    def _writable(self) -> None:
        self._flush()
        self._mark_dirty()

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None
        protocol = self.protocol
        out = self._out
        if protocol.outgoing_size:
            for chunk in protocol.data_to_send():
                out.append(chunk)
                self._out_size += _nbytes(chunk)
        while out:
            try:
                if len(out) == 1:
                    offered = _nbytes(out[0])
                    sent = sock.send(out[0])
                else:
                    chunks = list(itertools.islice(out, _MAX_IOV))
                    offered = sum(_nbytes(c) for c in chunks)
                    sent = sock.sendmsg(chunks)
            except BlockingIOError:
                sent = offered = -1
            except OSError as exc:
                self._fail(exc)
                return
            if sent > 0:
                self._consume(sent)
            if sent < offered:
                self._want_write = True  # resume in the write notification (the MFC OnSend)
                break
        else:
            self._want_write = False
            if self._closing and not self._shut_wr:
                self._shut_wr = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._close_now()
                    return
                if self._eof_seen:
                    self._close_now()
                    return
        size = self._out_size
        if self._paused:
            self._paused = size > self.limits.write_low_water
        else:
            self._paused = size > self.limits.write_high_water

    def _consume(self, n: int) -> None:
        out = self._out
        self._out_size -= n
        while n:
            chunk = out[0]
            size = _nbytes(chunk)
            if n >= size:
                out.popleft()
                n -= size
            else:
                out[0] = memoryview(chunk).cast("B")[n:]
                n = 0

    def _readable_stream(self) -> None:
        if self._eof_seen:
            return
        sock = self._sock
        assert sock is not None
        buffer = self.reactor._get_read_buffer()
        try:
            n = sock.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not n:
            self._eof()
            return
        if self._closing:
            return  # closing: read only to see the peer's EOF
        try:
            messages = self.protocol.receive_data(buffer[:n])
        except ProtocolError as exc:
            self._protocol_failed(exc)
            return
        for message in messages:
            self._deliver(self.on_message, message)
        if self.protocol.error is not None:  # a bad header followed those messages
            self._protocol_failed(self.protocol.error)

    def _eof(self) -> None:
        self._eof_seen = True
        self._mark_dirty()
        if self._closing:
            if self._shut_wr:
                self._close_now()
            return
        try:
            self.protocol.receive_eof()
        except ProtocolError as exc:  # IncompleteMessage: the stream ended mid-frame
            self._protocol_failed(exc)
            return
        self._notify_close(0)

    def _protocol_failed(self, exc: ProtocolError) -> None:
        log.warning("%s: %s; closing the connection", format_address(self._peer), exc)
        self.error = exc
        self._broken = True
        self._close_now()
        self._notify_close(errno.EPROTO)

    def _fail(self, exc: OSError) -> None:
        if not self._closing:
            log.info("%s: %s; closing the connection", format_address(self._peer), exc)
        self.error = exc
        self._broken = True
        self._close_now()
        self._notify_close(exc.errno or errno.EIO)
