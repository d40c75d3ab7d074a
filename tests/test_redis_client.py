"""app.redis_client: the pool keeps redis-py's guarantees that users notice."""

from __future__ import annotations

import pytest
import redis as redis_lib

from app.redis_client import connect


@pytest.mark.parametrize("decode", [True, False])
def test_a_connection_redis_closed_is_replaced_before_the_next_command(redis_url, decode):
    """After a Redis restart every pooled connection is dead; the next command must still work
    (redis-py's own pool checks each connection before use)."""
    client = connect(redis_url, decode=decode)
    admin = redis_lib.Redis.from_url(redis_url)
    try:
        assert type(client.connection_pool) is redis_lib.ConnectionPool  # the stock pool
        client.set("k", "v")
        name = "lean-pool-test"
        client.client_setname(name)
        killed = [c for c in admin.client_list() if c.get("name") == name]
        assert killed
        for c in killed:
            admin.client_kill_filter(_id=c["id"])
        assert client.get("k") in ("v", b"v")  # no ConnectionError
    finally:
        client.close()
        admin.close()


def test_close_closes_the_pool(redis_url):
    client = connect(redis_url)
    client.ping()
    pool = client.connection_pool
    client.close()
    assert all(c._sock is None for c in pool._available_connections)


# ------------------------------------------------------------ the engine's packed FCALLs


@pytest.mark.parametrize(
    "name, args",
    [
        ("counts", [""]),
        ("release", ["1800000000.25", "svc-1-2", "team-a", "1"]),
        ("allocate", ["", "svc-9", "", "service_name", "svc é ✓", "priority", 7, "x", 2.5]),
    ],
)
def test_a_packed_fcall_is_byte_for_byte_what_redis_py_would_send(settings, name, args):
    """The engine packs each FCALL's fixed part once; the bytes on the wire must be exactly
    redis-py's own packing of the same command (str as UTF-8, numbers by repr)."""
    from app.engine import Engine

    client = connect(settings.redis.url, settings)
    try:
        engine = Engine(client, settings)
        conn = client.connection_pool.make_connection()
        expected = b"".join(conn.pack_command(*engine._command(name, args)))
        assert engine._packed(name, args) == expected
        assert engine._packed(name, args) == expected  # from the cached head
        # new settings: the fixed part is packed again
        other = settings.replace(scheduler={"max_queue_size": 77})
        engine.settings = other
        expected = b"".join(conn.pack_command(*engine._command(name, args)))
        assert engine._packed(name, args) == expected
    finally:
        client.close()


@pytest.mark.parametrize("hiredis", [True, False])
def test_a_packed_call_refuses_what_redis_py_refuses(monkeypatch, hiredis):
    """With hiredis (packed by it, as redis-py does) and without (redis-py's Encoder rules):
    the same bytes, and a DataError for what redis-py refuses."""
    from redis.exceptions import DataError

    from app import redis_client

    if not hiredis:
        monkeypatch.setattr(redis_client, "_hiredis_pack", None)
    else:
        assert redis_client._hiredis_pack is not None
    with pytest.raises(DataError):
        redis_client.bulk(["a", True])
    with pytest.raises(DataError):
        redis_client.bulk([None])
    assert redis_client.bulk([]) == b""
    assert redis_client.bulk(["é", b"\x00", 3, 0.5, 10**20]) == (
        b"$2\r\n\xc3\xa9\r\n$1\r\n\x00\r\n$1\r\n3\r\n$3\r\n0.5\r\n$21\r\n100000000000000000000\r\n"
    )


def test_engine_calls_survive_a_connection_redis_closed(settings):
    """The engine's packed calls take their connection from the pool like any command: one
    Redis closed (a restart, CLIENT KILL) is replaced before the next call, not failed."""
    from app.engine import Engine

    client = connect(settings.redis.url, settings)
    admin = redis_lib.Redis.from_url(settings.redis.url)
    try:
        engine = Engine(client, settings)
        assert engine._packs
        before = engine.counts()
        client.client_setname("packed-test")
        killed = [c for c in admin.client_list() if c.get("name") == "packed-test"]
        assert killed
        for c in killed:
            admin.client_kill_filter(_id=c["id"])
        assert engine.counts() == before  # no ConnectionError
    finally:
        client.close()
        admin.close()


def test_engine_errors_and_clients_it_does_not_pack_for(settings, fake_redis):
    """A reply error still raises (the library reloads on 'function not found'); a client
    that is not a plain redis.Redis on a redis-py pool (fakeredis, a single-connection
    client) keeps execute_command."""
    from app.engine import Engine
    from app.redis_client import call_packed, packs

    client = connect(settings.redis.url, settings)
    try:
        engine = Engine(client, settings)
        engine.counts()
        client.execute_command("FUNCTION", "FLUSH")  # as after a restart without persistence
        assert engine.counts()["gpus_total"] == 0  # loaded again, then called again
        with pytest.raises(redis_lib.ResponseError):
            call_packed(client, b"*1\r\n$7\r\nNOSUCHC\r\n")
        assert client.ping()  # the connection went back clean
    finally:
        client.close()
    assert not packs(fake_redis)
    single = redis_lib.Redis.from_url(settings.redis.url, single_connection_client=True)
    try:
        assert not packs(single)
        assert Engine(single, settings).counts()["gpus_total"] == 0
    finally:
        single.close()
