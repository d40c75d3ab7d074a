"""docker-compose.yml and the Dockerfile: they parse, and every command they run exists.

No Docker engine runs here, so this checks what can be checked without one (plus
``docker compose config`` when a Docker CLI with the compose plugin is present).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _entrypoint(svc) -> list[str]:
    return svc.get("entrypoint") or ["gpu-orchestrator"]


def test_every_service_we_build_runs_an_existing_cli_command(compose):
    ours = {name: svc for name, svc in compose["services"].items()
            if svc.get("image", "").startswith("gpu-orchestrator")}
    assert {"api-1", "api-2", "worker", "scheduler", "monitor", "rq-dashboard"} <= set(ours)
    parser = cli._parser()
    roles = set()
    for name, svc in ours.items():
        entry = _entrypoint(svc)
        if entry == ["gpu-orchestrator"]:
            args = parser.parse_args(svc["command"])  # SystemExit on an unknown command/option
            roles.add(args.command)
        else:
            assert entry == ["rq-dashboard"], name
            from rq_dashboard.cli import run
            ctx = run.make_context("rq-dashboard", list(svc["command"]))
            assert ctx.params["json"] and ctx.params["disable_delete"]
            assert ctx.params["redis_url"] == ("redis://redis:6379/0",)
    assert roles == {"api", "worker", "scheduler", "monitor"}


def test_dockerfile_entrypoint_is_the_cli(compose):
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["gpu-orchestrator"]' in text
    setup = (ROOT / "setup.cfg").read_text()
    assert "gpu-orchestrator = app.cli:main" in setup
    for path in re.findall(r"^COPY (?!--)(\S+)", text, re.M):
        assert (ROOT / path).exists(), path


def test_redis_keeps_its_data(compose):
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"]
               for v in redis["volumes"])
    for svc in compose["services"].values():
        if svc.get("image", "").startswith("gpu-orchestrator"):
            assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_monitor_gets_the_gpus(compose):
    assert compose["services"]["monitor"]["gpus"] == "all"


def test_nginx_balances_both_api_replicas(compose):
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\w-]+):(\d+)", conf, re.M)
    assert sorted(servers) == [("api-1", "8086"), ("api-2", "8086")]
    nginx = compose["services"]["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert conf.count("{") == conf.count("}")


def test_prometheus_scrapes_the_api(compose):
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert sorted(job["static_configs"][0]["targets"]) == ["api-1:8086", "api-2:8086"]
    assert any("prometheus.yml" in v for v in compose["services"]["prometheus"]["volumes"])


def test_mounted_files_exist(compose):
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), src


def test_docker_compose_config_when_available():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True,
                                    timeout=20).returncode != 0:
        pytest.skip("no docker compose CLI here")
    out = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                          "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
