"""HTTP benchmark: the API under gunicorn, as ``gpu-orchestrator api`` runs it.

Starts an embedded redis-server (temporary directory, free port), registers a simulated fleet,
starts ``python -m app.cli api`` (gunicorn with the default ``server.*`` settings: 2 workers, 4
threads), then drives it from a separate client process with 16 concurrent keep-alive
connections:

1. a no-op route (``GET /healthz``: the full middleware stack, no Redis) for ``--noop-seconds``;
2. allocate then release (``POST /gpu/allocate``, ``POST /gpu/release``) on the same server for
   ``--alloc-seconds``;

alternating in ``--rounds`` short rounds, so drift in the machine's other load hits both.

Prints one JSON object: ``noop_rps``, ``noop_p50_ms``, ``noop_p99_ms``, ``alloc_release_rps``
(HTTP requests per second in the allocate+release loop), ``alloc_p50_ms``, ``alloc_p99_ms``,
``release_p50_ms``, ``release_p99_ms``, ``ratio`` (alloc_release_rps / noop_rps), errors and the
machine. Not a test; finishes in well under 2 minutes.

On Linux it also prints the server side's CPU time per request (the API's processes and
redis-server, from /proc): ``noop_cpu_us``, ``alloc_release_cpu_us`` and ``cpu_ratio``
(noop_cpu_us / alloc_release_cpu_us), and redis-server's part of each (``noop_redis_cpu_us``,
``alloc_release_redis_cpu_us``). On a machine shared with other work the wall-clock ratio
follows whatever else runs; the CPU a request costs barely moves.

    .venv/bin/python bench/http.py            # defaults: 16 clients, 10 s + 15 s
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path and its name shadows the
# standard library's ``http`` package; drop that entry before anything imports http.client.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- client side


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


def _request(method: str, path: str, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def _noop_client(port: int, deadline: float, lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = _request("GET", "/healthz")
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        writer.write(req)
        status, _ = await _read_response(reader)
        lat.append(time.perf_counter() - t0)
        if status != 200:
            errors.append(status)
    writer.close()


async def _alloc_client(
    port: int,
    n: int,
    deadline: float,
    alloc_lat: list[float],
    rel_lat: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    alloc = _request(
        "POST",
        "/gpu/allocate",
        json.dumps(
            {
                "service_name": f"bench-{n}",
                "workload_type": "inference",
                "workload_data": {"model_size": "small"},
            }
        ).encode(),
    )
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        writer.write(alloc)
        status, body = await _read_response(reader)
        alloc_lat.append(time.perf_counter() - t0)
        if status not in (200, 202):
            errors.append(status)
            continue
        rid = json.loads(body).get("id")
        release = _request("POST", "/gpu/release", json.dumps({"allocation_id": rid}).encode())
        t0 = time.perf_counter()
        writer.write(release)
        status, _ = await _read_response(reader)
        rel_lat.append(time.perf_counter() - t0)
        if status != 200:
            errors.append(status)
    writer.close()


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


def _cpu_seconds(pids: list[int]) -> float | None:
    """utime + stime of the processes and their children's threads (the API's gunicorn
    master, its workers, redis-server), from /proc; None where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, seen = 0, set()
    todo = list(pids)
    try:
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    except (OSError, ValueError, IndexError):
        return None
    return total / tick


async def _client_main(
    port: int,
    clients: int,
    noop_s: float,
    alloc_s: float,
    warmup_s: float,
    rounds: int,
    pids: list[int] | None = None,
) -> dict:
    # Warm-up: both routes, results discarded (imports, connection pools, script loading).
    sink: list[float] = []
    end = time.perf_counter() + warmup_s
    await asyncio.gather(
        *[_noop_client(port, end, sink, []) for _ in range(clients // 2)],
        *[_alloc_client(port, i, end, sink, sink, []) for i in range(clients // 2)],
    )

    # The two loads alternate in short rounds, so a change in the machine's other load (it is
    # shared) hits both about equally and the ratio stays meaningful.
    noop_lat: list[float] = []
    noop_err: list[int] = []
    alloc_lat: list[float] = []
    rel_lat: list[float] = []
    alloc_err: list[int] = []
    noop_wall = alloc_wall = 0.0
    noop_cpu = alloc_cpu = 0.0
    noop_redis = alloc_redis = 0.0
    cpu = (lambda: _cpu_seconds(pids)) if pids else (lambda: None)
    redis_cpu = (lambda: _cpu_seconds(pids[1:])) if pids and len(pids) > 1 else (lambda: None)
    for _ in range(rounds):
        r0, c0, t0 = redis_cpu(), cpu(), time.perf_counter()
        await asyncio.gather(
            *[_noop_client(port, t0 + noop_s / rounds, noop_lat, noop_err) for _ in range(clients)]
        )
        noop_wall += time.perf_counter() - t0
        r1, c1, t0 = redis_cpu(), cpu(), time.perf_counter()
        await asyncio.gather(
            *[
                _alloc_client(port, i, t0 + alloc_s / rounds, alloc_lat, rel_lat, alloc_err)
                for i in range(clients)
            ]
        )
        alloc_wall += time.perf_counter() - t0
        c2, r2 = cpu(), redis_cpu()
        if None not in (c0, c1, c2):
            noop_cpu += c1 - c0
            alloc_cpu += c2 - c1
        if None not in (r0, r1, r2):
            noop_redis += r1 - r0
            alloc_redis += r2 - r1

    noop_rps = len(noop_lat) / noop_wall
    alloc_rps = (len(alloc_lat) + len(rel_lat)) / alloc_wall
    n_alloc = len(alloc_lat) + len(rel_lat)
    cpu_figures = {}
    if noop_cpu and alloc_cpu and noop_lat and n_alloc:
        noop_us = noop_cpu / len(noop_lat) * 1e6
        alloc_us = alloc_cpu / n_alloc * 1e6
        cpu_figures = {
            "noop_cpu_us": round(noop_us, 1),
            "alloc_release_cpu_us": round(alloc_us, 1),
            "cpu_ratio": round(noop_us / alloc_us, 3),
        }
        if alloc_redis:
            cpu_figures["noop_redis_cpu_us"] = round(noop_redis / len(noop_lat) * 1e6, 1)
            cpu_figures["alloc_release_redis_cpu_us"] = round(alloc_redis / n_alloc * 1e6, 1)
    return {
        "clients": clients,
        "rounds": rounds,
        "noop_requests": len(noop_lat),
        "noop_rps": round(noop_rps, 1),
        "noop_p50_ms": round(_pct(noop_lat, 50), 2),
        "noop_p99_ms": round(_pct(noop_lat, 99), 2),
        "alloc_release_requests": len(alloc_lat) + len(rel_lat),
        "alloc_release_rps": round(alloc_rps, 1),
        "alloc_p50_ms": round(_pct(alloc_lat, 50), 2),
        "alloc_p99_ms": round(_pct(alloc_lat, 99), 2),
        "release_p50_ms": round(_pct(rel_lat, 50), 2),
        "release_p99_ms": round(_pct(rel_lat, 99), 2),
        "ratio": round(alloc_rps / noop_rps, 3) if noop_rps else 0.0,
        **cpu_figures,
        "errors": {
            "noop": len(noop_err),
            "alloc_release": len(alloc_err),
            "statuses": sorted(set(noop_err + alloc_err)),
        },
    }


# --------------------------------------------------------------------------- server side


def _register_fleet(redis_url: str, prefix: str, nodes: int, per_node: int) -> None:
    sys.path.insert(0, ROOT)
    from app import settings as settings_mod
    from app.engine import Engine
    from app.redis_client import connect
    from workers.simulated import fleet

    settings = settings_mod.defaults().replace(redis={"url": redis_url, "prefix": prefix})
    engine = Engine(connect(redis_url, settings), settings)
    spec = {"nodes": [{"name": f"bench-node-{i}", "count": per_node} for i in range(nodes)]}
    for node, gpus in fleet(spec).items():
        engine.report_node(node, gpus)


def _wait_http(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the API did not come up")


def start_api(
    tmp: str, redis_url: str, prefix: str, api_root: str = ROOT, **env: str
) -> tuple[subprocess.Popen, int]:
    """``gpu-orchestrator api`` of ``api_root`` in its own process group on a free loopback
    port, over the fleet :func:`_register_fleet` wrote under ``prefix``; ``env`` adds settings.
    One place for what every benchmark's API needs: the fleet is registered once, so it stays
    schedulable (heartbeat timeout 1 h, never forgotten: forgetting must come after the
    timeout, a config error otherwise). Its output goes to ``tmp``/api.log (a pipe would fill
    up and block), whose tail is printed when it does not come up."""
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        PORT=str(port),
        CONFIG_PATH=os.path.join(tmp, "none.yaml"),
        GPU_ORCH__REDIS__PREFIX=prefix,
        GPU_ORCH__SERVER__HOST="127.0.0.1",
        GPU_ORCH__SCHEDULER__NODE_HEARTBEAT_TIMEOUT="1h",
        GPU_ORCH__SCHEDULER__NODE_FORGET_AFTER="0",
        PYTHONPATH=api_root,
        **env,
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    open(env["CONFIG_PATH"], "w").close()
    log_path = os.path.join(tmp, "api.log")
    with open(log_path, "wb") as api_log:
        api = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api"],
            cwd=api_root,
            env=env,
            stdout=api_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(port)
    except RuntimeError:
        with open(log_path, errors="replace") as log:
            sys.stderr.write(log.read()[-3000:])
        stop_api(api)
        raise
    return api, port


def stop_api(api: subprocess.Popen | None) -> None:
    """Stop what :func:`start_api` started: SIGTERM to its group, SIGKILL after 20 s."""
    if api is not None and api.poll() is None:
        os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)


def _server_version(url: str) -> str:
    """The Redis/Valkey the run used, e.g. ``valkey 9.1.2``."""
    from app.redis_client import connect, server_version

    client = connect(url)
    try:
        return server_version(client)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--noop-seconds", type=float, default=10.0)
    parser.add_argument("--alloc-seconds", type=float, default=15.0)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternate the two loads this many times"
    )
    parser.add_argument("--nodes", type=int, default=8, help="simulated nodes of 8 GPUs")
    parser.add_argument(
        "--log-level", default="INFO", help="API log level (DEBUG adds one access line per request)"
    )
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--pids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:  # the load-generating child process
        result = asyncio.run(
            _client_main(
                args.client,
                args.clients,
                args.noop_seconds,
                args.alloc_seconds,
                args.warmup_seconds,
                max(1, args.rounds),
                [int(p) for p in args.pids.split(",") if p],
            )
        )
        print(json.dumps(result))
        return 0

    sys.path.insert(0, ROOT)
    from app.embedded_redis import EmbeddedRedis

    tmp = tempfile.mkdtemp(prefix="gpuo-bench-")
    redis = EmbeddedRedis(os.path.join(tmp, "redis"), port=free_port())
    api = None
    try:
        redis_url = redis.start()
        prefix = "{gpuo-bench}"
        _register_fleet(redis_url, prefix, args.nodes, 8)
        api, port = start_api(tmp, redis_url, prefix, GPU_ORCH__LOGGING__LEVEL=args.log_level)
        client = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--client",
                str(port),
                "--clients",
                str(args.clients),
                "--noop-seconds",
                str(args.noop_seconds),
                "--alloc-seconds",
                str(args.alloc_seconds),
                "--warmup-seconds",
                str(args.warmup_seconds),
                "--rounds",
                str(args.rounds),
                "--pids",
                f"{api.pid},{redis.proc.pid}",
            ],
            capture_output=True,
            text=True,
            timeout=150,
            check=True,
        )
        result = json.loads(client.stdout)
        result.update(
            {
                "gpus": args.nodes * 8,
                "server": _server_version(redis_url),
                "api_server": "gunicorn, app.http_worker.BufferingWorker, server.workers=2, "
                "server.threads=4 (defaults)",
                "api_log_level": args.log_level,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, {platform.system()}",
            }
        )
        print(json.dumps(result, indent=2))
        return 0
    finally:
        stop_api(api)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
