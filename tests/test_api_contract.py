"""What clients see of the API's answers: warnings, shapes, errors and the spec (issue 12)."""

from __future__ import annotations

from importlib import metadata

from tests.api_support import allocate, app, assert_error, client, clock, make_app  # noqa: F401

# --------------------------------------------------------------------------- idempotency


def test_a_reused_idempotency_key_409_shows_the_clients_key(client):
    headers = {"Idempotency-Key": "abc-1"}
    first = client.post("/gpu/allocate", json={"service_name": "svc"}, headers=headers)
    assert first.status_code == 200
    err = assert_error(
        client.post("/gpu/allocate", json={"service_name": "other"}, headers=headers),
        409,
        "conflict",
    )
    assert err["details"]["idempotency_key"] == "abc-1"
    assert err["details"]["request_id"] == first.get_json()["id"]
    assert "'abc-1'" in err["message"] and "|" not in err["message"]


def test_the_key_in_a_409_is_the_clients_with_auth_on_too(make_app):
    client = make_app(
        auth={"enabled": True, "api_keys": {"alice-key-0123456789": "alice"}}
    ).test_client()
    headers = {"Idempotency-Key": "abc-1", "X-API-Key": "alice-key-0123456789"}
    assert (
        client.post("/gpu/allocate", json={"service_name": "svc"}, headers=headers).status_code
        == 200
    )
    err = assert_error(
        client.post("/gpu/allocate", json={"service_name": "other"}, headers=headers),
        409,
        "conflict",
    )
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
    client = make_app(
        auth={"enabled": True, "api_keys": {"k" * 20: "alice"}, "public_paths": ["/openapi.json"]}
    ).test_client()
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
    assert body["gpu_ids"] == [body["gpu_ids"][0]]  # still the default: one GPU
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
        " did you mean required_gpus?"
    ]
    analysed = client.post("/gpu/workload", json={"workload_data": hints}).get_json()
    assert analysed["warnings"] == lines
    clean = client.post("/gpu/workload", json={"workload_data": {"required_gpus": 2}})
    assert clean.get_json()["warnings"] == []
    assert allocate(client, "other", workload_data={"batch_size": 1}).get_json()["warnings"] == []


def test_a_thousand_unknown_hints_give_a_bounded_list(client):
    body = client.post(
        "/gpu/workload", json={"workload_data": {f"k{i}": i for i in range(300)}}
    ).get_json()
    assert len(body["warnings"]) == 21 and body["warnings"][-1].startswith("... and 280 more")


# --------------------------------------------------------------------------- request status


def test_a_granted_request_has_one_shape_with_each_field_in_one_place(client):
    first = allocate(client, "big", workload_data={"required_gpus": 8}).get_json()
    queued = allocate(client, "next", workload_data={"required_gpus": 2}).get_json()
    rid = queued["request_id"]
    waiting = client.get(f"/gpu/requests/{rid}").get_json()
    assert waiting["request_id"] == rid and "id" not in waiting
    assert waiting["status"] == "queued" and waiting["position"] == 1
    assert waiting["allocation"] is None and "gpu_ids" not in waiting
    assert waiting["required_gpus"] == 2 and waiting["service_name"] == "next"

    client.post("/gpu/release", json={"allocation_id": first["id"]})
    polled = client.get(f"/gpu/requests/{rid}").get_json()
    grant = polled["allocation"]
    assert polled["status"] == "allocated" and "position" not in polled
    assert polled["request_id"] == rid and "id" not in polled
    # the grant's fields live under allocation only; the original's five are all there
    for field in (
        "id",
        "service_name",
        "gpu_ids",
        "allocated_at",
        "priority",
        "node",
        "gpu_uuids",
        "cuda_visible_devices",
        "expires_at",
        "lease_seconds",
    ):
        assert field in grant, field
    assert grant["id"] == rid and len(grant["gpu_ids"]) == 2
    assert grant["cuda_visible_devices"] == ",".join(map(str, grant["gpu_ids"]))
    assert set(polled) & set(grant) == {"service_name", "priority", "allocated_at"}
    assert polled["wait_time_seconds"] is not None and polled["submitted_at"]
    same = client.get(f"/gpu/allocations/{rid}").get_json()
    assert {k: same[k] for k in grant} == grant

    client.post("/gpu/release", json={"allocation_id": rid})
    ended = client.get(f"/gpu/requests/{rid}").get_json()
    assert ended["status"] == "released" and ended["allocation"]["released_at"]
    assert ended["ended_at"] == ended["allocation"]["released_at"]


def test_the_spec_documents_the_request_status_shape(client):
    spec = client.get("/openapi.json").get_json()
    props = spec["components"]["schemas"]["RequestStatus"]["properties"]
    assert "request_id" in props and "allocation" in props
    assert not {"id", "gpu_ids", "node", "expires_at"} & set(props)
    grant = spec["components"]["schemas"]["Grant"]["properties"]
    assert {"id", "gpu_ids", "node", "gpu_uuids", "expires_at"} <= set(grant)


def test_cancel_answers_the_request_shape(client):
    allocate(client, "big", workload_data={"required_gpus": 8})
    rid = allocate(client, "waiter").get_json()["request_id"]
    body = client.delete(f"/gpu/requests/{rid}").get_json()
    assert body["status"] == "cancelled" and body["request_id"] == rid
    assert body["allocation"] is None and body["ended_at"]


# --------------------------------------------------------------------------- grant webhook


def test_the_grant_webhooks_allocation_has_the_fields_of_a_200_answer(app, client):
    from workers.webhooks import build_payload

    now = allocate(client, "big", workload_data={"required_gpus": 8}).get_json()
    rid = allocate(client, "next", webhook_url="http://127.0.0.1:9/hook").get_json()["request_id"]
    client.post("/gpu/release", json={"allocation_id": now["id"]})
    record = app.extensions["gpu_engine"].get(rid)
    allocation = build_payload(record, "allocated", "ev-1")["allocation"]
    assert set(allocation) == set(now) - {"warnings", "replayed"}  # answer metadata
    assert allocation["node"] == "node-a" and len(allocation["gpu_uuids"]) == 1
    assert allocation["expires_at"] and allocation["cuda_visible_devices"] == str(
        allocation["gpu_ids"][0]
    )
    got = client.get(f"/gpu/allocations/{rid}").get_json()
    assert got.pop("gpu_health") == [{"index": allocation["gpu_ids"][0], "health": "ok"}]
    assert allocation == got  # gpu_health is the GPUs' state now, only on GET


def test_the_python_client_reads_a_polled_grant(client):
    """app.client's Allocation takes the request-status shape (grant under allocation)."""
    from app.client import Allocation

    first = allocate(client, "big", workload_data={"required_gpus": 8}).get_json()
    rid = allocate(client, "next", workload_data={"required_gpus": 2}).get_json()["request_id"]
    assert Allocation(client.get(f"/gpu/requests/{rid}").get_json()).gpu_ids == []
    client.post("/gpu/release", json={"allocation_id": first["id"]})
    polled = Allocation(client.get(f"/gpu/requests/{rid}").get_json())
    assert polled.id == rid and polled.status == "allocated" and polled.node == "node-a"
    assert len(polled.gpu_ids) == 2 and polled.cuda_visible_devices == ",".join(
        map(str, polled.gpu_ids)
    )
    assert polled.lease_seconds and polled.granted
