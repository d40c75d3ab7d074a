"""``gpu-orchestrator admin``: the /admin API from the shell.

It talks to a running API (``GPU_ORCH_URL``, default ``http://127.0.0.1:8086``) with the key in
``GPU_ORCH_API_KEY``, so it works from any machine that can reach the API, and every action is
recorded with the key's principal like a click in the console. Output is a table for people or
``--json`` (the API's answer) for scripts. A refused request (4xx) or a GPU_ORCH_URL that is
not http(s) exits with code 2, an unreachable or failing API (5xx) with 1, both with one line
on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from app.request_rules import FIELDS

DEFAULT_URL = "http://127.0.0.1:8086"
TIMEOUT = 30.0
#: how long `drain --wait` waits by default (seconds)
DRAIN_WAIT = 60.0


class AdminError(Exception):
    """One line for stderr, and the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


SUMMARY = "operate the fleet through the API: nodes, cordon, drain, forget, priority"
DESCRIPTION = (
    "Operate the fleet through the API at $GPU_ORCH_URL (default "
    f"{DEFAULT_URL}) with the admin key in $GPU_ORCH_API_KEY: list nodes, cordon or "
    "uncordon a node or one GPU, drain or forget a node, change a queued request's "
    "priority. A refused request exits 2, an unreachable API 1."
)


def add_actions(
    admin: argparse.ArgumentParser,
    parser_class: type,
    global_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The actions under ``gpu-orchestrator admin`` (``parser_class`` keeps the CLI's one-line
    errors; ``global_options`` adds --config and friends to each)."""
    actions = admin.add_subparsers(
        dest="admin_command", metavar="ACTION", required=True, parser_class=parser_class
    )

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=help_text)
        global_options(p)
        p.add_argument("--json", action="store_true", help="print the API's JSON answer")
        return p

    action("nodes", "list every node, alive or not, with its GPUs")
    action("cordon", "no new grants on a node or one GPU (NODE or NODE:INDEX)").add_argument(
        "target", metavar="NODE[:INDEX]"
    )
    action("uncordon", "make a node or one GPU schedulable again").add_argument(
        "target", metavar="NODE[:INDEX]"
    )
    drain = action(
        "drain",
        "cordon a node and preempt its allocations with notice (preemption.grace_period)",
    )
    drain.add_argument("node", metavar="NODE")
    drain.add_argument(
        "--wait",
        action="store_true",
        help="preempt nothing: return only when the holders have released every allocation "
        "on the node (or at --timeout)",
    )
    drain.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="longest wait with --wait (default 60, at most 600)",
    )
    action(
        "forget", "forget a node that stopped reporting; its allocations end as lost"
    ).add_argument("node", metavar="NODE")
    rule = FIELDS["priority"]
    prio = action("priority", f"change a queued request's priority ({rule.lo}..{rule.hi})")
    prio.add_argument("request_id", metavar="ID")
    prio.add_argument("priority", metavar="N", type=int)


def _target(text: str) -> tuple[str, int | None]:
    """``node`` or ``node:3``; a node name may itself hold ':' (only digits after the last
    one make an index)."""
    node, sep, index = text.rpartition(":")
    if sep and node and index.isdigit():
        return node, int(index)
    if not text:
        raise AdminError("NODE must not be empty", 2)
    return text, None


def _call(method: str, path: str, body: dict | None = None, timeout: float = TIMEOUT) -> Any:
    import requests

    base = (os.environ.get("GPU_ORCH_URL") or DEFAULT_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise AdminError(f"GPU_ORCH_URL must start with http:// or https://, got {base!r}", 2)
    headers = {"Accept": "application/json"}
    key = os.environ.get("GPU_ORCH_API_KEY")
    if key:  # a bearer token: accepted whatever auth.header_name the server reads
        headers["Authorization"] = f"Bearer {key}"
    try:
        resp = requests.request(
            method, base + path, json=body, headers=headers, timeout=timeout, allow_redirects=False
        )
    except requests.RequestException as exc:
        raise AdminError(
            f"cannot reach {base} ({type(exc).__name__}); set GPU_ORCH_URL", 1
        ) from None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        msg = (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
        raise AdminError(
            f"{method} {path}: {resp.status_code} {msg or resp.reason}",
            2 if resp.status_code < 500 else 1,
        )
    if not isinstance(data, dict):  # a wrong URL, a proxy's or a captive portal's page
        raise AdminError(
            f"{base} answered {method} {path} with HTTP {resp.status_code} but not the API's "
            f"JSON; set GPU_ORCH_URL to the gpu-orchestrator API",
            1,
        )
    return data


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def nodes_table(nodes: list[dict]) -> str:
    rows = [["NODE", "STATE", "SILENT", "GPUS", "FREE", "CORDONED", "ALLOCATIONS"]]
    for n in nodes:
        gpus = n.get("gpus") or []
        state = "alive" if n.get("alive") else "silent"
        if n.get("draining"):
            state += ",draining"
        elif n.get("cordoned"):
            state += ",cordoned"
        free = sum(1 for g in gpus if g.get("schedulable") and not g.get("allocated"))
        cordoned = [str(g["index"]) for g in gpus if g.get("cordoned")]
        rows.append(
            [
                n["name"],
                state,
                _age(n.get("heartbeat_age_seconds")),
                str(len(gpus)),
                str(free),
                ",".join(cordoned) or "-",
                str(len(n.get("allocations") or [])),
            ]
        )
    return _table(rows) if nodes else "no nodes"


def run(args: argparse.Namespace, settings: Any = None) -> int:
    try:
        data, text, code = _do(args)
    except AdminError as exc:
        print(f"gpu-orchestrator: error: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(data, indent=2) if args.json else text)
    return code


def _do(args) -> tuple[Any, str, int]:
    cmd = args.admin_command
    if cmd == "nodes":
        data = _call("GET", "/admin/nodes")
        return data, nodes_table(data["nodes"]), 0
    if cmd in ("cordon", "uncordon"):
        node, index = _target(args.target)
        if index is None:
            data = _call("POST", f"/admin/nodes/{quote(node, safe='')}/{cmd}")
            return data, f"{node}: {'cordoned' if data['cordoned'] else 'schedulable'}", 0
        data = _call("POST", f"/admin/gpus/{quote(node, safe='')}/{index}/{cmd}")
        return data, f"{node}:{index}: {'cordoned' if data['cordoned'] else 'schedulable'}", 0
    if cmd == "drain":
        if args.timeout is not None and not args.wait:
            raise AdminError("--timeout applies to --wait only: add --wait, or drop --timeout", 2)
        if args.timeout is None:
            args.timeout = DRAIN_WAIT
        if not 0 <= args.timeout <= 600:
            raise AdminError("--timeout must be 0..600 seconds", 2)
        path = f"/admin/nodes/{quote(args.node, safe='')}/drain"
        if not args.wait:
            data = _call("POST", path)
        else:
            # the server may answer before the timeout (it lets a held thread go when it needs
            # it): ask again with what is left, so --timeout is the one deadline
            deadline = time.monotonic() + args.timeout
            while True:
                left_s = max(deadline - time.monotonic(), 0.0)
                data = _call(
                    "POST", f"{path}?wait=true&timeout={left_s:.3f}", timeout=TIMEOUT + left_s
                )
                if data.get("drained") or left_s <= 0:
                    break
                time.sleep(min(0.5, left_s))
        left = data.get("allocations") or []
        if data.get("drained"):
            return data, f"{args.node}: drained (cordoned, no allocations left)", 0
        text = f"{args.node}: draining; {len(left)} allocation(s) left: {', '.join(left)}"
        preempted = data.get("preempted") or []
        if preempted:
            text += (
                f"\n{len(preempted)} allocation(s) given notice (preempting; they end as "
                f"preempted after the grace period): {', '.join(preempted)}"
            )
        return data, text, 1 if args.wait else 0
    if cmd == "forget":
        data = _call("DELETE", f"/admin/nodes/{quote(args.node, safe='')}")
        lost = data.get("lost") or []
        return (
            data,
            (
                f"{args.node}: forgotten; {len(lost)} allocation(s) ended as lost"
                + (f": {', '.join(lost)}" if lost else "")
            ),
            0,
        )
    if cmd == "priority":
        data = _call(
            "POST",
            f"/admin/requests/{quote(args.request_id, safe='')}/priority",
            {"priority": args.priority},
        )
        pos = data.get("position")
        return (
            data,
            (
                f"{args.request_id}: priority {data.get('priority')}"
                + (f", position {pos}" if pos else f", {data.get('status')}")
            ),
            0,
        )
    raise AdminError(f"unknown action {cmd}", 2)  # pragma: no cover - argparse refuses first
