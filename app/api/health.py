"""Liveness and readiness probes; public by default (``auth.public_paths``)."""

from __future__ import annotations

from flask import current_app, jsonify
from flask_smorest import Blueprint

from app import schemas
from app.api.docs import doc
from app.errors import Unavailable
from app.redis_client import version_problem

blp = Blueprint("health", __name__, description="Probes for load balancers and orchestrators.")


@blp.route("/healthz", methods=["GET"])
@doc(security=[])
@doc(
    responses={
        "200": {
            "description": "Alive.",
            "content": {"application/json": {"schema": schemas.HealthSchema}},
        }
    }
)
def healthz():
    """Liveness: the process answers. Touches nothing else, so it stays cheap."""
    return jsonify(status="ok")


@blp.route("/readyz", methods=["GET"])
@doc(security=[])
@doc(
    responses={
        "200": {
            "description": "Ready.",
            "content": {"application/json": {"schema": schemas.HealthSchema}},
        },
        "503": "SERVICE_UNAVAILABLE",
    }
)
def readyz():
    """Readiness: 200 only when Redis answers a PING and can run the engine (Redis >= 7.0 or
    Valkey >= 7.2, for Redis Functions); 503 naming the version found otherwise."""
    redis = current_app.extensions.get("gpu_redis")
    if redis is None:
        raise Unavailable("no Redis configured")
    redis.ping()  # ConnectionError/TimeoutError -> 503 through the app-wide handler
    if not current_app.extensions.get("gpu_redis_version_ok"):
        problem = version_problem(redis)  # asked until it passes once (a server may upgrade)
        if problem:
            raise Unavailable(problem)
        current_app.extensions["gpu_redis_version_ok"] = True
    return jsonify(status="ready")


@blp.route("/metrics", methods=["GET"])
@doc(security=[])
@doc(
    responses={
        "200": {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
)
def metrics():
    """Prometheus metrics: this deployment's HTTP metrics plus fleet and queue state from Redis."""
    return current_app.extensions["gpu_metrics_view"]()
