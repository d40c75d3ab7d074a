"""NVML backend of the monitor: reads this node's GPUs through pynvml (nvidia-ml-py).

Per GPU it reads index, uuid, name, memory total/used/free (MB), utilization, temperature, power
draw (W), running compute processes and, where the GPU supports them, ECC error counts (volatile),
clock-event (throttle) reasons, the last critical XID and MIG mode. ``NotSupported`` for an
optional reading just leaves it out.

Health, recomputed on every read (so it is never a one-way door):

- ``failed``: NVML cannot talk to the GPU (GPU is lost, reset required, unknown error), or it
  reports volatile uncorrectable ECC errors;
- ``degraded``: hardware slowdown / thermal / power-brake clock events, or a critical XID in the
  last ``XID_WINDOW`` seconds;
- ``ok`` otherwise.

A GPU that NVML can no longer read is reported ``failed`` with its last known identity. A GPU
that no longer appears at all (it fell off the bus) is simply not in the report; the engine marks
GPUs missing from a node's report as lost (unschedulable) and brings them back when they reappear.

This module imports only the standard library and pynvml, so it can be run on its own against a
real driver (``python -m workers.nvml`` prints one reading as JSON).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("gpu_orchestrator.nvml")

MB = 1024 * 1024
XID_WINDOW = 300.0

#: Clock-event reason bits -> names reported as ``throttle_reasons``.
_REASONS = (
    (0x0000000000000001, "gpu_idle"),
    (0x0000000000000002, "applications_clocks_setting"),
    (0x0000000000000004, "sw_power_cap"),
    (0x0000000000000008, "hw_slowdown"),
    (0x0000000000000010, "sync_boost"),
    (0x0000000000000020, "sw_thermal_slowdown"),
    (0x0000000000000040, "hw_thermal_slowdown"),
    (0x0000000000000080, "hw_power_brake_slowdown"),
    (0x0000000000000100, "display_clock_setting"),
)
_DEGRADING_REASONS = {"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver answers (library missing, driver not loaded, no GPU)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """Reads the GPUs of this node. ``nvml`` is the pynvml module (tests pass a fake one)."""

    name = "nvml"

    def __init__(self, node_name: str, nvml: Any = None, clock=time.time):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        self.node_name = node_name
        self.clock = clock
        self._known: dict[int, dict[str, Any]] = {}
        self._xids: dict[int, tuple[int, float]] = {}
        self._events = None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML is not available: {exc}") from None
        try:
            self.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self.driver_version = None
        self._register_xid_events()

    # -- XID events --------------------------------------------------------------------------
    def _register_xid_events(self) -> None:
        nvml = self.nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    nvml.nvmlDeviceRegisterEvents(
                        handle, nvml.nvmlEventTypeXidCriticalError, self._events
                    )
                except nvml.NVMLError:
                    continue  # NotSupported on many consumer GPUs
        except (nvml.NVMLError, AttributeError):
            self._events = None

    def _poll_xids(self) -> None:
        if self._events is None:
            return
        nvml = self.nvml
        for _ in range(64):
            try:
                data = nvml.nvmlEventSetWait(self._events, 0)
            except nvml.NVMLError:
                return  # Timeout: no pending events (or not supported)
            try:
                index = int(nvml.nvmlDeviceGetIndex(data.device))
            except nvml.NVMLError:
                continue
            self._xids[index] = (int(data.eventData), self.clock())
            log.warning("GPU %s reported XID %s", index, data.eventData)

    # -- reading -----------------------------------------------------------------------------
    def _optional(self, func, *args):
        try:
            return func(*args)
        except self.nvml.NVMLError:
            return None

    def _read_gpu(self, index: int) -> dict[str, Any]:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpu: dict[str, Any] = {
            "index": index,
            "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "memory_total_mb": int(mem.total // MB),
            "memory_used_mb": int(mem.used // MB),
            "memory_free_mb": int(mem.free // MB),
        }
        util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        gpu["utilization"] = float(util.gpu) if util is not None else 0.0
        temp = self._optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        gpu["temperature"] = float(temp) if temp is not None else 0.0
        power = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        gpu["power_draw"] = round(power / 1000.0, 1) if power is not None else 0.0
        procs = self._optional(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
        gpu["processes"] = [
            {
                "pid": int(p.pid),
                "used_memory_mb": int(p.usedGpuMemory // MB) if p.usedGpuMemory else 0,
            }
            for p in procs
        ]
        health = "ok"
        unc = self._optional(
            nvml.nvmlDeviceGetTotalEccErrors,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        if unc is not None:
            gpu["ecc_uncorrectable"] = int(unc)
            cor = self._optional(
                nvml.nvmlDeviceGetTotalEccErrors,
                handle,
                nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                nvml.NVML_VOLATILE_ECC,
            )
            if cor is not None:
                gpu["ecc_corrected"] = int(cor)
            if unc > 0:
                health = "failed"
        reasons_fn = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        mask = self._optional(reasons_fn, handle)
        if mask is not None:
            gpu["throttle_reasons"] = [name for bit, name in _REASONS if mask & bit]
            if health == "ok" and _DEGRADING_REASONS & set(gpu["throttle_reasons"]):
                health = "degraded"
        mig = self._optional(nvml.nvmlDeviceGetMigMode, handle)
        if mig is not None:
            gpu["mig_mode"] = "enabled" if mig[0] else "disabled"
        xid = self._xids.get(index)
        if xid is not None:
            gpu["xid"] = xid[0]
            if health == "ok" and self.clock() - xid[1] < XID_WINDOW:
                health = "degraded"
        gpu["health"] = health
        return gpu

    def _failed(self, index: int, reason: str) -> dict[str, Any]:
        last = dict(
            self._known.get(index)
            or {"index": index, "uuid": "", "name": "unknown", "memory_total_mb": 0}
        )
        last.update(
            index=index,
            health="failed",
            memory_used_mb=0,
            memory_free_mb=0,
            utilization=0.0,
            processes=[],
            error=reason,
        )
        return last

    def read(self) -> dict[str, list[dict[str, Any]]]:
        """``{node_name: [gpu, ...]}`` for this node, every GPU in index order."""
        nvml = self.nvml
        self._poll_xids()
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            log.error("NVML could not count GPUs: %s", exc)
            count = 0
        gpus = []
        for index in range(count):
            try:
                gpu = self._read_gpu(index)
            except nvml.NVMLError as exc:
                log.error("GPU %s: NVML error %s; marking it failed", index, exc)
                gpus.append(self._failed(index, _text(exc)))
                continue
            known = self._known.get(index)
            if known and known.get("uuid") and known["uuid"] != gpu["uuid"]:
                log.warning("GPU %s changed identity: %s -> %s", index, known["uuid"], gpu["uuid"])
            self._known[index] = {k: gpu[k] for k in ("index", "uuid", "name", "memory_total_mb")}
            gpus.append(gpu)
        for index in sorted(set(self._known) - set(range(count))):
            log.error(
                "GPU %s (%s) vanished; the engine marks it lost until it returns",
                index,
                self._known.pop(index).get("uuid"),
            )
        return {self.node_name: gpus}

    def close(self) -> None:
        try:
            if self._events is not None:
                self.nvml.nvmlEventSetFree(self._events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def main() -> int:
    """Print one reading as JSON (for comparing with ``nvidia-smi`` on a real GPU node)."""
    import socket

    try:
        backend = NvmlBackend(socket.gethostname())
    except NvmlUnavailable as exc:  # not a GPU node, or no driver: one line, as monitor says it
        print(f"python -m workers.nvml: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"driver_version": backend.driver_version, **backend.read()}, indent=2))
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
