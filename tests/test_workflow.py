"""Graph-service workflow lookups against a real HTTP server on 127.0.0.1: cache, breaker."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import REGISTRY

from app import create_app
from app import settings as settings_mod
from app.workflow import WorkflowClient, WorkflowInfo, parse_workflow
from app.workload import WorkloadAnalyzer
from tests.api_support import Clock, register_fleet


class GraphService:
    """``GET /workflow/<id>`` answered from ``self.workflows``; ``status``/``delay`` for faults."""

    def __init__(self):
        self.workflows: dict[str, object] = {}
        self.status, self.delay = 200, 0.0
        self.paths: list[str] = []
        graph = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                graph.paths.append(self.path)
                if graph.delay:
                    time.sleep(graph.delay)
                wf_id = self.path.removeprefix("/workflow/")
                status = graph.status
                if status == 200 and wf_id not in graph.workflows:
                    status = 404
                body = graph.workflows.get(wf_id, {"error": "not found"})
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    def __init__(self):
        self.now = 500.0

    def __call__(self):
        return self.now


@pytest.fixture
def graph():
    service = GraphService()
    yield service
    service.close()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(graph, clock):
    c = WorkflowClient(graph.url, timeout=2.0, cache_ttl=60, failure_ttl=5, clock=clock)
    yield c
    c.close()


def test_lookup_reads_priority_and_dependencies(graph, client):
    graph.workflows["wf-1"] = {
        "id": "wf-1",
        "priority": 9,
        "dependencies": ["req-a", "req-b"],
        "steps": [{"name": "x"}],
    }
    assert client.lookup("wf-1") == WorkflowInfo("wf-1", 9, ("req-a", "req-b"))
    assert graph.paths == ["/workflow/wf-1"]


def test_a_query_in_the_service_url_stays_after_the_path(graph, clock):
    """A graph service URL may carry its credential as a query (settings.SECRET_QUERY_NAMES
    hides it in config show): the lookup path goes before it. It went after it, into the
    token's value (``?token=tk-1/workflow/wf-1``), and the service saw the base path."""
    c = WorkflowClient(graph.url + "/g/?token=tk-1", clock=clock)
    try:
        c.lookup("wf-1")
    finally:
        c.close()
    assert graph.paths == ["/g/workflow/wf-1?token=tk-1"]


def test_ids_are_escaped_in_the_path(graph, client):
    graph.workflows["a%2Fb%20c"] = {"priority": 3}
    assert client.lookup("a/b c").priority == 3
    assert graph.paths == ["/workflow/a%2Fb%20c"]


@pytest.mark.parametrize(
    "body,priority,deps",
    [
        ({"workflow": {"workflow_priority": 7, "workflow_dependencies": ["x"]}}, 7, ("x",)),
        ({"priority": 42, "depends_on": ["x", "x", 3, "", "y"]}, 10, ("x", "y")),
        ({"priority": "high", "dependencies": "x"}, None, ()),
        ({"priority": 0.0}, 1, ()),
        ({}, None, ()),
    ],
)
def test_answer_shapes(body, priority, deps):
    info = parse_workflow("wf", body)
    assert (info.priority, info.dependencies) == (priority, deps)


def test_answers_are_cached_for_the_ttl(graph, client, clock):
    graph.workflows["wf-1"] = {"priority": 4}
    assert client.lookup("wf-1").priority == 4
    graph.workflows["wf-1"] = {"priority": 8}
    clock.now += 59
    assert client.lookup("wf-1").priority == 4
    assert len(graph.paths) == 1
    clock.now += 2
    assert client.lookup("wf-1").priority == 8
    assert len(graph.paths) == 2


def test_unknown_workflow_is_none_and_cached(graph, client, clock):
    assert client.lookup("nope") is None
    assert client.lookup("nope") is None
    assert len(graph.paths) == 1


@pytest.mark.parametrize("fault", ["500", "garbage", "slow", "not-an-object"])
def test_failures_return_none_and_are_retried_soon(graph, clock, fault):
    graph.workflows["wf-1"] = {"priority": 4}
    if fault == "500":
        graph.status = 500
    elif fault == "garbage":
        graph.workflows["wf-1"] = b"<html>"
    elif fault == "slow":
        graph.delay = 1.5
    else:
        graph.workflows["wf-1"] = [1, 2]
    c = WorkflowClient(graph.url, timeout=0.2, cache_ttl=60, failure_ttl=5, clock=clock)
    try:
        assert c.lookup("wf-1") is None
        assert c.lookup("wf-1") is None
        assert len(graph.paths) == 1  # the failure is remembered briefly
        graph.status, graph.delay, graph.workflows["wf-1"] = 200, 0.0, {"priority": 4}
        clock.now += 5
        assert c.lookup("wf-1").priority == 4
    finally:
        c.close()


def test_refused_connection_is_none():
    c = WorkflowClient("http://127.0.0.1:9", timeout=0.5)
    try:
        assert c.lookup("wf-1") is None
    finally:
        c.close()


def test_zero_ttl_disables_the_cache(graph, clock):
    graph.workflows["wf-1"] = {"priority": 4}
    c = WorkflowClient(graph.url, cache_ttl=0, clock=clock)
    try:
        c.lookup("wf-1")
        c.lookup("wf-1")
        assert len(graph.paths) == 2
    finally:
        c.close()


def test_cache_is_bounded(graph, clock):
    for i in range(5):
        graph.workflows[f"wf-{i}"] = {"priority": i + 1}
    c = WorkflowClient(graph.url, clock=clock, max_entries=3)
    try:
        for i in range(5):
            c.lookup(f"wf-{i}")
        c.lookup("wf-0")  # evicted: asked again
        c.lookup("wf-4")  # still cached
        assert graph.paths.count("/workflow/wf-0") == 2
        assert graph.paths.count("/workflow/wf-4") == 1
    finally:
        c.close()


def test_from_settings():
    assert WorkflowClient.from_settings(settings_mod.defaults()) is None
    settings = settings_mod.defaults().replace(
        services={
            "graph_service_url": "http://graph:8081/",
            "graph_service_timeout": "300ms",
            "graph_cache_ttl": "10s",
        }
    )
    c = WorkflowClient.from_settings(settings)
    try:
        assert (c.url, c.timeout, c.cache_ttl) == ("http://graph:8081", 0.3, 10.0)
    finally:
        c.close()


# --------------------------------------------------------------------------- in the analyzer


@pytest.fixture
def analyzer(client):
    return WorkloadAnalyzer(settings_mod.defaults(), workflow=client)


def test_graph_context_enriches_the_analysis(graph, analyzer):
    graph.workflows["wf-9"] = {"priority": 9, "dependencies": ["req-2", "req-1"]}
    result = analyzer.analyze(
        "inference", {"workflow_id": "wf-9", "workflow_dependencies": ["req-1", "req-0"]}
    )
    assert result["priority"] == 9
    assert result["depends_on"] == ["req-1", "req-0", "req-2"]
    assert result["workflow_id"] == "wf-9"
    assert "graph service" in result["reasoning"]


def test_request_workflow_priority_beats_the_graph(graph, analyzer):
    graph.workflows["wf-9"] = {"priority": 9}
    assert (
        analyzer.analyze("inference", {"workflow_id": "wf-9", "workflow_priority": 3})["priority"]
        == 3
    )


def test_graph_failure_proceeds_with_own_data(graph, analyzer):
    graph.status = 503
    graph.workflows["wf-9"] = {"priority": 9}
    result = analyzer.analyze(
        "inference", {"workflow_id": "wf-9", "workflow_dependencies": ["req-1"]}
    )
    assert (result["priority"], result["depends_on"]) == (7, ["req-1"])


def test_no_workflow_id_means_no_lookup(graph, analyzer):
    analyzer.analyze("inference", {"workflow_dependencies": ["req-1"]})
    assert graph.paths == []


# --------------------------------------------------------------------------- circuit breaker


def lookups(outcome: str) -> float:
    sample = REGISTRY.get_sample_value("gpu_orchestrator_graph_lookups_total", {"outcome": outcome})
    return sample or 0.0


def make_sick(graph, fault: str) -> None:
    """``hang``: the service answers long after the client's time limit; ``503``: at once."""
    if fault == "hang":
        graph.delay = 2.0
    else:
        graph.status = 503


@pytest.fixture
def guarded(graph, clock):
    c = WorkflowClient(graph.url, timeout=0.3, breaker_failures=3, breaker_cooldown=30, clock=clock)
    yield c
    c.close()


@pytest.mark.parametrize("fault", ["hang", "503"])
def test_open_breaker_skips_fresh_ids_without_asking(graph, guarded, clock, fault, caplog):
    make_sick(graph, fault)
    for i in range(3):
        assert guarded.lookup(f"wf-{i}") is None
    assert len(graph.paths) == 3 and guarded.breaker.state == "open"
    assert "graph service breaker open for 30s after 3 failures in a row" in caplog.text
    skipped = lookups("skipped")
    started = time.monotonic()
    for i in range(3, 13):  # a new id each time: the per-id failure cache does not cover them
        assert guarded.lookup(f"wf-{i}") is None
    assert time.monotonic() - started < guarded.timeout  # all ten together: less than one wait
    assert len(graph.paths) == 3  # not one of them was sent
    assert lookups("skipped") == skipped + 10


def test_after_the_cooldown_one_trial_goes_out_and_its_success_closes(
    graph, guarded, clock, caplog
):
    caplog.set_level(logging.INFO, logger="app.workflow")
    graph.status = 503
    for i in range(3):
        guarded.lookup(f"wf-{i}")
    clock.now += 29.9
    assert guarded.lookup("wf-a") is None and len(graph.paths) == 3  # still open
    clock.now += 0.1
    assert guarded.breaker.state == "half_open"
    graph.status = 200
    graph.workflows["wf-b"] = {"priority": 8}
    assert guarded.lookup("wf-b").priority == 8  # the trial
    assert graph.paths[3:] == ["/workflow/wf-b"] and guarded.breaker.state == "closed"
    assert f"graph service breaker closed: {graph.url} answered again" in caplog.text
    graph.workflows["wf-c"] = {"priority": 2}
    assert guarded.lookup("wf-c").priority == 2 and len(graph.paths) == 5  # closed: all go out


def test_a_failed_trial_reopens_for_a_full_cooldown(graph, guarded, clock):
    graph.status = 503
    for i in range(3):
        guarded.lookup(f"wf-{i}")
    clock.now += 30
    assert guarded.lookup("wf-trial") is None and len(graph.paths) == 4  # the trial, failed
    assert guarded.breaker.state == "open"
    clock.now += 29
    assert guarded.lookup("wf-x") is None and len(graph.paths) == 4
    clock.now += 1
    assert guarded.breaker.state == "half_open"


def test_half_open_sends_one_trial_while_the_others_skip(graph, guarded, clock):
    graph.delay = 2.0
    for i in range(3):
        guarded.lookup(f"wf-{i}")
    clock.now += 30
    trial = threading.Thread(target=guarded.lookup, args=("wf-trial",))
    trial.start()
    deadline = time.monotonic() + 5
    while len(graph.paths) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert graph.paths[3:] == ["/workflow/wf-trial"]
    started = time.monotonic()
    assert guarded.lookup("wf-other") is None  # the trial is still waiting: skip
    assert time.monotonic() - started < guarded.timeout
    trial.join()
    assert len(graph.paths) == 4 and guarded.breaker.state == "open"


def test_cached_answers_are_still_served_while_open(graph, guarded, clock):
    graph.workflows["wf-known"] = {"priority": 6}
    assert guarded.lookup("wf-known").priority == 6
    graph.status = 503
    for i in range(3):
        guarded.lookup(f"wf-{i}")
    assert guarded.breaker.state == "open"
    assert guarded.lookup("wf-known").priority == 6


@pytest.mark.parametrize("answer", ["400", "not-a-workflow"])
def test_answers_about_the_id_neither_open_nor_reset_the_breaker(graph, guarded, answer):
    """The id is the client's: ids the service refuses must not switch it off for everyone,
    nor keep a hanging service's breaker closed."""
    for i in range(10):
        if answer == "400":
            graph.status = 400
        else:
            graph.workflows[f"wf-{i}"] = b"<html>"
        assert guarded.lookup(f"wf-{i}") is None
    assert len(graph.paths) == 10 and guarded.breaker.state == "closed"
    graph.status = 200
    graph.delay = 2.0
    guarded.lookup("hang-1")
    guarded.lookup("hang-2")
    graph.delay, graph.status = 0.0, 400
    guarded.lookup("refused-id")  # an answer: does not reset the two timeouts
    graph.delay, graph.status = 2.0, 200
    guarded.lookup("hang-3")
    assert guarded.breaker.state == "open"


def test_refused_connections_open_it_too():
    c = WorkflowClient("http://127.0.0.1:9", timeout=0.5, breaker_failures=2)
    try:
        c.lookup("wf-1")
        c.lookup("wf-2")
        assert c.breaker.state == "open"
    finally:
        c.close()


def test_the_breaker_settings_are_the_advisors():
    settings = settings_mod.defaults().replace(
        services={
            "graph_service_url": "http://graph:8081/",
            "breaker_failures": 5,
            "breaker_cooldown": "1m",
        }
    )
    c = WorkflowClient.from_settings(settings)
    try:
        assert (c.breaker.failures, c.breaker.cooldown) == (5, 60.0)
    finally:
        c.close()


@pytest.mark.parametrize("fault", ["hang", "503"])
def test_allocates_with_fresh_workflow_ids_are_granted_at_once_while_it_is_open(
    graph, settings, redis_url, fault
):
    """The attack: a client (or normal traffic) sends a new workflow_id with each allocate
    while the graph service hangs; before the breaker each allocate waited the full time
    limit, holding an API thread."""
    make_sick(graph, fault)
    services = {"graph_service_url": graph.url, "graph_service_timeout": "1s"}
    app = create_app(
        settings.replace(dashboard={"enabled": False}, services=services),
        redis_url=redis_url,
        clock=Clock(),
    )
    register_fleet(app)
    http = app.test_client()

    def allocate(i: int):
        body = {
            "service_name": f"svc-{i}",
            "required_gpus": 1,
            "workload_type": "inference",
            "workload_data": {"workflow_id": f"wf-{i}"},
        }
        started = time.monotonic()
        resp = http.post("/gpu/allocate", json=body)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["status"] == "allocated"
        return time.monotonic() - started

    try:
        for i in range(3):  # services.breaker_failures (3 by default) failures open it
            allocate(i)
        assert len(graph.paths) == 3
        for i in range(3, 8):
            assert allocate(i) < 1.0  # under one graph_service_timeout each (a loaded box)
        assert len(graph.paths) == 3  # and no lookup was sent
    finally:
        app.extensions["gpu_analyzer"].close()
