"""The monitor end to end against a real Redis and the real engine: simulated and fake NVML."""

from __future__ import annotations

import logging
import socket

import fake_pynvml
import pytest

from app import cli
from app.engine import Engine
from workers import monitor
from workers.nvml import NvmlBackend

FLEET = {
    "dynamic": False,
    "nodes": [
        {
            "name": "node-a",
            "count": 2,
            "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559},
        },
        {
            "name": "node-b",
            "gpus": [
                {
                    "name": "NVIDIA A10",
                    "memory_total_mb": 23028,
                    "memory_used_mb": 20980,
                    "utilization": 10,
                },
                {
                    "name": "NVIDIA A10",
                    "memory_total_mb": 23028,
                    "memory_used_mb": 0,
                    "utilization": 95,
                },
            ],
        },
    ],
}


def _gpus(engine):
    return {(g["node"], g["index"]): g for g in engine.snapshot()["gpus"]}


def test_once_says_it_reported_once_not_every_interval(settings, redis, caplog):
    """`monitor --once` logged 'reporting 4 GPU(s) on 2 node(s) every 5.0s' and exited."""
    s = settings.replace(monitoring={"backend": "simulated", "simulated": FLEET})
    with caplog.at_level(logging.INFO, logger="gpu_orchestrator.monitor"):
        assert monitor.run(s, once=True) == 0
    lines = [r.getMessage() for r in caplog.records if "GPU(s)" in r.getMessage()]
    assert lines == ["monitor reported 4 GPU(s) on 2 node(s) once"]


def test_simulated_fleet_is_reported_exactly_as_written(settings, redis):
    s = settings.replace(monitoring={"backend": "simulated", "simulated": FLEET})
    assert monitor.run(s, once=True) == 0
    engine = Engine(redis, s)
    gpus = _gpus(engine)
    assert sorted(gpus) == [("node-a", 0), ("node-a", 1), ("node-b", 0), ("node-b", 1)]
    b0, b1 = gpus[("node-b", 0)], gpus[("node-b", 1)]
    assert (b0["name"], b0["memory_total_mb"], b0["memory_used_mb"], b0["utilization"]) == (
        "NVIDIA A10",
        23028,
        20980,
        10.0,
    )
    assert (b1["memory_used_mb"], b1["utilization"]) == (0, 95.0)
    a0 = gpus[("node-a", 0)]
    assert (a0["memory_total_mb"], a0["memory_used_mb"], a0["utilization"]) == (81559, 0, 0.0)
    assert a0["uuid"].startswith("GPU-sim-") and a0["uuid"] != gpus[("node-a", 1)]["uuid"]
    assert all(g["schedulable"] for g in gpus.values())
    nodes = {n["name"]: n for n in engine.snapshot()["nodes"]}
    assert nodes["node-a"]["backend"] == "simulated" and nodes["node-a"]["alive"]
    # Static: a second refresh reports the very same values.
    monitor.run(s, once=True)
    again = _gpus(engine)
    assert [again[k]["utilization"] for k in sorted(again)] == [
        gpus[k]["utilization"] for k in sorted(gpus)
    ]


def test_no_nodes_means_one_host_node_with_eight_h100(settings, redis):
    s = settings.replace(monitoring={"backend": "simulated", "simulated": {}})
    monitor.run(s, once=True)
    gpus = Engine(redis, s).snapshot()["gpus"]
    assert len(gpus) == 8
    assert {g["node"] for g in gpus} == {socket.gethostname()}
    assert {(g["name"], g["memory_total_mb"]) for g in gpus} == {("NVIDIA H100 80GB HBM3", 81559)}


def test_dynamic_telemetry_follows_allocations(settings, redis):
    fleet = dict(FLEET, dynamic=True, seed=7)
    s = settings.replace(monitoring={"backend": "simulated", "simulated": fleet})
    monitor.run(s, once=True)
    engine = Engine(redis, s)
    alloc = engine.allocate({"service_name": "trainer", "required_gpus": 2, "min_memory_mb": 40000})
    assert alloc["node"] == "node-a"
    monitor.run(s, once=True)
    gpus = _gpus(engine)
    for index in alloc["gpu_ids"]:
        busy = gpus[("node-a", index)]
        assert busy["utilization"] >= 70 and busy["memory_used_mb"] >= 0.55 * 81559
        assert busy["temperature"] > 32 and busy["power_draw"] > 60
    engine.release(alloc["id"])
    monitor.run(s, once=True)
    idle = _gpus(engine)[("node-a", alloc["gpu_ids"][0])]
    assert idle["utilization"] < 5 and idle["memory_used_mb"] == 0


def test_fake_nvml_health_is_not_a_one_way_door(settings, redis):
    s = settings.replace(monitoring={"node_name": "gpu-1"})
    fake = fake_pynvml.make([fake_pynvml.h100(0), fake_pynvml.h100(1)])
    backend = NvmlBackend("gpu-1", nvml=fake)
    engine = Engine(redis, s)
    monitor.run(s, once=True, backend=backend)
    gpus = _gpus(engine)
    g1 = gpus[("gpu-1", 1)]
    assert (g1["uuid"], g1["memory_used_mb"], g1["utilization"], g1["power_draw"]) == (
        "GPU-0000-1",
        1024,
        10.0,
        100.5,
    )
    assert all(g["schedulable"] for g in gpus.values())
    nodes = {n["name"]: n for n in engine.snapshot()["nodes"]}
    assert nodes["gpu-1"]["backend"] == "nvml"

    fake.gpus[0]["ecc_unc"] = 1  # uncorrectable ECC: failed
    fake.gpus[1]["lost"] = True  # NVML: GPU is lost
    monitor.run(s, once=True, backend=backend)
    gpus = _gpus(engine)
    assert [gpus[("gpu-1", i)]["schedulable"] for i in (0, 1)] == [False, False]
    assert gpus[("gpu-1", 0)]["health"] == "failed"
    # Nothing can be granted on a node whose GPUs all failed: the request queues.
    queued = engine.allocate({"service_name": "waiter", "required_gpus": 1})
    assert queued["status"] == "queued"

    fake.gpus[0]["ecc_unc"] = 0
    fake.gpus[1]["lost"] = False
    monitor.run(s, once=True, backend=backend)
    gpus = _gpus(engine)
    assert all(g["schedulable"] and g["health"] == "ok" for g in gpus.values())
    # Recovery is new capacity: the monitor's report granted the queued request.
    assert engine.get(queued["id"])["status"] == "allocated"
    health_events = [
        (e["event"], e["gpu_index"])
        for e in engine.events(count=1000)
        if e["event"].startswith("gpu_")
    ]
    assert sorted(health_events) == [
        ("gpu_recovered", "0"),
        ("gpu_recovered", "1"),
        ("gpu_unhealthy", "0"),
        ("gpu_unhealthy", "1"),
    ]


def test_a_vanished_gpu_becomes_unschedulable_and_comes_back(settings, redis):
    fake = fake_pynvml.make([fake_pynvml.h100(0), fake_pynvml.h100(1)])
    backend = NvmlBackend("gpu-1", nvml=fake)
    engine = Engine(redis, settings)
    monitor.run(settings, once=True, backend=backend)
    gone = fake.gpus.pop()
    monitor.run(settings, once=True, backend=backend)
    assert not _gpus(engine)[("gpu-1", 1)]["schedulable"]
    fake.gpus.append(gone)
    monitor.run(settings, once=True, backend=backend)
    assert _gpus(engine)[("gpu-1", 1)]["schedulable"]


def test_nvml_without_a_driver_exits_2_with_a_clear_message(settings, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", settings.redis.url)
    monkeypatch.setattr(
        monitor,
        "NvmlBackend",
        lambda node: NvmlBackend(node, nvml=fake_pynvml.make([], driver=False)),
    )
    assert cli.main(["monitor", "--backend", "nvml", "--once"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA driver" in err and "--backend simulated" in err


def test_auto_falls_back_to_simulated_with_one_log_line(settings, monkeypatch, caplog):
    monkeypatch.setattr(
        monitor,
        "NvmlBackend",
        lambda node: NvmlBackend(node, nvml=fake_pynvml.make([], driver=False)),
    )
    with caplog.at_level(logging.INFO, logger="gpu_orchestrator.monitor"):
        backend = monitor.choose_backend(settings.replace(monitoring={"backend": "auto"}))
    assert backend.name == "simulated"
    lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(lines) == 1 and "simulated" in lines[0] and "Driver Not Loaded" in lines[0]


def test_auto_prefers_nvml_when_a_driver_answers(settings, monkeypatch):
    monkeypatch.setattr(
        monitor,
        "NvmlBackend",
        lambda node: NvmlBackend(node, nvml=fake_pynvml.make([fake_pynvml.h100(0)])),
    )
    assert monitor.choose_backend(settings.replace(monitoring={"backend": "auto"})).name == "nvml"


def test_real_nvml_without_a_driver_exits_2_before_touching_redis(tmp_path):
    import subprocess
    import sys

    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - a machine with a GPU
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver answers here")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"redis: {{data_dir: {tmp_path / 'redis'}}}\n")
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("REDIS_URL", "CONFIG_PATH") and not k.startswith("GPU_ORCH__")
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "--config",
            str(cfg),
            "monitor",
            "--backend",
            "nvml",
            "--once",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert "needs an NVIDIA driver" in out.stderr
    assert not (tmp_path / "redis").exists()  # no embedded Redis was started for nothing


def test_redis_trouble_while_reporting_is_a_warning_line_each_try_not_a_traceback(
    settings, redis, monkeypatch, caplog
):
    """While Redis is down or failing over, every node's monitor logs one line per refresh
    (as the scheduler does), not a stack trace; another error still shows its trace."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from app.shutdown import StopSignal

    errors = [
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused."),
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused."),
        RuntimeError("a bug"),
    ]

    def refresh(self):
        raise errors.pop(0)

    class ThreeTries(StopSignal):
        def install(self):  # no signal handlers in the test process
            return self

        def sleep(self, seconds):
            return not errors

    monkeypatch.setattr(monitor.Monitor, "refresh", refresh)
    monkeypatch.setattr(monitor, "StopSignal", ThreeTries)
    s = settings.replace(monitoring={"backend": "simulated", "simulated": FLEET})
    with caplog.at_level(logging.INFO, logger="gpu_orchestrator.monitor"):
        assert monitor.run(s) == 0
    tries = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.exc_info is not None) for r in tries] == [
        (logging.WARNING, False),
        (logging.WARNING, False),
        (logging.ERROR, True),
    ]
    assert "Connection refused" in tries[0].getMessage()


def test_a_node_name_the_engine_refuses_is_one_log_line_and_the_other_nodes_report(
    settings, redis, caplog
):
    """A backend naming a node 'rack-1/gpu-1' (no /admin/nodes/<node> path reaches it): that
    node is left out with one ERROR line naming the field, once, not a traceback every refresh;
    the other nodes are reported."""
    from workers.simulated import fleet

    reading = fleet({"nodes": [{"name": "node-a", "count": 1}, {"name": "node-b", "count": 1}]})
    reading = {"rack-1/gpu-1": reading["node-a"], "node-b": reading["node-b"]}

    class Backend:
        name = "simulated"

        def read(self):
            return reading

    engine = Engine(redis, settings)
    mon = monitor.Monitor(settings, engine, Backend())
    with caplog.at_level(logging.INFO, logger="gpu_orchestrator.monitor"):
        mon.refresh()
        mon.refresh()
    assert [n["name"] for n in engine.snapshot()["nodes"]] == ["node-b"]
    refused = [r for r in caplog.records if "rack-1/gpu-1" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "field node" in refused[0].getMessage() and refused[0].exc_info is None
