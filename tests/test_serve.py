"""``gpu-orchestrator api``: gunicorn options from the config, and metrics across workers."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import serve
from app import settings as settings_mod
from app.embedded_redis import find_binary
from app.http_worker import BufferingWorker, Limits
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_gunicorn_options_come_from_server_settings():
    s = settings_mod.defaults().replace(
        server={
            "host": "127.0.0.1",
            "port": 9001,
            "workers": 3,
            "threads": 5,
            "write_timeout": "40s",
            "idle_timeout": "7s",
            "read_timeout": "12s",
            "header_timeout": "3s",
            "max_body_bytes": 2048,
        }
    )
    opts = serve.gunicorn_options(s)
    assert opts["bind"] == "127.0.0.1:9001"
    assert (opts["workers"], opts["threads"], opts["timeout"], opts["graceful_timeout"]) == (
        3,
        5,
        40,
        12,
    )
    assert issubclass(opts["worker_class"], BufferingWorker)
    assert opts["worker_class"].limits == Limits(
        header_timeout=3, idle_timeout=7, max_body_bytes=2048
    )
    assert opts["on_starting"] is serve.on_starting and opts["child_exit"] is serve.child_exit


def test_prepare_metrics_dir_wipes_stale_files_and_creates_one_when_unset(tmp_path):
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "keep.txt").write_text("not ours")
    env = {serve.MULTIPROC_ENV: str(tmp_path)}
    path, created = serve.prepare_metrics_dir(env)
    assert path == str(tmp_path) and not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]

    env = {}
    path, created = serve.prepare_metrics_dir(env)
    try:
        assert created and os.path.isdir(path) and env[serve.MULTIPROC_ENV] == path
        assert os.listdir(path) == [serve.OWNER_LOCK]
    finally:
        os.close(serve._owner_fd)
        serve._owner_fd = None
        shutil.rmtree(path)


def _claim_in_child(path) -> subprocess.Popen:
    """A process that claims ``path`` and lives until killed."""
    code = (
        "import sys, time; from app import serve; serve.claim_dir(sys.argv[1]); "
        "print('ok', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ok"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_only_metrics_dirs_whose_owners_are_dead_are_removed(tmp_path):
    dead, alive, unclaimed = (
        tmp_path / f"{serve.TEMP_PREFIX}{n}" for n in ("dead", "alive", "unclaimed")
    )
    for path in (dead, alive, unclaimed):
        path.mkdir()
    other = tmp_path / "something-else"
    other.mkdir()
    (other / serve.OWNER_LOCK).write_text("")
    holder = _claim_in_child(alive)
    killed = _claim_in_child(dead)
    _kill(killed)
    try:
        assert serve.remove_stale_metrics_dirs(str(tmp_path)) == [str(dead)]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [alive.name, unclaimed.name, other.name]
        )
    finally:
        _kill(holder)
    assert serve.remove_stale_metrics_dirs(str(tmp_path)) == [str(alive)]  # owner gone now


def _metrics_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(serve.TEMP_PREFIX + "*"))


@pytest.mark.slow
def test_a_killed_api_leaves_a_metrics_dir_that_the_next_start_removes(tmp_path, redis_url):
    """Regression: SIGKILL of the API master left its gpu-orchestrator-metrics-* directory in
    the temporary directory for good."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        "server:\n  workers: 2\n  threads: 1\n  host: 127.0.0.1\n"
        "dashboard:\n  enabled: false\nlogging:\n  level: WARNING\n"
    )
    env = {k: v for k, v in os.environ.items() if k != serve.MULTIPROC_ENV}
    env.update(
        REDIS_URL=redis_url,
        CONFIG_PATH=str(config),
        TMPDIR=str(tmpdir),
        GPU_ORCH__REDIS__PREFIX="{gpuo-serve}",
        PYTHONPATH=str(ROOT),
    )

    def start():
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api"],
            cwd=ROOT,
            env=dict(env, PORT=str(port)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while _try_get(port) != 200 or len(_children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "API did not come up"
            time.sleep(0.1)
        return proc

    first = start()
    try:
        workers = _children(first.pid)
        [left] = _metrics_dirs(tmpdir)
        first.kill()  # the master only; its workers notice and leave on their own
        first.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "workers outlived their master"
            time.sleep(0.1)
        assert left.exists()  # nobody could clean up
        second = start()
        try:
            dirs = _metrics_dirs(tmpdir)
            assert left not in dirs and len(dirs) == 1
        finally:
            _stop(second)
        assert _metrics_dirs(tmpdir) == []  # a clean stop removes its own
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_gunicorn_with_two_workers_counts_add_up(tmp_path, redis_url):
    """Real `gpu-orchestrator api`, 2 workers: every request is counted once, whichever worker
    served it, and whichever worker answers the scrape."""
    port = free_port()
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"from an earlier run")
    config = tmp_path / "config.yaml"
    config.write_text(
        "server:\n  workers: 2\n  threads: 2\n  host: 127.0.0.1\ndashboard:\n  enabled: false\n"
    )
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        PORT=str(port),
        CONFIG_PATH=str(config),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        GPU_ORCH__REDIS__PREFIX="{gpuo-serve}",
        GPU_ORCH__LOGGING__LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "gunicorn did not come up"
            time.sleep(0.1)
        assert not (metrics_dir / "counter_999999.db").exists()

        # Concurrent connections until both workers have served some (each worker writes its
        # own counter_<pid>.db); which worker accepts a connection is up to the kernel.
        n = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in range(25):
                statuses = list(pool.map(lambda _: _get(port, "/healthz")[0], range(40)))
                assert statuses == [200] * 40
                n += 40
                if len(list(metrics_dir.glob("counter_*.db"))) >= 2:
                    break
        assert len(list(metrics_dir.glob("counter_*.db"))) >= 2, "one worker served everything"

        for _ in range(4):  # every scrape, whichever worker answers, sees the same total
            status, body = _get(port, "/metrics")
            assert status == 200
            total = 0.0
            families = list(text_string_to_metric_families(body.decode()))
            names = {f.name for f in families}
            # The Redis collector reaches the output in multiprocess mode too (the known trap).
            assert {
                "gpu_orchestrator_queue_depth",
                "gpu_orchestrator_gpus_total",
                "gpu_orchestrator_allocations_active",
            } <= names
            for family in families:
                for sample in family.samples:
                    if (
                        sample.name == "gpu_orchestrator_http_requests_total"
                        and sample.labels.get("route") == "/healthz"
                    ):
                        total += sample.value
            assert total == n + 1  # + the readiness probe above
    finally:
        _stop(proc)


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_a_worker_exiting_does_not_stop_the_embedded_redis(tmp_path):
    """Regression: gunicorn workers unwind through the master's frames when they exit, so a
    cleanup in ``finally`` must run only in the master (it used to stop the embedded Redis)."""
    port, redis_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"server:\n  workers: 2\n  threads: 1\n  host: 127.0.0.1\n"
        f"redis:\n  data_dir: {tmp_path / 'redis'}\n  embedded_port: {redis_port}\n"
        "dashboard:\n  enabled: false\nlogging:\n  level: WARNING\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    env.update(PORT=str(port), CONFIG_PATH=str(config), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(port, "/readyz")[0] == 200 and len(_children(proc.pid)) >= 2:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "API did not come up"
            time.sleep(0.1)
        server = Path(find_binary()).name  # the embedded redis-server or valkey-server
        gunicorn_workers = [
            p for p in _children(proc.pid) if server not in Path(f"/proc/{p}/cmdline").read_text()
        ]
        os.kill(gunicorn_workers[0], signal.SIGTERM)  # a graceful worker exit
        time.sleep(1.0)
        for _ in range(5):
            assert _get(port, "/readyz")[0] == 200
    finally:
        _stop(proc)
    # The master stopped the embedded Redis on its way out.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", redis_port), timeout=0.5):
                time.sleep(0.2)
        except OSError:
            break
    else:
        pytest.fail("embedded Redis still running after the API stopped")


# --------------------------------------------------------------------------- spreading


def _client_conns_per_worker(workers: list[int], port: int) -> list[int]:
    """Established connections to ``port`` held by each worker (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    counts = []
    for pid in workers:
        n = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        counts.append(n)
    return counts


@pytest.mark.slow
def test_a_burst_of_keep_alive_connections_spreads_over_the_workers(tmp_path, redis_url):
    """16 clients connecting at once (bench/http.py's load): when a worker took every
    connection that was waiting, one of two workers usually got nearly all of them (16/0, 15/1,
    14/2) and ran them on one core; each worker takes one connection per wake-up instead."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        "server:\n  workers: 2\n  threads: 2\n  host: 127.0.0.1\ndashboard:\n  enabled: false\n"
    )
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        PORT=str(port),
        CONFIG_PATH=str(config),
        GPU_ORCH__REDIS__PREFIX="{gpuo-serve}",
        GPU_ORCH__LOGGING__LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    env.pop(serve.MULTIPROC_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    conns = []
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 or _try_get(port) != 200:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "gunicorn did not come up"
            time.sleep(0.1)
        workers = _children(proc.pid)
        # Rounds of 16 connections at once (all connected before any request, as a burst of
        # clients does) until five rounds in a row spread; the first rounds may find the
        # second worker still loading the app.
        history = []
        for _ in range(30):
            conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
            for sock in conns:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            for sock in conns:
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            counts = _client_conns_per_worker(workers, port)
            for sock in conns:
                sock.close()
            conns = []
            assert sum(counts) == 16
            history.append(min(counts))
            if len(history) >= 5 and min(history[-5:]) >= 6:
                break
            time.sleep(0.2)  # the workers notice the closed connections
        assert len(history) >= 5 and min(history[-5:]) >= 6, history
    finally:
        for sock in conns:
            sock.close()
        _stop(proc)


def _stop(proc) -> None:
    """SIGTERM the server's process group; SIGKILL it if it has not left within 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _try_get(port: int) -> int | None:
    try:
        return _get(port, "/healthz")[0]
    except OSError:
        return None
