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
