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
from app.request_rules import MAX_SHARED_PER_GPU
from tests.api_support import allocate, assert_error, clock, make_app  # noqa: F401 (fixtures)
from tests.test_metrics import scrape, value

KEYS = {"key-team-a-1f2e3d": "team-a", "key-team-b-4c5b6a": "team-b", "key-admin-7d8e9f": "root"}


def hdr(key):
    return {"X-API-Key": key}


def _state(redis) -> dict:
    """Every key with its type and size, the stats hash and the event stream's length."""
    out = {}
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key)
        size = {
            "hash": redis.hlen,
            "zset": redis.zcard,
            "set": redis.scard,
            "list": redis.llen,
            "stream": redis.xlen,
        }.get(kind)
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
    app = make_app(
        nodes=(("node-a", 2),), scheduler={"max_queue_size": 1, "max_queued_per_owner": 1}
    )
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
    assert not [
        lab
        for lab, _ in m.get("gpu_orchestrator_allocations_total", [])
        if lab["service"].startswith("reject-")
    ]


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
    assert value(m, "gpu_orchestrator_allocations_total", service="other", status="allocated") == 9
    fields = redis.hkeys(app.extensions["gpu_engine"].keys.stats())
    assert not [
        f
        for f in fields
        if f.startswith("alloc|svc-") and f.split("|")[1] not in ("svc-0", "svc-1", "svc-2")
    ]


@pytest.fixture
def authed(make_app):
    return make_app(
        nodes=(("node-a", 1),),
        scheduler={"max_queue_size": 8},
        auth={"enabled": True, "api_keys": KEYS, "admins": ["root"]},
    )


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
    queued = [
        r
        for r in client.get("/gpu/list", headers=hdr(list(KEYS)[2])).get_json()["queue"]
        if r["owner"] == "team-a"
    ]
    assert client.delete(f"/gpu/requests/{queued[0]['id']}", headers=hdr(a)).status_code == 200
    assert _queue(client, a, "job-4").status_code == 202


def test_without_auth_the_share_is_per_service(make_app):
    client = make_app(
        nodes=(("node-a", 1),), scheduler={"max_queue_size": 20, "max_queued_per_owner": 3}
    ).test_client()
    assert allocate(client, "hog").status_code == 200
    for _ in range(3):
        assert allocate(client, "hog").status_code == 202
    assert_error(allocate(client, "hog"), 429, "owner_queue_full")
    assert allocate(client, "polite").status_code == 202


def test_owner_counts_follow_grants_and_timeouts(make_app, redis, clock):
    app = make_app(
        nodes=(("node-a", 1),),
        scheduler={"max_queue_size": 20, "max_queued_per_owner": 2, "queue_timeout": "60s"},
    )
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
    assert_error(
        small.post(path, json={"service_name": "svc", "workload_data": {"notes": "x" * 100}}),
        413,
        "payload_too_large",
    )


# --------------------------------------------------------------------------- listings


def _fill(client, allocated=3, queued=25, pad=2000):
    """``allocated`` one-GPU grants on a node of that many GPUs, then ``queued`` waiting."""
    ids = []
    for i in range(allocated + queued):
        resp = allocate(client, f"s{i % 4}", workload_data={"required_gpus": 1, "pad": "x" * pad})
        assert resp.status_code in (200, 202), resp.get_data(as_text=True)
        ids.append(resp.get_json()["id"])
    return ids


def test_listing_records_are_compact(make_app):
    client = make_app(nodes=(("node-a", 2),)).test_client()
    ids = _fill(client, allocated=2, queued=3)
    body = client.get("/gpu/list").get_json()
    for rec in body["allocations"] + body["queue"]:
        assert "workload_data" not in rec
        assert rec["service_name"] and rec["status"] in ("allocated", "queued")
    # one request still shows everything
    assert client.get(f"/gpu/requests/{ids[0]}").get_json()["workload_data"]["pad"]


def test_listing_pages_walk_every_request_once_in_order(make_app):
    client = make_app(nodes=(("node-a", 3),)).test_client()
    ids = _fill(client, allocated=3, queued=25)
    full = client.get("/gpu/list?limit=1000").get_json()
    assert full["next"] is None and full["allocations_total"] == 3
    assert full["queue_depth"] == 25 and full["limit"] == 1000
    want = [r["id"] for r in full["allocations"]] + [r["id"] for r in full["queue"]]
    assert sorted(want) == sorted(ids)
    seen, positions, after, pages = [], [], None, 0
    while True:
        url = "/gpu/list?limit=4" + (f"&after={after}" if after else "")
        page = client.get(url).get_json()
        pages += 1
        assert len(page["allocations"]) + len(page["queue"]) <= 4
        assert page["gpus"] and page["queue_depth"] == 25
        seen += [r["id"] for r in page["allocations"]] + [r["id"] for r in page["queue"]]
        positions += [r["position"] for r in page["queue"]]
        after = page["next"]
        if after is None:
            break
    assert seen == want
    assert positions == list(range(1, 26))
    assert pages == 7  # 28 requests, 4 a page: no empty page at the end


def test_a_page_resumes_after_its_last_request_left(make_app):
    client = make_app(nodes=(("node-a", 1),)).test_client()
    ids = _fill(client, allocated=1, queued=6)
    page = client.get("/gpu/list?limit=3").get_json()  # the allocation and 2 queued
    last = page["queue"][-1]["id"]
    assert last == ids[2]
    assert client.delete(f"/gpu/requests/{last}").status_code == 200
    rest = client.get(f"/gpu/list?limit=10&after={page['next']}").get_json()
    assert [r["id"] for r in rest["queue"]] == ids[3:]
    assert [r["position"] for r in rest["queue"]] == [2, 3, 4, 5]


def test_the_default_page_is_bounded(make_app):
    client = make_app(
        nodes=(("node-a", 1),), scheduler={"max_queued_per_owner": 1000}
    ).test_client()
    _fill(client, allocated=1, queued=120, pad=10)
    page = client.get("/gpu/list").get_json()
    assert len(page["allocations"]) + len(page["queue"]) == 100
    assert page["limit"] == 100 and page["next"] and page["queue_depth"] == 120


@pytest.mark.parametrize(
    "query,field",
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        # str.isdigit() is true for these, int() refuses them: was a 500
        ("limit=%C2%B2", "limit"),
        ("limit=%E2%91%A0", "limit"),
        ("after=garbage", "after"),
        ("after=q|nan|svc-1", "after"),
    ],
)
def test_bad_listing_parameters_are_422_naming_them(make_app, query, field):
    client = make_app().test_client()
    err = assert_error(client.get(f"/gpu/list?{query}"), 422, "validation_error")
    assert field in err["details"]


def test_listing_gpu_rows_name_their_holders_like_status(make_app):
    """/gpu/list fills each GPU's holder fields from the allocations read with its page; they
    must say what the GPU hashes (/gpu/status) say."""
    client = make_app(nodes=(("node-a", 3),)).test_client()
    excl = allocate(client, "x", workload_data={"required_gpus": 2}).get_json()
    for _ in range(2):
        assert (
            allocate(
                client, "sh", sharing="shared", workload_data={"min_memory_mb": 1000}
            ).status_code
            == 200
        )
    listed = {g["index"]: g for g in client.get("/gpu/list?limit=1").get_json()["gpus"]}
    status = {g["index"]: g for g in client.get("/gpu/status").get_json()["gpus"]}
    keys = ("allocated_to", "shared_n", "shared_mb", "allocated")
    assert {i: [g.get(k) for k in keys] for i, g in listed.items()} == {
        i: [g.get(k) for k in keys] for i, g in status.items()
    }
    assert sorted(i for i, g in listed.items() if g["allocated_to"] == excl["id"]) == sorted(
        excl["gpu_ids"]
    )
    assert sum(g["shared_n"] or 0 for g in listed.values()) == 2


def test_the_owner_share_holds_under_concurrent_allocates(settings, redis):
    """Eight threads, one owner, 80 requests that all have to wait: exactly the share is
    queued (the check and the enqueue are one script), and the rest are owner_queue_full."""
    import threading

    from app import errors
    from app.engine import Engine
    from tests.test_engine import gpu_list

    st = settings.replace(scheduler={"max_queue_size": 100, "max_queued_per_owner": 5})
    engine = Engine(redis, st)
    engine.report_node("a", gpu_list(1))
    engine.allocate({"service_name": "hold", "owner": "team-a"})
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker():
        for _ in range(10):
            try:
                rec = engine.allocate(
                    {"service_name": f"t{threading.get_ident() % 97}", "owner": "team-a"}
                )
                got = rec["status"]
            except errors.OwnerQueueFull:
                got = "refused"
            with lock:
                outcomes.append(got)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("queued") == 5 and outcomes.count("refused") == 75
    assert engine.counts()["queue_depth"] == 5
    assert redis.hgetall(engine.keys.queue_owners()) == {"o:team-a": "5"}
    # another owner is not affected
    assert engine.allocate({"service_name": "b", "owner": "team-b"})["status"] == "queued"


def test_a_gpu_holds_at_most_max_shared_per_gpu_shared_allocations(make_app):
    """Memory does not bound shared allocations (0 MB asks for none, 1 MB fits 80,000 times on
    an 80 GB GPU), and each live one costs a record and a share of every script that walks a
    node's allocations: 10,000 on one GPU made a drain one 0.7 s script and a console poll
    0.5 s of Redis. A GPU takes MAX_SHARED_PER_GPU; the next waits (reason capacity, its eta
    the first of their leases to end) and is granted when one of them leaves."""
    app = make_app(nodes=(("node-a", 1),))
    client = app.test_client()
    held = [
        allocate(client, f"s{i}", sharing="shared", min_memory_mb=0, ttl_seconds=600 + i)
        for i in range(MAX_SHARED_PER_GPU)
    ]
    assert [r.status_code for r in held] == [200] * MAX_SHARED_PER_GPU
    waiter = allocate(client, "one-more", sharing="shared", min_memory_mb=0)
    assert waiter.status_code == 202
    body = waiter.get_json()
    assert body["reason"] == "capacity"
    assert body["eta"] == held[0].get_json()["expires_at"]
    gone = held[7].get_json()["id"]
    assert client.post("/gpu/release", json={"allocation_id": gone}).status_code == 200
    now = client.get(f"/gpu/requests/{body['id']}").get_json()
    assert now["status"] == "allocated"
    assert allocate(client, "next", sharing="shared", min_memory_mb=0).status_code == 202
