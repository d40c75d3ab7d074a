"""The allocated-GPU count without a fleet-wide counter on the grant path: every GPU is free,
allocated, or neither (meta.gpus_out), so counts derives the allocated ones, and data written by
an earlier release (meta.gpus_busy) is converted by the first write after the library loads.
Real redis-server, injected clock."""

from __future__ import annotations

from tests.test_engine import gpu_list, req


def allocated(engine):
    return engine.counts()["gpus_allocated"]


def test_allocated_gpus_follow_grants_health_cordons_and_forgets(engine, clock):
    engine.report_node("a", gpu_list(4))
    a = engine.allocate(req(required_gpus=2))
    shared = engine.allocate(req(sharing="shared", min_memory_mb=1000))
    assert allocated(engine) == 3
    engine.set_gpu_schedulable("a", 3, False)  # a free GPU cordoned: neither free nor allocated
    assert allocated(engine) == 3 and engine.counts()["gpus_available"] == 0
    # a held GPU fails: still allocated until its holder releases it, then neither
    held = engine.get(a["id"])["gpu_ids"][0]
    engine.report_node(
        "a", [dict(g, health="failed") if g["index"] == held else g for g in gpu_list(4)]
    )
    assert allocated(engine) == 3
    engine.release(a["id"])
    assert allocated(engine) == 1 and engine.counts()["gpus_available"] == 1
    engine.release(shared["id"])
    assert allocated(engine) == 0
    engine.report_node("a", gpu_list(4))  # recovered
    engine.set_gpu_schedulable("a", 3, True)
    assert engine.counts()["gpus_available"] == 4
    engine.allocate(req())
    clock.advance(engine.settings.scheduler.node_heartbeat_timeout + 1)
    engine.forget_node("a")
    assert allocated(engine) == 0 and engine.counts()["gpus_total"] == 0
    engine.report_node("b", gpu_list(2))
    engine.allocate(req())
    assert allocated(engine) == 1 and engine.counts()["gpus_available"] == 1


def test_an_earlier_releases_counter_is_converted_by_the_first_write(engine, redis):
    engine.report_node("a", gpu_list(4))
    engine.allocate(req(required_gpus=2))
    engine.set_gpu_schedulable("a", 3, False)
    meta = engine.keys.meta()
    # as an earlier release left it: its gpus_busy counter, no gpus_out; a server started on
    # that data loads the library afresh
    redis.hdel(meta, "gpus_out")
    redis.hset(meta, "gpus_busy", "2")
    redis.execute_command("FUNCTION", "FLUSH")
    engine.counts()  # loads the library; a read converts nothing
    assert allocated(engine) == 2 and redis.hget(meta, "gpus_busy") == "2"
    engine.allocate(req())
    assert redis.hget(meta, "gpus_busy") is None and redis.hget(meta, "gpus_out") == "1"
    assert allocated(engine) == 3 and engine.counts()["gpus_available"] == 0


def test_a_release_reads_released_at_as_its_end_whether_stored_or_not(engine, redis):
    engine.report_node("a", gpu_list(1))
    rid = engine.allocate(req())["id"]
    ended = engine.release(rid)
    rec = engine.get(rid)
    assert rec["status"] == "released"
    assert rec["released_at"] == rec["ended_at"] == ended["released_at"] == ended["ended_at"]
    assert rec["allocated_at"] == rec["submitted_at"] and rec["wait_time_seconds"] == 0.0
    # written in full, as an earlier release did: the same record
    redis.hset(
        engine.keys.request(rid),
        mapping={
            "released_at": repr(rec["ended_at"]),
            "allocated_at": repr(rec["submitted_at"]),
            "wait_time_seconds": "0.000000",
        },
    )
    assert engine.get(rid) == rec


def test_allocations_written_before_tenants_existed_end_cleanly(engine, redis, clock):
    """A record of a release before tenants (no tenant field) expires, is released and is
    forgotten with its node like any other, and the GPUs come back."""
    engine.report_node("a", gpu_list(3))
    ids = [engine.allocate(req(ttl_seconds=60))["id"] for _ in range(3)]
    for rid in ids:
        redis.hdel(engine.keys.request(rid), "tenant")
    redis.delete(engine.keys.tenants())
    engine.release(ids[0])
    clock.advance(61)
    engine.report_node("a", gpu_list(3))
    assert sorted(engine.reap()["expired"]) == sorted(ids[1:])
    assert [engine.get(r)["status"] for r in ids] == ["released", "expired", "expired"]
    assert allocated(engine) == 0 and engine.counts()["gpus_available"] == 3
    assert redis.hgetall(engine.keys.tenants()) == {}
