"""The allocation engine: GPUs, requests, leases and the priority queue, all in Redis.

Every state change is one function of one Redis Functions library (``app/lua/<command>.lua``,
shared pieces in ``app/lua/includes/``), loaded once per server (``FUNCTION LOAD REPLACE`` when
its version, a hash of its source, changes) and called with ``FCALL`` (``FCALL_RO`` for the
read-only ones). Any number of API replicas and workers may call the engine at once and none of
them can double-allocate a GPU: Redis runs one function at a time, and each function reads and
writes everything it needs. Scripts return a negative code on a domain error;
``ERRORS`` below maps each code to one exception from :mod:`app.errors`.

Race notes (two replicas, one Redis):

* replica A and B both call ``allocate`` for the last free GPU. A's script runs first and marks
  the GPU taken; B's script then finds no free GPU and queues its request. There is no
  read-then-write window in Python: placement and grant happen inside one script.
* the clock: without an injected clock each script reads Redis ``TIME``, so leases and queue
  timeouts follow one clock whatever the replicas' own clocks say.
* ids are ``<service>-<ms>-<8 random digits>``; a collision (same id from two replicas within
  one millisecond) is detected inside the script and retried with a new id.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from app.errors import (
    Conflict,
    EngineUpgrading,
    Forbidden,
    NotFound,
    OrchestratorError,
    OwnerQueueFull,
    PayloadTooLarge,
    QueueFull,
    TenantQueueFull,
    Unsatisfiable,
    ValidationFailed,
)
from app.keys import Keys
from app.record import (
    _pairs,
    _to_int,
    lua_tables,
    parse_record,
    stored,
)
from app.redis_client import PinnedCalls, bulk, packs
from app.replication import write_acked
from app.request_rules import (
    FIELDS,
    IDEMPOTENCY_KEY_RULE,
    MAX_GLOB_STARS,
    MAX_LEASE_SECONDS,
    MAX_SHARED_PER_GPU,
    NODE_NAME_RULE,
    CheckedRequest,
    check,
    check_together,
    given_fields,
    idempotency_key_ok,
    node_name_ok,
)
from app.request_rules import (
    bad as bad_field,
)
from app.settings import tenant_key, tenant_quota, tenant_quotas

LUA_DIR = Path(__file__).with_name("lua")
SCRIPTS = (
    "allocate",
    "release",
    "release_service",
    "renew",
    "cancel",
    "schedule",
    "reap",
    "report_node",
    "cordon",
    "forget",
    "priority",
    "snapshot",
    "counts",
    "tenant_list",
    "own_tenants",
    "watch",
)
#: Each request field's default (app/request_rules.py), for the fields a request leaves out.
_DEFAULT = {name: rule.default for name, rule in FIELDS.items()}
#: Functions flagged ``no-writes`` and called with FCALL_RO (a replica may serve them); they
#: wait for no replica acknowledgement (redis.min_replicas_ack).
READ_ONLY = ("snapshot", "counts", "tenant_list", "own_tenants")
#: Writes that wait for no replica acknowledgement: a long-poll's mark (lost in a failover, the
#: held call still answers when the listener resubscribes, app/longpoll.py).
UNACKED = ("watch",)
#: The library's includes, in load order (each defined once, at the library's top level; an
#: include may itself include others, e.g. queue.lua the reservations and the pass).
INCLUDES = (
    "prelude",
    "stats",
    "tenants",
    "events",
    "indexes",
    "placement",
    "grants",
    "preemption",
    "queue",
    "records",
    "nodes",
    "call",
)
#: Name of the Functions library; each function is ``<LIBRARY>_<script>``.
LIBRARY = "gpuorch"
#: Fixed keys, passed as KEYS in this order (the Lua names bound by includes/call.lua).
#: K_CHANGES, the long-polls' Pub/Sub channel, is a channel, not a key: the library derives it
#: from the prefix (CHANNELS), which saves every call an argument.
FIXED_KEYS = (
    "K_NODES",
    "K_FREE",
    "K_SIZES",
    "K_GPUS",
    "K_SHARED",
    "K_QUEUE",
    "K_QDX",
    "K_QDS",
    "K_QDEAD",
    "K_QUNRES",
    "K_RES",
    "K_LEASES",
    "K_EVENTS",
    "K_OUTBOX",
    "K_STATS",
    "K_META",
    "K_QSHAPE",
    "K_SVCLABELS",
    "K_QOWNERS",
    "K_TENANTS",
    "K_TQUEUED",
)
#: Pub/Sub channels the library names: (Lua name, the Keys method), derived from the prefix
#: when it changes.
CHANNELS = (("K_CHANGES", "changes"),)
#: Settings, passed joined by newlines in ARGV[1] in this order: (Lua name, converted with
#: tonumber). The library keeps the last string it parsed, so a call whose settings did not
#: change costs one string comparison (measured: eleven arguments cost ~11k server
#: instructions per call, and their parsing as many again).
SETTINGS = (
    ("POLICY", False),
    ("AGING", True),
    ("RES_AFTER", True),
    ("HB_TIMEOUT", True),
    ("FORGET_AFTER", True),
    ("EV_MAX", False),
    ("HIST_TTL", True),
    ("HIST_TTL_S", False),
    ("MAX_QUEUE", True),
    ("MAX_OWNER", True),
    ("MAX_SVC_LABELS", True),
    ("TENANT_FAIR", False),
    ("TENANT_HALF_LIFE", True),
    ("TENANT_QUOTAS", False),
    ("TENANT_DEFAULT", False),
    ("TENANT_LIMITS", False),
    ("TENANT_KEY", False),
    ("PREEMPT", False),
    ("PREEMPT_GRACE", True),
)
#: ARGV[1] is the common argument: the version, "1" when an injected clock's now follows (as
#: ARGV[2]) else "", the settings and the prefix, joined by newlines (one argument instead of
#: four: each costs the server ~1k instructions per call, and without a clock there is no
#: empty now); a function's own arguments start at ARGV[A + 1], A = 2 with a clock, else
#: ARGS_AT.
ARGS_AT = 1
#: Key builders (Lua head -> the Keys method and its arguments' placeholders).
_BUILDERS = (
    ("k_node(n)", "node", 1),
    ("k_gpu(n, i)", "gpu", 2),
    ("k_req(id)", "request", 1),
    ("k_deps(id)", "dependents", 1),
    ("k_svc(s)", "service", 1),
    ("k_idem(k)", "idempotency", 1),
    ("k_free(n)", "node_free_gpus", 1),
    ("k_tqueue(t)", "queue_tenant", 1),
    ("k_qotenants(o)", "queue_owner_tenants", 1),
    ("k_holds()", "preempt_holds", 0),
    ("k_tusage()", "tenant_usage", 0),
)
_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.M)
_STALE = -11

#: Upper bounds (seconds) of the queue-wait histogram kept in keys.stats().
WAIT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)
#: ``webhook|<result>`` counters in keys.stats(), incremented by the webhook workers.
WEBHOOK_RESULTS = ("delivered", "failed", "retried")
STATUSES = (
    "queued",
    "allocated",
    "preempting",
    "released",
    "expired",
    "cancelled",
    "timed_out",
    "lost",
    "preempted",
)
#: Statuses of a live allocation (it holds its GPUs): ``preempting`` until its ``preempt_at``.
LIVE_STATUSES = ("allocated", "preempting")
#: ``reason`` of a preempting or preempted allocation: an admin drained its node, or a tenant
#: below its guaranteed_gpus needed the GPUs (issue 14).
PREEMPT_REASONS = ("drain", "guarantee")
#: ``reason`` of a request the engine cancelled because a dependency did not end normally.
DEPENDENCY_FAILED = "dependency_failed"
HEALTH = ("ok", "degraded", "failed")
_GPU_EXTRAS = (
    "ecc_uncorrectable",
    "ecc_corrected",
    "xid",
    "throttle_reasons",
    "mig_mode",
    "processes",
)


def load_script(name: str) -> str:
    """A script's own source (its header and body; the includes it names are library-wide)."""
    return (LUA_DIR / f"{name}.lua").read_text()


def _expand(text: str, depth: int = 0) -> str:
    """An include's text with the includes it names inlined (queue.lua: reservations, pass)."""
    if depth > 4:
        raise ValueError("includes nest too deep")
    return _INCLUDE.sub(
        lambda m: _expand((LUA_DIR / "includes" / f"{m.group(1)}.lua").read_text(), depth + 1), text
    )


def _builders() -> str:
    """The key builders: the prefix (P, per call) joined to the shape keys.py gives each key."""
    probe = Keys("\x00")
    lines = []
    for head, method, n in _BUILDERS:
        template = getattr(probe, method)(*(["%s"] * n))
        assert template.startswith("\x00"), method
        params = head[head.index("(") + 1 : -1].split(", ")
        body = _lua_concat(template[1:], params)
        lines.append(f"local function {head} return P .. {body} end")
    return "\n".join(lines)


def _bind() -> str:
    """bind(keys, s), which begin_call runs only when the call's common argument (ARGV[1]: the
    version, the clock flag, the settings, the prefix) or its first key differs from the last
    call's (the keys are the prefix's: ~1.5k instructions a call saved): it binds them all.
    A version that is not the library's makes it answer false (the function then answers
    {-11, VERSION}) before anything is bound. (A function of its own: begin_call is at Lua's
    limit of 60 upvalues.)"""
    lines = [
        "local function bind(keys, s)",
        "  local at = string.find(s, '\\n', 1, true)",
        "  if not at or string.sub(s, 1, at - 1) ~= VERSION then return false end",
        "  local e = string.find(s, '\\n', at + 1, true)",
        "  if not e then return false end",
        "  A = string.sub(s, at + 1, e - 1) == '1' and 2 or 1",
        "  at = e",
        "  local v = {}",
        f"  for i = 1, {len(SETTINGS)} do",
        "    e = string.find(s, '\\n', at + 1, true)",
        "    if not e then return false end",
        "    v[i], at = string.sub(s, at + 1, e - 1), e",
        "  end",
        "  P = string.sub(s, at + 1)",
    ]
    probe = Keys("\x00")
    for name, method in CHANNELS:
        template = getattr(probe, method)()
        assert template.startswith("\x00"), method
        lines.append(f"  {name} = P .. {_lua_concat(template[1:], [])}")
    for i, (name, numeric) in enumerate(SETTINGS, 1):
        lines.append(f"  {name} = tonumber(v[{i}])" if numeric else f"  {name} = v[{i}]")
    lines += [f"  {name} = keys[{i}]" for i, name in enumerate(FIXED_KEYS, 1)]
    lines.append("  COMMON_RAW = s")
    lines.append("  return true")
    lines.append("end")
    return "\n".join(lines)


@functools.cache
def library_source(extra: tuple[tuple[str, str], ...] = (), name: str = LIBRARY) -> tuple[str, str]:
    """(version, source) of the Functions library: the includes once, then one function per
    script (``extra``: more (name, body) pairs, for tests). The version is a hash of the
    source; every call passes it, so a server holding another version is found at once."""
    names = ", ".join(FIXED_KEYS + tuple(n for n, _ in CHANNELS + SETTINGS) + ("COMMON_RAW",))
    constants = (
        f"local P, {names}\nlocal MAX_LEASE = {_lua_num(MAX_LEASE_SECONDS)}\n"
        f"local MAX_SHARED = {MAX_SHARED_PER_GPU}\n"
        f"local A = {ARGS_AT}\n{_builders()}\n{lua_tables()}"
    )
    parts = []
    for inc in INCLUDES:
        text = _expand((LUA_DIR / "includes" / f"{inc}.lua").read_text())
        parts.append(text.replace("-- @constants", constants, 1).replace("-- @bind", _bind(), 1))
    scripts = [(s, load_script(s)) for s in SCRIPTS] + list(extra)
    for script, text in scripts:
        for inc in _INCLUDE.findall(text):
            if inc not in INCLUDES:
                raise ValueError(f"{script}.lua includes {inc!r}, which is not in INCLUDES")
        body = _INCLUDE.sub("", text)
        # each function in its own block: its local leaves scope there, so the functions do
        # not count against Lua's 200 locals of the library's main chunk
        parts.append(
            f"do local function f_{script}(KEYS, ARGV)\n"
            f"if not begin_call(KEYS, ARGV{', true' if script in READ_ONLY else ''}) then "
            f"return {{{_STALE}, VERSION}} end\n{body}\nend"
        )
        flags = ", flags = {'no-writes'}" if script in READ_ONLY else ""
        parts.append(
            f"redis.register_function{{function_name = '{name}_{script}', "
            f"callback = f_{script}{flags}}} end"
        )
    parts.append(
        f"redis.register_function{{function_name = '{name}_version', "
        "callback = function() return VERSION end, flags = {'no-writes'}}"
    )
    code = "\n".join(parts)
    version = hashlib.sha1(code.encode()).hexdigest()[:16]
    return version, f"#!lua name={name}\nlocal VERSION = '{version}'\n{code}\n"


def _upgrading(function: str, ours: str, found: Any) -> EngineUpgrading:
    """Our library was loaded, and another release's replaced it again before the retry: a
    rolling upgrade, replicas of two releases calling one Redis. The call ran nothing."""
    return EngineUpgrading(
        "the engine's Redis Functions library is being replaced by another version (a rolling "
        "upgrade: replicas of two releases share this Redis); nothing was applied, retry",
        details={
            "function": function,
            "library_version": ours,
            "server_version": found if isinstance(found, str) else None,
            "retry_after": EngineUpgrading.retry_after,
        },
    )


def _tenant_queue_full(queued: str, limit: str, tenant: str) -> TenantQueueFull:
    return TenantQueueFull(
        f"tenant {tenant!r} already has {queued} requests queued, its max_queued ({limit}); "
        "retry when some are granted",
        details={"tenant": tenant, "queued": int(queued), "limit": int(limit)},
    )


def _not_found(what: str, ident: str, detail: Any = None) -> OrchestratorError:
    msg = f"{what} {ident!r} not found"
    if detail:
        msg += f" (it is {detail})"
    return NotFound(msg, details={"id": ident, **({"status": detail} if detail else {})})


#: Lua error code -> builder(context, details from the script) of the exception to raise.
ERRORS: dict[int, Callable[[dict, list], OrchestratorError]] = {
    -1: lambda ctx, d: _not_found(
        ctx.get("what", "request"), ctx.get("id", ""), d[0] if d else None
    ),
    -2: lambda ctx, d: Forbidden(
        f"{ctx.get('what', 'request')} {ctx.get('id')!r} belongs to another principal",
        details={"id": ctx.get("id")},
    ),
    -3: lambda ctx, d: Conflict(
        f"{ctx.get('what', 'request')} {ctx.get('id')!r} is {d[0]}, not {ctx.get('expected')}",
        details={"id": ctx.get("id"), "status": d[0]},
    ),
    -4: lambda ctx, d: Conflict(
        f"Idempotency-Key {ctx.get('key')!r} was already used for a different request ({d[0]})",
        details={"idempotency_key": ctx.get("key"), "request_id": d[0]},
    ),
    -5: lambda ctx, d: QueueFull(
        f"queue is full ({d[0]} waiting); retry later", details={"queue_depth": int(d[0])}
    ),
    -6: lambda ctx, d: _unsatisfiable(d[0], d[1], ctx),
    -7: lambda ctx, d: ValidationFailed(
        f"depends_on names unknown request {d[0]!r}", details={"field": "depends_on", "id": d[0]}
    ),
    -9: lambda ctx, d: OwnerQueueFull(
        f"you already have {d[0]} requests queued, your share of the queue (at most {d[1]}); "
        "retry when some are granted",
        details={"queued": int(d[0]), "limit": int(d[1])},
    ),
    -12: lambda ctx, d: _tenant_queue_full(*d[:2], d[2] if len(d) > 2 else ""),
    -10: lambda ctx, d: ValidationFailed(
        f"depends_on names {d[0]!r}, which ended {d[1]}: with depends_on_mode ok this request "
        "could never run",
        details={"field": "depends_on", "id": d[0], "status": d[1]},
    ),
}
_RETRY_ID = -8


def workload_data_json(data: Any, limit: int) -> str:
    """``workload_data`` as the engine stores it; PayloadTooLarge (413) past ``limit`` bytes
    (``server.max_workload_data_bytes``), so no client keeps large blobs in Redis for a day."""
    text = json.dumps(data, sort_keys=True, default=str) if data else "{}"
    if len(text) > limit:  # ensure_ascii: one character is one byte
        raise PayloadTooLarge(
            f"workload_data is {len(text)} bytes as JSON, more than the {limit} allowed "
            "(server.max_workload_data_bytes); send hints, not data",
            details={"field": "workload_data", "bytes": len(text), "limit": limit},
        )
    return text


def _quota_row(q: dict) -> list:
    """One tenant's quota as the scripts read it: [weight, guaranteed, max_gpus, max_queued],
    -1 for no limit."""
    none = -1
    return [
        q["weight"],
        q["guaranteed_gpus"],
        none if q["max_gpus"] is None else q["max_gpus"],
        none if q["max_queued"] is None else q["max_queued"],
    ]


def tenant_args(settings) -> dict[str, str]:
    """The TENANT_* and PREEMPT* settings of every call (built once per settings object)."""
    t, pre = settings.tenants, settings.preemption
    quotas = tenant_quotas(settings)
    return {
        "TENANT_FAIR": "1" if t.fair_share else "0",
        "TENANT_HALF_LIFE": _arg_num(t.usage_half_life),
        "TENANT_QUOTAS": json.dumps({n: _quota_row(q) for n, q in quotas.items()}, sort_keys=True)
        if quotas
        else "",
        "TENANT_DEFAULT": "|".join(_arg_num(x) for x in _quota_row(t.default)),
        "TENANT_LIMITS": "1"
        if any(
            q["max_gpus"] is not None or q["max_queued"] is not None
            for q in [t.default, *quotas.values()]
        )
        else "0",
        "TENANT_KEY": tenant_key(settings),
        "PREEMPT": "1" if pre.enabled else "0",
        "PREEMPT_GRACE": _arg_num(pre.grace_period),
    }


def tenant_of(settings, owner: str, service_name: str) -> str:
    """The tenant a request counts against: its principal (``tenants.key: principal``, the
    default with auth on; a request without one, auth being off, falls back to its service)
    or its service_name."""
    if owner and tenant_key(settings) == "principal":
        return owner
    return service_name


def max_queued_per_owner(settings) -> int:
    """``scheduler.max_queued_per_owner``; 0 (the default) is a quarter of max_queue_size."""
    s = settings.scheduler
    return s.max_queued_per_owner or max(1, s.max_queue_size // 4)


def _unsatisfiable(reason: str, limit: str, ctx: dict) -> Unsatisfiable:
    limit_n = int(float(limit))
    field = reason
    if reason == "no_gpus":
        msg = "no GPUs are registered yet, so the request can never be placed"
        field = None
    elif reason == "gpu_model":
        msg = (
            f"no GPU {_on_nodes(ctx)}matches gpu_model {ctx.get('gpu_model')!r}, so the "
            "request can never be placed"
        )
    elif reason == "nodes":
        msg = f"none of the nodes {ctx.get('nodes')} is known, so the request can never be placed"
    elif reason == "no_node":
        field = "required_gpus"
        what = f" {ctx.get('gpu_model')!r}" if ctx.get("gpu_model") else ""
        msg = (
            f"no node {_on_nodes(ctx).replace('on ', 'among ')}has {ctx.get('required_gpus')} "
            f"GPUs{what} with at least {ctx.get('min_memory_mb')} MB (the most is {limit_n});"
            " all GPUs of an allocation sit on one node"
        )
    elif reason == "max_gpus":
        field = "required_gpus"
        gpus = 1 if ctx.get("sharing") == "shared" else ctx.get("required_gpus")
        msg = (
            f"the request needs {gpus} GPUs at once, more than tenant {ctx.get('tenant')!r} "
            f"may hold (max_gpus {limit_n}), so it can never be granted"
        )
    elif reason == "required_gpus":
        msg = (
            f"required_gpus={ctx.get('required_gpus')} exceeds the largest node "
            f"({limit_n} GPUs); all GPUs of an allocation sit on one node"
        )
    elif reason == "preferred_gpus":
        msg = (
            f"preferred_gpus={ctx.get('preferred_gpus')} names a GPU index that no node "
            f"has: the largest node has {limit_n} GPUs (indexes 0-{limit_n - 1})"
        )
    else:
        msg = f"min_memory_mb={ctx.get('min_memory_mb')} exceeds the largest GPU ({limit_n} MB)"
    return Unsatisfiable(msg, details={"field": field, "reason": reason, "limit": limit_n})


def _on_nodes(ctx: dict) -> str:
    return f"on the nodes {ctx['nodes']} " if ctx.get("nodes") else "in the fleet "


def _set_end(g: str, i: int) -> int:
    """Index of the ``]`` closing the set that opens at ``g[i]`` (fnmatch's rule: a ``!`` and
    then a ``]`` right after the ``[`` belong to the set); -1 when it is not closed."""
    j = i + 1
    if g[j : j + 1] == "!":
        j += 1
    if g[j : j + 1] == "]":
        j += 1
    return g.find("]", j)


_PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]


def _lua_set(body: str) -> str:
    """A glob's ``[...]`` as a Lua set of the very characters fnmatch's reading of it matches
    (ranges spelled out: Lua and fnmatch disagree on ranges next to ``]`` or escapes)."""
    neg = body[:1] == "!"
    rx = re.compile(fnmatch.translate("[" + (body[1:] if neg else body) + "]"))
    chars = "".join(c if c.isalnum() else "%" + c for c in _PRINTABLE if rx.match(c))
    if not chars:
        return "." if neg else "[^%s%S]"  # any character / none
    return "[" + ("^" if neg else "") + chars + "]"


def gpu_model_pattern(glob: str) -> str:
    """A case-insensitive shell glob (``*``, ``?``, ``[a-z]``, ``[!x]``) as an anchored Lua
    pattern on the lower-cased GPU name, for the placement scripts. Raises ValidationFailed."""

    def bad(msg):
        return ValidationFailed(f"gpu_model: {msg}", details={"field": "gpu_model"})

    rule = FIELDS["gpu_model"]
    if not rule.accepts(glob) or "|" in glob or not all(0x20 <= ord(c) < 0x7F for c in glob):
        raise bad(f"{rule.min_len}-{rule.max_len} printable ASCII characters, no '|'")
    g = glob.lower()
    out, i, stars = ["^"], 0, 0
    while i < len(g):
        c = g[i]
        if c == "*":
            if not out[-1] == ".*":  # a run of stars matches what one does
                out.append(".*")
                stars += 1
        elif c == "?":
            out.append(".")
        elif c == "[" and _set_end(g, i) > 0:
            end = _set_end(g, i)
            out.append(_lua_set(g[i + 1 : end]))
            i = end
        else:
            out.append(c if c.isalnum() else "%" + c)
        i += 1
    if stars > MAX_GLOB_STARS:
        raise bad(f"at most {MAX_GLOB_STARS} '*' wildcards")
    return "".join(out) + "$"


# --------------------------------------------------------------------------- records
# (declared in app/record.py)


def _gpu_view(raw: list | dict, alive_nodes: set[str]) -> dict:
    """A stored GPU hash -> what callers see (engine bookkeeping fields left out)."""
    h = raw if isinstance(raw, dict) else _pairs(raw)
    alive = h.get("node") in alive_nodes
    out: dict[str, Any] = {}
    for key, value in h.items():
        if key in (
            "index",
            "shared_n",
            "memory_total_mb",
            "memory_used_mb",
            "memory_free_mb",
            "shared_mb",
        ):
            out[key] = int(_float_or(value, 0.0))
        elif key in ("utilization", "temperature", "power_draw", "updated_at"):
            out[key] = _float_or(value, 0.0)
        elif key in ("processes", "throttle_reasons", "xid") and value[:1] in ("[", "{"):
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = None
        elif key in ("in_free", "in_busy", "excl"):
            continue
        else:
            out[key] = value
    ok = h.get("health") == "ok" and h.get("lost") != "1"
    out["cordoned"] = h.get("cordoned") == "1"
    out["lost"] = h.get("lost") == "1"
    out["node_alive"] = alive
    out["schedulable"] = ok and not out["cordoned"] and alive
    out["allocated_to"] = h.get("excl") or None
    return out


class Engine:
    """All allocation state changes; one atomic Lua script per call."""

    def __init__(self, redis, settings, *, clock: Callable[[], float] | None = None):
        self.redis = redis
        self.settings = settings
        self.clock = clock
        self.keys = Keys(settings.redis.prefix)
        k = self.keys
        self._fixed_keys = [
            k.nodes(),
            k.nodes_free(),
            k.node_sizes(),
            k.gpus(),
            k.shared_capacity(),
            k.queue(),
            k.queue_demand("exclusive"),
            k.queue_demand("shared"),
            k.queue_deadlines(),
            k.queue_unreserved(),
            k.reservations(),
            k.leases(),
            k.events(),
            k.webhook_outbox(),
            k.stats(),
            k.meta(),
            k.queue_shapes(),
            k.stats_services(),
            k.queue_owners(),
            k.tenants(),
            k.tenant_queued(),
        ]
        assert len(self._fixed_keys) == len(FIXED_KEYS)
        self._args_for = None
        self._fixed_args: dict[int, list[str]] = {}
        self._joined = ""
        # FCALLs go out packed by hand (app.redis_client.PinnedCalls) where the client allows
        self._pinned = PinnedCalls(redis) if packs(redis) else None
        self._heads: dict[str, bytes] = {}
        self._heads_for: list[str] | None = None

    # ------------------------------------------------------------------ plumbing
    def _settings_args(self, version: str | None = None, clocked: bool | None = None) -> list[str]:
        """[ARGV[1]]: the library version (``version``, else this release's), "1" when the call
        passes now (``clocked``, default: this engine has a clock) else "", the settings
        (SETTINGS order) and the prefix, joined by newlines, rebuilt only when the settings
        object changes. Sent with every call: measured, one argument costs less than reading a
        settings hash in every call."""
        s, m = self.settings.scheduler, self.settings.monitoring
        t, pre, auth = self.settings.tenants, self.settings.preemption, self.settings.auth
        if self._args_for is None or any(
            a is not b for a, b in zip(self._args_for, (s, m, t, pre, auth))
        ):
            values = {
                "POLICY": s.policy,
                "AGING": _arg_num(s.aging_rate / 60.0),
                "RES_AFTER": _arg_num(s.reservation_after),
                "HB_TIMEOUT": _arg_num(s.node_heartbeat_timeout),
                "FORGET_AFTER": _arg_num(s.node_forget_after),
                "EV_MAX": str(s.events_maxlen),
                "HIST_TTL": _arg_num(s.history_ttl),
                "HIST_TTL_S": str(math.floor(s.history_ttl)),
                "MAX_QUEUE": _arg_num(s.max_queue_size),
                "MAX_OWNER": _arg_num(max_queued_per_owner(self.settings)),
                "MAX_SVC_LABELS": _arg_num(m.max_service_labels),
                **tenant_args(self.settings),
            }
            joined = [values[n] for n, _ in SETTINGS]
            assert not any("\n" in v for v in joined), joined
            assert "\n" not in library_source()[0]
            self._joined = "\n".join([*joined, self.keys.prefix])
            ours = library_source()[0]
            self._fixed_args = {c: [f"{ours}\n{'1' if c else ''}\n{self._joined}"] for c in (0, 1)}
            self._args_for = (s, m, t, pre, auth)  # auth: TENANT_KEY follows auth.enabled
        if clocked is None:
            clocked = self.clock is not None
        if version is not None and version != library_source()[0]:
            return [f"{version}\n{'1' if clocked else ''}\n{self._joined}"]
        return self._fixed_args[1 if clocked else 0]

    def load_library(self) -> str:
        """Load (or replace) the engine's Functions library on the server; its version."""
        version, source = library_source()
        self.redis.execute_command("FUNCTION", "LOAD", "REPLACE", source)
        return version

    def _fcall(self, name: str, args: list) -> Any:
        """FCALL (FCALL_RO for READ_ONLY) of one engine function. The library is loaded when
        the server has none (a restart without persistence, FUNCTION FLUSH) or another
        version (an upgrade, or a replica of another release replaced it): once, then the
        call is retried once. With ``redis.min_replicas_ack`` a write waits for its replicas
        (app/replication.py). Otherwise the call's fixed arguments go out packed once per
        function (:meth:`_packed`, app.redis_client.PinnedCalls)."""
        version, _ = library_source()
        acks = self.settings.redis.min_replicas_ack
        acked = bool(acks) and name not in READ_ONLY and name not in UNACKED
        for attempt in (0, 1):
            try:
                if self._pinned is not None and not acked:
                    res = self._pinned.call(self._packed(name, args))
                else:
                    command = self._command(name, args)
                    if acked:
                        res = write_acked(
                            self.redis, command, acks, self.settings.redis.replica_ack_timeout
                        )
                    else:
                        res = self.redis.execute_command(*command)
            except ResponseError as exc:
                if "function not found" not in str(exc).lower():
                    raise
                if attempt:  # replaced by a release without this function since our load
                    raise _upgrading(name, version, None) from None
                self.load_library()
                continue
            if isinstance(res, list) and len(res) == 2 and res[0] == _STALE:
                if attempt:  # another release loaded its version again since our load
                    raise _upgrading(name, version, res[1])
                self.load_library()
                continue
            return res
        raise AssertionError("unreachable")

    def _head(self, name: str) -> tuple:
        """The start of every FCALL of ``name``: command, function, number of keys, the keys."""
        keys = self._fixed_keys
        return ("FCALL_RO" if name in READ_ONLY else "FCALL", f"{LIBRARY}_{name}", len(keys), *keys)

    def _command(self, name: str, args: list) -> tuple:
        """The FCALL of ``name`` with ``args`` (now, "" without a clock, then the function's
        own), as ``execute_command`` takes it: the common argument, now when there is one, the
        function's own arguments."""
        now = args[0]
        fixed = self._settings_args(clocked=now != "")
        return (*self._head(name), *fixed, *(args if now else args[1:]))

    def _packed(self, name: str, args: list) -> bytes:
        """:meth:`_command` packed as RESP (tests/test_redis_client.py checks it is byte for
        byte what redis-py packs: a change to one must change the other).
        What never changes between calls (command, function, the fixed keys, the common
        argument) is packed once per function, settings object and clock flag."""
        now = args[0]
        fixed = self._settings_args(clocked=now != "")
        if self._heads_for is not fixed:
            self._heads = {}
            self._heads_for = fixed
        head = self._heads.get(name)
        if head is None:
            head = bulk(self._head(name)) + bulk(fixed)
            self._heads[name] = head
        rest = args if now else args[1:]
        # command, function, numkeys, the keys, the common argument, now (if any), the arguments
        count = 4 + len(self._fixed_keys) + len(rest)
        return b"*%d\r\n%b%b" % (count, head, bulk(rest))

    def _run(self, name: str, *args, ctx: dict | Callable[[], dict] | None = None):
        """One engine function; an error it returns is raised with ``ctx`` (the call's
        context for the message: a dict, or a function building it when one is raised)."""
        now = "" if self.clock is None else repr(float(self.clock()))
        res = self._fcall(name, [now, *args])
        if isinstance(res, list) and res and isinstance(res[0], int) and res[0] < 0:
            code = res[0]
            if code == _RETRY_ID:
                return res
            raise ERRORS[code]((ctx() if callable(ctx) else ctx) or {}, res[1:])
        return res

    def now(self) -> float:
        """The engine's clock: the injected one, else Redis TIME."""
        if self.clock is not None:
            return float(self.clock())
        sec, usec = self.redis.time()
        return sec + usec / 1e6

    # ------------------------------------------------------------------ fleet
    def report_node(
        self, node: str, gpus: list[dict], *, backend: str = "", host: str = ""
    ) -> list[dict]:
        """Upsert the node's heartbeat and every GPU's telemetry; returns grants made."""
        if not node_name_ok(node):
            raise ValidationFailed(
                f"bad node name {node!r} ({NODE_NAME_RULE})", details={"field": "node"}
            )
        rows = [self._gpu_fields(g) for g in gpus]
        res = self._run("report_node", node, backend, host, json.dumps(rows))
        return [parse_record(r) for r in res]

    @staticmethod
    def _gpu_fields(g: dict) -> dict[str, str]:
        try:
            index = int(g["index"])
        except (KeyError, TypeError, ValueError):
            raise ValidationFailed(
                "each GPU needs an integer index", details={"field": "index"}
            ) from None
        health = g.get("health", "ok")
        if health not in HEALTH:
            raise ValidationFailed(
                f"health must be one of {', '.join(HEALTH)}", details={"field": "health"}
            )
        total = float(g.get("memory_total_mb") or 0)
        used = float(g.get("memory_used_mb") or 0)
        free = g.get("memory_free_mb")
        free = max(total - used, 0.0) if free is None else float(free)
        out = {
            "index": str(index),
            "uuid": str(g.get("uuid") or ""),
            "name": str(g.get("name") or ""),
            "memory_total_mb": _num(total),
            "memory_used_mb": _num(used),
            "memory_free_mb": _num(free),
            "utilization": _num(g.get("utilization") or 0),
            "temperature": _num(g.get("temperature") or 0),
            "power_draw": _num(g.get("power_draw") or 0),
            "health": health,
        }
        for key in _GPU_EXTRAS:
            if key in g and g[key] is not None:
                val = g[key]
                out[key] = json.dumps(val) if isinstance(val, (list, dict)) else str(val)
        return out

    def set_gpu_schedulable(
        self, node: str, index: int, schedulable: bool, *, principal: str | None = None
    ) -> dict:
        """Admin cordon (False) or clear it (True); allocations on the GPU stay."""
        res = self._run(
            "cordon",
            node,
            int(index),
            "0" if schedulable else "1",
            "0",
            principal or "",
            ctx={"what": "GPU", "id": f"{node}/{index}"},
        )
        return _gpu_view(res[1], {node} if self._node_alive(node) else set())

    def cordon_node(
        self, node: str, cordon: bool = True, *, drain: bool = False, principal: str | None = None
    ) -> dict:
        """Cordon every GPU of a node (and those it reports later), or clear that; ``drain``
        also marks it draining. Allocations on it stay until they end."""
        res = self._run(
            "cordon",
            node,
            "",
            "1" if cordon else "0",
            "1" if drain else "0",
            principal or "",
            ctx={"what": "node", "id": node},
        )
        return _node_view(_pairs(res[1]), self.now(), self.settings.scheduler)

    def drain_node(self, node: str, *, preempt: bool = True, principal: str | None = None) -> dict:
        """Cordon the node and mark it draining; with ``preempt`` every live allocation on it
        turns ``preempting`` with ``preemption.grace_period`` of notice (then ``preempted``),
        else they end when their holders release them. Returns the node's view plus
        ``preempted``: the ids marked now (one already preempting keeps its deadline)."""
        grace = _arg_num(self.settings.preemption.grace_period) if preempt else ""
        res = self._run(
            "cordon",
            node,
            "",
            "1",
            "1",
            principal or "",
            grace,
            ctx={"what": "node", "id": node},
        )
        view = _node_view(_pairs(res[1]), self.now(), self.settings.scheduler)
        view["preempted"] = list(res[3])
        return view

    def forget_node(self, node: str, *, principal: str | None = None) -> dict:
        """Forget a node that is not alive: its live allocations end as ``lost``."""
        res = self._run(
            "forget",
            node,
            principal or "",
            ctx={
                "what": "node",
                "id": node,
                "expected": "silent (cordon or drain a node that reports)",
            },
        )
        return {"node": node, "lost": list(res[1]), "granted": int(res[2])}

    def set_priority(self, request_id: str, priority: int, *, principal: str | None = None) -> dict:
        """Change a queued request's priority (1..10); it moves in the queue at once."""
        prio = _int_in(priority, FIELDS["priority"])
        res = self._run(
            "priority",
            request_id,
            prio,
            principal or "",
            ctx={"what": "request", "id": request_id, "expected": "queued"},
        )
        rec = parse_record(res[1])
        if rec.get("status") == "queued":
            rank = self.redis.zrank(self.keys.queue(), request_id)
            rec["position"] = None if rank is None else rank + 1
        return rec

    def next_lease_end(self) -> float | None:
        """The earliest lease end of a live allocation (a preempting one's is at most its
        preempt_at); None when no lease ends."""
        first = self.redis.zrange(self.keys.leases(), 0, 0, withscores=True)
        if not first or math.isinf(first[0][1]):
            return None
        return float(first[0][1])

    def node_allocations(self, node: str) -> list[str]:
        """Ids of the live allocations on a node (a scan of the leases; for drains)."""
        ids = self.redis.zrange(self.keys.leases(), 0, -1)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(self.keys.request(rid), "node")
        return [rid for rid, where in zip(ids, pipe.execute()) if where == node]

    def gpu_health(self, rec: dict) -> list[dict] | None:
        """Health of each GPU under an allocation: ok, degraded, failed, or lost (the node
        stopped reporting it, or the node itself is silent or forgotten)."""
        node, raw = rec.get("node"), rec.get("gpu_ids")
        if not node or not isinstance(raw, list) or not raw:
            return None
        try:
            ids = [int(i) for i in raw]
        except (TypeError, ValueError, OverflowError):  # a damaged record: no health to show
            return None
        pipe = self.redis.pipeline(transaction=False)
        for idx in ids:
            pipe.hmget(self.keys.gpu(node, idx), "health", "lost")
        rows = pipe.execute()
        alive = self._node_alive(node)
        out = []
        for idx, (health, lost) in zip(ids, rows):
            if health is None or lost == "1" or not alive:
                health = "lost"
            out.append({"index": idx, "health": health})
        return out

    def _node_alive(self, node: str) -> bool:
        hb = self.redis.zscore(self.keys.nodes(), node)
        return hb is not None and hb >= self.now() - self.settings.scheduler.node_heartbeat_timeout

    def fleet_limits(self) -> dict:
        """Largest node (GPUs), largest GPU (MB) and the GPU count; three O(1)/O(log n) reads."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrange(self.keys.node_sizes(), 0, 0, withscores=True)
        pipe.zrevrange(self.keys.gpus(), 0, 0, withscores=True)
        pipe.zcard(self.keys.gpus())
        sizes, mems, total = pipe.execute()
        return {
            "max_gpus_per_node": int(sizes[0][1]) if sizes else 0,
            "max_gpu_memory_mb": int(mems[0][1]) if mems else 0,
            "gpus_total": int(total),
        }

    # ------------------------------------------------------------------ requests
    def allocate(
        self, req: dict, *, idempotency_key: str | None = None, request_hash: str | None = None
    ) -> dict:
        """Grant now or queue; see the module docstring and docs/engine.md for the rules.

        An idempotency key replays the request first stored under it when ``request_hash``
        matches, and is a Conflict otherwise. Keys are per owner (``req["owner"]``): one team's
        key never returns another team's request; errors show the key as the client sent it. ``request_hash`` defaults to a hash of the
        normalised engine request; the API passes a hash of what the client sent, so a retry
        whose workload analysis came out differently (advisor vs rules) still replays.
        """
        fields, _ = self._request_fields(req)
        if (
            idempotency_key
            and not isinstance(req, CheckedRequest)
            and not idempotency_key_ok(idempotency_key)
        ):
            raise bad_field("idempotency_key", IDEMPOTENCY_KEY_RULE)
        body_hash = ""
        if idempotency_key:
            # the normalised request: an omitted default and the same value spelled out match
            # the tenant is derived (owner or service, and the config): not part of the hash,
            # so keys stored before tenants existed still replay
            hashed = {k: v for k, v in fields.items() if k != "tenant"}
            body_hash = (
                request_hash
                or hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:32]
            )

        def ctx() -> dict:  # for an error's message only: built when one is raised
            return {
                "key": idempotency_key,
                "required_gpus": fields["required_gpus"],
                "min_memory_mb": fields["min_memory_mb"],
                "gpu_model": fields["gpu_model"],
                "nodes": json.loads(fields["nodes"]),
                "preferred_gpus": json.loads(fields["preferred_gpus"]),
                "sharing": fields["sharing"],
                "tenant": fields["tenant"],
            }

        scoped_key = f"{fields['owner']}|{idempotency_key}" if idempotency_key else ""
        flat = stored(fields)  # fields at their default are not stored (app/record.py)
        # the body's hash and the key's lifetime travel only with a key
        idem = (body_hash, repr(self.settings.scheduler.idempotency_ttl)) if scoped_key else ()
        for _ in range(5):
            rid = new_id(fields["service_name"])
            res = self._run("allocate", rid, scoped_key, *idem, *flat, ctx=ctx)
            if isinstance(res, str) or res[0] != _RETRY_ID:
                break
        else:  # pragma: no cover - five id collisions in a row
            raise Conflict("could not allocate a unique request id; retry")
        if isinstance(res, str):
            # the new request: "position|submitted_at|grant" (includes/allocate.lua); the
            # record as stored is what was sent (parse_record fills in the defaults left out)
            # and what the script added
            position, submitted, grant = res.split("|", 2)
            raw = {"id": rid, "status": "queued", "submitted_at": submitted}
            raw.update(zip(flat[0::2], flat[1::2]))
            if grant:  # "status|node|expires_at|allocated_at|wait|gpu_ids|gpu_uuids"
                st, node, expires, allocated, wait, ids, uuids = grant.split("|", 6)
                raw.update(status=st, node=node, expires_at=expires, gpu_ids=ids, gpu_uuids=uuids)
                if allocated:  # not stored when granted at its submission (parse_record)
                    raw["allocated_at"] = allocated
                if wait:
                    raw["wait_time_seconds"] = wait
            rec = parse_record(raw)
            replayed = False
        else:  # [2, record JSON, position]: an idempotent replay
            rec = parse_record(res[1])
            position, replayed = res[2], True
        if position := int(position):
            rec["position"] = position
        rec["replayed"] = replayed
        return rec

    def _request_fields(self, req: dict) -> tuple[dict[str, str], float]:
        """The request as the fields allocate stores. A :class:`CheckedRequest` (the API's,
        built from a validated body) is taken as it is; anything else is checked against
        app.request_rules first."""
        if isinstance(req, CheckedRequest):
            data_json = req.workload_data_json
        else:
            check(req)
            data_json = None
        s = self.settings.scheduler
        g = given_fields(req)
        svc = req["service_name"]
        prio = g.get("priority", _DEFAULT["priority"])
        gpus = g.get("required_gpus", _DEFAULT["required_gpus"])
        min_mb = g.get("min_memory_mb", _DEFAULT["min_memory_mb"])
        max_mb = g.get("max_memory_mb", _DEFAULT["max_memory_mb"])
        sharing = g.get("sharing", _DEFAULT["sharing"])
        check_together(gpus, min_mb, max_mb, sharing)
        pref = g.get("preferred_gpus")
        events = g.get("webhook_events")
        deps = g.get("depends_on")
        model = g.get("gpu_model") or ""
        nodes = g.get("nodes")
        owner = g.get("owner") or ""
        ttl = req.get("ttl_seconds")
        estimate = req.get("estimated_duration_seconds")
        lease = self.lease_for(ttl, estimate)
        qt = req.get("queue_timeout_seconds")
        qt = s.queue_timeout if qt is None else float(qt)
        if data_json is None:
            data_json = workload_data_json(
                req.get("workload_data"), self.settings.server.max_workload_data_bytes
            )
        fields = {
            "service_name": svc,
            "owner": owner,
            "workload_type": g.get("workload_type", _DEFAULT["workload_type"]),
            "workload_data": data_json,
            "priority": str(int(prio)),
            "required_gpus": str(int(gpus)),
            "min_memory_mb": str(int(min_mb)),
            "max_memory_mb": str(int(max_mb)),
            "max_utilization": _num(g.get("max_utilization", _DEFAULT["max_utilization"])),
            "preferred_gpus": json.dumps(sorted(set(pref))) if pref else "[]",
            "sharing": sharing,
            "ttl_seconds": "" if ttl is None else _num(ttl),
            "estimated_duration_seconds": "" if estimate is None else _num(estimate),
            "lease_seconds": _num(lease),
            "webhook_url": g.get("webhook_url") or "",
            "webhook_events": json.dumps(list(dict.fromkeys(events))) if events else "[]",
            "depends_on": json.dumps(list(dict.fromkeys(deps))) if deps else "[]",
            "depends_on_mode": g.get("depends_on_mode", _DEFAULT["depends_on_mode"]),
            "queue_timeout_seconds": _num(qt),
            "reserved_node": "",
            "gpu_model": model,
            "gpu_pattern": gpu_model_pattern(model) if model else "",
            "nodes": json.dumps(sorted(set(nodes))) if nodes else "[]",
            "tenant": tenant_of(self.settings, owner, svc),
        }
        return fields, qt

    def lease_for(self, ttl: float | None, estimate: float | None) -> float:
        """Lease seconds (-1 = no expiry): ttl, else estimate x multiplier, else default_ttl;
        never more than ``max_ttl`` (when set) nor :data:`MAX_LEASE_SECONDS`."""
        s = self.settings.scheduler
        if ttl is not None:
            ttl = _float_nonneg(ttl, "ttl_seconds")  # renew's argument, checked nowhere else
            if ttl == 0:
                if not s.allow_infinite_ttl:
                    raise ValidationFailed(
                        "ttl_seconds: 0 (no expiry) is not allowed here",
                        details={"field": "ttl_seconds"},
                    )
                return -1.0
            limit = min(s.max_ttl, MAX_LEASE_SECONDS) if s.max_ttl else MAX_LEASE_SECONDS
            if ttl > limit:
                raise ValidationFailed(
                    f"ttl_seconds: at most {limit:g}",
                    details={"field": "ttl_seconds", "max": limit},
                )
            return ttl
        if estimate is not None:
            lease = float(estimate) * s.default_ttl_multiplier
        else:
            lease = s.default_ttl
        if s.max_ttl:
            lease = min(lease, s.max_ttl)
        return min(lease, MAX_LEASE_SECONDS)

    def release(
        self, allocation_id: str, *, principal: str | None = None, admin: bool = False
    ) -> dict:
        """End a live allocation (a still-queued request is cancelled instead). Returns the
        ending, not the whole record (``get`` reads that): id, status (released, preempted
        for a preempting allocation, cancelled for a queued request), service_name, ended_at
        and released_at (None for a cancel)."""
        # the principal and the admin flag travel only when they say something
        who = (principal or "", "1") if admin else (principal,) if principal else ()
        res = self._run(
            "release", allocation_id, *who, ctx={"what": "allocation", "id": allocation_id}
        )
        _, status, ended, released, service = res.split("|", 4)
        return {
            "id": allocation_id,
            "status": status,
            "service_name": service,
            "ended_at": float(ended),
            "released_at": float(released) if released else None,
        }

    def release_by_service(
        self, service_name: str, *, principal: str | None = None, admin: bool = False
    ) -> list[dict]:
        res = self._run(
            "release_service",
            service_name,
            principal or "",
            "1" if admin else "0",
            ctx={"what": "live allocation of service", "id": service_name},
        )
        return [parse_record(r) for r in res[1]]

    def renew(
        self,
        allocation_id: str,
        ttl_seconds: float | None = None,
        *,
        principal: str | None = None,
        admin: bool = False,
    ) -> dict:
        lease = "" if ttl_seconds is None else _num(self.lease_for(ttl_seconds, None))
        res = self._run(
            "renew",
            allocation_id,
            lease,
            principal or "",
            "1" if admin else "0",
            ctx={"what": "allocation", "id": allocation_id, "expected": "live"},
        )
        return parse_record(res[1])

    def cancel(self, request_id: str, *, principal: str | None = None, admin: bool = False) -> dict:
        res = self._run(
            "cancel",
            request_id,
            principal or "",
            "1" if admin else "0",
            ctx={"what": "request", "id": request_id, "expected": "queued"},
        )
        return parse_record(res[1])

    def get(self, request_id: str) -> dict:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.keys.request(request_id))
        pipe.zrank(self.keys.queue(), request_id)
        raw, rank = pipe.execute()
        if not raw:
            raise _not_found("request", request_id)
        rec = parse_record(raw)
        if rank is not None:
            rec["position"] = rank + 1
        return rec

    def watch(self, request_id: str) -> dict:
        """:meth:`get` for a long-poll (app/longpoll.py) whose listener has subscribed: marks a
        queued or live record ``watched`` in the same atomic step, so that the engine publishes
        its next status change (a release of an unwatched allocation publishes nothing)."""
        raw, rank = self._run("watch", request_id)
        if not raw:
            raise _not_found("request", request_id)
        rec = parse_record(raw)
        if rank >= 0:
            rec["position"] = rank + 1
        return rec

    def schedule_pass(self, *, force: bool = True) -> list[dict]:
        """Grant what fits now. ``force=False`` skips the walk when no capacity appeared since
        the last pass (the passes inside allocate/release/report already work that way)."""
        return [parse_record(r) for r in self._run("schedule", "1" if force else "0")]

    def reap(self, limit: int = 1000) -> dict:
        """End what is due: ``expired`` leases, ``timed_out`` queued requests, ``forgotten``
        silent nodes (their allocations ``lost``), the ``granted`` records of the pass that
        follows; ``preempted``: allocations whose preempt_at came (the key is there only when
        some were)."""
        expired, timed_out, granted, forgotten, lost, preempted = self._run("reap", int(limit))
        out = {
            "expired": list(expired),
            "timed_out": list(timed_out),
            "granted": [parse_record(r) for r in granted],
            "forgotten": list(forgotten),
            "lost": list(lost),
        }
        if preempted:
            out["preempted"] = list(preempted)
        return out

    # ------------------------------------------------------------------ views
    def snapshot(
        self,
        *,
        requests: bool = True,
        queue: bool = True,
        limit: int | None = None,
        after: str | None = None,
        wait: int = 0,
    ) -> dict:
        """One consistent view: GPUs, nodes, and one page of the live allocations (lease order)
        then the queue (rank order), as compact records (no ``workload_data``).

        ``wait``: also read, in the same script, what app/waiting.py simulates for the first
        ``wait`` queued requests (the answer's ``wait``: ``held``, ``queue``, ``deps``).

        ``requests=False``: GPUs and nodes only (the metrics scrape). ``queue=False``: no queue
        (the simulated monitor only needs what is held). ``limit``: most records on the page
        (None = all); ``after``: the ``next`` cursor of the previous page. The answer also
        carries ``allocations_total``, ``queue_depth`` and ``next`` (None on the last page).
        Redis time per call is O(GPUs + limit x log n), whatever the queue's length.
        """
        if after is not None and not valid_cursor(after):
            raise ValidationFailed(
                "after: a cursor from a listing's next field", details={"field": "after"}
            )
        if requests:
            data = json.loads(
                self._run(
                    "snapshot",
                    "all" if queue else "allocations",
                    "" if limit is None else str(int(limit)),
                    after or "",
                    str(int(wait)),
                )
            )
        else:
            data = {}
        gpu_hashes, node_hashes, now = self._fleet_hashes()
        if "now" in data:
            now = float(data["now"])
            # who holds each GPU as of the page (read in its script), so the two agree
            holders = _holders(_list(data.get("held")))
            for h in gpu_hashes:
                if h:
                    excl, n, mb = holders.get(f"{h.get('node')}|{h.get('index')}", ("", 0, 0))
                    h["excl"], h["shared_n"], h["shared_mb"] = excl, str(n), _num(mb)
        nodes = []
        alive = {}
        for h in node_hashes:
            if not h:
                continue  # removed between the two reads
            view = _node_view(h, now, self.settings.scheduler)
            alive[view["name"]] = view["alive"]
            nodes.append(view)
        alive_nodes = {name for name, up in alive.items() if up}
        gpus = [_gpu_view(h, alive_nodes) for h in gpu_hashes if h]
        queue_recs = []
        start = int(data.get("queue_start") or 0)
        for pos, raw in enumerate(_list(data.get("queue")), start + 1):
            rec = parse_record(raw, compact=True)
            rec["position"] = pos
            queue_recs.append(rec)
        return {
            "now": now,
            "gpus": gpus,
            "nodes": nodes,
            "allocations": [parse_record(r, compact=True) for r in _list(data.get("allocations"))],
            "queue": queue_recs,
            "allocations_total": int(data.get("allocations_total") or 0),
            "queue_depth": int(data.get("queue_depth") or 0),
            "next": data.get("next") or None,
            **({"wait": _wait_view(data["wait"])} if isinstance(data.get("wait"), dict) else {}),
        }

    def wait_view(self, upto: int) -> dict:
        """What app/waiting.py needs to explain the first ``upto`` queued requests: who holds
        what until when and the head of the queue (the ``wait`` read of one snapshot script),
        and each GPU's placement fields (pipelined HMGETs of those fields only: telemetry is as
        fresh as the monitor's last report anyway)."""
        raw = json.loads(self._run("snapshot", "allocations", "0", "", str(max(int(upto), 1))))
        now = float(raw["now"])
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(self.keys.gpus(), 0, -1)
        pipe.zrange(self.keys.nodes(), 0, -1, withscores=True)
        members, beats = pipe.execute()
        timeout = self.settings.scheduler.node_heartbeat_timeout
        alive = {name for name, hb in beats if hb >= now - timeout}
        pipe = self.redis.pipeline(transaction=False)
        keys = [m.rpartition("|") for m in members]
        for node, _, idx in keys:
            pipe.hmget(self.keys.gpu(node, idx), *_WAIT_GPU_FIELDS)
        gpus = []
        for (node, _, idx), f in zip(keys, pipe.execute() if keys else [], strict=True):
            health, cordoned, lost, total, free, util, name = f
            gpus.append(
                {
                    "node": node,
                    "index": _to_int(idx) or 0,
                    "schedulable": health == "ok"
                    and cordoned != "1"
                    and lost != "1"
                    and node in alive,
                    "memory_total_mb": _float_or(total, 0.0),
                    "memory_free_mb": _float_or(free, 0.0),
                    "utilization": _float_or(util, 0.0),
                    "name": name or "",
                }
            )
        wait = raw.get("wait")
        return {
            "now": now,
            "gpus": gpus,
            "allocations": [],
            "queue": [],
            "wait": _wait_view(wait) if isinstance(wait, dict) else {},
        }

    def _fleet_hashes(self) -> tuple[list[dict], list[dict], float]:
        """Every GPU's and node's hash (in index order) and the clock, in two pipelined round
        trips of short commands: a 1,024-GPU fleet read inside one script held Redis for
        milliseconds on every listing and scrape. Each hash is read atomically; the set of
        them is as of this call (a GPU or node removed in between is left out)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(self.keys.gpus(), 0, -1)
        pipe.zrange(self.keys.nodes(), 0, -1)
        pipe.time()
        members, node_names, (sec, usec) = pipe.execute()
        now = float(self.clock()) if self.clock is not None else sec + usec / 1e6
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            node, _, idx = member.rpartition("|")
            pipe.hgetall(self.keys.gpu(node, idx))
        for node in node_names:
            pipe.hgetall(self.keys.node(node))
        hashes = pipe.execute() if members or node_names else []
        return hashes[: len(members)], hashes[len(members) :], now

    def counts(self, *, nodes: bool = False) -> dict:
        """Gauges from the indexes; GPUs of silent nodes are in neither GPU count.
        ``nodes=True`` adds nodes_total and nodes_alive."""
        a, busy, q, total, avail, n_total, n_alive = self._run("counts")
        out = {
            "allocations_active": int(a),
            "gpus_allocated": int(busy),
            "queue_depth": int(q),
            "gpus_total": int(total),
            "gpus_available": int(avail),
        }
        if nodes:
            out.update(nodes_total=int(n_total), nodes_alive=int(n_alive))
        return out

    def own_tenants(self, owner: str) -> set[str]:
        """The tenants ``owner``'s live and queued requests count against (records from before
        tenants, with none, are left out), read from the live allocations and the owner's own
        index of its queued requests (keys.queue_owner_tenants): the queue's length does not
        matter."""
        return set(self._run("own_tenants", owner)) if owner else set()

    def tenants(self, include: tuple[str, ...] = ()) -> list[dict]:
        """Every tenant the engine knows of (the configured ones, and every tenant holding
        GPUs, waiting, or with usage left), by name: its quota (``weight``,
        ``guaranteed_gpus``, ``max_gpus``, ``max_queued``), ``gpus_held``, ``queued``,
        ``usage_gpu_hours`` (decayed with ``tenants.usage_half_life``, as of now) and
        ``fair_share``: its weight over the weights of the tenants that hold or wait for GPUs
        now (the fraction of the fleet fair share gives it; 0 while it does neither).
        ``include``: tenants to list even when the engine has nothing on them."""
        flat = list(self._run("tenant_list"))
        for name in include:
            if name not in flat[0::4]:
                flat += [name, "0", "0", "0"]
        rows = []
        for i in range(0, len(flat) - 3, 4):
            name = flat[i]
            q = tenant_quota(self.settings, name)
            rows.append(
                {
                    "tenant": name,
                    "weight": q["weight"],
                    "guaranteed_gpus": q["guaranteed_gpus"],
                    "max_gpus": q["max_gpus"],
                    "max_queued": q["max_queued"],
                    "gpus_held": int(float(flat[i + 1])),
                    "queued": int(flat[i + 3]),
                    "usage_gpu_hours": _float_or(flat[i + 2], 0.0) / 3600.0,
                }
            )
        active = sum(r["weight"] for r in rows if r["gpus_held"] or r["queued"])
        for r in rows:
            r["fair_share"] = (
                r["weight"] / active if active and (r["gpus_held"] or r["queued"]) else 0.0
            )
        return sorted(rows, key=lambda r: r["tenant"])

    def fair_usage(self) -> dict[str, tuple[float, float]]:
        """tenant -> (decayed usage in GPU-seconds as of now, weight) of the configured tenants
        and those with usage left: the inputs of the fair order (app/waiting.py). Any other
        tenant has no usage and the default weight. Unlike :meth:`tenants` it does not read
        every tenant with a queued request (with ``tenants.key: service_name`` a client makes
        one per service name: 3,000 made each read of a queued request's reason and eta
        39 ms of Redis more)."""
        flat = list(self._run("tenant_list", "usage"))
        return {
            flat[i]: (
                _float_or(flat[i + 2], 0.0),
                float(tenant_quota(self.settings, flat[i])["weight"]),
            )
            for i in range(0, len(flat) - 3, 4)
        }

    def stats(self) -> dict:
        """Cluster-wide counters: allocations[service][status], scheduler counters, wait histogram
        (cumulative buckets, Prometheus style), and webhook results (``webhook|<result>``
        fields, written by the delivery workers)."""
        raw = self.redis.hgetall(self.keys.stats())
        allocations: dict[str, dict[str, int]] = {}
        scheduler: dict[str, int] = {}
        per_bucket: dict[str, int] = {}
        webhooks = dict.fromkeys(WEBHOOK_RESULTS, 0)
        preemptions: dict[str, int] = {}
        wait_sum = 0.0
        for field, value in raw.items():
            parts = field.split("|")
            if parts[0] == "alloc" and len(parts) >= 3:
                svc, status = "|".join(parts[1:-1]), parts[-1]
                allocations.setdefault(svc, {})[status] = int(value)
            elif parts[0] == "sched":
                scheduler[parts[1]] = int(value)
            elif field == "wait|sum":
                wait_sum = float(value)
            elif parts[:2] == ["wait", "le"]:
                per_bucket[parts[2]] = int(value)
            elif parts[0] == "webhook" and len(parts) == 2:
                webhooks[parts[1]] = int(value)
            elif parts[0] == "preempt" and len(parts) >= 2:
                preemptions["|".join(parts[1:])] = int(value)
        # every grant counts in alloc|<service>|allocated; the scripts count those from the
        # queue in sched|from_queue, the rest were immediate (an older release also kept
        # sched|immediate: the same number, derived the same way here)
        granted = sum(by.get("allocated", 0) for by in allocations.values())
        scheduler["immediate"] = max(0, granted - scheduler.get("from_queue", 0))
        # an immediate grant waited 0 s: the scripts count it in no bucket
        buckets, running = [], scheduler["immediate"]
        for b in WAIT_BUCKETS:
            running += per_bucket.get(_bucket_label(b), 0)
            buckets.append((float(b), running))
        buckets.append((math.inf, running + per_bucket.get("+Inf", 0)))
        scheduler["granted"] = scheduler["immediate"] + scheduler.get("from_queue", 0)
        wait_count = scheduler["granted"]
        return {
            "allocations": allocations,
            "scheduler": scheduler,
            "wait": {"buckets": buckets, "sum": wait_sum, "count": wait_count},
            "webhooks": webhooks,
            "preemptions": preemptions,
        }

    def events(self, after: str = "-", count: int = 100) -> list[dict]:
        start = "-" if after in ("-", "", None) else "(" + after
        return [
            _event(entry_id, fields)
            for entry_id, fields in self.redis.xrange(self.keys.events(), start, "+", count=count)
        ]

    def latest_events(self, count: int = 50) -> list[dict]:
        """The newest ``count`` events, newest first."""
        return [
            _event(entry_id, fields)
            for entry_id, fields in self.redis.xrevrange(self.keys.events(), "+", "-", count=count)
        ]


# --------------------------------------------------------------------------- helpers


def _event(entry_id: str, fields: dict) -> dict[str, Any]:
    ev: dict[str, Any] = {"id": entry_id, **fields}
    if "ts" in ev:
        ev["ts"] = float(ev["ts"])
    for key in ("gpu_ids", "gpu_uuids", "gpus"):
        if key in ev:
            ev[key] = json.loads(ev[key])
    return ev


def _node_view(h: dict, now: float, sched) -> dict[str, Any]:
    """A stored node hash -> what callers see: alive, heartbeat age, admin marks."""
    hb = _float_or(h.get("heartbeat"), 0.0)
    return {
        "name": h.get("name"),
        "heartbeat": hb,
        "alive": hb >= now - sched.node_heartbeat_timeout,
        "heartbeat_age_seconds": round(max(now - hb, 0.0), 3),
        "gpu_count": int(_float_or(h.get("gpu_count"), 0)),
        "backend": h.get("backend", ""),
        "host": h.get("host", ""),
        "cordoned": h.get("cordoned") == "1",
        "draining": h.get("draining") == "1",
    }


_rng = random.Random()
_rng_seeded = False


def _reseed() -> None:
    _rng.seed(secrets.token_bytes(16))


def new_id(service_name: str) -> str:
    """``<service>-<ms>-<8 random digits>``. The digits come from a PRNG seeded from the OS once
    per process and again in every forked child (a ``getrandom`` or ``getpid`` syscall per id
    is measurable on a VM); the allocate script refuses an id that exists and the caller
    retries, so even a twin is safe."""
    global _rng_seeded
    if not _rng_seeded:
        _reseed()
        os.register_at_fork(after_in_child=_reseed)
        _rng_seeded = True
    return f"{service_name}-{int(time.time() * 1000)}-{_rng.randrange(10**8):08d}"


def _bucket_label(b: float) -> str:
    return f"{b:g}"


def _num(x: Any) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _lua_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _lua_concat(template: str, params: list[str]) -> str:
    """A Lua expression filling the template's %s holes with params, by concatenation
    (``'{p}:gpu:' .. n .. ':' .. i``): string.format goes through snprintf in Lua 5.1."""
    parts = template.split("%s")
    out = [_lua_str(parts[0])] if parts[0] else []
    for param, text in zip(params, parts[1:]):
        out.append(param)
        if text:
            out.append(_lua_str(text))
    return " .. ".join(out)


def _arg_num(x: float) -> str:
    """A number as an argument Lua's tonumber reads back exactly (inf as 1e999)."""
    x = float(x)
    if math.isinf(x):
        return "1e999" if x > 0 else "-1e999"
    return repr(x)


def _lua_num(x: float) -> str:
    """A number literal that is safe anywhere in an expression (negatives in parentheses:
    ``a -(-1.0)``, never ``a --1.0``, which Lua reads as a comment)."""
    x = float(x)
    text = "math.huge" if math.isinf(x) else repr(abs(x))
    return f"(-{text})" if x < 0 else text


_CURSOR = re.compile(r"[aq]\|([^|]{1,40})\|[A-Za-z0-9._:-]{1,200}")


def valid_cursor(text: str) -> bool:
    """A listing cursor (``next``): ``a|<score>|<id>`` or ``q|<score>|<id>``."""
    m = _CURSOR.fullmatch(text)
    if not m:
        return False
    try:
        return not math.isnan(float(m.group(1)))
    except ValueError:
        return False


def _holders(flat: list) -> dict[str, tuple[str, int, float]]:
    """``node|index`` -> (exclusive holder, shared allocations, MB they reserve), from the
    snapshot script's flat list of live allocations (id, node, gpu_ids, sharing, min MB)."""
    out: dict[str, tuple[str, int, float]] = {}
    for i in range(0, len(flat) - 4, 5):
        rid, node, ids, sharing, min_mb = flat[i : i + 5]
        try:
            gpu_ids = [int(x) for x in json.loads(ids)]
        except (ValueError, TypeError, OverflowError):
            continue
        for idx in gpu_ids:
            member = f"{node}|{idx}"
            excl, n, mb = out.get(member, ("", 0, 0.0))
            if sharing == "shared":
                out[member] = (excl, n + 1, mb + _float_or(min_mb, 0.0))
            else:
                out[member] = (rid, n, mb)
    return out


#: GPU fields app/waiting.py places by (Engine.wait_view).
_WAIT_GPU_FIELDS = (
    "health",
    "cordoned",
    "lost",
    "memory_total_mb",
    "memory_free_mb",
    "utilization",
    "name",
)


def _wait_view(raw: dict) -> dict:
    """The snapshot script's ``wait`` part -> records app/waiting.py reads."""
    deps, holds = raw.get("deps"), raw.get("holds")
    beyond = []
    for q in _list(raw.get("beyond")):
        if isinstance(q, dict):
            rec = parse_record(q)
            rec["position"] = _to_int(q.get("position"))
            beyond.append(rec)
    return {
        "held": [parse_record(a) for a in _list(raw.get("held")) if isinstance(a, dict)],
        "queue": [parse_record(q) for q in _list(raw.get("queue")) if isinstance(q, dict)],
        "deps": {k: (v or None) for k, v in deps.items()} if isinstance(deps, dict) else {},
        "beyond": sorted(beyond, key=lambda r: r["position"] or 0),
        "holds": {k: v for k, v in holds.items() if isinstance(v, str)}
        if isinstance(holds, dict)
        else {},
    }


def _float_or(value: Any, default: float) -> float:
    """A stored number, or ``default`` when it is missing or not a finite number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _int_in(v: Any, rule) -> int:
    if not rule.accepts(v):
        raise bad_field(rule.name, rule.expected)
    return int(v)


def _float_nonneg(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == math.inf:
        raise ValidationFailed(f"{field}: a number >= 0", details={"field": field})
    return float(v)
