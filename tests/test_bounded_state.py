"""Nothing a client sends may grow server state without bound (issue 11, part 2).

Metric labels come from fixed sets; a rejected request writes nothing to Redis; per-service
series are capped; one owner cannot take the whole queue; workload_data is size-limited. All
against a real redis-server (the limits live in the Lua scripts).
"""
from __future__ import annotations

import random
import string

import pytest

from app.metrics import METHODS
from tests.api_support import allocate, assert_error, clock, make_app  # noqa: F401 (fixtures)
from tests.test_metrics import scrape, value

KEYS = {"key-team-a-1f2e3d": "team-a", "key-team-b-4c5b6a": "team-b",
        "key-admin-7d8e9f": "root"}


def hdr(key):
    return {"X-API-Key": key}


def _state(redis) -> dict:
    """Every key with its type and size, the stats hash and the event stream's length."""
    out = {}
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key)
        size = {"hash": redis.hlen, "zset": redis.zcard, "set": redis.scard,
                "list": redis.llen, "stream": redis.xlen}.get(kind)
        out[key] = (kind, size(key) if size else redis.get(key))
    return out


def test_random_http_methods_share_one_label(make_app):
    client = make_app().test_client()
    rng = random.Random(11)
    for _ in range(300):
        method = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 12)))
        client.open("/gpu/status", method=method)
        client.open(f"/x{rng.randrange(10**9)}", method=method)
    client.get("/gpu/status")
    m = scrape(client)
    samples = m["gpu_orchestrator_http_requests_total"]
    methods = {lab["method"] for lab, _ in samples}
    routes = {lab["route"] for lab, _ in samples}
    assert methods <= METHODS | {"other"}, methods
    assert value(m, "gpu_orchestrator_http_requests_total", method="other") >= 600
    assert routes <= {"/gpu/status", "<unmatched>", "/metrics"}, routes
    assert len(samples) < 10


def test_rejected_allocates_write_nothing_to_redis(make_app, redis):
    app = make_app(nodes=(("node-a", 2),),
                   scheduler={"max_queue_size": 1, "max_queued_per_owner": 1})
    client = app.test_client()
    assert allocate(client, "holder", workload_data={"required_gpus": 2}).status_code == 200
    assert allocate(client, "waiter").status_code == 202  # the queue is now full
    before = _state(redis)
    for i in range(60):
        svc = f"reject-{i}"
        # unsatisfiable, invalid, too large, queue full: every kind of 4xx
        assert allocate(client, svc, workload_data={"required_gpus": 64}).status_code == 422
        assert allocate(client, svc, priority=99).status_code == 422
        assert allocate(client, svc, workload_data={"pad": "x" * 9000}).status_code == 413
        assert allocate(client, svc).status_code == 429
    after = _state(redis)
    meta = app.extensions["gpu_engine"].keys.meta()
    # the queue-full attempts run a schedule pass for the others (meta's pass stamps may move)
    before.pop(meta), after.pop(meta)
    stats = app.extensions["gpu_engine"].keys.stats()
    assert not [f for f in redis.hkeys(stats) if "reject-" in f]
    assert after == before
    m = scrape(client)
    assert not [lab for lab, _ in m.get("gpu_orchestrator_allocations_total", [])
                if lab["service"].startswith("reject-")]


def test_per_service_series_are_capped(make_app, redis):
    app = make_app(monitoring={"max_service_labels": 3})
    client = app.test_client()
    for i in range(12):
        rec = allocate(client, f"svc-{i}").get_json()
        assert client.post("/gpu/release", json={"allocation_id": rec["id"]}).status_code == 200
    m = scrape(client)
    series = m["gpu_orchestrator_allocations_total"]
    services = {lab["service"] for lab, _ in series}
    assert services == {"svc-0", "svc-1", "svc-2", "other"}
    assert value(m, "gpu_orchestrator_allocations_total", service="other",
                 status="allocated") == 9
    fields = redis.hkeys(app.extensions["gpu_engine"].keys.stats())
    assert not [f for f in fields if f.startswith("alloc|svc-") and f.split("|")[1] not in
                ("svc-0", "svc-1", "svc-2")]


@pytest.fixture
def authed(make_app):
    return make_app(nodes=(("node-a", 1),), scheduler={"max_queue_size": 8},
                    auth={"enabled": True, "api_keys": KEYS, "admins": ["root"]})


def _queue(client, key, service="job"):
    return client.post("/gpu/allocate", headers=hdr(key), json={"service_name": service})


def test_one_owner_cannot_fill_the_queue(authed):
    client = authed.test_client()
    a, b = list(KEYS)[:2]
    assert _queue(client, a).status_code == 200  # takes the only GPU
    # default share: a quarter of max_queue_size (8) = 2, whatever service names it uses
    assert _queue(client, a, "job-1").status_code == 202
    assert _queue(client, a, "job-2").status_code == 202
    resp = _queue(client, a, "job-3")
    err = assert_error(resp, 429, "owner_queue_full")
    assert int(resp.headers["Retry-After"]) > 0
    assert err["details"] == {"queued": 2, "limit": 2}
    # the other team still gets in
    for _ in range(2):
        assert _queue(client, b).status_code == 202
    assert_error(_queue(client, b), 429, "owner_queue_full")
    # a cancelled request gives the owner its slot back
    queued = [r for r in client.get("/gpu/list", headers=hdr(list(KEYS)[2])).get_json()["queue"]
              if r["owner"] == "team-a"]
    assert client.delete(f"/gpu/requests/{queued[0]['id']}", headers=hdr(a)).status_code == 200
    assert _queue(client, a, "job-4").status_code == 202


def test_without_auth_the_share_is_per_service(make_app):
    client = make_app(nodes=(("node-a", 1),),
                      scheduler={"max_queue_size": 20, "max_queued_per_owner": 3}).test_client()
    assert allocate(client, "hog").status_code == 200
    for _ in range(3):
        assert allocate(client, "hog").status_code == 202
    assert_error(allocate(client, "hog"), 429, "owner_queue_full")
    assert allocate(client, "polite").status_code == 202


def test_owner_counts_follow_grants_and_timeouts(make_app, redis, clock):
    app = make_app(nodes=(("node-a", 1),),
                   scheduler={"max_queue_size": 20, "max_queued_per_owner": 2,
                              "queue_timeout": "60s"})
    client = app.test_client()
    engine = app.extensions["gpu_engine"]
    first = allocate(client, "s").get_json()
    allocate(client, "s")
    allocate(client, "s")
    assert redis.hgetall(engine.keys.queue_owners()) == {"s:s": "2"}
    client.post("/gpu/release", json={"allocation_id": first["id"]})  # one granted
    assert redis.hgetall(engine.keys.queue_owners()) == {"s:s": "1"}
    clock.advance(61)
    engine.reap()  # the other times out
    assert redis.hgetall(engine.keys.queue_owners()) == {}


@pytest.mark.parametrize("path", ["/gpu/allocate", "/gpu/workload"])
def test_workload_data_past_the_limit_is_413(make_app, redis, path):
    app = make_app()
    client = app.test_client()
    big = {"service_name": "svc", "workload_data": {"notes": "x" * 8200}}
    err = assert_error(client.post(path, json=big), 413, "payload_too_large")
    assert err["details"]["field"] == "workload_data"
    assert err["details"]["limit"] == 8192
    ok = {"service_name": "svc", "workload_data": {"notes": "x" * 8000}}
    assert client.post(path, json=ok).status_code == 200
    small = make_app(server={"max_workload_data_bytes": 100}).test_client()
    assert_error(small.post(path, json={"service_name": "svc",
                                        "workload_data": {"notes": "x" * 100}}),
                 413, "payload_too_large")
