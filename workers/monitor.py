"""``gpu-orchestrator monitor``: report this node's GPUs to Redis every ``refresh_interval``.

Each refresh reads the backend once and makes one ``Engine.report_node`` call per node (the
engine writes telemetry, health and the node heartbeat in one atomic step, marks failed or
vanished GPUs unschedulable, emits events for health changes and, when capacity appeared, runs a
schedule pass). Any grants that pass produced get their webhooks dispatched right away.

Backends (``monitoring.backend`` or ``--backend``):

- ``nvml``: pynvml against the NVIDIA driver; without a driver the command exits with code 2;
- ``simulated``: the fleet from ``monitoring.simulated`` (see :mod:`workers.simulated`);
- ``auto`` (default): NVML if a driver answers, else simulated, with one log line saying which.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from typing import Any

from redis.exceptions import RedisError

from app import outbox
from app.errors import ValidationFailed
from app.redis_client import connect
from app.settings import Settings
from app.shutdown import StopSignal
from workers.nvml import NvmlBackend, NvmlUnavailable
from workers.simulated import SimulatedBackend

log = logging.getLogger("gpu_orchestrator.monitor")

EXIT_NO_DRIVER = 2


def node_name(settings: Settings) -> str:
    return settings.monitoring.node_name or socket.gethostname()


def choose_backend(settings: Settings, name: str | None = None, *, snapshot=None):
    """The backend object for ``name`` (default ``monitoring.backend``).

    Raises NvmlUnavailable for ``nvml`` without a driver; ``auto`` falls back to simulated.
    """
    name = name or settings.monitoring.backend
    node = node_name(settings)
    if name in ("nvml", "auto"):
        try:
            backend = NvmlBackend(node)
        except (NvmlUnavailable, ImportError) as exc:
            if name == "nvml":
                raise NvmlUnavailable(str(exc)) from None
            log.info("monitor backend: simulated (no NVIDIA driver answered: %s)", exc)
        else:
            log.info(
                "monitor backend: nvml (driver %s) on node %s", backend.driver_version or "?", node
            )
            return backend
    sim = SimulatedBackend(settings.monitoring.simulated, host=node, snapshot=snapshot)
    if name == "simulated":
        log.info("monitor backend: simulated")
    return sim


class Monitor:
    """One refresh = read the backend, report every node, dispatch webhooks for new grants."""

    def __init__(self, settings: Settings, engine: Any, backend: Any, rq_redis: Any = None):
        self.settings, self.engine, self.backend = settings, engine, backend
        self.rq_redis = rq_redis
        self.host = socket.gethostname()
        self._health: dict[tuple[str, int], str] = {}
        self._refused: set[str] = set()  # node names the engine refused, logged once each

    def refresh(self) -> dict[str, list[dict[str, Any]]]:
        reading = self.backend.read()
        granted = 0
        for node, gpus in reading.items():
            self._log_health_changes(node, gpus)
            try:
                grants = self.engine.report_node(
                    node, gpus, backend=self.backend.name, host=self.host
                )
            except ValidationFailed as exc:  # a name it refuses: the other nodes still report
                if exc.details.get("field") != "node":
                    raise
                if node not in self._refused:
                    self._refused.add(node)
                    log.error("monitor: node %r not reported (field node): %s", node, exc)
                continue
            granted += len(grants or [])
        if granted:
            log.info("new capacity granted %d queued request(s)", granted)
        if self.rq_redis is not None:
            outbox.dispatch(self.rq_redis, self.settings)
        return reading

    def _log_health_changes(self, node: str, gpus: list[dict[str, Any]]) -> None:
        for gpu in gpus:
            key = (node, int(gpu["index"]))
            health = gpu.get("health", "ok")
            before = self._health.get(key)
            if before is not None and before != health:
                log.warning(
                    "GPU %s/%s health %s -> %s%s",
                    node,
                    key[1],
                    before,
                    health,
                    f" ({gpu['error']})" if gpu.get("error") else "",
                )
            self._health[key] = health


def run(settings: Settings, once: bool = False, backend: Any = None) -> int:
    """Report until SIGTERM/SIGINT (or once); exit code 2 when ``nvml`` finds no driver."""
    from app.embedded_redis import resolve as resolve_redis
    from app.engine import Engine

    engines: list[Any] = []  # the simulated backend reads the engine once it exists
    if backend is None or isinstance(backend, str):
        try:
            backend = choose_backend(
                settings,
                backend,
                snapshot=lambda: engines[0].snapshot(queue=False) if engines else {},
            )
        except NvmlUnavailable as exc:
            print(
                f"gpu-orchestrator monitor: the nvml backend needs an NVIDIA driver: {exc}. "
                f"Use --backend simulated (or auto) on machines without GPUs.",
                file=sys.stderr,
            )
            return EXIT_NO_DRIVER
    url, embedded = resolve_redis(settings)
    stop = StopSignal()

    try:
        redis = connect(url, settings)
        engine = Engine(redis, settings)
        engines.append(engine)
        monitor = Monitor(settings, engine, backend, connect(url, settings, decode=False))
        if not once:
            stop.install()
        interval = settings.monitoring.refresh_interval
        first = True
        while True:
            started = time.monotonic()
            try:
                reading = monitor.refresh()
                if first:
                    total = sum(len(g) for g in reading.values())
                    if once:
                        log.info(
                            "monitor reported %d GPU(s) on %d node(s) once", total, len(reading)
                        )
                    else:
                        log.info(
                            "monitor reporting %d GPU(s) on %d node(s) every %ss",
                            total,
                            len(reading),
                            interval,
                        )
                    first = False
            except RedisError as exc:  # an outage or a failover: one line a try, as the scheduler
                if once:
                    raise
                log.warning("monitor: Redis error (%s); retrying", exc)
            except Exception as exc:  # keep reporting through NVML trouble; a bug shows its trace
                if once:
                    raise
                log.exception("monitor refresh failed: %s", exc)
            if once or stop.sleep(started + interval - time.monotonic()):
                break
        close = getattr(backend, "close", None)
        if close:
            close()
    finally:
        if embedded:
            embedded.stop()
    return 0
