"""Sans-I/O frame codec (SPEC §4.1).

A frame is a header then a body.  The header holds a length field (1, 2, 4 or 8 bytes,
big- or little-endian) that counts the body, or the whole frame when
``length_includes_header`` is set, plus optional extra fields before and after it
(the "customized packet header fields" of MFCAsync, KB Q192570).  The default format
is a 4-byte unsigned big-endian body length, byte-identical to Twisted's
``Int32StringReceiver`` and Netty's ``LengthFieldPrepender(4)``.

Theory of operation of :class:`FrameDecoder`: bytes arrive in any split.  Complete
frames are parsed straight out of the incoming chunk by offset; only the unfinished
tail is copied into an internal buffer.  While a frame is unfinished, the decoder
remembers how many bytes complete it and does not re-parse until they are there.
A declared length is checked against ``max_size`` as soon as the header is
complete, before any of the body is buffered, so a peer cannot make us allocate
what it merely claims.  After a :class:`~msgsock.exceptions.ProtocolError` the
decoder is broken for good: the stream position is lost.

Where the optional extension ``msgsock._speedups`` is built (see
:mod:`msgsock.extensions`; ``MSGSOCK_NO_EXTENSIONS=1`` turns it off), the loops that cost
per frame -- :meth:`FrameDecoder.feed`, :meth:`FrameDecoder.feed_span` and the header
encoder -- run in C (``src/msgsock/_native/frame.h``), chosen once at import.  This
module stays the reference: the compiled path keeps the state here, hands back to the
code below every input it does not handle, and builds its errors with the same
functions, so frames, exceptions and state are identical either way
(``tests/test_native_framing.py`` proves it).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from . import extensions
from .exceptions import (
    FrameError,
    IncompleteMessage,
    InvalidFormat,
    MessageTooLarge,
    OversizeMessage,
    ProtocolError,
)

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_MAX_SIZE",
    "PRESETS",
    "FrameDecoder",
    "FrameFormat",
    "HeaderField",
    "Message",
    "encode",
]

DEFAULT_MAX_SIZE = 16 * 1024 * 1024
"""Default limit on a message body: 16 MiB.  A security limit, see SPEC §7."""

_LENGTH_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_FIELD_CODES = frozenset("bBhHiIlLqQ")
_ORDER_PREFIX = {"big": ">", "little": "<"}

Byteorder = Literal["big", "little"]

PRESETS: dict[str, tuple[int, Byteorder]] = {
    "u32be": (4, "big"),
    "u32le": (4, "little"),
    "mfc": (4, "little"),  # how an x86 MFC program writes its DWORD length
    "u16be": (2, "big"),
    "u16le": (2, "little"),
    "u8": (1, "big"),
    "u64be": (8, "big"),
    "u64le": (8, "little"),
}
"""Named length-field presets: name -> (width in bytes, byte order)."""

# Extra length names accepted by FrameFormat.parse but not listed as presets: a 1-byte
# length has no byte order, yet the extra header fields follow it, so str() of a
# little-endian u8 format must be able to say so and parse it back (round trip).
_LENGTH_NAMES: dict[str, tuple[int, Byteorder]] = {**PRESETS, "u8be": (1, "big"), "u8le": (1, "little")}

_BYTES_LIKE = (bytes, bytearray, memoryview)
_BYTES_OR_BYTEARRAY = (bytes, bytearray)  # a tuple: ``bytes | bytearray`` is built anew at each call

# The compiled loops, or None (pure Python): decided once, by msgsock.extensions (which
# imports only the standard library and nothing of msgsock, so the core stays the core).
_speedups: Any = extensions.speedups
_SIGNED_CODES = frozenset("bhilq")


def bytes_like_error(value: object, name: str = "message") -> TypeError:
    """The one error for a body (or chunk of stream) that is not bytes-like, naming its type.

    Every layer raises it (``message must be bytes-like, got str``); the I/O layers
    only build it on the path that already failed, so a send pays nothing for it.
    """
    return TypeError(f"{name} must be bytes-like, got {type(value).__name__}")


class Message(bytes):
    """A received message body together with its extra header fields.

    It *is* the body (a ``bytes`` subclass), so code that ignores headers keeps
    working; ``header`` maps each extra field name to its integer value.  Passing a
    ``Message`` back to a send method re-uses its header, which is how the echo
    handler returns the fields it received.
    """

    header: dict[str, int]

    def __new__(
        cls, body: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> Message:
        self = super().__new__(cls, body)
        self.header = dict(header) if header else {}
        return self

    def __repr__(self) -> str:
        return f"Message({bytes(self)!r}, header={self.header!r})"


@dataclass(frozen=True, slots=True)
class HeaderField:
    """An extra integer header field: its name and ``struct`` code (e.g. ``"B"``, ``"H"``)."""

    name: str
    code: str

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise InvalidFormat(f"header field name {self.name!r} is not an identifier")
        if self.code not in _FIELD_CODES:
            raise InvalidFormat(
                f"header field {self.name!r} has struct code {self.code!r}; "
                f"expected one of {''.join(sorted(_FIELD_CODES))}"
            )


@dataclass(frozen=True)
class FrameFormat:
    """How messages are framed on a stream.  Frozen and validated at construction.

    Args:
        length_size: width of the length field in bytes: 1, 2, 4 or 8.
        byteorder: ``"big"`` or ``"little"``; applies to every header field.
        length_includes_header: the length counts the whole frame, header included.
        fields_before: extra header fields placed before the length field.
        fields_after: extra header fields placed after the length field.
        max_size: largest body accepted or sent, in bytes; ``None`` means unlimited
            (only by explicit choice: it lets a peer make us allocate what it claims).

    Raises:
        InvalidFormat: any argument out of range (a negative ``max_size`` too; it is
            a ``ValueError``), or duplicate field names.
        TypeError: ``max_size`` is not an int or None (a bool neither).
    """

    length_size: int = 4
    byteorder: Byteorder = "big"
    length_includes_header: bool = False
    fields_before: tuple[HeaderField, ...] = ()
    fields_after: tuple[HeaderField, ...] = ()
    max_size: int | None = DEFAULT_MAX_SIZE

    # Derived, set in __post_init__.
    header_size: int = field(init=False, repr=False, compare=False)
    max_body: int = field(init=False, repr=False, compare=False)
    """The largest body this format accepts: ``max_size`` capped by the field's range."""
    _struct: struct.Struct = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _length_index: int = field(init=False, repr=False, compare=False)
    _native: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.length_size, bool) or self.length_size not in _LENGTH_CODES:  # True == 1
            raise InvalidFormat(f"length field width {self.length_size!r} is not one of 1, 2, 4, 8")
        if self.byteorder not in _ORDER_PREFIX:
            raise InvalidFormat(f"byte order {self.byteorder!r} is not 'big' or 'little'")
        max_size = self.max_size
        if max_size is not None:
            if isinstance(max_size, bool) or not isinstance(max_size, int):
                # max_size=True would be a 1-byte limit.
                raise TypeError(f"max_size must be an int or None, got {type(max_size).__name__}")
            if max_size < 0:
                raise InvalidFormat(f"max_size {max_size!r} must be a non-negative int or None")
        fields = (*self.fields_before, *self.fields_after)
        for f in fields:
            if not isinstance(f, HeaderField):
                raise InvalidFormat(f"header field {f!r} is not a HeaderField")
        names = tuple(f.name for f in fields)
        if len(set(names)) != len(names):
            raise InvalidFormat(f"duplicate header field names in {names}")
        codes = (
            "".join(f.code for f in self.fields_before)
            + _LENGTH_CODES[self.length_size]
            + "".join(f.code for f in self.fields_after)
        )
        st = struct.Struct(_ORDER_PREFIX[self.byteorder] + codes)
        limit = (1 << (8 * self.length_size)) - 1
        if self.length_includes_header:
            limit -= st.size
            if limit < 0:
                # The length field could not even count the header: no frame can exist.
                raise InvalidFormat(
                    f"a {self.length_size}-byte length that includes the header cannot "
                    f"count a {st.size}-byte header"
                )
        max_body = limit if self.max_size is None else min(limit, self.max_size)
        setattr_ = object.__setattr__
        setattr_(self, "_struct", st)
        setattr_(self, "_names", names)
        setattr_(self, "_length_index", len(self.fields_before))
        setattr_(self, "header_size", st.size)
        setattr_(self, "max_body", max_body)
        setattr_(self, "_native", _native_format(self))

    # -- construction helpers ---------------------------------------------------------

    @classmethod
    def parse(cls, spec: str, *, max_size: int | None = DEFAULT_MAX_SIZE) -> FrameFormat:
        """Build a format from a preset name or a format string (SPEC §4.1).

        ``u32be``; ``u32be+kind:B+flags:H`` (fields after the length);
        ``magic:H+u16be`` (a field before it); ``u32be!`` (length counts the header).

        Raises:
            InvalidFormat: naming the part of ``spec`` that is wrong.
            TypeError: ``spec`` is not a str (``frame format must be a str, got bytes``).
        """
        if not isinstance(spec, str):
            raise TypeError(f"frame format must be a str, got {type(spec).__name__}")
        if not spec.strip():
            raise InvalidFormat("empty frame format")
        parts = spec.strip().split("+")
        before: list[HeaderField] = []
        after: list[HeaderField] = []
        length: tuple[int, Byteorder] | None = None
        includes_header = False
        for part in parts:
            if not part:
                raise InvalidFormat(f"empty part in frame format {spec!r}")
            if ":" in part:
                name, _, code = part.partition(":")
                try:
                    hf = HeaderField(name, code)
                except InvalidFormat as exc:
                    raise InvalidFormat(f"bad part {part!r} in frame format {spec!r}: {exc}") from None
                (after if length else before).append(hf)
                continue
            name = part[:-1] if part.endswith("!") else part
            if name not in _LENGTH_NAMES:
                raise InvalidFormat(
                    f"bad part {part!r} in frame format {spec!r}: not a preset "
                    f"({', '.join(PRESETS)}) nor a name:CODE field"
                )
            if length is not None:
                raise InvalidFormat(f"bad part {part!r} in frame format {spec!r}: a second length field")
            length = _LENGTH_NAMES[name]
            includes_header = part.endswith("!")
        if length is None:
            raise InvalidFormat(f"frame format {spec!r} has no length field ({', '.join(PRESETS)})")
        return cls(
            length_size=length[0],
            byteorder=length[1],
            length_includes_header=includes_header,
            fields_before=tuple(before),
            fields_after=tuple(after),
            max_size=max_size,
        )

    def with_max_size(self, max_size: int | None) -> FrameFormat:
        """Return the same format with another ``max_size``."""
        return replace(self, max_size=max_size)

    def __reduce__(self) -> tuple[type[FrameFormat], tuple[Any, ...]]:
        # The derived struct.Struct cannot be pickled; rebuild from the init fields so a
        # format can be handed to worker processes (and copied).
        return (
            type(self),
            (
                self.length_size,
                self.byteorder,
                self.length_includes_header,
                self.fields_before,
                self.fields_after,
                self.max_size,
            ),
        )

    def __str__(self) -> str:
        """The format string that :meth:`parse` turns back into this format."""
        order = "be" if self.byteorder == "big" else "le"
        if self.length_size == 1:
            # "u8" parses as big-endian; say "u8le" so little-endian extra fields round-trip.
            length = "u8" if self.byteorder == "big" else "u8le"
        else:
            length = f"u{8 * self.length_size}{order}"
        if self.length_includes_header:
            length += "!"
        parts = [f"{f.name}:{f.code}" for f in self.fields_before]
        parts.append(length)
        parts += [f"{f.name}:{f.code}" for f in self.fields_after]
        return "+".join(parts)

    @property
    def field_names(self) -> tuple[str, ...]:
        """Names of the extra header fields, in wire order."""
        return self._names

    # -- encoding ---------------------------------------------------------------------

    def encode_header(self, size: int, header: Mapping[str, int] | None = None) -> bytes:
        """Return the header bytes for a body of ``size`` bytes.

        Args:
            size: body length in bytes.
            header: values of the extra fields; missing fields are 0.

        Raises:
            OversizeMessage: ``size`` is above ``max_size`` or the length field's range
                (this side's mistake, not the peer's: see ``MessageTooLarge``).
            InvalidFormat: an unknown field name or a value its struct code cannot hold.
        """
        if size > self.max_body:
            raise OversizeMessage(size, self.max_body)
        length = size + self.header_size if self.length_includes_header else size
        if not self._names:
            if header:
                # Dropping the caller's fields silently would send something else than asked.
                raise InvalidFormat(
                    f"unknown header field(s) {', '.join(sorted(header))}; format {self} has none"
                )
            return self._struct.pack(length)
        values: list[int] = []
        given = dict(header) if header else {}
        for name in self._names:
            values.append(given.pop(name, 0))
        if given:
            raise InvalidFormat(
                f"unknown header field(s) {', '.join(sorted(given))}; "
                f"format {self} has {', '.join(self._names) or 'none'}"
            )
        values.insert(self._length_index, length)
        try:
            return self._struct.pack(*values)
        except struct.error as exc:
            raise InvalidFormat(
                f"header values {dict(header or {})} do not fit format {self}: {exc}"
            ) from None

    def encode_parts(
        self, body: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
    ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """Return ``(header_bytes, body)`` so a large body can be written without a copy.

        When ``header`` is None and ``body`` is a :class:`Message`, its header is used.

        Raises:
            OversizeMessage, InvalidFormat: as :meth:`encode_header`.
            TypeError: ``body`` is not bytes-like (``message must be bytes-like, got str``).
        """
        if header is None and isinstance(body, Message):
            header = body.header
        # bytes first: as cheap as the memoryview test alone was, and a str (which has
        # a len()) is refused instead of being framed.
        if isinstance(body, _BYTES_OR_BYTEARRAY):
            size = len(body)
        elif isinstance(body, memoryview):
            size = body.nbytes
        else:
            raise bytes_like_error(body)
        return self.encode_header(size, header), body

    def encode(self, body: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None) -> bytes:
        """Return one whole frame as bytes.

        Raises:
            OversizeMessage, InvalidFormat: as :meth:`encode_header`.
            TypeError: ``body`` is not bytes-like.
        """
        head, body = self.encode_parts(body, header)
        return head + bytes(body)

    def decoder(self) -> FrameDecoder:
        """Return a new decoder for this format."""
        return FrameDecoder(self)


def _native_format(fmt: FrameFormat) -> Any:
    """The format compiled for ``msgsock._speedups``, or None (pure Python, or a header
    beyond the native codec's limits: it then keeps to the reference code)."""
    if _speedups is None:
        return None
    fields: list[tuple[int, int, bool]] = []
    offset = length_offset = 0
    for f in (*fmt.fields_before, None, *fmt.fields_after):
        if f is None:
            length_offset = offset
            offset += fmt.length_size
            continue
        size = struct.calcsize("<" + f.code)
        fields.append((offset, size, f.code in _SIGNED_CODES))
        offset += size
    try:
        return _speedups.Format(
            fmt.length_size,
            fmt.byteorder == "big",
            fmt.length_includes_header,
            length_offset,
            fmt.header_size,
            fmt.max_body,
            tuple(fields),
            fmt._names,
            Message,
        )
    except ValueError:
        return None


DEFAULT_FORMAT = FrameFormat()


def encode(body: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None) -> bytes:
    """Encode one frame in the default format (4-byte big-endian body length)."""
    return DEFAULT_FORMAT.encode(body, header)


class FrameDecoder:
    """Turns bytes in any split into the frames that were sent.  Sans-I/O.

    Use :meth:`feed` with each chunk received; it returns the complete messages
    (``bytes``, or :class:`Message` when the format has extra header fields).
    """

    __slots__ = (
        "_buf",
        "_error",
        "_hsize",
        "_max_body",
        "_native",
        "_need",
        "_plain",
        "_unpack",
        "format",
    )

    def __init__(self, format: FrameFormat = DEFAULT_FORMAT) -> None:
        self.format = format
        self._buf = bytearray()
        # Total bytes (header + body) of the unfinished frame in _buf, once its header is known.
        self._need = 0
        self._error: ProtocolError | None = None
        # Hot-path constants (SPEC §8): bound once, not looked up per frame.
        self._unpack = format._struct.unpack_from
        self._hsize = format.header_size
        self._max_body = format.max_body
        # A plain format (length only, counting the body) takes the short loop in _parse.
        self._plain = not format._names and not format.length_includes_header
        self._native = format._native

    @property
    def buffered(self) -> int:
        """Bytes held of an unfinished frame."""
        return len(self._buf)

    @property
    def error(self) -> ProtocolError | None:
        """The protocol error that broke the stream, if any.

        :meth:`feed` returns the frames completed before a bad header and raises only on
        the next call, so check this after handling what it returned.
        """
        return self._error

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived but not all of it (for timeouts)."""
        return bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Take the next chunk of the stream; return the frames it completed.

        When the chunk holds complete frames followed by a bad header, those frames are
        returned, :attr:`error` is set, and the next call raises it.

        Raises:
            MessageTooLarge: a declared length above ``max_size``.
            FrameError: a length smaller than the header (``length_includes_header``).
            ProtocolError: again on every later call, once the stream was found bad.
            TypeError: ``data`` is not bytes-like (``data must be bytes-like, got str``);
                the decoder is left as it was.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not buf and self._plain and type(data) is memoryview:
            # The per-message server's hot path, inlined (one call per read): a plain
            # format, nothing buffered, a view of the I/O layer's read buffer.
            unpack = self._unpack
            hsize = self._hsize
            max_body = self._max_body
            n = len(data)
            pos = 0
            frames: list[Any] = []
            while n - pos >= hsize:
                size = unpack(data, pos)[0]
                if size > max_body:
                    return self._bad(frames, n, MessageTooLarge(size, max_body))[0]
                end = pos + hsize + size
                if end > n:
                    self._need = end - pos
                    break
                frames.append(data[pos + hsize : end].tobytes())
                pos = end
            else:
                self._need = hsize
            if pos < n:
                buf += data[pos:]
            return frames
        try:  # free in Python 3.11+ until something raises
            if buf:
                buf += data
                if len(buf) < self._need:
                    return []
                # The internal buffer is exported to a memoryview while parsing and must be
                # released before it is resized.
                with memoryview(buf) as view:
                    frames, used = self._parse(view, len(buf))
                del buf[:used]
                return frames
            if isinstance(data, bytearray):
                # Slices of a bytearray are bytearrays; parse a view so bodies come out as bytes.
                with memoryview(data) as view:
                    frames, used = self._parse(view, len(data))
                    if used < len(data):
                        buf += view[used:]
                return frames
            n = data.nbytes if type(data) is memoryview else len(data)
            frames, used = self._parse(data, n)
            if used < n:
                buf += data[used:]
            return frames
        except TypeError:
            # Not a bytes-like chunk: each path fails before it changes any state.
            if not isinstance(data, _BYTES_LIKE):
                raise bytes_like_error(data, "data") from None
            raise

    def feed_span(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Like :meth:`feed`, but return the complete frames as one span of raw bytes.

        Every header is checked exactly as :meth:`feed` checks it; the frames are not
        split into bodies.  This is the echo fast path (SPEC §8): an echo of the span is
        byte-identical to re-encoding each message with its header fields.

        Returns:
            ``(count, span)``: how many frames completed, and their bytes, headers included.

        Raises:
            As :meth:`feed` (frames before a bad header are returned first).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not buf and self._plain and type(data) is memoryview:
            # The echo server's hot path, inlined (one call per read): a plain format,
            # nothing buffered, a view of the I/O layer's read buffer.
            unpack = self._unpack
            hsize = self._hsize
            max_body = self._max_body
            n = len(data)
            pos = count = 0
            while n - pos >= hsize:
                size = unpack(data, pos)[0]
                if size > max_body:
                    self._error = MessageTooLarge(size, max_body)
                    if not count:
                        raise self._error
                    return count, data[:pos].tobytes()  # the good frames; the error comes next time
                end = pos + hsize + size
                if end > n:
                    self._need = end - pos
                    break
                pos = end
                count += 1
            else:
                self._need = hsize
            if pos < n:
                buf += data[pos:]
            return count, (data[:pos].tobytes() if pos else b"")
        try:
            if buf:
                buf += data
                if len(buf) < self._need:
                    return 0, b""
                with memoryview(buf) as view:
                    count, used = self._scan(view, len(buf))
                    span = view[:used].tobytes()
                if self._error is not None:
                    buf.clear()  # what follows a bad header is not a frame
                else:
                    del buf[:used]
                return count, span
            if type(data) is memoryview:  # the I/O layers' case: no second view needed
                return self._scan_span(data)
            with memoryview(data) as view:
                return self._scan_span(view)
        except TypeError:
            if not isinstance(data, _BYTES_LIKE):  # as in feed(): nothing changed yet
                raise bytes_like_error(data, "data") from None
            raise

    def _scan_span(self, view: memoryview) -> tuple[int, bytes]:
        n = len(view)
        count, used = self._scan(view, n)
        if used < n and self._error is None:
            self._buf += view[used:]
        return count, (view[:used].tobytes() if used else b"")

    def _scan(self, view: memoryview, n: int) -> tuple[int, int]:
        """Check the headers of the complete frames in ``view[:n]``; return (count, bytes used)."""
        unpack = self._unpack
        hsize = self._hsize
        max_body = self._max_body
        fmt = self.format
        minus = hsize if fmt.length_includes_header else 0
        index = fmt._length_index
        count = pos = 0
        while n - pos >= hsize:
            length = unpack(view, pos)[index]
            size = length - minus
            if size < 0 or size > max_body:
                error = self._header_error(length)
                self._error = error
                if not count:
                    raise error
                return count, pos  # deliver the good frames; the error is raised next time
            end = pos + hsize + size
            if end > n:
                self._need = end - pos
                return count, pos
            count += 1
            pos = end
        self._need = hsize
        return count, pos

    def eof(self) -> None:
        """Tell the decoder the stream ended.

        Raises:
            IncompleteMessage: the stream ended inside a frame.
            ProtocolError: the error already found, once the stream was found bad (the
                bytes held then are not an unfinished frame but a bad one).
        """
        if self._error is not None:
            raise self._error
        if self._buf:
            expected = self._need if len(self._buf) >= self._hsize else None
            raise IncompleteMessage(len(self._buf), expected)

    def _parse(self, data: bytes | memoryview, n: int) -> tuple[list[Any], int]:
        """Parse the complete frames of ``data[:n]``; return them and the bytes they used.

        ``data`` is ``bytes`` or a ``memoryview`` (a slice of either is one copy of
        the body, as bytes) -- never a bytearray.
        """
        unpack = self._unpack
        hsize = self._hsize
        max_body = self._max_body
        frames: list[Any] = []
        pos = 0
        if self._plain:
            # The common case, kept short: one unpack and one slice per frame.
            while n - pos >= hsize:
                size = unpack(data, pos)[0]
                if size > max_body:
                    return self._bad(frames, n, MessageTooLarge(size, max_body))
                end = pos + hsize + size
                if end > n:
                    self._need = end - pos
                    return frames, pos
                body = data[pos + hsize : end]
                frames.append(body if type(body) is bytes else body.tobytes())  # type: ignore[union-attr]
                pos = end
            self._need = hsize
            return frames, pos
        fmt = self.format
        minus = hsize if fmt.length_includes_header else 0
        names = fmt._names
        index = fmt._length_index
        while n - pos >= hsize:
            values = unpack(data, pos)
            size = values[index] - minus
            if size < 0 or size > max_body:
                return self._bad(frames, n, self._header_error(values[index]))
            end = pos + hsize + size
            if end > n:
                self._need = end - pos
                return frames, pos
            body = data[pos + hsize : end]
            if type(body) is not bytes:
                body = body.tobytes()  # type: ignore[union-attr]
            if names:
                fields = list(values)
                del fields[index]
                body = Message(body, dict(zip(names, fields, strict=True)))
            frames.append(body)
            pos = end
        self._need = hsize
        return frames, pos

    def _header_error(self, length: int) -> ProtocolError:
        """The error for a header whose length field ``length`` is bad (too large or too short)."""
        hsize = self._hsize
        size = length - hsize if self.format.length_includes_header else length
        if size < 0:
            return FrameError(f"frame length {length} is smaller than the {hsize}-byte header")
        return MessageTooLarge(size, self._max_body)

    def _bad(self, frames: list[Any], n: int, error: ProtocolError) -> tuple[list[Any], int]:
        self._error = error
        if not frames:
            raise error
        # The frames before the bad header were sent whole: deliver them, and raise on
        # the next call (``error`` tells the caller now).
        return frames, n


# -- the compiled loops (msgsock._speedups) ---------------------------------------------
#
# Each function below does what the reference method of the same name does, with the
# frame loop in C; whatever the C code declines (an input type it does not handle, a
# format beyond its limits, any encoding error) goes to the reference method, so the
# outcome is the reference's.  They replace the reference methods once, at import.


def _append(buf: bytearray, data: bytes | bytearray | memoryview) -> None:
    try:
        buf += data
    except TypeError:
        if not isinstance(data, _BYTES_LIKE):  # as in feed(): nothing changed yet
            raise bytes_like_error(data, "data") from None
        raise


def _native_feed(self: FrameDecoder, data: bytes | bytearray | memoryview) -> list[Any]:
    native = self._native
    if native is None or self._error is not None:
        return _reference_feed(self, data)
    buf = self._buf
    if buf:
        _append(buf, data)
        if len(buf) < self._need:
            return []
        frames, used, need, bad = _speedups.parse(native, buf, None)
        if bad is None:
            self._need = need
        else:
            frames, used = self._bad(frames, len(buf), self._header_error(bad))
        del buf[:used]
        return frames  # type: ignore[no-any-return]
    result = _speedups.parse(native, data, buf)  # appends the unfinished rest to buf
    if result is None:
        return _reference_feed(self, data)
    frames, used, need, bad = result
    if bad is None:
        self._need = need
        return frames  # type: ignore[no-any-return]
    return self._bad(frames, used, self._header_error(bad))[0]


def _native_feed_span(self: FrameDecoder, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    native = self._native
    if native is None or self._error is not None:
        return _reference_feed_span(self, data)
    buf = self._buf
    if buf:
        _append(buf, data)
        if len(buf) < self._need:
            return 0, b""
        count, span, used, need, bad = _speedups.scan(native, buf, None)
        if bad is None:
            self._need = need
            del buf[:used]
            return count, span
    else:
        result = _speedups.scan(native, data, buf)  # appends the unfinished rest to buf
        if result is None:
            return _reference_feed_span(self, data)
        count, span, used, need, bad = result
        if bad is None:
            self._need = need
            return count, span
    self._error = self._header_error(bad)
    if not count:
        raise self._error
    buf.clear()  # what follows a bad header is not a frame
    return count, span


def _native_encode_header(self: FrameFormat, size: int, header: Mapping[str, int] | None = None) -> bytes:
    native = self._native
    if native is not None:
        head = _speedups.encode_header(native, size, header)
        if head is not None:
            return head  # type: ignore[no-any-return]
    return _reference_encode_header(self, size, header)


def _native_encode_parts(
    self: FrameFormat, body: bytes | bytearray | memoryview, header: Mapping[str, int] | None = None
) -> tuple[bytes, bytes | bytearray | memoryview]:
    native = self._native
    if native is not None:
        parts = _speedups.encode_parts(native, body, header)
        if parts is not None:
            return parts  # type: ignore[no-any-return]
    return _reference_encode_parts(self, body, header)


_reference_feed = FrameDecoder.feed
_reference_feed_span = FrameDecoder.feed_span
_reference_encode_header = FrameFormat.encode_header
_reference_encode_parts = FrameFormat.encode_parts


def _install(cls: type, name: str, native: Callable[..., Any]) -> None:
    reference = getattr(cls, name)
    functools.update_wrapper(native, reference)  # the reference's name, docstring, signature
    setattr(cls, name, native)


if _speedups is not None:
    _install(FrameDecoder, "feed", _native_feed)
    _install(FrameDecoder, "feed_span", _native_feed_span)
    _install(FrameFormat, "encode_header", _native_encode_header)
    _install(FrameFormat, "encode_parts", _native_encode_parts)
