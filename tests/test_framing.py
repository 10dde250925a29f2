"""Tests of the sans-I/O frame codec (SPEC §4.1, §9; STYLE §8)."""

from __future__ import annotations

import itertools
import pickle
import socket
import struct
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgsock.exceptions import (
    FrameError,
    IncompleteMessage,
    InvalidFormat,
    MessageTooLarge,
    OversizeMessage,
    ProtocolError,
)
from msgsock.framing import (
    DEFAULT_FORMAT,
    DEFAULT_MAX_SIZE,
    PRESETS,
    FrameDecoder,
    FrameFormat,
    HeaderField,
    Message,
    encode,
)

from .helpers import unit

# -- byte-exact vectors -------------------------------------------------------------------
#
# Each vector: a format string, the frames sent (body, header) and, for each frame, the
# exact bytes on the wire.  Written out by hand from SPEC §4.1, not computed by the
# code under test.

Frame = tuple[bytes, dict[str, int]]
Vector = tuple[str, list[Frame], list[bytes]]

VECTORS: list[Vector] = [
    ("u32be", [(b"", {}), (b"hi", {})], [bytes.fromhex("00000000"), bytes.fromhex("00000002") + b"hi"]),
    ("u32le", [(b"", {}), (b"hi", {})], [bytes.fromhex("00000000"), bytes.fromhex("02000000") + b"hi"]),
    ("mfc", [(b"", {}), (b"hi", {})], [bytes.fromhex("00000000"), bytes.fromhex("02000000") + b"hi"]),
    ("u16be", [(b"", {}), (b"hi", {})], [bytes.fromhex("0000"), bytes.fromhex("0002") + b"hi"]),
    ("u16le", [(b"", {}), (b"hi", {})], [bytes.fromhex("0000"), bytes.fromhex("0200") + b"hi"]),
    ("u8", [(b"", {}), (b"hi", {})], [bytes.fromhex("00"), bytes.fromhex("02") + b"hi"]),
    (
        "u64be",
        [(b"", {}), (b"hi", {})],
        [bytes.fromhex("0000000000000000"), bytes.fromhex("0000000000000002") + b"hi"],
    ),
    (
        "u64le",
        [(b"", {}), (b"hi", {})],
        [bytes.fromhex("0000000000000000"), bytes.fromhex("0200000000000000") + b"hi"],
    ),
    # The length counts the whole frame, header included.
    ("u32be!", [(b"", {}), (b"hi", {})], [bytes.fromhex("00000004"), bytes.fromhex("00000006") + b"hi"]),
    ("u8!", [(b"", {}), (b"hi", {})], [bytes.fromhex("01"), bytes.fromhex("03") + b"hi"]),
    # A field before the length.
    (
        "magic:H+u16be",
        [(b"", {"magic": 0xCAFE}), (b"hi", {"magic": 0x0102})],
        [bytes.fromhex("cafe0000"), bytes.fromhex("01020002") + b"hi"],
    ),
    # Fields after the length (the MFCAsync "customized header fields").
    (
        "u32be+kind:B+flags:H",
        [(b"", {"kind": 0, "flags": 0}), (b"hi", {"kind": 3, "flags": 0x0102})],
        [bytes.fromhex("00000000000000"), bytes.fromhex("00000002030102") + b"hi"],
    ),
    # Byte order of the extra fields follows the length field.
    (
        "u16le+kind:B+flags:H",
        [(b"hi", {"kind": 3, "flags": 0x0102})],
        [bytes.fromhex("0200030201") + b"hi"],
    ),
    # Signed fields, before and after, with the length counting the header.
    (
        "seq:i+u32le!+delta:h",
        [(b"hi", {"seq": -2, "delta": -1})],
        [bytes.fromhex("feffffff") + bytes.fromhex("0c000000") + bytes.fromhex("ffff") + b"hi"],
    ),
]

VECTOR_IDS = [v[0] for v in VECTORS]


def _stream(vector: Vector) -> bytes:
    return b"".join(vector[2])


def _as_frames(messages: Sequence[Any]) -> list[Frame]:
    """Turn decoded messages into comparable (body, header) pairs."""
    out: list[Frame] = []
    for m in messages:
        out.append((bytes(m), dict(m.header) if isinstance(m, Message) else {}))
    return out


def _feed_chunks(fmt: FrameFormat, chunks: Sequence[bytes]) -> list[Any]:
    decoder = fmt.decoder()
    got: list[Any] = []
    for chunk in chunks:
        got += decoder.feed(chunk)
    decoder.eof()  # every vector ends at a frame boundary
    assert decoder.buffered == 0
    return got


def _all_splits(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    for i in range(len(data) + 1):
        yield data[:i], data[i:]


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_encode_exact(vector: Vector) -> None:
    """Encoding each frame of a vector produces exactly the bytes written out by hand."""
    spec, frames, wire = vector
    fmt = FrameFormat.parse(spec)
    for (body, header), expected in zip(frames, wire, strict=True):
        assert fmt.encode(body, header or None) == expected
        head, same_body = fmt.encode_parts(body, header or None)
        assert head + bytes(same_body) == expected
        assert fmt.encode_header(len(body), header or None) == expected[: fmt.header_size]


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_decode_whole(vector: Vector) -> None:
    """A vector's whole stream fed at once decodes to exactly the frames sent."""
    spec, frames, _ = vector
    assert _as_frames(_feed_chunks(FrameFormat.parse(spec), [_stream(vector)])) == frames


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_decode_byte_at_a_time(vector: Vector) -> None:
    """A vector fed one byte at a time decodes to exactly the frames sent."""
    spec, frames, _ = vector
    data = _stream(vector)
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert _as_frames(_feed_chunks(FrameFormat.parse(spec), chunks)) == frames


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_decode_every_split(vector: Vector) -> None:
    """A vector split in two at every point decodes to exactly the frames sent."""
    spec, frames, _ = vector
    fmt = FrameFormat.parse(spec)
    for first, second in _all_splits(_stream(vector)):
        assert _as_frames(_feed_chunks(fmt, [first, second])) == frames, (first, second)


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_decode_buffer_types(vector: Vector) -> None:
    """The decoder accepts bytearray and memoryview chunks as well as bytes."""
    spec, frames, _ = vector
    fmt = FrameFormat.parse(spec)
    data = _stream(vector)
    for first, second in _all_splits(data):
        chunks: list[Any] = [bytearray(first), memoryview(second)]
        assert _as_frames(_feed_chunks(fmt, chunks)) == frames


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_message_types(vector: Vector) -> None:
    """Formats without extra fields yield plain bytes; formats with fields yield Message."""
    spec, _, _ = vector
    fmt = FrameFormat.parse(spec)
    got = _feed_chunks(fmt, [_stream(vector)])
    for m in got:
        if fmt.field_names:
            assert type(m) is Message
        else:
            assert type(m) is bytes


def test_presets_table() -> None:
    """Every SPEC §4.1 preset exists with its width and byte order, mfc aliasing u32le."""
    assert PRESETS == {
        "u32be": (4, "big"),
        "u32le": (4, "little"),
        "mfc": (4, "little"),
        "u16be": (2, "big"),
        "u16le": (2, "little"),
        "u8": (1, "big"),
        "u64be": (8, "big"),
        "u64le": (8, "little"),
    }
    assert FrameFormat.parse("mfc") == FrameFormat.parse("u32le")
    assert FrameFormat.parse("u32be") == DEFAULT_FORMAT == FrameFormat()


# -- compatibility vectors ----------------------------------------------------------------

COMPAT_BODIES = [b"", b"hi", b"\x00" * 3, bytes(range(256)), b"x" * 70_000]


@pytest.mark.parametrize("body", COMPAT_BODIES, ids=lambda b: f"{len(b)}B")
def test_default_frame_is_struct_big_endian_u32(body: bytes) -> None:
    """The default frame is struct.pack('>I', len(b)) + b (Int32StringReceiver, LengthFieldPrepender(4))."""
    expected = struct.pack(">I", len(body)) + body
    assert encode(body) == expected
    assert DEFAULT_FORMAT.encode(body) == expected
    assert FrameDecoder().feed(expected) == [body]


def test_twisted_int32stringreceiver_vectors() -> None:
    """Twisted's Int32StringReceiver writes what we decode and decodes what we write."""
    # Imported here: Twisted is a test-only dependency and slow to import.
    from twisted.internet.testing import StringTransport
    from twisted.protocols.basic import Int32StringReceiver

    received: list[bytes] = []

    class Recorder(Int32StringReceiver):
        def stringReceived(self, string: bytes) -> None:
            received.append(string)

    proto: Any = Recorder()  # Twisted's methods are untyped
    transport: Any = StringTransport()  # type: ignore[no-untyped-call]
    proto.makeConnection(transport)
    bodies = [b for b in COMPAT_BODIES if len(b) < proto.MAX_LENGTH]
    for body in bodies:
        proto.sendString(body)
    assert FrameDecoder().feed(transport.value()) == bodies
    assert transport.value() == b"".join(encode(b) for b in bodies)
    stream = b"".join(encode(b) for b in bodies)
    for i in range(len(stream)):  # one byte at a time: Twisted's own reassembly agrees
        proto.dataReceived(stream[i : i + 1])
    assert received == bodies


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"peer closed after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


@pytest.fixture
def mp_pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A multiprocessing Connection on one end of a socketpair, the raw socket on the other."""
    a, b = socket.socketpair()
    conn: Connection | None = None
    try:
        b.settimeout(unit(5))
        conn = Connection(a.detach())
        yield conn, b
    finally:
        if conn is not None:
            conn.close()
        a.close()
        b.close()


@pytest.mark.parametrize("body", COMPAT_BODIES, ids=lambda b: f"{len(b)}B")
def test_multiprocessing_connection_to_msgsock(
    mp_pair: tuple[Connection, socket.socket], body: bytes
) -> None:
    """Bytes written by multiprocessing.connection.Connection.send_bytes decode as one frame."""
    conn, raw = mp_pair
    conn.send_bytes(body)
    wire = _recv_exactly(raw, 4 + len(body))
    assert wire == encode(body)
    assert FrameDecoder().feed(wire) == [body]


@pytest.mark.parametrize("body", COMPAT_BODIES, ids=lambda b: f"{len(b)}B")
def test_msgsock_to_multiprocessing_connection(
    mp_pair: tuple[Connection, socket.socket], body: bytes
) -> None:
    """A frame we encode is read back by multiprocessing.connection.Connection.recv_bytes."""
    conn, raw = mp_pair
    raw.sendall(encode(body))
    assert conn.poll(unit(5))
    assert conn.recv_bytes() == body


# -- hypothesis: round trips and chunk invariance ------------------------------------------


def _code_range(code: str) -> tuple[int, int]:
    # Standard sizes (with a byte-order prefix): l/L are 4 bytes on the wire whatever the platform.
    bits = 8 * struct.calcsize("<" + code)
    if code.islower():
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


_CODE_RANGES: dict[str, tuple[int, int]] = {code: _code_range(code) for code in "bBhHiIlLqQ"}

_ORDERS: list[Literal["big", "little"]] = ["big", "little"]

_field_names = st.lists(
    st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True), min_size=0, max_size=6, unique=True
)


@st.composite
def frame_formats(draw: st.DrawFn, preset: str | None = None) -> FrameFormat:
    """Any valid frame format, optionally with the length field of one preset."""
    if preset is None:
        size = draw(st.sampled_from([1, 2, 4, 8]))
        order = draw(st.sampled_from(_ORDERS))
    else:
        size, order = PRESETS[preset]
    names = draw(_field_names)
    split = draw(st.integers(0, len(names)))
    codes = [draw(st.sampled_from(sorted(_CODE_RANGES))) for _ in names]
    fields = [HeaderField(n, c) for n, c in zip(names, codes, strict=True)]
    max_size = draw(st.sampled_from([DEFAULT_MAX_SIZE, None, 300, 5]))
    return FrameFormat(
        length_size=size,
        byteorder=order,
        length_includes_header=draw(st.booleans()),
        fields_before=tuple(fields[:split]),
        fields_after=tuple(fields[split:]),
        max_size=max_size,
    )


@st.composite
def frames_for(draw: st.DrawFn, fmt: FrameFormat, max_frames: int = 6) -> list[Frame]:
    """A list of frames (body, header) that ``fmt`` can carry."""
    codes = {f.name: f.code for f in (*fmt.fields_before, *fmt.fields_after)}
    count = draw(st.integers(0, max_frames))
    out: list[Frame] = []
    for _ in range(count):
        body = draw(st.binary(max_size=min(fmt.max_body, 300)))
        header = {name: draw(st.integers(*_CODE_RANGES[code])) for name, code in codes.items()}
        out.append((body, header))
    return out


@st.composite
def format_and_frames(draw: st.DrawFn, preset: str | None = None) -> tuple[FrameFormat, list[Frame]]:
    fmt = draw(frame_formats(preset))
    return fmt, draw(frames_for(fmt))


HYPOTHESIS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def _check_round_trip(fmt: FrameFormat, frames: list[Frame], data: st.DataObject) -> None:
    wire = [fmt.encode(body, header) for body, header in frames]
    for (body, header), frame in zip(frames, wire, strict=True):
        assert len(frame) == fmt.header_size + len(body)
        assert _as_frames(fmt.decoder().feed(frame)) == [(body, header)]
    stream = b"".join(wire)
    assert _as_frames(_feed_chunks(fmt, [stream])) == frames
    # Chunk invariance: any split of the stream gives the same frames.
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert _as_frames(_feed_chunks(fmt, chunks)) == frames


@pytest.mark.parametrize("preset", sorted(PRESETS))
@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_presets_round_trip_and_chunk_invariance(preset: str, data: st.DataObject) -> None:
    """For every preset, with or without fields, decode(encode(x)) == x under any split."""
    fmt, frames = data.draw(format_and_frames(preset), label="format and frames")
    _check_round_trip(fmt, frames, data)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_plain_presets(preset: str, data: st.DataObject) -> None:
    """The plain preset formats themselves round-trip any bodies under any split."""
    fmt = FrameFormat.parse(preset)
    frames = data.draw(frames_for(fmt, max_frames=10), label="frames")
    _check_round_trip(fmt, frames, data)


@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_generated_formats(data: st.DataObject) -> None:
    """Any generated format (width, order, header counting, random fields) round-trips under any split."""
    fmt, frames = data.draw(format_and_frames(), label="format and frames")
    _check_round_trip(fmt, frames, data)


@HYPOTHESIS
@given(fmt=frame_formats())
def test_hypothesis_str_parse_round_trip(fmt: FrameFormat) -> None:
    """str() of any format parses back into an equal format."""
    assert FrameFormat.parse(str(fmt), max_size=fmt.max_size) == fmt
    assert str(FrameFormat.parse(str(fmt))) == str(fmt)


@HYPOTHESIS
@given(fmt=frame_formats())
def test_hypothesis_pickle_round_trip(fmt: FrameFormat) -> None:
    """Any format survives pickling (it is handed to worker processes)."""
    copy = pickle.loads(pickle.dumps(fmt))
    assert copy == fmt
    assert copy.header_size == fmt.header_size
    assert copy.max_body == fmt.max_body
    assert copy.encode(b"abc"[: fmt.max_body]) == fmt.encode(b"abc"[: fmt.max_body])


# -- adversarial lengths ------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["u8", "u16be", "u16le", "u32be", "u32le", "u64be", "u64le"])
def test_length_zero_is_an_empty_message(spec: str) -> None:
    """A zero length is a valid empty message, several in a row too."""
    fmt = FrameFormat.parse(spec)
    assert fmt.decoder().feed(bytes(fmt.header_size) * 3) == [b"", b"", b""]


def test_length_exactly_max_size_is_accepted() -> None:
    """A body of exactly max_size bytes is encoded and decoded."""
    fmt = FrameFormat(max_size=10)
    frame = fmt.encode(b"0123456789")
    assert frame[:4] == bytes.fromhex("0000000a")
    assert fmt.decoder().feed(frame) == [b"0123456789"]


def _header(fmt: FrameFormat, length: int) -> bytes:
    order = ">" if fmt.byteorder == "big" else "<"
    return struct.pack(order + {1: "B", 2: "H", 4: "I", 8: "Q"}[fmt.length_size], length)


@pytest.mark.parametrize(
    ("spec", "max_size", "length", "size", "limit"),
    [
        ("u32be", 10, 11, 11, 10),  # max_size + 1
        ("u32be", DEFAULT_MAX_SIZE, DEFAULT_MAX_SIZE + 1, DEFAULT_MAX_SIZE + 1, DEFAULT_MAX_SIZE),
        ("u32be", DEFAULT_MAX_SIZE, 2**31, 2**31, DEFAULT_MAX_SIZE),
        ("u32be", DEFAULT_MAX_SIZE, 2**32 - 1, 2**32 - 1, DEFAULT_MAX_SIZE),
        ("u32le", DEFAULT_MAX_SIZE, 2**32 - 1, 2**32 - 1, DEFAULT_MAX_SIZE),
        ("u64be", DEFAULT_MAX_SIZE, 2**64 - 1, 2**64 - 1, DEFAULT_MAX_SIZE),
        ("u64le", DEFAULT_MAX_SIZE, 2**64 - 1, 2**64 - 1, DEFAULT_MAX_SIZE),
        ("u16be", 100, 101, 101, 100),
        ("u32be!", 10, 4 + 11, 11, 10),
        ("u8!", 200, 255, 254, 200),
        ("u32be+kind:B", 10, 11, 11, 10),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_too_large_raised_on_header_alone(
    spec: str, max_size: int | None, length: int, size: int, limit: int, bytewise: bool
) -> None:
    """MessageTooLarge(size, max_size) is raised as soon as the header is in, before any body is buffered."""
    fmt = FrameFormat.parse(spec, max_size=max_size)
    decoder = fmt.decoder()
    head = _header(fmt, length) + bytes(fmt.header_size - fmt.length_size)
    pieces = [head[i : i + 1] for i in range(len(head))] if bytewise else [head]
    for piece in pieces[:-1]:
        assert decoder.feed(piece) == []
        assert decoder.buffered < fmt.header_size
    with pytest.raises(MessageTooLarge) as info:
        decoder.feed(pieces[-1])
    assert info.value.size == size
    assert info.value.max_size == limit
    assert str(size) in str(info.value) and str(limit) in str(info.value)
    assert decoder.buffered <= fmt.header_size  # nothing of the claimed body was held


def test_too_large_after_good_frames_in_one_chunk() -> None:
    """An oversize header after good frames: the frames come back, then MessageTooLarge is raised."""
    fmt = FrameFormat(max_size=4)
    decoder = fmt.decoder()
    assert decoder.feed(fmt.encode(b"ok") + _header(fmt, 5) + b"12345") == [b"ok"]
    assert decoder.buffered == 0
    with pytest.raises(MessageTooLarge):
        decoder.feed(b"")


@pytest.mark.parametrize(
    "later",
    [b"", encode(b"fine"), b"\x00"],
    ids=["empty", "valid frame", "one byte"],
)
def test_error_is_sticky(later: bytes) -> None:
    """After a protocol error every later feed (and eof) raises the same error again."""
    decoder = FrameFormat(max_size=3).decoder()
    with pytest.raises(MessageTooLarge) as first:
        decoder.feed(_header(DEFAULT_FORMAT, 9))
    for _ in range(3):
        with pytest.raises(MessageTooLarge) as again:
            decoder.feed(later)
        assert again.value is first.value
    with pytest.raises(MessageTooLarge):
        decoder.eof()


def test_error_is_sticky_after_bytewise_feed() -> None:
    """A header completed byte by byte then rejected makes eof() report the real error, not a truncation."""
    decoder = FrameFormat(max_size=3).decoder()
    head = _header(DEFAULT_FORMAT, 9)
    for b in head[:-1]:
        decoder.feed(bytes([b]))
    with pytest.raises(MessageTooLarge):
        decoder.feed(head[-1:])
    with pytest.raises(MessageTooLarge):
        decoder.eof()


@pytest.mark.parametrize(
    ("spec", "head", "length"),
    [
        ("u32be!", "00000000", 0),
        ("u32be!", "00000003", 3),
        ("u8!", "00", 0),
        ("kind:B+u16le!", "07" + "0200", 2),
        ("u16be!+kind:B", "0002" + "07", 2),
    ],
)
def test_length_smaller_than_header_is_frame_error(spec: str, head: str, length: int) -> None:
    """With '!', a length smaller than the header is a FrameError naming the length, and stays an error."""
    fmt = FrameFormat.parse(spec)
    decoder = fmt.decoder()
    data = bytes.fromhex(head)
    with pytest.raises(
        FrameError, match=rf"frame length {length} is smaller than the {fmt.header_size}-byte"
    ):
        decoder.feed(data)
    with pytest.raises(FrameError):
        decoder.feed(b"")


def test_length_equal_to_header_is_empty_message() -> None:
    """With '!', a length equal to the header size is an empty body."""
    assert FrameFormat.parse("u32be!").decoder().feed(bytes.fromhex("00000004")) == [b""]


def test_u8_including_header_limits() -> None:
    """u8 with '!' carries at most 254 body bytes: length 255 decodes, 255 body bytes cannot be encoded."""
    fmt = FrameFormat.parse("u8!")
    assert fmt.max_body == 254
    body = bytes(range(254))
    frame = fmt.encode(body)
    assert frame == b"\xff" + body
    assert fmt.decoder().feed(frame) == [body]
    with pytest.raises(OversizeMessage) as info:
        fmt.encode(body + b"x")
    assert (info.value.size, info.value.max_size) == (255, 254)


@pytest.mark.parametrize(
    ("spec", "max_size", "size", "limit"),
    [
        ("u32be", 10, 11, 10),
        ("u8", None, 256, 255),
        ("u8", DEFAULT_MAX_SIZE, 256, 255),
        ("u16le", None, 65536, 65535),
        ("u16be!", None, 65534, 65533),
    ],
)
def test_encode_too_large_raises_before_returning(
    spec: str, max_size: int | None, size: int, limit: int
) -> None:
    """Encoding a body above max_size or the field's range raises OversizeMessage (our mistake, not a ProtocolError)."""
    fmt = FrameFormat.parse(spec, max_size=max_size)
    body = bytes(size)
    for call in (fmt.encode, fmt.encode_parts, lambda b: fmt.encode_header(len(b))):
        with pytest.raises(OversizeMessage) as info:
            call(body)
        assert (info.value.size, info.value.max_size) == (size, limit)
        assert isinstance(info.value, ValueError) and not isinstance(info.value, ProtocolError)
        assert str(info.value) == f"cannot send a message of {size} bytes: the frame allows at most {limit}"
    assert len(fmt.encode(bytes(limit))) == fmt.header_size + limit


def test_max_size_none_is_unlimited_but_field_bounded() -> None:
    """max_size=None accepts any length the field can hold, without raising on huge headers."""
    fmt = FrameFormat(max_size=None)
    assert fmt.max_body == 2**32 - 1
    decoder = fmt.decoder()
    assert decoder.feed(_header(fmt, 2**32 - 1) + b"abc") == []
    assert decoder.in_frame
    assert decoder.buffered == 7
    big = FrameFormat.parse("u64be", max_size=None)
    assert big.max_body == 2**64 - 1
    body = bytes(DEFAULT_MAX_SIZE + 1)
    assert big.decoder().feed(big.encode(body)) == [body]


# -- end of stream ------------------------------------------------------------------------


def test_eof_at_frame_boundary_is_clean() -> None:
    """eof() after whole frames (or nothing) raises nothing."""
    decoder = FrameDecoder()
    decoder.eof()
    decoder.feed(encode(b"ab") + encode(b""))
    decoder.eof()


@pytest.mark.parametrize(
    ("stream", "received", "expected"),
    [
        (b"\x00", 1, None),
        (b"\x00\x00\x00", 3, None),
        (b"\x00\x00\x00\x0a", 4, 14),
        (b"\x00\x00\x00\x0aabc", 7, 14),
        (encode(b"ok") + b"\x00\x00\x00\x0aabc", 7, 14),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_eof_mid_frame_is_incomplete_message(
    stream: bytes, received: int, expected: int | None, bytewise: bool
) -> None:
    """eof() inside a frame raises IncompleteMessage with the bytes received and needed."""
    decoder = FrameDecoder()
    chunks = [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]
    for chunk in chunks:
        decoder.feed(chunk)
    assert decoder.in_frame
    with pytest.raises(IncompleteMessage) as info:
        decoder.eof()
    assert (info.value.received, info.value.expected) == (received, expected)
    assert str(received) in str(info.value)


def test_buffered_and_in_frame_track_the_unfinished_frame() -> None:
    """buffered counts the bytes held of an unfinished frame and in_frame says whether there is one."""
    decoder = FrameDecoder()
    assert (decoder.buffered, decoder.in_frame) == (0, False)
    assert decoder.feed(b"\x00\x00") == []
    assert (decoder.buffered, decoder.in_frame) == (2, True)
    assert decoder.feed(b"\x00\x03ab") == []
    assert decoder.buffered == 6
    assert decoder.feed(b"c" + encode(b"d")[:1]) == [b"abc"]
    assert decoder.buffered == 1
    assert decoder.feed(encode(b"d")[1:]) == [b"d"]
    assert (decoder.buffered, decoder.in_frame) == (0, False)


def test_many_frames_in_one_chunk() -> None:
    """One chunk holding many frames yields all of them, in order."""
    bodies = [str(i).encode() * (i % 7) for i in range(1000)]
    assert FrameDecoder().feed(b"".join(encode(b) for b in bodies)) == bodies


def test_decoded_bodies_do_not_alias_a_reused_buffer() -> None:
    """Messages are copies: reusing the receive buffer afterwards does not change them."""
    buf = bytearray(encode(b"hello") + encode(b"wor"))
    decoder = FrameDecoder()
    got = decoder.feed(memoryview(buf)[:11])
    buf[:] = bytes(len(buf))
    got += decoder.feed(memoryview(buf)[11:])
    assert got[0] == b"hello"


# -- header fields ------------------------------------------------------------------------


def test_missing_header_fields_default_to_zero() -> None:
    """Fields not given are encoded as 0."""
    fmt = FrameFormat.parse("u32be+kind:B+flags:H")
    assert fmt.encode(b"x", {"kind": 7}) == bytes.fromhex("00000001070000") + b"x"
    assert fmt.encode(b"x") == bytes.fromhex("00000001000000") + b"x"


@pytest.mark.parametrize(
    ("spec", "header", "pattern"),
    [
        ("u32be+kind:B", {"knd": 1}, "unknown header field"),
        ("u32be+kind:B", {"kind": 1, "extra": 2}, "extra"),
        ("u32be", {"kind": 1}, "unknown header field"),
        ("u32be+kind:B", {"kind": 256}, "do not fit"),
        ("u32be+kind:B", {"kind": -1}, "do not fit"),
        ("u32be+kind:b", {"kind": 128}, "do not fit"),
        ("u32be+flags:H", {"flags": 65536}, "do not fit"),
        ("magic:Q+u8", {"magic": 2**64}, "do not fit"),
    ],
)
def test_bad_header_values_are_invalid_format(spec: str, header: dict[str, int], pattern: str) -> None:
    """An unknown field name or a value out of its code's range raises InvalidFormat (a ValueError)."""
    fmt = FrameFormat.parse(spec)
    with pytest.raises(InvalidFormat, match=pattern):
        fmt.encode(b"x", header)
    with pytest.raises(ValueError):
        fmt.encode_parts(b"x", header)


def test_message_carries_header_and_is_bytes() -> None:
    """A Message is its body (bytes) with a header dict; sending it back reuses its header."""
    fmt = FrameFormat.parse("u16be+kind:B")
    (msg,) = fmt.decoder().feed(fmt.encode(b"abc", {"kind": 9}))
    assert isinstance(msg, Message) and msg == b"abc"
    assert msg.header == {"kind": 9}
    assert repr(msg) == "Message(b'abc', header={'kind': 9})"
    assert fmt.encode(msg) == fmt.encode(b"abc", {"kind": 9})
    assert fmt.encode(msg, {"kind": 1}) == fmt.encode(b"abc", {"kind": 1})  # explicit header wins
    copy = pickle.loads(pickle.dumps(msg))
    assert (type(copy), copy, copy.header) == (Message, msg, msg.header)
    assert Message(b"z").header == {}


def test_message_subclass_keeps_its_header_when_encoded() -> None:
    """A subclass of Message (an application's own message type) is encoded with its header, like a Message."""

    class Request(Message):
        pass

    fmt = FrameFormat.parse("u16be+kind:B")
    request = Request(b"abc", {"kind": 9})
    assert fmt.encode(request) == bytes.fromhex("0003 09 616263")
    head, body = fmt.encode_parts(request)
    assert (head, body) == (bytes.fromhex("0003 09"), request)
    assert fmt.encode(request, {"kind": 1}) == bytes.fromhex("0003 01 616263")  # an explicit header wins


def test_field_names_in_wire_order() -> None:
    """field_names lists the extra fields before then after the length, in order."""
    assert FrameFormat.parse("a:B+b:H+u32be+c:I").field_names == ("a", "b", "c")
    assert DEFAULT_FORMAT.field_names == ()


def test_encode_parts_does_not_copy_the_body() -> None:
    """encode_parts returns the body object itself so large bodies are written without a copy."""
    for body in (bytes(100_000), bytearray(100_000), memoryview(bytes(100_000))):
        head, same = DEFAULT_FORMAT.encode_parts(body)
        assert same is body
        assert head == struct.pack(">I", 100_000)


# -- formats: validation, parse, str ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "bad_part"),
    [
        ("u33be", "u33be"),
        ("u32be+kind:Z", "kind:Z"),
        ("u32be+1kind:B", "1kind:B"),
        ("u32be+kind:", "kind:"),
        ("u32be+:B", ":B"),
        ("u32be+kind:B+u16le", "u16le"),
        ("u32be!!", "u32be!!"),
        ("U32BE", "U32BE"),
        ("kind:>H+u32be", "kind:>H"),
    ],
)
def test_parse_errors_name_the_bad_part(spec: str, bad_part: str) -> None:
    """A malformed format string raises InvalidFormat whose message quotes the bad part."""
    with pytest.raises(InvalidFormat) as info:
        FrameFormat.parse(spec)
    assert repr(bad_part) in str(info.value)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "empty frame format"),
        ("   ", "empty frame format"),
        ("u32be++kind:B", "empty part"),
        ("u32be+", "empty part"),
        ("kind:B", "no length field"),
        ("kind:B+flags:H", "no length field"),
        ("u32be+kind:B+kind:H", "duplicate header field names"),
    ],
)
def test_parse_errors_structure(spec: str, pattern: str) -> None:
    """Empty strings, empty parts, a missing length field and duplicate names are InvalidFormat."""
    with pytest.raises(InvalidFormat, match=pattern):
        FrameFormat.parse(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "u32be",
        "u32le",
        "u16be",
        "u16le",
        "u8",
        "u8le+kind:H",
        "u64be",
        "u64le",
        "u32be!",
        "magic:H+u16be",
        "u32be+kind:B+flags:H",
        "a:q+b:b+u64le!+c:L+d:l",
    ],
)
def test_str_is_canonical_and_round_trips(spec: str) -> None:
    """str() of a parsed canonical string is that string, and parses back to an equal format."""
    fmt = FrameFormat.parse(spec)
    assert str(fmt) == spec
    assert FrameFormat.parse(str(fmt)) == fmt


def test_str_of_aliases() -> None:
    """Aliases print as their canonical name: mfc is u32le, u8be is u8."""
    assert str(FrameFormat.parse("mfc")) == "u32le"
    assert str(FrameFormat.parse("u8be")) == "u8"
    assert str(FrameFormat.parse(" u32be ")) == "u32be"


def test_little_endian_u8_fields_round_trip_through_str() -> None:
    """A 1-byte length with little-endian fields keeps its byte order through str() and parse()."""
    fmt = FrameFormat(length_size=1, byteorder="little", fields_after=(HeaderField("k", "H"),))
    again = FrameFormat.parse(str(fmt))
    assert again == fmt
    assert again.encode(b"", {"k": 1}) == b"\x00\x01\x00"


def test_parse_max_size_and_with_max_size() -> None:
    """parse() takes max_size; with_max_size() returns the same format with another limit."""
    fmt = FrameFormat.parse("u16be+kind:B", max_size=None)
    assert fmt.max_size is None and fmt.max_body == 65535
    small = fmt.with_max_size(10)
    assert (small.max_size, small.max_body) == (10, 10)
    assert str(small) == str(fmt)
    assert small != fmt
    assert FrameFormat.parse("u32be").max_size == DEFAULT_MAX_SIZE


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"length_size": 3}, "length field width 3"),
        ({"length_size": 16}, "length field width 16"),
        ({"byteorder": "middle"}, "byte order 'middle'"),
        ({"length_size": True}, "length field width True"),
        ({"max_size": -1}, "max_size -1"),
        ({"fields_after": ("kind",)}, "is not a HeaderField"),
        ({"fields_before": (HeaderField("a", "B"),), "fields_after": (HeaderField("a", "H"),)}, "duplicate"),
        (
            {
                "length_size": 1,
                "length_includes_header": True,
                "fields_after": tuple(HeaderField(f"f{i}", "Q") for i in range(32)),
            },
            "cannot count",
        ),
    ],
)
def test_format_validation(kwargs: dict[str, Any], pattern: str) -> None:
    """A FrameFormat that cannot exist raises InvalidFormat at construction."""
    with pytest.raises(InvalidFormat, match=pattern):
        FrameFormat(**kwargs)


def test_a_negative_max_size_is_a_value_error() -> None:
    """max_size=-1 is InvalidFormat, which is a ValueError (a value out of range)."""
    with pytest.raises(ValueError, match=r"^max_size -1 must be a non-negative int or None$"):
        FrameFormat(max_size=-1)
    with pytest.raises(ValueError, match="max_size -1"):
        FrameFormat.parse("u32be", max_size=-1)


@pytest.mark.parametrize(
    ("max_size", "kind"), [(True, "bool"), (False, "bool"), (1.5, "float"), (16.0, "float"), ("16", "str")]
)
def test_max_size_must_be_an_int_or_none(max_size: Any, kind: str) -> None:
    """FrameFormat(max_size=True) was a 1-byte limit; a bool or any non-int is a TypeError naming the type."""
    with pytest.raises(TypeError, match=rf"^max_size must be an int or None, got {kind}$"):
        FrameFormat(max_size=max_size)
    with pytest.raises(TypeError, match=rf"^max_size must be an int or None, got {kind}$"):
        FrameFormat.parse("u32be", max_size=max_size)
    with pytest.raises(TypeError, match=rf"^max_size must be an int or None, got {kind}$"):
        DEFAULT_FORMAT.with_max_size(max_size)


@pytest.mark.parametrize(("spec", "kind"), [(b"u32be", "bytes"), (None, "NoneType"), (4, "int")])
def test_parse_wants_a_str(spec: Any, kind: str) -> None:
    """FrameFormat.parse(b"u32be") says a str is expected (it used to say "empty frame format")."""
    with pytest.raises(TypeError, match=rf"^frame format must be a str, got {kind}$"):
        FrameFormat.parse(spec)


@pytest.mark.parametrize(
    ("value", "kind"), [("abc", "str"), (3, "int"), ([1, 2, 3], "list"), (None, "NoneType")]
)
def test_encoding_refuses_a_body_that_is_not_bytes_like(value: Any, kind: str) -> None:
    """encode() and encode_parts() name the type of a body that is not bytes-like (a str has a len() but is no body)."""
    fmt = FrameFormat.parse("u8+k:B")
    with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
        fmt.encode(value)
    with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
        fmt.encode_parts(value, {"k": 1})
    with pytest.raises(TypeError, match=rf"^message must be bytes-like, got {kind}$"):
        encode(value)


@pytest.mark.parametrize("buffered", [b"", b"\0"], ids=["empty", "mid-header"])
@pytest.mark.parametrize(("value", "kind"), [("abc", "str"), (3, "int"), (None, "NoneType")])
def test_decoder_refuses_data_that_is_not_bytes_like(buffered: bytes, value: Any, kind: str) -> None:
    """FrameDecoder.feed(str) names the type (not "can't concat str to bytearray") and keeps its state."""
    for spec in ("u32be", "u8+k:B"):
        decoder = FrameFormat.parse(spec).decoder()
        decoder.feed(buffered)
        with pytest.raises(TypeError, match=rf"^data must be bytes-like, got {kind}$"):
            decoder.feed(value)
        with pytest.raises(TypeError, match=rf"^data must be bytes-like, got {kind}$"):
            decoder.feed_span(value)
        assert decoder.error is None and decoder.buffered == len(buffered)


def test_encoding_takes_every_bytes_like_body() -> None:
    """bytes, bytearray, memoryview and Message bodies are all framed alike (the type check lets them through)."""
    fmt = FrameFormat.parse("u16be")
    for body in (b"abc", bytearray(b"abc"), memoryview(b"abc"), Message(b"abc"), memoryview(b"xabc")[1:]):
        assert fmt.encode(body) == b"\0\x03abc"


@pytest.mark.parametrize(
    ("name", "code", "pattern"),
    [
        ("1a", "B", "not an identifier"),
        ("a-b", "B", "not an identifier"),
        ("a", "x", "struct code"),
        ("a", "f", "struct code"),
    ],
)
def test_header_field_validation(name: str, code: str, pattern: str) -> None:
    """A header field needs an identifier name and an integer struct code."""
    with pytest.raises(InvalidFormat, match=pattern):
        HeaderField(name, code)


def test_formats_are_frozen_and_hashable() -> None:
    """Formats are immutable values: equal formats hash alike and attributes cannot be set."""
    a = FrameFormat.parse("u32be+kind:B")
    b = FrameFormat(fields_after=(HeaderField("kind", "B"),))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.max_size = 1  # type: ignore[misc]
    assert a.header_size == 5


def test_module_encode_is_default_format() -> None:
    """The module-level encode() uses the default format."""
    assert encode(b"abc") == DEFAULT_FORMAT.encode(b"abc") == b"\x00\x00\x00\x03abc"
    assert isinstance(FrameDecoder().format, FrameFormat)
    assert DEFAULT_FORMAT.decoder().format is DEFAULT_FORMAT


def test_protocol_errors_are_protocol_errors() -> None:
    """Decoder errors are ProtocolError subclasses (the peer's fault)."""
    assert issubclass(MessageTooLarge, ProtocolError)
    assert issubclass(FrameError, ProtocolError)
    assert issubclass(IncompleteMessage, ProtocolError)


def test_frames_before_a_bad_header_are_delivered_then_the_error_is_raised() -> None:
    """Good frames in the same chunk as a bad header are returned; the error comes on the next call."""
    fmt = FrameFormat(max_size=10)
    decoder = fmt.decoder()
    chunk = fmt.encode(b"one") + fmt.encode(b"two") + struct.pack(">I", 11) + b"junk"
    assert decoder.feed(chunk) == [b"one", b"two"]
    assert isinstance(decoder.error, MessageTooLarge)
    assert decoder.error.size == 11
    with pytest.raises(MessageTooLarge):
        decoder.feed(b"more")
    with pytest.raises(MessageTooLarge):
        decoder.eof()
