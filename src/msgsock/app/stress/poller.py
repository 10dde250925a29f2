"""The readiness poller of one worker: ``select.epoll`` where it exists, ``selectors`` elsewhere."""

from __future__ import annotations

import select
import selectors
from typing import Any

# Event bits; equal to the epoll ones where epoll exists, and used with the fallback too.
_IN = getattr(select, "EPOLLIN", 1)
_OUT = getattr(select, "EPOLLOUT", 4)
_ERR = getattr(select, "EPOLLERR", 8)
_HUP = getattr(select, "EPOLLHUP", 16)


class _SelectorPoller:
    """The subset of ``select.epoll`` the loop uses, over :mod:`selectors` (non-Linux)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    @staticmethod
    def _mask(events: int) -> int:
        return (selectors.EVENT_READ if events & _IN else 0) | (selectors.EVENT_WRITE if events & _OUT else 0)

    def register(self, fd: int, events: int) -> None:
        self._sel.register(fd, self._mask(events))

    def modify(self, fd: int, events: int) -> None:
        self._sel.modify(fd, self._mask(events))

    def unregister(self, fd: int) -> None:
        self._sel.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        out = []
        for key, mask in self._sel.select(timeout):
            ev = (_IN if mask & selectors.EVENT_READ else 0) | (_OUT if mask & selectors.EVENT_WRITE else 0)
            out.append((key.fd, ev))
        return out

    def close(self) -> None:
        self._sel.close()


def _poller() -> Any:
    """A new poller: ``select.epoll()``, or the :mod:`selectors` fallback with its interface."""
    if hasattr(select, "epoll"):
        return select.epoll()
    return _SelectorPoller()  # pragma: no cover - non-Linux
