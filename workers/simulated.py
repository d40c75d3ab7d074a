"""Simulated backend of the monitor: a GPU fleet described in YAML, for laptops, demos and tests.

Shape (validated in ``app.settings._simulated``)::

    monitoring:
      backend: simulated
      simulated:
        dynamic: false          # true: telemetry follows what is allocated on each GPU
        nodes:
          - {name: node-a, count: 8, gpu: {name: "NVIDIA H100 80GB HBM3", memory_total_mb: 81559}}
          - name: node-b
            gpus:
              - {name: "NVIDIA A10", memory_total_mb: 23028, memory_used_mb: 20980, utilization: 10}

Per GPU, ``memory_used_mb``, ``utilization``, ``temperature`` and ``power_draw`` default to idle
values (0 MB, 0 %, 32 C, 60 W); ``uuid`` defaults to a stable ``GPU-sim-...`` derived from the
node and index; ``health`` to ``ok``. With no nodes, the fleet is one node named after the host
with 8 "NVIDIA H100 80GB HBM3" GPUs of 81559 MB.

With ``dynamic: true`` the written values are the idle baseline, and each read looks at the
engine's snapshot: an exclusively allocated GPU runs at 70-98 % utilization with 55-90 % of its
memory in use, a GPU holding shared allocations uses the memory they reserved, and temperature
and power follow utilization. A seeded random generator (``seed``) keeps runs reproducible.
"""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Callable
from typing import Any

DEFAULT_GPU = {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559}
DEFAULT_COUNT = 8
IDLE = {"memory_used_mb": 0, "utilization": 0.0, "temperature": 32.0, "power_draw": 60.0}


def fleet(simulated: dict[str, Any], host: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The configured fleet as ``{node: [gpu, ...]}`` with every default filled in."""
    nodes = simulated.get("nodes") or [
        {
            "name": host or socket.gethostname(),
            "gpus": [dict(DEFAULT_GPU) for _ in range(DEFAULT_COUNT)],
        }
    ]
    out: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        gpus = node.get("gpus")
        if gpus is None:  # raw (unvalidated) count+gpu shorthand
            gpus = [dict(node.get("gpu") or {}) for _ in range(node.get("count", 1))]
        out[node["name"]] = [_gpu(node["name"], i, g) for i, g in enumerate(gpus)]
    return out


def _gpu(node: str, index: int, spec: dict[str, Any]) -> dict[str, Any]:
    total = int(spec.get("memory_total_mb", DEFAULT_GPU["memory_total_mb"]))
    used = int(spec.get("memory_used_mb", IDLE["memory_used_mb"]))
    return {
        "index": index,
        "uuid": spec.get("uuid")
        or "GPU-sim-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"gpuo-sim/{node}/{index}")),
        "name": spec.get("name", DEFAULT_GPU["name"]),
        "memory_total_mb": total,
        "memory_used_mb": used,
        "memory_free_mb": total - used,
        "utilization": float(spec.get("utilization", IDLE["utilization"])),
        "temperature": float(spec.get("temperature", IDLE["temperature"])),
        "power_draw": float(spec.get("power_draw", IDLE["power_draw"])),
        "health": spec.get("health", "ok"),
        "processes": [],
    }


class SimulatedBackend:
    """Reports the configured fleet; with ``dynamic`` telemetry follows the engine's snapshot."""

    name = "simulated"

    def __init__(
        self,
        simulated: dict[str, Any],
        host: str | None = None,
        snapshot: Callable[[], dict[str, Any]] | None = None,
    ):
        self.base = fleet(simulated, host)
        self.dynamic = bool(simulated.get("dynamic"))
        self.snapshot = snapshot
        self.rng = random.Random(simulated.get("seed", 0))

    def read(self) -> dict[str, list[dict[str, Any]]]:
        out = {node: [dict(g) for g in gpus] for node, gpus in self.base.items()}
        if not self.dynamic:
            return out
        load = self._load()
        for node, gpus in out.items():
            for gpu in gpus:
                self._drift(gpu, load.get((node, gpu["index"])))
        return out

    def _load(self) -> dict[tuple[str, int], dict[str, Any]]:
        """(node, index) -> {"exclusive": bool, "reserved_mb": int} from the engine snapshot."""
        if self.snapshot is None:
            return {}
        try:
            snap = self.snapshot() or {}
        except Exception:  # a monitor must keep reporting even if the snapshot fails
            return {}
        load: dict[tuple[str, int], dict[str, Any]] = {}
        for alloc in _values(snap.get("allocations")):
            node = alloc.get("node")
            ids = alloc.get("gpu_ids") or []
            shared = alloc.get("sharing") == "shared"
            for gid in ids:
                slot = load.setdefault((node, int(gid)), {"exclusive": False, "reserved_mb": 0})
                if shared:
                    slot["reserved_mb"] += int(float(alloc.get("min_memory_mb") or 0))
                else:
                    slot["exclusive"] = True
        return load

    def _drift(self, gpu: dict[str, Any], load: dict[str, Any] | None) -> None:
        total = gpu["memory_total_mb"]
        base_used, base_util = gpu["memory_used_mb"], gpu["utilization"]
        if load and load["exclusive"]:
            util = self.rng.uniform(70, 98)
            used = max(base_used, int(total * self.rng.uniform(0.55, 0.9)))
        elif load and load["reserved_mb"]:
            util = min(100.0, base_util + self.rng.uniform(20, 60))
            used = min(total, base_used + load["reserved_mb"])
        else:
            util = max(0.0, min(100.0, base_util + self.rng.uniform(-2, 2)))
            used = base_used
        gpu["utilization"] = round(util, 1)
        gpu["memory_used_mb"] = int(used)
        gpu["memory_free_mb"] = int(total - used)
        gpu["temperature"] = round(gpu["temperature"] + 0.45 * util, 1)
        gpu["power_draw"] = round(gpu["power_draw"] + 6.0 * util, 1)


def _values(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, dict):
        return [v for v in items.values() if isinstance(v, dict)]
    return [v for v in (items or []) if isinstance(v, dict)]
