"""redis-server instructions per engine call, counted by callgrind: prints ONE JSON object.

    .venv/bin/python bench/callgrind.py [--calls 200] [--gpus 1024] [--profile PATH] [--passes]

Starts the embedded server binary under ``valgrind --tool=callgrind`` with instrumentation off,
registers a fleet (nodes of 8 GPUs), warms up, then counts the instructions the server executes
for ``--calls`` allocate+release cycles (instrumentation switched on and off around them with
callgrind_control), counting only the work of the clients' commands (not the server's timer,
whose share grew with valgrind's wall time). Unlike wall-clock figures on a shared VM, the count
repeats within ~0.3 % whatever the load, so it judges a change to the engine against the code
before it. ``--passes`` adds the schedule passes on 1,024 GPUs with 3,000 queued (as
bench/engine.py sets them up with 10,000): ``pass_grant_1000_instructions``, the release whose
pass grants 1,000, and ``pass_walk_x5_instructions``, five passes that walk a queue nothing
fits. Needs valgrind.
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
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from app import settings as settings_mod  # noqa: E402
from app.embedded_redis import find_binary  # noqa: E402
from app.engine import Engine  # noqa: E402
from bench.engine import fleet, free_port, gated_queue  # noqa: E402


def control(proc: subprocess.Popen, *args: str) -> None:
    """``callgrind_control`` on the running server (``-d``: dump the counts so far)."""
    subprocess.run(["callgrind_control", *args, str(proc.pid)], check=True, capture_output=True)


def counting(proc: subprocess.Popen, on: bool) -> None:
    """Switch callgrind's instrumentation on or off in the running server."""
    control(proc, "-i", "on" if on else "off")


def count_passes(proc: subprocess.Popen, client, out_file: Path) -> dict:
    """The passes' instructions, each counted alone (a dump between them)."""
    settings = settings_mod.defaults().replace(
        redis={"prefix": "{cgp}"},
        scheduler={
            "max_queue_size": 20000,
            "max_queued_per_owner": 20000,
            "node_heartbeat_timeout": 600,
        },
    )
    out = {}

    def measure(name: str, fn) -> None:
        control(proc, "-d")
        before = dumped(out_file)
        counting(proc, True)
        fn()
        counting(proc, False)
        control(proc, "-d")
        out[name] = dumped(out_file) - before

    # a queue nothing fits: every GPU 90 % busy, the queued requests accept at most 50 %
    client.flushall()
    engine = Engine(client, settings)
    fleet(engine, 1024, util=90)
    for _ in range(127):
        engine.allocate({"service_name": "hold", "required_gpus": 8})
    for _ in range(3000):
        engine.allocate({"service_name": "wait", "required_gpus": 1, "max_utilization": 50})
    measure("pass_walk_x5_instructions", lambda: [engine.schedule_pass() for _ in range(5)])
    # a release whose pass grants 1,000: every queued request waits on the gate allocation
    client.flushall()
    engine = Engine(client, settings)
    gate = gated_queue(engine, 3000)
    measure("pass_grant_1000_instructions", lambda: engine.release(gate))
    assert 3000 - engine.counts()["queue_depth"] == 1000
    return out


def dumped(out_file: Path) -> int:
    """The totals of every profile part callgrind wrote so far (the base file and its dumps)."""
    return sum(
        int(m)
        for f in out_file.parent.glob(out_file.name + "*")
        for m in re.findall(r"^totals: (\d+)", f.read_text(errors="replace"), re.M)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument(
        "--profile", metavar="PATH", help="keep the callgrind profile there (callgrind_annotate)"
    )
    ap.add_argument("--passes", action="store_true", help="also count the schedule passes")
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
    # no retries: a pass runs for minutes under valgrind, and a retried release would find
    # its allocation ended by the first try
    client = redis_lib.Redis(
        port=port, decode_responses=True, retry=Retry(NoBackoff(), 0), socket_timeout=None
    )
    passes: dict = {}
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
        # under valgrind a pass granting 1,000 runs for seconds: no BUSY answer meanwhile; and
        # no SLOWLOG: under valgrind on a loaded machine many calls pass its 10 ms, and each
        # entry copies the call's ~30 arguments (counted with the call: main's count went from
        # 713k on a quiet machine to 772k on a loaded one)
        client.config_set("busy-reply-threshold", 600000)
        client.config_set("slowlog-log-slower-than", -1)
        # nodes stay live through a slow run: under valgrind on a loaded machine 400 cycles
        # can outlast the default 30 s heartbeat timeout, and placement then walks dead nodes
        # (counts of the same code differed by up to 3 %)
        engine = Engine(
            client,
            settings_mod.defaults().replace(
                redis={"prefix": "{cg}"}, scheduler={"node_heartbeat_timeout": 600}
            ),
        )
        fleet(engine, opts.gpus)
        req = {"service_name": "bench", "required_gpus": 1, "priority": 5}
        for _ in range(20):
            engine.release(engine.allocate(req)["id"])
        counting(proc, True)
        for _ in range(opts.calls):
            engine.release(engine.allocate(req)["id"])
        counting(proc, False)
        if opts.passes:
            passes = count_passes(proc, client, out_file)
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
    if opts.profile:
        shutil.copy(out_file, opts.profile)
    total = dumped(out_file) - sum(passes.values())
    print(
        json.dumps(
            {
                "server": server.get("server_name", "redis")
                + " "
                + server.get("valkey_version", server["redis_version"]),
                "gpus": opts.gpus,
                "calls": opts.calls,
                "alloc_release_instructions": round(total / opts.calls),
                **passes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
