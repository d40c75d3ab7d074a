"""The embedded redis-server: starts, persists through AOF across restarts, stops, is reused."""
from __future__ import annotations

import socket

import pytest
import redis as redis_lib

from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError, find_binary
from tests.conftest import free_port


def test_binary_is_found():
    assert find_binary().endswith("redis-server")


def test_persists_a_key_across_stop_and_start(tmp_path):
    port = free_port()
    first = EmbeddedRedis(str(tmp_path / "data"), port=port)
    url = first.start()
    client = redis_lib.Redis.from_url(url)
    client.set("gpu:lease", "node-a:3")
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "everysec"
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    client.close()
    first.stop()
    assert first.proc.poll() is not None  # really gone
    with pytest.raises(redis_lib.ConnectionError):
        redis_lib.Redis(port=port, socket_connect_timeout=0.5).ping()

    second = EmbeddedRedis(str(tmp_path / "data"), port=port)
    client = redis_lib.Redis.from_url(second.start())
    assert client.get("gpu:lease") == b"node-a:3"
    client.close()
    second.stop()
    assert (tmp_path / "data" / "appendonly.aof").exists()


def test_second_start_reuses_the_running_server(tmp_path):
    port = free_port()
    owner = EmbeddedRedis(str(tmp_path / "d"), port=port)
    owner.start()
    try:
        guest = EmbeddedRedis(str(tmp_path / "d"), port=port)
        assert guest.start() == owner.url
        assert guest.owned is False
        guest.stop()  # a guest never stops the owner's server
        assert redis_lib.Redis(port=port).ping()
    finally:
        owner.stop()


def test_port_taken_by_something_else_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(EmbeddedRedisError, match="taken by another process"):
            EmbeddedRedis(str(tmp_path / "x"), port=port).start(timeout=2)


def test_other_data_dir_on_same_port_is_refused(tmp_path):
    port = free_port()
    owner = EmbeddedRedis(str(tmp_path / "one"), port=port)
    owner.start()
    try:
        with pytest.raises(EmbeddedRedisError, match="taken by another process"):
            EmbeddedRedis(str(tmp_path / "two"), port=port).start(timeout=2)
    finally:
        owner.stop()
