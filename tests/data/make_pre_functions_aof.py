"""Writes tests/data/pre_functions/: the AOF of a small state written by the engine before it
moved to a Redis Functions library (main at 07afee6, per-call EVALSHA scripts).

Kept for the record of how the data was made; it was run once with that commit's code:
``.venv/bin/python tests/data/make_pre_functions_aof.py``. test_upgrade_data.py loads the
result with today's engine. The clock is injected (T0), so the test can continue from it.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from app import settings as settings_mod  # noqa: E402
from app.embedded_redis import find_binary  # noqa: E402
from app.engine import Engine  # noqa: E402

T0 = 1_800_000_000.0
OUT = Path(__file__).with_name("pre_functions")


def gpus(n):
    return [
        {
            "index": i,
            "uuid": f"GPU-{i}",
            "name": "A100",
            "memory_total_mb": 81920,
            "memory_used_mb": 0,
            "utilization": 0,
            "temperature": 40,
            "power_draw": 100,
            "health": "ok",
        }
        for i in range(n)
    ]


def main():
    tmp = Path(tempfile.mkdtemp())
    port = 6399
    proc = subprocess.Popen(
        [
            find_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(tmp),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--aof-use-rdb-preamble",
            "no",
            "--appendfsync",
            "always",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, decode_responses=True)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    settings = settings_mod.defaults().replace(redis={"url": f"redis://127.0.0.1:{port}/0"})
    engine = Engine(client, settings, clock=lambda: T0)
    engine.report_node("a", gpus(2))
    a = engine.allocate(
        {"service_name": "train", "required_gpus": 1, "priority": 5, "ttl_seconds": 3600},
        idempotency_key="k-alloc",
    )
    b = engine.allocate(
        {"service_name": "infer", "required_gpus": 1, "priority": 5, "ttl_seconds": 3600}
    )
    q = engine.allocate(
        {
            "service_name": "big",
            "required_gpus": 2,
            "priority": 7,
            "ttl_seconds": 3600,
            "queue_timeout_seconds": 3600,
        },
        idempotency_key="k-queue",
    )
    assert (a["status"], b["status"], q["status"]) == ("allocated", "allocated", "queued"), q
    client.bgrewriteaof()
    time.sleep(1.5)
    proc.terminate()
    proc.wait(10)
    if OUT.exists():
        shutil.rmtree(OUT)
    shutil.copytree(tmp / "appendonlydir", OUT / "appendonlydir")
    (OUT / "ids.txt").write_text(f"{a['id']}\n{b['id']}\n{q['id']}\n")
    print(a["id"], b["id"], q["id"])


if __name__ == "__main__":
    main()
