"""Run the API under gunicorn with settings from the config (``gpu-orchestrator api``).

Metrics in multiprocess mode: every gunicorn worker is its own process, so prometheus_client
keeps counter and histogram values in files under ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` merges them. :func:`run` points that variable at a directory before any worker
starts (an operator-set one, or a fresh temporary one), wipes stale files from an earlier run
in gunicorn's ``on_starting`` hook, and marks dead workers in ``child_exit``.

Fork trap: gunicorn forks workers from inside ``run()``; a worker that exits raises
``SystemExit`` through the very same Python frames as the master. Cleanup in ``finally`` blocks
(removing the temporary directory, stopping the embedded Redis) therefore checks that it runs
in the master process, not in a worker that is on its way out.

Worker: :class:`app.http_worker.BufferingWorker` reads each request whole on an event loop
before a thread runs it, so slow or idle clients hold no thread (see that module).
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from typing import Any, Callable

from gunicorn.app.base import BaseApplication

from app.http_worker import BufferingWorker, Limits
from app.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def gunicorn_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Map ``server.*`` to gunicorn settings.

    ``write_timeout`` bounds how long one request may run (gunicorn ``timeout``) and
    ``read_timeout`` is the graceful-shutdown window; ``header_timeout``, ``idle_timeout`` and
    ``max_body_bytes`` are enforced per connection by the worker (:class:`BufferingWorker`).
    """
    srv = settings.server
    opts = {
        "bind": f"{srv.host}:{srv.port}",
        "workers": srv.workers,
        "threads": srv.threads,
        "worker_class": BufferingWorker.configured(Limits(
            header_timeout=srv.header_timeout, idle_timeout=srv.idle_timeout,
            max_body_bytes=srv.max_body_bytes), workers=srv.workers),
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
    """Make sure ``PROMETHEUS_MULTIPROC_DIR`` names an empty directory; (path, created by us)."""
    environ = os.environ if environ is None else environ
    path = environ.get(MULTIPROC_ENV) or ""
    created = False
    if not path:
        path = tempfile.mkdtemp(prefix="gpu-orchestrator-metrics-")
        created = True
        environ[MULTIPROC_ENV] = path
    os.makedirs(path, exist_ok=True)
    wipe_metrics_dir(path)
    return path, created


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


def run(settings: Settings, redis_url: str, *, cleanup: Callable[[], None] | None = None,
        **overrides: Any) -> None:
    """Serve the API until gunicorn stops; ``cleanup`` runs once, in the master only."""
    master = os.getpid()
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
            if cleanup is not None:
                cleanup()
