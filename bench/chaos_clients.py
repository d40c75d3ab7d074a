"""Randomized API clients for the chaos run; each keeps a ledger of what the service acknowledged.

A client is one thread with its own seeded RNG, principal (API key) and keep-alive sessions to
every replica. It loops over a weighted mix of operations until told to stop:

- ``allocate``: a unique ``service_name`` per logical request, so that afterwards any second
  request created for it is visible. Some carry an ``Idempotency-Key`` (retried on the next
  replica after a connection error or a 5xx, and sometimes re-sent on purpose after a success:
  the answer must name the same id), some a webhook, some are ``shared``, some ask for 2-4 GPUs.
  A request without a key that fails ambiguously (the connection broke after sending) is not
  retried and not acknowledged: it may exist, and the leak check covers it.
- ``release``, ``renew`` (allocated ones), ``cancel`` (queued ones), ``status`` (any).

Every answer is recorded in ``Ledger.ops`` (start time, latency, status) for the latency table;
2xx answers for allocate/release/cancel also go to ``Ledger.acks``, which the checks replay
against Redis and the event stream afterwards.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests

WEIGHTS = {"allocate": 40, "release": 18, "renew": 10, "cancel": 8, "status": 24}
#: Most live (allocated or queued) requests a client holds before it stops allocating.
MAX_HELD = 5


@dataclass
class Ack:
    """An operation the service answered 2xx to: what it promised."""

    op: str  # allocate | release | cancel
    request_id: str
    status: int  # HTTP status
    t_send: float
    t_ack: float
    service_name: str = ""
    state: str = ""  # allocate: "allocated" or "queued"
    idem_key: str | None = None
    webhook: bool = False
    replayed: bool = False
    placement: str = ""  # allocate 200: "node:[gpu ids]" as answered
    depends_on: tuple[str, ...] = ()


@dataclass
class Ledger:
    client: int
    principal: str
    ops: list[tuple[float, float, str, int]] = field(default_factory=list)  # t, latency, op, code
    acks: list[Ack] = field(default_factory=list)
    submitted_services: set[str] = field(default_factory=set)  # every service_name ever sent
    idem_mismatches: list[tuple[str, str, str]] = field(default_factory=list)  # key, id1, id2
    unexpected: list[str] = field(default_factory=list)  # 5xx bodies other than 503, etc.
    vanished: list[tuple[str, float]] = field(default_factory=list)  # acked id read as 404


class ChaosClient(threading.Thread):
    """One randomized client; ``stop`` is a shared Event."""

    def __init__(
        self,
        index: int,
        seed: int,
        api_urls: list[str],
        api_key: str,
        principal: str,
        webhook_url: str,
        stop: threading.Event,
        *,
        ttl_range=(6, 15),
        pace=(0.02, 0.08),
        timeout: float = 5.0,
    ):
        super().__init__(name=f"chaos-client-{index}", daemon=True)
        self.index = index
        self.rng = random.Random(f"{seed}/{index}")
        self.urls = list(api_urls)
        self.headers = {"X-API-Key": api_key}
        self.webhook_url = webhook_url
        self.stop_event = stop
        self.ttl_range = ttl_range
        self.pace = pace
        self.timeout = timeout
        self.ledger = Ledger(index, principal)
        self.sessions = [requests.Session() for _ in self.urls]
        self.held: dict[str, str] = {}  # id -> "allocated" | "queued" (what we believe)
        self.seq = 0

    # ------------------------------------------------------------------ HTTP

    def _call(
        self, op: str, method: str, path: str, *, replica: int | None = None, **kwargs
    ) -> tuple[requests.Response | None, float, float, int]:
        """One HTTP call: (response, or None on a transport error; t_send; t_ack; replica)."""
        i = self.rng.randrange(len(self.urls)) if replica is None else replica % len(self.urls)
        headers = dict(self.headers, **kwargs.pop("headers", {}))
        t0 = time.time()
        try:
            resp = self.sessions[i].request(
                method, self.urls[i] + path, headers=headers, timeout=self.timeout, **kwargs
            )
        except requests.RequestException:
            t1 = time.time()
            self.ledger.ops.append((t0, t1 - t0, op, 0))
            self.sessions[i].close()
            self.sessions[i] = requests.Session()
            return None, t0, t1, i
        t1 = time.time()
        self.ledger.ops.append((t0, t1 - t0, op, resp.status_code))
        if resp.status_code >= 500 and resp.status_code != 503:
            self.ledger.unexpected.append(
                f"{op} {method} {path} -> {resp.status_code}: {resp.text[:300]}"
            )
        return resp, t0, t1, i

    # ------------------------------------------------------------------ operations

    def allocate(self) -> None:
        self.seq += 1
        service = f"chaos-c{self.index}-{self.seq}"
        rng = self.rng
        body: dict[str, Any] = {
            "service_name": service,
            "workload_type": "generic",
            "ttl_seconds": rng.randint(*self.ttl_range),
        }
        data: dict[str, Any] = {}
        if rng.random() < 0.25:
            body["sharing"] = "shared"
            data["min_memory_mb"] = rng.choice([8000, 16000, 24000, 40000])
        else:
            data["required_gpus"] = rng.choices([1, 2, 4, 8], weights=[50, 30, 15, 5])[0]
            data["min_memory_mb"] = 1000
        body["workload_data"] = data
        if rng.random() < 0.3:
            body["priority"] = rng.randint(1, 10)
        if self.held and rng.random() < 0.1:  # wait for one of our own live requests
            body["depends_on"] = [rng.choice(sorted(self.held))]
        if rng.random() < 0.1:
            body["preferred_gpus"] = rng.sample(range(8), rng.randint(1, 3))
        webhook = rng.random() < 0.4
        if webhook:
            body["webhook_url"] = f"{self.webhook_url}/c{self.index}"
        idem = (
            f"chaos-{self.index}-{self.seq}-{uuid.uuid4().hex[:8]}" if rng.random() < 0.6 else None
        )
        headers = {"Idempotency-Key": idem} if idem else {}
        self.ledger.submitted_services.add(service)
        replica = rng.randrange(len(self.urls))
        tries = 6 if idem else 1
        for attempt in range(tries):
            resp, t0, t1, used = self._call(
                "allocate",
                "POST",
                "/gpu/allocate",
                json=body,
                headers=headers,
                replica=replica + attempt,
            )
            if resp is not None and resp.status_code in (200, 202):
                payload = resp.json()
                rid = payload.get("id") or payload.get("request_id")
                state = "allocated" if resp.status_code == 200 else "queued"
                placement = (
                    f"{payload.get('node')}:{payload.get('gpu_ids')}"
                    if resp.status_code == 200
                    else ""
                )
                self.ledger.acks.append(
                    Ack(
                        "allocate",
                        rid,
                        resp.status_code,
                        t0,
                        t1,
                        service,
                        state,
                        idem,
                        webhook,
                        bool(payload.get("replayed")),
                        placement,
                        tuple(body.get("depends_on", ())),
                    )
                )
                self.held[rid] = state
                if idem and rng.random() < 0.25:
                    self._replay(body, headers, rid, used + 1)
                return
            if resp is not None and resp.status_code not in (429, 503) and resp.status_code < 500:
                return  # 4xx: a definite no (e.g. 422 unsatisfiable)
            if not idem or self.stop_event.is_set():
                return
            time.sleep(0.05 * (attempt + 1))

    def _replay(self, body, headers, rid: str, replica: int) -> None:
        """Send the same idempotent request again: the answer must name the same id."""
        resp, *_ = self._call(
            "allocate", "POST", "/gpu/allocate", json=body, headers=headers, replica=replica
        )
        if resp is not None and resp.status_code in (200, 202):
            payload = resp.json()
            other = payload.get("id") or payload.get("request_id")
            if other != rid:
                self.ledger.idem_mismatches.append((headers["Idempotency-Key"], rid, other))

    def _pick(self, state: str | None) -> str | None:
        ids = [i for i, s in self.held.items() if state is None or s == state]
        return self.rng.choice(ids) if ids else None

    def release(self) -> None:
        rid = self._pick("allocated")
        if rid is not None:
            self.release_id(rid)

    def release_id(self, rid: str) -> None:
        resp, t0, t1, _ = self._call("release", "POST", "/gpu/release", json={"allocation_id": rid})
        if resp is None:
            return
        if resp.status_code == 200:
            self.ledger.acks.append(Ack("release", rid, 200, t0, t1))
            self.held.pop(rid, None)
        elif resp.status_code in (404, 409):
            self._refresh(rid)

    def renew(self) -> None:
        rid = self._pick("allocated")
        if rid is None:
            return
        resp, *_ = self._call(
            "renew",
            "POST",
            f"/gpu/allocations/{rid}/renew",
            json={"ttl_seconds": self.rng.randint(*self.ttl_range)},
        )
        if resp is not None and resp.status_code in (404, 409):
            self._refresh(rid)

    def cancel(self) -> None:
        rid = self._pick("queued")
        if rid is not None:
            self.cancel_id(rid)

    def cancel_id(self, rid: str) -> None:
        resp, t0, t1, _ = self._call("cancel", "DELETE", f"/gpu/requests/{rid}")
        if resp is None:
            return
        if resp.status_code == 200:
            self.ledger.acks.append(Ack("cancel", rid, 200, t0, t1))
            self.held.pop(rid, None)
        elif resp.status_code in (404, 409):
            self._refresh(rid)

    def status(self) -> None:
        rid = self._pick(None)
        if rid is not None:
            self._refresh(rid)

    def _refresh(self, rid: str) -> None:
        resp, t0, _, _ = self._call("status", "GET", f"/gpu/requests/{rid}")
        if resp is not None and resp.status_code == 404:
            self.ledger.vanished.append((rid, t0))  # every id we hold was acknowledged
            self.held.pop(rid, None)
        if resp is None or resp.status_code != 200:
            return
        state = resp.json().get("status")
        if state in ("allocated", "queued"):
            self.held[rid] = state
        else:
            self.held.pop(rid, None)

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        ops = list(WEIGHTS)
        weights = [WEIGHTS[o] for o in ops]
        while not self.stop_event.is_set():
            op = self.rng.choices(ops, weights=weights)[0]
            if op == "allocate" and len(self.held) >= MAX_HELD:
                op = "release" if self._pick("allocated") else "cancel"
            try:
                getattr(self, op)()
            except Exception as exc:  # a harness bug must not hide as a quiet thread death
                self.ledger.unexpected.append(f"client {self.index} {op}: {exc!r}")
            self.stop_event.wait(self.rng.uniform(*self.pace))
        for s in self.sessions:
            s.close()
