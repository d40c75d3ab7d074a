"""The scheduler role: RQ cron jobs (JSON), the leader lock, and the reaper end to end."""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis as redis_lib
from proc_support import Role, wait_until, write_settings
from rq.job import Job
from webhook_receiver import Receiver

from app import outbox, queues
from app.engine import Engine
from app.keys import Keys
from workers import context, scheduler
from workers import worker as worker_mod


@pytest.fixture
def rq_redis(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def keep_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _maintenance_jobs(rq_redis, settings):
    q = queues.queue(rq_redis, settings, queues.MAINTENANCE)
    return [Job.fetch(i, connection=rq_redis, serializer=queues.SERIALIZER) for i in q.job_ids]


def test_one_iteration_enqueues_both_jobs_as_json(settings, rq_redis, keep_signals):
    assert scheduler.run(settings, max_iterations=1) == 0
    jobs = _maintenance_jobs(rq_redis, settings)
    assert sorted(j.func_name for j in jobs) == [
        "workers.scheduler.reap",
        "workers.scheduler.safety_net",
    ]
    raw = rq_redis.hget(Job.key_for(jobs[0].id), "data")
    json.loads(__import__("zlib").decompress(raw))  # JSON, not pickle
    # The lock was released on the way out, so the next scheduler can lead at once.
    assert not rq_redis.exists(Keys(settings.redis.prefix).lock("scheduler"))


def test_only_the_lock_holder_enqueues(settings, rq_redis):
    lock_key = Keys(settings.redis.prefix).lock("scheduler")
    a = rq_redis.lock(lock_key, timeout=scheduler.LOCK_TTL, thread_local=False)
    b = rq_redis.lock(lock_key, timeout=scheduler.LOCK_TTL, thread_local=False)
    assert scheduler._hold(a, False) is True
    assert scheduler._hold(b, False) is False
    assert scheduler._hold(a, True) is True  # renewal keeps it
    assert scheduler._hold(b, False) is False
    rq_redis.delete(lock_key)  # A's lease lapsed (A paused or died)
    assert scheduler._hold(b, False) is True
    assert scheduler._hold(a, True) is False  # A finds out and follows


def test_a_follower_enqueues_nothing(settings, rq_redis, keep_signals):
    rq_redis.set(Keys(settings.redis.prefix).lock("scheduler"), "someone-else", px=10_000)
    scheduler.run(settings, max_iterations=1)
    assert _maintenance_jobs(rq_redis, settings) == []


def test_maintenance_jobs_run_the_engine_in_a_worker(settings, redis, rq_redis, keep_signals):
    engine = Engine(redis, settings)
    engine.report_node("n1", [{"index": 0, "uuid": "u0", "name": "GPU", "memory_total_mb": 1000}])
    lease = engine.allocate({"service_name": "short", "ttl_seconds": 1})
    nxt = engine.allocate({"service_name": "next"})
    assert nxt["status"] == "queued"
    redis.zadd(Keys(settings.redis.prefix).leases(), {lease["id"]: 1})  # lapsed long ago
    scheduler.run(settings, max_iterations=1)
    worker_mod.build(settings, settings.redis.url).work(burst=True)
    context.configure(None, None, None)
    assert engine.get(lease["id"])["status"] == "expired"
    assert engine.get(nxt["id"])["status"] == "allocated"


@pytest.mark.slow
def test_expired_lease_is_reaped_and_its_gpus_go_to_the_next_request(tmp_path, settings, redis):
    engine = Engine(redis, settings)
    engine.report_node(
        "node-a",
        [
            {"index": i, "uuid": f"u{i}", "name": "NVIDIA A10", "memory_total_mb": 23028}
            for i in range(2)
        ],
    )
    with Receiver() as rx:
        lease = engine.allocate(
            {
                "service_name": "batch",
                "required_gpus": 2,
                "ttl_seconds": 1,
                "webhook_url": rx.url,
                "webhook_events": ["expired"],
            }
        )
        nxt = engine.allocate({"service_name": "next", "required_gpus": 2, "webhook_url": rx.url})
        assert lease["status"] == "allocated" and nxt["status"] == "queued"
        cfg = write_settings(
            tmp_path,
            settings,
            scheduler={"cleanup_interval": "1s", "queue_check_interval": "1s"},
            workers={"maintenance_interval": "1s"},
        )
        roles = [Role(cfg, "scheduler", log_dir=tmp_path), Role(cfg, "worker", log_dir=tmp_path)]
        try:
            wait_until(
                lambda: engine.get(nxt["id"])["status"] == "allocated",
                timeout=20,
                message="the queued request to be granted",
            )
            reqs = rx.wait_for(2)
        finally:
            codes = [r.stop() for r in roles]
    assert codes == [0, 0]  # both stop cleanly on SIGTERM
    assert engine.get(lease["id"])["status"] == "expired"
    granted = engine.get(nxt["id"])
    assert sorted(granted["gpu_ids"]) == sorted(lease["gpu_ids"])
    events = {json.loads(r["body"])["status"]: json.loads(r["body"]) for r in reqs}
    assert set(events) == {"expired", "allocated"}
    assert events["allocated"]["request_id"] == nxt["id"]
    assert events["expired"]["request_id"] == lease["id"]


@pytest.mark.slow
def test_two_scheduler_processes_do_not_double_the_work(tmp_path, settings, rq_redis):
    cfg = write_settings(
        tmp_path, settings, scheduler={"queue_check_interval": "1s", "cleanup_interval": "1s"}
    )
    q = queues.queue(rq_redis, settings, queues.MAINTENANCE)
    seen: dict[str, str] = {}  # job id -> function, read while the job exists

    def look() -> None:
        # A cron job's key expires ttl = max(5, 3 * interval) = 5 s after it was enqueued:
        # read each one as it comes, not all of them at the end (a slow stop outlived the first).
        new = [i for i in q.job_ids if i not in seen]
        for job_id, job in zip(new, Job.fetch_many(new, rq_redis, queues.SERIALIZER)):
            assert job is not None, f"job {job_id} expired before it was read"
            seen[job_id] = job.func_name

    roles = [Role(cfg, "scheduler", log_dir=tmp_path) for _ in range(2)]
    try:
        wait_until(lambda: look() or seen, message="a first job")
        first = time.monotonic()
        while time.monotonic() - first < 3.0:
            look()
            time.sleep(0.1)
        led = [r for r in roles if "became the leader" in r.output()]
        assert len(led) == 1, [r.output()[-500:] for r in roles]
        # Stop the follower first. A leader stopping first hands the lock over on its way out
        # (as it should), and the follower, waking every LOCK_TTL / 4, could take it and
        # enqueue before its own SIGTERM came: a later leader, not a second one at once.
        for role in sorted(roles, key=lambda r: r in led):
            role.stop()
            look()
        leading = time.monotonic() - first
    finally:
        for role in roles:
            role.stop()
    names = list(seen.values())
    # One leader, 1 s interval: at most one pass of each kind per second it led after its first
    # (3 s, plus the time both took to stop), and one more at each end. Two unguarded schedulers
    # would have made about twice that.
    assert 2 <= names.count("workers.scheduler.safety_net") <= int(leading) + 2
    assert names.count("workers.scheduler.reap") == names.count("workers.scheduler.safety_net")
    led = [r for r in roles if "became the leader" in r.output()]
    assert len(led) == 1, [r.output()[-500:] for r in roles]


class _BlackHole:
    """A webhook receiver on 127.0.0.1 whose connections complete but are never answered:
    every try to it lasts the whole ``webhooks.timeout``."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)  # never accepted: the kernel completes the handshakes
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


@pytest.mark.slow
def test_lapsed_leases_end_on_time_while_webhook_receivers_are_slow(
    tmp_path, settings, redis, rq_redis
):
    """Slow receivers keep the webhook queue full; the reaper must still run every interval.

    Before, a worker took jobs from the webhook queue first and from the maintenance queue only
    when no webhook job was waiting, and only its main thread listened on maintenance. With 40
    webhooks to a receiver that never answers (1 s per try, 2 at once), the reaper's cron jobs
    sat behind them and lapsed unrun: a lease that ended went on holding its GPUs, and the
    request queued for them waited, for as long as the backlog lasted (here 20 s)."""
    engine = Engine(redis, settings)
    engine.report_node(
        "node-a",
        [
            {"index": i, "uuid": f"u{i}", "name": "NVIDIA A10", "memory_total_mb": 23028}
            for i in (0, 1)
        ],
    )
    hooks = {"timeout": "1s", "concurrency": 2, "retry_intervals": ["1s"] * 3}
    settings = settings.replace(webhooks=hooks)
    holder = engine.allocate({"service_name": "holder", "required_gpus": 2, "ttl_seconds": 30})
    with _BlackHole() as hole:
        waiting = [
            engine.allocate(
                {
                    "service_name": f"slow-{i}",
                    "required_gpus": 1,
                    "webhook_url": hole.url,
                    "webhook_events": ["cancelled"],
                }
            )
            for i in range(40)
        ]
        for req in waiting:
            engine.cancel(req["id"])
        assert outbox.dispatch(rq_redis, settings) == 40
        lease = engine.allocate({"service_name": "lease", "required_gpus": 2, "ttl_seconds": 3})
        nxt = engine.allocate({"service_name": "next", "required_gpus": 2})
        assert holder["status"] == "allocated"
        engine.release(holder["id"])
        assert engine.get(lease["id"])["status"] == "allocated"
        assert engine.get(nxt["id"])["status"] == "queued"
        cfg = write_settings(
            tmp_path,
            settings,
            webhooks=hooks,
            scheduler={"cleanup_interval": "1s", "queue_check_interval": "1s"},
            workers={"maintenance_interval": "1s", "heartbeat_interval": "1s"},
        )
        roles = [Role(cfg, "worker", log_dir=tmp_path), Role(cfg, "scheduler", log_dir=tmp_path)]
        try:
            webhook_queue = queues.queue(rq_redis, settings, queues.WEBHOOKS)
            wait_until(lambda: webhook_queue.count < 40, timeout=20, message="the worker to start")
            ends = engine.get(lease["id"])["expires_at"]
            wait_until(
                lambda: engine.get(nxt["id"])["status"] == "allocated",
                timeout=max(0.0, ends - time.time()) + 5,
                message=lambda: (
                    f"the lapsed lease's GPUs to go to the next request; lease "
                    f"{engine.get(lease['id'])['status']}, {webhook_queue.count} webhooks queued"
                ),
            )
            assert webhook_queue.count > 0  # the backlog was still there
        finally:
            for role in roles:
                role.stop()
    assert engine.get(lease["id"])["status"] == "expired"


def _step(name: str, queue_after: str | None = None) -> None:
    """An in-process job: records that it ran; with ``queue_after``, enqueues a maintenance
    job on that queue while it runs (a reap falling due during a delivery)."""
    from rq import get_current_job

    conn = get_current_job().connection
    conn.rpush("test:order", name)
    if queue_after:
        from rq import Queue

        q = Queue(queue_after, connection=conn, serializer=queues.SERIALIZER)
        q.enqueue("test_scheduler._step", f"reap-after-{name}")


def test_a_reap_due_during_any_delivery_runs_next(settings, rq_redis, keep_signals):
    """The main worker looks at the maintenance queue right after every delivery, fresh or
    deferred, so a reap that falls due during a delivery waits for that one only. In RQ's
    round robin over its three queues, a reap due during a deferred delivery waited for a
    fresh delivery too (the order after the deferred queue is webhooks, maintenance)."""
    one = settings.replace(webhooks={"concurrency": 1})
    name = {n: queues.queue_name(one, n) for n in queues.ALL}
    fresh = queues.queue(rq_redis, one, queues.WEBHOOKS)
    deferred = queues.queue(rq_redis, one, queues.WEBHOOKS_DEFERRED)
    fresh.enqueue("test_scheduler._step", "fresh-1", name[queues.MAINTENANCE])
    fresh.enqueue("test_scheduler._step", "fresh-2")
    deferred.enqueue("test_scheduler._step", "deferred-1", name[queues.MAINTENANCE])
    try:
        assert worker_mod.run(one, burst=True) == 0
    finally:
        context.configure(None, None, None)
    order = [x.decode() for x in rq_redis.lrange("test:order", 0, -1)]
    assert sorted(order) == sorted(
        ["fresh-1", "fresh-2", "deferred-1", "reap-after-fresh-1", "reap-after-deferred-1"]
    )
    for delivery in ("fresh-1", "deferred-1"):
        assert order[order.index(delivery) + 1] == f"reap-after-{delivery}", order
