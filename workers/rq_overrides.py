"""The RQ 3.0 behaviours this service corrects, in one module (issue 13 part 5).

RQ has no public hook for any of these. Each override says what RQ does and why that loses or
delays a job here; most were found by bench/chaos.py as a lost or late webhook (docs/
reliability.md, *Findings*). The rest of ``workers/`` uses RQ's public API plus this module.

tests/test_dependency_internals.py is the canary: it pins the source of every upstream function
overridden or copied here (:data:`UPSTREAM`), checks that every private name used
(:data:`PRIVATE`) and every RQ name called (:data:`CALLED`) still exists, and fails naming the
internal when an RQ upgrade moves one. On such a failure: read the new upstream code, drop the
override if upstream fixed the problem, else port it; then update the pin.

- :class:`ServiceJob` ``retry``: RQ writes SCHEDULED outside the retry's pipeline. Also the
  deferral (:func:`defer`): a job that cannot run yet comes back later without spending a try.
- :class:`ServiceQueue` ``dequeue_any``: RQ BLPOPs (no intermediate list) with several queues.
- :class:`ServiceWorker`: dequeue through the intermediate list and recover what a dead dequeue
  left there, a maintenance lock that lapses in seconds, heartbeats while a job runs in a
  non-forking worker, a public "stop was requested" flag.
- :class:`SchedulerThread`: RQ's scheduler in a thread, not a process forked from a process
  with threads; frees a dead holder's scheduler lock in seconds.
- :class:`ThreadWorker`: a ServiceWorker that runs in a thread (RQ assumes the main thread).
- :class:`JsonCronJob` / :func:`add_cron_job`: RQ's cron enqueues with pickle; ours is JSON.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from redis.exceptions import RedisError, WatchError
from rq import Queue, SimpleWorker, worker_registration
from rq.cron import CronJob, CronScheduler
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.scripts import release_lock
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

log = logging.getLogger("gpu_orchestrator.worker")

#: Longest blocking wait of one dequeue call (see ServiceQueue).
MAX_BLOCK = 1
#: A scheduler lock not refreshed for this many seconds belongs to a dead worker.
STALE_SCHEDULER_LOCK = 10
#: A job id seen in an intermediate list, not started, this many seconds apart was dropped by a
#: dequeue that died (a live worker registers it as started within milliseconds).
STUCK_DEQUEUE = 10

#: The RQ release the pins below were checked against.
UPSTREAM_RQ_VERSION = "3.0.0"
#: Upstream functions overridden or copied here -> the first 16 hex digits of the sha256 of
#: their source in UPSTREAM_RQ_VERSION. The canary recomputes them.
UPSTREAM = {
    "rq.job.Job.retry": "4a0f7cec2323d8a5",
    "rq.queue.Queue.dequeue_any": "2452e56ad5197396",
    "rq.worker.base.BaseWorker.prepare_job_execution": "d08dd32962e3f82a",
    "rq.worker.base.BaseWorker.clean_registries": "e2c9790c8156c72c",
    "rq.worker.base.BaseWorker.handle_exception": "fffd9b2925ac1432",
    "rq.worker.base.BaseWorker.request_stop": "f934e7e7e6eecfee",
    "rq.worker.base.BaseWorker._install_signal_handlers": "f30e3c58661a235a",
    "rq.worker.base.BaseWorker.heartbeat": "63b1089fd146d19c",
    "rq.worker.base.BaseWorker.dequeue_timeout": "62cbfcfcde523452",
    "rq.worker.base.BaseWorker.reorder_queues": "03ea7d537f7e3a54",
    "rq.worker.worker_classes.SimpleWorker.execute_job": "eae0f23110aeb280",
    "rq.worker.worker_classes.SimpleWorker.get_heartbeat_ttl": "f83449c2eebaacb1",
    "rq.cron.CronJob.enqueue": "7d695e184914aa75",
    "rq.cron.CronScheduler.register": "8a9f4ee352038d3a",
}
#: Private or undocumented attributes of RQ used here: (class, attribute). The canary checks
#: each is still a class attribute or assigned in the class's ``__init__``.
PRIVATE = (
    ("rq.job.Job", "retries_left"),
    ("rq.job.Job", "enqueue_at_front_on_retry"),
    ("rq.queue.Queue", "_enqueue_job"),
    ("rq.worker.base.BaseWorker", "_exc_handlers"),
    ("rq.worker.base.BaseWorker", "_stop_requested"),
    ("rq.worker.base.BaseWorker", "_ordered_queues"),
    ("rq.cron.CronScheduler", "_cron_jobs"),
)
#: RQ names the overrides call or read (public, but they must keep meaning what they mean).
CALLED = (
    "rq.registry.clean_registries",
    "rq.scripts.release_lock",
    "rq.timeouts.TimerDeathPenalty",
    "rq.worker_registration.clean_worker_registry",
    "rq.job.Job.get_retry_interval",
    "rq.job.Job.set_status",
    "rq.queue.Queue.schedule_job",
    "rq.queue.Queue.intermediate_queue",
    "rq.queue.Queue.registry_cleaning_key",
    "rq.queue.Queue.release_maintenance_lock",
    "rq.queue.Queue.started_job_registry",
    "rq.intermediate_queue.IntermediateQueue.get_first_seen_key",
    "rq.intermediate_queue.IntermediateQueue.get_job_ids",
    "rq.scheduler.RQScheduler.get_locking_key",
    "rq.scheduler.RQScheduler.acquire_locks",
    "rq.scheduler.RQScheduler.acquired_locks",
    "rq.scheduler.RQScheduler.heartbeat",
    "rq.scheduler.RQScheduler.enqueue_scheduled_jobs",
    "rq.scheduler.RQScheduler.register_birth",
    "rq.scheduler.RQScheduler.stop",
    "rq.scheduler.RQScheduler.connection",
    "rq.worker.base.BaseWorker.prepare_execution",
    "rq.worker.base.BaseWorker.perform_job",
    "rq.worker.base.BaseWorker.maintain_heartbeats",
    "rq.worker.base.BaseWorker.set_state",
    "rq.worker.base.BaseWorker.get_state",
    "rq.worker.base.BaseWorker.queue_class",
    "rq.worker.base.BaseWorker.death_penalty_class",
)


# ------------------------------------------------------------------------------ jobs


class JobDeferred(Exception):
    """Raised by a job that cannot run yet, after :func:`defer`: not a failure (not logged as
    one by ServiceWorker), and it comes back later without spending a try."""


def defer(job: Job, seconds: float, queue_name: str | None = None) -> None:
    """Make the running job's coming retry a deferral: ``seconds`` out, no try spent, and then
    onto the queue ``queue_name`` (default: the one it came from).

    RQ has no notion of "not yet": a job that raises spends a retry and waits its backoff.
    Here the job is given one extra retry, which :meth:`ServiceJob.retry` takes back, at a
    fixed short interval. RQ reads ``retries_left`` from this very object right after the job
    raises; a job run by a plain ``rq worker`` (not a ServiceJob) just spends the extra retry
    (and comes back on its own queue).
    """
    job.retries_left = (job.retries_left or 0) + 1
    job.deferred_for = seconds
    job.deferred_to = queue_name


def give_up(job: Job) -> None:
    """No retry for the running job whatever its Retry said (RQ reads ``retries_left`` right
    after the job raises)."""
    job.retries_left = 0


def retries_left(job: Job) -> int:
    """Retries the running job has left (RQ's ``retries_left``, None without a Retry)."""
    return job.retries_left or 0


class ServiceJob(Job):
    """RQ's job, whose retry writes nothing outside the caller's pipeline."""

    def retry(self, queue, pipeline) -> None:
        """RQ 3.0's ``Job.retry``, except for the status. RQ writes SCHEDULED at once, before the
        pipeline that schedules the job runs; if Redis dies between the two, the job is left
        ``scheduled`` in no registry: the started-registry cleanup passes over it (it is not
        STARTED) and the scheduler never sees it, so it never runs again (found by
        bench/chaos.py: a webhook lost to a Redis SIGKILL while its failed try was recorded).
        Here the status goes in the same pipeline, so the job stays STARTED, and is retried as
        abandoned, until the whole retry commits. A deferred job (:func:`defer`) comes back
        after its own interval, on the queue it was deferred to."""
        interval = getattr(self, "deferred_for", None) or self.get_retry_interval()
        target = getattr(self, "deferred_to", None)
        if target and target != queue.name:
            queue = type(queue)(
                target,
                connection=queue.connection,
                serializer=queue.serializer,
                job_class=type(self),
            )
        assert self.retries_left
        self.retries_left -= 1
        if interval:
            self.set_status(JobStatus.SCHEDULED, pipeline=pipeline)
            queue.schedule_job(self, now() + timedelta(seconds=interval), pipeline=pipeline)
        else:
            queue._enqueue_job(self, pipeline=pipeline, at_front=self.enqueue_at_front_on_retry)


# ------------------------------------------------------------------------------ queues


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


# ------------------------------------------------------------------------------ workers


class ServiceWorker(SimpleWorker):
    """RQ's non-forking worker, plus heartbeats while a job runs.

    Webhook jobs are short and I/O-bound; forking a work horse per job doubled the webhook
    latency on 2 cores (bench/latency.py). RQ's SimpleWorker does not heartbeat during a job, so
    a long delivery would look abandoned and be retried by another worker while still running;
    a small thread keeps the heartbeats going instead. Job timeouts still apply (RQ's SIGALRM
    death penalty in the main thread).
    """

    heartbeat_grace_factor = 2
    queue_class = ServiceQueue
    #: True once a warm stop was asked for (SIGTERM/SIGINT, or RQ's shutdown command).
    stop_requested = False
    #: Called (in the signal handler: it must only set flags) when a warm stop is asked for.
    on_stop_request = None
    #: Wall clock for the intermediate-list recovery; tests replace it.
    clock = staticmethod(time.time)
    #: A queue looked at first after a job from any other queue, and last after one of its
    #: own (workers.worker.run: the maintenance queue); None: RQ's dequeue strategy decides.
    checked_after_each_job: str | None = None

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ takes the job off the intermediate list only when it dequeued through one (a
        single-queue worker); ServiceQueue always does, so always take it off."""
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def request_stop(self, signum, frame):
        """RQ records a warm stop only in the private ``_shutdown_requested_date``; the process
        loop (workers.worker.run) must tell a stop from RQ quitting on an error, and the
        process's other workers (the delivery slots) must stop taking jobs now, not once this
        one's job is done (:attr:`on_stop_request`)."""
        self.stop_requested = True
        if self.on_stop_request is not None:
            self.on_stop_request()
        super().request_stop(signum, frame)

    def reorder_queues(self, reference_queue):
        """After each job: with :attr:`checked_after_each_job`, that queue comes first unless
        the job came from it, the others keep their priority order.

        RQ's round robin over webhooks, maintenance and webhooks-deferred meets maintenance
        right after a fresh delivery but not after a deferred one (the order is then
        webhooks, maintenance): a reap due during a deferred delivery waited for a fresh one
        too. Here it waits for the one delivery in hand, whichever queue it came from."""
        name = self.checked_after_each_job
        if name is None:
            return super().reorder_queues(reference_queue)
        own = [q for q in self.queues if q.name == name]
        rest = [q for q in self.queues if q.name != name]
        self._ordered_queues = rest + own if reference_queue.name == name else own + rest

    def clean_registries(self):
        """RQ's registry maintenance, under a maintenance lock that lapses in seconds.

        RQ takes ``rq:clean_registries:<queue>`` for 899 s and releases it when done. A worker
        that dies while cleaning (SIGKILL, or Redis going away mid-clean, which RQ's work loop
        does not survive) leaves it behind, and for 15 minutes no worker retries the jobs that
        dead workers abandoned: a webhook whose worker died waited that long (found by
        bench/chaos.py). Cleaning takes milliseconds, so a lock of a few maintenance intervals
        bounds that wait without letting two cleaners overlap in practice. RQ's own
        intermediate-list cleanup is replaced by :meth:`recover_intermediate`.
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
        """RQ logs every job that raised at ERROR with its traceback; a deferred job
        (:class:`JobDeferred`) did not fail, so it is left to the job's own log line."""
        if exc_info and isinstance(exc_info[1], JobDeferred):
            return
        super().handle_exception(job, *exc_info)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        """RQ's SimpleWorker sets the job's timeout + 60 s, since it sends no heartbeat while a
        job runs; :meth:`execute_job` does, so a few intervals let a dead worker's job be
        retried in seconds."""
        return (1 + self.heartbeat_grace_factor) * max(1, int(self.job_monitoring_interval))

    def execute_job(self, job, queue):
        """RQ's SimpleWorker.execute_job, plus a heartbeat thread (see the class docstring)."""
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


class ThreadWorker(ServiceWorker):
    """A ServiceWorker that runs in a thread other than the main one, and stops on request.

    RQ assumes its worker owns the main thread: it installs SIGINT/SIGTERM handlers (Python
    allows that only in the main thread), times jobs out with SIGALRM (delivered only to the
    main thread), and stops only on a signal. Here there are no handlers (the process's main
    worker gets the signals and stops this one), the time limit is RQ's thread-safe timer death
    penalty, and :meth:`request_thread_stop` stops the loop without a signal.
    """

    death_penalty_class = TimerDeathPenalty
    _thread_stop = False

    def _install_signal_handlers(self):
        """None: SIGTERM/SIGINT reach the main thread's worker, which stops this one."""

    @property
    def dequeue_timeout(self) -> int:
        """RQ waits up to ``worker_ttl - 15`` s in Redis; at most MAX_BLOCK here, so a stop is
        noticed within a second."""
        return MAX_BLOCK

    def request_thread_stop(self) -> None:
        """Finish the job in hand, if any, then leave the work loop.

        What RQ's SIGTERM handler does, without the signal: RQ's idle worker waits in a loop
        inside ``dequeue_job_and_maintain_ttl`` that only an exception leaves (its handler
        raises StopRequested there), and a busy one checks ``_stop_requested`` after its job.
        Here the flag is set, and :meth:`heartbeat`, which RQ calls before every wait and after
        every job, raises StopRequested once the worker is not busy.
        """
        self._thread_stop = True
        self._stop_requested = True

    def heartbeat(self, timeout=None, pipeline=None):
        """RQ's heartbeat, which also leaves the work loop once a stop was requested."""
        super().heartbeat(timeout, pipeline)
        if self._thread_stop and pipeline is None and self.get_state() != WorkerStatus.BUSY:
            raise StopRequested()


# ------------------------------------------------------------------------------ scheduler


class SchedulerThread:
    """RQ's scheduler (due retries onto their queues) in a thread of the worker process.

    RQ's worker runs its scheduler (``work(with_scheduler=True)``) in a process it forks with
    multiprocessing's ``fork``, from a process that by then has threads (our delivery slots and
    their heartbeats, RQ's pub/sub listener), and forks it again whenever it finds it dead. A
    fork copies every lock as it stands; one that another thread held at that instant (a
    logging handler's, a connection pool's, an allocator's) is held for ever in the child, which
    then hangs: alive, so never replaced, and refreshing nothing, so deferred and retried jobs
    wait in the scheduled registry until the worker restarts (what the flaky
    ``test_a_trickling_receiver_does_not_hold_up_another_teams_webhook`` showed). Python 3.12
    warns about such forks. Here the same loop as ``RQScheduler.work``, through its public
    methods, runs in a thread: no fork at all.

    Several worker processes each run one; RQ's per-queue scheduler locks let one move a given
    queue's jobs at a time. RQ gives a lock ``interval + 60`` s and its holder refreshes it every
    interval; a holder that was SIGKILLed leaves it, and every retry waited up to a minute
    (found by bench/chaos.py). So a thread missing a lock frees one not refreshed for
    STALE_SCHEDULER_LOCK seconds (compare-and-delete on the holder's token) and takes it.
    """

    def __init__(
        self, queues, connection, *, serializer=None, interval: int = 1, logging_level="WARNING"
    ):
        self.scheduler = RQScheduler(
            [q.name for q in queues],
            connection=connection,
            interval=interval,
            serializer=serializer,
            logging_level=logging_level,
        )
        self.queue_names = {q.name for q in queues}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rq-scheduler", daemon=True)

    @property
    def name(self) -> str:
        return self.scheduler.name

    def start(self) -> SchedulerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Leave the loop, release the locks held and deregister (RQScheduler.stop)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def run_once(self) -> None:
        """One pass: take the missing locks (freeing stale ones), refresh the held ones, move
        due jobs onto their queues."""
        scheduler = self.scheduler
        if scheduler.acquired_locks != self.queue_names:
            self.release_stale_locks()
            scheduler.acquire_locks()
        scheduler.heartbeat()
        if scheduler.acquired_locks:
            scheduler.enqueue_scheduled_jobs()

    def run_burst(self) -> None:
        """What RQ's burst mode does: one pass, then the locks go back."""
        try:
            self.run_once()
        finally:
            self.scheduler.release_locks()

    def _loop(self) -> None:
        scheduler = self.scheduler
        born = False
        while not self._stop.is_set():
            try:
                if not born:
                    scheduler.register_birth()
                    born = True
                self.run_once()
            except RedisError as exc:  # Redis away or restarting: one line, no traceback
                log.warning("scheduler %s: Redis error (%s); retrying", scheduler.name, exc)
            except Exception:  # noqa: BLE001 - this thread must keep moving due jobs
                log.warning("scheduler %s: pass failed; retrying", scheduler.name, exc_info=True)
            self._stop.wait(scheduler.interval)
        try:
            scheduler.stop()
        except Exception:  # noqa: BLE001 - Redis away: the locks lapse on their own
            log.warning("scheduler %s: could not release its locks", scheduler.name)

    def release_stale_locks(self) -> list[str]:
        """Free the scheduler locks of dead holders; returns the queue names freed."""
        scheduler, conn = self.scheduler, self.scheduler.connection
        full = int(scheduler.interval) + 60
        freed = []
        for name in sorted(self.queue_names - scheduler.acquired_locks):
            key = scheduler.get_locking_key(name)
            holder = conn.get(key)
            if holder is None:
                continue
            holder = holder.decode() if isinstance(holder, bytes) else str(holder)
            if holder == scheduler.name:
                continue
            left = conn.ttl(key)
            if 0 <= left < full - STALE_SCHEDULER_LOCK and release_lock(conn, key, holder):
                log.warning(
                    "released the scheduler lock of %s, held by %s that stopped refreshing it",
                    name,
                    holder,
                )
                freed.append(name)
        return freed


# ------------------------------------------------------------------------------ cron


class JsonCronJob(CronJob):
    """RQ 3.0's ``CronJob.enqueue`` builds its Queue with the default (pickle) serializer, and
    ``CronScheduler.register`` takes no serializer; our workers read JSON only, so a job that
    stock RQ cron enqueued would fail to load. This one enqueues with ``serializer`` (by the
    function's dotted name; RQ's per-cron-job history is not kept)."""

    def __init__(self, *args, serializer, **kwargs):
        super().__init__(*args, **kwargs)
        self.serializer = serializer

    def enqueue(self, connection):
        q = Queue(self.queue_name, connection=connection, serializer=self.serializer)
        job = q.enqueue(self.func_name, args=self.args, kwargs=self.kwargs, **self.job_options)
        log.debug("enqueued %s on %s", self.func_name, self.queue_name)
        return job


def add_cron_job(cron: CronScheduler, job: CronJob) -> None:
    """Add a prepared ``job`` to ``cron``: ``CronScheduler.register`` builds a plain CronJob
    itself, so this appends to the list it appends to (which ``get_jobs`` returns)."""
    cron._cron_jobs.append(job)
