"""``gpu-orchestrator worker``: an RQ worker on the service's queues (webhooks, maintenance).

It always runs with RQ's scheduler, because ``Retry(interval=...)`` only fires in a worker that
has one, and with the JSON serializer. Any number of workers may run: RQ hands each job to one
of them, and RQ's scheduler takes a lock so only one worker moves due retries at a time.

Recovering from a killed worker: a worker that is SIGKILLed (OOM killer, node loss) leaves its
job in RQ's started registry. Another worker's maintenance pass (every
``workers.maintenance_interval``) retries it once its heartbeat has lapsed. RQ's own lapse is the
monitoring interval plus a fixed 60 s; ours is ``3 x workers.heartbeat_interval``, so a webhook
whose worker died is retried in seconds rather than minutes. Jobs run in the worker process
itself (no fork per job); see :class:`ServiceWorker`.

Concurrent deliveries: one process delivers up to ``webhooks.concurrency`` webhooks at once, so
a slow receiver (each try bounded by ``webhooks.timeout``) holds one slot, not the worker. The
main thread runs the service's worker (every queue, RQ's scheduler, the signals); each other
slot is a :class:`DeliveryWorker` in its own thread, a full RQ worker on the webhook queue with
its own name, registration and heartbeats. Durability is RQ's, per job, as before: a slot's job
is in the started registry while it runs, and if the process dies (SIGKILL, OOM) every job it
held is retried by another worker once its heartbeat lapses.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import timedelta

from redis.exceptions import RedisError, WatchError
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.scripts import release_lock
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

from app import queues
from app.redis_client import connect
from app.settings import Settings
from workers import context

log = logging.getLogger("gpu_orchestrator.worker")

#: Seconds between a worker quitting on an error and its replacement starting.
RESTART_DELAY = 1.0
#: The same for a delivery slot (its own constant: a slot that keeps failing must never spin).
SLOT_RESTART_DELAY = 1.0
#: Longest blocking wait of one dequeue call (see ServiceQueue).
MAX_BLOCK = 1
#: A scheduler lock not refreshed for this many seconds belongs to a dead worker.
STALE_SCHEDULER_LOCK = 10
#: A job id seen in an intermediate list, not started, this many seconds apart was dropped by a
#: dequeue that died (a live worker registers it as started within milliseconds).
STUCK_DEQUEUE = 10


class ServiceJob(Job):
    """RQ's job, whose retry writes nothing outside the caller's pipeline."""

    def retry(self, queue, pipeline) -> None:
        """RQ 3.0's ``Job.retry``, except for the status. RQ writes SCHEDULED at once, before the
        pipeline that schedules the job runs; if Redis dies between the two, the job is left
        ``scheduled`` in no registry: the started-registry cleanup passes over it (it is not
        STARTED) and the scheduler never sees it, so it never runs again (found by
        bench/chaos.py: a webhook lost to a Redis SIGKILL while its failed try was recorded).
        Here the status goes in the same pipeline, so the job stays STARTED, and is retried as
        abandoned, until the whole retry commits."""
        if getattr(self, "deferred", False):
            # Not a failed try (workers.webhooks.WebhookDeferred): the delivery added the
            # retry it spends here, and comes back after a short, fixed wait.
            from workers.webhooks import DEFER_SECONDS

            interval = DEFER_SECONDS
        else:
            interval = self.get_retry_interval()
        assert self.retries_left
        self.retries_left -= 1
        if interval:
            self.set_status(JobStatus.SCHEDULED, pipeline=pipeline)
            queue.schedule_job(self, now() + timedelta(seconds=interval), pipeline=pipeline)
        else:
            queue._enqueue_job(self, pipeline=pipeline, at_front=self.enqueue_at_front_on_retry)


class ServiceQueue(Queue):
    """RQ's Queue, dequeuing through RQ's intermediate list whatever the number of queues.

    RQ moves a job id from a queue into ``<queue>:intermediate`` (LMOVE) only for a worker that
    listens on exactly one queue; with several (ours: webhooks, maintenance) it BLPOPs. A job
    popped just as the connection breaks (Redis restarting, the worker SIGKILLed) is then in no
    list at all: its status says queued and nothing ever runs it (found by bench/chaos.py: a
    webhook never delivered). Here every queue is tried in order with a non-blocking LMOVE, then
    the first (highest-priority) queue is waited on with BLMOVE for at most MAX_BLOCK seconds,
    so a job on a later queue waits at most that long. A job left in an intermediate list by a
    dead dequeue is put back on its queue by ServiceWorker.recover_intermediate (part of
    clean_registries) within seconds.
    """

    @classmethod
    def dequeue_any(
        cls,
        queues,
        timeout,
        connection=None,
        job_class=None,
        serializer=None,
        death_penalty_class=None,
    ):
        queues = list(queues)
        kwargs = dict(
            connection=connection,
            job_class=job_class,
            serializer=serializer,
            death_penalty_class=death_penalty_class,
        )
        if len(queues) <= 1:
            return super().dequeue_any(queues, timeout, **kwargs)
        for queue in queues:
            found = super().dequeue_any([queue], None, **kwargs)
            if found is not None:
                return found
        if timeout is None:
            return None
        return super().dequeue_any(queues[:1], min(timeout, MAX_BLOCK), **kwargs)


class ServiceWorker(SimpleWorker):
    """RQ's non-forking worker, plus heartbeats while a job runs (see the module docstring).

    Webhook jobs are short and I/O-bound; forking a work horse per job doubled the webhook
    latency on 2 cores (bench/latency.py). RQ's SimpleWorker does not heartbeat during a job, so
    a long delivery would look abandoned and be retried by another worker while still running;
    a small thread keeps the heartbeats going instead. Job timeouts still apply (RQ's SIGALRM
    death penalty in the main thread).
    """

    heartbeat_grace_factor = 2
    queue_class = ServiceQueue
    #: Wall clock for the intermediate-list recovery; tests replace it.
    clock = staticmethod(time.time)

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        # ServiceQueue always dequeues through the intermediate list: take the job off it once
        # it is registered as started, as RQ does for its single-queue workers.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def run_maintenance_tasks(self):
        self.release_stale_scheduler_locks()
        super().run_maintenance_tasks()

    def release_stale_scheduler_locks(self) -> list[str]:
        """Free the scheduler locks of dead workers; returns the queue names freed.

        Only the worker holding ``rq:scheduler-lock:<queue>`` moves due retries (webhook retry
        backoff) onto the queue. RQ gives that lock ``interval + 60`` s and its holder refreshes
        it every interval; a holder that is SIGKILLed leaves it, and every retry waits up to a
        minute (found by bench/chaos.py). A lock not refreshed for STALE_SCHEDULER_LOCK seconds
        is released (compare-and-delete on the holder's token), and RQ's maintenance pass that
        follows lets this worker's scheduler take it.
        """
        if self.scheduler is None:
            return []
        full = int(self.scheduler.interval) + 60
        freed = []
        for queue in self.queues:
            key = self.scheduler.get_locking_key(queue.name)
            holder = self.connection.get(key)
            if holder is None:
                continue
            holder = holder.decode() if isinstance(holder, bytes) else str(holder)
            if holder == self.scheduler.name:
                continue
            left = self.connection.ttl(key)
            if 0 <= left < full - STALE_SCHEDULER_LOCK and release_lock(
                self.connection, key, holder
            ):
                log.warning(
                    "released the scheduler lock of %s, held by %s that stopped refreshing it",
                    queue.name,
                    holder,
                )
                freed.append(queue.name)
        return freed

    def clean_registries(self):
        """RQ's registry maintenance, under a maintenance lock that lapses in seconds.

        RQ takes ``rq:clean_registries:<queue>`` for 899 s and releases it when done. A worker
        that dies while cleaning (SIGKILL, or Redis going away mid-clean, which RQ's work loop
        does not survive) leaves it behind, and for 15 minutes no worker retries the jobs that
        dead workers abandoned: a webhook whose worker died waited that long (found by
        bench/chaos.py). Cleaning takes milliseconds, so a lock of a few maintenance intervals
        bounds that wait without letting two cleaners overlap in practice.
        """
        ttl = max(10, 3 * int(self.maintenance_interval))
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=ttl):
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                self.recover_intermediate(queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def recover_intermediate(self, queue) -> list[str]:
        """Put jobs a dead dequeue left in ``<queue>:intermediate`` back on the queue.

        A worker LMOVEs a job id from the queue into the intermediate list, then registers it as
        started, which also takes it off that list. When Redis is SIGKILLed (or the worker dies)
        between the two, the id stays there with status ``queued``, in no queue and no registry.
        RQ's own cleanup acts on it only after a minute, and then as a *failure*: it spends one
        of the job's retries, and a job on its last retry is marked failed without ever being
        tried (found by bench/chaos.py: webhook retries that RQ's scheduler had just moved onto
        the queue were never delivered, 64 of 66). Here an id that is not in the started
        registry and was first seen at least STUCK_DEQUEUE seconds before (RQ's first-seen key)
        is moved back onto the front of its queue, status queued, in one MULTI/EXEC under WATCH
        of the list and the job: if a slow live worker takes it meanwhile, nothing is moved.
        A job that already finished, failed, or is scheduled or queued elsewhere is only taken
        off the list. Returns the ids re-queued. Delivery stays at least once: the worst case
        is a live worker stalled for STUCK_DEQUEUE seconds between its LMOVE and its start,
        whose job then runs twice (webhook receivers dedupe on event_id).
        """
        intermediate = queue.intermediate_queue
        requeued = []
        for job_id in intermediate.get_job_ids():
            if job_id in queue.started_job_registry:
                continue  # a live (or dead) execution owns it; the started registry recovers it
            first_seen = intermediate.get_first_seen_key(job_id)
            t = self.clock()
            if self.connection.set(first_seen, repr(t), nx=True, ex=86400):
                continue  # first sighting: may still be in a live worker's hands
            seen = self.connection.get(first_seen)
            if seen is not None and t - float(seen) < STUCK_DEQUEUE:
                continue
            if self._requeue_from_intermediate(queue, job_id):
                requeued.append(job_id)
        return requeued

    def _requeue_from_intermediate(self, queue, job_id: str) -> bool:
        intermediate = queue.intermediate_queue
        job_key = Job.key_for(job_id)
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(intermediate.key, job_key, queue.key)
                if pipe.lpos(intermediate.key, job_id) is None:
                    pipe.unwatch()
                    return False
                job = queue.fetch_job(job_id)
                status = job.get_status(refresh=False) if job is not None else None
                requeue = (
                    status in (JobStatus.QUEUED, JobStatus.STARTED)
                    and pipe.lpos(queue.key, job_id) is None
                )
                pipe.multi()
                if requeue:
                    queue._enqueue_job(job, pipeline=pipe, at_front=True)
                pipe.lrem(intermediate.key, 1, job_id)
                pipe.delete(intermediate.get_first_seen_key(job_id))
                pipe.execute()
            except WatchError:
                return False  # it moved meanwhile; look again next pass
        if requeue:
            log.warning(
                "job %s was dequeued by a worker that never started it; re-queued on %s",
                job_id,
                queue.name,
            )
        return requeue

    def handle_exception(self, job, *exc_info):
        """RQ logs every raised job at ERROR with its traceback; a deferred webhook is not an
        error (it waits for a slot of its receiver), so it is left to our DEBUG line."""
        from workers.webhooks import WebhookDeferred

        if exc_info and isinstance(exc_info[1], WebhookDeferred):
            return
        super().handle_exception(job, *exc_info)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return (1 + self.heartbeat_grace_factor) * max(1, int(self.job_monitoring_interval))

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)
        done = threading.Event()

        def beat():
            while not done.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # noqa: BLE001 - a missed beat only risks an early retry
                    log.warning("heartbeat for job %s failed", job.id, exc_info=True)

        beater = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        beater.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beater.join(5)
        self.set_state(WorkerStatus.IDLE)


class DeliveryWorker(ServiceWorker):
    """One extra delivery slot: a ServiceWorker on the webhook queue, run in a thread.

    Signals belong to the main thread's worker (Python only lets the main thread install
    handlers); :func:`run` stops the slots when that one stops. The job time limit uses RQ's
    thread-safe timer death penalty instead of SIGALRM, which only the main thread gets.
    """

    death_penalty_class = TimerDeathPenalty
    _slot_stop = False

    def _install_signal_handlers(self):
        """None: SIGTERM/SIGINT reach the main thread's worker, which stops this one."""

    @property
    def dequeue_timeout(self) -> int:
        """Wait at most MAX_BLOCK in Redis, so a stop is noticed within a second."""
        return MAX_BLOCK

    def request_slot_stop(self) -> None:
        """Finish the delivery in hand, if any, then leave the work loop.

        What RQ's SIGTERM handler does, without the signal: RQ's idle worker waits in a loop
        inside ``dequeue_job_and_maintain_ttl`` that only an exception leaves (its handler
        raises StopRequested there), and a busy one checks ``_stop_requested`` after its job.
        Here the flag is set, and :meth:`heartbeat`, which RQ calls before every wait and after
        every job, raises StopRequested once the slot is not busy.
        """
        self._slot_stop = True
        self._stop_requested = True

    def heartbeat(self, timeout=None, pipeline=None):
        super().heartbeat(timeout, pipeline)
        if self._slot_stop and pipeline is None and self.get_state() != WorkerStatus.BUSY:
            raise StopRequested()


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

    Each thread runs a DeliveryWorker until :meth:`stop`; like the main loop in :func:`run`,
    a worker that quits on an error (Redis went away) is replaced after RESTART_DELAY.
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
                worker = make_worker(
                    self.settings, rq_redis, DeliveryWorker, names=(queues.WEBHOOKS,)
                )
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

    def stop(self, timeout: float) -> None:
        """Ask every slot to finish its current delivery and quit; wait up to ``timeout``.

        RQ's public way to stop a worker is a signal (or a pub/sub command that becomes one),
        and only the main thread gets signals; see DeliveryWorker.request_slot_stop (the RQ
        internals it relies on are pinned by tests/test_worker_slots.py). A slot still in its
        (one-second) wait when the process exits leaves at most a job id in RQ's
        intermediate list, which recover_intermediate puts back.
        """
        self._stop.set()
        for worker in self._workers:
            if worker is not None:
                worker.request_slot_stop()
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
                if slots is None:
                    slots = DeliverySlots(
                        settings, settings.webhooks.concurrency - 1, rq_level, burst
                    ).start()
                log.info(
                    "worker %s on queues %s, %d webhook deliveries at once",
                    worker.name,
                    ", ".join(worker.queue_names()),
                    settings.webhooks.concurrency,
                )
                try:
                    worker.work(burst=burst, with_scheduler=True, logging_level=rq_level)
                except RedisError as exc:  # RQ's teardown could not reach Redis either
                    log.warning("worker %s: Redis error on the way out: %s", worker.name, exc)
                if burst or stopping.is_set() or worker._shutdown_requested_date is not None:
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
        if embedded:
            embedded.stop()
    return 0
