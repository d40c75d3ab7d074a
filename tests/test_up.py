"""`gpu-orchestrator up`: starts everything, serves, stops cleanly, and a restart keeps state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import LOOPBACK, free_port
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


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid``: {pid: command line}."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out[int(entry.name)] = cmdline
    return out


def _group(pgid: int) -> set[int]:
    """Live processes in process group ``pgid``."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


class Up:
    def __init__(self, config: str, log_path: Path):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GPU_ORCH__") and k not in ("REDIS_URL", "CONFIG_PATH", "PORT")
        }
        self.log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--config", config, "up"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()

    def wait_up(self) -> None:
        wait_until(
            lambda: "gpu-orchestrator is up" in self.output() or self.proc.poll() is not None,
            timeout=90,
            message="the summary",
        )
        assert "gpu-orchestrator is up" in self.output(), self.output()[-3000:]


@pytest.fixture
def config(tmp_path):
    port = free_port()
    data = {
        "server": {"port": port, "host": "127.0.0.1", "workers": 1, "threads": 2},
        "redis": {"url": "", "data_dir": str(tmp_path / "data"), "embedded_port": free_port()},
        "webhooks": {"secret": "up-secret", "allowed_hosts": LOOPBACK},
        "monitoring": {
            "backend": "simulated",
            "refresh_interval": "1s",
            "simulated": {
                "nodes": [
                    {
                        "name": "laptop",
                        "count": 2,
                        "gpu": {"name": "NVIDIA L4", "memory_total_mb": 23034},
                    }
                ]
            },
        },
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
        wait_until(
            lambda: "gpu-orchestrator is up" in up.output(), timeout=90, message="the summary"
        )
        summary = up.output()
        assert f"API:        {base}" in summary and f"{base}/rq" in summary
        assert f"Console:    {base}/ " in summary
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
        code, queued = _post(
            base + "/gpu/allocate", {"service_name": "waiter", "webhook_url": rx.url}
        )
        assert code == 202
        family = _descendants(up.proc.pid)
        assert len(family) >= 5  # redis, api, worker, scheduler, monitor (and their forks)
    finally:
        rc = up.stop()
    assert rc == 0, up.output()[-3000:]
    leftovers = [pid for pid in family if _alive(pid)]
    assert leftovers == [], up.output()[-3000:]

    again = Up(path, tmp_path / "up-2.log")
    try:
        wait_until(
            lambda: "gpu-orchestrator is up" in again.output(),
            timeout=90,
            message="the summary after a restart",
        )
        assert "2 allocation(s), 1 queued request(s)" in again.output()
        listing = _get(base + "/gpu/list")
        assert sorted(a["id"] for a in listing["allocations"]) == sorted(held)
        assert [q["request_id"] if "request_id" in q else q["id"] for q in listing["queue"]] == [
            queued["request_id"]
        ]
        # The whole path after the restart: API release -> grant -> worker -> signed webhook.
        code, _ = _post(base + "/gpu/release", {"allocation_id": held[0]})
        assert code == 200
        [hook] = rx.wait_for(1)
        payload = json.loads(hook["body"])
        assert (payload["status"], payload["request_id"]) == ("allocated", queued["request_id"])
        assert webhooks.verify_signature(
            "up-secret",
            hook["headers"][webhooks.TIMESTAMP_HEADER],
            hook["body"],
            hook["headers"][webhooks.SIGNATURE_HEADER],
        )
    finally:
        assert again.stop() == 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def test_up_restarts_its_embedded_redis_after_a_sigkill_and_the_roles_reconnect(config, rx):
    path, base, tmp_path = config
    up = Up(path, tmp_path / "up.log")
    try:
        up.wait_up()
        held = [
            _post(base + "/gpu/allocate", {"service_name": "keeper"})[1]["id"] for _ in range(2)
        ]
        code, queued = _post(
            base + "/gpu/allocate", {"service_name": "waiter", "webhook_url": rx.url}
        )
        assert code == 202
        redis_pid = int((tmp_path / "data" / "redis.pid").read_text())
        roles = {pid: cmd for pid, cmd in _children(up.proc.pid).items() if pid != redis_pid}
        assert len(roles) == 4, roles
        time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
        os.kill(redis_pid, signal.SIGKILL)

        def redis_lines():
            return [
                line
                for line in up.output().splitlines()
                if "embedded Redis" in line and "died" in line
            ]

        wait_until(redis_lines, timeout=30, message="a line about Redis")
        wait_until(lambda: _answers(base + "/gpu/status"), timeout=60, message="the API back")
        [line] = redis_lines()
        assert str(tmp_path / "data") in line

        listing = _get(base + "/gpu/list")  # replayed from the AOF
        assert sorted(a["id"] for a in listing["allocations"]) == sorted(held)
        # Every role reconnected in its own process (none crashed or was restarted) ...
        assert all(_alive(pid) for pid in roles), up.output()[-3000:]
        assert "restarting it in" not in up.output()
        # ... and the whole path works: release -> grant -> worker -> webhook.
        assert _post(base + "/gpu/release", {"allocation_id": held[0]})[0] == 200
        [hook] = rx.wait_for(1)
        assert json.loads(hook["body"])["request_id"] == queued["request_id"]
    finally:
        rc = up.stop()
    assert rc == 0, up.output()[-3000:]


def test_a_sigkilled_up_leaves_nothing_running_and_the_next_up_stops_what_hung(config):
    """Children die with their supervisor; one that cannot (stopped here) is the next up's job."""
    path, base, tmp_path = config
    up = Up(path, tmp_path / "up-1.log")
    family: set[int] = set()
    try:
        up.wait_up()
        family = _descendants(up.proc.pid)
        [worker] = [pid for pid, cmd in _children(up.proc.pid).items() if cmd.endswith(" worker")]
        hung = _group(worker)
        os.kill(worker, signal.SIGSTOP)
        up.proc.kill()
        up.proc.wait()
        others = family - hung
        wait_until(
            lambda: not [pid for pid in others if _alive(pid)],
            timeout=60,
            message="every child of the killed up to stop",
        )
        assert _alive(worker)  # stopped: its SIGTERM waits (its forks may end on their own)

        again = Up(path, tmp_path / "up-2.log")
        try:
            again.wait_up()
            assert not [pid for pid in hung if _alive(pid)]
            [line] = [ln for ln in again.output().splitlines() if "left running" in ln]
            assert f"worker (pid {worker})" in line
            assert _get(base + "/healthz") == {"status": "ok"}
            assert (
                len([c for c in _children(again.proc.pid).values() if c.endswith(" worker")]) == 1
            )
        finally:
            assert again.stop() == 0, again.output()[-3000:]
    finally:
        up.stop()
        _kill_all(pid for pid in family if _alive(pid))


def test_a_second_up_on_the_same_data_directory_is_refused_with_one_line(config, tmp_path):
    path, base, _ = config
    first = Up(path, tmp_path / "up-1.log")
    try:
        first.wait_up()
        other = yaml.safe_load(Path(path).read_text())
        other["server"]["port"] = free_port()
        other["redis"]["embedded_port"] = free_port()
        other_path = tmp_path / "other.yaml"
        other_path.write_text(yaml.safe_dump(other))
        second = Up(str(other_path), tmp_path / "up-2.log")
        try:
            rc = second.proc.wait(30)
        finally:
            second.stop()
        assert rc == 2, second.output()[-3000:]
        [line] = second.output().strip().splitlines()
        assert f"pid {first.proc.pid}" in line and str(tmp_path / "data") in line
        assert _get(base + "/healthz") == {"status": "ok"}
    finally:
        assert first.stop() == 0


def test_up_exits_2_within_10s_with_one_line_when_the_api_port_is_taken(config):
    path, base, tmp_path = config
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        started = time.monotonic()
        up = Up(path, tmp_path / "up.log")
        try:
            rc = up.proc.wait(30)
        finally:
            up.stop()
    assert time.monotonic() - started < 10
    assert rc == 2, up.output()[-3000:]
    [line] = up.output().strip().splitlines()
    assert f"API port {port}" in line and "server.port" in line and "PORT" in line
    assert not (tmp_path / "data" / "redis.pid").exists()  # nothing was started
