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
    EndKind,
    EndOfData,
    FrameError,
    HandshakeError,
    IncompleteMessage,
    InvalidFormat,
    InvalidState,
    MessageTooLarge,
    MsgsockError,
    OversizeMessage,
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
    OversizeMessage: MsgsockError,
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
    """__all__ lists every exception and EndKind, and the package re-exports each one."""
    assert set(exceptions.__all__) == {c.__name__ for c in TREE} | {"MsgsockError", "EndKind"}
    for name in exceptions.__all__:
        assert getattr(msgsock, name) is getattr(exceptions, name)
        assert name in msgsock.__all__


def test_standard_bases() -> None:
    """InvalidFormat and OversizeMessage are also ValueErrors and Timeout a TimeoutError, so generic handlers catch them."""
    assert issubclass(InvalidFormat, ValueError)
    assert issubclass(OversizeMessage, ValueError)
    assert issubclass(Timeout, TimeoutError)
    assert not issubclass(ProtocolError, OSError)
    assert not issubclass(OversizeMessage, ProtocolError)  # our mistake, not the peer's


def test_oversize_message_fields() -> None:
    """OversizeMessage carries size and max_size and says it is this side's message that cannot be sent."""
    exc = OversizeMessage(17, 16)
    assert (exc.size, exc.max_size) == (17, 16)
    assert str(exc) == "cannot send a message of 17 bytes: the frame allows at most 16"


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
    """ConnectionClosed carries clean, reason and kind and says how it closed."""
    assert str(ConnectionClosed(True)) == "connection closed cleanly"
    exc = ConnectionClosed(False, "reset by peer", EndKind.RESET)
    assert (exc.clean, exc.reason, exc.kind) == (False, "reset by peer", EndKind.RESET)
    assert str(exc) == "connection closed abnormally: reset by peer"


def test_connection_closed_kind_defaults() -> None:
    """Without a kind, a clean close is CLEAN and any other an OS_ERROR."""
    assert ConnectionClosed(True).kind is EndKind.CLEAN
    assert ConnectionClosed(False, "x").kind is EndKind.OS_ERROR


def test_end_kind_values_are_the_summary_names() -> None:
    """Each EndKind's value is the short name the servers' summaries count under."""
    assert {kind.name: kind.value for kind in EndKind} == {
        "CLEAN": "clean",
        "HEALTH_CHECK": "health check",
        "SHUTDOWN": "shutdown",
        "ABORTED": "aborted",
        "REJECTED": "rejected",
        "RESET": "reset",
        "INCOMPLETE_MESSAGE": "incomplete message",
        "MESSAGE_TOO_LARGE": "message too large",
        "FRAME_ERROR": "frame error",
        "IDLE_TIMEOUT": "idle timeout",
        "MESSAGE_TIMEOUT": "message timeout",
        "HANDSHAKE_TIMEOUT": "handshake timeout",
        "CLOSE_TIMEOUT": "close timeout",
        "SHUTDOWN_DEADLINE": "shutdown deadline",
        "HANDLER_ERROR": "handler error",
        "PROXY_PROTOCOL": "proxy protocol",
        "TLS": "tls",
        "AUTHENTICATION": "authentication",
        "OS_ERROR": "os error",
    }


def test_end_kind_properties() -> None:
    """Only clean ends and health checks are clean; clean, health check, shutdown and abort are no errors; SPEC §5.0's resets."""
    assert {k for k in EndKind if k.clean} == {EndKind.CLEAN, EndKind.HEALTH_CHECK}
    assert {k for k in EndKind if not k.is_error} == {
        EndKind.CLEAN,
        EndKind.HEALTH_CHECK,
        EndKind.SHUTDOWN,
        EndKind.ABORTED,
    }
    assert {k for k in EndKind if k.resets} == {
        EndKind.ABORTED,
        EndKind.REJECTED,
        EndKind.HANDLER_ERROR,
        EndKind.IDLE_TIMEOUT,
        EndKind.MESSAGE_TIMEOUT,
        EndKind.HANDSHAKE_TIMEOUT,
        EndKind.CLOSE_TIMEOUT,
        EndKind.SHUTDOWN_DEADLINE,
        EndKind.SHUTDOWN,
    }
    # A peer's protocol error and a failed stage flush what is owed (a TLS alert, the rejection byte) first.
    assert not any(k.resets for k in (EndKind.MESSAGE_TOO_LARGE, EndKind.TLS, EndKind.AUTHENTICATION))


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
    ConnectionClosed(False, "idle timeout: nothing received for 1 s", EndKind.IDLE_TIMEOUT),
    OversizeMessage(17, 16),
    Timeout("receive timed out after 1.0 s"),
]


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: f"{type(e).__name__}")
def test_pickle_round_trip(exc: Exception) -> None:
    """Every exception survives pickling (worker processes report errors) with its type, fields and message."""
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert vars(copy) == vars(exc)
