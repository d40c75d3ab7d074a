"""The allocate request: each field's type, default and limits, declared once.

Everything that checks an allocate request reads :data:`FIELDS` (and :data:`HINTS`, the
explicit values a client may put in ``workload_data``):

- the API's marshmallow schemas (:mod:`app.schemas`) are built from them, so the 422 of
  ``POST /gpu/allocate`` and ``/openapi.json`` (minimum, maximum, maxLength, enum, pattern)
  follow them;
- the workload analysis (:mod:`app.workload`) checks ``workload_data`` against :data:`HINTS`;
- the engine checks a request from a direct Python caller (bench, workers, tests) with
  :func:`check`, and the settings bound the per-type defaults with the same ranges.

Each HTTP request is checked once: the API builds the engine's request from the body its
schema validated and from the analysis (whose hints were checked and whose own values stay
within these limits), and hands it over as a :class:`CheckedRequest`, which
``Engine.allocate`` takes as it is. What only the engine can know (the lease against
``scheduler.max_ttl``, the GPU model glob's Lua pattern, the size of ``workload_data``
against ``server.max_workload_data_bytes``) and the rules that tie two fields together
(:func:`check_together`) are checked by the engine on both paths.

The engine's messages (``priority: an integer in 1..10``) and the schema's (marshmallow's own
wording) differ; the limits do not, and tests/test_request_rules.py checks that each limit is
enforced the same way on both paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from app.errors import ValidationFailed

#: The service_name rule (it becomes part of request ids and of stats field names).
SERVICE_NAME_MAX = 128
SERVICE_NAME_RE = rf"^[A-Za-z0-9._-]{{1,{SERVICE_NAME_MAX}}}$"
SERVICE_NAME_RULE = f"1-{SERVICE_NAME_MAX} characters of [A-Za-z0-9._-]"
#: Request ids are ``<service_name>-<digits>...``; anything longer than this cannot be ours.
ID_RE = r"^[A-Za-z0-9._:-]{1,200}$"
#: Node names a monitor may report (node_name_ok): the engine's separators '|' and '%' are
#: out, and so are the names no ``/admin/nodes/<node>/...`` path can reach: one with a '/'
#: (two path segments), and '.' or '..' (HTTP clients drop such segments from a path).
NODE_NAME_RULE = "1-253 characters, no '|', '%' or '/', and not '.' or '..'"
#: The same rule for the names a request may give in ``nodes``: every node a monitor may
#: report can be named (a request could not name one with a space or a non-ASCII letter before).
NODE_NAME_RE = r"^(?!\.\.?$)[^|%/]{1,253}$"


def whole_match(regex: str) -> Callable[[str], re.Match | None]:
    """The check that a string matches ``regex`` as a whole: its ``fullmatch``. The rules'
    patterns end in ``$`` (they are also the OpenAPI spec's, where ``$`` ends the input), and
    Python's ``re.match`` lets ``$`` match before one trailing newline: ``"svc\n"`` passed as
    a service name, and its request id held a newline no path or body could name again."""
    return re.compile(regex).fullmatch


def node_name_ok(node: Any) -> bool:
    """Whether a monitor may report a node by this name (NODE_NAME_RULE)."""
    return (
        isinstance(node, str)
        and 0 < len(node) <= 253
        and node not in (".", "..")
        and "|" not in node
        and "%" not in node
        and "/" not in node
    )


WORKLOAD_TYPES = ("training", "inference", "embedding", "ocr", "graph_processing", "generic")
SHARING = ("exclusive", "shared")
#: ``depends_on_mode``: any ending of a dependency frees its dependents (``any``), or only a
#: normal release does and any other ending cancels them (``ok``, like Slurm's afterok).
DEPENDS_ON_MODES = ("any", "ok")
#: Shared allocations one GPU holds at most; past it the GPU takes no more until one ends.
#: Memory alone did not bound them (``min_memory_mb`` may be 0, or 1 MB: 80,000 on one 80 GB
#: GPU), and every live allocation costs a record and a share of each script that walks a
#: node's allocations (10,000 on one GPU made a drain one 0.7 s script, and a console poll
#: 0.5 s of Redis). 48 is CUDA MPS's most client processes per GPU (Volta and later), and more
#: CUDA contexts than that do not fit in a GPU's memory anyway (each takes some 300 MB).
MAX_SHARED_PER_GPU = 48
#: Events a request may opt in to with ``webhook_events`` (``allocated``, ``lost`` and
#: ``gpu_unhealthy`` are always sent to a request's webhook_url).
WEBHOOK_EVENTS = ("expired", "cancelled", "timed_out")
WEBHOOK_SCHEMES = ("http", "https")

#: The longest lease there is (10 years), whatever ``scheduler.max_ttl`` says (0 = no limit
#: of its own): every lease is finite or none, and every stored time stays representable.
#: The Lua library gets it as ``MAX_LEASE``.
MAX_LEASE_SECONDS = 10 * 365 * 86400
#: Deepest nesting accepted inside ``workload_data`` (objects and arrays both count).
MAX_WORKLOAD_DEPTH = 8
#: Most entries in ``workload_data`` summed over every level.
MAX_WORKLOAD_ITEMS = 1000
#: Most ``*`` in a ``gpu_model`` glob: Lua's matcher backtracks over each one (a GPU name is
#: short, so three cost at most a few thousand steps per GPU; twenty could stall Redis).
MAX_GLOB_STARS = 3
#: The ``Idempotency-Key`` header: 1 to this many printable ASCII characters.
MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_KEY_RULE = f"1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
#: Largest magnitude of a numeric workload hint: past it no float holds the value exactly
#: enough to compare and scale (and ``math.isfinite`` of a larger int raises OverflowError).
MAX_HINT = 1e15


@dataclass(frozen=True)
class Rule:
    """One field: ``kind`` is int, number, str, list or object; ``lo``/``hi`` bound a number
    (``above``: ``lo`` itself is refused); ``min_len``/``max_len`` bound a string's characters
    or a list's items (``item``: the rule of each item); ``expect`` is what the engine's error
    says it wanted (derived when empty)."""

    name: str
    kind: str
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    above: bool = False
    choices: tuple[str, ...] | None = None
    regex: str | None = None
    min_len: int = 0
    max_len: int | None = None
    item: Rule | None = None
    expect: str = ""

    @property
    def expected(self) -> str:
        if self.expect:
            return self.expect
        if self.choices:
            return ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
        noun = "an integer" if self.kind == "int" else "a number"
        lo, hi = _shown(self.lo), _shown(self.hi)
        if self.hi is None:
            return f"{noun} {'>' if self.above else '>='} {lo}"
        if self.above:
            return f"{noun} > {lo} and <= {hi}"
        return f"{noun} in {lo}..{hi}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "accepts", _tester(self))

    #: accepts(value) -> bool: the engine's test of one value (the schema builds marshmallow
    #: validators instead), compiled once per rule: it runs for every field of a direct
    #: caller's request and for what the workload analysis decided.
    accepts: Any = field(default=None, init=False, repr=False, compare=False)


def _shown(x: float | None) -> str:
    """A bound as messages write it: 315360000, not 3.1536e+08; 1e+15 stays short."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _tester(rule: Rule):
    """The accepts() function of one rule: a closure with its bounds bound."""
    lo, hi, above, kind = rule.lo, rule.hi, rule.above, rule.kind
    if kind in ("int", "number"):
        whole = kind == "int"

        def in_range(v) -> bool:
            t = type(v)
            if t is float:
                if not (v.is_integer() if whole else math.isfinite(v)):
                    return False  # is_integer() is False for inf and nan too
            elif t is not int:
                return False  # bool included: JSON true is not 1
            if lo is not None and (v <= lo if above else v < lo):
                return False
            return hi is None or v <= hi

        return in_range
    if kind in ("str", "list"):
        typ, min_len = (str, list)[kind == "list"], rule.min_len
        max_len = rule.max_len if rule.max_len is not None else math.inf
        choices = frozenset(rule.choices) if rule.choices is not None else None
        match = whole_match(rule.regex) if rule.regex is not None else None
        item = rule.item.accepts if rule.item is not None else None

        def sized(v) -> bool:
            if type(v) is not typ or not min_len <= len(v) <= max_len:
                return False
            if choices is not None and v not in choices:
                return False
            if match is not None and match(v) is None:
                return False
            return item is None or all(item(x) for x in v)

        return sized
    if kind == "object":
        return lambda v: type(v) is dict and workload_data_problem(v) is None
    raise AssertionError(kind)  # pragma: no cover - a declaration error


def _int(name: str, lo: int, hi: int, default: Any = None) -> Rule:
    return Rule(name, "int", default, lo, hi)


#: Every field of the engine's allocate request (the API's body has all but owner,
#: max_memory_mb, max_utilization, estimated_duration_seconds and queue_timeout_seconds,
#: which come from the caller or the analysis), with the default the engine applies.
FIELDS: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("service_name", "str", regex=SERVICE_NAME_RE, expect=SERVICE_NAME_RULE),
        Rule("owner", "str", "", expect="a principal name"),
        Rule("workload_type", "str", "generic", choices=WORKLOAD_TYPES),
        Rule(
            "workload_data",
            "object",
            expect=f"an object nested at most {MAX_WORKLOAD_DEPTH} levels, with at most "
            f"{MAX_WORKLOAD_ITEMS} entries",
        ),
        _int("priority", 1, 10, 5),
        _int("required_gpus", 1, 4096, 1),
        _int("min_memory_mb", 0, 10**9, 0),
        _int("max_memory_mb", 0, 10**9, 0),
        Rule("max_utilization", "number", 100, 0, 100),
        Rule(
            "preferred_gpus",
            "list",
            max_len=64,
            item=_int("preferred_gpus[]", 0, 4095),
            expect="a list of at most 64 GPU indexes (integers in 0..4095)",
        ),
        Rule("sharing", "str", "exclusive", choices=SHARING),
        _int("ttl_seconds", 0, MAX_LEASE_SECONDS),
        Rule("estimated_duration_seconds", "number", None, 0, MAX_LEASE_SECONDS, above=True),
        Rule(
            "webhook_url",
            "str",
            max_len=2048,
            expect="an http:// or https:// URL of at most 2048 characters",
        ),
        Rule(
            "webhook_events",
            "list",
            max_len=len(WEBHOOK_EVENTS),
            item=Rule("webhook_events[]", "str", choices=WEBHOOK_EVENTS),
            expect="a list of " + ", ".join(WEBHOOK_EVENTS),
        ),
        Rule(
            "depends_on",
            "list",
            max_len=64,
            item=Rule("depends_on[]", "str", regex=ID_RE),
            expect="a list of at most 64 request ids",
        ),
        Rule("depends_on_mode", "str", "any", choices=DEPENDS_ON_MODES),
        Rule("queue_timeout_seconds", "number", None, 0, None, above=True),
        Rule(
            "gpu_model",
            "str",
            min_len=1,
            max_len=128,
            expect=f"1-128 printable ASCII characters, no '|', at most {MAX_GLOB_STARS} '*'",
        ),
        Rule(
            "nodes",
            "list",
            min_len=1,
            max_len=64,
            item=Rule("nodes[]", "str", regex=NODE_NAME_RE, expect=NODE_NAME_RULE),
            expect="a list of at most 64 node names",
        ),
    )
}

#: ``ttl_seconds`` of a renewal: a lease from now, so 0 (no expiry) is not one.
RENEW_TTL = replace(FIELDS["ttl_seconds"], lo=1)

#: The numeric hints of ``workload_data`` the analysis reads (app.workload). Where a hint
#: sets a request field outright it keeps that field's limits, except the GPU count and
#: memory: the analysis sizes one node's worth (``workload_defaults.*.default_gpus`` shares
#: that range), and a larger request says so at the top level.
HINTS: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("batch_size", "number", None, 0, MAX_HINT),
        Rule("concurrent_requests", "number", None, 0, MAX_HINT),
        Rule("image_count", "number", None, 0, MAX_HINT),
        Rule("node_count", "number", None, 0, MAX_HINT),
        _int("required_gpus", 1, 64),
        _int("min_memory_mb", 0, 16 * 1024 * 1024),
        _int("max_memory_mb", 0, 16 * 1024 * 1024),
        replace(FIELDS["priority"], default=None),
        replace(FIELDS["max_utilization"], default=None),
        FIELDS["estimated_duration_seconds"],
        Rule("parameters_billions", "number", None, 0, 100_000, above=True),
        replace(FIELDS["priority"], name="workflow_priority", default=None),
    )
}


def _depth_and_size(value: Any, depth: int = 1) -> tuple[int, int]:
    """(deepest nesting, number of entries) of a JSON value, stopping past the limits.

    It never descends past MAX_WORKLOAD_DEPTH: a body nested as deep as the JSON parser allows
    (~900 levels) would otherwise run this walk out of stack (a 500)."""
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        return 0, 0
    deepest, count = depth, len(items)
    if depth > MAX_WORKLOAD_DEPTH:
        return deepest, count
    for item in items:
        if isinstance(item, (dict, list)):
            d, c = _depth_and_size(item, depth + 1)
            deepest, count = max(deepest, d), count + c
            if deepest > MAX_WORKLOAD_DEPTH or count > MAX_WORKLOAD_ITEMS:
                break
    return deepest, count


def workload_data_problem(value: Any) -> str | None:
    """What is wrong with ``workload_data``'s shape, or None."""
    depth, size = _depth_and_size(value)
    if depth > MAX_WORKLOAD_DEPTH:
        return f"nesting deeper than {MAX_WORKLOAD_DEPTH} levels"
    if size > MAX_WORKLOAD_ITEMS:
        return f"more than {MAX_WORKLOAD_ITEMS} entries"
    return None


def webhook_url_ok(url: str) -> bool:
    """An http(s) URL with a host (the schema uses marshmallow's URL validator, stricter on
    the host's spelling; delivery checks the address it connects to in any case)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in WEBHOOK_SCHEMES and bool(parts.hostname)


#: Each field's test: the rule's, and for webhook_url also :func:`webhook_url_ok`.
_ACCEPTS = {
    name: (lambda v, a=rule.accepts: a(v) and webhook_url_ok(v))
    if name == "webhook_url"
    else rule.accepts
    for name, rule in FIELDS.items()
}
#: The fields :func:`check` tests, each with its rank: when several are bad it names the
#: first in this order. gpu_model is checked where the engine turns it into a pattern
#: (``app.engine.gpu_model_pattern``).
_CHECKED = {
    name: (rank, a)
    for rank, (name, a) in enumerate(
        (name, a) for name, a in _ACCEPTS.items() if name != "gpu_model"
    )
}


def idempotency_key_ok(key: str) -> bool:
    return 0 < len(key) <= MAX_IDEMPOTENCY_KEY and all(0x21 <= ord(c) <= 0x7E for c in key)


def _left_to_default(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and not value)


def given(req: Mapping[str, Any], name: str) -> Any:
    """The value ``req`` gives a field, or None when it leaves it to the default (absent,
    None, or an empty string or list)."""
    value = req.get(name)
    return None if _left_to_default(value) else value


def given_fields(req: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`given` reads for every field, in one pass: the fields ``req`` gives."""
    return {k: v for k, v in req.items() if not _left_to_default(v)}


def bad(field: str, expected: str, **details: Any) -> ValidationFailed:
    """The engine's one error shape: ``field: what it expects``, details naming the field."""
    return ValidationFailed(f"{field}: {expected}", details={"field": field, **details})


def check(req: Mapping[str, Any]) -> None:
    """Raise the engine's ValidationFailed for the first field of ``req`` that breaks its
    rule. Fields left to their default (see :func:`given`) are not checked; service_name has
    none."""
    if given(req, "service_name") is None:
        raise bad("service_name", SERVICE_NAME_RULE)
    first = None  # (rank, name) of the first bad field; only what req gives is looked at
    for name, value in req.items():
        rule = _CHECKED.get(name)
        if rule is None or _left_to_default(value) or rule[1](value):
            continue
        if first is None or rule[0] < first[0]:
            first = (rule[0], name)
    if first is not None:
        raise bad(first[1], FIELDS[first[1]].expected)


def check_fields(values: Mapping[str, Any]) -> None:
    """:func:`check` for some fields only: what the workload analysis decided (its output
    goes to the engine unchecked, see :class:`CheckedRequest`)."""
    for name, value in values.items():
        if value is not None and not _ACCEPTS[name](value):
            raise bad(name, FIELDS[name].expected)


def check_together(required_gpus: int, min_mb: int, max_mb: int, sharing: str) -> None:
    """The rules that tie two fields together (the engine applies them on both paths)."""
    if max_mb and max_mb < min_mb:
        raise bad("max_memory_mb", "must be 0 (no limit) or >= min_memory_mb")
    if sharing == "shared" and required_gpus != 1:
        raise bad("required_gpus", "a shared request takes exactly one GPU")


class CheckedRequest(dict):
    """An allocate request whose every field was checked against these rules: the API
    builds one from the body its schema validated and the workload analysis, so
    ``Engine.allocate`` does not check it again. ``workload_data_json`` is the JSON text the
    API already made of ``workload_data`` (to check its size), so the engine does not encode
    it twice."""

    __slots__ = ("workload_data_json",)

    def __init__(self, workload_data_json: str, fields: Mapping[str, Any] = ()):
        super().__init__(fields)
        self.workload_data_json = workload_data_json
