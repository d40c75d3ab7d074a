"""Fixtures and helpers shared by the API test modules (imported, not a conftest)."""

from __future__ import annotations

import pytest

from app import create_app
from workers.simulated import fleet


class Clock:
    """A settable clock shared by the app's engine and the test."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def register_fleet(app, nodes=(("node-a", 8),)):
    engine = app.extensions["gpu_engine"]
    spec = {"nodes": [{"name": name, "count": count} for name, count in nodes]}
    for node, gpus in fleet(spec).items():
        engine.report_node(node, gpus)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_app(settings, redis_url, clock):
    def make(nodes=(("node-a", 8),), **overrides):
        overrides.setdefault("dashboard", {"enabled": False})
        app = create_app(settings.replace(**overrides), redis_url=redis_url, clock=clock)
        if nodes:
            register_fleet(app, nodes)
        return app

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def allocate(client, service="svc", **body):
    body.setdefault("service_name", service)
    return client.post("/gpu/allocate", json=body)


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    return err


def deliver_all(app) -> None:
    """Deliver what the engine queued the way production does: the API's dispatcher (and
    outbox.dispatch for what the reaper queued) hand the outbox to RQ; a worker in burst mode
    tries each job once."""
    import signal

    from app import outbox
    from workers import context
    from workers import worker as worker_mod

    settings = app.extensions["gpu_settings"]
    assert app.extensions["gpu_dispatcher"].wait_idle(5)
    outbox.dispatch(app.extensions["gpu_rq_redis"], settings)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker_mod.build(settings, settings.redis.url).work(burst=True)
    finally:
        context.configure(None, None, None)
        for s, handler in saved.items():
            signal.signal(s, handler)
