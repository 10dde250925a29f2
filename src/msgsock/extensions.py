"""Which compiled extensions msgsock is using, and the switch that turns them off.

msgsock is pure Python and works everywhere; where a C compiler was present at install,
``pip install`` also built three optional extensions:

- ``msgsock._speedups``: the frame codec's hot loops (frame scanning, splitting and
  header encoding), used by :mod:`msgsock.framing` and so by every pump, server and
  client without any change on their side.  Its results are identical to the pure-Python
  codec's in every respect (frames, exceptions, state); ``tests/test_native_framing.py``
  proves it over random formats, messages and splits.
- ``msgsock._engine``: the native event loop behind ``msgsock serve --engine native``
  (:mod:`msgsock.native`).
- ``msgsock._stressloop``: the stream-mode hot loop of ``msgsock stress``.

Setting the environment variable ``MSGSOCK_NO_EXTENSIONS=1`` forces pure Python
everywhere: it is read once, when this module is first imported, so set it before
Python starts (or before the first ``import msgsock``).  Set at build time it skips
building the extensions.  ``msgsock --version`` says what is in use, e.g.
``msgsock 0.9.0 (native: speedups, engine, stressloop)`` or
``msgsock 0.9.0 (pure Python: MSGSOCK_NO_EXTENSIONS=1)``.

Theory of operation: this module imports the extensions (``_speedups`` at once, the
others on first use, since only servers and the load generator need them) and keeps the
import error of each, so :func:`describe` can say why one is missing.  It imports nothing from
msgsock, so any module may consult it at import time.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = [
    "DISABLED",
    "ENABLED",
    "NAMES",
    "available",
    "describe",
    "engine",
    "reason",
    "speedups",
    "stressloop",
]

NAMES = ("speedups", "engine", "stressloop")
"""The optional extensions, each ``msgsock._NAME``."""

DISABLED: bool = os.environ.get("MSGSOCK_NO_EXTENSIONS") == "1"
"""True when ``MSGSOCK_NO_EXTENSIONS=1`` was set when msgsock was imported."""

_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if DISABLED:
        return None
    try:
        return importlib.import_module(f"msgsock.{name}")
    except ImportError as exc:
        _errors[name] = str(exc) or type(exc).__name__
        return None


speedups: ModuleType | None = _load("_speedups")
"""The frame codec's compiled loops (``msgsock._speedups``), or None in pure Python."""

ENABLED: bool = speedups is not None
"""True when the compiled frame codec is in use."""

_lazy: dict[str, ModuleType | None] = {}


def _get(name: str) -> ModuleType | None:
    if name == "speedups":
        return speedups
    if name not in _lazy:
        _lazy[name] = _load("_" + name)
    return _lazy[name]


def __getattr__(name: str) -> ModuleType | None:
    # ``engine`` and ``stressloop`` are imported on first access (PEP 562), not when msgsock is.
    if name in ("engine", "stressloop"):
        return _get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


engine: ModuleType | None  # declared for the type checker; __getattr__ provides it
"""The native event loop (``msgsock._engine``), or None; imported on first access."""

stressloop: ModuleType | None  # as engine
"""The load generator's stream-mode loop (``msgsock._stressloop``), or None; imported on first access."""


def available() -> dict[str, bool]:
    """Return which extensions are in use: ``{"speedups": bool, "engine": bool, "stressloop": bool}``."""
    return {name: _get(name) is not None for name in NAMES}


def reason(name: str) -> str | None:
    """Why the extension ``name`` (one of :data:`NAMES`) is not in use, or None if it is.

    Raises:
        ValueError: ``name`` is not one of :data:`NAMES`.
    """
    if name not in NAMES:
        raise ValueError(f"unknown extension {name!r}; expected one of {', '.join(map(repr, NAMES))}")
    if available()[name]:
        return None
    if DISABLED:
        return "MSGSOCK_NO_EXTENSIONS=1"
    return f"extension not built: {_errors.get('_' + name, 'not found')}"


def describe() -> str:
    """One line saying what is in use.

    ``"native: speedups, engine, stressloop"`` (or only those built);
    ``"pure Python: MSGSOCK_NO_EXTENSIONS=1"``;
    ``"pure Python: extension not built: <import error>"``.
    """
    used = [name for name, ok in available().items() if ok]
    if used:
        return "native: " + ", ".join(used)
    return "pure Python: " + (reason("speedups") or "")
