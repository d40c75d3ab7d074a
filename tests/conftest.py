"""Shared fixtures: a real redis-server for the session, fresh state for every test."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis as redis_lib

from app import settings as settings_mod
from app.embedded_redis import find_binary
from app.engine import Engine
from tests.engine_support import Clock

ROOT = Path(__file__).resolve().parent.parent
#: Folders a test run must not leave in the checkout: schemathesis keeps its cache and crash
#: files in .schemathesis/ under the working directory (issue 12 saw one after `dev.py test`).
STRAY_FOLDERS = (".schemathesis",)
_stray_before = pytest.StashKey[set]()


def pytest_sessionstart(session):
    session.stash[_stray_before] = {name for name in STRAY_FOLDERS if (ROOT / name).exists()}


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when it left a stray folder behind, naming it (it was not there before)."""
    before = session.stash.get(_stray_before, set())
    left = [name for name in STRAY_FOLDERS if (ROOT / name).exists() and name not in before]
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"ERROR: the test run left {', '.join(left)} in {ROOT}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: ``webhooks.allowed_hosts`` for tests: loopback receivers, explicitly (the default denies them).
LOOPBACK = ["127.0.0.0/8", "::1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence, for tests."""

    def __init__(self, tmp_dir, *extra_args: str):
        self.port = free_port()
        self.dir = tmp_dir
        self.args = [
            find_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(tmp_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            *extra_args,
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis_lib.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's real Redis, emptied before each test."""
    client = redis_lib.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis(redis_url):
    """A decoded client on the real Redis (Lua, persistence and concurrency tests)."""
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def fake_redis():
    """fakeredis for fast unit tests that do not depend on Lua fidelity."""
    import fakeredis

    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def settings(redis_url) -> settings_mod.Settings:
    """Defaults pointed at the test Redis, under a key prefix unique to the test; webhooks may
    go to loopback receivers only (tests send traffic nowhere else)."""
    prefix = "{gpuo-" + uuid.uuid4().hex[:8] + "}"
    return settings_mod.defaults().replace(
        redis={"url": redis_url, "prefix": prefix}, webhooks={"allowed_hosts": LOOPBACK}
    )


@pytest.fixture
def clock():
    """The engine's injected clock: tests move time instead of sleeping."""
    return Clock()


@pytest.fixture
def make_engine(redis, settings, clock):
    """An engine on the test Redis and clock; ``tenants``: a tenants section (issue 14), the
    rest: scheduler settings. A test module may define its own."""

    def make(tenants=None, **scheduler) -> Engine:
        st = settings.replace(scheduler=scheduler) if scheduler else settings
        if tenants is not None:
            st = st.replace(tenants=tenants)
        return Engine(redis, st, clock=clock)

    return make


@pytest.fixture
def engine(make_engine):
    return make_engine()


@pytest.fixture
def write_config(tmp_path):
    """Write YAML text to a file and return its path."""

    def write(text: str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write
