"""What the chaos run measures: a double-allocation sampler, an AOF canary, and the final checks.

The sampler reads the engine's raw state (docs/engine.md, app/lua/includes/prelude.lua) in one
read-only Lua script, so every sample is a state that really existed, and checks it with code
that shares nothing with the engine:

- every id in the leases ZSET is an ``allocated`` request whose ``node``/``gpu_ids`` name GPUs;
- no GPU is held by two exclusive allocations, or by an exclusive and a shared one;
- the shared reservations on a GPU never exceed its memory;
- the GPU hash agrees (``excl`` names the exclusive holder), counted apart as index drift.

The canary measures the AOF window. A thread SETs a counter every few milliseconds and records
when it sent and when Redis acknowledged each value. After a SIGKILL and a restart, the value
that survived (``s``) says which acknowledged writes were lost: every write acknowledged before
``s`` was *sent* ran before ``s`` and is in the AOF, since Redis executes and appends in one
order. So the window is ``[t_send(s), t_kill]``: an acknowledged request that is missing
afterwards is blamed on the AOF only when it was acknowledged inside a window; otherwise it is
lost, and a violation.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib

from app.keys import Keys
from bench.sentinel_topology import open_redis

#: Harness-only key (outside the service's prefix, so it cannot collide with any service key).
CANARY_KEY = "chaos-harness:aof-canary"

_SAMPLE_LUA = """
-- Read-only snapshot for the chaos sampler (standalone Redis only: it reads hashes it derives
-- from ZSET members, which Redis Cluster would not allow).
-- KEYS[1] leases ZSET (id -> expires_at), KEYS[2] gpus ZSET (node|idx -> memory_total_mb)
-- ARGV[1] request key prefix ("<p>:req:"), ARGV[2] gpu key prefix ("<p>:gpu:")
-- Returns { {id, status, node, gpu_ids, sharing, min_memory_mb}..., }, { {member, total, excl,
--          shared_n, shared_mb}... }
local allocs = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'status', 'node', 'gpu_ids', 'sharing',
                       'min_memory_mb')
  allocs[#allocs + 1] = {id, f[1] or '', f[2] or '', f[3] or '', f[4] or '', f[5] or ''}
end
local gpus = {}
local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local node, idx = string.match(members[i], '^(.*)|([^|]*)$')
  local f = redis.call('HMGET', ARGV[2] .. node .. ':' .. idx, 'excl', 'shared_n', 'shared_mb')
  gpus[#gpus + 1] = {members[i], members[i + 1], f[1] or '', f[2] or '', f[3] or ''}
end
return {allocs, gpus}
"""


def parse_ids(raw: Any) -> list[int]:
    """``gpu_ids`` as the engine stores it: a JSON list or comma-separated digits."""
    if raw in (None, ""):
        return []
    if isinstance(raw, list):
        return [int(x) for x in raw]
    text = str(raw).strip()
    if text.startswith("["):
        return [int(x) for x in json.loads(text)]
    return [int(x) for x in text.split(",") if x.strip()]


def check_state(allocs: list[list[str]], gpus: list[list[str]]) -> tuple[set, set, int]:
    """(conflicts, drift, allocation count) of one snapshot.

    conflicts: ``(kind, gpu, ids)`` tuples that break the invariants; drift: GPU hashes that
    disagree with the allocation records (the engine's index, not a double allocation)."""
    conflicts: set = set()
    drift: set = set()
    excl: dict[str, list[str]] = defaultdict(list)
    shared: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for rid, status, node, gpu_ids, sharing, min_mb in allocs:
        if status != "allocated":
            drift.add(("lease-not-allocated", rid, status))
            continue
        try:
            ids = parse_ids(gpu_ids)
        except ValueError:
            drift.add(("bad-gpu-ids", rid, gpu_ids))
            continue
        for idx in ids:
            member = f"{node}|{idx}"
            if sharing == "shared":
                shared[member].append((rid, float(min_mb or 0)))
            else:
                excl[member].append(rid)
    totals = {m: float(total) for m, total, *_ in gpus}
    hashes = {m: (e, n, mb) for m, _, e, n, mb in gpus}
    for member, holders in excl.items():
        if len(holders) > 1:
            conflicts.add(("exclusive-twice", member, tuple(sorted(holders))))
        if shared.get(member):
            conflicts.add(
                (
                    "exclusive-and-shared",
                    member,
                    tuple(sorted(holders + [r for r, _ in shared[member]])),
                )
            )
        if member in hashes and hashes[member][0] not in holders:
            drift.add(("excl-field", member, hashes[member][0], tuple(holders)))
    for member, holders in shared.items():
        reserved = sum(mb for _, mb in holders)
        if member in totals and reserved > totals[member]:
            conflicts.add(("shared-over-memory", member, tuple(sorted(r for r, _ in holders))))
    for member, (e, n, mb) in hashes.items():
        if e and not excl.get(member):
            drift.add(("excl-without-allocation", member, e))
        holders = shared.get(member, [])
        if int(float(n or 0)) != len(holders) or float(mb or 0) != sum(m for _, m in holders):
            drift.add(("shared-count", member, n, mb, tuple(sorted(r for r, _ in holders))))
    return conflicts, drift, len(allocs)


class Sampler(threading.Thread):
    """Snapshots the engine's state every ``interval`` seconds until stopped."""

    def __init__(self, redis_url: str, prefix: str, stop: threading.Event, interval=0.05):
        super().__init__(name="chaos-sampler", daemon=True)
        self.client = open_redis(
            redis_url, decode_responses=True, socket_timeout=1, socket_connect_timeout=0.5
        )
        keys = Keys(prefix)
        self.keys = [keys.leases(), keys.gpus()]
        self.argv = [keys.request(""), keys.gpu("", "")[:-1]]  # "<p>:req:", "<p>:gpu:"
        self.script = self.client.register_script(_SAMPLE_LUA)
        self.stop_event = stop
        self.interval = interval
        self.samples = 0
        self.failed = 0
        self.conflicts: set = set()
        self.drift: set = set()
        self.max_live = 0

    def sample(self) -> None:
        allocs, gpus = self.script(keys=self.keys, args=self.argv)
        conflicts, drift, live = check_state(allocs, gpus)
        self.conflicts |= conflicts
        self.drift |= drift
        self.max_live = max(self.max_live, live)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sample()
            except redis_lib.RedisError:
                self.failed += 1  # Redis is down or loading: nothing to sample
            self.stop_event.wait(self.interval)
        self.client.close()


class ApiSampler(threading.Thread):
    """The same checks on ``GET /gpu/list``, which the API promises is one atomic snapshot:
    a double allocation or an inconsistency there is a state the API showed that never
    existed, or a real one."""

    def __init__(self, urls: list[str], api_key: str, stop: threading.Event, interval=0.2):
        super().__init__(name="chaos-api-sampler", daemon=True)
        import requests

        self.session = requests.Session()
        self.urls, self.headers = urls, {"X-API-Key": api_key}
        self.stop_event, self.interval = stop, interval
        self.samples = self.failed = 0
        self.conflicts: set = set()
        self.drift: set = set()

    def sample(self, url: str) -> None:
        # the largest page: every live allocation of a chaos run fits on it (allocations come
        # before the queue), so each GPU's holder is on the page
        body = self.session.get(
            url + "/gpu/list?limit=1000", headers=self.headers, timeout=5
        ).json()
        assert body["allocations_total"] == len(body["allocations"]), "allocations paged"
        allocs = [
            [
                a["id"],
                a.get("status") or "",
                a.get("node") or "",
                json.dumps(a.get("gpu_ids") or []),
                a.get("sharing") or "",
                str(a.get("min_memory_mb") or 0),
            ]
            for a in body["allocations"]
        ]
        gpus = [
            [
                f"{g['node']}|{g['index']}",
                str(g.get("memory_total_mb") or 0),
                g.get("allocated_to") or "",
                str(g.get("shared_n") or 0),
                str(g.get("shared_mb") or 0),
            ]
            for g in body["gpus"]
        ]
        conflicts, drift, _ = check_state(allocs, gpus)
        self.conflicts |= conflicts
        self.drift |= drift
        self.samples += 1

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            i += 1
            try:
                self.sample(self.urls[i % len(self.urls)])
            except Exception:  # noqa: BLE001 - a replica or Redis down: no sample this time
                self.failed += 1
            self.stop_event.wait(self.interval)
        self.session.close()


@dataclass
class Window:
    kind: str
    t_kill: float
    survived: int | None = None
    t_survived_send: float | None = None
    last_acked: int | None = None

    @property
    def lost_writes(self) -> int:
        if self.survived is None or self.last_acked is None:
            return 0
        return max(0, self.last_acked - self.survived)

    #: When the first lost write was sent and the last lost one acknowledged (set by mark_up).
    lost_span: tuple[float, float] | None = None

    @property
    def ms(self) -> float:
        """How much acknowledged history the restart rolled back, in milliseconds (0 when
        every acknowledged write survived)."""
        if not self.lost_writes or self.lost_span is None:
            return 0.0
        return max(0.0, (self.lost_span[1] - self.lost_span[0]) * 1000)


class Canary(threading.Thread):
    """Writes an increasing counter to Redis and remembers when each write was sent and acked."""

    def __init__(self, redis_url: str, stop: threading.Event, interval=0.005):
        super().__init__(name="chaos-canary", daemon=True)
        self.client = open_redis(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.stop_event = stop
        self.interval = interval
        self.seq = 0
        self.sent: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.last_acked = 0
        self.windows: list[Window] = []
        self.paused = threading.Event()
        self._lock = threading.Lock()
        self._io = threading.Lock()  # held around each write, so pause() can wait it out

    def run(self) -> None:
        while not self.stop_event.is_set():
            with self._io:
                if not self.paused.is_set():
                    self._write()
            self.stop_event.wait(self.interval)
        self.client.close()

    def _write(self) -> None:
        with self._lock:
            self.seq += 1
            seq = self.seq
            self.sent[seq] = time.time()
        try:
            self.client.set(CANARY_KEY, seq)
            with self._lock:
                self.acked[seq] = time.time()
                self.last_acked = max(self.last_acked, seq)
        except redis_lib.RedisError:
            pass

    def pause(self) -> None:
        """Stop writing, and return only once no write is in flight."""
        self.paused.set()
        with self._io:
            pass

    def resume(self) -> None:
        self.paused.clear()

    def mark_down(self, kind: str) -> Window:
        """Call right after Redis was stopped (``kind`` = sigterm or sigkill)."""
        with self._lock:
            window = Window(kind, time.time(), last_acked=self.last_acked)
        self.windows.append(window)
        return window

    def mark_up(self, window: Window) -> None:
        """Call once Redis answers again: read which write survived the restart."""
        for _ in range(200):
            try:
                raw = self.client.get(CANARY_KEY)
                break
            except redis_lib.RedisError:
                time.sleep(0.05)
        else:
            return
        survived = int(raw) if raw is not None else 0
        window.survived = survived
        with self._lock:
            window.t_survived_send = self.sent.get(survived, window.t_kill)
            if window.lost_writes:
                first = self.sent.get(survived + 1, window.t_kill)
                last = self.acked.get(window.last_acked, window.t_kill)
                window.lost_span = (first, last)
            # Writes after the restart must not be compared against the old counter.
            self.seq = max(self.seq, window.last_acked or 0)
            self.last_acked = survived

    def lost_windows(self) -> list[tuple[float, float]]:
        """[(start, end)] epoch ranges in which acknowledged state may have been lost."""
        return [
            (w.t_survived_send, w.t_kill)
            for w in self.windows
            if w.kind == "sigkill" and w.t_survived_send is not None and w.lost_writes
        ]


# --------------------------------------------------------------------------- final checks


def read_requests(client: redis_lib.Redis, keys: Keys, ids: list[str]) -> dict[str, dict]:
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.hgetall(keys.request(rid))
    return {rid: rec for rid, rec in zip(ids, pipe.execute()) if rec}


def read_events(client: redis_lib.Redis, keys: Keys) -> dict[str, list[dict]]:
    """request_id -> its events in stream order."""
    out: dict[str, list[dict]] = defaultdict(list)
    last = "-"
    while True:
        batch = client.xrange(keys.events(), min=last, count=5000)
        if last != "-" and batch and batch[0][0] == last:
            batch = batch[1:]
        if not batch:
            break
        for entry_id, fields in batch:
            fields = dict(fields, stream_id=entry_id)
            out[fields.get("request_id", "")].append(fields)
        last = batch[-1][0]
    return out


def services_with_requests(client: redis_lib.Redis, keys: Keys) -> dict[str, set[str]]:
    """service_name -> every request id stored for it (SCAN over the request hashes)."""
    out: dict[str, set[str]] = defaultdict(set)
    pattern = keys.request("*")
    for key in client.scan_iter(match=pattern, count=1000):
        rid, svc = client.hmget(key, "id", "service_name")
        if rid and svc:
            out[svc].add(rid)
    return out


@dataclass
class Findings:
    lost: list[str] = field(default_factory=list)
    aof_lost: list[str] = field(default_factory=list)
    lost_transitions: list[str] = field(default_factory=list)
    duplicate_grants: list[str] = field(default_factory=list)
    webhooks_expected: int = 0
    webhooks_delivered: int = 0
    webhooks_missing: list[str] = field(default_factory=list)
    webhook_dup_mismatch: list[str] = field(default_factory=list)
    bad_signatures: int = 0
    webhook_delays: list[float] = field(default_factory=list)  # grant -> first delivery, s
    stuck: list[str] = field(default_factory=list)  # not finished after the drain
    unrecorded: list[str] = field(default_factory=list)  # finished without its event
    silent_node_grants: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # GPUs answered != GPUs recorded
    dependency_violations: list[str] = field(default_factory=list)


def in_windows(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(lo <= t <= hi + 0.05 for lo, hi in windows)


TERMINAL = {"released", "expired", "cancelled", "timed_out"}


def check_ledgers(
    client: redis_lib.Redis,
    keys: Keys,
    ledgers: list,
    deliveries: list[dict],
    windows: list[tuple[float, float]],
    *,
    drained: bool = False,
    silent: list[tuple[str, float, float]] = (),
) -> Findings:
    """Replay the clients' acknowledgements against what Redis and the event stream hold.

    ``windows``: AOF windows (see :class:`Canary`); ``drained``: no lease or queued request is
    left, so every acknowledged request must have finished; ``silent``: (node, from, to) epoch
    ranges in which the node's heartbeat had lapsed."""
    f = Findings()
    acks = [a for ledger in ledgers for a in ledger.acks]
    allocs = {a.request_id: a for a in acks if a.op == "allocate"}
    records = read_requests(client, keys, list(allocs))
    events = read_events(client, keys)

    for rid, ack in allocs.items():
        rec = records.get(rid)
        evs = events.get(rid, [])
        names = [e.get("event") for e in evs]
        if rec is None and not any(n in TERMINAL for n in names):
            (f.aof_lost if in_windows(ack.t_ack, windows) else f.lost).append(rid)
            continue
        status = (rec or {}).get("status")
        if ack.placement and rec and rec.get("node"):
            now = f"{rec.get('node')}:{parse_ids(rec.get('gpu_ids'))}"
            if now != ack.placement and not in_windows(ack.t_ack, windows):
                f.moved.append(f"{rid} answered {ack.placement}, recorded {now}")
        if drained and status not in TERMINAL:
            f.stuck.append(f"{rid} is still {status} after the drain")
        elif status in TERMINAL and status not in names:
            f.unrecorded.append(f"{rid} is {status} with no {status} event")

    # depends_on: no grant while a named request is still queued or live.
    for rid, ack in allocs.items():
        for grant in (e for e in events.get(rid, []) if e.get("event") == "allocated"):
            at = float(grant.get("ts") or 0)
            for dep in ack.depends_on:
                done = [
                    float(e.get("ts") or 0)
                    for e in events.get(dep, [])
                    if e.get("event") in TERMINAL
                ]
                if not done or min(done) > at:
                    f.dependency_violations.append(f"{rid} granted while {dep} was not finished")

    # A node whose heartbeat lapsed is not schedulable: no grant may land on it meanwhile.
    for node, lo, hi in silent:
        for evs in events.values():
            for e in evs:
                if (
                    e.get("event") == "allocated"
                    and e.get("node") == node
                    and lo <= float(e.get("ts") or 0) <= hi
                ):
                    f.silent_node_grants.append(
                        f"{e.get('request_id')} on {node} at "
                        f"{float(e['ts']) - lo:+.2f}s into the lapse"
                    )

    for ack in acks:
        if ack.op not in ("release", "cancel"):
            continue
        want = "released" if ack.op == "release" else "cancelled"
        rec = records.get(ack.request_id) or {}
        evs = [e.get("event") for e in events.get(ack.request_id, [])]
        if rec.get("status") != want and want not in evs:
            msg = f"{ack.op} of {ack.request_id} acknowledged, now {rec.get('status') or 'gone'}"
            (f.aof_lost if in_windows(ack.t_ack, windows) else f.lost_transitions).append(msg)

    # Idempotency: one logical request (one service_name) must never become two requests.
    by_service = services_with_requests(client, keys)
    for ack in allocs.values():
        ids = by_service.get(ack.service_name, set())
        if ack.idem_key and len(ids) > 1:
            f.duplicate_grants.append(f"{ack.service_name}: {sorted(ids)}")
    for ledger in ledgers:
        for key, a, b in ledger.idem_mismatches:
            f.duplicate_grants.append(f"Idempotency-Key {key}: {a} then {b}")

    # Webhooks: every grant of a request that asked for one is delivered at least once, and
    # every delivery of one grant carries the same event_id.
    by_request: dict[str, list[dict]] = defaultdict(list)
    for d in deliveries:
        if d.get("signature_ok") is False:
            f.bad_signatures += 1
        by_request[d.get("request_id")].append(d)
    for rid, ack in allocs.items():
        if not ack.webhook:
            continue
        # The engine notifies grants of *queued* requests (an immediate grant is the 200
        # answer itself), so count the allocated events that follow a queued event.
        grants, queued = [], False
        for e in events.get(rid, []):
            queued = queued or e.get("event") == "queued"
            if e.get("event") == "allocated" and queued:
                grants.append(e)
        if not grants:
            continue
        f.webhooks_expected += 1
        got = [d for d in by_request.get(rid, []) if d.get("event") == "allocated"]
        rec = records.get(rid) or {}
        for d in got:
            sent = (d.get("body") or {}).get("allocation") or {}
            if rec.get("gpu_ids") and sent.get("gpu_ids") != parse_ids(rec.get("gpu_ids")):
                f.moved.append(
                    f"{rid} webhook said {sent.get('gpu_ids')}, recorded "
                    f"{parse_ids(rec.get('gpu_ids'))}"
                )
        if got:
            f.webhooks_delivered += 1
            granted = float(grants[0].get("ts") or 0)
            if granted:
                f.webhook_delays.append(min(d["t"] for d in got) - granted)
        else:
            f.webhooks_missing.append(rid)
        event_ids = {d.get("event_id") for d in got}
        if len(event_ids) > max(1, len(grants)):
            f.webhook_dup_mismatch.append(f"{rid}: {sorted(map(str, event_ids))}")
    return f


def leaked_gpus(client: redis_lib.Redis, keys: Keys) -> tuple[int, list[str]]:
    """GPUs still held (by the GPU hashes) and live leases, after the drain."""
    held = []
    for member in client.zrange(keys.gpus(), 0, -1):
        node, _, idx = member.rpartition("|")
        excl, shared_n = client.hmget(keys.gpu(node, idx), "excl", "shared_n")
        if excl or int(shared_n or 0) > 0:
            held.append(f"{member} ({excl or f'{shared_n} shared'})")
    leases = client.zrange(keys.leases(), 0, -1)
    return len(held), held + [f"lease {rid}" for rid in leases]
