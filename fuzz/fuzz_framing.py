"""Atheris harness for the frame decoder (msgsock.framing; SPEC §4.1).

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_framing.py -max_total_time=60 fuzz/corpus/framing

Input: the byte stream, then two control bytes: the first picks the frame format
and its max_size, the second how the stream is cut into reads.

For a frame format picked by the input (presets, extra header fields, lengths that
count the header, small and unlimited max_size) and any stream of bytes:

- the decoder returns frames or raises a ProtocolError (MessageTooLarge,
  FrameError; IncompleteMessage at EOF); any other exception is a crash;
- the frames, and whether the stream is found bad, are the same whole or in any split;
- a stream found good re-encodes byte for byte: the frames encoded again, followed
  by the buffered tail, are the input.
"""

from __future__ import annotations

import sys

import atheris
from _common import split_pattern, tail_controls

with atheris.instrument_imports():
    from msgsock.exceptions import IncompleteMessage, ProtocolError
    from msgsock.framing import FrameFormat

SPECS = [
    "u32be",
    "u32le",
    "u16be",
    "u16le",
    "u8",
    "u64be",
    "u64le",
    "u32be+kind:B+flags:H",
    "magic:H+u16le",
    "u16be!",
    "u8le!+x:b",
    "a:q+u32be!+b:i",
]
MAX_SIZES = [4096, None, 0, 1, 255]


def decode(fmt: FrameFormat, chunks: list[bytes]) -> tuple[list[tuple[bytes, object]], str | None, int]:
    decoder = fmt.decoder()
    frames: list[tuple[bytes, object]] = []
    error = None
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                frames.append((bytes(frame), getattr(frame, "header", None)))
    except ProtocolError as exc:
        error = type(exc).__name__
    if error is None and decoder.error is not None:
        error = type(decoder.error).__name__
    buffered = decoder.buffered if error is None else -1
    if error is None:
        try:
            decoder.eof()
        except IncompleteMessage:
            assert buffered > 0
        else:
            assert buffered == 0
    return frames, error, buffered


def test_one_input(data: bytes) -> None:
    # Input layout: the stream, then 2 control bytes (format + max_size, split pattern).
    stream, controls = tail_controls(data, 2)
    spec = SPECS[controls[0] % len(SPECS)]
    fmt = FrameFormat.parse(spec, max_size=MAX_SIZES[controls[0] // len(SPECS) % len(MAX_SIZES)])

    whole = decode(fmt, [stream])
    chunked = decode(fmt, split_pattern(stream, controls[1]))
    assert whole == chunked, (spec, whole, chunked)

    frames, error, buffered = whole
    if error is None:
        encoded = b"".join(fmt.encode(body, header) for body, header in frames)  # type: ignore[arg-type]
        assert encoded + stream[len(stream) - buffered :] == stream, spec


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
