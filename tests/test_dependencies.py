"""depends_on_mode: ``any`` (any ending frees a dependent) or ``ok`` (only a normal release does;
any other ending cancels the dependents, reason dependency_failed), against a real redis-server:
the cancellation runs inside the Lua script that ends the dependency."""

from __future__ import annotations

import json

import pytest

from app import errors
from app.engine import Engine
from tests.api_support import allocate, app, assert_error, client, clock, make_app  # noqa: F401
from tests.engine_support import Clock


@pytest.fixture
def tick():
    return Clock()


@pytest.fixture
def engine(redis, settings, tick):
    eng = Engine(redis, settings, clock=tick)
    eng.report_node(
        "a",
        [
            {
                "index": i,
                "uuid": f"GPU-{i}",
                "memory_total_mb": 81920,
                "memory_used_mb": 0,
                "health": "ok",
            }
            for i in range(2)
        ],
    )
    return eng


def req(service="svc", **kw):
    return {"service_name": service, "required_gpus": 1, "priority": 5, **kw}


def status(engine, rid):
    return engine.get(rid)["status"]


def outbox_events(redis, engine):
    return [
        (e["event"], e["request_id"])
        for e in map(json.loads, redis.lrange(engine.keys.webhook_outbox(), 0, -1))
    ]


def test_mode_any_is_the_default_and_any_ending_frees_the_dependent(engine):
    engine.allocate(req(required_gpus=2))  # the node is full
    dep = engine.allocate(req("dep"))
    waiter = engine.allocate(req("waiter", depends_on=[dep["id"]]))
    assert engine.get(waiter["id"])["depends_on_mode"] == "any"
    engine.cancel(dep["id"])
    assert status(engine, waiter["id"]) == "queued"  # waits for a GPU, not for dep
    assert engine.get(waiter["id"]).get("reason") is None


def test_mode_ok_runs_after_a_normal_release(engine, redis):
    dep = engine.allocate(req("dep", required_gpus=2))
    waiter = engine.allocate(req("waiter", depends_on=[dep["id"]], depends_on_mode="ok"))
    assert waiter["status"] == "queued"
    assert redis.smembers(engine.keys.dependents(dep["id"])) == {waiter["id"]}
    engine.release(dep["id"])
    assert status(engine, waiter["id"]) == "allocated"
    assert not redis.exists(engine.keys.dependents(dep["id"]))


def test_mode_ok_dependent_is_cancelled_when_its_dependency_expires(engine, redis, tick):
    dep = engine.allocate(req("dep", required_gpus=2, ttl_seconds=60))
    waiter = engine.allocate(
        req(
            "waiter",
            depends_on=[dep["id"]],
            depends_on_mode="ok",
            webhook_url="http://127.0.0.1:9/hook",
            webhook_events=["cancelled"],
        )
    )
    silent = engine.allocate(
        req(
            "silent",
            depends_on=[dep["id"]],
            depends_on_mode="ok",
            webhook_url="http://127.0.0.1:9/hook",
        )
    )
    tick.t += 61
    engine.reap()
    assert status(engine, dep["id"]) == "expired"
    for rid in (waiter["id"], silent["id"]):
        rec = engine.get(rid)
        assert rec["status"] == "cancelled"
        assert rec["reason"] == "dependency_failed" and rec["failed_dependency"] == dep["id"]
        assert rec["ended_at"] == tick.t
    assert engine.snapshot()["queue"] == []
    # the cancelled webhook goes to the request that opted in to it, as for any cancel
    assert outbox_events(redis, engine) == [("cancelled", waiter["id"])]
    cancelled = [e for e in engine.events() if e["event"] == "cancelled"]
    assert {(e["request_id"], e["reason"], e["dependency"]) for e in cancelled} == {
        (waiter["id"], "dependency_failed", dep["id"]),
        (silent["id"], "dependency_failed", dep["id"]),
    }
    assert not redis.exists(engine.keys.dependents(dep["id"]))


@pytest.mark.parametrize("end", ["cancel", "release_queued", "time_out"])
def test_mode_ok_cancels_down_a_chain_when_a_queued_dependency_ends(engine, tick, end):
    engine.allocate(req("hog", required_gpus=2))
    a = engine.allocate(req("a", queue_timeout_seconds=100))
    b = engine.allocate(req("b", depends_on=[a["id"]], depends_on_mode="ok"))
    c = engine.allocate(req("c", depends_on=[b["id"]], depends_on_mode="ok"))
    loose = engine.allocate(req("loose", depends_on=[b["id"]]))  # mode any
    if end == "cancel":
        engine.cancel(a["id"])
    elif end == "release_queued":
        engine.release(a["id"])  # releasing a queued request cancels it
    else:
        tick.t += 101
        engine.reap()
    assert status(engine, a["id"]) in ("cancelled", "timed_out")
    assert (engine.get(b["id"])["failed_dependency"], engine.get(c["id"])["failed_dependency"]) == (
        a["id"],
        b["id"],
    )
    assert status(engine, b["id"]) == status(engine, c["id"]) == "cancelled"
    if end != "time_out":
        assert status(engine, loose["id"]) == "queued"  # any: b ended, it may run
        assert [q["id"] for q in engine.snapshot()["queue"]] == [loose["id"]]


def test_a_long_chain_is_cancelled_in_one_step(engine):
    engine.allocate(req("hog", required_gpus=2))
    first = prev = engine.allocate(req("link"))["id"]
    chain = []
    for _ in range(300):
        prev = engine.allocate(req("link", depends_on=[prev], depends_on_mode="ok"))["id"]
        chain.append(prev)
    engine.cancel(first)
    assert {status(engine, rid) for rid in chain} == {"cancelled"}
    assert engine.counts()["queue_depth"] == 0


def test_mode_ok_on_a_dependency_that_already_failed_is_rejected(engine, redis):
    engine.allocate(req("hog", required_gpus=2))
    dep = engine.allocate(req("dep"))
    engine.cancel(dep["id"])
    depth = engine.counts()["queue_depth"]
    with pytest.raises(errors.ValidationFailed) as exc:
        engine.allocate(req("late", depends_on=[dep["id"]], depends_on_mode="ok"))
    assert exc.value.details == {"field": "depends_on", "id": dep["id"], "status": "cancelled"}
    assert engine.counts()["queue_depth"] == depth
    # mode any accepts it, as before
    assert engine.allocate(req("late", depends_on=[dep["id"]]))["status"] == "queued"


def test_mode_ok_on_a_released_dependency_runs_at_once(engine):
    dep = engine.allocate(req("dep"))
    engine.release(dep["id"])
    after = engine.allocate(req("after", depends_on=[dep["id"]], depends_on_mode="ok"))
    assert after["status"] == "allocated"


def test_a_bad_mode_is_refused(engine):
    with pytest.raises(errors.ValidationFailed):
        engine.allocate(req(depends_on_mode="afterok"))


# --------------------------------------------------------------------------- through the API


def test_api_takes_depends_on_mode_and_shows_the_reason(client):
    assert allocate(client, "hog", workload_data={"required_gpus": 8}).status_code == 200
    dep = allocate(client, "dep").get_json()["request_id"]
    waiter = allocate(client, "waiter", depends_on=[dep], depends_on_mode="ok").get_json()
    assert client.get(f"/gpu/requests/{waiter['request_id']}").get_json()["depends_on_mode"] == "ok"
    assert client.delete(f"/gpu/requests/{dep}").status_code == 200
    body = client.get(f"/gpu/requests/{waiter['request_id']}").get_json()
    assert body["status"] == "cancelled" and body["reason"] == "dependency_failed"
    assert body["failed_dependency"] == dep
    err = assert_error(
        allocate(client, "late", depends_on=[dep], depends_on_mode="ok"), 422, "validation_error"
    )
    assert err["details"]["status"] == "cancelled"
    err = assert_error(allocate(client, depends_on_mode="afterok"), 422, "validation_error")
    assert "depends_on_mode" in err["details"]


def test_a_reap_does_not_time_out_a_dependent_its_own_timeout_already_cancelled(
    engine, redis, tick
):
    """A queued request and its mode-ok dependent time out in the same reap: the dependent is
    cancelled by its dependency's failure, once. It was then ended a second time as timed_out
    (it was still in the reap's list), so its owner's queued count (max_queued_per_owner, the
    owner's tenant index) and its tenant's queued count lost one more: the owner's remaining
    queued request was no longer counted or listed among its tenants."""
    engine.allocate(req("hog", required_gpus=2))
    a = engine.allocate(req("a", owner="alice", queue_timeout_seconds=100))
    b = engine.allocate(
        req(
            "b",
            owner="alice",
            queue_timeout_seconds=100,
            depends_on=[a["id"]],
            depends_on_mode="ok",
        )
    )
    keep = engine.allocate(req("keep", owner="alice", queue_timeout_seconds=1000))
    tick.t += 101
    out = engine.reap()
    assert out["timed_out"] == [a["id"]]
    after = engine.get(b["id"])
    assert (after["status"], after["reason"]) == ("cancelled", "dependency_failed")
    assert [q["id"] for q in engine.snapshot()["queue"]] == [keep["id"]]
    assert redis.hgetall(engine.keys.queue_owners()) == {"o:alice": "1"}
    assert redis.hgetall(engine.keys.queue_owner_tenants("alice")) == {keep["tenant"]: "1"}
    assert engine.own_tenants("alice") == {keep["tenant"]}
    ended = [e["event"] for e in engine.events() if e.get("request_id") == b["id"]]
    assert ended[1:] == ["cancelled"]  # after its queued event: one end


@pytest.mark.parametrize(
    "end, ended",
    [
        ("cancel", "cancelled"),
        ("release_queued", "cancelled"),
        ("time_out", "timed_out"),
        ("dependency_failed", "cancelled"),
    ],
)
def test_a_dependent_that_leaves_the_queue_leaves_its_dependencies_sets(
    engine, redis, tick, end, ended
):
    """A mode-ok dependent that ends while queued is no longer a member of its dependencies'
    ``deps:<id>`` sets. It stayed: a client that submits and cancels dependents of one long
    lease (anyone's request, in a loop) grew that set without bound (200,000 members: 10.7 MB,
    and a 1.0 s script blocking Redis when the lease ended otherwise than released)."""
    live = engine.allocate(req("live", required_gpus=1, ttl_seconds=3600))
    engine.allocate(req("hog", required_gpus=1))
    queued = engine.allocate(req("queued", queue_timeout_seconds=1000))
    own = engine.allocate(req("own", queue_timeout_seconds=1000))
    deps = [live["id"], queued["id"]]
    mine = [
        engine.allocate(
            req(
                "waiter",
                depends_on=deps + [own["id"]],
                depends_on_mode="ok",
                queue_timeout_seconds=100,
            )
        )
        for _ in range(3)
    ]
    keep = engine.allocate(req("keep", depends_on=deps, depends_on_mode="ok"))
    for dep in deps:
        assert redis.smembers(engine.keys.dependents(dep)) == {r["id"] for r in mine + [keep]}
    if end == "cancel":
        for r in mine:
            engine.cancel(r["id"])
    elif end == "release_queued":
        for r in mine:
            engine.release(r["id"])
    elif end == "time_out":
        tick.t += 101
        assert sorted(engine.reap()["timed_out"]) == sorted(r["id"] for r in mine)
    else:  # their own dependency fails: the other dependencies' sets drop them too
        engine.cancel(own["id"])
        assert not redis.exists(engine.keys.dependents(own["id"]))
    assert [status(engine, r["id"]) for r in mine] == [ended] * 3
    for dep in deps:
        assert redis.smembers(engine.keys.dependents(dep)) == {keep["id"]}
    engine.cancel(queued["id"])  # keep fails with it, and leaves the live one's set
    assert (status(engine, keep["id"]), engine.get(keep["id"])["reason"]) == (
        "cancelled",
        "dependency_failed",
    )
    assert not redis.exists(engine.keys.dependents(queued["id"]))
    assert not redis.exists(engine.keys.dependents(live["id"]))
