"""Render config/config.yaml.example from the option declarations, so the two never drift.

``gpu-orchestrator config example`` prints it; a test checks that the shipped file equals it.
"""

from __future__ import annotations

import yaml

from app.settings import SPEC, Opt, format_duration

HEADER = """\
# gpu-orchestrator configuration: every option, with its built-in default.
# Copy to config.yaml (or point CONFIG_PATH / --config at a file) and keep only what you change.
# Durations accept 15s, 5m, 1h, 250ms or a number of seconds.
# Environment variables override the file: GPU_ORCH__<SECTION>__<KEY>, e.g.
#   GPU_ORCH__SCHEDULER__MAX_QUEUE_SIZE=500  GPU_ORCH__WORKLOAD_DEFAULTS__TRAINING__DEFAULT_GPUS=2
# plus the original names PORT, REDIS_URL, DEEPAGENTS_URL, GRAPH_SERVICE_URL and CONFIG_PATH.
# Regenerate with: gpu-orchestrator config example > config/config.yaml.example
"""

#: Commented examples shown under an option, for values whose default is empty.
EXAMPLES = {
    ("webhooks", "allowed_hosts"): [
        "- '*'                    # any host with a public address",
        "- hooks.example.com      # this host, any port (public addresses only)",
        "- '*.corp.example'       # any name below corp.example (public addresses only)",
        "- hooks.example.com:8443 # this host on this port only",
        "- 10.20.0.0/16           # any receiver in this network, e.g. an internal one",
        "- 127.0.0.0/8            # loopback: a receiver on this machine (dev, tests)",
    ],
    ("auth", "api_keys"): [
        '"your-secret-key-1": training-service      # key: principal',
        '"sha256:<64 hex digits of sha256(key)>": inference-service',
    ],
    ("redis", "sentinel"): [
        "master_name: mymaster",
        'sentinels: ["10.0.0.11:26379", "10.0.0.12:26379", "10.0.0.13:26379"]',
        "password: change-me     # authenticates to the sentinels and to Redis; never shown",
    ],
    ("tenants", "quotas"): [
        "training-team:  {weight: 2, guaranteed_gpus: 4, max_gpus: 8}",
        "inference-team: {weight: 1, guaranteed_gpus: 2, max_gpus: 4, max_queued: 50}",
    ],
    ("monitoring", "simulated"): [
        "dynamic: false          # true: telemetry drifts with load; false: values stay as written",
        "nodes:",
        "  - name: node-a",
        "    count: 8            # shorthand: `count` identical GPUs described by `gpu`",
        '    gpu: {name: "NVIDIA H100 80GB HBM3", memory_total_mb: 81559}',
        "  - name: node-b",
        "    gpus:               # or each GPU spelled out, in index order",
        '      - {name: "NVIDIA A10", memory_total_mb: 23028, memory_used_mb: 20980, utilization: 10}',
        '      - {name: "NVIDIA A10", memory_total_mb: 23028, memory_used_mb: 0, utilization: 95}',
    ],
}


def _scalar(opt: Opt) -> str:
    value = opt.show(opt.default)
    if isinstance(value, str) and value.endswith(("s", "m", "h")) and opt.show is format_duration:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _render(
    spec: dict, path: tuple[str, ...], indent: int, out: list[str], seen: set[tuple[str, str]]
) -> None:
    pad = "  " * indent
    for key, opt in spec.items():
        if isinstance(opt, dict):
            out.append(f"{pad}{key}:")
            _render(opt, path + (key,), indent + 1, out, seen)
            continue
        if opt.doc and (key, opt.doc) not in seen:  # say it once, e.g. per workload type
            seen.add((key, opt.doc))
            out.append(f"{pad}# {opt.doc}")
        out.append(f"{pad}{key}: {_scalar(opt)}")
        for line in EXAMPLES.get(path + (key,), []):
            out.append(f"{pad}#   {line}")


def render() -> str:
    out = [HEADER.rstrip("\n")]
    for section, spec in SPEC.items():
        out.append("")
        out.append(f"{section}:")
        _render(spec, (section,), 1, out, set())
    return "\n".join(out) + "\n"
