"""Graph-service outage benchmark: allocates with fresh workflow ids while the service hangs.

Starts a graph service on 127.0.0.1 that accepts every ``GET /workflow/<id>`` and never answers
(it holds the connection for 60 s), an embedded redis-server (temporary directory, free port)
with a simulated fleet (2 nodes x 8 GPUs), and ``python -m app.cli api`` (the default
``server.*`` settings: 2 workers x 4 threads; the default ``services.graph_service_timeout``
2 s, ``breaker_failures`` 3, ``breaker_cooldown`` 30 s) with ``GRAPH_SERVICE_URL`` pointing at
it. Then:

1. ``--clients`` (default 8) clients each send ``--allocates`` (default 5) allocates, one after
   another, each with a workflow id never used before (1 GPU; released at once);
2. meanwhile one bystander client sends allocates without a workflow id (released at once),
   in a loop, until the others are done.

Prints one JSON object: ``fresh_allocates``, ``fresh_total_s`` (wall time of step 1),
``fresh_p50_ms``/``fresh_p99_ms``, ``bystander_p50_ms``/``bystander_p99_ms``/``bystander_max_ms``
(``bystander_allocates`` of them), ``lookups_sent`` (requests the graph service got),
``errors`` (answers other than 200/202), plus the machine. Loopback only; about 15 s with the
breaker, about 35 s without.

    .venv/bin/python bench/graph_outage.py
    .venv/bin/python bench/graph_outage.py --api-root /path/to/older/checkout   # to compare
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path, and bench/http.py there
# shadows the standard library's ``http`` package; drop that entry before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_S = 60.0


class HangingGraph:
    """Accepts each lookup, counts it, and answers nothing until ``close``."""

    def __init__(self):
        self.sent = 0
        self.stop = threading.Event()
        graph = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                graph.sent += 1
                graph.stop.wait(HANG_S)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _allocate(conn: http.client.HTTPConnection, body: dict, errors: list[int]) -> float:
    """One allocate and its release; the allocate's seconds."""
    t0 = time.perf_counter()
    conn.request("POST", "/gpu/allocate", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = resp.read()
    took = time.perf_counter() - t0
    if resp.status not in (200, 202):
        errors.append(resp.status)
        return took
    release = json.dumps({"allocation_id": json.loads(answer)["id"]})
    conn.request("POST", "/gpu/release", release, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        errors.append(resp.status)
    return took


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)


def _run_clients(port: int, clients: int, allocates: int) -> dict:
    fresh: list[float] = []
    beside: list[float] = []
    errors: list[int] = []
    done = threading.Event()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in range(allocates):
            body = {
                "service_name": f"fresh-{n}",
                "required_gpus": 1,
                "workload_type": "inference",
                "workload_data": {"workflow_id": f"wf-{n}-{i}-{time.time_ns()}"},
            }
            fresh.append(_allocate(conn, body, errors))
        conn.close()

    def bystander() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"service_name": "bystander", "required_gpus": 1, "workload_type": "inference"}
        while not done.is_set():
            beside.append(_allocate(conn, body, errors))
            time.sleep(0.05)
        conn.close()

    side = threading.Thread(target=bystander)
    side.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - started
    done.set()
    side.join()
    return {
        "fresh_allocates": len(fresh),
        "fresh_total_s": round(total, 2),
        "fresh_p50_ms": _pct(fresh, 0.5),
        "fresh_p99_ms": _pct(fresh, 0.99),
        "bystander_allocates": len(beside),
        "bystander_p50_ms": _pct(beside, 0.5),
        "bystander_p99_ms": _pct(beside, 0.99),
        "bystander_max_ms": round(1000 * max(beside), 1),
        "errors": sorted(set(errors)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="clients with fresh workflow ids")
    parser.add_argument("--allocates", type=int, default=5, help="allocates per client")
    parser.add_argument("--api-root", default=ROOT, help="checkout whose API to run")
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    from app.embedded_redis import EmbeddedRedis
    from bench import http as bench_http  # bench.http: not the standard library's http

    tmp = tempfile.mkdtemp(prefix="gpuo-graph-outage-")
    redis = EmbeddedRedis(os.path.join(tmp, "redis"), port=bench_http.free_port())
    graph = HangingGraph()
    api = None
    try:
        redis_url = redis.start()
        prefix = "{gpuo-graph-outage}"
        bench_http._register_fleet(redis_url, prefix, 2, 8)
        api, port = bench_http.start_api(
            tmp, redis_url, prefix, args.api_root, GRAPH_SERVICE_URL=graph.url
        )
        result = _run_clients(port, args.clients, args.allocates)
        result.update(
            {
                "lookups_sent": graph.sent,
                "api_root": os.path.abspath(args.api_root),
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}",
            }
        )
        print(json.dumps(result, indent=2))
        return 0
    finally:
        bench_http.stop_api(api)
        graph.close()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
