"""What clients see of the API's answers: warnings, shapes, errors and the spec (issue 12)."""
from __future__ import annotations

from importlib import metadata

from tests.api_support import allocate, app, assert_error, client, clock, make_app  # noqa: F401


# --------------------------------------------------------------------------- idempotency

def test_a_reused_idempotency_key_409_shows_the_clients_key(client):
    headers = {"Idempotency-Key": "abc-1"}
    first = client.post("/gpu/allocate", json={"service_name": "svc"}, headers=headers)
    assert first.status_code == 200
    err = assert_error(client.post("/gpu/allocate", json={"service_name": "other"},
                                   headers=headers), 409, "conflict")
    assert err["details"]["idempotency_key"] == "abc-1"
    assert err["details"]["request_id"] == first.get_json()["id"]
    assert "'abc-1'" in err["message"] and "|" not in err["message"]


def test_the_key_in_a_409_is_the_clients_with_auth_on_too(make_app):
    client = make_app(auth={"enabled": True, "api_keys": {"alice-key-0123456789": "alice"}}) \
        .test_client()
    headers = {"Idempotency-Key": "abc-1", "X-API-Key": "alice-key-0123456789"}
    assert client.post("/gpu/allocate", json={"service_name": "svc"},
                       headers=headers).status_code == 200
    err = assert_error(client.post("/gpu/allocate", json={"service_name": "other"},
                                   headers=headers), 409, "conflict")
    assert err["details"]["idempotency_key"] == "abc-1"
    assert "alice" not in err["message"]


# --------------------------------------------------------------------------- the spec

def test_openapi_version_is_the_package_version(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["info"]["version"] == metadata.version("gpu-orchestrator") != "1.0"


def test_openapi_has_no_security_schemes_with_auth_off(client):
    """Swagger UI draws an Authorize button for any security scheme; with auth off there is
    nothing to authorize."""
    spec = client.get("/openapi.json").get_json()
    assert "securitySchemes" not in spec.get("components", {})
    assert "security" not in spec


def test_openapi_with_auth_on_documents_the_key(make_app):
    client = make_app(auth={"enabled": True, "api_keys": {"k" * 20: "alice"},
                            "public_paths": ["/openapi.json"]}).test_client()
    spec = client.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["ApiKeyHeader"]["name"] == "X-API-Key"
    assert spec["security"]


def test_openapi_lists_only_schemas_that_something_references(client):
    spec = client.get("/openapi.json").get_json()
    text = client.get("/openapi.json").get_data(as_text=True)
    assert "PaginationMetadata" not in spec["components"]["schemas"]
    for name in spec["components"]["schemas"]:
        assert f'"#/components/schemas/{name}"' in text, name


# --------------------------------------------------------------------------- preferred_gpus

def test_preferred_gpu_beyond_the_largest_node_is_422(client):
    err = assert_error(allocate(client, preferred_gpus=[99]), 422, "unsatisfiable")
    assert err["details"]["reason"] == "preferred_gpus"
    assert err["details"]["limit"] == 8
    assert "99" in err["message"] and "0-7" in err["message"]
    assert_error(allocate(client, preferred_gpus=[1, 8]), 422, "unsatisfiable")
    assert client.get("/gpu/list").get_json()["allocations"] == []
    ok = allocate(client, preferred_gpus=[7])
    assert ok.status_code == 200 and ok.get_json()["gpu_ids"] == [7]


# --------------------------------------------------------------------------- warnings

def test_an_unknown_hint_is_a_warning_with_a_did_you_mean(client):
    resp = allocate(client, workload_data={"gpu_count": 16})
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body["gpu_ids"] == [body["gpu_ids"][0]]          # still the default: one GPU
    assert len(body["warnings"]) == 1
    line = body["warnings"][0]
    assert "workload_data.gpu_count" in line and "ignored" in line
    assert "did you mean required_gpus?" in line


def test_warnings_one_line_per_ignored_key_on_every_answer(client):
    hints = {"required_gpus": 8, "batchsize": 64, "ttl_seconds": 60, "gpu_memory_mb": 1}
    granted = allocate(client, workload_data=hints)
    assert granted.status_code == 200
    lines = granted.get_json()["warnings"]
    assert len(lines) == 3
    assert "did you mean batch_size?" in lines[0]
    assert "top-level field" in lines[1] and "ttl_seconds" in lines[1]
    assert "did you mean min_memory_mb?" in lines[2]
    queued = allocate(client, workload_data={"required_gpus": 1, "gpus": 2})
    assert queued.status_code == 202
    assert [w.split(";")[-1] for w in queued.get_json()["warnings"]] == [
        " did you mean required_gpus?"]
    analysed = client.post("/gpu/workload", json={"workload_data": hints}).get_json()
    assert analysed["warnings"] == lines
    clean = client.post("/gpu/workload", json={"workload_data": {"required_gpus": 2}})
    assert clean.get_json()["warnings"] == []
    assert allocate(client, "other", workload_data={"batch_size": 1}).get_json()["warnings"] \
        == []


def test_a_thousand_unknown_hints_give_a_bounded_list(client):
    body = client.post("/gpu/workload",
                       json={"workload_data": {f"k{i}": i for i in range(900)}}).get_json()
    assert len(body["warnings"]) == 21 and body["warnings"][-1].startswith("... and 880 more")
