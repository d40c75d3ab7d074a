"""Every Redis key shape, pinned; the Lua scripts build keys only from what keys.py gives them."""

from __future__ import annotations

import re

import pytest

from app.engine import LUA_DIR, Engine, library_source
from app.keys import Keys

K = Keys("{gpuo}")

SHAPES = [
    (K.nodes(), "{gpuo}:nodes"),
    (K.node("n1"), "{gpuo}:node:n1"),
    (K.gpu("n1", 3), "{gpuo}:gpu:n1:3"),
    (K.gpu("n1", "3"), "{gpuo}:gpu:n1:3"),
    (K.nodes_free(), "{gpuo}:nodes:free"),
    (K.node_free_gpus("n1"), "{gpuo}:freegpus:n1"),
    (K.node_sizes(), "{gpuo}:nodes:size"),
    (K.gpus(), "{gpuo}:gpus"),
    (K.shared_capacity(), "{gpuo}:gpus:shared"),
    (K.request("svc-1-2"), "{gpuo}:req:svc-1-2"),
    (K.dependents("svc-1-2"), "{gpuo}:deps:svc-1-2"),
    (K.queue(), "{gpuo}:queue"),
    (K.queue_demand("exclusive"), "{gpuo}:queue:demand:exclusive"),
    (K.queue_demand("shared"), "{gpuo}:queue:demand:shared"),
    (K.queue_deadlines(), "{gpuo}:queue:deadlines"),
    (K.queue_shapes(), "{gpuo}:queue:shapes"),
    (K.queue_unreserved(), "{gpuo}:queue:unreserved"),
    (K.reservations(), "{gpuo}:reservations"),
    (K.leases(), "{gpuo}:leases"),
    (K.service("web"), "{gpuo}:svc:web"),
    (K.idempotency("abc"), "{gpuo}:idem:abc"),
    (K.events(), "{gpuo}:events"),
    (K.webhook_outbox(), "{gpuo}:outbox:webhooks"),
    (K.webhook_processing(), "{gpuo}:outbox:webhooks:processing"),
    (K.webhook_claim("e1"), "{gpuo}:outbox:claim:e1"),
    (K.lock("scheduler"), "{gpuo}:lock:scheduler"),
    (K.stats(), "{gpuo}:stats"),
    (K.stats_services(), "{gpuo}:stats:services"),
    (K.queue_owners(), "{gpuo}:queue:owners"),
    (K.tenants(), "{gpuo}:tenants"),
    (K.tenant_queued(), "{gpuo}:tenants:queued"),
    (K.tenant_usage(), "{gpuo}:tenants:usage"),
    (K.queue_tenant("team-a"), "{gpuo}:queue:tenant:team-a"),
    (K.queue_owner_tenants("alice"), "{gpuo}:queue:owner:alice"),
    (K.preempt_holds(), "{gpuo}:preempt:holds"),
    (K.session_secret(), "{gpuo}:session:secret"),
    (K.meta(), "{gpuo}:meta"),
    (K.changes(), "{gpuo}:changes"),
]


@pytest.mark.parametrize("got,want", SHAPES, ids=[w for _, w in SHAPES])
def test_key_shape(got, want):
    assert got == want


def test_every_key_method_is_pinned():
    methods = {
        name
        for name in dir(Keys)
        if not name.startswith("_") and name != "rq_queue" and callable(getattr(Keys, name))
    }
    pinned = {w.split("}:", 1)[1].split(":")[0] for _, w in SHAPES}
    # each method's first segment appears in a pinned shape
    first = {
        "nodes": "nodes",
        "node": "node",
        "gpu": "gpu",
        "nodes_free": "nodes",
        "node_free_gpus": "freegpus",
        "node_sizes": "nodes",
        "gpus": "gpus",
        "shared_capacity": "gpus",
        "request": "req",
        "dependents": "deps",
        "queue": "queue",
        "queue_demand": "queue",
        "queue_deadlines": "queue",
        "queue_shapes": "queue",
        "queue_unreserved": "queue",
        "reservations": "reservations",
        "leases": "leases",
        "service": "svc",
        "idempotency": "idem",
        "events": "events",
        "webhook_outbox": "outbox",
        "webhook_processing": "outbox",
        "webhook_claim": "outbox",
        "lock": "lock",
        "stats": "stats",
        "meta": "meta",
        "stats_services": "stats",
        "queue_owners": "queue",
        "tenants": "tenants",
        "tenant_queued": "tenants",
        "tenant_usage": "tenants",
        "queue_tenant": "queue",
        "queue_owner_tenants": "queue",
        "preempt_holds": "preempt",
        "changes": "changes",
        "session_secret": "session",
    }
    assert methods == set(first), "a new key needs a pinned shape in SHAPES"
    assert set(first.values()) <= pinned


def test_keys_are_distinct():
    assert len({got for got, _ in SHAPES}) == len(SHAPES) - 1  # gpu(n, 3) == gpu(n, "3")


def test_rq_queue_name_is_derived_from_the_prefix():
    assert K.rq_queue("webhooks") == "gpuo-webhooks"
    assert Keys("{tenant-a}").rq_queue("webhooks") == "tenant-a-webhooks"


def test_every_key_shares_the_prefix_hash_tag():
    k = Keys("{t1}")
    for name in ("nodes", "gpus", "queue", "leases", "events", "stats", "meta"):
        assert getattr(k, name)().startswith("{t1}:")
    assert k.gpu("n", 1).startswith("{t1}:")


def test_bad_prefix_is_refused():
    with pytest.raises(ValueError):
        Keys("")
    with pytest.raises(ValueError):
        Keys("{gpuo}:")


def test_lua_scripts_contain_no_key_text():
    """Scripts get every key (and the templates) from keys.py, rendered in by the engine."""
    for path in list(LUA_DIR.glob("*.lua")) + list(LUA_DIR.glob("includes/*.lua")):
        code = "\n".join(
            line for line in path.read_text().splitlines() if not line.strip().startswith("--")
        )
        code = re.sub(r"--\[\[.*?\]\]", "", code, flags=re.S)
        assert "gpuo" not in code, path
        pattern = r"['\"](req|deps|gpu|node|svc|idem|queue|leases|meta|freegpus):"
        assert not re.search(pattern, code), path


def test_lua_builds_the_same_keys_as_keys_py(redis, settings):
    """The library's key builders (prefix passed per call) and its KEYS binding agree with
    keys.py, whatever the prefix."""
    engine = Engine(redis, settings)
    keys = engine.keys
    version, source = library_source((("probe", _PROBE),), name="keysprobe")
    redis.execute_command("FUNCTION", "LOAD", "REPLACE", source)
    try:
        got = redis.execute_command(
            "FCALL",
            "keysprobe_probe",
            len(engine._fixed_keys),
            *engine._fixed_keys,
            *engine._settings_args(version, clocked=True),
            "1000",
            "n1",
            "7",
            "svc-1",
            "web",
            "idem-key",
        )
    finally:
        redis.execute_command("FUNCTION", "DELETE", "keysprobe")
    assert got == [
        keys.node("n1"),
        keys.gpu("n1", 7),
        keys.request("svc-1"),
        keys.dependents("svc-1"),
        keys.service("web"),
        keys.idempotency("idem-key"),
        keys.node_free_gpus("n1"),
        keys.nodes(),
        keys.queue(),
        keys.leases(),
        keys.meta(),
        keys.webhook_outbox(),
        keys.changes(),
        settings.scheduler.policy,
    ]


_PROBE = """
return {k_node(ARGV[A + 1]), k_gpu(ARGV[A + 1], ARGV[A + 2]), k_req(ARGV[A + 3]),
  k_deps(ARGV[A + 3]),
  k_svc(ARGV[A + 4]), k_idem(ARGV[A + 5]), k_free(ARGV[A + 1]), K_NODES, K_QUEUE, K_LEASES,
  K_META, K_OUTBOX, K_CHANGES, POLICY}
"""
