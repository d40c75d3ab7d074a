"""gpu-orchestrator: the Flask application factory.

``create_app(settings, redis=...)`` wires every part together explicitly; nothing connects to
Redis or reads config as a side effect of an import.
"""
from __future__ import annotations

from typing import Any

from flask import Flask, jsonify

from app import settings as settings_mod


def create_app(settings: settings_mod.Settings | None = None, *, redis: Any = None,
               redis_url: str | None = None) -> Flask:
    """Build the API. Tests pass ``settings`` and a ``redis`` client instead of patching."""
    settings = settings or settings_mod.load()
    app = Flask(__name__)
    app.extensions["gpu_settings"] = settings
    if redis is None and (redis_url or settings.redis.url):
        from app.redis_client import connect
        redis = connect(redis_url or settings.redis.url, settings)
    app.extensions["gpu_redis"] = redis

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    return app
