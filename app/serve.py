"""Run the API under gunicorn with settings from the config (``gpu-orchestrator api``)."""
from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from app.settings import Settings


def gunicorn_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Map ``server.*`` to gunicorn settings.

    ``write_timeout`` bounds how long one request may run (gunicorn ``timeout``), ``idle_timeout``
    is the keep-alive window, and ``read_timeout`` is the graceful-shutdown window.
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
    }
    opts.update(overrides)
    return opts


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
