"""The NVML backend against a fake pynvml that raises the real NVML error classes."""

from __future__ import annotations

import fake_pynvml
import pynvml
import pytest

from workers.nvml import NvmlBackend, NvmlUnavailable


def test_reads_every_field_with_known_values():
    fake = fake_pynvml.make([fake_pynvml.h100(0), fake_pynvml.h100(1)])
    gpus = NvmlBackend("n1", nvml=fake).read()["n1"]
    assert [g["index"] for g in gpus] == [0, 1]
    g = gpus[1]
    assert g["uuid"] == "GPU-0000-1" and g["name"] == "NVIDIA H100 80GB HBM3"
    assert (g["memory_total_mb"], g["memory_used_mb"], g["memory_free_mb"]) == (81559, 1024, 80535)
    assert (g["utilization"], g["temperature"], g["power_draw"]) == (10.0, 41.0, 100.5)
    assert g["processes"] == [{"pid": 1001, "used_memory_mb": 512}]
    assert (g["ecc_uncorrectable"], g["ecc_corrected"]) == (0, 2)
    assert g["throttle_reasons"] == ["gpu_idle"]
    assert g["mig_mode"] == "disabled"
    assert g["health"] == "ok"


def test_unsupported_optional_readings_are_left_out():
    fake = fake_pynvml.make(
        [fake_pynvml.h100(0, ecc_unc=None, ecc_cor=None, reasons=None, mig=None)]
    )
    g = NvmlBackend("n1", nvml=fake).read()["n1"][0]
    assert not {"ecc_uncorrectable", "ecc_corrected", "throttle_reasons", "mig_mode"} & set(g)
    assert g["health"] == "ok"


def test_health_follows_the_gpu_both_ways():
    fake = fake_pynvml.make([fake_pynvml.h100(0), fake_pynvml.h100(1)])
    backend = NvmlBackend("n1", nvml=fake)
    assert [g["health"] for g in backend.read()["n1"]] == ["ok", "ok"]
    fake.gpus[0]["ecc_unc"] = 3
    fake.gpus[1]["lost"] = True
    first = backend.read()["n1"]
    assert [g["health"] for g in first] == ["failed", "failed"]
    # A lost GPU keeps its last known identity, so the engine can find it.
    assert first[1]["uuid"] == "GPU-0000-1" and "GPU is lost" in first[1]["error"]
    fake.gpus[0]["ecc_unc"] = 0  # e.g. after a reset the volatile counter clears
    fake.gpus[1]["lost"] = False
    fake.gpus[1]["reasons"] = 0x40  # hardware thermal slowdown
    second = backend.read()["n1"]
    assert [g["health"] for g in second] == ["ok", "degraded"]
    assert second[1]["throttle_reasons"] == ["hw_thermal_slowdown"]
    fake.gpus[1]["reasons"] = 0
    assert [g["health"] for g in backend.read()["n1"]] == ["ok", "ok"]


def test_a_vanished_gpu_is_left_out_and_returns():
    fake = fake_pynvml.make([fake_pynvml.h100(0), fake_pynvml.h100(1)])
    backend = NvmlBackend("n1", nvml=fake)
    backend.read()
    gone = fake.gpus.pop()
    assert [g["uuid"] for g in backend.read()["n1"]] == ["GPU-0000-0"]
    fake.gpus.append(gone)
    assert [(g["uuid"], g["health"]) for g in backend.read()["n1"]] == [
        ("GPU-0000-0", "ok"),
        ("GPU-0000-1", "ok"),
    ]


def test_critical_xid_is_reported_and_degrades_for_a_while():
    now = [1000.0]
    fake = fake_pynvml.make([fake_pynvml.h100(0)], xids=[(0, 79)])
    backend = NvmlBackend("n1", nvml=fake, clock=lambda: now[0])
    g = backend.read()["n1"][0]
    assert (g["xid"], g["health"]) == (79, "degraded")
    now[0] += 301
    g = backend.read()["n1"][0]
    assert (g["xid"], g["health"]) == (79, "ok")


def test_no_driver_raises_a_clear_error():
    with pytest.raises(NvmlUnavailable, match="Driver Not Loaded"):
        NvmlBackend("n1", nvml=fake_pynvml.make([], driver=False))


def test_fake_raises_the_real_error_classes():
    fake = fake_pynvml.make([fake_pynvml.h100(0, lost=True)])
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetUUID(fake.nvmlDeviceGetHandleByIndex(0))


def test_the_reading_command_without_a_driver_is_one_line_exit_2(monkeypatch, capsys):
    """``python -m workers.nvml`` (docs/workers.md) on a machine without a driver."""
    import sys

    from workers import nvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml.make([], driver=False))
    assert nvml.main() == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "NVML is not available" in err
