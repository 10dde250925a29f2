"""CArchive-compatible typed reader and writer (SPEC §4.3).  Sans-I/O.

MFC's ``CArchive`` writes numbers and strings back to back, with no padding and no
type tags: the reader must ask for the same types in the same order as the writer.
This module writes and reads exactly MFC's bytes, so a Python program can exchange
data with an MFC program that uses ``CSocket`` + ``CSocketFile`` + ``CArchive``.

Wire rules (little-endian, as an x86 MFC program writes them):

================================  ======  ==============================================
MFC type                          bytes   methods
================================  ======  ==============================================
BYTE / char / bool                1       ``byte`` (0..255), ``char`` (-128..127), ``bool``
WORD / short / wchar_t            2       ``word``, ``short``, ``wchar``
LONG / DWORD / int / UINT / BOOL  4       ``long``, ``dword``, ``int``, ``unsigned``, ``bool32``
float                             4       ``float`` (IEEE 754 single)
LONGLONG / ULONGLONG / double     8       ``longlong``, ``ulonglong``, ``double``
================================  ======  ==============================================

A ``CString`` is a length prefix then the characters (``AfxWriteStringLength``):

- the length counts characters: bytes in the ANSI code page for a narrow string
  (CStringA), UTF-16 code units for a wide one (CStringW);
- ``n < 0xFF``: one BYTE; else ``FF`` + WORD if ``n < 0xFFFE``; else ``FF FFFF`` +
  DWORD if ``n < 0xFFFFFFFF``; else ``FF FFFF FFFFFFFF`` + QWORD;
- a wide string is preceded by the marker BYTE ``FF`` + WORD ``FFFE`` (bytes
  ``FF FE FF``) and carries UTF-16LE; the reader detects the width from the marker.

``"hi"`` narrow is ``02 68 69``; wide it is ``FF FE FF 02 68 00 69 00``; ``""`` is ``00``.

A count (``WriteCount``) is a WORD if ``n < 0xFFFF``, else ``FFFF`` + DWORD; as on
64-bit MFC, a count of ``0xFFFFFFFF`` or more continues with ``FFFFFFFF`` + QWORD.

**Network-order mode** (``byteorder="big"``), for peers that are not MFC programs:
the archive is the *same sequence of typed values*, each multi-byte value written
big-endian.  That includes the length and count fields and the wide-string marker
(BYTE ``FF`` + WORD ``FFFE`` is then the bytes ``FF FF FE``), and wide characters
are UTF-16BE.  Both ends must agree on the mode; nothing on the wire says which.

Theory of operation of :class:`ArchiveReader`: it reads from bytes in memory or from
a file-like object (e.g. :class:`msgsock.sync.SocketFile`), and asks the file for
exactly the bytes the value needs, never more, so nothing past the value is taken
from the stream.  Unlike MFC's ``CArchive``, which discards whatever it read ahead
into its buffer when it is closed, a read here is all or nothing: a value that
cannot be completed (end of data, malformed bytes, or an exception from the file
such as a timeout) consumes nothing, and the bytes that were read for it stay
available to the next read and to :meth:`ArchiveReader.unread_bytes`.
"""

from __future__ import annotations

import codecs
import struct
from types import TracebackType
from typing import Literal, Protocol

from .exceptions import ArchiveError, EndOfData, InvalidState

__all__ = ["DEFAULT_MAX_STRING", "ArchiveReader", "ArchiveWriter"]

Byteorder = Literal["big", "little"]

DEFAULT_MAX_STRING = 16 * 1024 * 1024
"""Largest string, in bytes on the wire, the reader accepts from a peer (SPEC §7)."""

_ORDER_PREFIX = {"little": "<", "big": ">"}

# MFC type name -> struct code (standard sizes, no padding: SPEC §4.3).
_CODES = {
    "BYTE": "B",
    "char": "b",
    "bool": "B",
    "WORD": "H",
    "short": "h",
    "wchar_t": "H",
    "LONG": "i",
    "DWORD": "I",
    "int": "i",
    "unsigned": "I",
    "BOOL": "i",
    "float": "f",
    "double": "d",
    "LONGLONG": "q",
    "ULONGLONG": "Q",
}

# Integer ranges, for error messages that name the value and the type.
_RANGES = {
    "B": (0, 0xFF),
    "b": (-0x80, 0x7F),
    "H": (0, 0xFFFF),
    "h": (-0x8000, 0x7FFF),
    "I": (0, 0xFFFFFFFF),
    "i": (-0x80000000, 0x7FFFFFFF),
    "Q": (0, 0xFFFFFFFFFFFFFFFF),
    "q": (-0x8000000000000000, 0x7FFFFFFFFFFFFFFF),
}

# Reads from a file are capped so a claimed length never makes us allocate it at once.
_READ_CHUNK = 64 * 1024


def _structs(byteorder: str) -> dict[str, struct.Struct]:
    if byteorder not in _ORDER_PREFIX:
        raise ValueError(f"byteorder {byteorder!r} is not 'little' or 'big'")
    prefix = _ORDER_PREFIX[byteorder]
    return {name: struct.Struct(prefix + code) for name, code in _CODES.items()}


def _check_codepage(codepage: str) -> str:
    try:
        codecs.lookup(codepage)
    except LookupError:
        raise ValueError(f"unknown code page {codepage!r}") from None
    return codepage


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes | None: ...


class ArchiveWriter:
    """Writes MFC ``CArchive`` store-mode bytes.  Sans-I/O.

    With ``file=None`` the bytes accumulate in memory; :meth:`getvalue` returns them.
    With a ``file`` (anything with ``write(bytes)``, e.g. a ``SocketFile``), writes go
    to an internal buffer that :meth:`flush` (and :meth:`close`) writes to the file,
    as ``CArchive`` does with its buffer; the buffer is also written out whenever it
    reaches ``buffer_size`` bytes.

    Args:
        file: where :meth:`flush` writes, or None to keep the bytes in memory.
        byteorder: ``"little"`` (MFC on x86) or ``"big"`` (network-order mode).
        codepage: the ANSI code page of narrow strings (CStringA).
        buffer_size: bytes buffered before they are written to ``file`` unasked.

    Raises:
        ValueError: an unknown byte order or code page, or a buffer_size below 1.
    """

    def __init__(
        self,
        file: _Writable | None = None,
        *,
        byteorder: Byteorder = "little",
        codepage: str = "cp1252",
        buffer_size: int = 64 * 1024,
    ) -> None:
        self._structs = _structs(byteorder)
        self.byteorder: Byteorder = byteorder
        self.codepage = _check_codepage(codepage)
        if buffer_size < 1:
            raise ValueError(f"buffer_size {buffer_size} must be at least 1")
        self.file = file
        self._buffer_size = buffer_size
        self._buf = bytearray()
        self._flushed = 0
        self._closed = False
        self._wide = "utf-16-le" if byteorder == "little" else "utf-16-be"

    # -- buffer management ------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Bytes written so far (flushed or still buffered)."""
        return self._flushed + len(self._buf)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def getvalue(self) -> bytes:
        """Return everything written, for an in-memory writer (``file=None``).

        Raises:
            InvalidState: the writer has a file (its bytes went there).
        """
        if self.file is not None:
            raise InvalidState("getvalue() is only for an in-memory ArchiveWriter (file=None)")
        return bytes(self._buf)

    def flush(self) -> None:
        """Write the buffered bytes to the file (and flush the file if it can).

        A no-op for an in-memory writer.  Exceptions from the file propagate; the
        bytes it did not accept stay buffered, so nothing is lost or sent twice.

        Raises:
            InvalidState: the file's ``write`` returned None (a non-blocking file that
                would block); the bytes stay buffered.
        """
        file = self.file
        if file is None:
            return
        buf = self._buf
        done = 0
        try:
            while done < len(buf):
                n = file.write(bytes(buf[done:]))
                if n is None:
                    # io.RawIOBase: None means a non-blocking file took nothing.  Guessing
                    # "all of it" could lose bytes; the unsent ones stay buffered.
                    raise InvalidState("the file took no bytes (write returned None: it would block)")
                done += n
        finally:
            # Even when the file raised: drop what it took, keep what it did not.
            self._flushed += done
            del buf[:done]
        flush = getattr(file, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        """Flush and refuse further writes.  The file itself is not closed (as CArchive::Close)."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # After an error mid-record, sending the half-written record would desynchronise
        # the peer's reader: only a clean exit flushes.
        if exc_type is None:
            self.close()
        else:
            self._closed = True

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise InvalidState("the ArchiveWriter is closed")
        self._buf += data
        if self.file is not None and len(self._buf) >= self._buffer_size:
            self.flush()

    def _pack_int(self, name: str, value: int) -> None:
        st = self._structs[name]
        if not isinstance(value, int):
            raise TypeError(f"{name} value must be an int, not {type(value).__name__} {value!r}")
        low, high = _RANGES[st.format[1]]
        if not low <= value <= high:
            raise ValueError(f"value {value} out of range for {name} ({low}..{high})")
        self._put(st.pack(value))

    # -- primitives -------------------------------------------------------------------

    def write_byte(self, value: int) -> None:
        """Write a BYTE (unsigned, 1 byte).

        Raises:
            ValueError: value outside 0..255.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("BYTE", value)

    def write_char(self, value: int) -> None:
        """Write a char (signed, 1 byte).

        Raises:
            ValueError: value outside -128..127.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("char", value)

    def write_bool(self, value: bool) -> None:
        """Write a C++ bool: one byte, 1 for true, 0 for false.

        Raises:
            InvalidState: the writer is closed.
        """
        self._put(b"\x01" if value else b"\x00")

    def write_word(self, value: int) -> None:
        """Write a WORD (unsigned, 2 bytes).

        Raises:
            ValueError: value outside 0..65535.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("WORD", value)

    def write_short(self, value: int) -> None:
        """Write a short (signed, 2 bytes).

        Raises:
            ValueError: value outside -32768..32767.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("short", value)

    def write_wchar(self, value: str | int) -> None:
        """Write a wchar_t: one UTF-16 code unit (2 bytes), given as a character or an int.

        Raises:
            ValueError: a string that is not one character below U+10000, or an int
                outside 0..65535.  TypeError: neither str nor int.
            InvalidState: the writer is closed.
        """
        if isinstance(value, str):
            if len(value) != 1 or ord(value) > 0xFFFF:
                raise ValueError(f"value {value!r} is not a single UTF-16 code unit for wchar_t")
            value = ord(value)
        self._pack_int("wchar_t", value)

    def write_long(self, value: int) -> None:
        """Write a LONG (signed, 4 bytes).

        Raises:
            ValueError: value outside the signed 32-bit range.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("LONG", value)

    def write_dword(self, value: int) -> None:
        """Write a DWORD (unsigned, 4 bytes).

        Raises:
            ValueError: value outside 0..2**32-1.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("DWORD", value)

    def write_int(self, value: int) -> None:
        """Write an int (signed, 4 bytes; MFC stores it as a LONG).

        Raises:
            ValueError: value outside the signed 32-bit range.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("int", value)

    def write_unsigned(self, value: int) -> None:
        """Write an unsigned int (4 bytes).

        Raises:
            ValueError: value outside 0..2**32-1.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("unsigned", value)

    def write_bool32(self, value: bool | int) -> None:
        """Write a Win32 BOOL (a 4-byte int; TRUE is 1).

        Raises:
            ValueError: an int outside the signed 32-bit range.  TypeError: not a bool or int.
            InvalidState: the writer is closed.
        """
        self._pack_int("BOOL", int(value) if isinstance(value, bool) else value)

    def write_float(self, value: float) -> None:
        """Write a float (IEEE 754 single, 4 bytes).

        Raises:
            OverflowError: a finite value too large for a single.  TypeError: not a number.
            InvalidState: the writer is closed.
        """
        try:
            data = self._structs["float"].pack(value)
        except OverflowError:
            raise OverflowError(f"value {value!r} out of range for float (IEEE 754 single)") from None
        except struct.error as exc:
            raise TypeError(f"float value must be a number, not {type(value).__name__} {value!r}") from exc
        self._put(data)

    def write_double(self, value: float) -> None:
        """Write a double (IEEE 754, 8 bytes).

        Raises:
            TypeError: not a number.  InvalidState: the writer is closed.
        """
        try:
            data = self._structs["double"].pack(value)
        except struct.error as exc:
            raise TypeError(f"double value must be a number, not {type(value).__name__} {value!r}") from exc
        self._put(data)

    def write_longlong(self, value: int) -> None:
        """Write a LONGLONG (signed, 8 bytes).

        Raises:
            ValueError: value outside the signed 64-bit range.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("LONGLONG", value)

    def write_ulonglong(self, value: int) -> None:
        """Write a ULONGLONG (unsigned, 8 bytes).

        Raises:
            ValueError: value outside 0..2**64-1.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        self._pack_int("ULONGLONG", value)

    def write_bytes(self, raw: bytes | bytearray | memoryview) -> None:
        """Write raw bytes with no length prefix (``CArchive::Write``).

        Raises:
            InvalidState: the writer is closed.
        """
        self._put(raw)

    # -- composite values -------------------------------------------------------------

    def _write_length(self, n: int) -> None:
        # AfxWriteStringLength: each escape is the previous field's all-ones value.
        if n < 0xFF:
            self._pack_int("BYTE", n)
            return
        self._pack_int("BYTE", 0xFF)
        if n < 0xFFFE:
            self._pack_int("WORD", n)
            return
        self._write_beyond_word(n)

    def _write_beyond_word(self, n: int) -> None:
        # How AfxWriteStringLength and WriteCount both go on once a WORD will not do:
        # the WORD escape FFFF, then a DWORD, or the DWORD escape FFFFFFFF and a QWORD.
        self._pack_int("WORD", 0xFFFF)
        if n < 0xFFFFFFFF:
            self._pack_int("DWORD", n)
            return
        self._pack_int("DWORD", 0xFFFFFFFF)
        self._pack_int("ULONGLONG", n)

    def write_string(self, s: str, wide: bool | None = None) -> None:
        """Write a CString: length prefix in characters, then the characters.

        Args:
            s: the text.
            wide: False for a narrow CStringA in ``codepage``; True for a wide CStringW
                (marker ``FF FE FF``, UTF-16); None for narrow when ``s`` is encodable
                in the code page, else wide.

        Raises:
            ValueError: ``wide=False`` and ``s`` is not encodable in the code page.
            TypeError: ``s`` is not a str.
            InvalidState: the writer is closed.
        """
        if not isinstance(s, str):
            raise TypeError(f"CString value must be a str, not {type(s).__name__}")
        data: bytes | None = None
        if not wide:
            try:
                data = s.encode(self.codepage)
            except UnicodeEncodeError as exc:
                if wide is False:
                    raise ValueError(
                        f"string {s!r} is not encodable in code page {self.codepage} "
                        f"(character {s[exc.start]!r} at index {exc.start}); use wide=True"
                    ) from None
        if data is not None:
            self._write_length(len(data))
        else:
            # Lone surrogates are kept: a CStringW may hold any 16-bit code units.
            data = s.encode(self._wide, "surrogatepass")
            self._pack_int("BYTE", 0xFF)
            self._pack_int("WORD", 0xFFFE)
            self._write_length(len(data) // 2)
        self._put(data)

    def write_count(self, n: int) -> None:
        """Write an element count (``CArchive::WriteCount``).

        Raises:
            ValueError: ``n`` negative or above 2**64-1.  TypeError: not an int.
            InvalidState: the writer is closed.
        """
        if not isinstance(n, int):
            raise TypeError(f"count must be an int, not {type(n).__name__} {n!r}")
        if not 0 <= n <= 0xFFFFFFFFFFFFFFFF:
            raise ValueError(f"value {n} out of range for count (0..{0xFFFFFFFFFFFFFFFF})")
        if n < 0xFFFF:
            self._pack_int("WORD", n)
            return
        self._write_beyond_word(n)


class ArchiveReader:
    """Reads MFC ``CArchive`` load-mode bytes.  Sans-I/O.

    Args:
        source: the archive bytes (``bytes``, ``bytearray``, ``memoryview``), or a
            file-like object whose ``read(n)`` returns up to ``n`` bytes and ``b""``
            at end of data (a socket file may return fewer bytes than asked).
        byteorder: ``"little"`` (MFC on x86) or ``"big"`` (network-order mode).
        codepage: the ANSI code page of narrow strings (CStringA).
        max_string: largest string, in bytes, accepted from the data; a length prefix
            above it raises :class:`ArchiveError` before anything is read for it
            (SPEC §7: a peer cannot make us allocate what it merely claims).  None
            means no limit.

    Every ``read_*`` method either returns a whole value or raises and consumes
    nothing (see the module docstring).

    Raises:
        ValueError: an unknown byte order or code page.
        TypeError: ``source`` is neither bytes-like nor readable.
    """

    def __init__(
        self,
        source: bytes | bytearray | memoryview | _Readable,
        *,
        byteorder: Byteorder = "little",
        codepage: str = "cp1252",
        max_string: int | None = DEFAULT_MAX_STRING,
    ) -> None:
        self._structs = _structs(byteorder)
        self.byteorder: Byteorder = byteorder
        self.codepage = _check_codepage(codepage)
        self.max_string = max_string
        self._wide = "utf-16-le" if byteorder == "little" else "utf-16-be"
        self._file: _Readable | None
        self._buf: bytes | bytearray
        if isinstance(source, bytes | bytearray | memoryview):
            self._file = None
            self._buf = bytes(source)  # a copy: the caller may reuse its buffer
        elif callable(getattr(source, "read", None)):
            self._file = source
            self._buf = bytearray()  # bytes read from the file and not yet consumed
        else:
            raise TypeError(f"source must be bytes-like or have read(n), not {type(source).__name__}")
        self._base = 0  # stream offset of _buf[0]
        self._start = 0  # committed position in _buf: everything before it is consumed
        self._pos = 0  # position of the value being read (rolled back on error)

    # -- position ---------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Bytes consumed so far (by complete values)."""
        return self._base + self._start

    def at_end(self) -> bool:
        """Return True when no byte is left.

        For a file source this reads at most one byte ahead (it may block until the
        byte or the end of data arrives); that byte is kept for the next read.

        Raises:
            Whatever the file's ``read`` raises.
        """
        if self._start < len(self._buf):
            return False
        if self._file is None:
            return True
        self._begin()
        return not self._fill(1)

    def unread_bytes(self) -> bytes:
        """Return the bytes this reader holds that no complete value has consumed.

        For an in-memory source, the rest of the data.  For a file source, bytes that
        were read from the file for a value that could not be completed (or by
        :meth:`at_end`); normally empty, since nothing is read ahead.
        """
        return bytes(self._buf[self._start :])

    # -- the all-or-nothing read machinery ---------------------------------------------
    #
    # ``_start`` (what complete values consumed) moves only in ``_commit``.  A read
    # starts at ``_begin`` (``_pos = _start``) and advances ``_pos`` field by field; if
    # it raises, ``_start`` has not moved, so the value's bytes are still unread.

    def _fill(self, n: int) -> bool:
        """Make ``n`` bytes available at ``_pos``; False if the data ends first."""
        buf = self._buf
        file = self._file
        if file is None or not isinstance(buf, bytearray):
            return len(buf) - self._pos >= n
        while len(buf) - self._pos < n:
            want = min(n - (len(buf) - self._pos), _READ_CHUNK)
            chunk = file.read(want)
            if chunk is None:
                raise InvalidState("the archive's file returned None: non-blocking files are not supported")
            if not chunk:
                return False
            buf += chunk
        return True

    def _take(self, n: int, what: str) -> bytes:
        """Return the next ``n`` bytes of the value being read, for a field named ``what``."""
        if not self._fill(n):
            got = len(self._buf) - self._pos
            raise EndOfData(f"expected {n} bytes for {what}, got {got}", self._base + self._pos)
        pos = self._pos
        self._pos = pos + n
        return bytes(self._buf[pos : pos + n])

    def _unpack(self, name: str) -> int | float:
        st = self._structs[name]
        value: int | float = st.unpack(self._take(st.size, name))[0]
        return value

    def _begin(self) -> None:
        self._pos = self._start

    def _commit(self) -> None:
        self._start = self._pos
        buf = self._buf
        # Compact a file buffer once most of it is consumed (amortised O(1) per byte).
        if isinstance(buf, bytearray) and self._start and self._start * 2 >= len(buf):
            del buf[: self._start]
            self._base += self._start
            self._start = self._pos = 0

    def _read_value(self, name: str) -> int | float:
        self._begin()
        value = self._unpack(name)
        self._commit()
        return value

    def _read_int(self, name: str) -> int:
        value = self._read_value(name)
        assert isinstance(value, int)
        return value

    # -- primitives -------------------------------------------------------------------

    def read_byte(self) -> int:
        """Read a BYTE (0..255).

        Raises:
            EndOfData: fewer than 1 byte left.
        """
        return self._read_int("BYTE")

    def read_char(self) -> int:
        """Read a char (signed, -128..127).

        Raises:
            EndOfData: fewer than 1 byte left.
        """
        return self._read_int("char")

    def read_bool(self) -> bool:
        """Read a C++ bool (1 byte); any non-zero byte is true, as MFC reads it.

        Raises:
            EndOfData: fewer than 1 byte left.
        """
        return self._read_int("bool") != 0

    def read_word(self) -> int:
        """Read a WORD (0..65535).

        Raises:
            EndOfData: fewer than 2 bytes left.
        """
        return self._read_int("WORD")

    def read_short(self) -> int:
        """Read a short (signed, 2 bytes).

        Raises:
            EndOfData: fewer than 2 bytes left.
        """
        return self._read_int("short")

    def read_wchar(self) -> str:
        """Read a wchar_t (one UTF-16 code unit) as a one-character string.

        Raises:
            EndOfData: fewer than 2 bytes left.
        """
        return chr(self._read_int("wchar_t"))

    def read_long(self) -> int:
        """Read a LONG (signed, 4 bytes).

        Raises:
            EndOfData: fewer than 4 bytes left.
        """
        return self._read_int("LONG")

    def read_dword(self) -> int:
        """Read a DWORD (unsigned, 4 bytes).

        Raises:
            EndOfData: fewer than 4 bytes left.
        """
        return self._read_int("DWORD")

    def read_int(self) -> int:
        """Read an int (signed, 4 bytes).

        Raises:
            EndOfData: fewer than 4 bytes left.
        """
        return self._read_int("int")

    def read_unsigned(self) -> int:
        """Read an unsigned int (4 bytes).

        Raises:
            EndOfData: fewer than 4 bytes left.
        """
        return self._read_int("unsigned")

    def read_bool32(self) -> bool:
        """Read a Win32 BOOL (4 bytes); any non-zero value is true.

        Raises:
            EndOfData: fewer than 4 bytes left.
        """
        return self._read_int("BOOL") != 0

    def read_float(self) -> float:
        """Read a float (IEEE 754 single, 4 bytes).

        Raises:
            EndOfData: fewer than 4 bytes left.
        """
        return float(self._read_value("float"))

    def read_double(self) -> float:
        """Read a double (IEEE 754, 8 bytes).

        Raises:
            EndOfData: fewer than 8 bytes left.
        """
        return float(self._read_value("double"))

    def read_longlong(self) -> int:
        """Read a LONGLONG (signed, 8 bytes).

        Raises:
            EndOfData: fewer than 8 bytes left.
        """
        return self._read_int("LONGLONG")

    def read_ulonglong(self) -> int:
        """Read a ULONGLONG (unsigned, 8 bytes).

        Raises:
            EndOfData: fewer than 8 bytes left.
        """
        return self._read_int("ULONGLONG")

    def read_bytes(self, n: int) -> bytes:
        """Read exactly ``n`` raw bytes (``CArchive::Read`` of a known size).

        Raises:
            EndOfData: fewer than ``n`` bytes left (nothing is consumed).
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        self._begin()
        data = self._take(n, f"{n} raw bytes")
        self._commit()
        return data

    # -- composite values -------------------------------------------------------------

    def _field(self, name: str) -> int:
        value = self._unpack(name)
        assert isinstance(value, int)
        return value

    def _read_length(self) -> tuple[int, bool]:
        # AfxReadStringLength, step by step, including its leniency: a reader accepts
        # any of the escapes, even for a length a writer would have written shorter.
        wide = False
        n = self._field("BYTE")
        if n < 0xFF:
            return n, wide
        n = self._field("WORD")
        if n == 0xFFFE:
            wide = True
            n = self._field("BYTE")
            if n < 0xFF:
                return n, wide
            n = self._field("WORD")
        if n < 0xFFFE:
            return n, wide
        n = self._field("DWORD")
        if n < 0xFFFFFFFF:
            return n, wide
        return self._field("ULONGLONG"), wide

    def read_string(self) -> str:
        """Read a CString, narrow or wide (detected by the ``FF FE FF`` marker).

        Raises:
            EndOfData: the data ends inside the length prefix or the characters.
            ArchiveError: narrow bytes not valid in the code page, or a length above
                ``max_string``.
        """
        self._begin()
        n, wide = self._read_length()
        size = 2 * n if wide else n
        at = self._base + self._pos
        kind = "wide" if wide else "narrow"
        if self.max_string is not None and size > self.max_string:
            raise ArchiveError(
                f"{kind} string of {n} characters ({size} bytes) exceeds max_string {self.max_string}", at
            )
        data = self._take(size, f"a {kind} string of {n} characters")
        if wide:
            # surrogatepass: a CStringW may hold unpaired surrogates; keep them, lose nothing.
            text = data.decode(self._wide, "surrogatepass")
        else:
            try:
                text = data.decode(self.codepage)
            except UnicodeDecodeError as exc:
                raise ArchiveError(
                    f"narrow string bytes {data[exc.start : exc.end].hex()} are not valid "
                    f"in code page {self.codepage} ({exc.reason})",
                    at + exc.start,
                ) from None
        self._commit()
        return text

    def read_count(self) -> int:
        """Read an element count (``CArchive::ReadCount``).

        Raises:
            EndOfData: the data ends inside the count.
        """
        self._begin()
        n = self._field("WORD")
        if n == 0xFFFF:
            n = self._field("DWORD")
            if n == 0xFFFFFFFF:  # 64-bit MFC's further escape
                n = self._field("ULONGLONG")
        self._commit()
        return n
