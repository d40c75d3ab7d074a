"""Turn the engine's webhook outbox into RQ jobs, exactly once per event, surviving crashes.

The engine's Lua scripts RPUSH one JSON entry per deliverable event onto
``Keys.webhook_outbox()`` in the same atomic step as the state change:
``{"event_id", "event", "request_id", "ts"}``. :func:`dispatch` moves each entry, one at a
time, to ``Keys.webhook_processing()`` (LMOVE, atomic), then enqueues a delivery job whose id is
derived from the event id and removes the entry from the processing list in one MULTI/EXEC.

Crash safety, step by step (two dispatchers A and B: an API replica and the scheduler)::

    A: LMOVE outbox -> processing      entry is never in neither list
    A: SET claim:<event> NX PX 30000   B cannot work on the same entry meanwhile
    A: job "webhook-<event>" exists?   (same round trip as the claim)
    A: MULTI enqueue job; LREM processing entry; EXEC     done, atomically

If A dies anywhere before EXEC, the entry stays in the processing list (and no job exists, unless
an earlier attempt made one). The scheduler calls ``dispatch(..., recover_after=30)``, which
re-handles processing entries older than that. The claim (expired by then) and the job-id check
make the retry harmless: an existing job is never enqueued twice. The only window for a duplicate
is a dispatcher that stalls for longer than the claim TTL between its check and its EXEC;
receivers can dedupe on ``event_id`` even then.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from rq import Retry
from rq.job import Job

from app import queues
from app.keys import Keys
from app.settings import Settings

log = logging.getLogger("gpu_orchestrator.outbox")

CLAIM_TTL_MS = 30_000
#: Successful delivery jobs stay (and so keep blocking re-dispatch) this long.
RESULT_TTL = 3600
#: Failed deliveries stay in RQ's failed registry (rq-dashboard shows them) this long.
FAILURE_TTL = 7 * 86400
#: At most this many entries per call, so one call never runs away with a huge backlog.
BATCH = 1000


def job_id_for(event_id: str) -> str:
    """The RQ job id of one event's delivery; the same event always maps to the same job."""
    return f"webhook-{event_id}"


def retry_policy(settings: Settings) -> Retry | None:
    """RQ retry from ``webhooks.retry_intervals`` (whole seconds, rounded up; 0 = at once)."""
    intervals = [int(math.ceil(x)) for x in settings.webhooks.retry_intervals]
    if not intervals:
        return None
    return Retry(max=len(intervals), interval=intervals)


def job_timeout(settings: Settings) -> int:
    return int(max(settings.workers.job_timeout, settings.webhooks.timeout + 10))


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def dispatch(
    rq_redis: Any,
    settings: Settings,
    *,
    recover_after: float | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Enqueue a delivery job for every pending outbox entry; returns how many were enqueued.

    ``rq_redis`` is a raw-bytes connection (RQ needs ``decode=False``). With ``recover_after``
    (seconds), entries stuck in the processing list for longer than that (their dispatcher died)
    are handled too; the scheduler passes it, the API does not.
    """
    keys = Keys(settings.redis.prefix)
    q = queues.queue(rq_redis, settings, queues.WEBHOOKS)
    retry = retry_policy(settings)
    timeout = job_timeout(settings)
    enqueued = 0
    if recover_after is not None:
        cutoff = clock() - recover_after
        for raw in rq_redis.lrange(keys.webhook_processing(), 0, BATCH - 1):
            entry = _parse(raw)
            if entry is None or float(entry.get("ts") or 0) <= cutoff:
                enqueued += _handle(rq_redis, keys, q, raw, entry, retry, timeout)
    for _ in range(BATCH):
        raw = rq_redis.lmove(keys.webhook_outbox(), keys.webhook_processing(), "LEFT", "RIGHT")
        if raw is None:
            break
        enqueued += _handle(rq_redis, keys, q, raw, _parse(raw), retry, timeout)
    return enqueued


def _parse(raw: Any) -> dict | None:
    try:
        entry = json.loads(_text(raw))
    except ValueError:
        return None
    if not isinstance(entry, dict) or not entry.get("event_id") or not entry.get("request_id"):
        return None
    return entry


def _handle(rq_redis, keys: Keys, q, raw, entry, retry, timeout) -> int:
    processing = keys.webhook_processing()
    if entry is None:
        log.error("dropping malformed webhook outbox entry %r", _text(raw)[:200])
        rq_redis.lrem(processing, 1, raw)
        return 0
    event_id = str(entry["event_id"])
    job_id = job_id_for(event_id)
    claim = keys.webhook_claim(event_id)
    check = rq_redis.pipeline(transaction=False)
    check.set(claim, b"1", nx=True, px=CLAIM_TTL_MS)
    check.exists(Job.key_for(job_id))
    claimed, exists = check.execute()
    if not claimed:
        return 0  # another dispatcher is on it and will remove the entry
    # One MULTI/EXEC: the job is saved and queued, and the entry leaves the processing list,
    # together or not at all.
    with rq_redis.pipeline(transaction=True) as pipe:
        if not exists:
            q.enqueue(
                "workers.webhooks.deliver",
                entry,
                job_id=job_id,
                retry=retry,
                job_timeout=timeout,
                result_ttl=RESULT_TTL,
                failure_ttl=FAILURE_TTL,
                description=f"webhook {entry.get('event', '?')} {entry['request_id']}",
                pipeline=pipe,
            )
        pipe.lrem(processing, 1, raw)
        pipe.delete(claim)
        pipe.execute()
    return 0 if exists else 1


def pending(rq_redis: Any, settings: Settings) -> int:
    """Entries not yet turned into jobs (outbox plus processing), for health checks and tests."""
    keys = Keys(settings.redis.prefix)
    return int(rq_redis.llen(keys.webhook_outbox())) + int(rq_redis.llen(keys.webhook_processing()))
