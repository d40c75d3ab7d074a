"""The allocate request's limits (app/request_rules.py) hold the same over HTTP and for a
direct caller of the engine, and an HTTP request is checked once."""

from __future__ import annotations

import pytest

from app import request_rules, schemas
from app.errors import OrchestratorError, ValidationFailed
from app.request_rules import FIELDS, HINTS, Rule
from tests.api_support import allocate, clock, make_app  # noqa: F401

#: The body's fields: the limits a client meets on both paths.
BODY = tuple(n for n in FIELDS if n in schemas.AllocateRequestSchema().fields)


def _items(rule: Rule, n: int) -> list:
    """n distinct items that each pass the rule of a list's items."""
    name = rule.name
    if name == "preferred_gpus":
        return list(range(n))
    if name == "webhook_events":
        return [rule.item.choices[i % len(rule.item.choices)] for i in range(n)]
    return [f"x-{i}" for i in range(n)]  # request ids and node names alike


def _string(rule: Rule, n: int) -> str:
    if rule.name == "webhook_url":
        head = "http://127.0.0.1:9/"
        return head + "a" * (n - len(head))
    return "a" * n


def limit_cases():
    """(field, value, accepted) at and one past every declared bound of the body's fields."""
    for name in BODY:
        rule = FIELDS[name]
        if rule.kind == "int":
            yield name, rule.lo, True
            yield name, rule.lo - 1, False
            yield name, rule.hi, True
            yield name, rule.hi + 1, False
        elif rule.kind == "list":
            yield name, _items(rule, rule.max_len), True
            yield name, _items(rule, rule.max_len + 1), False
        elif rule.kind == "str" and rule.max_len is not None:
            yield name, _string(rule, rule.max_len), True
            yield name, _string(rule, rule.max_len + 1), False
        elif rule.choices:
            yield name, rule.choices[-1], True
            yield name, rule.choices[-1] + "x", False
    # the service name's bounds sit in its pattern
    yield "service_name", "s" * 128, True
    yield "service_name", "s" * 129, False
    yield "service_name", "a:b", False
    # the pattern holds for the whole name: Python's re.match let its '$' take a trailing
    # newline, and the request id made from "svc\n" was one no path or body could name
    yield "service_name", "svc\n", False
    yield "service_name", "s" * 128 + "\n", False


CASES = list(limit_cases())


@pytest.fixture
def app(make_app):  # noqa: F811
    # every lease the rules allow is allowed here: the limit under test is the rule's
    return make_app(scheduler={"max_ttl": 0, "allow_infinite_ttl": True})


def _refused_over_http(app, name, value) -> bool:
    body = {name: value}
    if name == "depends_on" or name == "sharing":
        body["required_gpus"] = 1
    resp = allocate(app.test_client(), **body)
    err = (resp.get_json() or {}).get("error") or {}
    if err.get("code") != "validation_error":
        return False
    details = err["details"]
    return name in details or details.get("field") == name


def _refused_by_engine(app, name, value) -> bool:
    req = {"service_name": "svc", name: value}
    try:
        app.extensions["gpu_engine"].allocate(req)
    except ValidationFailed as exc:
        return exc.details.get("field") == name
    except OrchestratorError:  # unsatisfiable, unknown dependency...: not a limit
        return False
    return False


def test_the_cases_cover_every_bounded_field_of_the_body():
    bounded = {
        n
        for n in BODY
        if FIELDS[n].kind in ("int", "list") or FIELDS[n].max_len or FIELDS[n].choices
    }
    assert bounded <= {name for name, _, _ in CASES}
    assert {"required_gpus", "priority", "ttl_seconds", "depends_on", "nodes"} <= bounded


def _ended_requests(app, n: int) -> list[str]:
    """n requests that ended (released): dependencies that exist and let a request run."""
    engine, ids = app.extensions["gpu_engine"], []
    for _ in range(n):
        rec = engine.allocate({"service_name": "dep"})
        engine.release(rec["id"])
        ids.append(rec["id"])
    return ids


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    CASES,
    ids=[f"{n}-{'ok' if ok else 'past'}-{i}" for i, (n, _, ok) in enumerate(CASES)],
)
def test_each_limit_is_enforced_alike_over_http_and_by_the_engine(app, name, value, accepted):
    if name == "depends_on":
        value = _ended_requests(app, len(value))
    assert _refused_over_http(app, name, value) is not accepted
    assert _refused_by_engine(app, name, value) is not accepted


def test_the_openapi_document_states_the_declared_limits():
    props = schemas.AllocateRequestSchema().fields
    for name in ("required_gpus", "priority", "min_memory_mb", "ttl_seconds"):
        rng = [v for v in props[name].validators if hasattr(v, "min")][0]
        assert (rng.min, rng.max) == (FIELDS[name].lo, FIELDS[name].hi)


def test_an_http_request_is_checked_once(app, monkeypatch):
    """The schema checks the body; the engine takes the API's request as checked."""
    calls = []
    real = request_rules.check
    monkeypatch.setattr("app.engine.check", lambda req: calls.append(req) or real(req))
    resp = allocate(app.test_client(), required_gpus=1, priority=3)
    assert resp.status_code == 200
    assert calls == []
    app.extensions["gpu_engine"].allocate({"service_name": "svc", "priority": 3})
    assert len(calls) == 1


def test_a_direct_caller_gets_the_same_refusal_as_before_for_a_bad_idempotency_key(app):
    engine = app.extensions["gpu_engine"]
    with pytest.raises(ValidationFailed) as exc:
        engine.allocate({"service_name": "svc"}, idempotency_key="has space")
    assert exc.value.details["field"] == "idempotency_key"
    resp = app.test_client().post(
        "/gpu/allocate", json={"service_name": "svc"}, headers={"Idempotency-Key": "has space"}
    )
    assert resp.status_code == 400


@pytest.mark.parametrize("name", ["priority", "required_gpus", "min_memory_mb"])
def test_a_workload_hint_past_its_limit_is_refused_naming_it(app, name):
    rule = HINTS[name]
    ok = allocate(app.test_client(), workload_data={name: rule.lo})
    assert ok.status_code in (200, 202), ok.get_json()
    resp = allocate(app.test_client(), workload_data={name: rule.hi + 1})
    assert resp.status_code == 422
    assert f"workload_data.{name}" in resp.get_json()["error"]["details"]


def test_of_several_bad_fields_the_error_names_the_first_in_field_order():
    """Whatever order a caller's dict lists them in, the engine names the same field (the
    first bad one in the declared order), so an error does not depend on key order."""
    forward = {"service_name": "svc", "priority": 99, "required_gpus": -1}
    backward = {"required_gpus": -1, "priority": 99, "service_name": "svc"}
    for req in (forward, backward):
        with pytest.raises(ValidationFailed) as info:
            request_rules.check(req)
        assert info.value.details["field"] == "priority"
    request_rules.check({"service_name": "svc", "priority": 3, "nodes": [], "owner": ""})
