"""docs/scheduling.md: each worked example replayed against the real engine, so the docs cannot
drift from the code.

Each test reads its section of the document: the YAML config block it shows (when it has one)
is the config the replay runs with, and every figure the replay finds (a time, a reason, a
status, an HTTP code) must appear in that section as written. The clock is injected: the
examples' wall-clock times are UTC on 2026-12-01.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
import yaml

from app import waiting
from app.engine import Engine
from tests.conftest import ROOT

DOC = ROOT / "docs" / "scheduling.md"
DAY = datetime(2026, 12, 1, tzinfo=UTC).timestamp()


def at(hhmm: str) -> float:
    """Epoch seconds of HH:MM[:SS] on the examples' day."""
    parts = [int(p) for p in hhmm.split(":")] + [0]
    return DAY + parts[0] * 3600 + parts[1] * 60 + parts[2]


def hhmm(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M")


def section(title: str) -> str:
    """The text of the section whose heading is ``title`` (up to the next heading of the same
    or a higher level)."""
    text = DOC.read_text()
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.M)
    assert m, f"docs/scheduling.md has no section {title!r}"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, m.end())
    return text[m.end() : end.start() if end else len(text)]


def config_of(text: str) -> dict:
    """The section's YAML config block."""
    m = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert m, "the example shows its config"
    return yaml.safe_load(m.group(1)) or {}


def says(text: str, *phrases: str) -> None:
    flat = " ".join(text.split())
    for phrase in phrases:
        assert phrase in flat, f"the docs should say {phrase!r}"


class World:
    """An engine on the test's Redis with a clock the example moves."""

    def __init__(self, settings, redis, config: dict | None = None, **scheduler):
        self.now = at("09:00")
        overrides = dict(config or {})
        overrides["scheduler"] = {
            "aging_rate": 0,
            "node_heartbeat_timeout": 86400,
            "node_forget_after": 0,
            **overrides.get("scheduler", {}),
            **scheduler,
        }
        self.settings = settings.replace(**overrides)
        self.engine = Engine(redis, self.settings, clock=lambda: self.now)

    def node(self, name: str, gpus: int) -> None:
        self.engine.report_node(
            name,
            [
                {"index": i, "uuid": f"{name}-{i}", "name": "A100", "memory_total_mb": 81920}
                for i in range(gpus)
            ],
        )

    def ask(self, when: str, service: str, gpus: int, minutes: float, **extra) -> dict:
        self.now = at(when)
        req = {"service_name": service, "required_gpus": gpus, "ttl_seconds": minutes * 60}
        return self.engine.allocate({**req, **extra})

    def why(self, rec: dict) -> dict:
        """reason and eta as the API's 202 gives them, eta as HH:MM."""
        rec = self.engine.get(rec["id"])
        w = waiting.annotate(self.engine, [rec])[rec["id"]]
        return {"reason": w["reason"], "eta": hhmm(w["eta"]) if w["eta"] else None}

    def release(self, when: str, rec: dict) -> None:
        self.now = at(when)
        self.engine.release(rec["id"])

    def status(self, rec: dict) -> str:
        return self.engine.get(rec["id"])["status"]


@pytest.fixture
def world(settings, redis):
    return lambda config=None, **kw: World(settings, redis, config, **kw)


def test_reason_and_eta_example(world):
    text = section("Reason and ETA")
    w = world(config_of(text))
    w.node("a", 2)
    a = w.ask("09:00", "team", 1, 60)  # GPU 0 until 10:00
    b = w.ask("09:05", "team", 1, 60)  # GPU 1 until 10:05
    assert hhmm(w.engine.get(a["id"])["expires_at"]) == "10:00"
    assert hhmm(w.engine.get(b["id"])["expires_at"]) == "10:05"
    c = w.ask("09:50", "team", 2, 30)
    d = w.ask("09:50", "team", 1, 30)
    assert w.why(c) == {"reason": "capacity", "eta": "10:05"}
    assert w.why(d) == {"reason": "capacity", "eta": "10:35"}
    says(text, "C: `reason: capacity`, `eta` 10:05", "D: `reason: capacity`, `eta` 10:35")
    # what really happens: A ends at 10:00, D may not backfill (its lease would end 10:30, after
    # C's start), B ends at 10:05 and C starts, C ends 10:35 and D starts
    w.release("10:00", a)
    assert w.status(d) == "queued"
    w.release("10:05", b)
    assert w.status(c) == "allocated" and w.status(d) == "queued"
    w.release("10:35", c)
    assert w.status(d) == "allocated"
    assert hhmm(w.engine.get(d["id"])["allocated_at"]) == "10:35"


def test_reservation_and_backfill_example(world):
    text = section("Reservations and backfill")
    w = world(config_of(text))
    w.node("a", 4)
    holders = [w.ask("09:10", "other", 1, 60) for _ in range(3)]  # 3 GPUs until 10:10
    big = w.ask("10:00", "team", 4, 60)
    assert big["status"] == "queued"
    assert w.engine.get(big["id"])["reserved_node"] == "a"
    assert w.why(big) == {"reason": "capacity", "eta": "10:10"}
    long = w.ask("10:00", "team", 1, 60)
    assert long["status"] == "queued"
    assert w.why(long) == {"reason": "reservation", "eta": "11:10"}
    short = w.ask("10:00", "team", 1, 5)
    assert short["status"] == "allocated"  # ends 10:05, before Big's start at 10:10
    says(
        text,
        "Big: `reason: capacity`, `eta` 10:10",
        "Long: `reason: reservation`, `eta` 11:10",
        "Short is granted at once",
    )
    w.release("10:05", short)
    for h in holders:
        w.release("10:10", h)
    assert w.status(big) == "allocated" and w.status(long) == "queued"
    w.release("11:10", big)
    assert w.status(long) == "allocated"


def test_spare_gpus_of_a_reserved_node_example(world):
    text = section("Reservations and backfill")
    w = world(config_of(text))
    w.node("a", 4)
    [w.ask("09:10", "other", 1, 60) for _ in range(3)]
    big = w.ask("10:00", "team", 2, 60)
    assert big["status"] == "queued" and w.engine.get(big["id"])["reserved_node"] == "a"
    long = w.ask("10:00", "team", 1, 60)
    assert long["status"] == "allocated"  # a spare GPU: Big needs 2 of the 4 free at 10:10
    says(text, "Long takes the free GPU at once")


def test_reservation_with_the_default_config_example(world):
    text = section("With the default config")
    for long_at in ("10:10", "10:03"):
        prefix = "{docs-%s}" % uuid.uuid4().hex[:8]  # a fresh engine state per replay
        w = world({**config_of(text), "redis": {"prefix": prefix}})
        w.node("a", 2)
        w.ask("09:30", "other", 1, 60)  # GPU 0 until 10:30
        big = w.ask("10:00", "team", 2, 60)
        assert big["status"] == "queued" and w.engine.get(big["id"])["reserved_node"] is None
        assert w.why(big) == {"reason": "capacity", "eta": "10:30"}
        long = w.ask(long_at, "team", 1, 60)
        if long_at == "10:03":  # nothing reserved yet: Long takes the free GPU
            assert long["status"] == "allocated"
            assert w.why(big) == {"reason": "capacity", "eta": "11:03"}
            continue
        assert long["status"] == "queued"
        assert w.engine.get(big["id"])["reserved_node"] == "a"
        assert w.why(long) == {"reason": "reservation", "eta": "11:30"}
        short = w.ask("10:10", "team", 1, 15)
        assert short["status"] == "allocated"  # ends 10:25, before Big's start at 10:30
    says(
        text,
        "Big: `reason: capacity`, `eta` 10:30",
        "Long: `reason: reservation`, `eta` 11:30",
        "Short is granted at once",
        "Had Long asked at 10:03",
        "Big's `eta` would move to 11:03",
    )


def hms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def test_preemption_with_notice_example(world):
    text = section("Preemption with notice")
    for trainer_releases in (True, False):
        prefix = "{docs-%s}" % uuid.uuid4().hex[:8]  # a fresh engine state per replay
        w = world({**config_of(text), "redis": {"prefix": prefix}})
        w.node("gpu-node-1", 2)
        w.now = at("13:00")
        trainer = w.engine.allocate(
            {"service_name": "trainer", "required_gpus": 1, "ttl_seconds": 7200}
        )
        w.now = at("13:00:20")
        batch = w.engine.allocate(
            {"service_name": "batch", "required_gpus": 1, "ttl_seconds": 3600}
        )
        w.now = at("14:00")
        drained = w.engine.drain_node("gpu-node-1")
        assert set(drained["preempted"]) == {trainer["id"], batch["id"]}
        t, b = w.engine.get(trainer["id"]), w.engine.get(batch["id"])
        assert t["status"] == b["status"] == "preempting"
        assert hms(t["preempt_at"]) == hms(b["preempt_at"]) == "14:00:30"
        assert hms(t["expires_at"]) == "14:00:30" and hms(b["expires_at"]) == "14:00:20"
        if trainer_releases:
            w.release("14:00:12", trainer)  # checkpointed
            assert w.status(trainer) == "preempted"
        w.now = at("14:00:20")
        w.engine.reap()
        assert w.status(batch) == "expired"
        if not trainer_releases:
            w.now = at("14:00:30")
            w.engine.reap()
            assert w.status(trainer) == "preempted"
            assert hms(w.engine.get(trainer["id"])["ended_at"]) == "14:00:30"
    says(
        text,
        "`preempt_at` 14:00:30",
        "ends `expired` at 14:00:20",
        "releases at 14:00:12: it ends `preempted`",
        "ended it `preempted` at 14:00:30",
    )


def test_quotas_example(world):
    from app.errors import TenantQueueFull, Unsatisfiable

    text = section("Quotas")
    w = world(config_of(text))
    w.node("a", 16)
    with pytest.raises(Unsatisfiable) as err:
        w.ask("10:00", "training-team", 10, 60)
    assert err.value.status == 422 and err.value.details["limit"] == 8
    six = w.ask("10:00", "training-team", 6, 60)
    assert six["status"] == "allocated"
    four = w.ask("10:00", "training-team", 4, 60)
    assert four["status"] == "queued" and w.why(four)["reason"] == "quota"
    assert w.engine.counts()["gpus_available"] == 10
    assert w.ask("10:00", "inference-team", 4, 60)["status"] == "allocated"
    two = w.ask("10:00", "training-team", 2, 60)
    assert two["status"] == "allocated" and w.status(four) == "queued"
    again = w.ask("10:00", "training-team", 2, 60)
    assert again["status"] == "queued" and w.why(again)["reason"] == "quota"
    with pytest.raises(TenantQueueFull) as full:
        w.ask("10:00", "training-team", 2, 60)
    assert full.value.status == 429 and full.value.code == "tenant_queue_full"
    assert full.value.details["queued"] == 2 and full.value.details["limit"] == 2
    w.release("10:30", six)
    assert w.status(four) == "allocated" and w.status(again) == "allocated"
    says(
        text,
        "`422 unsatisfiable` with `details.limit: 8`",
        "it waits with `reason: quota` although 10 GPUs are free",
        "`429 tenant_queue_full` with `queued: 2, limit: 2`",
        "the 4-GPU request, first in its queue, is granted (it holds 6), then the 2-GPU one "
        "(it holds 8)",
    )


def test_fair_share_example(world):
    text = section("Fair share")
    w = world(config_of(text))
    w.node("a", 8)
    job = w.ask("09:00", "third", 8, 120)
    for _ in range(10):
        w.ask("09:10", "inference-team", 1, 60)
    for _ in range(10):
        w.ask("09:10", "training-team", 1, 60)
    w.release("10:00", job)
    grants = [
        e["service_name"]
        for e in w.engine.events(count=1000)
        if e["event"] == "allocated" and e["service_name"] != "third"
    ]
    assert grants == [
        "inference-team",
        "training-team",
        "training-team",
        "training-team",
        "inference-team",
        "training-team",
        "training-team",
        "training-team",
    ]
    rows = {r["tenant"]: r for r in w.engine.tenants()}
    assert rows["training-team"]["gpus_held"] == 6 and rows["inference-team"]["gpus_held"] == 2
    says(text, "`training-team` ends with 6 GPUs and `inference-team` with 2: 3:1")
    # without fair share the queue order wins
    w2 = world({"tenants": {"quotas": config_of(text)["tenants"]["quotas"]}})
    w2.engine.redis.flushdb()
    w2.node("a", 8)
    job = w2.ask("09:00", "third", 8, 120)
    for _ in range(10):
        w2.ask("09:10", "inference-team", 1, 60)
    for _ in range(10):
        w2.ask("09:10", "training-team", 1, 60)
    w2.release("10:00", job)
    assert {r["tenant"]: r["gpus_held"] for r in w2.engine.tenants()}["inference-team"] == 8
    says(text, "would have received all 8")


def test_each_tenant_keeps_its_load_example(world):
    text = section("Each tenant keeps its load")
    w = world(config_of(text))
    w.node("a", 2)
    w.node("b", 1)
    w.ask("10:00", "q", 1, 32, nodes=["a"])
    job = w.ask("10:00", "a", 1, 5, nodes=["a"])
    w.ask("10:00", "z", 1, 50, nodes=["b"])
    q1 = w.ask("10:00", "q", 1, 5, nodes=["b"])
    q2 = w.ask("10:00", "q", 1, 5)
    assert w.engine.get(q1["id"])["position"] == 1
    assert w.why(q2) == {"reason": "capacity", "eta": "10:32"}
    assert w.why(q1) == {"reason": "capacity", "eta": "10:50"}
    says(text, "Q2: `reason: capacity`, `eta` 10:32", "Q1: `reason: capacity`, `eta` 10:50")
    # what really happens: a submits its next job as each ends (before the reaper ends the
    # old one), and it takes the GPU, until q's own GPU frees at 10:32
    for minute in range(5, 35, 5):
        w.ask(f"10:{minute:02d}", "a", 1, 5, nodes=["a"])
        w.engine.reap()
        assert w.status(q2) == "queued"
    assert w.status(job) == "expired"
    w.now = at("10:32")
    w.engine.reap()
    assert w.status(q2) == "allocated"
    assert hhmm(w.engine.get(q2["id"])["allocated_at"]) == "10:32"


def yaml_blocks(text: str) -> list[dict]:
    return [yaml.safe_load(b) or {} for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def preempting_ids(w) -> set[str]:
    return {a["id"] for a in w.engine.snapshot()["allocations"] if a["status"] == "preempting"}


def test_guarantee_preemption_of_a_shared_request_example(world):
    text = section("Guarantee and preemption")
    w = world(yaml_blocks(text)[0])
    w.node("a", 2)
    x = w.ask("09:00", "batch-team", 1, 60)
    slots = [
        w.ask("09:00", "batch-team", 1, 60, sharing="shared", min_memory_mb=25000, priority=p)
        for p in (3, 5, 5)
    ]
    assert x["gpu_ids"] == [0] and {s["gpu_ids"][0] for s in slots} == {1}
    assert {t["tenant"]: t["gpus_held"] for t in w.engine.tenants()}["batch-team"] == 4

    first = w.ask("09:30", "inference-team", 1, 60, sharing="shared", min_memory_mb=20000)
    assert first["status"] == "queued"
    assert preempting_ids(w) == {slots[0]["id"]}
    assert hms(w.engine.get(slots[0]["id"])["preempt_at"]) == "09:30:30"
    assert w.engine.get(first["id"])["reserved_node"] == "a"
    w.release("09:30:10", slots[0])
    assert w.status(slots[0]) == "preempted"
    got = w.engine.get(first["id"])
    assert got["status"] == "allocated" and got["gpu_ids"] == [1]

    second = w.ask("09:31", "inference-team", 1, 60, sharing="shared", min_memory_mb=40000)
    assert second["status"] == "queued" and preempting_ids(w) == {x["id"]}
    assert hms(w.engine.get(x["id"])["preempt_at"]) == "09:31:30"
    w.now = at("09:31:30")
    assert w.engine.reap()["preempted"] == [x["id"]]
    got = w.engine.get(second["id"])
    assert got["status"] == "allocated" and got["gpu_ids"] == [0]
    held = {t["tenant"]: t["gpus_held"] for t in w.engine.tenants()}
    assert held == {"batch-team": 2, "inference-team": 2}

    third = w.ask("09:32", "inference-team", 1, 60, sharing="shared", min_memory_mb=50000)
    assert third["status"] == "queued" and preempting_ids(w) == set()
    w.engine.schedule_pass()
    assert preempting_ids(w) == set()
    says(
        text,
        "GPU 1 has 6,920 MB of room",
        "It holds 4 GPUs (1 + three shared), 3 above its guarantee",
        "the priority-3 slot turns `preempting` with `preempt_at` 09:30:30",
        "it ends `preempted`, and the request is granted on GPU 1 in the same call "
        "(11,920 MB of room left)",
        "GPU 0's exclusive allocation turns `preempting` (`batch-team` keeps 2 ≥ 1)",
        "ends it `preempted` at 09:31:30 and the request is granted on GPU 0",
        "it waits and nothing is preempted for it",
    )


def test_guarantee_preemption_of_an_exclusive_request_example(world):
    text = section("Guarantee and preemption")
    w = world(yaml_blocks(text)[1])
    w.node("n1", 4)
    w.node("n2", 4)
    b = []
    for i in range(8):  # a second apart; priority 3 for the third on each node
        w.now = at("09:30") + i
        prio = 3 if i in (2, 6) else 5
        b.append(
            w.engine.allocate({"service_name": "team-b", "ttl_seconds": 3600, "priority": prio})
        )
    assert [x["node"] for x in b] == ["n1"] * 4 + ["n2"] * 4
    a = w.ask("10:00", "team-a", 2, 60)
    assert a["status"] == "queued"
    victims = sorted(preempting_ids(w))
    assert victims == sorted([b[2]["id"], b[3]["id"]])  # n1: priority 3, then the latest
    assert {hms(w.engine.get(v)["preempt_at"]) for v in victims} == {"10:00:30"}
    assert w.engine.get(a["id"])["reserved_node"] == "n1"
    w.release("10:00:10", b[2])
    assert w.status(b[2]) == "preempted"
    c = w.ask("10:00:10", "team-c", 1, 60, priority=10)
    assert c["status"] == "queued"
    w.now = at("10:00:30")
    w.engine.reap()
    got = w.engine.get(a["id"])
    assert got["status"] == "allocated" and got["node"] == "n1"
    assert w.status(c) == "queued"
    says(
        text,
        "two victims on either node, a tie that `n1` wins",
        "`preempting` with `preempt_at` 10:00:30",
        "`team-a`'s request is granted on `n1`; `team-c` still waits",
    )
