"""Helpers shared by the hypothesis state machines over the engine (tests/test_engine_invariants.py,
tests/test_tenant_invariants.py): the scan of the stored requests, the
no-GPU-held-twice check, the release of everything at teardown and the run with the suite's
hypothesis settings."""

from __future__ import annotations

import json
from collections.abc import Iterable

from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from app import errors, record
from app.engine import Engine


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
        if r["status"] != "allocated" or r["sharing"] == "shared":
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
