"""gpu-orchestrator: the Flask application factory.

``create_app(settings, redis=...)`` wires every part together explicitly; nothing connects to
Redis or reads config as a side effect of an import. The engine, the workload analyser and the
Redis clients are built once per app (one per gunicorn worker), never per request.

Importing the package imports nothing else (no Flask, no Redis client): ``app.client`` lives
here and must import with only ``requests`` installed.

Order of the request hooks matters and is fixed here: request id first (so every later failure,
including a 401, carries it), then metrics timing, then auth.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from app import settings as settings_mod

log = logging.getLogger("gpu_orchestrator.api")


def create_app(
    settings: settings_mod.Settings | None = None,
    *,
    redis: Any = None,
    redis_url: str | None = None,
    clock=None,
) -> Flask:
    """Build the API. Tests pass ``settings`` and a ``redis`` client instead of patching."""
    from app import api as api_mod
    from app import auth, http_errors, longpoll, metrics, request_ids
    from app import settings as settings_mod
    from app.dispatcher import OutboxDispatcher
    from app.engine import Engine
    from app.flask_app import OrchestratorFlask
    from app.redis_client import connect
    from app.webhook_policy import Policy
    from app.workload import WorkloadAnalyzer

    settings = settings or settings_mod.load()
    url = redis_url or settings.redis.url
    app = OrchestratorFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.json.sort_keys = False
    app.extensions["gpu_settings"] = settings

    if redis is None and url:
        redis = connect(url, settings)
    if redis is None:
        raise ValueError(
            "create_app needs Redis: pass redis= or redis_url=, or set redis.url "
            "(REDIS_URL); `gpu-orchestrator api` starts an embedded one for you"
        )
    app.extensions["gpu_redis"] = redis
    rq_redis = connect(url, settings, decode=False) if url else None
    app.extensions["gpu_rq_redis"] = rq_redis
    app.extensions["gpu_dispatcher"] = (
        OutboxDispatcher(rq_redis, settings, watch=True) if rq_redis else None
    )
    engine = Engine(redis, settings, clock=clock)
    app.extensions["gpu_engine"] = engine
    app.extensions["gpu_webhook_policy"] = Policy.from_settings(settings)
    app.extensions["gpu_analyzer"] = WorkloadAnalyzer.from_settings(
        settings, fleet_limits=_cached(engine.fleet_limits, FLEET_LIMITS_TTL)
    )

    longpoll.init_app(app, settings, redis)
    request_ids.init_app(app)
    metrics.init_app(app, engine)
    auth.init_app(app, settings, redis)
    api_mod.init_app(app, settings)
    http_errors.init_app(app)  # after flask-smorest's Api, so our handlers win
    _access_log(app)

    if settings.dashboard.enabled and url:
        from app import dashboard

        dashboard.init_app(app, settings, url)
    return app


#: Seconds the fleet's limits (largest node, largest GPU) are reused by the workload analyser.
#: They change only when nodes join or leave; the engine still checks every request itself.
FLEET_LIMITS_TTL = 2.0


def _cached(fn, ttl: float):
    """``fn()`` remembered for ``ttl`` seconds (thread-safe enough: a race costs one extra call)."""
    state: dict[str, Any] = {"at": float("-inf"), "value": None}

    def cached():
        now = time.monotonic()
        if now - state["at"] >= ttl:
            state["value"], state["at"] = fn(), now
        return state["value"]

    return cached


def _access_log(app: Flask) -> None:
    """One DEBUG line per request (method, path, status, ms, principal); never a key or a body.

    DEBUG, not INFO: a log write per request is a syscall per request, a real share of a cheap
    request's cost; ``--log-level DEBUG`` turns it on.
    """
    from flask import g, request

    access = logging.getLogger("gpu_orchestrator.access")

    @app.after_request
    def _line(response):
        if access.isEnabledFor(logging.DEBUG):
            t0 = g.get("_metrics_start")  # set by app.metrics, popped after this hook
            ms = (time.perf_counter() - t0) * 1000 if t0 is not None else 0.0
            access.debug(
                "%s %s %s %.1fms principal=%s",
                request.method,
                request.path,
                response.status_code,
                ms,
                g.get("principal") or "-",
            )
        return response
