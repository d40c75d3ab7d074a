"""The API's background webhook dispatcher: kicks are cheap, coalesce, and never fail a request."""
from __future__ import annotations

import logging
import threading

from app.dispatcher import OutboxDispatcher
from tests.api_support import clock, make_app  # noqa: F401 (fixtures)


def test_a_kick_runs_a_dispatch_pass_in_the_background():
    calls = []
    d = OutboxDispatcher("rq", "settings", dispatch=lambda r, s: calls.append((r, s)) or 0)
    d.kick()
    assert d.wait_idle(5)
    assert calls == [("rq", "settings")]


def test_kicks_during_a_pass_collapse_into_one_more_pass():
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_dispatch(r, s):
        calls.append(1)
        if len(calls) == 1:
            started.set()
            release.wait(5)
        return 0

    d = OutboxDispatcher(None, None, dispatch=slow_dispatch)
    d.kick()
    assert started.wait(5)
    for _ in range(50):
        d.kick()
    release.set()
    assert d.wait_idle(5)
    assert len(calls) == 2


def test_a_failing_pass_is_logged_and_the_next_kick_still_works(caplog):
    calls = []

    def flaky(r, s):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("redis went away")
        return 1

    d = OutboxDispatcher(None, None, dispatch=flaky)
    with caplog.at_level(logging.WARNING, logger="gpu_orchestrator.dispatcher"):
        d.kick()
        assert d.wait_idle(5)
    assert "webhook dispatch failed" in caplog.text
    d.kick()
    assert d.wait_idle(5)
    assert len(calls) == 2


def test_api_calls_hand_webhooks_to_rq(make_app):
    """End to end: cancelling a queued request that asked for ``cancelled`` notifications puts a
    webhook in the outbox; the API's dispatcher turns it into an RQ job by itself."""
    from workers import outbox, queues

    app = make_app()
    client = app.test_client()
    client.post("/gpu/allocate", json={"service_name": "big",
                                       "workload_data": {"required_gpus": 8}})
    rid = client.post("/gpu/allocate", json={
        "service_name": "waiter", "webhook_url": "http://127.0.0.1:9/hook",
        "webhook_events": ["cancelled"]}).get_json()["request_id"]
    assert client.delete(f"/gpu/requests/{rid}").status_code == 200
    assert app.extensions["gpu_dispatcher"].wait_idle(5)
    rq_redis = app.extensions["gpu_rq_redis"]
    settings = app.extensions["gpu_settings"]
    assert outbox.pending(rq_redis, settings) == 0
    jobs = queues.queue(rq_redis, settings, queues.WEBHOOKS).jobs
    assert [j.args[0]["request_id"] for j in jobs] == [rid]
