"""Why each queued request waits (``reason``) and when it should be granted (``eta``).

One rule, one place: the API's 202 answer, ``GET /gpu/requests/<id>``, the queue of
``/gpu/list`` and the console all call :func:`explain`. It works in Python over one consistent
read (``Engine.snapshot(wait=n)``: the live allocations with their lease ends, the head of the
queue with what placement needs, the reservations), so it costs the engine's hot path nothing.

``reason`` (checked in this order, against the fleet as it is now):

* ``dependency``  a ``depends_on`` request is still queued or live;
* ``quota``       what its tenant holds now plus its own GPUs exceed the tenant's ``max_gpus``;
* ``capacity``    no GPUs free now fit it, reservations aside;
* ``reservation`` GPUs that fit it are free but held back for a request ahead of it (or, a
                  preemption's hold, for the request it was made for, whatever its rank);
* ``priority``    it fits, but another request goes first (strict_fifo's head, or the pass
                  that will grant it has not run yet).

``eta`` is what Slurm's ``squeue --start`` does: the queue is walked in the order the
scheduler grants (rank order; the fair pass's with fair share), on a simulated timeline. Time jumps from one lease end
(``expires_at``) to the next; there the GPUs come free and the walk places what fits with the
engine's placement rules (best fit over nodes, tightest fit for shared), its reservations
(a request that waited ``reservation_after`` holds the node where it starts soonest; with
tenants configured, ``heads``, so does each tenant's first eligible exclusive request that
does not fit) and its backfill rule (a request ranked behind may use a reserved node when its
lease ends by the reserved start; with tenants configured also the node's spare GPUs). A
simulated grant holds its GPUs for its own lease. ``eta`` is None when it cannot be known: a
lease without expiry in the way, a dependency beyond the simulated head, or the cap below
reached.

With ``tenants.fair_share`` the walk is the fair pass's (:func:`_fair_pass`).

Preemption: an allocation marked ``preempting`` ends at its ``preempt_at`` (its ``expires_at``
is capped there). A node held for the request a guarantee preemption was made for
(``wait.holds``) goes to that request only in the rank walk (no other request, no backfill,
until it is granted or leaves); the fair walk treats the hold as its reservation, as the
engine's does. The holders of reservations ranked beyond the simulated head
(``wait.beyond``, one per node at most) are simulated after it, so their nodes are held back
as the engine holds them.

Load model: each tenant keeps its current load. Every allocation that ends on the timeline is
submitted again at that instant by its tenant, same GPUs, priority and lease (a phantom: it
takes capacity, nobody reads its estimate; :func:`_resubmit`). The head request's estimate is
the exception: it assumes nothing new arrives (then it is its grant, within the reaper's
period, when every lease is honoured).

Bounds: at most :data:`MAX_SIMULATED` queued requests are simulated (the rest get a reason
and ``eta: null``), :data:`MAX_PHANTOMS` phantoms, and the walk stops after :data:`MAX_STEPS`
placement attempts, or once the requests asked about are placed.
Assumptions: nobody releases early or renews, GPUs that come free report their whole memory
and no utilization; docs/scheduling.md says when the estimate is wrong.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from typing import Any

from app.request_rules import MAX_SHARED_PER_GPU

#: Queued requests simulated at most (from the head of the queue).
MAX_SIMULATED = 200
#: Placement attempts the simulation makes at most before it gives up (the rest: eta None).
MAX_STEPS = 20_000
#: Queue ranks within which each tenant's head reserves (the engine's HEAD_SCAN).
HEAD_SCAN = 500
#: Reservations one pass makes at most (the engine's MAX_NEW_RES), and how far past where a
#: fair pass stopped it looks for the head that reserves (SWEEP).
MAX_NEW_RES = 8
SWEEP = 100
#: Each tenant keeps its current load: an allocation that ends in the simulation is
#: submitted again at that instant, as a phantom of its tenant (same GPUs, priority, lease).
PHANTOMS = True
#: Phantoms one simulation makes at most, and a tenant's phantoms waiting at once at most.
MAX_PHANTOMS = 1000
PHANTOM_QUEUE = 8
REASONS = ("capacity", "quota", "dependency", "reservation", "priority")
INF = math.inf


def tenant_of(rec: dict[str, Any]) -> str:
    """Whose head a request is: its tenant, else (as the engine's queue shares) its owner,
    else its service."""
    if rec.get("tenant"):
        return str(rec["tenant"])
    if rec.get("owner"):
        return "o:" + str(rec["owner"])
    return "s:" + str(rec.get("service_name") or "")


class _Gpu:
    __slots__ = ("node", "idx", "ok", "total", "free", "util", "name", "excl", "shared", "held")

    def __init__(self, g: dict[str, Any]):
        self.node = str(g.get("node") or "")
        self.idx = int(g.get("index") or 0)
        self.ok = bool(g.get("schedulable"))
        self.total = float(g.get("memory_total_mb") or 0)
        self.free = float(g.get("memory_free_mb") or 0)
        self.util = float(g.get("utilization") or 0)
        self.name = str(g.get("name") or "").lower()
        self.excl = 0.0  # the exclusive holder's lease end (0: none)
        self.shared: list[tuple[float, float]] = []  # (lease end, MB) of shared holders
        self.held = False  # held when the walk started (its readings are the holder's)

    def excl_free(self, t: float) -> bool:
        return self.excl <= t and all(end <= t for end, _ in self.shared)

    def mem_free(self) -> float:
        # a GPU that came free is assumed idle (its whole memory), one free now as read
        return self.total if self.held else self.free

    def room(self, t: float) -> float:
        """Memory a shared request may reserve at t: total - max(reserved, used); -1 (none,
        not even for 0 MB) while MAX_SHARED_PER_GPU shared allocations hold it."""
        staying = [mb for end, mb in self.shared if end > t]
        if len(staying) >= MAX_SHARED_PER_GPU:
            return -1.0
        reserved = sum(staying)
        cap = self.total - reserved
        return min(cap, self.free) if not self.held else cap

    def busy_until(self, shared_ok: bool, t: float) -> float:
        """When the engine's reservations count this GPU free for an exclusive request
        (shared_ok: for a shared one). As in the engine (node_start), shared holders in the way
        of an exclusive request count as never: it does not look up their leases."""
        if not shared_ok and any(end > t for end, _ in self.shared):
            return INF
        return self.excl


class _Req:
    __slots__ = (
        "id",
        "rec",
        "k",
        "shared",
        "minm",
        "maxm",
        "util",
        "pref",
        "nodes",
        "model",
        "lease",
        "deps",
        "tenant",
        "reserved",
        "submitted",
        "deadline",
        "shape",
        "prio",
        "phantom",
        "unres",
    )

    def __init__(self, rec: dict[str, Any]):
        self.id = rec["id"]
        self.rec = rec
        self.shared = rec.get("sharing") == "shared"
        self.k = 1 if self.shared else max(int(rec.get("required_gpus") or 1), 1)
        self.minm = float(rec.get("min_memory_mb") or 0)
        self.maxm = float(rec.get("max_memory_mb") or 0)
        util = rec.get("max_utilization")
        self.util = 100.0 if util is None else float(util)
        self.pref = {int(p) for p in rec.get("preferred_gpus") or []}
        self.nodes = set(rec.get("nodes") or []) or None
        self.model = (rec.get("gpu_model") or "").lower() or None
        lease = rec.get("lease_seconds")
        self.lease = INF if lease is None or float(lease) < 0 else float(lease)
        self.deps = list(rec.get("depends_on") or [])
        self.tenant = tenant_of(rec)
        self.reserved = rec.get("reserved_node") or None
        self.submitted = float(rec.get("submitted_at") or 0)
        timeout = rec.get("queue_timeout_seconds")
        self.deadline = INF if timeout is None else self.submitted + float(timeout)
        self.prio = float(rec.get("priority") or 0)
        since = rec.get("unreserved_since")
        #: reservation_after counts from here (the engine restarts it when a reserve fails)
        self.unres = float(since) if since not in (None, "") else self.submitted
        self.phantom = False
        self.shape = (
            self.shared,
            self.k,
            self.minm,
            self.maxm,
            self.util,
            tuple(sorted(self.pref)),
            tuple(sorted(self.nodes or ())),
            self.model,
        )

    def static_ok(self, g: _Gpu) -> bool:
        """GPU qualifies whatever holds it: schedulable, big enough, the model, the node."""
        if not g.ok or g.total < self.minm:
            return False
        if self.nodes is not None and g.node not in self.nodes:
            return False
        return self.model is None or fnmatch.fnmatchcase(g.name, self.model)


def _backfills(r: _Req, t: float, start: float) -> bool:
    """The engine's backfill: an exclusive request whose lease ends by the reserved start."""
    return not r.shared and r.lease < INF and start < INF and t + r.lease <= start


class _Sim:
    """The fleet on a simulated timeline: which GPU is held until when."""

    def __init__(self, snap: dict[str, Any], sched, limits):
        self.now = float(snap["now"])
        self.policy = getattr(sched, "policy", "best_effort")
        self.res_after = float(getattr(sched, "reservation_after", 600))
        self.aging = float(getattr(sched, "aging_rate", 0) or 0) / 60.0
        self.limits = limits
        self.gpus: dict[str, list[_Gpu]] = {}
        self.by_key: dict[tuple[str, int], _Gpu] = {}
        for g in snap.get("gpus", []):
            gpu = _Gpu(g)
            self.gpus.setdefault(gpu.node, []).append(gpu)
            self.by_key[(gpu.node, gpu.idx)] = gpu
        for gs in self.gpus.values():
            gs.sort(key=lambda g: g.idx)
        self.node_order = sorted(self.gpus)
        #: request id -> when it ends (live allocations, then simulated grants)
        self.ends: dict[str, float] = {}
        self.held_by_tenant: dict[str, int] = {}
        self.holds: list[tuple[float, str, int]] = []  # (lease end, tenant, GPUs)
        #: allocations with a known lease end, as (end, n, the record a phantom copies)
        self.ending: list[tuple[float, int, dict[str, Any]]] = []
        self.phantoms = PHANTOMS
        self.seq = 0
        self.held_hit = False
        #: GPUs free per node at free_at = (time, grants made): the placement's index
        self.granted = 0
        self.free_at: tuple[float, int] | None = None
        self.free_by_node: dict[str, int] = {}
        wait = snap.get("wait") or {}
        for a in wait.get("held", []):
            end = a.get("expires_at")
            end = INF if end is None else float(end)
            self.ends[a["id"]] = end
            try:
                self._hold(a.get("node") or "", a.get("gpu_ids") or [], a, end)
            except (TypeError, ValueError, OverflowError):
                continue  # a damaged record: the GPUs it names cannot be told
            t = tenant_of(a)
            self.held_by_tenant[t] = self.held_by_tenant.get(t, 0) + len(a.get("gpu_ids") or [])
            self.holds.append((end, t, len(a.get("gpu_ids") or [])))
            if end < INF:
                template = {
                    "tenant": a.get("tenant"),
                    "owner": a.get("owner"),
                    "service_name": a.get("service_name"),
                    "sharing": a.get("sharing"),
                    "required_gpus": len(a.get("gpu_ids") or []) or 1,
                    "min_memory_mb": a.get("min_memory_mb"),
                    "lease_seconds": a.get("lease_seconds"),
                    "priority": a.get("priority"),
                }
                self.seq += 1
                heapq.heappush(self.ending, (end, self.seq, template))
        #: status of dependencies that are neither live nor in the simulated head
        self.dep_status: dict[str, str | None] = dict(wait.get("deps") or {})
        #: queued requests of the simulated head not granted yet, and the reserved nodes
        self.pending: set[str] = set()
        self.reserved_nodes: set[str] = set()
        #: tenants.fair_share: tenant -> [decayed usage (GPU-seconds), weight], the half-life
        #: and the default weight; None: the queue's own order
        self.fair: dict[str, list[float]] | None = None
        self.half_life, self.default_weight, self.fair_at = 3600.0, 1.0, self.now
        #: tenants configured (settings.tenants_configured): each tenant's head reserves at
        #: once and a reserved node's spare GPUs go to anyone; else only reservation_after
        self.heads = False
        #: queued requests ranked beyond the simulated head that hold a reservation (simulated
        #: after it: their node is held back as the engine holds it)
        self.beyond: list[_Req] = []
        #: preemption holds: node -> the queued request it is held for (the rank walk gives
        #: it to no one else, no backfill, until that request is granted or leaves)
        self.held_for: dict[str, str] = {}

    def _hold(self, node: str, gpu_ids, rec, end: float) -> None:
        for idx in gpu_ids:
            g = self.by_key.get((node, int(idx)))
            if g is None:
                continue
            g.held = True
            if rec.get("sharing") == "shared":
                g.shared.append((end, float(rec.get("min_memory_mb") or 0)))
            else:
                g.excl = end

    # ------------------------------------------------------------------ placement
    def _free_gpus(self, r: _Req, node: str, t: float) -> list[_Gpu]:
        out = []
        for g in self.gpus[node]:
            if not r.static_ok(g) or not g.excl_free(t):
                continue
            mem, util = g.mem_free(), (0.0 if g.held else g.util)
            if mem < r.minm or (r.maxm > 0 and mem > r.maxm) or util > r.util:
                continue
            out.append(g)
        return out

    def _held_back(self, r: _Req, node: str, t: float, blocked: dict) -> bool:
        b = blocked.get(node)
        if b is None:
            return False
        start, spare = b
        if _backfills(r, t, start):
            return False  # free again by the reserved start
        if spare < r.k:
            self.held_hit = True
            return True
        return False

    def place(self, r: _Req, t: float, blocked: dict) -> tuple[str, list[_Gpu]] | None:
        self.held_hit = False  # set when a reserved node was held back from r
        if r.shared:
            return self._place_shared(r, t, blocked)
        want = min(len(r.pref), r.k)
        best = None
        free = self.free_count(t)
        for node in self.node_order:
            if r.nodes is not None and node not in r.nodes:
                continue
            # as the engine's index of free GPUs per node: too few free, not looked at
            nfree = free[node]
            if nfree < r.k or self._held_back(r, node, t, blocked):
                continue
            q = self._free_gpus(r, node, t)
            if len(q) < r.k:
                continue
            p = min(sum(1 for g in q if g.idx in r.pref), want)
            key = (-p, nfree, node)
            if best is None or key < best[0]:
                best = (key, node, q)
        if best is None:
            return None
        _, node, q = best
        q.sort(key=lambda g: (g.idx not in r.pref, -g.mem_free(), g.util, g.idx))
        return node, q[: r.k]

    def _place_shared(self, r: _Req, t: float, blocked: dict):
        cands = []
        for node in self.node_order:
            if r.nodes is not None and node not in r.nodes:
                continue
            if self._held_back(r, node, t, blocked):
                continue
            for g in self.gpus[node]:
                if not r.static_ok(g) or g.excl > t:
                    continue
                room = g.room(t)
                if room < r.minm or (r.maxm > 0 and room > r.maxm):
                    continue
                if (0.0 if g.held else g.util) > r.util:
                    continue
                cands.append((room, f"{g.node}|{g.idx}", g))
        if not cands:
            return None
        cands.sort(key=lambda c: (c[0], c[1]))
        for _, _, g in cands:
            if not r.pref or g.idx in r.pref:
                return g.node, [g]
        return cands[0][2].node, [cands[0][2]]

    def grant(self, r: _Req, node: str, chosen: list[_Gpu], t: float) -> None:
        self.granted += 1
        end = t + r.lease
        for g in chosen:
            if r.shared:
                g.shared.append((end, r.minm))
            else:
                g.excl = end
        self.ends[r.id] = end
        self.held_by_tenant[r.tenant] = self.held_by_tenant.get(r.tenant, 0) + r.k
        self.holds.append((end, r.tenant, r.k))
        if end < INF:
            self.seq += 1
            heapq.heappush(self.ending, (end, self.seq, r.rec))

    def free_count(self, t: float) -> dict[str, int]:
        """node -> GPUs free for an exclusive request at t (kept until t or a grant changes)."""
        key = (t, self.granted)
        if self.free_at != key:
            self.free_by_node = {
                node: sum(1 for g in gs if g.ok and g.excl_free(t))
                for node, gs in self.gpus.items()
            }
            self.free_at = key
        return self.free_by_node

    def max_free(self, t: float) -> int:
        """The most GPUs free for an exclusive request on one node at t."""
        return max(self.free_count(t).values(), default=0)

    def node_start(self, r: _Req, node: str, t: float) -> tuple[float, int] | None:
        """The engine's reserved start on a node: the k-th earliest time a qualifying GPU is
        free, and how many more are free by then."""
        times = sorted(max(g.busy_until(r.shared, t), t) for g in self.gpus[node] if r.static_ok(g))
        if len(times) < r.k:
            return None
        start = times[r.k - 1]
        return start, sum(1 for x in times[r.k :] if x <= start)

    def reserve(self, r: _Req, t: float, blocked: dict) -> bool:
        """r holds its node back from those behind it (False: no node to reserve)."""
        if r.reserved is None:
            best = None
            for node in self.node_order:
                if node in blocked or (r.nodes is not None and node not in r.nodes):
                    continue
                if node in self.reserved_nodes:
                    continue
                s = self.node_start(r, node, t)
                if s is not None and (best is None or s[0] < best[0]):
                    best = (s[0], node)
            if best is None:
                return False
            r.reserved = best[1]
            self.reserved_nodes.add(best[1])
        s = self.node_start(r, r.reserved, t) if r.reserved in self.gpus else None
        if s is None:
            s = (INF, 0)
        blocked[r.reserved] = s if self.heads else (s[0], 0)  # spare GPUs with tenants only
        return True

    def deps_done(self, r: _Req, t: float) -> bool | None:
        """True / False at t; None when it cannot be known (a dependency beyond the head)."""
        for d in r.deps:
            if d in self.ends:
                if self.ends[d] > t:
                    return False
            elif d in self.pending:
                return False
            elif self.dep_status.get(d) in ("queued", "allocated", "preempting"):
                return None
        return True

    def share(self, tenant: str) -> float:
        u, w = (self.fair or {}).get(tenant, (0.0, self.default_weight))
        return (u / 3600.0 + self.held_by_tenant.get(tenant, 0)) / (w or 1.0)

    def accrue(self, t: float) -> None:
        """Time moves to t: what ended no longer counts as held; with fair share, usage
        decays and grows with what each tenant held."""
        if t <= self.fair_at:
            return
        if self.fair is not None:
            d = 2.0 ** (-(t - self.fair_at) / self.half_life)
            for tenant in set(self.fair) | set(self.held_by_tenant):
                u, w = self.fair.get(tenant, (0.0, self.default_weight))
                held = self.held_by_tenant.get(tenant, 0)
                self.fair[tenant] = [u * d + held * (1 - d) * self.half_life / math.log(2), w]
        self.held_by_tenant = dict.fromkeys(self.held_by_tenant, 0)
        for end, tenant, k in self.holds:
            if end > t:
                self.held_by_tenant[tenant] = self.held_by_tenant.get(tenant, 0) + k
        self.fair_at = t

    def over_quota(self, r: _Req) -> bool:
        cap = self.limits(r.tenant) if self.limits else None
        return cap is not None and self.held_by_tenant.get(r.tenant, 0) + r.k > cap


def _new_sim(snap: dict[str, Any], sched, limits, fair, heads) -> tuple[_Sim, list[_Req], set]:
    """The fleet of ``snap`` on a timeline at its ``now``, its simulated head (the first queued
    requests), and the ids of damaged records among them (no reason, no estimate)."""
    sim = _Sim(snap, sched, limits)
    sim.heads = heads
    if fair is not None:
        sim.fair = {k: [float(u), float(w)] for k, (u, w) in fair["tenants"].items()}
        sim.half_life = float(fair["half_life"])
        sim.default_weight = float(fair["default_weight"])
    head = []
    damaged: set[str] = set()
    wait = snap.get("wait") or {}
    for rec in wait.get("queue", []):
        try:
            head.append(_Req(rec))
        except (TypeError, ValueError, OverflowError, KeyError):
            damaged.add(str(rec.get("id")))
    ids = {r.id for r in head}
    for rec in wait.get("beyond", []):
        try:
            r = _Req(rec)
        except (TypeError, ValueError, OverflowError, KeyError):
            continue  # a damaged holder: its reservation is not simulated
        if r.id not in ids and r.reserved:
            sim.beyond.append(r)
    sim.pending = {r.id for r in head} | {r.id for r in sim.beyond}
    sim.reserved_nodes = {r.reserved for r in head + sim.beyond if r.reserved}
    sim.held_for = {
        node: rid
        for node, rid in (wait.get("holds") or {}).items()
        if rid in sim.pending and node in sim.gpus
    }
    return sim, head, damaged


def explain(
    snap: dict[str, Any],
    sched=None,
    *,
    records: list[dict[str, Any]] | None = None,
    limits=None,
    fair: dict[str, Any] | None = None,
    heads: bool = False,
) -> dict[str, dict[str, Any]]:
    """request id -> {"reason", "eta" (epoch seconds or None)} for the queued requests of the
    page (``snap["queue"]``) and of ``records`` (with neither: every simulated one).
    ``snap`` comes from ``Engine.snapshot(wait=n)``; ``sched`` is the scheduler settings
    (policy, reservation_after, aging_rate); ``limits(tenant)`` gives a tenant's max_gpus
    (None: no cap); ``fair`` (tenants.fair_share): {"tenants": {tenant: (decayed usage in
    GPU-seconds, weight)}, "half_life", "default_weight"} orders the simulation across tenants
    as the fair pass does; ``heads``: tenants are configured (``settings.tenants_configured``),
    so each tenant's head reserves at once, as the engine does then."""
    sim, head, damaged = _new_sim(snap, sched, limits, fair, heads)
    # what the caller asked about: the page and ``records``; with neither, the whole head
    targets: dict[str, dict[str, Any]] = {}
    for rec in list(snap.get("queue", [])) + list(records or []):
        if rec.get("status", "queued") == "queued" and rec.get("id"):
            targets[rec["id"]] = rec
    if not targets:
        targets = {r.id: r.rec for r in head}
    reasons: dict[str, str] = {}
    now = sim.now

    # the reasons, against the fleet as it is now and the reservations of those ahead; a node
    # a preemption holds is held back from every other request, whatever its rank
    blocked_now: dict = {node: (INF, 0) for node in sim.held_for}
    seen: set[str] = set()
    for rank, r in enumerate(head, 1):
        reasons[r.id] = _reason(sim, r, now, blocked_now)
        if reasons[r.id] != "priority":
            eligible = reasons[r.id] in ("capacity", "reservation")
            pending = reasons[r.id] == "dependency"
            _maybe_reserve(sim, r, now, blocked_now, seen, rank, eligible, pending)
            if sim.held_for.get(r.reserved) == r.id:
                blocked_now[r.reserved] = (INF, 0)  # held, not merely reserved
    for rid, rec in targets.items():
        if rid not in reasons and rid not in damaged:
            try:
                reasons[rid] = _reason(sim, _Req(rec), now, blocked_now)
            except (TypeError, ValueError, OverflowError, KeyError):
                damaged.add(rid)

    # the timeline, from the engine's reservations (those the reasons made are left behind):
    # with phantoms (each tenant keeps its load), except for the head request, whose estimate
    # assumes nothing new arrives (then it is its grant, within the reaper's period)
    eta = _timeline(snap, sched, limits, fair, heads, set(targets), PHANTOMS)
    first = head[0].id if head else None
    if PHANTOMS and first in targets:
        eta[first] = _timeline(snap, sched, limits, fair, heads, {first}, False).get(first)
    return {rid: {"reason": reasons.get(rid), "eta": eta.get(rid)} for rid in targets}


def _timeline(snap, sched, limits, fair, heads, wanted: set, phantoms: bool) -> dict:
    """request id -> simulated grant time (None: unknown) for the ``wanted`` ones."""
    sim, head, _ = _new_sim(snap, sched, limits, fair, heads)
    sim.phantoms = phantoms
    eta: dict[str, float | None] = {}
    try:
        _walk(sim, head, eta, wanted)
    except (TypeError, ValueError, OverflowError):  # a damaged record: no estimate at all
        eta.clear()
    return eta


def _reason(sim: _Sim, r: _Req, now: float, blocked: dict) -> str:
    done = sim.deps_done(r, now)
    if done is not True:
        return "dependency"
    if sim.over_quota(r):
        return "quota"
    if sim.place(r, now, {}) is None:
        return "capacity"
    if sim.held_for.get(r.reserved) == r.id:  # its own hold is not held back from it
        blocked = {n: b for n, b in blocked.items() if n != r.reserved}
    if sim.place(r, now, blocked) is None:
        return "reservation"
    return "priority"


def _maybe_reserve(
    sim: _Sim,
    r: _Req,
    t: float,
    blocked: dict,
    seen: set,
    rank: int,
    eligible: bool = True,
    deps_pending: bool = False,
) -> None:
    """The engine's reservation rule: a request that holds one keeps it; an eligible one
    (dependencies done; ``eligible``) waiting reservation_after reserves; with tenants
    configured (sim.heads) each tenant's first request not placed is its head, and reserves
    when it is exclusive and eligible. As in the engine, once one finds no node to reserve, no
    other reserves in that pass; one that waited reservation_after for its dependencies
    (``deps_pending``) waits reservation_after again."""
    if sim.policy == "strict_fifo":
        return
    head = False
    if sim.heads and rank <= HEAD_SCAN and r.tenant not in seen:
        seen.add(r.tenant)
        head = eligible and not r.shared
    if r.reserved and _unreserve_over_quota(sim, r):
        return
    if r.reserved:
        sim.reserve(r, t, blocked)
    elif (
        eligible
        and (head or t - r.unres >= sim.res_after)
        and None not in seen
        and not sim.over_quota(r)
    ):
        if not sim.reserve(r, t, blocked):
            r.unres = t  # the engine waits reservation_after again
            seen.add(None)  # None: no tenant's name; marks the pass done reserving
    elif (deps_pending or sim.over_quota(r)) and t - r.unres >= sim.res_after and None not in seen:
        r.unres = t  # so does one waiting for its dependencies or its tenant's max_gpus


def _unreserve_over_quota(sim: _Sim, r: _Req) -> bool:
    """The engine's rule (reservations.lua, unreserve_over_quota): a reservation whose holder
    its tenant's max_gpus holds back is dropped by the pass that meets it (a preemption's hold
    is not); the holder counts as unreserved since its submission. True when dropped."""
    if sim.held_for.get(r.reserved) == r.id or not sim.over_quota(r):
        return False
    sim.reserved_nodes.discard(r.reserved)
    r.reserved = None
    r.unres = r.submitted
    return True


def _walk(sim: _Sim, head: list[_Req], eta: dict[str, float | None], wanted: set) -> None:
    """The timeline: a pass now, then one at each lease end (the engine's pass on release),
    where the allocations that ended come back as phantoms (:func:`_resubmit`)."""
    t = sim.now
    waiting = list(head[:MAX_SIMULATED]) + sim.beyond
    steps = 0
    made = 0  # phantoms made
    while waiting:
        if sim.fair is None:
            steps += _rank_pass(sim, waiting, t, eta)
        else:
            steps += _fair_pass(sim, waiting, t, eta)
        waiting = [r for r in waiting if r.id not in eta]
        steps += 1
        if steps > MAX_STEPS or not any(r.id in wanted for r in waiting):
            break  # what was asked is known (those behind it cannot change it)
        # the next time capacity appears: the earliest lease end after t
        end = INF
        for gs in sim.gpus.values():
            for g in gs:
                if t < g.excl < end:
                    end = g.excl
                for e, _ in g.shared:
                    if t < e < end:
                        end = e
        if end == INF:
            break  # only leases without expiry in the way: unknown
        # a queue timeout before it (the reaper's, then a pass: a reservation it held is free)
        for r in waiting:
            if t <= r.deadline < end and r.reserved:
                end = r.deadline + 1e-6
        sim.accrue(end)
        t = end
        if sim.phantoms and made < MAX_PHANTOMS:
            made += _resubmit(sim, waiting, t, MAX_PHANTOMS - made)
    for r in waiting:
        if not r.phantom:
            eta.setdefault(r.id, None)


def _rank_pass(sim: _Sim, walk: list[_Req], t: float, eta: dict) -> int:
    """One pass of the engine's rank walk (pass.lua): rank order; what fits is granted, the
    rest may reserve. Returns the placement attempts made."""
    strict = sim.policy == "strict_fifo"
    max_free = sim.max_free(t)
    if max_free == 0 and not any(r.shared for r in walk) and t > sim.now:
        return 0  # nothing can fit (the engine's nothing_fits): on to the next lease end
    # a preemption's hold: its node is held back from every other request from the start
    held = {rid: node for node, rid in sim.held_for.items()}
    blocked: dict = {node: (INF, 0) for node in sim.held_for}
    seen: set = set()
    failed: set = set()
    fail_lease: dict = {}
    steps = 0
    for rank, r in enumerate(walk, 1):
        done = _deps_done_or_gone(sim, r, t, eta)
        if done is None:
            continue
        placed = None
        hn = held.get(r.id)
        if done and not sim.over_quota(r) and (r.shared or r.k <= max_free):
            shortest = fail_lease.get(r.shape)
            if hn is not None:
                # a holder is tried whatever failed before it, its own node included
                steps += 1
                hb = blocked.pop(hn)
                placed = sim.place(r, t, blocked)
                if placed is None:
                    blocked[hn] = hb
            elif r.shape not in failed and (shortest is None or r.lease < shortest):
                steps += 1
                placed = sim.place(r, t, blocked)
                if placed is None and blocked:
                    # held back: a lease as long or longer fails too (the engine's rule)
                    fail_lease[r.shape] = r.lease
                elif placed is None:
                    failed.add(r.shape)
        if placed is not None:
            if hn is not None:
                blocked.pop(hn, None)
            _granted(sim, r, placed, t, blocked, eta)
            max_free = sim.max_free(t)
            continue
        if strict:
            if not sim.over_quota(r):
                break  # the head blocks, unless only its tenant's quota holds it back
            continue
        _maybe_reserve(sim, r, t, blocked, seen, rank, bool(done), not done)
        if hn is not None:
            blocked[hn] = (INF, 0)  # held, not merely reserved: no backfill, no spare
    return steps


def _deps_done_or_gone(sim: _Sim, r: _Req, t: float, eta: dict) -> bool | None:
    """Whether r's dependencies are done at t; None when r leaves the simulation here with no
    estimate (its queue timeout comes first, or a dependency's end cannot be known). Both
    passes start each request so."""
    if r.deadline < t:
        _timed_out(sim, r, eta)
        return None
    done = sim.deps_done(r, t)
    if done is None:
        eta[r.id] = None
        sim.pending.discard(r.id)
    return done


def _timed_out(sim: _Sim, r: _Req, eta: dict) -> None:
    """r's queue timeout comes first: no estimate; the node it reserved is free to reserve."""
    eta[r.id] = None
    sim.pending.discard(r.id)
    if r.reserved:
        sim.reserved_nodes.discard(r.reserved)
        if sim.held_for.get(r.reserved) == r.id:
            del sim.held_for[r.reserved]
        r.reserved = None


def _granted(sim: _Sim, r: _Req, placed, t: float, blocked: dict, eta: dict) -> None:
    """r is granted at t where ``placed`` says; a reserved node's spare GPUs it takes."""
    node, chosen = placed
    b = blocked.get(node)
    joins = r.shared and any(end > t for end, _ in chosen[0].shared)
    if b is not None and not _backfills(r, t, b[0]) and not joins:
        blocked[node] = (b[0], b[1] - r.k)
    sim.grant(r, node, chosen, t)
    sim.pending.discard(r.id)
    if r.reserved:
        sim.reserved_nodes.discard(r.reserved)
        if sim.held_for.get(r.reserved) == r.id:
            del sim.held_for[r.reserved]  # the grant ends its hold (the engine's dequeue)
    eta[r.id] = t


#: The fields a phantom copies from the allocation it stands for.
_PHANTOM_FIELDS = (
    "tenant",
    "owner",
    "service_name",
    "sharing",
    "min_memory_mb",
    "max_memory_mb",
    "max_utilization",
    "preferred_gpus",
    "nodes",
    "gpu_model",
    "lease_seconds",
    "priority",
)


def _rank_key(sim: _Sim, r: _Req) -> tuple[float, float]:
    """The engine's queue order (queue.lua enqueue): with aging, AGING * submitted - priority;
    without, priority first, then submission."""
    if sim.aging > 0:
        return (sim.aging * r.submitted - r.prio, 0.0)
    return (-r.prio, r.submitted)


def _resubmit(sim: _Sim, waiting: list[_Req], t: float, room: int) -> int:
    """Each tenant keeps its current load: every allocation that ended by t is submitted
    again at its end by its tenant, same GPUs, priority and lease (a phantom: it only takes
    capacity; nobody reads its estimate), in queue order, unless PHANTOM_QUEUE of that tenant
    already wait. Returns how many were made (at most ``room``)."""
    queued: dict[str, int] = {}
    for r in waiting:
        if r.phantom:
            queued[r.tenant] = queued.get(r.tenant, 0) + 1
    made = 0
    while sim.ending and sim.ending[0][0] <= t and made < room:
        end, _, rec = heapq.heappop(sim.ending)
        tenant = tenant_of(rec)
        if queued.get(tenant, 0) >= PHANTOM_QUEUE:
            continue
        queued[tenant] = queued.get(tenant, 0) + 1
        copy = {k: rec.get(k) for k in _PHANTOM_FIELDS}
        copy["required_gpus"] = rec.get("required_gpus") or 1
        sim.seq += 1
        copy["id"] = f"~phantom-{sim.seq}"
        copy["submitted_at"] = end
        p = _Req(copy)
        p.phantom = True
        key = _rank_key(sim, p)
        i = len(waiting)
        while i > 0 and _rank_key(sim, waiting[i - 1]) > key:
            i -= 1
        waiting.insert(i, p)
        made += 1
    return made


def _fair_pass(sim: _Sim, walk: list[_Req], t: float, eta: dict) -> int:
    """tenants.fair_share, as the engine's fair_walk (pass.lua): the next grant goes to the
    tenant with the lowest (decayed usage in GPU-hours + GPUs held) / weight; within a tenant,
    queue order, each request met once per pass. Every reserved node is held back from the
    start, except from its holder's tenant's requests ranked ahead of the holder. Reservations
    follow the fair order: only the first tenant whose head (first eligible exclusive request
    not placed) cannot go, or holds a reservation, reserves: its head at once (also when the
    pass stops or starts with nothing fitting), and shared requests past reservation_after.
    Returns the placement attempts made."""
    queues: dict[str, list[tuple[int, _Req]]] = {}
    for rank, r in enumerate(walk, 1):
        queues.setdefault(r.tenant, []).append((rank, r))
    # reserved nodes: node -> (start, spare), their holders, and each tenant's held nodes
    blocked: dict = {}
    holder: dict[str, tuple[int, _Req]] = {}
    for rank, r in enumerate(walk, 1):
        if r.reserved and r.deadline >= t and _unreserve_over_quota(sim, r):
            continue
        if r.reserved and r.reserved in sim.gpus and r.deadline >= t:
            holder[r.reserved] = (rank, r)
            s = sim.node_start(r, r.reserved, t)
            blocked[r.reserved] = s if s is not None else (INF, 0)
    # tenant -> the last rank among its holders (a request ranked there or before may use them)
    top: dict[str, int] = {}
    for hr, h in holder.values():
        top[h.tenant] = max(top.get(h.tenant, 0), hr)
    strict = sim.policy == "strict_fifo"
    may_reserve = sim.res_after >= 0 and not strict
    new_reservations, steps = 0, 0
    #: the first tenant (lowest share) met whose head cannot go (or holds a reservation): the
    #: one that reserves in this pass
    reserver: list[str | None] = [None]
    failed: set = set()
    fail_lease: dict = {}
    max_free = sim.max_free(t)
    any_shared = any(r.shared for r in walk)
    pos = dict.fromkeys(queues, 0)
    head = dict.fromkeys(queues, False)
    active = set(queues)

    def nothing_fits() -> bool:
        """The engine's cheap test: no queued exclusive demand fits the best free node."""
        return not any_shared and all(r.k > max_free for r in walk if r.id not in eta)

    def sweep() -> None:
        """A pass that stops (or starts) with nothing fitting still lets the lowest-share
        tenant with a head reserve for it: its first eligible exclusive request within
        SWEEP of where the walk left it (the engine's sweep)."""
        if reserver[0] is not None or not may_reserve:
            return
        for tenant in sorted(active, key=lambda x: (sim.share(x), x)):
            for _, r in queues[tenant][pos[tenant] : pos[tenant] + SWEEP]:
                if r.id in eta:
                    continue
                if r.reserved:
                    return
                if not r.shared and sim.deps_done(r, t) and not sim.over_quota(r):
                    if new_reservations < MAX_NEW_RES and not sim.reserve(r, t, blocked):
                        r.unres = t
                    return

    if nothing_fits():
        sweep()
        return 0
    while active:
        tenant = min(active, key=lambda x: (sim.share(x), x))
        q = queues[tenant]
        got = False
        while pos[tenant] < len(q) and not got:
            rank, r = q[pos[tenant]]
            pos[tenant] += 1
            done = _deps_done_or_gone(sim, r, t, eta)
            if done is None:
                continue
            eligible = done and not sim.over_quota(r)
            shortest = fail_lease.get(r.shape)
            if (
                eligible
                and (r.shared or r.k <= max_free)
                and r.shape not in failed
                and (shortest is None or r.lease < shortest or top.get(r.tenant, 0) >= rank)
            ):
                # its own tenant's reservations held by it or by requests ranked after it
                own = (
                    {
                        n: blocked.pop(n)
                        for n, (hr, h) in holder.items()
                        if n in blocked and h.tenant == r.tenant and hr >= rank
                    }
                    if top.get(r.tenant, 0) >= rank
                    else {}
                )
                steps += 1
                placed = sim.place(r, t, blocked)
                if placed is not None:
                    if r.reserved:
                        holder.pop(r.reserved, None)
                        own.pop(r.reserved, None)
                        top[r.tenant] = max(
                            (hr for hr, h in holder.values() if h.tenant == r.tenant), default=0
                        )
                    _granted(sim, r, placed, t, blocked, eta)
                    blocked.update(own)
                    got = True
                    break
                blocked.update(own)
                if not own and not sim.held_hit:
                    failed.add(r.shape)
                elif not own:
                    # capacity only shrinks in a pass: the same shape with a lease as long
                    # or longer fails too (a shortcut; the engine tries each)
                    fail_lease[r.shape] = min(r.lease, fail_lease.get(r.shape, INF))
            if strict:
                if not sim.over_quota(r):
                    break  # its tenant's first request that cannot go stops that tenant
                continue
            due = t - r.unres >= sim.res_after
            if not may_reserve or not (due or not head[tenant]):
                if due and sim.res_after > 0 and not r.reserved and (not r.shared or not eligible):
                    r.unres = t  # after a failed reserve too, as the engine
                continue
            if r.reserved:
                if not head[tenant] and reserver[0] is None:
                    reserver[0] = tenant
                head[tenant] = True
            elif eligible:
                # reservations follow the fair order: only the first tenant whose head cannot
                # go reserves, its head at once; reservation_after only shared requests, of
                # that tenant or of one met before it
                want = due and r.shared and reserver[0] in (None, tenant)
                if not head[tenant] and not r.shared:
                    head[tenant] = True
                    if reserver[0] is None:
                        reserver[0] = tenant
                        want = True
                if want and new_reservations < MAX_NEW_RES:
                    if sim.reserve(r, t, blocked):
                        new_reservations += 1
                        holder[r.reserved] = (rank, r)
                        top[r.tenant] = max(top.get(r.tenant, 0), rank)
                    else:
                        r.unres = t  # the engine waits reservation_after again
                        may_reserve = False
                elif due and not r.shared and sim.res_after > 0:
                    r.unres = t  # so for an exclusive one reservation_after never reserves
            elif due and sim.res_after > 0:
                r.unres = t  # and for one waiting for its dependency or its tenant's max_gpus
        if got:
            max_free = sim.max_free(t)
            if nothing_fits():
                sweep()
                break
        else:
            active.discard(tenant)
    return steps


def tenant_limits(settings):
    """``tenant -> max_gpus`` (None: no cap) from ``tenants.quotas`` over ``tenants.default``,
    or None when no tenant has a cap (then no request waits for its quota)."""
    from app.settings import tenant_quotas

    caps = {name: q["max_gpus"] for name, q in tenant_quotas(settings).items()}
    fallback = settings.tenants.default["max_gpus"]
    if fallback is None and all(v is None for v in caps.values()):
        return None
    return lambda tenant: caps.get(tenant, fallback)


def annotate(engine, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """reason and eta for the queued ones among ``records`` (each with its ``position``): one
    read of the first min(last position, MAX_SIMULATED) queued requests (MAX_SIMULATED with
    fair share or a max_gpus: the order is not the queue's), then :func:`explain`.
    Nothing is read when no record is queued."""
    from app.settings import tenants_configured

    queued = [r for r in records if r.get("status") == "queued" and r.get("id")]
    if not queued:
        return {}
    fair = fair_inputs(engine)
    limits = tenant_limits(engine.settings)
    # with fair share, requests ranked behind may go first (and their reservations hold); with
    # a max_gpus, one ranked behind a request its quota holds back may go first and take its
    # tenant's quota (then the one ahead waits longer)
    upto = max(int(r.get("position") or MAX_SIMULATED) for r in queued)
    whole = fair is not None or limits is not None
    view = engine.wait_view(MAX_SIMULATED if whole else min(upto, MAX_SIMULATED))
    return explain(
        view,
        engine.settings.scheduler,
        records=queued,
        limits=limits,
        fair=fair,
        heads=tenants_configured(engine.settings),
    )


def fair_inputs(engine) -> dict[str, Any] | None:
    """With tenants.fair_share on (and an engine that keeps tenants' usage): each tenant's
    decayed usage and weight, for :func:`explain`'s fair order; None otherwise."""
    tenants = getattr(engine.settings, "tenants", None)
    if not getattr(tenants, "fair_share", False) or not hasattr(engine, "fair_usage"):
        return None
    return {
        # the configured tenants and those with usage: any other has (0, default weight)
        "tenants": engine.fair_usage(),
        "half_life": tenants.usage_half_life,
        "default_weight": tenants.default["weight"],
    }
