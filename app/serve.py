"""Run the API under gunicorn with settings from the config (``gpu-orchestrator api``).

Metrics in multiprocess mode: every gunicorn worker is its own process, so prometheus_client
keeps counter and histogram values in files under ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` merges them. :func:`run` points that variable at a directory before any worker
starts (an operator-set one, or a fresh temporary one), wipes stale files from an earlier run
in gunicorn's ``on_starting`` hook, and marks dead workers in ``child_exit``.

Stale temporary directories: a master killed with SIGKILL cannot remove its temporary metrics
directory. Each one therefore holds ``owner.lock``, flock-ed by the master from before the file
has its name until the master and its workers (which inherit the lock) are gone; the kernel
drops the lock when the last of them dies, however it dies. At start, :func:`run` removes every
``gpu-orchestrator-metrics-*`` directory of this user whose lock it can take: nobody uses it.
A directory without the file (being made right now, or from an older version) is left alone.

Fork trap: gunicorn forks workers from inside ``run()``; a worker that exits raises
``SystemExit`` through the very same Python frames as the master. Cleanup in ``finally`` blocks
(removing the temporary directory, stopping the embedded Redis) therefore checks that it runs
in the master process, not in a worker that is on its way out.

Worker: :class:`app.http_worker.BufferingWorker` reads each request whole on an event loop
before a thread runs it, so slow or idle clients hold no thread (see that module).
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from app.http_worker import BufferingWorker, Limits
from app.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Name prefix of the temporary metrics directories; the lock file inside each.
TEMP_PREFIX = "gpu-orchestrator-metrics-"
OWNER_LOCK = "owner.lock"

log = logging.getLogger("gpu_orchestrator.api")
#: The open, locked ``owner.lock`` of this process's temporary directory (kept for its life).
_owner_fd: int | None = None


def gunicorn_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Map ``server.*`` to gunicorn settings.

    ``write_timeout`` is gunicorn's ``timeout`` (a worker whose event loop stops notifying its
    master that long is replaced; the loop notifies while requests run on threads, so it does
    not bound a request) and ``read_timeout`` is the graceful-shutdown window; ``header_timeout``, ``idle_timeout`` and
    ``max_body_bytes`` are enforced per connection by the worker (:class:`BufferingWorker`).
    """
    srv = settings.server
    opts = {
        "bind": f"{srv.host}:{srv.port}",
        "workers": srv.workers,
        "threads": srv.threads,
        "worker_class": BufferingWorker.configured(
            Limits(
                header_timeout=srv.header_timeout,
                idle_timeout=srv.idle_timeout,
                max_body_bytes=srv.max_body_bytes,
            ),
            workers=srv.workers,
        ),
        "timeout": int(max(srv.write_timeout, 1)),
        "graceful_timeout": int(max(srv.read_timeout, 1)),
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.logging.level.lower(),
        "on_starting": on_starting,
        "post_worker_init": post_worker_init,
        "child_exit": child_exit,
        # gunicorn 27 opens a control socket at one fixed path in $HOME; several API processes
        # on one host (replicas, chaos, benchmarks) would fight over it, and we do not use it.
        "control_socket_disable": True,
    }
    opts.update(overrides)
    return opts


def wipe_metrics_dir(path: str) -> int:
    """Delete prometheus_client's value files (``*.db``) from an earlier run; returns how many."""
    removed = 0
    for name in glob.glob(os.path.join(path, "*.db")):
        try:
            os.remove(name)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def prepare_metrics_dir(environ: dict | None = None) -> tuple[str, bool]:
    """Make sure ``PROMETHEUS_MULTIPROC_DIR`` names an empty directory; (path, created by us).
    A directory we create is claimed with a lock (see the module docstring)."""
    global _owner_fd
    environ = os.environ if environ is None else environ
    path = environ.get(MULTIPROC_ENV) or ""
    created = False
    if not path:
        if environ is os.environ and "prometheus_client" in sys.modules:
            # prometheus_client reads the variable once, when first imported: set it later
            # and every worker's metrics would silently stay in memory, unseen by /metrics.
            raise RuntimeError(
                "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR "
                "was set; import app.metrics only after app.serve sets it"
            )
        path = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        _owner_fd = claim_dir(path)
        created = True
        environ[MULTIPROC_ENV] = path
    os.makedirs(path, exist_ok=True)
    wipe_metrics_dir(path)
    return path, created


def claim_dir(path: str) -> int:
    """Create ``path/owner.lock`` already locked (made under another name, locked, renamed), so
    a lock file that can be seen is either held or abandoned. Returns its descriptor, which
    must stay open (and is not passed on to programs this process executes)."""
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".owner-")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(tmp, os.path.join(path, OWNER_LOCK))
    return fd


def remove_stale_metrics_dirs(parent: str | None = None) -> list[str]:
    """Remove this user's temporary metrics directories whose owners are all dead."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        try:
            if (
                not entry.name.startswith(TEMP_PREFIX)
                or not entry.is_dir(follow_symlinks=False)
                or entry.stat(follow_symlinks=False).st_uid != os.getuid()
            ):
                continue
            fd = os.open(os.path.join(entry.path, OWNER_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock file: being made now, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its master or a worker of it is alive
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed


def on_starting(server) -> None:
    """gunicorn master hook, before any worker: no counts from an earlier run survive."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        wipe_metrics_dir(path)


def post_worker_init(worker) -> None:
    """gunicorn worker hook, once the app is loaded: a stop signal first answers the long-polls
    the worker holds (app.longpoll), so a graceful stop is not held up by them."""
    from app import longpoll

    longpoll.answer_held_on_stop()


def child_exit(server, worker) -> None:
    """gunicorn master hook: a worker died; drop its live-gauge files and its board slot."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
    board = getattr(worker, "board", None)
    if board is not None:
        board.clear(worker.age)


class GunicornApp(BaseApplication):
    """gunicorn driven from Python so the CLI owns config loading and validation."""

    def __init__(self, app_factory, options: dict[str, Any]):
        self.app_factory = app_factory
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is not None or key == "accesslog":
                self.cfg.set(key, value)

    def load(self):
        return self.app_factory()


def run(
    settings: Settings,
    redis_url: str,
    *,
    cleanup: Callable[[], None] | None = None,
    **overrides: Any,
) -> None:
    """Serve the API until gunicorn stops; ``cleanup`` runs once, in the master only."""
    global _owner_fd
    master = os.getpid()
    stale = remove_stale_metrics_dirs()
    if stale:
        log.info(
            "removed %d metrics director%s left by a killed API: %s",
            len(stale),
            "y" if len(stale) == 1 else "ies",
            ", ".join(stale),
        )
    path, created = prepare_metrics_dir()

    def factory():
        from app import create_app

        return create_app(settings, redis_url=redis_url)

    try:
        GunicornApp(factory, gunicorn_options(settings, **overrides)).run()
    finally:
        if os.getpid() == master:
            if created:
                shutil.rmtree(path, ignore_errors=True)
                if _owner_fd is not None:
                    os.close(_owner_fd)
                    _owner_fd = None
            if cleanup is not None:
                cleanup()
