"""The API's background webhook dispatcher: kicks are cheap, coalesce, and never fail a request."""

from __future__ import annotations

import logging
import threading
import time

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
    from app import outbox, queues

    app = make_app()
    client = app.test_client()
    client.post(
        "/gpu/allocate", json={"service_name": "big", "workload_data": {"required_gpus": 8}}
    )
    rid = client.post(
        "/gpu/allocate",
        json={
            "service_name": "waiter",
            "webhook_url": "http://127.0.0.1:9/hook",
            "webhook_events": ["cancelled"],
        },
    ).get_json()["request_id"]
    assert client.delete(f"/gpu/requests/{rid}").status_code == 200
    assert app.extensions["gpu_dispatcher"].wait_idle(5)
    rq_redis = app.extensions["gpu_rq_redis"]
    settings = app.extensions["gpu_settings"]
    assert outbox.pending(rq_redis, settings) == 0
    jobs = queues.queue(rq_redis, settings, queues.WEBHOOKS).jobs
    assert [j.args[0]["request_id"] for j in jobs] == [rid]


# --------------------------------------------------------------------------- watch mode (the API's)


def _watcher(settings, dispatch, **kwargs):
    from app.redis_client import connect

    rq_redis = connect(settings.redis.url, settings, decode=False)
    return OutboxDispatcher(rq_redis, settings, dispatch=dispatch, watch=True, **kwargs), rq_redis


def _draining(calls):
    """A dispatch pass that records itself and empties the outbox (as the real one does)."""

    def dispatch(r, s):
        from app.keys import Keys

        calls.append(r.llen(Keys(s.redis.prefix).webhook_outbox()))
        r.delete(Keys(s.redis.prefix).webhook_outbox())
        return calls[-1]

    return dispatch


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_watching_kicks_run_no_pass_while_the_outbox_is_empty(settings):
    """Requests without webhooks (the common case) cost the dispatcher nothing: no pass, no
    Redis round trip per kick."""
    calls = []
    d, rq_redis = _watcher(settings, _draining(calls))
    for _ in range(200):
        d.kick()
    assert d.wait_idle(5)
    time.sleep(0.2)
    assert calls == []
    # ... and an entry, whoever wrote it, is dispatched without a kick of its own.
    from app.keys import Keys

    rq_redis.rpush(Keys(settings.redis.prefix).webhook_outbox(), b"{}")
    _wait_for(lambda: calls == [1])
    assert d.wait_idle(5)


def test_a_watcher_stops_when_nothing_kicks_and_the_next_kick_restarts_it(settings):
    from app.keys import Keys

    calls = []
    d, rq_redis = _watcher(settings, _draining(calls), idle_exit=0.05)
    d.kick()
    first = d._thread
    assert first is not None
    first.join(5)  # stops after its next quiet wait in Redis (1 s at most)
    assert not first.is_alive() and d._thread is None
    rq_redis.rpush(Keys(settings.redis.prefix).webhook_outbox(), b"{}")
    time.sleep(0.1)
    assert calls == []  # nobody is watching
    d.kick()
    _wait_for(lambda: calls == [1])
    assert d._thread is not first


def test_a_watcher_stops_when_redis_goes_away_and_a_kick_restarts_it(tmp_path, monkeypatch):
    """Redis down: the watcher ends (it does not outlive its app retrying); once Redis is back,
    the next kick (a request that got through) starts a new one."""
    from app import dispatcher as dispatcher_mod
    from app import settings as settings_mod
    from app.keys import Keys
    from tests.conftest import RedisServer

    monkeypatch.setattr(dispatcher_mod, "RETRY_AFTER", 0.3)
    server = RedisServer(tmp_path).start()
    try:
        settings = settings_mod.defaults().replace(redis={"url": server.url, "socket_timeout": 0.5})
        calls = []
        d, rq_redis = _watcher(settings, _draining(calls))
        d.kick()
        first = d._thread
        time.sleep(0.1)
        server.stop()
        first.join(5)
        assert not first.is_alive() and d._thread is None
        server.start()  # same port
        rq_redis.rpush(Keys(settings.redis.prefix).webhook_outbox(), b"{}")
        _wait_for(lambda: d.kick() or calls == [1])  # requests keep kicking
    finally:
        server.stop()


def test_the_api_dispatches_entries_other_processes_write(make_app):
    """Once the API has served a request, an outbox entry written elsewhere (the scheduler,
    another replica) becomes an RQ job without another request."""
    import json

    from app import outbox, queues
    from app.keys import Keys

    app = make_app()
    client = app.test_client()
    assert client.post("/gpu/allocate", json={"service_name": "svc"}).status_code == 200
    dispatcher = app.extensions["gpu_dispatcher"]
    assert dispatcher.wait_idle(5)
    rq_redis = app.extensions["gpu_rq_redis"]
    settings = app.extensions["gpu_settings"]
    entry = {"event_id": "ev-elsewhere", "event": "released", "request_id": "svc-1", "ts": 1}
    rq_redis.rpush(Keys(settings.redis.prefix).webhook_outbox(), json.dumps(entry))
    _wait_for(lambda: outbox.pending(rq_redis, settings) == 0)
    jobs = queues.queue(rq_redis, settings, queues.WEBHOOKS).jobs
    assert [j.id for j in jobs] == [outbox.job_id_for("ev-elsewhere")]
