"""Helpers shared by the hypothesis state machines over the engine (tests/test_engine_invariants.py,
tests/test_tenant_invariants.py): the scan of the stored requests, the
no-GPU-held-twice check, the guarantee preemption checks, the release of everything at teardown
and the run with the suite's hypothesis settings."""

from __future__ import annotations

import json
from collections.abc import Iterable

from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from app import errors, record
from app.engine import Engine

#: the statuses of an allocation that holds its GPUs (a preempting one until it ends)
LIVE = ("allocated", "preempting")


def counted_gpus(r: dict) -> int:
    """The GPUs an allocation counts for its tenant (max_gpus, guarantees): one when shared."""
    return 1 if r["sharing"] == "shared" else len(json.loads(r["gpu_ids"]))


def tenant_holdings(records: Iterable[dict]) -> dict[str, int]:
    """tenant -> GPUs its live allocations count for (records without a tenant left out)."""
    held: dict[str, int] = {}
    for r in records:
        if r["status"] in LIVE and r.get("tenant"):
            held[r["tenant"]] = held.get(r["tenant"], 0) + counted_gpus(r)
    return held


def check_guarantee_preemptions(
    records: list[dict], guaranteed: dict[str, int], seen: set[str]
) -> set[str]:
    """The guarantee preemption invariants, after one step of a state machine; ``seen``: the
    guarantee victims after the step before. Returns the victims now (the next ``seen``).

    * A tenant at or below its guarantee is never preempted: when a step marks one of its
      allocations preempting, what it holds once all of its preempting allocations are gone
      (a shared allocation counting one GPU) is still at least its guarantee.
    * Preemption never takes more than the waiting request needs: the victims made for one
      request sit on one node and hold at most the GPUs it asked for (one for a shared
      request: its victims free room on one GPU), counting each GPU once (shared holders of
      one GPU free one GPU together); an exclusive holder taken for a shared request holds that
      one GPU only.
    """
    by_id = {r["id"]: r for r in records}
    held = tenant_holdings(records)
    victims = [r for r in records if r["status"] == "preempting" and r.get("reason") == "guarantee"]
    leaving: dict[str, int] = {}
    for r in records:
        if r["status"] == "preempting" and r.get("tenant"):
            leaving[r["tenant"]] = leaving.get(r["tenant"], 0) + counted_gpus(r)
    for v in victims:
        if v["id"] in seen:
            continue
        t = v["tenant"]
        assert held[t] - leaving.get(t, 0) >= guaranteed.get(t, 0), (
            f"{v['id']} preempted though {t} keeps {held[t] - leaving.get(t, 0)}"
            f" < its guarantee {guaranteed.get(t, 0)}"
        )
    per_request: dict[str, list[dict]] = {}
    for v in victims:
        per_request.setdefault(v["preempted_for"], []).append(v)
    for rid, vs in per_request.items():
        want = by_id.get(rid)
        if want is None:
            continue  # the request ended; its victims still end
        need = 1 if want["sharing"] == "shared" else int(want["required_gpus"])
        assert len({v["node"] for v in vs}) == 1, f"victims of {rid} on several nodes"
        freed = {(v["node"], str(i)) for v in vs for i in json.loads(v["gpu_ids"])}
        assert len(freed) <= need, f"{rid} needs {need} GPU(s), {len(freed)} taken: {vs}"
        if want["sharing"] == "shared":
            assert all(len(json.loads(v["gpu_ids"])) == 1 for v in vs), vs
    return {v["id"] for v in victims}


def stored_requests(engine: Engine, redis) -> dict[str, dict]:
    """Every request hash, read key by key (not through the engine's indexes), with the
    fields a sparse record leaves out at their default (app/record.py), as the engine reads
    them."""
    reqs = {}
    for key in redis.scan_iter(match=engine.keys.request("*"), count=1000):
        h = {**record.DEFAULTS, **redis.hgetall(key)}
        reqs[h["id"]] = h
    return reqs


def exclusive_holders(records: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(node, GPU index) -> the live exclusive allocation holding it, from stored request
    hashes; fails when one GPU is in two exclusive allocations."""
    held: dict[tuple[str, str], str] = {}
    for r in records:
        if r["status"] not in LIVE or r["sharing"] == "shared":
            continue
        for idx in json.loads(r["gpu_ids"]):
            key = (r["node"], str(idx))
            assert key not in held, (
                f"GPU {key} in two exclusive allocations: {held[key]}, {r['id']}"
            )
            held[key] = r["id"]
    return held


def release_all(engine: Engine, ids: Iterable[str]) -> None:
    """Release every id (those already ended or cancelled are skipped)."""
    for rid in ids:
        try:
            engine.release(rid)
        except errors.NotFound:
            pass


def run_machine(
    machine: type[RuleBasedStateMachine], redis, settings, *, max_examples: int = 15
) -> None:
    """Run a state machine that reads ``redis`` and ``settings`` from its class."""
    machine.redis = redis
    machine.settings = settings
    run_state_machine_as_test(
        machine,
        settings=hyp_settings(
            max_examples=max_examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
