"""Issue 13 part 5: the service uses its dependencies through documented APIs.

Where no public API exists (RQ's durability fixes, all in workers/rq_overrides.py) each
override is pinned here by a canary that fails, naming the internal, when an upgrade moves it. The other tests check that the supported replacements keep the behaviour users notice.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import subprocess
import sys

import pytest

from workers import rq_overrides

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
# workers/rq_overrides.py overrides or copies RQ 3.0 functions (the durability fixes of
# docs/reliability.md, Findings; the delivery slots) and pins, next to each override, the sha256
# of the upstream source as checked (UPSTREAM), the private names it uses (PRIVATE) and the RQ
# names it calls (CALLED). An upgrade that changes one fails here, naming it: re-read it, drop
# the override if upstream fixed the problem, else port it, then update the pin.


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


def test_canary_rq_is_the_version_the_overrides_were_checked_against():
    import rq

    assert rq.__version__ == rq_overrides.UPSTREAM_RQ_VERSION, (
        f"RQ {rq.__version__} installed; workers/rq_overrides.py was checked against "
        f"{rq_overrides.UPSTREAM_RQ_VERSION}: the pins below say which overrides to re-read"
    )


@pytest.mark.parametrize("name", sorted(rq_overrides.UPSTREAM))
def test_canary_rq_functions_we_override_are_unchanged(name):
    try:
        found = _source_hash(_resolve(name))
    except (AttributeError, ImportError) as exc:
        pytest.fail(f"RQ internal {name} is gone ({exc}); workers/rq_overrides.py overrides it")
    assert found == rq_overrides.UPSTREAM[name], (
        f"RQ internal {name} changed (source hash {found}): re-read it, drop or port the "
        f"override in workers/rq_overrides.py, then update UPSTREAM there"
    )


@pytest.mark.parametrize("owner,attr", rq_overrides.PRIVATE)
def test_canary_rq_private_names_still_exist(owner, attr):
    cls = _resolve(owner)
    assert hasattr(cls, attr) or f"self.{attr}" in inspect.getsource(cls.__init__), (
        f"RQ internal {owner}.{attr} is gone; workers/rq_overrides.py uses it"
    )


@pytest.mark.parametrize("name", rq_overrides.CALLED)
def test_canary_rq_names_the_overrides_call_still_exist(name):
    try:
        _resolve(name)
    except (AttributeError, ImportError) as exc:
        pytest.fail(f"RQ {name} is gone ({exc}); workers/rq_overrides.py calls it")


def test_every_upstream_name_the_overrides_replace_is_pinned():
    """Each method the override classes define over an RQ method is in UPSTREAM, so no
    override escapes the canary (the helpers they add of their own are not RQ's)."""
    import rq.cron
    import rq.job
    import rq.queue
    import rq.worker

    pairs = (
        (rq_overrides.ServiceJob, rq.job.Job),
        (rq_overrides.ServiceQueue, rq.queue.Queue),
        (rq_overrides.ServiceWorker, rq.worker.SimpleWorker),
        (rq_overrides.ThreadWorker, rq.worker.SimpleWorker),
        (rq_overrides.JsonCronJob, rq.cron.CronJob),
    )
    pinned = {name.rsplit(".", 1)[1] for name in rq_overrides.UPSTREAM}
    for ours, theirs in pairs:
        for name in vars(ours):
            if name.startswith("__") or not hasattr(theirs, name):
                continue
            upstream = inspect.getattr_static(theirs, name)
            if isinstance(upstream, (property, classmethod, staticmethod)) or inspect.isfunction(
                upstream
            ):
                assert name in pinned, f"{ours.__name__}.{name} overrides RQ's; pin it in UPSTREAM"


def test_a_cron_job_added_by_the_override_is_one_the_scheduler_enqueues(settings, redis_url):
    """add_cron_job appends to CronScheduler's private list: the scheduler must see the job
    and enqueue it with the JSON serializer our workers read."""
    import redis as redis_lib
    from rq.cron import CronScheduler
    from rq.job import Job

    from app import queues

    conn = redis_lib.Redis.from_url(redis_url)
    try:
        cron = CronScheduler(connection=conn, name="canary")
        job = rq_overrides.JsonCronJob(
            queue_name="canary",
            func=len,
            args=([1, 2],),
            interval=60,
            serializer=queues.SERIALIZER,
        )
        rq_overrides.add_cron_job(cron, job)
        assert cron.get_jobs() == [job], "RQ internal CronScheduler._cron_jobs moved"
        enqueued = job.enqueue(conn)
        # Loadable by a worker that reads JSON only (a pickled job would fail to load).
        loaded = Job.fetch(enqueued.id, connection=conn, serializer=queues.SERIALIZER)
        assert loaded.func_name == "builtins.len" and list(loaded.args) == [[1, 2]]
    finally:
        conn.close()


def test_a_stop_signal_is_seen_by_the_worker_process_loop(settings, redis_url, monkeypatch):
    """workers.worker.run tells a requested stop from RQ quitting on an error through
    ``ServiceWorker.stop_requested`` (RQ keeps it only in a private attribute): RQ's SIGTERM and
    SIGINT handler, which its ``shutdown`` command also goes through, must set it."""
    import signal

    import redis as redis_lib
    from rq.exceptions import StopRequested

    from workers import worker as worker_mod

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own handlers
    conn = redis_lib.Redis.from_url(redis_url)
    try:
        worker = worker_mod.make_worker(settings, conn)
        assert not worker.stop_requested
        with pytest.raises(StopRequested):  # idle: RQ stops at once
            worker.request_stop(signal.SIGTERM, None)
        assert worker.stop_requested
    finally:
        conn.close()


def test_a_thread_worker_starts_with_rqs_stop_flag_down(settings, redis_url):
    """ThreadWorker.request_thread_stop raises RQ's private ``_stop_requested``; it must start
    down, or a slot would stop after its first job."""
    import redis as redis_lib

    from workers import worker as worker_mod

    conn = redis_lib.Redis.from_url(redis_url)
    try:
        worker = worker_mod.make_worker(settings, conn, rq_overrides.ThreadWorker)
        assert worker._stop_requested is False, "RQ internal BaseWorker._stop_requested moved"
    finally:
        conn.close()


def test_canary_notices_a_changed_upstream_function(monkeypatch):
    """Not vacuous: a different body gives a different hash."""
    import rq.job

    before = _source_hash(rq.job.Job.retry)

    def retry(self, queue, pipeline):  # stands in for an upgraded RQ
        return None

    monkeypatch.setattr(rq.job.Job, "retry", retry)
    assert _source_hash(_resolve("rq.job.Job.retry")) != before


def test_canary_marshmallow_hooks_are_where_fastload_reads_them():
    """app.api.body.schema_hooks reads marshmallow's private ``Schema._hooks`` (so that FastLoad
    refuses a schema whose hooks it would skip). If this fails after a marshmallow upgrade, the
    internal moved: find where the upgrade keeps the resolved hooks and change schema_hooks,
    its only reader."""
    from importlib import metadata

    import marshmallow as ma

    from app import schemas
    from app.api.body import schema_hooks

    class Hooked(schemas.ReleaseRequestSchema):
        @ma.validates_schema
        def _whole(self, data, **kwargs):
            pass

        @ma.validates("service_name")
        def _svc(self, value, **kwargs):
            pass

    assert metadata.version("marshmallow").split(".")[0] == "4", "checked against marshmallow 4"
    assert isinstance(getattr(ma.Schema, "_hooks", None), dict), "marshmallow Schema._hooks"
    assert schema_hooks(Hooked()) == ["_svc", "_whole"]
    assert schema_hooks(schemas.AllocateRequestSchema()) == []
