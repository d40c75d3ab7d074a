"""What ``redis.min_replicas_ack`` costs: engine allocate + release with and without WAIT.

Starts a primary and one replica on loopback (the embedded server's binary, temporary
directory, AOF on as in production), registers one 8-GPU node, then times ``--ops``
allocate + release pairs through :class:`app.engine.Engine` with ``min_replicas_ack`` 0 and 1,
alternating blocks so machine noise hits both alike. Prints one JSON object:
``ack0_us`` / ``ack1_us`` (median microseconds per allocate + release), ``ack1_vs_ack0`` (the
ratio), p99s, ``server`` and ``ops``. Not a test; a few seconds.

    .venv/bin/python bench/replica_ack.py [--ops 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parent.parent)] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

import redis as redis_lib  # noqa: E402

from app import settings as settings_mod  # noqa: E402
from app.embedded_redis import find_binary  # noqa: E402
from app.engine import Engine  # noqa: E402
from app.redis_client import connect  # noqa: E402
from bench.sentinel_topology import free_port  # noqa: E402
from workers.simulated import fleet  # noqa: E402


def _server(binary: str, port: int, workdir: Path, *extra: str) -> subprocess.Popen:
    node = workdir / str(port)
    node.mkdir()
    return subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(node),
            "--save",
            "",
            "--appendonly",
            "yes",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _time_block(engine: Engine, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        rec = engine.allocate({"service_name": f"bench-{i}", "workload_type": "generic"})
        engine.release(rec["id"])
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000, help="allocate+release pairs per mode")
    args = parser.parse_args(argv)
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="gpuo-ack-") as tmp:
        primary, replica = free_port(), free_port()
        procs = [
            _server(binary, primary, Path(tmp)),
            _server(binary, replica, Path(tmp), "--replicaof", "127.0.0.1", str(primary)),
        ]
        try:
            probe = redis_lib.Redis(port=replica, socket_timeout=1)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if probe.info("replication").get("master_link_status") == "up":
                        break
                except redis_lib.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the replica did not sync")
                time.sleep(0.1)
            url = f"redis://127.0.0.1:{primary}/0"
            base = settings_mod.defaults().replace(redis={"url": url})
            engines = {
                n: Engine(
                    connect(url, base.replace(redis={"min_replicas_ack": n})),
                    base.replace(redis={"min_replicas_ack": n}),
                )
                for n in (0, 1)
            }
            for node, gpus in fleet({"nodes": [{"name": "bench", "count": 8}]}).items():
                engines[0].report_node(node, gpus)
            times: dict[int, list[float]] = {0: [], 1: []}
            block = max(1, args.ops // 10)
            for n in (0, 1):
                _time_block(engines[n], 50)  # warm up: scripts loaded, connections open
            for _ in range(10):
                for n in (0, 1):
                    times[n] += _time_block(engines[n], block)
            server = redis_lib.Redis(port=primary).info("server")
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)

    def p99(v):
        return sorted(v)[max(0, int(len(v) * 0.99) - 1)]

    med = {n: statistics.median(v) for n, v in times.items()}
    print(
        json.dumps(
            {
                "ack0_us": round(med[0], 1),
                "ack1_us": round(med[1], 1),
                "ack1_vs_ack0": round(med[1] / med[0], 2),
                "ack0_p99_us": round(p99(times[0]), 1),
                "ack1_p99_us": round(p99(times[1]), 1),
                "ops": len(times[0]),
                "server": f"{'valkey' if 'valkey_version' in server else 'redis'} "
                f"{server.get('valkey_version') or server.get('redis_version')}",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
