"""deploy/: the Grafana dashboard queries only metrics /metrics exports, its provisioning loads
it, Prometheus' config passes ``promtool check config``, and ``promtool check metrics`` finds no
problem beyond the original's metric names (kept as they are: they are a contract).

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it); without it the
promtool checks skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.api_support import clock, make_app  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gpu-orchestrator.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
#: What ``promtool check metrics`` says about names the original service already used.
KNOWN_PROBLEMS = {
    'gpu_allocator_gpus_allocated_total non-counter metrics should not have "_total" suffix',
    "gpu_orchestrator_gpu_memory_total_mb metric names should not contain abbreviated units",
    "gpu_orchestrator_gpu_memory_used_mb metric names should not contain abbreviated units",
    'gpu_orchestrator_gpus_total non-counter metrics should not have "_total" suffix',
}
_METRIC = re.compile(r"\b(gpu_[a-z0-9_]+)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run promtool: apt-get install prometheus")
        pytest.skip("promtool not found (apt-get install prometheus)")
    return path


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


@pytest.fixture
def exposition(make_app):
    """/metrics of an app that has served requests, granted, queued and released."""
    app = make_app(nodes=(("node-a", 2),))
    client = app.test_client()
    a = client.post(
        "/gpu/allocate", json={"service_name": "svc", "workload_data": {"required_gpus": 2}}
    ).get_json()
    client.post("/gpu/allocate", json={"service_name": "waits"})
    client.post("/gpu/release", json={"allocation_id": a["id"]})
    client.post("/admin/nodes/node-a/drain")  # "waits" got a GPU: it is preempted
    client.get("/gpu/requests/nope-1")
    return client.get("/metrics").get_data(as_text=True)


def test_every_metric_the_dashboard_queries_is_exported(exposition):
    exported = {s.name for fam in text_string_to_metric_families(exposition) for s in fam.samples}
    queried = {m for expr in dashboard_exprs() for m in _METRIC.findall(expr)}
    assert len(queried) >= 12
    assert not queried - exported, (
        f"the dashboard queries metrics nobody exports: {sorted(queried - exported)}"
    )


def test_dashboard_panels_cover_the_operations_story():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "utilization",
        "memory",
        "allocations",
        "queue",
        "wait",
        "webhook",
        "latency",
        "errors",
        "nodes",
        "preemptions",
    ):
        assert topic in titles, topic
    assert all(t["datasource"]["uid"] == "prometheus" for p in dash["panels"] for t in p["targets"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    [source] = ds["datasources"]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((PROVISIONING / "dashboards" / "gpu-orchestrator.yml").read_text())
    [provider] = boards["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert "prometheus" in compose["services"]
    assert all(p.startswith("127.0.0.1:") for p in grafana["ports"])


def test_promtool_check_config_passes():
    out = subprocess.run(
        [promtool(), "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_metrics_finds_nothing_new(exposition):
    out = subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()}
    assert problems <= KNOWN_PROBLEMS, sorted(problems - KNOWN_PROBLEMS)
