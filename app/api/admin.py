"""``/admin``: what operators do to the fleet. Admins only (``auth.admins``; everyone when
auth is off). Every action is an event in the engine's stream naming the principal.

- cordon / uncordon a node or one GPU: no new grants there; allocations stay.
- drain a node: cordon it and mark it draining, then preempt every allocation on it with
  notice: each turns ``preempting`` (webhook ``preempting``) and ends as ``preempted``
  ``preemption.grace_period`` later, or when its holder releases it. ``?wait=true`` preempts
  nothing: it holds the answer until the holders have released everything (or their leases
  ran out) or ``timeout`` seconds pass.
- forget a node that is not alive: its allocations end as ``lost`` (webhook ``lost``).
- change a queued request's priority.
"""

from __future__ import annotations

import time

from flask import current_app, jsonify, request
from flask_smorest import Blueprint

from app import auth, schemas, sessions
from app.api import body, render
from app.api.docs import doc
from app.api.gpu import _ID_PARAM, _dispatch_webhooks, _require_id, errors, ok
from app.errors import BadRequest, Forbidden

blp = Blueprint(
    "admin",
    __name__,
    url_prefix="/admin",
    description="Operators: cordon, drain and forget nodes; cordon GPUs; "
    "change priorities. Admins only.",
)

_PRIORITY_BODY = schemas.PriorityRequestSchema()
_NODE_PARAM = {
    "in": "path",
    "name": "node",
    "required": True,
    "schema": {"type": "string", "pattern": schemas.NODE_RE},
}
_INDEX_PARAM = {
    "in": "path",
    "name": "index",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
_WAIT_PARAMS = [
    {
        "in": "query",
        "name": "wait",
        "required": False,
        "schema": {"type": "boolean"},
        "description": "Answer only when the node holds no allocation (or at the timeout).",
    },
    {
        "in": "query",
        "name": "timeout",
        "required": False,
        "schema": {"type": "number", "minimum": 0, "maximum": 600},
        "description": "Longest wait in seconds with wait=true (default 60).",
    },
]
#: Longest and default ?wait=true hold of a drain (a held request keeps one worker thread).
MAX_DRAIN_WAIT = 600.0
DEFAULT_DRAIN_WAIT = 60.0
DRAIN_POLL = 0.5


def _engine():
    return current_app.extensions["gpu_engine"]


@blp.before_request
def _admins_only():
    if not auth.current_is_admin():
        raise Forbidden("admin actions are for admins only (auth.admins)")
    # a page on another site cannot make an operator's browser act here (with auth off, too)
    if not sessions.same_origin(request):
        raise Forbidden("admin actions from another site's page are refused")


def _by() -> str:
    return auth.current_principal() or ""


def _node_json(node: dict, snap: dict | None = None) -> dict:
    out = {
        k: node[k]
        for k in (
            "name",
            "alive",
            "heartbeat",
            "heartbeat_age_seconds",
            "gpu_count",
            "backend",
            "host",
            "cordoned",
            "draining",
        )
    }
    if snap is not None:
        out["gpus"] = [render.gpu(g) for g in snap["gpus"] if g.get("node") == node["name"]]
        out["allocations"] = [a["id"] for a in snap["allocations"] if a.get("node") == node["name"]]
    return out


def _one_node(name: str) -> dict:
    snap = _engine().snapshot(queue=False)
    for node in snap["nodes"]:
        if node["name"] == name:
            return _node_json(node, snap)
    from app.errors import NotFound

    raise NotFound(f"node {name!r} not found", details={"node": name})


@blp.route("/nodes", methods=["GET"])
@ok(200, schemas.NodeListSchema, "Every node, alive or not, with its GPUs and allocations.")
@errors(401, 403, 503)
def nodes():
    """Every node the engine knows, alive or not."""
    snap = _engine().snapshot(queue=False)
    return jsonify(nodes=[_node_json(n, snap) for n in snap["nodes"]])


@blp.route("/nodes/<node>/cordon", methods=["POST"])
@doc(parameters=[_NODE_PARAM])
@ok(200, schemas.NodeSchema, "Cordoned: no new grants on the node.")
@errors(401, 403, 404, 503)
def cordon_node(node: str):
    """Cordon every GPU of a node (and those it reports later); allocations stay."""
    _engine().cordon_node(node, True, principal=_by())
    return jsonify(_one_node(node))


@blp.route("/nodes/<node>/uncordon", methods=["POST"])
@doc(parameters=[_NODE_PARAM])
@ok(200, schemas.NodeSchema, "Schedulable again (also ends a drain).")
@errors(401, 403, 404, 503)
def uncordon_node(node: str):
    """Clear the node's cordon, every GPU cordon on it, and a drain."""
    _engine().cordon_node(node, False, principal=_by())
    return jsonify(_one_node(node))


def _wait_args() -> tuple[bool, float]:
    raw = request.args.get("wait", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest("wait must be true or false", details={"wait": ["not a boolean"]})
    wait = raw in ("true", "1")
    try:
        timeout = float(request.args.get("timeout", DEFAULT_DRAIN_WAIT))
    except ValueError:
        raise BadRequest(
            "timeout must be a number of seconds", details={"timeout": ["not a number"]}
        ) from None
    if not 0 <= timeout <= MAX_DRAIN_WAIT:
        raise BadRequest(
            f"timeout must be in 0..{MAX_DRAIN_WAIT:g} seconds",
            details={"timeout": ["out of range"]},
        )
    return wait, timeout


@blp.route("/nodes/<node>/drain", methods=["POST"])
@doc(parameters=[_NODE_PARAM, *_WAIT_PARAMS])
@ok(
    200,
    schemas.DrainSchema,
    "Cordoned and draining; preempted lists the allocations given notice, drained says "
    "whether the node is empty.",
)
@errors(400, 401, 403, 404, 503)
def drain_node(node: str):
    """Cordon the node and preempt its allocations with notice (``preemption.grace_period``);
    ``wait=true`` preempts nothing and waits for their holders to release them."""
    wait, timeout = _wait_args()
    engine = _engine()
    view = engine.drain_node(node, preempt=not wait, principal=_by())
    if view["preempted"]:
        _dispatch_webhooks()
    if wait and timeout > 0 and engine.node_allocations(node):
        _hold_until_empty(engine, node, time.monotonic() + timeout)
    out = _one_node(node)
    out["drained"] = not out["allocations"]
    out["preempted"] = view["preempted"]
    return jsonify(out)


def _hold_until_empty(engine, node: str, deadline: float) -> None:
    """Wait (polling the leases every DRAIN_POLL s) until the node holds no allocation or the
    deadline passes. The wait sits on a worker thread, so it follows the long-polls' thread
    budget (app/longpoll.py): it is only held while another thread of this worker is idle,
    and lets go when a request needs the last one; the answer then says ``drained: false``
    and the client asks again (``gpu-orchestrator admin drain --wait`` does)."""
    from app.longpoll import Waiter

    poll = current_app.extensions.get("gpu_longpoll")
    w = Waiter(f"drain:{node}")
    if poll is not None and not poll.holds.hold(w):
        return
    try:
        while engine.node_allocations(node) and not w.evicted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            w.event.wait(min(DRAIN_POLL, remaining))
    finally:
        if poll is not None:
            poll.holds.unhold(w)


@blp.route("/nodes/<node>", methods=["DELETE"])
@doc(parameters=[_NODE_PARAM])
@ok(200, schemas.ForgetSchema, "Forgotten; its allocations ended as lost.")
@errors(401, 403, 404, 409, 503)
def forget_node(node: str):
    """Forget a node that is not alive; its allocations end with status ``lost``."""
    out = _engine().forget_node(node, principal=_by())
    _dispatch_webhooks()
    return jsonify(node=node, forgotten=True, lost=out["lost"])


def _gpu(node: str, index: int, schedulable: bool):
    view = _engine().set_gpu_schedulable(node, index, schedulable, principal=_by())
    view.setdefault("node", node)
    return jsonify(render.gpu(view))


@blp.route("/gpus/<node>/<int:index>/cordon", methods=["POST"])
@doc(parameters=[_NODE_PARAM, _INDEX_PARAM])
@ok(200, schemas.GpuSchema, "Cordoned: no new grants on the GPU.")
@errors(401, 403, 404, 503)
def cordon_gpu(node: str, index: int):
    """Cordon one GPU; its allocations stay."""
    return _gpu(node, index, False)


@blp.route("/gpus/<node>/<int:index>/uncordon", methods=["POST"])
@doc(parameters=[_NODE_PARAM, _INDEX_PARAM])
@ok(200, schemas.GpuSchema, "Schedulable again.")
@errors(401, 403, 404, 503)
def uncordon_gpu(node: str, index: int):
    """Clear one GPU's cordon."""
    return _gpu(node, index, True)


@blp.route("/requests/<request_id>/priority", methods=["POST"])
@doc(
    parameters=[_ID_PARAM],
    requestBody={
        "required": True,
        "content": {"application/json": {"schema": schemas.PriorityRequestSchema}},
    },
)
@ok(200, schemas.AllocationSchema, "The request with its new priority and place.")
@errors(400, 401, 403, 404, 409, 413, 415, 422, 503)
def set_priority(request_id: str):
    """Change a queued request's priority (1..10); it moves in the queue at once."""
    data = body.load(_PRIORITY_BODY)
    _require_id(request_id)
    rec = _engine().set_priority(request_id, data["priority"], principal=_by())
    _dispatch_webhooks()
    return jsonify(render.allocation(rec, principal=auth.current_principal(), admin=True))
