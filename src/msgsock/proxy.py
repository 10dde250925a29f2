"""Sans-I/O PROXY protocol header parser and serializer, versions 1 and 2 (SPEC §7).

A TCP load balancer such as HAProxy (``send-proxy`` / ``send-proxy-v2``) puts one
PROXY header in front of the bytes of each connection it relays, so the server can
see the real client address instead of the balancer's.  The format is HAProxy's
"The PROXY protocol, versions 1 & 2" (``doc/proxy-protocol.txt``).  A server accepts
the header only when told to (``--proxy-protocol``): the spec forbids guessing,
since any client could otherwise claim any address.

Wire formats (the spec's section numbers in brackets):

- **v1** [2.1]: one US-ASCII line, at most 107 bytes with its CRLF::

      PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n
      PROXY TCP6 <ipv6 src> <ipv6 dst> <src port> <dst port>\\r\\n
      PROXY UNKNOWN\\r\\n        (anything up to the CRLF is ignored)

  Exactly one space between fields; ports 0..65535 in decimal without leading zeros;
  IPv4 addresses without leading zeros; a lone CR or LF is an error.

- **v2** [2.2]: a 16-byte binary header then ``len`` bytes::

      0  12 bytes  signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
      12 1 byte    version (high nibble, must be 2) | command (0 LOCAL, 1 PROXY)
      13 1 byte    address family (high nibble) | transport (low nibble)
      14 2 bytes   len, big-endian: bytes that follow
      16 len bytes addresses, then TLVs (type: 1 byte, length: 2 bytes BE, value)

  Families: ``0x11`` TCP4 and ``0x12`` UDP4 (4+4 address bytes, 2+2 port bytes);
  ``0x21`` TCP6 and ``0x22`` UDP6 (16+16, 2+2); ``0x31`` UNIX_STREAM and ``0x32``
  UNIX_DGRAM (108+108 bytes of NUL-padded path); ``0x00`` UNSPEC.

What this parser decides, where the spec leaves a choice:

- It fails **as soon as the bytes prove** the header bad: a first byte that is
  neither ``P`` nor ``\\r``, a prefix that leaves ``PROXY `` or the v2 signature, an
  unknown v1 family word, a byte a TCP4/TCP6 line cannot hold, a lone CR or LF, a
  v2 version/command/family byte, a v2 length over ``max_v2_size`` or shorter than
  its addresses.  It never waits for bytes it does not need.
- A v2 ``LOCAL`` header, and a v2 ``PROXY`` header with family UNSPEC, carry no
  address the receiver may use [2.2]: their whole block is skipped (as HAProxy
  does), so they parse to ``family="UNKNOWN"`` with no addresses and no TLVs.
- TLVs are parsed for the other families.  A truncated TLV, a duplicated type, a
  CRC32C value that is not 4 bytes or does not match [2.2.3], an AUTHORITY over 255
  bytes or a UNIQUE_ID over 128 bytes [2.2.5], or a malformed SSL TLV [2.2.6] is an
  error.  Unknown types are kept as they are.
- v2 headers are limited to ``max_v2_size`` bytes (default 4096, far above what a
  load balancer sends; the wire allows 65,551): checked as soon as the length field
  arrives, before anything is buffered for it.

Theory of operation of :class:`ProxyHeaderParser`: bytes are appended to a small
buffer and the header is re-examined from its start on each :meth:`feed` (it is at
most ``max_v2_size`` bytes, and a v1 line is examined only within its first 107
bytes).  Once the header is complete, :meth:`feed` returns a :class:`ProxyInfo` and
the bytes after the header are in :attr:`~ProxyHeaderParser.remaining`: they belong
to the application stream.  :attr:`~ProxyHeaderParser.max_read` tells an I/O layer
how many bytes it may read without reading past the header, for when those bytes
must stay in the socket (a TLS handshake follows).

:func:`serialize_v1` and :func:`serialize_v2` are exact inverses of the parser
(STYLE §3): ``parse(serialize(info)) == info`` for every valid :class:`ProxyInfo`,
and ``serialize(parse(header)) == header`` for every header in canonical form
(which is what they produce; a v1 UNKNOWN line's ignored tail and a LOCAL header's
ignored block are not kept).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .exceptions import InvalidState, ProxyProtocolError

__all__ = [
    "DEFAULT_MAX_V2_SIZE",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LINE",
    "V2_SIGNATURE",
    "Address",
    "Family",
    "ProxyHeaderParser",
    "ProxyInfo",
    "SslTlv",
    "crc32c",
    "parse_ssl_tlv",
    "serialize",
    "serialize_ssl_tlv",
    "serialize_v1",
    "serialize_v2",
]

# -- constants from the spec ---------------------------------------------------------------

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes that start every v2 header [2.2]."""

V1_PREFIX: Final = b"PROXY "
V1_MAX_LINE: Final = 107
"""Longest v1 line, CRLF included [2.1]: the UNKNOWN worst case with two IPv6 addresses."""

DEFAULT_MAX_V2_SIZE: Final = 4096
"""Default limit on a whole v2 header (16 fixed bytes + addresses + TLVs).  A security limit."""

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

_AUTHORITY_MAX = 255  # a host name; HAProxy rejects longer ones too
_UNIQUE_ID_MAX = 128  # [2.2.5] "up to 128 bytes"
_UNIX_PATH_SIZE = 108  # [2.2] sizeof(sun_path)

# Struct formats of the wire (network byte order).
V2_HEADER: Final = struct.Struct("!12sBBH")  # signature, version|command, family|transport, len
_V2_INET: Final = struct.Struct("!4s4sHH")  # src addr, dst addr, src port, dst port
_V2_INET6: Final = struct.Struct("!16s16sHH")
_V2_UNIX: Final = struct.Struct("!108s108s")
_TLV_HEADER: Final = struct.Struct("!BH")  # type, length
_SSL_HEADER: Final = struct.Struct("!BI")  # client bit field, verify result

Family = Literal["TCP4", "TCP6", "UDP4", "UDP6", "UNIX_STREAM", "UNIX_DGRAM", "UNKNOWN"]
"""Proxied transport and address family.  v1 knows only TCP4, TCP6 and UNKNOWN."""

Address = tuple[str, int] | str
"""``(host, port)`` for TCP/UDP (host in ``ipaddress`` canonical form); a path for UNIX."""

_V2_FAMILIES: dict[int, Family] = {
    0x00: "UNKNOWN",
    0x11: "TCP4",
    0x12: "UDP4",
    0x21: "TCP6",
    0x22: "UDP6",
    0x31: "UNIX_STREAM",
    0x32: "UNIX_DGRAM",
}
_V2_FAMILY_BYTES: dict[Family, int] = {name: byte for byte, name in _V2_FAMILIES.items()}
_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_IP_VERSION: dict[Family, int] = {"TCP4": 4, "UDP4": 4, "TCP6": 6, "UDP6": 6}

# v1: the family words, and the shortest line each allows (for ProxyHeaderParser.max_read).
_V1_FAMILIES: dict[bytes, Family] = {b"TCP4": "TCP4", b"TCP6": "TCP6", b"UNKNOWN": "UNKNOWN"}
_V1_MIN_LINE = {
    b"TCP4": len(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"),
    b"TCP6": len(b"PROXY TCP6 :: :: 0 0\r\n"),
    b"UNKNOWN": len(b"PROXY UNKNOWN\r\n"),
}
_V1_SHORTEST = min(_V1_MIN_LINE.values())  # 15: "PROXY UNKNOWN\r\n"
# Bytes that may follow "PROXY TCP4 " / "PROXY TCP6 " on a line (spaces, digits,
# addresses).  IPv6 may hold dots: HAProxy's inet_ntop writes "::ffff:1.2.3.4".
_V1_TCP4_BYTES = frozenset(b" .0123456789")
_V1_TCP6_BYTES = frozenset(b" .:0123456789abcdefABCDEF")


def _show(data: bytes | bytearray | memoryview, limit: int = 48) -> str:
    """Return a short repr of peer bytes for an error message (values, never "malformed")."""
    raw = bytes(data)
    return repr(raw[:limit]) + ("..." if len(raw) > limit else "")


# -- CRC32C (Castagnoli), for PP2_TYPE_CRC32C [2.2.3] ---------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # reflected polynomial 0x1EDC6F41
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC32C (RFC 4960 appendix B) of ``data``, continuing from ``crc``.

    Pure Python with a 256-entry table: headers are a few hundred bytes at connect.
    ``crc32c(b"123456789") == 0xE3069283``.
    """
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- the SSL TLV [2.2.6] ----------------------------------------------------------------------


@dataclass(frozen=True)
class SslTlv:
    """The value of a ``PP2_TYPE_SSL`` TLV.

    Args:
        client: bit field of ``PP2_CLIENT_SSL``, ``PP2_CLIENT_CERT_CONN``, ``PP2_CLIENT_CERT_SESS``.
        verify: 0 when the client presented a certificate that was verified.
        tlvs: sub-TLVs (``PP2_SUBTYPE_SSL_*`` -> raw value), in wire order.
    """

    client: int = 0
    verify: int = 0
    tlvs: dict[int, bytes] = field(default_factory=dict, hash=False)

    @property
    def version(self) -> str | None:
        """The TLS version the client used (``PP2_SUBTYPE_SSL_VERSION``), if sent."""
        value = self.tlvs.get(PP2_SUBTYPE_SSL_VERSION)
        return None if value is None else value.decode("ascii", "replace")

    @property
    def common_name(self) -> str | None:
        """The client certificate's CN (``PP2_SUBTYPE_SSL_CN``), if sent."""
        value = self.tlvs.get(PP2_SUBTYPE_SSL_CN)
        return None if value is None else value.decode("utf-8", "replace")


def _parse_tlvs(data: bytes, start: int, what: str) -> tuple[dict[int, bytes], dict[int, int]]:
    """Split ``data[start:]`` into TLVs; return them and each value's offset in ``data``.

    Raises:
        ProxyProtocolError: a truncated TLV or a duplicated type.
    """
    tlvs: dict[int, bytes] = {}
    offsets: dict[int, int] = {}
    pos, end = start, len(data)
    while pos < end:
        if end - pos < _TLV_HEADER.size:
            raise ProxyProtocolError(
                f"truncated {what} at offset {pos}: {end - pos} bytes left, a TLV header needs 3"
            )
        kind, length = _TLV_HEADER.unpack_from(data, pos)
        value_at = pos + _TLV_HEADER.size
        if value_at + length > end:
            raise ProxyProtocolError(
                f"truncated {what} type 0x{kind:02x} at offset {pos}: "
                f"declares {length} value bytes, {end - value_at} left"
            )
        if kind in tlvs:
            # Two values for one type would let a sender show different readers different things.
            raise ProxyProtocolError(f"duplicate {what} type 0x{kind:02x} at offset {pos}")
        tlvs[kind] = data[value_at : value_at + length]
        offsets[kind] = value_at
        pos = value_at + length
    return tlvs, offsets


def parse_ssl_tlv(value: bytes | bytearray | memoryview) -> SslTlv:
    """Decode the value of a ``PP2_TYPE_SSL`` TLV.

    Raises:
        ProxyProtocolError: shorter than its 5-byte head, or malformed sub-TLVs.
    """
    raw = bytes(value)
    if len(raw) < _SSL_HEADER.size:
        raise ProxyProtocolError(f"SSL TLV of {len(raw)} bytes is shorter than its 5-byte head")
    client, verify = _SSL_HEADER.unpack_from(raw)
    tlvs, _ = _parse_tlvs(raw, _SSL_HEADER.size, "SSL sub-TLV")
    return SslTlv(client, verify, tlvs)


def serialize_ssl_tlv(ssl: SslTlv) -> bytes:
    """Encode the value of a ``PP2_TYPE_SSL`` TLV; the inverse of :func:`parse_ssl_tlv`.

    Raises:
        ValueError: a field out of range.
    """
    if not 0 <= ssl.client <= 0xFF or not 0 <= ssl.verify <= 0xFFFFFFFF:
        raise ValueError(f"SSL TLV client {ssl.client} or verify {ssl.verify} out of range")
    return _SSL_HEADER.pack(ssl.client, ssl.verify) + _serialize_tlvs(ssl.tlvs)


def _serialize_tlvs(tlvs: dict[int, bytes]) -> bytes:
    out = bytearray()
    for kind, value in tlvs.items():
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind} or length {len(value)} out of range")
        out += _TLV_HEADER.pack(kind, len(value))
        out += value
    return bytes(out)


def _tlv_problem(kind: int, value: bytes) -> str | None:
    """Say what is wrong with a known TLV's value, or None: shared by parser and ProxyInfo."""
    if kind == PP2_TYPE_CRC32C and len(value) != 4:
        return f"CRC32C TLV of {len(value)} bytes; it must be 4"
    if kind == PP2_TYPE_AUTHORITY and len(value) > _AUTHORITY_MAX:
        return f"AUTHORITY TLV of {len(value)} bytes exceeds {_AUTHORITY_MAX}"
    if kind == PP2_TYPE_UNIQUE_ID and len(value) > _UNIQUE_ID_MAX:
        return f"UNIQUE_ID TLV of {len(value)} bytes exceeds {_UNIQUE_ID_MAX}"
    if kind == PP2_TYPE_SSL:
        try:
            parse_ssl_tlv(value)
        except ProxyProtocolError as exc:
            return str(exc)
    return None


# -- the parsed header ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header says about the relayed connection.  Frozen and validated.

    Args:
        version: 1 (text line) or 2 (binary).
        command: ``"PROXY"`` (relayed on behalf of ``source``) or ``"LOCAL"`` (v2 only:
            the proxy's own connection, e.g. a health check; use the real endpoints).
        family: see :data:`Family`; ``"UNKNOWN"`` for v1 UNKNOWN, v2 UNSPEC and LOCAL.
        source: the original client, ``(host, port)`` or a UNIX path; None when
            the family is UNKNOWN.
        destination: the address the client connected to, same form.
        tlvs: v2 TLVs (type -> raw value) in wire order; empty for v1, LOCAL and
            UNKNOWN.  See the ``PP2_TYPE_*`` constants.

    Host strings are normalised to ``ipaddress`` canonical form (``"::1"``, lower
    case), so the same address reads the same from v1 and v2.

    Raises:
        ValueError: fields that no header could carry (e.g. a v1 UDP4 header, a
            TCP6 family with an IPv4 address, a port out of range, TLVs on LOCAL).
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"] = "PROXY"
    family: Family = "UNKNOWN"
    source: Address | None = None
    destination: Address | None = None
    tlvs: dict[int, bytes] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"PROXY protocol version {self.version!r} is not 1 or 2")
        if self.command not in ("PROXY", "LOCAL"):
            raise ValueError(f"command {self.command!r} is not 'PROXY' or 'LOCAL'")
        if self.family not in _V2_FAMILY_BYTES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(_V2_FAMILY_BYTES)}")
        if self.version == 1 and (self.command == "LOCAL" or self.family.encode() not in _V1_FAMILIES):
            raise ValueError(f"a v1 header cannot carry {self.command} {self.family}")
        if self.command == "LOCAL" and self.family != "UNKNOWN":
            raise ValueError(
                f"a LOCAL header carries no address: family must be 'UNKNOWN', not {self.family!r}"
            )
        if self.family == "UNKNOWN":
            if self.source is not None or self.destination is not None:
                raise ValueError("family UNKNOWN carries no addresses: source and destination must be None")
            if self.tlvs:
                # The receiver skips the whole block of LOCAL and UNSPEC headers [2.2].
                raise ValueError(f"{self.command} with family UNKNOWN carries no TLVs")
        else:
            setattr_ = object.__setattr__
            setattr_(self, "source", self._check_address(self.source, "source"))
            setattr_(self, "destination", self._check_address(self.destination, "destination"))
        if not isinstance(self.tlvs, dict):
            raise ValueError(f"tlvs must be a dict of int -> bytes, not {type(self.tlvs).__name__}")
        if self.tlvs and self.version == 1:
            raise ValueError("a v1 header cannot carry TLVs")
        tlvs: dict[int, bytes] = {}
        for kind, value in self.tlvs.items():
            if not isinstance(kind, int) or isinstance(kind, bool) or not 0 <= kind <= 0xFF:
                raise ValueError(f"TLV type {kind!r} is not an int in 0..255")
            if not isinstance(value, bytes | bytearray | memoryview):
                raise ValueError(f"TLV 0x{kind:02x} value must be bytes, not {type(value).__name__}")
            raw = bytes(value)
            problem = _tlv_problem(kind, raw)
            if problem is not None:
                raise ValueError(problem)
            tlvs[kind] = raw
        object.__setattr__(self, "tlvs", tlvs)

    def _check_address(self, address: object, name: str) -> Address:
        if self.family in ("UNIX_STREAM", "UNIX_DGRAM"):
            if not isinstance(address, str):
                raise ValueError(f"{self.family} {name} must be a path str, not {address!r}")
            raw = address.encode("utf-8", "surrogateescape")
            if len(raw) > _UNIX_PATH_SIZE or raw.endswith(b"\x00"):
                # The wire pads with NULs to 108 bytes; a trailing NUL would not come back.
                raise ValueError(f"{self.family} {name} {address!r} is over 108 bytes or ends with NUL")
            return address
        if not (
            isinstance(address, tuple)
            and len(address) == 2
            and isinstance(address[0], str)
            and isinstance(address[1], int)
            and not isinstance(address[1], bool)
        ):
            raise ValueError(f"{self.family} {name} must be a (host, port) tuple, not {address!r}")
        host, port = address
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} port {port} is not in 0..65535")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{name} host {host!r} is not an IP address") from None
        if ip.version != _IP_VERSION[self.family] or (isinstance(ip, ipaddress.IPv6Address) and ip.scope_id):
            raise ValueError(f"{name} host {host!r} is not an IPv{_IP_VERSION[self.family]} address")
        return (str(ip), port)

    def peer_address(self, actual: Any) -> Any:
        """Return the address to treat as the peer's: the proxied client, else ``actual``.

        ``actual`` is the socket's own peer address; it is returned for LOCAL and
        UNKNOWN headers, which carry no usable address [2.1, 2.2].
        """
        return self.source if self.source is not None else actual


# -- serializers ------------------------------------------------------------------------------


def serialize_v1(info: ProxyInfo) -> bytes:
    """Return the v1 line for ``info``; the inverse of :class:`ProxyHeaderParser`.

    Raises:
        ValueError: ``info`` has what v1 cannot say (LOCAL, UDP, UNIX, TLVs).
    """
    if info.command != "PROXY" or info.family not in ("TCP4", "TCP6", "UNKNOWN") or info.tlvs:
        raise ValueError(f"v1 cannot express {info.command} {info.family} with {len(info.tlvs)} TLVs")
    if info.family == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    src, dst = info.source, info.destination
    assert isinstance(src, tuple) and isinstance(dst, tuple)  # validated by ProxyInfo
    return f"PROXY {info.family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")


def serialize_v2(info: ProxyInfo) -> bytes:
    """Return the v2 header for ``info``; the inverse of :class:`ProxyHeaderParser`.

    When ``info.tlvs`` holds a ``PP2_TYPE_CRC32C`` entry, its value is computed here
    [2.2.3] whatever ``info`` holds (the checksum covers the whole header).

    Raises:
        ValueError: the header would exceed the 65,535 bytes its length field counts.
    """
    command = 1 if info.command == "PROXY" else 0
    fam = _V2_FAMILY_BYTES[info.family]
    src, dst = info.source, info.destination
    if fam in (0x11, 0x12, 0x21, 0x22):
        assert isinstance(src, tuple) and isinstance(dst, tuple)
        st = _V2_INET if fam < 0x20 else _V2_INET6
        block = st.pack(
            ipaddress.ip_address(src[0]).packed, ipaddress.ip_address(dst[0]).packed, src[1], dst[1]
        )
    elif fam in (0x31, 0x32):
        assert isinstance(src, str) and isinstance(dst, str)
        block = _V2_UNIX.pack(src.encode("utf-8", "surrogateescape"), dst.encode("utf-8", "surrogateescape"))
    else:
        block = b""
    tlvs = dict(info.tlvs)
    if PP2_TYPE_CRC32C in tlvs:
        tlvs[PP2_TYPE_CRC32C] = b"\x00\x00\x00\x00"  # the checksum is computed over zeros
    body = block + _serialize_tlvs(tlvs)
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes exceeds 65535")
    header = bytearray(V2_HEADER.pack(V2_SIGNATURE, 0x20 | command, fam, len(body)) + body)
    if PP2_TYPE_CRC32C in tlvs:
        at = V2_HEADER.size + len(block)
        for kind, value in tlvs.items():
            if kind == PP2_TYPE_CRC32C:
                break
            at += _TLV_HEADER.size + len(value)
        at += _TLV_HEADER.size
        header[at : at + 4] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


def serialize(info: ProxyInfo) -> bytes:
    """Return ``info`` in the format its ``version`` names (:func:`serialize_v1` or ``_v2``).

    Raises:
        ValueError: as the serializer of that version.
    """
    return serialize_v1(info) if info.version == 1 else serialize_v2(info)


# -- the parser -------------------------------------------------------------------------------


class ProxyHeaderParser:
    """Reads one PROXY header (v1 or v2) from the start of a stream.  Sans-I/O.

    Feed it the first bytes of an accepted connection; it returns a
    :class:`ProxyInfo` once the header is complete, and the bytes after the header
    are then in :attr:`remaining`.  See the module docstring for what it checks.

    Args:
        max_v2_size: largest v2 header accepted, in bytes (fixed part included).
        verify_crc32c: check a ``PP2_TYPE_CRC32C`` TLV when one is present.

    Raises:
        ValueError: ``max_v2_size`` below 16.
    """

    __slots__ = ("_buf", "_error", "_info", "_size", "max_v2_size", "remaining", "verify_crc32c")

    def __init__(self, *, max_v2_size: int = DEFAULT_MAX_V2_SIZE, verify_crc32c: bool = True) -> None:
        if max_v2_size < V2_HEADER.size:
            raise ValueError(f"max_v2_size {max_v2_size} is below the 16-byte fixed header")
        self.max_v2_size = max_v2_size
        self.verify_crc32c = verify_crc32c
        self.remaining = b""
        """Bytes that followed the header: the start of the application stream."""
        self._buf = bytearray()
        self._info: ProxyInfo | None = None
        self._error: ProxyProtocolError | None = None
        self._size = 0

    @property
    def done(self) -> bool:
        """True once the header has been parsed."""
        return self._info is not None

    @property
    def info(self) -> ProxyInfo | None:
        """The parsed header, once :attr:`done`."""
        return self._info

    @property
    def error(self) -> ProxyProtocolError | None:
        """The error that made the header invalid, if any."""
        return self._error

    @property
    def header_size(self) -> int:
        """Bytes the header took on the wire, once :attr:`done` (else 0)."""
        return self._size

    @property
    def buffered(self) -> int:
        """Bytes held of an unfinished header."""
        return len(self._buf)

    @property
    def max_read(self) -> int:
        """The most bytes the next read may take without reading past the header.

        0 once the header is parsed or found bad.  An I/O layer that must leave the
        bytes after the header in the socket (because TLS starts there) reads at
        most this many each time; otherwise it may read freely and pass
        :attr:`remaining` on.
        """
        if self._info is not None or self._error is not None:
            return 0
        buf = self._buf
        n = len(buf)
        if n == 0:
            return _V1_SHORTEST  # both versions are longer than "PROXY UNKNOWN\r\n"
        if buf[0] == 0x0D:
            if n < V2_HEADER.size:
                return V2_HEADER.size - n
            return V2_HEADER.size + int.from_bytes(buf[14:16], "big") - n
        if buf.endswith(b"\r"):
            return 1  # only the LF can follow
        word = bytes(buf[len(V1_PREFIX) :]).split(b" ", 1)
        shortest = _V1_MIN_LINE[word[0]] if len(word) == 2 and word[0] in _V1_MIN_LINE else _V1_SHORTEST
        return max(shortest - n, 2)  # at least the CRLF is still to come

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyInfo | None:
        """Take the next bytes of the stream; return the header once it is complete.

        Returns:
            The :class:`ProxyInfo`, on the call that completes the header; None
            while more bytes are needed.

        Raises:
            ProxyProtocolError: the bytes cannot start a valid header (raised on the
                first bytes that prove it), and again on every later call.
            InvalidState: called again after the header was returned.
        """
        if self._error is not None:
            raise self._error
        if self._info is not None:
            raise InvalidState("the PROXY header is already parsed; pass later bytes to the application")
        self._buf += data
        try:
            info = self._parse()
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if info is not None:
            self._info = info
        return info

    def eof(self) -> None:
        """Tell the parser the stream ended.

        Raises:
            ProxyProtocolError: the stream ended before a complete header (or the
                error already found).
        """
        if self._error is not None:
            raise self._error
        if self._info is None:
            self._error = ProxyProtocolError(
                f"connection closed after {len(self._buf)} bytes of a PROXY header: {_show(self._buf)}"
            )
            raise self._error

    # -- internals ------------------------------------------------------------------------

    def _complete(self, size: int) -> bytes:
        """Take the ``size``-byte header out of the buffer; the rest is ``remaining``."""
        buf = self._buf
        header = bytes(buf[:size])
        self.remaining = bytes(buf[size:])
        self._buf = bytearray()
        self._size = size
        return header

    def _parse(self) -> ProxyInfo | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == 0x0D:
            return self._parse_v2()
        if buf[0] == V1_PREFIX[0]:
            return self._parse_v1()
        raise ProxyProtocolError(
            f"bad PROXY header signature: {_show(buf, 16)} starts neither the v1 'PROXY ' line "
            "nor the v2 signature"
        )

    def _parse_v1(self) -> ProxyInfo | None:
        buf = self._buf
        n = len(buf)
        k = min(n, len(V1_PREFIX))
        if buf[:k] != V1_PREFIX[:k]:
            raise ProxyProtocolError(f"bad PROXY v1 header: {_show(buf[:k])} does not start with 'PROXY '")
        end = buf.find(b"\r\n", 0, V1_MAX_LINE)
        # What is known of the line so far: up to the CRLF, or everything but a final
        # CR that may yet be followed by its LF.
        known = end if end >= 0 else min(n, V1_MAX_LINE) - (1 if buf[min(n, V1_MAX_LINE) - 1] == 0x0D else 0)
        for bare, name in ((b"\r", "CR"), (b"\n", "LF")):
            at = buf.find(bare, 0, known)
            if at >= 0:
                raise ProxyProtocolError(
                    f"PROXY v1 line has a lone {name} at offset {at}: {_show(buf[: at + 1])}"
                )
        if end < 0 and n >= V1_MAX_LINE:
            raise ProxyProtocolError(
                f"PROXY v1 line longer than {V1_MAX_LINE} bytes (no CRLF in {_show(buf[:V1_MAX_LINE], 24)})"
            )
        self._check_v1_partial(bytes(buf[len(V1_PREFIX) : known]), complete=end >= 0)
        if end < 0:
            return None
        return self._decode_v1(self._complete(end + 2)[:end])

    @staticmethod
    def _check_v1_partial(rest: bytes, *, complete: bool) -> None:
        """Fail early on a family word or a character no valid line could have."""
        word, space, tail = rest.partition(b" ")
        if space or complete:
            if word not in _V1_FAMILIES:
                raise ProxyProtocolError(
                    f"unsupported PROXY v1 family {_show(word)}: expected TCP4, TCP6 or UNKNOWN"
                )
        elif not any(name.startswith(word) for name in _V1_FAMILIES):
            raise ProxyProtocolError(
                f"unsupported PROXY v1 family {_show(word)}: expected TCP4, TCP6 or UNKNOWN"
            )
        allowed = _V1_TCP4_BYTES if word == b"TCP4" else _V1_TCP6_BYTES if word == b"TCP6" else None
        if allowed is not None:
            for i, byte in enumerate(tail):
                if byte not in allowed:
                    raise ProxyProtocolError(
                        f"bad character {bytes([byte])!r} at offset {len(V1_PREFIX) + len(word) + 1 + i} "
                        f"of a PROXY v1 {word.decode()} line"
                    )

    @staticmethod
    def _decode_v1(line: bytes) -> ProxyInfo:
        parts = line.split(b" ")
        family = _V1_FAMILIES[parts[1]]  # checked by _check_v1_partial
        if family == "UNKNOWN":
            return ProxyInfo(1, "PROXY", "UNKNOWN")  # the rest of the line is ignored [2.1]
        if len(parts) != 6:
            raise ProxyProtocolError(
                f"PROXY v1 {family} line needs 4 fields separated by single spaces "
                f"after the family, got {len(parts) - 2}: {_show(line, 110)}"
            )
        src = _v1_address(parts[2], family, "source")
        dst = _v1_address(parts[3], family, "destination")
        sport = _v1_port(parts[4], "source")
        dport = _v1_port(parts[5], "destination")
        return ProxyInfo(1, "PROXY", family, (src, sport), (dst, dport))

    def _parse_v2(self) -> ProxyInfo | None:
        buf = self._buf
        n = len(buf)
        k = min(n, len(V2_SIGNATURE))
        if buf[:k] != V2_SIGNATURE[:k]:
            raise ProxyProtocolError(f"bad PROXY v2 signature {_show(buf[:k])}; expected {V2_SIGNATURE!r}")
        if n < 13:
            return None
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(
                f"unsupported PROXY protocol version {ver_cmd >> 4} (byte 0x{ver_cmd:02x}); only 2 is defined"
            )
        command = ver_cmd & 0x0F
        if command > 1:
            raise ProxyProtocolError(
                f"unsupported PROXY v2 command 0x{command:x}; 0 (LOCAL) and 1 (PROXY) are defined"
            )
        if n < 14:
            return None
        fam = buf[13]
        if command == 1 and fam not in _V2_FAMILIES:
            # A LOCAL header's family is ignored [2.2], so only PROXY headers are checked.
            raise ProxyProtocolError(
                f"unsupported PROXY v2 address family and protocol byte 0x{fam:02x}; "
                "expected one of 00 11 12 21 22 31 32"
            )
        if n < V2_HEADER.size:
            return None
        length = int.from_bytes(buf[14:16], "big")
        size = V2_HEADER.size + length
        if size > self.max_v2_size:
            raise ProxyProtocolError(
                f"PROXY v2 header of {size} bytes exceeds max_v2_size {self.max_v2_size}"
            )
        need = _V2_ADDRESS_SIZE[fam] if command == 1 else 0
        if length < need:
            raise ProxyProtocolError(
                f"PROXY v2 length {length} is shorter than the {need}-byte {_V2_FAMILIES[fam]} address block"
            )
        if n < size:
            return None
        return self._decode_v2(self._complete(size))

    def _decode_v2(self, header: bytes) -> ProxyInfo:
        fam = header[13]
        if header[12] & 0x0F == 0 or fam == 0x00:
            # LOCAL, or PROXY over UNSPEC: the receiver ignores the block [2.2].
            return ProxyInfo(2, "LOCAL" if header[12] & 0x0F == 0 else "PROXY", "UNKNOWN")
        family = _V2_FAMILIES[fam]
        at = V2_HEADER.size
        source: Address
        destination: Address
        if fam in (0x31, 0x32):
            raw_src, raw_dst = _V2_UNIX.unpack_from(header, at)
            # A path is NUL-padded; an abstract socket's name starts with NUL and keeps it.
            source = raw_src.rstrip(b"\x00").decode("utf-8", "surrogateescape")
            destination = raw_dst.rstrip(b"\x00").decode("utf-8", "surrogateescape")
        else:
            st = _V2_INET if fam < 0x20 else _V2_INET6
            src, dst, sport, dport = st.unpack_from(header, at)
            source = (str(ipaddress.ip_address(src)), sport)
            destination = (str(ipaddress.ip_address(dst)), dport)
        tlvs, offsets = _parse_tlvs(header, at + _V2_ADDRESS_SIZE[fam], "TLV")
        for kind, value in tlvs.items():
            problem = _tlv_problem(kind, value)
            if problem is not None:
                raise ProxyProtocolError(f"bad PROXY v2 TLV: {problem}")
        if self.verify_crc32c and PP2_TYPE_CRC32C in tlvs:
            at = offsets[PP2_TYPE_CRC32C]
            zeroed = header[:at] + b"\x00\x00\x00\x00" + header[at + 4 :]
            expected = int.from_bytes(tlvs[PP2_TYPE_CRC32C], "big")
            actual = crc32c(zeroed)
            if actual != expected:
                raise ProxyProtocolError(
                    f"PROXY v2 CRC32C mismatch: the header says 0x{expected:08x}, its bytes give 0x{actual:08x}"
                )
        return ProxyInfo(2, "PROXY", family, source, destination, tlvs)


def _v1_address(text: bytes, family: Family, name: str) -> str:
    """Parse one v1 address of ``family``; return it in canonical form.

    Raises:
        ProxyProtocolError: not an address of that family in the spec's format.
    """
    try:
        # Only ASCII reaches here (_check_v1_partial); ipaddress refuses IPv4 leading zeros.
        ip = (
            ipaddress.IPv4Address(text.decode()) if family == "TCP4" else ipaddress.IPv6Address(text.decode())
        )
    except ValueError:
        raise ProxyProtocolError(f"bad PROXY v1 {family} {name} address {_show(text)}") from None
    return str(ip)


def _v1_port(text: bytes, name: str) -> int:
    """Parse one v1 port: decimal, 0..65535, no leading zero [2.1].

    Raises:
        ProxyProtocolError: anything else.
    """
    if not text or not text.isdigit() or (len(text) > 1 and text[0] == 0x30) or int(text) > 0xFFFF:
        raise ProxyProtocolError(
            f"bad PROXY v1 {name} port {_show(text)}: expected 0..65535 without leading zeros"
        )
    return int(text)
