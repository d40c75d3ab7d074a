"""app.client and `run` against a scripted stub API on 127.0.0.1: the cases a real service
cannot be made to produce on demand (preemption, an API that stops answering, error codes)."""

from __future__ import annotations

import email.utils
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app import client as api
from tests.proc_support import ROOT, start_run


class Stub:
    """A scripted API: ``routes[(method, path)] = fn(stub, body, query) -> (status, body,
    headers)``; every request is recorded."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict, dict]] = []
        self.routes: dict = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                body = json.loads(raw) if raw else {}
                with outer.lock:
                    outer.calls.append((self.command, path, dict(self.headers), body))
                fn = outer.routes.get((self.command, path))
                if fn is None:
                    status, out, headers = (
                        404,
                        {"error": {"code": "not_found", "message": "no", "details": {}}},
                        {},
                    )
                else:
                    status, out, headers = fn(outer, body, query)
                if status == 0:  # drop the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                raw_page = isinstance(out, bytes)  # a page, not the API's JSON
                data = out if raw_page else json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if raw_page else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that went away mid-answer (run exiting during a long-poll)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, method, path):
        with self.lock:
            return sum(1 for c in self.calls if c[0] == method and c[1] == path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def granted(lease=60.0):
    return {
        "id": "s-1",
        "request_id": "s-1",
        "status": "allocated",
        "node": "n1",
        "gpu_ids": [0, 1],
        "gpu_uuids": ["GPU-a", "GPU-b"],
        "cuda_visible_devices": "0,1",
        "lease_seconds": lease,
        "expires_at": "2030-01-01T00:00:00.000Z",
    }


def err(status, code, retry_after=None, **details):
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return (
        status,
        {"error": {"code": code, "message": f"{code} happened", "details": details}},
        headers,
    )


def hold_then(status_after: float, status: str):
    """GET /gpu/allocations/s-1?wait=: live until ``status_after`` s from the first call."""
    start: list[float] = []

    def fn(stub, body, query):
        if not start:
            start.append(time.monotonic())
        left = start[0] + status_after - time.monotonic()
        if left > 0:
            time.sleep(min(left, 0.5))
            return 200, granted(), {}
        return 200, dict(granted(), status=status, preempt_at="2030-01-01T00:00:30Z"), {}

    return fn


def run(stub, *args, timeout=60):
    """``run ARGS`` against the stub to its end (killed past ``timeout``, as subprocess.run)."""
    proc = start_run(stub.url, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TRAP = textwrap.dedent("""
    import signal, sys, time
    t0 = time.monotonic()
    def bye(signum, frame):
        print(f"term after {time.monotonic() - t0:.1f}", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    time.sleep(float(sys.argv[1]))
    print("finished", flush=True)
""")


def test_importing_the_client_needs_only_requests():
    code = (
        "import sys, app.client; bad = {'flask', 'rq', 'redis', 'yaml', 'marshmallow', "
        "'gunicorn'} & {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "status,code,cls",
    [
        (429, "queue_full", api.QueueFull),
        # the caller's own share, or its tenant's max_queued: the queue is full for it too
        (429, "owner_queue_full", api.QueueFull),
        (429, "tenant_queue_full", api.QueueFull),
        (422, "unsatisfiable", api.Unsatisfiable),
        (422, "validation_error", api.ValidationError),
        (403, "forbidden", api.Forbidden),
        (401, "unauthorized", api.Unauthorized),
        (409, "conflict", api.Conflict),
        (429, "too_many_requests", api.TooManyRequests),
        (400, "bad_request", api.BadRequest),
        (413, "payload_too_large", api.PayloadTooLarge),
        (418, "teapot", api.BadRequest),
    ],
)
def test_each_error_code_is_its_own_exception(stub, status, code, cls):
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: err(
        status, code, retry_after=7, field="x"
    )
    with pytest.raises(cls) as exc:
        api.Client(stub.url).allocate("svc")
    assert (exc.value.status, exc.value.code, exc.value.retry_after) == (status, code, 7)
    assert exc.value.details == {"field": "x"} and code in str(exc.value)


def test_a_retry_after_a_dropped_connection_reuses_the_idempotency_key(stub):
    answers = iter([(0, None, {}), (200, granted(), {})])
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: next(answers)
    alloc = api.Client(stub.url).allocate("svc", required_gpus=2, gpu_model="*H100*", ttl="10m")
    assert alloc.status == "allocated" and alloc.gpu_ids == [0, 1]
    posts = [c for c in stub.calls if c[1] == "/gpu/allocate"]
    assert len(posts) == 2
    assert posts[0][2]["Idempotency-Key"] == posts[1][2]["Idempotency-Key"]
    assert posts[0][3]["ttl_seconds"] == 600 and posts[0][3]["gpu_model"] == "*H100*"


def test_every_field_of_an_allocate_request_can_be_sent_by_the_client(stub):
    """Client.allocate takes every field POST /gpu/allocate accepts (``ttl`` for
    ``ttl_seconds``) and sends each one given: a field added to the API without the client
    fails here (``depends_on_mode`` was missing)."""
    import inspect

    from app.schemas import AllocateRequestSchema

    params = set(inspect.signature(api.Client.allocate).parameters) - {"self", "idempotency_key"}
    fields = set(AllocateRequestSchema().fields) - {"ttl_seconds"} | {"ttl"}
    assert params == fields
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    api.Client(stub.url).allocate("svc", depends_on=["r-1"], depends_on_mode="ok")
    body = [c for c in stub.calls if c[1] == "/gpu/allocate"][0][3]
    assert body["depends_on"] == ["r-1"] and body["depends_on_mode"] == "ok"


@pytest.mark.parametrize(
    "header", ["-1", "nan", "inf", "soon", "Mon, 01 Jan 9999999999999 00:00:00 GMT"]
)
def test_a_503_with_an_unreadable_retry_after_is_still_retried(stub, header):
    """A proxy's Retry-After is not ours: whatever it says, the client retries as for a 503
    without one (it does not crash on time.sleep of a negative or NaN, nor on an HTTP-date
    whose year no datetime holds)."""
    answers = iter([err(503, "unavailable", header), (200, granted(), {})])
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: next(answers)
    assert api.Client(stub.url).allocate("svc").status == "allocated"
    assert stub.count("POST", "/gpu/allocate") == 2


def test_retry_after_as_an_http_date_is_seconds_from_now(stub):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: err(429, "queue_full", when)
    with pytest.raises(api.QueueFull) as exc:
        api.Client(stub.url).allocate("svc")
    assert 25 <= exc.value.retry_after <= 30


def test_the_key_travels_as_a_bearer_token_and_never_in_repr(stub):
    stub.routes[("GET", "/gpu/status")] = lambda s, b, q: (200, {"gpus": []}, {})
    c = api.Client(stub.url, api_key="sekrit")
    assert c.status() == []
    assert stub.calls[0][2]["Authorization"] == "Bearer sekrit"
    assert "sekrit" not in repr(c)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
def test_bad_client_options_are_refused_where_they_enter(options, field):
    """retries=-1 made every call fail with AssertionError('unreachable'); a zero or NaN
    timeout failed only at the first call, inside requests."""
    with pytest.raises(ValueError, match=f"^{field}: "):
        api.Client("http://127.0.0.1:9", **options)


@pytest.mark.parametrize("page", [b"<html>sign in to the guest wifi</html>", b'"just a string"'])
def test_a_url_that_is_not_the_api_is_connection_failed_and_run_exits_69(stub, page):
    """A wrong GPU_ORCH_URL (another service, a proxy's or captive portal's page answering
    200) raised requests' JSONDecodeError, and run died with a traceback."""
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, page, {})
    with pytest.raises(api.ConnectionFailed, match="not the API's JSON"):
        api.Client(stub.url).allocate("svc")
    proc = run(stub, "--", "true")
    assert proc.returncode == 69 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "not the API's JSON" in proc.stderr


def test_unreachable_api_is_connection_failed():
    with pytest.raises(api.ConnectionFailed) as exc:
        api.Client("http://127.0.0.1:9", retries=1).status()
    assert "connection refused" in str(exc.value)


def test_run_sends_sigterm_when_the_allocation_turns_preempting(stub):
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = hold_then(1.0, "preempting")
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})
    proc = run(stub, "--", sys.executable, "-c", TRAP, "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("term after"), proc.stdout
    assert float(proc.stdout.split()[-1]) < 10
    assert "preempted" in proc.stderr
    assert stub.count("POST", "/gpu/release") == 1


def test_run_keeps_the_command_while_the_api_is_down_until_the_lease_would_end(stub):
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(lease=3.0), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = lambda s, b, q: err(503, "unavailable", 0)
    stub.routes[("POST", "/gpu/allocations/s-1/renew")] = lambda s, b, q: err(503, "unavailable", 0)
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})
    proc = run(stub, "--", sys.executable, "-c", TRAP, "30")
    assert proc.returncode == 0, proc.stderr
    after = float(proc.stdout.split()[-1])
    assert 2.0 <= after < 15, proc.stdout  # ran on until the 3 s lease would have ended
    assert stub.count("POST", "/gpu/allocations/s-1/renew") >= 2  # kept retrying
    assert "could not renew" in proc.stderr and "lost" in proc.stderr


def _grant_and_renew(stub, lease: float) -> None:
    """s-1 granted at once with ``lease``, held until released, every renewal granted."""
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(lease=lease), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = hold_then(1e9, "allocated")
    stub.routes[("POST", "/gpu/allocations/s-1/renew")] = lambda s, b, q: (
        200,
        granted(lease=lease),
        {},
    )
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})


def test_run_renews_every_third_of_the_lease(stub):
    _grant_and_renew(stub, lease=1.5)
    proc = run(stub, "--", sys.executable, "-c", TRAP, "3")
    assert proc.returncode == 0 and proc.stdout.strip() == "finished", proc.stderr
    assert 3 <= stub.count("POST", "/gpu/allocations/s-1/renew") <= 8


def test_run_at_debug_shows_every_renewal_and_at_the_default_none(stub):
    """docs/client.md: ``--log-level DEBUG`` shows every lease change; it showed only changes
    of status, so a run whose lease was renewed all along printed nothing."""
    _grant_and_renew(stub, lease=1.5)
    debug = run(stub, "--log-level", "DEBUG", "--", sys.executable, "-c", TRAP, "2")
    assert debug.returncode == 0, debug.stderr
    renewed = [line for line in debug.stderr.splitlines() if "renewed s-1" in line]
    assert len(renewed) >= 2, debug.stderr
    assert "until 2030-01-01T00:00:00.000Z" in renewed[0]
    quiet = run(stub, "--", sys.executable, "-c", TRAP, "2")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "missing COMMAND"),
        (["--gpus", "0", "--", "true"], "--gpus"),
        (["--wait", "soon", "--", "true"], "--wait"),
        (["--bogus", "--", "true"], "--bogus"),
        (["--data", "novalue", "--", "true"], "KEY=VALUE"),
        (["--priority", "11", "--", "true"], "--priority"),
        (["--url", "ftp://x", "--", "true"], "http://"),
    ],
)
def test_usage_errors_exit_2_with_one_line(stub, args, needle):
    proc = run(stub, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert stub.calls == []  # nothing was sent


def test_api_refusals_map_to_exit_codes(stub):
    for (status, code), want in {
        (422, "unsatisfiable"): 2,
        (429, "queue_full"): 75,
        (403, "forbidden"): 77,
    }.items():
        stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q, status=status, code=code: err(
            status, code
        )
        proc = run(stub, "--", "true")
        assert proc.returncode == want, (code, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and code in proc.stderr


COUNT_SIGINT = textwrap.dedent("""
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    print("ready", flush=True)
    while not got:
        time.sleep(0.01)
    time.sleep(1.0)  # a second SIGINT (forwarded as well) would arrive meanwhile
    print(f"sigints {len(got)}", flush=True)
    sys.exit(3)
""")


def test_a_ctrl_c_at_the_terminal_reaches_the_command_once(stub):
    """run under a pseudo-terminal: Ctrl-C makes the terminal signal run and COMMAND alike, and
    run must not forward a second SIGINT."""
    import fcntl
    import pty
    import termios

    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = hold_then(1e9, "allocated")
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})
    master, slave = pty.openpty()

    def take_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = dict(os.environ, GPU_ORCH_URL=stub.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run", "--", sys.executable, "-c", COUNT_SIGINT],
        cwd=ROOT,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while b"ready" not in out:
            assert time.monotonic() < deadline, out
            out += os.read(master, 1024)
        os.write(master, b"\x03")  # Ctrl-C, as typed
        assert proc.wait(30) == 3
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"sigints 1" in out, out
    assert stub.count("POST", "/gpu/release") == 1


def test_global_options_before_or_after_run_are_accepted(stub):
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = hold_then(1e9, "allocated")
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})
    env = dict(os.environ, GPU_ORCH_URL=stub.url)
    for argv in (
        ["--log-level", "DEBUG", "run", "--", "true"],
        ["run", "--config", "/nonexistent.yaml", "--log-level", "INFO", "--", "true"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    assert stub.count("POST", "/gpu/release") == 2


def queued():
    return dict(granted(), status="queued", position=1, gpu_ids=[], cuda_visible_devices="")


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_a_hangup_or_quit_while_queued_cancels_the_request(stub, signum):
    """A closed terminal (SIGHUP) ends a queued run like Ctrl-C does: the request is withdrawn,
    else it would be granted later and hold its GPUs, unused, for a whole lease."""

    def still_queued(s, b, q):
        time.sleep(0.2)
        return 200, queued(), {}

    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (202, queued(), {})
    stub.routes[("GET", "/gpu/requests/s-1")] = still_queued
    stub.routes[("DELETE", "/gpu/requests/s-1")] = lambda s, b, q: (
        200,
        dict(queued(), status="cancelled"),
        {},
    )
    proc = start_run(stub.url, "--", "true")
    wait_for(lambda: stub.count("GET", "/gpu/requests/s-1") >= 1)
    proc.send_signal(signum)
    _, err_text = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err_text
    assert stub.count("DELETE", "/gpu/requests/s-1") == 1


HUP_DISPOSITION = textwrap.dedent("""
    import signal, sys, time
    print(f"sighup ignored: {signal.getsignal(signal.SIGHUP) == signal.SIG_IGN}", flush=True)
    time.sleep(1.5)
    print("finished", flush=True)
""")


def test_under_nohup_the_command_keeps_ignoring_sighup(stub):
    """``nohup gpu-orchestrator run -- job``: the job must survive the terminal closing, as it
    would without run. run passes an ignored SIGHUP on and does not forward one."""
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = hold_then(1e9, "allocated")
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})
    proc = start_run(
        stub.url,
        "--",
        sys.executable,
        "-c",
        HUP_DISPOSITION,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert proc.stdout.readline().strip() == "sighup ignored: True"
    proc.send_signal(signal.SIGHUP)  # the terminal hung up
    out, err_text = proc.communicate(timeout=30)
    assert (proc.returncode, out.strip()) == (0, "finished"), err_text
    assert stub.count("POST", "/gpu/release") == 1


def test_a_signal_while_releasing_keeps_the_commands_exit_code(stub):
    """COMMAND has exited and run is giving the GPUs back when a second Ctrl-C or a SIGTERM
    arrives: run finishes the release and exits with COMMAND's code, without a traceback."""

    def slow_release(s, b, q):
        time.sleep(1.5)
        return 200, {"status": "released"}, {}

    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    stub.routes[("GET", "/gpu/allocations/s-1")] = hold_then(1e9, "allocated")
    stub.routes[("POST", "/gpu/release")] = slow_release
    for signum in (signal.SIGINT, signal.SIGTERM):
        before = stub.count("POST", "/gpu/release")
        proc = start_run(stub.url, "--", "sh", "-c", "exit 3")
        wait_for(lambda before=before: stub.count("POST", "/gpu/release") > before)
        proc.send_signal(signum)
        _, err_text = proc.communicate(timeout=30)
        assert proc.returncode == 3, (signum, err_text)
        assert "Traceback" not in err_text
    assert stub.count("POST", "/gpu/release") == 2


SIGTERM_AT_THE_GRANT = textwrap.dedent("""
    import os, signal, sys
    from app import run

    start_command = run.Run._run_command

    def sigterm_first(self, alloc):  # a SIGTERM arriving just after the grant
        os.kill(os.getpid(), signal.SIGTERM)
        return start_command(self, alloc)

    run.Run._run_command = sigterm_first
    sys.exit(run.main(["--", "true"]))
""")


def test_a_sigterm_between_the_grant_and_the_command_releases_the_gpus(stub):
    stub.routes[("POST", "/gpu/allocate")] = lambda s, b, q: (200, granted(), {})
    stub.routes[("POST", "/gpu/release")] = lambda s, b, q: (200, {"status": "released"}, {})
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_THE_GRANT],
        cwd=ROOT,
        env=dict(os.environ, GPU_ORCH_URL=stub.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 143, proc.stderr
    assert stub.count("POST", "/gpu/release") == 1
