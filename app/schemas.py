"""Marshmallow schemas of the REST API: what requests may carry and what responses look like.

Request schemas validate (``load``) and name every bad field; response schemas only document
(the views render records with :mod:`app.api.render`) and feed ``/openapi.json``. Response
schemas use ``unknown = EXCLUDE`` so the spec allows fields added later without a breaking
change; request schemas reject unknown fields so a typo is a 422, not a silently ignored option.
"""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from app.engine import DEPENDENCY_FAILED, STATUSES
from app.request_rules import (
    DEPENDS_ON_MODES,
    FIELDS,
    ID_RE,
    MAX_LEASE_SECONDS,
    MAX_WORKLOAD_DEPTH,
    RENEW_TTL,
    SERVICE_NAME_RE,
    SERVICE_NAME_RULE,
    SHARING,
    WEBHOOK_SCHEMES,
    WORKLOAD_TYPES,
    Rule,
    whole_match,
    workload_data_problem,
)
from app.request_rules import WEBHOOK_EVENTS as EVENTS
from app.waiting import REASONS as WAIT_REASONS

MAX_TTL_SECONDS = MAX_LEASE_SECONDS


class StrictInt(fields.Integer):
    """An integer that refuses strings, floats and booleans (JSON ``true`` is not 1):
    marshmallow's own ``strict=True`` (since marshmallow 3.x it refuses booleans too;
    tests/test_numeric_input.py checks each case)."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)


class StrictStr(fields.String):
    """A string field (marshmallow's already refuses numbers); kept for one place to tighten."""


def _check_workload_data(value):
    problem = workload_data_problem(value)
    if problem:
        raise ma.ValidationError(problem)


class WholeRegexp(validate.Regexp):
    """``validate.Regexp`` over the whole string (app.request_rules.whole_match): its
    ``re.match`` let a pattern ending in ``$`` take one more trailing newline. Kept a
    ``Regexp`` so the OpenAPI document still shows the pattern."""

    def __init__(self, regex: str, **kwargs):
        super().__init__(regex, **kwargs)
        self._whole = whole_match(regex)

    def __call__(self, value):
        if self._whole(value) is None:
            raise ma.ValidationError(self.error.format(input=value, regex=self.regex.pattern))
        return value


def _field(rule: Rule, *, error: str | None = None, item_error: str | None = None, **kwargs):
    """The marshmallow field of one declared rule (app.request_rules): its type and limits
    become validators, and so the 422 and the OpenAPI document; ``error`` replaces
    marshmallow's message of the choices or pattern check, ``kwargs`` go to the field
    (metadata, required, ...)."""
    checks: list = []
    if rule.kind == "list":
        if rule.max_len is not None:
            checks.append(validate.Length(rule.min_len or None, rule.max_len))
        item = _field(rule.item, error=item_error) if rule.item else fields.Raw()
        return fields.List(item, validate=checks, **kwargs)
    if rule.kind == "object":
        return fields.Dict(keys=fields.String(), validate=_check_workload_data, **kwargs)
    if rule.kind == "int":
        checks.append(validate.Range(rule.lo, rule.hi, min_inclusive=not rule.above))
        return StrictInt(validate=checks, **kwargs)
    if rule.kind != "str":
        raise AssertionError(rule.kind)  # pragma: no cover - no number field in a body
    if rule.max_len is not None:
        checks.append(validate.Length(rule.min_len or None, rule.max_len))
    if rule.choices is not None:
        kw = {"error": error} if error else {}
        checks.append(validate.OneOf(rule.choices, **kw))
    if rule.regex is not None:
        kw = {"error": error} if error else {}
        checks.append(WholeRegexp(rule.regex, **kw))
    return StrictStr(validate=checks[0] if len(checks) == 1 else checks, **kwargs)


_SERVICE_NAME_ERROR = "must be " + SERVICE_NAME_RULE
_WEBHOOK_URL = validate.URL(
    schemes=set(WEBHOOK_SCHEMES), require_tld=False, error="must be an http:// or https:// URL"
)


class _RequestSchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE


class WorkloadFields(_RequestSchema):
    """Fields shared by ``/gpu/allocate`` and ``/gpu/workload``."""

    workload_type = _field(
        FIELDS["workload_type"],
        error="must be one of: " + ", ".join(WORKLOAD_TYPES),
        load_default=FIELDS["workload_type"].default,
        metadata={
            "description": "Kind of work; decides the rules that size the request.",
            "enum": list(WORKLOAD_TYPES),
        },
    )
    workload_data = _field(
        FIELDS["workload_data"],
        load_default=dict,
        metadata={
            "description": "Hints such as model_size, model_name, batch_size, "
            "concurrent_requests, or explicit required_gpus, "
            "min_memory_mb, priority overrides. Nesting is limited to "
            f"{MAX_WORKLOAD_DEPTH} levels."
        },
    )


class PlacementFields(WorkloadFields):
    """What the caller asks for outright, overriding the analysis (``/gpu/allocate`` and
    ``/gpu/workload`` alike, so the latter shows what the former would use)."""

    required_gpus = _field(
        FIELDS["required_gpus"],
        metadata={
            "description": "GPUs, all on one node (1 to the largest node's count: more is "
            "422 unsatisfiable); overrides the analysis."
        },
    )
    min_memory_mb = _field(
        FIELDS["min_memory_mb"],
        metadata={"description": "Memory each GPU must have free, MB; overrides the analysis."},
    )
    gpu_model = _field(
        FIELDS["gpu_model"],
        metadata={
            "description": 'Case-insensitive shell glob on the GPU name, e.g. "*H100*" '
            "(*, ?, [abc], [!abc]; at most 3 '*'). No GPU in the fleet "
            "matches: 422 unsatisfiable.",
            "example": "*H100*",
        },
    )
    nodes = _field(
        FIELDS["nodes"],
        item_error="not a node name",
        metadata={
            "description": "Node names the allocation may use (any of them); none known: "
            "422 unsatisfiable."
        },
    )


class WorkloadRequestSchema(PlacementFields):
    """Body of ``POST /gpu/workload``: analyse only."""

    service_name = _field(
        FIELDS["service_name"],
        error=_SERVICE_NAME_ERROR,
        metadata={"description": "Accepted for symmetry with /gpu/allocate; not used."},
    )


class AllocateRequestSchema(PlacementFields):
    """Body of ``POST /gpu/allocate``."""

    service_name = _field(
        FIELDS["service_name"],
        error=_SERVICE_NAME_ERROR,
        required=True,
        metadata={
            "description": "Who the GPUs are for; " + SERVICE_NAME_RULE + ".",
            "pattern": SERVICE_NAME_RE,
        },
    )
    webhook_url = StrictStr(
        allow_none=True,
        validate=[validate.Length(max=FIELDS["webhook_url"].max_len), _WEBHOOK_URL],
        metadata={
            "description": "Notified (POST, JSON) when the request changes state.",
            "format": "uri",
            "pattern": "^https?://",
        },
    )
    webhook_events = _field(
        FIELDS["webhook_events"],
        metadata={
            "description": "Extra events to notify besides the grant of a queued "
            "request: " + ", ".join(EVENTS) + "."
        },
    )
    ttl_seconds = _field(
        FIELDS["ttl_seconds"],
        metadata={"description": "Lease length. 0 means no expiry, when the server allows it."},
    )
    sharing = _field(
        FIELDS["sharing"],
        metadata={
            "description": "exclusive (default): whole GPUs; shared: reserve "
            "min_memory_mb on one GPU.",
            "enum": list(SHARING),
        },
    )
    depends_on = _field(
        FIELDS["depends_on"],
        metadata={"description": "Requests or allocations that must finish first."},
    )
    depends_on_mode = _field(
        FIELDS["depends_on_mode"],
        error="must be one of: " + ", ".join(DEPENDS_ON_MODES),
        metadata={
            "description": "any (default): any ending of a dependency lets this request "
            "run. ok: only a normal release does; a dependency that is "
            "cancelled, times out or expires cancels this request "
            f"(reason {DEPENDENCY_FAILED}), like Slurm's afterok.",
            "enum": list(DEPENDS_ON_MODES),
        },
    )
    preferred_gpus = _field(
        FIELDS["preferred_gpus"],
        metadata={"description": "GPU indices to prefer on a node."},
    )
    priority = _field(
        FIELDS["priority"],
        metadata={
            "description": f"{FIELDS['priority'].lo}-{FIELDS['priority'].hi}, higher first; "
            "overrides the analysed priority."
        },
    )


class ReleaseRequestSchema(_RequestSchema):
    """Body of ``POST /gpu/release``: one of the two fields (``allocation_id`` wins)."""

    allocation_id = _field(
        FIELDS["depends_on"].item, metadata={"description": "Release this allocation."}
    )
    service_name = _field(
        FIELDS["service_name"],
        error=_SERVICE_NAME_ERROR,
        metadata={"description": "Release every allocation of this service that the caller owns."},
    )


class RenewRequestSchema(_RequestSchema):
    """Optional body of ``POST /gpu/allocations/<id>/renew``."""

    ttl_seconds = _field(
        RENEW_TTL,
        metadata={"description": "New lease length from now; default: the allocation's own."},
    )


# --------------------------------------------------------------------------- responses


class _ResponseSchema(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE


def _time(description):
    return StrictStr(allow_none=True, metadata={"description": description, "format": "date-time"})


_WAIT_REASONS = (
    "capacity (no GPUs free that fit it), quota (its tenant holds max_gpus), dependency "
    "(waits for depends_on), reservation (GPUs that fit are held back for a request ahead of "
    "it) or priority (it fits, but another request goes first)"
)
_ETA = (
    "While queued: the estimated grant, simulated in queue order from the lease ends "
    "(expires_at) of the allocations ahead of it, as Slurm's squeue --start does; null when it "
    "cannot be known (a lease without expiry in the way, or deeper in the queue than the "
    "estimate looks)."
)
_WARNINGS = (
    "One line per workload_data key that the analysis ignored, with a did-you-mean "
    "(gpu_count -> required_gpus); empty when every key was used."
)


class ErrorBodySchema(_ResponseSchema):
    code = StrictStr(
        required=True,
        metadata={"description": "Stable machine-readable code, e.g. validation_error, not_found."},
    )
    message = StrictStr(required=True, metadata={"description": "What went wrong, for humans."})
    details = fields.Dict(
        required=True,
        metadata={"description": "Context; for validation errors, field name -> messages."},
    )


class ErrorSchema(_ResponseSchema):
    """The one error shape of every non-2xx response."""

    error = fields.Nested(ErrorBodySchema, required=True)


class RequirementsSchema(_ResponseSchema):
    """What the workload analysis decided."""

    workload_type = StrictStr(metadata={"enum": list(WORKLOAD_TYPES)})
    required_gpus = StrictInt()
    min_memory_mb = StrictInt()
    max_memory_mb = StrictInt(allow_none=True)
    priority = StrictInt()
    max_utilization = fields.Float(allow_none=True)
    estimated_duration_seconds = fields.Float(allow_none=True)
    reasoning = StrictStr(allow_none=True)
    decided_by = StrictStr(metadata={"description": "rules or advisor"})
    depends_on = fields.List(StrictStr())
    workflow_id = StrictStr(allow_none=True)
    estimate = fields.Dict(
        allow_none=True,
        metadata={"description": "Model-aware memory estimate, when a parameter count was known."},
    )
    gpu_model = StrictStr(
        allow_none=True,
        metadata={"description": "GPU name glob the request asked for; null: any model."},
    )
    nodes = fields.List(
        StrictStr(),
        allow_none=True,
        metadata={"description": "Nodes the request may use; null: any node."},
    )
    warnings = fields.List(StrictStr(), metadata={"description": _WARNINGS})


class GpuHealthSchema(_ResponseSchema):
    index = StrictInt(required=True)
    health = StrictStr(required=True, metadata={"enum": ["ok", "degraded", "failed", "lost"]})


class AllocationSchema(_ResponseSchema):
    """A request or allocation: one id over its whole life."""

    id = StrictStr(required=True)
    request_id = StrictStr(metadata={"description": "Same as id (the original's name)."})
    status = StrictStr(
        required=True,
        metadata={
            "enum": list(STATUSES),
            "description": "queued, then allocated (live; preempting while it has notice to "
            "leave), then released, expired, lost or preempted; or cancelled / timed_out "
            "while queued.",
        },
    )
    service_name = StrictStr(required=True)
    owner = StrictStr(allow_none=True)
    tenant = StrictStr(
        allow_none=True,
        metadata={
            "description": "Who pays for it (tenants.key: the principal or the service_name); "
            "quotas and fair share count it here."
        },
    )
    workload_type = StrictStr(allow_none=True)
    workload_data = fields.Dict(allow_none=True)
    priority = StrictInt(allow_none=True)
    required_gpus = StrictInt(allow_none=True)
    min_memory_mb = StrictInt(allow_none=True)
    max_memory_mb = StrictInt(allow_none=True)
    max_utilization = fields.Float(allow_none=True)
    preferred_gpus = fields.List(StrictInt(), allow_none=True)
    gpu_model = StrictStr(
        allow_none=True, metadata={"description": "GPU name glob asked for; null: any model."}
    )
    nodes = fields.List(
        StrictStr(), allow_none=True, metadata={"description": "Nodes it may use; empty: any node."}
    )
    sharing = StrictStr(allow_none=True)
    ttl_seconds = fields.Float(allow_none=True)
    webhook_url = StrictStr(allow_none=True)
    depends_on = fields.List(StrictStr(), allow_none=True)
    depends_on_mode = StrictStr(allow_none=True, metadata={"enum": list(DEPENDS_ON_MODES)})
    reason = StrictStr(
        allow_none=True,
        metadata={
            "description": "While queued, why it waits: "
            + _WAIT_REASONS
            + f". When the engine ended it: {DEPENDENCY_FAILED} (a depends_on_mode ok "
            "dependency ended otherwise than released). On a preempting or preempted "
            "allocation, why it was preempted: drain (an admin drained its node) or guarantee "
            "(a tenant below its guaranteed_gpus needed the GPUs)."
        },
    )
    eta = _time(_ETA)
    failed_dependency = StrictStr(
        allow_none=True,
        metadata={"description": f"With reason {DEPENDENCY_FAILED}: the dependency that failed."},
    )
    position = StrictInt(
        allow_none=True, metadata={"description": "1-based place in the queue while queued."}
    )
    node = StrictStr(allow_none=True)
    gpu_ids = fields.List(StrictInt(), allow_none=True)
    gpu_uuids = fields.List(StrictStr(), allow_none=True)
    cuda_visible_devices = StrictStr(
        allow_none=True,
        metadata={"description": 'Value for CUDA_VISIBLE_DEVICES on the node, e.g. "0,1".'},
    )
    submitted_at = _time("When the request arrived.")
    allocated_at = _time("When the GPUs were granted.")
    expires_at = _time("When the lease ends unless renewed; null: never.")
    released_at = _time("When it was released.")
    ended_at = _time("When it ended: released, expired, cancelled or timed out.")
    renewed_at = _time("When the lease was last renewed.")
    preempt_at = _time(
        "Set once it is preempting: when it ends as preempted unless released before; "
        "no renewal extends expires_at past it."
    )
    preempted_for = StrictStr(
        allow_none=True,
        metadata={"description": "The queued request it was preempted for (reason guarantee)."},
    )
    lease_seconds = fields.Float(
        allow_none=True,
        metadata={"description": "Lease length applied at grant and renewal; null: no expiry."},
    )
    estimated_duration_seconds = fields.Float(allow_none=True)
    wait_time_seconds = fields.Float(
        allow_none=True, metadata={"description": "Time spent queued before the grant."}
    )
    webhook_events = fields.List(StrictStr(), allow_none=True)
    replayed = fields.Boolean(
        metadata={"description": "True when an Idempotency-Key matched an earlier request."}
    )
    gpu_health = fields.List(
        fields.Nested(GpuHealthSchema),
        allow_none=True,
        metadata={
            "description": "Health of each GPU under the allocation (GET /gpu/allocations/<id>)."
        },
    )


class GrantedSchema(AllocationSchema):
    """200 answer of ``/gpu/allocate``: the allocation, and what the analysis ignored."""

    warnings = fields.List(StrictStr(), required=True, metadata={"description": _WARNINGS})


class QueuedSchema(_ResponseSchema):
    """202 answer of ``/gpu/allocate`` when the request waits in the queue."""

    status = StrictStr(required=True, metadata={"enum": ["queued"]})
    request_id = StrictStr(required=True)
    id = StrictStr()
    position = StrictInt(allow_none=True)
    priority = StrictInt(allow_none=True)
    submitted_at = _time("When the request arrived.")
    reason = StrictStr(
        allow_none=True,
        metadata={"enum": list(WAIT_REASONS), "description": "Why it waits: " + _WAIT_REASONS},
    )
    eta = _time(_ETA)
    replayed = fields.Boolean()
    warnings = fields.List(StrictStr(), required=True, metadata={"description": _WARNINGS})


#: The ``allocation`` object of ``GET /gpu/requests/<id>``, in its JSON order: the original's
#: id, service_name, priority and allocated_at, and what the grant decided. Its fields are
#: AllocationSchema's (declared there once); app.api.render writes them in this order.
GRANT_VIEW = (
    "id",
    "service_name",
    "priority",
    "node",
    "gpu_ids",
    "gpu_uuids",
    "cuda_visible_devices",
    "allocated_at",
    "expires_at",
    "lease_seconds",
    "renewed_at",
    "preempt_at",
    "preempted_for",
    "released_at",
)
#: What a grant adds to a request: under ``allocation`` in ``GET /gpu/requests/<id>``, never at
#: its top level.
GRANT_FIELDS = tuple(
    f for f in GRANT_VIEW if f not in ("id", "service_name", "priority", "allocated_at")
)


class GrantSchema(AllocationSchema):
    """The ``allocation`` of a granted request: the original's fields (id, service_name,
    gpu_ids, allocated_at, priority) and what the grant decided; AllocationSchema's fields,
    only those of :data:`GRANT_VIEW`."""

    class Meta(_ResponseSchema.Meta):
        fields = GRANT_VIEW

    id = StrictStr(required=True, metadata={"description": "The allocation id (= request_id)."})


class RequestStatusSchema(AllocationSchema):
    """``GET /gpu/requests/<id>`` (and ``DELETE``): the request at the top level, what it was
    granted under ``allocation`` (null until then). Each field has one place; the original's
    service_name, priority and allocated_at appear in both, as in the original."""

    class Meta:
        exclude = ("id", "replayed") + GRANT_FIELDS

    allocation = fields.Nested(
        GrantSchema,
        allow_none=True,
        required=True,
        metadata={"description": "null until granted; then the allocation, also after it ended."},
    )


class ReleasedSchema(_ResponseSchema):
    status = StrictStr(required=True, metadata={"enum": ["released"]})
    allocation_id = StrictStr(metadata={"description": "Set when released by id."})
    service_name = StrictStr(allow_none=True)
    released = fields.List(StrictStr(), metadata={"description": "Ids released."})
    count = StrictInt()


class GpuSchema(_ResponseSchema):
    node = StrictStr()
    index = StrictInt()
    uuid = StrictStr(allow_none=True)
    name = StrictStr(allow_none=True)
    memory_total_mb = StrictInt(allow_none=True)
    memory_used_mb = StrictInt(allow_none=True)
    memory_free_mb = StrictInt(allow_none=True)
    utilization = fields.Float(allow_none=True)
    temperature = fields.Float(allow_none=True)
    power_draw = fields.Float(allow_none=True)
    health = StrictStr(allow_none=True, metadata={"enum": ["ok", "degraded", "failed"]})
    schedulable = fields.Boolean(allow_none=True)
    cordoned = fields.Boolean(allow_none=True)
    lost = fields.Boolean(
        allow_none=True, metadata={"description": "The monitor stopped reporting this GPU."}
    )
    node_alive = fields.Boolean(allow_none=True)
    allocated = fields.Boolean(
        allow_none=True,
        metadata={"description": "Held by an exclusive allocation or by shared reservations."},
    )
    allocated_to = StrictStr(
        allow_none=True, metadata={"description": "The exclusive allocation holding it."}
    )
    shared_n = StrictInt(allow_none=True, metadata={"description": "Shared allocations on it."})
    shared_mb = StrictInt(
        allow_none=True, metadata={"description": "Memory reserved by shared allocations, MB."}
    )
    updated_at = _time("When the monitor last reported it.")


class GpuStatusSchema(_ResponseSchema):
    gpus = fields.List(fields.Nested(GpuSchema), required=True)


class TenantSchema(_ResponseSchema):
    """One tenant: its quota (tenants.quotas over tenants.default) and what it uses now."""

    tenant = StrictStr(
        required=True, metadata={"description": "Its name: a principal or a service_name."}
    )
    weight = fields.Float(required=True, metadata={"description": "Its weight in fair share."})
    guaranteed_gpus = StrictInt(required=True)
    max_gpus = StrictInt(
        required=True, allow_none=True, metadata={"description": "null: no limit."}
    )
    max_queued = StrictInt(
        required=True, allow_none=True, metadata={"description": "null: no limit."}
    )
    gpus_held = StrictInt(
        required=True,
        metadata={"description": "GPUs its live allocations hold; a shared one counts as one."},
    )
    queued = StrictInt(required=True, metadata={"description": "Its requests in the queue."})
    usage_gpu_hours = fields.Float(
        required=True,
        metadata={
            "description": "GPU-hours it used, each counting half after every "
            "tenants.usage_half_life."
        },
    )
    fair_share = fields.Float(
        required=True,
        metadata={
            "description": "The fraction of the fleet fair share gives it now: its weight over "
            "the weights of the tenants holding or waiting for GPUs (0 while it does neither)."
        },
    )


class TenantListSchema(_ResponseSchema):
    """``GET /gpu/tenants``."""

    tenants = fields.List(fields.Nested(TenantSchema), required=True)
    key = StrictStr(
        required=True,
        metadata={"enum": ["principal", "service_name"], "description": "tenants.key in effect."},
    )
    fair_share_enabled = fields.Boolean(
        required=True, metadata={"description": "tenants.fair_share: the order across tenants."}
    )


class GpuListSchema(_ResponseSchema):
    """``GET /gpu/list``: the fleet, and one page of requests as compact records."""

    gpus = fields.List(fields.Nested(GpuSchema), required=True)
    allocations = fields.List(
        fields.Nested(AllocationSchema),
        required=True,
        metadata={"description": "This page's live allocations, by lease end (no workload_data)."},
    )
    queue = fields.List(
        fields.Nested(AllocationSchema),
        required=True,
        metadata={"description": "This page's queued requests, by rank (no workload_data)."},
    )
    nodes = fields.List(fields.Dict())
    allocations_total = StrictInt(metadata={"description": "Live allocations in all."})
    queue_depth = StrictInt(metadata={"description": "Queued requests in all."})
    limit = StrictInt(metadata={"description": "Most requests on one page."})
    next = StrictStr(
        allow_none=True,
        metadata={"description": "Pass as ?after= for the next page; null on the last page."},
    )


class HealthSchema(_ResponseSchema):
    status = StrictStr(required=True)


#: The id check for code outside marshmallow (path parameters): the whole string (whole_match).
ID_MATCH = whole_match(ID_RE)


# --------------------------------------------------------------------------- admin

NODE_RE = r"^[^|%/]{1,200}$"


class NodeSchema(_ResponseSchema):
    """A node as admins see it."""

    name = StrictStr(required=True)
    alive = fields.Boolean(required=True)
    heartbeat = fields.Float(metadata={"description": "Last report, epoch seconds."})
    heartbeat_age_seconds = fields.Float()
    gpu_count = StrictInt()
    backend = StrictStr(allow_none=True)
    host = StrictStr(allow_none=True)
    cordoned = fields.Boolean()
    draining = fields.Boolean()
    allocations = fields.List(
        StrictStr(), metadata={"description": "Live allocations on the node."}
    )
    gpus = fields.List(fields.Nested(GpuSchema))


class NodeListSchema(_ResponseSchema):
    nodes = fields.List(fields.Nested(NodeSchema), required=True)


class DrainSchema(NodeSchema):
    drained = fields.Boolean(
        required=True, metadata={"description": "True when no allocation is left on the node."}
    )
    preempted = fields.List(
        StrictStr(),
        metadata={
            "description": "Allocations this drain marked preempting (they end as preempted "
            "at their preempt_at, preemption.grace_period from now, or when released); "
            "empty with wait=true, which preempts nothing."
        },
    )


class ForgetSchema(_ResponseSchema):
    node = StrictStr(required=True)
    forgotten = fields.Boolean(required=True)
    lost = fields.List(
        StrictStr(),
        required=True,
        metadata={"description": "Allocations that ended with status lost."},
    )


class PriorityRequestSchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    priority = _field(FIELDS["priority"], required=True)
