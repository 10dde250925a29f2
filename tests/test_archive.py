"""Tests of the CArchive reader and writer (archive.py; SPEC §4.3)."""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgsock.archive import DEFAULT_MAX_STRING, ArchiveReader, ArchiveWriter
from msgsock.exceptions import ArchiveError, EndOfData, InvalidState, ProtocolError

# -- helpers ------------------------------------------------------------------------------


class TrickleFile:
    """A readable file that returns at most ``step`` bytes per read, like a socket file."""

    def __init__(self, data: bytes, step: int = 1) -> None:
        self.data = data
        self.pos = 0
        self.step = step
        self.reads = 0

    def read(self, n: int) -> bytes:
        self.reads += 1
        chunk = self.data[self.pos : self.pos + min(n, self.step)]
        self.pos += len(chunk)
        return chunk


class FlakyFile(TrickleFile):
    """A trickle file that raises TimeoutError once, when it reaches ``fail_at``."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data, 1)
        self.fail_at = fail_at
        self.failed = False

    def read(self, n: int) -> bytes:
        if self.pos == self.fail_at and not self.failed:
            self.failed = True
            raise TimeoutError("simulated timeout")
        return super().read(n)


def _written(
    fn: Callable[[ArchiveWriter], None], byteorder: str = "little", codepage: str = "cp1252"
) -> bytes:
    w = ArchiveWriter(byteorder=byteorder, codepage=codepage)  # type: ignore[arg-type]
    fn(w)
    return w.getvalue()


# -- primitives ---------------------------------------------------------------------------

# (type name, value, little-endian hex, big-endian hex), written out from SPEC §4.3.
PRIMITIVES: list[tuple[str, Any, str, str]] = [
    ("byte", 0xAB, "ab", "ab"),
    ("byte", 0, "00", "00"),
    ("byte", 255, "ff", "ff"),
    ("char", -2, "fe", "fe"),
    ("char", 127, "7f", "7f"),
    ("char", -128, "80", "80"),
    ("bool", True, "01", "01"),
    ("bool", False, "00", "00"),
    ("word", 0x1234, "3412", "1234"),
    ("word", 0xFFFF, "ffff", "ffff"),
    ("short", -2, "feff", "fffe"),
    ("short", -32768, "0080", "8000"),
    ("wchar", "\u00e9", "e900", "00e9"),
    ("wchar", "\u03a9", "a903", "03a9"),
    ("long", -2, "feffffff", "fffffffe"),
    ("long", 0x7FFFFFFF, "ffffff7f", "7fffffff"),
    ("dword", 0x12345678, "78563412", "12345678"),
    ("dword", 0xFFFFFFFF, "ffffffff", "ffffffff"),
    ("int", -1, "ffffffff", "ffffffff"),
    ("int", 0x01020304, "04030201", "01020304"),
    ("unsigned", 0xDEADBEEF, "efbeadde", "deadbeef"),
    ("bool32", True, "01000000", "00000001"),
    ("bool32", False, "00000000", "00000000"),
    ("float", 1.5, "0000c03f", "3fc00000"),
    ("float", -0.0, "00000080", "80000000"),
    ("double", 1.5, "000000000000f83f", "3ff8000000000000"),
    ("double", -2.0, "00000000000000c0", "c000000000000000"),
    ("longlong", -2, "feffffffffffffff", "fffffffffffffffe"),
    ("longlong", -(2**63), "0000000000000080", "8000000000000000"),
    ("ulonglong", 0x0102030405060708, "0807060504030201", "0102030405060708"),
    ("ulonglong", 2**64 - 1, "ffffffffffffffff", "ffffffffffffffff"),
]
PRIMITIVE_IDS = [f"{name}={value!r}" for name, value, _, _ in PRIMITIVES]


@pytest.mark.parametrize(("name", "value", "le", "be"), PRIMITIVES, ids=PRIMITIVE_IDS)
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_primitive_vectors(name: str, value: Any, le: str, be: str, byteorder: str) -> None:
    """Each primitive writes exactly its bytes in both byte orders and reads back the same value."""
    expected = bytes.fromhex(le if byteorder == "little" else be)
    data = _written(lambda w: getattr(w, f"write_{name}")(value), byteorder)
    assert data == expected
    r = ArchiveReader(data, byteorder=byteorder)  # type: ignore[arg-type]
    got = getattr(r, f"read_{name}")()
    assert got == value and type(got) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, got) == math.copysign(1, value)
    assert r.at_end()
    assert r.offset == len(expected)


def test_bool_reads_any_nonzero_as_true() -> None:
    """As MFC, a bool or BOOL with any non-zero value reads as true."""
    r = ArchiveReader(bytes.fromhex("02" + "ff" + "ffffffff" + "00010000"))
    assert r.read_bool() is True
    assert r.read_bool() is True
    assert r.read_bool32() is True
    assert r.read_bool32() is True


def test_wchar_accepts_int_and_reads_lone_surrogate() -> None:
    """write_wchar takes a code unit as an int; any 16-bit unit, even a lone surrogate, reads back."""
    assert _written(lambda w: w.write_wchar(0x41)) == b"A\x00"
    assert ArchiveReader(bytes.fromhex("00d8")).read_wchar() == "\ud800"


# (method, bad value, expected exception)
OUT_OF_RANGE: list[tuple[str, Any, type[Exception]]] = [
    ("byte", 256, ValueError),
    ("byte", -1, ValueError),
    ("char", 128, ValueError),
    ("char", -129, ValueError),
    ("word", 65536, ValueError),
    ("word", -1, ValueError),
    ("short", 32768, ValueError),
    ("short", -32769, ValueError),
    ("wchar", 65536, ValueError),
    ("wchar", "ab", ValueError),
    ("wchar", "", ValueError),
    ("wchar", "\U0001f600", ValueError),
    ("long", 2**31, ValueError),
    ("long", -(2**31) - 1, ValueError),
    ("dword", 2**32, ValueError),
    ("dword", -1, ValueError),
    ("int", 2**31, ValueError),
    ("unsigned", -1, ValueError),
    ("bool32", 2**32, ValueError),
    ("longlong", 2**63, ValueError),
    ("ulonglong", 2**64, ValueError),
    ("ulonglong", -1, ValueError),
    ("count", -1, ValueError),
    ("count", 2**64, ValueError),
    ("float", 1e39, OverflowError),
    ("dword", 1.0, TypeError),
    ("word", "1", TypeError),
    ("double", "1.0", TypeError),
    ("float", None, TypeError),
    ("count", 1.5, TypeError),
    ("string", b"bytes", TypeError),
]


@pytest.mark.parametrize(
    ("name", "value", "exc"), OUT_OF_RANGE, ids=[f"{n}={v!r}" for n, v, _ in OUT_OF_RANGE]
)
def test_out_of_range_values_raise_and_write_nothing(name: str, value: Any, exc: type[Exception]) -> None:
    """A value its type cannot hold raises (naming the value) and writes nothing."""
    w = ArchiveWriter()
    with pytest.raises(exc) as info:
        getattr(w, f"write_{name}")(value)
    assert w.getvalue() == b""
    if exc is not TypeError:
        assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_out_of_range_message_names_value_and_type() -> None:
    """The range error says the value, the MFC type and its range."""
    with pytest.raises(ValueError, match=r"value 70000 out of range for WORD \(0\.\.65535\)"):
        ArchiveWriter().write_word(70000)
    with pytest.raises(OverflowError, match="float"):
        ArchiveWriter().write_float(1e300)


def test_float_specials_round_trip() -> None:
    """inf, -inf and NaN survive as float and double."""
    w = ArchiveWriter()
    for v in (math.inf, -math.inf, math.nan):
        w.write_float(v)
        w.write_double(v)
    r = ArchiveReader(w.getvalue())
    for v in (math.inf, -math.inf):
        assert r.read_float() == v
        assert r.read_double() == v
    assert math.isnan(r.read_float()) and math.isnan(r.read_double())


# -- CString ------------------------------------------------------------------------------

SPEC_EXAMPLES: list[tuple[str, bool | None, str]] = [
    ("hi", False, "026869"),
    ("hi", None, "026869"),
    ("hi", True, "fffeff0268006900"),
    ("", None, "00"),
    ("", False, "00"),
    ("", True, "fffeff00"),
]


@pytest.mark.parametrize(("text", "wide", "hexdata"), SPEC_EXAMPLES)
def test_spec_string_examples(text: str, wide: bool | None, hexdata: str) -> None:
    """The SPEC §4.3 CString examples, both directions."""
    assert _written(lambda w: w.write_string(text, wide)) == bytes.fromhex(hexdata)
    r = ArchiveReader(bytes.fromhex(hexdata))
    assert r.read_string() == text
    assert r.at_end()


# Length prefix for n characters, little-endian and big-endian, written out by hand.
PREFIXES: list[tuple[int, str, str]] = [
    (0, "00", "00"),
    (0xFE, "fe", "fe"),
    (0xFF, "ff" + "ff00", "ff" + "00ff"),
    (0x100, "ff" + "0001", "ff" + "0100"),
    (0xFFFD, "ff" + "fdff", "ff" + "fffd"),
    (0xFFFE, "ff" + "ffff" + "feff0000", "ff" + "ffff" + "0000fffe"),
    (0xFFFF, "ff" + "ffff" + "ffff0000", "ff" + "ffff" + "0000ffff"),
    (0x10000, "ff" + "ffff" + "00000100", "ff" + "ffff" + "00010000"),
]


@pytest.mark.parametrize(("n", "le", "be"), PREFIXES, ids=[hex(p[0]) for p in PREFIXES])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_narrow_string_prefix_boundaries(n: int, le: str, be: str, byteorder: str) -> None:
    """A narrow string of n characters has exactly the documented prefix, then its cp1252 bytes."""
    text = ("a\u00e9" * n)[:n]  # é is one cp1252 byte
    expected = bytes.fromhex(le if byteorder == "little" else be) + text.encode("cp1252")
    assert _written(lambda w: w.write_string(text), byteorder) == expected
    r = ArchiveReader(expected, byteorder=byteorder)  # type: ignore[arg-type]
    assert r.read_string() == text
    assert r.at_end()


@pytest.mark.parametrize(("n", "le", "be"), PREFIXES, ids=[hex(p[0]) for p in PREFIXES])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_wide_string_prefix_boundaries(n: int, le: str, be: str, byteorder: str) -> None:
    """A wide string of n UTF-16 units has the marker, the same prefix, then UTF-16 in the archive's order."""
    text = ("\u03a9z" * n)[:n]
    if byteorder == "little":
        expected = bytes.fromhex("fffeff" + le) + text.encode("utf-16-le")
    else:
        # Network order: BYTE FF + WORD FFFE written big-endian, UTF-16BE text.
        expected = bytes.fromhex("fffffe" + be) + text.encode("utf-16-be")
    assert _written(lambda w: w.write_string(text, wide=True), byteorder) == expected
    if n and byteorder == "little":
        # Ω is not in cp1252, so the automatic choice is wide too.
        assert _written(lambda w: w.write_string(text), byteorder) == expected
    r = ArchiveReader(expected, byteorder=byteorder)  # type: ignore[arg-type]
    assert r.read_string() == text
    assert r.at_end()


def test_wide_length_counts_utf16_units() -> None:
    """Characters outside the BMP count as two UTF-16 code units."""
    data = _written(lambda w: w.write_string("\U0001f600!", wide=True))
    assert data == bytes.fromhex("fffeff03") + "\U0001f600!".encode("utf-16-le")
    assert ArchiveReader(data).read_string() == "\U0001f600!"


def test_lone_surrogates_survive_a_wide_string() -> None:
    """A CStringW may hold an unpaired surrogate; it round-trips instead of failing or being replaced."""
    data = _written(lambda w: w.write_string("a\udc80b"))
    assert data == bytes.fromhex("fffeff03" + "6100" + "80dc" + "6200")
    assert ArchiveReader(data).read_string() == "a\udc80b"


def test_reader_accepts_longer_prefixes_like_mfc() -> None:
    """As AfxReadStringLength, the reader takes a length written with a wider escape than needed."""
    long_forms = [
        "ff" + "0200",
        "ff" + "ffff" + "02000000",
        "ff" + "ffff" + "ffffffff" + "0200000000000000",
        "fffeff" + "ff" + "0200",
    ]
    for prefix in long_forms[:3]:
        assert ArchiveReader(bytes.fromhex(prefix) + b"hi").read_string() == "hi"
    assert ArchiveReader(bytes.fromhex(long_forms[3]) + "hi".encode("utf-16-le")).read_string() == "hi"


def test_narrow_string_in_other_code_page() -> None:
    """With codepage cp1251, Cyrillic text is narrow, one byte per character, and reads back."""
    text = "Привет"
    data = _written(lambda w: w.write_string(text), codepage="cp1251")
    assert data == bytes([6]) + text.encode("cp1251")
    assert ArchiveReader(data, codepage="cp1251").read_string() == text
    # The same text in a cp1252 archive cannot be narrow, so it goes wide.
    assert _written(lambda w: w.write_string(text))[:3] == b"\xff\xfe\xff"
    # And cp1251 bytes read as cp1252 are a different (valid) text: the code page is the contract.
    assert ArchiveReader(data).read_string() != text


def test_narrow_length_counts_bytes_in_a_multibyte_code_page() -> None:
    """In a multi-byte code page (cp932), a CStringA's length counts bytes, as MFC's GetLength does."""
    text = "日本"
    data = _written(lambda w: w.write_string(text, wide=False), codepage="cp932")
    assert data == bytes([4]) + text.encode("cp932")
    assert ArchiveReader(data, codepage="cp932").read_string() == text


def test_narrow_not_encodable_raises() -> None:
    """wide=False with text the code page cannot hold raises ValueError naming the character; nothing is written."""
    w = ArchiveWriter()
    with pytest.raises(ValueError, match="cp1252") as info:
        w.write_string("a\u03a9", wide=False)
    assert "'Ω'" in str(info.value)
    assert w.getvalue() == b""


def test_undecodable_narrow_string_is_archive_error_with_offset() -> None:
    """Narrow bytes the code page cannot decode raise ArchiveError (not EndOfData) at the bad byte's offset."""
    data = bytes.fromhex("0700") + bytes.fromhex("03") + b"a\x81b"  # 0x81 is undefined in cp1252
    r = ArchiveReader(data)
    assert r.read_word() == 7
    with pytest.raises(ArchiveError) as info:
        r.read_string()
    assert not isinstance(info.value, EndOfData)
    assert info.value.offset == 4
    assert "81" in str(info.value) and "cp1252" in str(info.value)
    assert r.offset == 2  # nothing consumed
    assert r.unread_bytes() == data[2:]


def test_string_longer_than_max_string_is_refused_before_reading() -> None:
    """A claimed length above max_string raises ArchiveError before any of it is read from the file."""
    claim = bytes.fromhex("ff" + "ffff" + "00000001")  # 0x01000000 characters claimed
    f = TrickleFile(claim + b"x" * 100, step=1000)
    r = ArchiveReader(f, max_string=1000)
    with pytest.raises(ArchiveError, match="exceeds max_string 1000") as info:
        r.read_string()
    assert not isinstance(info.value, EndOfData)
    assert f.pos == len(claim)  # only the prefix was read
    assert DEFAULT_MAX_STRING == 16 * 1024 * 1024
    wide = bytes.fromhex("fffeff" + "ff" + "0002")  # 512 wide characters = 1024 bytes
    with pytest.raises(ArchiveError, match="1024 bytes"):
        ArchiveReader(wide, max_string=1000).read_string()
    assert ArchiveReader(bytes.fromhex("ff0002") + bytes(512), max_string=None).read_string() == "\x00" * 512


def test_huge_claimed_length_is_end_of_data_not_allocation() -> None:
    """A QWORD length far beyond the data raises EndOfData (or the max_string error), never allocates it."""
    data = bytes.fromhex("ff" + "ffff" + "ffffffff" + "ffffffffffffff7f") + b"abc"
    with pytest.raises(EndOfData, match="expected 9223372036854775807 bytes"):
        ArchiveReader(data, max_string=None).read_string()
    with pytest.raises(ArchiveError, match="max_string"):
        ArchiveReader(data).read_string()


# -- counts -------------------------------------------------------------------------------

COUNTS: list[tuple[int, str, str]] = [
    (0, "0000", "0000"),
    (5, "0500", "0005"),
    (0xFFFE, "feff", "fffe"),
    (0xFFFF, "ffff" + "ffff0000", "ffff" + "0000ffff"),
    (0x10000, "ffff" + "00000100", "ffff" + "00010000"),
    (0xFFFFFFFE, "ffff" + "feffffff", "ffff" + "fffffffe"),
    (0xFFFFFFFF, "ffff" + "ffffffff" + "ffffffff00000000", "ffff" + "ffffffff" + "00000000ffffffff"),
    (2**64 - 1, "ffff" + "ffffffff" + "ffffffffffffffff", "ffff" + "ffffffff" + "ffffffffffffffff"),
]


@pytest.mark.parametrize(("n", "le", "be"), COUNTS, ids=[hex(c[0]) for c in COUNTS])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_count_vectors(n: int, le: str, be: str, byteorder: str) -> None:
    """WriteCount: WORD below 0xFFFF, else FFFF + DWORD (and 64-bit MFC's FFFFFFFF + QWORD); both directions."""
    expected = bytes.fromhex(le if byteorder == "little" else be)
    assert _written(lambda w: w.write_count(n), byteorder) == expected
    r = ArchiveReader(expected, byteorder=byteorder)  # type: ignore[arg-type]
    assert r.read_count() == n
    assert r.at_end()


# -- truncation ---------------------------------------------------------------------------

COMPOSITE: list[tuple[str, Any]] = [
    ("byte", 7),
    ("word", 0x0102),
    ("string", "hi"),
    ("dword", 0xA0B0C0D0),
    ("string", "wide \u03a9"),
    ("count", 0x12345),
    ("double", 2.5),
    ("string", ""),
    ("bool", True),
    ("longlong", -3),
    ("string", "x" * 300),
    ("wchar", "\u20ac"),
    ("bytes", b"raw!"),
]
COMPOSITE_HEX = (
    "07"
    + "0201"
    + "026869"
    + "d0c0b0a0"
    + "fffeff06" + "77006900640065002000a903"
    + "ffff45230100"
    + "0000000000000440"
    + "00"
    + "01"
    + "fdffffffffffffff"
    + "ff2c01" + "78" * 300
    + "ac20"
    + "72617721"
)  # fmt: skip


def _write_all(w: ArchiveWriter, items: list[tuple[str, Any]]) -> None:
    for name, value in items:
        getattr(w, f"write_{name}")(value)


def _read_one(r: ArchiveReader, name: str, value: Any) -> Any:
    if name == "bytes":
        return r.read_bytes(len(value))
    return getattr(r, f"read_{name}")()


def test_composite_vector_exact() -> None:
    """A record of mixed values writes exactly the hand-written bytes and reads back in order."""
    data = _written(lambda w: _write_all(w, COMPOSITE))
    assert data == bytes.fromhex(COMPOSITE_HEX)
    r = ArchiveReader(data)
    assert [_read_one(r, n, v) for n, v in COMPOSITE] == [v for _, v in COMPOSITE]
    assert r.at_end()


def _value_offsets() -> list[int]:
    w = ArchiveWriter()
    offsets = []
    for name, value in COMPOSITE:
        offsets.append(w.offset)
        _write_all(w, [(name, value)])
    return [*offsets, w.offset]


@pytest.mark.parametrize("source", ["memory", "trickle"])
def test_truncation_at_every_point_raises_end_of_data(source: str) -> None:
    """Cut anywhere, the record reads its complete values right, then EndOfData, never a wrong value."""
    data = bytes.fromhex(COMPOSITE_HEX)
    offsets = _value_offsets()
    for cut in range(len(data)):
        piece = data[:cut]
        r = ArchiveReader(piece if source == "memory" else TrickleFile(piece))
        for i, (name, value) in enumerate(COMPOSITE):
            if offsets[i + 1] <= cut:
                assert _read_one(r, name, value) == value
                continue
            with pytest.raises(EndOfData) as info:
                _read_one(r, name, value)
            # The error names the short field's position; the failed value consumed nothing.
            assert offsets[i] <= info.value.offset <= cut
            assert f"at offset {info.value.offset}" in str(info.value)
            assert r.offset == offsets[i]
            assert r.unread_bytes() == piece[offsets[i] :]
            break
        else:
            pytest.fail(f"no EndOfData with {cut} of {len(data)} bytes")


def test_end_of_data_message() -> None:
    """EndOfData says how many bytes were expected for what, how many there were, and where."""
    r = ArchiveReader(bytes(12))
    r.read_bytes(10)
    with pytest.raises(EndOfData) as info:
        r.read_dword()
    assert str(info.value) == "expected 4 bytes for DWORD, got 2 at offset 10"
    assert info.value.offset == 10
    assert isinstance(info.value, ArchiveError) and isinstance(info.value, ProtocolError)
    with pytest.raises(EndOfData, match="expected 2 bytes for a narrow string of 2 characters, got 1"):
        ArchiveReader(b"\x02h").read_string()


def test_read_bytes_checks() -> None:
    """read_bytes(n) returns exactly n bytes, refuses a negative n, and raises EndOfData when short."""
    r = ArchiveReader(b"abc")
    assert r.read_bytes(0) == b""
    with pytest.raises(ValueError):
        r.read_bytes(-1)
    with pytest.raises(EndOfData):
        r.read_bytes(4)
    assert r.read_bytes(3) == b"abc"
    assert r.at_end()


# -- file sources -------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 1000])
def test_file_source_short_reads(step: int) -> None:
    """A file that returns fewer bytes than asked (a socket file) is read until each value is complete."""
    data = bytes.fromhex(COMPOSITE_HEX)
    f = TrickleFile(data, step)
    r = ArchiveReader(f)
    assert [_read_one(r, n, v) for n, v in COMPOSITE] == [v for _, v in COMPOSITE]
    assert r.at_end()
    assert r.offset == len(data)


def test_file_source_is_never_read_ahead() -> None:
    """The reader takes from the file exactly the bytes of the values asked for, so the rest stays in the file."""
    data = bytes.fromhex(COMPOSITE_HEX) + b"NOT FOR THE ARCHIVE"
    f = TrickleFile(data, step=10_000)
    r = ArchiveReader(f)
    for name, value in COMPOSITE:
        _read_one(r, name, value)
        assert f.pos == r.offset
    assert f.data[f.pos :] == b"NOT FOR THE ARCHIVE"
    assert r.unread_bytes() == b""


def test_at_end_on_a_file_keeps_the_peeked_byte() -> None:
    """at_end() on a file peeks at most one byte and the next read still gets it."""
    f = TrickleFile(bytes.fromhex("3412") + b"rest", step=100)
    r = ArchiveReader(f)
    assert not r.at_end()
    assert f.pos == 1
    assert r.unread_bytes() == b"\x34"
    assert r.read_word() == 0x1234
    assert r.read_bytes(4) == b"rest"
    assert r.at_end()


@pytest.mark.parametrize("fail_at", range(10))  # the record is 10 bytes
def test_file_exception_mid_value_loses_nothing(fail_at: int) -> None:
    """If the file raises mid-value (a timeout), retrying the read returns the right value: no byte was dropped."""
    w = ArchiveWriter()
    w.write_dword(0xCAFEBABE)
    w.write_string("hello")
    f = FlakyFile(w.getvalue(), fail_at)
    r = ArchiveReader(f)
    results: list[Any] = []
    for read in (r.read_dword, r.read_string):
        for _attempt in range(2):
            try:
                results.append(read())
                break
            except TimeoutError:
                continue
    assert results == [0xCAFEBABE, "hello"]
    assert f.failed
    assert r.at_end()


def test_reader_copies_a_mutable_source() -> None:
    """Changing the bytearray after building the reader does not change what it reads."""
    buf = bytearray(b"\x02hi")
    r = ArchiveReader(buf)
    buf[:] = b"\x00\x00\x00"
    assert r.read_string() == "hi"
    assert ArchiveReader(memoryview(b"\x05")).read_byte() == 5


def test_reader_rejects_bad_arguments() -> None:
    """A source that is neither bytes-like nor readable, a bad byte order or code page raise at construction."""
    with pytest.raises(TypeError):
        ArchiveReader(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="byteorder"):
        ArchiveReader(b"", byteorder="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code page"):
        ArchiveReader(b"", codepage="no-such-codepage")
    with pytest.raises(ValueError, match="byteorder"):
        ArchiveWriter(byteorder="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code page"):
        ArchiveWriter(codepage="no-such-codepage")
    with pytest.raises(ValueError, match="buffer_size"):
        ArchiveWriter(io.BytesIO(), buffer_size=0)


def test_file_returning_none_is_refused() -> None:
    """A non-blocking file that returns None raises InvalidState rather than being taken for EOF."""

    class NonBlocking:
        def read(self, n: int) -> bytes | None:
            return None

    with pytest.raises(InvalidState):
        ArchiveReader(NonBlocking()).read_byte()


# -- writer with a file -------------------------------------------------------------------


def test_writer_buffers_until_flush() -> None:
    """With a file, bytes are buffered until flush() (as CArchive), then written once."""
    f = io.BytesIO()
    w = ArchiveWriter(f)
    w.write_dword(1)
    w.write_string("hi")
    assert f.getvalue() == b""
    assert w.offset == 7
    w.flush()
    assert f.getvalue() == bytes.fromhex("01000000026869")
    w.flush()
    assert f.getvalue() == bytes.fromhex("01000000026869")
    with pytest.raises(InvalidState):
        w.getvalue()


def test_writer_close_flushes_and_refuses_more() -> None:
    """close() flushes; writing afterwards raises InvalidState; the file stays open."""
    f = io.BytesIO()
    w = ArchiveWriter(f)
    w.write_byte(9)
    w.close()
    assert f.getvalue() == b"\x09"
    assert w.closed
    with pytest.raises(InvalidState):
        w.write_byte(1)
    with pytest.raises(InvalidState):
        w.write_string("x")
    w.close()
    assert not f.closed


def test_writer_context_manager_flushes_only_on_success() -> None:
    """Leaving the with block normally flushes; leaving it by an exception does not send a half record."""
    f = io.BytesIO()
    with ArchiveWriter(f) as w:
        w.write_word(1)
    assert f.getvalue() == b"\x01\x00"
    g = io.BytesIO()
    with pytest.raises(RuntimeError), ArchiveWriter(g) as w2:
        w2.write_word(1)
        raise RuntimeError("abort")
    assert g.getvalue() == b""
    assert w2.closed


def test_writer_autoflushes_at_buffer_size() -> None:
    """The buffer is written to the file when it reaches buffer_size, so memory stays bounded."""
    f = io.BytesIO()
    w = ArchiveWriter(f, buffer_size=8)
    w.write_dword(1)
    assert f.getvalue() == b""
    w.write_dword(2)
    assert len(f.getvalue()) == 8
    w.write_bytes(b"x" * 100)
    assert len(f.getvalue()) == 108


def test_writer_handles_partial_file_writes() -> None:
    """A file that accepts only some bytes per write (a raw socket file) still receives everything, once."""

    class Partial:
        def __init__(self) -> None:
            self.data = bytearray()
            self.flushes = 0

        def write(self, data: bytes) -> int:
            self.data += data[:3]
            return min(3, len(data))

        def flush(self) -> None:
            self.flushes += 1

    f = Partial()
    w = ArchiveWriter(f)
    w.write_string("partial writes")
    w.flush()
    assert bytes(f.data) == b"\x0epartial writes"
    assert f.flushes == 1


def test_writer_keeps_unwritten_bytes_when_the_file_fails() -> None:
    """If the file raises mid-flush, what it took is not resent and what it did not take stays buffered."""

    class Failing:
        def __init__(self) -> None:
            self.data = bytearray()
            self.calls = 0

        def write(self, data: bytes) -> int:
            self.calls += 1
            if self.calls == 2:
                raise TimeoutError("simulated")
            self.data += data[:4]
            return min(4, len(data))

    f = Failing()
    w = ArchiveWriter(f)
    w.write_bytes(b"0123456789")
    with pytest.raises(TimeoutError):
        w.flush()
    assert bytes(f.data) == b"0123"
    w.flush()
    assert bytes(f.data) == b"0123456789"
    assert w.offset == 10


def test_in_memory_writer_flush_and_close() -> None:
    """For an in-memory writer, flush() is a no-op and getvalue() works after close()."""
    w = ArchiveWriter()
    w.write_byte(1)
    w.flush()
    w.close()
    assert w.getvalue() == b"\x01"


# -- hypothesis round trips ---------------------------------------------------------------

# Every character cp1252 defines (five byte values are undefined and dropped here).
_CP1252_CHARS = bytes(range(256)).decode("cp1252", errors="ignore")

_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "byte": st.integers(0, 255),
    "char": st.integers(-128, 127),
    "bool": st.booleans(),
    "word": st.integers(0, 0xFFFF),
    "short": st.integers(-0x8000, 0x7FFF),
    "wchar": st.integers(0, 0xFFFF).map(chr),
    "long": st.integers(-(2**31), 2**31 - 1),
    "dword": st.integers(0, 2**32 - 1),
    "int": st.integers(-(2**31), 2**31 - 1),
    "unsigned": st.integers(0, 2**32 - 1),
    "bool32": st.booleans(),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
    "longlong": st.integers(-(2**63), 2**63 - 1),
    "ulonglong": st.integers(0, 2**64 - 1),
    "count": st.one_of(st.integers(0, 0x20000), st.integers(0, 2**64 - 1)),
    "bytes": st.binary(max_size=50),
    "narrow": st.text(alphabet=_CP1252_CHARS, max_size=300),
    "wide": st.text(max_size=300),
    "auto": st.text(max_size=50),
}

_items = st.lists(
    st.sampled_from(sorted(_VALUES)).flatmap(lambda name: st.tuples(st.just(name), _VALUES[name])),
    max_size=25,
)


def _write_item(w: ArchiveWriter, name: str, value: Any) -> None:
    if name in ("narrow", "wide", "auto"):
        w.write_string(value, {"narrow": False, "wide": True, "auto": None}[name])
    else:
        getattr(w, f"write_{name}")(value)


def _read_item(r: ArchiveReader, name: str, value: Any) -> Any:
    if name in ("narrow", "wide", "auto"):
        return r.read_string()
    return _read_one(r, name, value)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items, byteorder=st.sampled_from(["little", "big"]), step=st.sampled_from([0, 1, 7]))
def test_hypothesis_round_trip(items: list[tuple[str, Any]], byteorder: str, step: int) -> None:
    """Any sequence of values of every type, in either byte order, reads back equal (from memory or a trickling file)."""
    w = ArchiveWriter(byteorder=byteorder)  # type: ignore[arg-type]
    for name, value in items:
        _write_item(w, name, value)
    data = w.getvalue()
    source: Any = data if step == 0 else TrickleFile(data, step)
    r = ArchiveReader(source, byteorder=byteorder)  # type: ignore[arg-type]
    for name, value in items:
        got = _read_item(r, name, value)
        if name == "float":
            assert got == struct.unpack("<f", struct.pack("<f", value))[0]
        else:
            assert got == value
    assert r.at_end()
    assert r.offset == len(data)


@settings(deadline=None, max_examples=100)
@given(text=st.text(alphabet=_CP1252_CHARS, max_size=40))
def test_hypothesis_narrow_is_chosen_when_encodable(text: str) -> None:
    """write_string(s) picks narrow (no marker) for cp1252-encodable text, and its length is the byte count."""
    data = _written(lambda w: w.write_string(text))
    assert data == bytes([len(text)]) + text.encode("cp1252")


@settings(deadline=None, max_examples=100)
@given(data=st.binary(max_size=20))
def test_hypothesis_reader_never_misreads_garbage(data: bytes) -> None:
    """Arbitrary bytes read as strings either decode to the text their prefix says, or raise ArchiveError."""
    r = ArchiveReader(data)
    for _ in range(len(data) + 1):
        try:
            r.read_string()
        except ArchiveError:
            assert r.offset <= len(data)
            return
    assert r.at_end()


def test_writer_flush_to_a_file_that_would_block_keeps_the_bytes() -> None:
    """A raw file whose write returns None (would block) raises InvalidState; nothing is lost."""

    class WouldBlock:
        def __init__(self) -> None:
            self.calls = 0

        def write(self, data: bytes) -> int | None:
            self.calls += 1
            return None

    writer = ArchiveWriter(WouldBlock())
    writer.write_dword(7)
    with pytest.raises(InvalidState):
        writer.flush()
    sink = io.BytesIO()
    writer.file = sink
    writer.flush()
    assert sink.getvalue() == b"\x07\x00\x00\x00"
