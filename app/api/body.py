"""Reading a JSON request body: 415 for the wrong content type, 400 for malformed JSON, 422
(naming each bad field) for a body the schema rejects, or one holding NaN, Infinity or a
number past a float's range (``1e400``). The size limit (413) is Flask's
``MAX_CONTENT_LENGTH``, enforced while the body is read here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import marshmallow as ma
from flask import request
from werkzeug.exceptions import UnsupportedMediaType

from app.errors import BadRequest, ValidationFailed


class NonFinite:
    """Stands in for NaN, Infinity, -Infinity and numbers past a float's range (1e400) while
    the body is parsed, so the 422 that follows can name the field that held one."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text[:40]

    def __repr__(self) -> str:
        return self.text


def _finite_float(text: str) -> float | NonFinite:
    value = float(text)
    return NonFinite(text) if math.isinf(value) else value


def _non_finite_paths(value: Any, path: str = "") -> dict[str, list[str]]:
    """``{"workload_data.batch_size": ["a finite number, got NaN"]}`` for each NonFinite."""
    if isinstance(value, NonFinite):
        return {path or "_schema": [f"a finite number, got {value.text}"]}
    out: dict[str, list[str]] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(_non_finite_paths(item, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(_non_finite_paths(item, f"{path}[{i}]"))
    return out


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def raw_json() -> Any:
    """The decoded body, or None when there is none."""
    data = request.get_data(cache=True)
    if (data or request.mimetype) and not _is_json(request.mimetype):  # no body, no type: fine
        raise UnsupportedMediaType("Content-Type must be application/json")
    if not data:
        return None
    odd = []

    def constant(text: str) -> NonFinite:
        odd.append(text)
        return NonFinite(text)

    def number(text: str) -> float | NonFinite:
        value = _finite_float(text)
        if isinstance(value, NonFinite):
            odd.append(text)
        return value

    def integer(text: str) -> int | NonFinite:
        if len(text) > 309:  # past any float (and int() refuses 4,300 digits outright)
            odd.append(text)
            return NonFinite(text)
        return int(text)

    try:
        body = json.loads(data, parse_constant=constant, parse_float=number, parse_int=integer)
        # NaN/Infinity are not JSON numbers, 1e400 has no float: 422 naming each field
        details = _non_finite_paths(body) if odd else None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    if details:
        raise ValidationFailed(
            "invalid request body: " + ", ".join(sorted(details)) + " must be finite numbers",
            details=details,
        )
    return body


def load(schema: ma.Schema, *, empty: Any = None) -> dict[str, Any]:
    """Validate the body with ``schema``; a missing body counts as ``empty`` (default ``{}``).
    A body of JSON ``null`` is not a missing body: the schema rejects it (422)."""
    body = raw_json()
    if body is None and not request.get_data(cache=True):
        body = {} if empty is None else empty
    try:
        return schema.load(body)
    except ma.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        fields = ", ".join(sorted(str(k) for k in messages))
        raise ValidationFailed(f"invalid request body: {fields}", details=messages) from None
