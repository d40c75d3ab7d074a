"""The worker's delivery slots (workers.worker.DeliverySlots): RQ workers run in threads.

A slot is a workers.rq_overrides.ThreadWorker; the RQ internals it relies on (the work loop's
``_stop_requested`` flag, StopRequested raised from ``heartbeat``, ``_install_signal_handlers``)
are pinned with the other overrides' in tests/test_dependency_internals.py. These tests check
what a user would notice: a slot delivers, and stops when asked.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib

from app import queues
from workers import context, rq_overrides
from workers import worker as worker_mod


@pytest.fixture
def rq_redis(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def test_a_slot_runs_outside_the_main_thread_and_stops_on_request(settings, rq_redis):
    """A ThreadWorker works in a thread (no signal handlers, timer death penalty), runs a
    job, and leaves its loop once the stop flag is set."""
    context.configure(
        settings, redis_lib.Redis.from_url(settings.redis.url, decode_responses=True), rq_redis
    )
    slot = worker_mod.make_worker(
        settings, rq_redis, rq_overrides.ThreadWorker, names=(queues.WEBHOOKS,)
    )
    q = queues.queue(rq_redis, settings, queues.WEBHOOKS)
    job = q.enqueue("app.outbox.job_id_for", "probe")
    errors = []

    def work():
        try:
            slot.work(logging_level="WARNING")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while job.get_status(refresh=True) != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.get_status(refresh=True) == "finished" and job.return_value() == "webhook-probe"
    slot.request_thread_stop()
    thread.join(10)
    assert not thread.is_alive() and errors == []
    context.get()[1].close()


def test_delivery_slots_start_count_threads_and_stop(settings, rq_redis):
    context.configure(settings, redis_lib.Redis.from_url(settings.redis.url), rq_redis)
    slots = worker_mod.DeliverySlots(settings, 3, "WARNING").start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(w is not None for w in slots._workers) < 3:
            time.sleep(0.05)
        assert slots.alive() == 3
    finally:
        slots.stop(10)
    assert slots.alive() == 0
    context.get()[1].close()


def test_the_workers_redis_pool_fits_every_slot(settings):
    small = settings.replace(redis={"max_connections": 8}, webhooks={"concurrency": 32})
    assert worker_mod.pool_settings(small).redis.max_connections >= 4 * 32
    assert worker_mod.pool_settings(settings) is settings  # the defaults already fit
