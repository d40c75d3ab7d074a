"""redis-server instructions per engine call, counted by callgrind: prints ONE JSON object.

    .venv/bin/python bench/callgrind.py [--calls 200] [--gpus 1024] [--profile PATH]

Starts the embedded server binary under ``valgrind --tool=callgrind`` with instrumentation off,
registers a fleet (nodes of 8 GPUs), warms up, then counts the instructions the server executes
for ``--calls`` allocate+release cycles (instrumentation switched on and off around them with
callgrind_control), counting only the work of the clients' commands (not the server's timer,
whose share grew with valgrind's wall time). Unlike wall-clock figures on a shared VM, the count
repeats within ~0.3 % whatever the load, so it judges a change to the engine against the code
before it. Needs valgrind.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose other benchmarks (http.py) shadow the
# stdlib. Imported (tests import bench.<name>), sys.path[0] is somebody else's: left alone.
if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import redis as redis_lib  # noqa: E402

from app import settings as settings_mod  # noqa: E402
from app.embedded_redis import find_binary  # noqa: E402
from app.engine import Engine  # noqa: E402
from bench.engine import fleet, free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument(
        "--profile", metavar="PATH", help="keep the callgrind profile there (callgrind_annotate)"
    )
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    port = free_port()
    out_file = tmp / "callgrind.out"
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            # count only the work of the client's commands (their parsing, the scripts, the
            # replies): the server's timer (serverCron, 10 times a second) runs more often the
            # slower valgrind makes the server, so counting it made runs of the same code
            # differ by up to 15 % with the load on the machine
            "--collect-atstart=no",
            "--toggle-collect=processInputBuffer",
            f"--callgrind-out-file={out_file}",
            find_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis_lib.Redis(port=port, decode_responses=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        server = client.info("server")
        engine = Engine(client, settings_mod.defaults().replace(redis={"prefix": "{cg}"}))
        fleet(engine, opts.gpus)
        req = {"service_name": "bench", "required_gpus": 1, "priority": 5}
        for _ in range(20):
            engine.release(engine.allocate(req)["id"])
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        for _ in range(opts.calls):
            engine.release(engine.allocate(req)["id"])
        subprocess.run(
            ["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True
        )
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
    text = out_file.read_text(errors="replace")
    if opts.profile:
        shutil.copy(out_file, opts.profile)
    total = int(re.search(r"^totals: (\d+)", text, re.M).group(1))
    print(
        json.dumps(
            {
                "server": server.get("server_name", "redis")
                + " "
                + server.get("valkey_version", server["redis_version"]),
                "gpus": opts.gpus,
                "calls": opts.calls,
                "alloc_release_instructions": round(total / opts.calls),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
