"""Guarantee preemption of shared allocations over HTTP (issue 14): a shared request of a tenant
below its guarantee takes one slot back; the victim shows `preempting` and `preempt_at` on
GET /gpu/allocations/<id>, its holder's receiver on 127.0.0.1 gets the signed `preempting` and
`preempted` webhooks, and the waiting request is granted at preempt_at."""

from __future__ import annotations

import pytest
from webhook_receiver import Receiver

from app.timefmt import iso
from tests.api_support import allocate, clock, make_app, register_fleet  # noqa: F401
from tests.test_preemption_http import SECRET, deliver_all, signed_bodies

QUOTAS = {"team-a": {"guaranteed_gpus": 2}, "team-b": {"guaranteed_gpus": 1}}


@pytest.fixture
def app(make_app):  # noqa: F811
    return make_app(
        nodes=(("node-a", 1),),
        webhooks={"secret": SECRET},
        tenants={"key": "service_name", "quotas": QUOTAS},
        preemption={"enabled": True, "grace_period": "30s"},
    )


def test_a_shared_request_preempts_one_shared_slot_with_notice(app, clock):  # noqa: F811
    client = app.test_client()
    engine = app.extensions["gpu_engine"]
    with Receiver() as rx:
        held = []
        for prio in (5, 3, 5):  # 78,000 MB of the GPU's 81,559 reserved
            r = allocate(
                client,
                "team-b",
                sharing="shared",
                min_memory_mb=26000,
                priority=prio,
                ttl_seconds=3600,
                webhook_url=rx.url,
            )
            assert r.status_code == 200, r.get_data(as_text=True)
            held.append(r.get_json()["id"])
            clock.advance(1)
        t0 = clock()
        q = allocate(client, "team-a", sharing="shared", min_memory_mb=20000, ttl_seconds=600)
        assert q.status_code == 202, q.get_data(as_text=True)
        qid = q.get_json()["id"]

        # one slot is enough: the priority-3 one, and only it
        victim = held[1]
        got = client.get(f"/gpu/allocations/{victim}").get_json()
        assert got["status"] == "preempting" and got["reason"] == "guarantee"
        assert got["preempt_at"] == iso(t0 + 30) and got["preempted_for"] == qid
        for other in (held[0], held[2]):
            assert client.get(f"/gpu/allocations/{other}").get_json()["status"] == "allocated"
        assert client.get(f"/gpu/requests/{qid}").get_json()["status"] == "queued"
        tenants = {t["tenant"]: t for t in client.get("/gpu/tenants").get_json()["tenants"]}
        assert tenants["team-b"]["gpus_held"] == 3  # shared: one GPU each, until they end

        clock.advance(30)
        register_fleet(app, (("node-a", 1),))  # the monitor's heartbeat
        assert engine.reap()["preempted"] == [victim]
        ended = client.get(f"/gpu/allocations/{victim}").get_json()
        assert ended["status"] == "preempted" and ended["ended_at"] == got["preempt_at"]
        granted = client.get(f"/gpu/requests/{qid}").get_json()
        assert granted["status"] == "allocated"
        assert granted["allocation"]["node"] == "node-a"
        tenants = {t["tenant"]: t for t in client.get("/gpu/tenants").get_json()["tenants"]}
        assert tenants["team-b"]["gpus_held"] == 2 and tenants["team-a"]["gpus_held"] == 1

        deliver_all(app)
        bodies = signed_bodies(rx)
    assert [(b["status"], b["request_id"]) for b in bodies] == [
        ("preempting", victim),
        ("preempted", victim),
    ]
    notice, end = bodies
    assert notice["preempt_at"] == got["preempt_at"] and notice["reason"] == "guarantee"
    assert notice["allocation"]["status"] == "preempting"
    assert end["allocation"]["status"] == "preempted"
    text = client.get("/metrics").get_data(as_text=True)
    lines = [x for x in text.splitlines() if x.startswith("gpu_orchestrator_preemptions_total")]
    assert lines == ['gpu_orchestrator_preemptions_total{tenant="team-b"} 1.0']
