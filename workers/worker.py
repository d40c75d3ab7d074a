"""``gpu-orchestrator worker``: an RQ worker on the service's queues (webhooks, maintenance).

It always runs with RQ's scheduler, because ``Retry(interval=...)`` only fires in a worker that
has one, and with the JSON serializer. Any number of workers may run: RQ hands each job to one
of them, and RQ's scheduler takes a lock so only one worker moves due retries at a time.

Recovering from a killed worker: a worker that is SIGKILLed (OOM killer, node loss) leaves its
job in RQ's started registry. Another worker's maintenance pass (every
``workers.maintenance_interval``) retries it once its heartbeat has lapsed. RQ's own lapse is the
monitoring interval plus a fixed 60 s; ours is ``3 x workers.heartbeat_interval``, so a webhook
whose worker died is retried in seconds rather than minutes.
"""
from __future__ import annotations

import logging

from rq import Worker

from app.redis_client import connect
from app.settings import Settings
from workers import context, queues

log = logging.getLogger("gpu_orchestrator.worker")


class ServiceWorker(Worker):
    """RQ's forking worker with a shorter heartbeat lapse (see the module docstring)."""

    heartbeat_grace_factor = 2

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        interval = int(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            interval = int(max(1, min(job.timeout - working_time, interval)))
        return interval + self.heartbeat_grace_factor * int(self.job_monitoring_interval)


def build(settings: Settings, redis_url: str) -> ServiceWorker:
    """A configured worker (not started); tests use it directly."""
    # Import the job modules here, once, so every forked work horse starts with them loaded.
    import app.engine  # noqa: F401
    import workers.scheduler  # noqa: F401
    import workers.webhooks  # noqa: F401

    rq_redis = connect(redis_url, settings, decode=False)
    context.configure(settings, connect(redis_url, settings), rq_redis)
    return ServiceWorker(
        queues.all_queues(rq_redis, settings), connection=rq_redis,
        serializer=queues.SERIALIZER,
        maintenance_interval=max(1, int(settings.workers.maintenance_interval)),
        job_monitoring_interval=max(1, int(settings.workers.heartbeat_interval)),
        worker_ttl=max(10, int(3 * settings.workers.heartbeat_interval)),
    )


def run(settings: Settings, burst: bool = False) -> int:
    """Work until stopped (SIGTERM/SIGINT finish the current job first); exit code 0."""
    from app.cli import resolve_redis

    url, embedded = resolve_redis(settings)
    try:
        worker = build(settings, url)
        log.info("worker %s on queues %s", worker.name, ", ".join(worker.queue_names()))
        worker.work(burst=burst, with_scheduler=True,
                    logging_level=settings.logging.level)
    finally:
        if embedded:
            embedded.stop()
    return 0
