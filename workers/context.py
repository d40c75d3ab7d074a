"""What jobs need inside a worker process: the settings and Redis clients, set up explicitly.

``workers.worker.run`` calls :func:`configure` before the worker starts, so jobs never build a
connection on import. A job run by a plain ``rq worker`` (not ours) falls back to loading the
config the usual way (file + environment) on first use.
"""

from __future__ import annotations

from typing import Any

from app.settings import Settings


class _Context:
    settings: Settings | None = None
    redis: Any = None  # decoded client, for the engine
    rq_redis: Any = None  # raw-bytes client, for RQ
    engine: Any = None  # built on first use, reused by every job in this process


_context = _Context()


def configure(settings: Settings, redis: Any, rq_redis: Any = None) -> None:
    _context.settings, _context.redis, _context.rq_redis = settings, redis, rq_redis
    _context.engine = None


def get() -> tuple[Settings, Any, Any]:
    """``(settings, decoded redis, raw redis)``, loading config on first use if needed."""
    if _context.settings is None:
        from app import settings as settings_mod
        from app.redis_client import connect

        settings = settings_mod.load()
        configure(
            settings,
            connect(settings.redis.url, settings),
            connect(settings.redis.url, settings, decode=False),
        )
    return _context.settings, _context.redis, _context.rq_redis


def engine() -> Any:
    """The process's :class:`app.engine.Engine` (scripts loaded once, not per job)."""
    settings, redis, _ = get()
    if _context.engine is None:
        from app.engine import Engine

        _context.engine = Engine(redis, settings)
    return _context.engine
