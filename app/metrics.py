"""Prometheus metrics: HTTP metrics per process, fleet and domain metrics read from Redis.

Two sources make up one ``/metrics`` answer:

- **HTTP metrics** (``gpu_orchestrator_http_requests_total``,
  ``gpu_orchestrator_http_request_duration_seconds``) are counted in the process that served the
  request. Under gunicorn every worker is a separate process, so they run in prometheus_client's
  multiprocess mode: each worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and
  the scrape, whichever worker answers it, merges all files with ``MultiProcessCollector``.
- **Fleet, queue and domain metrics** are read from Redis by :class:`RedisCollector`, so
  every replica reports the same truth; each process collects them at most once per
  :data:`REDIS_MAX_AGE` seconds (:class:`RecentCollection`): ``/metrics`` is public by default
  and one collection at 1,024 GPUs costs ~110 ms of CPU and ~1,200 Redis commands.

Trap avoided: in multiprocess mode a custom collector registered on a shared registry never
reaches the output, because the scrape must build a fresh registry holding only
``MultiProcessCollector``. Our view builds that registry itself on every scrape and appends the
Redis collector's text (:class:`RecentCollection`) to its output.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from app.errors import NotFound
from app.flask_context import current_request, request_globals

log = logging.getLogger("gpu_orchestrator.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Route label for requests that matched no route (keeps the label set bounded).
UNMATCHED = "<unmatched>"
#: Method labels: the standard methods (RFC 9110 and PATCH); anything else a client invents
#: is counted as ``other``, so random methods cannot add series.
METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
OTHER = "other"
#: Methods that change nothing (any other, answered 2xx, makes the next scrape collect afresh).
_READS = frozenset(("GET", "HEAD", "OPTIONS"))
#: Endpoints that change nothing whatever their method: POST /gpu/workload only analyses. Each
#: answer of one made the next scrape read Redis afresh (~1,200 commands at 1,024 GPUs), so a
#: client alternating it with GET /metrics got a collection per pair without a GPU or a write.
_READ_ONLY_ENDPOINTS = frozenset(("gpu.workload",))
#: Appended to the route label of a long-poll (``?wait=``): its duration is mostly the wait the
#: client asked for, and would drown the route's real latency.
LONG_POLL_SUFFIX = "?wait"


#: Seconds a process answers scrapes with the figures it last read from Redis (Prometheus
#: scrapes every 15 s or so; a burst of scrapes costs one collection). A request that changes
#: state through this process makes the next scrape read afresh (see RecentCollection).
REDIS_MAX_AGE = 1.0


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


#: Per-GPU gauges: metric name -> (GPU field, help).
GPU_GAUGES = {
    "gpu_orchestrator_gpu_utilization_percent": ("utilization", "GPU utilization in percent"),
    "gpu_orchestrator_gpu_memory_used_mb": ("memory_used_mb", "GPU memory in use, MB"),
    "gpu_orchestrator_gpu_memory_total_mb": ("memory_total_mb", "GPU memory in total, MB"),
    "gpu_orchestrator_gpu_temperature_celsius": ("temperature", "GPU temperature, Celsius"),
    "gpu_orchestrator_gpu_power_draw_watts": ("power_draw", "GPU power draw, watts"),
}


def multiprocess_dir() -> str | None:
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


class HttpMetrics:
    """The two HTTP metrics, labelled by method, route template and status."""

    def __init__(self, registry: CollectorRegistry | None):
        # prometheus_client picks file-backed values when it is first imported with
        # PROMETHEUS_MULTIPROC_DIR set: app.serve sets it before anything imports this module.
        self.requests = Counter(
            "gpu_orchestrator_http_requests_total",
            "HTTP requests served",
            ("method", "route", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "gpu_orchestrator_http_request_duration_seconds",
            "HTTP request duration",
            ("method", "route", "status"),
            buckets=HTTP_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.duration.labels(*labels).observe(seconds)


class RedisCollector:
    """Fleet gauges and cluster-wide counters, read from Redis through the engine per scrape.

    A Redis outage must not break the scrape: the HTTP metrics still matter then. The collector
    reports ``gpu_orchestrator_redis_up 0`` and skips the rest.
    """

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterable[Any]:
        import redis

        try:
            counts = self.engine.counts(nodes=True)
            snapshot_gpus = self.engine.snapshot(requests=False)["gpus"]
            stats = self.engine.stats()
            tenants = self.engine.tenants()
            labelled = tenant_labels(self.engine)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable (%s)", exc.__class__.__name__)
            yield _gauge("gpu_orchestrator_redis_up", "1 when Redis answered this scrape", 0)
            return
        yield _gauge("gpu_orchestrator_redis_up", "1 when Redis answered this scrape", 1)
        yield _gauge(
            "gpu_orchestrator_allocations_active",
            "live allocations",
            counts.get("allocations_active", 0),
        )
        yield _gauge(
            "gpu_allocator_gpus_allocated_total",
            "GPUs held by live allocations",
            counts.get("gpus_allocated", 0),
        )
        yield _gauge(
            "gpu_orchestrator_queue_depth",
            "requests waiting in the queue",
            counts.get("queue_depth", 0),
        )
        yield _gauge(
            "gpu_orchestrator_gpus_total", "GPUs known to the fleet", counts.get("gpus_total", 0)
        )
        yield _gauge(
            "gpu_orchestrator_gpus_available",
            "GPUs free and schedulable",
            counts.get("gpus_available", 0),
        )
        nodes = GaugeMetricFamily(
            "gpu_orchestrator_nodes",
            "nodes known to the fleet, by state (silent: no heartbeat "
            "within scheduler.node_heartbeat_timeout)",
            labels=("state",),
        )
        alive = counts.get("nodes_alive", 0)
        nodes.add_metric(["alive"], float(alive))
        nodes.add_metric(["silent"], float(counts.get("nodes_total", 0) - alive))
        yield nodes
        yield from _gpu_gauges(snapshot_gpus)
        yield from stats_families(stats, self.engine.settings.monitoring.max_service_labels)
        yield from tenant_families(tenants, labelled)


class RecentCollection:
    """The Redis collector's exposition text, collected at most once per ``max_age`` seconds of
    ``clock`` (the engine's injected clock, else ``time.monotonic``): whoever sends scrapes,
    and however many, Redis and this process pay for one collection per interval.

    Concurrent scrapes (threads of one worker): the first takes the lock and collects; the
    others wait on the lock, then find the text it left and send that. A failed collection
    (``gpu_orchestrator_redis_up 0``) is kept as long, so an outage is not retried per scrape.
    :meth:`stale` (a state change served by this process) makes the next scrape collect, also
    when it comes while a collection runs: that collection may have read Redis before the
    change, so its text is sent but not kept.
    """

    def __init__(self, collector: Any, clock: Any, max_age: float = REDIS_MAX_AGE):
        self.collector = collector
        self.clock = clock
        self.max_age = max_age
        self.collections = 0  # how many times Redis was read (tests, operators debugging)
        self._lock = threading.Lock()
        self._text = b""
        self._at: float | None = None
        self._changes = 0  # bumped by stale(), which takes no lock (it never waits)

    def text(self) -> bytes:
        with self._lock:
            now = self.clock()
            if self._at is None or not 0 <= now - self._at < self.max_age:
                changes = self._changes
                self._text = generate_latest(self.collector)
                self._at = self.clock() if changes == self._changes else None
                self.collections += 1
            return self._text

    def stale(self) -> None:
        self._changes += 1
        self._at = None


def tenant_labels(engine: Any) -> set[str]:
    """Tenants that get their own ``tenant`` label: the configured ones, the principals of
    ``auth.api_keys``, and the services with their own stats label (at most
    ``monitoring.max_service_labels``). Any other name a client sends is ``other``, so no
    number of service names adds series."""
    from app.settings import tenant_quotas

    settings = engine.settings
    names = set(tenant_quotas(settings)) | set(settings.auth.api_keys.values())
    names |= set(engine.redis.smembers(engine.keys.stats_services()))
    return names


def tenant_families(tenants: list[dict[str, Any]], labelled: set[str]) -> Iterable[Any]:
    """``gpu_orchestrator_tenant_gpus_held`` and ``..._tenant_queued_requests`` by tenant."""
    held: dict[str, float] = {}
    queued: dict[str, float] = {}
    for row in tenants:
        label = row["tenant"] if row["tenant"] in labelled and row["tenant"] != OTHER else OTHER
        held[label] = held.get(label, 0.0) + row["gpus_held"]
        queued[label] = queued.get(label, 0.0) + row["queued"]
    for name, doc, values in (
        (
            "gpu_orchestrator_tenant_gpus_held",
            "GPUs each tenant's live allocations hold (a shared allocation counts as one)",
            held,
        ),
        ("gpu_orchestrator_tenant_queued_requests", "requests each tenant has queued", queued),
    ):
        fam = GaugeMetricFamily(name, doc, labels=("tenant",))
        for label in sorted(values):
            fam.add_metric([label], values[label])
        yield fam


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc)
    fam.add_metric([], float(value or 0))
    return fam


def _gpu_gauges(gpus: list[dict[str, Any]]) -> Iterable[Any]:
    labels = ("node", "gpu", "uuid", "name")
    for metric, (field, doc) in GPU_GAUGES.items():
        fam = GaugeMetricFamily(metric, doc, labels=labels)
        for gpu in gpus:
            value = gpu.get(field)
            if value is None or value == "":
                continue
            fam.add_metric(
                [
                    str(gpu.get("node", "")),
                    str(gpu.get("index", "")),
                    str(gpu.get("uuid") or ""),
                    str(gpu.get("name") or ""),
                ],
                float(value),
            )
        yield fam


def service_series(
    allocations: dict[str, dict[str, int]], max_labels: int
) -> dict[str, dict[str, int]]:
    """At most ``max_labels`` services keep their own label; the rest are summed as ``other``.
    The scripts already fold new services into ``other`` past the limit; this also bounds a
    stats hash written before the limit existed (or under a larger one)."""
    own = sorted(s for s in allocations if s != OTHER)
    if len(own) <= max_labels:
        return allocations
    keep = set(own[:max_labels])
    out: dict[str, dict[str, int]] = {}
    for service in sorted(allocations):
        into = out.setdefault(service if service in keep else OTHER, {})
        for status, value in allocations[service].items():
            into[status] = into.get(status, 0) + value
    return out


def stats_families(stats: dict[str, Any], max_service_labels: int = 100) -> Iterable[Any]:
    """Counters and the queue-wait histogram from the engine's cluster-wide stats."""
    alloc = CounterMetricFamily(
        "gpu_orchestrator_allocations_total",
        "requests by service and outcome",
        labels=("service", "status"),
    )
    series = service_series(stats.get("allocations", {}), max_service_labels)
    for service, by_status in sorted(series.items()):
        for status, value in sorted(by_status.items()):
            alloc.add_metric([service, status], float(value))
    yield alloc

    sched = CounterMetricFamily(
        "gpu_scheduler_scheduled_total", "scheduling outcomes", labels=("status",)
    )
    for status, value in sorted(stats.get("scheduler", {}).items()):
        sched.add_metric([status], float(value))
    yield sched

    wait = stats.get("wait") or {}
    buckets = wait.get("buckets") or []
    if buckets:
        hist = HistogramMetricFamily(
            "gpu_scheduler_queue_wait_seconds", "time from queueing to grant, seconds"
        )
        hist.add_metric([], [(_le(le), float(c)) for le, c in buckets], float(wait.get("sum", 0)))
        yield hist

    hooks = CounterMetricFamily(
        "gpu_orchestrator_webhooks_total", "webhook deliveries by result", labels=("result",)
    )
    for result, value in sorted(stats.get("webhooks", {}).items()):
        hooks.add_metric([result], float(value))
    yield hooks

    pre = CounterMetricFamily(
        "gpu_orchestrator_preemptions_total",
        "allocations given notice to leave (drain, or another tenant's guarantee), by tenant",
        labels=("tenant",),
    )
    for tenant, value in sorted(stats.get("preemptions", {}).items()):
        pre.add_metric([tenant], float(value))
    yield pre


def _le(le: Any) -> str:
    le = float(le)
    return "+Inf" if math.isinf(le) else repr(le)


class _Combined:
    """A registry-like object yielding from several collectors (generate_latest needs collect)."""

    def __init__(self, *collectors: Any):
        self.collectors = collectors

    def collect(self) -> Iterable[Any]:
        for collector in self.collectors:
            yield from collector.collect()


def init_app(app: Flask, engine: Any) -> None:
    """Count every request; provide the ``/metrics`` view (routed by :mod:`app.api.health`).

    With ``monitoring.metrics_enabled: false`` nothing is counted and ``/metrics`` is a 404.
    """
    if not engine.settings.monitoring.metrics_enabled:

        def disabled():
            raise NotFound("metrics are disabled (monitoring.metrics_enabled: false)")

        app.extensions["gpu_metrics_view"] = disabled
        return
    mp_dir = multiprocess_dir()
    # Single process (tests, dev): a registry per app, so several apps never collide.
    # Multiprocess: the values live in files; the registry is rebuilt per scrape.
    local = None if mp_dir else CollectorRegistry(auto_describe=True)
    http = HttpMetrics(local)
    recent = RecentCollection(RedisCollector(engine), engine.clock or time.monotonic)
    app.extensions["gpu_http_metrics"] = http
    app.extensions["gpu_metrics_recent"] = recent

    @app.before_request
    def _start_timer():
        request_globals()._metrics_start = time.perf_counter()

    @app.after_request
    def _record(response):
        start = request_globals().pop("_metrics_start", None)
        req = current_request()
        method, status, rule = req.method, response.status_code, req.url_rule
        if start is not None:
            route = rule.rule if rule is not None else UNMATCHED
            if (
                rule is not None
                and req.query_string
                and req.args.get("wait") not in (None, "", "0")
            ):
                route += LONG_POLL_SUFFIX  # held on purpose: kept out of the route's latency
            http.observe(method_label(method), route, status, time.perf_counter() - start)
        if (
            method not in _READS
            and 200 <= status < 300
            and (rule is None or rule.endpoint not in _READ_ONLY_ENDPOINTS)
        ):
            # this process changed state (a grant, a release, a drain...): its next scrape
            # shows it. Only a client allowed to write (with auth on: one with a key) can cause
            # a collection this way, one per successful write; scrapes alone never do within
            # REDIS_MAX_AGE.
            recent.stale()
        return response

    def metrics_view():
        if mp_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=mp_dir)
            source = _Combined(registry)
        else:
            from prometheus_client import REGISTRY

            # The global registry carries metrics other modules define (e.g. the workload
            # analyser's decisions) plus process metrics.
            source = _Combined(local, REGISTRY)
        # the text format is one family after another: this is byte for byte the answer of
        # one registry yielding both, as it was before the Redis part was kept
        body = generate_latest(source) + recent.text()
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    # The route itself is declared with the other probes in app.api.health (so it is in the spec).
    app.extensions["gpu_metrics_view"] = metrics_view
