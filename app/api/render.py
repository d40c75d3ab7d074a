"""Engine records (epoch-float times, internal fields) -> the JSON clients see.

Only documented fields leave the service; times become RFC 3339 strings.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from flask import jsonify
from flask.json.provider import DefaultJSONProvider
from werkzeug.utils import get_content_type

from app import schemas
from app.flask_context import this_app
from app.timefmt import iso

TIME_FIELDS = (
    "submitted_at",
    "allocated_at",
    "expires_at",
    "released_at",
    "ended_at",
    "renewed_at",
    "updated_at",
    "eta",
    "preempt_at",
)
# JSON key order: a response schema's declaration order, where the field is declared (once);
# the ``allocation`` of a request's status follows schemas.GRANT_VIEW.
_ALLOCATION_FIELDS = tuple(schemas.AllocationSchema().fields)
_GPU_FIELDS = tuple(schemas.GpuSchema().fields)
_REQ_FIELDS = tuple(schemas.RequirementsSchema().fields)
_STATUS_FIELDS = tuple(k for k in schemas.RequestStatusSchema().fields if k != "allocation")
_GRANT_FIELDS = schemas.GRANT_VIEW


def json_response(obj: Any, status: int = 200):
    """``flask.jsonify(obj)`` with ``status``, byte for byte, from an encoder built once: jsonify
    builds a json.JSONEncoder per answer (json.dumps does, given any option). Debug mode (an
    indented answer) or another JSON provider: jsonify itself."""
    app = this_app()
    js = app.json
    if (
        type(js) is not DefaultJSONProvider
        or js.compact is False
        or (js.compact is None and app.debug)
    ):
        resp = jsonify(obj)
    else:
        encoder, content_type = _encoder(js.default, js.ensure_ascii, js.sort_keys, js.mimetype)
        # the status given at once and the content type worked out once: setting
        # ``status_code`` after, and ``mimetype=``, each cost ~4k instructions per answer
        return app.response_class(encoder.encode(obj) + "\n", status, content_type=content_type)
    resp.status_code = status
    return resp


@lru_cache(maxsize=8)
def _encoder(
    default, ensure_ascii: bool, sort_keys: bool, mimetype: str
) -> tuple[json.JSONEncoder, str]:
    """The encoder json.dumps would build for DefaultJSONProvider.response's options, and the
    Content-Type the response class makes of ``mimetype``."""
    encoder = json.JSONEncoder(
        default=default, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=(",", ":")
    )
    return encoder, get_content_type(mimetype, "utf-8")


def _int_list(values: Any) -> Any:
    if not isinstance(values, list):
        return None
    out = []
    for v in values:
        try:
            out.append(int(v))
        except (TypeError, ValueError, OverflowError):
            return None
    return out


#: Shown only to the request's owner and to admins: a webhook URL can carry a token in its path
#: or query, and workload_data is a team's own business.
PRIVATE_FIELDS = ("webhook_url", "workload_data")


def may_see_private(rec: dict[str, Any], principal: str | None, admin: bool) -> bool:
    """Owner or admin; with auth off (no principal) every caller is treated as the owner."""
    return admin or principal is None or rec.get("owner") in (None, "", principal)


def allocation(rec: dict[str, Any], *, principal: str | None, admin: bool) -> dict[str, Any]:
    """The client's view of a record; ``principal``/``admin`` say who reads it (required: the
    private fields depend on it)."""
    out = {k: rec[k] for k in _ALLOCATION_FIELDS if k in rec}
    if not may_see_private(rec, principal, admin):
        for key in PRIVATE_FIELDS:
            out.pop(key, None)
    for k in TIME_FIELDS:
        if k in out:
            out[k] = iso(out[k]) if out[k] not in (None, "", 0) else None
    out["request_id"] = rec.get("id")
    if "gpu_ids" in out:
        out["gpu_ids"] = _int_list(out["gpu_ids"])
        if out.get("gpu_ids") is not None and "cuda_visible_devices" not in rec:
            out["cuda_visible_devices"] = ",".join(str(i) for i in out["gpu_ids"])
    if "preferred_gpus" in out:
        out["preferred_gpus"] = _int_list(out["preferred_gpus"])
    if out.get("position") is not None and out.get("status") != "queued":
        out.pop("position")
    return out


def request_status(rec: dict[str, Any], *, principal: str | None, admin: bool) -> dict[str, Any]:
    """``/gpu/requests/<id>``: the request on top, its grant under ``allocation`` (null while
    it was never granted); private fields as :func:`allocation` decides for this reader."""
    full = allocation(rec, principal=principal, admin=admin)
    out = {k: full[k] for k in _STATUS_FIELDS if k in full}
    out["allocation"] = (
        {k: full[k] for k in _GRANT_FIELDS if k in full} if rec.get("allocated_at") else None
    )
    return out


def queued(rec: dict[str, Any], warnings: list[str] | None = None) -> dict[str, Any]:
    out = {
        "status": "queued",
        "request_id": rec["id"],
        "id": rec["id"],
        "position": rec.get("position"),
        "priority": rec.get("priority"),
        "submitted_at": iso(rec.get("submitted_at")),
        "reason": rec.get("reason"),
        "eta": iso(rec["eta"]) if rec.get("eta") is not None else None,
    }
    if rec.get("replayed"):
        out["replayed"] = True
    out["warnings"] = list(warnings or [])
    return out


def gpu(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec[k] for k in _GPU_FIELDS if k in rec}
    out["allocated"] = bool(rec.get("allocated_to")) or int(rec.get("shared_n") or 0) > 0
    if "updated_at" in out:
        out["updated_at"] = iso(out["updated_at"]) if out["updated_at"] else None
    return out


def requirements(analysis: dict[str, Any]) -> dict[str, Any]:
    return {k: analysis[k] for k in _REQ_FIELDS if k in analysis}


#: Event fields the console shows (the rest of an event stays in the stream).
_EVENT_FIELDS = (
    "id",
    "event",
    "request_id",
    "service_name",
    "node",
    "gpu_index",
    "health",
    "by",
    "reason",
    "priority",
    "previous_priority",
    "allocations_lost",
    "gpu_ids",
    "gpus",
    "preempt_at",
    "for",
)


def fleet(
    snap: dict[str, Any], events: list[dict[str, Any]], counts: dict[str, Any]
) -> dict[str, Any]:
    """The console's view: nodes with GPUs and their holders, the queue with why each request
    waits and its ETA (``reason`` and ``eta`` as app.waiting set them on the records), the
    latest events (newest first), and the counts."""
    holders: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for a in snap["allocations"]:
        for idx in _int_list(a.get("gpu_ids")) or []:  # a damaged record shows no GPUs
            holders.setdefault((a.get("node") or "", idx), []).append(
                {
                    "request_id": a["id"],
                    "service_name": a.get("service_name"),
                    "owner": a.get("owner"),
                    "sharing": a.get("sharing") or "exclusive",
                    "since": iso(a.get("allocated_at")),
                    "expires_at": iso(a["expires_at"]) if a.get("expires_at") else None,
                    "status": a.get("status"),
                    "preempt_at": iso(a["preempt_at"]) if a.get("preempt_at") else None,
                }
            )
    by_node: dict[str, list[dict[str, Any]]] = {}
    for g in snap["gpus"]:
        view = gpu(g)
        view["holders"] = holders.get((g.get("node") or "", int(g.get("index") or 0)), [])
        by_node.setdefault(g.get("node") or "", []).append(view)
    nodes = []
    for n in sorted(snap["nodes"], key=lambda n: n["name"]):
        node = dict(n)
        node["heartbeat"] = iso(n["heartbeat"]) if n.get("heartbeat") else None
        node["gpus"] = sorted(by_node.get(n["name"], []), key=lambda g: g.get("index", 0))
        nodes.append(node)
    queue = []
    for q in snap["queue"]:
        queue.append(
            {
                "position": q.get("position"),
                "request_id": q["id"],
                "service_name": q.get("service_name"),
                "owner": q.get("owner"),
                "required_gpus": q.get("required_gpus"),
                "min_memory_mb": q.get("min_memory_mb"),
                "priority": q.get("priority"),
                "sharing": q.get("sharing"),
                "submitted_at": iso(q.get("submitted_at")),
                "waiting_seconds": round(
                    max(snap["now"] - (q.get("submitted_at") or snap["now"]), 0.0), 1
                ),
                "reason": q.get("reason"),
                "eta": iso(q["eta"]) if q.get("eta") is not None else None,
            }
        )
    shown = []
    for ev in events:
        item = {k: ev[k] for k in _EVENT_FIELDS if k in ev and ev[k] not in ("", None)}
        item["at"] = iso(ev.get("ts"))
        if "preempt_at" in item:
            item["preempt_at"] = iso(item["preempt_at"])
        shown.append(item)
    return {
        "now": iso(snap["now"]),
        "counts": counts,
        "nodes": nodes,
        "queue": queue,
        "events": shown,
    }
