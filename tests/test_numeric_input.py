"""Every number a client sends is checked before it is used (issue 11, part 3).

A property-based test throws integers of any size, floats, NaN/Infinity spellings, strings and
booleans at every numeric workload hint of every workload type and at the numeric top-level
fields, on ``/gpu/allocate`` and ``/gpu/workload``: the answer is a 2xx or a 4xx naming the
field, never a 500. Then the lease and stored-record cases: no lease is endless by accident, and
no stored record (whatever an older version or a person wrote into it) makes a read answer 500.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from app.engine import MAX_LEASE_SECONDS, Engine
from app.settings import WORKLOAD_TYPES
from tests.api_support import allocate, assert_error, clock, make_app  # noqa: F401 (fixtures)

#: Every numeric hint app.workload reads from workload_data.
NUMERIC_HINTS = (
    "batch_size",
    "concurrent_requests",
    "image_count",
    "node_count",
    "required_gpus",
    "min_memory_mb",
    "max_memory_mb",
    "priority",
    "max_utilization",
    "estimated_duration_seconds",
    "parameters_billions",
    "workflow_priority",
)
#: Numeric top-level fields of /gpu/allocate (preferred_gpus holds numbers).
TOP_LEVEL = ("priority", "ttl_seconds", "preferred_gpus")

#: Spellings sent verbatim in the JSON text: not JSON numbers, or past a float's range.
RAW_SPELLINGS = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e308",
    "9" * 400,
    "-" + "9" * 400,
    "1E999",
    "0e0",
    "-0.0",
    "123456789012345678901234567890",
)
_RAW = "__raw_token__"


class Raw(str):
    """A token written into the JSON text as is."""


values = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([10**k for k in (15, 16, 18, 19, 20, 30, 100, 308, 309, 310, 400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([Raw(s) for s in RAW_SPELLINGS]),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "inf", "nan", "1e400", "7", "", " "]),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)


def _body_text(body: dict, value) -> str:
    """The body as JSON text, with a Raw token spliced in where the placeholder sits."""
    if isinstance(value, Raw):
        return json.dumps(body).replace(json.dumps(_RAW), str(value))
    return json.dumps(body)  # float nan/inf come out as NaN/Infinity, as a client might send


def _with(body: dict, path: tuple[str, ...], value) -> dict:
    target = body
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = _RAW if isinstance(value, Raw) else value
    if path[-1] == "preferred_gpus":
        target[path[-1]] = [target[path[-1]]]
    return body


def _not_json(token: str):
    raise AssertionError(f"the answer holds {token}, which is not JSON")


def _check(resp, field: str) -> None:
    text = resp.get_data(as_text=True)
    assert resp.status_code < 500, text
    assert resp.mimetype == "application/json", text
    body = json.loads(text, parse_constant=_not_json)  # a bare NaN/Infinity is not JSON
    if resp.status_code >= 400:
        assert resp.status_code in (409, 422, 429), text
        if resp.status_code == 422:
            details = body["error"]["details"]
            assert field in json.dumps(details), (field, details)


@pytest.fixture
def client(make_app):
    # A small queue: granted and queued requests pile up over hundreds of examples.
    return make_app(
        nodes=(("node-a", 8),), scheduler={"max_queue_size": 20, "max_ttl": 0}
    ).test_client()


@pytest.mark.parametrize("path", ["/gpu/workload", "/gpu/allocate"])
def test_every_numeric_hint_of_every_workload_type_is_checked(client, path):
    @given(wtype=st.sampled_from(WORKLOAD_TYPES), hint=st.sampled_from(NUMERIC_HINTS), value=values)
    @hsettings(
        max_examples=300,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(wtype, hint, value):
        body = _with(
            {"service_name": "fuzz", "workload_type": wtype}, ("workload_data", hint), value
        )
        resp = client.post(path, data=_body_text(body, value), content_type="application/json")
        _check(resp, hint)

    check()


def test_every_numeric_top_level_field_of_allocate_is_checked(client):
    @given(field=st.sampled_from(TOP_LEVEL), value=values)
    @hsettings(
        max_examples=200,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(field, value):
        body = _with({"service_name": "fuzz"}, (field,), value)
        resp = client.post(
            "/gpu/allocate", data=_body_text(body, value), content_type="application/json"
        )
        _check(resp, field)

    check()


@pytest.mark.parametrize(
    "hint",
    [
        "batch_size",
        "required_gpus",
        "parameters_billions",
        "estimated_duration_seconds",
        "concurrent_requests",
    ],
)
@pytest.mark.parametrize("path", ["/gpu/workload", "/gpu/allocate"])
def test_the_reported_huge_integers_are_422_naming_the_field(client, path, hint):
    """The issue's reproduction: 400 nines (and a float-range-breaking 10**309) was a 500."""
    for spelling in ("9" * 400, str(10**309), str(10**30)):
        resp = client.post(
            path,
            content_type="application/json",
            data='{"service_name": "svc", "workload_data": {"%s": %s}}' % (hint, spelling),
        )
        err = assert_error(resp, 422, "validation_error")
        assert f"workload_data.{hint}" in err["details"], err


def test_no_limit_ttl_and_a_huge_estimate_give_a_422_not_an_endless_lease(make_app, redis):
    """``scheduler.max_ttl: 0`` with ``estimated_duration_seconds: 1e308`` was a 500 that still
    allocated a GPU with an infinite lease, after which every listing answered 500."""
    client = make_app(scheduler={"max_ttl": 0}).test_client()
    resp = allocate(client, workload_data={"estimated_duration_seconds": 1e308})
    err = assert_error(resp, 422, "validation_error")
    assert "workload_data.estimated_duration_seconds" in err["details"]
    assert client.get("/gpu/list").get_json()["allocations"] == []
    # the longest estimate accepted gives a finite lease of at most MAX_LEASE_SECONDS
    resp = allocate(client, workload_data={"estimated_duration_seconds": MAX_LEASE_SECONDS})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    rec = resp.get_json()
    assert rec["lease_seconds"] == MAX_LEASE_SECONDS
    assert rec["expires_at"] is not None
    for url in ("/gpu/list", f"/gpu/requests/{rec['id']}"):
        assert client.get(url).status_code == 200
    renewed = client.post(f"/gpu/allocations/{rec['id']}/renew")
    assert renewed.status_code == 200, renewed.get_data(as_text=True)


def test_engine_caps_every_lease_even_without_max_ttl(settings, redis):
    """The engine's own callers (workers, tools) get the same ceiling as the API."""
    engine = Engine(redis, settings.replace(scheduler={"max_ttl": 0}))
    assert engine.lease_for(None, 1e308) == MAX_LEASE_SECONDS
    assert engine.lease_for(None, 10.0) == 10.0 * settings.scheduler.default_ttl_multiplier
    with pytest.raises(Exception) as exc:
        engine.lease_for(MAX_LEASE_SECONDS + 1, None)
    assert getattr(exc.value, "status", None) == 422


BAD_STORED = {
    "lease_seconds": "inf",
    "expires_at": "1e308",
    "submitted_at": "nan",
    "allocated_at": "not a time",
    "priority": "inf",
    "required_gpus": "x",
    "gpu_ids": "[1e999]",
    "workload_data": "{not json",
    "preferred_gpus": "7",
    "wait_time_seconds": "-inf",
    "renewed_at": "99999999999999999999",
}


@pytest.mark.parametrize("field,value", sorted(BAD_STORED.items()))
def test_no_stored_value_makes_a_read_answer_500(make_app, redis, field, value):
    """Whatever an older version or a person left in a record, reads answer (the bad field
    reads as null) and renew gives the lease a finite end."""
    app = make_app()
    client = app.test_client()
    rec = allocate(client, workload_data={"required_gpus": 1}).get_json()
    engine = app.extensions["gpu_engine"]
    redis.hset(engine.keys.request(rec["id"]), field, value)
    for url in (
        "/gpu/list",
        "/gpu/status",
        f"/gpu/requests/{rec['id']}",
        f"/gpu/allocations/{rec['id']}",
    ):
        resp = client.get(url)
        assert resp.status_code in (200, 404), (url, resp.get_data(as_text=True))
        json.loads(resp.get_data(as_text=True), parse_constant=_not_json)
    resp = client.post(f"/gpu/allocations/{rec['id']}/renew")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    expires = float(redis.zscore(engine.keys.leases(), rec["id"]))
    assert math.isfinite(expires) and expires <= engine.now() + MAX_LEASE_SECONDS


def test_a_stored_endless_lease_is_given_a_finite_end_when_granted(make_app, redis, clock):
    """A queued record whose lease reads as infinite (an older version wrote it) is granted
    with a finite expiry: the schedule pass never writes an unrepresentable time."""
    app = make_app(nodes=(("node-a", 1),))
    client = app.test_client()
    engine = app.extensions["gpu_engine"]
    first = allocate(client, workload_data={"required_gpus": 1}).get_json()
    queued = allocate(client, workload_data={"required_gpus": 1}).get_json()
    assert queued["status"] == "queued"
    redis.hset(engine.keys.request(queued["id"]), "lease_seconds", "inf")
    assert client.post("/gpu/release", json={"allocation_id": first["id"]}).status_code == 200
    got = client.get(f"/gpu/requests/{queued['id']}").get_json()
    assert got["status"] == "allocated"
    expires = float(redis.zscore(engine.keys.leases(), queued["id"]))
    assert math.isfinite(expires) and expires <= clock() + MAX_LEASE_SECONDS


def test_renew_ttl_seconds_is_checked(client):
    rec = allocate(client, workload_data={"required_gpus": 1}).get_json()
    url = f"/gpu/allocations/{rec['id']}/renew"

    @given(value=values)
    @hsettings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(value):
        body = _with({}, ("ttl_seconds",), value)
        resp = client.post(url, data=_body_text(body, value), content_type="application/json")
        _check(resp, "ttl_seconds")
        if resp.status_code == 200:
            assert resp.get_json()["expires_at"] is not None

    check()


def test_nan_deep_inside_the_body_is_a_client_error(client):
    deep = "[" * 900 + "NaN" + "]" * 900
    resp = client.post(
        "/gpu/allocate",
        content_type="application/json",
        data='{"service_name": "svc", "workload_data": {"x": %s}}' % deep,
    )
    assert resp.status_code in (400, 422), resp.get_data(as_text=True)
    resp = client.post(
        "/gpu/allocate",
        content_type="application/json",
        data='{"service_name": "svc", "workload_data": {"x": [1, {"y": -Infinity}]}}',
    )
    err = assert_error(resp, 422, "validation_error")
    assert list(err["details"]) == ["workload_data.x[1].y"]
