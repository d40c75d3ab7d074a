"""Timestamps and durations: the engine stores epoch seconds; clients see RFC 3339 UTC strings;
people write durations as ``15s``, ``5m``, ``1h``. Standard library only (app.client uses it)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``15s``, ``5m``, ``1h``, ``250ms`` or a plain number of seconds; a number
    that is not finite (YAML's ``.nan`` and ``.inf``) is no duration."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(value)
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(value)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


#: Whole second -> its "YYYY-MM-DDTHH:MM:SS" (years 1000 on): a record's times fall in few
#: seconds, and formatting one costs ~3x splitting and looking it up. Emptied when full.
_SECONDS: dict[int, str] = {}
_SECONDS_MAX = 4096


def _split(t: float) -> tuple[int, int]:
    """(whole seconds, microseconds) of ``t`` exactly as ``datetime.fromtimestamp`` splits it
    (CPython's _PyTime_DoubleToDenominator: the fraction rounded half to even, as ``round``
    does, then carried into [0, 1e6)). ValueError for NaN, OverflowError for an infinity."""
    frac, whole = math.modf(t)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1.0
    elif us < 0:
        us += 1_000_000
        whole -= 1.0
    return int(whole), us


def iso(ts: float | None) -> str | None:
    """``1767225600.5`` -> ``"2026-01-01T00:00:00.500Z"``; None stays None, and so does a
    time no calendar date can spell (not a number, not finite, past year 9999): a bad stored
    value must not turn a read into a 500."""
    if ts is None or ts == "":
        return None
    try:
        sec, us = _split(float(ts))
    except (TypeError, ValueError, OverflowError):
        return None
    day = _SECONDS.get(sec)
    if day is None:
        try:
            dt = datetime.fromtimestamp(sec, tz=UTC)
        except (ValueError, OverflowError, OSError):
            return None
        if dt.year < 1000:  # strftime pads the year to 4 digits only from 1000 on
            return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{us // 1000:03d}Z"
        day = dt.isoformat()[:19]  # "...+00:00" dropped
        if len(_SECONDS) >= _SECONDS_MAX:
            _SECONDS.clear()
        _SECONDS[sec] = day
    return "%s.%03dZ" % (day, us // 1000)
