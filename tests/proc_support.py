"""Helpers for tests that run the service's roles as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_settings(tmp_path, settings, **sections) -> str:
    """A config file with the test's Redis URL and prefix plus ``sections`` overrides."""
    data = {
        "redis": {"url": settings.redis.url, "prefix": settings.redis.prefix},
        "logging": {"level": "INFO"},
        "webhooks": {"allowed_hosts": list(settings.webhooks.allowed_hosts)},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = Path(tmp_path) / f"config-{len(list(Path(tmp_path).glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start_run(url: str, *args: str, **popen) -> subprocess.Popen:
    """``gpu-orchestrator run ARGS`` against the API at ``url`` (no API key from the caller's
    environment), its output piped as text."""
    env = dict(os.environ, GPU_ORCH_URL=url)
    env.pop("GPU_ORCH_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


class Role:
    """``gpu-orchestrator --config CFG <role>`` in its own process group, output to a file."""

    def __init__(self, config: str, *args: str, log_dir=None):
        self.args = [sys.executable, "-m", "app.cli", "--config", config, *args]
        name = f"{args[0]}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log_path = Path(log_dir or "/tmp") / name
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GPU_ORCH__") and k not in ("REDIS_URL", "CONFIG_PATH", "PORT")
        }
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_group(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        try:  # whatever it forked (work horse, RQ scheduler) must be gone too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()
        return self.proc.returncode


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout}s waiting for {text or predicate}")
