"""Preemption with notice in the engine: an allocation turns preempting (preempt_at, an event and
an always-sent webhook), no renewal reaches past preempt_at, and it ends as preempted when its
holder releases it or at preempt_at; a drain preempts every allocation on its node. Real
redis-server, injected clock."""

from __future__ import annotations

import math

import pytest

from app import errors
from app.engine import Engine
from tests.engine_support import events, outbox
from tests.test_engine import gpu_list, req, status


@pytest.fixture
def make_engine(redis, settings, clock):
    def make(grace="30s", **scheduler) -> Engine:
        st = settings.replace(preemption={"grace_period": grace})
        if scheduler:
            st = st.replace(scheduler=scheduler)
        return Engine(redis, st, clock=clock)

    return make


HOOK = "http://127.0.0.1:9/hook"


# --------------------------------------------------------------------------- drain


def test_drain_marks_every_allocation_on_the_node_preempting_with_notice(engine, clock, redis):
    engine.report_node("a", gpu_list(4))
    engine.report_node("b", gpu_list(2))
    t0 = clock()
    one = engine.allocate(req(required_gpus=2, ttl_seconds=600, webhook_url=HOOK, nodes=["a"]))
    two = engine.allocate(req(required_gpus=1, ttl_seconds=10, nodes=["a"]))
    other = engine.allocate(req(required_gpus=2, nodes=["b"]))
    view = engine.drain_node("a", principal="ops")
    assert view["draining"] and view["cordoned"]
    assert sorted(view["preempted"]) == sorted([one["id"], two["id"]])
    rec = engine.get(one["id"])
    assert rec["status"] == "preempting" and rec["reason"] == "drain"
    assert rec["preempt_at"] == pytest.approx(t0 + 30)
    assert rec["expires_at"] == pytest.approx(t0 + 30)  # the lease now ends at preempt_at
    # a lease that ends before preempt_at keeps its own end
    assert engine.get(two["id"])["expires_at"] == pytest.approx(t0 + 10)
    assert status(engine, other["id"]) == "allocated"
    ev = {e["request_id"]: e for e in events(engine, "preempting")}
    assert ev[one["id"]]["by"] == "ops" and ev[one["id"]]["reason"] == "drain"
    assert float(ev[one["id"]]["preempt_at"]) == pytest.approx(t0 + 30)
    assert ev[one["id"]]["gpu_ids"] == rec["gpu_ids"]
    # the holder is told even without opting in; the request without a webhook_url is not
    hooks = [(o["event"], o["request_id"]) for o in outbox(engine, redis)]
    assert hooks == [("preempting", one["id"])]


def test_preempt_at_ends_it_as_preempted_and_an_earlier_lease_end_as_expired(engine, clock, redis):
    engine.report_node("a", gpu_list(2))
    one = engine.allocate(req(ttl_seconds=600, webhook_url=HOOK))
    two = engine.allocate(req(ttl_seconds=10, webhook_url=HOOK, webhook_events=["expired"]))
    engine.drain_node("a")
    clock.advance(29)
    out = engine.reap()
    assert out["expired"] == [two["id"]] and "preempted" not in out
    assert status(engine, one["id"]) == "preempting"
    clock.advance(1)
    out = engine.reap()
    assert out["preempted"] == [one["id"]] and out["expired"] == []
    rec = engine.get(one["id"])
    assert rec["status"] == "preempted" and rec["ended_at"] == pytest.approx(clock())
    assert engine.counts()["allocations_active"] == 0
    assert engine.node_allocations("a") == []
    assert [e["request_id"] for e in events(engine, "preempted")] == [one["id"]]
    hooks = [(o["event"], o["request_id"]) for o in outbox(engine, redis)]
    assert sorted(hooks[:2]) == sorted([("preempting", one["id"]), ("preempting", two["id"])])
    assert hooks[2:] == [("expired", two["id"]), ("preempted", one["id"])]
    assert engine.stats()["allocations"]["svc"]["preempted"] == 1


def test_a_release_during_the_notice_ends_it_as_preempted(engine, redis):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate(req(webhook_url=HOOK))
    b = engine.allocate(req("batch"))
    engine.drain_node("a")
    rec = engine.release(a["id"])
    assert rec["status"] == "preempted" and rec["released_at"] is not None
    assert [r["id"] for r in engine.release_by_service("batch")] == [b["id"]]
    assert status(engine, b["id"]) == "preempted"
    with pytest.raises(errors.NotFound) as exc:
        engine.release(a["id"])
    assert exc.value.details["status"] == "preempted"
    assert [o["event"] for o in outbox(engine, redis)] == ["preempting", "preempted"]


def test_renewing_a_preempting_lease_never_reaches_past_preempt_at(engine, clock):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(ttl_seconds=60))
    engine.drain_node("a")
    preempt_at = engine.get(a["id"])["preempt_at"]
    clock.advance(5)
    rec = engine.renew(a["id"], 3600)
    assert rec["status"] == "preempting" and rec["expires_at"] == pytest.approx(preempt_at)
    clock.advance(20)
    rec = engine.renew(a["id"], 2)  # shorter than the notice left: the lease's own end
    assert rec["expires_at"] == pytest.approx(clock() + 2)
    clock.advance(2)
    assert engine.reap()["expired"] == [a["id"]]


def test_a_second_drain_keeps_the_first_deadline(engine, clock):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    engine.drain_node("a")
    first = engine.get(a["id"])["preempt_at"]
    clock.advance(10)
    assert engine.drain_node("a")["preempted"] == []
    assert engine.get(a["id"])["preempt_at"] == first
    assert len(events(engine, "preempting")) == 1


def test_drain_without_preemption_leaves_allocations_alone(engine):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    view = engine.drain_node("a", preempt=False)
    assert view["draining"] and view["preempted"] == []
    assert status(engine, a["id"]) == "allocated"


def test_a_zero_grace_period_ends_them_at_once(make_engine, redis):
    engine = make_engine(grace="0s")
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(2))
    a = engine.allocate(req(webhook_url=HOOK, nodes=["a"]))
    assert engine.drain_node("a")["preempted"] == [a["id"]]
    assert status(engine, a["id"]) == "preempted"
    assert engine.node_allocations("a") == []
    assert [o["event"] for o in outbox(engine, redis)] == ["preempting", "preempted"]


def test_uncordon_keeps_the_notice_given(engine, clock):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req())
    engine.drain_node("a")
    engine.cordon_node("a", False)
    assert status(engine, a["id"]) == "preempting"
    clock.advance(30)
    engine.reap()
    assert status(engine, a["id"]) == "preempted"
    assert engine.allocate(req())["status"] == "allocated"  # the node takes work again


def test_a_preempting_dependency_still_blocks_and_its_preemption_fails_ok_dependents(engine, clock):
    engine.report_node("a", gpu_list(1))
    engine.report_node("b", gpu_list(2))
    a = engine.allocate(req(nodes=["a"]))
    anyd = engine.allocate(req("any", depends_on=[a["id"]], nodes=["b"]))
    okd = engine.allocate(req("ok", depends_on=[a["id"]], depends_on_mode="ok", nodes=["b"]))
    engine.drain_node("a")
    engine.schedule_pass()
    assert status(engine, anyd["id"]) == status(engine, okd["id"]) == "queued"
    late = engine.allocate(req("late", depends_on=[a["id"]], depends_on_mode="ok", nodes=["b"]))
    assert late["status"] == "queued"  # a preempting dependency is live: ok may still wait
    clock.advance(30)
    engine.reap()
    assert status(engine, anyd["id"]) == "allocated"
    rec = engine.get(okd["id"])
    assert rec["status"] == "cancelled" and rec["reason"] == "dependency_failed"
    assert status(engine, late["id"]) == "cancelled"


def test_a_preempting_allocation_counts_as_live_everywhere(engine, clock):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate(req(required_gpus=2))
    engine.drain_node("a")
    snap = engine.snapshot()
    assert [x["id"] for x in snap["allocations"]] == [a["id"]]
    assert snap["allocations"][0]["status"] == "preempting"
    assert engine.counts()["gpus_allocated"] == 2
    assert engine.node_allocations("a") == [a["id"]]
    with pytest.raises(errors.Conflict):
        engine.cancel(a["id"])


def test_forgetting_the_node_of_a_preempting_allocation_ends_it_as_lost(engine, clock, redis):
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(webhook_url=HOOK))
    engine.drain_node("a")
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.forget_node("a")
    assert status(engine, a["id"]) == "lost"
    assert engine.reap().get("preempted") is None


# --------------------------------------------------------------------------- on time


def test_the_reaper_schedules_itself_at_a_preempt_at_due_before_its_next_run(
    redis, redis_url, settings
):
    """A notice of 2 s with the reaper every 5 s: the reap job books a one-off reap at
    preempt_at (RQ's scheduled registry), once per deadline; a deadline after the next periodic
    reap books nothing."""
    import redis as redis_lib
    from rq.registry import ScheduledJobRegistry

    from app import queues
    from workers import scheduler

    st = settings.replace(preemption={"grace_period": "2s"}, scheduler={"cleanup_interval": "5s"})
    engine = Engine(redis, st)  # Redis TIME, as the workers use
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(ttl_seconds=3600))
    rq_redis = redis_lib.Redis.from_url(redis_url)
    try:
        q = queues.queue(rq_redis, st, queues.MAINTENANCE)
        registry = ScheduledJobRegistry(queue=q)
        assert scheduler.reap_at_next_lease_end(engine, rq_redis, st) is None  # an hour away
        engine.drain_node("a")
        preempt_at = engine.get(a["id"])["preempt_at"]
        job_id = scheduler.reap_at_next_lease_end(engine, rq_redis, st)
        assert scheduler.reap_at_next_lease_end(engine, rq_redis, st) == job_id
        assert registry.get_job_ids() == [job_id]
        when = registry.get_scheduled_time(job_id).timestamp()
        assert when == math.ceil(preempt_at)  # RQ's whole seconds, never before the end
    finally:
        rq_redis.close()
