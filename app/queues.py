"""The service's RQ queues, all using RQ's JSON serializer (never pickle).

Queue names come from :meth:`app.keys.Keys.rq_queue`, so two deployments that share one Redis
under different prefixes never see each other's jobs.
"""

from __future__ import annotations

from typing import Any

from rq import Queue
from rq.serializers import JSONSerializer

from app.keys import Keys
from app.settings import Settings

#: Webhook deliveries.
WEBHOOKS = "webhooks"
#: Periodic safety-net pass and reaper jobs enqueued by the scheduler.
MAINTENANCE = "maintenance"
#: Deliveries deferred because their receiver had ``webhooks.max_per_receiver`` tries in flight
#: (workers.webhooks.WebhookDeferred): taken after any fresh delivery, so a deep backlog to one
#: slow receiver never queues ahead of another team's webhook.
WEBHOOKS_DEFERRED = "webhooks-deferred"
#: Every queue a ``gpu-orchestrator worker`` listens on, highest priority first.
ALL = (WEBHOOKS, MAINTENANCE, WEBHOOKS_DEFERRED)
#: The queues of a delivery slot (workers.worker.DeliverySlots), highest priority first.
DELIVERIES = (WEBHOOKS, WEBHOOKS_DEFERRED)

SERIALIZER = JSONSerializer


def queue_name(settings: Settings, name: str) -> str:
    return Keys(settings.redis.prefix).rq_queue(name)


def queue(rq_redis: Any, settings: Settings, name: str) -> Queue:
    """One RQ queue on a raw-bytes connection (``connect(..., decode=False)``)."""
    return Queue(queue_name(settings, name), connection=rq_redis, serializer=SERIALIZER)


def all_queues(rq_redis: Any, settings: Settings) -> list[Queue]:
    return [queue(rq_redis, settings, name) for name in ALL]
