"""Workflow context from the graph service: ``GET {url}/workflow/{id}``, with a small TTL cache.

The unified-workflow integration lets a request name its ``workflow_id``; when
``services.graph_service_url`` is set, the graph service may add the workflow's priority and the
steps it depends on. The lookup is best effort: on any failure (refused, slow, non-200, not JSON)
``lookup()`` returns None and the request proceeds with its own data.

Accepted answer shapes (the original service read the body as a free-form object): the fields
may sit at the top level or under ``"workflow"``; priority is ``priority`` or
``workflow_priority`` (1..10); dependencies are ``dependencies``, ``workflow_dependencies`` or
``depends_on`` (a list of strings). Anything else in the answer is ignored.

Caching: a successful lookup (including "no such workflow", a 404) is reused for ``cache_ttl``
seconds; a failure is remembered for ``min(cache_ttl, failure_ttl)`` seconds, so one workflow id
costs a dead graph service's time limit at most every few seconds. Two threads that miss the
cache at the same moment may both ask the service; that is harmless (same answer).

Circuit breaker (app/breaker.py, the advisor's; ``services.breaker_failures`` and
``services.breaker_cooldown``): the failure cache is per id, so without it every request with a
new ``workflow_id`` would wait the full time limit on a hanging service and could occupy every
API thread. ``breaker_failures`` failed lookups in a row open it; while it is open a lookup that
misses the cache returns None at once without asking, and after ``breaker_cooldown`` one lookup
goes out as a trial. Only failures that say the service is unwell count: no connection, no
answer in time, or a 5xx. An answer about the id (another 4xx, a body that is not a workflow)
neither counts nor resets the count: the id is the client's, and a client must neither switch
the graph service off for everyone with ids the service refuses nor keep a hanging service's
breaker closed with them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
import urllib3
from prometheus_client import Counter

from app.breaker import Breaker
from app.request_rules import FIELDS
from app.settings import redact_url, url_with_path

#: The request's priority rule (app.request_rules): the graph service's is clamped to it.
PRIORITY = FIELDS["priority"]

log = logging.getLogger(__name__)

#: Lookups sent or skipped, by outcome: ok (an answer, 404 included), timeout, error (no
#: connection or a 5xx), garbage (an answer that is not a workflow), skipped (breaker open).
GRAPH_LOOKUPS = Counter(
    "gpu_orchestrator_graph_lookups", "Graph-service workflow lookups by outcome", ["outcome"]
)

MAX_RESPONSE_BYTES = 1 << 20
MAX_DEPENDENCIES = 1000


@dataclass(frozen=True)
class WorkflowInfo:
    """What the graph service says about one workflow."""

    workflow_id: str
    priority: int | None = None
    dependencies: tuple[str, ...] = field(default_factory=tuple)


class _LookupFailed(Exception):
    """A lookup that gave no workflow; ``outcome`` is its GRAPH_LOOKUPS label."""

    def __init__(self, why: str, outcome: str = "garbage"):
        super().__init__(why)
        self.outcome = outcome

    @property
    def unwell(self) -> bool:
        """Does it count towards the breaker? Only when the service itself failed (else the
        answer was about the client's id: app.breaker's record(None))."""
        return self.outcome != "garbage"


def parse_workflow(workflow_id: str, body: Any) -> WorkflowInfo:
    """Pick priority and dependencies out of a graph-service answer; ignore what does not fit."""
    if not isinstance(body, dict):
        raise _LookupFailed("answer is not a JSON object")
    src = body.get("workflow") if isinstance(body.get("workflow"), dict) else body
    priority = None
    for key in ("priority", "workflow_priority"):
        value = src.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            priority = min(max(int(value), PRIORITY.lo), PRIORITY.hi)
            break
    deps: list[str] = []
    for key in ("dependencies", "workflow_dependencies", "depends_on"):
        value = src.get(key)
        if isinstance(value, list):
            deps = [d for d in value if isinstance(d, str) and d.strip()][:MAX_DEPENDENCIES]
            break
    return WorkflowInfo(workflow_id, priority, tuple(dict.fromkeys(deps)))


class WorkflowClient:
    """Looks workflows up in the graph service; thread-safe; never raises from ``lookup``."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        cache_ttl: float = 60.0,
        failure_ttl: float = 5.0,
        max_entries: int = 1024,
        breaker_failures: int = 3,
        breaker_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        session: requests.Session | None = None,
    ):
        if not url:
            raise ValueError("url must be a non-empty http(s) URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.failure_ttl = min(failure_ttl, cache_ttl)
        self.max_entries = max_entries
        self._clock = clock
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, WorkflowInfo | None]] = OrderedDict()
        self.breaker = Breaker(
            "graph service",
            failures=breaker_failures,
            cooldown=breaker_cooldown,
            clock=clock,
            log=log,
            shown=redact_url(self.url),
        )

    @classmethod
    def from_settings(cls, settings, **kwargs) -> WorkflowClient | None:
        """The client ``services.graph_service_url`` names, or None when it is empty."""
        svc = settings.services
        if not svc.graph_service_url:
            return None
        return cls(
            svc.graph_service_url,
            timeout=svc.graph_service_timeout,
            cache_ttl=svc.graph_cache_ttl,
            breaker_failures=svc.breaker_failures,
            breaker_cooldown=svc.breaker_cooldown,
            **kwargs,
        )

    def lookup(self, workflow_id: str) -> WorkflowInfo | None:
        """The workflow's context, or None when it is unknown, the service failed or its
        breaker is open (then nothing is sent and nothing is cached)."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(workflow_id)
            if hit is not None and hit[0] > now:
                return hit[1]
        if not self.breaker.admit():
            GRAPH_LOOKUPS.labels("skipped").inc()
            return None
        healthy: bool | None = False
        try:
            info, ttl = self._fetch(workflow_id), self.cache_ttl
            healthy = True
            GRAPH_LOOKUPS.labels("ok").inc()
        except Exception as exc:  # _LookupFailed, or anything unforeseen: never fail a request
            failed = exc if isinstance(exc, _LookupFailed) else _LookupFailed(repr(exc), "error")
            healthy = False if failed.unwell else None
            GRAPH_LOOKUPS.labels(failed.outcome).inc()
            log.warning(
                "graph service lookup of workflow %r failed: %s; using the request's own data",
                workflow_id,
                exc,
            )
            info, ttl = None, self.failure_ttl
        finally:
            self.breaker.record(healthy)  # admitted: always reported, or a trial never ends
        if ttl > 0:
            with self._lock:
                self._cache[workflow_id] = (self._clock() + ttl, info)
                self._cache.move_to_end(workflow_id)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return info

    def _fetch(self, workflow_id: str) -> WorkflowInfo | None:
        url = url_with_path(self.url, f"/workflow/{quote(workflow_id, safe='')}")
        give_up = time.monotonic() + self.timeout
        try:
            with self._session.get(url, timeout=(self.timeout, self.timeout), stream=True) as resp:
                if resp.status_code == 404:
                    return None
                if resp.status_code != 200:
                    unwell = resp.status_code >= 500
                    raise _LookupFailed(
                        f"HTTP {resp.status_code}", "error" if unwell else "garbage"
                    )
                data = bytearray()
                while chunk := resp.raw.read1(65536, decode_content=True):  # what has arrived
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise _LookupFailed("answer too large")
                    if time.monotonic() > give_up:
                        raise _LookupFailed(f"answer took longer than {self.timeout:g}s", "timeout")
            body = json.loads(data)
        except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise _LookupFailed(str(exc) or type(exc).__name__, "timeout") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _LookupFailed(str(exc) or type(exc).__name__, "error") from None
        except ValueError:
            raise _LookupFailed("answer is not JSON") from None
        return parse_workflow(workflow_id, body)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        self._session.close()
