"""Issue 13 part 5: the service uses its dependencies through documented APIs.

Where no public API exists (RQ's durability fixes in workers/worker.py and workers/scheduler.py)
each override is pinned here by a canary that fails, naming the internal, when an upgrade moves
it. The other tests check that the supported replacements keep the behaviour users notice.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
        "import shutil; shutil.rmtree(path)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "counter_" in done.stdout and "histogram_" in done.stdout, done.stdout


def test_setting_the_dir_after_prometheus_was_imported_fails_loudly():
    code = "import prometheus_client\nfrom app import serve\nserve.prepare_metrics_dir()\n"
    done = _python(code)
    assert done.returncode != 0
    assert "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR" in done.stderr


# ------------------------------------------------------------------------------ RQ canaries
# workers/worker.py and workers/scheduler.py override or copy these RQ 3.0 functions (the
# durability fixes of docs/reliability.md, Findings; the delivery slots). The pins are the
# sha256 of each upstream function's source as checked; an upgrade that changes one fails here,
# naming it: re-read it, drop the override if upstream fixed the problem, else port it, then
# update the pin.
RQ_UPSTREAM = {
    "rq.job.Job.retry": "4a0f7cec2323d8a5",
    "rq.queue.Queue.dequeue_any": "2452e56ad5197396",
    "rq.worker.base.BaseWorker.prepare_job_execution": "d08dd32962e3f82a",
    "rq.worker.base.BaseWorker.clean_registries": "e2c9790c8156c72c",
    "rq.worker.base.BaseWorker.run_maintenance_tasks": "3d8a446b5354fce3",
    "rq.worker.base.BaseWorker.handle_exception": "fffd9b2925ac1432",
    "rq.worker.base.BaseWorker._install_signal_handlers": "f30e3c58661a235a",
    "rq.worker.base.BaseWorker.heartbeat": "63b1089fd146d19c",
    "rq.worker.base.BaseWorker.dequeue_timeout": "62cbfcfcde523452",
    "rq.worker.worker_classes.SimpleWorker.execute_job": "eae0f23110aeb280",
    "rq.worker.worker_classes.SimpleWorker.get_heartbeat_ttl": "f83449c2eebaacb1",
    "rq.cron.CronJob.enqueue": "7d695e184914aa75",
    "rq.cron.CronScheduler.register": "8a9f4ee352038d3a",
}
#: Private names and instance attributes of RQ the overrides use: (class, attribute).
RQ_PRIVATE = (
    ("rq.queue.Queue", "_enqueue_job"),
    ("rq.worker.base.BaseWorker", "_exc_handlers"),
    ("rq.worker.base.BaseWorker", "_shutdown_requested_date"),
    ("rq.worker.base.BaseWorker", "_stop_requested"),
    ("rq.cron.CronScheduler", "_cron_jobs"),
    ("rq.job.Job", "enqueue_at_front_on_retry"),
    ("rq.job.Job", "retries_left"),
)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for part in parts[i:]:
        obj = getattr(obj, part)
    return obj.fget if isinstance(obj, property) else obj


def _source_hash(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(RQ_UPSTREAM))
def test_canary_rq_functions_we_override_are_unchanged(name):
    try:
        found = _source_hash(_resolve(name))
    except (AttributeError, ImportError) as exc:
        pytest.fail(
            f"RQ internal {name} is gone ({exc}); workers/worker.py or "
            f"workers/scheduler.py overrides it"
        )
    assert found == RQ_UPSTREAM[name], (
        f"RQ internal {name} changed (source hash {found}): re-read it, drop or port the "
        f"override in workers/worker.py / workers/scheduler.py, then update RQ_UPSTREAM here"
    )


@pytest.mark.parametrize("owner,attr", RQ_PRIVATE)
def test_canary_rq_private_names_still_exist(owner, attr):
    cls = _resolve(owner)
    assert hasattr(cls, attr) or f"self.{attr}" in inspect.getsource(cls.__init__), (
        f"RQ internal {owner}.{attr} is gone; workers/worker.py or workers/scheduler.py uses it"
    )


def test_canary_notices_a_changed_upstream_function(monkeypatch):
    """Not vacuous: a different body gives a different hash."""
    import rq.job

    before = _source_hash(rq.job.Job.retry)

    def retry(self, queue, pipeline):  # stands in for an upgraded RQ
        return None

    monkeypatch.setattr(rq.job.Job, "retry", retry)
    assert _source_hash(_resolve("rq.job.Job.retry")) != before
