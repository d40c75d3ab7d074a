"""Redis connections built from settings, one way for every process."""
from __future__ import annotations

import redis

from app.settings import Settings


def connect(url: str, settings: Settings | None = None, *, decode: bool = True) -> redis.Redis:
    """A client for ``url``. The engine wants ``decode=True``; RQ needs raw bytes (``False``)."""
    timeout = settings.redis.socket_timeout if settings else 5.0
    max_conn = settings.redis.max_connections if settings else 64
    return redis.Redis.from_url(
        url, decode_responses=decode, socket_timeout=timeout, socket_connect_timeout=timeout,
        max_connections=max_conn, health_check_interval=30, retry_on_timeout=False)
