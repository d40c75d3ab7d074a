"""Redis connections built from settings, one way for every process."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from typing import Any

import redis
from redis.exceptions import DataError
from redis.sentinel import Sentinel, SentinelConnectionPool

from app.settings import SENTINEL_SCHEME, SentinelTarget, Settings, sentinel_target

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - a declared dependency; redis-py works without it
    _hiredis_pack = None


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


# ------------------------------------------------------------------ one packed command
# The engine sends one FCALL per operation with ~30 arguments that never change (the function
# name, the fixed keys, the library version, the settings). redis-py's ``execute_command``
# packs all of them on every call (a ``tuple`` pass and a type check per argument, then
# hiredis) and wraps the call in its observability and retry layers: ~80 us of client CPU per
# FCALL here, of which packing ~16. The engine instead packs the fixed part once (Redis's
# wire format, RESP, is a public protocol) and sends each call through the public Connection
# API (:class:`PinnedCalls`): ``send_packed_command`` / ``read_response`` (which disconnect on
# any error, and keep the health check and, on a Sentinel pool, the READONLY-means-failover
# rule) and the connection's own ``retry`` (``call_with_retry``, as ``execute_command`` uses
# it). What it leaves out: redis-py's OpenTelemetry metrics for these commands (off unless
# configured; we do not configure them).


def bulk(args: Iterable[Any]) -> bytes:
    """``args`` as RESP bulk strings (no array header), as redis-py packs them: with hiredis
    (a declared dependency) by hiredis's ``pack_command``, which redis-py itself calls then;
    without it as redis-py's default Encoder does (str as UTF-8, bytes as they are, int and
    float by ``repr``). Anything else (bool included) is a DataError, as redis-py raises."""
    if _hiredis_pack is not None:
        try:
            packed = _hiredis_pack(tuple(args))
        except TypeError as exc:
            raise DataError(str(exc)) from None
        return packed[packed.index(b"\n") + 1 :]  # less the array header, *<n>\r\n
    out = []
    for a in args:
        t = type(a)
        if t is str:
            b = a.encode()
        elif t is bytes:
            b = a
        elif t is int or t is float:
            b = repr(a).encode()
        else:
            raise DataError(f"Invalid input of type: {t.__name__!r} for a packed command")
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def packs(client: Any) -> bool:
    """Whether :class:`PinnedCalls` may stand in for ``client.execute_command``: a plain
    ``redis.Redis`` on a redis-py pool (the stock or the Sentinel one) whose connections
    encode as redis-py's default (UTF-8, strict). Anything else (a single-connection client, a
    subclass such as fakeredis, a test double) keeps ``execute_command``."""
    if type(client) is not redis.Redis or getattr(client, "connection", None) is not None:
        return False
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, redis.ConnectionPool):
        return False
    kwargs = pool.connection_kwargs
    return (
        kwargs.get("encoding", "utf-8").lower().replace("_", "-") in ("utf-8", "utf8")
        and kwargs.get("encoding_errors", "strict") == "strict"
    )


#: Bumped in a forked child: a connection a thread kept before the fork is its parent's.
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)


class _Kept:
    """One thread's connection, out of the pool until the thread ends or its
    :class:`PinnedCalls` goes away: then it goes back (not in a forked child, whose copy is
    the parent's socket; the child's pool starts afresh anyway)."""

    __slots__ = ("pool", "conn", "generation")

    def __init__(self, pool: redis.ConnectionPool, conn: Any) -> None:
        self.pool, self.conn, self.generation = pool, conn, _generation

    def __del__(self) -> None:
        if self.generation == _generation:
            try:
                self.pool.release(self.conn)
            except Exception:  # noqa: BLE001 - at thread or interpreter exit: nothing to tell
                pass


class PinnedCalls:
    """Packed commands sent by each thread on a connection it keeps from the client's pool,
    instead of taking one from the pool and giving it back per call: redis-py's
    ``get_connection`` and ``release`` (lock, bookkeeping, observability hooks, an event) cost
    ~20 us of client CPU per call here, as much as the engine's own Python for an allocate.
    Holding a pool connection across commands is what redis-py's own single-connection
    client, pipelines and pub/sub do. Each call first checks the connection as the pool
    checks one it hands out (``can_read``: a connection Redis closed, by a restart or CLIENT
    KILL, is replaced, not failed); errors raise what ``execute_command`` raises, a reply
    error raises ResponseError, and the connection's retry applies. A client has at most one
    kept connection per thread that called it, besides those its other commands take."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self._local = threading.local()

    def call(self, payload: bytes) -> Any:
        """Send one command already packed (``payload``: a whole RESP array, sent in one
        ``sendall``) and read its reply."""
        kept = getattr(self._local, "kept", None)
        if kept is None or kept.generation != _generation:
            # (taken first: when that fails there is no half-made _Kept to give back)
            kept = self._local.kept = _Kept(self.pool, self.pool.get_connection())
        conn = kept.conn
        if conn.is_connected:  # (one that is not connects as it sends)
            try:
                if conn.can_read():  # a reply nobody read: not ours to hand on
                    raise redis.ConnectionError("connection has unread data")
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                conn.disconnect()  # closed by Redis, or dirty: the send connects afresh

        def once():
            conn.send_packed_command((payload,))
            return conn.read_response()

        return conn.retry.call_with_retry(once, lambda _error: conn.disconnect())


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
