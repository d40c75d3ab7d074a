"""Reading a JSON request body: 415 for the wrong content type, 400 for malformed JSON, 422
(naming each bad field) for a body the schema rejects, or one holding NaN, Infinity or a
number past a float's range (``1e400``). The size limit (413) is Flask's
``MAX_CONTENT_LENGTH``, enforced while the body is read here.


A hot route's schema can be wrapped in :class:`FastLoad`: a body its checks accept is built
without marshmallow's machinery, anything else goes through ``schema.load`` as before (so every
422 is marshmallow's, word for word).
"""

from __future__ import annotations

import io
import json
import math
import threading
from typing import Any

import marshmallow as ma
from flask import Request
from marshmallow import fields as mf
from marshmallow import validate as mv
from werkzeug.exceptions import UnsupportedMediaType
from werkzeug.wsgi import get_content_length

from app.errors import BadRequest, ValidationFailed
from app.flask_context import current_request, this_app


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


class _Odd(threading.local):
    """Per thread: how many NaN/Infinity/out-of-range numbers the body being parsed held."""

    count = 0


_ODD = _Odd()


def _constant(text: str) -> NonFinite:
    _ODD.count += 1
    return NonFinite(text)


def _number(text: str) -> float | NonFinite:
    value = _finite_float(text)
    if isinstance(value, NonFinite):
        _ODD.count += 1
    return value


def _integer(text: str) -> int | NonFinite:
    if len(text) > 309:  # past any float (and int() refuses 4,300 digits outright)
        _ODD.count += 1
        return NonFinite(text)
    return int(text)


#: Built once: json.loads builds a decoder per call when given any hook.
_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_number, parse_int=_integer)


def request_body(req: Request) -> bytes:
    """The body's bytes, as ``req.get_data()`` reads them. A whole body already in memory
    (an ``io.BytesIO`` holding exactly ``Content-Length`` bytes, within ``MAX_CONTENT_LENGTH``:
    what app.http_worker and Flask's test client hand over) is read directly; werkzeug's
    guarded stream costs ~45k interpreter instructions per request (a LimitedStream read
    through io.RawIOBase in Python) for the same bytes. The stream is left where it was, so
    a later ``get_data()`` reads them again. Anything else (no or a chunked length, a body over
    the limit or not the length announced, another stream) is werkzeug's to read and refuse
    (413, 400). The limit is the app's ``MAX_CONTENT_LENGTH``: no view here sets
    ``request.max_content_length``."""
    environ = req.environ
    stream = environ.get("wsgi.input")
    if type(stream) is io.BytesIO:
        length = get_content_length(environ)
        limit = this_app().config["MAX_CONTENT_LENGTH"]
        if length is not None and (limit is None or length <= limit):
            start = stream.tell()
            data = stream.read()
            stream.seek(start)
            if len(data) == length:
                return data
    return req.get_data(cache=True)


def _mimetype(req: Request) -> str:
    # ``req.mimetype`` parses the header (~10k instructions); the usual one needs no parsing
    if req.environ.get("CONTENT_TYPE") == "application/json":
        return "application/json"
    return req.mimetype


def raw_json() -> Any:
    """The decoded body, or None when there is none."""
    return _decoded(current_request())[1]


def _decoded(req: Request) -> tuple[bytes, Any]:
    """The body's bytes and the body they decode to (None for no bytes)."""
    data = request_body(req)
    if data or req.environ.get("CONTENT_TYPE"):
        mimetype = _mimetype(req)
        if (data or mimetype) and not _is_json(mimetype):  # no body, no type: fine
            raise UnsupportedMediaType("Content-Type must be application/json")
    if not data:
        return data, None
    _ODD.count = 0
    try:
        # what json.loads does with bytes: UTF-8, -16 or -32, told apart as RFC 8259 says
        text = data.decode(json.detect_encoding(data), "surrogatepass")
        body = _DECODER.decode(text)
        # NaN/Infinity are not JSON numbers, 1e400 has no float: 422 naming each field
        details = _non_finite_paths(body) if _ODD.count else None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    if details:
        raise ValidationFailed(
            "invalid request body: " + ", ".join(sorted(details)) + " must be finite numbers",
            details=details,
        )
    return data, body


def load(schema: ma.Schema, *, empty: Any = None) -> dict[str, Any]:
    """Validate the body with ``schema``; a missing body counts as ``empty`` (default ``{}``).
    A body of JSON ``null`` is not a missing body: the schema rejects it (422)."""
    data, body = _decoded(current_request())
    if body is None and not data:
        body = {} if empty is None else empty
    try:
        return schema.load(body)
    except ma.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        fields = ", ".join(sorted(str(k) for k in messages))
        raise ValidationFailed(f"invalid request body: {fields}", details=messages) from None


_MISSING = object()


class FastLoad:
    """``schema.load`` for a hot route, cheaper for a body that passes: the same field objects
    check it (each field's own validators, called in order), without the schema and field
    call layers. Anything the plan does not clear (a wrong type, a null, an unknown or missing
    required field, a failed check) is loaded by ``schema.load``, so errors are unchanged and
    the two results are equal (tests/test_request_path.py compares them on many bodies).

    Only for schemas made of ``String``/``Integer(strict=True)``/``List``/``Dict(keys=String)``
    fields with no schema or field hooks (pre/post_load, validates_schema): the plan runs
    validators, nothing else. A field of another kind makes any body holding it go the slow
    way.
    """

    def __init__(self, schema: ma.Schema):
        self.schema = schema
        self.fields = schema.fields
        if schema.opts.unknown != ma.RAISE:
            raise ValueError("FastLoad needs unknown = RAISE")  # an unknown key is a 422
        hooks = schema_hooks(schema)
        if hooks:
            raise ValueError(
                f"FastLoad would skip {type(schema).__name__}'s hooks {hooks}: load it with "
                "the schema itself"
            )
        # (name, check, required, default): check(value) -> the loaded value or _MISSING
        self._plan = [
            (name, _check(f), f.required, f.load_default) for name, f in schema.load_fields.items()
        ]
        self._names = frozenset(schema.load_fields)

    def load(self, data: Any) -> dict[str, Any]:
        out = self._fast(data) if type(data) is dict else None
        return self.schema.load(data) if out is None else out

    def _fast(self, data: dict) -> dict[str, Any] | None:
        if not self._names.issuperset(data):
            return None
        out = {}
        for name, check, required, default in self._plan:
            value = data.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    return None
                if default is not ma.missing:
                    out[name] = default() if callable(default) else default
                continue
            value = check(value)
            if value is _MISSING:
                return None
            out[name] = value
        return out


def schema_hooks(schema: ma.Schema) -> list[str]:
    """The methods marshmallow runs around or beside the fields on load or dump (pre_load,
    post_load, validates, validates_schema, pre_dump, post_dump) that ``schema`` declares.

    marshmallow has no public way to list them: this reads its private ``Schema._hooks``
    (tag -> [(method name, pass_many, kwargs)]), here only; the canary
    tests/test_dependency_internals.py::test_canary_marshmallow_hooks_are_where_fastload_reads_them
    fails, naming it, when an upgrade moves it."""
    return sorted(name for entries in type(schema)._hooks.values() for name, *_ in entries)


def _never(value: Any) -> Any:
    return _MISSING


def _str(value: Any) -> Any:
    return value if type(value) is str else _MISSING


def _int(value: Any) -> Any:
    return value if type(value) is int else _MISSING  # not a bool: type(True) is bool


def _plain_subclass(kind: type, base: type) -> bool:
    """``kind`` is ``base`` or a subclass that changes none of its loading (StrictStr)."""
    if not issubclass(kind, base):
        return False
    mro = kind.__mro__
    return not any(
        name in cls.__dict__
        for cls in mro[: mro.index(base)]
        for name in ("deserialize", "_deserialize", "_validated", "_validate")
    )


def _check(field: mf.Field):
    """The fast check of one field: the loaded value (what marshmallow's deserialize returns
    for it), or _MISSING when marshmallow must decide."""
    if (
        field.data_key is not None
        or field.attribute is not None
        or field.pre_load
        or field.post_load
    ):
        return _never
    validators = tuple(field.validators)
    allow_none = field.allow_none
    kind = type(field)
    if _plain_subclass(kind, mf.String):
        load = _str
    elif _plain_subclass(kind, mf.Integer) and field.strict:
        load = _int
    elif kind is mf.List:
        item = _check(field.inner)
        if item is _never:
            return _never

        def load(value: Any) -> Any:
            if type(value) is not list:
                return _MISSING
            out = []
            for each in value:
                each = item(each)
                if each is _MISSING:
                    return _MISSING
                out.append(each)
            return out
    elif (
        kind is mf.Dict
        and field.value_field is None
        and _plain_subclass(type(field.key_field), mf.String)
        and not field.key_field.validators
    ):

        def load(value: Any) -> Any:
            if type(value) is not dict or any(type(k) is not str for k in value):
                return _MISSING
            return dict(value)
    else:
        return _never

    def check(value: Any) -> Any:
        if value is None:
            return None if allow_none else _MISSING
        value = load(value)
        if value is _MISSING:
            return _MISSING
        try:
            for validate in validators:
                # as marshmallow's And: a plain function may also say no by returning False
                if validate(value) is False and not isinstance(validate, mv.Validator):
                    return _MISSING
        except ma.ValidationError:
            return _MISSING
        return value

    return check
