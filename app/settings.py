"""One settings object: built-in defaults, then the YAML file, then environment variables.

Every option is declared once in ``SPEC`` below, with its type, default, bounds and whether it is a
secret. Loading validates everything once; a bad value raises :class:`ConfigError`, whose single
line names the source (file or environment variable), the key and what was expected.

Environment variables: ``PORT``, ``REDIS_URL``, ``DEEPAGENTS_URL``, ``GRAPH_SERVICE_URL`` and
``CONFIG_PATH`` keep the original service's names. Every other key is reachable as
``GPU_ORCH__<SECTION>__<KEY>`` (upper case, ``__`` between levels), e.g.
``GPU_ORCH__SCHEDULER__MAX_QUEUE_SIZE=500``. Values are parsed as YAML scalars or flow
collections, so ``GPU_ORCH__AUTH__ADMINS='[ops]'`` works.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from app.request_rules import FIELDS as REQUEST_FIELDS
from app.request_rules import HINTS, NODE_NAME_RULE, WORKLOAD_TYPES, node_name_ok

DEFAULT_CONFIG_PATH = "config.yaml"
ENV_PREFIX = "GPU_ORCH__"
REDACTED = "***"

#: Original environment variable names and the keys they set.
ENV_ALIASES = {
    "PORT": ("server", "port"),
    "REDIS_URL": ("redis", "url"),
    "DEEPAGENTS_URL": ("services", "deepagents_url"),
    "GRAPH_SERVICE_URL": ("services", "graph_service_url"),
}


class ConfigError(Exception):
    """A configuration value is wrong; ``str()`` is the one line an operator sees."""

    def __init__(self, source: str, key: str, expected: str, got: Any = None, *, show_got=True):
        self.source, self.key, self.expected = source, key, expected
        got_text = f", got {got!r}" if show_got and got is not None else ""
        super().__init__(f"{source}: {key}: expected {expected}{got_text}")


# --------------------------------------------------------------------------- field types

# one rule for durations, shared with the client (app.client imports no settings)
from app.timefmt import parse_duration  # noqa: E402,F401


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration, for ``config show``."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    millis = round(float(seconds) * 1000, 6)
    return f"{int(millis)}ms" if seconds < 1 and millis.is_integer() else f"{seconds}s"


@dataclass
class Opt:
    """One option: its default, how to convert and check a raw value, and how to show it."""

    default: Any
    convert: Callable[[Any], Any]
    expected: str
    secret: bool = False
    show: Callable[[Any], Any] = lambda v: v
    doc: str = ""
    #: How a rejected value appears in a ConfigError (None: as given); hides embedded secrets.
    redact_got: Callable[[Any], Any] | None = None

    def parse(self, raw: Any) -> Any:
        try:
            return self.convert(raw)
        except (TypeError, ValueError):
            raise _Bad(self.expected) from None


class _Bad(Exception):
    """Raised by converters; the loader turns it into a ConfigError with source and key."""


def _raise(exc: Exception):
    raise exc


def _int(lo=None, hi=None, *, allow_str=False):
    def convert(v):
        if isinstance(v, bool):
            raise ValueError(v)
        if isinstance(v, str) and allow_str and v.strip().isdigit():
            v = int(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int):
            raise ValueError(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(v)
        return v

    return convert


def _range_text(kind, lo, hi):
    if lo is not None and hi is not None:
        return f"{kind} in {lo}..{hi}"
    if lo is not None:
        return f"{kind} >= {lo}"
    return kind


def Int(default, lo=None, hi=None, doc="", allow_str=False):
    return Opt(
        default, _int(lo, hi, allow_str=allow_str), _range_text("an integer", lo, hi), doc=doc
    )


def Float(default, lo=None, hi=None, doc=""):
    def convert(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(v)
        return float(v)

    return Opt(default, convert, _range_text("a number", lo, hi), doc=doc)


def Bool(default, doc=""):
    def convert(v):
        if isinstance(v, bool):
            return v
        raise ValueError(v)

    return Opt(default, convert, "true or false", doc=doc)


def Str(default, doc="", secret=False, pattern=None, expected="a string", empty=True):
    def convert(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or (not empty and not v.strip()):
            raise ValueError(v)
        if pattern and v and not re.fullmatch(pattern, v):
            raise ValueError(v)
        return v

    return Opt(default, convert, expected, secret=secret, doc=doc)


def NodeName():
    """``monitoring.node_name``: empty (the host name) or a name a monitor may report."""

    def convert(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # as Str: ``node_name: 42`` (YAML, or the environment) names node "42"
        if not isinstance(v, str) or (v and not node_name_ok(v)):
            raise ValueError(v)
        return v

    expected = f"empty (the host name) or a node name: {NODE_NAME_RULE}"
    return Opt("", convert, expected, doc="this node's name; empty: the host name")


def Choice(default, choices, doc=""):
    def convert(v):
        if v not in choices:
            raise ValueError(v)
        return v

    return Opt(default, convert, "one of " + ", ".join(choices), doc=doc)


def Duration(default, lo=0.0, hi=None, doc=""):
    def convert(v):
        seconds = parse_duration(v)
        if seconds < lo or (hi is not None and seconds > hi):
            raise ValueError(v)
        return seconds

    bound = f" >= {format_duration(lo)}" if lo else ""
    return Opt(
        parse_duration(default),
        convert,
        f"a duration like 15s, 5m, 1h or seconds{bound}",
        show=format_duration,
        doc=doc,
    )


def DurationList(default, doc=""):
    def convert(v):
        if not isinstance(v, list) or not v:
            raise ValueError(v)
        out = [parse_duration(x) for x in v]
        if any(x < 0 for x in out):
            raise ValueError(v)
        return out

    return Opt(
        [parse_duration(x) for x in default],
        convert,
        "a non-empty list of durations",
        show=lambda v: [format_duration(x) for x in v],
        doc=doc,
    )


def StrList(default, doc=""):
    def convert(v):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(v)
        return list(v)

    return Opt(list(default), convert, "a list of strings", doc=doc)


def HostList(default, doc=""):
    """``webhooks.allowed_hosts``: each entry a host, ``*.suffix``, ``*``, host:port or CIDR."""

    def convert(v):
        from app.webhook_policy import parse_entry

        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(v)
        for entry in v:
            parse_entry(entry)
        return list(v)

    return Opt(list(default), convert, "a list of hosts, host:port, *.suffix or CIDRs", doc=doc)


#: Query argument names that carry a credential, as a part of the name: redis-py reads
#: ``unix:///path.sock?password=...`` and passes any other argument (``ssl_password``) to the
#: connection; an HTTP service URL (``services.deepagents_url``) may carry ``?token=``,
#: ``?api_key=``, ``?access_token=``, a signature (``sig``) or a ``secret``. A name ending in
#: ``file`` names where a credential is (``ssl_keyfile``), not the credential: it stays.
SECRET_QUERY_NAMES = ("password", "passwd", "token", "secret", "key", "auth", "sig", "credential")
_QUERY_ARG = re.compile(r"[?&]([^=&#]*)=([^&#]*)")


def _secret_args(url: str):
    """The query arguments of ``url`` whose name holds a credential (SECRET_QUERY_NAMES)."""
    for m in _QUERY_ARG.finditer(url):
        name = m.group(1).lower()
        if not name.endswith("file") and any(part in name for part in SECRET_QUERY_NAMES):
            yield m


def query_passwords(url: str) -> list[tuple[str, str]]:
    """Each ``name=value`` query argument of ``url`` that :func:`redact_url` hides, with the
    ``name=***`` it shows instead."""
    return [(m.group(0)[1:], f"{m.group(1)}={REDACTED}") for m in _secret_args(url)]


def url_with_path(url: str, path: str) -> str:
    """``url`` with ``path`` (from ``/``) after its own path, its query kept after both: a
    service URL may carry its credential as a query (``?token=``), and a path appended to the
    whole string went into that credential's value."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))


def redact_url(url: str) -> str:
    """Hide the password (in the userinfo or the query; a lone token user too), keep the rest
    readable."""
    if not url:
        return url
    for m in reversed(list(_secret_args(url))):
        url = url[: m.start(2)] + REDACTED + url[m.end(2) :]
    if url.startswith(SENTINEL_SCHEME + "://"):  # several host:port, which urlsplit rejects
        rest = url[len(SENTINEL_SCHEME) + 3 :]
        auth, at, hosts = rest.rpartition("@")
        return f"{SENTINEL_SCHEME}://{REDACTED}@{hosts}" if at and auth else url
    parts = urlsplit(url)
    if parts.password is None and not parts.username:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username if parts.password is not None else ""
    netloc = f"{user}:{REDACTED}@{host}" if user else f"{REDACTED}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def Url(default, schemes, doc="", optional=True):
    def convert(v):
        if v is None and optional:
            return ""
        if not isinstance(v, str):
            raise ValueError(v)
        if v == "" and optional:
            return ""
        if SENTINEL_SCHEME in schemes and v.startswith(SENTINEL_SCHEME + "://"):
            parse_sentinel_url(v)
            return v
        parts = urlsplit(v)
        if parts.scheme not in schemes:
            raise ValueError(v)
        if parts.scheme in ("http", "https", "redis", "rediss") and not parts.hostname:
            raise ValueError(v)
        try:
            port = parts.port  # urlsplit checks the port only when it is read
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise _Bad(f"{expected}, its port a number in 1..65535")
        return v.rstrip("/") if parts.scheme in ("http", "https") else v

    expected = "a URL with scheme " + " or ".join(schemes)

    return Opt(
        default,
        convert,
        expected,
        show=redact_url,
        doc=doc,
        redact_got=_redact_got_url,
    )


SENTINEL_SCHEME = "redis+sentinel"
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


@dataclass(frozen=True)
class SentinelTarget:
    """Where a Sentinel-managed Redis is: its sentinels, the master's name, db and password."""

    master_name: str
    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    password: str = ""


def _host_port(text: Any) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as a pair; ValueError naming the bad entry."""
    m = _HOST_PORT.fullmatch(text) if isinstance(text, str) else None
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"{text!r} is not host:port")
    return m.group(1).strip("[]"), int(m.group(2))


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db]``, the form
    rq-dashboard (redis-sentinel-url) reads too; ValueError when malformed."""
    rest = url[len(SENTINEL_SCHEME) + 3 :]
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    password = auth.partition(":")[2] if auth else ""
    sentinels = tuple(_host_port(h) for h in hosts.split(","))
    parts = [p for p in path.split("?")[0].split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("expected /master_name or /master_name/db after the sentinels")
    return SentinelTarget(parts[0], sentinels, int(parts[1]) if len(parts) == 2 else 0, password)


def sentinel_url(cfg: Mapping[str, Any]) -> str:
    """The ``redis+sentinel://`` URL for a ``redis.sentinel`` mapping, password left out
    (it stays in settings, so no URL handed to a child process or a log carries it)."""
    return f"{SENTINEL_SCHEME}://{','.join(cfg['sentinels'])}/{cfg['master_name']}"


def sentinel_target(settings: Settings, url: str) -> SentinelTarget:
    """The target for a sentinel URL; the password from the URL, else ``redis.sentinel``."""
    target = parse_sentinel_url(url)
    if not target.password and settings is not None:
        target = SentinelTarget(
            target.master_name, target.sentinels, target.db, settings.redis.sentinel["password"]
        )
    return target


_NO_SENTINEL = {"master_name": "", "sentinels": [], "password": ""}


_SENTINEL_EXPECTED = "a mapping {master_name, sentinels: [host:port, ...], password}"


def _sentinel(v: Any) -> dict:
    """``redis.sentinel``, its problem named (``_Bad``: shown in the one-line error)."""
    try:
        return _check_sentinel(v)
    except ValueError as exc:
        detail = str(exc) if isinstance(v, dict) and str(exc) != repr(v) else ""
        raise _Bad(f"{_SENTINEL_EXPECTED}" + (f" ({detail})" if detail else "")) from None


def _check_sentinel(v: Any) -> dict:
    """Validate ``redis.sentinel``: {master_name, sentinels: [host:port, ...], password?}."""
    if v is None or v == {} or v == _NO_SENTINEL:  # off (the shipped example spells it out)
        return dict(_NO_SENTINEL)
    if not isinstance(v, dict):
        raise ValueError(v)
    unknown = set(v) - set(_NO_SENTINEL)
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]}")
    name, sentinels, password = v.get("master_name"), v.get("sentinels"), v.get("password")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError("master_name must be a name of [A-Za-z0-9_.-]")
    if not isinstance(sentinels, list) or not sentinels:
        raise ValueError("sentinels must be a non-empty list of host:port")
    for entry in sentinels:
        _host_port(entry)
    if password is not None and not isinstance(password, str):
        raise ValueError("password must be a string")
    return {"master_name": name, "sentinels": list(sentinels), "password": password or ""}


def _show_sentinel(v: dict) -> dict:
    return {**v, "password": REDACTED if v.get("password") else ""}


def _redact_got_url(value: Any) -> Any:
    """A rejected URL as an error may show it: with any password hidden."""
    if not isinstance(value, str):
        return value
    try:
        return redact_url(value)
    except ValueError:  # not even parseable (a bad port): show nothing of it
        return REDACTED


def KeyMap(doc=""):
    """``api_keys``: key -> principal. The keys themselves are the secrets."""

    def convert(v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(v)
        out = {}
        for k, p in v.items():
            if not isinstance(k, str) or not k or not isinstance(p, str) or not p:
                raise ValueError("non-empty string keys and principals")
            out[k] = p
        return out

    return Opt(
        {},
        convert,
        "a mapping of API key to principal name",
        show=lambda v: {f"{REDACTED}{i + 1}": p for i, p in enumerate(v.values())},
        secret=False,
        doc=doc,
        redact_got=lambda v: REDACTED,
    )


def Mapping_(default, validate: Callable[[Any], Any], expected: str, doc=""):
    return Opt(default, validate, expected, doc=doc)


# --------------------------------------------------------------------------- the options

#: What each threshold means; every type carries them (as in the original), docs/workload.md
#: says which type reads which.
THRESHOLD_DOCS = {
    "large_batch_size": "training batch_size above: >= 2 GPUs; embedding batch_size above: "
    "2 GPUs; ocr image_count above: 2 GPUs; graph node_count above: 8192 MB",
    "xlarge_batch_size": "training batch_size above this: >= 4 GPUs",
    "high_concurrency": "inference concurrent_requests above this: 2 GPUs",
    "very_high_concurrency": "inference concurrent_requests above this: 4 GPUs",
}


def _range(rule) -> tuple:
    return rule.lo, rule.hi


def _workload(
    gpus, memory, priority, max_util, large_batch, xlarge_batch, high_conc, vhigh_conc, duration
):
    """The original service's per-type thresholds, under its own key names."""
    return {
        # the same ranges as the request's own fields (app.request_rules)
        "default_gpus": Int(
            gpus, *_range(HINTS["required_gpus"]), doc="GPUs when no hint asks for more"
        ),
        "default_memory_mb": Int(
            memory,
            *_range(REQUEST_FIELDS["min_memory_mb"]),
            doc="free memory per GPU when no hint says",
        ),
        "default_priority": Int(
            priority, *_range(REQUEST_FIELDS["priority"]), doc="1..10, higher is served first"
        ),
        "max_utilization": Float(
            max_util,
            *_range(REQUEST_FIELDS["max_utilization"]),
            doc="a GPU busier than this (%) does not qualify",
        ),
        "large_batch_size": Int(large_batch, 1, doc=THRESHOLD_DOCS["large_batch_size"]),
        "xlarge_batch_size": Int(xlarge_batch, 1, doc=THRESHOLD_DOCS["xlarge_batch_size"]),
        "high_concurrency": Int(high_conc, 1, doc=THRESHOLD_DOCS["high_concurrency"]),
        "very_high_concurrency": Int(vhigh_conc, 1, doc=THRESHOLD_DOCS["very_high_concurrency"]),
        "estimated_duration": Duration(
            duration,
            1,
            REQUEST_FIELDS["estimated_duration_seconds"].hi,
            doc="typical run time, used for the lease",
        ),
    }


def _model_sizes(v):
    """Validate ``training.model_sizes``: size name -> {gpus, memory_mb}."""
    if not isinstance(v, dict) or not v:
        raise ValueError(v)
    out = {}
    for name, entry in v.items():
        if not isinstance(name, str) or not name or not isinstance(entry, dict):
            raise ValueError(v)
        if set(entry) != {"gpus", "memory_mb"}:
            raise ValueError("each size needs exactly gpus and memory_mb")
        out[name.lower()] = {
            "gpus": _int(*_range(HINTS["required_gpus"]))(entry["gpus"]),
            "memory_mb": _int(*_range(REQUEST_FIELDS["min_memory_mb"]))(entry["memory_mb"]),
        }
    return out


def _model_families(v):
    """Validate ``inference.model_families``: [{match, memory_mb, priority, max_utilization}]."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(v)
    out = []
    for entry in v:
        if not isinstance(entry, dict) or set(entry) - {
            "match",
            "memory_mb",
            "priority",
            "max_utilization",
        }:
            raise ValueError("keys are match, memory_mb, priority, max_utilization")
        match = entry.get("match")
        match = [match] if isinstance(match, str) else match
        if (
            not isinstance(match, list)
            or not match
            or not all(isinstance(m, str) and m.strip() for m in match)
        ):
            raise ValueError("match must be a name or a list of names")
        util = entry.get("max_utilization")
        if util is not None and (
            isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 <= util <= 100
        ):
            raise ValueError("max_utilization must be 0..100")
        out.append(
            {
                "match": [m.strip().lower() for m in match],
                "memory_mb": _int(*_range(REQUEST_FIELDS["min_memory_mb"]))(entry.get("memory_mb")),
                "priority": _int(*_range(REQUEST_FIELDS["priority"]))(entry.get("priority")),
                "max_utilization": None if util is None else float(util),
            }
        )
    return out


#: The original service's training sizes.
MODEL_SIZES = {
    "small": {"gpus": 1, "memory_mb": 4096},
    "medium": {"gpus": 2, "memory_mb": 8192},
    "large": {"gpus": 4, "memory_mb": 16384},
    "xlarge": {"gpus": 8, "memory_mb": 32768},
}

#: The original service's inference model families (matched on name boundaries, first wins).
MODEL_FAMILIES = [
    {"match": ["gemma-7b"], "memory_mb": 16384, "priority": 8, "max_utilization": 85.0},
    {"match": ["gemma-2b"], "memory_mb": 4096, "priority": 7, "max_utilization": 80.0},
    {
        "match": ["vaultgemma", "vault-gemma"],
        "memory_mb": 2048,
        "priority": 6,
        "max_utilization": 75.0,
    },
    {"match": ["phi-3.5", "phi3.5"], "memory_mb": 4096, "priority": 7, "max_utilization": 80.0},
    {
        "match": ["granite-4.0", "granite4.0"],
        "memory_mb": 4096,
        "priority": 7,
        "max_utilization": 80.0,
    },
]


def _simulated(v):
    """Validate the simulated fleet (shape documented in config/config.yaml.example)."""
    if v is None:
        return {"dynamic": False, "nodes": []}
    if not isinstance(v, dict):
        raise ValueError(v)
    unknown = set(v) - {"dynamic", "nodes", "seed"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]}")
    dynamic = v.get("dynamic", False)
    if not isinstance(dynamic, bool):
        raise ValueError(dynamic)
    nodes = v.get("nodes") or []
    if not isinstance(nodes, list):
        raise ValueError(nodes)
    gpu_keys = {
        "name",
        "memory_total_mb",
        "memory_used_mb",
        "utilization",
        "temperature",
        "power_draw",
        "uuid",
        "health",
    }
    out_nodes, names = [], set()
    for node in nodes:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"]:
            raise ValueError("each node needs a name")
        if not node_name_ok(node["name"]):
            raise ValueError(f"node name {node['name']!r}: {NODE_NAME_RULE}")
        if node["name"] in names:
            raise ValueError(f"duplicate node {node['name']}")
        names.add(node["name"])
        extra = set(node) - {"name", "count", "gpu", "gpus"}
        if extra:
            raise ValueError(f"unknown node key {sorted(extra)[0]}")
        if "gpus" in node:
            if "count" in node or "gpu" in node:
                raise ValueError("use either count+gpu or gpus")
            gpus = node["gpus"]
        else:
            count = node.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1024:
                raise ValueError("count must be 1..1024")
            gpus = [dict(node.get("gpu") or {}) for _ in range(count)]
        if not isinstance(gpus, list) or not gpus:
            raise ValueError("gpus must be a non-empty list")
        clean = []
        for gpu in gpus:
            if not isinstance(gpu, dict) or set(gpu) - gpu_keys:
                raise ValueError(f"gpu keys are {', '.join(sorted(gpu_keys))}")
            total = gpu.get("memory_total_mb", 81559)
            used = gpu.get("memory_used_mb", 0)
            for key in (
                "memory_total_mb",
                "memory_used_mb",
                "utilization",
                "temperature",
                "power_draw",
            ):
                val = gpu.get(key, 0)
                if (
                    isinstance(val, bool)
                    or not isinstance(val, (int, float))
                    or not math.isfinite(val)
                    or val < 0
                ):
                    raise ValueError(f"{key} must be a number >= 0")
            if used > total or gpu.get("utilization", 0) > 100:
                raise ValueError("memory_used_mb <= memory_total_mb and utilization <= 100")
            clean.append(dict(gpu))
        out_nodes.append({"name": node["name"], "gpus": clean})
    return {"dynamic": dynamic, "nodes": out_nodes, "seed": v.get("seed", 0)}


# --------------------------------------------------------------------------- tenants

#: Fields of one tenant's quota (``tenants.default`` and each ``tenants.quotas`` entry).
TENANT_FIELDS = ("weight", "guaranteed_gpus", "max_gpus", "max_queued")
TENANT_DEFAULT = {"weight": 1, "guaranteed_gpus": 0, "max_gpus": None, "max_queued": None}
TENANT_KEYS = ("principal", "service_name")


class _BadAt(_Bad):
    """A value inside a mapping option is wrong: names the sub-key (``quotas.team-a.max_gpus``)
    so the one-line error points at it, not at the whole mapping."""

    def __init__(self, where: str, expected: str, got: Any = None):
        super().__init__(expected)
        self.where, self.got = where, got


def _tenant_entry(v: Any, base: dict, where: str) -> dict:
    """One tenant's quota over ``base`` (the default): known fields, no negative numbers,
    guaranteed_gpus <= max_gpus."""
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise _BadAt(where, "a mapping {weight, guaranteed_gpus, max_gpus, max_queued}", v)
    out = dict(base)
    for key, val in v.items():
        sub = f"{where}.{key}"
        if key not in TENANT_FIELDS:
            raise _BadAt(sub, f"a known tenant field (one of {', '.join(TENANT_FIELDS)})")
        if key == "weight":
            if (
                isinstance(val, bool)
                or not isinstance(val, (int, float))
                or not 0 < val < float("inf")
            ):
                raise _BadAt(sub, "a number > 0", val)
            out[key] = int(val) if float(val).is_integer() else float(val)
        elif val is None and key in ("max_gpus", "max_queued"):
            out[key] = None
        else:
            try:
                out[key] = _int(0, 10_000_000)(val)
            except ValueError:
                nullable = " or null (no limit)" if key != "guaranteed_gpus" else ""
                raise _BadAt(sub, f"an integer >= 0{nullable}", val) from None
    if out["max_gpus"] is not None and out["guaranteed_gpus"] > out["max_gpus"]:
        raise _BadAt(
            f"{where}.guaranteed_gpus",
            f"a value <= max_gpus ({out['max_gpus']})",
            out["guaranteed_gpus"],
        )
    return out


def _tenant_default(v: Any) -> dict:
    return _tenant_entry(v, TENANT_DEFAULT, "").copy()


def _tenant_quotas(v: Any) -> dict:
    """``tenants.quotas``: tenant name -> the fields it sets (the rest come from
    ``tenants.default`` when the settings are used, so a changed default applies to all)."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _BadAt("", "a mapping of tenant name to {weight, guaranteed_gpus, max_gpus, ...}", v)
    out = {}
    for name, entry in v.items():
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= 256
            or not all(0x20 < ord(c) < 0x7F for c in name)
        ):
            raise _BadAt("", "tenant names of 1-256 printable characters, no spaces", name)
        if entry is not None and not isinstance(entry, dict):
            raise _BadAt(f".{name}", "a mapping {weight, guaranteed_gpus, max_gpus, max_queued}")
        _tenant_entry(entry, TENANT_DEFAULT, f".{name}")  # its own fields' types
        out[name] = dict(entry or {})
    return out


def _show_tenant(v: dict) -> dict:
    return dict(v)


def tenant_key(settings: Settings) -> str:
    """``tenants.key``, its default resolved: the principal when auth is on, else the
    service_name."""
    key = settings.tenants.key
    if key:
        return key
    return "principal" if settings.auth.enabled else "service_name"


def tenant_quotas(settings: Settings) -> dict[str, dict]:
    """Every configured tenant's quota, ``tenants.default`` filled in for what it leaves out."""
    t = settings.tenants
    return {name: {**t.default, **entry} for name, entry in t.quotas.items()}


def tenants_configured(settings: Settings) -> bool:
    """Tenants are configured: ``tenants.fair_share`` on or ``tenants.quotas`` not empty.
    Only then does each tenant's head request reserve its node at once (issue 14); with the
    defaults the queue is the one priority queue it was before tenants (the engine's Lua reads
    the same two settings: tenants_on in includes/tenants.lua)."""
    t = settings.tenants
    return bool(t.fair_share) or bool(t.quotas)


def tenant_quota(settings: Settings, tenant: str) -> dict:
    """The quota of one tenant: its own entry over the default, else the default."""
    t = settings.tenants
    return {**t.default, **t.quotas.get(tenant, {})}


SPEC: dict[str, dict[str, Any]] = {
    "server": {
        "host": Str(
            "127.0.0.1",
            doc="address the API binds to; 0.0.0.0 for every interface (the Docker image sets it)",
            expected="a host name or address",
            empty=False,
        ),
        "port": Int(8086, 1, 65535, allow_str=True, doc="API port (env PORT)"),
        "read_timeout": Duration("15s", 1, doc="graceful shutdown window for in-flight requests"),
        "write_timeout": Duration(
            "15s",
            1,
            doc="gunicorn's timeout: a worker whose event loop stops answering its master this "
            "long is replaced (a request itself may run longer: long-polls hold up to 60s)",
        ),
        "idle_timeout": Duration("60s", 1, doc="keep-alive window for idle client connections"),
        "header_timeout": Duration(
            "10s",
            0.1,
            3600,
            doc="a client must send its whole request (head and body) within this; else it is "
            "disconnected (a kept-alive connection: counted from its first byte)",
        ),
        "workers": Int(2, 1, 64, doc="gunicorn worker processes"),
        "threads": Int(4, 1, 256, doc="threads per gunicorn worker"),
        "max_body_bytes": Int(65536, 1024, 16 * 1024 * 1024, doc="largest accepted request body"),
        "max_workload_data_bytes": Int(
            8192, 64, 16 * 1024 * 1024, doc="largest workload_data (as compact JSON); past it 413"
        ),
    },
    "logging": {
        "format": Choice("text", ("text", "json"), doc="text for people, json for log pipelines"),
        "level": Choice("INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), doc="lowest level logged"),
    },
    "redis": {
        "url": Url(
            "",
            ("redis", "rediss", "unix", SENTINEL_SCHEME),
            doc="empty: start the embedded server, Valkey or Redis (env REDIS_URL); "
            "redis+sentinel://[:password@]host:port,.../master_name[/db] follows "
            "a Sentinel-managed primary",
        ),
        "sentinel": Opt(
            dict(_NO_SENTINEL),
            _sentinel,
            _SENTINEL_EXPECTED,
            show=_show_sentinel,
            redact_got=lambda v: REDACTED,
            doc="Redis behind Sentinel (used when url is empty): every role asks "
            "the sentinels for the primary and follows a failover; password "
            "authenticates to the sentinels and to Redis",
        ),
        "min_replicas_ack": Int(
            0,
            0,
            16,
            doc="each engine write waits (WAIT) until this many replicas "
            "have it before answering; not acknowledged: 503",
        ),
        "replica_ack_timeout": Duration(
            "1s", 0.001, 60, doc="longest a write waits for min_replicas_ack"
        ),
        "prefix": Str(
            "{gpuo}",
            pattern=r"[A-Za-z0-9_:{}.-]+",
            expected="a key prefix of [A-Za-z0-9_:{}.-]",
            doc="every key starts with this; keep one {hash tag} for Redis Cluster",
        ),
        "data_dir": Str("./var/redis", doc="embedded Redis data directory (AOF lives here)"),
        "embedded_host": Str("127.0.0.1", doc="embedded Redis listens here (loopback only)"),
        "embedded_port": Int(6390, 1, 65535, doc="embedded Redis port"),
        "embedded_appendfsync": Choice(
            "everysec",
            ("everysec", "always"),
            doc="when the embedded Redis it starts fsyncs its AOF: everysec loses no "
            "acknowledged write to a killed process, about the last second to a machine crash; "
            "always loses none to either, each write waiting for the disk",
        ),
        "socket_timeout": Duration(
            "5s", 0.1, doc="Redis connect/read timeout; past it the API answers 503"
        ),
        "max_connections": Int(
            64,
            1,
            10000,
            doc="Redis connection pool size per process (a thread that calls the engine keeps one)",
        ),
    },
    "services": {
        "deepagents_url": Url("", ("http", "https"), doc="DeepAgents advisor; empty: rules only"),
        "graph_service_url": Url("", ("http", "https"), doc="workflow lookups; empty: off"),
        "deepagents_timeout": Duration("2s", 0.05, 60, doc="longest wait for the advisor"),
        "graph_service_timeout": Duration("2s", 0.05, 60, doc="longest wait for a workflow lookup"),
        "breaker_failures": Int(
            3,
            1,
            100,
            doc="failures in a row that open a breaker (advisor and graph service: one each)",
        ),
        "breaker_cooldown": Duration(
            "30s", 1, doc="how long an open breaker skips its service (advisor, graph service)"
        ),
        "graph_cache_ttl": Duration(
            "60s", 0, doc="workflow lookups are reused this long; 0: no cache"
        ),
    },
    "scheduler": {
        "queue_check_interval": Duration(
            "5s", 0.1, doc="safety-net schedule pass (grants happen at once on release anyway)"
        ),
        "cleanup_interval": Duration("5s", 0.1, doc="reaper: expire leases, time out requests"),
        "max_queue_size": Int(
            10000, 1, 10_000_000, doc="queued requests beyond this are refused with 429"
        ),
        "max_queued_per_owner": Int(
            0,
            0,
            10_000_000,
            doc="queued requests one owner (API key; the service_name "
            "when auth is off) may have; past it 429 for that "
            "owner only; 0 = a quarter of max_queue_size",
        ),
        "default_ttl_multiplier": Float(
            2.0, 0.1, 1000, doc="lease = estimated duration x this, when no ttl"
        ),
        "default_ttl": Duration("1h", 1, doc="lease when nothing else gives one"),
        "max_ttl": Duration("7d", 0, doc="longest lease a client may ask for; 0 = no limit"),
        "allow_infinite_ttl": Bool(False, doc="allow ttl_seconds: 0 to mean no expiry"),
        "policy": Choice(
            "best_effort",
            ("best_effort", "strict_fifo"),
            doc="best_effort: skip what does not fit; strict_fifo: the head blocks",
        ),
        "aging_rate": Float(0.1, 0, 100, doc="priority points a queued request gains per minute"),
        "reservation_after": Duration(
            "10m",
            0,
            doc="wait after which a request that does not fit reserves a node (with tenants "
            "configured, fair_share or quotas, each tenant's head reserves at once)",
        ),
        "queue_timeout": Duration("1h", 1, doc="queued requests time out after this"),
        "history_ttl": Duration("24h", 3600, doc="finished requests stay readable this long"),
        "idempotency_ttl": Duration("24h", 60, doc="how long an Idempotency-Key replays"),
        "events_maxlen": Int(100000, 100, doc="the event stream keeps about this many entries"),
        "node_heartbeat_timeout": Duration(
            "30s", 1, doc="a node silent this long has its GPUs taken out of scheduling"
        ),
        "node_forget_after": Duration(
            "1h",
            0,
            doc="a node silent this long is forgotten: its allocations end as lost "
            "(webhook lost); 0 = never",
        ),
    },
    "tenants": {
        "key": Opt(
            None,
            lambda v: v if v is None or v in TENANT_KEYS else _raise(ValueError(v)),
            "one of principal, service_name (or null: principal when auth is on, else "
            "service_name)",
            doc="who pays for the GPUs: principal (the API key's; the default when auth is "
            "on) or service_name (the default when auth is off)",
        ),
        "fair_share": Bool(
            False,
            doc="order across tenants by (decayed usage + GPUs held) / weight; "
            "false: one priority queue. On (or quotas set): each tenant's head request "
            "reserves its node at once",
        ),
        "usage_half_life": Duration(
            "1h", 1, doc="past usage (GPU-seconds) counts half after this long"
        ),
        "default": Opt(
            dict(TENANT_DEFAULT),
            _tenant_default,
            "a mapping {weight, guaranteed_gpus, max_gpus, max_queued}",
            show=_show_tenant,
            doc="the quota of every tenant not in quotas (max_gpus, max_queued: null = no limit)",
        ),
        "quotas": Opt(
            {},
            _tenant_quotas,
            "a mapping of tenant name to {weight, guaranteed_gpus, max_gpus, max_queued}",
            doc="per tenant: what it sets over default; not empty (or fair_share on): each "
            "tenant's head request reserves its node at once (docs/scheduling.md)",
        ),
    },
    "preemption": {
        "enabled": Bool(False, doc="reclaim guaranteed GPUs from tenants above their guarantee"),
        "grace_period": Duration(
            "30s",
            0,
            doc="notice a preempted allocation's holder gets (webhook preempting, status "
            "preempting) before it ends as preempted; also what a drain gives",
        ),
    },
    "workload_defaults": {
        "training": {
            **_workload(1, 8192, 5, 90, 64, 128, 10, 20, "4h"),
            "model_sizes": Mapping_(
                copy.deepcopy(MODEL_SIZES),
                _model_sizes,
                "a mapping of size name to {gpus, memory_mb}",
                doc="model_size hint -> GPUs and MB per GPU",
            ),
        },
        "inference": {
            **_workload(1, 4096, 7, 80, 32, 64, 10, 20, "1h"),
            "model_families": Mapping_(
                copy.deepcopy(MODEL_FAMILIES),
                _model_families,
                "a list of {match, memory_mb, priority, max_utilization}",
                doc="known models by name (whole-word match, first wins); beat the estimate",
            ),
        },
        "embedding": _workload(1, 2048, 6, 85, 32, 64, 10, 20, "30m"),
        "ocr": _workload(1, 4096, 6, 80, 100, 200, 50, 100, "30m"),
        "graph_processing": _workload(1, 4096, 5, 75, 1000000, 2000000, 5, 10, "1h"),
        "generic": _workload(1, 4096, 5, 80, 50, 100, 10, 20, "1h"),
    },
    "memory_estimate": {
        "overhead_factor": Float(1.2, 1.0, 10, doc="activations and KV cache on top of weights"),
        "training_overhead_factor": Float(
            4.0, 1.0, 20, doc="training: gradients and optimizer state too"
        ),
        "default_dtype": Choice(
            "fp16",
            ("fp32", "fp16", "bf16", "int8", "int4"),
            doc="bytes per parameter when neither dtype nor quantization is given",
        ),
        "power_of_two_gpus": Bool(True, doc="round a spread-out model up to 1, 2, 4, 8... GPUs"),
    },
    "monitoring": {
        "refresh_interval": Duration("5s", 0.1, doc="how often a monitor reports its GPUs"),
        "metrics_enabled": Bool(True, doc="serve /metrics and count HTTP requests"),
        "max_service_labels": Int(
            100,
            1,
            100_000,
            doc="services with their own allocations_total series; "
            'later ones are counted as service="other"',
        ),
        "backend": Choice(
            "auto",
            ("auto", "nvml", "simulated"),
            doc="auto: NVML when a driver answers, else the simulated fleet",
        ),
        "node_name": NodeName(),
        "simulated": Mapping_(
            {"dynamic": False, "nodes": [], "seed": 0},
            _simulated,
            "a simulated fleet: {dynamic, nodes: [{name, count, gpu} | {name, gpus: [...]}]}",
            doc="the fleet the simulated backend reports; no nodes: one "
            "node named after the host with 8 H100 80GB",
        ),
    },
    "auth": {
        "enabled": Bool(False, doc="require an API key on every non-public path"),
        "header_name": Str(
            "X-API-Key",
            pattern=r"[A-Za-z0-9-]+",
            expected="an HTTP header name",
            doc="header carrying the key (Authorization: Bearer works too)",
        ),
        "api_keys": KeyMap(doc="key -> principal; a key may be written as sha256:<hex>"),
        "admins": StrList([], doc="principals that may act on anything"),
        "public_paths": StrList(
            ["/healthz", "/readyz", "/metrics"],
            doc="paths open without a key; a trailing * matches a prefix",
        ),
        "session_ttl": Duration("12h", 60, doc="a browser sign-in (GET /login) lasts this long"),
        "session_secret": Str(
            "",
            secret=True,
            doc="signs browser session cookies; empty: a random secret kept "
            "in Redis, shared by every replica",
        ),
    },
    "webhooks": {
        "timeout": Duration(
            "5s",
            0.1,
            120,
            doc="deadline of one delivery attempt, whole: "
            "lookup, connect, TLS, send, response headers",
        ),
        "retry_intervals": DurationList(
            ["10s", "30s", "1m", "2m", "5m", "10m", "10m", "15m", "15m"],
            doc="waits between tries (10 tries over about an hour)",
        ),
        "secret": Str("", secret=True, doc="HMAC-SHA256 signing secret; empty: unsigned"),
        "allowed_hosts": HostList(
            [],
            doc="if non-empty, only these receive webhooks: host, "
            "*.suffix, host:port, CIDR or address (and port), or * for any host; only a CIDR "
            "or address entry allows a private address (a host name never does: its DNS could "
            "change)",
        ),
        "deny_private_networks": Bool(
            True,
            doc="refuse loopback/private/link-local targets "
            "unless a CIDR or address entry of allowed_hosts allows them",
        ),
        "concurrency": Int(8, 1, 256, doc="deliveries one worker process makes at once"),
        "max_per_receiver": Int(
            2,
            1,
            256,
            doc="of those, at most this many to one receiver "
            "(the address and port a delivery connects to); the rest wait their turn, "
            "no try spent",
        ),
    },
    "workers": {
        "maintenance_interval": Duration(
            "30s", 1, doc="how often workers look for jobs whose worker died (RQ's default is 10m)"
        ),
        "heartbeat_interval": Duration(
            "5s",
            1,
            300,
            doc="a busy worker's heartbeat; a job whose "
            "worker was killed is retried ~3x this plus "
            "maintenance_interval later",
        ),
        "job_timeout": Duration(
            "60s",
            1,
            doc="a webhook delivery job running longer is stopped (at least "
            "webhooks.timeout + 10s; the scheduler's maintenance jobs have 60s)",
        ),
        "count": Int(1, 1, 64, doc="RQ worker processes that `up` starts"),
    },
    "dashboard": {
        "enabled": Bool(True, doc="mount rq-dashboard under /rq"),
        "allow_delete": Bool(False, doc="let rq-dashboard delete jobs and empty queues"),
    },
}


# --------------------------------------------------------------------------- the object


class Section:
    """Attribute access to one validated config section (read-only by convention)."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)

    def __getitem__(self, key):
        return self.__dict__[key]

    def get(self, key, default=None):
        return self.__dict__.get(key, default)

    def __repr__(self):
        return f"Section({self.__dict__!r})"


class Settings:
    """The effective configuration: ``settings.scheduler.max_queue_size`` and friends."""

    def __init__(self, values: dict[str, dict[str, Any]], path: str | None = None):
        self._values = values
        self.path = path
        for name, section in values.items():
            setattr(self, name, _to_section(SPEC[name], section))

    def as_dict(self) -> dict:
        return copy.deepcopy(self._values)

    def redacted(self) -> dict:
        """The config as ``config show`` prints it: durations spelled out, secrets hidden."""
        out = {sec: _show(SPEC[sec], vals) for sec, vals in self._values.items()}
        out["tenants"]["key"] = tenant_key(self)  # the auth-dependent default, resolved
        return out

    def replace(self, **overrides: Mapping[str, Any]) -> Settings:
        """A copy with some values changed (validated), e.g. ``replace(redis={"url": ...})``."""
        values = self.as_dict()
        for section, changes in overrides.items():
            _merge(values, {section: dict(changes)}, SPEC, "override", [])
        _sentinel_default_url(values, "override")
        return Settings(values, self.path)


def _to_section(spec, values):
    return Section(
        {k: _to_section(spec[k], v) if isinstance(spec[k], dict) else v for k, v in values.items()}
    )


def _show(spec, vals):
    out = {}
    for key, val in vals.items():
        opt = spec[key]
        if isinstance(opt, dict):
            out[key] = _show(opt, val)
        elif opt.secret:
            out[key] = REDACTED if val else ""
        else:
            out[key] = opt.show(val)
    return out


def _defaults(spec=SPEC):
    return {
        k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)
        for k, v in spec.items()
    }


def _merge(target: dict, raw: Any, spec: dict, source: str, path: list[str]):
    """Validate ``raw`` against ``spec`` and write the converted values into ``target``."""
    where = ".".join(path) or "(top level)"
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(source, where, "a mapping", raw)
    for key, value in raw.items():
        key_path = path + [str(key)]
        name = ".".join(key_path)
        if key not in spec:
            choices = ", ".join(sorted(spec))
            raise ConfigError(source, name, f"a known key (one of {choices})", show_got=False)
        opt = spec[key]
        if isinstance(opt, dict):
            _merge(target[key], value, opt, source, key_path)
            continue
        try:
            target[key] = opt.parse(value)
        except _BadAt as bad:
            raise ConfigError(source, name + bad.where, str(bad), bad.got) from None
        except _Bad as bad:
            got = opt.redact_got(value) if opt.redact_got else value
            raise ConfigError(source, name, str(bad), got, show_got=not opt.secret) from None


def _sentinel_default_url(values: dict, source: str) -> None:
    """With ``redis.sentinel`` set and no URL, the URL every role uses is the sentinel one."""
    red = values["redis"]
    if red["sentinel"]["master_name"]:
        if red["url"] and not red["url"].startswith(SENTINEL_SCHEME + "://"):
            raise ConfigError(
                source,
                "redis.url",
                "empty or a redis+sentinel:// URL when redis.sentinel is set",
                redact_url(red["url"]),
            )
        red["url"] = red["url"] or sentinel_url(red["sentinel"])


def _check_consistency(values: dict, source: str):
    for wtype, w in values["workload_defaults"].items():
        if w["xlarge_batch_size"] < w["large_batch_size"]:
            raise ConfigError(
                source,
                f"workload_defaults.{wtype}.xlarge_batch_size",
                "a value >= large_batch_size",
                w["xlarge_batch_size"],
            )
        if w["very_high_concurrency"] < w["high_concurrency"]:
            raise ConfigError(
                source,
                f"workload_defaults.{wtype}.very_high_concurrency",
                "a value >= high_concurrency",
                w["very_high_concurrency"],
            )
    if values["auth"]["enabled"] and not values["auth"]["api_keys"]:
        raise ConfigError(
            source, "auth.api_keys", "at least one key when auth.enabled is true", show_got=False
        )
    sched = values["scheduler"]
    if 0 < sched["node_forget_after"] <= sched["node_heartbeat_timeout"]:
        raise ConfigError(
            source,
            "scheduler.node_forget_after",
            "0 (never) or a duration longer than node_heartbeat_timeout",
            format_duration(sched["node_forget_after"]),
        )
    _sentinel_default_url(values, source)
    tenants = values["tenants"]
    for name, entry in tenants["quotas"].items():
        try:
            _tenant_entry(entry, tenants["default"], f".{name}")
        except _BadAt as bad:
            raise ConfigError(source, "tenants.quotas" + bad.where, str(bad), bad.got) from None
    for key, principal in values["auth"]["api_keys"].items():
        if key.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", key):
            raise ConfigError(
                source, "auth.api_keys", "sha256: followed by 64 hex digits", show_got=False
            )
        # the engine stores an idempotency key as "<owner>|<key>": principals "a" and "a|b"
        # would share "a|b|c" (a|b's key "c", a's key "b|c") and replay each other's requests
        if "|" in principal:
            raise ConfigError(source, "auth.api_keys", "principal names without '|'", principal)


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, dict]]:
    """(variable name, nested raw dict) for every variable that sets a key."""
    out = []
    for var, (section, key) in ENV_ALIASES.items():
        if environ.get(var, "") != "":
            out.append((var, {section: {key: _env_value(environ[var], section, key)}}))
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        raw: Any = _env_value(environ[var], *parts)
        for part in reversed(parts):
            raw = {part: raw}
        out.append((var, raw))
    return out


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping. YAML parsers keep the
    last of two equal keys without a word, so a second ``auth:`` section would drop the first
    one's ``enabled: true`` while ``config check`` said OK."""


def _mapping_with_unique_keys(loader: _YamlLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden: that is what << is for
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, list | dict):
            continue  # unhashable: construct_mapping refuses it with its own message
        if key in seen:
            raise yaml.constructor.ConstructorError(
                problem=f"key {key!r} given twice in one mapping",
                problem_mark=key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


yaml.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_unique_keys, Loader=_YamlLoader
)


def _parse_yaml(text: str) -> Any:
    """The one way settings read YAML (a file or an environment value)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no arbitrary objects


def _env_value(text: str, *path: str) -> Any:
    """Parse an environment value as YAML, except for options that are plain strings."""
    opt: Any = SPEC
    for part in path:
        opt = opt.get(part) if isinstance(opt, dict) else None
    if isinstance(opt, Opt) and opt.expected.startswith(("a string", "a URL", "an HTTP", "a key")):
        return text
    try:
        return _parse_yaml(text)
    except yaml.YAMLError:
        return text


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load and validate; raise ConfigError (one line) on any problem.

    ``path`` wins over ``CONFIG_PATH``. A missing file is fine only at the default path.
    """
    environ = os.environ if environ is None else environ
    explicit = path or environ.get("CONFIG_PATH") or None
    path = explicit or DEFAULT_CONFIG_PATH
    values = _defaults()
    raw = read_yaml(path, required=bool(explicit))
    if raw is not None:
        _merge(values, raw, SPEC, path, [])
    env = _env_overrides(environ)
    for var, raw_env in env:
        _merge(values, raw_env, SPEC, f"environment {var}", [])
    # a rule across keys blames what set them: the file, the environment, or both
    sources = [path] if raw is not None else []
    _check_consistency(values, " and ".join(sources + ["environment"] * bool(env)) or path)
    return Settings(values, path if os.path.exists(path) else None)


def read_yaml(path: str, required: bool) -> Any:
    """The parsed YAML file, None when absent and optional; ConfigError otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(
                path, "(file)", "an existing, readable config file", show_got=False
            ) from None
        return None
    except OSError as exc:
        raise ConfigError(
            path, "(file)", f"a readable file ({exc.strerror})", show_got=False
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a file saved as Latin-1, or not text at all
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, f"line {line}", "UTF-8 text", show_got=False) from None
    try:
        return _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or "valid YAML"
        raise ConfigError(path, where, f"valid YAML ({problem})", show_got=False) from None


def webhook_retry_span(settings: Settings) -> float:
    """Longest time from a webhook event's first try to its last one: every interval of
    ``webhooks.retry_intervals`` (rounded up to whole seconds, as RQ schedules them) plus one
    ``webhooks.timeout`` for each failed try before the last."""
    intervals = settings.webhooks.retry_intervals
    return sum(math.ceil(x) for x in intervals) + len(intervals) * settings.webhooks.timeout


def warnings(settings: Settings) -> list[str]:
    """Valid settings that work against each other, one line each (``config check`` prints
    them; every role logs them at start). Nothing here is refused: the config still works."""
    out = []
    ttl, span = settings.scheduler.history_ttl, webhook_retry_span(settings)
    if ttl < span:
        # An end event (released, expired, ...) is sent as the request's record starts its
        # history_ttl: a try after that finds no record and counts as webhook|failed.
        out.append(
            f"scheduler.history_ttl ({format_duration(ttl)}) is shorter than the retry span "
            f"of webhooks.retry_intervals ({format_duration(span)} with webhooks.timeout per "
            "failed try): a webhook still retrying then finds its request gone and fails"
        )
    return out


def check_file(path: str) -> Settings:
    """Validate one file on its own (``config check``): defaults plus the file, no env."""
    return load(path, environ={})


def defaults() -> Settings:
    """Built-in defaults only; handy for tests."""
    return Settings(_defaults())


__all__ = [
    "ConfigError",
    "Settings",
    "Section",
    "load",
    "check_file",
    "defaults",
    "warnings",
    "webhook_retry_span",
    "parse_duration",
    "WORKLOAD_TYPES",
    "SPEC",
    "tenant_key",
    "tenant_quota",
    "tenant_quotas",
    "tenants_configured",
]
