"""Reading a JSON request body: 415 for the wrong content type, 400 for malformed JSON, 422
(naming each bad field) for a body the schema rejects. The size limit (413) is Flask's
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as inf, which no JSON answer could echo back
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/")
                                               and mimetype.endswith("+json"))


def raw_json() -> Any:
    """The decoded body, or None when there is none."""
    data = request.get_data(cache=True)
    if (data or request.mimetype) and not _is_json(request.mimetype):  # no body, no type: fine
        raise UnsupportedMediaType("Content-Type must be application/json")
    if not data:
        return None
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None


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
