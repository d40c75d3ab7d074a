"""``gpu-orchestrator scheduler``: the periodic safety-net pass and the reaper, on RQ cron.

Grants normally happen inside the release, cancel and expiry scripts themselves (and the API or
monitor dispatches the webhook outbox right after). This role is the safety net:

- every ``scheduler.queue_check_interval``: :func:`safety_net` runs a schedule pass (catches
  capacity that appeared some other way, e.g. a lapsed node coming back) and drains the outbox,
  recovering entries a crashed dispatcher left behind;
- every ``scheduler.cleanup_interval``: :func:`reap` expires lapsed leases and timed-out queued
  requests (the engine's reap grants their GPUs to the next requests atomically), then drains the
  outbox. When a lease ends before the next such run (a preempting allocation's preempt_at,
  above all), the job also schedules a one-off reap at that moment (RQ's scheduler, which every
  worker runs, moves it within about a second), so a preemption ends on time rather than up to
  ``cleanup_interval`` late.

Both are RQ jobs on the maintenance queue, enqueued by RQ's ``CronScheduler`` machinery and run
by ``gpu-orchestrator worker`` processes.

Several scheduler processes may run. RQ's CronScheduler has no lock of its own, so each loop
iteration first holds a leader lock (``Keys.lock("scheduler")``, a redis-py Lock with a TTL)::

    time 0: scheduler A acquires the lock (TTL 10 s) and enqueues due jobs
    time 0: scheduler B fails to acquire it and only sleeps
    time 3: A renews the lock (reacquire resets the TTL) and goes on
    time 4: A is SIGKILLed; nobody renews the lock
    time 13: the lock expires; B acquires it and starts enqueuing (its cron jobs have never
             run, so they are due at once)

A paused leader that loses the lock finds out on its next renewal (LockNotOwnedError) and goes
back to following, so at most one scheduler enqueues at any time (up to a clock-skew-free TTL).
The jobs are idempotent anyway: a doubled safety-net pass grants nothing twice.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import LockError, RedisError
from rq.cron import CronScheduler

from app import outbox, queues
from app.keys import Keys
from app.redis_client import connect
from app.settings import Settings
from app.shutdown import StopSignal
from workers import context
from workers.rq_overrides import JsonCronJob, add_cron_job

log = logging.getLogger("gpu_orchestrator.scheduler")

LOCK_TTL = 10.0
#: Outbox entries stuck this long in the processing list are re-dispatched.
RECOVER_AFTER = 30.0


# ------------------------------------------------------------------------------ the jobs


def safety_net() -> dict[str, int]:
    """Maintenance job: one schedule pass, then drain the webhook outbox."""
    settings, _, rq_redis = context.get()
    grants = context.engine().schedule_pass()
    dispatched = outbox.dispatch(rq_redis, settings, recover_after=RECOVER_AFTER)
    if grants:
        log.info("safety-net pass granted %d queued request(s)", len(grants))
    return {"granted": len(grants), "dispatched": dispatched}


def reap() -> dict[str, int]:
    """Maintenance job: expire lapsed leases and timed-out requests, then drain the outbox."""
    settings, _, rq_redis = context.get()
    engine = context.engine()
    result = engine.reap()
    dispatched = outbox.dispatch(rq_redis, settings, recover_after=RECOVER_AFTER)
    counts = {k: len(v) for k, v in result.items()}
    if any(counts.values()):
        log.info("reaper: %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    counts["dispatched"] = dispatched
    reap_at_next_lease_end(engine, rq_redis, settings)
    return counts


def reap_at_next_lease_end(engine, rq_redis: Any, settings: Settings) -> str | None:
    """Schedule a one-off :func:`reap` at the earliest lease end when it comes before the next
    periodic one; returns the job id (None when the periodic reap comes first).

    Two reapers (the periodic one and a one-off, or two one-offs) may run at once: reap is one
    engine script, so the second finds nothing left to end. One job per deadline (its id
    names it), so running this from every reap schedules each deadline once."""
    due = engine.next_lease_end()
    if due is None:
        return None
    now = engine.now()
    if due - now >= settings.scheduler.cleanup_interval:
        return None
    q = queues.queue(rq_redis, settings, queues.MAINTENANCE)
    at = math.ceil(max(due, now))  # RQ schedules by whole seconds: never before the end
    job_id = f"{q.name}-reap-at-{at}"
    q.enqueue_at(
        datetime.fromtimestamp(at, tz=UTC),
        reap,
        job_id=job_id,
        job_timeout=60,
        result_ttl=0,
        failure_ttl=86400,
    )
    return job_id


# ------------------------------------------------------------------------------ cron


def _interval(seconds: float) -> int:
    return max(1, int(math.ceil(seconds)))


def build_cron(settings: Settings, rq_redis: Any) -> CronScheduler:
    """A CronScheduler holding the two maintenance jobs (not started)."""
    cron = CronScheduler(
        connection=rq_redis,
        logging_level=settings.logging.level,
        name=f"gpuo-scheduler-{Keys(settings.redis.prefix).rq_queue('cron')}-"
        f"{int(time.time() * 1000) % 10**9}",
    )
    qname = queues.queue_name(settings, queues.MAINTENANCE)
    for func, seconds in (
        (safety_net, settings.scheduler.queue_check_interval),
        (reap, settings.scheduler.cleanup_interval),
    ):
        every = _interval(seconds)
        add_cron_job(
            cron,
            JsonCronJob(
                queue_name=qname,
                func=func,
                interval=every,
                job_timeout=60,
                result_ttl=0,
                ttl=max(5, 3 * every),
                failure_ttl=86400,
                name=f"{qname}:{func.__name__}",
                serializer=queues.SERIALIZER,
            ),
        )
    return cron


def run(settings: Settings, *, max_iterations: int | None = None) -> int:
    """Run until SIGTERM/SIGINT; only the holder of the leader lock enqueues jobs."""
    from app.embedded_redis import resolve as resolve_redis

    url, embedded = resolve_redis(settings)
    stop = StopSignal().install()
    rq_redis = connect(url, settings, decode=False)
    cron = build_cron(settings, rq_redis)
    lock = rq_redis.lock(
        Keys(settings.redis.prefix).lock("scheduler"), timeout=LOCK_TTL, thread_local=False
    )
    leader = False
    born = False
    iterations = 0
    try:
        while not stop and (max_iterations is None or iterations < max_iterations):
            iterations += 1
            try:
                if not born:  # inside the retry: Redis may be down or LOADING at start-up
                    cron.register_birth()
                    born = True
                    log.info(
                        "scheduler %s: safety-net pass every %ss, reaper every %ss",
                        cron.name,
                        _interval(settings.scheduler.queue_check_interval),
                        _interval(settings.scheduler.cleanup_interval),
                    )
                leader = _hold(lock, leader)
                if leader:
                    if cron.enqueue_jobs():
                        cron.save()
                cron.heartbeat()
            except RedisError as exc:
                log.warning("scheduler: Redis error (%s); retrying", exc)
                leader = False
            if max_iterations is not None and iterations >= max_iterations:
                break
            nap = cron.calculate_sleep_interval() if leader else LOCK_TTL / 4
            stop.sleep(min(max(nap, 0.05), LOCK_TTL / 3))
    finally:
        if leader:
            try:
                lock.release()
            except (LockError, RedisError):
                pass
        try:
            if born:
                cron.register_death()
        except RedisError:
            pass
        if embedded:
            embedded.stop()
    log.info("scheduler %s stopped", cron.name)
    return 0


def _hold(lock, leader: bool) -> bool:
    """Renew the lock if we hold it, else try to take it; True while we are the leader."""
    if leader:
        try:
            lock.reacquire()
            return True
        except LockError:
            log.warning("scheduler: lost the leader lock; following")
    got = bool(lock.acquire(blocking=False))
    if got and not leader:
        log.info("scheduler: became the leader")
    return got
