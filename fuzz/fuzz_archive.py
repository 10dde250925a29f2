"""Atheris harness for the CArchive reader (msgsock.archive; SPEC §4.3).

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_archive.py -max_total_time=60 fuzz/corpus/archive

The input picks a byte order, a max_string, a sequence of typed reads and the
archive bytes.  The reads run on an in-memory reader and on a reader over a file
that returns at most a few bytes per read (like a socket file):

- a read returns a value or raises ArchiveError (EndOfData included); any other
  exception is a crash;
- a failed read consumes nothing (``offset`` and ``unread_bytes`` are unchanged);
- both readers give the same values, errors and offsets;
- a number read is written back by ArchiveWriter as the same bytes.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import atheris
from _common import take_cuts

with atheris.instrument_imports():
    from msgsock.archive import ArchiveReader, ArchiveWriter
    from msgsock.exceptions import ArchiveError

NUMBERS = [
    "byte",
    "char",
    "bool",
    "word",
    "short",
    "long",
    "dword",
    "int",
    "unsigned",
    "bool32",
    "float",
    "double",
    "longlong",
    "ulonglong",
]
OTHERS = ["wchar", "string", "count", "bytes"]
OPS = NUMBERS + OTHERS


class TrickleFile:
    """A readable file that returns at most ``steps[i]`` bytes on its i-th read."""

    def __init__(self, data: bytes, steps: list[int]) -> None:
        self.data = data
        self.pos = 0
        self.steps = [s % 7 + 1 for s in steps] or [1]
        self.reads = 0

    def read(self, n: int) -> bytes:
        step = self.steps[self.reads % len(self.steps)]
        self.reads += 1
        chunk = self.data[self.pos : self.pos + min(n, step)]
        self.pos += len(chunk)
        return chunk


def run(reader: ArchiveReader, ops: list[tuple[str, int]]) -> list[tuple[str, Any, int]]:
    results: list[tuple[str, Any, int]] = []
    for op, n in ops:
        before = reader.offset
        try:
            value = reader.read_bytes(n) if op == "bytes" else getattr(reader, f"read_{op}")()
        except ArchiveError as exc:
            assert reader.offset == before, (op, before, reader.offset)
            results.append(("error", type(exc).__name__, reader.offset))
            continue
        if isinstance(value, float) and math.isnan(value):
            value = "nan"  # NaN != NaN; compare its presence instead
        results.append((op, value, reader.offset))
    return results


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    byteorder = "little" if fdp.ConsumeBool() else "big"
    max_string = fdp.PickValueInList([None, 0, 8, 1024])
    ops = [
        (OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)], fdp.ConsumeIntInRange(0, 64))
        for _ in range(fdp.ConsumeIntInRange(0, 12))
    ]
    steps = take_cuts(fdp)
    archive = fdp.ConsumeBytes(fdp.remaining_bytes())

    memory = ArchiveReader(archive, byteorder=byteorder, max_string=max_string)  # type: ignore[arg-type]
    in_memory = run(memory, ops)
    file = ArchiveReader(TrickleFile(archive, steps), byteorder=byteorder, max_string=max_string)  # type: ignore[arg-type]
    from_file = run(file, ops)
    assert in_memory == from_file, (in_memory, from_file)
    assert memory.unread_bytes() == archive[memory.offset :]

    # Numbers written back give the bytes they were read from.
    start = 0
    for (op, _), (kind, value, end) in zip(ops, in_memory, strict=True):
        if kind == "error":
            continue
        if op in NUMBERS and value != "nan":
            writer = ArchiveWriter(byteorder=byteorder)  # type: ignore[arg-type]
            getattr(writer, f"write_{op}")(value)
            written = writer.getvalue()
            original = archive[start:end]
            if op in ("bool", "bool32"):
                assert len(written) == len(original)  # any non-zero reads as True
            else:
                assert written == original, (op, value, written, original)
        start = end


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
