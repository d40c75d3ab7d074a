"""Guarantee preemption with shared requests (issue 14): a queued shared request of a tenant below
its guarantee takes back room on one GPU (shared slots, or one GPU's exclusive holder), shared
allocations can be victims of any request, and a shared allocation counts as one GPU toward its
tenant's holding against its guarantee. Real redis-server, injected clock; tenants by
service_name."""

from __future__ import annotations

import pytest

from app.engine import Engine
from app.request_rules import MAX_SHARED_PER_GPU
from tests.engine_support import events, outbox
from tests.test_engine import gpu_list, req, status

QUOTAS = {
    "team-a": {"guaranteed_gpus": 4},
    "team-b": {"guaranteed_gpus": 2},
    "team-c": {"guaranteed_gpus": 0},
}
MB = 81920  # gpu_list's memory per GPU


@pytest.fixture
def make_engine(redis, settings, clock):
    def make(nodes=(("n1", 1),), quotas=None, grace="30s", fair=False):
        st = settings.replace(
            tenants={"key": "service_name", "quotas": quotas or QUOTAS, "fair_share": fair},
            preemption={"enabled": True, "grace_period": grace},
        )
        eng = Engine(redis, st, clock=clock)
        for name, n in nodes:
            eng.report_node(name, gpu_list(n))
        eng.nodes = nodes
        return eng

    return make


def beat(engine):
    for name, n in engine.nodes:
        engine.report_node(name, gpu_list(n))


def shared(tenant, mb, **kw):
    return req(tenant, sharing="shared", min_memory_mb=mb, **kw)


def fill_shared(engine, clock, tenant, priorities, mb=20000, **kw):
    """One shared allocation per priority, one second apart (grant order is known)."""
    out = []
    for p in priorities:
        rec = engine.allocate(shared(tenant, mb, priority=p, ttl_seconds=3600, **kw))
        assert rec["status"] == "allocated", rec
        out.append(rec)
        clock.advance(1)
    return out


def preempting(engine):
    return [a for a in engine.snapshot()["allocations"] if a["status"] == "preempting"]


def tenant_held(engine, name):
    return next((t["gpus_held"] for t in engine.tenants() if t["tenant"] == name), 0)


def test_a_shared_request_takes_back_one_slot_and_gets_it(make_engine, clock, redis):
    engine = make_engine()
    b = fill_shared(engine, clock, "team-b", (5, 3, 5, 5))  # 80,000 of 81,920 MB reserved
    assert tenant_held(engine, "team-b") == 4  # a shared allocation counts as one GPU
    a = engine.allocate(shared("team-a", 20000, ttl_seconds=600))
    assert a["status"] == "queued"
    # one slot is enough (1,920 free + 20,000): the lowest priority, and only it
    victims = preempting(engine)
    assert [v["id"] for v in victims] == [b[1]["id"]]
    v = engine.get(b[1]["id"])
    assert v["reason"] == "guarantee" and v["preempted_for"] == a["id"]
    assert v["preempt_at"] == pytest.approx(clock() + 30)
    assert engine.get(a["id"])["reserved_node"] == "n1"
    (ev,) = events(engine, "preempting")
    assert ev["request_id"] == b[1]["id"] and ev["for"] == a["id"]
    # team-c's request for the same room does not take the slot while it is held
    c = engine.allocate(shared("team-c", 1000, priority=10))
    assert c["status"] == "queued"
    clock.advance(30)
    beat(engine)
    assert engine.reap()["preempted"] == [b[1]["id"]]
    assert status(engine, b[1]["id"]) == "preempted"
    got = engine.get(a["id"])
    assert got["status"] == "allocated" and got["node"] == "n1" and got["gpu_ids"] == [0]
    assert status(engine, c["id"]) == "queued"
    assert [status(engine, x["id"]) for x in (b[0], b[2], b[3])] == ["allocated"] * 3
    assert engine.stats()["preemptions"] == {"team-b": 1}
    assert tenant_held(engine, "team-b") == 3 and tenant_held(engine, "team-a") == 1
    assert engine.redis.hgetall(engine.keys.preempt_holds()) == {}


def test_a_shared_request_takes_as_many_slots_as_its_memory_needs(make_engine, clock):
    engine = make_engine()
    b = fill_shared(engine, clock, "team-b", (5, 3, 5, 5))
    # 30,000 MB: 1,920 free + one slot (20,000) is not enough, two are (41,920)
    a = engine.allocate(shared("team-a", 30000))
    assert a["status"] == "queued"
    # the priority-3 slot, then the most recently granted priority-5 one
    assert sorted(v["id"] for v in preempting(engine)) == sorted([b[1]["id"], b[3]["id"]])
    engine.release(b[1]["id"])
    assert status(engine, a["id"]) == "queued"  # one victim is still there
    engine.release(b[3]["id"])
    assert status(engine, b[3]["id"]) == "preempted"
    assert status(engine, a["id"]) == "allocated"


def test_a_shared_allocation_counts_one_gpu_toward_its_tenants_guarantee(make_engine, clock):
    engine = make_engine()
    fill_shared(engine, clock, "team-b", (5, 5, 5, 5))  # b holds 4, guarantee 2
    # 50,000 MB would need three slots: b would keep 1 < 2, so nothing is preempted
    assert engine.allocate(shared("team-a", 50000))["status"] == "queued"
    assert preempting(engine) == []
    # 30,000 MB needs two: b keeps 2 = its guarantee
    assert engine.allocate(shared("team-a", 30000))["status"] == "queued"
    assert len(preempting(engine)) == 2


def test_a_tenant_at_its_guarantee_keeps_its_shared_allocations(make_engine, clock):
    engine = make_engine()
    fill_shared(engine, clock, "team-b", (1, 1), mb=40000)  # b holds exactly its 2
    assert engine.allocate(shared("team-a", 20000))["status"] == "queued"
    assert engine.schedule_pass() == [] and preempting(engine) == []


def test_the_requesters_own_guarantee_counts_its_shared_allocations(make_engine, clock):
    engine = make_engine(
        quotas={"team-a": {"guaranteed_gpus": 1}, "team-b": {"guaranteed_gpus": 0}}
    )
    fill_shared(engine, clock, "team-a", (5,), mb=10000)
    fill_shared(engine, clock, "team-b", (1, 1, 1), mb=20000)
    # team-a holds one (shared) GPU = its guarantee: a second shared request preempts nothing
    assert engine.allocate(shared("team-a", 20000))["status"] == "queued"
    assert preempting(engine) == []


def test_nothing_is_preempted_when_shared_holders_leave_within_the_grace_period(make_engine, clock):
    engine = make_engine()
    fill_shared(engine, clock, "team-b", (5, 5, 5))
    engine.allocate(shared("team-b", 20000, ttl_seconds=20))  # its room comes back at +20 s
    assert engine.allocate(shared("team-a", 20000))["status"] == "queued"
    assert preempting(engine) == []


def test_a_shared_request_may_take_a_gpu_from_an_exclusive_holder_of_that_gpu_alone(
    make_engine, clock
):
    engine = make_engine(nodes=(("n1", 2),))
    x = engine.allocate(req("team-b", priority=8, ttl_seconds=3600))  # GPU 0, alone
    clock.advance(1)
    # GPU 1: three shared allocations of b, priority 1, 6,920 MB left
    fill_shared(engine, clock, "team-b", (1, 1, 1), mb=25000)
    # 40,000 MB: two slots of GPU 1, or GPU 0's one exclusive holder: fewest victims wins
    a = engine.allocate(shared("team-a", 40000))
    assert [v["id"] for v in preempting(engine)] == [x["id"]]
    engine.release(x["id"])
    assert engine.get(a["id"])["gpu_ids"] == [x["gpu_ids"][0]]


def test_an_exclusive_holder_of_more_gpus_is_not_taken_for_a_shared_request(make_engine, clock):
    engine = make_engine(nodes=(("n1", 2), ("n2", 1)))
    two = engine.allocate(req("team-c", required_gpus=2, priority=1, ttl_seconds=3600))
    one = engine.allocate(req("team-c", priority=9, ttl_seconds=3600))
    assert (two["node"], one["node"]) == ("n1", "n2")
    # on n1 the only victim would end an allocation of two GPUs for a request of one: never
    assert engine.allocate(shared("team-a", 20000, nodes=["n1"]))["status"] == "queued"
    assert preempting(engine) == []
    # anywhere: n2's one-GPU holder goes, though its priority is higher
    engine.allocate(shared("team-a", 20000))
    assert [v["id"] for v in preempting(engine)] == [one["id"]]


def test_an_exclusive_request_takes_a_gpu_of_shared_holders_all_or_none(make_engine, clock):
    engine = make_engine(nodes=(("n1", 2),))
    x = engine.allocate(req("team-b", priority=8, ttl_seconds=3600))  # GPU 0
    clock.advance(1)
    s = fill_shared(engine, clock, "team-c", (1, 2), mb=10000)  # GPU 1, low priorities
    assert {r["gpu_ids"][0] for r in s} == {1 - x["gpu_ids"][0]}
    a = engine.allocate(req("team-a", ttl_seconds=600))
    assert a["status"] == "queued"
    # lowest priority first: the GPU whose holders are priority 1 and 2, both of them
    assert sorted(v["id"] for v in preempting(engine)) == sorted(r["id"] for r in s)
    assert status(engine, x["id"]) == "allocated"
    engine.release(s[0]["id"])
    assert status(engine, a["id"]) == "queued"
    clock.advance(30)
    beat(engine)
    engine.reap()
    got = engine.get(a["id"])
    assert got["status"] == "allocated" and got["gpu_ids"] == s[0]["gpu_ids"]
    assert engine.stats()["preemptions"] == {"team-c": 2}


def test_a_gpu_shared_with_the_requesters_own_tenant_is_not_emptied(make_engine, clock):
    engine = make_engine(nodes=(("n1", 1),))
    fill_shared(engine, clock, "team-c", (1,), mb=10000)
    fill_shared(engine, clock, "team-a", (5,), mb=10000)
    # freeing the GPU would end team-a's own allocation: no plan
    assert engine.allocate(req("team-a"))["status"] == "queued"
    assert preempting(engine) == []


def test_the_preempted_shared_holder_is_told_and_ends_preempted_when_it_releases(
    make_engine, clock, redis
):
    engine = make_engine()
    hook = "http://127.0.0.1:9/hook"
    b = [
        engine.allocate(shared("team-b", 27000, priority=p, ttl_seconds=3600, webhook_url=hook))
        for p in (4, 5, 6)
    ]
    a = engine.allocate(shared("team-a", 10000))
    assert [v["id"] for v in preempting(engine)] == [b[0]["id"]]
    clock.advance(5)
    engine.release(b[0]["id"])
    got = engine.get(b[0]["id"])
    assert got["status"] == "preempted" and got["released_at"] == pytest.approx(clock())
    assert status(engine, a["id"]) == "allocated"
    sent = [(o["event"], o["request_id"]) for o in outbox(engine, redis)]
    assert sent == [("preempting", b[0]["id"]), ("preempted", b[0]["id"])]


@pytest.mark.parametrize("fair", [False, True])
def test_the_room_a_victim_frees_waits_for_the_request_in_either_walk(make_engine, clock, fair):
    engine = make_engine(fair=fair)
    b = fill_shared(engine, clock, "team-b", (5, 3, 5, 5))
    a = engine.allocate(shared("team-a", 20000))
    assert [v["id"] for v in preempting(engine)] == [b[1]["id"]]
    # "early" (no guarantee; first by name, and holding nothing like team-a) asks for room the
    # victim's end frees: it waits, the room is team-a's
    early = engine.allocate(shared("early", 15000, priority=10))
    assert early["status"] == "queued"
    clock.advance(10)
    engine.release(b[1]["id"])
    assert status(engine, a["id"]) == "allocated"
    assert status(engine, early["id"]) == "queued"


def test_a_gpu_that_frees_within_the_grace_period_is_not_taken_again(make_engine, clock):
    engine = make_engine(nodes=(("n1", 4),))
    soon = engine.allocate(req("team-b", priority=1, ttl_seconds=10))
    clock.advance(1)
    b = [engine.allocate(req("team-b", priority=p, ttl_seconds=3600)) for p in (5, 5, 2)]
    # team-a needs 2: one GPU frees at +10 s by itself, so one victim is enough (the lowest
    # priority of those staying: priority 2), not two
    a = engine.allocate(req("team-a", required_gpus=2, ttl_seconds=600))
    assert [v["id"] for v in preempting(engine)] == [b[2]["id"]]
    clock.advance(10)
    beat(engine)
    assert engine.reap()["expired"] == [soon["id"]]
    assert status(engine, a["id"]) == "queued"
    clock.advance(20)
    beat(engine)
    engine.reap()
    assert status(engine, a["id"]) == "allocated"
    assert [status(engine, x["id"]) for x in b] == ["allocated", "allocated", "preempted"]


def test_a_shared_holder_leaving_within_the_grace_period_is_not_preempted(make_engine, clock):
    engine = make_engine()
    short = engine.allocate(shared("team-c", 10000, priority=1, ttl_seconds=10))
    long_ = engine.allocate(shared("team-c", 10000, priority=5, ttl_seconds=3600))
    a = engine.allocate(req("team-a"))
    assert a["status"] == "queued"
    assert [v["id"] for v in preempting(engine)] == [long_["id"]]
    clock.advance(30)
    beat(engine)
    out = engine.reap()
    assert out["expired"] == [short["id"]] and out["preempted"] == [long_["id"]]
    assert status(engine, a["id"]) == "allocated"


def test_a_gpu_full_of_shared_holders_gives_a_slot_back_though_its_memory_is_free(
    make_engine, clock
):
    """A GPU with MAX_SHARED_PER_GPU shared holders takes no more, whatever memory is free:
    a guaranteed tenant's shared request preempts one holder for its slot (it waited, with
    nothing preempted, while the plan looked at memory alone)."""
    engine = make_engine()
    c = [
        engine.allocate(shared("team-c", 0, priority=p, ttl_seconds=3600))
        for p in [5] * (MAX_SHARED_PER_GPU - 1) + [3]
    ]
    assert {r["status"] for r in c} == {"allocated"}
    a = engine.allocate(shared("team-a", 1000))
    assert a["status"] == "queued"
    assert [v["id"] for v in preempting(engine)] == [c[-1]["id"]]  # the lowest priority
    engine.release(c[-1]["id"])
    assert status(engine, c[-1]["id"]) == "preempted"
    assert status(engine, a["id"]) == "allocated"
