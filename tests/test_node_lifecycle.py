"""Node and GPU lifecycle in the engine: cordon and drain marks, forgetting a node (by an admin
or after scheduler.node_forget_after), silent nodes out of the GPU counts, holders told when
their GPUs fail, and admin priority changes. Real redis-server, injected clock."""

from __future__ import annotations

import json

import pytest

from app import errors
from app.engine import Engine
from tests.engine_support import Clock, events, outbox
from tests.test_engine import gpu_list, req, status

# --------------------------------------------------------------------------- counts


def test_a_silent_nodes_gpus_leave_total_and_available_until_it_returns(engine, clock):
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(4))
    assert engine.counts(nodes=True) == {
        "allocations_active": 0,
        "gpus_allocated": 0,
        "queue_depth": 0,
        "gpus_total": 6,
        "gpus_available": 6,
        "nodes_total": 2,
        "nodes_alive": 2,
    }
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.report_node("a", gpu_list(2))
    counts = engine.counts(nodes=True)
    assert (counts["gpus_total"], counts["gpus_available"]) == (2, 2)
    assert (counts["nodes_total"], counts["nodes_alive"]) == (2, 1)
    engine.report_node("b", gpu_list(4))
    assert engine.counts()["gpus_total"] == 6


# --------------------------------------------------------------------------- cordon and drain


def test_node_cordon_covers_every_gpu_and_those_reported_later(engine):
    engine.report_node("a", gpu_list(2))
    view = engine.cordon_node("a", True, principal="ops")
    assert view["cordoned"] and not view["draining"] and view["alive"]
    assert engine.allocate(req())["status"] == "queued"
    engine.report_node("a", gpu_list(3))  # a third GPU appears: it arrives cordoned
    gpus = {g["index"]: g for g in engine.snapshot()["gpus"]}
    assert all(g["cordoned"] for g in gpus.values()) and len(gpus) == 3
    ev = events(engine, "node_cordoned")
    assert [(e["node"], e["by"]) for e in ev] == [("a", "ops")]


def test_uncordon_of_the_node_clears_gpu_cordons_and_grants_the_queue(engine):
    engine.report_node("a", gpu_list(2))
    engine.cordon_node("a", True, drain=True, principal="ops")
    assert engine.snapshot()["nodes"][0]["draining"]
    q = engine.allocate(req())
    view = engine.cordon_node("a", False, principal="ops")
    assert not view["cordoned"] and not view["draining"]
    assert status(engine, q["id"]) == "allocated"
    assert events(engine, "node_draining")[0]["node"] == "a"
    assert events(engine, "node_uncordoned")[0]["by"] == "ops"


def test_gpu_cordon_names_the_principal_and_unknown_targets_are_404(engine):
    engine.report_node("a", gpu_list(2))
    engine.set_gpu_schedulable("a", 1, False, principal="alice")
    assert events(engine, "gpu_cordoned")[0]["by"] == "alice"
    with pytest.raises(errors.NotFound):
        engine.cordon_node("nope", True)
    with pytest.raises(errors.NotFound):
        engine.set_gpu_schedulable("a", 7, False)


def test_drain_keeps_allocations_and_node_allocations_lists_them(engine):
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1))
    a = engine.allocate(req(required_gpus=2))
    assert a["node"] == "a"
    engine.cordon_node("a", True, drain=True)
    assert engine.node_allocations("a") == [a["id"]]
    assert engine.node_allocations("b") == []
    engine.release(a["id"])
    assert engine.node_allocations("a") == []
    assert engine.allocate(req())["node"] == "b"  # the drained node takes nothing new


# --------------------------------------------------------------------------- forget


def test_forget_refuses_an_alive_node_and_unknown_nodes(engine):
    engine.report_node("a", gpu_list(1))
    with pytest.raises(errors.Conflict) as exc:
        engine.forget_node("a")
    assert "alive" in str(exc.value)
    with pytest.raises(errors.NotFound):
        engine.forget_node("ghost")


def test_forgetting_a_silent_node_ends_its_allocations_as_lost(engine, clock, redis):
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(1))
    a = engine.allocate(req(required_gpus=2, webhook_url="http://127.0.0.1:9/hook"))
    b = engine.allocate(req("other", webhook_url="http://127.0.0.1:9/b"))
    assert (a["node"], b["node"]) == ("a", "b")
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.report_node("b", gpu_list(1))
    out = engine.forget_node("a", principal="ops")
    assert out["lost"] == [a["id"]]
    assert status(engine, a["id"]) == "lost" and status(engine, b["id"]) == "allocated"
    snap = engine.snapshot()
    assert [n["name"] for n in snap["nodes"]] == ["b"]
    assert {g["node"] for g in snap["gpus"]} == {"b"}
    assert engine.counts() == {
        "allocations_active": 1,
        "gpus_allocated": 1,
        "queue_depth": 0,
        "gpus_total": 1,
        "gpus_available": 0,
    }
    lost = [o for o in outbox(engine, redis) if o["event"] == "lost"]
    assert [o["request_id"] for o in lost] == [a["id"]]  # always sent: no opt-in needed
    ev = events(engine, "node_forgotten")[0]
    assert (ev["node"], ev["by"], ev["allocations_lost"]) == ("a", "ops", "1")
    assert engine.stats()["allocations"]["svc"]["lost"] == 1
    # the node comes back: a fresh node, nothing of the old state
    engine.report_node("a", gpu_list(2))
    assert engine.allocate(req(required_gpus=2))["node"] == "a"


def test_a_reservation_on_a_forgotten_node_is_dropped(make_engine, clock, redis):
    engine = make_engine(reservation_after=0)
    engine.report_node("a", gpu_list(2))
    engine.report_node("b", gpu_list(2, mem=1000))  # free, but too small for big
    held = engine.allocate(req(required_gpus=2, min_memory_mb=40000, ttl_seconds=60))
    big = engine.allocate(req(required_gpus=2, min_memory_mb=40000))
    engine.schedule_pass()
    assert redis.hget(engine.keys.reservations(), "a") == big["id"]
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.report_node("b", gpu_list(2, mem=1000))
    engine.forget_node("a")
    assert redis.hgetall(engine.keys.reservations()) == {}
    assert engine.get(big["id"])["reserved_node"] is None
    assert status(engine, big["id"]) == "queued" and status(engine, held["id"]) == "lost"


def test_reaper_forgets_nodes_silent_past_node_forget_after(make_engine, clock, redis):
    engine = make_engine(node_forget_after=600)
    engine.report_node("a", gpu_list(1))
    a = engine.allocate(req(webhook_url="http://127.0.0.1:9/x"))
    clock.advance(599)
    assert engine.reap()["forgotten"] == []
    assert engine.snapshot()["nodes"][0]["alive"] is False  # shown, not alive
    clock.advance(2)
    out = engine.reap()
    assert out["forgotten"] == ["a"] and out["lost"] == [a["id"]]
    assert events(engine, "node_forgotten")[0]["by"] == "system"
    assert engine.snapshot()["nodes"] == []


def test_node_forget_after_zero_never_forgets(make_engine, clock):
    engine = make_engine(node_forget_after=0)
    engine.report_node("a", gpu_list(1))
    clock.advance(10**7)
    assert engine.reap()["forgotten"] == []
    assert [n["name"] for n in engine.snapshot()["nodes"]] == ["a"]


# --------------------------------------------------------------------------- GPU health


def test_holder_is_told_once_when_its_gpus_fail_and_gpu_health_shows_it(engine, redis):
    engine.report_node("a", gpu_list(4))
    a = engine.allocate(req(required_gpus=2, webhook_url="http://127.0.0.1:9/a"))
    free = engine.allocate(req("quiet"))
    held = a["gpu_ids"]
    assert engine.gpu_health(engine.get(a["id"])) == [{"index": i, "health": "ok"} for i in held]
    health = ["ok"] * 4
    health[held[0]] = "degraded"
    health[held[1]] = "failed"
    health[free["gpu_ids"][0]] = "ok"
    engine.report_node("a", gpu_list(4, health=health))
    hooks = [o for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"]
    assert len(hooks) == 1 and hooks[0]["request_id"] == a["id"]
    assert sorted(hooks[0]["gpus"], key=lambda g: g["index"]) == sorted(
        [{"index": held[0], "health": "degraded"}, {"index": held[1], "health": "failed"}],
        key=lambda g: g["index"],
    )
    engine.report_node("a", gpu_list(4, health=health))  # still failed: no second notice
    assert len([o for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"]) == 1
    got = {g["index"]: g["health"] for g in engine.gpu_health(engine.get(a["id"]))}
    assert got == {held[0]: "degraded", held[1]: "failed"}
    assert status(engine, a["id"]) == "allocated"  # the holder decides what to do


def test_a_gpu_missing_from_the_report_is_lost_for_its_holder(engine, redis, clock):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate(req(preferred_gpus=[1], webhook_url="http://127.0.0.1:9/a"))
    assert a["gpu_ids"] == [1]
    engine.report_node("a", gpu_list(1))  # GPU 1 no longer reported
    hooks = [o for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"]
    assert hooks[0]["gpus"] == [{"index": 1, "health": "lost"}]
    assert engine.gpu_health(engine.get(a["id"])) == [{"index": 1, "health": "lost"}]
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.report_node("a", gpu_list(2))
    assert engine.gpu_health(engine.get(a["id"])) == [{"index": 1, "health": "ok"}]


def test_shared_holders_are_told_too(engine, redis):
    engine.report_node("a", gpu_list(1))
    s1 = engine.allocate(req(sharing="shared", min_memory_mb=1000))
    s2 = engine.allocate(
        req("two", sharing="shared", min_memory_mb=1000, webhook_url="http://127.0.0.1:9/s")
    )
    engine.report_node("a", gpu_list(1, health="failed"))
    told = {e["request_id"] for e in events(engine, "allocation_unhealthy")}
    assert told == {s1["id"], s2["id"]}
    assert [o["request_id"] for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"] == [
        s2["id"]
    ]  # only s2 has a webhook_url


def test_holders_are_told_once_when_their_node_goes_silent(engine, clock, redis):
    engine.report_node("a", gpu_list(2))
    a = engine.allocate(req(required_gpus=2, webhook_url="http://127.0.0.1:9/a"))
    assert engine.reap()["expired"] == []
    assert [o for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"] == []
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.reap()
    engine.reap()
    hooks = [o for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"]
    assert len(hooks) == 1 and hooks[0]["request_id"] == a["id"]
    assert sorted(g["index"] for g in hooks[0]["gpus"]) == sorted(a["gpu_ids"])
    assert {g["health"] for g in hooks[0]["gpus"]} == {"lost"}
    engine.report_node("a", gpu_list(2))  # back; a second silence is a second notice
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.reap()
    assert len([o for o in outbox(engine, redis) if o["event"] == "gpu_unhealthy"]) == 2


# --------------------------------------------------------------------------- priority


def test_priority_change_moves_a_queued_request_and_can_grant_it(engine):
    engine.report_node("a", gpu_list(1))
    held = engine.allocate(req())
    first = engine.allocate(req("first", priority=5))
    second = engine.allocate(req("second", priority=5))
    assert engine.get(second["id"])["position"] == 2
    rec = engine.set_priority(second["id"], 9, principal="ops")
    assert rec["priority"] == 9 and rec["position"] == 1
    ev = events(engine, "priority_changed")[0]
    assert (ev["by"], ev["priority"], ev["previous_priority"]) == ("ops", "9", "5")
    engine.release(held["id"])
    assert status(engine, second["id"]) == "allocated"
    assert status(engine, first["id"]) == "queued"
    with pytest.raises(errors.Conflict):
        engine.set_priority(second["id"], 3)
    with pytest.raises(errors.ValidationFailed):
        engine.set_priority(first["id"], 11)
    with pytest.raises(errors.NotFound):
        engine.set_priority("svc-1-00000000", 3)


def test_priority_change_keeps_fifo_among_equals_with_aging(make_engine, clock):
    engine = make_engine(aging_rate=1.0)
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    ids = []
    for prio in (3, 5, 5):
        ids.append(engine.allocate(req(priority=prio))["id"])
        clock.advance(1)
    engine.set_priority(ids[0], 5)  # now equal and the oldest: first in line
    assert [engine.get(i)["position"] for i in ids] == [1, 2, 3]


# --------------------------------------------------------------------------- delivery


def test_gpu_unhealthy_and_lost_webhooks_are_delivered_signed(settings, redis):
    """From the engine's outbox through the delivery job to a real receiver on 127.0.0.1."""
    from webhook_receiver import Receiver

    from workers import context, webhooks

    st = settings.replace(webhooks={"secret": "s3cret"})
    clock = Clock()
    engine = Engine(redis, st, clock=clock)
    engine.report_node("a", gpu_list(2))
    with Receiver() as rx:
        a = engine.allocate(req(required_gpus=2, webhook_url=rx.url))
        engine.report_node("a", gpu_list(2, health=["failed", "ok"]))
        clock.advance(st.scheduler.node_heartbeat_timeout + 1)
        engine.forget_node("a", principal="ops")
        entries = [e for e in outbox(engine, redis) if e["event"] != "allocated"]
        assert [e["event"] for e in entries] == ["gpu_unhealthy", "lost"]
        context.configure(st, redis, None)
        try:
            for entry in entries:
                assert webhooks.deliver(entry)["delivered"] is True
        finally:
            context.configure(None, None, None)
        bodies = []
        for got in rx.requests:
            h = {k.lower(): v for k, v in got["headers"].items()}
            assert webhooks.verify_signature(
                "s3cret",
                h["x-gpu-orchestrator-timestamp"],
                got["body"],
                h["x-gpu-orchestrator-signature"],
            )
            bodies.append(json.loads(got["body"]))
    unhealthy, lost = bodies
    assert unhealthy["status"] == "gpu_unhealthy" and unhealthy["request_id"] == a["id"]
    assert unhealthy["node"] == "a" and unhealthy["gpus"] == [{"index": 0, "health": "failed"}]
    assert lost["status"] == "lost" and lost["request_id"] == a["id"] and "gpus" not in lost
