"""``gpu-orchestrator worker``: an RQ worker on the service's queues (webhooks, maintenance).

It always runs RQ's scheduler, because ``Retry(interval=...)`` only fires where one runs, in a
thread of the worker process (:class:`~workers.rq_overrides.SchedulerThread`; RQ would fork a
process for it from a process that has threads), and uses the JSON serializer. Any number of
workers may run: RQ hands each job to one of them, and RQ's scheduler takes a lock per queue so
only one worker moves due retries at a time.

Recovering from a killed worker: a worker that is SIGKILLed (OOM killer, node loss) leaves its
job in RQ's started registry. Another worker's maintenance pass (every
``workers.maintenance_interval``) retries it once its heartbeat has lapsed. RQ's own lapse is the
monitoring interval plus a fixed 60 s; ours is ``3 x workers.heartbeat_interval``, so a webhook
whose worker died is retried in seconds rather than minutes. Jobs run in the worker process
itself (no fork per job); see :class:`~workers.rq_overrides.ServiceWorker`, where every
behaviour of RQ this service corrects lives.

Concurrent deliveries: one process delivers up to ``webhooks.concurrency`` webhooks at once, so
a slow receiver (each try bounded by ``webhooks.timeout``) holds one slot, not the worker. The
main thread runs the service's worker (every queue, maintenance first after each delivery; the
signals); each other slot is a :class:`~workers.rq_overrides.ThreadWorker` in its own thread, a
full RQ worker on the webhook queues (fresh deliveries first, then deferred ones) with its own
name, registration and heartbeats. Durability is RQ's, per job, as before: a slot's job is in
the started registry while it runs, and if the process dies (SIGKILL, OOM) every job it held is
retried by another worker once its heartbeat lapses.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from redis.exceptions import RedisError
from rq.exceptions import StopRequested

from app import queues
from app.redis_client import connect
from app.settings import Settings
from workers import context
from workers.rq_overrides import (
    SchedulerThread,
    ServiceJob,
    ServiceQueue,
    ServiceWorker,
    ThreadWorker,
)

log = logging.getLogger("gpu_orchestrator.worker")

#: Seconds between a worker quitting on an error and its replacement starting.
RESTART_DELAY = 1.0
#: The same for a delivery slot (its own constant: a slot that keeps failing must never spin).
SLOT_RESTART_DELAY = 1.0


def build(settings: Settings, redis_url: str) -> ServiceWorker:
    """A configured worker (not started); tests use it directly."""
    # Import the job modules here, once, so the first job does not pay for loading them.
    import app.engine  # noqa: F401
    import workers.scheduler  # noqa: F401
    import workers.webhooks  # noqa: F401

    rq_redis = connect(redis_url, pool_settings(settings), decode=False)
    context.configure(settings, connect(redis_url, settings), rq_redis)
    return make_worker(settings, rq_redis)


def pool_settings(settings: Settings) -> Settings:
    """Settings whose Redis pool fits every slot: each RQ worker holds a connection while it
    waits for a job, one for its pub/sub commands and one for the heartbeats of a running job."""
    need = 4 * settings.webhooks.concurrency + 8
    if settings.redis.max_connections >= need:
        return settings
    return settings.replace(redis={"max_connections": need})


def make_worker(
    settings: Settings,
    rq_redis,
    worker_class: type = ServiceWorker,
    names: tuple[str, ...] = queues.ALL,
) -> ServiceWorker:
    """A worker of ``worker_class`` on the queues ``names``, sharing ``rq_redis``."""
    service_queues = [
        ServiceQueue(
            queues.queue_name(settings, name),
            connection=rq_redis,
            serializer=queues.SERIALIZER,
            job_class=ServiceJob,
        )
        for name in names
    ]
    return worker_class(
        service_queues,
        connection=rq_redis,
        serializer=queues.SERIALIZER,
        job_class=ServiceJob,
        maintenance_interval=max(1, int(settings.workers.maintenance_interval)),
        job_monitoring_interval=max(1, int(settings.workers.heartbeat_interval)),
        worker_ttl=max(10, int(3 * settings.workers.heartbeat_interval)),
    )


class DeliverySlots:
    """The ``webhooks.concurrency - 1`` delivery threads beside the main worker.

    Each thread runs a ThreadWorker on the webhook queues (queues.DELIVERIES) until
    :meth:`stop`; like the main loop in :func:`run`, a worker that quits on an error (Redis went
    away) is replaced after RESTART_DELAY.
    """

    def __init__(self, settings: Settings, count: int, rq_level: str, burst: bool = False):
        self.settings, self.rq_level, self.burst = settings, rq_level, burst
        self._stop = threading.Event()
        self._workers: list[ServiceWorker | None] = [None] * count
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"delivery-{i + 1}")
            for i in range(count)
        ]

    def start(self) -> DeliverySlots:
        for thread in self._threads:
            thread.start()
        return self

    def _loop(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                _, _, rq_redis = context.get()
                worker = make_worker(self.settings, rq_redis, ThreadWorker, names=queues.DELIVERIES)
                self._workers[index] = worker
                if self._stop.is_set():
                    return
                worker.work(burst=self.burst, logging_level=self.rq_level)
                if self.burst or self._stop.is_set():
                    return
                log.warning(
                    "delivery worker %s quit on an error; starting a new one in %.0f s",
                    worker.name,
                    SLOT_RESTART_DELAY,
                )
            except Exception:  # noqa: BLE001 - this slot must come back, whatever happened
                log.warning(
                    "delivery slot %d failed; restarting it in %.0f s",
                    index + 1,
                    SLOT_RESTART_DELAY,
                    exc_info=True,
                )
            self._stop.wait(SLOT_RESTART_DELAY)

    def request_stop(self) -> None:
        """Ask every slot to finish its current delivery and quit, without waiting (safe in a
        signal handler: it only sets flags)."""
        self._stop.set()
        for worker in self._workers:
            if worker is not None:
                worker.request_thread_stop()

    def stop(self, timeout: float) -> None:
        """Ask every slot to finish its current delivery and quit; wait up to ``timeout``.

        RQ's public way to stop a worker is a signal (or a pub/sub command that becomes one),
        and only the main thread gets signals; see ThreadWorker.request_thread_stop (the RQ
        internals it relies on are pinned by tests/test_dependency_internals.py). A slot still in its
        (one-second) wait when the process exits leaves at most a job id in RQ's
        intermediate list, which recover_intermediate puts back.
        """
        self.request_stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)


def run(settings: Settings, burst: bool = False) -> int:
    """Work until stopped (SIGTERM/SIGINT finish the current jobs first); exit code 0."""
    from app.embedded_redis import resolve as resolve_redis

    url, embedded = resolve_redis(settings)
    # RQ logs every job (and every maintenance pass) at INFO; our own job logs say what
    # matters, so RQ's are shown from WARNING up unless DEBUG is asked for.
    rq_level = "DEBUG" if settings.logging.level == "DEBUG" else "WARNING"
    slots: DeliverySlots | None = None
    scheduler: SchedulerThread | None = None
    stopping = threading.Event()

    def stop_before_rq(signum, frame):
        """SIGTERM/SIGINT before RQ's handlers are in place (start-up, between two workers):
        the delivery slots may already be busy, so stop in order instead of dying."""
        stopping.set()
        raise StopRequested()

    try:
        while True:
            try:
                signal.signal(signal.SIGTERM, stop_before_rq)
                signal.signal(signal.SIGINT, stop_before_rq)
                worker = build(settings, url)
                if scheduler is None:
                    scheduler = SchedulerThread(
                        worker.queues,
                        worker.connection,
                        serializer=queues.SERIALIZER,
                        logging_level=rq_level,
                    )
                    if burst:  # due jobs run in this burst too
                        try:
                            scheduler.run_burst()
                        except RedisError as exc:
                            log.warning("scheduler pass failed: %s", exc)
                    else:
                        scheduler.start()
                if slots is None:
                    slots = DeliverySlots(
                        settings, settings.webhooks.concurrency - 1, rq_level, burst
                    ).start()
                # SIGTERM stops the slots at once: they take no new delivery while this
                # worker finishes the one in hand (before, they took new ones meanwhile, and a
                # stop took up to two webhooks.timeout).
                worker.on_stop_request = slots.request_stop
                log.info(
                    "worker %s on queues %s, %d webhook deliveries at once",
                    worker.name,
                    ", ".join(worker.queue_names()),
                    settings.webhooks.concurrency,
                )
                # After every delivery the maintenance queue is looked at first. In RQ's
                # default order (webhooks first, every time) the reaper ran only when no
                # webhook was waiting: a backlog to slow receivers kept leases from ending
                # for as long as it lasted. Now a due reap waits for one delivery at most.
                worker.checked_after_each_job = queues.queue_name(settings, queues.MAINTENANCE)
                try:
                    worker.work(burst=burst, logging_level=rq_level)
                except RedisError as exc:  # RQ's teardown could not reach Redis either
                    log.warning("worker %s: Redis error on the way out: %s", worker.name, exc)
                if burst or stopping.is_set() or worker.stop_requested:
                    break
                # RQ's work loop quits on any error it does not handle, such as Redis going
                # away while a job finishes (found by bench/chaos.py). Its job is recovered
                # from the started registry; this process carries on with a fresh worker.
                log.warning(
                    "worker %s quit on an error; starting a new worker in %.0f s",
                    worker.name,
                    RESTART_DELAY,
                )
                time.sleep(RESTART_DELAY)
            except StopRequested:  # SIGTERM/SIGINT between two workers
                break
    finally:
        if slots is not None:
            slots.stop(settings.webhooks.timeout + 5)
        if scheduler is not None:
            scheduler.stop()
        if embedded:
            embedded.stop()
    return 0
