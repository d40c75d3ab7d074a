"""The DeepAgents advisor against a real HTTP server on 127.0.0.1, and its circuit breaker."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import REGISTRY

from app import settings as settings_mod
from app.advisor import RESPONSE_SCHEMA, Advisor, AdvisorGarbage, parse_advice
from app.workload import WorkloadAnalyzer


class StubServer:
    """An HTTP server in a thread; ``reply`` decides each answer: (status, body, delay)."""

    def __init__(self):
        self.requests: list[tuple[str, str, object]] = []
        self.reply = lambda path, body: (200, {}, 0.0)
        self.received = threading.Event()
        self.drip = 0.0  # > 0: send the body one byte at a time, this many seconds apart
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                stub.requests.append((self.command, self.path, body))
                stub.received.set()
                status, payload, delay = stub.reply(self.path, body)
                if delay:
                    time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not stub.drip:
                        self.wfile.write(data)
                    for i in range(len(data) if stub.drip else 0):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(stub.drip)
                except OSError:
                    pass  # the client gave up waiting

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def structured(gpus=2, memory=16000, priority=6, reasoning="two GPUs suffice", **extra):
    return {
        "messages": [],
        "structured_output": {
            "required_gpus": gpus,
            "min_memory_mb": memory,
            "priority": priority,
            "reasoning": reasoning,
            **extra,
        },
    }


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_advisor(stub, clock):
    made = []

    def make(**kwargs):
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("breaker_failures", 3)
        kwargs.setdefault("breaker_cooldown", 30.0)
        advisor = Advisor(stub.url, clock=clock, **kwargs)
        made.append(advisor)
        return advisor

    yield make
    for advisor in made:
        advisor.close()


LIMITS = {"max_gpus": 8, "max_memory_mb": 81559}


def outcome_count(outcome):
    return (
        REGISTRY.get_sample_value("gpu_orchestrator_advisor_calls_total", {"outcome": outcome})
        or 0.0
    )


def test_good_answer_and_the_original_request_shape(stub, make_advisor):
    stub.reply = lambda path, body: (200, structured(), 0)
    advisor = make_advisor()
    before = outcome_count("ok")
    advice = advisor.advise(
        "svc-a", "inference", {"model_name": "llama-3-8b", "batch_size": 4}, **LIMITS
    )
    assert (advice.required_gpus, advice.min_memory_mb, advice.priority) == (2, 16000, 6)
    assert advice.reasoning == "two GPUs suffice" and advice.clamped == ()
    method, path, body = stub.requests[0]
    assert (method, path) == ("POST", "/invoke/structured")
    assert body["response_format"] == {"type": "json_schema", "json_schema": RESPONSE_SCHEMA}
    assert set(RESPONSE_SCHEMA["properties"]) == {
        "required_gpus",
        "min_memory_mb",
        "priority",
        "reasoning",
    }
    [message] = body["messages"]
    assert message["role"] == "user"
    assert "'svc-a'" in message["content"] and "'inference'" in message["content"]
    assert '"model_name": "llama-3-8b"' in message["content"]
    assert outcome_count("ok") == before + 1
    assert advisor.state == "closed"


def test_a_query_in_the_advisor_url_stays_after_the_path(stub, clock):
    """``services.deepagents_url`` may carry its credential as a query (``?token=``, hidden by
    config show): /invoke/structured goes before it, not into the token's value."""
    stub.reply = lambda path, body: (200, structured(), 0)
    advisor = Advisor(stub.url + "/v1?token=tk-1", clock=clock)
    try:
        assert advisor.advise("svc-a", "inference", {}, **LIMITS) is not None
    finally:
        advisor.close()
    assert [(m, p) for m, p, _ in stub.requests] == [("POST", "/v1/invoke/structured?token=tk-1")]


def test_answer_is_clamped_to_the_fleet(stub, make_advisor):
    stub.reply = lambda path, body: (200, structured(gpus=99, memory=10**7, priority=0), 0)
    advice = make_advisor().advise("s", "training", {}, max_gpus=4, max_memory_mb=24576)
    assert (advice.required_gpus, advice.min_memory_mb, advice.priority) == (4, 24576, 1)
    assert set(advice.clamped) == {"required_gpus", "min_memory_mb", "priority"}
    stub.reply = lambda path, body: (200, structured(gpus=0, memory=-5, priority=42.7), 0)
    advice = make_advisor().advise("s", "training", {}, max_gpus=4, max_memory_mb=24576)
    assert (advice.required_gpus, advice.min_memory_mb, advice.priority) == (1, 0, 10)


@pytest.mark.parametrize(
    "answer",
    [
        b"not json at all",
        b"[1, 2, 3]",
        {"messages": []},
        {"structured_output": None},
        {"structured_output": "2 GPUs please"},
        {"structured_output": {"required_gpus": 2, "priority": 5}},
        {"structured_output": {"required_gpus": "two", "min_memory_mb": 1, "priority": 5}},
        {"structured_output": {"required_gpus": True, "min_memory_mb": 1, "priority": 5}},
        {"structured_output": {"required_gpus": 1, "min_memory_mb": None, "priority": 5}},
    ],
)
def test_garbage_means_no_advice(stub, make_advisor, answer):
    stub.reply = lambda path, body: (200, answer, 0)
    before = outcome_count("garbage")
    assert make_advisor().advise("s", "generic", {}, **LIMITS) is None
    assert outcome_count("garbage") == before + 1


def test_nan_and_infinity_are_garbage():
    for value in (float("nan"), float("inf")):
        with pytest.raises(AdvisorGarbage):
            parse_advice(
                {"structured_output": {"required_gpus": value, "min_memory_mb": 1, "priority": 5}},
                max_gpus=8,
                max_memory_mb=1,
            )


def test_http_500_means_no_advice(stub, make_advisor):
    stub.reply = lambda path, body: (500, {"error": "boom"}, 0)
    before = outcome_count("error")
    assert make_advisor().advise("s", "generic", {}, **LIMITS) is None
    assert outcome_count("error") == before + 1


def test_slow_answer_hits_the_time_limit(stub, make_advisor):
    stub.reply = lambda path, body: (200, structured(), 3.0)
    advisor = make_advisor(timeout=0.2)
    before = outcome_count("timeout")
    started = time.monotonic()
    assert advisor.advise("s", "generic", {}, **LIMITS) is None
    assert time.monotonic() - started < 2.5  # well before the server's 3 s answer
    assert outcome_count("timeout") == before + 1


def test_dripping_answer_hits_the_time_limit(stub, make_advisor):
    # each byte arrives well within the socket timeout, but the whole answer takes ~3 s
    stub.reply = lambda path, body: (200, b" " * 60 + json.dumps(structured()).encode(), 0)
    stub.drip = 0.02
    advisor = make_advisor(timeout=0.3)
    before = outcome_count("timeout")
    started = time.monotonic()
    assert advisor.advise("s", "generic", {}, **LIMITS) is None
    assert time.monotonic() - started < 2.0
    assert outcome_count("timeout") == before + 1


def test_refused_connection_means_no_advice():
    advisor = Advisor("http://127.0.0.1:9", timeout=0.5)
    try:
        assert advisor.advise("s", "generic", {}, **LIMITS) is None
    finally:
        advisor.close()


def test_breaker_opens_after_failures_in_a_row_and_closes_after_a_good_trial(
    stub, make_advisor, clock
):
    answers = {"status": 500}
    stub.reply = lambda path, body: (answers["status"], structured(), 0)
    advisor = make_advisor(breaker_failures=3, breaker_cooldown=30)
    for _ in range(3):
        assert advisor.advise("s", "generic", {}, **LIMITS) is None
    assert advisor.state == "open" and len(stub.requests) == 3

    skipped = outcome_count("skipped")
    answers["status"] = 200
    assert advisor.advise("s", "generic", {}, **LIMITS) is None  # not even asked
    assert len(stub.requests) == 3 and outcome_count("skipped") == skipped + 1

    clock.now += 29.9
    assert advisor.state == "open"
    clock.now += 0.2
    assert advisor.state == "half_open"
    assert advisor.advise("s", "generic", {}, **LIMITS).required_gpus == 2
    assert advisor.state == "closed" and len(stub.requests) == 4


def test_a_success_resets_the_failure_count(stub, make_advisor):
    answers = iter([500, 500, 200, 500, 500, 200])
    stub.reply = lambda path, body: (next(answers), structured(), 0)
    advisor = make_advisor(breaker_failures=3)
    for _ in range(6):
        advisor.advise("s", "generic", {}, **LIMITS)
    assert advisor.state == "closed" and len(stub.requests) == 6


def test_failed_trial_reopens_for_a_full_cooldown(stub, make_advisor, clock):
    stub.reply = lambda path, body: (500, {}, 0)
    advisor = make_advisor(breaker_failures=2, breaker_cooldown=10)
    advisor.advise("s", "generic", {}, **LIMITS)
    advisor.advise("s", "generic", {}, **LIMITS)
    assert advisor.state == "open"
    clock.now += 10
    assert advisor.advise("s", "generic", {}, **LIMITS) is None  # the trial, failing
    assert advisor.state == "open" and len(stub.requests) == 3
    clock.now += 9
    assert advisor.state == "open"
    clock.now += 1
    assert advisor.state == "half_open"


def test_half_open_lets_one_trial_through(stub, make_advisor, clock):
    release = threading.Event()
    answers = {"status": 500, "delay": 0.0}

    def reply(path, body):
        if answers["delay"]:
            release.wait(5)
        return answers["status"], structured(), 0

    stub.reply = reply
    advisor = make_advisor(breaker_failures=1, breaker_cooldown=5, timeout=5)
    advisor.advise("s", "generic", {}, **LIMITS)
    assert advisor.state == "open"
    clock.now += 5
    answers.update(status=200, delay=1)
    stub.received.clear()
    results = []
    trial = threading.Thread(
        target=lambda: results.append(advisor.advise("s", "generic", {}, **LIMITS))
    )
    trial.start()
    assert stub.received.wait(5)
    assert advisor.advise("s", "generic", {}, **LIMITS) is None  # the trial is in flight
    release.set()
    trial.join(5)
    assert results[0].required_gpus == 2
    assert len(stub.requests) == 2 and advisor.state == "closed"


def test_from_settings():
    assert Advisor.from_settings(settings_mod.defaults()) is None
    settings = settings_mod.defaults().replace(
        services={
            "deepagents_url": "http://advisor.example:9004/",
            "deepagents_timeout": "500ms",
            "breaker_failures": 5,
            "breaker_cooldown": "1m",
        }
    )
    advisor = Advisor.from_settings(settings)
    try:
        assert advisor.url == "http://advisor.example:9004/invoke/structured"
        assert (advisor.timeout, advisor.breaker_failures, advisor.breaker_cooldown) == (
            0.5,
            5,
            60.0,
        )
    finally:
        advisor.close()


# --------------------------------------------------------------------------- in the analyzer


@pytest.fixture
def analyzer_with(stub, make_advisor):
    def make(fleet=(8, 81559), **kwargs):
        limits = {"max_gpus_per_node": fleet[0], "max_gpu_memory_mb": fleet[1]}
        return WorkloadAnalyzer(
            settings_mod.defaults(), advisor=make_advisor(**kwargs), fleet_limits=lambda: limits
        )

    return make


def decisions(source):
    return (
        REGISTRY.get_sample_value("gpu_orchestrator_workload_decisions_total", {"source": source})
        or 0.0
    )


def test_analysis_uses_a_good_answer(stub, analyzer_with):
    stub.reply = lambda path, body: (200, structured(gpus=3, memory=20000, priority=4), 0)
    before = decisions("advisor")
    result = analyzer_with().analyze("training", {"batch_size": 256}, service_name="trainer")
    assert (result["required_gpus"], result["min_memory_mb"], result["priority"]) == (3, 20000, 4)
    assert result["decided_by"] == "advisor"
    assert "two GPUs suffice" in result["reasoning"]
    assert result["max_utilization"] == 90.0  # not the advisor's to say
    assert decisions("advisor") == before + 1
    assert "'trainer'" in stub.requests[0][2]["messages"][0]["content"]


def test_analysis_clamps_the_answer_to_the_fleet(stub, analyzer_with):
    stub.reply = lambda path, body: (200, structured(gpus=64, memory=500000, priority=99), 0)
    result = analyzer_with(fleet=(4, 24576)).analyze("generic", {})
    assert (result["required_gpus"], result["min_memory_mb"], result["priority"]) == (4, 24576, 10)
    assert "clamped" in result["reasoning"]


@pytest.mark.parametrize(
    "reply",
    [
        lambda path, body: (200, b"<html>oops</html>", 0),
        lambda path, body: (500, {}, 0),
        lambda path, body: (200, structured(), 3.0),
    ],
)
def test_analysis_falls_back_to_the_rules(stub, analyzer_with, reply):
    stub.reply = reply
    before = decisions("rules")
    result = analyzer_with(timeout=0.2).analyze("training", {"batch_size": 256})
    assert (result["required_gpus"], result["min_memory_mb"], result["priority"]) == (4, 8192, 5)
    assert result["decided_by"] == "rules"
    assert "advisor unavailable" in result["reasoning"]
    assert decisions("rules") == before + 1


def test_explicit_values_win_over_the_advisor(stub, analyzer_with):
    stub.reply = lambda path, body: (200, structured(gpus=3, memory=20000, priority=4), 0)
    analyzer = analyzer_with()
    result = analyzer.analyze("inference", {"required_gpus": 1, "workflow_priority": 9})
    assert (result["required_gpus"], result["min_memory_mb"], result["priority"]) == (1, 20000, 9)
    assert result["decided_by"] == "advisor"
    # everything explicit: the advisor is not asked at all
    result = analyzer.analyze(
        "inference", {"required_gpus": 1, "min_memory_mb": 100, "priority": 2}
    )
    assert (result["required_gpus"], result["min_memory_mb"], result["priority"]) == (1, 100, 2)
    assert result["decided_by"] == "rules" and len(stub.requests) == 1


def test_advice_never_goes_below_the_parameter_estimate(stub, analyzer_with):
    stub.reply = lambda path, body: (200, structured(gpus=1, memory=4096, priority=6), 0)
    result = analyzer_with().analyze("inference", {"model_name": "llama-3-70b"})
    assert (result["required_gpus"], result["min_memory_mb"]) == (2, 80109)
    assert result["decided_by"] == "advisor"


def test_open_breaker_costs_nothing(stub, analyzer_with, clock):
    stub.reply = lambda path, body: (500, {}, 0)
    analyzer = analyzer_with(breaker_failures=2)
    for _ in range(5):
        assert analyzer.analyze("ocr", {"image_count": 200})["required_gpus"] == 2
    assert len(stub.requests) == 2
    assert analyzer.advisor.state == "open"


def test_the_advisor_urls_password_never_reaches_the_log(stub, clock, caplog):
    """services.deepagents_url may carry basic-auth credentials (config show hides them);
    the log lines that name the advisor must hide them too."""
    caplog.set_level(logging.INFO, logger="app.advisor")
    answers = {"status": 500}
    stub.reply = lambda path, body: (answers["status"], structured(), 0)
    url = stub.url.replace("http://", "http://bot:tok3n-secret@")
    advisor = Advisor(url, clock=clock, breaker_failures=1, breaker_cooldown=30)
    try:
        assert advisor.advise("s", "generic", {}, **LIMITS) is None  # HTTP 500: breaker opens
        clock.now += 31
        answers["status"] = 200
        assert advisor.advise("s", "generic", {}, **LIMITS) is not None  # breaker closes
    finally:
        advisor.close()
    assert "HTTP 500" in caplog.text and "breaker closed" in caplog.text
    assert "tok3n-secret" not in caplog.text and "bot:***@127.0.0.1" in caplog.text
