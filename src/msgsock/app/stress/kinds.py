"""What ``msgsock stress`` counts: the kinds of error, and how each connection end counts.

The report's kinds are fixed (``ERROR_KINDS``, the keys of the JSON report's ``errors``);
how a connection ended is decided by the sans-I/O core as an
:class:`~msgsock.exceptions.EndKind`, and :func:`_report_kind` says under which kind of
the report it counts.  Connections that are **refused**, **timeout** while connecting,
fail **tls** or **auth**, are **closed** (EOF) or **reset** by the server mid-run, or
send bytes that break the frame format (**protocol**) are counted per connection; the
messages they still owed are **aborted**.  Every kind is counted separately; any of
them makes the exit status 1.
"""

from __future__ import annotations

from ...exceptions import EndKind

__all__ = ["ERROR_KINDS"]

ERROR_KINDS = (
    "lost",
    "duplicated",
    "reordered",
    "corrupted",
    "aborted",
    "refused",
    "timeout",
    "tls",
    "auth",
    "closed",
    "reset",
    "protocol",
)
"""Every kind of error the stress tool counts, in report order (keys of ``errors``)."""

_ERROR_TEXT = {
    "lost": ("message", "lost: no reply within {timeout:g} s"),
    "duplicated": ("message", "duplicated: the same reply arrived again"),
    "reordered": ("message", "reordered: the reply arrived after a later message's"),
    "corrupted": ("message", "corrupted: the reply differs from what was sent"),
    "aborted": ("message", "aborted: still owed a reply when its connection ended"),
    "refused": ("connection", "refused"),
    "timeout": ("connection", "timed out while connecting (--timeout {timeout:g} s)"),
    "tls": ("connection", "failed TLS"),
    "auth": ("connection", "failed authentication"),
    "closed": ("connection", "closed by the server before the end of the run"),
    "reset": ("connection", "reset (or failed with a socket error) during the run"),
    "protocol": ("connection", "broke the frame format (the server sent a bad frame header)"),
}
"""The report's wording of each kind: (the noun it counts, what happened to it)."""

_REPORT_KIND = {
    EndKind.CLEAN: "closed",
    EndKind.INCOMPLETE_MESSAGE: "closed",
    EndKind.RESET: "reset",
    EndKind.OS_ERROR: "reset",
    EndKind.MESSAGE_TOO_LARGE: "protocol",
    EndKind.FRAME_ERROR: "protocol",
    EndKind.TLS: "tls",
    EndKind.AUTHENTICATION: "auth",
    EndKind.HANDSHAKE_TIMEOUT: "timeout",
}
"""The report's kind (``ERROR_KINDS``) of each way a connection can end (the core's
:class:`~msgsock.exceptions.EndKind`); any other end of the server's counts as **reset**."""


def _report_kind(kind: EndKind) -> str:
    """The report's kind under which a connection that ended as ``kind`` counts.

    Args:
        kind: how the core says the connection ended.

    Returns:
        One of ``ERROR_KINDS``.
    """
    return _REPORT_KIND.get(kind, "reset")
