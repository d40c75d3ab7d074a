"""The outbox dispatcher: every engine outbox entry becomes exactly one RQ delivery job."""

from __future__ import annotations

import json

import pytest
import redis as redis_lib
from rq.job import Job

from app import outbox, queues
from app.keys import Keys


@pytest.fixture
def rq_redis(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def _entry(event_id, ts=1000.0, request_id="svc-1", event="allocated"):
    return json.dumps({"event_id": event_id, "event": event, "request_id": request_id, "ts": ts})


def _webhook_jobs(rq_redis, settings):
    q = queues.queue(rq_redis, settings, queues.WEBHOOKS)
    return [Job.fetch(i, connection=rq_redis, serializer=queues.SERIALIZER) for i in q.job_ids]


def test_dispatch_turns_each_entry_into_one_json_job(rq_redis, settings):
    keys = Keys(settings.redis.prefix)
    rq_redis.rpush(keys.webhook_outbox(), _entry("e1"), _entry("e2", request_id="svc-2"))
    assert outbox.dispatch(rq_redis, settings) == 2
    jobs = _webhook_jobs(rq_redis, settings)
    assert [j.id for j in jobs] == ["webhook-e1", "webhook-e2"]
    assert jobs[0].func_name == "workers.webhooks.deliver"
    assert jobs[0].args[0]["request_id"] == "svc-1"
    assert jobs[1].args[0]["request_id"] == "svc-2"
    # JSON, not pickle: the stored job data is readable JSON.
    raw = rq_redis.hget(Job.key_for("webhook-e1"), "data")
    assert json.loads(__import__("zlib").decompress(raw))[0] == "workers.webhooks.deliver"
    assert jobs[0].retries_left == len(settings.webhooks.retry_intervals)
    assert outbox.pending(rq_redis, settings) == 0
    assert outbox.dispatch(rq_redis, settings) == 0


def test_redispatch_of_the_same_event_never_duplicates(rq_redis, settings):
    keys = Keys(settings.redis.prefix)
    rq_redis.rpush(keys.webhook_outbox(), _entry("e1"))
    outbox.dispatch(rq_redis, settings)
    rq_redis.rpush(keys.webhook_outbox(), _entry("e1"))
    assert outbox.dispatch(rq_redis, settings) == 0
    assert len(_webhook_jobs(rq_redis, settings)) == 1


def test_entries_left_by_a_crashed_dispatcher_are_recovered_once(rq_redis, settings):
    keys = Keys(settings.redis.prefix)
    # A dispatcher moved two entries and died; it had already enqueued the first one.
    rq_redis.rpush(keys.webhook_outbox(), _entry("e1", ts=100.0))
    outbox.dispatch(rq_redis, settings)
    rq_redis.rpush(
        keys.webhook_processing(),
        _entry("e1", ts=100.0),
        _entry("e2", ts=100.0),
        _entry("fresh", ts=1000.0),
    )
    # The API's plain dispatch leaves the processing list alone.
    assert outbox.dispatch(rq_redis, settings, clock=lambda: 1010.0) == 0
    assert outbox.dispatch(rq_redis, settings, recover_after=30, clock=lambda: 1010.0) == 1
    assert sorted(j.id for j in _webhook_jobs(rq_redis, settings)) == ["webhook-e1", "webhook-e2"]
    # The fresh one may still belong to a live dispatcher: it stays until it is old enough.
    left = rq_redis.lrange(keys.webhook_processing(), 0, -1)
    assert left == [_entry("fresh", ts=1000.0).encode()]
    assert outbox.dispatch(rq_redis, settings, recover_after=30, clock=lambda: 1100.0) == 1


def test_a_claimed_entry_is_left_to_its_claimant(rq_redis, settings):
    keys = Keys(settings.redis.prefix)
    rq_redis.set(keys.webhook_claim("e1"), "1", px=30000)
    rq_redis.rpush(keys.webhook_outbox(), _entry("e1"))
    assert outbox.dispatch(rq_redis, settings) == 0
    assert rq_redis.llen(keys.webhook_processing()) == 1
    assert _webhook_jobs(rq_redis, settings) == []


def test_malformed_entries_are_dropped_not_retried_forever(rq_redis, settings):
    keys = Keys(settings.redis.prefix)
    rq_redis.rpush(keys.webhook_outbox(), "not json", json.dumps({"event": "x"}), _entry("ok"))
    assert outbox.dispatch(rq_redis, settings) == 1
    assert outbox.pending(rq_redis, settings) == 0


def test_retry_policy_follows_settings(settings):
    s = settings.replace(webhooks={"retry_intervals": ["0s", "1.5s", "2m"]})
    retry = outbox.retry_policy(s)
    assert retry.max == 3 and retry.intervals == [0, 2, 120]


def test_queue_names_are_per_prefix():
    assert Keys("{gpuo}").rq_queue("webhooks") == "gpuo-webhooks"
    assert Keys("{gpuo-ab12}").rq_queue("webhooks") == "gpuo-ab12-webhooks"
