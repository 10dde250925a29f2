"""Sans-I/O datagram client: request/reply matching, resends and limits (SPEC §5.4).

Theory of operation (STYLE §1, §11).  A UDP request may be lost on the way out, its
reply on the way back, or the server's port may be closed; the client resends on
silence and gives up with a clear :class:`~msgsock.exceptions.Timeout`.  Those
decisions are made here, once, for the blocking and the asyncio clients
(:mod:`msgsock.udp.sync`, :mod:`msgsock.udp.aio`), which only move datagrams.
Nothing here touches a socket or reads a clock: the pump passes ``now``.

A :class:`DatagramClientProtocol` holds the limits (``timeout``, ``retries``,
``max_size``), the server's addresses in the resolver's order with the one in use,
and words the client's errors.  Each :meth:`~DatagramClientProtocol.request` is a
:class:`Request`, a state machine the pump steps with ``now``
(:meth:`Request.next_step`)::

    SEND ──try_started(now), send──> WAIT ──datagram_received──> DONE
     ^                                 │
     └──── deadline (or send_blocked) ─┴──── after retries + 1 tries ──> FAILED

A try lasts ``timeout`` seconds from :meth:`Request.try_started`, the send
included: a send buffer that stays full for all of it (:meth:`Request.send_blocked`)
loses the try.

The matching rule (which datagram is the reply): the client's socket is connected
to the server's address, so the kernel delivers only that address's datagrams;
at each ``SEND`` the pump first discards what is already queued (late replies to
an earlier request, or to an earlier try of this one); then the first datagram
that arrives while the try is open is the reply.  A late reply to an earlier try
of the *same* request may be taken for this try's: every try carries the same
bytes, so it answers the same question.  An ICMP "port unreachable"
(:meth:`Request.refused`) moves to the host's next address when there is one (the
try starts again there, uncounted), and otherwise counts as silence: the
:class:`~msgsock.exceptions.Timeout` then ends ``(port unreachable)``.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from ..exceptions import MessageTooLarge, OversizeMessage, Timeout
from ..framing import bytes_like_error
from .core import check_int, check_max_size, nbytes

__all__ = ["DatagramClientProtocol", "Request", "Step", "check_client_options", "check_timeout_per_try"]

_BYTES = (bytes, bytearray, memoryview)


def check_timeout_per_try(timeout: object) -> float:
    """Return a client's per-try ``timeout`` if it is a finite number of seconds above 0.

    Raises:
        TypeError: not a number (a bool neither), naming the type received.
        ValueError: 0 or less, NaN or infinite (``timeout 0: must be a finite number of seconds > 0``).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not 0 < timeout < math.inf:  # NaN compares false too
        raise ValueError(f"timeout {timeout!r}: must be a finite number of seconds > 0")
    return float(timeout)


def check_client_options(timeout: object, retries: object, max_size: object) -> tuple[float, int, int]:
    """Check a client's options; return them as float, int, int.

    Raises:
        TypeError: a value of the wrong type, naming the argument.
        ValueError: ``timeout`` not above 0 (or NaN, or infinite), ``retries`` below
            0, ``max_size`` outside 0..65535; the message names the argument and value.
    """
    wait = check_timeout_per_try(timeout)
    tries = check_int(retries, "retries")
    if tries < 0:
        raise ValueError(f"retries {tries}: must be >= 0")
    return wait, tries, check_max_size(max_size)


class Step(enum.Enum):
    """What the pump does next for a :class:`Request`."""

    SEND = "send"
    """Discard the datagrams already queued, call :meth:`Request.try_started`, send the request."""
    WAIT = "wait"
    """Wait for a datagram until :attr:`Request.deadline`."""
    DONE = "done"
    """:attr:`Request.reply` is the reply."""
    FAILED = "failed"
    """Every try went unanswered: raise :meth:`Request.error`."""


class Request:
    """The resends of one request: tries, their deadlines, the outcome.  Sans-I/O.

    Made by :meth:`DatagramClientProtocol.request`; see the module docstring for
    the states and the matching rule.
    """

    def __init__(self, timeout: float, retries: int, where: str) -> None:
        self.timeout = timeout
        self.retries = retries
        self.where = where
        self.tries = 0
        """Tries over (answered or not)."""
        self.deadline: float | None = None
        """When the open try ends; None between tries."""
        self.reply: bytes | None = None
        self.unreachable = False
        """ICMP said the port was unreachable (on some try)."""

    def next_step(self, now: float) -> Step:
        """What to do at ``now``: an open try past its deadline is over (counted) first."""
        if self.reply is not None:
            return Step.DONE
        if self.deadline is not None and now >= self.deadline:
            self._end_try()
        if self.deadline is None:
            return Step.SEND if self.tries <= self.retries else Step.FAILED
        return Step.WAIT

    def remaining(self, now: float) -> float:
        """Seconds left in the open try (0 when none is open or it is over)."""
        return 0.0 if self.deadline is None else max(self.deadline - now, 0.0)

    def try_started(self, now: float) -> None:
        """A try begins at ``now`` (the pump is about to send): it lasts ``timeout``, sending included."""
        self.deadline = now + self.timeout

    def send_blocked(self) -> None:
        """The send buffer stayed full for the whole try: this try is lost."""
        self._end_try()

    def refused(self, *, switched: bool) -> None:
        """ICMP port unreachable on this try.

        Args:
            switched: the pump moved to the host's next address: the try starts
                again there, uncounted (bounded: each switch moves to a later
                address).  Else it counts as silence and the try is waited out.
        """
        if switched:
            self.deadline = None
        else:
            self.unreachable = True

    def datagram_received(self, data: bytes) -> bool:
        """A datagram arrived from the server: True when it is the reply (a try is open)."""
        if self.deadline is None or self.reply is not None:
            return False  # stale: no try open
        self.reply = data
        return True

    def error(self) -> Timeout:
        """The error after every try: ``no reply from HOST:PORT after N tries of T s``."""
        why = " (port unreachable)" if self.unreachable else ""
        return Timeout(f"no reply from {self.where} after {self.tries} tries of {self.timeout:g} s{why}")

    def _end_try(self) -> None:
        self.tries += 1
        self.deadline = None


class DatagramClientProtocol:
    """A datagram client's limits, addresses and errors.  Sans-I/O.

    Args:
        where: the server as the user named it (``localhost:9898``), for messages.
        candidates: the server's ``(family, address)`` pairs, in the resolver's order.
        timeout: seconds to wait for each reply (finite, above 0).
        retries: resends after the first try (``retries + 1`` tries in all).
        max_size: the largest datagram sent or accepted.

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range, naming it.
        ValueError: ``candidates`` is empty.
    """

    def __init__(
        self, where: str, candidates: list[tuple[int, Any]], timeout: float, retries: int, max_size: int
    ) -> None:
        self._timeout, self._retries, self.max_size = check_client_options(timeout, retries, max_size)
        if not candidates:
            raise ValueError(f"no address to send to for {where}")
        self.where = where
        self.candidates = list(candidates)
        self.index = 0
        """The address in use: ``candidates[index]``."""

    @property
    def timeout(self) -> float:
        """Seconds each try (or a :meth:`receive_wait` of None) waits; settable."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = check_timeout_per_try(value)

    @property
    def retries(self) -> int:
        """Resends after a request's first try; settable."""
        return self._retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._retries = check_client_options(self._timeout, value, self.max_size)[1]

    @property
    def server_address(self) -> Any:
        """The address in use."""
        return self.candidates[self.index][1]

    def check_send(self, data: object) -> int:
        """Check a datagram of ours before anything is sent; return its size.

        Raises:
            TypeError: ``data`` is not bytes-like (``message must be bytes-like, got str``).
            OversizeMessage: it is above ``max_size`` (API misuse: nothing is sent).
        """
        if not isinstance(data, _BYTES):
            raise bytes_like_error(data)
        size = nbytes(data)
        if size > self.max_size:
            raise OversizeMessage(size, self.max_size)
        return size

    def check_received(self, size: int) -> None:
        """Check a received datagram's size (it filled the buffer: too large).

        Raises:
            MessageTooLarge: it is above ``max_size`` (the peer's fault; it is discarded).
        """
        if size > self.max_size:
            raise MessageTooLarge(size, self.max_size)

    def request(self, data: object) -> Request:
        """Begin a request of ``data``: its resend state machine with the current limits.

        Raises:
            TypeError, OversizeMessage: as :meth:`check_send`.
        """
        self.check_send(data)
        return Request(self._timeout, self._retries, self.where)

    def receive_wait(self, timeout: float | None) -> float:
        """The seconds a ``receive_from(timeout)`` waits: None is the client's timeout, ``inf`` forever.

        The pump has checked ``timeout`` at its edge (``msgsock._net.check_timeout``).
        """
        return self._timeout if timeout is None else float(timeout)

    def receive_timeout(self, wait: float) -> Timeout:
        """The error of a receive that got nothing in ``wait`` seconds."""
        return Timeout(f"nothing received from {self.where} within {wait:g} s")

    def send_timeout(self) -> Timeout:
        """The error of a send that found the buffer full for ``timeout`` seconds."""
        return Timeout(f"could not send to {self.where} within {self._timeout:g} s")
