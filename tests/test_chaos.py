"""The reliability proof: the short chaos run passes with 0 violations; its checks can fail.

The slow test runs ``bench/chaos.py`` end to end (real Redis with AOF, 3 gunicorn replicas, 2 RQ
workers, the scheduler, 4 simulated nodes, every kind of fault) and asserts each invariant. The
fast tests show that each check of the harness does catch what it is meant to catch, so a
passing chaos run means something.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from app.keys import Keys
from bench import chaos_checks, chaos_faults
from bench.chaos_clients import Ack, Ledger
from bench.chaos_receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the sampler


def _alloc(rid, node, ids, sharing="exclusive", mb=0):
    return [rid, "allocated", node, json.dumps(ids), sharing, str(mb)]


def _gpu(member, total=80000, excl="", shared_n=0, shared_mb=0):
    return [member, str(total), excl, str(shared_n), str(shared_mb)]


def test_check_state_passes_a_consistent_fleet():
    allocs = [
        _alloc("a", "n1", [0, 1]),
        _alloc("b", "n1", [2], "shared", 30000),
        _alloc("c", "n1", [2], "shared", 30000),
    ]
    gpus = [
        _gpu("n1|0", excl="a"),
        _gpu("n1|1", excl="a"),
        _gpu("n1|2", shared_n=2, shared_mb=60000),
        _gpu("n1|3"),
    ]
    conflicts, drift, live = chaos_checks.check_state(allocs, gpus)
    assert (conflicts, drift, live) == (set(), set(), 3)


def test_check_state_catches_every_kind_of_double_allocation():
    allocs = [
        _alloc("a", "n1", [0]),
        _alloc("b", "n1", [0]),  # exclusive twice
        _alloc("c", "n1", [1]),
        _alloc("d", "n1", [1], "shared", 10),  # excl + shared
        _alloc("e", "n2", [0], "shared", 50000),
        _alloc("f", "n2", [0], "shared", 40000),
    ]
    gpus = [_gpu("n1|0", excl="a"), _gpu("n1|1", excl="c"), _gpu("n2|0", total=80000)]
    conflicts, _, _ = chaos_checks.check_state(allocs, gpus)
    kinds = {(kind, member) for kind, member, _ in conflicts}
    assert kinds == {
        ("exclusive-twice", "n1|0"),
        ("exclusive-and-shared", "n1|1"),
        ("shared-over-memory", "n2|0"),
    }


def test_check_state_reports_index_drift_apart_from_double_allocations():
    allocs = [_alloc("a", "n1", [0]), ["z", "released", "n1", "[1]", "exclusive", "0"]]
    gpus = [_gpu("n1|0", excl=""), _gpu("n1|1", excl="ghost"), _gpu("n1|2", shared_n=1)]
    conflicts, drift, _ = chaos_checks.check_state(allocs, gpus)
    assert conflicts == set()
    assert {d[0] for d in drift} == {
        "excl-field",
        "lease-not-allocated",
        "excl-without-allocation",
        "shared-count",
    }


def test_sampler_reads_the_engine_state_atomically(settings, redis):
    """Against the real engine: a live allocation is seen, and a forged second holder of the
    same GPU is reported as a double allocation."""
    from app.engine import Engine
    from workers.simulated import fleet

    engine = Engine(redis, settings)
    for node, gpus in fleet({"nodes": [{"name": "n1", "count": 2}]}).items():
        engine.report_node(node, gpus)
    rec = engine.allocate({"service_name": "svc", "required_gpus": 1, "ttl_seconds": 60})
    stop = threading.Event()
    sampler = chaos_checks.Sampler(settings.redis.url, settings.redis.prefix, stop)
    sampler.sample()
    assert sampler.conflicts == set() and sampler.max_live == 1
    keys = Keys(settings.redis.prefix)
    redis.hset(
        keys.request("forged"),
        mapping={
            "status": "allocated",
            "node": rec["node"],
            "gpu_ids": json.dumps(rec["gpu_ids"]),
            "sharing": "exclusive",
        },
    )
    redis.zadd(keys.leases(), {"forged": time.time() + 60})
    sampler.sample()
    assert [c[0] for c in sampler.conflicts] == ["exclusive-twice"]
    sampler.client.close()


# --------------------------------------------------------------------------- ledgers


def test_check_ledgers_separates_lost_from_the_aof_window(settings, redis):
    keys = Keys(settings.redis.prefix)
    redis.hset(
        keys.request("kept"), mapping={"id": "kept", "status": "allocated", "service_name": "s1"}
    )
    ledger = Ledger(0, "p")
    ledger.acks += [
        Ack("allocate", "kept", 200, 1.0, 1.1, "s1", "allocated"),
        Ack("allocate", "gone-early", 200, 2.0, 2.1, "s2", "allocated"),
        Ack("allocate", "gone-in-window", 202, 5.0, 5.1, "s3", "queued"),
        Ack("release", "kept", 200, 6.0, 6.1),
    ]
    found = chaos_checks.check_ledgers(redis, keys, [ledger], [], windows=[(5.0, 5.5)])
    assert found.lost == ["gone-early"]
    assert found.aof_lost == ["gone-in-window"]
    assert found.lost_transitions == ["release of kept acknowledged, now allocated"]


def test_check_ledgers_counts_duplicate_grants_and_missing_webhooks(settings, redis):
    keys = Keys(settings.redis.prefix)
    for rid in ("r1", "r1-twin"):
        redis.hset(
            keys.request(rid), mapping={"id": rid, "status": "allocated", "service_name": "svc-1"}
        )
    redis.hset(
        keys.request("r2"), mapping={"id": "r2", "status": "allocated", "service_name": "svc-2"}
    )
    for event in ("queued", "allocated"):
        redis.xadd(keys.events(), {"event": event, "request_id": "r2", "ts": "10"})
    ledger = Ledger(0, "p")
    ledger.acks += [
        Ack("allocate", "r1", 200, 1, 1.1, "svc-1", "allocated", idem_key="k"),
        Ack("allocate", "r2", 202, 1, 1.1, "svc-2", "queued", webhook=True),
    ]
    found = chaos_checks.check_ledgers(redis, keys, [ledger], [], windows=[])
    assert found.duplicate_grants == ["svc-1: ['r1', 'r1-twin']"]
    assert (found.webhooks_expected, found.webhooks_delivered) == (1, 0)
    twice = [
        {"request_id": "r2", "event": "allocated", "event_id": e, "t": 11.0}
        for e in ("ev-1", "ev-2")
    ]
    found = chaos_checks.check_ledgers(redis, keys, [ledger], twice, windows=[])
    assert found.webhooks_delivered == 1
    assert found.webhook_dup_mismatch  # two deliveries of one grant with different event ids


def test_check_ledgers_finds_grants_on_a_silent_node_and_unfinished_requests(settings, redis):
    keys = Keys(settings.redis.prefix)
    redis.hset(
        keys.request("r1"), mapping={"id": "r1", "status": "allocated", "service_name": "s1"}
    )
    redis.hset(keys.request("r2"), mapping={"id": "r2", "status": "released", "service_name": "s2"})
    redis.xadd(
        keys.events(), {"event": "allocated", "request_id": "r1", "node": "node-b", "ts": "105"}
    )
    ledger = Ledger(0, "p")
    ledger.acks += [
        Ack("allocate", "r1", 200, 1, 1.1, "s1", "allocated"),
        Ack("allocate", "r2", 200, 1, 1.1, "s2", "allocated"),
    ]
    found = chaos_checks.check_ledgers(
        redis, keys, [ledger], [], windows=[], drained=True, silent=[("node-b", 100.0, 110.0)]
    )
    assert found.silent_node_grants == ["r1 on node-b at +5.00s into the lapse"]
    assert found.stuck == ["r1 is still allocated after the drain"]
    assert found.unrecorded == ["r2 is released with no released event"]
    found = chaos_checks.check_ledgers(
        redis, keys, [ledger], [], windows=[], silent=[("node-a", 100.0, 110.0)]
    )
    assert found.silent_node_grants == [] and found.stuck == []


def test_check_ledgers_finds_gpus_that_differ_from_what_was_answered(settings, redis):
    keys = Keys(settings.redis.prefix)
    redis.hset(
        keys.request("r1"),
        mapping={
            "id": "r1",
            "status": "allocated",
            "node": "n1",
            "gpu_ids": "[3]",
            "service_name": "s1",
        },
    )
    ledger = Ledger(0, "p")
    ledger.acks.append(Ack("allocate", "r1", 200, 1, 1.1, "s1", "allocated", placement="n1:[2]"))
    found = chaos_checks.check_ledgers(redis, keys, [ledger], [], windows=[])
    assert found.moved == ["r1 answered n1:[2], recorded n1:[3]"]
    ledger.acks[0].placement = "n1:[3]"
    assert chaos_checks.check_ledgers(redis, keys, [ledger], [], windows=[]).moved == []


def test_check_ledgers_finds_a_grant_before_its_dependency_finished(settings, redis):
    keys = Keys(settings.redis.prefix)
    for rid in ("dep", "early", "late"):
        redis.hset(
            keys.request(rid), mapping={"id": rid, "status": "released", "service_name": rid}
        )
    for event, rid, ts in (
        ("allocated", "dep", 1),
        ("allocated", "early", 2),
        ("released", "dep", 3),
        ("allocated", "late", 4),
        ("released", "early", 5),
        ("released", "late", 6),
    ):
        redis.xadd(keys.events(), {"event": event, "request_id": rid, "ts": str(ts)})
    ledger = Ledger(0, "p")
    ledger.acks += [
        Ack("allocate", rid, 202, 1, 1.1, rid, "queued", depends_on=("dep",))
        for rid in ("early", "late")
    ]
    found = chaos_checks.check_ledgers(redis, keys, [ledger], [], windows=[])
    assert found.dependency_violations == ["early granted while dep was not finished"]


# --------------------------------------------------------------------------- faults, receiver


def test_schedule_is_seeded_and_covers_every_fault():
    args = dict(apis=3, workers=2, nodes=["node-a", "node-b"], heartbeat_timeout=3.0)
    one = chaos_faults.schedule(25, 7, **args)
    assert one == chaos_faults.schedule(25, 7, **args)
    assert one != chaos_faults.schedule(25, 8, **args)
    assert sorted(s.kind for s in one) == sorted(chaos_faults.KINDS)
    assert all(3.0 <= s.at and s.at + s.hold * 2 < 25 for s in one)
    longer = chaos_faults.schedule(300, 7, **args)
    assert len(longer) >= 7 * 7


def test_receiver_records_fails_and_goes_down():
    receiver = WebhookReceiver(secret="s3cret")
    try:
        body = json.dumps({"status": "allocated", "request_id": "r", "event_id": "e"}).encode()
        import hashlib
        import hmac as hmac_mod

        sig = "sha256=" + hmac_mod.new(b"s3cret", b"123." + body, hashlib.sha256).hexdigest()
        headers = {"X-GPU-Orchestrator-Timestamp": "123", "X-GPU-Orchestrator-Signature": sig}
        assert requests.post(receiver.url + "/x", data=body, headers=headers).status_code == 200
        receiver.set_mode("error")
        assert requests.post(receiver.url + "/x", data=body, headers=headers).status_code == 500
        receiver.set_mode("down")
        with pytest.raises(requests.ConnectionError):
            requests.post(receiver.url + "/x", data=body, timeout=2)
        receiver.set_mode("up")
        assert (
            requests.post(
                receiver.url + "/x",
                data=body,
                headers=dict(headers, **{"X-GPU-Orchestrator-Signature": "bad"}),
            ).status_code
            == 200
        )
        # Another run's worker retrying to a port this receiver now holds: signed with that
        # run's secret, outside this run's token. Answered 404, kept apart from deliveries.
        foreign = requests.post(
            f"http://127.0.0.1:{receiver.port}/c0",
            data=body,
            headers=dict(headers, **{"X-GPU-Orchestrator-Signature": "sha256=other-secret"}),
        )
        assert foreign.status_code == 404
        assert receiver.foreign_requests == 1 and receiver.foreign[0]["path"] == "/c0"
        got = receiver.delivered()
        assert [d["signature_ok"] for d in got] == [True, False]
        assert got[0]["event_id"] == "e" and receiver.failed_attempts == 1
    finally:
        receiver.close()


def test_canary_measures_what_a_redis_sigkill_rolls_back(tmp_path):
    """A SIGKILL after writes that never reached the AOF (appendonly turned off for the test)
    shows up as lost writes; a SIGTERM with AOF on loses nothing."""
    from bench.chaos_topology import Topology

    topo = Topology(apis=0, workers=0, nodes=0, workdir=str(tmp_path / "t"))
    try:
        topo._build()
        topo.start_redis()
        stop = threading.Event()
        canary = chaos_checks.Canary(topo.redis_url, stop, interval=0.002)
        canary.start()
        time.sleep(0.3)
        canary.pause()
        window = canary.mark_down("sigterm")
        topo.terminate("redis")
        topo.start_redis()
        canary.mark_up(window)
        assert window.survived == window.last_acked > 0 and window.lost_writes == 0
        import redis as redis_lib

        client = redis_lib.Redis.from_url(topo.redis_url)
        client.config_set("appendonly", "no")
        client.close()
        canary.resume()
        time.sleep(0.3)
        canary.pause()
        topo.kill("redis")
        window = canary.mark_down("sigkill")
        topo.start_redis()
        canary.mark_up(window)
        assert window.lost_writes > 0 and window.ms > 0
        assert canary.lost_windows() == [(window.t_survived_send, window.t_kill)]
        stop.set()
        canary.join(5)
    finally:
        topo.close()


# --------------------------------------------------------------------------- the run


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_short_chaos_run_has_no_violations(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos.py"),
            "--duration",
            "20",
            "--seed",
            "11",
            "--workdir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=270,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1])
    detail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "error" not in result, detail
    assert result["faults"] >= len(chaos_faults.KINDS), detail
    assert set(result["faults_by_kind"]) == set(chaos_faults.KINDS), detail
    assert result["ops"] > 300, detail
    for key in (
        "double_allocations",
        "lost_requests",
        "lost_transitions",
        "leaked_gpus",
        "duplicate_grants",
        "webhook_event_id_mismatch",
        "webhook_bad_signatures",
        "secrets_in_logs",
        "server_errors",
        "sigterm_writes_lost",
        "stuck_requests",
        "finished_without_event",
        "grants_on_silent_nodes",
        "placement_mismatches",
        "acknowledged_read_as_404",
        "index_drift",
        "snapshot_inconsistencies",
        "dependency_violations",
    ):
        assert result[key] == 0, (key, detail)
    assert result["webhooks_delivered"] == result["webhooks_expected"] > 0, detail
    assert result["samples"] > 100 and result["api_samples"] > 20, detail
    assert result["violations"] == 0 and proc.returncode == 0, detail


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_short_sentinel_chaos_run_fails_over_and_loses_no_acknowledged_write(tmp_path):
    """Issue 13 part 4: a primary, a replica and three sentinels; the primary is SIGKILLed
    mid-load; with min_replicas_ack 1 every acknowledged write survives the failover."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "chaos.py"),
            "--sentinel",
            "--min-replicas-ack",
            "1",
            "--duration",
            "20",
            "--seed",
            "11",
            "--workdir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=190,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1])
    detail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "error" not in result, detail
    assert set(result["faults_by_kind"]) == set(chaos_faults.SENTINEL_KINDS), detail
    assert result["failovers"] >= 1 and result["min_replicas_ack"] == 1, detail
    for key in (
        "acked_lost",
        "double_allocations",
        "lost_requests",
        "lost_transitions",
        "leaked_gpus",
        "duplicate_grants",
        "secrets_in_logs",
        "server_errors",
    ):
        assert result[key] == 0, (key, detail)
    assert result["ops"] > 200, detail
    assert result["violations"] == 0 and proc.returncode == 0, detail


# --------------------------------------------------------------------------- regressions


@contextlib.contextmanager
def _handlers_restored():
    """Workers and the scheduler install SIGINT/SIGTERM handlers; put pytest's back after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.fixture
def make_worker(monkeypatch):
    """``workers.worker.build``, closing every Redis client the built workers opened."""
    from workers import context
    from workers import worker as worker_mod

    built = []
    real_build = worker_mod.build

    def build(settings, url):
        worker = real_build(settings, url)
        built.append((worker, context.get()[1]))
        return worker

    monkeypatch.setattr(worker_mod, "build", build)
    yield build
    for worker, decoded in built:
        worker.connection.close()
        decoded.close()


def test_scheduler_survives_redis_being_unavailable_at_start_up(settings, monkeypatch):
    """Chaos found it: a scheduler restarted while Redis replayed its AOF died on
    BusyLoadingError from ``register_birth``, outside the loop that retries Redis errors."""

    import redis as redis_lib
    from rq.cron import CronScheduler

    from app.shutdown import StopSignal
    from workers import scheduler

    real = CronScheduler.register_birth
    calls = []

    def flaky(self):
        calls.append(1)
        if len(calls) == 1:
            raise redis_lib.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
        return real(self)

    monkeypatch.setattr(CronScheduler, "register_birth", flaky)
    monkeypatch.setattr(StopSignal, "sleep", lambda self, seconds: bool(self))
    with _handlers_restored():
        assert scheduler.run(settings, max_iterations=3) == 0
    assert len(calls) == 2


def test_a_worker_dying_mid_clean_blocks_registry_cleaning_for_seconds_not_15_minutes(
    settings, monkeypatch, make_worker
):
    """Chaos found it: a worker that died while cleaning (Redis SIGKILLed under it) left RQ's
    899 s maintenance lock behind, and a webhook abandoned by a dead worker waited 15 minutes."""
    import redis as redis_lib
    import rq.worker.base

    from workers import rq_overrides

    def redis_went_away(queue, handlers=None):
        raise redis_lib.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(rq.worker.base, "clean_registries", redis_went_away)
    monkeypatch.setattr(rq_overrides, "clean_registries", redis_went_away)
    worker = make_worker(
        settings.replace(workers={"maintenance_interval": "2s"}), settings.redis.url
    )
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        worker.clean_registries()
    ttl = worker.connection.ttl(worker.queues[0].registry_cleaning_key)
    assert 0 < ttl <= 10


def test_worker_process_starts_a_new_worker_when_rq_quits_on_an_error(
    settings, monkeypatch, make_worker
):
    """Chaos found it: RQ's work loop quits on an error it does not handle (Redis SIGKILLed
    while a job finished), and ``gpu-orchestrator worker`` exited with it. It must carry on,
    and still stop for good when a stop was requested."""
    from workers import rq_overrides
    from workers import worker as worker_mod

    calls = []

    def work(self, **kwargs):
        if isinstance(self, rq_overrides.ThreadWorker):
            return True  # a delivery slot (a thread beside the main worker): not counted here
        calls.append(self.name)
        if len(calls) == 2:
            self.stop_requested = True  # SIGTERM during the second worker's life
        return True

    monkeypatch.setattr(worker_mod.ServiceWorker, "work", work)
    monkeypatch.setattr(worker_mod, "RESTART_DELAY", 0)
    assert worker_mod.run(settings) == 0
    assert len(calls) == 2 and calls[0] != calls[1]
    calls.clear()
    assert worker_mod.run(settings, burst=True) == 0
    assert len(calls) == 1  # burst: one pass, no restart


def test_a_dequeued_job_stays_in_a_list_until_it_is_registered_as_started(settings, make_worker):
    """Chaos found it: with two queues RQ dequeues by BLPOP, so a webhook job popped as Redis
    restarted was in no list at all and was never delivered. Our workers dequeue through RQ's
    intermediate list instead, and a normal run leaves that list empty."""

    from app import queues

    worker = make_worker(settings, settings.redis.url)
    rq_redis = worker.connection
    webhooks_q, maintenance_q, _ = worker.queues
    assert [webhooks_q.name, maintenance_q.name] == [
        queues.queue_name(settings, queues.WEBHOOKS),
        queues.queue_name(settings, queues.MAINTENANCE),
    ]
    job = maintenance_q.enqueue("builtins.len", [1, 2])
    # The worker pops the job and dies before it registers it: the id must not vanish.
    found, queue = worker.queue_class.dequeue_any(
        worker.queues, 1, connection=rq_redis, serializer=queues.SERIALIZER
    )
    assert found.id == job.id and queue.name == maintenance_q.name
    assert rq_redis.lrange(maintenance_q.intermediate_queue_key, 0, -1) == [job.id.encode()]
    rq_redis.delete(maintenance_q.intermediate_queue_key)
    # A normal run takes each job off the intermediate list once it has started.
    jobs = [webhooks_q.enqueue("builtins.len", [1]), maintenance_q.enqueue("builtins.len", [1])]
    with _handlers_restored():
        worker.work(burst=True)
    for done in jobs:
        done.refresh()
        assert done.get_status() == "finished" and done.return_value() == 1
    for q in worker.queues:
        assert rq_redis.llen(q.intermediate_queue_key) == 0


def test_a_dead_workers_scheduler_lock_is_released_in_seconds_not_a_minute(settings, make_worker):
    """Chaos found it: webhook retries stalled about 60 s whenever the worker holding RQ's
    scheduler lock was SIGKILLed (RQ gives the lock interval + 60 s)."""
    from app import queues
    from workers.rq_overrides import SchedulerThread

    worker = make_worker(settings, settings.redis.url)
    thread = SchedulerThread(worker.queues, worker.connection, serializer=queues.SERIALIZER)
    scheduler = thread.scheduler
    webhooks_q, maintenance_q, deferred_q = worker.queues
    dead = scheduler.get_locking_key(webhooks_q.name)
    live = scheduler.get_locking_key(maintenance_q.name)
    worker.connection.set(dead, "dead-worker", ex=61 - 15)  # last refreshed 15 s ago
    worker.connection.set(live, "live-worker", ex=61 - 1)  # refreshed a second ago
    try:
        thread.run_once()  # frees the dead holder's lock and takes it, leaves the live one's
        assert scheduler.acquired_locks == {webhooks_q.name, deferred_q.name}  # and a free one
        assert worker.connection.get(dead) == scheduler.name.encode()
        assert worker.connection.get(live) == b"live-worker"
    finally:
        scheduler.release_locks()
        scheduler.connection.close()


def test_a_job_dropped_between_dequeue_and_start_is_requeued_and_delivered(
    settings, redis, make_worker
):
    """Chaos found it (64 of 66 webhooks): RQ's scheduler moved two due webhook retries onto
    the queue, a worker LMOVEd them into the intermediate list, and Redis was SIGKILLed before
    the worker registered them as started. Their status said queued; they were in no queue and
    no registry. RQ's own cleanup waits a minute and then *fails* such a job (a job on its last
    retry is never tried). The worker's maintenance puts it back on the queue instead."""

    from webhook_receiver import Receiver

    from app import outbox, queues
    from app.engine import Engine
    from workers import rq_overrides

    engine = Engine(redis, settings)
    engine.report_node(
        "node-a",
        [
            {
                "index": 0,
                "uuid": "GPU-a0",
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_mb": 81559,
                "memory_used_mb": 0,
            }
        ],
        backend="simulated",
        host="test",
    )
    holder = engine.allocate({"service_name": "holder", "required_gpus": 1})
    with Receiver() as rx:
        waiter = engine.allocate(
            {"service_name": "waiter", "required_gpus": 1, "webhook_url": rx.url}
        )
        assert waiter["status"] == "queued"
        worker = make_worker(settings, settings.redis.url)
        rq_redis = worker.connection
        engine.release(holder["id"])
        assert outbox.dispatch(rq_redis, settings) == 1
        webhooks_q = worker.queues[0]
        [job_id] = webhooks_q.get_job_ids()
        job = webhooks_q.fetch_job(job_id)
        job.retries_left = 0  # its last retry: failing it would lose the webhook
        job.save()
        # The bad state, as a dequeue that died leaves it: the id only in the intermediate list.
        assert rq_redis.lmove(webhooks_q.key, webhooks_q.intermediate_queue_key) == job_id.encode()
        # A job another worker is running right now (in the started registry) is left alone.
        busy = worker.queues[1].enqueue("builtins.len", [1])
        rq_redis.lmove(worker.queues[1].key, worker.queues[1].intermediate_queue_key)
        rq_redis.zadd(
            worker.queues[1].started_job_registry.key, {f"{busy.id}:exec-1": time.time() + 600}
        )

        t = [1_000_000.0]
        worker.clock = lambda: t[0]
        worker.clean_registries()  # first sighting: it may still be in a live worker's hands
        assert rq_redis.lrange(webhooks_q.intermediate_queue_key, 0, -1) == [job_id.encode()]
        t[0] += rq_overrides.STUCK_DEQUEUE - 1
        worker.clean_registries()
        assert rq_redis.llen(webhooks_q.key) == 0
        t[0] += 1
        worker.clean_registries()
        assert webhooks_q.get_job_ids() == [job_id]
        assert rq_redis.llen(webhooks_q.intermediate_queue_key) == 0
        assert webhooks_q.fetch_job(job_id).get_status() == "queued"
        assert rq_redis.lrange(worker.queues[1].intermediate_queue_key, 0, -1) == [busy.id.encode()]
        rq_redis.zrem(worker.queues[1].started_job_registry.key, f"{busy.id}:exec-1")
        rq_redis.delete(worker.queues[1].intermediate_queue_key)

        with _handlers_restored():
            worker.work(burst=True)
        [req] = rx.wait_for(1)
    assert json.loads(req["body"])["request_id"] == waiter["id"]
    assert webhooks_q.fetch_job(job_id).get_status() == "finished"
    assert rq_redis.llen(webhooks_q.intermediate_queue_key) == 0
    assert queues.queue_name(settings, queues.WEBHOOKS) == webhooks_q.name


def test_intermediate_recovery_drops_ids_whose_job_is_done_or_queued_elsewhere(
    settings, make_worker
):
    """Only a job that would otherwise be lost is re-queued: one that already finished, or is
    still on its queue (a second copy of the id), is just taken off the intermediate list."""
    from workers import rq_overrides

    worker = make_worker(settings, settings.redis.url)
    rq_redis = worker.connection
    q = worker.queues[1]
    done = q.enqueue("builtins.len", [1])
    queued = q.enqueue("builtins.len", [2])
    rq_redis.lrem(q.key, 0, done.id)
    done.set_status("finished")
    rq_redis.rpush(q.intermediate_queue_key, done.id, queued.id, "no-such-job")
    t = [50.0]
    worker.clock = lambda: t[0]
    assert worker.recover_intermediate(q) == []
    t[0] += rq_overrides.STUCK_DEQUEUE
    assert worker.recover_intermediate(q) == []
    assert rq_redis.llen(q.intermediate_queue_key) == 0
    assert q.get_job_ids() == [queued.id]
    assert q.fetch_job(done.id).get_status() == "finished"


def test_a_retry_cut_short_by_redis_leaves_the_job_started_so_it_is_retried(settings, make_worker):
    """RQ wrote a retry's SCHEDULED status before the pipeline that schedules the job ran; a
    Redis SIGKILL between the two left the job 'scheduled' in no registry, never run again
    (a chaos run lost a webhook so). Nothing may be written until the pipeline commits."""
    from rq import Retry
    from rq.registry import ScheduledJobRegistry, StartedJobRegistry

    worker = make_worker(settings, settings.redis.url)
    rq_redis = worker.connection
    q = worker.queues[1]
    job = q.enqueue("builtins.len", [1], retry=Retry(max=3, interval=[5]))
    job = q.fetch_job(job.id)
    assert type(job).__name__ == "ServiceJob"
    job.set_status("started")
    pipe = rq_redis.pipeline()
    job.retry(q, pipe)
    pipe.reset()  # Redis died before the pipeline ran
    assert q.fetch_job(job.id).get_status() == "started"  # the cleanup still sees it abandoned
    pipe = rq_redis.pipeline()
    job = q.fetch_job(job.id)
    job.retry(q, pipe)
    pipe.execute()
    assert q.fetch_job(job.id).get_status() == "scheduled"
    assert job.id in ScheduledJobRegistry(queue=q).get_job_ids()
    assert q.fetch_job(job.id).retries_left == 2
    assert job.id not in StartedJobRegistry(queue=q).get_job_ids()
