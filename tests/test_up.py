"""`gpu-orchestrator up`: starts everything, serves, stops cleanly, and a restart keeps state."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from proc_support import ROOT, wait_until
from webhook_receiver import Receiver
from workers import webhooks

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children in their own sessions included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


class Up:
    def __init__(self, config: str, log_path: Path):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("GPU_ORCH__") and k not in ("REDIS_URL", "CONFIG_PATH", "PORT")}
        self.log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "--config", config, "up"],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


@pytest.fixture
def config(tmp_path):
    port = free_port()
    data = {
        "server": {"port": port, "host": "127.0.0.1", "workers": 1, "threads": 2},
        "redis": {"url": "", "data_dir": str(tmp_path / "data"), "embedded_port": free_port()},
        "webhooks": {"secret": "up-secret"},
        "monitoring": {"backend": "simulated", "refresh_interval": "1s",
                       "simulated": {"nodes": [{"name": "laptop", "count": 2,
                                                "gpu": {"name": "NVIDIA L4",
                                                        "memory_total_mb": 23034}}]}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), f"http://127.0.0.1:{port}", tmp_path


@pytest.fixture
def rx():
    with Receiver() as receiver:
        yield receiver


def test_up_starts_serves_stops_cleanly_and_restarts_with_state(config, rx):
    path, base, tmp_path = config
    up = Up(path, tmp_path / "up-1.log")
    try:
        wait_until(lambda: "gpu-orchestrator is up" in up.output(), timeout=90,
                   message="the summary")
        summary = up.output()
        assert f"API:        {base}" in summary and f"{base}/rq" in summary
        assert "GPUs:       2 on 1 node(s)" in summary
        assert str(tmp_path / "data") in summary
        assert _get(base + "/healthz") == {"status": "ok"}
        gpus = _get(base + "/gpu/status")["gpus"]
        assert [g["name"] for g in gpus] == ["NVIDIA L4", "NVIDIA L4"]
        held = []
        for _ in range(2):
            code, alloc = _post(base + "/gpu/allocate", {"service_name": "keeper"})
            assert code == 200
            held.append(alloc["id"])
        code, queued = _post(base + "/gpu/allocate", {"service_name": "waiter",
                                                      "webhook_url": rx.url})
        assert code == 202
        family = _descendants(up.proc.pid)
        assert len(family) >= 5      # redis, api, worker, scheduler, monitor (and their forks)
    finally:
        rc = up.stop()
    assert rc == 0, up.output()[-3000:]
    leftovers = [pid for pid in family if _alive(pid)]
    assert leftovers == [], up.output()[-3000:]

    again = Up(path, tmp_path / "up-2.log")
    try:
        wait_until(lambda: "gpu-orchestrator is up" in again.output(), timeout=90,
                   message="the summary after a restart")
        assert "2 allocation(s), 1 queued request(s)" in again.output()
        listing = _get(base + "/gpu/list")
        assert sorted(a["id"] for a in listing["allocations"]) == sorted(held)
        assert [q["request_id"] if "request_id" in q else q["id"]
                for q in listing["queue"]] == [queued["request_id"]]
        # The whole path after the restart: API release -> grant -> worker -> signed webhook.
        code, _ = _post(base + "/gpu/release", {"allocation_id": held[0]})
        assert code == 200
        [hook] = rx.wait_for(1)
        payload = json.loads(hook["body"])
        assert (payload["status"], payload["request_id"]) == ("allocated", queued["request_id"])
        assert webhooks.verify_signature("up-secret", hook["headers"][webhooks.TIMESTAMP_HEADER],
                                         hook["body"], hook["headers"][webhooks.SIGNATURE_HEADER])
    finally:
        assert again.stop() == 0
