"""Write seed corpora for the harnesses whose input is "a stream, then control bytes".

Usage::

    .venv/bin/python fuzz/make_seeds.py            # writes fuzz/corpus/{proxy,framing,stages}/seed-*

Seeds are valid streams (PROXY headers of every kind, frames of every format, a
frame behind each stage prefix of the stages harness) so the fuzzer starts from deep
inside the parsers instead of rediscovering the formats.
The auth and archive harnesses pick their structure through atheris'
FuzzedDataProvider and start from an empty corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fuzz_framing import SPECS
from fuzz_stages import PREFIXES

from msgsock.framing import FrameFormat, encode
from msgsock.proxy import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    ProxyInfo,
    SslTlv,
    serialize,
    serialize_ssl_tlv,
)

HERE = Path(__file__).resolve().parent

PROXY_INFOS = [
    ProxyInfo(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ProxyInfo(1, "PROXY", "TCP6", ("2001:db8::1", 1), ("::ffff:102:304", 65535)),
    ProxyInfo(1, "PROXY", "UNKNOWN"),
    ProxyInfo(2, "LOCAL"),
    ProxyInfo(2, "PROXY", "UNKNOWN"),
    ProxyInfo(2, "PROXY", "TCP4", ("10.0.0.1", 1), ("10.0.0.2", 2)),
    ProxyInfo(2, "PROXY", "UDP6", ("::1", 53), ("2001:db8::2", 5353)),
    ProxyInfo(2, "PROXY", "UNIX_STREAM", "/run/a.sock", "\x00abstract"),
    ProxyInfo(
        2,
        "PROXY",
        "TCP6",
        ("2001:db8::7", 40000),
        ("2001:db8::1", 9898),
        {
            PP2_TYPE_CRC32C: b"\x00\x00\x00\x00",
            PP2_TYPE_ALPN: b"h2",
            PP2_TYPE_AUTHORITY: b"example.com",
            PP2_TYPE_UNIQUE_ID: b"\x01" * 16,
            PP2_TYPE_SSL: serialize_ssl_tlv(SslTlv(7, 0, {0x21: b"TLSv1.3", 0x22: b"client"})),
        },
    ),
]
TRAILER = b"\x00\x00\x00\x05hello"


def write(directory: Path, seeds: list[bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        (directory / f"seed-{i:03d}").write_bytes(seed)
    print(f"{len(seeds)} seeds in {directory}")


def main() -> int:
    proxy: list[bytes] = []
    for info in PROXY_INFOS:
        for controls in (b"\x00\x00", b"\x00\x49", b"\x01\xff"):  # whole / 2-2-2 / bigger max
            proxy.append(serialize(info) + TRAILER + controls)
    write(HERE / "corpus" / "proxy", proxy)

    framing: list[bytes] = []
    for index, spec in enumerate(SPECS):
        fmt = FrameFormat.parse(spec, max_size=4096)
        stream = b"".join(fmt.encode(body) for body in (b"", b"hi", bytes(range(40))))
        framing.append(stream + bytes([index, 0]))
        framing.append(stream[:-3] + bytes([index, 0x49]))  # ends inside a frame
    write(HERE / "corpus" / "framing", framing)

    stages: list[bytes] = []
    for prefix in range(len(PREFIXES)):
        for config in range(8):  # PROXY, TLS, auth in every combination
            for mode in (0, 3):  # Stages alone, MessageProtocol.receive_echo
                stages.append(encode(b"hello") + bytes([config | mode << 3 | prefix << 5, 0x49]))
    write(HERE / "corpus" / "stages", stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
