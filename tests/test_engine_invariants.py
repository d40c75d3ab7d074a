"""The engine's invariants under random operation sequences (hypothesis) and real concurrency.

After every step a full scan of Redis is compared with the engine's own indexes and counts:
no GPU held twice, shared reservations within memory, one state per request, counts equal the
scan, and the queue order (no waiting request that fits is left behind, no grant overtook a
higher-ranked request that fitted).
"""

from __future__ import annotations

import json
import random
import threading

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from app import errors
from app.engine import Engine
from tests.engine_support import Clock
from tests.invariant_support import (
    exclusive_holders,
    release_all,
    run_machine,
    stored_requests,
)

FLEET = {"n0": (2, 16000), "n1": (4, 32000), "n2": (1, 80000)}
#: GPU model per node, for gpu_model globs
MODELS = {"n0": "NVIDIA A10", "n1": "NVIDIA H100 PCIe", "n2": "NVIDIA H100 NVL"}


def gpus_for(node, health=None, missing=(), util=None, used=None):
    count, mem = FLEET[node]
    out = []
    for i in range(count):
        if i in missing:
            continue
        out.append(
            {
                "index": i,
                "uuid": f"{node}-{i}",
                "name": MODELS[node],
                "memory_total_mb": mem,
                "memory_used_mb": (used or {}).get(i, 0),
                "utilization": (util or {}).get(i, 10 * i),
                "temperature": 40,
                "power_draw": 100,
                "health": (health or {}).get(i, "ok"),
            }
        )
    return out


# --------------------------------------------------------------------------- the full scan


def scan(engine: Engine, redis) -> dict:
    """Everything, read key by key (not through the engine's indexes)."""
    k = engine.keys
    reqs = stored_requests(engine, redis)
    gpus = {}
    for key in redis.scan_iter(match=k.gpu("*", "*"), count=1000):
        h = redis.hgetall(key)
        gpus[(h["node"], h["index"])] = h
    nodes = {n: float(hb) for n, hb in redis.zrange(k.nodes(), 0, -1, withscores=True)}
    return {"reqs": reqs, "gpus": gpus, "nodes": nodes}


def gpu_ok(g) -> bool:
    return g.get("health") == "ok" and g.get("lost") != "1" and g.get("cordoned") != "1"


def check_invariants(engine: Engine, redis, now: float) -> dict:
    import json

    k = engine.keys
    s = scan(engine, redis)
    timeout = engine.settings.scheduler.node_heartbeat_timeout
    alive = {n for n, hb in s["nodes"].items() if hb >= now - timeout}
    shared: dict = {}
    live = {rid: r for rid, r in s["reqs"].items() if r["status"] == "allocated"}
    queued = {rid: r for rid, r in s["reqs"].items() if r["status"] == "queued"}
    excl = exclusive_holders(live.values())  # no GPU in two exclusive allocations
    for rid, r in live.items():
        for idx in json.loads(r["gpu_ids"]):
            key = (r["node"], str(idx))
            assert key in s["gpus"], f"{rid} holds an unknown GPU {key}"
            if r["sharing"] == "shared":
                shared.setdefault(key, []).append(r)
        assert len(set(json.loads(r["gpu_ids"]))) == int(r["required_gpus"])
        assert model_ok(r, s["gpus"][key]), f"{rid} got a {s['gpus'][key]['name']}"
        assert r["node"] in (json.loads(r.get("nodes") or "[]") or [r["node"]]), (
            f"{rid} placed on {r['node']} outside its nodes"
        )
    for key, g in s["gpus"].items():
        holders = [excl[key]] if key in excl else []
        assert not (holders and shared.get(key)), f"GPU {key} exclusive and shared at once"
        reserved = sum(int(r["min_memory_mb"]) for r in shared.get(key, []))
        assert reserved <= float(g["memory_total_mb"]), f"GPU {key} over-reserved"
        assert (g.get("excl") or None) == (holders[0] if holders else None)
        assert int(g.get("shared_n") or 0) == len(shared.get(key, []))
        assert int(g.get("shared_mb") or 0) == reserved

    # one state per request; the indexes agree with the records
    statuses = {"queued", "allocated", "released", "expired", "cancelled", "timed_out", "lost"}
    assert all(r["status"] in statuses for r in s["reqs"].values())
    queue_ids = redis.zrange(k.queue(), 0, -1)
    assert set(queue_ids) == set(queued) and len(queue_ids) == len(queued)
    assert set(redis.zrange(k.leases(), 0, -1)) == set(live)
    assert set(redis.zrange(k.queue_deadlines(), 0, -1)) == set(queued)
    assert set(redis.hkeys(k.queue_shapes())) == set(queued)
    # each owner's count of queued requests (scheduler.max_queued_per_owner) matches the queue
    per_owner: dict = {}
    for r in queued.values():
        bucket = "o:" + r["owner"] if r.get("owner") else "s:" + r["service_name"]
        per_owner[bucket] = per_owner.get(bucket, 0) + 1
    assert {b: int(n) for b, n in redis.hgetall(k.queue_owners()).items()} == per_owner
    demand = set(redis.zrange(k.queue_demand("exclusive"), 0, -1)) | set(
        redis.zrange(k.queue_demand("shared"), 0, -1)
    )
    assert demand == set(queued)
    for node, holder in redis.hgetall(k.reservations()).items():
        assert holder in queued and queued[holder].get("reserved_node") == node

    # counts equal the scan
    def free(key, g):
        return gpu_ok(g) and not excl.get(key) and not shared.get(key)

    busy = sum(1 for key in s["gpus"] if excl.get(key) or shared.get(key))
    available = sum(1 for key, g in s["gpus"].items() if free(key, g) and key[0] in alive)
    assert engine.counts() == {
        "allocations_active": len(live),
        "gpus_allocated": busy,
        "queue_depth": len(queued),
        "gpus_total": sum(1 for key in s["gpus"] if key[0] in alive),
        "gpus_available": available,
    }
    free_by_node = {n: 0 for n in s["nodes"]}
    for key, g in s["gpus"].items():
        free_by_node[key[0]] += free(key, g)
    assert {
        n: int(v) for n, v in redis.zrange(k.nodes_free(), 0, -1, withscores=True)
    } == free_by_node
    for node in s["nodes"]:
        listed = redis.hgetall(k.node_free_gpus(node))
        want = {
            idx: f"{g['memory_free_mb']}|{g['utilization']}|{g['uuid']}"
            for (n, idx), g in s["gpus"].items()
            if n == node and free((n, idx), g)
        }
        assert listed == want, f"node_free_gpus({node}) is stale"

    # nothing that fits is left waiting (best_effort: every queued request; strict: the head)
    order = [rid for rid in queue_ids]
    blocked: set = set()
    for rid, r in list(live.items()) + list(queued.items()):
        if r.get("depends_on_mode") == "ok":
            ends = {
                s["reqs"].get(d, {}).get("status", "gone")
                for d in json.loads(r.get("depends_on") or "[]")
            }
            # ok: granted only after every dependency was released; never left waiting on
            # one that ended otherwise (it is cancelled in the same step)
            assert ends <= (
                {"released", "gone"}
                if r["status"] == "allocated"
                else {"released", "gone", "queued", "allocated"}
            ), (rid, ends)
    for pos, rid in enumerate(order):
        r = queued[rid]
        deps = json.loads(r.get("depends_on") or "[]")
        deps_done = all(
            s["reqs"].get(d, {}).get("status") not in ("queued", "allocated") for d in deps
        )
        if deps_done:
            assert not fits(r, s["gpus"], excl, shared, alive, blocked), (
                f"queued {rid} (position {pos + 1}) fits now"
            )
        if engine.settings.scheduler.policy == "strict_fifo":
            break
        if r.get("reserved_node"):
            blocked.add(r["reserved_node"])
    return s


def model_ok(r, g) -> bool:
    import fnmatch

    glob = r.get("gpu_model") or "*"
    return fnmatch.fnmatchcase(str(g.get("name") or "").lower(), glob.lower())


def fits(r, gpus, excl, shared, alive, blocked, extra_free=()) -> bool:
    """Could request r be placed now (the placement rules, written plainly)?"""
    k, lo = int(r["required_gpus"]), float(r["min_memory_mb"])
    hi = float(r["max_memory_mb"]) or float("inf")
    util = float(r["max_utilization"])
    per_node: dict = {}
    allowed = set(json.loads(r.get("nodes") or "[]")) or None
    for key, g in gpus.items():
        node = key[0]
        if node not in alive or node in blocked or not gpu_ok(g):
            continue
        if (allowed is not None and node not in allowed) or not model_ok(r, g):
            continue
        if float(g.get("utilization") or 0) > util:
            continue
        holders_x = excl.get(key) and key not in extra_free
        if r["sharing"] == "shared":
            if holders_x:
                continue
            # max(reserved, used) + m <= total
            reserved = sum(int(x["min_memory_mb"]) for x in shared.get(key, []))
            cap = min(float(g["memory_total_mb"]) - reserved, float(g["memory_free_mb"]))
            if lo <= cap <= hi:
                return True
        else:
            if holders_x or shared.get(key):
                continue
            if lo <= float(g["memory_free_mb"]) <= hi:
                per_node[node] = per_node.get(node, 0) + 1
    return any(n >= k for n in per_node.values())


# --------------------------------------------------------------------------- state machine


class EngineMachine(RuleBasedStateMachine):
    redis = None
    settings = None
    #: scheduler options of the run; the overtake check ranks by (priority, FIFO), so it is
    #: only made when aging is off
    scheduler = {"aging_rate": 0, "reservation_after": 10**6}

    @initialize(policy=st.sampled_from(["best_effort", "strict_fifo"]))
    def setup(self, policy):
        self.redis.flushdb()
        self.clock = Clock()
        st_ = self.settings.replace(
            scheduler={
                "policy": policy,
                "max_queue_size": 12,
                "max_queued_per_owner": 12,
                **self.scheduler,
            }
        )
        self.engine = Engine(self.redis, st_, clock=self.clock)
        self.health: dict = {}
        self.util: dict = {}
        self.silent: set = set()
        for node in FLEET:
            self.engine.report_node(node, gpus_for(node))
        self.ids: list = []
        self.seq: dict = {}

    def report_all(self):
        for node in FLEET:
            if node not in self.silent:
                self.engine.report_node(
                    node, gpus_for(node, health=self.health.get(node), util=self.util.get(node))
                )

    def _before(self):
        return {rid: r for rid, r in scan(self.engine, self.redis)["reqs"].items()}

    def _check_no_overtake(self, before: dict, new_id=None):
        """Every grant of this step: no higher-ranked request still waiting could have used
        the capacity the grant took (post-step free GPUs plus those given to lower ranks)."""
        import json

        after = scan(self.engine, self.redis)
        granted = [
            rid
            for rid, r in after["reqs"].items()
            if r["status"] == "allocated" and (before.get(rid, {}).get("status") != "allocated")
        ]
        if not granted or self.engine.settings.scheduler.aging_rate:
            return
        waiting = [rid for rid, r in after["reqs"].items() if r["status"] == "queued"]
        rank = lambda rid: (-int(after["reqs"][rid]["priority"]), self.seq[rid])  # noqa: E731
        timeout = self.engine.settings.scheduler.node_heartbeat_timeout
        alive = {n for n, hb in after["nodes"].items() if hb >= self.clock.t - timeout}
        for h in waiting:
            hr = after["reqs"][h]
            deps = json.loads(hr.get("depends_on") or "[]")
            if any(after["reqs"].get(d, {}).get("status") in ("queued", "allocated") for d in deps):
                continue
            lower = [g for g in granted if rank(g) > rank(h)]
            if not lower:
                continue
            excl, shared = {}, {}
            for rid, r in after["reqs"].items():
                if r["status"] != "allocated" or rid in lower:
                    continue
                for idx in json.loads(r["gpu_ids"]):
                    key = (r["node"], str(idx))
                    (
                        shared.setdefault(key, []).append(r)
                        if r["sharing"] == "shared"
                        else excl.setdefault(key, []).append(rid)
                    )
            assert not fits(hr, after["gpus"], excl, shared, alive, set()), (
                f"{lower} overtook {h}, which fitted"
            )

    @rule(
        k=st.integers(1, 4),
        shared=st.booleans(),
        mem=st.sampled_from([0, 4000, 12000, 30000]),
        prio=st.integers(1, 10),
        dep=st.sampled_from([False, "any", "ok"]),
        ttl=st.sampled_from([None, 30, 300]),
        svc=st.sampled_from("ab"),
        model=st.sampled_from([None, None, "*h100*", "*A10", "nvidia h100 ?c*"]),
        nodes=st.sampled_from([None, None, ["n0"], ["n1", "n2"], ["n2", "gone"]]),
    )
    def allocate_any(self, k, shared, mem, prio, dep, ttl, svc, model, nodes):
        self.allocate(k, shared, mem, prio, dep, ttl, svc, model, nodes)

    def allocate(self, k, shared, mem, prio, dep, ttl, svc, model=None, nodes=None):
        req = {
            "service_name": svc,
            "required_gpus": 1 if shared else k,
            "sharing": "shared" if shared else "exclusive",
            "min_memory_mb": mem,
            "priority": prio,
            "max_utilization": 95,
            "gpu_model": model,
            "nodes": nodes,
        }
        if ttl:
            req["ttl_seconds"] = ttl
        if dep and self.ids:
            req["depends_on"] = [self.ids[-1]]
            if dep == "ok":
                req["depends_on_mode"] = "ok"
        before = self._before()
        try:
            rec = self.engine.allocate(req)
        except (errors.QueueFull, errors.Unsatisfiable):
            return
        except errors.ValidationFailed:
            assert dep  # a dependency whose history expired
            return
        self.seq[rec["id"]] = len(self.seq)
        self.ids.append(rec["id"])
        self._check_no_overtake(before)

    @rule(k=st.integers(1, 2), prio=st.integers(1, 10))
    def allocate_small(self, k, prio):
        """Small exclusive requests (the common case); a second rule so that allocations make
        up more of each run."""
        self.allocate(k=k, shared=False, mem=0, prio=prio, dep=False, ttl=60, svc="c")

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def release(self, data):
        rid = data.draw(st.sampled_from(self.ids))
        before = self._before()
        try:
            self.engine.release(rid)
        except errors.NotFound:
            assert before.get(rid, {}).get("status") not in ("queued", "allocated")
        self._check_no_overtake(before)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(self.ids))
        before = self._before()
        try:
            self.engine.cancel(rid)
            assert before[rid]["status"] == "queued"
        except errors.Conflict:
            assert before[rid]["status"] != "queued"
        self._check_no_overtake(before)

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), ttl=st.sampled_from([None, 10, 600]))
    def renew(self, data, ttl):
        rid = data.draw(st.sampled_from(self.ids))
        try:
            rec = self.engine.renew(rid, ttl)
            assert rec["expires_at"] > self.clock.t
        except errors.Conflict:
            pass

    def report_then_reap(self):
        """The monitors report, then the reaper runs: two engine calls, each checked on its
        own. A request whose dependency the reaper expires only becomes eligible then, so a
        grant made by a report before that did not overtake it."""
        before = self._before()
        self.report_all()
        self._check_no_overtake(before)
        before = self._before()
        self.engine.reap()
        self._check_no_overtake(before)

    @rule(seconds=st.sampled_from([1, 20, 100]))
    def time_passes(self, seconds):
        self.clock.t += seconds
        self.report_then_reap()

    @rule(
        node=st.sampled_from(sorted(FLEET)),
        idx=st.integers(0, 3),
        health=st.sampled_from(["ok", "degraded", "failed"]),
        util=st.sampled_from([0, 99]),
    )
    def telemetry(self, node, idx, health, util):
        self.health.setdefault(node, {})[idx] = health
        self.util.setdefault(node, {})[idx] = util
        before = self._before()
        self.report_all()
        self._check_no_overtake(before)

    @rule(node=st.sampled_from(sorted(FLEET)), idx=st.integers(0, 3), on=st.booleans())
    def cordon(self, node, idx, on):
        before = self._before()
        try:
            self.engine.set_gpu_schedulable(node, idx, on)
        except errors.NotFound:  # no such GPU, or its node was forgotten and is still silent
            assert idx >= FLEET[node][0] or node in self.silent
        self._check_no_overtake(before)

    @rule(node=st.sampled_from(sorted(FLEET)), on=st.booleans(), drain=st.booleans())
    def cordon_node(self, node, on, drain):
        before = self._before()
        try:
            view = self.engine.cordon_node(node, on, drain=drain, principal="ops")
        except errors.NotFound:  # forgotten and not back yet
            assert node in self.silent
            return
        assert view["cordoned"] is on
        assert view["draining"] if on and drain else not on and not view["draining"] or on
        self._check_no_overtake(before)

    @rule(node=st.sampled_from(sorted(FLEET)))
    def forget(self, node):
        before = self._before()
        try:
            out = self.engine.forget_node(node, principal="ops")
        except errors.Conflict:
            assert node not in self.silent
            return
        except errors.NotFound:
            return
        for rid in out["lost"]:
            assert before[rid]["status"] == "allocated" and before[rid]["node"] == node
            assert self.engine.get(rid)["status"] == "lost"
        self._check_no_overtake(before)

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), priority=st.integers(1, 10))
    def reprioritize(self, data, priority):
        rid = data.draw(st.sampled_from(self.ids))
        before = self._before()
        try:
            rec = self.engine.set_priority(rid, priority, principal="ops")
            assert before[rid]["status"] == "queued"
            assert rec["priority"] == priority or rec["status"] != "queued"
        except errors.Conflict:
            assert before[rid]["status"] != "queued"
        except errors.NotFound:
            return
        self._check_no_overtake(before)

    @rule(node=st.sampled_from(sorted(FLEET)))
    def node_goes_silent_or_returns(self, node):
        if node in self.silent:
            self.silent.discard(node)
        else:
            self.silent.add(node)
        self.clock.t += 31
        self.report_then_reap()

    @invariant()
    def invariants_hold(self):
        if hasattr(self, "engine"):
            check_invariants(self.engine, self.redis, self.clock.t)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        # after all releases and expiries no GPU is held
        release_all(self.engine, self.ids)
        self.silent.clear()
        self.clock.t += 10**6
        self.report_all()
        self.engine.reap()
        s = check_invariants(self.engine, self.redis, self.clock.t)
        assert all(
            not g.get("excl") and int(g.get("shared_n") or 0) == 0 for g in s["gpus"].values()
        )
        assert self.engine.counts()["gpus_allocated"] == 0


def test_engine_state_machine(redis, settings):
    run_machine(EngineMachine, redis, settings)


class AgingReservingMachine(EngineMachine):
    """Aging on and reservations after 20 s: long waits (time passes in 1-100 s steps) make
    requests reserve nodes, and the invariants still hold with those nodes blocked."""

    scheduler = {"aging_rate": 6.0, "reservation_after": 20}


def test_engine_state_machine_with_aging_and_reservations(redis, settings):
    run_machine(AgingReservingMachine, redis, settings)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_allocate_release_keeps_the_invariants(redis_url, settings):
    """Six threads, each with its own connection and engine (like six API replicas)."""
    import redis as redis_lib

    setup = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    st_ = settings.replace(scheduler={"max_queue_size": 100000})
    Engine(setup, st_).report_node("n0", gpus_for("n0"))
    Engine(setup, st_).report_node("n1", gpus_for("n1"))
    Engine(setup, st_).report_node("n2", gpus_for("n2"))
    failures: list = []
    granted_ids: list = []

    def worker(seed: int):
        rnd = random.Random(seed)
        client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
        engine = Engine(client, st_)
        mine: list = []
        try:
            for _ in range(80):
                if mine and rnd.random() < 0.45:
                    rid = mine.pop(rnd.randrange(len(mine)))
                    try:
                        engine.release(rid)
                    except errors.NotFound:
                        pass
                else:
                    shared = rnd.random() < 0.3
                    rec = engine.allocate(
                        {
                            "service_name": f"t{seed}",
                            "sharing": "shared" if shared else "exclusive",
                            "required_gpus": 1 if shared else rnd.choice([1, 1, 2, 3]),
                            "min_memory_mb": rnd.choice([0, 4000, 12000]),
                            "priority": rnd.randint(1, 10),
                            "ttl_seconds": 3600,
                        }
                    )
                    mine.append(rec["id"])
                    if rec["status"] == "allocated":
                        granted_ids.append(rec["id"])
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, [str(f) for f in failures]
    engine = Engine(setup, st_)
    now = engine.now()
    check_invariants(engine, setup, now)
    assert engine.stats()["scheduler"]["granted"] >= len(granted_ids) > 0
    # drain: release everything; nothing stays held
    for rec in engine.snapshot()["allocations"]:
        engine.release(rec["id"])
    while engine.counts()["allocations_active"]:
        for rec in engine.snapshot()["allocations"]:
            engine.release(rec["id"])
    for rec in engine.snapshot()["queue"]:
        engine.cancel(rec["id"])
    check_invariants(engine, setup, engine.now())
    assert engine.counts()["gpus_allocated"] == 0
    setup.close()


# --------------------------------------------------------------------------- ETA (issue 14)


def eta_lower_bound(view, rec) -> float:
    """The earliest a queued request can start by the lease ends in its way, written plainly:
    every live dependency's lease end, and on some allowed node the k-th earliest time a GPU
    that could ever hold it is free (now when nothing holds it, else its holders' lease ends;
    a shared request may join shared holders)."""
    import fnmatch
    import math

    now = view["now"]
    held: dict = {}
    ends = {}
    shared = rec.get("sharing") == "shared"
    for a in view["wait"]["held"]:
        end = a["expires_at"] if a["expires_at"] is not None else math.inf
        ends[a["id"]] = end
        if shared and a.get("sharing") == "shared":
            continue
        for idx in a["gpu_ids"] or []:
            held.setdefault((a["node"], int(idx)), []).append(end)
    bound = max([now] + [ends[d] for d in rec.get("depends_on") or [] if d in ends])
    k = 1 if shared else int(rec["required_gpus"])
    allowed = set(rec.get("nodes") or []) or None
    glob = (rec.get("gpu_model") or "*").lower()
    per_node: dict = {}
    for g in view["gpus"]:
        if not g["schedulable"] or g["memory_total_mb"] < float(rec["min_memory_mb"] or 0):
            continue
        if allowed is not None and g["node"] not in allowed:
            continue
        if not fnmatch.fnmatchcase(str(g["name"]).lower(), glob):
            continue
        per_node.setdefault(g["node"], []).append(max(held.get((g["node"], g["index"])) or [now]))
    best = min((sorted(t)[k - 1] for t in per_node.values() if len(t) >= k), default=math.inf)
    return max(bound, best)


class EtaMachine(EngineMachine):
    """Every step of the engine's random operations (renewals, cancels, cordons, silent nodes,
    dependencies, shared requests): no queued request's ETA is earlier than the lease ends it
    depends on."""

    @invariant()
    def no_eta_before_the_lease_ends_in_its_way(self):
        from app import waiting

        if not hasattr(self, "engine"):
            return
        view = self.engine.wait_view(waiting.MAX_SIMULATED)
        out = waiting.explain(view, self.engine.settings.scheduler)
        for rec in view["wait"]["queue"]:
            w = out[rec["id"]]
            assert w["reason"] in waiting.REASONS
            if w["eta"] is not None:
                assert w["eta"] >= eta_lower_bound(view, rec) - 1e-6, (rec["id"], w)


def test_no_eta_is_earlier_than_the_lease_ends_in_its_way(redis, settings):
    run_machine(EtaMachine, redis, settings)
