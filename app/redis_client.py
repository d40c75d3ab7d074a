"""Redis connections built from settings, one way for every process."""

from __future__ import annotations

import re

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from app.settings import SENTINEL_SCHEME, SentinelTarget, Settings, sentinel_target


def connect(url: str, settings: Settings | None = None, *, decode: bool = True) -> redis.Redis:
    """A client for ``url``. The engine wants ``decode=True``; RQ needs raw bytes (``False``).

    A ``redis+sentinel://`` URL gives a client of the current primary: each new connection
    asks the sentinels where it is, so after a failover the connections to the old primary
    fail once (the caller sees a ConnectionError: a 503, a retried job) and the next command
    reaches the new one, with no restart.
    """
    timeout = settings.redis.socket_timeout if settings else 5.0
    max_conn = settings.redis.max_connections if settings else 64
    if url.startswith(SENTINEL_SCHEME + "://"):
        return _sentinel_client(sentinel_target(settings, url), decode, timeout, max_conn)
    # redis-py's stock pool: it checks each pooled connection before use (a connection Redis
    # closed is replaced, not failed) and keeps its own bookkeeping; see docs/reliability.md.
    pool = redis.ConnectionPool.from_url(
        url,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=max_conn,
        health_check_interval=30,
        retry_on_timeout=False,
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as Redis.from_url: close() closes the pool
    return client


def _sentinel_client(
    target: SentinelTarget, decode: bool, timeout: float, max_conn: int
) -> redis.Redis:
    """A client of the primary that ``target``'s sentinels name (redis-py's documented
    ``Sentinel`` and ``SentinelConnectionPool``): its connections re-resolve the primary when
    they connect."""
    password = target.password or None
    manager = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={
            "password": password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        },
    )
    pool = SentinelConnectionPool(
        target.master_name,
        manager,
        password=password,
        db=target.db,
        decode_responses=decode,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=max_conn,
        health_check_interval=30,
        retry_on_timeout=False,
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


#: Oldest servers with Redis Functions (FUNCTION LOAD, FCALL_RO, no-writes), which the engine is.
MIN_REDIS = (7, 0)
MIN_VALKEY = (7, 2)
NEEDED = "Redis >= 7.0 or Valkey >= 7.2"


class ServerTooOld(RuntimeError):
    """The Redis server cannot run the engine; the message names the version found and needed."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3]) or (0,)


def server_version(client: redis.Redis) -> str:
    """The server as a person names it: ``valkey 9.1.2`` or ``redis 7.2.5``."""
    info = client.info("server")
    if info.get("server_name") == "valkey" or "valkey_version" in info:
        return f"valkey {info.get('valkey_version', info.get('redis_version'))}"
    return f"redis {info.get('redis_version', '?')}"


def version_problem(client: redis.Redis) -> str | None:
    """None when the server can run the engine, else one line naming what was found and what
    is needed. Connection errors propagate (the caller decides what an absent server means)."""
    found = server_version(client)
    name, _, number = found.partition(" ")
    need = MIN_VALKEY if name == "valkey" else MIN_REDIS
    if _version(str(number)) >= need:
        return None
    return (
        f"the Redis server is {found}; gpu-orchestrator needs {NEEDED} "
        "(its engine is a Redis Functions library)"
    )
