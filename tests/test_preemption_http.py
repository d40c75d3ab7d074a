"""Preemption with notice over HTTP: a drain gives every allocation on the node notice,
GET /gpu/allocations/<id> shows preempting and preempt_at (a held long-poll answers at once),
renewals stop at preempt_at, the allocation ends as preempted, and the holder's receiver on
127.0.0.1 gets the signed preempting and preempted webhooks. The admin CLI drains the same way."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from webhook_receiver import Receiver

from app import cli, create_app
from app.timefmt import iso
from tests.api_support import (  # noqa: F401 (clock, make_app: fixtures)
    allocate,
    clock,
    deliver_all,
    make_app,
    register_fleet,
)
from tests.browser_support import LiveServer
from tests.test_longpoll import Call, _held
from workers import webhooks

SECRET = "s3cret"


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def signed_bodies(rx) -> list[dict]:
    out = []
    for got in rx.requests:
        h = {k.lower(): v for k, v in got["headers"].items()}
        assert webhooks.verify_signature(
            SECRET,
            h["x-gpu-orchestrator-timestamp"],
            got["body"],
            h["x-gpu-orchestrator-signature"],
        )
        body = json.loads(got["body"])
        assert h["x-gpu-orchestrator-event"] == body["status"]
        out.append(body)
    return out


@pytest.fixture
def app(make_app):  # noqa: F811
    return make_app(
        nodes=(("node-a", 2), ("node-b", 2)),
        webhooks={"secret": SECRET},
        preemption={"grace_period": "30s"},
    )


def test_drain_preempts_with_notice_and_the_holder_is_told_signed(app, clock, redis):  # noqa: F811
    client = app.test_client()
    engine = app.extensions["gpu_engine"]
    with Receiver() as rx:
        a = allocate(client, "trainer", nodes=["node-a"], ttl_seconds=600, webhook_url=rx.url)
        assert a.status_code == 200, a.get_data(as_text=True)
        aid = a.get_json()["id"]
        b = allocate(client, "batch", nodes=["node-a"], ttl_seconds=600).get_json()["id"]
        stays = allocate(client, "web", nodes=["node-b"]).get_json()["id"]

        call = Call(app, f"/gpu/allocations/{aid}?wait=30")
        _held(app)
        t0 = clock()
        resp = client.post("/admin/nodes/node-a/drain")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
        assert sorted(body["preempted"]) == sorted([aid, b])
        assert body["draining"] and not body["drained"]

        # the held long-poll answers with the change
        held = call.result().get_json()
        assert held["status"] == "preempting"
        assert ts(held["preempt_at"]) == pytest.approx(t0 + 30, abs=0.01)

        got = client.get(f"/gpu/allocations/{aid}").get_json()
        assert got["status"] == "preempting" and got["reason"] == "drain"
        assert got["preempt_at"] == iso(t0 + 30) and got["expires_at"] == got["preempt_at"]
        assert [g["health"] for g in got["gpu_health"]] == ["ok"]
        status = client.get(f"/gpu/requests/{aid}").get_json()
        assert status["allocation"]["preempt_at"] == got["preempt_at"]
        assert client.get(f"/gpu/allocations/{stays}").get_json()["status"] == "allocated"

        # renewing cannot reach past preempt_at
        clock.advance(10)
        renewed = client.post(f"/gpu/allocations/{aid}/renew", json={"ttl_seconds": 3600})
        assert renewed.status_code == 200, renewed.get_data(as_text=True)
        assert renewed.get_json()["expires_at"] == got["preempt_at"]
        assert renewed.get_json()["status"] == "preempting"

        # the other holder releases during the notice: preempted at once
        assert client.post("/gpu/release", json={"allocation_id": b}).status_code == 200
        assert client.get(f"/gpu/allocations/{b}").get_json()["status"] == "preempted"

        # at preempt_at the reaper ends it
        clock.advance(20)
        assert engine.reap()["preempted"] == [aid]
        ended = client.get(f"/gpu/allocations/{aid}").get_json()
        assert ended["status"] == "preempted" and ended["ended_at"] == got["preempt_at"]
        assert client.post("/admin/nodes/node-a/drain").get_json()["drained"] is True

        deliver_all(app)
        bodies = signed_bodies(rx)
    assert [(x["status"], x["request_id"]) for x in bodies] == [
        ("preempting", aid),
        ("preempted", aid),
    ]
    notice, end = bodies
    assert notice["preempt_at"] == got["preempt_at"] and notice["reason"] == "drain"
    assert notice["allocation"]["status"] == "preempting"
    assert notice["allocation"]["expires_at"] == got["preempt_at"]
    assert notice["allocation"]["node"] == "node-a"
    assert end["allocation"]["status"] == "preempted" and end["reason"] == "drain"
    assert notice["event_id"] != end["event_id"]
    # the event stream names both, and the console's latest events show them
    shown = {e["event"]: e for e in client.get("/console/state").get_json()["events"]}
    assert shown["preempting"]["preempt_at"] == got["preempt_at"]
    assert shown["preempted"]["request_id"] in (aid, b)


def test_the_console_shows_a_preempting_holder(app, clock):  # noqa: F811
    client = app.test_client()
    a = allocate(client, nodes=["node-a"]).get_json()
    client.post("/admin/nodes/node-a/drain")
    state = client.get("/console/state").get_json()
    node = next(n for n in state["nodes"] if n["name"] == "node-a")
    gpu = next(g for g in node["gpus"] if g["index"] == a["gpu_ids"][0])
    assert gpu["holders"][0]["status"] == "preempting"
    assert gpu["holders"][0]["preempt_at"] == iso(clock() + 30)


def test_drain_with_wait_preempts_nothing(app):
    client = app.test_client()
    a = allocate(client, nodes=["node-a"]).get_json()["id"]
    body = client.post("/admin/nodes/node-a/drain?wait=true&timeout=0.1").get_json()
    assert body["preempted"] == [] and body["drained"] is False
    assert client.get(f"/gpu/allocations/{a}").get_json()["status"] == "allocated"


def test_admin_cli_drain_preempts_and_says_so(settings, redis_url, monkeypatch, capsys):
    st = settings.replace(dashboard={"enabled": False}, preemption={"grace_period": "45s"})
    live_app = create_app(st, redis_url=redis_url)
    register_fleet(live_app, (("node-a", 2),))
    a = live_app.extensions["gpu_engine"].allocate({"service_name": "x", "required_gpus": 2})
    with LiveServer(live_app) as server:
        monkeypatch.setenv("GPU_ORCH_URL", server.url)
        monkeypatch.delenv("GPU_ORCH_API_KEY", raising=False)
        code = cli.main(["admin", "drain", "node-a"])
        out, _ = capsys.readouterr()
        assert code == 0
        assert "1 allocation(s) given notice" in out and a["id"] in out
        code = cli.main(["admin", "drain", "node-a", "--json"])
        data = json.loads(capsys.readouterr()[0])
    assert code == 0 and data["preempted"] == [] and data["allocations"] == [a["id"]]
    assert live_app.extensions["gpu_engine"].get(a["id"])["status"] == "preempting"


def test_preemptions_are_counted_per_tenant_on_metrics(app):  # noqa: F811
    client = app.test_client()
    allocate(client, "trainer", nodes=["node-a"])
    allocate(client, "trainer", nodes=["node-a"])
    allocate(client, "web", nodes=["node-b"])
    client.post("/admin/nodes/node-a/drain")
    client.post("/admin/nodes/node-a/drain")  # already preempting: not counted twice
    text = client.get("/metrics").get_data(as_text=True)
    lines = [x for x in text.splitlines() if x.startswith("gpu_orchestrator_preemptions_total")]
    assert lines == ['gpu_orchestrator_preemptions_total{tenant="trainer"} 2.0']


GUARANTEES = {"team-a": {"guaranteed_gpus": 2}, "team-b": {"guaranteed_gpus": 1}}


def test_a_request_ranked_ahead_of_a_hold_reads_reason_reservation(make_app, clock):  # noqa: F811
    """team-a's request preempts two of team-b's four GPUs; one victim releases: its GPU is
    free but held for team-a's request, so team-c's priority-10 request, ranked ahead of it,
    waits with reason reservation (not priority: no pass will grant it there), and its eta is
    after team-a's lease."""
    fleet = (("n1", 4),)
    client = make_app(
        nodes=fleet,
        tenants={"key": "service_name", "quotas": GUARANTEES},
        preemption={"enabled": True, "grace_period": "30s"},
    ).test_client()
    held = [allocate(client, "team-b", ttl_seconds=3600).get_json()["id"] for _ in range(4)]
    a = allocate(client, "team-a", required_gpus=2, ttl_seconds=600).get_json()
    victims = [
        v for v in held if client.get(f"/gpu/allocations/{v}").get_json()["status"] == "preempting"
    ]
    assert len(victims) == 2
    clock.advance(5)
    register_fleet(client.application, fleet)
    assert client.post("/gpu/release", json={"allocation_id": victims[0]}).status_code == 200
    c = allocate(client, "team-c", priority=10, ttl_seconds=100).get_json()
    assert (c["status"], c["position"], c["reason"]) == ("queued", 1, "reservation")
    assert c["eta"] == iso(clock() - 5 + 30 + 600)
    assert client.get(f"/gpu/requests/{a['id']}").get_json()["reason"] == "capacity"
