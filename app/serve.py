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

Balanced workers: gunicorn's workers all accept from one listening socket, first come first
served, so a burst of keep-alive connections tends to land on one worker; the ``gthread``
workers here (:class:`BalancedThreadWorker`) leave a new connection to a sibling holding fewer.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from app.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def gunicorn_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Map ``server.*`` to gunicorn settings.

    ``write_timeout`` bounds how long one request may run (gunicorn ``timeout``), ``idle_timeout``
    is the keep-alive window, and ``read_timeout`` is the graceful-shutdown window. ``gthread``
    runs as :class:`BalancedThreadWorker` (see :meth:`GunicornApp.load_config`).
    """
    srv = settings.server
    opts = {
        "bind": f"{srv.host}:{srv.port}",
        "workers": srv.workers,
        "threads": srv.threads,
        "worker_class": "gthread",
        "timeout": int(max(srv.write_timeout, 1)),
        "keepalive": int(max(srv.idle_timeout, 1)),
        "graceful_timeout": int(max(srv.read_timeout, 1)),
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.logging.level.lower(),
        "on_starting": on_starting,
        "pre_fork": pre_fork,
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
    """gunicorn master hook, before any worker: no counts from an earlier run survive; the
    connection board exists before the first fork."""
    global _board
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        wipe_metrics_dir(path)
    if _board is None:
        from multiprocessing.sharedctypes import RawArray
        _board = RawArray("i", [-1] * (2 * server.cfg.workers))


def pre_fork(server, worker) -> None:
    """gunicorn master hook, before a worker forks: give it a free slot on the board."""
    if _board is None:
        return
    used = {getattr(w, "board_slot", None) for w in server.WORKERS.values()}
    worker.board_slot = next((i for i in range(len(_board)) if i not in used), None)


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
    slot = getattr(worker, "board_slot", None)
    if _board is not None and slot is not None:
        _board[slot] = -1


#: Open connections per worker, one slot each (-1: no worker), in memory the workers share; made
#: by the master in ``on_starting``, inherited by every fork.
_board = None
#: Longest a worker leaves a waiting connection to a sibling holding fewer before taking it.
MAX_DEFER = 0.02


class BalancedThreadWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker that leaves new connections to the least loaded worker.

    Every worker waits on the one shared listening socket, and whichever wakes first accepts:
    under load that is the worker already running, so a burst of new keep-alive connections
    mostly lands on one worker (bench/http.py's 16 clients split 16/0, 15/1 or 14/2 between the
    two default workers more often than not) and the other sits idle while its sibling's
    threads queue for one GIL. Here each worker publishes how many connections it holds on a
    small board in shared memory, and one holding more than some sibling lets a waiting
    connection be for up to ``MAX_DEFER`` (the sibling takes it), then takes it itself (a
    sibling that is stuck or gone costs a new connection that much, never more).
    """

    _defer_since: float | None = None

    def _publish(self) -> None:
        slot = getattr(self, "board_slot", None)
        if _board is not None and slot is not None:
            _board[slot] = self.nr_conns

    def _defer(self) -> bool:
        """True while a sibling holds fewer connections than this worker (for MAX_DEFER)."""
        slot = getattr(self, "board_slot", None)
        if _board is None or slot is None:
            return False
        counts = _board[:]
        fewest = min((c for i, c in enumerate(counts) if i != slot and c >= 0), default=None)
        if fewest is None or self.nr_conns <= fewest:
            self._defer_since = None
            return False
        now = time.monotonic()
        if self._defer_since is None:
            self._defer_since = now
        return now - self._defer_since < MAX_DEFER

    def run(self):
        self._publish()
        super().run()

    def accept(self, listener):
        if self._defer():
            super().set_accept_enabled(False)  # run() asks again on its next turn
            return
        self._defer_since = None
        super().accept(listener)
        self._publish()

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled and not self._defer())

    def wait_for_and_dispatch_events(self, timeout):
        self._publish()
        if self._defer_since is not None and not self._accepting:
            timeout = min(timeout, 0.002)  # look at the board again soon
        super().wait_for_and_dispatch_events(timeout)


class GunicornApp(BaseApplication):
    """gunicorn driven from Python so the CLI owns config loading and validation."""

    def __init__(self, app_factory, options: dict[str, Any]):
        self.app_factory = app_factory
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        """The options, with ``gthread`` served by :class:`BalancedThreadWorker`."""
        for key, value in self.options.items():
            if value is not None or key == "accesslog":
                self.cfg.set(key, value)
        if self.cfg.worker_class_str == "gthread":
            self.cfg.set("worker_class", BalancedThreadWorker)  # gthread, balanced accepting

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
