"""A fake ``pynvml`` module: known values per GPU, and the REAL pynvml error classes.

Build one with :func:`make`, describe GPUs as dicts, and flip their fields between reads to
simulate failures (``lost=True`` raises the real ``NVMLError_GpuIsLost``).
"""

from __future__ import annotations

import types

import pynvml as real

MB = 1024 * 1024


def make(gpus: list[dict], *, driver: bool = True, xids: list[tuple[int, int]] | None = None):
    """A module-like object. Each gpu dict: uuid, name, total_mb, used_mb, util, temp, power_mw,
    procs [(pid, mb)], ecc_unc, ecc_cor (None = not supported), reasons (bitmask or None),
    mig (None = not supported, or 0/1), lost (raise GpuIsLost on any call)."""
    m = types.SimpleNamespace()
    for name in dir(real):
        if name.startswith(("NVML_", "NVMLError", "nvmlEventType", "nvmlClocks")):
            setattr(m, name, getattr(real, name))
    m.gpus = gpus
    m.xids = list(xids or [])
    m.inits = 0

    def err(code):
        return real.NVMLError(code)  # the real factory returns the real subclass

    def nvmlInit():
        if not driver:
            raise err(real.NVML_ERROR_DRIVER_NOT_LOADED)
        m.inits += 1

    def handle(index):
        if index >= len(m.gpus):
            raise err(real.NVML_ERROR_INVALID_ARGUMENT)
        return {"index": index}

    def gpu_of(h):
        gpu = m.gpus[h["index"]]
        if gpu.get("lost"):
            raise err(real.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def optional(h, key):
        value = gpu_of(h).get(key)
        if value is None:
            raise err(real.NVML_ERROR_NOT_SUPPORTED)
        return value

    m.nvmlInit = nvmlInit
    m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    m.nvmlDeviceGetCount = lambda: len(m.gpus)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetIndex = lambda h: h["index"]
    m.nvmlDeviceGetUUID = lambda h: gpu_of(h)["uuid"]
    m.nvmlDeviceGetName = lambda h: gpu_of(h)["name"]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=gpu_of(h)["total_mb"] * MB,
        used=gpu_of(h)["used_mb"] * MB,
        free=(gpu_of(h)["total_mb"] - gpu_of(h)["used_mb"]) * MB,
    )
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(
        gpu=gpu_of(h)["util"], memory=0
    )
    m.nvmlDeviceGetTemperature = lambda h, sensor: gpu_of(h)["temp"]
    m.nvmlDeviceGetPowerUsage = lambda h: gpu_of(h)["power_mw"]
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=mb * MB) for pid, mb in gpu_of(h)["procs"]
    ]

    def ecc(h, kind, counter):
        key = "ecc_unc" if kind == real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else "ecc_cor"
        return optional(h, key)

    m.nvmlDeviceGetTotalEccErrors = ecc
    m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: optional(h, "reasons")
    m.nvmlDeviceGetCurrentClocksThrottleReasons = m.nvmlDeviceGetCurrentClocksEventReasons
    m.nvmlDeviceGetMigMode = lambda h: (optional(h, "mig"), optional(h, "mig"))
    m.nvmlEventSetCreate = lambda: object()
    m.nvmlDeviceRegisterEvents = lambda h, types_, es: None
    m.nvmlEventSetFree = lambda es: None

    def wait(es, timeout):
        if not m.xids:
            raise err(real.NVML_ERROR_TIMEOUT)
        index, xid = m.xids.pop(0)
        return types.SimpleNamespace(device={"index": index}, eventData=xid)

    m.nvmlEventSetWait = wait
    m.NVMLError = real.NVMLError
    return m


def h100(i: int, **over) -> dict:
    gpu = {
        "uuid": f"GPU-0000-{i}",
        "name": "NVIDIA H100 80GB HBM3",
        "total_mb": 81559,
        "used_mb": 1024 * i,
        "util": 10 * i,
        "temp": 40 + i,
        "power_mw": 100_500 + i,
        "procs": [(1000 + i, 512)] if i else [],
        "ecc_unc": 0,
        "ecc_cor": 2,
        "reasons": 0x1,
        "mig": 0,
    }
    gpu.update(over)
    return gpu
