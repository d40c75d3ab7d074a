"""The seeded fault schedule and the steps that inject and heal each fault.

:func:`schedule` turns (duration, seed) into a list of :class:`Step` at fixed offsets from the
start of the load; the same arguments always give the same schedule. Every kind of fault runs at
least once per round, and a round is squeezed into the duration, so even the short mode hits
all seven:

============== ==============================================================================
api_kill       SIGKILL one API replica's process group (gunicorn master and workers), restart
worker_kill    SIGKILL an RQ worker while it runs a job (the receiver is slowed to make sure)
scheduler_kill SIGKILL the scheduler, restart
redis_term     SIGTERM Redis (clean shutdown, final fsync), restart: nothing may be lost
redis_kill     SIGKILL Redis, restart and replay the AOF: loses at most the fsync window
webhook_outage receiver down (connections refused), then answering 500, then up again
node_silent    SIGSTOP one node's monitor until its heartbeat lapses, then SIGCONT
primary_kill   (``--sentinel``, instead of the two Redis faults) SIGKILL the Sentinel-managed
               primary, wait for the sentinels to promote the replica, start the old node
               again (it rejoins as the new primary's replica)
============== ==============================================================================

Steps run on the main thread (the thread that spawned the children; see chaos_topology).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "api_kill",
    "worker_kill",
    "scheduler_kill",
    "redis_term",
    "redis_kill",
    "webhook_outage",
    "node_silent",
)
#: With ``--sentinel``: the Redis faults become one SIGKILL of the primary and a failover.
SENTINEL_KINDS = tuple(k for k in KINDS if not k.startswith("redis_")) + ("primary_kill",)


@dataclass
class Step:
    at: float  # seconds after the load started
    kind: str  # a KINDS entry, or "<kind>:heal"
    target: str = ""
    hold: float = 0.0  # how long the fault lasts before it heals


@dataclass
class FaultRecord:
    kind: str
    target: str
    start: float
    end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def schedule(
    duration: float,
    seed: int,
    *,
    apis: int,
    workers: int,
    nodes: list[str],
    heartbeat_timeout: float,
    fault_kinds: tuple[str, ...] = KINDS,
) -> list[Step]:
    """Faults for a load phase of ``duration`` seconds; the first comes after 3 s of load and
    the last heals at least 3 s before the end."""
    rng = random.Random(seed)
    usable_start, usable_end = 3.0, max(6.0, duration - 8.0)
    rounds = max(1, int((usable_end - usable_start) // 35))
    slots = len(fault_kinds) * rounds
    gap = (usable_end - usable_start) / slots
    kinds: list[str] = []
    for _ in range(rounds):
        order = list(fault_kinds)
        rng.shuffle(order)
        kinds += order
    steps: list[Step] = []
    for i, kind in enumerate(kinds):
        at = usable_start + i * gap + rng.uniform(0, gap * 0.3)
        if kind == "api_kill":
            steps.append(Step(at, kind, f"api-{rng.randrange(apis)}", rng.uniform(1.0, 3.0)))
        elif kind == "worker_kill":
            steps.append(Step(at, kind, f"worker-{rng.randrange(workers)}", rng.uniform(0.5, 2.0)))
        elif kind == "scheduler_kill":
            steps.append(Step(at, kind, "scheduler", rng.uniform(1.0, 3.0)))
        elif kind in ("redis_term", "redis_kill", "primary_kill"):
            steps.append(Step(at, kind, "redis", 0.0))
        elif kind == "webhook_outage":
            steps.append(Step(at, kind, "receiver", rng.uniform(2.0, 4.0)))
        elif kind == "node_silent":
            steps.append(
                Step(
                    at,
                    kind,
                    f"monitor-{rng.choice(nodes)}",
                    heartbeat_timeout + rng.uniform(1.5, 3.0),
                )
            )
    return steps


class FaultInjector:
    """Carries out the steps against a Topology, a WebhookReceiver and the AOF canary."""

    def __init__(self, topology, receiver, canary, log: Callable[[str], None] = print):
        self.topo = topology
        self.receiver = receiver
        self.canary = canary
        self.log = log
        self.records: list[FaultRecord] = []
        self.pending: list[tuple[float, Callable[[], None]]] = []  # (monotonic time, heal)

    def _heal_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.pending.append((time.monotonic() + delay, fn))

    def tick(self) -> None:
        """Run the heals that are due."""
        now = time.monotonic()
        due = [p for p in self.pending if p[0] <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        for _, fn in sorted(due, key=lambda p: p[0]):
            fn()

    def heal_all(self) -> None:
        for _, fn in sorted(self.pending, key=lambda p: p[0]):
            fn()
        self.pending = []

    def inject(self, step: Step) -> FaultRecord:
        rec = FaultRecord(step.kind, step.target, time.time())
        self.records.append(rec)
        getattr(self, "_" + step.kind)(step, rec)
        self.log(f"fault {step.kind} {step.target}".rstrip())
        return rec

    def _restart_after(self, step: Step, rec: FaultRecord) -> None:
        def heal():
            self.topo.spawn(step.target)
            rec.end = time.time()

        self._heal_later(step.hold, heal)

    def _api_kill(self, step, rec):
        self.topo.kill(step.target)
        self._restart_after(step, rec)

    def _scheduler_kill(self, step, rec):
        self.topo.kill(step.target)
        self._restart_after(step, rec)

    def _worker_kill(self, step, rec):
        # Make deliveries slow, wait (briefly) for the worker to be inside a job, then kill it.
        self.receiver.delay = 1.0
        rec.detail["mid_job"] = self._wait_busy(step.target, timeout=3.0)
        self.topo.kill(step.target)
        self.receiver.delay = 0.0
        self._restart_after(step, rec)

    def _wait_busy(self, name: str, timeout: float) -> bool:
        """True once the worker process has a job in hand (RQ's worker hash names it)."""
        try:
            from rq import Worker

            from bench.sentinel_topology import open_redis
        except ImportError:
            return False
        client = open_redis(self.topo.bench_url, socket_timeout=1)
        pid = self.topo.children[name].pid
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    for w in Worker.all(connection=client):
                        if w.pid == pid and w.get_current_job_id():
                            return True
                except Exception:  # noqa: BLE001 - best effort: a kill outside a job still counts
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        return False

    def _redis(self, step, rec, sig_kind: str):
        self.canary.pause()
        if sig_kind == "sigkill":
            self.topo.kill("redis")
        else:
            self.topo.terminate("redis")
        window = self.canary.mark_down(sig_kind)
        down = self.topo.start_redis()
        self.canary.mark_up(window)
        self.canary.resume()
        rec.end = time.time()
        rec.detail.update(
            restart_s=round(down, 3), window_ms=round(window.ms, 1), lost_writes=window.lost_writes
        )

    def _redis_term(self, step, rec):
        self._redis(step, rec, "sigterm")

    def _redis_kill(self, step, rec):
        self._redis(step, rec, "sigkill")

    def _primary_kill(self, step, rec):
        sentinel = self.topo.sentinel
        t0 = time.monotonic()
        old = sentinel.kill_primary()
        new = sentinel.wait_failover(old)
        promoted = time.monotonic() - t0
        sentinel.restart(old)  # rejoins as the new primary's replica (the sentinels see to it)
        rec.end = time.time()
        rec.detail.update(old_port=old, new_port=new, promoted_after_s=round(promoted, 2))

    def _webhook_outage(self, step, rec):
        self.receiver.set_mode("down")

        def to_error():
            self.receiver.set_mode("error")

        def up():
            self.receiver.set_mode("up")
            rec.end = time.time()

        self._heal_later(step.hold, to_error)
        self._heal_later(step.hold * 2, up)

    def _node_silent(self, step, rec):
        self.topo.pause(step.target)

        def heal():
            rec.end = time.time()  # before SIGCONT: the monitor reports the moment it resumes
            self.topo.resume(step.target)

        self._heal_later(step.hold, heal)
