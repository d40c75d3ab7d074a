"""A request's record: its fields declared once, and the one reader of a stored record.

The engine keeps each request in one Redis hash (``keys.request(id)``). This module is the
only place that names its fields: the converters of :func:`parse_record`, the request fields
``Engine.allocate`` sends, and the Lua tables the library is built with (:func:`lua_tables`:
``REC_DEFAULTS`` and ``REQ_FIELDS``, see includes/placement.lua) all come from :data:`FIELDS`.

The encoding is sparse: a request field whose value is its declared default is not stored
(most requests leave a dozen optional fields at their default, and each stored field costs
the allocate's ``HSET`` a lookup in the hash; a record of 34 fields cost ~190k of the ~1,230k
server instructions per allocate + release). Readers fill absent fields in with the default:
:func:`parse_record` here, ``REC_DEFAULTS`` in Lua. A record written in full by an earlier
release reads the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.request_rules import FIELDS as REQUEST_RULES


@dataclass(frozen=True)
class Field:
    """One record field: ``kind`` names its converter to the API type; ``default`` (request
    fields only) is the stored value that is not written, None = always written."""

    name: str
    kind: str = "str"
    default: str | None = None
    request: bool = False


def _req(name: str, kind: str = "str", default: str | None = None) -> Field:
    return Field(name, kind, default, request=True)


def _default(name: str) -> str:
    """A request field's default (app.request_rules) as allocate stores it."""
    return str(REQUEST_RULES[name].default)


#: Every field of a record, in the order allocate writes them. kind: str, opt_str ("" reads as
#: None), int, float, opt_float ("" or "-1" read as None), json (a list), json_data (a dict).
FIELDS: tuple[Field, ...] = (
    Field("id"),
    Field("status"),
    Field("submitted_at", "float"),
    _req("service_name"),
    _req("owner", "opt_str", _default("owner")),
    _req("workload_type", default=_default("workload_type")),
    _req("workload_data", "json_data", "{}"),
    _req("priority", "int", _default("priority")),
    _req("required_gpus", "int", _default("required_gpus")),
    _req("min_memory_mb", "int", _default("min_memory_mb")),
    _req("max_memory_mb", "int", _default("max_memory_mb")),
    _req("max_utilization", "float", _default("max_utilization")),
    _req("preferred_gpus", "json", "[]"),
    _req("sharing", default=_default("sharing")),
    _req("ttl_seconds", "opt_float", ""),
    _req("estimated_duration_seconds", "opt_float", ""),
    _req("lease_seconds", "opt_float"),
    _req("webhook_url", "opt_str", ""),
    _req("webhook_events", "json", "[]"),
    _req("depends_on", "json", "[]"),
    _req("depends_on_mode", default=_default("depends_on_mode")),
    _req("queue_timeout_seconds", "float"),
    _req("reserved_node", "opt_str", ""),
    _req("gpu_model", "opt_str", ""),
    _req("gpu_pattern", default=""),
    _req("nodes", "json", "[]"),
    _req("tenant"),
    # the grant's fields
    Field("node", "opt_str"),
    Field("gpu_ids", "json"),
    Field("gpu_uuids", "json"),
    Field("allocated_at", "float"),
    Field("expires_at", "opt_float"),
    Field("wait_time_seconds", "float"),
    # later changes
    Field("renewed_at", "float"),
    Field("released_at", "float"),
    Field("ended_at", "float"),
    Field("reason", "opt_str"),
    Field("failed_dependency", "opt_str"),
    Field("ok_dependents"),
    # preemption (includes/preemption.lua): when a preempting allocation ends, the request it
    # was preempted for; on that request, its victims not ended yet and when its hold lapses
    Field("preempt_at", "opt_float"),
    Field("preempted_for", "opt_str"),
    Field("preempt_pending"),
    Field("hold_until"),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
#: The fields Engine.allocate sends, in record order.
REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.request)
#: Stored value of each request field that is not written (its absence means it).
DEFAULTS: dict[str, str] = {f.name: f.default for f in FIELDS if f.default is not None}
#: The fields the scheduler reads of a queued request (load_req in includes/placement.lua;
#: req_from turns them into the request the placement sees).
SCHEDULER_FIELDS: tuple[str, ...] = (
    "service_name",
    "sharing",
    "required_gpus",
    "min_memory_mb",
    "max_memory_mb",
    "max_utilization",
    "preferred_gpus",
    "depends_on",
    "submitted_at",
    "webhook_url",
    "webhook_events",
    "lease_seconds",
    "priority",
    "reserved_node",
    "status",
    "owner",
    "gpu_pattern",
    "nodes",
    "depends_on_mode",
    "tenant",
)
#: Stored by a long-poll (Engine.watch) so that a release publishes the change; not a field
#: of the API's record.
WATCHED = "watched"
#: Left out of compact records (listings): what clients attach must not grow a listing.
NOT_LISTED = ("workload_data",)


def stored(fields: dict[str, str]) -> list[str]:
    """The request's fields as the flat name, value list allocate stores: defaults left out."""
    out = []
    for name, value in fields.items():
        if DEFAULTS.get(name) != value:
            out += (name, value)
    return out


def _lua_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def lua_tables() -> str:
    """The Lua declarations of the library's record tables (placed at its top)."""
    defaults = ", ".join(f"{name} = {_lua_str(v)}" for name, v in DEFAULTS.items())
    req = ", ".join(_lua_str(n) for n in SCHEDULER_FIELDS)
    return (
        f"local REC_DEFAULTS = {{{defaults}}}\n"
        "local REC_DEFAULTS_MT = {__index = REC_DEFAULTS}\n"
        f"local REQ_FIELDS = {{{req}}}"
    )


# --------------------------------------------------------------------------- reading


def _pairs(flat: list) -> dict:
    return dict(zip(flat[0::2], flat[1::2]))


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(x)
    return x


def _to_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return int(_finite(float(value)))


def _to_float(value: str) -> float | None:
    return _finite(float(value)) if value != "" else None


def _to_opt_float(value: str) -> float | None:
    return _finite(float(value)) if value not in ("", "-1") else None


#: Short flat JSON lists read before (GPU ids and UUIDs, node lists: a fleet has few
#: distinct ones), each decoded once; a reader gets its own copy. Emptied when full.
_LISTS_READ: dict[str, tuple] = {}
_LISTS_READ_MAX = 4096


def _to_json(value: str) -> Any:
    if value == "[]":  # most list fields: skip the decoder
        return []
    known = _LISTS_READ.get(value)
    if known is not None:
        return list(known)
    parsed = json.loads(value) if value else None
    if type(parsed) is list and len(value) <= 512 and all(type(x) in (int, str) for x in parsed):
        if len(_LISTS_READ) >= _LISTS_READ_MAX:
            _LISTS_READ.clear()
        _LISTS_READ[value] = tuple(parsed)
    return [] if parsed == {} else parsed


def _to_json_data(value: str) -> Any:
    if value == "{}":  # no workload data: skip the decoder
        return {}
    return json.loads(value) if value else None


def _to_opt_str(value: str) -> str | None:
    return value or None


_KINDS: dict[str, Callable[[str], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "opt_float": _to_opt_float,
    "json": _to_json,
    "json_data": _to_json_data,
    "opt_str": _to_opt_str,
}
#: Stored field -> converter to the API type (str fields and unknown ones stay strings).
_CONVERT: dict[str, Callable[[str], Any]] = {
    f.name: _KINDS[f.kind] for f in FIELDS if f.kind != "str"
}
_FILLED = {name: _CONVERT.get(name, str)(value) for name, value in DEFAULTS.items()}
#: The defaults a reader fills in, split: immutable values (shared) and the empty lists and
#: dicts (a fresh one per record), each also without NOT_LISTED for compact records.
_FILL_VALUES = {k: v for k, v in _FILLED.items() if not isinstance(v, (list, dict))}
_FILL_EMPTY = tuple((k, type(v)) for k, v in _FILLED.items() if isinstance(v, (list, dict)))
assert all(not v for k, v in _FILLED.items() if isinstance(v, (list, dict)))
_FILL_VALUES_COMPACT = {k: v for k, v in _FILL_VALUES.items() if k not in NOT_LISTED}
_FILL_EMPTY_COMPACT = tuple((k, t) for k, t in _FILL_EMPTY if k not in NOT_LISTED)


def parse_record(raw: dict | list | str, *, compact: bool = False) -> dict:
    """A stored request hash -> the record the API returns (plain JSON-able types). A field
    that does not convert (not a number, not finite, not JSON) becomes None. Request fields
    not stored read as their default; ``compact``: a listing's record (no NOT_LISTED)."""
    if isinstance(raw, str):
        h = json.loads(raw)
    else:
        h = _pairs(raw) if isinstance(raw, list) else raw
    convert = _CONVERT.get
    # a request's record (not an empty or foreign hash): the fields not stored read as their
    # default, filled in first and overwritten by what is stored
    request = "service_name" in h
    rec: dict[str, Any] = dict(_FILL_VALUES_COMPACT if compact else _FILL_VALUES) if request else {}
    for key, value in h.items():
        fn = convert(key)
        if fn is None:
            if key != WATCHED:
                rec[key] = value
            continue
        try:
            rec[key] = fn(value)
        except (ValueError, TypeError, OverflowError, RecursionError):
            # a value no reader can use (written by an older version, or by hand) reads as
            # absent: one bad field must not make every listing answer 500
            rec[key] = None
    if request:
        for key, empty in _FILL_EMPTY_COMPACT if compact else _FILL_EMPTY:
            if key not in rec:
                rec[key] = empty()
    if "allocated_at" not in rec and h.get("node") and "submitted_at" in rec:
        # granted at its submission: allocated_at and the wait are not stored (includes/grants.lua)
        rec["allocated_at"] = rec["submitted_at"]
        if "wait_time_seconds" not in rec:
            rec["wait_time_seconds"] = 0.0
    if "released_at" not in rec and h.get("status") == "released" and "ended_at" in rec:
        rec["released_at"] = rec["ended_at"]  # not stored: the same time (includes/grants.lua)
    if "gpu_ids" not in rec:
        rec["gpu_ids"] = []
    if "gpu_uuids" not in rec:
        rec["gpu_uuids"] = []
    for key in ("node", "allocated_at", "expires_at"):
        if key not in rec:
            rec[key] = None
    return rec
