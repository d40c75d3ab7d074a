"""Chaos run: break the whole service on purpose, on one machine, and count what was lost.

    python bench/chaos.py --duration SECONDS --seed N [--clients 6] [--workdir DIR] [--fuzz-scale N]
    python bench/chaos.py --sentinel [--min-replicas-ack 1] ...

``--sentinel`` runs Redis as a primary, one replica and three sentinels (same binary, loopback)
with ``redis.min_replicas_ack`` (default 1), replaces the two Redis faults with a SIGKILL of the
primary (a failover), and adds ``failovers`` and ``acked_lost`` (acknowledged writes missing
afterwards, with no AOF-window exemption) to the JSON.

Starts a real topology on loopback (Redis with AOF, 3 API replicas, 2 RQ workers, the
scheduler, 4 simulated nodes x 8 GPUs, a webhook receiver), drives randomized clients against
the replicas for ``--duration`` seconds while a seeded schedule injects faults, then drains and
checks the invariants (see docs/reliability.md). Start-up and drain add about 25 s to the
duration. It prints a table, then as its last line one JSON object. The exit code is 0 when
every invariant held, 1 when one broke, 2 when the run itself could not be carried out.

Every child process is stopped on the way out, whatever happened (exception, Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/http.py would shadow the
# standard library's http package; import the helpers as bench.* from the repository root.
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [_ROOT] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

import requests  # noqa: E402

from app.keys import Keys  # noqa: E402
from bench.chaos_checks import (  # noqa: E402
    ApiSampler,
    Canary,
    Sampler,
    check_ledgers,
    in_windows,  # noqa: E402
    leaked_gpus,
)
from bench.chaos_clients import ChaosClient  # noqa: E402
from bench.chaos_faults import KINDS, SENTINEL_KINDS, FaultInjector, schedule  # noqa: E402
from bench.chaos_receiver import WebhookReceiver  # noqa: E402
from bench.chaos_topology import Topology  # noqa: E402
from bench.sentinel_topology import open_redis  # noqa: E402

PRINCIPALS = ("team-a", "team-b")
ADMIN = "ops"
TTL_RANGE = (6, 15)
HEARTBEAT_TIMEOUT = 3.0


def _log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[k]


def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt


class Run:
    """One chaos run: start, load with faults, drain, check, report; ``close`` cleans up."""

    def __init__(self, args):
        self.args = args
        self.keys = {secrets.token_urlsafe(24): p for p in PRINCIPALS + (ADMIN,)}
        self.key_of = {p: k for k, p in self.keys.items()}
        self.webhook_secret = secrets.token_urlsafe(32)
        self.sentinel_password = secrets.token_urlsafe(24) if args.sentinel else ""
        self.topo = Topology(
            apis=3,
            workers=2,
            nodes=4,
            gpus_per_node=8,
            api_keys=self.keys,
            admins=[ADMIN],
            webhook_secret=self.webhook_secret,
            workdir=args.workdir,
            sentinel=args.sentinel,
            sentinel_password=self.sentinel_password,
            extra_config={
                "scheduler": {"node_heartbeat_timeout": f"{HEARTBEAT_TIMEOUT}s"},
                **({"redis": {"min_replicas_ack": args.min_replicas_ack}} if args.sentinel else {}),
            },
        )
        self.receiver = WebhookReceiver(secret=self.webhook_secret)
        self.stop_load = threading.Event()
        self.stop_watch = threading.Event()
        self.canary = None
        self.sampler = None
        self.api_sampler = None
        self.clients: list[ChaosClient] = []
        self.injector = None
        self.t_load = None
        self.t_load_epoch = 0.0
        self.drained_clean = False
        self.phase = {}

    # ------------------------------------------------------------------ phases

    def start(self) -> None:
        t0 = time.monotonic()
        self.topo.start()
        self.phase["startup_s"] = round(time.monotonic() - t0, 1)
        _log(f"topology up in {self.phase['startup_s']} s (logs in {self.topo.dir / 'logs'})")
        self.canary = Canary(self.topo.bench_url, self.stop_watch)
        self.sampler = Sampler(self.topo.bench_url, self.topo.prefix, self.stop_watch)
        urls = [self.topo.api_url(i) for i in range(len(self.topo.api_ports))]
        self.api_sampler = ApiSampler(urls, self.key_of[ADMIN], self.stop_watch)
        self.canary.start()
        self.sampler.start()
        self.api_sampler.start()
        self.injector = FaultInjector(self.topo, self.receiver, self.canary, log=_log)

    def load(self) -> None:
        args = self.args
        urls = [self.topo.api_url(i) for i in range(len(self.topo.api_ports))]
        for i in range(args.clients):
            principal = PRINCIPALS[i % len(PRINCIPALS)]
            self.clients.append(
                ChaosClient(
                    i,
                    args.seed,
                    urls,
                    self.key_of[principal],
                    principal,
                    self.receiver.url,
                    self.stop_load,
                    ttl_range=TTL_RANGE,
                )
            )
        steps = schedule(
            args.duration,
            args.seed,
            apis=len(urls),
            workers=self.topo.n_workers,
            nodes=self.topo.node_names,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            fault_kinds=SENTINEL_KINDS if args.sentinel else KINDS,
        )
        self.t_load = time.monotonic()
        for c in self.clients:
            c.start()
        pending = list(steps)
        while time.monotonic() - self.t_load < args.duration:
            elapsed = time.monotonic() - self.t_load
            while pending and pending[0].at <= elapsed:
                self.injector.inject(pending.pop(0))
            self.injector.tick()
            self._supervise()
            time.sleep(0.05)
        self.stop_load.set()
        t0 = time.monotonic()
        self.injector.heal_all()
        for c in self.clients:
            c.join(30)
        self._supervise()
        self.phase["stop_s"] = round(time.monotonic() - t0, 1)

    def _supervise(self) -> None:
        for name in self.topo.supervise():
            _log(
                f"{name} exited on its own (code {self.topo.children[name].unexpected_exits[-1]})"
                "; restarted"
            )

    def _admin(self, method: str, path: str, **kw):
        for i in range(len(self.topo.api_ports)):
            try:
                return requests.request(
                    method,
                    self.topo.api_url(i) + path,
                    headers={"X-API-Key": self.key_of[ADMIN]},
                    timeout=5,
                    **kw,
                )
            except requests.RequestException:
                continue
        return None

    def drain(self) -> dict:
        """Release about half of what the clients still hold, cancel what they have queued, and
        let the rest expire; wait until no lease and no queued request is left."""
        t0 = time.monotonic()
        for c in self.clients:
            for rid, state in list(c.held.items()):
                if state == "queued":
                    c.cancel_id(rid)
                elif c.rng.random() < 0.5:
                    c.release_id(rid)
        client = open_redis(self.topo.bench_url, decode_responses=True)
        keys = Keys(self.topo.prefix)
        deadline = time.monotonic() + 2 * TTL_RANGE[1] + 20
        left = None
        try:
            while time.monotonic() < deadline:
                self._supervise()
                left = (client.zcard(keys.leases()), client.zcard(keys.queue()))
                if left == (0, 0):
                    break
                time.sleep(0.25)
            self.phase["drain_s"] = round(time.monotonic() - t0, 1)
            leaked, held = leaked_gpus(client, keys)
            queued = client.zrange(keys.queue(), 0, -1)
        finally:
            client.close()
        return {"leaked": leaked, "held": held, "queued_left": queued, "left": left}

    def wait_webhooks(self, timeout: float):
        client = open_redis(self.topo.bench_url, decode_responses=True)
        keys = Keys(self.topo.prefix)
        deadline = time.monotonic() + timeout
        try:
            while True:
                findings = check_ledgers(
                    client,
                    keys,
                    [c.ledger for c in self.clients],
                    self.receiver.delivered(),
                    self.canary.lost_windows(),
                    drained=self.drained_clean,
                    silent=self.silent_windows(),
                )
                if not findings.webhooks_missing or time.monotonic() > deadline:
                    return findings
                self._supervise()
                time.sleep(0.5)
        finally:
            client.close()

    def silent_windows(self) -> list[tuple[str, float, float]]:
        """(node, from, to): from the heartbeat lapse (plus a refresh of slack) to the resume."""
        out = []
        for r in self.injector.records:
            if r.kind == "node_silent" and r.end:
                node = r.target.removeprefix("monitor-")
                out.append((node, r.start + HEARTBEAT_TIMEOUT + 0.6, r.end))
        return out

    def secrets_in_logs(self) -> list[str]:
        """Every configured secret (API keys, webhook secret) that shows up in any child log."""
        hits = []
        needles = (
            list(self.keys)
            + [self.webhook_secret]
            + ([self.sentinel_password] if self.sentinel_password else [])
        )
        for path in self.topo.log_paths():
            text = path.read_text(errors="replace")
            for needle in needles:
                if needle in text:
                    hits.append(f"{path.name}: {needle[:4]}...")
        return hits

    # ------------------------------------------------------------------ report

    def report(self, drained: dict, findings, wall: float) -> tuple[dict, dict]:
        ops = [op for c in self.clients for op in c.ledger.ops]
        windows = [(r.start, (r.end or r.start) + 2.0) for r in self.injector.records]
        lat_all = [lat for _, lat, _, code in ops if code]
        lat_faults = [
            lat for t, lat, _, code in ops if code and any(a <= t <= b for a, b in windows)
        ]
        codes = Counter(code for *_, code in ops)
        by_op = Counter(f"{op} {code}" for _, _, op, code in ops)
        aof = self.canary.lost_windows()
        acked_at = {
            a.request_id: a.t_ack for c in self.clients for a in c.ledger.acks if a.op == "allocate"
        }
        vanished = [
            f"{rid} read as 404 at {t - self.t_load_epoch:.1f}s"
            for c in self.clients
            for rid, t in c.ledger.vanished
            if not in_windows(acked_at.get(rid, 0.0), aof)
        ]
        unexpected = [u for c in self.clients for u in c.ledger.unexpected]
        kills = [w for w in self.canary.windows if w.kind == "sigkill"]
        terms = [w for w in self.canary.windows if w.kind == "sigterm"]
        term_lost = sum(w.lost_writes for w in terms)
        secret_hits = self.secrets_in_logs()
        out = {
            "ops": len(ops),
            "faults": len(self.injector.records),
            "double_allocations": len(self.sampler.conflicts | self.api_sampler.conflicts),
            "lost_requests": len(findings.lost),
            "lost_transitions": len(findings.lost_transitions),
            "stuck_requests": len(findings.stuck),
            "finished_without_event": len(findings.unrecorded),
            "grants_on_silent_nodes": len(findings.silent_node_grants),
            "placement_mismatches": len(findings.moved),
            "dependency_violations": len(findings.dependency_violations),
            "aof_window_lost": len(findings.aof_lost),
            "aof_window_ms": round(max((w.ms for w in kills), default=0.0), 1),
            "aof_window_writes_lost": sum(w.lost_writes for w in kills),
            "sigterm_writes_lost": term_lost,
            "leaked_gpus": drained["leaked"],
            "webhooks_expected": findings.webhooks_expected,
            "webhooks_delivered": findings.webhooks_delivered,
            "webhook_event_id_mismatch": len(findings.webhook_dup_mismatch),
            "webhook_max_delay_s": round(max(findings.webhook_delays, default=0.0), 1),
            "webhook_p50_delay_s": round(percentile(findings.webhook_delays, 0.5) or 0.0, 2),
            "webhook_bad_signatures": findings.bad_signatures,
            "webhook_foreign_requests": self.receiver.foreign_requests,
            "duplicate_grants": len(findings.duplicate_grants),
            "secrets_in_logs": len(secret_hits),
            "server_errors": len(unexpected),
            "unexpected_exits": {k: len(v) for k, v in self.topo.unexpected_exits().items()},
            "p99_ms": _ms(percentile(lat_all, 0.99)),
            "p99_during_faults_ms": _ms(percentile(lat_faults, 0.99)),
            "p50_ms": _ms(percentile(lat_all, 0.50)),
            "http_status": {str(k): v for k, v in sorted(codes.items())},
            "http_status_by_op": dict(sorted(by_op.items())),
            "acknowledged_read_as_404": len(vanished),
            "faults_by_kind": dict(Counter(r.kind for r in self.injector.records)),
            "worker_killed_mid_job": sum(
                1
                for r in self.injector.records
                if r.kind == "worker_kill" and r.detail.get("mid_job")
            ),
            "samples": self.sampler.samples,
            "api_samples": self.api_sampler.samples,
            "index_drift": len(self.sampler.drift),
            "snapshot_inconsistencies": len(self.api_sampler.drift),
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "wall_s": round(wall, 1),
            **self.phase,
        }
        if self.args.sentinel:
            # every write a client was told succeeded, with no AOF-window exemption
            out["failovers"] = self.topo.sentinel.failovers
            out["acked_lost"] = (
                len(findings.lost)
                + len(findings.lost_transitions)
                + len(findings.aof_lost)
                + len(vanished)
            )
            out["min_replicas_ack"] = self.args.min_replicas_ack
        out["violations"] = (
            out["double_allocations"]
            + out["lost_requests"]
            + out["lost_transitions"]
            + out["leaked_gpus"]
            + out["stuck_requests"]
            + out["finished_without_event"]
            + out["grants_on_silent_nodes"]
            + out["placement_mismatches"]
            + out["dependency_violations"]
            + (out["webhooks_expected"] - out["webhooks_delivered"])
            + out["webhook_event_id_mismatch"]
            + out["webhook_bad_signatures"]
            + out["duplicate_grants"]
            + out["secrets_in_logs"]
            + out["server_errors"]
            + out["sigterm_writes_lost"]
            + out["acknowledged_read_as_404"]
            + out["index_drift"]
            + out["snapshot_inconsistencies"]
        )
        if self.args.sentinel:
            out["violations"] += out["acked_lost"] + (0 if out["failovers"] >= 1 else 1)
        details = {
            "double_allocations": sorted(
                map(str, self.sampler.conflicts | self.api_sampler.conflicts)
            )[:20],
            "index_drift": sorted(map(str, self.sampler.drift))[:20],
            "snapshot_inconsistencies": sorted(map(str, self.api_sampler.drift))[:20],
            "lost_requests": findings.lost[:20],
            "lost_transitions": findings.lost_transitions[:20],
            "stuck_requests": findings.stuck[:20],
            "finished_without_event": findings.unrecorded[:20],
            "grants_on_silent_nodes": findings.silent_node_grants[:20],
            "placement_mismatches": findings.moved[:20],
            "dependency_violations": findings.dependency_violations[:20],
            "aof_window_lost": findings.aof_lost[:20],
            "leaked": drained["held"][:20],
            "queued_left": drained["queued_left"][:20],
            "webhooks_missing": findings.webhooks_missing[:20],
            "webhook_event_id_mismatch": findings.webhook_dup_mismatch[:20],
            "webhook_foreign_requests": self.receiver.foreign[:20],
            "duplicate_grants": findings.duplicate_grants[:20],
            "secrets_in_logs": secret_hits[:20],
            "server_errors": unexpected[:20],
            "acknowledged_read_as_404": vanished[:20],
            "faults": [
                (r.kind, r.target, round(r.start - self.t_load_epoch, 1), r.detail)
                for r in self.injector.records
            ],
        }
        return out, details

    def run(self) -> int:
        t0 = time.monotonic()
        self.start()
        self.t_load_epoch = time.time()
        self.load()
        _log("load stopped; draining")
        drained = self.drain()
        self.drained_clean = drained["left"] == (0, 0)
        t1 = time.monotonic()
        # A webhook retry scheduled by RQ waits for RQ's scheduler lock. When the worker that
        # held it died (SIGKILL or crash), our workers free it after 10 s (RQ itself: 60 s), and
        # a job it had in hand is retried once its heartbeat lapses. Leave room for that, so a
        # late delivery is measured (webhook_max_delay_s) rather than called lost.
        kills = [r.start for r in self.injector.records if r.kind == "worker_kill"]
        kills += [
            t for name in self.topo.names("worker") for t in self.topo.children[name].exit_times
        ]  # a crash holds it too
        wait = max(30.0, (max(kills) + 45 - time.time()) if kills else 0.0)
        findings = self.wait_webhooks(timeout=wait)
        self.phase["webhook_wait_s"] = round(time.monotonic() - t1, 1)
        self.stop_watch.set()
        self.sampler.join(5)
        self.api_sampler.join(10)
        self.canary.join(5)
        out, details = self.report(drained, findings, time.monotonic() - t0)
        if self.args.fuzz_scale:
            out["fuzz"] = run_fuzz(self.args.fuzz_scale)
            out["violations"] += 0 if out["fuzz"]["passed"] else 1
        print_table(out, details)
        if self.args.workdir:
            (Path(self.args.workdir) / "report.json").write_text(
                json.dumps({"summary": out, "details": details}, indent=1, default=str)
            )
        print(json.dumps(out, sort_keys=False), flush=True)
        return 0 if out["violations"] == 0 else 1

    def close(self) -> None:
        self.stop_load.set()
        self.stop_watch.set()
        self.receiver.close()
        self.topo.close()


def run_fuzz(scale: int) -> dict:
    """The API's schemathesis fuzz (tests/test_fuzz.py) at ``scale`` times its examples."""
    import subprocess

    _log(f"schemathesis fuzz at {scale}x its examples")
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_fuzz.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=3000",
        ],
        cwd=_ROOT,
        env=dict(os.environ, GPUO_FUZZ_SCALE=str(scale)),
        capture_output=True,
        text=True,
    )
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return {
        "scale": scale,
        "passed": proc.returncode == 0,
        "summary": tail,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def print_table(out: dict, details: dict) -> None:
    rows = [
        ("operations", out["ops"], ""),
        (
            "faults injected",
            out["faults"],
            ", ".join(f"{k} {v}" for k, v in sorted(out["faults_by_kind"].items())),
        ),
        (
            "double allocations",
            out["double_allocations"],
            f"{out['samples']} Redis samples, {out['api_samples']} /gpu/list samples",
        ),
        (
            "index drift / snapshot inconsistencies",
            f"{out['index_drift']}/{out['snapshot_inconsistencies']}",
            "GPU hashes vs allocations",
        ),
        ("requests lost", out["lost_requests"], "outside the AOF window"),
        ("acknowledged transitions lost", out["lost_transitions"], "release/cancel"),
        (
            "lost in the AOF window",
            out["aof_window_lost"],
            f"window {out['aof_window_ms']} ms, {out['aof_window_writes_lost']} canary writes",
        ),
        ("writes lost on SIGTERM", out["sigterm_writes_lost"], ""),
        ("requests unfinished after drain", out["stuck_requests"], ""),
        ("finished without an event", out["finished_without_event"], ""),
        ("grants on a silent node", out["grants_on_silent_nodes"], "heartbeat lapsed"),
        ("GPUs answered != recorded", out["placement_mismatches"], "200 bodies and webhooks"),
        ("granted before a dependency finished", out["dependency_violations"], "depends_on"),
        ("leaked GPUs", out["leaked_gpus"], "after drain and lease expiry"),
        (
            "webhooks delivered/expected",
            f"{out['webhooks_delivered']}/{out['webhooks_expected']}",
            f"{out['webhook_event_id_mismatch']} event_id mismatches, "
            f"{out['webhook_bad_signatures']} bad signatures",
        ),
        (
            "webhook delay, grant to delivery",
            f"{out['webhook_max_delay_s']} s",
            f"max; median {out['webhook_p50_delay_s']} s",
        ),
        ("duplicate grants", out["duplicate_grants"], "idempotent retries"),
        ("secrets in logs", out["secrets_in_logs"], ""),
        ("5xx other than 503", out["server_errors"], ""),
        ("acknowledged ids read as 404", out["acknowledged_read_as_404"], "during the run"),
        ("p99 latency", f"{out['p99_ms']} ms", f"during faults {out['p99_during_faults_ms']} ms"),
        (
            "unexpected exits",
            sum(out["unexpected_exits"].values()),
            ", ".join(f"{k} {v}" for k, v in out["unexpected_exits"].items()),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {str(value):>10}  {note}")
    for key, items in details.items():
        if items and key != "faults":
            print(f"-- {key}:")
            for item in items:
                print(f"   {item}")
    print("-- fault log (kind, target, seconds into the load, detail):")
    for item in details["faults"]:
        print(f"   {item}")
    print(f"violations: {out['violations']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=35,
        help="seconds of load and faults (start-up and drain come on top)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--workdir", help="keep config and logs here instead of a temp dir")
    parser.add_argument(
        "--fuzz-scale",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, run the schemathesis fuzz at N times its examples "
        "(the long mode uses 10)",
    )
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="Redis behind Sentinel (primary, replica, 3 sentinels); the Redis "
        "faults become a SIGKILL of the primary",
    )
    parser.add_argument(
        "--min-replicas-ack",
        type=int,
        default=1,
        metavar="N",
        help="with --sentinel: redis.min_replicas_ack for every role (default 1)",
    )
    args = parser.parse_args(argv)
    if not 10 <= args.duration <= 3600:
        parser.error("--duration must be 10..3600 seconds")
    if not 1 <= args.clients <= 32:
        parser.error("--clients must be 1..32")
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    run = Run(args)
    try:
        return run.run()
    except KeyboardInterrupt:
        _log("interrupted; cleaning up")
        return 130
    except RuntimeError as exc:  # the topology could not be built or run
        _log(f"run failed: {exc}")
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    finally:
        run.close()


if __name__ == "__main__":
    sys.exit(main())
