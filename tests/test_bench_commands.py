"""The benchmarks that start the API as a process still start it: a settings rule added later
(node_forget_after must exceed node_heartbeat_timeout) once made bench/slowloris.py exit at
start while nothing ran it. Each runs at its smallest size; the figures are not checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_slow_client_benchmark_runs_and_accounts_for_every_connection():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "slowloris.py"), "--held", "20", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["held_connections"] == 20 and out["probes"] > 0
    ends = ("slow_closed_while_probing", "slow_closed_by_server", "slow_still_open")
    assert sum(out[k] for k in ends) == 20
