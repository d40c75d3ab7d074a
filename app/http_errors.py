"""One JSON error shape for every failure: ``{"error": {"code", "message", "details"}}``.

Registered app-wide (not per blueprint), so routing 404/405, body limits (413), Redis outages
and refusals (503) and unexpected exceptions all answer in the same shape; a client never sees
HTML or a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

from app.errors import OrchestratorError, Unavailable

log = logging.getLogger("gpu_orchestrator.api")

#: Stable codes for HTTP errors raised by Flask/Werkzeug themselves.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    503: "unavailable",
}

#: Seconds a client should wait before retrying when Redis is unreachable.
REDIS_RETRY_AFTER = 2


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = json.dumps({"error": {"code": code, "message": message, "details": details or {}}})
    resp = Response(body, status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def handle_domain(exc: OrchestratorError) -> Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(int(exc.retry_after))
    if exc.status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return error_response(exc.status, exc.code, exc.message, _jsonable(exc.details), headers)


def handle_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers = {}
    if status == 405:
        allow = dict(exc.get_headers()).get("Allow")
        if allow:
            headers["Allow"] = allow
    details = {}
    data = getattr(exc, "data", None)
    if isinstance(data, dict) and isinstance(data.get("messages"), dict):
        details = data["messages"]
    message = exc.description or exc.name
    if status == 413:
        message = "request body is larger than the configured limit"
    return error_response(
        status, HTTP_CODES.get(status, f"http_{status}"), message, details, headers
    )


def handle_redis(exc: redis.RedisError) -> Response:
    log.warning("Redis unavailable: %s", exc.__class__.__name__)
    return handle_domain(
        Unavailable(
            "the state store (Redis) is unreachable; retry shortly",
            details={"retry_after": REDIS_RETRY_AFTER},
        )
    )


#: Redis error replies that mean "not now" (it is up but refuses the command), by reply prefix:
#: out of memory, a replica (READONLY; MASTERDOWN: cut off from its primary), too few
#: replicas, a script running past busy-reply-threshold, a failed save, a cluster moving
#: slots. The client retries as after an outage; any other error reply is a bug (500).
REDIS_REFUSALS = ("OOM", "READONLY", "MASTERDOWN", "NOREPLICAS", "BUSY", "MISCONF", "TRYAGAIN")


def _refusal(exc: redis.ResponseError) -> str | None:
    """The refusal ``exc`` is, or None. redis-py raises some as their own classes with the
    prefix cut from the message (``status_code`` keeps it), others as a plain ResponseError
    whose message starts with it."""
    prefix = getattr(exc, "status_code", None) or str(exc).partition(" ")[0]
    return prefix if prefix in REDIS_REFUSALS else None


def handle_redis_reply(exc: redis.ResponseError) -> Response:
    refusal = _refusal(exc)
    if refusal is None:
        return handle_unexpected(exc)
    log.warning("Redis refused a command: %s", refusal)
    return handle_domain(
        Unavailable(
            "the state store (Redis) refuses commands for now; retry shortly",
            details={"retry_after": REDIS_RETRY_AFTER},
        )
    )


def handle_unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # Flask routes these here when no closer handler fits
        return handle_http(exc)
    log.exception("unhandled error")
    return error_response(500, "internal_error", "internal server error")


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    """Details are meant for JSON; anything exotic becomes its string form."""
    try:
        json.dumps(details)
        return details
    except (TypeError, ValueError):
        return {str(k): str(v) for k, v in details.items()}


def init_app(app: Flask) -> None:
    """Register the handlers; call after flask-smorest's Api so ours win."""
    app.register_error_handler(OrchestratorError, handle_domain)
    app.register_error_handler(HTTPException, handle_http)
    app.register_error_handler(redis.ConnectionError, handle_redis)
    app.register_error_handler(redis.TimeoutError, handle_redis)
    app.register_error_handler(redis.ResponseError, handle_redis_reply)
    app.register_error_handler(Exception, handle_unexpected)
