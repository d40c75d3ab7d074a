"""The chaos run's topology: every process of the service, on loopback, that faults can hit.

One :class:`Topology` owns a temp directory with the generated config files and one log file
per process, and these children:

========== ===== ================================================================
role       count what
========== ===== ================================================================
redis      1     redis-server with AOF (``appendfsync everysec``), restartable on
                 the same port and data directory so it replays its AOF
api        3     ``python -m app.cli api`` (gunicorn), env PORT and REDIS_URL
worker     2     ``python -m app.cli worker`` (RQ)
scheduler  1     ``python -m app.cli scheduler``
monitor    4     ``python -m app.cli monitor``, one per simulated node, each with its
                 own one-node config and ``GPU_ORCH__MONITORING__NODE_NAME``
========== ===== ================================================================

Every child runs in its own process group, so a SIGKILL hits the whole role (gunicorn's master
and its workers) the way a container kill would. All spawning happens on the thread that built
the topology (``PR_SET_PDEATHSIG`` fires when the *thread* that forked a child ends), and
:meth:`Topology.close` kills every group that is still alive, however the run ended.

A supervisor pass (:meth:`Topology.supervise`) restarts any child that exited without being
told to, as systemd or Kubernetes would, and counts it: an unexpected exit is a finding of the
run, reported next to the invariants.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.embedded_redis import find_binary  # noqa: E402
from bench.sentinel_topology import SentinelTopology, open_redis  # noqa: E402

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Child:
    """One supervised process: how to start it, and its current incarnation."""

    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    expected_down: bool = True
    starts: int = 0
    unexpected_exits: list[int] = field(default_factory=list)
    exit_times: list[float] = field(default_factory=list)  # epoch seconds of those exits
    stopped: bool = False  # SIGSTOPped (silent), not dead

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Topology:
    """Builds, starts, breaks and cleans up the whole service on loopback ports."""

    def __init__(
        self,
        *,
        apis: int = 3,
        workers: int = 2,
        nodes: int = 4,
        gpus_per_node: int = 8,
        gpu_memory_mb: int = 81559,
        api_keys: dict[str, str] | None = None,
        admins: list[str] | None = None,
        webhook_secret: str = "",
        prefix: str = "{chaos}",
        workdir: str | None = None,
        extra_config: dict | None = None,
        sentinel: bool = False,
        sentinel_password: str = "",
    ):
        self._owner_thread = threading.get_ident()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="gpuo-chaos-")
        self.dir = Path(workdir or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.redis_dir = self.dir / "redis"
        self.redis_dir.mkdir(exist_ok=True)
        self.redis_port = free_port()
        self.api_ports = [free_port() for _ in range(apis)]
        self.n_workers = workers
        self.node_names = [f"node-{chr(ord('a') + i)}" for i in range(nodes)]
        self.gpus_per_node = gpus_per_node
        self.gpu_memory_mb = gpu_memory_mb
        self.prefix = prefix
        self.api_keys = dict(api_keys or {})
        self.admins = list(admins or [])
        self.webhook_secret = webhook_secret
        self.extra_config = extra_config or {}
        self.children: dict[str, Child] = {}
        self.redis_child: Child | None = None
        #: --sentinel: a primary, one replica and three sentinels instead of one redis-server
        self.sentinel = (
            SentinelTopology(
                self.dir / "sentinel", password=sentinel_password, preexec_fn=_die_with_parent
            )
            if sentinel
            else None
        )
        self._closed = False

    # ------------------------------------------------------------------ config

    @property
    def redis_url(self) -> str:
        """What the roles get as REDIS_URL (with Sentinel: no password; it is in their config)."""
        if self.sentinel is not None:
            return self.sentinel.url
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def bench_url(self) -> str:
        """For the harness's own clients (with the password when there is one)."""
        return self.sentinel.url_with_password if self.sentinel is not None else self.redis_url

    def api_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.api_ports[i]}"

    def config(self, nodes: list[str] | None = None) -> dict[str, Any]:
        """The service config every role shares; ``nodes`` narrows the simulated fleet."""
        fleet = [
            {
                "name": n,
                "count": self.gpus_per_node,
                "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": self.gpu_memory_mb},
            }
            for n in (nodes or self.node_names)
        ]
        cfg: dict[str, Any] = {
            "server": {
                "host": "127.0.0.1",
                "workers": 1,
                "threads": 8,
                "read_timeout": "2s",
                "write_timeout": "30s",
            },
            "logging": {"level": "INFO", "format": "text"},
            "redis": {
                "prefix": self.prefix,
                "socket_timeout": "2s",
                **({"sentinel": self.sentinel.sentinel_config()} if self.sentinel else {}),
            },
            "scheduler": {
                "queue_check_interval": "1s",
                "cleanup_interval": "1s",
                "node_heartbeat_timeout": "3s",
                "queue_timeout": "10m",
                "default_ttl": "30s",
                "max_ttl": "5m",
            },
            "monitoring": {
                "backend": "simulated",
                "refresh_interval": "500ms",
                "simulated": {"dynamic": False, "nodes": fleet},
            },
            "auth": {
                "enabled": bool(self.api_keys),
                "api_keys": self.api_keys,
                "admins": self.admins,
            },
            "webhooks": {
                "timeout": "2s",
                "secret": self.webhook_secret,
                "allowed_hosts": ["127.0.0.0/8"],
                "retry_intervals": ["1s", "1s", "2s", "2s", "3s", "3s", "5s", "5s", "5s", "5s"],
            },
            "workers": {
                "maintenance_interval": "2s",
                "job_timeout": "10s",
                "heartbeat_interval": "1s",
            },
            "dashboard": {"enabled": False},
        }
        for section, values in self.extra_config.items():
            cfg.setdefault(section, {}).update(values)
        return cfg

    def _write_config(self, name: str, cfg: dict) -> Path:
        path = self.dir / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def _env(self, config_path: Path, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GPU_ORCH__") and k not in ("PORT", "REDIS_URL", "CONFIG_PATH")
        }
        env.update(
            CONFIG_PATH=str(config_path),
            REDIS_URL=self.redis_url,
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def _build(self) -> None:
        main_cfg = self._write_config("config.yaml", self.config())
        py = [sys.executable, "-m", "app.cli"]
        if self.sentinel is not None:
            self.redis_child = None
        else:
            self._build_redis()
        self._build_roles(main_cfg, py)

    def _build_redis(self) -> None:
        self.redis_child = Child(
            "redis",
            "redis",
            [
                find_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(self.redis_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--appendfilename",
                "appendonly.aof",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            dict(os.environ),
            self.dir / "logs" / "redis.log",
        )
        self.children["redis"] = self.redis_child

    def _build_roles(self, main_cfg: Path, py: list[str]) -> None:
        # The first API replica and the first worker log at DEBUG, so the search for secrets in
        # the logs sees the most talkative output the service can produce.
        debug = {"GPU_ORCH__LOGGING__LEVEL": "DEBUG"}
        for i, port in enumerate(self.api_ports):
            self._add(
                f"api-{i}",
                "api",
                py + ["api"],
                self._env(main_cfg, PORT=str(port), **(debug if i == 0 else {})),
            )
        for i in range(self.n_workers):
            self._add(
                f"worker-{i}",
                "worker",
                py + ["worker"],
                self._env(main_cfg, **(debug if i == 0 else {})),
            )
        self._add("scheduler", "scheduler", py + ["scheduler"], self._env(main_cfg))
        for node in self.node_names:
            cfg = self._write_config(f"monitor-{node}.yaml", self.config([node]))
            self._add(
                f"monitor-{node}",
                "monitor",
                py + ["monitor", "--backend", "simulated"],
                self._env(cfg, GPU_ORCH__MONITORING__NODE_NAME=node),
            )

    def _add(self, name, role, argv, env) -> None:
        self.children[name] = Child(name, role, argv, env, self.dir / "logs" / f"{name}.log")

    # ------------------------------------------------------------------ lifecycle

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner_thread:
            raise RuntimeError("spawn children only from the thread that built the topology")

    def spawn(self, name: str) -> Child:
        self._check_thread()
        child = self.children[name]
        if child.alive():
            return child
        log = open(child.log_path, "ab")
        log.write(f"\n=== start #{child.starts + 1} at {time.time():.3f}\n".encode())
        log.flush()
        child.proc = subprocess.Popen(
            child.argv,
            env=child.env,
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        child.starts += 1
        child.expected_down = False
        child.stopped = False
        return child

    def start(self, timeout: float = 60.0) -> None:
        """Start Redis, then every role, and wait until the fleet and the APIs answer."""
        self._build()
        self.start_redis()
        for name, child in self.children.items():
            if child.role == "monitor":
                self.spawn(name)
        for name, child in self.children.items():
            if child.role in ("api", "worker", "scheduler"):
                self.spawn(name)
        deadline = time.monotonic() + timeout
        self.wait_apis(deadline)
        self.wait_nodes(deadline)

    def start_redis(self, timeout: float = 20.0) -> float:
        """(Re)start redis-server on the same port and data dir; seconds until it served."""
        t0 = time.monotonic()
        if self.sentinel is not None:
            self.sentinel.start(timeout)
            return time.monotonic() - t0
        self.spawn("redis")
        client = redis_lib.Redis(port=self.redis_port, socket_timeout=1)
        try:
            while time.monotonic() - t0 < timeout:
                if not self.redis_child.alive():
                    raise RuntimeError(f"redis-server exited; see {self.redis_child.log_path}")
                try:
                    if client.ping():
                        return time.monotonic() - t0
                except redis_lib.RedisError:  # connection refused, or LOADING the AOF
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError("redis-server did not answer in time")

    def wait_apis(self, deadline: float) -> None:
        import requests

        pending = set(range(len(self.api_ports)))
        while pending:
            for i in list(pending):
                try:
                    if requests.get(self.api_url(i) + "/healthz", timeout=1).status_code == 200:
                        pending.discard(i)
                except requests.RequestException:
                    pass
            if not pending:
                return
            for name, child in self.children.items():
                if child.role == "api" and child.proc and child.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited at start-up; see {child.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"API replicas {sorted(pending)} did not answer /healthz")
            time.sleep(0.1)

    def wait_nodes(self, deadline: float) -> None:
        from app.keys import Keys

        client = open_redis(self.bench_url, decode_responses=True, socket_timeout=2)
        keys = Keys(self.prefix)
        try:
            while True:
                try:
                    seen = set(client.zrange(keys.nodes(), 0, -1))
                except redis_lib.RedisError:
                    seen = set()
                if set(self.node_names) <= seen:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nodes {sorted(set(self.node_names) - seen)} never "
                        "reported; see the monitor logs"
                    )
                time.sleep(0.1)
        finally:
            client.close()

    def signal(self, name: str, sig: int, *, expect_exit: bool) -> None:
        """Send ``sig`` to a child's whole process group."""
        child = self.children[name]
        if expect_exit:
            child.expected_down = True
        if child.proc is not None and child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, name: str) -> None:
        """SIGKILL a child's process group and reap it."""
        self.signal(name, signal.SIGKILL, expect_exit=True)
        child = self.children[name]
        if child.proc is not None:
            child.proc.wait()

    def terminate(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM (graceful stop) and wait; SIGKILL when it will not stop."""
        child = self.children[name]
        self.signal(name, signal.SIGTERM, expect_exit=True)
        if child.proc is not None:
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(name)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stays but goes silent (no heartbeats, no answers)."""
        self.signal(name, signal.SIGSTOP, expect_exit=False)
        self.children[name].stopped = True

    def resume(self, name: str) -> None:
        self.signal(name, signal.SIGCONT, expect_exit=False)
        self.children[name].stopped = False

    def supervise(self) -> list[str]:
        """Restart children that died on their own; return their names."""
        restarted = []
        for name, child in self.children.items():
            if child.proc is None or child.expected_down or child.proc.poll() is None:
                continue
            child.unexpected_exits.append(child.proc.returncode)
            child.exit_times.append(time.time())
            if name == "redis":
                self.start_redis()
            else:
                self.spawn(name)
            restarted.append(name)
        return restarted

    def names(self, role: str) -> list[str]:
        return [n for n, c in self.children.items() if c.role == role]

    def log_paths(self) -> list[Path]:
        return sorted((self.dir / "logs").glob("*.log"))

    def unexpected_exits(self) -> dict[str, list[int]]:
        return {n: c.unexpected_exits for n, c in self.children.items() if c.unexpected_exits}

    def close(self) -> None:
        """Stop everything still running: SIGCONT+SIGTERM, then SIGKILL after a grace period."""
        if self._closed:
            return
        self._closed = True
        order = [n for n in self.children if n != "redis"] + ["redis"]
        for name in order:
            child = self.children.get(name)
            if child is None or child.proc is None or child.proc.poll() is not None:
                continue
            child.expected_down = True
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.killpg(child.proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for name in order:
            child = self.children.get(name)
            if child is None or child.proc is None:
                continue
            try:
                child.proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Kill the group even when the leader is gone: orphans (gunicorn workers) may linger.
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.sentinel is not None:
            self.sentinel.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
