"""The compiled frame codec (``msgsock._speedups``) against the pure-Python reference.

Two twins of one format: one with its native codec, one with it removed (``_native =
None``, so every method takes the reference code of ``framing.py``).  Hypothesis draws
formats (every length width, both byte orders, a length counting the header or not,
fields of every struct code before and after it, small and unlimited ``max_size``),
streams (valid frames, garbage, lengths at the edges of the field) and splits; after
every chunk both decoders must agree on the frames (type, bytes, header), the exception
(type, message, attributes), ``buffered``, ``in_frame``, ``error`` and finally ``eof()``.
The encoders must give identical bytes or identical exceptions.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgsock import extensions, framing
from msgsock.exceptions import MessageTooLarge
from msgsock.framing import FrameDecoder, FrameFormat, HeaderField, Message

native_only = pytest.mark.skipif(
    extensions.speedups is None,
    reason=f"msgsock._speedups is not in use ({extensions.reason('speedups')})",
)

_CODES = sorted("bBhHiIlLqQ")
_SIZES = {c: struct.calcsize("<" + c) for c in _CODES}


def _code_range(code: str) -> tuple[int, int]:
    bits = 8 * _SIZES[code]
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code.islower() else (0, (1 << bits) - 1)


@st.composite
def formats(draw: st.DrawFn) -> FrameFormat:
    """Any valid format, small max_size and None included."""
    names = draw(st.lists(st.sampled_from("abcdefgh"), max_size=5, unique=True))
    split = draw(st.integers(0, len(names)))
    fields = [HeaderField(n, draw(st.sampled_from(_CODES))) for n in names]
    length_size = draw(st.sampled_from([1, 2, 4, 8]))
    includes = draw(st.booleans())
    hsize = length_size + sum(_SIZES[f.code] for f in fields)
    if includes and length_size == 1 and hsize > 255:
        includes = False
    return FrameFormat(
        length_size=length_size,
        byteorder=draw(st.sampled_from(["big", "little"])),
        length_includes_header=includes,
        fields_before=tuple(fields[:split]),
        fields_after=tuple(fields[split:]),
        max_size=draw(st.sampled_from([None, 0, 1, 5, 64, 300, 1 << 20, framing.DEFAULT_MAX_SIZE])),
    )


def twins(fmt: FrameFormat) -> tuple[FrameFormat, FrameFormat]:
    """(native, pure): the same format, the second with its native codec removed."""
    pure = FrameFormat(
        fmt.length_size,
        fmt.byteorder,
        fmt.length_includes_header,
        fmt.fields_before,
        fmt.fields_after,
        fmt.max_size,
    )
    object.__setattr__(pure, "_native", None)
    assert fmt._native is not None, "a format within the native limits has a native codec"
    return fmt, pure


def _raw_header(fmt: FrameFormat, length: int, values: list[int]) -> bytes:
    """A header with any length field value (valid or not)."""
    order = ">" if fmt.byteorder == "big" else "<"
    before = [f.code for f in fmt.fields_before]
    after = [f.code for f in fmt.fields_after]
    code = order + "".join(before) + {1: "B", 2: "H", 4: "I", 8: "Q"}[fmt.length_size] + "".join(after)
    vals = list(values)
    vals.insert(len(before), length)
    return struct.pack(code, *vals)


@st.composite
def streams(draw: st.DrawFn, fmt: FrameFormat) -> bytes:
    """Frames, some valid, some with edge lengths, with garbage and a truncated tail."""
    out = bytearray()
    fields = (*fmt.fields_before, *fmt.fields_after)
    hsize = fmt.header_size
    lmax = (1 << (8 * fmt.length_size)) - 1
    for _ in range(draw(st.integers(0, 6))):
        values = [draw(st.integers(*_code_range(f.code))) for f in fields]
        kind = draw(st.sampled_from(["good", "good", "good", "edge", "garbage"]))
        if kind == "garbage":
            out += draw(st.binary(max_size=40))
            continue
        if kind == "good":
            body = draw(st.binary(max_size=min(fmt.max_body, 80)))
            length = len(body) + (hsize if fmt.length_includes_header else 0)
            out += _raw_header(fmt, length, values) + body
            continue
        length = draw(
            st.sampled_from(
                [0, 1, hsize - 1, hsize, hsize + 1, fmt.max_body, fmt.max_body + 1, lmax, lmax - 1, 1 << 31]
            ).filter(lambda n: 0 <= n <= lmax)
        )
        out += _raw_header(fmt, length, values) + draw(st.binary(max_size=30))
    if draw(st.booleans()) and out:
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


def _splits(draw: Callable[[st.SearchStrategy[Any]], Any], data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks, last = [], 0
    for cut in [*cuts, len(data)]:
        chunks.append(data[last:cut])
        last = cut
    return chunks


def _wrap(kind: str, chunk: bytes) -> Any:
    if kind == "bytearray":
        return bytearray(chunk)
    if kind == "memoryview":
        return memoryview(chunk)
    if kind == "mv-of-bytearray":
        return memoryview(bytearray(chunk))
    return chunk


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """What a call did, comparably: its result, or its exception's type, message and attributes."""
    try:
        result = call()
    except Exception as exc:
        return "raised", (type(exc), str(exc), exc.args, dict(vars(exc)))
    return "returned", _comparable(result)


def _comparable(value: Any) -> Any:
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, Message):
        return ("Message", bytes(value), value.header)
    return (type(value), value)


def _state(dec: FrameDecoder) -> tuple[Any, ...]:
    err = dec.error
    error = None if err is None else (type(err), str(err), dict(vars(err)))
    return dec.buffered, dec.in_frame, error, bytes(dec._buf), dec._need if err is None else None


def _feed(dec: FrameDecoder, chunk: Any, span: bool) -> Any:
    return dec.feed_span(chunk) if span else dec.feed(chunk)


def _compare_decoders(fmt: FrameFormat, chunks: list[bytes], kind: str, span: bool) -> None:
    native_fmt, pure_fmt = twins(fmt)
    native, pure = FrameDecoder(native_fmt), FrameDecoder(pure_fmt)
    assert native._native is not None and pure._native is None
    for chunk in chunks:
        a = _outcome(functools.partial(_feed, native, _wrap(kind, chunk), span))
        b = _outcome(functools.partial(_feed, pure, _wrap(kind, chunk), span))
        assert a == b
        assert _state(native) == _state(pure)
    assert _outcome(native.eof) == _outcome(pure.eof)


@native_only
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decoders_agree(data: st.DataObject) -> None:
    """feed() and feed_span() give the same frames, errors and state after every chunk, both ways."""
    fmt = data.draw(formats())
    stream = data.draw(streams(fmt))
    chunks = _splits(data.draw, stream)
    kind = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview", "mv-of-bytearray"]))
    _compare_decoders(fmt, chunks, kind, span=data.draw(st.booleans()))


@native_only
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_decoders_agree_byte_at_a_time(data: st.DataObject) -> None:
    """One byte at a time, too (the unfinished-frame bookkeeping at every offset)."""
    fmt = data.draw(formats())
    stream = data.draw(streams(fmt))
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    _compare_decoders(fmt, chunks, "bytes", span=data.draw(st.booleans()))


@native_only
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_encoders_agree(data: st.DataObject) -> None:
    """encode_header/encode_parts/encode give the same bytes or the same exception."""
    fmt = data.draw(formats())
    native, pure = twins(fmt)
    names = fmt.field_names
    value = st.one_of(
        st.integers(-(1 << 65), 1 << 65),
        st.sampled_from([0, -1, 127, 128, 255, 256, 65535, 65536, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
        st.just(True),
        st.just(1.5),
        st.just("3"),
    )
    header: Any = data.draw(
        st.one_of(
            st.none(),
            st.dictionaries(st.sampled_from([*names, "zz"]) if names else st.just("zz"), value, max_size=4),
            st.dictionaries(st.sampled_from(names), st.integers(0, 100), max_size=4) if names else st.none(),
        )
    )
    lmax = (1 << (8 * fmt.length_size)) - 1
    size = data.draw(
        st.one_of(
            st.integers(0, 300),
            st.sampled_from([fmt.max_body, fmt.max_body + 1, lmax, lmax + 1, 1 << 64, -1, -(1 << 70)]),
            st.just(True),
        )
    )
    assert _outcome(lambda: native.encode_header(size, header)) == _outcome(
        lambda: pure.encode_header(size, header)
    )
    body_bytes = data.draw(st.binary(max_size=300))
    body: Any = data.draw(
        st.sampled_from(
            [
                body_bytes,
                bytearray(body_bytes),
                memoryview(body_bytes),
                Message(body_bytes, {n: 1 for n in names}),
                "text",
                12,
            ]
        )
    )
    for call in ("encode_parts", "encode"):
        a = _outcome(functools.partial(getattr(native, call), body, header))
        b = _outcome(functools.partial(getattr(pure, call), body, header))
        assert a == b
        assert _outcome(functools.partial(getattr(native, call), body)) == _outcome(
            functools.partial(getattr(pure, call), body)
        )


@native_only
def test_edge_lengths_near_2_64() -> None:
    """An unlimited 8-byte format: a length near 2**64 is an unfinished frame, needing exactly that much."""
    fmt = FrameFormat(length_size=8, max_size=None)
    for length in ((1 << 64) - 1, (1 << 64) - 9, 1 << 63):
        _compare_decoders(fmt, [struct.pack(">Q", length), b"x" * 10], "bytes", span=False)
        _compare_decoders(fmt, [struct.pack(">Q", length) + b"abc"], "memoryview", span=True)
        dec = FrameDecoder(fmt)
        assert dec.feed(struct.pack(">Q", length)) == []
        assert dec._need == 8 + length
    fmt = FrameFormat(length_size=8, length_includes_header=True, max_size=None)
    for length in ((1 << 64) - 1, 0, 7, 8):
        _compare_decoders(fmt, [struct.pack(">Q", length) + b"ab"], "bytes", span=False)


@native_only
def test_good_frames_before_a_bad_header_are_delivered_then_raised() -> None:
    """The frames before a bad header come first; the error is raised by the next call."""
    fmt = FrameFormat(length_size=2, max_size=5)
    stream = b"\x00\x02hi\x00\x03abc\x00\x09"
    for span in (False, True):
        _compare_decoders(fmt, [stream, b"more"], "bytes", span=span)
        dec = FrameDecoder(fmt)
        got = dec.feed_span(stream) if span else dec.feed(stream)
        assert got == ((2, b"\x00\x02hi\x00\x03abc") if span else [b"hi", b"abc"])
        assert dec.error is not None and dec.error.args == MessageTooLarge(9, 5).args


def test_formats_beyond_the_native_limits_keep_to_the_reference() -> None:
    """A header with more fields than the native codec holds still decodes (by the reference)."""
    names = [f"f{i}" for i in range(40)]
    fmt = FrameFormat(fields_after=tuple(HeaderField(n, "B") for n in names))
    assert fmt._native is None
    frame = fmt.encode(b"body", {n: i for i, n in enumerate(names)})
    [message] = fmt.decoder().feed(frame)
    assert message == b"body" and message.header["f39"] == 39


def test_native_codec_is_chosen_at_import() -> None:
    """With the extension in use, the methods are the native ones; without, the reference ones."""
    native = extensions.speedups is not None
    assert (FrameDecoder.feed is framing._native_feed) is native
    assert (FrameFormat.encode_parts is framing._native_encode_parts) is native
    assert FrameDecoder.feed.__doc__ == framing._reference_feed.__doc__


def test_extension_is_built_where_a_compiler_exists() -> None:
    """CI must not lose the extension silently: with gcc here and not disabled, _speedups imports."""
    if os.environ.get("MSGSOCK_NO_EXTENSIONS") == "1":
        pytest.skip("MSGSOCK_NO_EXTENSIONS=1: the pure-Python fallback is under test")
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here: the pure-Python fallback is what installs")
    assert extensions.speedups is not None, f"msgsock._speedups is not built: {extensions.reason('speedups')}"
    assert extensions.ENABLED
    assert extensions.describe().startswith("native: speedups")


def _run(code: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MSGSOCK_NO_EXTENSIONS"}
    env.update(env_extra)
    return subprocess.run(code, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_no_extensions_env_forces_pure_python() -> None:
    """MSGSOCK_NO_EXTENSIONS=1 gives pure Python, and ``msgsock --version`` says so."""
    probe = (
        "import msgsock.extensions as e, msgsock.framing as f;"
        "print(e.speedups, e.engine, e.ENABLED, f.FrameDecoder.feed is f._reference_feed);"
        "print(e.describe())"
    )
    done = _run([sys.executable, "-c", probe], {"MSGSOCK_NO_EXTENSIONS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["None None False True", "pure Python: MSGSOCK_NO_EXTENSIONS=1"]
    version = _run([sys.executable, "-m", "msgsock", "--version"], {"MSGSOCK_NO_EXTENSIONS": "1"})
    assert version.returncode == 0, version.stderr
    assert "pure Python: MSGSOCK_NO_EXTENSIONS=1" in version.stdout


@native_only
def test_version_says_native() -> None:
    """Without the switch, ``msgsock --version`` names the native parts in use."""
    version = _run([sys.executable, "-m", "msgsock", "--version"], {})
    assert version.returncode == 0, version.stderr
    assert "(native: speedups" in version.stdout


def test_reason_refuses_unknown_names() -> None:
    """extensions.reason() names the extensions it knows."""
    with pytest.raises(ValueError, match="unknown extension"):
        extensions.reason("turbo")


def _odd_inputs() -> list[Any]:
    import array

    frame = framing.DEFAULT_FORMAT.encode(b"abcd") * 2
    released = memoryview(frame)
    released.release()
    return [
        memoryview(frame)[::2],
        memoryview(frame).cast("I"),
        memoryview(frame).cast("c"),
        memoryview(frame).cast("B", (2, len(frame) // 2)),
        array.array("B", frame),
        released,
        "text",
        12,
        None,
    ]


@native_only
@pytest.mark.parametrize("index", range(9))
@pytest.mark.parametrize("span", [False, True])
@pytest.mark.parametrize("buffered", [False, True])
def test_odd_inputs_agree(index: int, span: bool, buffered: bool) -> None:
    """Inputs the C code declines (strided, cast, released views, arrays, str) behave as in the reference."""
    fmt = FrameFormat(fields_after=(HeaderField("k", "B"),)) if index % 2 else FrameFormat()
    native, pure = twins(fmt)
    decoders = FrameDecoder(native), FrameDecoder(pure)
    if buffered:
        for dec in decoders:
            dec.feed(b"\x00")
    outcomes = [_outcome(functools.partial(_feed, dec, _odd_inputs()[index], span)) for dec in decoders]
    assert outcomes[0] == outcomes[1]
    assert _state(decoders[0]) == _state(decoders[1])
