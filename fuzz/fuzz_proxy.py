"""Atheris harness for the PROXY protocol parser (msgsock.proxy; SPEC §7).

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_proxy.py -max_total_time=60 -dict=fuzz/proxy.dict fuzz/corpus/proxy

Input: the byte stream, then two control bytes: the first picks a prefix that steers
into a format (none, ``PROXY ``, ``PROXY TCP4 ``, ..., the v2 signature) and
``max_v2_size``; the second picks how the stream is cut into reads.

Checks, for any input:

- the parser returns a ProxyInfo, asks for more, or raises ProxyProtocolError;
  any other exception is a crash;
- the outcome is the same whether the bytes arrive whole or in any split;
- the header length plus ``remaining`` accounts for every byte;
- an accepted header serializes, and the serialized form parses back to the
  same ProxyInfo (parse and serialize are inverses);
- ``max_read`` never asks for bytes past the end of the header.
"""

from __future__ import annotations

import sys

import atheris
from _common import split_pattern, tail_controls

with atheris.instrument_imports():
    from msgsock.exceptions import ProxyProtocolError
    from msgsock.proxy import V2_SIGNATURE, ProxyHeaderParser, ProxyInfo, serialize

# Prefixes that steer the fuzzer past the first byte into each format.
PREFIXES = [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x20"]
MAX_V2_SIZES = [4096, 0x10000 + 16, 16, 28, 64]


def outcome(chunks: list[bytes], max_v2_size: int) -> tuple[str, ProxyInfo | None, bytes, int]:
    parser = ProxyHeaderParser(max_v2_size=max_v2_size)
    try:
        for i, chunk in enumerate(chunks):
            info = parser.feed(chunk)
            if info is not None:
                rest = parser.remaining + b"".join(chunks[i + 1 :])
                return ("info", info, rest, parser.header_size)
    except ProxyProtocolError:
        return ("error", None, b"", 0)
    try:
        parser.eof()
    except ProxyProtocolError:
        return ("more", None, b"", 0)
    raise AssertionError("eof() accepted an incomplete header")


def test_one_input(data: bytes) -> None:
    # Input layout: the stream, then 2 control bytes (prefix + max_v2_size, split pattern).
    stream, controls = tail_controls(data, 2)
    stream = PREFIXES[controls[0] % len(PREFIXES)] + stream
    max_v2_size = MAX_V2_SIZES[controls[0] // len(PREFIXES) % len(MAX_V2_SIZES)]

    whole = outcome([stream], max_v2_size)
    chunked = outcome(split_pattern(stream, controls[1]), max_v2_size)
    assert whole == chunked, (whole, chunked)

    kind, info, rest, size = whole
    if kind != "info":
        return
    assert info is not None
    assert stream[size:] == rest
    again = ProxyHeaderParser(max_v2_size=0x10000 + 16).feed(serialize(info))
    assert again == info, (info, again)

    # max_read: reading that many bytes at a time must end exactly at the header.
    parser = ProxyHeaderParser(max_v2_size=max_v2_size)
    pos = 0
    for _ in range(size + 1):
        n = parser.max_read
        assert n >= 1 and pos + n <= size, (pos, n, size)
        if parser.feed(stream[pos : pos + n]) is not None:
            break
        pos += n


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
