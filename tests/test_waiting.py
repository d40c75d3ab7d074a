"""reason and eta of queued requests (app/waiting.py) against the real engine on a real Redis,
with an injected clock: each reason as the issue defines it, the head's ETA against its real
grant, and an ETA never earlier than the lease ends it depends on (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from app import waiting
from app.engine import Engine
from app.settings import tenants_configured
from tests.engine_support import Clock
from tests.test_engine import gpu_list, req


def why(engine, rid=None, limits=None):
    view = engine.wait_view(waiting.MAX_SIMULATED)
    heads = tenants_configured(engine.settings)
    out = waiting.explain(view, engine.settings.scheduler, limits=limits, heads=heads)
    return out if rid is None else out[rid]


# --------------------------------------------------------------------------- reasons


def test_capacity_and_the_eta_is_the_lease_end_in_the_way(make_engine, clock):
    engine = make_engine(aging_rate=0)
    engine.report_node("a", gpu_list(2))
    first = engine.allocate(req(ttl_seconds=100))
    second = engine.allocate(req(ttl_seconds=300))
    q = engine.allocate(req(service="q", required_gpus=2))
    w = why(engine, q["id"])
    assert w["reason"] == "capacity"
    assert w["eta"] == second["expires_at"] and first["expires_at"] < w["eta"]


def test_dependency(make_engine):
    engine = make_engine(aging_rate=0)
    engine.report_node("a", gpu_list(2))
    dep = engine.allocate(req(ttl_seconds=100))
    q = engine.allocate(req(service="q", depends_on=[dep["id"]]))
    w = why(engine, q["id"])
    assert w["reason"] == "dependency"
    assert w["eta"] == dep["expires_at"]  # runs when its dependency's lease ends


#: tenants configured (issue 14): each tenant's head reserves its node at once
TENANTS = {"quotas": {"big": {"weight": 1}}}


def test_reservation(make_engine):
    """Tenants configured: a GPU is free, but on the node held for the big request ahead (its
    tenant's head), and the small one's lease outlasts the reserved start: it waits for the
    reservation."""
    engine = make_engine(TENANTS, aging_rate=0)
    engine.report_node("a", gpu_list(2))
    holder = engine.allocate(req(ttl_seconds=100))
    big = engine.allocate(req(service="big", required_gpus=2, ttl_seconds=1000))
    small = engine.allocate(req(service="small", ttl_seconds=500))
    assert small["status"] == "queued"
    assert why(engine, big["id"]) == {"reason": "capacity", "eta": holder["expires_at"]}
    w = why(engine, small["id"])
    assert w["reason"] == "reservation"
    assert w["eta"] == holder["expires_at"] + 1000  # after big's lease


def test_with_the_default_config_only_a_long_wait_reserves(make_engine, clock):
    """No tenants configured (the defaults): the big request reserves only once it waited
    reservation_after, in a pass that walks the queue, as before issue 14; then a long lease
    waits for the reservation and a lease that ends by the reserved start backfills."""
    engine = make_engine(aging_rate=0, reservation_after=60)
    engine.report_node("a", gpu_list(2))
    holder = engine.allocate(req(ttl_seconds=1000))
    big = engine.allocate(req(service="big", required_gpus=2, ttl_seconds=1000))
    assert engine.get(big["id"])["reserved_node"] is None
    early = engine.allocate(req(service="early", ttl_seconds=5000))
    assert early["status"] == "allocated"  # nothing reserved yet: the free GPU goes
    engine.release(early["id"])
    clock.advance(61)
    engine.report_node("a", gpu_list(2))
    # the pass this request starts walks the queue (something fits): big reserves first
    late = engine.allocate(req(service="late", ttl_seconds=5000))
    assert late["status"] == "queued"
    assert engine.get(big["id"])["reserved_node"] == "a"
    assert why(engine, big["id"]) == {"reason": "capacity", "eta": holder["expires_at"]}
    assert why(engine, late["id"]) == {"reason": "reservation", "eta": holder["expires_at"] + 1000}
    short = engine.allocate(req(service="short", ttl_seconds=900))
    assert short["status"] == "allocated" and short["node"] == "a"  # backfill on lease end


@pytest.mark.parametrize("tenants", [None, TENANTS], ids=["default", "quotas"])
def test_a_request_waiting_for_its_dependency_holds_nothing_back_in_the_eta(
    make_engine, clock, tenants
):
    """A request past reservation_after that waits for its dependency reserves nothing, in the
    engine as in the estimate: the request behind it gets the node as soon as its GPUs free,
    and its eta says so (it was held back until the dependency's end before)."""
    engine = make_engine(tenants, aging_rate=0, reservation_after=60)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    holder = engine.allocate(req(required_gpus=2, ttl_seconds=100))
    dep = engine.allocate(req(service="dep", ttl_seconds=10_000))
    assert (holder["node"], dep["node"]) == ("a", "b")
    w = engine.allocate(
        req(service="w", required_gpus=2, depends_on=[dep["id"]], queue_timeout_seconds=20_000)
    )
    clock.advance(61)  # w waited reservation_after
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    x = engine.allocate(req(service="x", required_gpus=2, ttl_seconds=3600))
    assert x["status"] == "queued"
    assert why(engine, w["id"]) == {"reason": "dependency", "eta": dep["expires_at"]}
    assert why(engine, x["id"]) == {"reason": "capacity", "eta": holder["expires_at"]}
    clock.t = holder["expires_at"]
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1, start=2))
    engine.release(holder["id"])
    assert engine.get(x["id"])["status"] == "allocated"
    assert engine.get(x["id"])["allocated_at"] == holder["expires_at"]
    assert engine.get(w["id"])["reserved_node"] is None


def test_priority_under_strict_fifo(make_engine):
    engine = make_engine(aging_rate=0, policy="strict_fifo")
    engine.report_node("a", gpu_list(2))
    holder = engine.allocate(req(ttl_seconds=100))
    head = engine.allocate(req(service="big", required_gpus=2, ttl_seconds=1000))
    behind = engine.allocate(req(service="small", ttl_seconds=50))
    assert behind["status"] == "queued"
    assert why(engine, head["id"])["reason"] == "capacity"
    w = why(engine, behind["id"])
    assert w["reason"] == "priority"  # it fits; the head goes first
    assert w["eta"] == holder["expires_at"] + 1000


def test_quota_from_the_tenants_max_gpus(make_engine):
    engine = make_engine(aging_rate=0)
    engine.report_node("a", gpu_list(4))
    engine.allocate(req(service="team", ttl_seconds=100, required_gpus=2))
    engine.allocate(req(service="other", ttl_seconds=100, required_gpus=2))
    q = engine.allocate(req(service="team"))
    caps = {"team": 2}  # the record's tenant (tenants.key: service_name with auth off)
    assert why(engine, q["id"], limits=caps.get)["reason"] == "quota"
    assert why(engine, q["id"])["reason"] == "capacity"


def test_one_that_would_time_out_first_gets_no_eta(make_engine):
    engine = make_engine(aging_rate=0)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req(ttl_seconds=4000))
    q = engine.allocate(req(service="q", queue_timeout_seconds=3600))
    assert why(engine, q["id"]) == {"reason": "capacity", "eta": None}


def test_a_lease_without_expiry_in_the_way_gives_no_eta(make_engine):
    engine = make_engine(aging_rate=0, allow_infinite_ttl=True)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req(ttl_seconds=0))
    q = engine.allocate(req(service="q"))
    assert why(engine, q["id"]) == {"reason": "capacity", "eta": None}


# --------------------------------------------------------------------------- properties

NODES = ("n0", "n1", "n2")


def lower_bound(engine, rec, snap) -> float:
    """The earliest a request can start by the lease ends in its way: on some node, the k-th
    earliest time a GPU that could hold it is free (now when free, else its holders' expiry)."""
    now = snap["now"]
    ends = {a["id"]: (a["expires_at"] or math.inf) for a in snap["allocations"]}
    held: dict = {}
    for a in snap["allocations"]:
        for idx in a["gpu_ids"]:
            held.setdefault((a["node"], idx), []).append(ends[a["id"]])
    shared = rec["sharing"] == "shared"
    k = 1 if shared else rec["required_gpus"]
    for a in snap["allocations"]:
        if shared and a["sharing"] == "shared":
            for idx in a["gpu_ids"]:  # shared holders leave room for a shared request
                held[(a["node"], idx)].remove(ends[a["id"]])
    best = math.inf
    for node in NODES:
        times = sorted(
            max(held.get((node, g["index"])) or [now])
            for g in snap["gpus"]
            if g["node"] == node and g["schedulable"]
        )
        if len(times) >= k:
            best = min(best, times[k - 1])
    return max(best, now)


scenario = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 8), min_size=1, max_size=3),
        "held": st.lists(
            st.tuples(st.integers(1, 3), st.integers(5, 400), st.sampled_from("xyz")),
            min_size=1,
            max_size=8,
        ),
        "queued": st.lists(
            st.tuples(
                st.integers(1, 4),
                st.integers(5, 400),
                st.sampled_from("abc"),
                st.booleans(),
                st.integers(1, 10),
            ),
            min_size=1,
            max_size=12,
        ),
    }
)


@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sc=scenario)
@pytest.mark.parametrize(
    "tenants", [None, {"quotas": {"a": {"weight": 1}}}], ids=["default", "tenants"]
)
def test_the_heads_eta_is_its_real_grant_and_no_eta_beats_a_lease_end(redis, settings, tenants, sc):
    """Every lease known, no renewals, nothing new arrives: the head request is granted within
    2 s of its ETA (the reaper and the scheduler's periodic pass run at each lease end here);
    and at every step no queued request's ETA is earlier than the lease ends in its way. With
    the default config and with tenants configured (each tenant's head reserves at once)."""
    redis.flushdb()
    clock = Clock()
    st_ = settings.replace(scheduler={"aging_rate": 0})
    if tenants is not None:
        st_ = st_.replace(tenants=tenants)
    engine = Engine(redis, st_, clock=clock)
    heads = tenants_configured(engine.settings)
    sizes = sc["sizes"]

    def report():
        for node, n in zip(NODES, sizes, strict=False):
            engine.report_node(node, gpu_list(n))

    report()
    for k, ttl, svc in sc["held"]:
        try:
            engine.allocate(req(service=svc, required_gpus=k, ttl_seconds=ttl))
        except Exception:  # more GPUs than the largest node: not this test's business
            pass
    queued = []
    for k, ttl, svc, shared, prio in sc["queued"]:
        body = req(service=svc, required_gpus=k, ttl_seconds=ttl, priority=prio)
        if shared:
            body.update(sharing="shared", required_gpus=1, min_memory_mb=20000)
        try:
            rec = engine.allocate(body)
        except Exception:
            continue
        if rec["status"] == "queued":
            queued.append(rec["id"])
    engine.schedule_pass()  # the scheduler's periodic pass (the state the estimate assumes)
    snap = engine.snapshot(wait=waiting.MAX_SIMULATED)
    if not snap["queue"]:
        return
    head = snap["queue"][0]
    predicted = waiting.explain(snap, engine.settings.scheduler, heads=heads)
    eta = predicted[head["id"]]["eta"]
    assert eta is not None  # every lease is finite
    for _ in range(100):
        now = waiting.explain(snap, engine.settings.scheduler, heads=heads)
        for rec in snap["queue"]:
            e = now[rec["id"]]["eta"]
            if e is not None:
                assert e >= lower_bound(engine, rec, snap) - 1e-6, (rec["id"], e)
        if engine.get(head["id"])["status"] != "queued":
            break
        # the reaper runs at the next lease end (as one running every second would, within 1 s)
        ends = [a["expires_at"] for a in snap["allocations"] if a["expires_at"] > clock.t]
        clock.t = min(ends) if ends else clock.t + 1
        report()
        engine.reap()
        engine.schedule_pass()
        snap = engine.snapshot(wait=waiting.MAX_SIMULATED)
    got = engine.get(head["id"])
    assert got["status"] == "allocated"
    assert abs(got["allocated_at"] - eta) <= 2, (got["allocated_at"] - eta, sc)


def test_fair_share_orders_the_simulation_across_tenants():
    """tenants.fair_share: the next grant goes to the tenant with the lowest (usage + held) /
    weight, whatever the queue's rank order says (one GPU, two tenants, B used it before)."""
    now = 1_800_000_000.0
    gpu = {"node": "a", "index": 0, "schedulable": True, "memory_total_mb": 80000,
           "memory_free_mb": 80000, "utilization": 0.0, "name": "A100"}  # fmt: skip

    def queued(rid, tenant):
        return {"id": rid, "status": "queued", "tenant": tenant, "required_gpus": 1,
                "sharing": "exclusive", "lease_seconds": 100.0, "submitted_at": now,
                "queue_timeout_seconds": 3600.0}  # fmt: skip

    view = {
        "now": now,
        "gpus": [gpu],
        "wait": {
            "held": [
                {
                    "id": "h",
                    "node": "a",
                    "gpu_ids": [0],
                    "sharing": "exclusive",
                    "expires_at": now + 100,
                    "tenant": "C",
                }
            ],  # fmt: skip
            "queue": [queued("b1", "B"), queued("a1", "A")],
            "deps": {},
        },
    }
    ranked = waiting.explain(view)
    assert (ranked["b1"]["eta"], ranked["a1"]["eta"]) == (now + 100, now + 200)
    fair = {"tenants": {"A": (0.0, 3.0), "B": (3600.0, 1.0)}, "half_life": 3600.0,
            "default_weight": 1.0}  # fmt: skip
    shared_out = waiting.explain(view, fair=fair)
    assert (shared_out["a1"]["eta"], shared_out["b1"]["eta"]) == (now + 100, now + 200)


# --------------------------------------------------------------------------- the load model


def fair_engine(redis, settings, clock, **scheduler) -> Engine:
    """tenants.fair_share on, tenants by service name, equal weights, no aging; the nodes
    stay alive without heartbeats (time jumps from one lease end to the next)."""
    tenants = {"key": "service_name", "fair_share": True, "usage_half_life": "1h"}
    alive = {"node_heartbeat_timeout": "1d", "node_forget_after": 0}
    overrides = {"tenants": tenants, "scheduler": {"aging_rate": 0, **alive, **scheduler}}
    return Engine(redis, settings.replace(**overrides), clock=clock)


def run_until(engine, clock, rid, *, until, resubmit=()):
    """Each lease end in turn until ``rid`` is granted: the allocations end there (the reaper),
    those of the ``resubmit`` services come back at once with the same GPUs and lease (a
    tenant that keeps its load), then the scheduler's pass. The grant time, or None."""
    while clock.t < until:
        live = [a for a in engine.snapshot()["allocations"] if a["expires_at"]]
        ends = sorted(a["expires_at"] for a in live if a["expires_at"] > clock.t)
        if not ends:
            return None
        clock.t = ends[0]
        for a in live:
            if a["expires_at"] == clock.t and a["service_name"] in resubmit:
                ttl = a["expires_at"] - a["allocated_at"]
                engine.allocate(
                    req(service=a["service_name"], required_gpus=len(a["gpu_ids"]), ttl_seconds=ttl)
                )
        engine.reap()
        engine.schedule_pass()
        got = engine.get(rid)
        if got["status"] == "allocated":
            return got["allocated_at"]
    return None


def test_each_tenant_keeps_its_load_in_the_eta(redis, settings, clock):
    """Fair share, equal weights, node a with 2 GPUs: q holds one until +1050, a holds the
    other for 100 s jobs it submits again as each ends. q's second request (its first, the
    queue's head, waits for node b) holds no reservation; each time a's job ends, a is below
    q's share, so a's next job takes the GPU, until q's own GPU frees at +1050. Were a's
    queue taken as final, the ETA would say +100."""
    engine = fair_engine(redis, settings, clock, reservation_after="2h")
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1))
    t0 = clock.t
    engine.allocate(req(service="q", ttl_seconds=1050, nodes=["a"]))
    engine.allocate(req(service="a", ttl_seconds=100, nodes=["a"]))
    engine.allocate(req(service="z", ttl_seconds=5000, nodes=["b"]))
    head = engine.allocate(req(service="q", ttl_seconds=100, nodes=["b"]))
    mine = engine.allocate(req(service="q", ttl_seconds=100))
    assert head["position"] == 1 and mine["status"] == "queued"
    w = waiting.annotate(engine, [mine])[mine["id"]]
    assert w["reason"] == "capacity"
    assert w["eta"] == t0 + 1050
    granted = run_until(engine, clock, mine["id"], until=t0 + 2000, resubmit=("a",))
    assert granted is not None and abs(granted - w["eta"]) <= 2


def test_the_head_request_assumes_nothing_new_arrives(redis, settings, clock):
    """The same fleet, q's request alone in the queue: it is the head, whose estimate counts
    only what is there (a's job ends at +100 and nothing comes after it), and that is its
    grant when nothing arrives."""
    engine = fair_engine(redis, settings, clock)
    engine.report_node("a", gpu_list(2))
    t0 = clock.t
    engine.allocate(req(service="q", ttl_seconds=1050))
    engine.allocate(req(service="a", ttl_seconds=100))
    mine = engine.allocate(req(service="q", ttl_seconds=100))
    assert mine["position"] == 1
    w = waiting.annotate(engine, [mine])[mine["id"]]
    assert w["eta"] == t0 + 100
    assert run_until(engine, clock, mine["id"], until=t0 + 2000) == t0 + 100


def test_a_reserved_node_is_held_back_from_the_start_of_a_fair_pass(redis, settings, clock):
    """Fair share: y's 2-GPU request reserved node a (start +300, when y's second GPU frees).
    x's 1-GPU request ranks first (priority 6) and x is below y's share, yet at +100 the GPU y
    frees is on y's reserved node and x's 500 s lease outlasts the start: the fair pass holds
    it back, as it does at +300, when y's request takes both GPUs. x runs at +1300."""
    engine = fair_engine(redis, settings, clock)
    engine.report_node("a", gpu_list(2))
    t0 = clock.t
    engine.allocate(req(service="y", ttl_seconds=100))
    engine.allocate(req(service="y", ttl_seconds=300))
    big = engine.allocate(req(service="y", required_gpus=2, ttl_seconds=1000))
    assert engine.get(big["id"])["reserved_node"] == "a"
    x = engine.allocate(req(service="x", ttl_seconds=500, priority=6))
    assert x["position"] == 1
    w = waiting.annotate(engine, [x])[x["id"]]
    assert w["reason"] == "reservation" or w["reason"] == "capacity"
    assert w["eta"] == t0 + 1300
    assert run_until(engine, clock, x["id"], until=t0 + 3000) == t0 + 1300


# ------------------------------------------------- preemption holds, reservations beyond the head


def test_a_preemption_hold_gives_the_freed_gpus_to_its_request_in_the_eta(redis, settings, clock):
    """Guarantee preemption (rank walk): team-a, below its guarantee, asks for 2 GPUs while
    team-b holds all 8 for an hour; two of team-b's allocations turn preempting (preempt_at =
    now + 30 s) and their node is held for team-a's request. team-a's estimate is preempt_at.
    team-c's request (priority 10, ranked first) may not use the held node: its estimate is
    the end of team-a's 600 s lease there (team-b's end an hour later), not preempt_at. Both
    come true."""
    quotas = {"team-a": {"guaranteed_gpus": 4}, "team-b": {"guaranteed_gpus": 2}}
    st_ = settings.replace(
        tenants={"key": "service_name", "quotas": quotas},
        preemption={"enabled": True, "grace_period": "30s"},
        scheduler={"node_heartbeat_timeout": "1d", "node_forget_after": 0},
    )
    engine = Engine(redis, st_, clock=clock)
    for node in ("n1", "n2"):
        engine.report_node(node, gpu_list(4))
    for _ in range(8):
        engine.allocate(req(service="team-b", ttl_seconds=3600))
        clock.advance(1)
    a = engine.allocate(req(service="team-a", required_gpus=2, ttl_seconds=600))
    assert a["status"] == "queued"
    victims = [x for x in engine.snapshot()["allocations"] if x["status"] == "preempting"]
    assert len(victims) == 2
    preempt_at = victims[0]["preempt_at"]
    node = engine.get(a["id"])["reserved_node"]
    c = engine.allocate(req(service="team-c", priority=10, ttl_seconds=600))
    assert c["status"] == "queued" and c["position"] == 1
    assert why(engine, a["id"])["eta"] == pytest.approx(preempt_at)
    assert why(engine, c["id"])["eta"] == pytest.approx(preempt_at + 600)
    # the real run: the reaper ends the victims at preempt_at, team-a's request takes the node
    clock.t = preempt_at
    engine.reap()
    engine.schedule_pass()
    got = engine.get(a["id"])
    assert got["status"] == "allocated" and got["node"] == node
    assert engine.get(c["id"])["status"] == "queued"
    clock.t = got["expires_at"]
    engine.reap()
    engine.schedule_pass()
    assert engine.get(c["id"])["allocated_at"] == pytest.approx(preempt_at + 600)


def test_a_reservation_held_beyond_the_simulated_head_is_simulated(
    redis, settings, clock, monkeypatch
):
    """Fair share: lo's request L (2 GPUs) reserved node a (free at +100); hi's H1 and H2
    (priority 10) rank ahead of it. With only the first 2 queued requests simulated, L is
    still read (it holds a reservation): at +100 node a goes to L (lo is below hi's share and
    the node is reserved for it), so H1's estimate is +200 (node b), not +100."""
    monkeypatch.setattr(waiting, "MAX_SIMULATED", 2)
    engine = fair_engine(redis, settings, clock)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(2))
    t0 = clock.t
    engine.allocate(req(service="hi", required_gpus=2, ttl_seconds=100, nodes=["a"]))
    engine.allocate(req(service="hi", required_gpus=2, ttl_seconds=200, nodes=["b"]))
    low = engine.allocate(req(service="lo", required_gpus=2, ttl_seconds=1000))
    assert engine.get(low["id"])["reserved_node"] == "a"
    h1 = engine.allocate(req(service="hi", required_gpus=2, ttl_seconds=1000, priority=10))
    h2 = engine.allocate(req(service="hi", required_gpus=2, ttl_seconds=1000, priority=10))
    assert (h1["position"], h2["position"], engine.get(low["id"])["position"]) == (1, 2, 3)
    w = waiting.annotate(engine, [h1])[h1["id"]]
    assert w["eta"] == t0 + 200
    assert run_until(engine, clock, low["id"], until=t0 + 150) == t0 + 100
    assert run_until(engine, clock, h1["id"], until=t0 + 3000) == t0 + 200


def test_the_fair_order_reads_only_tenants_with_usage_or_a_quota(redis, settings, clock):
    """A queued request's reason and eta (fair share) need each tenant's usage and weight; a
    tenant with no usage and no quota has (0, the default weight), so it is not read. They
    were all read (engine.tenants()): with tenants.key: service_name a client makes one per
    service name, and 3,000 with one queued request each made every GET of a queued request
    39 ms of Redis more. The inputs are the same as the whole list's, tenant by tenant."""
    quotas = {"tenants": {"quotas": {"heavy": {"weight": 3}}}}
    engine = fair_engine(redis, settings.replace(**quotas), clock)
    engine.report_node("a", gpu_list(2))
    used = engine.allocate(req(service="used", ttl_seconds=600))
    clock.t += 300
    engine.release(used["id"])  # 300 GPU-seconds of usage left
    engine.allocate(req(service="hog", required_gpus=2, ttl_seconds=3600))
    mine = engine.allocate(req(service="mine", ttl_seconds=100))
    for i in range(200):
        engine.allocate(req(service=f"only-queued-{i}", ttl_seconds=100))
    full = {r["tenant"]: (r["usage_gpu_hours"] * 3600.0, r["weight"]) for r in engine.tenants()}
    fair = waiting.fair_inputs(engine)["tenants"]
    assert set(fair) == {"used", "heavy", "hog"}
    default = (0.0, 1.0)
    for t in set(full) | set(fair):
        assert fair.get(t, default) == pytest.approx(full.get(t, default)), t
    redis.config_resetstat()
    w = waiting.annotate(engine, [engine.get(mine["id"])])[mine["id"]]
    assert w["reason"] == "capacity"
    # per tenant it read its GPUs held, usage and queued count (3 HGETs): 200 tenants, 600
    assert int(redis.info("commandstats").get("cmdstat_hget", {}).get("calls", 0)) < 50
