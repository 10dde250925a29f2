"""Tests of the exception tree (exceptions.py; STYLE §4)."""

from __future__ import annotations

import pickle

import pytest

import msgsock
from msgsock import exceptions
from msgsock.exceptions import (
    ArchiveError,
    Cancelled,
    ConcurrencyError,
    ConnectionClosed,
    EndOfData,
    FrameError,
    HandshakeError,
    IncompleteMessage,
    InvalidFormat,
    InvalidState,
    MessageTooLarge,
    MsgsockError,
    ProtocolError,
    ProxyProtocolError,
    Timeout,
)

TREE: dict[type[Exception], type[Exception]] = {
    ProtocolError: MsgsockError,
    MessageTooLarge: ProtocolError,
    FrameError: ProtocolError,
    IncompleteMessage: ProtocolError,
    ArchiveError: ProtocolError,
    EndOfData: ArchiveError,
    HandshakeError: ProtocolError,
    ProxyProtocolError: ProtocolError,
    InvalidFormat: MsgsockError,
    InvalidState: MsgsockError,
    ConcurrencyError: MsgsockError,
    Cancelled: MsgsockError,
    ConnectionClosed: MsgsockError,
    Timeout: MsgsockError,
}


@pytest.mark.parametrize(("cls", "parent"), TREE.items(), ids=[c.__name__ for c in TREE])
def test_tree(cls: type[Exception], parent: type[Exception]) -> None:
    """Each exception sits under the parent drawn in the module docstring."""
    assert cls.__bases__[0] is parent
    assert cls.__name__ in (exceptions.__doc__ or "")


def test_all_is_complete_and_reexported() -> None:
    """__all__ lists every exception, and the package re-exports each one."""
    assert set(exceptions.__all__) == {c.__name__ for c in TREE} | {"MsgsockError"}
    for name in exceptions.__all__:
        assert getattr(msgsock, name) is getattr(exceptions, name)
        assert name in msgsock.__all__


def test_standard_bases() -> None:
    """InvalidFormat is also a ValueError and Timeout also a TimeoutError, so generic handlers catch them."""
    assert issubclass(InvalidFormat, ValueError)
    assert issubclass(Timeout, TimeoutError)
    assert not issubclass(ProtocolError, OSError)


def test_message_too_large_fields() -> None:
    """MessageTooLarge carries size and max_size and names both values."""
    exc = MessageTooLarge(4294967295, 16777216)
    assert (exc.size, exc.max_size) == (4294967295, 16777216)
    assert str(exc) == "message size 4294967295 exceeds max_size 16777216"


def test_incomplete_message_fields() -> None:
    """IncompleteMessage carries received/expected and names them, with or without a known total."""
    exc = IncompleteMessage(7, 14)
    assert (exc.received, exc.expected) == (7, 14)
    assert "7" in str(exc) and "14" in str(exc)
    short = IncompleteMessage(2, None)
    assert short.expected is None
    assert "2 bytes" in str(short)


def test_archive_error_fields() -> None:
    """ArchiveError and EndOfData carry the offset and say it in the message."""
    exc = EndOfData("expected 4 bytes for DWORD, got 2", 10)
    assert exc.offset == 10
    assert str(exc) == "expected 4 bytes for DWORD, got 2 at offset 10"
    assert isinstance(exc, ArchiveError)


def test_connection_closed_fields() -> None:
    """ConnectionClosed carries clean and reason and says how it closed."""
    assert str(ConnectionClosed(True)) == "connection closed cleanly"
    exc = ConnectionClosed(False, "reset by peer")
    assert (exc.clean, exc.reason) == (False, "reset by peer")
    assert str(exc) == "connection closed abnormally: reset by peer"


EXAMPLES: list[Exception] = [
    MsgsockError("base"),
    ProtocolError("bad bytes"),
    MessageTooLarge(17, 16),
    FrameError("frame length 3 is smaller than the 4-byte header"),
    IncompleteMessage(3, None),
    IncompleteMessage(5, 9),
    ArchiveError("undecodable string", 12),
    ArchiveError("text mentioning at offset 3 itself", 99),
    EndOfData("expected 8 bytes for double, got 0", 4),
    HandshakeError("digest mismatch"),
    ProxyProtocolError("bad signature"),
    InvalidFormat("bad part 'x'"),
    InvalidState("send after close"),
    ConcurrencyError("two receives"),
    Cancelled("cancelled"),
    ConnectionClosed(True),
    ConnectionClosed(False, "reset"),
    Timeout("receive timed out after 1.0 s"),
]


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: f"{type(e).__name__}")
def test_pickle_round_trip(exc: Exception) -> None:
    """Every exception survives pickling (worker processes report errors) with its type, fields and message."""
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert vars(copy) == vars(exc)
