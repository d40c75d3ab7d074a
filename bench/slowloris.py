"""Slow-client benchmark: other clients' latency while 1,000 slow connections are held.

Starts an embedded redis-server (temporary directory, free port), registers a simulated fleet
and starts ``python -m app.cli api`` (the default ``server.*`` settings: 2 workers, 4 threads,
``header_timeout`` 10 s) on 127.0.0.1, then, from a separate client process:

1. opens ``--held`` connections (default 1,000) and holds them: a third send nothing, a third
   send half a request head (``GET /healthz HTTP/1.1`` and one header line), a third send a
   whole head announcing a 1,000-byte body and then 10 bytes of it; a held connection the
   server closes is opened again, so the count stays up for the whole run;
2. meanwhile, for ``--seconds`` (default 8, under ``header_timeout`` so nothing is dropped for
   being slow while it is measured), 4 probe clients each open a fresh connection, send
   ``GET /healthz`` and read the answer, in a loop; a probe that takes over 5 s, fails to
   connect or gets anything but 200 counts as an error;
3. stops probing and waits (at most ``header_timeout`` + 5 s) for the server to close the held
   connections: ``slow_closed_by_server`` says how many it did.

Prints one JSON object: ``held_connections`` (the fewest held at any probe), ``probe_p50_ms``,
``probe_p99_ms``, ``probe_errors``, plus ``probes``, ``slow_closed_by_server`` and the
machine. Goal: p99 <= 100 ms and no errors. Loopback only; about 25 s.

    .venv/bin/python bench/slowloris.py
    .venv/bin/python bench/slowloris.py --api-root /path/to/older/checkout   # to compare
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path, and bench/http.py there
# shadows the standard library's ``http`` package; drop that entry before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TIMEOUT = 5.0
HEAD = b"GET /healthz HTTP/1.1\r\nHost: slowloris\r\n"
BODY_HEAD = (
    b"POST /gpu/allocate HTTP/1.1\r\nHost: slowloris\r\nContent-Type: application/json"
    b"\r\nContent-Length: 1000\r\n\r\n"
)
KINDS = ("silent", "partial_head", "partial_body")


# --------------------------------------------------------------------------- client side


class Holder:
    """Keeps ``n`` slow connections open, reopening any the server closes."""

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.open = 0
        self.closed_by_server = 0
        self.stop = False
        self.reopen = True
        self.writers: list[asyncio.StreamWriter] = []

    async def hold(self, kind: str) -> None:
        while not self.stop and self.reopen:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            self.writers.append(writer)
            if kind == "partial_head":
                writer.write(HEAD)
            elif kind == "partial_body":
                writer.write(BODY_HEAD + b"{" * 10)
            self.open += 1
            try:
                await reader.read()  # returns when the server closes the connection
            except OSError:
                pass
            self.open -= 1
            if not self.stop:
                self.closed_by_server += 1
            writer.close()

    async def drained(self, timeout: float) -> int:
        """Wait until the server has closed every held connection (or ``timeout``)."""
        before = self.closed_by_server
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.closed_by_server - before


async def _probe(
    port: int, deadline: float, lat: list[float], errors: list[str], held: list[int], holder: Holder
) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    while time.perf_counter() < deadline:
        held.append(holder.open)
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), PROBE_TIMEOUT
            )
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), PROBE_TIMEOUT)
            writer.close()
            if not answer.startswith(b"HTTP/1.1 200"):
                errors.append(answer[:12].decode(errors="replace") or "closed")
        except (TimeoutError, OSError) as exc:
            errors.append(type(exc).__name__)
        lat.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000, 2)


async def _client_main(port: int, held: int, seconds: float, header_timeout: float) -> dict:
    holder = Holder(port, held)
    tasks = [asyncio.create_task(holder.hold(KINDS[i % 3])) for i in range(held)]
    deadline = time.monotonic() + 30
    while holder.open < held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    opened_at = time.monotonic()
    lat: list[float] = []
    errors: list[str] = []
    counts: list[int] = []
    end = time.perf_counter() + seconds
    await asyncio.gather(*[_probe(port, end, lat, errors, counts, holder) for _ in range(4)])
    closed_while_probing = holder.closed_by_server
    # Nothing of the held connections was sent after opening; the server must drop them.
    wait = max(0.0, header_timeout + 5 - (time.monotonic() - opened_at))
    holder.reopen = False
    closed_after = await holder.drained(wait)
    holder.stop = True
    for writer in holder.writers:
        writer.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "held_connections": min(counts) if counts else 0,
        "probe_p50_ms": _pct(lat, 50),
        "probe_p99_ms": _pct(lat, 99),
        "probe_errors": len(errors),
        "probes": len(lat),
        "error_kinds": sorted(set(errors)),
        "slow_closed_while_probing": closed_while_probing,
        "slow_closed_by_server": closed_after,
        "slow_still_open": holder.open,
    }


# --------------------------------------------------------------------------- server side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=1000, help="slow connections held")
    parser.add_argument("--seconds", type=float, default=8.0, help="probing time")
    parser.add_argument("--header-timeout", default="10s", help="server.header_timeout")
    parser.add_argument(
        "--api-root",
        default=ROOT,
        help="serve the API from this checkout (to measure an older version)",
    )
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.held = max(3, min(args.held, 5000))
    args.seconds = max(1.0, min(args.seconds, 60.0))
    sys.path.insert(0, ROOT)
    from app.settings import parse_duration  # noqa: E402  (after the path is set)

    header_timeout = parse_duration(args.header_timeout)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one descriptor per held connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.client:
        result = asyncio.run(_client_main(args.client, args.held, args.seconds, header_timeout))
        print(json.dumps(result))
        return 0

    from app.embedded_redis import EmbeddedRedis
    from bench import http as bench_http  # bench.http: not the standard library's http

    tmp = tempfile.mkdtemp(prefix="gpuo-slowloris-")
    redis = EmbeddedRedis(os.path.join(tmp, "redis"), port=bench_http.free_port())
    api = None
    try:
        redis_url = redis.start()
        prefix = "{gpuo-slowloris}"
        bench_http._register_fleet(redis_url, prefix, 2, 8)
        extra = {}
        if os.path.abspath(args.api_root) == ROOT:  # an older checkout lacks the setting
            extra["GPU_ORCH__SERVER__HEADER_TIMEOUT"] = args.header_timeout
        api, port = bench_http.start_api(tmp, redis_url, prefix, args.api_root, **extra)
        client = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--client",
                str(port),
                "--held",
                str(args.held),
                "--seconds",
                str(args.seconds),
                "--header-timeout",
                args.header_timeout,
            ],
            capture_output=True,
            text=True,
            timeout=150,
            check=True,
        )
        result = json.loads(client.stdout)
        result.update(
            {
                "header_timeout_s": header_timeout,
                "api_root": os.path.abspath(args.api_root),
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}",
            }
        )
        print(json.dumps(result, indent=2))
        return 0
    finally:
        bench_http.stop_api(api)
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
