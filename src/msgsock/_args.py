"""argparse value types shared by the commands: each raises ``ArgumentTypeError``, which
argparse reports as a one-line usage error with exit status 2 (SPEC §6)."""

from __future__ import annotations

import argparse
import math

from .exceptions import InvalidFormat
from .framing import FrameFormat

__all__ = [
    "byte_size",
    "frame",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "server_port",
]

_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _port_in(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not low <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range {low}-65535")
    return value


def port(text: str) -> int:
    """A port to connect to: 1-65535."""
    return _port_in(text, 1)


def server_port(text: str) -> int:
    """A port to listen on: 0-65535 (0 = any free port)."""
    return _port_in(text, 0)


def frame(text: str) -> FrameFormat:
    """A ``--frame`` preset or format string (SPEC §4.1)."""
    try:
        return FrameFormat.parse(text)
    except InvalidFormat as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def byte_size(text: str) -> int:
    """A byte count: ``65536``, ``64k``, ``64KiB``, ``16MiB``, ``1g``."""
    body = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _UNITS.get(body[-1:], 1)
    if scale != 1:
        body = body[:-1]
    try:
        value = int(body) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a byte count (e.g. 65536, 64KiB, 16MiB)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is negative")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (seconds, where 0 often means off)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value
