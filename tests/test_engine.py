"""The allocation engine's rules, one behaviour per test, against a real redis-server."""

from __future__ import annotations

import json

import pytest

from app import errors
from app.engine import ERRORS, Engine


def gpu_list(n, mem=81920, free=None, util=0, health="ok", start=0):
    out = []
    for i in range(start, start + n):
        out.append(
            {
                "index": i,
                "uuid": f"GPU-{i}",
                "name": "A100",
                "memory_total_mb": mem,
                "memory_used_mb": mem - (free[i - start] if free else mem),
                "utilization": util[i - start] if isinstance(util, list) else util,
                "temperature": 40,
                "power_draw": 100,
                "health": health[i - start] if isinstance(health, list) else health,
            }
        )
    return out


def req(service="svc", **kw):
    out = {"service_name": service, "required_gpus": 1, "priority": 5}
    out.update(kw)
    return out


def status(engine, rid):
    return engine.get(rid)["status"]


# --------------------------------------------------------------------------- fleet


def test_report_node_registers_gpus_and_fleet_limits(engine):
    engine.report_node("a", gpu_list(4, mem=40000))
    engine.report_node("b", gpu_list(8))
    assert engine.fleet_limits() == {
        "max_gpus_per_node": 8,
        "max_gpu_memory_mb": 81920,
        "gpus_total": 12,
    }
    assert engine.counts() == {
        "allocations_active": 0,
        "gpus_allocated": 0,
        "queue_depth": 0,
        "gpus_total": 12,
        "gpus_available": 12,
    }
    snap = engine.snapshot()
    assert {n["name"] for n in snap["nodes"]} == {"a", "b"}
    g = next(g for g in snap["gpus"] if g["node"] == "a" and g["index"] == 2)
    assert g["memory_total_mb"] == 40000 and g["schedulable"] and g["uuid"] == "GPU-2"


@pytest.mark.parametrize(
    "name", ["", "a|b", "a%b", "rack-1/gpu-1", "/a", "a/", ".", "..", "x" * 254]
)
def test_report_node_refuses_a_node_name_no_admin_path_reaches_naming_the_field(engine, name):
    """'/', '.' and '..' were accepted, but no /admin/nodes/<node>/... path names such a node
    (a '/' splits the segment; HTTP clients drop '.' and '..' segments)."""
    with pytest.raises(errors.ValidationFailed) as err:
        engine.report_node(name, gpu_list(1))
    assert err.value.details == {"field": "node"}
    assert "no '|', '%' or '/', and not '.' or '..'" in str(err.value)
    assert engine.snapshot()["nodes"] == []


def test_report_node_rejects_a_bad_node_name_and_gpu(engine):
    with pytest.raises(errors.ValidationFailed):
        engine.report_node("a|b", gpu_list(1))
    with pytest.raises(errors.ValidationFailed):
        engine.report_node("a", [{"index": 0, "health": "sick"}])


def test_extras_are_stored_and_shown(engine):
    g = gpu_list(1)[0]
    g.update(ecc_uncorrectable=2, xid=79, processes=[{"pid": 7, "used_mb": 100}], mig_mode="off")
    engine.report_node("a", [g])
    view = engine.snapshot()["gpus"][0]
    assert view["processes"] == [{"pid": 7, "used_mb": 100}]
    assert view["ecc_uncorrectable"] == "2" and view["mig_mode"] == "off"


def test_missing_gpu_turns_failed_and_comes_back(engine):
    engine.report_node("a", gpu_list(2))
    engine.report_node("a", gpu_list(1))  # GPU 1 vanished
    gpu1 = next(g for g in engine.snapshot()["gpus"] if g["index"] == 1)
    assert gpu1["health"] == "failed" and gpu1["lost"] and not gpu1["schedulable"]
    assert engine.counts()["gpus_available"] == 1
    names = [e["event"] for e in engine.events()]
    assert names[-1] == "gpu_unhealthy"
    engine.report_node("a", gpu_list(2))
    gpu1 = next(g for g in engine.snapshot()["gpus"] if g["index"] == 1)
    assert gpu1["health"] == "ok" and gpu1["schedulable"]
    assert engine.events()[-1]["event"] == "gpu_recovered"
    assert engine.counts()["gpus_available"] == 2


def test_failed_gpu_keeps_its_allocation_and_recovery_does_not_free_it(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    engine.report_node("a", gpu_list(1, health="failed"))
    assert status(engine, a["id"]) == "allocated"
    engine.report_node("a", gpu_list(1))
    assert engine.allocate(req())["status"] == "queued"


def test_cordon_blocks_new_grants_and_clearing_it_schedules(engine):
    engine.report_node("a", gpu_list(1))
    view = engine.set_gpu_schedulable("a", 0, False)
    assert view["cordoned"] and not view["schedulable"]
    q = engine.allocate(req())
    assert q["status"] == "queued"
    engine.report_node("a", gpu_list(1))  # a recovery report does not clear an admin cordon
    assert status(engine, q["id"]) == "queued"
    engine.set_gpu_schedulable("a", 0, True)
    assert status(engine, q["id"]) == "allocated"
    with pytest.raises(errors.NotFound):
        engine.set_gpu_schedulable("a", 9, False)


def test_heartbeat_lapse_makes_a_node_unschedulable(engine, clock):
    engine.report_node("old", gpu_list(4))
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.report_node("new", gpu_list(1))
    a = engine.allocate(req())
    assert a["node"] == "new"
    b = engine.allocate(req())
    assert b["status"] == "queued"  # the old node's free GPUs are not used
    assert engine.counts()["gpus_available"] == 0
    engine.report_node("old", gpu_list(4))  # back: capacity appears, the queue moves
    assert engine.get(b["id"])["node"] == "old"


# --------------------------------------------------------------------------- placement


def test_all_gpus_of_an_allocation_sit_on_one_node(engine):
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(3))
    a = engine.allocate(req(required_gpus=3))
    assert a["node"] == "b" and sorted(a["gpu_ids"]) == [0, 1, 2]
    # 2 free on a, 0 on b: three GPUs exist in total but not on one node
    b = engine.allocate(req(required_gpus=3))
    assert b["status"] == "queued"


def test_qualification_by_memory_utilization_health(engine):
    engine.report_node(
        "a",
        gpu_list(
            4,
            mem=40000,
            free=[1000, 30000, 30000, 30000],
            util=[0, 95, 0, 0],
            health=["ok", "ok", "degraded", "ok"],
        ),
    )
    a = engine.allocate(req(min_memory_mb=20000, max_utilization=80))
    assert a["gpu_ids"] == [3]  # 0: too little memory, 1: too busy, 2: not healthy
    b = engine.allocate(req(min_memory_mb=20000, max_utilization=80))
    assert b["status"] == "queued"


def test_max_memory_excludes_gpus_with_more_free_memory(engine):
    engine.report_node("a", gpu_list(2, mem=81920, free=[81920, 20000]))
    a = engine.allocate(req(min_memory_mb=10000, max_memory_mb=30000))
    assert a["gpu_ids"] == [1]


def test_best_fit_takes_the_node_with_fewest_free_gpus_that_fit(engine):
    engine.report_node("big", gpu_list(8))
    engine.report_node("small", gpu_list(2))
    engine.report_node("mid", gpu_list(4))
    assert engine.allocate(req(required_gpus=2))["node"] == "small"
    assert engine.allocate(req(required_gpus=3))["node"] == "mid"
    assert engine.allocate(req(required_gpus=1))["node"] == "mid"
    assert engine.allocate(req(required_gpus=5))["node"] == "big"


def test_preferred_gpus_outrank_best_fit(engine):
    engine.report_node("small", gpu_list(2))
    engine.report_node("big", gpu_list(4))
    a = engine.allocate(req(preferred_gpus=[3]))
    assert a["node"] == "big" and a["gpu_ids"] == [3]
    # preferred GPU busy everywhere: best fit again
    b = engine.allocate(req(preferred_gpus=[3]))
    assert b["node"] == "small"


def test_ranking_within_node_preferred_then_memory_then_utilization(engine):
    engine.report_node(
        "a", gpu_list(4, mem=81920, free=[50000, 80000, 80000, 60000], util=[0, 30, 10, 0])
    )
    a = engine.allocate(req(required_gpus=3, preferred_gpus=[0]))
    assert a["gpu_ids"] == [0, 2, 1]


def test_a_single_gpu_goes_by_free_memory_then_utilization_then_index(engine):
    engine.report_node(
        "a", gpu_list(4, mem=81920, free=[50000, 80000, 80000, 80000], util=[0, 30, 10, 10])
    )
    order = [engine.allocate(req())["gpu_ids"] for _ in range(4)]
    assert order == [[2], [3], [1], [0]]


def test_shared_goes_to_the_tightest_fit_and_reservations_cap_it(engine):
    gpus = gpu_list(3)
    for g, total in zip(gpus, (40000, 20000, 30000)):
        g.update(memory_total_mb=total, memory_used_mb=0)  # idle: reservations decide
    engine.report_node("a", gpus)
    s1 = engine.allocate(req(sharing="shared", min_memory_mb=15000))
    assert s1["gpu_ids"] == [1]  # 20000 is the tightest that holds 15000
    s2 = engine.allocate(req(sharing="shared", min_memory_mb=10000))
    assert s2["gpu_ids"] == [2]  # GPU 1 has 5000 left; 30000 beats 40000
    s3 = engine.allocate(req(sharing="shared", min_memory_mb=20000))
    assert s3["gpu_ids"] == [2]  # 20000 left on GPU 2 fits exactly
    s4 = engine.allocate(req(sharing="shared", min_memory_mb=30000))
    assert s4["gpu_ids"] == [0]
    s5 = engine.allocate(req(sharing="shared", min_memory_mb=15000))
    assert s5["status"] == "queued"  # 5000, 0 and 10000 MB left
    gpus = {g["index"]: g for g in engine.snapshot()["gpus"]}
    assert gpus[2]["shared_n"] == 2 and gpus[2]["shared_mb"] == 30000
    engine.release(s3["id"])
    assert engine.get(s5["id"])["gpu_ids"] == [2]


def test_exclusive_and_shared_never_mix(engine):
    engine.report_node("a", gpu_list(2))
    s = engine.allocate(req(sharing="shared", min_memory_mb=1000))
    x = engine.allocate(req())
    assert x["gpu_ids"] != s["gpu_ids"]
    # the only GPU without a shared allocation is now exclusive: nothing left for either
    assert engine.allocate(req())["status"] == "queued"
    engine.release(x["id"])
    s2 = engine.allocate(req(sharing="shared", min_memory_mb=1000))
    assert s2["gpu_ids"] == s["gpu_ids"]  # tighter: the GPU already shared


def test_shared_request_must_take_one_gpu(engine):
    engine.report_node("a", gpu_list(2))
    with pytest.raises(errors.ValidationFailed) as exc:
        engine.allocate(req(sharing="shared", required_gpus=2))
    assert exc.value.details["field"] == "required_gpus"


@pytest.mark.parametrize(
    "bad",
    [
        {"priority": 0},
        {"priority": 11},
        {"required_gpus": 0},
        {"sharing": "maybe"},
        {"max_utilization": 101},
        {"preferred_gpus": [-1]},
        {"webhook_events": ["allocated"]},
        {"min_memory_mb": 100, "max_memory_mb": 50},
        {"service_name": "bad name"},
        {"depends_on": [""]},
        {"ttl_seconds": -1},
        {"estimated_duration_seconds": 0},
    ],
)
def test_bad_requests_name_the_field(engine, bad):
    engine.report_node("a", gpu_list(1))
    with pytest.raises(errors.ValidationFailed) as exc:
        engine.allocate(req(**bad))
    assert exc.value.details["field"] in set(bad) | {"required_gpus"}


# --------------------------------------------------------------------------- rejections


def test_unsatisfiable_requests_are_rejected_with_the_reason(engine):
    with pytest.raises(errors.Unsatisfiable) as exc:
        engine.allocate(req())
    assert exc.value.details["reason"] == "no_gpus"
    engine.report_node("a", gpu_list(4, mem=40000))
    with pytest.raises(errors.Unsatisfiable) as exc:
        engine.allocate(req(required_gpus=5))
    assert exc.value.details == {"field": "required_gpus", "reason": "required_gpus", "limit": 4}
    assert "largest node (4 GPUs)" in exc.value.message
    with pytest.raises(errors.Unsatisfiable) as exc:
        engine.allocate(req(min_memory_mb=50000))
    assert exc.value.details["limit"] == 40000
    assert engine.counts()["queue_depth"] == 0
    # a rejected request writes nothing: no per-service counter, no stats field
    assert engine.stats()["allocations"] == {}


def test_full_queue_rejects_with_queue_full(make_engine):
    engine = make_engine(max_queue_size=2, max_queued_per_owner=2)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    engine.allocate(req())
    engine.allocate(req())
    with pytest.raises(errors.QueueFull) as exc:
        engine.allocate(req())
    assert exc.value.status == 429 and exc.value.details["queue_depth"] == 2


# --------------------------------------------------------------------------- lifecycle


def test_release_frees_and_release_twice_or_unknown_is_not_found(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    rel = engine.release(a["id"])
    assert rel["status"] == "released" and rel["released_at"] is not None
    before = (engine.counts(), len(engine.events()))
    with pytest.raises(errors.NotFound) as exc:
        engine.release(a["id"])
    assert exc.value.details["status"] == "released"
    with pytest.raises(errors.NotFound):
        engine.release("svc-0-0")
    assert (engine.counts(), len(engine.events())) == before


def test_release_of_a_queued_request_cancels_it(engine):
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    q = engine.allocate(req())
    assert engine.release(q["id"])["status"] == "cancelled"
    assert engine.counts()["queue_depth"] == 0


def test_release_grants_the_next_queued_request(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    q = engine.allocate(req())
    assert q["position"] == 1
    engine.release(a["id"])
    g = engine.get(q["id"])
    assert g["status"] == "allocated" and "position" not in g


def test_release_by_service_only_the_principals_own(engine):
    engine.report_node("a", gpu_list(4))
    mine = [engine.allocate(req("web", owner="alice"))["id"] for _ in range(2)]
    theirs = engine.allocate(req("web", owner="bob"))["id"]
    engine.allocate(req("other", owner="alice"))
    done = engine.release_by_service("web", principal="alice")
    assert sorted(r["id"] for r in done) == sorted(mine)
    assert status(engine, theirs) == "allocated"
    with pytest.raises(errors.NotFound):
        engine.release_by_service("web", principal="alice")
    by_admin = engine.release_by_service("web", principal="x", admin=True)
    assert [r["id"] for r in by_admin] == [theirs]
    with pytest.raises(errors.NotFound):
        engine.release_by_service("nobody")


def test_ownership_checks(engine):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate(req(owner="alice"))
    q = engine.allocate(req(owner="alice", required_gpus=2))
    for call in (
        lambda: engine.release(a["id"], principal="bob"),
        lambda: engine.renew(a["id"], 60, principal="bob"),
        lambda: engine.cancel(q["id"], principal="bob"),
    ):
        with pytest.raises(errors.Forbidden):
            call()
    assert status(engine, a["id"]) == "allocated"
    engine.renew(a["id"], 60, principal="alice")
    engine.cancel(q["id"], principal="bob", admin=True)
    engine.release(a["id"])  # principal None: auth off
    assert status(engine, a["id"]) == "released"


def test_renew_extends_a_live_lease_only(engine, clock):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(ttl_seconds=100))
    assert a["expires_at"] == clock.t + 100
    clock.advance(50)
    assert engine.renew(a["id"])["expires_at"] == clock.t + 100  # the allocation's own lease
    assert engine.renew(a["id"], 500)["expires_at"] == clock.t + 500
    clock.advance(499)
    assert engine.reap()["expired"] == []
    engine.release(a["id"])
    with pytest.raises(errors.Conflict):
        engine.renew(a["id"])
    with pytest.raises(errors.NotFound):
        engine.renew("nope-1")


def test_cancel_only_queued(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    q = engine.allocate(req())
    c = engine.cancel(q["id"])
    assert c["status"] == "cancelled" and c["ended_at"] is not None
    with pytest.raises(errors.Conflict) as exc:
        engine.cancel(a["id"])
    assert exc.value.details["status"] == "allocated"
    with pytest.raises(errors.Conflict):
        engine.cancel(q["id"])
    with pytest.raises(errors.NotFound):
        engine.cancel("nope-1")


def test_get_after_finish_is_kept_for_history_ttl(engine, redis):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    assert redis.ttl(engine.keys.request(a["id"])) == -1  # live: no expiry
    engine.release(a["id"])
    assert engine.get(a["id"])["status"] == "released"
    ttl = redis.ttl(engine.keys.request(a["id"]))
    history = engine.settings.scheduler.history_ttl
    assert history - 5 <= ttl <= history
    with pytest.raises(errors.NotFound):
        engine.get("never-1")


def test_ids_carry_the_service_name_and_do_not_repeat(engine):
    engine.report_node("a", gpu_list(8))
    ids = {engine.allocate(req("my-svc"))["id"] for _ in range(8)}
    assert len(ids) == 8
    assert all(
        i.startswith("my-svc-") and i[len("my-svc-") :].replace("-", "").isdigit() for i in ids
    )


# --------------------------------------------------------------------------- leases


def test_lease_from_ttl_estimate_or_default(make_engine, clock):
    engine = make_engine(default_ttl_multiplier=3.0, default_ttl=600, max_ttl=7200)
    engine.report_node("a", gpu_list(4))
    now = clock.t
    assert engine.allocate(req(ttl_seconds=100))["expires_at"] == now + 100
    assert engine.allocate(req(estimated_duration_seconds=100))["expires_at"] == now + 300
    assert engine.allocate(req())["expires_at"] == now + 600
    assert engine.allocate(req(estimated_duration_seconds=5000))["expires_at"] == now + 7200
    with pytest.raises(errors.ValidationFailed):
        engine.allocate(req(ttl_seconds=7201))


def test_never_infinite_unless_configured(make_engine, clock):
    engine = make_engine()
    engine.report_node("a", gpu_list(1))
    with pytest.raises(errors.ValidationFailed) as exc:
        engine.allocate(req(ttl_seconds=0))
    assert exc.value.details["field"] == "ttl_seconds"
    engine = make_engine(allow_infinite_ttl=True, max_ttl=0)
    a = engine.allocate(req(ttl_seconds=0))
    assert a["expires_at"] is None
    clock.advance(10**8)
    engine.report_node("a", gpu_list(1))  # the monitor keeps reporting: the node stays
    assert engine.reap()["expired"] == []
    assert status(engine, a["id"]) == "allocated"


def test_reap_expires_leases_and_times_out_the_queue(make_engine, clock, redis):
    engine = make_engine(queue_timeout=300)
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(ttl_seconds=100, webhook_url="http://h/x", webhook_events=["expired"]))
    q1 = engine.allocate(
        req(
            required_gpus=1,
            queue_timeout_seconds=50,
            webhook_url="http://h/y",
            webhook_events=["timed_out"],
        )
    )
    q2 = engine.allocate(req())
    clock.advance(60)
    engine.report_node("a", gpu_list(1))  # the monitor keeps the heartbeat fresh
    out = engine.reap()
    assert out["timed_out"] == [q1["id"]] and out["expired"] == []
    clock.advance(50)
    engine.report_node("a", gpu_list(1))  # the monitor keeps the heartbeat fresh
    out = engine.reap()
    assert out["expired"] == [a["id"]]
    assert [g["id"] for g in out["granted"]] == [q2["id"]]
    assert status(engine, q1["id"]) == "timed_out" and status(engine, a["id"]) == "expired"
    outbox = [json.loads(x) for x in redis.lrange(engine.keys.webhook_outbox(), 0, -1)]
    assert [(o["event"], o["request_id"]) for o in outbox] == [
        ("timed_out", q1["id"]),
        ("expired", a["id"]),
    ]
    clock.advance(300)
    engine.report_node("a", gpu_list(1))
    assert engine.reap() == {
        "expired": [],
        "timed_out": [],
        "granted": [],
        "forgotten": [],
        "lost": [],
    }


# --------------------------------------------------------------------------- queue order


def test_priority_then_fifo(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    low = engine.allocate(req(priority=2))
    high1 = engine.allocate(req(priority=8))
    high2 = engine.allocate(req(priority=8))
    assert [r["id"] for r in engine.snapshot()["queue"]] == [high1["id"], high2["id"], low["id"]]
    assert engine.get(low["id"])["position"] == 3
    engine.release(a["id"])
    assert status(engine, high1["id"]) == "allocated"


def test_fifo_within_priority_without_aging(make_engine):
    engine = make_engine(aging_rate=0)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    ids = [engine.allocate(req())["id"] for _ in range(5)]
    assert [r["id"] for r in engine.snapshot()["queue"]] == ids


def test_best_effort_backfills_when_the_higher_request_cannot_fit(engine):
    engine.report_node("a", gpu_list(2))
    x = engine.allocate(req())
    engine.allocate(req())
    big = engine.allocate(req(required_gpus=2, priority=9))
    small = engine.allocate(req(priority=1))
    assert small["status"] == "queued"
    engine.release(x["id"])  # one GPU: the big one cannot use it, the small one may
    assert status(engine, small["id"]) == "allocated"
    assert status(engine, big["id"]) == "queued"


def test_no_overtake_when_the_higher_request_fits(engine):
    engine.report_node("a", gpu_list(1))
    x = engine.allocate(req())
    high = engine.allocate(req(priority=9))
    low = engine.allocate(req(priority=1))
    engine.release(x["id"])
    assert status(engine, high["id"]) == "allocated"
    assert status(engine, low["id"]) == "queued"


def test_strict_fifo_head_blocks(make_engine):
    engine = make_engine(policy="strict_fifo")
    engine.report_node("a", gpu_list(2))
    x = engine.allocate(req())
    engine.allocate(req())
    big = engine.allocate(req(required_gpus=2, priority=9))
    small = engine.allocate(req(priority=1))
    engine.release(x["id"])
    assert status(engine, small["id"]) == "queued"
    later = engine.allocate(req(priority=1))
    assert later["status"] == "queued"
    higher = engine.allocate(req(priority=10))  # ranks above the head: it may go
    assert higher["status"] == "allocated"
    assert status(engine, big["id"]) == "queued"


def queue_index_members(engine, redis) -> dict:
    k = engine.keys
    return {
        "queue": set(redis.zrange(k.queue(), 0, -1)),
        "demand": set(redis.zrange(k.queue_demand("exclusive"), 0, -1))
        | set(redis.zrange(k.queue_demand("shared"), 0, -1)),
        "deadlines": set(redis.zrange(k.queue_deadlines(), 0, -1)),
        "unreserved": set(redis.zrange(k.queue_unreserved(), 0, -1)),
        "shapes": set(redis.hkeys(k.queue_shapes())),
    }


def test_a_pass_across_batches_clears_every_queue_index(engine, redis):
    """A pass reads the queue 500 at a time and drops its grants from the indexes per batch."""
    for n in range(77):
        engine.report_node(f"n{n:02d}", gpu_list(8))  # 616 GPUs
    gate = engine.allocate(req(required_gpus=8))
    waiting = [engine.allocate(req(depends_on=[gate["id"]]))["id"] for _ in range(620)]
    big = engine.allocate(req(required_gpus=8, depends_on=[gate["id"]]))["id"]
    engine.release(gate["id"])
    assert [status(engine, rid) for rid in waiting] == ["allocated"] * 616 + ["queued"] * 4
    assert status(engine, big) == "queued"
    members = queue_index_members(engine, redis)
    assert all(m == set(waiting[616:]) | {big} for m in members.values())
    assert engine.counts()["queue_depth"] == 5 and engine.counts()["gpus_available"] == 0


def test_strict_fifo_pass_that_stops_at_the_head_still_dequeues_its_grants(make_engine, redis):
    engine = make_engine(policy="strict_fifo")
    engine.report_node("a", gpu_list(2))
    gate = engine.allocate(req(required_gpus=2))
    first = engine.allocate(req())
    big = engine.allocate(req(required_gpus=2))
    last = engine.allocate(req())
    engine.release(gate["id"])
    assert status(engine, first["id"]) == "allocated"
    assert status(engine, big["id"]) == "queued" and status(engine, last["id"]) == "queued"
    members = queue_index_members(engine, redis)
    assert all(m == {big["id"], last["id"]} for m in members.values())


def test_aging_lifts_old_requests(make_engine, clock):
    engine = make_engine(aging_rate=1.0)  # one priority point per minute
    engine.report_node("a", gpu_list(1))
    x = engine.allocate(req())
    old = engine.allocate(req(priority=1))
    clock.advance(10 * 60)  # +10 points: effective 11
    engine.report_node("a", gpu_list(1))
    new = engine.allocate(req(priority=10))
    assert [r["id"] for r in engine.snapshot()["queue"]] == [old["id"], new["id"]]
    engine.release(x["id"])
    assert status(engine, old["id"]) == "allocated"


def test_without_aging_priority_wins_forever(make_engine, clock):
    engine = make_engine(aging_rate=0)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    old = engine.allocate(req(priority=1))
    clock.advance(10**6)
    new = engine.allocate(req(priority=2))
    assert [r["id"] for r in engine.snapshot()["queue"]] == [new["id"], old["id"]]


def test_reservation_stops_small_jobs_starving_a_big_one(make_engine, clock):
    engine = make_engine(reservation_after=60, aging_rate=0)
    engine.report_node("a", gpu_list(4))
    engine.report_node("b", gpu_list(2))
    smalls = [engine.allocate(req(ttl_seconds=1000 + i))["id"] for i in range(4)]
    assert {engine.get(s)["node"] for s in smalls} == {"a", "b"}
    on_a = [s for s in smalls if engine.get(s)["node"] == "a"]
    big = engine.allocate(req(required_gpus=4))
    assert big["status"] == "queued"
    clock.advance(61)
    engine.report_node("a", gpu_list(4))
    engine.report_node("b", gpu_list(2))
    # a stream of small jobs keeps coming; without a reservation each freed GPU on `a` goes
    # to one of them and the big job never sees four free GPUs at once
    for sid in on_a:
        engine.allocate(req(priority=5))
        engine.release(sid)
        assert engine.get(big["id"])["reserved_node"] == "a"
    assert engine.get(big["id"])["node"] == "a"
    assert engine.get(big["id"])["status"] == "allocated"
    assert "reserved" in [e["event"] for e in engine.events()]
    # the small jobs went to b or still wait; none took a GPU of a while it was reserved
    for rec in engine.snapshot()["allocations"]:
        if rec["id"] != big["id"]:
            assert rec["node"] != "a"


def test_without_reservation_the_big_job_starves(make_engine, clock):
    engine = make_engine(reservation_after=10**9, aging_rate=0)
    engine.report_node("a", gpu_list(4))
    held = [engine.allocate(req(ttl_seconds=1000))["id"] for _ in range(4)]
    big = engine.allocate(req(required_gpus=4))
    clock.advance(61)
    engine.report_node("a", gpu_list(4))
    for sid in held:
        engine.allocate(req(priority=5))
        engine.release(sid)
    assert status(engine, big["id"]) == "queued"


#: a tenants config (issue 14): with tenants configured, each tenant's head reserves at once
TENANTS = {"quotas": {"svc": {"weight": 1}}}


def test_a_tenants_head_reserves_at_once_and_is_not_starved(make_engine, clock):
    """Issue 14, with tenants configured: the head request of a tenant that cannot fit reserves
    a node at once (no reservation_after wait): a stream of small jobs whose leases outlast the
    reserved start no longer takes the GPUs the big job waits for (with the default config it
    starves: test_without_reservation_the_big_job_starves)."""
    engine = make_engine(TENANTS, reservation_after=10**9, aging_rate=0)
    engine.report_node("a", gpu_list(4))
    held = [engine.allocate(req(ttl_seconds=1000))["id"] for _ in range(4)]
    big = engine.allocate(req(required_gpus=4))
    assert engine.get(big["id"])["reserved_node"] == "a"
    clock.advance(61)
    engine.report_node("a", gpu_list(4))
    smalls = []
    for sid in held:
        smalls.append(engine.allocate(req(priority=5, ttl_seconds=3600))["id"])
        engine.release(sid)
    assert status(engine, big["id"]) == "allocated"
    assert [status(engine, s) for s in smalls] == ["queued"] * 4


def test_backfill_only_with_a_lease_that_ends_before_the_reserved_start(make_engine, clock):
    engine = make_engine(TENANTS, aging_rate=0)
    engine.report_node("a", gpu_list(2))
    holder = engine.allocate(req(ttl_seconds=600))
    big = engine.allocate(req(required_gpus=2, service="big"))
    assert engine.get(big["id"])["reserved_node"] == "a"  # starts when holder's lease ends
    too_long = engine.allocate(req(service="small", ttl_seconds=601))
    assert too_long["status"] == "queued"
    short = engine.allocate(req(service="short", ttl_seconds=600))
    assert short["status"] == "allocated" and short["node"] == "a"
    assert short["expires_at"] <= engine.get(holder["id"])["expires_at"]
    clock.advance(601)
    engine.report_node("a", gpu_list(2))
    engine.reap()
    assert status(engine, big["id"]) == "allocated"
    assert status(engine, too_long["id"]) == "queued"


def test_one_pass_backfills_a_short_lease_behind_a_long_one_of_the_same_shape(make_engine):
    engine = make_engine(TENANTS, aging_rate=0)
    engine.report_node("a", gpu_list(2))
    engine.allocate(req(ttl_seconds=600))
    temp = engine.allocate(req(ttl_seconds=1000))
    big = engine.allocate(req(service="big", required_gpus=2))
    long = engine.allocate(req(service="long", ttl_seconds=700))
    short = engine.allocate(req(service="short", ttl_seconds=500))
    engine.release(temp["id"])  # one pass: big waits for 600 s, long would outlast that
    assert [status(engine, r["id"]) for r in (big, long, short)] == [
        "queued",
        "queued",
        "allocated",
    ]


def test_a_queued_request_without_expiry_is_still_granted(make_engine):
    engine = make_engine(TENANTS, allow_infinite_ttl=True, max_ttl=0, aging_rate=0)
    engine.report_node("a", gpu_list(1))
    first = engine.allocate(req(ttl_seconds=100))
    endless = engine.allocate(req(service="endless", ttl_seconds=0))
    engine.release(first["id"])
    assert status(engine, endless["id"]) == "allocated"


def test_the_next_head_reserves_when_its_tenants_head_leaves(make_engine, clock):
    """A tenant's head is cancelled while nothing fits (the pass does not walk): the tenant's
    next request, its new head, reserves in that same pass, so small requests cannot take the
    GPUs it waits for meanwhile."""
    engine = make_engine(TENANTS, aging_rate=0)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(2))
    engine.allocate(req(required_gpus=2, ttl_seconds=100))
    engine.allocate(req(ttl_seconds=200))
    engine.allocate(req(ttl_seconds=300))
    first = engine.allocate(req(service="t", required_gpus=2))
    second = engine.allocate(req(service="t", required_gpus=2))
    assert engine.get(first["id"])["reserved_node"] == "a"
    assert engine.get(second["id"])["reserved_node"] is None  # not its tenant's head yet
    engine.cancel(first["id"])
    assert engine.get(second["id"])["reserved_node"] == "a"


def test_spare_gpus_of_a_reserved_node_go_to_anyone(make_engine):
    """A node has more GPUs free by the reserved start than the reserved request needs: the
    spare ones are not held back, whatever the lease."""
    engine = make_engine(TENANTS, aging_rate=0)
    engine.report_node("a", gpu_list(4))
    held = [engine.allocate(req(ttl_seconds=100))["id"] for _ in range(3)]
    big = engine.allocate(req(required_gpus=2, service="big"))
    assert big["status"] == "queued" and engine.get(big["id"])["reserved_node"] == "a"
    # at the start (t+100) 4 GPUs are free and big needs 2: the free one now is spare
    long = engine.allocate(req(service="other", ttl_seconds=10_000))
    assert long["status"] == "allocated" and long["node"] == "a"
    # no more spare: a second long one waits
    assert engine.allocate(req(service="third", ttl_seconds=10_000))["status"] == "queued"
    assert held


# --------------------------------------------------------------------------- dependencies


def test_depends_on_waits_for_the_dependency(engine):
    engine.report_node("a", gpu_list(2))
    first = engine.allocate(req())
    second = engine.allocate(req(depends_on=[first["id"]]))
    assert second["status"] == "queued"
    engine.release(first["id"])
    assert status(engine, second["id"]) == "allocated"


def test_depends_on_a_queued_request_and_cancellation(engine):
    engine.report_node("a", gpu_list(1))
    x = engine.allocate(req())
    step1 = engine.allocate(req())
    step2 = engine.allocate(req(depends_on=[step1["id"]], priority=9))
    engine.release(x["id"])
    assert status(engine, step1["id"]) == "allocated"  # step2 ranks higher but must wait
    assert status(engine, step2["id"]) == "queued"
    engine.release(step1["id"])
    assert status(engine, step2["id"]) == "allocated"


def test_depends_on_unknown_id_is_rejected(engine):
    engine.report_node("a", gpu_list(1))
    with pytest.raises(errors.ValidationFailed) as exc:
        engine.allocate(req(depends_on=["ghost-1"]))
    assert exc.value.details == {"field": "depends_on", "id": "ghost-1"}
    assert engine.counts()["queue_depth"] == 0 and engine.counts()["allocations_active"] == 0


#: the configs a dependency-waiting request must reserve nothing in: the default (the rank
#: walk, reservation_after only), tenants.quotas (the rank walk with heads), fair share (the
#: fair walk)
DEPENDENCY_CONFIGS = [None, {"quotas": {"w": {"weight": 1}}}, {"fair_share": True}]


@pytest.mark.parametrize("tenants", DEPENDENCY_CONFIGS, ids=["default", "quotas", "fair_share"])
def test_a_request_waiting_for_its_dependency_reserves_nothing(make_engine, clock, tenants):
    """A request that cannot run until its dependency ends holds no node back, however long it
    has waited: a node it reserved would keep its free GPUs from everyone behind it (but
    backfill) for as long as the dependency runs. A request ranked behind it is granted there."""
    engine = make_engine(tenants, reservation_after=60, aging_rate=0)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    dep = engine.allocate(req(service="dep", ttl_seconds=10_000))
    assert dep["node"] == "b"
    w = engine.allocate(req(service="w", required_gpus=2, depends_on=[dep["id"]]))
    assert w["status"] == "queued"
    clock.advance(61)  # w waited reservation_after: the monitors' reports' passes meet it
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    engine.schedule_pass()
    assert engine.get(w["id"])["reserved_node"] is None
    assert "reserved" not in [e["event"] for e in engine.events(count=1000)]
    x = engine.allocate(req(service="x", required_gpus=2, ttl_seconds=3600))
    assert x["status"] == "allocated" and x["node"] == "a"
    # once its dependency ends it is an ordinary request again: reservation_after (counted
    # again from the pass that found it waiting for its dependency) over, the next pass that
    # walks the queue reserves the node where it starts soonest
    engine.release(dep["id"])
    clock.advance(61)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    z = engine.allocate(req(service="z", ttl_seconds=3600))
    assert z["status"] == "allocated" and z["node"] == "b"
    assert engine.get(w["id"])["reserved_node"] == "a"


def test_a_request_waiting_for_its_dependency_does_not_make_every_pass_walk(make_engine, clock):
    """A request past reservation_after makes the next pass walk the queue (so that it may
    reserve). One that waits for its dependency reserves nothing, and waits reservation_after
    again, as one that found no node does: the passes of the allocations after it do not each
    walk a queue it cannot leave."""
    engine = make_engine(reservation_after=60, aging_rate=0)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    engine.report_node("c", gpu_list(1, start=3))
    dep = engine.allocate(req(service="dep", ttl_seconds=10_000, nodes=["b"]))
    engine.allocate(req(service="x", required_gpus=2, ttl_seconds=10_000))
    w = engine.allocate(req(service="w", required_gpus=2, depends_on=[dep["id"]]))
    # a request that fits the free GPU of c by its size (so passes walk) but may use only a
    engine.allocate(req(service="p", nodes=["a"]))
    clock.advance(61)
    for node, n, start in (("a", 2, 0), ("b", 1, 2), ("c", 1, 3)):
        engine.report_node(node, gpu_list(n, start=start))
    before = engine.stats()["scheduler"]["passes"]
    for _ in range(3):
        assert engine.allocate(req(service="q", required_gpus=2))["status"] == "queued"
    assert engine.stats()["scheduler"]["passes"] == before
    assert engine.get(w["id"])["reserved_node"] is None


# --------------------------------------------------------------------------- idempotency


def test_idempotency_replays_and_conflicts(engine):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate(req(), idempotency_key="k1")
    again = engine.allocate(req(), idempotency_key="k1")
    assert again["id"] == a["id"] and again["replayed"] and not a["replayed"]
    assert engine.counts()["allocations_active"] == 1
    with pytest.raises(errors.Conflict) as exc:
        engine.allocate(req(priority=9), idempotency_key="k1")
    assert exc.value.details["request_id"] == a["id"]
    other = engine.allocate(req(), idempotency_key="k2")
    assert other["id"] != a["id"]


def test_idempotent_replay_of_a_queued_request_shows_its_position(engine):
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    q = engine.allocate(req(), idempotency_key="k")
    again = engine.allocate(req(), idempotency_key="k")
    assert again["replayed"] and again["status"] == "queued" and again["position"] == 1
    assert again["id"] == q["id"]
    assert engine.counts()["queue_depth"] == 1


# --------------------------------------------------------------------------- events, outbox, stats


def test_events_record_every_state_change(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    q = engine.allocate(req())
    engine.release(a["id"])
    engine.release(q["id"])
    evs = [(e["event"], e["request_id"]) for e in engine.events() if e["request_id"]]
    assert evs == [
        ("allocated", a["id"]),
        ("queued", q["id"]),
        ("released", a["id"]),
        ("allocated", q["id"]),
        ("released", q["id"]),
    ]
    first = engine.events(count=2)
    rest = engine.events(after=first[-1]["id"])
    assert len(first) + len(rest) == len(engine.events())
    alloc = next(e for e in engine.events() if e["event"] == "allocated")
    assert alloc["node"] == "a" and alloc["gpu_ids"] == [0] and alloc["service_name"] == "svc"


def test_events_stream_is_capped(make_engine, redis):
    engine = make_engine(events_maxlen=100)
    engine.report_node("a", gpu_list(1))
    for _ in range(300):
        engine.release(engine.allocate(req())["id"])
    assert redis.xlen(engine.keys.events()) < 300


def test_outbox_only_for_requests_that_waited_or_opted_in(engine, redis):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(webhook_url="http://h/a"))  # granted at once: no webhook
    q = engine.allocate(req(webhook_url="http://h/q", webhook_events=["cancelled"]))
    assert redis.llen(engine.keys.webhook_outbox()) == 0
    engine.release(a["id"])
    q2 = engine.allocate(req(webhook_url="http://h/q2"))
    engine.cancel(q2["id"])  # not opted in to "cancelled"
    entries = [json.loads(x) for x in redis.lrange(engine.keys.webhook_outbox(), 0, -1)]
    assert [(e["event"], e["request_id"]) for e in entries] == [("allocated", q["id"])]
    assert entries[0]["event_id"] and entries[0]["ts"] > 0
    assert entries[0]["event_id"] in {e["id"] for e in engine.events()}


def test_stats_count_by_service_and_status_and_wait(engine, clock):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req("web"))
    q = engine.allocate(req("web"))
    clock.advance(7)
    engine.release(a["id"])
    st = engine.stats()
    assert st["allocations"]["web"] == {"allocated": 2, "queued": 1, "released": 1}
    assert st["scheduler"]["granted"] == 2 and st["scheduler"]["immediate"] == 1
    assert st["scheduler"]["from_queue"] == 1
    assert st["wait"]["count"] == 2 and st["wait"]["sum"] == pytest.approx(7)
    buckets = dict(st["wait"]["buckets"])
    assert buckets[0.005] == 1  # the immediate grant waited 0 s
    assert buckets[5.0] == 1 and buckets[10.0] == 2 and buckets[float("inf")] == 2
    assert engine.get(q["id"])["wait_time_seconds"] == pytest.approx(7)


def test_counts_follow_allocations(engine):
    engine.report_node("a", gpu_list(4))
    a = engine.allocate(req(required_gpus=2))
    engine.allocate(req(sharing="shared", min_memory_mb=100))
    engine.allocate(req(sharing="shared", min_memory_mb=100))
    engine.allocate(req(required_gpus=3))
    assert engine.counts() == {
        "allocations_active": 3,
        "gpus_allocated": 3,
        "queue_depth": 1,
        "gpus_total": 4,
        "gpus_available": 1,
    }
    engine.release(a["id"])
    assert engine.counts()["queue_depth"] == 0


def test_every_lua_error_code_maps_to_a_domain_error():
    for code, build in ERRORS.items():
        exc = build(
            {"id": "x", "what": "request", "expected": "queued", "key": "k"},
            ["1", "2"] if code != -6 else ["required_gpus", "4"],
        )
        assert isinstance(exc, errors.OrchestratorError) and exc.code != "internal_error"


def test_scripts_use_redis_time_without_an_injected_clock(redis, settings):
    engine = Engine(redis, settings)
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(ttl_seconds=60))
    sec, usec = redis.time()
    assert abs(a["submitted_at"] - (sec + usec / 1e6)) < 5
    assert a["expires_at"] == pytest.approx(a["submitted_at"] + 60, abs=0.01)


def test_scripts_reload_after_script_flush(engine, redis):
    engine.report_node("a", gpu_list(1))
    redis.script_flush()
    assert engine.allocate(req())["status"] == "allocated"


def test_schedule_pass_forced_walk_finds_capacity_the_version_missed(engine, redis):
    engine.report_node("a", gpu_list(1))
    x = engine.allocate(req())
    q = engine.allocate(req())
    # free the GPU behind the engine's back, keeping the indexes right but not the version
    gk = engine.keys.gpu("a", 0)
    redis.hset(gk, mapping={"excl": "", "in_free": "1", "in_busy": "0"})
    redis.hset(engine.keys.node_free_gpus("a"), "0", "81920|0|GPU-0")
    redis.zincrby(engine.keys.nodes_free(), 1, "a")
    redis.hset(engine.keys.request(x["id"]), "status", "released")
    redis.zrem(engine.keys.leases(), x["id"])
    assert engine.schedule_pass(force=False) == []
    assert [g["id"] for g in engine.schedule_pass()] == [q["id"]]


def test_full_queue_still_grants_a_request_that_fits(make_engine):
    engine = make_engine(max_queue_size=1, max_queued_per_owner=1)
    engine.report_node("a", gpu_list(2))
    engine.allocate(req())
    big = engine.allocate(req(required_gpus=2))
    assert big["status"] == "queued"
    small = engine.allocate(req(priority=1))  # fits on the free GPU; the big one cannot use it
    assert small["status"] == "allocated"
    with pytest.raises(errors.QueueFull):
        engine.allocate(req(), idempotency_key="k")
    assert engine.counts()["queue_depth"] == 1
    # the rejected request left nothing behind: its idempotency key is free again
    with pytest.raises(errors.QueueFull):
        engine.allocate(req(priority=2), idempotency_key="k")


def test_fifo_within_priority_with_aging_at_the_same_instant(make_engine):
    engine = make_engine(aging_rate=0.1)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    ids = [engine.allocate(req(service=f"s{9 - i}"))["id"] for i in range(10)]
    assert [r["id"] for r in engine.snapshot()["queue"]] == ids


def test_an_id_collision_is_detected_and_retried(engine, monkeypatch):
    engine.report_node("a", gpu_list(2))
    ids = iter(["svc-1-1", "svc-1-1", "svc-1-2"])
    monkeypatch.setattr("app.engine.new_id", lambda svc: next(ids))
    assert engine.allocate(req())["id"] == "svc-1-1"
    assert engine.allocate(req())["id"] == "svc-1-2"
    assert engine.counts()["allocations_active"] == 2


def test_a_forked_process_draws_other_id_digits_than_its_parent():
    """gunicorn forks its workers after the app is loaded: each must reseed its id generator."""
    import os

    from app.engine import new_id

    new_id("svc")  # the parent's generator is seeded before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports and exits at once
        os.write(write_end, new_id("svc").encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 200).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = new_id("svc")
    assert child and child.rsplit("-", 1)[1] != parent.rsplit("-", 1)[1]


def test_idempotency_compares_the_normalised_request(engine):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate({"service_name": "svc"}, idempotency_key="k")
    again = engine.allocate(
        {
            "service_name": "svc",
            "priority": 5,
            "required_gpus": 1,
            "sharing": "exclusive",
            "depends_on": [],
        },
        idempotency_key="k",
    )
    assert again["replayed"] and again["id"] == a["id"]


def test_snapshot_without_requests(engine):
    engine.report_node("a", gpu_list(2))
    engine.allocate(req())
    engine.allocate(req(required_gpus=2))
    snap = engine.snapshot(requests=False)
    assert len(snap["gpus"]) == 2 and snap["allocations"] == [] and snap["queue"] == []
    full = engine.snapshot()
    assert len(full["allocations"]) == 1 and len(full["queue"]) == 1
    assert sum(1 for g in full["gpus"] if g["allocated_to"]) == 1
