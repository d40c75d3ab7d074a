"""A local Sentinel topology on loopback: one primary, one replica, three sentinels.

All five processes are the same binary as the embedded server
(:func:`app.embedded_redis.find_binary`; ``valkey-server --sentinel`` / ``redis-server
--sentinel``). The sentinels decide quickly (``down-after-milliseconds`` 1000, quorum 2) so a
killed primary is replaced within a few seconds. Used by ``bench/chaos.py --sentinel`` and by
the failover tests; never for production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis as redis_lib

from app.embedded_redis import find_binary

MASTER_NAME = "gpuo"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def open_redis(url: str, **kw) -> redis_lib.Redis:
    """A client for ``url`` (``redis://`` or ``redis+sentinel://``, the latter following the
    primary), for the harness's own checks; ``kw`` as for ``redis.Redis``."""
    if not url.startswith("redis+sentinel://"):
        return redis_lib.Redis.from_url(url, **kw)
    from redis.sentinel import Sentinel

    from app.settings import parse_sentinel_url

    t = parse_sentinel_url(url)
    pw = t.password or None
    manager = Sentinel(
        list(t.sentinels),
        sentinel_kwargs={"password": pw, "socket_timeout": kw.get("socket_timeout") or 2},
    )
    return manager.master_for(t.master_name, password=pw, db=t.db, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SentinelTopology:
    """Start with :meth:`start`, stop with :meth:`stop` (also on error); ports chosen free."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        password: str = "",
        sentinels: int = 3,
        appendonly: bool = True,
        preexec_fn=None,
    ):
        self.dir = Path(workdir)
        self.password = password
        self.binary = find_binary()
        self.appendonly = appendonly
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.failovers = 0
        self.preexec_fn = preexec_fn  # e.g. die with the harness (chaos_topology)

    # ---------------------------------------------------------------- addresses
    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    @property
    def url_with_password(self) -> str:
        """For the harness's own clients only: never handed to a child or logged."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}{','.join(self.sentinels)}/{MASTER_NAME}"

    @property
    def url(self) -> str:
        """The service's ``redis+sentinel://`` URL, password left out (it is in settings)."""
        return f"redis+sentinel://{','.join(self.sentinels)}/{MASTER_NAME}"

    def sentinel_config(self) -> dict:
        return {"master_name": MASTER_NAME, "sentinels": self.sentinels, "password": self.password}

    def client(self, port: int, **kw) -> redis_lib.Redis:
        return redis_lib.Redis(
            host="127.0.0.1",
            port=port,
            password=self.password or None,
            socket_timeout=2,
            socket_connect_timeout=2,
            **kw,
        )

    def primary_port(self) -> int | None:
        """The port the sentinels name as primary now (the first sentinel that answers)."""
        for port in self.sentinel_ports:
            try:
                addr = self.client(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis_lib.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    # ---------------------------------------------------------------- processes
    def _spawn(self, port: int, args: list[str], log: str) -> None:
        out = open(self.dir / log, "ab")
        try:
            self.procs[port] = subprocess.Popen(
                [self.binary, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=self.preexec_fn,
            )
        finally:
            out.close()

    def _data_args(self, port: int) -> list[str]:
        node = self.dir / f"redis-{port}"
        node.mkdir(parents=True, exist_ok=True)
        args = [
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(node),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def start(self, timeout: float = 20.0) -> SentinelTopology:
        self.dir.mkdir(parents=True, exist_ok=True)
        primary, replica = self.data_ports
        try:
            self._spawn(primary, self._data_args(primary), f"redis-{primary}.log")
            self._spawn(
                replica,
                self._data_args(replica) + ["--replicaof", "127.0.0.1", str(primary)],
                f"redis-{replica}.log",
            )
            self._wait(
                lambda: self.client(replica).info("replication").get("master_link_status") == "up",
                timeout,
                "the replica to sync",
            )
            for port in self.sentinel_ports:
                conf = self.dir / f"sentinel-{port}.conf"
                lines = [
                    f"port {port}",
                    "bind 127.0.0.1",
                    "protected-mode no",
                    f"dir {self.dir}",
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                ]
                if self.password:
                    lines += [
                        f"sentinel auth-pass {MASTER_NAME} {self.password}",
                        f"requirepass {self.password}",
                    ]
                conf.write_text("\n".join(lines) + "\n")
                self._spawn(port, [str(conf), "--sentinel"], f"sentinel-{port}.log")
            self._wait(self._sentinels_agree, timeout, "the sentinels to see both nodes")
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            master = self.client(port, decode_responses=True).sentinel_master(MASTER_NAME)
            if (
                int(master.get("num-slaves", 0)) < 1
                or int(master.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1
            ):
                return False
        return True

    @staticmethod
    def _wait(check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (redis_lib.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, no last fsync); its port."""
        port = self.primary_port()
        proc = self.procs.get(port) if port else None
        if proc is None:
            raise RuntimeError("no known primary to kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        return port

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until the sentinels name a new primary that accepts writes; its port."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.primary_port()
            if (
                port
                and port != old_port
                and self.client(port).info("replication").get("role") == "master"
            ):
                found.append(port)
                return True
            return False

        self._wait(promoted, timeout, "a failover")
        self.failovers += 1
        return found[-1]

    def restart(self, port: int) -> None:
        """Start a killed data node again; the sentinels make it a replica of the new primary."""
        self._spawn(port, self._data_args(port), f"redis-{port}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
