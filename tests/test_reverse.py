"""The MFCAsync reverse loop, sans I/O (msgsock.app.reverse)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgsock.app.reverse import Mismatch, ReverseLoop


def test_each_verified_echo_is_sent_back_reversed() -> None:
    loop = ReverseLoop(b"abc")
    assert loop.payload == b"abc"
    assert loop.verify(b"abc") == b"cba"
    assert loop.verify(memoryview(b"cba")) == b"abc"
    assert loop.rounds == 2


def test_a_wrong_echo_names_the_round_and_both_payloads_and_leaves_the_loop() -> None:
    loop = ReverseLoop(b"abc")
    loop.verify(b"abc")
    with pytest.raises(Mismatch) as caught:
        loop.verify(b"cbx\xff")
    assert str(caught.value) == "mismatch at round 2: sent 'cba', got 'cbx\\xff'"
    assert (caught.value.round, caught.value.sent, caught.value.got) == (2, b"cba", b"cbx\xff")
    assert (loop.rounds, loop.payload) == (1, b"cba")


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=20))
def test_an_honest_echo_loop_alternates_the_payload(first: bytes, rounds: int) -> None:
    loop = ReverseLoop(first)
    for n in range(rounds):
        sent = loop.payload
        assert sent == (first if n % 2 == 0 else first[::-1])
        loop.verify(sent)
    assert loop.rounds == rounds
