"""Shared GPUs on real-like readings: a shared job's memory is counted once, not twice.

The dynamic simulated fleet reports what is allocated as used memory, as NVML would once the
jobs run; the engine admits a shared request of m MB when max(reserved, used) + m <= total.
Real redis-server (the rule lives in the Lua prelude).
"""

from __future__ import annotations

import pytest

from app.engine import Engine
from workers.monitor import Monitor
from workers.simulated import SimulatedBackend

A10 = {"name": "NVIDIA A10", "memory_total_mb": 23028}


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def engine(redis, settings):
    return Engine(redis, settings, clock=Clock())


def dynamic_fleet(engine, settings, gpu):
    """A monitor over a dynamic simulated node "a10" of one GPU; refresh() reports it."""
    backend = SimulatedBackend(
        {"dynamic": True, "nodes": [{"name": "a10", "gpus": [gpu]}]}, snapshot=engine.snapshot
    )
    monitor = Monitor(settings, engine, backend)
    monitor.refresh()
    return monitor


def shared(engine, mb, service="svc"):
    return engine.allocate(
        {
            "service_name": service,
            "required_gpus": 1,
            "priority": 5,
            "sharing": "shared",
            "min_memory_mb": mb,
        }
    )


def the_gpu(engine):
    [gpu] = engine.snapshot()["gpus"]
    return gpu


def test_two_10000_mb_shared_jobs_fit_one_23_gb_a10_on_dynamic_readings(engine, settings):
    monitor = dynamic_fleet(engine, settings, A10)
    first = shared(engine, 10000, "first")
    assert first["status"] == "allocated"
    monitor.refresh()  # the job's memory is now "used"
    gpu = the_gpu(engine)
    assert gpu["memory_used_mb"] == 10000 and gpu["memory_free_mb"] == 13028
    second = shared(engine, 10000, "second")
    assert second["status"] == "allocated", "13,028 MB are physically free"
    assert second["gpu_ids"] == first["gpu_ids"]
    monitor.refresh()
    assert the_gpu(engine)["shared_mb"] == 20000
    third = shared(engine, 10000, "third")
    assert third["status"] == "queued"  # 20,000 + 10,000 > 23,028
    engine.release(first["id"])
    # the reading still shows first's 10,000 MB until the next refresh: the process may not
    # have exited yet, and the reading is what the GPU really has
    assert engine.get(third["id"])["status"] == "queued"
    monitor.refresh()
    assert engine.get(third["id"])["status"] == "allocated"


def test_a_reservation_not_yet_in_use_still_counts(engine, settings):
    """Right after a grant the reading lags (the job has not started): the reservation holds
    its memory, so a second job cannot take it in that window."""
    dynamic_fleet(engine, settings, A10)
    assert shared(engine, 15000, "first")["status"] == "allocated"
    # no refresh: the reading still says 0 MB used
    assert shared(engine, 10000, "second")["status"] == "queued"
    assert shared(engine, 8000, "small")["status"] == "allocated"


def test_memory_used_by_others_counts_too(engine, settings):
    """Memory in use outside the orchestrator (the reading's baseline) is not free for a
    shared job, whatever was reserved."""
    monitor = dynamic_fleet(engine, settings, dict(A10, memory_used_mb=15000))
    assert shared(engine, 10000, "big")["status"] == "queued"  # 8,028 MB free
    assert shared(engine, 5000, "small")["status"] == "allocated"
    monitor.refresh()  # 20,000 used, 5,000 reserved
    assert shared(engine, 3028, "exact")["status"] == "allocated"
    monitor.refresh()
    assert shared(engine, 1, "none")["status"] == "queued"
