"""Message identity (``msgsock.app.stress.payload``): bodies, sizes, matchers; pure and in process."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from msgsock.app.stress import StressConfig, _first_difference
from msgsock.app.stress.payload import _ID_SIZE, _Payloads
from msgsock.framing import FrameFormat, Message

SEQS = st.integers(min_value=0, max_value=2**40)
CIDS = st.integers(min_value=0, max_value=2**32 - 1)


def _body(p: _Payloads, cid: int, seq: int) -> bytes:
    return b"".join(p.body_parts(cid, seq, p.size_of(cid, seq)))


def test_body_starts_with_its_identity() -> None:
    """A body is seq (u64 LE), conn id (u32 LE), then the pattern at the message's offset."""
    p = _Payloads(StressConfig(size_min=40, size_max=40))
    body = _body(p, 7, 1234)
    assert body[:_ID_SIZE] == (1234).to_bytes(8, "little") + (7).to_bytes(4, "little")
    off = (1234 * 167 + 7 * 29) % 256
    assert body[_ID_SIZE:] == p.pattern[off : off + 40 - _ID_SIZE]


def test_a_body_shorter_than_its_id_keeps_the_low_bytes_of_seq() -> None:
    """Messages under 12 bytes are the first bytes of the id, so the low bytes of seq change."""
    p = _Payloads(StressConfig(size_min=3, size_max=3))
    assert _body(p, 1, 0x0A0B0C) == bytes([0x0C, 0x0B, 0x0A])


@given(cid=CIDS, seq=SEQS, seed=st.integers(min_value=0, max_value=2**32))
def test_sizes_are_deterministic_and_in_range(cid: int, seq: int, seed: int) -> None:
    """``--size MIN-MAX`` draws a size in range that depends only on (seed, conn, seq)."""
    a = _Payloads(StressConfig(size_min=0, size_max=100, seed=seed))
    b = _Payloads(StressConfig(size_min=0, size_max=100, seed=seed))
    n = a.size_of(cid, seq)
    assert 0 <= n <= 100
    assert n == b.size_of(cid, seq)


@given(
    cid=CIDS,
    seq=SEQS,
    size=st.sampled_from([(40, 40), (3, 3), (0, 100), (13, 5000), (40000, 40000)]),
    reverse=st.booleans(),
)
def test_every_matcher_accepts_exactly_the_expected_reply(
    cid: int, seq: int, size: tuple[int, int], reverse: bool
) -> None:
    """Each matcher (fixed size, tails, reverse, short) accepts the expected reply and nothing near it."""
    p = _Payloads(StressConfig(size_min=size[0], size_max=size[1], expect="reverse" if reverse else "echo"))
    match = p.matcher()
    want = p.expected(cid, seq)
    assert want == (_body(p, cid, seq)[::-1] if reverse else _body(p, cid, seq))
    assert match(want, cid, seq)
    if want:
        flipped = bytearray(want)
        flipped[len(want) // 2] ^= 0x01
        assert not match(bytes(flipped), cid, seq)
        assert not match(want[:-1], cid, seq)
    assert not match(want + b"x", cid, seq)
    if len(want) >= _ID_SIZE:  # long enough to name itself: another seq's reply is not this one
        assert not match(p.expected(cid, seq + 1), cid, seq)


def test_header_fields_are_checked_too() -> None:
    """With extra header fields the reply's fields must be those of its message."""
    frame = FrameFormat.parse("u32be+kind:B")
    p = _Payloads(StressConfig(size_min=20, size_max=20, frame=frame))
    match = p.matcher()
    body = p.expected(0, 300)
    assert p.header(300) == {"kind": 300 % 128}
    assert match(Message(body, p.header(300)), 0, 300)
    assert not match(Message(body, {"kind": 1}), 0, 300)
    assert "header fields {'kind': 1}" in p.describe(Message(body, {"kind": 1}), 0, 300)


def test_the_ring_rotated_for_a_connection_is_its_messages() -> None:
    """Message ``(seq + rotation(cid)) mod 256`` of the ring is message seq of cid, id aside."""
    p = _Payloads(StressConfig(size_min=30, size_max=30))
    head = b"\x00\x00\x00\x1e"
    ring = p.ring(head, 256)
    ml = len(head) + 30
    for cid in (0, 1, 77, 2**20 + 3):
        for seq in (0, 1, 255, 256, 1000):
            j = (seq + p.rotation(cid)) % 256
            got = ring[j * ml : (j + 1) * ml]
            assert got[: len(head)] == head
            assert got[len(head) + _ID_SIZE :] == p.expected(cid, seq)[_ID_SIZE:]


def test_describe_names_the_first_differing_byte() -> None:
    """A corruption's example names the connection, the sequence number and the first bad byte."""
    p = _Payloads(StressConfig(size_min=40, size_max=40))
    want = p.expected(2, 9)
    bad = bytearray(want)
    bad[35] ^= 0xFF
    assert (
        p.describe(bytes(bad), 2, 9) == f"conn 2 seq 9: byte 35 is 0x{bad[35]:02x}, expected 0x{want[35]:02x}"
    )
    assert p.describe(want[:5], 2, 9) == "conn 2 seq 9: reply of 5 bytes, expected 40"
    assert p.describe(want, 2, None) == "conn 2: unexpected reply of 40 bytes with nothing in flight"


@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_first_difference_is_the_first_differing_index(a: bytes, b: bytes) -> None:
    """``_first_difference`` equals the naive byte-by-byte answer for any two strings."""
    naive = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    assert _first_difference(a, b) == naive
