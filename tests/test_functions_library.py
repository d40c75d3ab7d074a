"""The engine as one Redis Functions library: loading, reloading, read-only calls, the server
version it needs, and data written by the engine before it (tests/data/pre_functions)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib
from conftest import RedisServer
from test_engine import gpu_list, req

from app import create_app
from app.engine import LIBRARY, READ_ONLY, SCRIPTS, Engine, library_source

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).with_name("data") / "pre_functions"


@pytest.fixture
def engine(redis, settings):
    return Engine(redis, settings)


def test_the_library_is_loaded_once_with_every_function_and_read_only_flags(engine, redis):
    engine.report_node("a", gpu_list(1))
    (lib,) = redis.execute_command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY)
    lib = _pairs(lib)
    funcs = {_pairs(f)["name"]: _pairs(f)["flags"] for f in lib["functions"]}
    assert set(funcs) == {f"{LIBRARY}_{s}" for s in SCRIPTS} | {f"{LIBRARY}_version"}
    for name in SCRIPTS:
        assert ("no-writes" in funcs[f"{LIBRARY}_{name}"]) == (name in READ_ONLY)
    # the engine's calls are FCALL / FCALL_RO, never EVAL/EVALSHA
    redis.config_resetstat()
    engine.allocate(req())
    engine.counts()
    stats = redis.info("commandstats")
    assert "cmdstat_fcall" in stats and "cmdstat_fcall_ro" in stats
    assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats


def test_a_read_only_function_cannot_write(redis, settings):
    """no-writes is enforced by the server: what FCALL_RO serves can never change state."""
    engine = Engine(redis, settings)
    engine.report_node("a", gpu_list(1))
    version, source = library_source(
        (("probe", "redis.call('SET', K_META, 'x') return 1"),), name="roprobe"
    )
    source = source.replace("callback = f_probe}", "callback = f_probe, flags = {'no-writes'}}")
    redis.execute_command("FUNCTION", "LOAD", "REPLACE", source)
    try:
        with pytest.raises(redis_lib.ResponseError, match="(?i)write"):
            redis.execute_command(
                "FCALL_RO",
                "roprobe_probe",
                len(engine._fixed_keys),
                *engine._fixed_keys,
                *engine._settings_args(version, clocked=False),
            )
    finally:
        redis.execute_command("FUNCTION", "DELETE", "roprobe")


def test_the_library_is_reloaded_after_a_function_flush(engine, redis):
    engine.report_node("a", gpu_list(2))
    first = engine.allocate(req())
    redis.execute_command("FUNCTION", "FLUSH")  # as after a restart without persistence
    assert engine.allocate(req())["status"] == "allocated"
    assert engine.get(first["id"])["status"] == "allocated"
    assert redis.execute_command("FCALL_RO", f"{LIBRARY}_version", 0) == library_source()[0]


def test_another_version_on_the_server_is_replaced_and_the_call_retried(engine, redis):
    engine.report_node("a", gpu_list(1))
    _, source = library_source()
    old = source.replace(f"local VERSION = '{library_source()[0]}'", "local VERSION = 'older'")
    redis.execute_command("FUNCTION", "LOAD", "REPLACE", old)
    assert redis.execute_command("FCALL_RO", f"{LIBRARY}_version", 0) == "older"
    assert engine.allocate(req())["status"] == "allocated"
    assert redis.execute_command("FCALL_RO", f"{LIBRARY}_version", 0) == library_source()[0]


def test_two_prefixes_and_settings_share_one_library(redis, settings):
    """Keys and settings are arguments, not part of the library: engines of two deployments
    (prefixes, queue limits) on one server each keep their own state and rules."""
    a = Engine(redis, settings)
    b = Engine(
        redis,
        settings.replace(
            redis={"prefix": "{other}"}, scheduler={"max_queue_size": 1, "max_queued_per_owner": 1}
        ),
    )
    for engine in (a, b):
        engine.report_node("n", gpu_list(1))
        engine.allocate(req())
    a.allocate(req())
    a.allocate(req())  # a's queue takes both
    b.allocate(req())
    with pytest.raises(Exception, match="queue"):
        b.allocate(req(service="other"))
    assert a.counts()["queue_depth"] == 2 and b.counts()["queue_depth"] == 1
    assert len(redis.execute_command("FUNCTION", "LIST")) == 1


# ------------------------------------------------------------------ data from before the library

T0 = 1_800_000_000.0
#: When tests/data/make_pre_functions_aof.py wrote the data (the ids' timestamps say so). Redis
#: keeps a key's expiry as a wall-clock time (PEXPIREAT in the AOF), whatever clock the engine
#: was given: the idempotency keys (24 h) expired on 2026-12-01 21:53 UTC, and the replay
#: below failed from then on.
WRITTEN_MS = 1_796_075_591_000
_PEXPIREAT = re.compile(rb"(\$9\r\nPEXPIREAT\r\n\$\d+\r\n[^\r]*\r\n)\$\d+\r\n(\d+)\r\n")


def _shift_expiries(aof: Path, by_ms: int) -> None:
    """Move each PEXPIREAT of ``aof`` by ``by_ms``: its key expires as long after now as it
    did after the data was written."""

    def shifted(m: re.Match) -> bytes:
        at = b"%d" % (int(m.group(2)) + by_ms)
        return m.group(1) + b"$%d\r\n%s\r\n" % (len(at), at)

    text, n = _PEXPIREAT.subn(shifted, aof.read_bytes())
    assert n == 2, n  # the two idempotency keys
    aof.write_bytes(text)


@pytest.fixture
def upgraded(tmp_path):
    """A server started on the AOF that the EVALSHA engine (main 07afee6) wrote."""
    shutil.copytree(DATA / "appendonlydir", tmp_path / "appendonlydir")
    _shift_expiries(
        tmp_path / "appendonlydir" / "appendonly.aof.2.base.aof",
        int(time.time() * 1000) - WRITTEN_MS,
    )
    server = RedisServer(tmp_path, "--appendonly", "yes").start()
    client = redis_lib.Redis(port=server.port, decode_responses=True)
    yield server, client
    client.close()
    server.stop()


def test_allocations_queue_and_idempotency_keys_written_before_the_library_survive(
    upgraded, settings
):
    server, client = upgraded
    alloc, other, queued = (DATA / "ids.txt").read_text().split()
    assert client.execute_command("FUNCTION", "LIST") == []  # nothing loaded yet: old data
    now = [T0 + 10]
    engine = Engine(
        client,
        settings.replace(redis={"url": server.url, "prefix": "{gpuo}"}),
        clock=lambda: now[0],
    )
    assert engine.get(alloc)["status"] == "allocated"
    assert engine.get(queued)["status"] == "queued"
    assert engine.counts()["queue_depth"] == 1 and engine.counts()["allocations_active"] == 2
    # an idempotent retry replays the stored allocation and the stored queued request
    replay = engine.allocate(
        {"service_name": "train", "required_gpus": 1, "priority": 5, "ttl_seconds": 3600},
        idempotency_key="k-alloc",
    )
    assert replay["id"] == alloc
    replay = engine.allocate(
        {
            "service_name": "big",
            "required_gpus": 2,
            "priority": 7,
            "ttl_seconds": 3600,
            "queue_timeout_seconds": 3600,
        },
        idempotency_key="k-queue",
    )
    assert replay["id"] == queued
    # the queue still works: releasing both GPUs grants the queued request both of them
    engine.report_node("a", gpu_list(2))
    engine.release(alloc)
    engine.release(other)
    granted = engine.get(queued)
    assert granted["status"] == "allocated" and sorted(granted["gpu_ids"]) == [0, 1]
    assert engine.counts()["gpus_available"] == 0


# ------------------------------------------------------------------ an older server


class OldRedis:
    """A loopback stand-in for a Redis 6.2 server: answers INFO with its version, PING with
    PONG and anything else with OK (enough for a client to connect and ask)."""

    def __init__(self, info: str = "redis_version:6.2.14\r\nredis_mode:standalone\r\n"):
        self.info = info
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while True:
                    cmd, buf = _parse(buf)
                    if cmd is None:
                        break
                    name = cmd[0].upper()
                    if name == b"INFO":
                        body = ("# Server\r\n" + self.info).encode()
                        conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                    elif name == b"HELLO":  # as Redis 6.2 answers HELLO (RESP2 or 3)
                        proto = int(cmd[1]) if len(cmd) > 1 else 2
                        items = [
                            b"server",
                            b"redis",
                            b"version",
                            b"6.2.14",
                            b"proto",
                            proto,
                            b"id",
                            1,
                            b"mode",
                            b"standalone",
                            b"role",
                            b"master",
                        ]
                        out = b"%7\r\n" if proto == 3 else b"*14\r\n"
                        for item in items:
                            out += (
                                b":%d\r\n" % item
                                if isinstance(item, int)
                                else b"$%d\r\n%s\r\n" % (len(item), item)
                            )
                        conn.sendall(out + b"$7\r\nmodules\r\n*0\r\n")
                    elif name == b"PING":
                        conn.sendall(b"+PONG\r\n")
                    else:
                        conn.sendall(b"+OK\r\n")

    def close(self):
        self.sock.close()


def _parse(buf: bytes):
    """One RESP array command from buf: (parts, rest) or (None, buf) when incomplete."""
    if not buf.startswith(b"*") or b"\r\n" not in buf:
        return None, buf
    head, rest = buf.split(b"\r\n", 1)
    parts = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None, buf
        size, rest = rest.split(b"\r\n", 1)
        n = int(size[1:])
        if len(rest) < n + 2:
            return None, buf
        parts.append(rest[:n])
        rest = rest[n + 2 :]
    return parts, rest


@pytest.fixture
def old_redis():
    server = OldRedis()
    yield server
    server.close()


@pytest.mark.parametrize("role", ["api", "worker", "scheduler", "monitor"])
def test_every_role_exits_2_naming_the_version_on_an_older_server(old_redis, role):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPU_ORCH__") and k not in ("CONFIG_PATH", "PORT")
    }
    env["REDIS_URL"] = f"redis://127.0.0.1:{old_redis.port}/0"
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", role],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    # one line says it (a role may log what it did before it connected, e.g. its backend)
    lines = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "redis 6.2.14" in lines[0] and "Redis >= 7.0 or Valkey >= 7.2" in lines[0]


def test_readyz_names_the_version_on_an_older_server(old_redis, settings):
    url = f"redis://127.0.0.1:{old_redis.port}/0"
    app = create_app(
        settings.replace(redis={"url": url}, dashboard={"enabled": False}), redis_url=url
    )
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0
    message = resp.get_json()["error"]["message"]
    assert "redis 6.2.14" in message and "Redis >= 7.0 or Valkey >= 7.2" in message


def test_an_old_valkey_is_refused_and_a_new_one_accepted():
    from app.redis_client import version_problem

    class Fake:
        def __init__(self, info):
            self._info = info

        def info(self, section):
            return self._info

    assert "valkey 7.0.0" in version_problem(
        Fake({"server_name": "valkey", "valkey_version": "7.0.0", "redis_version": "7.0.0"})
    )
    assert (
        version_problem(
            Fake({"server_name": "valkey", "valkey_version": "7.2.5", "redis_version": "7.2.4"})
        )
        is None
    )
    assert version_problem(Fake({"redis_version": "7.0.15"})) is None
    assert "redis 6.2.14" in version_problem(Fake({"redis_version": "6.2.14"}))


def _pairs(flat):
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2]))
