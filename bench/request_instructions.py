"""Instructions the API's Python spends per request, counted by callgrind: prints ONE JSON object.

    .venv/bin/python bench/request_instructions.py [--requests 300]

The Flask app is called as WSGI in one thread (no HTTP server), on the embedded Redis with a
fleet of 8 nodes x 8 GPUs: ``--requests`` ``GET /healthz`` (the no-op route), then as many
``POST /gpu/allocate`` + ``POST /gpu/release`` pairs, the body bench/http.py sends. The process
runs under ``valgrind --tool=callgrind`` with instrumentation off until the warm-up is done;
each phase is counted apart (``callgrind_control``). Only this process's user-space
instructions count: not the kernel, not redis-server, not the HTTP worker. Unlike CPU time on
a shared VM the count barely moves with the load (``PYTHONHASHSEED=0``: within ~0.2 %), so it
judges a change to the request path against the code before it. Needs valgrind.

Keys: ``noop_instructions``, ``alloc_release_instructions`` (per request: a pair counts as
two) and ``ratio`` (the first over the second: bench/http.py's ``cpu_ratio`` for the API's
Python alone).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, sys.path[0] is bench/, whose http.py shadows the stdlib's (werkzeug imports it).
if __name__ == "__main__":
    sys.path[0] = str(ROOT)
BODY = {
    "service_name": "bench-1",
    "workload_type": "inference",
    "workload_data": {"model_size": "small"},
}


def _environ(method: str, path: str, body: bytes = b"") -> dict:
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "REMOTE_ADDR": "127.0.0.1",
    }
    if body:
        env.update(CONTENT_TYPE="application/json", CONTENT_LENGTH=str(len(body)))
    return env


def _counted(requests: int) -> None:
    """The process callgrind runs: warm up, then count each phase (dumps named noop, pair)."""
    from app import create_app
    from app import settings as settings_mod
    from app.embedded_redis import EmbeddedRedis
    from bench.engine import free_port
    from workers.simulated import fleet

    tmp = tempfile.mkdtemp(prefix="gpuo-instr-")
    redis = EmbeddedRedis(os.path.join(tmp, "redis"), port=free_port())
    url = redis.start()
    try:
        settings = settings_mod.defaults().replace(
            redis={"url": url, "prefix": "{gpuo-bench}"},
            scheduler={"node_heartbeat_timeout": 3600, "node_forget_after": 0},
            dashboard={"enabled": False},
        )
        app = create_app(settings, redis_url=url)
        engine = app.extensions["gpu_engine"]
        spec = {"nodes": [{"name": f"bench-node-{i}", "count": 8} for i in range(8)]}
        for node, gpus in fleet(spec).items():
            engine.report_node(node, gpus)
        status = []

        def call(method: str, path: str, body: bytes = b"") -> bytes:
            out = app(_environ(method, path, body), lambda s, h, e=None: status.append(s))
            data = b"".join(out)
            getattr(out, "close", lambda: None)()
            return data

        alloc = json.dumps(BODY).encode()

        def pair() -> None:
            rid = json.loads(call("POST", "/gpu/allocate", alloc))["id"]
            call("POST", "/gpu/release", json.dumps({"allocation_id": rid}).encode())

        def noop() -> None:
            call("GET", "/healthz")

        for _ in range(50):
            pair()
            noop()
        del status[:]
        pid = str(os.getpid())

        def ctl(*args: str) -> None:
            subprocess.run(["callgrind_control", *args, pid], check=True, capture_output=True)

        ctl("-i", "on")
        ctl("-z")
        for _ in range(requests):
            noop()
        ctl("-d", "noop")
        for _ in range(requests):
            pair()
        ctl("-d", "pair")
        ctl("-i", "off")
        bad = [s for s in status if not s.startswith("200")]
        if bad:
            raise SystemExit(f"requests failed: {sorted(set(bad))}")
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(out_dir: str, label: str) -> int:
    for path in Path(out_dir).glob("cg.*"):
        text = path.read_text(errors="replace")
        if f"Trigger: dump {label}\n" in text:
            for line in text.splitlines():
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise SystemExit(f"no callgrind dump named {label!r} in {out_dir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.counted:
        _counted(args.requests)
        return
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("needs valgrind (callgrind) on PATH")
    out = tempfile.mkdtemp(prefix="gpuo-instr-cg-")
    try:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}/cg.%p",
                sys.executable,
                str(Path(__file__).resolve()),
                "--counted",
                "--requests",
                str(args.requests),
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONHASHSEED="0"),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        noop = _summary(out, "noop") / args.requests
        pair = _summary(out, "pair") / (2 * args.requests)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "requests": args.requests,
                "noop_instructions": round(noop),
                "alloc_release_instructions": round(pair),
                "ratio": round(noop / pair, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
