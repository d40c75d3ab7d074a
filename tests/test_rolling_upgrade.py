"""A rolling upgrade: API replicas of two releases share one Redis, each loading its own version
of the engine's Functions library (docs/engine.md, Loading).

A call that finds another version loads its own and retries once. When the other release loads
its version again in between (its replicas are serving too), the call ran nothing, and the
client must hear "retry shortly": 503 with ``Retry-After`` and a JSON body that says why, never
a generic 500. Served over HTTP on 127.0.0.1 by werkzeug, against a real redis-server.
"""

from __future__ import annotations

import threading

import pytest
import redis as redis_lib
import requests
from werkzeug.serving import make_server

from app import create_app
from app.engine import LIBRARY, Engine, library_source


def _other_release() -> str:
    """The library as another release would load it: same functions, another version."""
    version, source = library_source()
    return source.replace(f"local VERSION = '{version}'", "local VERSION = 'other-release'")


@pytest.fixture
def api(settings, redis_url):
    app = create_app(settings.replace(dashboard={"enabled": False}), redis_url=redis_url)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def other_replica(redis_url):
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _report_gpu(base: str, settings) -> None:
    engine_redis = redis_lib.Redis.from_url(settings.redis.url, decode_responses=True)
    try:
        Engine(engine_redis, settings).report_node(
            "node-a", [{"index": 0, "uuid": "GPU-a0", "memory_total_mb": 81559}]
        )
    finally:
        engine_redis.close()


def _allocate(base: str) -> requests.Response:
    return requests.post(
        f"{base}/gpu/allocate", json={"service_name": "trainer", "required_gpus": 1}, timeout=10
    )


def test_a_library_swapped_back_during_the_call_answers_503_retry_after(
    api, settings, other_replica, monkeypatch
):
    _report_gpu(api, settings)
    other = _other_release()
    other_replica.execute_command("FUNCTION", "LOAD", "REPLACE", other)
    loads = []
    real_load = Engine.load_library

    def load_then_the_other_replica_loads_again(self):
        loads.append(1)
        version = real_load(self)
        # The other release's replica serves a call right then and puts its version back.
        other_replica.execute_command("FUNCTION", "LOAD", "REPLACE", other)
        return version

    monkeypatch.setattr(Engine, "load_library", load_then_the_other_replica_loads_again)
    resp = _allocate(api)

    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == "engine_upgrading"
    assert "another version" in error["message"] and "retry" in error["message"]
    assert error["details"]["server_version"] == "other-release"
    assert error["details"]["library_version"] == library_source()[0]
    assert error["details"]["function"] == "allocate"
    assert len(loads) == 1  # one load, one retry: a flapping library costs each call one load

    # Nothing was applied: the GPU is still free. Once the old replicas are gone, the same call
    # loads this release's library and succeeds.
    monkeypatch.undo()
    granted = _allocate(api)
    assert granted.status_code == 200, granted.text
    assert granted.json()["status"] == "allocated" and granted.json()["gpu_ids"] == [0]
    assert (
        other_replica.execute_command("FCALL_RO", f"{LIBRARY}_version", 0) == (library_source()[0])
    )


def test_a_function_the_other_release_lacks_answers_503_not_500(
    api, settings, other_replica, monkeypatch
):
    """The other release's library may not have this function at all (it was added in this
    release): Redis answers "Function not found" on the retry."""
    _report_gpu(api, settings)
    version, source = library_source()
    lacking = source.replace(f"function_name = '{LIBRARY}_allocate'", "function_name = 'x_old'")
    lacking = lacking.replace(f"local VERSION = '{version}'", "local VERSION = 'older-release'")
    assert lacking != source
    other_replica.execute_command("FUNCTION", "LOAD", "REPLACE", lacking)
    real_load = Engine.load_library

    def load_then_the_older_replica_loads_again(self):
        loaded = real_load(self)
        other_replica.execute_command("FUNCTION", "LOAD", "REPLACE", lacking)
        return loaded

    monkeypatch.setattr(Engine, "load_library", load_then_the_older_replica_loads_again)
    resp = _allocate(api)
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "1"
    assert resp.json()["error"]["code"] == "engine_upgrading"
    assert resp.json()["error"]["details"]["server_version"] is None
