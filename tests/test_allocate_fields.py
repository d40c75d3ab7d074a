"""required_gpus, min_memory_mb, gpu_model and nodes on /gpu/allocate: enforced by placement."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from app.engine import gpu_model_pattern
from app.errors import ValidationFailed
from tests.api_support import allocate, assert_error, clock, make_app  # noqa: F401
from workers.simulated import fleet

MIXED = {
    "nodes": [
        {"name": "n-a10", "count": 2, "gpu": {"name": "NVIDIA A10", "memory_total_mb": 23028}},
        {
            "name": "n-h100",
            "count": 2,
            "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559},
        },
    ]
}


@pytest.fixture
def client(make_app):
    app = make_app(nodes=None)
    engine = app.extensions["gpu_engine"]
    for node, gpus in fleet(MIXED).items():
        engine.report_node(node, gpus)
    return app.test_client()


def test_gpu_model_places_only_on_matching_gpus_and_waits_for_them(client):
    got = [allocate(client, "trainer", gpu_model="*h100*") for _ in range(3)]
    assert [r.status_code for r in got] == [200, 200, 202]
    assert {r.get_json()["node"] for r in got[:2]} == {"n-h100"}
    assert got[0].get_json()["gpu_model"] == "*h100*"
    # the A10s are free, yet the third H100 request waits for an H100
    other = allocate(client, "any")
    assert other.status_code == 200 and other.get_json()["node"] == "n-a10"
    queued = got[2].get_json()["request_id"]
    client.post("/gpu/release", json={"allocation_id": got[0].get_json()["id"]})
    rec = client.get(f"/gpu/requests/{queued}").get_json()
    assert (rec["status"], rec["allocation"]["node"]) == ("allocated", "n-h100")


def test_gpu_model_glob_is_case_insensitive_and_anchored(client):
    assert allocate(client, gpu_model="nvidia a10").get_json()["node"] == "n-a10"
    err = assert_error(allocate(client, gpu_model="A10"), 422, "unsatisfiable")  # not "*A10*"
    assert err["details"]["field"] == "gpu_model"


def test_gpu_model_that_no_gpu_has_is_unsatisfiable(client):
    err = assert_error(allocate(client, gpu_model="*B200*"), 422, "unsatisfiable")
    assert err["details"]["field"] == "gpu_model" and "*B200*" in err["message"]
    assert client.get("/gpu/list").get_json()["queue"] == []


def test_nodes_limits_placement(client):
    first = allocate(client, nodes=["n-a10"], required_gpus=2)
    assert (first.status_code, first.get_json()["node"]) == (200, "n-a10")
    assert first.get_json()["nodes"] == ["n-a10"]
    # n-a10 is full; the request waits although n-h100 is free
    assert allocate(client, nodes=["n-a10"]).status_code == 202
    assert allocate(client, nodes=["n-a10", "n-h100"]).get_json()["node"] == "n-h100"
    err = assert_error(allocate(client, nodes=["nowhere"]), 422, "unsatisfiable")
    assert err["details"]["field"] == "nodes"


def test_model_and_count_that_no_single_node_holds_is_unsatisfiable(client):
    err = assert_error(allocate(client, gpu_model="*H100*", required_gpus=3), 422, "unsatisfiable")
    assert err["details"]["field"] == "required_gpus" and err["details"]["limit"] == 2
    err = assert_error(
        allocate(client, gpu_model="*A10*", min_memory_mb=40000), 422, "unsatisfiable"
    )
    assert err["details"]["limit"] == 0


def test_required_gpus_and_min_memory_override_the_analysis(client):
    resp = allocate(
        client,
        workload_type="inference",
        required_gpus=2,
        min_memory_mb=30000,
        workload_data={"model_size": "small"},
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["required_gpus"], body["min_memory_mb"], body["node"]) == (2, 30000, "n-h100")
    assert len(body["gpu_ids"]) == 2
    assert_error(allocate(client, required_gpus=3), 422, "unsatisfiable")


def test_workload_answer_shows_the_overrides(client):
    body = client.post(
        "/gpu/workload",
        json={
            "workload_type": "training",
            "required_gpus": 2,
            "min_memory_mb": 1000,
            "gpu_model": "*H100*",
            "nodes": ["n-h100"],
        },
    ).get_json()
    assert (body["required_gpus"], body["min_memory_mb"], body["gpu_model"], body["nodes"]) == (
        2,
        1000,
        "*H100*",
        ["n-h100"],
    )
    assert "set by the request" in body["reasoning"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("required_gpus", 0),
        ("required_gpus", "2"),
        ("required_gpus", True),
        ("min_memory_mb", -1),
        ("gpu_model", ""),
        ("gpu_model", "*a*b*c*d*"),
        ("gpu_model", "a|b"),
        ("gpu_model", 5),
        ("nodes", []),
        ("nodes", ["a|b"]),
        ("nodes", "n-a10"),
        ("nodes", [""]),
    ],
)
def test_bad_values_are_422_naming_the_field(client, field, value):
    err = assert_error(allocate(client, **{field: value}), 422, "validation_error")
    assert field in str(err["details"])


def test_openapi_shows_the_fields(client):
    spec = client.get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    for name in ("AllocateRequest", "WorkloadRequest"):
        assert {"required_gpus", "min_memory_mb", "gpu_model", "nodes"} <= set(
            schemas[name]["properties"]
        ), name
    assert {"gpu_model", "nodes"} <= set(schemas["Requirements"]["properties"])


_GLOB = st.text(alphabet="aAh1 *?[]!-.%^$()", min_size=1, max_size=10)
_NAME = st.text(alphabet="aAh1 -.x]![%^$()", max_size=12)


@hyp_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # read-only use
@given(glob=_GLOB, name=_NAME)
def test_glob_matches_like_fnmatch_in_lua(redis, glob, name):
    try:
        pattern = gpu_model_pattern(glob)
    except ValidationFailed:
        assert glob.count("*") > 3 or "**" in glob
        return
    got = redis.eval(
        "return string.find(string.lower(ARGV[1]), ARGV[2]) ~= nil and 1 or 0", 0, name, pattern
    )
    assert bool(got) == fnmatch.fnmatchcase(name.lower(), glob.lower()), pattern
