"""Helpers shared by the atheris harnesses (not part of msgsock)."""

from __future__ import annotations

from typing import Any


def take_cuts(fdp: Any, max_pieces: int = 8) -> list[int]:
    """Consume from ``fdp`` a few raw cut positions (reduced later modulo the data length)."""
    return [fdp.ConsumeIntInRange(0, 0xFFFF) for _ in range(fdp.ConsumeIntInRange(0, max_pieces))]


def split(data: bytes, raw_cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given positions (modulo its length + 1): any split of a stream."""
    cuts = sorted(c % (len(data) + 1) for c in raw_cuts)
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def tail_controls(data: bytes, n: int) -> tuple[bytes, bytes]:
    """Split an input into (stream, n control bytes taken from its end).

    Keeping the controls at the end means a seed is simply a valid stream followed by
    ``n`` bytes (see make_seeds.py), and the fuzzer mutates the stream in place.
    """
    if len(data) < n:
        return data, bytes(n)
    return data[: len(data) - n], data[len(data) - n :]


def split_pattern(data: bytes, control: int) -> list[bytes]:
    """Cut ``data`` in pieces whose sizes cycle through a pattern chosen by ``control``.

    0 means whole; otherwise sizes 1..8 derived from the control byte's bits.
    """
    if control == 0:
        return [data]
    sizes = [(control >> shift & 7) + 1 for shift in (0, 3, 6)]
    out: list[bytes] = []
    pos = i = 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        out.append(data[pos : pos + step])
        pos += step
        i += 1
    return out
