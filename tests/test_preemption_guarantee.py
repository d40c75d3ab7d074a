"""Guarantee preemption (issue 14, preemption.enabled): a tenant below its guaranteed_gpus whose
request does not fit takes GPUs back from tenants above theirs, with notice, and the freed GPUs
wait for that request (a hold). Real redis-server, injected clock; tenants by service_name."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from app.engine import Engine
from tests.engine_support import Clock
from tests.test_engine import gpu_list, req, status

QUOTAS = {
    "team-a": {"guaranteed_gpus": 4},
    "team-b": {"guaranteed_gpus": 2},
    "team-c": {"guaranteed_gpus": 0},
}


@pytest.fixture
def make_engine(redis, settings, clock):
    def make(grace="30s", enabled=True, quotas=None, nodes=(("n1", 4), ("n2", 4))):
        st = settings.replace(
            tenants={"key": "service_name", "quotas": quotas or QUOTAS},
            preemption={"enabled": enabled, "grace_period": grace},
        )
        eng = Engine(redis, st, clock=clock)
        for name, n in nodes:
            eng.report_node(name, gpu_list(n))
        return eng

    return make


def fill_with_b(engine, clock, priorities=(5, 5, 5, 5, 5, 5, 5, 5)):
    """team-b takes all 8 GPUs, one at a time (one second apart: grant order is known)."""
    out = []
    for p in priorities:
        out.append(engine.allocate(req("team-b", priority=p, ttl_seconds=3600)))
        clock.advance(1)
    return out


def beat(engine, nodes=(("n1", 4), ("n2", 4))):
    """The monitors' heartbeat after the clock moved."""
    for name, n in nodes:
        engine.report_node(name, gpu_list(n))


def preempting(engine):
    return [a for a in engine.snapshot()["allocations"] if a["status"] == "preempting"]


def test_a_tenant_below_its_guarantee_takes_back_only_what_it_needs(make_engine, clock):
    engine = make_engine()
    b = fill_with_b(engine, clock, priorities=(5, 5, 3, 5, 5, 5, 3, 5))
    a = engine.allocate(req("team-a", required_gpus=2, ttl_seconds=600))
    assert a["status"] == "queued"
    victims = preempting(engine)
    # lowest priority first: the two priority-3 allocations, one on each node; the plan needs
    # two victims on one node, so it takes priority 3 then the most recently granted there
    assert len(victims) == 2 and sum(len(v["gpu_ids"]) for v in victims) == 2
    assert len({v["node"] for v in victims}) == 1
    node = victims[0]["node"]
    on_node = [x for x in b if x["node"] == node]
    low = [x["id"] for x in on_node if x["priority"] == 3]
    assert low[0] in {v["id"] for v in victims}
    for v in victims:
        assert v["reason"] == "guarantee" and v["preempted_for"] == a["id"]
        assert v["preempt_at"] == pytest.approx(clock() + 30)
    rec = engine.get(a["id"])
    assert rec["reserved_node"] == node
    # team-c (no guarantee) asks for one GPU: a victim's GPU, once free, is held for team-a
    engine.release(victims[0]["id"])
    c = engine.allocate(req("team-c", priority=10))
    assert c["status"] == "queued"
    clock.advance(30)
    beat(engine)
    out = engine.reap()
    assert out["preempted"] == [victims[1]["id"]]
    assert status(engine, a["id"]) == "allocated" and engine.get(a["id"])["node"] == node
    assert status(engine, c["id"]) == "queued"
    assert engine.stats()["preemptions"] == {"team-b": 2}


def test_nothing_is_preempted_when_a_lease_ends_within_the_grace_period(make_engine, clock):
    engine = make_engine()
    for i in range(8):
        engine.allocate(req("team-b", ttl_seconds=20 if i < 2 else 3600))
    assert engine.allocate(req("team-a", required_gpus=2, nodes=["n1"]))["status"] == "queued"
    assert preempting(engine) == []


def test_a_tenant_at_its_guarantee_is_never_preempted(make_engine, clock):
    engine = make_engine(nodes=(("n1", 4),))
    for _ in range(2):
        engine.allocate(req("team-b", ttl_seconds=3600))  # exactly its guarantee of 2
    for _ in range(2):
        engine.allocate(req("team-a", ttl_seconds=3600))
    q = engine.allocate(req("team-a", required_gpus=2))
    assert q["status"] == "queued"  # team-a holds 2 of 4: below its guarantee, but b is at its
    assert preempting(engine) == []


def test_no_preemption_beyond_the_guarantee_or_when_disabled(make_engine, clock):
    engine = make_engine(enabled=False)
    fill_with_b(engine, clock)
    assert engine.allocate(req("team-a", required_gpus=2))["status"] == "queued"
    assert engine.schedule_pass() == [] and preempting(engine) == []

    engine = make_engine(nodes=(("n3", 4),))
    engine.allocate(req("team-a", ttl_seconds=3600))
    for _ in range(3):
        engine.allocate(req("team-b", ttl_seconds=3600))
    # team-a holds 1: a request of 4 would take it past its guarantee of 4, so it preempts nothing
    assert engine.allocate(req("team-a", required_gpus=4))["status"] == "queued"
    assert preempting(engine) == []


def test_the_periodic_pass_preempts_for_a_waiting_request(make_engine, clock):
    engine = make_engine(nodes=(("n1", 4),))
    a = engine.allocate(req("team-a", required_gpus=2, nodes=["n1"]))  # fits: granted
    engine.release(a["id"])
    for _ in range(4):
        engine.allocate(req("team-b", ttl_seconds=3600))
    q = engine.allocate(req("team-a", required_gpus=1, ttl_seconds=3600))
    assert q["status"] == "queued" and len(preempting(engine)) == 1
    engine.release(preempting(engine)[0]["id"])
    assert status(engine, q["id"]) == "allocated"
    # later, team-a queues again: the allocate already tried; the periodic pass tries again
    q2 = engine.allocate(req("team-a", required_gpus=1, ttl_seconds=3600))
    assert len(preempting(engine)) == 1
    engine.schedule_pass()
    assert len(preempting(engine)) == 1  # one preemption per request, not one per pass
    assert status(engine, q2["id"]) == "queued"


def test_zero_grace_grants_the_waiting_request_at_once(make_engine, clock):
    engine = make_engine(grace="0s", nodes=(("n1", 4),))
    for _ in range(4):
        engine.allocate(req("team-b", ttl_seconds=3600))
    q = engine.allocate(req("team-a", required_gpus=2))
    assert q["status"] == "allocated"
    assert sorted(a["status"] for a in engine.snapshot()["allocations"]) == ["allocated"] * 3
    assert engine.redis.hgetall(engine.keys.preempt_holds()) == {}


def test_a_hold_lapses_when_its_request_leaves_the_queue(make_engine, clock):
    engine = make_engine(nodes=(("n1", 4),))
    for _ in range(4):
        engine.allocate(req("team-b", ttl_seconds=3600))
    q = engine.allocate(req("team-a", required_gpus=2))
    assert engine.redis.hgetall(engine.keys.preempt_holds()) == {"n1": q["id"]}
    engine.cancel(q["id"])
    assert engine.redis.hgetall(engine.keys.preempt_holds()) == {}
    clock.advance(30)
    beat(engine, (("n1", 4),))
    engine.reap()
    c = engine.allocate(req("team-c", required_gpus=2))
    assert c["status"] == "allocated"  # the freed GPUs are anyone's again


# --------------------------------------------------------------------------- properties

GUARANTEE = {"team-a": 3, "team-b": 2, "team-c": 0}
ALLOCATE = st.tuples(
    st.just("allocate"),
    st.sampled_from(sorted(GUARANTEE)),
    st.integers(1, 4),
    st.integers(1, 10),
    st.sampled_from([60, 3600]),
)
OPS = st.one_of(  # allocations three times as often as the rest: the fleet fills up
    ALLOCATE,
    ALLOCATE,
    ALLOCATE,
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("time"), st.integers(1, 40)),
    st.tuples(st.just("pass")),
)


def check_preemption_invariants(engine, seen: set) -> set:
    """After every step: a tenant whose allocation a step marked preempting for a guarantee
    keeps at least its guarantee once its preempting allocations are gone (checked when the
    mark is made: the tenant's own releases may take it lower later); the preemptions made for
    one request never sum to more GPUs than it asked for. seen: the guarantee victims after
    the step before; returns those now."""
    live = engine.snapshot()["allocations"]
    held, leaving, for_, victims = {}, {}, {}, set()
    for a in live:
        n = 1 if a.get("sharing") == "shared" else len(a["gpu_ids"])
        held[a["tenant"]] = held.get(a["tenant"], 0) + n
        if a["status"] == "preempting":
            leaving[a["tenant"]] = leaving.get(a["tenant"], 0) + n
            if a.get("reason") == "guarantee":
                victims.add(a["id"])
                for_[a["preempted_for"]] = for_.get(a["preempted_for"], 0) + n
    for a in live:
        if a["id"] in victims and a["id"] not in seen:
            t = a["tenant"]
            assert held[t] - leaving.get(t, 0) >= GUARANTEE[t], (t, held, leaving)
    for rid, n in for_.items():
        assert n <= engine.get(rid)["required_gpus"], (rid, n)
    return victims


@hyp_settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(ops=st.lists(OPS, min_size=5, max_size=30))
@example(  # b's own release takes it below its guarantee while a victim of it is still leaving
    ops=[
        ("allocate", "team-b", 1, 1, 60),
        ("allocate", "team-b", 3, 1, 60),
        ("allocate", "team-a", 2, 1, 60),
        ("release", 1),
    ]
)
@example(  # b is one GPU over its guarantee, with its lowest priorities: one GPU from b at most
    ops=[
        ("allocate", "team-b", 1, 1, 3600),
        ("allocate", "team-b", 1, 1, 3600),
        ("allocate", "team-b", 1, 1, 3600),
        ("allocate", "team-c", 1, 9, 3600),
        ("allocate", "team-c", 2, 9, 3600),
        ("allocate", "team-a", 2, 5, 3600),
    ]
)
@example(  # the only victim there is would free more GPUs than the request needs: none
    ops=[
        ("allocate", "team-b", 4, 5, 3600),
        ("allocate", "team-c", 2, 1, 3600),
        ("allocate", "team-a", 1, 5, 3600),
        ("pass",),
    ]
)
@example(  # b and c fill the fleet; a (below its guarantee) preempts; more arrive and pass
    ops=[
        ("allocate", "team-c", 1, 2, 3600),
        ("allocate", "team-b", 2, 5, 3600),
        ("allocate", "team-c", 1, 9, 3600),
        ("allocate", "team-b", 2, 1, 3600),
        ("allocate", "team-a", 2, 5, 3600),
        ("allocate", "team-a", 1, 5, 3600),
        ("pass",),
        ("allocate", "team-a", 1, 5, 3600),
        ("time", 31),
        ("pass",),
    ]
)
def test_preemption_never_takes_a_guarantee_nor_more_than_needed(redis, settings, ops):
    redis.flushall()
    clock = Clock()
    st_ = settings.replace(
        tenants={
            "key": "service_name",
            "quotas": {t: {"guaranteed_gpus": g} for t, g in GUARANTEE.items()},
        },
        preemption={"enabled": True, "grace_period": "30s"},
    )
    engine = Engine(redis, st_, clock=clock)
    beat(engine, (("n1", 4), ("n2", 2)))
    seen: set = set()
    for op in ops:
        if op[0] == "allocate":
            _, tenant, k, prio, ttl = op
            engine.allocate(req(tenant, required_gpus=k, priority=prio, ttl_seconds=ttl))
        elif op[0] == "release":
            live = engine.snapshot()["allocations"]
            if live:
                engine.release(live[op[1] % len(live)]["id"])
        elif op[0] == "time":
            clock.advance(op[1])
            beat(engine, (("n1", 4), ("n2", 2)))
            engine.reap()
        else:
            engine.schedule_pass()
        seen = check_preemption_invariants(engine, seen)
