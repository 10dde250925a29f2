"""What the interactive client's network thread tells its UI (SPEC §6.2).

The connection :class:`State`, the events the network thread queues for the UI
(:data:`NetEvent`: status, message, note, loop and mismatch events) and the reverse
loop's figures (:class:`LoopStats`).  They are plain frozen values: built on the
network thread, read on the UI thread, never shared mutable state.  A
:class:`MessageEvent` keeps only the prefix of a body its log line can show, so a
queue of events never holds whole large bodies.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from ..client import escape_text

__all__ = [
    "LOG_TEXT_LIMIT",
    "LoopEvent",
    "LoopStats",
    "MessageEvent",
    "MismatchEvent",
    "NetEvent",
    "NoteEvent",
    "State",
    "StatusEvent",
]

LOG_TEXT_LIMIT = 200
"""Characters of a message body shown in the log; longer ones end with ``… (N bytes)``."""

_KEEP_BYTES = 4 * LOG_TEXT_LIMIT
"""Bytes of a body kept for its log line (a character is at most 4 UTF-8 bytes)."""


class State(enum.StrEnum):
    """What the status line says about the connection."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    ERROR = "error"


# -- events (network thread -> UI) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """The connection changed state; ``detail`` is the status line to show."""

    state: State
    detail: str


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A message was sent or received (``rtt`` in seconds when it answered one of ours).

    ``body`` holds at most :data:`_KEEP_BYTES` of the message (enough for the log
    line), ``size`` its real length: a queue of events never holds whole large bodies.
    """

    direction: Literal["sent", "received"]
    when: float
    number: int
    body: bytes
    size: int
    header: Mapping[str, int] = field(default_factory=dict)
    rtt: float | None = None

    @classmethod
    def of(
        cls,
        direction: Literal["sent", "received"],
        number: int,
        body: bytes,
        header: Mapping[str, int],
        rtt: float | None = None,
    ) -> MessageEvent:
        """The event for ``body``, now, keeping only the prefix the log can show."""
        return cls(direction, time.time(), number, bytes(body[:_KEEP_BYTES]), len(body), dict(header), rtt)

    def body_text(self) -> str:
        """The body for the terminal: escaped, cut at :data:`LOG_TEXT_LIMIT` characters with its full length."""
        shown = escape_text(self.body, LOG_TEXT_LIMIT)
        if len(self.body) == self.size:
            return shown
        marker = f"… ({len(self.body)} bytes)"  # escape_text counted the prefix only
        if shown.endswith(marker):
            shown = shown[: -len(marker)]
        return f"{shown}… ({self.size} bytes)"

    @property
    def truncated(self) -> bool:
        """True when the log line shows only the start of the body."""
        return self.size > LOG_TEXT_LIMIT and (
            self.size > len(self.body) or len(self.body.decode("utf-8", "backslashreplace")) > LOG_TEXT_LIMIT
        )


@dataclass(frozen=True, slots=True)
class NoteEvent:
    """A line for the log that is not a message (``level``: info, warning or error)."""

    when: float
    text: str
    level: Literal["info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class LoopEvent:
    """The reverse loop started (``first`` is its first payload) or stopped (``reason``)."""

    when: float
    running: bool
    stats: LoopStats
    first: bytes = b""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class MismatchEvent:
    """An echo of the reverse loop differed from what was sent (SPEC §6.2)."""

    when: float
    round: int
    sent: bytes
    received: bytes


NetEvent: TypeAlias = StatusEvent | MessageEvent | NoteEvent | LoopEvent | MismatchEvent


@dataclass(frozen=True, slots=True)
class LoopStats:
    """The reverse loop's figures so far (RTT percentiles in seconds, 0 before the first round)."""

    running: bool = False
    rounds: int = 0
    elapsed: float = 0.0
    p50: float = 0.0
    p99: float = 0.0

    @property
    def rate(self) -> float:
        """Average rounds per second since the loop started."""
        return self.rounds / self.elapsed if self.elapsed > 0 else 0.0
