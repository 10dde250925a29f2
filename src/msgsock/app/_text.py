"""How the commands show message bytes on a terminal."""

from __future__ import annotations

__all__ = ["escape_text"]


def escape_text(data: bytes, limit: int | None = None) -> str:
    """Render message bytes for a terminal: UTF-8 text with every non-printable escaped.

    Args:
        data: the message body.
        limit: show at most this many characters, then ``… (N bytes)``.
    """
    text = data.decode("utf-8", "backslashreplace")
    shown = text if limit is None or len(text) <= limit else text[:limit]
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in shown)
    if shown is not text:
        escaped += f"… ({len(data)} bytes)"
    return escaped
