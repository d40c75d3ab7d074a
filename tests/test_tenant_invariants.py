"""Tenant invariants under random operation sequences (hypothesis, real redis-server): no
tenant ever holds more than its max_gpus, and the engine's per-tenant counters (GPUs held,
queued requests, each tenant's queue) always equal a full scan of the records. With guarantee
preemption on (drawn), over exclusive and shared requests alike: a tenant at or below its
guarantee is never preempted, and preemption never takes more than the waiting request needs
(tests/invariant_support.py, check_guarantee_preemptions)."""

from __future__ import annotations

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
    check_guarantee_preemptions,
    exclusive_holders,
    release_all,
    run_machine,
    stored_requests,
    tenant_holdings,
)

NODES = {"n0": 2, "n1": 4}
#: tenant (= service, auth off) -> max_gpus; "c" has the default's
MAX_GPUS = {"a": 3, "b": 2}
DEFAULT_MAX = 4
#: guaranteed_gpus (preemption is drawn on or off); "c" has none
GUARANTEED = {"a": 2, "b": 1}
TENANTS = {
    "default": {"max_gpus": DEFAULT_MAX},
    "quotas": {
        "a": {"max_gpus": 3, "weight": 3, "guaranteed_gpus": 2},
        "b": {"max_gpus": 2, "max_queued": 3, "guaranteed_gpus": 1},
    },
}


def gpus(node):
    return [
        {"index": i, "uuid": f"{node}-{i}", "name": "H100", "memory_total_mb": 40000}
        for i in range(NODES[node])
    ]


class TenantMachine(RuleBasedStateMachine):
    redis = None
    settings = None
    #: preemption.enabled: None = drawn per example
    PREEMPT: bool | None = None

    @initialize(
        fair=st.booleans(),
        policy=st.sampled_from(["best_effort", "strict_fifo"]),
        aging=st.sampled_from([0, 6.0]),
        preempt=st.booleans(),
    )
    def setup(self, fair, policy, aging, preempt):
        self.redis.flushdb()
        self.clock = Clock()
        s = self.settings.replace(
            scheduler={"policy": policy, "aging_rate": aging, "reservation_after": 30},
            tenants={**TENANTS, "fair_share": fair},
            preemption={
                "enabled": preempt if self.PREEMPT is None else self.PREEMPT,
                "grace_period": "30s",
            },
        )
        self.engine = Engine(self.redis, s, clock=self.clock)
        for node in NODES:
            self.engine.report_node(node, gpus(node))
        self.ids: list = []
        self.victims: set = set()

    @rule(
        tenant=st.sampled_from("abc"),
        k=st.integers(1, 5),
        shared=st.booleans(),
        prio=st.integers(1, 10),
        ttl=st.sampled_from([None, 30, 300]),
        mb=st.sampled_from([1000, 15000, 30000]),
    )
    def allocate(self, tenant, k, shared, prio, ttl, mb):
        req = {
            "service_name": tenant,
            "required_gpus": 1 if shared else k,
            "sharing": "shared" if shared else "exclusive",
            # shared: two of 15,000 or one of 30,000 MB fill a 40,000 MB GPU's room
            "min_memory_mb": mb if shared else 1000,
            "priority": prio,
        }
        if ttl:
            req["ttl_seconds"] = ttl
        cap = MAX_GPUS.get(tenant, DEFAULT_MAX)
        need = 1 if shared else k
        try:
            rec = self.engine.allocate(req)
        except errors.Unsatisfiable as exc:
            assert need > cap or need > max(NODES.values()), exc.details
            if need <= max(NODES.values()):
                assert exc.details["reason"] == "max_gpus" and exc.details["limit"] == cap
            return
        except errors.TenantQueueFull as exc:
            assert tenant == "b" and exc.details["queued"] >= 3
            return
        assert need <= cap
        self.ids.append(rec["id"])

    @rule(
        tenant=st.sampled_from("abc"),
        n=st.integers(2, 4),
        shared=st.booleans(),
        prio=st.integers(1, 10),
        mb=st.sampled_from([15000, 30000]),
    )
    def burst(self, tenant, n, shared, prio, mb):
        """Several one-GPU requests at once: the fleet fills, so guarantees are reclaimed."""
        for _ in range(n):
            self.allocate(tenant, 1, shared, prio, 300, mb)

    @rule(data=st.data())
    def crowd_then_claim(self, data):
        """c and b fill what they may (one-GPU leases of 300 s, each exclusive or shared),
        then a or b asks for one GPU: a tenant below its guarantee, so preemption (when on)
        reclaims it."""
        mb = st.sampled_from([15000, 30000])
        for t, n in (("c", 4), ("b", 2)):
            for _ in range(n):
                prio = data.draw(st.integers(1, 10))
                self.allocate(t, 1, data.draw(st.booleans()), prio, 300, data.draw(mb))
        who = data.draw(st.sampled_from("ab"))
        self.allocate(who, 1, data.draw(st.booleans()), 5, 300, data.draw(mb))

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def release(self, data):
        rid = data.draw(st.sampled_from(self.ids))
        try:
            self.engine.release(rid)
        except errors.NotFound:
            pass

    @rule(seconds=st.sampled_from([1, 20, 100]))
    def time_passes(self, seconds):
        self.clock.t += seconds
        for node in NODES:
            self.engine.report_node(node, gpus(node))
        self.engine.reap()

    @rule()
    def safety_net(self):
        self.engine.schedule_pass()

    @invariant()
    def tenants_within_quota_and_counted(self):
        if not hasattr(self, "engine"):
            return
        k, redis = self.engine.keys, self.redis
        reqs = list(stored_requests(self.engine, redis).values())
        held = tenant_holdings(reqs)  # a preempting allocation holds its GPUs until it ends
        queued: dict = {}
        for r in reqs:
            if r["status"] == "queued":
                queued.setdefault(r["tenant"], []).append(r["id"])
        for tenant, n in held.items():
            assert n <= MAX_GPUS.get(tenant, DEFAULT_MAX), f"{tenant} holds {n}"
        assert {t: int(n) for t, n in redis.hgetall(k.tenants()).items()} == held
        assert {t: int(n) for t, n in redis.hgetall(k.tenant_queued()).items()} == {
            t: len(ids) for t, ids in queued.items()
        }
        scores = dict(redis.zrange(k.queue(), 0, -1, withscores=True))
        for t in "abc":
            mine = dict(redis.zrange(k.queue_tenant(t), 0, -1, withscores=True))
            assert mine == {i: scores[i] for i in queued.get(t, [])}
        exclusive_holders(reqs)  # no GPU in two exclusive allocations
        self.victims = check_guarantee_preemptions(reqs, GUARANTEED, self.victims)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        release_all(self.engine, self.ids)
        assert self.redis.hgetall(self.engine.keys.tenants()) == {}
        assert self.redis.hgetall(self.engine.keys.tenant_queued()) == {}


def test_no_tenant_above_max_gpus_and_the_counters_match(redis, settings):
    run_machine(TenantMachine, redis, settings, max_examples=25)


class PreemptingTenantMachine(TenantMachine):
    PREEMPT = True


def test_guarantee_preemption_over_exclusive_and_shared_requests(redis, settings):
    """Preemption always on: the tenant invariants above, and check_guarantee_preemptions'
    (never below a guarantee, never more than the waiting request needs) after every step."""
    run_machine(PreemptingTenantMachine, redis, settings, max_examples=40)
