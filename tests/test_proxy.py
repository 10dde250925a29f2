"""Tests of the sans-I/O PROXY protocol v1/v2 parser and serializers (proxy.py; SPEC §7, §9)."""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgsock.exceptions import InvalidState, ProxyProtocolError
from msgsock.proxy import (
    DEFAULT_MAX_V2_SIZE,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LINE,
    V2_SIGNATURE,
    Family,
    ProxyHeaderParser,
    ProxyInfo,
    SslTlv,
    crc32c,
    parse_ssl_tlv,
    serialize,
    serialize_ssl_tlv,
    serialize_v1,
    serialize_v2,
)

from .helpers import free_loopback6, unit

HYPOTHESIS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

SIG = "0d0a0d0a000d0a515549540a"  # the v2 signature, written out from the spec [2.2]


def h(text: str) -> bytes:
    """Bytes from hex with spaces, for readable vectors."""
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def pad108(path: bytes) -> str:
    """A UNIX address field: the path NUL-padded to 108 bytes, as hex."""
    return path.ljust(108, b"\x00").hex()


# -- byte-exact vectors -----------------------------------------------------------------------
#
# (name, wire bytes, parsed info, canonical?)  Canonical vectors are also what the
# serializer produces.  Written out by hand from HAProxy's spec, not computed by the
# code under test (the AWS one is a capture from a real load balancer).

IPV6_MAX = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

AWS_NLB = h(
    SIG
    + "21 11 0054 ac1f0771 ac1f0a1f c8f2 0050"  # TCP4 172.31.7.113:51442 -> 172.31.10.31:80
    + "03 0004 e8d6892d"  # CRC32C
    + "ea 0017 01 767063652d30386432626631356661633530303163 39"  # AWS VPC endpoint id
    + "04 0024"
    + "00" * 36  # NOOP padding
)
"""A v2 header from an AWS Network Load Balancer, with a CRC32C that must verify.

From aws/elastic-load-balancing-tools (proprot Compatibility_AwsNetworkLoadBalancerTest),
as quoted by kosmas-valianos/libproxyprotocol tests/test.c.
"""

VECTORS: list[tuple[str, bytes, ProxyInfo, bool]] = [
    (
        "v1-tcp4-max",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyInfo(1, "PROXY", "TCP4", ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        True,
    ),
    (
        "v1-tcp4-example",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyInfo(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        True,
    ),
    (
        "v1-tcp4-min",
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        ProxyInfo(1, "PROXY", "TCP4", ("0.0.0.0", 0), ("0.0.0.0", 0)),
        True,
    ),
    (
        "v1-tcp6-max",
        f"PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode(),
        ProxyInfo(1, "PROXY", "TCP6", (IPV6_MAX, 65535), (IPV6_MAX, 65535)),
        True,
    ),
    (
        "v1-tcp6-short",
        b"PROXY TCP6 :: ::1 0 1\r\n",
        ProxyInfo(1, "PROXY", "TCP6", ("::", 0), ("::1", 1)),
        True,
    ),
    (
        "v1-tcp6-upper-uncompressed",
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:1.2.3.4 1 2\r\n",
        ProxyInfo(1, "PROXY", "TCP6", ("2001:db8::1", 1), ("::ffff:102:304", 2)),
        False,
    ),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", ProxyInfo(1, "PROXY", "UNKNOWN"), True),
    (
        "v1-unknown-worst-case",
        f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode(),
        ProxyInfo(1, "PROXY", "UNKNOWN"),
        False,
    ),
    (
        "v2-tcp4",
        h(SIG + "21 11 000c c0a80001 c0a8000b dc04 01bb"),
        ProxyInfo(2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        True,
    ),
    (
        "v2-tcp6",
        h(SIG + "21 21 0024 20010db8000000000000000000000001 20010db8000000000000000000000002 04d2 0050"),
        ProxyInfo(2, "PROXY", "TCP6", ("2001:db8::1", 1234), ("2001:db8::2", 80)),
        True,
    ),
    (
        "v2-udp4",
        h(SIG + "21 12 000c 7f000001 7f000001 3039 0035"),
        ProxyInfo(2, "PROXY", "UDP4", ("127.0.0.1", 12345), ("127.0.0.1", 53)),
        True,
    ),
    (
        "v2-udp6",
        h(SIG + "21 22 0024" + "00" * 15 + "01" + "00" * 15 + "01" + "0001 ffff"),
        ProxyInfo(2, "PROXY", "UDP6", ("::1", 1), ("::1", 65535)),
        True,
    ),
    (
        "v2-unix-stream",
        h(SIG + "21 31 00d8" + pad108(b"/var/run/src.sock") + pad108(b"\x00abstract")),
        ProxyInfo(2, "PROXY", "UNIX_STREAM", "/var/run/src.sock", "\x00abstract"),
        True,
    ),
    (
        "v2-unix-dgram",
        h(SIG + "21 32 00d8" + pad108(b"") + pad108(b"/d")),
        ProxyInfo(2, "PROXY", "UNIX_DGRAM", "", "/d"),
        True,
    ),
    ("v2-local", h(SIG + "20 00 0000"), ProxyInfo(2, "LOCAL", "UNKNOWN"), True),
    (
        "v2-local-with-ignored-block",
        h(SIG + "20 11 000c 01020304 05060708 0001 0002"),
        ProxyInfo(2, "LOCAL", "UNKNOWN"),
        False,
    ),
    ("v2-proxy-unspec", h(SIG + "21 00 0000"), ProxyInfo(2, "PROXY", "UNKNOWN"), True),
    (
        "v2-proxy-unspec-with-ignored-block",
        h(SIG + "21 00 0003 ffffff"),
        ProxyInfo(2, "PROXY", "UNKNOWN"),
        False,
    ),
    (
        "v2-tcp4-tlvs",
        h(
            SIG
            + "21 11 002b 0a000001 0a000002 0001 0002"
            + "01 0002 6832"  # ALPN "h2"
            + "02 000b 6578616d706c652e636f6d"  # AUTHORITY "example.com"
            + "05 0002 0102"  # UNIQUE_ID
            + "04 0000"  # NOOP, empty
            + "e0 0001 78"  # custom type
        ),
        ProxyInfo(
            2,
            "PROXY",
            "TCP4",
            ("10.0.0.1", 1),
            ("10.0.0.2", 2),
            {
                PP2_TYPE_ALPN: b"h2",
                PP2_TYPE_AUTHORITY: b"example.com",
                PP2_TYPE_UNIQUE_ID: b"\x01\x02",
                PP2_TYPE_NOOP: b"",
                0xE0: b"x",
            },
        ),
        True,
    ),
    (
        "v2-tcp4-ssl",
        h(
            SIG
            + "21 11 002c 0a000001 0a000002 0001 0002"
            + "20 001d 07 00000000"  # SSL: client flags, verify ok
            + "21 0007 544c5376312e33"  # "TLSv1.3"
            + "22 000b 6578616d706c652e636f6d"  # CN "example.com"
        ),
        ProxyInfo(
            2,
            "PROXY",
            "TCP4",
            ("10.0.0.1", 1),
            ("10.0.0.2", 2),
            {PP2_TYPE_SSL: h("07 00000000 21 0007 544c5376312e33 22 000b 6578616d706c652e636f6d")},
        ),
        True,
    ),
    (
        "v2-aws-nlb-crc32c",
        AWS_NLB,
        ProxyInfo(
            2,
            "PROXY",
            "TCP4",
            ("172.31.7.113", 51442),
            ("172.31.10.31", 80),
            {
                PP2_TYPE_CRC32C: h("e8d6892d"),
                0xEA: b"\x01vpce-08d2bf15fac5001c9",
                PP2_TYPE_NOOP: bytes(36),
            },
        ),
        True,
    ),
]

IDS = [v[0] for v in VECTORS]
TRAILER = b"\x00\x00\x00\x05hello"  # an application frame that follows the header


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way to cut ``data`` in two, then one byte at a time."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def feed_all(parser: ProxyHeaderParser, chunks: list[bytes]) -> ProxyInfo | None:
    """Feed chunks until the header completes; return the info (later chunks go to remaining)."""
    for i, chunk in enumerate(chunks):
        info = parser.feed(chunk)
        if info is not None:
            parser.remaining += b"".join(chunks[i + 1 :])
            return info
    return None


# -- vectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "wire", "info", "canonical"), VECTORS, ids=IDS)
def test_vector_parses(name: str, wire: bytes, info: ProxyInfo, canonical: bool) -> None:
    """Each vector parses, fed whole, to its info; the bytes after it are left as remaining."""
    parser = ProxyHeaderParser()
    assert parser.feed(wire + TRAILER) == info
    assert parser.done and parser.info == info
    assert parser.remaining == TRAILER
    assert parser.header_size == len(wire)
    assert parser.max_read == 0


@pytest.mark.parametrize(("name", "wire", "info", "canonical"), VECTORS, ids=IDS)
def test_vector_serializes(name: str, wire: bytes, info: ProxyInfo, canonical: bool) -> None:
    """The serializer writes each canonical vector byte for byte, and parse inverts it."""
    out = serialize(info)
    if canonical:
        assert out == wire
    parser = ProxyHeaderParser()
    assert parser.feed(out) == info
    assert parser.remaining == b""


@pytest.mark.parametrize(("name", "wire", "info", "canonical"), VECTORS, ids=IDS)
def test_vector_every_split(name: str, wire: bytes, info: ProxyInfo, canonical: bool) -> None:
    """Each vector parses the same in every split, and no call returns before the last header byte."""
    stream = wire + TRAILER
    for chunks in splits(stream):
        parser = ProxyHeaderParser()
        fed = 0
        result = None
        for chunk in chunks:
            result = parser.feed(chunk)
            fed += len(chunk)
            if result is not None:
                break
            assert fed < len(wire), "the header was complete but feed returned None"
        assert result == info
        assert parser.remaining == stream[len(wire) : fed]


@pytest.mark.parametrize(("name", "wire", "info", "canonical"), VECTORS, ids=IDS)
def test_vector_max_read_never_reads_past_the_header(
    name: str, wire: bytes, info: ProxyInfo, canonical: bool
) -> None:
    """Reading max_read bytes at a time consumes exactly the header, leaving the application bytes unread."""
    stream = wire + TRAILER
    parser = ProxyHeaderParser()
    pos = 0
    for _ in range(len(stream) + 1):  # bounded: each step reads at least one byte
        n = parser.max_read
        assert n >= 1
        assert pos + n <= len(wire), f"max_read {n} at {pos} would read past the {len(wire)}-byte header"
        result = parser.feed(stream[pos : pos + n])
        pos += n
        if result is not None:
            break
    assert result == info
    assert pos == len(wire)
    assert parser.remaining == b""


def test_v1_max_line_is_107() -> None:
    """The spec's worst case v1 line is exactly 107 bytes, the longest accepted."""
    worst = VECTORS[IDS.index("v1-unknown-worst-case")][1]
    assert len(worst) == V1_MAX_LINE == 107
    assert len(VECTORS[IDS.index("v1-tcp4-max")][1]) == 56
    assert len(VECTORS[IDS.index("v1-tcp6-max")][1]) == 104
    assert len(VECTORS[IDS.index("v1-unknown")][1]) == 15


def test_signature_is_the_spec_one() -> None:
    """V2_SIGNATURE is the 12 bytes 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A."""
    assert h(SIG) == V2_SIGNATURE
    assert V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n"


def test_crc32c_known_values() -> None:
    """crc32c matches the standard check value and RFC 3720's iSCSI test vectors."""
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


def test_crc32c_is_computed_by_the_serializer() -> None:
    """A CRC32C TLV gets its value computed on serialize, which the parser then verifies."""
    info = VECTORS[IDS.index("v2-aws-nlb-crc32c")][2]
    placeholder = dataclasses.replace(info, tlvs={**info.tlvs, PP2_TYPE_CRC32C: b"\x00\x00\x00\x00"})
    assert serialize_v2(placeholder) == AWS_NLB
    assert ProxyHeaderParser().feed(serialize_v2(placeholder)) == info


def test_v1_http_example_leaves_the_request() -> None:
    """The spec's v1 example before an HTTP request leaves the request as remaining."""
    request = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    parser = ProxyHeaderParser()
    info = parser.feed(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + request)
    assert info is not None and info.source == ("192.168.0.1", 56324)
    assert parser.remaining == request


# -- early failure ------------------------------------------------------------------------------

# (prefix that is still acceptable, the byte that proves it bad, expected message part)
EARLY: list[tuple[bytes, bytes, str]] = [
    (b"", b"G", "bad PROXY header signature"),
    (b"", b"\x16", "bad PROXY header signature"),  # a TLS ClientHello
    (b"", b"\x00", "bad PROXY header signature"),  # a msgsock frame
    (b"PROX", b"Z", "does not start with 'PROXY '"),
    (b"PROXY", b"\t", "does not start with 'PROXY '"),
    (b"PROXY ", b"X", "unsupported PROXY v1 family"),
    (b"PROXY U", b"D", "unsupported PROXY v1 family"),
    (b"PROXY TCP", b"5", "unsupported PROXY v1 family"),
    (b"PROXY TCP4", b"4", "unsupported PROXY v1 family"),
    (b"PROXY UNKNOWN", b"X", "unsupported PROXY v1 family"),
    (b"PROXY ", b" ", "unsupported PROXY v1 family"),
    (b"PROXY TCP4 1.2.3", b"x", "bad character"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1", b":", "bad character"),
    (b"PROXY TCP6 ::1", b"%", "bad character"),
    (b"PROXY TCP6 ::1", b"g", "bad character"),
    (b"PROXY UNKNOWN", b"\n", "lone LF"),
    (b"PROXY UNKNOWN\r", b"x", "lone CR"),
    (b"PROXY UNKNOWN\r", b"\r", "lone CR"),
    (b"PROXY TCP4 1.2.3.4\r", b" ", "lone CR"),
    (b"PROXY UNKNOWN " + b"x" * 92, b"x", "longer than 107"),
    (b"PROXY UNKNOWN " + b"x" * 92, b"\r", "longer than 107"),
    (h(SIG[:8]), b"\x01", "bad PROXY v2 signature"),
    (h(SIG[:22]), b"\x0d", "bad PROXY v2 signature"),
    (h(SIG), b"\x11", "unsupported PROXY protocol version 1"),
    (h(SIG), b"\x31", "unsupported PROXY protocol version 3"),
    (h(SIG), b"\x22", "unsupported PROXY v2 command 0x2"),
    (h(SIG), b"\x2f", "unsupported PROXY v2 command 0xf"),
    (h(SIG + "21"), b"\x13", "address family and protocol byte 0x13"),
    (h(SIG + "21"), b"\x41", "address family and protocol byte 0x41"),
    (h(SIG + "21"), b"\x10", "address family and protocol byte 0x10"),
    (h(SIG + "21"), b"\x01", "address family and protocol byte 0x01"),
    (h(SIG + "21 11 ff"), b"\xff", "exceeds max_v2_size 4096"),
    (h(SIG + "21 11 0f"), b"\xf1", "header of 4097 bytes exceeds max_v2_size 4096"),
    (h(SIG + "21 11 00"), b"\x0b", "shorter than the 12-byte TCP4 address block"),
    (h(SIG + "21 21 00"), b"\x23", "shorter than the 36-byte TCP6 address block"),
    (h(SIG + "21 31 00"), b"\xd7", "shorter than the 216-byte UNIX_STREAM address block"),
]


@pytest.mark.parametrize(("prefix", "bad", "message"), EARLY)
def test_fails_on_the_first_byte_that_proves_it(prefix: bytes, bad: bytes, message: str) -> None:
    """A bad header fails on the byte that proves it, fed one byte at a time, never waiting for more."""
    parser = ProxyHeaderParser()
    for byte in prefix:
        assert parser.feed(bytes([byte])) is None
    with pytest.raises(ProxyProtocolError, match=message):
        parser.feed(bad)
    # The same bytes fed at once fail the same way.
    with pytest.raises(ProxyProtocolError, match=message):
        ProxyHeaderParser().feed(prefix + bad)


def test_v1_line_of_107_bytes_ending_in_crlf_is_accepted() -> None:
    """A CRLF that ends exactly at byte 107 is within the limit; one byte more is not."""
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert ProxyHeaderParser().feed(line) == ProxyInfo(1, "PROXY", "UNKNOWN")
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        ProxyHeaderParser().feed(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")


def test_v2_length_limit_is_checked_before_the_body() -> None:
    """A v2 length of 65535 fails as soon as the length field arrives, with nothing buffered for it."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="65551 bytes exceeds max_v2_size 4096"):
        parser.feed(h(SIG + "21 11 ffff"))
    assert parser.buffered == 0


def test_max_v2_size_is_configurable() -> None:
    """A header exactly at max_v2_size is accepted; one byte over is rejected."""
    info = ProxyInfo(2, "PROXY", "TCP4", ("1.2.3.4", 1), ("5.6.7.8", 2), {0xE1: b"z" * 100})
    wire = serialize_v2(info)
    assert ProxyHeaderParser(max_v2_size=len(wire)).feed(wire) == info
    with pytest.raises(ProxyProtocolError, match=f"{len(wire)} bytes exceeds max_v2_size {len(wire) - 1}"):
        ProxyHeaderParser(max_v2_size=len(wire) - 1).feed(wire)
    with pytest.raises(ValueError, match="below the 16-byte"):
        ProxyHeaderParser(max_v2_size=15)
    assert ProxyHeaderParser().max_v2_size == DEFAULT_MAX_V2_SIZE


# -- whole-header failures ----------------------------------------------------------------------

BAD_COMPLETE: list[tuple[bytes, str]] = [
    (b"PROXY \r\n", "unsupported PROXY v1 family b''"),
    (b"PROXY TCP4\r\n", "needs 4 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 4 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs 4 fields"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "needs 4 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "needs 4 fields"),
    (b"PROXY TCP4 256.0.0.1 5.6.7.8 1 2\r\n", "bad PROXY v1 TCP4 source address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad PROXY v1 TCP4 source address"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad PROXY v1 TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "bad character"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4.5 1 2\r\n", "bad PROXY v1 TCP4 destination address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad PROXY v1 TCP6 source address"),
    (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "bad PROXY v1 TCP6 destination address"),
    (b"PROXY TCP6 ::1 ::1 65536 2\r\n", "bad PROXY v1 source port b'65536'"),
    (b"PROXY TCP6 ::1 ::1 1 0443\r\n", "bad PROXY v1 destination port b'0443'"),
    (b"PROXY TCP6 ::1 ::1 00 1\r\n", "bad PROXY v1 source port b'00'"),
    (b"PROXY TCP6 ::1 ::1 1 1.5\r\n", "bad PROXY v1 destination port"),
    (b"PROXY TCP6 ::1 ::1 a 1\r\n", "bad PROXY v1 source port"),
    (h(SIG + "21 11 000e 01020304 05060708 0001 0002 01 00"), "truncated TLV at offset 28: 2 bytes left"),
    (
        h(SIG + "21 11 0010 01020304 05060708 0001 0002 01 0002 68"),
        "truncated TLV type 0x01 at offset 28: declares 2 value bytes, 1 left",
    ),
    (
        h(SIG + "21 11 0012 01020304 05060708 0001 0002 04 0000 04 0000"),
        "duplicate TLV type 0x04 at offset 31",
    ),
    (h(SIG + "21 11 0012 01020304 05060708 0001 0002 03 0003 000000"), "CRC32C TLV of 3 bytes"),
    (h(SIG + "21 11 0013 01020304 05060708 0001 0002 03 0004 00000000"), "CRC32C mismatch"),
    (
        h(SIG + "21 11 010f 01020304 05060708 0001 0002 02 0100" + "61" * 256),
        "AUTHORITY TLV of 256 bytes exceeds 255",
    ),
    (
        h(SIG + "21 11 0090 01020304 05060708 0001 0002 05 0081" + "61" * 129),
        "UNIQUE_ID TLV of 129 bytes exceeds 128",
    ),
    (h(SIG + "21 11 0013 01020304 05060708 0001 0002 20 0004 01000000"), "SSL TLV of 4 bytes"),
    (
        h(SIG + "21 11 0016 01020304 05060708 0001 0002 20 0007 01 00000000 21 00"),
        "truncated SSL sub-TLV at offset 5",
    ),
]


@pytest.mark.parametrize(("wire", "message"), BAD_COMPLETE)
def test_bad_complete_header(wire: bytes, message: str) -> None:
    """A header that is wrong only as a whole fails in every split with a message naming the bad value."""
    for chunks in splits(wire):
        with pytest.raises(ProxyProtocolError, match=re.escape(message)):
            feed_all(ProxyHeaderParser(), chunks)


def test_crc32c_check_can_be_disabled() -> None:
    """With verify_crc32c=False a wrong checksum is accepted and reported as it was sent."""
    bad = bytearray(AWS_NLB)
    bad[34] ^= 0xFF  # last byte of the CRC value (16-byte head, 12 address bytes, 3-byte TLV head)
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        ProxyHeaderParser().feed(bytes(bad))
    info = ProxyHeaderParser(verify_crc32c=False).feed(bytes(bad))
    assert info is not None and info.tlvs[PP2_TYPE_CRC32C] == bytes(bad[31:35])


def test_crc32c_covers_the_addresses() -> None:
    """Changing an address byte of a checksummed header makes the CRC32C check fail."""
    bad = bytearray(AWS_NLB)
    bad[16] ^= 0x01
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        ProxyHeaderParser().feed(bytes(bad))


# -- parser state -------------------------------------------------------------------------------


def test_error_is_sticky() -> None:
    """After an error every feed and eof raises the same error."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError) as first:
        parser.feed(b"GET /")
    assert parser.error is first.value
    with pytest.raises(ProxyProtocolError) as again:
        parser.feed(b"PROXY UNKNOWN\r\n")
    assert again.value is first.value
    with pytest.raises(ProxyProtocolError) as at_eof:
        parser.eof()
    assert at_eof.value is first.value
    assert parser.max_read == 0


def test_feed_after_done_is_invalid_state() -> None:
    """Feeding bytes after the header was returned is an API misuse, not a peer error."""
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(InvalidState):
        parser.feed(b"more")
    parser.eof()  # the header is complete: EOF is the application's business


@pytest.mark.parametrize("prefix", [b"", b"PROXY TCP4 1.2", h(SIG + "21 11 000c 0102")])
def test_eof_before_the_header_is_an_error(prefix: bytes) -> None:
    """A stream that ends before a complete header raises ProxyProtocolError saying how much arrived."""
    parser = ProxyHeaderParser()
    assert parser.feed(prefix) is None
    with pytest.raises(ProxyProtocolError, match=f"closed after {len(prefix)} bytes of a PROXY header"):
        parser.eof()


def test_max_read_hints() -> None:
    """max_read is 15 at first, exact for v2, and bounded by the shortest possible v1 line."""
    parser = ProxyHeaderParser()
    assert parser.max_read == 15
    parser.feed(b"\r")
    assert parser.max_read == 15
    parser.feed(h(SIG)[1:] + b"\x21\x11\x00")
    assert parser.max_read == 1
    parser.feed(b"\x0c")
    assert parser.max_read == 12
    v1 = ProxyHeaderParser()
    v1.feed(b"PROXY TCP4 ")
    assert v1.max_read == 32 - 11
    v1.feed(b"1.2.3.4 5.6.7.8 1 2")
    assert v1.max_read == 2
    v1.feed(b"\r")
    assert v1.max_read == 1


# -- ProxyInfo ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 3}, "version 3"),
        ({"version": 2, "command": "RELAY"}, "command"),
        ({"version": 2, "family": "SCTP4"}, "family"),
        ({"version": 1, "command": "LOCAL"}, "v1 header cannot carry LOCAL"),
        ({"version": 1, "family": "UDP4", "source": ("1.2.3.4", 1), "destination": ("1.2.3.4", 1)}, "v1"),
        ({"version": 2, "command": "LOCAL", "family": "TCP4"}, "LOCAL header carries no address"),
        ({"version": 2, "family": "UNKNOWN", "source": ("1.2.3.4", 1)}, "carries no addresses"),
        ({"version": 2, "command": "LOCAL", "tlvs": {1: b"h2"}}, "carries no TLVs"),
        ({"version": 2, "family": "TCP4", "source": ("1.2.3.4", 1)}, "destination must be"),
        ({"version": 2, "family": "TCP4", "source": ("::1", 1), "destination": ("1.2.3.4", 1)}, "IPv4"),
        ({"version": 2, "family": "TCP6", "source": ("1.2.3.4", 1), "destination": ("::1", 1)}, "IPv6"),
        ({"version": 2, "family": "TCP6", "source": ("fe80::1%eth0", 1), "destination": ("::1", 1)}, "IPv6"),
        ({"version": 2, "family": "TCP4", "source": ("host", 1), "destination": ("1.2.3.4", 1)}, "not an IP"),
        (
            {"version": 2, "family": "TCP4", "source": ("1.2.3.4", 65536), "destination": ("1.2.3.4", 1)},
            "port",
        ),
        (
            {"version": 2, "family": "TCP4", "source": ("1.2.3.4", True), "destination": ("1.2.3.4", 1)},
            "tuple",
        ),
        ({"version": 2, "family": "UNIX_STREAM", "source": ("1.2.3.4", 1), "destination": "/x"}, "path"),
        ({"version": 2, "family": "UNIX_STREAM", "source": "x" * 109, "destination": "/x"}, "108"),
        ({"version": 2, "family": "UNIX_STREAM", "source": "x\x00", "destination": "/x"}, "NUL"),
        (
            {
                "version": 1,
                "family": "TCP4",
                "source": ("1.2.3.4", 1),
                "destination": ("1.2.3.4", 1),
                "tlvs": {1: b""},
            },
            "v1 header cannot carry TLVs",
        ),
        (
            {
                "version": 2,
                "family": "UDP4",
                "source": ("1.2.3.4", 1),
                "destination": ("1.2.3.4", 1),
                "tlvs": {256: b""},
            },
            "0..255",
        ),
        (
            {
                "version": 2,
                "family": "UDP4",
                "source": ("1.2.3.4", 1),
                "destination": ("1.2.3.4", 1),
                "tlvs": {1: "h2"},
            },
            "bytes",
        ),
        (
            {
                "version": 2,
                "family": "UDP4",
                "source": ("1.2.3.4", 1),
                "destination": ("1.2.3.4", 1),
                "tlvs": {3: b"x"},
            },
            "CRC32C",
        ),
        (
            {
                "version": 2,
                "family": "UDP4",
                "source": ("1.2.3.4", 1),
                "destination": ("1.2.3.4", 1),
                "tlvs": {0x20: b"x"},
            },
            "SSL",
        ),
    ],
)
def test_proxy_info_rejects_what_no_header_can_carry(kwargs: dict[str, object], message: str) -> None:
    """ProxyInfo raises ValueError, naming the problem, for fields no header could carry."""
    with pytest.raises(ValueError, match=message):
        ProxyInfo(**kwargs)  # type: ignore[arg-type]


def test_proxy_info_normalises_hosts() -> None:
    """Hosts are stored in canonical form, so v1 and v2 headers for one address compare equal."""
    info = ProxyInfo(1, "PROXY", "TCP6", ("2001:DB8:0::1", 1), ("0:0:0:0:0:0:0:1", 2))
    assert info.source == ("2001:db8::1", 1) and info.destination == ("::1", 2)
    v2 = ProxyHeaderParser().feed(serialize_v2(info))
    assert v2 is not None and (v2.source, v2.destination) == (info.source, info.destination)


def test_peer_address() -> None:
    """peer_address gives the proxied client, or the socket's peer for LOCAL and UNKNOWN headers."""
    actual = ("10.9.8.7", 4444)
    assert ProxyInfo(2, "LOCAL").peer_address(actual) == actual
    assert ProxyInfo(1, "PROXY", "UNKNOWN").peer_address(actual) == actual
    proxied = ProxyInfo(1, "PROXY", "TCP4", ("1.2.3.4", 5), ("6.7.8.9", 10))
    assert proxied.peer_address(actual) == ("1.2.3.4", 5)


def test_serialize_v1_refuses_what_v1_cannot_say() -> None:
    """serialize_v1 raises ValueError for LOCAL, UDP, UNIX and TLVs instead of writing something else."""
    for info in (
        ProxyInfo(2, "LOCAL"),
        ProxyInfo(2, "PROXY", "UDP4", ("1.2.3.4", 1), ("1.2.3.4", 2)),
        ProxyInfo(2, "PROXY", "UNIX_STREAM", "/a", "/b"),
        ProxyInfo(2, "PROXY", "TCP4", ("1.2.3.4", 1), ("1.2.3.4", 2), {1: b"h2"}),
    ):
        with pytest.raises(ValueError, match="v1 cannot express"):
            serialize_v1(info)
    # What v1 can say converts, keeping the addresses.
    v2 = ProxyInfo(2, "PROXY", "TCP4", ("1.2.3.4", 1), ("1.2.3.4", 2))
    assert serialize_v1(v2) == b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n"


def test_serialize_v2_refuses_an_oversized_header() -> None:
    """A header whose body would not fit the 16-bit length raises ValueError."""
    info = ProxyInfo(
        2, "PROXY", "TCP4", ("1.2.3.4", 1), ("1.2.3.4", 2), {0xE0: bytes(65000), 0xE1: bytes(600)}
    )
    with pytest.raises(ValueError, match="exceeds 65535"):
        serialize_v2(info)


def test_ssl_tlv_round_trip() -> None:
    """The SSL TLV decodes into flags, verify result and sub-TLVs, and encodes back byte for byte."""
    info = VECTORS[IDS.index("v2-tcp4-ssl")][2]
    value = info.tlvs[PP2_TYPE_SSL]
    ssl = parse_ssl_tlv(value)
    assert ssl.client == PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    assert ssl.verify == 0
    assert ssl.version == "TLSv1.3" and ssl.common_name == "example.com"
    assert ssl.tlvs == {PP2_SUBTYPE_SSL_VERSION: b"TLSv1.3", PP2_SUBTYPE_SSL_CN: b"example.com"}
    assert serialize_ssl_tlv(ssl) == value
    assert SslTlv().version is None and SslTlv().common_name is None
    with pytest.raises(ValueError, match="out of range"):
        serialize_ssl_tlv(SslTlv(client=256))


# -- hypothesis ---------------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ip4 = st.ip_addresses(v=4).map(str)
ip6 = st.ip_addresses(v=6).map(str)
paths = (
    st.binary(max_size=108)
    .filter(lambda b: not b.endswith(b"\x00"))
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
# TLVs with free-form values: every type except those whose value has a structure.
free_tlvs = st.dictionaries(
    st.integers(0, 0xFF).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_SSL)),
    st.binary(max_size=40),
    max_size=5,
)


@st.composite
def infos(draw: st.DrawFn) -> ProxyInfo:
    """Any valid ProxyInfo, v1 or v2."""
    if draw(st.booleans()):
        v1_families: list[Family] = ["TCP4", "TCP6", "UNKNOWN"]
        family = draw(st.sampled_from(v1_families))
        if family == "UNKNOWN":
            return ProxyInfo(1, "PROXY", "UNKNOWN")
        hosts = ip4 if family == "TCP4" else ip6
        return ProxyInfo(1, "PROXY", family, (draw(hosts), draw(ports)), (draw(hosts), draw(ports)))
    v2_families: list[Family] = ["TCP4", "TCP6", "UDP4", "UDP6", "UNIX_STREAM", "UNIX_DGRAM", "UNKNOWN"]
    family = draw(st.sampled_from(v2_families))
    if family == "UNKNOWN":
        return ProxyInfo(2, draw(st.sampled_from(["PROXY", "LOCAL"])), "UNKNOWN")
    if family.startswith("UNIX"):
        src: object = draw(paths)
        dst: object = draw(paths)
    else:
        hosts = ip4 if family.endswith("4") else ip6
        src, dst = (draw(hosts), draw(ports)), (draw(hosts), draw(ports))
    tlvs = draw(free_tlvs)
    if draw(st.booleans()):
        tlvs[PP2_TYPE_SSL] = serialize_ssl_tlv(
            SslTlv(draw(st.integers(0, 0xFF)), draw(st.integers(0, 0xFFFFFFFF)), draw(free_tlvs))
        )
    return ProxyInfo(2, "PROXY", family, src, dst, tlvs)  # type: ignore[arg-type]


@HYPOTHESIS
@given(info=infos(), trailer=st.binary(max_size=20), data=st.data())
def test_round_trip_any_info_any_split(info: ProxyInfo, trailer: bytes, data: st.DataObject) -> None:
    """parse(serialize(info)) == info and serialize(parse(x)) == x, in any split of the stream."""
    wire = serialize(info)
    stream = wire + trailer
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    parser = ProxyHeaderParser(max_v2_size=0x10000 + 16)
    parsed = feed_all(parser, chunks)
    assert parsed == info
    assert parser.remaining == trailer
    assert serialize(parsed) == wire


@HYPOTHESIS
@given(info=infos().filter(lambda i: i.version == 2 and i.family != "UNKNOWN"))
def test_round_trip_with_crc32c(info: ProxyInfo) -> None:
    """A v2 header with a CRC32C TLV verifies, and serializes back to the same bytes."""
    tlvs = {PP2_TYPE_CRC32C: b"\x00\x00\x00\x00", **info.tlvs}
    wire = serialize_v2(dataclasses.replace(info, tlvs=tlvs))
    parsed = ProxyHeaderParser(max_v2_size=0x10000 + 16).feed(wire)
    assert parsed is not None
    assert {k: v for k, v in parsed.tlvs.items() if k != PP2_TYPE_CRC32C} == info.tlvs
    assert serialize_v2(parsed) == wire


def outcome(chunks: list[bytes]) -> tuple[str, object, bytes]:
    """Feed chunks to a fresh parser: ('info', info, remaining), ('error', ...) or ('more', ...)."""
    parser = ProxyHeaderParser()
    try:
        info = feed_all(parser, chunks)
    except ProxyProtocolError:
        return ("error", None, b"")
    if info is None:
        return ("more", None, b"")
    return ("info", info, parser.remaining)


@HYPOTHESIS
@given(
    start=st.sampled_from(
        [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]
    ),
    tail=st.binary(max_size=300),
    data=st.data(),
)
def test_any_bytes_raise_only_proxy_protocol_error(start: bytes, tail: bytes, data: st.DataObject) -> None:
    """Arbitrary bytes give an info, a request for more, or ProxyProtocolError, the same in any split."""
    stream = start + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert outcome(chunks) == outcome([stream])


@HYPOTHESIS
@given(info=infos(), data=st.data())
def test_mutated_headers_raise_only_proxy_protocol_error(info: ProxyInfo, data: st.DataObject) -> None:
    """A valid header with a byte changed, or cut short, parses, waits, or raises ProxyProtocolError."""
    wire = bytearray(serialize(info))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    for stream in (bytes(wire), bytes(wire[:cut])):
        kind, parsed, _ = outcome([stream])
        if kind == "info":
            assert isinstance(parsed, ProxyInfo)
            # Whatever was accepted is a header the serializer can write again.
            serialize(parsed)


@HYPOTHESIS
@given(
    v1=st.from_regex(rb"\APROXY (TCP4|TCP6|UNKNOWN)[ 0-9a-fA-F.:]{0,100}\r\n", fullmatch=True),
)
def test_v1_like_lines_raise_only_proxy_protocol_error(v1: bytes) -> None:
    """Lines that look like v1 headers parse to a valid info or raise ProxyProtocolError."""
    kind, parsed, _ = outcome([v1])
    assert kind in ("info", "error")
    if kind == "info":
        assert isinstance(parsed, ProxyInfo)
        assert ProxyHeaderParser().feed(serialize_v1(parsed)) == parsed


# -- over a real socket ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1",
            marks=pytest.mark.skipif(not free_loopback6(), reason="IPv6 loopback (::1) is not available"),
        ),
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_reading_max_read_leaves_the_stream_in_the_socket(host: str, version: int) -> None:
    """Over loopback TCP, reading max_read bytes at a time takes the header and leaves the rest unread."""
    info = ProxyInfo(version, "PROXY", "TCP6", ("2001:db8::7", 40000), ("2001:db8::1", 9898))  # type: ignore[arg-type]
    header = serialize(info)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as listener:
        listener.settimeout(unit(5))
        with socket.create_connection(listener.getsockname()[:2], timeout=unit(5)) as client:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(unit(5))
                client.sendall(header + TRAILER)
                parser = ProxyHeaderParser()
                got_info: ProxyInfo | None = None
                for _ in range(len(header) + 1):  # bounded; recv returns at least one byte
                    chunk = conn.recv(parser.max_read)
                    assert chunk, "peer closed early"
                    got_info = parser.feed(chunk)
                    if got_info is not None:
                        break
                assert got_info == info
                assert parser.remaining == b""
                rest = b""
                while len(rest) < len(TRAILER):
                    got = conn.recv(len(TRAILER) - len(rest))
                    assert got
                    rest += got
                assert rest == TRAILER
