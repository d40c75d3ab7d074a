"""The allocate/release request path's shortcuts (issue 13 part 3) give what the long way
gave: app.api.body.FastLoad loads the allocate and release bodies to exactly what marshmallow
loads (and every body marshmallow refuses is refused with marshmallow's own messages), and
app.timefmt.iso writes the same text. tests/test_api_answers.py checks the whole answers."""

from __future__ import annotations

import io
import itertools
import random

import marshmallow as ma
import pytest

from app import schemas
from app.api import gpu
from app.api.body import FastLoad
from app.request_rules import FIELDS
from tests.api_support import app, client, clock, make_app  # noqa: F401

ALLOCATE = schemas.AllocateRequestSchema()
RELEASE = schemas.ReleaseRequestSchema()

#: Values each field is tried with: the edges of its rule, wrong types, null.
ODD = [None, True, False, 0, -1, 1.0, 1.5, "", "x", [], {}, ["a"], [1], {"a": 1}, "a\n", " "]


def _edges(name: str) -> list:
    rule = FIELDS.get(name)
    out = list(ODD)
    if rule is None:
        return out
    if rule.kind == "int":
        lo, hi = rule.lo, rule.hi
        out += [lo, hi, lo - 1, hi + 1, int(lo), int(hi), float(hi)]
    if rule.kind == "str":
        n = rule.max_len or 10
        out += ["a" * n, "a" * (n + 1), "svc-1", "svc:1", "svc 1", "é"]
        out += list(rule.choices or ())
    if rule.kind == "list":
        n = rule.max_len or 3
        out += [["svc-1"] * n, ["svc-1"] * (n + 1), [0, 1], [4095, 4096], ["node-a", "b|c"]]
        out += [["svc-1", None], [True], [list(FIELDS["webhook_events"].item.choices or ())]]
        out += [list(FIELDS["webhook_events"].item.choices or ())]
    if name == "workload_data":
        out += [{"model_size": "small"}, {"a": {"b": {"c": 1}}}, {"x": [1, 2, {"y": None}]}]
        deep: dict = {}
        cur = deep
        for _ in range(12):
            cur["d"] = {}
            cur = cur["d"]
        out += [deep, {str(i): i for i in range(1200)}]
    if name == "webhook_url":
        out += ["http://127.0.0.1:9/x", "ftp://x", "https://example.com/" + "a" * 3000]
    return out


def _same(schema: ma.Schema, body) -> bool:
    """FastLoad and marshmallow agree on ``body``; True when the fast plan loaded it itself."""
    fast = FastLoad(schema)
    try:
        want = schema.load(body)
    except ma.ValidationError as exc:
        with pytest.raises(ma.ValidationError) as got:
            fast.load(body)
        assert got.value.messages == exc.messages, body
        assert fast._fast(body) is None if isinstance(body, dict) else True
        return False
    got = fast.load(body)
    assert got == want, body
    assert list(got) == list(want), body  # same key order
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    return fast._fast(body) is not None


@pytest.mark.parametrize("name", list(ALLOCATE.fields))
def test_each_allocate_field_alone_loads_as_marshmallow_loads_it(name):
    fast_hits = 0
    for value in _edges(name):
        body = {"service_name": "svc"} if name != "service_name" else {}
        body[name] = value
        fast_hits += _same(ALLOCATE, body)
    assert fast_hits, f"no value of {name} took the fast path"


@pytest.mark.parametrize("name", list(RELEASE.fields))
def test_each_release_field_alone_loads_as_marshmallow_loads_it(name):
    assert sum(_same(RELEASE, {name: v}) for v in _edges(name))


def test_random_allocate_bodies_load_as_marshmallow_loads_them():
    rng = random.Random(13)
    names = list(ALLOCATE.fields) + ["unknown_field"]
    edges = {n: _edges(n) for n in names}
    fast = 0
    for _ in range(3000):
        body = {n: rng.choice(edges[n]) for n in rng.sample(names, rng.randint(0, 6))}
        if rng.random() < 0.7:
            body["service_name"] = rng.choice(["svc", "svc-1.a_b", "svc:1"])
        fast += _same(ALLOCATE, body)
    assert fast > 100


def test_bodies_that_are_not_objects_fail_as_before():
    for body in (None, [], "x", 1, [{"service_name": "svc"}]):
        assert not _same(ALLOCATE, body)
    for body in itertools.product(["service_name", "allocation_id"], ["svc", 1]):
        _same(RELEASE, dict([body]))


def test_the_views_use_the_fast_load():
    assert isinstance(gpu._ALLOCATE_BODY, FastLoad) and isinstance(gpu._RELEASE_BODY, FastLoad)
    assert gpu._TOP_LEVEL == tuple(ALLOCATE.fields)


def test_iso_writes_what_strftime_wrote():
    """app.timefmt.iso takes isoformat's shortcut from year 1000 on; the text is strftime's."""
    from datetime import UTC, datetime

    from app.timefmt import iso

    def by_strftime(ts):
        dt = datetime.fromtimestamp(float(ts), tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"

    rng = random.Random(7)
    values = [0, 0.0005, 0.9999, -0.5, 1767225600.5, "1767225600.123456", 253402300799.999]
    values += [-30610224000.25, -62135596800]  # years 1000 and 1
    values += [rng.uniform(-6.2e10, 2.5e11) for _ in range(20000)]
    # microseconds rounded half to even, carried into the next second (or the one before)
    whole = [0, 1, -1, 1767225599, -62135596800, 253402300799, -30610224001]
    fracs = [0.9999995, 0.99999949, 0.0000005, 0.0000015, 0.0000025, 0.9995, 0.4999995, 1e-7]
    values += [w + f for w in whole for f in fracs] + [w - f for w in whole for f in fracs]
    values += [rng.randrange(1_700_000_000, 1_800_000_000) + rng.random() for _ in range(5000)]
    for ts in values + values:  # twice: the second time through app.timefmt's second memo
        try:
            want = by_strftime(ts)
        except (ValueError, OverflowError):  # past year 9999 once rounded
            want = None
        assert iso(ts) == want, ts
    assert iso(1767225600.5) == "2026-01-01T00:00:00.500Z"
    for bad in (None, "", "x", [], float("nan"), float("inf"), -float("inf"), 1e20, 253402300800):
        assert iso(bad) is None


def test_json_response_is_jsonify_byte_for_byte():
    from flask import Flask, jsonify

    from app.api.render import json_response

    app = Flask(__name__)
    app.json.sort_keys = False
    objs = [
        {"b": 1, "a": [1.5, None, True], "é": "ü\u2028", "n": {"x": "<>&'"}},
        [],
        "x",
        {"t": 1e300, "i": 10**30},
    ]
    for debug in (False, True):
        app.debug = debug
        with app.app_context():
            for obj in objs:
                want = jsonify(obj)
                got = json_response(obj, 202)
                assert got.get_data() == want.get_data()
                assert got.status_code == 202 and got.mimetype == want.mimetype
                assert got.headers == want.headers
    app.debug = False
    app.json.mimetype = "text/x-json"  # a text type: the response class adds the charset
    with app.app_context():
        want, got = jsonify(objs[0]), json_response(objs[0])
        assert got.headers == want.headers and got.get_data() == want.get_data()
        assert got.headers["Content-Type"] == "text/x-json; charset=utf-8"
    app.json.sort_keys = True
    with app.app_context():
        assert json_response({"b": 1, "a": 2}).get_data() == b'{"a":2,"b":1}\n'


def test_the_hot_views_carry_one_doc_wrapper(client):
    """Each stacked ``@doc`` is a wrapper that runs per request; allocate and release have one
    (docs.doc_once), and their spec entries keep every response."""
    app = client.application
    for name in ("gpu.allocate", "gpu.release"):
        view = app.view_functions[name]
        assert not hasattr(view.__wrapped__, "__wrapped__"), name
    paths = client.get("/openapi.json").get_json()["paths"]
    assert list(paths["/gpu/allocate"]["post"]["responses"])[-10:] == [
        "400", "401", "409", "413", "415", "422", "429", "503", "202", "200"
    ]  # fmt: skip
    assert paths["/gpu/allocate"]["post"]["parameters"][0]["name"] == "Idempotency-Key"
    assert list(paths["/gpu/release"]["post"]["responses"])[-1] == "200"


def _with_hook(kind: str) -> type:
    """AllocateRequestSchema with one hook of ``kind`` added (a subclass: the original stays)."""
    if kind == "validates_schema":

        class Hooked(schemas.AllocateRequestSchema):
            @ma.validates_schema
            def _no_svc_x(self, data, **kwargs):
                if data.get("service_name") == "x":
                    raise ma.ValidationError("no x")

    elif kind == "pre_load":

        class Hooked(schemas.AllocateRequestSchema):
            @ma.pre_load
            def _lower(self, data, **kwargs):
                return data

    elif kind == "post_load":

        class Hooked(schemas.AllocateRequestSchema):
            @ma.post_load
            def _mark(self, data, **kwargs):
                return data

    else:

        class Hooked(schemas.AllocateRequestSchema):
            @ma.validates("service_name")
            def _svc(self, value, **kwargs):
                pass

    return Hooked


@pytest.mark.parametrize("kind", ["validates_schema", "pre_load", "post_load", "validates"])
def test_fastload_refuses_a_schema_with_a_hook(kind):
    """A hook the fast plan would skip is refused when the view module is imported, not
    skipped silently for every body the plan clears."""
    with pytest.raises(ValueError, match="hooks"):
        FastLoad(_with_hook(kind)())
    FastLoad(schemas.AllocateRequestSchema())  # no hook: fine


class _ServerStream(io.BytesIO):
    """A wsgi.input of another kind than the in-memory body (a server reading its socket)."""


def _read_both(environ: dict, limit: int | None) -> list:
    """[what body.request_body gives, what werkzeug's get_data gives] for one environ: the
    bytes, or the HTTP exception's class. After request_body werkzeug still reads the same."""
    from flask import Flask, request
    from werkzeug.exceptions import HTTPException

    from app.api.body import request_body

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limit
    out = []
    for read in (request_body, lambda req: req.get_data(cache=True)):
        env = dict(environ)
        env["wsgi.input"] = type(environ["wsgi.input"])(environ["wsgi.input"].getvalue())
        with app.test_request_context(method="POST"):
            req = request._get_current_object()
            req.environ.pop("CONTENT_LENGTH", None)
            req.environ.update(env)
            try:
                got = read(req)
            except HTTPException as exc:
                got = type(exc)
            else:
                if read is request_body:
                    assert req.get_data(cache=True) == got
        out.append(got)
    return out


@pytest.mark.parametrize("terminated", [False, True])
@pytest.mark.parametrize("limit", [None, 10])
def test_request_body_reads_what_werkzeug_reads(terminated, limit):
    """body.request_body's direct read of an in-memory body gives werkzeug's bytes, and every
    body werkzeug refuses (413 over the limit, 400 shorter than announced) is refused."""
    from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

    bodies = [b"", b"{}", b'{"a": 1}', b"x" * 10, b"x" * 11, b"\xff\xfe{", b"0123456789abc"]
    lengths = [None, "", "0", "2", "8", "10", "11", "13", "-1", "x", " 8"]
    outcomes = set()
    for data, length, kind in itertools.product(bodies, lengths, [io.BytesIO, _ServerStream]):
        env = {"wsgi.input": kind(data)}
        if length is not None:
            env["CONTENT_LENGTH"] = length
        if terminated:
            env["wsgi.input_terminated"] = True
        fast, slow = _read_both(env, limit)
        assert fast == slow, (data, length, kind, terminated, limit)
        outcomes.add(fast if isinstance(fast, type) else bool(fast))
    # a chunked body has no length: werkzeug's to read
    env = {"wsgi.input": io.BytesIO(b"{}"), "CONTENT_LENGTH": "2"}
    env["HTTP_TRANSFER_ENCODING"] = "chunked"
    fast, slow = _read_both(env, limit)
    assert fast == slow
    refused = set()
    if limit:
        refused.add(RequestEntityTooLarge)
    if not terminated:  # shorter than announced
        refused.add(ClientDisconnected)
    assert outcomes == {True, False} | refused
