"""Microseconds per ``WorkloadAnalyzer.analyze`` call (rules only, no advisor or graph service).

Run from the repository root: ``.venv/bin/python -m bench.workload``; prints one JSON object.
"""

from __future__ import annotations

import json
import time

from app import settings as settings_mod
from app.workload import WorkloadAnalyzer

CASES = {
    "generic_empty": ("generic", {}),
    "training_hints": ("training", {"model_size": "large", "batch_size": 256, "multi_gpu": True}),
    "inference_family": (
        "inference",
        {"model_name": "google/gemma-7b-it", "dedicated": True, "concurrent_requests": 25},
    ),
    "inference_estimate": (
        "inference",
        {"model_name": "meta-llama/Llama-3-70b-instruct", "quantization": "int8"},
    ),
    "workflow_deps": (
        "generic",
        {
            "workflow_id": "wf-1",
            "workflow_priority": 9,
            "workflow_dependencies": [f"req-{i}" for i in range(20)],
        },
    ),
}


def main(n: int = 20000) -> dict:
    analyzer = WorkloadAnalyzer(settings_mod.defaults())
    out = {}
    for name, (wtype, data) in CASES.items():
        for _ in range(200):
            analyzer.analyze(wtype, data)
        start = time.perf_counter()
        for _ in range(n):
            analyzer.analyze(wtype, data)
        out[name] = round((time.perf_counter() - start) / n * 1e6, 2)
    return {"unit": "microseconds per analyze()", "calls_per_case": n, "results": out}


if __name__ == "__main__":
    print(json.dumps(main()))
