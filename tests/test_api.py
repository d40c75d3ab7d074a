"""The REST API end to end through Flask's test client, against a real redis-server."""

from __future__ import annotations

import logging

import pytest

from app import create_app, logs
from app.timefmt import iso
from tests.api_support import allocate, app, assert_error, client, clock, make_app  # noqa: F401
from tests.conftest import free_port

# --------------------------------------------------------------------------- probes


def test_healthz_is_cheap_and_public(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}


def test_readyz_answers_200_when_redis_answers(client):
    assert client.get("/readyz").status_code == 200


def test_readyz_and_every_redis_route_answer_503_with_retry_after_when_redis_is_down(settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        settings.replace(redis={"url": dead, "socket_timeout": 0.2}, dashboard={"enabled": False}),
        redis_url=dead,
    )
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    for resp in (
        client.get("/readyz"),
        allocate(client),
        client.get("/gpu/status"),
        client.get("/gpu/requests/svc-1"),
        client.post("/gpu/release", json={"allocation_id": "svc-1"}),
    ):
        err = assert_error(resp, 503, "unavailable")
        assert int(resp.headers["Retry-After"]) > 0
        assert "Traceback" not in err["message"]


#: Commands that make a Redis refuse what it is sent, each with the refusal it answers;
#: ``{port}``: a port nobody listens on (a primary that is gone).
REFUSALS = {
    # maxmemory reached (noeviction): every write refused
    "OOM": [("CONFIG", "SET", "maxmemory", "1")],
    # min-replicas-to-write not met: every write refused
    "NOREPLICAS": [("CONFIG", "SET", "min-replicas-to-write", "1")],
    # a demoted primary (a failover, with a plain redis:// URL): every write refused
    "READONLY": [("REPLICAOF", "127.0.0.1", "{port}")],
    # a replica cut off from its primary: reads refused too
    "MASTERDOWN": [
        ("CONFIG", "SET", "replica-serve-stale-data", "no"),
        ("REPLICAOF", "127.0.0.1", "{port}"),
    ],
}


@pytest.mark.parametrize("mode", sorted(REFUSALS))
def test_redis_refusing_commands_is_503_with_retry_after_not_500(settings, tmp_path, mode):
    """Redis up but refusing (out of memory, a replica, no link to its primary, too few
    replicas): the client is told to retry (503), as when Redis is unreachable. It was a 500
    internal_error with a logged stack trace."""
    import redis as redis_lib

    from tests.api_support import register_fleet
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path).start()
    admin = redis_lib.Redis(port=server.port)
    try:
        st = settings.replace(redis={"url": server.url}, dashboard={"enabled": False})
        app = create_app(st, redis_url=server.url)
        register_fleet(app)
        client = app.test_client()
        held = allocate(client, "holder").get_json()["id"]
        port = str(free_port())
        for command in REFUSALS[mode]:
            admin.execute_command(*(port if arg == "{port}" else arg for arg in command))
        answers = [
            allocate(client),
            client.post("/gpu/release", json={"allocation_id": held}),
            client.post(f"/gpu/allocations/{held}/renew"),
            client.post("/admin/nodes/node-a/cordon"),
        ]
        if mode == "MASTERDOWN":
            answers += [client.get(f"/gpu/requests/{held}"), client.get("/readyz")]
        for resp in answers:
            err = assert_error(resp, 503, "unavailable")
            assert int(resp.headers["Retry-After"]) > 0, err
    finally:
        admin.close()
        server.stop()


# --------------------------------------------------------------------------- allocate


def test_allocate_granted_returns_the_allocation_with_original_and_new_fields(client):
    resp = allocate(
        client, "trainer", workload_type="training", workload_data={"model_size": "medium"}
    )
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    for field in (
        "id",
        "service_name",
        "gpu_ids",
        "allocated_at",
        "priority",
        "expires_at",
        "node",
        "gpu_uuids",
        "cuda_visible_devices",
        "required_gpus",
        "min_memory_mb",
    ):
        assert field in body, field
    assert body["service_name"] == "trainer"
    assert body["id"].startswith("trainer-")
    assert body["status"] == "allocated"
    assert body["required_gpus"] == 2 and len(body["gpu_ids"]) == 2
    assert body["cuda_visible_devices"] == ",".join(str(i) for i in body["gpu_ids"])
    assert body["node"] == "node-a"
    assert body["allocated_at"].endswith("Z") and body["expires_at"] > body["allocated_at"]


def test_allocate_defaults_workload_type_to_generic(client):
    body = allocate(client).get_json()
    assert body["workload_type"] == "generic"
    assert body["required_gpus"] == 1


def test_allocate_accepts_top_level_ttl_sharing_priority_and_preferred_gpus(client, clock):
    resp = allocate(client, ttl_seconds=120, priority=9, preferred_gpus=[5])
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body["priority"] == 9
    assert body["gpu_ids"] == [5]
    assert body["expires_at"] == iso(clock.now + 120)
    shared = allocate(client, "small", sharing="shared", workload_data={"min_memory_mb": 1024})
    assert shared.status_code == 200, shared.get_json()
    assert shared.get_json()["sharing"] == "shared"


def test_allocate_that_must_wait_is_202_with_location_and_can_be_polled(client):
    first = allocate(client, "big", workload_data={"required_gpus": 8})
    assert first.status_code == 200
    queued = allocate(client, "next", workload_data={"required_gpus": 2})
    assert queued.status_code == 202
    body = queued.get_json()
    assert body["status"] == "queued"
    assert body["position"] == 1
    assert {"request_id", "priority", "submitted_at"} <= set(body)
    location = queued.headers["Location"]
    assert location.endswith(f"/gpu/requests/{body['request_id']}")

    polled = client.get(location).get_json()
    assert polled["status"] == "queued" and polled["position"] == 1
    assert polled["allocation"] is None

    assert (
        client.post("/gpu/release", json={"allocation_id": first.get_json()["id"]}).status_code
        == 200
    )
    polled = client.get(location).get_json()
    assert polled["status"] == "allocated"
    assert polled["allocation"]["gpu_ids"] and len(polled["allocation"]["gpu_ids"]) == 2
    assert client.get(f"/gpu/allocations/{body['request_id']}").status_code == 200


def test_idempotency_key_replays_the_original_and_conflicts_on_a_different_body(client):
    headers = {"Idempotency-Key": "retry-123"}
    first = client.post("/gpu/allocate", json={"service_name": "svc"}, headers=headers)
    again = client.post("/gpu/allocate", json={"service_name": "svc"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(client.get("/gpu/list").get_json()["allocations"]) == 1
    other = client.post("/gpu/allocate", json={"service_name": "other"}, headers=headers)
    assert_error(other, 409, "conflict")


def test_idempotent_retry_replays_even_when_the_analysis_changed(app, client):
    """The advisor may answer differently on a retry (or time out and leave it to the rules);
    the client's request is the same, so the retry must replay, not conflict."""
    analyzer = app.extensions["gpu_analyzer"]
    real = analyzer.analyze
    answers = iter([2, 1, 1])

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        out["required_gpus"] = next(answers)
        return out

    analyzer.analyze = flaky
    body = {
        "service_name": "svc",
        "workload_type": "inference",
        "ttl_seconds": 600,
        "workload_data": {"model_name": "gemma-7b"},
    }
    headers = {"Idempotency-Key": "advisor-flip"}
    first = client.post("/gpu/allocate", json=body, headers=headers)
    again = client.post("/gpu/allocate", json=body, headers=headers)
    assert first.status_code == again.status_code == 200, again.get_json()
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["required_gpus"] == 2
    assert again.headers["Idempotent-Replayed"] == "true"
    changed = dict(body, ttl_seconds=700)
    assert_error(client.post("/gpu/allocate", json=changed, headers=headers), 409, "conflict")


def test_idempotency_key_must_be_printable(client):
    resp = client.post(
        "/gpu/allocate", json={"service_name": "svc"}, headers={"Idempotency-Key": "x" * 300}
    )
    assert_error(resp, 400, "bad_request")


def test_unsatisfiable_request_is_422_with_the_reason(client):
    err = assert_error(allocate(client, workload_data={"required_gpus": 16}), 422, "unsatisfiable")
    assert "16" in err["message"] or err["details"]


@pytest.mark.parametrize(
    "workload_type, workload_data, field",
    [
        ("inference", {"model_name": "llama-3-405b", "dtype": "fp32"}, "model_name"),
        ("inference", {"parameters_billions": 5000}, "parameters_billions"),
    ],
)
def test_a_model_no_node_can_hold_is_unsatisfiable_with_field_reason_and_limit(
    client, workload_type, workload_data, field
):
    """Every other ``unsatisfiable`` names ``details.field``, ``reason`` and ``limit``, and
    docs/client.md reads ``exc.details["field"]``; the memory estimate's answer had only
    ``{"workload_data.model_name": "needs ... MB"}`` (a KeyError in that example)."""
    resp = allocate(client, workload_type=workload_type, workload_data=workload_data)
    err = assert_error(resp, 422, "unsatisfiable")
    assert err["details"]["field"] == f"workload_data.{field}"
    assert err["details"]["reason"] == "memory_estimate"
    assert err["details"]["limit"] == 8 * 81559  # MB one node of the fleet holds
    assert err["details"]["needed_mb"] > err["details"]["limit"]


def test_full_queue_is_429_with_retry_after(make_app):
    client = make_app(scheduler={"max_queue_size": 1, "max_queued_per_owner": 1}).test_client()
    assert allocate(client, workload_data={"required_gpus": 8}).status_code == 200
    assert allocate(client).status_code == 202
    resp = allocate(client)
    assert_error(resp, 429, "queue_full")
    assert int(resp.headers["Retry-After"]) > 0


def test_depends_on_unknown_id_is_rejected(client):
    resp = allocate(client, depends_on=["nobody-1"])
    assert resp.status_code in (404, 422)
    assert resp.get_json()["error"]["code"] in ("not_found", "validation_error", "unsatisfiable")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "service_name"),
        ({"service_name": ""}, "service_name"),
        ({"service_name": "has space"}, "service_name"),
        ({"service_name": "x" * 129}, "service_name"),
        ({"service_name": "ok", "workload_type": "quantum"}, "workload_type"),
        ({"service_name": "ok", "priority": 11}, "priority"),
        ({"service_name": "ok", "priority": "5"}, "priority"),
        ({"service_name": "ok", "priority": True}, "priority"),
        ({"service_name": "ok", "ttl_seconds": -1}, "ttl_seconds"),
        ({"service_name": "ok", "webhook_url": "ftp://example.com/x"}, "webhook_url"),
        ({"service_name": "ok", "workload_data": []}, "workload_data"),
        ({"service_name": "ok", "sharing": "sometimes"}, "sharing"),
        ({"service_name": "ok", "surprise": 1}, "surprise"),
    ],
)
def test_invalid_allocate_bodies_are_422_naming_the_field(client, body, field):
    err = assert_error(client.post("/gpu/allocate", json=body), 422, "validation_error")
    assert field in err["details"], err


@pytest.mark.parametrize(
    "url",
    [r"http://127.0.0.1/\ud800", r"http://127.0.0.1/a?x=\udfff", r"http://127.0.0.1:8080/p#\ud83d"],
)
def test_a_webhook_url_with_a_lone_surrogate_is_422_naming_it(client, redis, url):
    """JSON can spell a lone UTF-16 surrogate (\\ud800); no URL holds one, and handing it to
    Redis failed to encode: a 500 internal_error after the URL policy had passed it."""
    body = '{"service_name": "svc", "webhook_url": "%s"}' % url
    resp = client.post("/gpu/allocate", data=body, content_type="application/json")
    err = assert_error(resp, 422, "validation_error")
    assert "webhook_url" in err["details"]
    assert not [k for k in redis.scan_iter() if ":req:" in k]  # nothing stored


def test_unknown_workload_type_lists_the_valid_ones(client):
    err = assert_error(allocate(client, workload_type="quantum"), 422, "validation_error")
    text = " ".join(err["details"]["workload_type"])
    for wtype in ("training", "inference", "embedding", "ocr", "graph_processing", "generic"):
        assert wtype in text


def test_workload_data_nesting_is_limited(client):
    deep: dict = {}
    node = deep
    for _ in range(20):
        node["x"] = {}
        node = node["x"]
    err = assert_error(allocate(client, workload_data=deep), 422, "validation_error")
    assert "workload_data" in err["details"]


@pytest.mark.parametrize("path", ["/gpu/allocate", "/gpu/workload"])
def test_workload_data_nested_as_deep_as_the_parser_allows_is_a_client_error(client, path):
    """The depth check walked the whole nesting before comparing it with the limit: a body
    the JSON parser still took (~940 levels) ran it out of stack, a 500 internal_error."""
    answers = set()
    for depth in range(850, 1001):
        text = '{"service_name": "svc", "workload_data": ' + '{"a": ' * depth + "1" + "}" * depth
        resp = client.post(path, data=text + "}", content_type="application/json")
        answers.add(resp.status_code)
        if resp.status_code == 422:
            assert "workload_data" in resp.get_json()["error"]["details"]
    assert answers == {400, 422}  # too deep to parse, or parsed and refused naming the field


def test_workload_data_with_a_wrong_type_is_422_naming_the_field(client):
    err = assert_error(
        allocate(client, workload_data={"required_gpus": "two"}), 422, "validation_error"
    )
    assert "required_gpus" in str(err["details"])


def test_required_gpus_out_of_range_is_422(client):
    assert_error(allocate(client, workload_data={"required_gpus": 65}), 422, "validation_error")


def test_malformed_json_is_400(client):
    resp = client.post("/gpu/allocate", data='{"service_name": ', content_type="application/json")
    assert_error(resp, 400, "bad_request")


@pytest.mark.parametrize("path", ["/gpu/allocate", "/gpu/workload", "/gpu/release"])
def test_a_json_null_body_is_422_not_an_empty_body(client, path):
    """Found by the schemathesis fuzz: ``null`` was read as "no body" and /gpu/workload
    answered 200 with the defaults."""
    resp = client.post(path, data="null", content_type="application/json")
    assert_error(resp, 422, "validation_error")


def test_deeply_nested_json_is_400_not_a_crash(client):
    resp = client.post("/gpu/allocate", data="[" * 50000, content_type="application/json")
    assert_error(resp, 400, "bad_request")


def test_nan_is_a_422_naming_the_field(client):
    resp = client.post(
        "/gpu/allocate",
        data='{"service_name": "a", "priority": NaN}',
        content_type="application/json",
    )
    err = assert_error(resp, 422, "validation_error")
    assert list(err["details"]) == ["priority"]


def test_numbers_beyond_float_range_are_422_naming_the_field(client):
    resp = client.post(
        "/gpu/allocate",
        data='{"service_name": "a", "workload_data": {"batch_size": 1e400}}',
        content_type="application/json",
    )
    err = assert_error(resp, 422, "validation_error")
    assert list(err["details"]) == ["workload_data.batch_size"]


@pytest.mark.parametrize(
    "workload_data, field",
    [
        ({"batch_size": 1e400}, "workload_data.batch_size"),  # refused by the body reader
        ({"batch_size": "32"}, "workload_data.batch_size"),  # refused by the analysis
        ({"batch_size": 1e16}, "workload_data.batch_size"),
        ({"model_size": 7}, "workload_data.model_size"),
        ({"min_memory_mb": 9000, "max_memory_mb": 10}, "workload_data.max_memory_mb"),
    ],
)
def test_a_bad_workload_hint_is_named_with_a_list_of_messages(client, workload_data, field):
    """One shape for every field's 422 (docs/api.md: ``{"workload_data.batch_size": ["a finite
    number, got 1e400"]}``): a hint the analysis refused was a bare string, so a client
    iterating over a field's messages got its characters."""
    for path in ("/gpu/allocate", "/gpu/workload"):
        resp = client.post(path, json={"service_name": "a", "workload_data": workload_data})
        details = assert_error(resp, 422, "validation_error")["details"]
        assert list(details) == [field]
        assert isinstance(details[field], list) and details[field]
        assert all(isinstance(m, str) and m for m in details[field])


def test_wrong_content_type_is_415(client):
    resp = client.post(
        "/gpu/allocate", data="service_name=svc", content_type="application/x-www-form-urlencoded"
    )
    assert_error(resp, 415, "unsupported_media_type")


def test_body_over_the_limit_is_413(make_app):
    client = make_app(server={"max_body_bytes": 1024}).test_client()
    resp = client.post(
        "/gpu/allocate", json={"service_name": "svc", "workload_data": {"pad": "x" * 2000}}
    )
    assert_error(resp, 413, "payload_too_large")


def test_routing_404_and_405_are_json(client):
    assert_error(client.get("/no/such/path"), 404, "not_found")
    resp = client.delete("/gpu/status")
    assert_error(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


def test_unexpected_exception_is_a_json_500_without_a_stack_trace(app, caplog):
    def boom():
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", "boom", boom)
    with caplog.at_level(logging.ERROR):
        resp = app.test_client().get("/boom")
    err = assert_error(resp, 500, "internal_error")
    assert "secret internals" not in resp.get_data(as_text=True)
    assert "Traceback" not in err["message"]
    assert "secret internals" in caplog.text  # but the operator sees it


# --------------------------------------------------------------------------- release


def test_release_by_id_then_again_is_404(client):
    alloc_id = allocate(client).get_json()["id"]
    resp = client.post("/gpu/release", json={"allocation_id": alloc_id})
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "released"
    assert resp.get_json()["allocation_id"] == alloc_id
    assert_error(client.post("/gpu/release", json={"allocation_id": alloc_id}), 404, "not_found")
    assert client.get(f"/gpu/allocations/{alloc_id}").get_json()["status"] == "released"


def test_release_unknown_id_is_404(client):
    assert_error(client.post("/gpu/release", json={"allocation_id": "nobody-42"}), 404, "not_found")


def test_release_without_id_or_service_is_400(client):
    assert_error(client.post("/gpu/release", json={}), 400, "bad_request")
    assert_error(client.post("/gpu/release"), 400, "bad_request")


def test_release_by_service_name_releases_all_of_that_service(client):
    ids = {allocate(client, "svc").get_json()["id"] for _ in range(3)}
    other = allocate(client, "other").get_json()["id"]
    resp = client.post("/gpu/release", json={"service_name": "svc"})
    assert resp.status_code == 200
    assert set(resp.get_json()["released"]) == ids
    live = {a["id"] for a in client.get("/gpu/list").get_json()["allocations"]}
    assert live == {other}


def test_release_of_a_queued_request_cancels_it_and_by_service_leaves_the_queue(make_app):
    """What docs/api.md says of POST /gpu/release for a request that is still queued."""
    client = make_app(nodes=(("node-a", 1),)).test_client()
    allocate(client, "holder")
    queued = [allocate(client, "waiter").get_json()["request_id"] for _ in range(2)]
    assert_error(client.post("/gpu/release", json={"service_name": "waiter"}), 404, "not_found")
    assert client.get(f"/gpu/requests/{queued[0]}").get_json()["status"] == "queued"
    resp = client.post("/gpu/release", json={"allocation_id": queued[0]})
    assert resp.status_code == 200 and resp.get_json()["status"] == "released"
    assert client.get(f"/gpu/requests/{queued[0]}").get_json()["status"] == "cancelled"
    assert client.get(f"/gpu/requests/{queued[1]}").get_json()["status"] == "queued"


# --------------------------------------------------------------------------- inspect


def test_status_lists_every_gpu_with_telemetry_and_allocation_state(make_app):
    client = make_app(nodes=(("node-a", 2), ("node-b", 2))).test_client()
    alloc = allocate(client).get_json()
    gpus = client.get("/gpu/status").get_json()["gpus"]
    assert len(gpus) == 4
    for gpu in gpus:
        for field in ("node", "index", "uuid", "name", "memory_total_mb", "utilization"):
            assert field in gpu
    held = [g for g in gpus if g.get("allocated")]
    assert [(g["node"], g["index"]) for g in held] == [(alloc["node"], alloc["gpu_ids"][0])]


def test_list_returns_gpus_allocations_and_queue(client):
    a = allocate(client, "big", workload_data={"required_gpus": 8}).get_json()
    q = allocate(client, "waiter").get_json()
    body = client.get("/gpu/list").get_json()
    assert len(body["gpus"]) == 8
    assert [x["id"] for x in body["allocations"]] == [a["id"]]
    assert [x["id"] for x in body["queue"]] == [q["request_id"]]


def test_workload_analyses_without_side_effects(client):
    before = client.get("/gpu/list").get_json()
    resp = client.post(
        "/gpu/workload",
        json={"workload_type": "training", "workload_data": {"model_size": "large"}},
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["required_gpus"] == 4 and body["min_memory_mb"] == 16384
    assert body["decided_by"] == "rules"
    assert client.get("/gpu/list").get_json() == before
    assert_error(
        client.post("/gpu/workload", json={"workload_type": "nope"}), 422, "validation_error"
    )


def test_unknown_ids_are_404(client):
    assert_error(client.get("/gpu/requests/nobody-1"), 404, "not_found")
    assert_error(client.get("/gpu/allocations/nobody-1"), 404, "not_found")
    assert_error(client.delete("/gpu/requests/nobody-1"), 404, "not_found")
    assert_error(client.post("/gpu/allocations/nobody-1/renew"), 404, "not_found")


def test_queued_request_is_not_an_allocation_yet(client):
    allocate(client, "big", workload_data={"required_gpus": 8})
    rid = allocate(client, "waiter").get_json()["request_id"]
    assert_error(client.get(f"/gpu/allocations/{rid}"), 404, "not_found")


# --------------------------------------------------------------------------- cancel, renew


def test_cancel_a_queued_request(client):
    allocate(client, "big", workload_data={"required_gpus": 8})
    rid = allocate(client, "waiter").get_json()["request_id"]
    resp = client.delete(f"/gpu/requests/{rid}")
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "cancelled"
    assert client.get(f"/gpu/requests/{rid}").get_json()["status"] == "cancelled"
    assert client.get("/gpu/list").get_json()["queue"] == []


def test_cancel_a_granted_allocation_is_409(client):
    alloc_id = allocate(client).get_json()["id"]
    assert_error(client.delete(f"/gpu/requests/{alloc_id}"), 409, "conflict")


def test_renew_extends_the_lease_from_now(client, clock):
    alloc = allocate(client, ttl_seconds=600).get_json()
    clock.advance(300)
    resp = client.post(f"/gpu/allocations/{alloc['id']}/renew")
    assert resp.status_code == 200
    assert resp.get_json()["expires_at"] == iso(clock.now + 600)
    resp = client.post(f"/gpu/allocations/{alloc['id']}/renew", json={"ttl_seconds": 60})
    assert resp.get_json()["expires_at"] == iso(clock.now + 60)
    assert client.get(f"/gpu/allocations/{alloc['id']}").get_json()["expires_at"] == iso(
        clock.now + 60
    )


def test_renew_validates_its_body(client):
    alloc_id = allocate(client).get_json()["id"]
    err = assert_error(
        client.post(f"/gpu/allocations/{alloc_id}/renew", json={"ttl_seconds": 0}),
        422,
        "validation_error",
    )
    assert "ttl_seconds" in err["details"]


def test_renew_a_released_allocation_is_an_error(client):
    alloc_id = allocate(client).get_json()["id"]
    client.post("/gpu/release", json={"allocation_id": alloc_id})
    assert_error(client.post(f"/gpu/allocations/{alloc_id}/renew"), 409, "conflict")


# --------------------------------------------------------------------------- request ids


def test_every_response_carries_a_request_id(client):
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) >= 16
    assert client.get("/nope").headers["X-Request-ID"]
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )
    bad = client.get("/healthz", headers={"X-Request-ID": "no spaces <script>"})
    assert bad.headers["X-Request-ID"] != "no spaces <script>"


def test_logs_carry_the_request_id(client, caplog):
    caplog.handler.addFilter(logs._RequestIdFilter())
    with caplog.at_level(logging.DEBUG, logger="gpu_orchestrator.access"):
        client.get("/gpu/status", headers={"X-Request-ID": "trace-me-42"})
    lines = [r for r in caplog.records if r.name == "gpu_orchestrator.access"]
    assert lines and lines[-1].request_id == "trace-me-42"
    assert "/gpu/status" in lines[-1].getMessage()


# --------------------------------------------------------------------------- docs


def test_openapi_spec_describes_every_endpoint(client):
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    for path, method in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/gpu/allocate", "post"),
        ("/gpu/release", "post"),
        ("/gpu/status", "get"),
        ("/gpu/list", "get"),
        ("/gpu/workload", "post"),
        ("/gpu/requests/{request_id}", "get"),
        ("/gpu/requests/{request_id}", "delete"),
        ("/gpu/allocations/{allocation_id}", "get"),
        ("/gpu/allocations/{allocation_id}/renew", "post"),
    ]:
        assert method in paths[path], (path, method)
    schemas = spec["components"]["schemas"]
    body = schemas["AllocateRequest"]["properties"]
    assert body["service_name"]["description"]
    assert set(body["workload_type"]["enum"]) >= {"training", "generic"}
    assert set(paths["/gpu/allocate"]["post"]["responses"]) >= {"200", "202", "422", "429"}


def test_docs_page_loads_only_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "cdn" not in html.lower() and "https://" not in html
    for asset in (
        "/docs/assets/swagger-ui.css",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui-standalone-preset.js",
    ):
        assert asset in html
        with client.get(asset) as resp:  # a file response: close it
            assert resp.status_code == 200 and len(resp.get_data()) > 1000
    assert_error(client.get("/docs/assets/index.html"), 404, "not_found")


# ------------------------------------------------------------- reason and eta (issue 14)


def test_every_queued_answer_carries_reason_and_eta(client):
    held = client.post(
        "/gpu/allocate",
        json={"service_name": "train", "workload_data": {"required_gpus": 8}, "ttl_seconds": 600},
    ).get_json()
    q = client.post("/gpu/allocate", json={"service_name": "waits", "ttl_seconds": 60})
    assert q.status_code == 202
    body = q.get_json()
    assert body["reason"] == "capacity" and body["eta"] == held["expires_at"]
    own = client.get(f"/gpu/requests/{body['id']}").get_json()
    assert (own["reason"], own["eta"]) == (body["reason"], body["eta"])
    listed = client.get("/gpu/list").get_json()["queue"]
    assert [(r["id"], r["reason"], r["eta"]) for r in listed] == [
        (body["id"], "capacity", held["expires_at"])
    ]
    granted = client.get(f"/gpu/allocations/{held['id']}").get_json()
    assert "eta" not in granted


@pytest.mark.parametrize(
    "name", ["gpu01.example.com", "node:7", ".hidden", "..a", "a..b", "a b", "nœud-1"]
)
def test_every_node_name_a_monitor_may_report_is_reached_by_the_admin_routes(make_app, name):
    """The names report_node accepts (request_rules.NODE_NAME_RULE: no '/', not '.' or '..')
    each fit one path segment: cordon, uncordon and drain reach the node, as do its GPUs."""
    from urllib.parse import quote

    client = make_app(nodes=((name, 2),)).test_client()
    path = "/admin/nodes/" + quote(name, safe="")
    for action, cordoned in (("cordon", True), ("uncordon", False), ("drain", True)):
        resp = client.post(f"{path}/{action}")
        assert resp.status_code == 200, (action, resp.get_data(as_text=True))
        assert resp.get_json()["name"] == name and resp.get_json()["cordoned"] is cordoned
    resp = client.post("/admin/gpus/" + quote(name, safe="") + "/1/uncordon")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert [n["name"] for n in client.get("/admin/nodes").get_json()["nodes"]] == [name]
    # and a request may name it (``nodes`` takes the same rule: 'a b' and 'nœud-1' were 422s)
    client.post(f"{path}/uncordon")
    resp = client.post("/gpu/allocate", json={"service_name": "pin", "nodes": [name]})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["node"] == name


@pytest.mark.parametrize("name", [".", "..", "rack-1/gpu-1", "a|b", "50%", "x" * 254])
def test_a_request_naming_a_node_no_monitor_may_report_names_the_field(make_app, name):
    client = make_app(nodes=(("node-a", 2),)).test_client()
    resp = client.post("/gpu/allocate", json={"service_name": "pin", "nodes": [name]})
    body = assert_error(resp, 422, "validation_error")
    assert "nodes" in body["details"], body
