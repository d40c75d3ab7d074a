"""Logging: readable text by default, JSON lines on request; every line carries a request id.

The request id lives in a context variable that the API sets per request (and workers set per
job), so any logger anywhere picks it up without being passed it.

One record, one line: a client's value in a message (a path like ``/gpu/status%0A<forged>``, a
header, a service name) could otherwise start a line that reads as a record of its own. The
text format escapes control characters in the message (a newline becomes a backslash and an
``n``) and indents a traceback under its record, so in a text log only a record starts
at column 0. The JSON format is safe by construction (``json.dumps`` escapes them).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import textwrap
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, and any extras."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"

#: C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROLS.sub(_escape, text)


class TextFormatter(logging.Formatter):
    """The text format, one record per line whatever the message holds (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the escaping; it caches the traceback text on the
        # record, which another handler may have formatted already, so that is not reused.
        record.message = escape_controls(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info:
            text += "\n" + self._indented(self.formatException(record.exc_info))
        elif record.exc_text:
            text += "\n" + self._indented(record.exc_text)
        if record.stack_info:
            text += "\n" + self._indented(self.formatStack(record.stack_info))
        return text

    @staticmethod
    def _indented(text: str) -> str:
        return textwrap.indent(_CONTROLS_BUT_NEWLINE.sub(_escape, text), "  ", lambda line: True)


def setup(fmt: str = "text", level: str = "INFO", stream=None) -> None:
    """Configure the root logger once per process (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_gpu_orch", False):
            root.removeHandler(old)
    handler._gpu_orch = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
