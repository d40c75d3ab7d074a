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
