"""Workload analysis: turn a client's description of its work into GPU requirements.

``WorkloadAnalyzer.analyze(workload_type, workload_data)`` is the one entry point; ``POST
/gpu/workload`` returns its result as is and ``POST /gpu/allocate`` allocates with it, so the two
always agree. The steps, in order of increasing precedence:

1. **Rules** from ``workload_defaults.<type>`` (the original service's per-type thresholds).
   Hints only ever raise the GPU count. Hint-derived values are clamped to the fleet (GPUs per
   node, memory of the largest GPU) and the clamp is stated in ``reasoning``.
2. **Parameter-count estimate** when ``model_name`` carries a size ("llama-3-70b",
   "Qwen2.5-14B-Instruct") or ``parameters_billions`` is given: parameters x bytes per
   parameter (``dtype``/``quantization``) x an overhead factor. A model bigger than the largest
   GPU is spread over enough GPUs of one node; one that no node can hold is Unsatisfiable. A
   known inference model family (``inference.model_families``) takes precedence over an estimate
   read from the name, so the original's documented results stay put.
3. **Advisor** (``services.deepagents_url``): when it answers in time with a usable
   recommendation, its GPUs, memory and priority replace the rules' (never below the estimate).
4. **Workflow context**: ``workflow_priority`` (or, failing that, the graph service's priority)
   replaces the priority; ``workflow_dependencies`` plus the graph service's become ``depends_on``.
5. **Explicit values** in ``workload_data`` (``required_gpus``, ``min_memory_mb``,
   ``max_memory_mb``, ``priority``, ``max_utilization``, ``estimated_duration_seconds``) win over
   everything, for every workload type.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any

from prometheus_client import Counter

from app.advisor import Advisor
from app.errors import Unsatisfiable, ValidationFailed
from app.request_rules import FIELDS, HINTS, MAX_HINT, WORKLOAD_TYPES, Rule, check_fields
from app.workflow import WorkflowClient

log = logging.getLogger(__name__)

#: Analysis results by who decided the GPUs/memory/priority: "rules" or "advisor".
DECISIONS = Counter(
    "gpu_orchestrator_workload_decisions",
    "Workload analyses by the source of the decision",
    ["source"],
)

#: Rules-only analyses a WorkloadAnalyzer remembers (see WorkloadAnalyzer.analyze's
#: ``memo_key``), and the longest key it remembers one under: at most ~0.5 MB per process.
MEMO_SIZE = 256
MEMO_KEY_MAX = 2048

#: Used when no fleet_limits callable is given, or it has nothing to say (an empty fleet).
FALLBACK_LIMITS = {"max_gpus_per_node": 8, "max_gpu_memory_mb": 81559}

#: Inference ``model_size``: (mode, MB). "cap" lowers memory to at most MB, "set" sets it.
INFERENCE_SIZES = {
    "small": ("cap", 2048),
    "medium": ("cap", 4096),
    "large": ("set", 8192),
    "xlarge": ("set", 16384),
}

#: graph_processing: memory for graphs above ``large_batch_size`` nodes (the original's 8 GB).
LARGE_GRAPH_MEMORY_MB = 8192

#: Bytes per parameter by ``dtype``.
DTYPE_BYTES = {
    "fp32": Fraction(4),
    "float32": Fraction(4),
    "fp16": Fraction(2),
    "float16": Fraction(2),
    "half": Fraction(2),
    "bf16": Fraction(2),
    "bfloat16": Fraction(2),
    "fp8": Fraction(1),
    "int8": Fraction(1),
    "int4": Fraction(1, 2),
}

#: Bytes per parameter by ``quantization`` (wins over dtype: the weights are what is stored).
QUANT_BYTES = {
    "int8": Fraction(1),
    "8bit": Fraction(1),
    "fp8": Fraction(1),
    "int4": Fraction(1, 2),
    "4bit": Fraction(1, 2),
    "nf4": Fraction(1, 2),
    "awq": Fraction(1, 2),
    "gptq": Fraction(1, 2),
}
NO_QUANT = ("", "none", "no", "off")

_MIB = 1 << 20
# A parameter count is a whole word: "70b" in "llama-3-70b", never the "7b" inside "my7bot" or
# "17b". "8x7b" (mixture of experts) counts all experts, an upper bound.
_PARAMS_RE = re.compile(r"(?<![a-z0-9.])(?:(\d{1,3})x)?(\d+(?:\.\d+)?)b(?![a-z0-9])")
_TOKEN_RE = re.compile(r"[a-z0-9]+")


def _word_in(needle: str, haystack: str) -> bool:
    """``needle`` occurs in ``haystack`` with no letter or digit glued to either end."""
    return re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", haystack) is not None


def parse_parameter_count(model_name: str) -> Fraction | None:
    """Billions of parameters named in a model name, or None ("Qwen2.5-14B" -> 14)."""
    match = _PARAMS_RE.search(model_name.lower())
    if not match:
        return None
    experts = int(match.group(1)) if match.group(1) else 1
    value = Fraction(match.group(2)) * experts
    return value if value > 0 else None


def quantization_in_name(model_name: str) -> str | None:
    """A quantization spelled as a word of the name ("Llama-2-13B-AWQ" -> "awq")."""
    tokens = set(_TOKEN_RE.findall(model_name.lower()))
    for quant in ("awq", "gptq", "int4", "4bit", "nf4", "int8", "8bit", "fp8"):
        if quant in tokens:
            return quant
    return None


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class MemoryEstimate:
    """Parameter-count arithmetic: total MB, and how it spreads over the GPUs of one node."""

    parameters_billions: float
    source: str
    precision: str
    bytes_per_parameter: float
    overhead_factor: float
    total_memory_mb: int
    gpus: int
    memory_per_gpu_mb: int
    fits: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def estimate_memory(
    parameters_billions: Fraction | float,
    bytes_per_parameter: Fraction | float,
    overhead_factor: float,
    *,
    max_gpus_per_node: int,
    max_gpu_memory_mb: int,
    power_of_two: bool = True,
    source: str = "parameters_billions",
    precision: str = "",
) -> MemoryEstimate:
    """Memory for a model and the GPUs it needs.

    total MB = ceil(params x 1e9 x bytes x overhead / 2^20). When that exceeds the largest GPU,
    the model is split over the fewest GPUs that hold it (rounded up to a power of two when
    ``power_of_two`` and the node has that many, as tensor parallelism usually wants); each then
    needs ceil(total / GPUs). ``fits`` is False when even a whole node is too small.
    """
    exact = (
        Fraction(str(parameters_billions))
        * 10**9
        * Fraction(str(bytes_per_parameter))
        * Fraction(str(overhead_factor))
        / _MIB
    )
    total = math.ceil(exact)
    gpus = max(1, math.ceil(Fraction(total, max(1, max_gpu_memory_mb))))
    if power_of_two and _next_power_of_two(gpus) <= max_gpus_per_node:
        gpus = _next_power_of_two(gpus)
    per_gpu = math.ceil(Fraction(total, gpus))
    return MemoryEstimate(
        float(parameters_billions),
        source,
        precision,
        float(bytes_per_parameter),
        float(overhead_factor),
        total,
        gpus,
        per_gpu,
        gpus <= max_gpus_per_node and per_gpu <= max_gpu_memory_mb,
    )


# --------------------------------------------------------------------------- input checking


@dataclass
class Hints:
    """``workload_data``, checked and typed. Absent fields are None."""

    batch_size: float | None = None
    concurrent_requests: float | None = None
    image_count: float | None = None
    node_count: float | None = None
    required_gpus: int | None = None
    min_memory_mb: int | None = None
    max_memory_mb: int | None = None
    priority: int | None = None
    max_utilization: float | None = None
    estimated_duration_seconds: float | None = None
    parameters_billions: float | None = None
    workflow_priority: int | None = None
    model_size: str | None = None
    model_name: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    dedicated: bool = False
    multi_gpu: bool = False
    workflow_id: str | None = None
    workflow_dependencies: list[str] = field(default_factory=list)


#: Every hint the analysis reads: the fields of :class:`Hints`, one list for both.
KNOWN_HINTS = tuple(f.name for f in fields(Hints))

#: Spellings clients use for a hint -> the hint meant (the did-you-mean of a warning, where
#: the spelling is too far from the name for difflib).
HINT_ALIASES = {
    "gpu_count": "required_gpus",
    "gpus": "required_gpus",
    "num_gpus": "required_gpus",
    "n_gpus": "required_gpus",
    "gpu_num": "required_gpus",
    "number_of_gpus": "required_gpus",
    "count": "required_gpus",
    "memory_mb": "min_memory_mb",
    "memory": "min_memory_mb",
    "gpu_memory_mb": "min_memory_mb",
    "gpu_memory": "min_memory_mb",
    "vram_mb": "min_memory_mb",
    "vram": "min_memory_mb",
    "mem_mb": "min_memory_mb",
    "model": "model_name",
    "params": "parameters_billions",
    "parameters": "parameters_billions",
    "num_parameters": "parameters_billions",
    "precision": "dtype",
    "quant": "quantization",
    "batch": "batch_size",
    "duration": "estimated_duration_seconds",
    "duration_seconds": "estimated_duration_seconds",
    "images": "image_count",
    "nodes": "node_count",
    "concurrency": "concurrent_requests",
}

#: Most warnings in one answer (a body may carry 1,000 keys); the rest are counted.
MAX_WARNINGS = 20


def hint_warnings(
    data: Any, *, top_level: tuple[str, ...] = (), advisor_used: bool = False
) -> list[str]:
    """One line per ``workload_data`` key the analysis does not read, with a did-you-mean.

    An unknown top-level field of the body is a 422; an unknown hint is not (``workload_data``
    is also handed to the advisor, which may read more), but the client must learn that the
    rules ignored it: ``{"gpu_count": 16}`` otherwise quietly gets one GPU.
    ``top_level`` names the body's own fields, so a hint that belongs there says so.
    """
    if not isinstance(data, dict):
        return []
    unknown = [key for key in data if key not in KNOWN_HINTS]
    out = []
    for key in unknown[:MAX_WARNINGS]:
        fate = "only the advisor saw it" if advisor_used else "it was ignored"
        line = f"workload_data.{key} is not a workload hint; {fate}"
        if key in top_level:
            line += f"; {key} is a top-level field of the request body"
        else:
            guess = HINT_ALIASES.get(str(key).lower()) or next(
                iter(difflib.get_close_matches(str(key).lower(), KNOWN_HINTS, n=1, cutoff=0.75)),
                None,
            )
            if guess:
                line += f"; did you mean {guess}?"
        out.append(line)
    if len(unknown) > MAX_WARNINGS:
        out.append(f"... and {len(unknown) - MAX_WARNINGS} more unknown workload_data keys")
    return out


def _is_number(v: Any) -> bool:
    """A real JSON number (not a bool) that a float holds: ints of any size are compared as
    ints, never converted (``float(10**400)`` raises OverflowError)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -MAX_HINT <= v <= MAX_HINT
    return isinstance(v, float) and math.isfinite(v) and -MAX_HINT <= v <= MAX_HINT


def _shown(v: Any) -> str:
    """A bad value for an error message, cut short (a 400-digit integer is not worth echoing)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class _Checker:
    """Collects every bad field, so one 422 names them all."""

    def __init__(self, data: dict):
        self.data, self.errors = data, {}

    def bad(self, name: str, expected: str) -> None:
        # a list of messages per field, the shape of every other 422's details
        self.errors.setdefault(f"workload_data.{name}", [expected])

    def number(self, name: str):
        """The hint ``name`` checked against its rule (app.request_rules.HINTS)."""
        if name not in self.data or self.data[name] is None:
            return None
        rule: Rule = HINTS[name]
        v = self.data[name]
        # _is_number first: an int of 400 digits is refused before anything converts it
        if not _is_number(v) or not rule.accepts(v):
            self.bad(name, f"{rule.expected}, got {_shown(v)}")
            return None
        return int(v) if rule.kind == "int" else float(v)

    def string(self, name, *, choices=None, max_len=256):
        if name not in self.data or self.data[name] is None:
            return None
        v = self.data[name]
        if not isinstance(v, str) or not v.strip() or len(v) > max_len:
            self.bad(name, f"a non-empty string of at most {max_len} characters, got {_shown(v)}")
            return None
        v = v.strip()
        if choices is not None and v.lower() not in choices:
            self.bad(name, f"one of {', '.join(choices)}, got {_shown(v)}")
            return None
        return v.lower() if choices is not None else v

    def flag(self, name):
        v = self.data.get(name)
        if v is None:
            return False
        if not isinstance(v, bool):
            self.bad(name, f"true or false, got {_shown(v)}")
            return False
        return v

    def id_list(self, name):
        """A list of request ids, as the request's own ``depends_on`` (its limits)."""
        v = self.data.get(name)
        if v is None:
            return []
        rule = FIELDS["depends_on"]
        if not isinstance(v, list) or len(v) > rule.max_len:
            self.bad(name, f"a list of at most {rule.max_len} ids, got {_shown(v)}")
            return []
        for i, item in enumerate(v):
            if not isinstance(item, str) or not rule.item.accepts(item.strip()):
                self.bad(f"{name}[{i}]", f"a request id, got {_shown(item)}")
                return []
        return list(dict.fromkeys(item.strip() for item in v))


def check_workload_type(workload_type: Any) -> str:
    if workload_type not in WORKLOAD_TYPES:
        raise ValidationFailed(
            f"unknown workload_type {workload_type!r}",
            details={"workload_type": ["one of " + ", ".join(WORKLOAD_TYPES)]},
        )
    return workload_type


def check_workload_data(workload_type: str, data: Any, training_sizes) -> Hints:
    """Typed hints; raises ValidationFailed naming every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValidationFailed(
            "workload_data must be an object",
            details={"workload_data": [f"an object, got {type(data).__name__}"]},
        )
    c = _Checker(data)
    sizes = (
        tuple(training_sizes)
        if workload_type == "training"
        else (tuple(INFERENCE_SIZES) if workload_type == "inference" else None)
    )
    hints = Hints(
        **{name: c.number(name) for name in HINTS},  # every numeric hint
        model_size=c.string("model_size", choices=sizes),
        model_name=c.string("model_name"),
        dtype=c.string("dtype", choices=tuple(DTYPE_BYTES)),
        quantization=c.string("quantization", choices=tuple(QUANT_BYTES) + NO_QUANT[1:]),
        dedicated=c.flag("dedicated"),
        multi_gpu=c.flag("multi_gpu"),
        workflow_id=c.string("workflow_id"),
        workflow_dependencies=c.id_list("workflow_dependencies"),
    )
    if (
        hints.max_memory_mb
        and hints.min_memory_mb is not None
        and hints.max_memory_mb < hints.min_memory_mb
    ):
        c.bad("max_memory_mb", f"0 (no limit) or >= min_memory_mb ({hints.min_memory_mb})")
    if c.errors:
        field, (expected,) = next(iter(c.errors.items()))
        raise ValidationFailed(f"invalid {field}: expected {expected}", details=c.errors)
    return hints


# --------------------------------------------------------------------------- the analyzer


@dataclass
class _Plan:
    gpus: int
    memory_mb: int
    priority: int
    max_utilization: float
    duration: float
    reasons: list[str]
    family: str | None = None


def _copy(analysis: dict) -> dict:
    """An analysis its reader may change: its lists and dicts copied too (one level deep;
    the estimate's values are numbers and strings)."""
    return {k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in analysis.items()}


class WorkloadAnalyzer:
    """Rules, estimate, advisor and workflow context -> one requirements dict."""

    def __init__(
        self,
        settings,
        *,
        advisor: Advisor | None = None,
        workflow: WorkflowClient | None = None,
        fleet_limits: Callable[[], dict] | None = None,
    ):
        self.settings = settings
        self.advisor = advisor
        self.workflow = workflow
        self.fleet_limits = fleet_limits
        self._memo: dict[tuple, dict] = {}
        self._by_rules = DECISIONS.labels("rules")

    @classmethod
    def from_settings(cls, settings, *, fleet_limits=None) -> WorkloadAnalyzer:
        """With the advisor and graph-service client the settings name (each may be absent)."""
        return cls(
            settings,
            advisor=Advisor.from_settings(settings),
            workflow=WorkflowClient.from_settings(settings),
            fleet_limits=fleet_limits,
        )

    def close(self) -> None:
        for client in (self.advisor, self.workflow):
            if client is not None:
                client.close()

    def limits(self) -> tuple[int, int]:
        """(GPUs of the largest node, MB of the largest GPU); the fallback when unknown."""
        limits = None
        if self.fleet_limits is not None:
            try:
                limits = self.fleet_limits()
            except Exception as exc:  # the fleet view is advisory here; never fail on it
                # one line, no traceback: with Redis down this runs for every request (each
                # of which answers 503 anyway), and a traceback per request buried the log
                log.warning(
                    "fleet_limits failed (%s: %s); using %s",
                    type(exc).__name__,
                    " ".join(str(exc).split()),
                    FALLBACK_LIMITS,
                )
        gpus = (limits or {}).get("max_gpus_per_node") or 0
        memory = (limits or {}).get("max_gpu_memory_mb") or 0
        if gpus < 1 or memory < 1:
            return FALLBACK_LIMITS["max_gpus_per_node"], FALLBACK_LIMITS["max_gpu_memory_mb"]
        return int(gpus), int(memory)

    def analyze(
        self,
        workload_type: str,
        workload_data: dict | None,
        *,
        service_name: str | None = None,
        top_level: tuple[str, ...] = (),
        memo_key: str | None = None,
    ) -> dict:
        """The requirements for one workload (see the module docstring for the precedence).

        ``warnings`` lists the ``workload_data`` keys the analysis ignored (see
        :func:`hint_warnings`; ``top_level`` names the request body's own fields).

        ``memo_key``: ``workload_data`` as JSON (the API has it): with neither an advisor nor
        a graph service configured the analysis is a function of the type, that text, the
        body's fields and the fleet's limits, so a workload seen before (a service asking for
        the same shape again) gets a copy of the analysis made then; it still counts in
        ``gpu_orchestrator_workload_decisions``. Up to :data:`MEMO_SIZE` are kept (then all
        are dropped), none under a key longer than :data:`MEMO_KEY_MAX`.

        Raises ValidationFailed naming each bad field, and Unsatisfiable when the
        parameter-count estimate needs more than one node and the client gave no explicit
        ``required_gpus``/``min_memory_mb``.
        """
        max_gpus, max_mb = self.limits()
        if (
            memo_key is None
            or len(memo_key) > MEMO_KEY_MAX
            or self.advisor is not None
            or self.workflow is not None
        ):
            return self._analyze(
                workload_type, workload_data, service_name, top_level, max_gpus, max_mb
            )
        key = (workload_type, memo_key, top_level, max_gpus, max_mb)
        done = self._memo.get(key)
        if done is None:
            done = self._analyze(
                workload_type, workload_data, service_name, top_level, max_gpus, max_mb
            )
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = _copy(done)
            return done
        self._by_rules.inc()
        return _copy(done)

    def _analyze(
        self,
        workload_type: str,
        workload_data: dict | None,
        service_name: str | None,
        top_level: tuple[str, ...],
        max_gpus: int,
        max_mb: int,
    ) -> dict:
        wtype = check_workload_type(workload_type)
        cfg = self.settings.workload_defaults[wtype]
        training_sizes = self.settings.workload_defaults.training.model_sizes
        hints = check_workload_data(wtype, workload_data, training_sizes)

        plan = self._rules(wtype, cfg, hints)
        self._clamp_to_fleet(plan, max_gpus, max_mb)
        estimate = self._estimate(wtype, hints, plan, max_gpus, max_mb)
        if estimate is not None:
            self._apply_estimate(plan, estimate, hints, max_gpus, max_mb)

        info = None
        if hints.workflow_id and self.workflow is not None:
            info = self.workflow.lookup(hints.workflow_id)

        decided_by = "rules"
        explicit = (
            hints.required_gpus is not None
            and hints.min_memory_mb is not None
            and (hints.priority is not None or hints.workflow_priority is not None)
        )
        if self.advisor is not None and not explicit:
            advice = self.advisor.advise(
                service_name,
                wtype,
                dict(workload_data or {}),
                max_gpus=max_gpus,
                max_memory_mb=max_mb,
            )
            if advice is not None:
                decided_by = "advisor"
                self._apply_advice(plan, advice, estimate)
            else:
                plan.reasons.append("advisor unavailable; rules used")

        if hints.workflow_priority is not None:
            plan.priority = hints.workflow_priority
            plan.reasons.append(f"workflow_priority {hints.workflow_priority}")
        elif info is not None and info.priority is not None:
            plan.priority = info.priority
            plan.reasons.append(
                f"workflow {info.workflow_id} priority {info.priority} (graph service)"
            )
        self._apply_overrides(plan, hints, estimate)

        depends_on = list(hints.workflow_dependencies)
        if info is not None:
            depends_on = list(dict.fromkeys(depends_on + list(info.dependencies)))
        if hints.max_memory_mb and hints.max_memory_mb < plan.memory_mb:
            raise ValidationFailed(
                f"max_memory_mb {hints.max_memory_mb} is below the {plan.memory_mb} MB per GPU "
                "this workload needs",
                details={
                    "workload_data.max_memory_mb": [
                        f"0 (no limit) or >= {plan.memory_mb} (the required min_memory_mb)"
                    ]
                },
            )

        decided = {
            "required_gpus": plan.gpus,
            "min_memory_mb": plan.memory_mb,
            "max_memory_mb": hints.max_memory_mb or 0,
            "priority": plan.priority,
            "max_utilization": plan.max_utilization,
            "estimated_duration_seconds": plan.duration,
        }
        # what the rules, the config or the advisor decided: within the request's limits,
        # since the engine takes the API's request as checked (app.request_rules)
        check_fields(decided)
        (self._by_rules if decided_by == "rules" else DECISIONS.labels(decided_by)).inc()
        return {
            "workload_type": wtype,
            **decided,
            "reasoning": "; ".join(plan.reasons),
            "decided_by": decided_by,
            "depends_on": depends_on,
            "workflow_id": hints.workflow_id,
            "estimate": estimate.as_dict() if estimate is not None else None,
            "warnings": hint_warnings(
                workload_data, top_level=top_level, advisor_used=decided_by == "advisor"
            ),
        }

    # ------------------------------------------------------------------ rules

    def _rules(self, wtype: str, cfg, h: Hints) -> _Plan:
        plan = _Plan(
            cfg.default_gpus,
            cfg.default_memory_mb,
            cfg.default_priority,
            float(cfg.max_utilization),
            float(cfg.estimated_duration),
            [
                f"{wtype} defaults: {cfg.default_gpus} GPU, {cfg.default_memory_mb} MB, "
                f"priority {cfg.default_priority}"
            ],
        )
        getattr(self, f"_rules_{wtype}")(plan, cfg, h)
        return plan

    @staticmethod
    def _at_least(plan: _Plan, gpus: int, why: str) -> None:
        if gpus > plan.gpus:
            plan.gpus = gpus
            plan.reasons.append(f"{why} -> {gpus} GPUs")

    def _rules_training(self, plan: _Plan, cfg, h: Hints) -> None:
        if h.model_size is not None:
            size = cfg.model_sizes[h.model_size]
            plan.gpus, plan.memory_mb = size["gpus"], size["memory_mb"]
            plan.reasons.append(
                f"model_size {h.model_size} -> {size['gpus']} GPUs, {size['memory_mb']} MB"
            )
        if h.batch_size is not None:
            if h.batch_size > cfg.xlarge_batch_size:
                self._at_least(plan, 4, f"batch_size {h.batch_size:g} > {cfg.xlarge_batch_size}")
            elif h.batch_size > cfg.large_batch_size:
                self._at_least(plan, 2, f"batch_size {h.batch_size:g} > {cfg.large_batch_size}")
        if h.multi_gpu:
            self._at_least(plan, 2, "multi_gpu")

    def _rules_inference(self, plan: _Plan, cfg, h: Hints) -> None:
        if h.model_name:
            name = h.model_name.lower()
            for family in cfg.model_families:
                if any(_word_in(pattern, name) for pattern in family["match"]):
                    plan.family = family["match"][0]
                    plan.memory_mb, plan.priority = family["memory_mb"], family["priority"]
                    if family["max_utilization"] is not None:
                        plan.max_utilization = family["max_utilization"]
                    plan.reasons.append(
                        f"model family {plan.family} -> {plan.memory_mb} MB, "
                        f"priority {plan.priority}"
                    )
                    break
        if h.model_size is not None:
            mode, mb = INFERENCE_SIZES[h.model_size]
            if mode == "set" or plan.memory_mb > mb:
                plan.memory_mb = mb
                plan.reasons.append(f"model_size {h.model_size} -> {mb} MB")
        if h.dedicated:
            plan.memory_mb = max(plan.memory_mb, 8192)
            plan.priority = 8
            plan.reasons.append(f"dedicated -> {plan.memory_mb} MB, priority 8")
        if h.concurrent_requests is not None:
            if h.concurrent_requests > cfg.very_high_concurrency:
                self._at_least(
                    plan,
                    4,
                    f"concurrent_requests {h.concurrent_requests:g} > {cfg.very_high_concurrency}",
                )
            elif h.concurrent_requests > cfg.high_concurrency:
                self._at_least(
                    plan,
                    2,
                    f"concurrent_requests {h.concurrent_requests:g} > {cfg.high_concurrency}",
                )

    def _rules_embedding(self, plan: _Plan, cfg, h: Hints) -> None:
        if h.batch_size is not None and h.batch_size > cfg.large_batch_size:
            self._at_least(plan, 2, f"batch_size {h.batch_size:g} > {cfg.large_batch_size}")

    def _rules_ocr(self, plan: _Plan, cfg, h: Hints) -> None:
        if h.image_count is not None and h.image_count > cfg.large_batch_size:
            self._at_least(plan, 2, f"image_count {h.image_count:g} > {cfg.large_batch_size}")

    def _rules_graph_processing(self, plan: _Plan, cfg, h: Hints) -> None:
        if h.node_count is not None and h.node_count > cfg.large_batch_size:
            if LARGE_GRAPH_MEMORY_MB > plan.memory_mb:
                plan.memory_mb = LARGE_GRAPH_MEMORY_MB
                plan.reasons.append(
                    f"node_count {h.node_count:g} > {cfg.large_batch_size} -> "
                    f"{LARGE_GRAPH_MEMORY_MB} MB"
                )

    def _rules_generic(self, plan: _Plan, cfg, h: Hints) -> None:
        """Nothing beyond the defaults; explicit values apply to every type afterwards."""

    @staticmethod
    def _clamp_to_fleet(plan: _Plan, max_gpus: int, max_mb: int) -> None:
        if plan.gpus > max_gpus:
            plan.reasons.append(f"{plan.gpus} GPUs clamped to {max_gpus}, the largest node")
            plan.gpus = max_gpus
        if plan.memory_mb > max_mb:
            plan.reasons.append(f"{plan.memory_mb} MB clamped to {max_mb}, the largest GPU")
            plan.memory_mb = max_mb

    # ------------------------------------------------------------------ estimate

    def _estimate(
        self, wtype: str, h: Hints, plan: _Plan, max_gpus: int, max_mb: int
    ) -> MemoryEstimate | None:
        cfg = self.settings.memory_estimate
        if h.parameters_billions is not None:
            params, source = Fraction(str(h.parameters_billions)), "parameters_billions"
        elif h.model_name and plan.family is None:
            params, source = parse_parameter_count(h.model_name), "model_name"
            if params is None:
                return None
        else:
            return None
        quant = h.quantization if h.quantization not in (None,) + NO_QUANT else None
        if quant is None and h.quantization is None and h.model_name:
            quant = quantization_in_name(h.model_name)
        if quant is not None:
            precision, nbytes = quant, QUANT_BYTES[quant]
        else:
            precision = h.dtype or cfg.default_dtype
            nbytes = DTYPE_BYTES[precision]
        overhead = cfg.training_overhead_factor if wtype == "training" else cfg.overhead_factor
        return estimate_memory(
            params,
            nbytes,
            overhead,
            max_gpus_per_node=max_gpus,
            max_gpu_memory_mb=max_mb,
            power_of_two=cfg.power_of_two_gpus,
            source=source,
            precision=precision,
        )

    def _apply_estimate(
        self, plan: _Plan, est: MemoryEstimate, h: Hints, max_gpus: int, max_mb: int
    ) -> None:
        what = (
            h.model_name
            if est.source == "model_name"
            else f"{est.parameters_billions:g}B parameters"
        )
        plan.reasons.append(
            f"{what}: {est.parameters_billions:g}B x {est.bytes_per_parameter:g} bytes "
            f"({est.precision}) x {est.overhead_factor:g} = {est.total_memory_mb} MB"
        )
        if h.required_gpus is not None:
            return  # spread over the client's own count in _apply_overrides
        if not est.fits and h.min_memory_mb is None:
            field_name = f"workload_data.{est.source}"
            raise Unsatisfiable(
                f"{what} needs about {est.total_memory_mb} MB at {est.precision}, more than "
                f"one node holds ({max_gpus} x {max_mb} MB); use a smaller dtype or "
                "quantization (int8, int4), or set required_gpus and min_memory_mb",
                details={  # the shape of every unsatisfiable (engine._unsatisfiable)
                    "field": field_name,
                    "reason": "memory_estimate",
                    "limit": max_gpus * max_mb,
                    "needed_mb": est.total_memory_mb,
                },
            )
        if est.gpus > plan.gpus:
            plan.gpus = est.gpus
            plan.reasons.append(
                f"spread over {est.gpus} GPUs of one node, {est.memory_per_gpu_mb} MB each"
            )
        if est.memory_per_gpu_mb > plan.memory_mb:
            plan.memory_mb = min(est.memory_per_gpu_mb, max_mb)
            plan.reasons.append(f"memory raised to {plan.memory_mb} MB per GPU by the estimate")

    # ------------------------------------------------------------------ advisor, overrides

    @staticmethod
    def _apply_advice(plan: _Plan, advice, est: MemoryEstimate | None) -> None:
        plan.gpus, plan.memory_mb, plan.priority = (
            advice.required_gpus,
            advice.min_memory_mb,
            advice.priority,
        )
        text = (
            f"advisor: {advice.required_gpus} GPUs, {advice.min_memory_mb} MB, priority "
            f"{advice.priority}"
        )
        if advice.reasoning:
            text += f" ({advice.reasoning})"
        if advice.clamped:
            text += f"; clamped {', '.join(advice.clamped)} to the fleet"
        plan.reasons.append(text)
        if est is not None and est.fits:
            if est.gpus > plan.gpus or est.memory_per_gpu_mb > plan.memory_mb:
                plan.gpus = max(plan.gpus, est.gpus)
                plan.memory_mb = max(plan.memory_mb, est.memory_per_gpu_mb)
                plan.reasons.append(
                    f"raised to the estimate's {plan.gpus} GPUs, {plan.memory_mb} MB"
                )

    @staticmethod
    def _apply_overrides(plan: _Plan, h: Hints, est: MemoryEstimate | None) -> None:
        given = []
        if h.required_gpus is not None:
            plan.gpus = h.required_gpus
            given.append("required_gpus")
            if est is not None and h.min_memory_mb is None:
                per_gpu = math.ceil(Fraction(est.total_memory_mb, h.required_gpus))
                if per_gpu > plan.memory_mb:
                    plan.memory_mb = per_gpu
                    plan.reasons.append(
                        f"estimate spread over the requested {h.required_gpus} "
                        f"GPUs: {per_gpu} MB each"
                    )
        if h.min_memory_mb is not None:
            plan.memory_mb = h.min_memory_mb
            given.append("min_memory_mb")
        if h.priority is not None:
            plan.priority = h.priority
            given.append("priority")
        if h.max_utilization is not None:
            plan.max_utilization = h.max_utilization
            given.append("max_utilization")
        if h.estimated_duration_seconds is not None:
            plan.duration = h.estimated_duration_seconds
            given.append("estimated_duration_seconds")
        if h.max_memory_mb:
            given.append("max_memory_mb")
        if given:
            plan.reasons.append("explicit " + ", ".join(given))


__all__ = [
    "WorkloadAnalyzer",
    "DECISIONS",
    "estimate_memory",
    "parse_parameter_count",
    "MemoryEstimate",
    "FALLBACK_LIMITS",
    "KNOWN_HINTS",
    "hint_warnings",
]
