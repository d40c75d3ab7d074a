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
    """The connection a thread keeps for the engine's packed calls is checked before each
    call as the pool checks one it hands out: one Redis closed (a restart, CLIENT KILL) is
    replaced before the next call, not failed."""
    from app.engine import Engine

    client = connect(settings.redis.url, settings)
    admin = redis_lib.Redis.from_url(settings.redis.url)
    try:
        engine = Engine(client, settings)
        assert engine._pinned is not None
        before = engine.counts()
        kept = engine._pinned.call(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n")  # its connection
        assert admin.client_kill_filter(_id=kept) == 1
        assert engine.counts() == before  # no ConnectionError
    finally:
        client.close()
        admin.close()


def _connections(admin, name: str) -> int:
    return sum(1 for c in admin.client_list() if c.get("name") == name)


def test_each_thread_keeps_one_connection_and_gives_it_back_when_it_ends(settings):
    """A thread's engine calls reuse one connection; a thread that ends gives it back to the
    pool, so threads that come and go do not open a connection each."""
    import gc
    import threading

    from app.engine import Engine

    # (named, so that other tests' connections to the same Redis do not count)
    client = redis_lib.Redis.from_url(
        settings.redis.url, decode_responses=True, client_name="pin-test"
    )
    admin = redis_lib.Redis.from_url(settings.redis.url)
    try:
        engine = Engine(client, settings)
        for _ in range(5):
            engine.counts()
        assert _connections(admin, "pin-test") == 1
        for _ in range(30):  # one after another: each can take the one the last gave back
            t = threading.Thread(target=engine.counts)
            t.start()
            t.join()
        assert _connections(admin, "pin-test") <= 2
        barrier = threading.Barrier(4)

        def together():
            barrier.wait()
            for _ in range(20):
                engine.counts()

        def four_at_once():
            threads = [threading.Thread(target=together) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        four_at_once()
        assert _connections(admin, "pin-test") <= 5  # four at once, plus this thread's
        # an engine that goes away gives back what its threads kept: the next one's four
        # threads take those instead of opening four more
        engine = None
        gc.collect()
        engine = Engine(client, settings)
        four_at_once()
        assert _connections(admin, "pin-test") <= 5
    finally:
        client.close()
        admin.close()


def test_a_forked_child_does_not_use_its_parents_connection(settings):
    """A process forked after the engine's first call (gunicorn's workers, RQ's work horse)
    gets its own connection: parent and child calling at the same time both get their own
    answers."""
    import os

    from app.engine import Engine
    from bench.engine import fleet

    client = connect(settings.redis.url, settings)
    try:
        engine = Engine(client, settings)
        fleet(engine, 8)
        engine.allocate({"service_name": "fork-test", "required_gpus": 1})

        # parent and child ask different questions, each an FCALL
        def held():
            return [(t["tenant"], t["gpus_held"]) for t in engine.tenants()]

        expected, tenants = engine.counts(), held()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: any wrong or failed answer exits non-zero
            code = 1
            try:
                os.write(ready_w, b"1")  # start together
                ok = all(held() == tenants for _ in range(1000))
                code = 0 if ok else 3
            finally:
                os._exit(code)
        os.read(ready_r, 1)
        answers = [engine.counts() for _ in range(1000)]
        _, status = os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
        assert os.waitstatus_to_exitcode(status) == 0
        assert all(a == expected for a in answers)
    finally:
        client.close()


def test_engine_errors_and_clients_it_does_not_pack_for(settings, fake_redis):
    """A reply error still raises (the library reloads on 'function not found'); a client
    that is not a plain redis.Redis on a redis-py pool (fakeredis, a single-connection
    client) keeps execute_command."""
    from app.engine import Engine
    from app.redis_client import PinnedCalls, packs

    client = connect(settings.redis.url, settings)
    try:
        engine = Engine(client, settings)
        engine.counts()
        client.execute_command("FUNCTION", "FLUSH")  # as after a restart without persistence
        assert engine.counts()["gpus_total"] == 0  # loaded again, then called again
        pinned = PinnedCalls(client)
        with pytest.raises(redis_lib.ResponseError):
            pinned.call(b"*1\r\n$7\r\nNOSUCHC\r\n")
        assert pinned.call(b"*1\r\n$4\r\nPING\r\n") == "PONG"  # the connection stays clean
    finally:
        client.close()
    assert not packs(fake_redis)
    single = redis_lib.Redis.from_url(settings.redis.url, single_connection_client=True)
    try:
        assert not packs(single)
        assert Engine(single, settings).counts()["gpus_total"] == 0
    finally:
        single.close()
