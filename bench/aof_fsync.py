"""What `appendfsync always` costs against the embedded server's `everysec`: prints ONE JSON
object (not a test).

    .venv/bin/python bench/aof_fsync.py [--cycles 300] [--rounds 5] [--dir DIR]

One embedded server (AOF on, data in ``--dir``, default a temporary directory under the current
one, so on the disk the service would use, not a tmpfs), a fleet of 8 GPUs, and one client
doing allocate+release cycles through the engine. The two settings alternate round by round
(``CONFIG SET appendfsync``), so a noisy machine moves both alike; each figure is the median over
the rounds of the mean time of one cycle. Every allocate and every release is one write that
``always`` fsyncs before it answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import redis as redis_lib  # noqa: E402

from app import settings as settings_mod  # noqa: E402
from app.embedded_redis import EmbeddedRedis  # noqa: E402
from app.engine import Engine  # noqa: E402
from bench.engine import fleet, free_port  # noqa: E402

MODES = ("everysec", "always")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=300, help="allocate+release cycles per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each setting, alternating")
    ap.add_argument("--dir", default=".", help="where the temporary data directory goes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="aof-fsync-", dir=args.dir) as data:
        server = EmbeddedRedis(data, port=free_port())
        url = server.start()
        try:
            client = redis_lib.Redis.from_url(url, decode_responses=True)
            settings = settings_mod.load(environ={"REDIS_URL": url})
            engine = Engine(client, settings)
            fleet(engine, 8)
            per_cycle = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    client.config_set("appendfsync", mode)
                    t0 = time.perf_counter()
                    for _ in range(args.cycles):
                        engine.release(engine.allocate({"service_name": "bench"})["id"])
                    per_cycle[mode].append((time.perf_counter() - t0) / args.cycles)
            client.close()
        finally:
            server.stop()
    ms = {mode: round(statistics.median(v) * 1e3, 3) for mode, v in per_cycle.items()}
    print(
        json.dumps(
            {
                "cycle_ms_everysec": ms["everysec"],
                "cycle_ms_always": ms["always"],
                "always_over_everysec": round(ms["always"] / ms["everysec"], 2),
                "cycles": args.cycles,
                "rounds": args.rounds,
                "data_dir_parent": str(Path(args.dir).resolve()),
            }
        )
    )


if __name__ == "__main__":
    main()
