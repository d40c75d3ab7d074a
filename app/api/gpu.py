"""The ``/gpu`` endpoints: allocate, release, renew, cancel, inspect, analyse.

Every view is thin: read and validate the body, call the engine (one Lua script per state
change), render. Ownership is checked by the engine, which gets the caller's principal and
whether it is an admin.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from flask import current_app, jsonify, request, url_for
from flask_smorest import Blueprint
from redis.exceptions import RedisError

from app import auth, longpoll, schemas, waiting
from app.api import body, render
from app.api.docs import doc, doc_once
from app.engine import LIVE_STATUSES, valid_cursor, workload_data_json
from app.errors import BadRequest, NotFound, OrchestratorError, Unavailable, ValidationFailed
from app.flask_context import current_request, this_app
from app.request_rules import (
    IDEMPOTENCY_KEY_RULE,
    MAX_IDEMPOTENCY_KEY,
    CheckedRequest,
    check_fields,
    idempotency_key_ok,
)
from app.settings import tenant_key
from app.webhook_policy import Busy, Refused, asker_of

log = logging.getLogger("gpu_orchestrator.api")

blp = Blueprint(
    "gpu", __name__, url_prefix="/gpu", description="Allocate, release, renew and inspect GPUs."
)

IDEMPOTENCY_HEADER = "Idempotency-Key"

# Schema instances are built once: building one deep-copies its fields (a measurable cost per
# request), and loading with a shared instance is thread-safe (marshmallow 4 has no context).
# The two bodies of the allocate/release loop load through body.FastLoad (same checks, errors
# from marshmallow itself).
_ALLOCATE_BODY = body.FastLoad(schemas.AllocateRequestSchema())
_RELEASE_BODY = body.FastLoad(schemas.ReleaseRequestSchema())
_WORKLOAD_BODY = schemas.WorkloadRequestSchema()
_RENEW_BODY = schemas.RenewRequestSchema()
#: The allocate body's own fields: a hint spelled like one of them is told to move up.
_TOP_LEVEL = tuple(_ALLOCATE_BODY.fields)

_ERRORS = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    413: "REQUEST_ENTITY_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "UNPROCESSABLE_ENTITY",
    429: "TOO_MANY_REQUESTS",
    503: "SERVICE_UNAVAILABLE",
}
_ID_PARAM = {
    "in": "path",
    "name": "request_id",
    "required": True,
    "schema": {"type": "string", "pattern": schemas.ID_RE},
}
_ALLOC_PARAM = dict(_ID_PARAM, name="allocation_id")
_WAIT_PARAM = {
    "in": "query",
    "name": "wait",
    "required": False,
    "schema": {"type": "number", "minimum": 0, "maximum": longpoll.MAX_WAIT, "default": 0},
    "description": "Long-poll: hold the call up to this many seconds while the "
    "status stays {}; answer as soon as it changes. When the time is "
    "up (or the server needs the thread back) the answer is the "
    "current record, unchanged.",
}
_IDEM_PARAM = {
    "in": "header",
    "name": IDEMPOTENCY_HEADER,
    "required": False,
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_IDEMPOTENCY_KEY,
        "pattern": r"^[\x21-\x7e]+$",
    },
    "description": "Makes retries safe: the same key within 24 h returns the "
    "original request instead of creating a new one.",
}


def errors_doc(*codes: int) -> dict:
    """The doc entry of the error responses a route can give (all share the one error
    schema): one ``doc`` entry instead of one ``alt_response`` per code, each of which adds a
    wrapper that runs on every request."""
    return {"responses": {str(code): _ERRORS[code] for code in codes}}


def ok_doc(status: int, schema, description: str, headers: dict | None = None) -> dict:
    """The doc entry of a success response."""
    resp = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        resp["headers"] = headers
    return {"responses": {str(status): resp}}


def errors(*codes: int):
    """Document the error responses a route can give (see :func:`errors_doc`)."""
    return doc(**errors_doc(*codes))


def ok(status: int, schema, description: str, headers: dict | None = None):
    """Document a success response."""
    return doc(**ok_doc(status, schema, description, headers))


def _engine():
    return this_app().extensions["gpu_engine"]


def _owner_kwargs() -> dict[str, Any]:
    return {"principal": auth.current_principal(), "admin": auth.current_is_admin()}


def _dispatch_webhooks() -> None:
    """Have fresh webhook notifications handed to RQ (in the background; see app.dispatcher)."""
    dispatcher = this_app().extensions.get("gpu_dispatcher")
    if dispatcher is not None:
        dispatcher.kick()


def _workload_data_json(data: dict[str, Any]) -> str:
    """workload_data as the engine stores it; 413 past ``server.max_workload_data_bytes``,
    before anything reads it."""
    return workload_data_json(
        data.get("workload_data"),
        _engine().settings.server.max_workload_data_bytes,
    )


#: Top-level body fields that override the analysis outright.
OVERRIDES = ("required_gpus", "min_memory_mb", "gpu_model", "nodes")


def _analyze(data: dict[str, Any], data_json: str | None = None) -> dict[str, Any]:
    """The workload analyser's requirements for a validated allocate/workload body, with the
    body's own ``required_gpus``, ``min_memory_mb``, ``gpu_model`` and ``nodes`` on top;
    ``data_json``: the body's workload_data as JSON, which lets the analyser reuse an analysis
    of the same workload (WorkloadAnalyzer.analyze's memo_key)."""
    analyzer = this_app().extensions["gpu_analyzer"]
    analysis = analyzer.analyze(
        data["workload_type"],
        data["workload_data"],
        service_name=data.get("service_name"),
        top_level=_TOP_LEVEL,
        memo_key=data_json,
    )
    given = {key: data[key] for key in OVERRIDES if data.get(key) is not None}
    if not given:
        return analysis
    analysis = dict(analysis, **given)
    if (
        "min_memory_mb" in given
        and analysis.get("max_memory_mb")
        and analysis["max_memory_mb"] < given["min_memory_mb"]
    ):
        analysis["max_memory_mb"] = None  # the analysis' ceiling is below what was asked
    note = ", ".join(f"{key}={given[key]!r}" for key in OVERRIDES if key in given)
    analysis["reasoning"] = "; ".join(
        x for x in (analysis.get("reasoning"), f"set by the request: {note}") if x
    )
    return analysis


#: Longest a name lookup for a webhook URL may hold a request at allocate.
WEBHOOK_LOOKUP_TIMEOUT = 2.0
#: Longest it may hold the worker's last idle thread (a name in a DNS cache answers in
#: milliseconds): longer, and a client sending names in a zone that never answers held every
#: thread (GET /gpu/status of others went from 3-8 ms to 0.06-1.95 s with 10 such clients).
LAST_THREAD_LOOKUP_TIMEOUT = 0.25


def _check_webhook_url(url: str | None, service_name: str | None) -> None:
    """422 naming ``webhook_url`` when the URL policy refuses it, before anything is stored
    (delivery checks it again against the address it connects to). Its name lookup counts
    against the caller's share of the running lookups (app.webhook_policy.Lookups), and
    waits on its thread as a long-poll does (app.longpoll.Holds): only while another thread
    of the worker is idle, letting go when a request needs the last one; on the last idle
    thread itself it waits LAST_THREAD_LOOKUP_TIMEOUT at most. A wait cut short so is a 503
    (try again), not a 422: nothing was learnt about the URL."""
    if not url:
        return
    extensions = this_app().extensions
    settings = extensions["gpu_settings"]
    poll = extensions.get("gpu_longpoll")
    w = longpoll.Waiter("webhook-lookup")
    held = poll is not None and poll.holds.hold(w)
    try:
        extensions["gpu_webhook_policy"].resolve(
            url,
            timeout=min(WEBHOOK_LOOKUP_TIMEOUT, settings.webhooks.timeout),
            asker=asker_of(auth.current_principal(), service_name),
            abort=w.event if held else None,
            patience=LAST_THREAD_LOOKUP_TIMEOUT if poll is not None and not held else None,
        )
    except Refused as exc:
        if isinstance(exc, Busy):
            # the server cut the wait short for its other requests: the URL may be fine
            raise Unavailable(
                f"webhook_url not checked: {exc}; the API is busy, try again",
                details={"webhook_url": [str(exc)]},
            ) from None
        raise ValidationFailed(
            f"webhook_url refused: {exc}", details={"webhook_url": [str(exc)]}
        ) from None
    finally:
        if held:
            poll.holds.unhold(w)


def _viewer() -> dict[str, Any]:
    """Who is reading: records of other owners are shown without their private fields."""
    return {"principal": auth.current_principal(), "admin": auth.current_is_admin()}


#: The header's WSGI environ key: what ``request.headers.get`` reads, without the KeyError it
#: raises and catches inside for a header that is absent (most requests).
_IDEMPOTENCY_ENVIRON = "HTTP_" + IDEMPOTENCY_HEADER.upper().replace("-", "_")


def _idempotency_key() -> str | None:
    key = current_request().environ.get(_IDEMPOTENCY_ENVIRON)
    if key is None:
        return None
    if not idempotency_key_ok(key):
        raise BadRequest(
            f"{IDEMPOTENCY_HEADER} must be {IDEMPOTENCY_KEY_RULE}",
            details={IDEMPOTENCY_HEADER: ["invalid"]},
        )
    return key


def engine_request(
    data: dict[str, Any], analysis: dict[str, Any], principal: str | None, data_json: str
) -> CheckedRequest:
    """Merge the validated body and the workload analysis into the engine's request, which
    the engine takes without checking it again (app.request_rules); ``data_json``: the
    body's workload_data as JSON (see :func:`_workload_data_json`)."""
    req = CheckedRequest(data_json)
    req |= {
        "service_name": data["service_name"],
        "workload_type": analysis.get("workload_type", data["workload_type"]),
        "workload_data": data["workload_data"],
        "required_gpus": analysis["required_gpus"],
        "min_memory_mb": analysis["min_memory_mb"],
        "max_memory_mb": analysis.get("max_memory_mb"),
        "max_utilization": analysis.get("max_utilization"),
        "priority": data.get("priority", analysis["priority"]),
        "estimated_duration_seconds": analysis.get("estimated_duration_seconds"),
    }
    deps = list(data.get("depends_on") or [])
    more = [dep for dep in analysis.get("depends_on") or [] if dep not in deps]
    if more:  # the workflow's: each list was checked, the two together were not
        deps = list(dict.fromkeys(deps + more))
        check_fields({"depends_on": deps})
    if deps:
        req["depends_on"] = deps
    for key in ("gpu_model", "nodes"):
        if analysis.get(key):
            req[key] = analysis[key]
    for key in (
        "ttl_seconds",
        "sharing",
        "preferred_gpus",
        "webhook_url",
        "webhook_events",
        "depends_on_mode",
    ):
        if data.get(key) is not None:
            req[key] = data[key]
    if analysis.get("workflow_id"):
        req["workflow_id"] = analysis["workflow_id"]
    if principal is not None:
        req["owner"] = principal
    return req


def _explain(records: list[dict[str, Any]]) -> None:
    """Set ``reason`` and ``eta`` on the queued ones among ``records`` (app.waiting)."""
    why = waiting.annotate(_engine(), records)
    for rec in records:
        if rec.get("status") == "queued":
            w = why.get(rec.get("id")) or {}
            rec["reason"], rec["eta"] = w.get("reason"), w.get("eta")


def _allocation_response(rec: dict[str, Any], warnings: list[str]):
    if rec.get("status") == "queued":
        try:
            _explain([rec])
        except (RedisError, OrchestratorError):
            # the request is queued whatever happens here: answer without the estimate
            log.warning("no wait estimate for %s", rec.get("id"), exc_info=True)
            rec["reason"], rec["eta"] = None, None
        resp = render.json_response(render.queued(rec, warnings), 202)
        resp.headers["Location"] = url_for("gpu.request_status", request_id=rec["id"])
    else:
        out = render.allocation(rec, **_viewer())
        if rec.get("replayed"):
            out["replayed"] = True
        out["warnings"] = warnings
        resp = render.json_response(out)
    if rec.get("replayed"):
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


@blp.route("/allocate", methods=["POST"])
@doc_once(  # one doc: each adds a wrapper per request, and this route is hot
    {
        "parameters": [_IDEM_PARAM],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schemas.AllocateRequestSchema}},
        },
    },
    ok_doc(200, schemas.GrantedSchema, "Granted now: the allocation."),
    ok_doc(
        202,
        schemas.QueuedSchema,
        "Queued; poll the Location or wait for the webhook.",
        headers={
            "Location": {"schema": {"type": "string"}, "description": "The request's status URL."}
        },
    ),
    errors_doc(400, 401, 409, 413, 415, 422, 429, 503),
)
def allocate():
    """Ask for GPUs: granted at once (200) or queued (202).

    The workload is analysed into requirements first; top-level ``required_gpus``,
    ``min_memory_mb``, ``gpu_model``, ``nodes``, ``priority``, ``ttl_seconds``, ``sharing``,
    ``depends_on`` and ``preferred_gpus`` apply on top of the analysis.
    """
    key = _idempotency_key()
    data = body.load(_ALLOCATE_BODY)
    data_json = _workload_data_json(data)
    _check_webhook_url(data.get("webhook_url"), data.get("service_name"))
    analysis = _analyze(data, data_json)
    principal = auth.current_principal()
    req = engine_request(data, analysis, principal, data_json)
    rec = _engine().allocate(
        req,
        idempotency_key=key,
        request_hash=None if key is None else _client_hash(data, principal),
    )
    _dispatch_webhooks()
    return _allocation_response(rec, analysis.get("warnings") or [])


def _client_hash(data: dict[str, Any], principal: str | None) -> str:
    """Fingerprint of what the client sent (validated, defaults filled in), not of the analysis:
    a retry whose analysis changed (the advisor answered otherwise, or timed out and the rules
    decided) is the same request and replays; any difference in the body is a 409."""
    text = json.dumps({"body": data, "principal": principal}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@blp.route("/release", methods=["POST"])
@doc_once(
    {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schemas.ReleaseRequestSchema}},
        }
    },
    ok_doc(200, schemas.ReleasedSchema, "Released."),
    errors_doc(400, 401, 403, 404, 413, 415, 422, 503),
)
def release():
    """Release one allocation by id, or every allocation of a service that the caller owns."""
    data = body.load(_RELEASE_BODY)
    engine = _engine()
    if data.get("allocation_id"):
        rec = engine.release(data["allocation_id"], **_owner_kwargs())
        _dispatch_webhooks()
        return render.json_response(
            {
                "status": "released",
                "allocation_id": data["allocation_id"],
                "service_name": rec.get("service_name") if isinstance(rec, dict) else None,
                "released": [data["allocation_id"]],
                "count": 1,
            }
        )
    if data.get("service_name"):
        recs = engine.release_by_service(data["service_name"], **_owner_kwargs())
        _dispatch_webhooks()
        ids = [r["id"] for r in recs or []]
        if not ids:
            raise NotFound(
                f"service {data['service_name']} holds no allocations"
                + (" that you own" if auth.current_principal() else ""),
                details={"service_name": data["service_name"]},
            )
        return jsonify(
            status="released", service_name=data["service_name"], released=ids, count=len(ids)
        )
    raise BadRequest(
        "give allocation_id or service_name",
        details={"allocation_id": ["one of allocation_id, service_name is required"]},
    )


@blp.route("/status", methods=["GET"])
@ok(200, schemas.GpuStatusSchema, "Every GPU with telemetry and allocation state.")
@errors(401, 503)
def status():
    """Every GPU, read in one atomic snapshot."""
    snap = _engine().snapshot(requests=False)
    return jsonify(gpus=[render.gpu(g) for g in snap.get("gpus", [])])


LIST_LIMIT = 100
LIST_MAX_LIMIT = 1000
_LIST_PARAMS = [
    {
        "in": "query",
        "name": "limit",
        "required": False,
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": LIST_MAX_LIMIT,
            "default": LIST_LIMIT,
        },
        "description": "Most requests (allocations, then queued) on this page.",
    },
    {
        "in": "query",
        "name": "after",
        "required": False,
        "schema": {"type": "string"},
        "description": "The previous page's `next` value; omitted: the first page.",
    },
]


def _list_args() -> tuple[int, str | None]:
    raw = request.args.get("limit")
    limit = LIST_LIMIT
    if raw is not None:
        # ASCII digits only: str.isdigit() is also true for "²", which int() refuses
        if (
            not (raw.isascii() and raw.isdigit())
            or len(raw) > 6
            or not 1 <= int(raw) <= LIST_MAX_LIMIT
        ):
            raise ValidationFailed(
                f"limit: an integer in 1..{LIST_MAX_LIMIT}",
                details={"limit": [f"an integer in 1..{LIST_MAX_LIMIT}"]},
            )
        limit = int(raw)
    after = request.args.get("after") or None
    if after is not None and not valid_cursor(after):
        raise ValidationFailed(
            "after: the next value of a previous page",
            details={"after": ["the next value of a previous page"]},
        )
    return limit, after


@blp.route("/list", methods=["GET"])
@doc(parameters=_LIST_PARAMS)
@ok(
    200,
    schemas.GpuListSchema,
    "GPUs, nodes and one page of the live allocations and the queue, one consistent snapshot.",
)
@errors(401, 422, 503)
def list_all():
    """GPUs and nodes, then one page of requests: live allocations (by lease end), then the
    queue (by rank), as compact records (no ``workload_data``; read one request for that).
    ``next`` is the ``after`` of the following page, null on the last one."""
    limit, after = _list_args()
    snap = _engine().snapshot(limit=limit, after=after)
    _explain(snap.get("queue", []))
    viewer = _viewer()
    return jsonify(
        gpus=[render.gpu(g) for g in snap.get("gpus", [])],
        allocations=[render.allocation(a, **viewer) for a in snap.get("allocations", [])],
        queue=[render.allocation(q, **viewer) for q in snap.get("queue", [])],
        nodes=list(snap.get("nodes", [])),
        allocations_total=snap["allocations_total"],
        queue_depth=snap["queue_depth"],
        limit=limit,
        next=snap["next"],
    )


@blp.route("/tenants", methods=["GET"])
@ok(
    200,
    schemas.TenantListSchema,
    "Each tenant's quota, the GPUs it holds, its queued requests, decayed usage and fair share.",
)
@errors(401, 503)
def tenants():
    """Tenants (who pays for the GPUs: tenants.key). Admins, and everyone with auth off, see
    every tenant; others see their own: the one named after their principal
    (``tenants.key: principal``), or the services of their live and queued requests
    (``tenants.key: service_name``)."""
    engine = _engine()
    settings = engine.settings
    key = tenant_key(settings)
    principal = auth.current_principal()
    if auth.current_is_admin():
        rows = engine.tenants()
    else:
        mine = _own_tenants(engine, key, principal)
        rows = [r for r in engine.tenants(include=tuple(sorted(mine))) if r["tenant"] in mine]
    return jsonify(tenants=rows, key=key, fair_share_enabled=settings.tenants.fair_share)


def _own_tenants(engine, key: str, principal: str | None) -> set[str]:
    """The tenants a principal's requests count against."""
    if key == "principal":
        return {principal} if principal else set()
    # from the live allocations and the principal's own queued requests: never the whole queue
    return engine.own_tenants(principal or "")


@blp.route("/workload", methods=["POST"])
@doc(
    requestBody={
        "required": True,
        "content": {"application/json": {"schema": schemas.WorkloadRequestSchema}},
    }
)
@ok(200, schemas.RequirementsSchema, "The requirements /gpu/allocate would use.")
@errors(400, 401, 413, 415, 422, 503)
def workload():
    """Analyse a workload without side effects."""
    data = body.load(_WORKLOAD_BODY)
    _workload_data_json(data)  # the 413 of /gpu/allocate
    analysis = _analyze(data)
    return jsonify(render.requirements(analysis))


def _require_id(value: str, noun: str = "request") -> None:
    """404 for a path id that cannot exist (wrong shape), before asking Redis."""
    if not schemas.ID_MATCH(value):
        raise NotFound(f"no {noun} {value!r}", details={"id": value})


def _get_or_404(request_id: str, waits: frozenset = frozenset()) -> dict[str, Any]:
    """The record; with ``?wait=`` held while its status is one of ``waits`` (app.longpoll)."""
    timeout = longpoll.wait_seconds(request.args.get("wait"))
    _require_id(request_id)
    engine = _engine()
    if not timeout:
        return engine.get(request_id)
    return current_app.extensions["gpu_longpoll"].read(
        request_id,
        lambda: engine.get(request_id),
        waits,
        timeout,
        watch=lambda: engine.watch(request_id),
    )


@blp.route("/requests/<request_id>", methods=["GET"])
@doc(
    parameters=[
        _ID_PARAM,
        dict(_WAIT_PARAM, description=_WAIT_PARAM["description"].format("queued")),
    ]
)
@ok(
    200,
    schemas.RequestStatusSchema,
    "The request: status, queue position, allocation once granted.",
)
@errors(401, 404, 422, 503)
def request_status(request_id: str):
    """A request: its status, queue position, and its allocation once granted.

    ``?wait=N`` (0-60 s) waits for a queued request to leave the queue instead of polling."""
    rec = _get_or_404(request_id, longpoll.REQUEST_WAITS)
    _explain([rec])
    return jsonify(render.request_status(rec, **_viewer()))


@blp.route("/requests/<request_id>", methods=["DELETE"])
@doc(parameters=[_ID_PARAM])
@ok(200, schemas.RequestStatusSchema, "Cancelled: the request, as GET shows it.")
@errors(401, 403, 404, 409, 503)
def cancel_request(request_id: str):
    """Cancel a queued request."""
    _require_id(request_id)
    rec = _engine().cancel(request_id, **_owner_kwargs())
    _dispatch_webhooks()
    return jsonify(render.request_status(rec, **_viewer()))


@blp.route("/allocations/<allocation_id>", methods=["GET"])
@doc(
    parameters=[
        _ALLOC_PARAM,
        dict(
            _WAIT_PARAM,
            description=_WAIT_PARAM["description"].format("live (allocated, preempting)"),
        ),
    ]
)
@ok(200, schemas.AllocationSchema, "The allocation.")
@errors(401, 404, 422, 503)
def get_allocation(allocation_id: str):
    """One allocation (also recently released or expired ones).

    ``?wait=N`` (0-60 s) waits for a live allocation to change state (preempting, released,
    expired)."""
    rec = _get_or_404(allocation_id, longpoll.ALLOCATION_WAITS)
    if not rec.get("allocated_at"):
        raise NotFound(
            f"{allocation_id} has not been granted (status {rec.get('status')}); "
            f"see /gpu/requests/{allocation_id}",
            details={"id": allocation_id},
        )
    if rec.get("status") in LIVE_STATUSES:
        rec["gpu_health"] = _engine().gpu_health(rec)
    return jsonify(render.allocation(rec, **_viewer()))


@blp.route("/allocations/<allocation_id>/renew", methods=["POST"])
@doc(
    parameters=[_ALLOC_PARAM],
    requestBody={
        "required": False,
        "content": {"application/json": {"schema": schemas.RenewRequestSchema}},
    },
)
@ok(200, schemas.AllocationSchema, "Renewed: the allocation with its new expires_at.")
@errors(400, 401, 403, 404, 409, 413, 415, 422, 503)
def renew(allocation_id: str):
    """Extend a live allocation's lease by ``ttl_seconds`` (default: its own TTL) from now."""
    data = body.load(_RENEW_BODY)
    _require_id(allocation_id, "allocation")
    rec = _engine().renew(allocation_id, ttl_seconds=data.get("ttl_seconds"), **_owner_kwargs())
    return jsonify(render.allocation(rec, **_viewer()))
