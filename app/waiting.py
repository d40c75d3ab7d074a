"""Why a queued request waits, and the earliest time it could run, from one engine snapshot.

The console shows this beside every queued request. It mirrors the engine's placement rules
(``includes/prelude.lua``: one node holds all GPUs of an allocation; a GPU qualifies when it is
healthy, not cordoned, not lost, on a live node, free, with enough free memory and low enough
utilization) but only explains: the engine alone decides. The ETA is a lower bound from the
lease ends of the allocations in the way (None when one of them never expires or no node could
ever fit); fair-share ordering (issue 14) will refine it.
"""

from __future__ import annotations

import math
from typing import Any


def _qualifies(gpu: dict, req: dict, *, ignore_holder: bool) -> bool:
    if not gpu.get("schedulable"):
        return False
    shared = req.get("sharing") == "shared"
    if not ignore_holder:
        if gpu.get("allocated_to"):
            return False
        if not shared and int(gpu.get("shared_n") or 0) > 0:
            return False
    need = int(req.get("min_memory_mb") or 0)
    cap = int(req.get("max_memory_mb") or 0)
    if ignore_holder:
        have = int(gpu.get("memory_total_mb") or 0)
        return have >= need
    have = int(gpu.get("memory_free_mb") or 0) - (int(gpu.get("shared_mb") or 0) if shared else 0)
    util = float(req.get("max_utilization") if req.get("max_utilization") is not None else 100)
    return have >= need and (not cap or have <= cap) and float(gpu.get("utilization") or 0) <= util


def explain(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """request id -> {"reason": text, "eta": epoch seconds or None} for every queued request."""
    now = float(snapshot["now"])
    gpus_by_node: dict[str, list[dict]] = {}
    for gpu in snapshot["gpus"]:
        gpus_by_node.setdefault(gpu.get("node") or "", []).append(gpu)
    lease_end = {
        a["id"]: (a.get("expires_at") if a.get("expires_at") is not None else math.inf)
        for a in snapshot["allocations"]
    }
    live = set(lease_end)
    queued = {q["id"]: q for q in snapshot["queue"]}
    out = {}
    for q in snapshot["queue"]:
        try:
            out[q["id"]] = _one(q, now, gpus_by_node, lease_end, live, queued)
        except (TypeError, ValueError, OverflowError):  # a damaged record: say so, show the rest
            out[q["id"]] = {"reason": "unknown (its stored record is damaged)", "eta": None}
    return out


def _one(q, now, gpus_by_node, lease_end, live, queued) -> dict[str, Any]:
    k = int(q.get("required_gpus") or 1)
    waiting_on = [d for d in (q.get("depends_on") or []) if d in live or d in queued]
    if waiting_on:
        return {
            "reason": f"waits for {', '.join(waiting_on[:3])} to finish (depends_on)",
            "eta": None,
        }
    ahead = max(int(q.get("position") or 1) - 1, 0)
    # the k-th earliest time enough qualifying GPUs are free on one node
    best_eta, fits_now, could_fit = math.inf, False, False
    largest = 0
    for gpus in gpus_by_node.values():
        usable = [g for g in gpus if _qualifies(g, q, ignore_holder=True)]
        largest = max(largest, len(usable))
        if len(usable) < k:
            continue
        could_fit = True
        times = []
        for g in usable:
            if _qualifies(g, q, ignore_holder=False):
                times.append(now)
            elif g.get("allocated_to"):
                times.append(lease_end.get(g["allocated_to"], math.inf))
            else:
                times.append(math.inf)  # shared holders, or busy/too full right now
        times.sort()
        best_eta = min(best_eta, times[k - 1])
        fits_now = fits_now or times[k - 1] <= now
    need = f"{k} GPU{'s' if k > 1 else ''}" + (
        f" with {q.get('min_memory_mb')} MB" if q.get("min_memory_mb") else ""
    )
    if not could_fit:
        return {
            "reason": f"no live node has {need} that are healthy and not cordoned "
            f"(the most on one node: {largest})",
            "eta": None,
        }
    if q.get("reserved_node"):
        reason = f"holds a reservation on {q['reserved_node']}; waits for its GPUs to free up"
    elif fits_now:
        reason = (
            "fits now; the next scheduling pass grants it"
            if not ahead
            else f"fits now; {ahead} request(s) ahead are served first"
        )
    else:
        reason = f"waits for {need} on one node to be released"
        if ahead:
            reason += f"; {ahead} request(s) ahead"
    return {"reason": reason, "eta": None if math.isinf(best_eta) else max(best_eta, now)}
