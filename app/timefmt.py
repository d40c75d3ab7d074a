"""Timestamps: the engine stores epoch seconds; clients see RFC 3339 UTC strings."""
from __future__ import annotations

from datetime import datetime, timezone


def iso(ts: float | None) -> str | None:
    """``1767225600.5`` -> ``"2026-01-01T00:00:00.500Z"``; None stays None, and so does a
    time no calendar date can spell (not a number, not finite, past year 9999): a bad stored
    value must not turn a read into a 500."""
    if ts is None or ts == "":
        return None
    try:
        dt = datetime.fromtimestamp(float(ts), tz=timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
