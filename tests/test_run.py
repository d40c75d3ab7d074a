"""``gpu-orchestrator run`` and the Python client against a real running service (``up``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from app.client import Client, Unsatisfiable, ValidationError, WaitTimeout
from tests.conftest import free_port
from tests.proc_support import ROOT, start_run, wait_until

A10 = {"name": "NVIDIA A10", "memory_total_mb": 23028}
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559}


class Service:
    """``gpu-orchestrator up`` in a temporary directory: a mixed fleet, one A10 + two H100s."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "server": {"port": self.port, "host": "127.0.0.1", "workers": 1, "threads": 4},
            "redis": {"url": "", "data_dir": str(tmp / "data"), "embedded_port": free_port()},
            "monitoring": {
                "backend": "simulated",
                "refresh_interval": "1s",
                "simulated": {
                    "nodes": [
                        {"name": "node-a10", "count": 1, "gpu": A10},
                        {"name": "node-h100", "count": 2, "gpu": H100},
                    ]
                },
            },
        }
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GPU_ORCH") and k not in ("REDIS_URL", "CONFIG_PATH", "PORT")
        }
        self.log_path = tmp / "up.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--config", str(path), "up"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("run"))
    try:
        wait_until(
            lambda: "gpu-orchestrator is up" in svc.output(), timeout=120, message="the service"
        )
        wait_until(
            lambda: len(requests.get(svc.url + "/gpu/status", timeout=5).json()["gpus"]) == 3,
            timeout=30,
            message="three GPUs",
        )
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def api(service):
    client = Client(service.url)
    yield client
    # every test leaves the fleet as it found it
    listing = requests.get(service.url + "/gpu/list", timeout=10).json()
    for q in listing["queue"]:
        client.cancel(q["id"])
    for a in listing["allocations"]:
        client.release(a["id"])


def run(service, *args, wait=True, **popen):
    proc = start_run(service.url, *args, **popen)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=90)
    return proc.returncode, out, err


PRINT_ENV = (
    "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in "
    "('CUDA_VISIBLE_DEVICES', 'GPU_ORCH_ALLOCATION_ID', 'GPU_ORCH_NODE', "
    "'GPU_ORCH_GPU_UUIDS')})); sys.stdout.flush(); sys.exit(int(sys.argv[1]))"
)


def test_run_sets_the_variables_and_propagates_the_exit_code(service, api):
    code, out, err = run(
        service, "--gpu-model", "*a10*", "--", sys.executable, "-c", PRINT_ENV, "3"
    )
    assert code == 3, err
    env = json.loads(out)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["GPU_ORCH_NODE"] == "node-a10"
    alloc = api.get_allocation(env["GPU_ORCH_ALLOCATION_ID"])
    assert alloc.status == "released"
    assert env["GPU_ORCH_GPU_UUIDS"] == ",".join(alloc.gpu_uuids) and alloc.gpu_uuids
    assert alloc.service_name == Path(sys.executable).name


def test_gpu_model_on_a_mixed_fleet_gives_only_h100s(service, api):
    code, out, err = run(
        service, "--gpus", "2", "--gpu-model", "*H100*", "--", sys.executable, "-c", PRINT_ENV, "0"
    )
    assert code == 0, err
    env = json.loads(out)
    assert env["GPU_ORCH_NODE"] == "node-h100"
    assert sorted(env["CUDA_VISIBLE_DEVICES"].split(",")) == ["0", "1"]
    names = {(g["node"], g["index"]): g["name"] for g in api.status()}
    assert all(
        "H100" in names[("node-h100", int(i))] for i in env["CUDA_VISIBLE_DEVICES"].split(",")
    )
    with pytest.raises(Unsatisfiable) as exc:
        api.allocate("x", gpu_model="*B200*")
    assert exc.value.details["field"] == "gpu_model"


def test_a_short_lease_outlives_a_long_command_and_is_released_after(service, api):
    script = (
        "import os, sys, time; print(os.environ['GPU_ORCH_ALLOCATION_ID']); "
        "sys.stdout.flush(); time.sleep(8)"
    )
    code, out, err = run(
        service, "--ttl", "3s", "--gpu-model", "*a10*", "--", sys.executable, "-c", script
    )
    assert code == 0, err
    alloc = api.get_allocation(out.strip())
    assert alloc.status == "released", alloc.data  # renewed, never expired
    assert alloc.lease_seconds == 3


def _queue_len(service) -> int:
    return len(requests.get(service.url + "/gpu/list", timeout=5).json()["queue"])


def test_a_queued_run_shows_its_place_starts_on_release_and_sigint_cancels(service, api):
    holder = api.allocate("holder", gpu_model="*A10*")
    assert holder.status == "allocated"
    stamp = "import time; print(time.time(), flush=True)"
    procs = []
    try:
        procs.append(
            run(service, "--gpu-model", "*A10*", "--", sys.executable, "-c", stamp, wait=False)
        )
        wait_until(lambda: _queue_len(service) == 1, message="the first run queued")
        procs.append(run(service, "--gpu-model", "*A10*", "--", "true", wait=False))
        wait_until(lambda: _queue_len(service) == 2, message="the second run queued")
        first, second = procs
        assert first.stderr.readline().startswith("queued: position 1")
        assert second.stderr.readline().startswith("queued: position 2")
        released_at = time.time()
        api.release(holder.id)
        out, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
        assert float(out.strip()) - released_at < 3, "did not start as soon as the GPU was free"
        # the first run released its GPU when its command ended: the second one gets it
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, err

        holder = api.allocate("holder", gpu_model="*A10*")
        procs.append(run(service, "--gpu-model", "*A10*", "--", "true", wait=False))
        third = procs[-1]
        assert third.stderr.readline().startswith("queued: position 1")
        third.send_signal(signal.SIGINT)
        third.communicate(timeout=30)
        assert third.returncode == 130
        assert _queue_len(service) == 0
        api.release(holder.id)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_wait_timeout_exits_75_and_leaves_nothing_queued(service, api):
    holder = api.allocate("holder", gpu_model="*A10*")
    t0 = time.monotonic()
    code, _, err = run(service, "--wait", "1s", "--gpu-model", "*A10*", "--", "true")
    assert code == 75, err
    assert "cancelled" in err.splitlines()[-1]
    assert time.monotonic() - t0 < 20
    assert requests.get(service.url + "/gpu/list", timeout=5).json()["queue"] == []
    api.release(holder.id)


def test_sigterm_is_forwarded_and_the_gpu_released_after_command_exits(service, api, tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys, time
        def bye(signum, frame):
            print("got", signum, flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, bye)
        print(os.environ["GPU_ORCH_ALLOCATION_ID"], flush=True)
        time.sleep(60)
    """)
    proc = run(service, "--gpu-model", "*A10*", "--", sys.executable, "-c", script, wait=False)
    rid = proc.stdout.readline().strip()
    assert api.get_allocation(rid).status == "allocated"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7, err
    assert out.strip() == f"got {int(signal.SIGTERM)}"  # once, not twice
    assert api.get_allocation(rid).status == "released"


def test_a_command_killed_by_a_signal_exits_128_plus_n(service, api):
    code, _, err = run(service, "--", "sh", "-c", "kill -9 $$")
    assert code == 137, err
    code, _, err = run(service, "--", "/no/such/command")
    assert code == 127 and len(err.strip().splitlines()) == 1
    assert requests.get(service.url + "/gpu/list", timeout=5).json()["allocations"] == []


def test_client_context_manager_renews_and_releases_on_an_exception(service, api):
    with pytest.raises(RuntimeError):
        with api.allocation(
            service_name="trainer",
            workload_type="training",
            required_gpus=2,
            gpu_model="*H100*",
            ttl="3s",
            wait=True,
        ) as alloc:
            assert alloc.node == "node-h100" and len(alloc.gpu_ids) == 2
            assert alloc.cuda_visible_devices in ("0,1", "1,0")
            time.sleep(5)  # longer than the lease: renewed in the background
            assert api.get_allocation(alloc.id).status == "allocated"
            raise RuntimeError("job failed")
    assert api.get_allocation(alloc.id).status == "released"


def test_client_wait_timeout_withdraws_the_request(service, api):
    holder = api.allocate("holder", gpu_model="*A10*")
    with pytest.raises(WaitTimeout):
        with api.allocation(service_name="late", gpu_model="*A10*", wait="1s"):
            pytest.fail("granted while the only A10 was held")
    assert requests.get(service.url + "/gpu/list", timeout=5).json()["queue"] == []
    with pytest.raises(ValidationError) as exc:
        api.allocate("bad", required_gpus=0)
    assert exc.value.status == 422 and "required_gpus" in str(exc.value.details)
    api.release(holder.id)


def test_client_on_update_sees_the_queued_state_before_the_grant(service, api):
    """docs/client.md: on_update is called while queued. The first long-poll held the call
    until something changed (up to PROGRESS_POLL, 5 s), so a request granted within that time
    reported only its grant, and a longer wait showed nothing for its first 5 s."""
    holder = api.allocate("holder", gpu_model="*A10*")
    queued = api.allocate("next", gpu_model="*A10*")
    assert queued.status == "queued"
    calls = []
    release = threading.Timer(3.0, api.release, args=(holder.id,))  # within the 5 s poll
    release.start()
    try:
        alloc = api.wait(
            queued.id,
            timeout=30,
            on_update=lambda a: calls.append((a.status, a.position, a.data.get("reason"))),
        )
    finally:
        release.join()
    assert alloc.status == "allocated"
    assert calls[0] == ("queued", 1, "capacity"), calls  # before: [("allocated", None, None)]
    assert calls[-1][0] == "allocated", calls
    api.release(alloc.id)


def test_a_signal_while_a_timed_out_wait_cancels_still_cancels_and_exits_75():
    """--wait ran out and run is cancelling the request (one more API call) when a SIGTERM
    comes: the cancel goes through and run exits 75 as it says, instead of the wait's signal
    handler raising out of the cancel (a traceback, exit 1, the request maybe left queued)."""
    import threading

    from tests.test_client import Stub

    queued = {"id": "s-1", "request_id": "s-1", "status": "queued", "position": 1}
    cancelling, answer = threading.Event(), threading.Event()

    def cancel(stub, body, query):
        cancelling.set()
        answer.wait(10)
        return 200, dict(queued, status="cancelled"), {}

    stub = Stub()
    try:
        stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, queued, {})
        stub.routes[("GET", "/gpu/requests/s-1")] = lambda s, b, q: (200, queued, {})
        stub.routes[("DELETE", "/gpu/requests/s-1")] = cancel
        proc = run(stub, "--wait", "1s", "--", "true", wait=False)
        try:
            assert cancelling.wait(30), proc.communicate(timeout=30)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the signal is handled while the cancel is in flight
            answer.set()
            out, err = proc.communicate(timeout=30)
        finally:
            answer.set()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert "Traceback" not in err, err
        assert proc.returncode == 75, err
        assert "cancelled" in err.splitlines()[-1]
        assert stub.count("DELETE", "/gpu/requests/s-1") == 1
    finally:
        stub.close()
