"""The MFCAsync reverse loop, sans I/O (KB Q192570, SPEC §6.2).

The AsyncClient sends a message, receives the echo, checks it is exactly what it
sent, reverses it and sends that back, until it is stopped.  :class:`ReverseLoop`
holds that bookkeeping -- the payload in flight, the rounds verified -- and nothing
else: ``msgsock client --rounds`` (TCP and UDP) and the interactive client drive it
over their own I/O and clocks.
"""

from __future__ import annotations

from ._text import escape_text

__all__ = ["Mismatch", "ReverseLoop"]


class Mismatch(Exception):
    """An echo that is not what was sent: ``mismatch at round 3: sent 'abc', got 'abd'``."""

    def __init__(self, round_: int, sent: bytes, got: bytes) -> None:
        super().__init__(
            f"mismatch at round {round_}: sent '{escape_text(sent, 80)}', got '{escape_text(got, 80)}'"
        )
        self.round = round_
        self.sent = sent
        self.got = got


class ReverseLoop:
    """What to send next, and whether an echo is right.

    Args:
        first: the first payload.
    """

    __slots__ = ("payload", "rounds")

    def __init__(self, first: bytes) -> None:
        self.payload = bytes(first)
        """The payload in flight: what to send now, and what its echo must be."""
        self.rounds = 0
        """Echoes verified so far."""

    def verify(self, echo: bytes | bytearray | memoryview) -> bytes:
        """Check the echo of :attr:`payload`, count the round, and return the next payload.

        Raises:
            Mismatch: ``echo`` differs from what was sent (the loop is unchanged).
        """
        got = bytes(echo)
        if got != self.payload:
            raise Mismatch(self.rounds + 1, self.payload, got)
        self.rounds += 1
        self.payload = got[::-1]
        return self.payload
