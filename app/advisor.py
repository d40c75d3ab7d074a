"""The DeepAgents advisor: an optional second opinion on a workload, never a point of failure.

``Advisor.advise()`` POSTs the original service's request to ``{url}/invoke/structured`` (one user
message describing the workload, plus ``response_format`` with the JSON schema
``{required_gpus, min_memory_mb, priority, reasoning}``), reads ``structured_output`` from the
answer, and validates and clamps it. Any failure (refused connection, time limit, HTTP error,
garbage) returns ``None`` so the caller falls back to its rules.

Two guards keep a sick advisor from slowing allocations down:

- a hard time limit: the HTTP call runs on a small thread pool and the caller waits at most
  ``timeout`` seconds for it (the socket timeouts are the same, so a stuck thread frees itself
  soon after);
- a circuit breaker (app/breaker.py, shared with the graph service): ``breaker_failures``
  failures in a row open it, and for ``breaker_cooldown`` seconds every call is skipped at no
  cost. After that one caller is let through as a trial (half-open); its success closes the
  breaker, its failure opens it for another cooldown.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from prometheus_client import Counter

from app.breaker import Breaker
from app.request_rules import FIELDS
from app.settings import redact_url, url_with_path

#: The request's priority rule (app.request_rules): the advice is clamped to it.
PRIORITY = FIELDS["priority"]

log = logging.getLogger(__name__)

#: Advisor calls by outcome: ok, timeout, error (connection/HTTP), garbage, skipped (breaker open).
ADVISOR_CALLS = Counter(
    "gpu_orchestrator_advisor_calls", "DeepAgents advisor calls by outcome", ["outcome"]
)

MAX_RESPONSE_BYTES = 1 << 20

#: The JSON schema the original service sent as ``response_format.json_schema``.
RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {
        "required_gpus": {"type": "integer", "minimum": 0},
        "min_memory_mb": {"type": "integer", "minimum": 0},
        "priority": {"type": "integer", "minimum": PRIORITY.lo, "maximum": PRIORITY.hi},
        "reasoning": {"type": "string"},
    },
    "required": ["required_gpus", "min_memory_mb", "priority"],
}


@dataclass(frozen=True)
class Advice:
    """A validated, clamped recommendation; ``clamped`` lists the fields that were pulled in."""

    required_gpus: int
    min_memory_mb: int
    priority: int
    reasoning: str
    clamped: tuple[str, ...] = ()


class AdvisorGarbage(ValueError):
    """The advisor answered, but not with a usable recommendation."""


def build_request(service_name: str | None, workload_type: str, workload_data: dict) -> dict:
    """The original request body: one user message and the structured-output schema."""
    prompt = (
        f"Use the analyze_workload tool to analyze GPU requirements for service "
        f"'{service_name or 'unknown'}' with workload type '{workload_type}'.\n\n"
        f"Workload data: {json.dumps(workload_data, sort_keys=True, default=str)}\n\n"
        "Then use the query_gpu_status tool to check current GPU availability.\n\n"
        "Based on the analysis, provide a structured recommendation with required_gpus, "
        "min_memory_mb, and priority."
    )
    return {
        "messages": [{"role": "user", "content": prompt}],
        "response_format": {"type": "json_schema", "json_schema": RESPONSE_SCHEMA},
    }


def _number(output: dict, field: str) -> float:
    value = output.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdvisorGarbage(f"{field} is {value!r}, not a number")
    return value


def parse_advice(answer: Any, *, max_gpus: int, max_memory_mb: int) -> Advice:
    """Validate ``answer['structured_output']`` and clamp it to the fleet.

    GPUs go to 1..max_gpus, priority to 1..10, memory to 0..max_memory_mb (all rounded down, as
    the original did with its integer conversion). Raises AdvisorGarbage when a required field is
    missing or is not a finite number.
    """
    if not isinstance(answer, dict) or not isinstance(answer.get("structured_output"), dict):
        raise AdvisorGarbage("no structured_output object in the answer")
    output = answer["structured_output"]
    raw = {f: _number(output, f) for f in ("required_gpus", "min_memory_mb", "priority")}
    bounds = {
        "required_gpus": (1, max(1, max_gpus)),
        "min_memory_mb": (0, max(0, max_memory_mb)),
        "priority": (PRIORITY.lo, PRIORITY.hi),
    }
    values, clamped = {}, []
    for field, (lo, hi) in bounds.items():
        value = min(max(int(raw[field]), lo), hi)
        if value != raw[field]:
            clamped.append(field)
        values[field] = value
    reasoning = output.get("reasoning")
    reasoning = reasoning.strip()[:500] if isinstance(reasoning, str) else ""
    return Advice(reasoning=reasoning, clamped=tuple(clamped), **values)


class Advisor:
    """Client for one DeepAgents URL, with a time limit and a circuit breaker."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        breaker_failures: int = 3,
        breaker_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        session: requests.Session | None = None,
        max_workers: int = 4,
    ):
        if not url:
            raise ValueError("url must be a non-empty http(s) URL")
        if timeout <= 0 or breaker_failures < 1 or breaker_cooldown < 0:
            raise ValueError("timeout > 0, breaker_failures >= 1 and breaker_cooldown >= 0")
        self.url = url_with_path(url, "/invoke/structured")
        self._shown = redact_url(self.url)  # as logs show it: no basic-auth password
        self.timeout = timeout
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self._session = session or requests.Session()
        self._max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._breaker = Breaker(
            "advisor",
            failures=breaker_failures,
            cooldown=breaker_cooldown,
            clock=clock,
            log=log,
            shown=self._shown,
        )

    @classmethod
    def from_settings(cls, settings, **kwargs) -> Advisor | None:
        """The advisor ``services.deepagents_url`` names, or None when it is empty."""
        svc = settings.services
        if not svc.deepagents_url:
            return None
        return cls(
            svc.deepagents_url,
            timeout=svc.deepagents_timeout,
            breaker_failures=svc.breaker_failures,
            breaker_cooldown=svc.breaker_cooldown,
            **kwargs,
        )

    # ------------------------------------------------------------------ breaker

    @property
    def state(self) -> str:
        """The breaker's: closed, open or half_open."""
        return self._breaker.state

    # ------------------------------------------------------------------ calls

    def advise(
        self,
        service_name: str | None,
        workload_type: str,
        workload_data: dict,
        *,
        max_gpus: int,
        max_memory_mb: int,
    ) -> Advice | None:
        """A clamped recommendation, or None (breaker open, time limit, error, garbage)."""
        if not self._breaker.admit():
            ADVISOR_CALLS.labels("skipped").inc()
            return None
        body = build_request(service_name, workload_type, workload_data)
        try:
            future = self._executor().submit(self._post, body)
            answer = future.result(timeout=self.timeout)
            advice = parse_advice(answer, max_gpus=max_gpus, max_memory_mb=max_memory_mb)
        except FutureTimeout:
            future.cancel()
            return self._fail("timeout", f"no answer within {self.timeout:g}s")
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            return self._fail("timeout", f"no answer within {self.timeout:g}s")
        except AdvisorGarbage as exc:
            return self._fail("garbage", str(exc))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            return self._fail("error", str(exc) or type(exc).__name__)
        except Exception as exc:  # an advisor failure never fails an allocation
            log.exception("advisor call failed unexpectedly")
            return self._fail("error", type(exc).__name__)
        self._breaker.record(True)
        ADVISOR_CALLS.labels("ok").inc()
        return advice

    def _fail(self, outcome: str, why: str) -> None:
        log.warning("advisor %s: %s; using the rules", outcome, why)
        ADVISOR_CALLS.labels(outcome).inc()
        self._breaker.record(False)
        return None

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="advisor")
            return self._pool

    def _post(self, body: dict) -> Any:
        """One HTTP call; runs on the pool. Raises on HTTP errors and unparsable bodies.

        The caller stops waiting after ``timeout``; the loop's own deadline makes sure a server
        that drips its answer byte by byte cannot hold a pool thread for long either.
        """
        give_up = time.monotonic() + 2 * self.timeout
        with self._session.post(
            self.url, json=body, timeout=(self.timeout, self.timeout), stream=True
        ) as resp:
            if resp.status_code != 200:
                raise requests.HTTPError(f"HTTP {resp.status_code} from {self._shown}")
            data = bytearray()
            while chunk := resp.raw.read1(65536, decode_content=True):  # what has arrived
                data += chunk
                if time.monotonic() > give_up:
                    raise requests.Timeout("answer still arriving")
                if len(data) > MAX_RESPONSE_BYTES:
                    raise AdvisorGarbage(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            return json.loads(data)
        except ValueError:
            raise AdvisorGarbage("answer is not JSON") from None

    def close(self) -> None:
        """Stop the pool (without waiting for stuck calls) and close the HTTP session."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()
