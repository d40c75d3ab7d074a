"""``/metrics``: the exact metric names, fleet gauges from Redis, HTTP metrics by route template."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.engine import Engine
from tests.api_support import allocate, app, client, clock, make_app  # noqa: F401 (fixtures)
from tests.conftest import free_port

EXACT_NAMES = [
    "gpu_orchestrator_allocations_total",
    "gpu_orchestrator_allocations_active",
    "gpu_allocator_gpus_allocated_total",
    "gpu_orchestrator_queue_depth",
    "gpu_scheduler_queue_wait_seconds",
    "gpu_scheduler_scheduled_total",
    "gpu_orchestrator_gpu_utilization_percent",
    "gpu_orchestrator_gpu_memory_used_mb",
    "gpu_orchestrator_gpu_memory_total_mb",
    "gpu_orchestrator_gpu_temperature_celsius",
    "gpu_orchestrator_gpu_power_draw_watts",
    "gpu_orchestrator_gpus_total",
    "gpu_orchestrator_gpus_available",
    "gpu_orchestrator_http_request_duration_seconds",
    "gpu_orchestrator_http_requests_total",
    "gpu_orchestrator_webhooks_total",
]


def scrape(client) -> dict[str, list]:
    """sample name -> [(labels, value)]"""
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples, name, **labels) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_every_metric_name_from_the_original_is_exported(client):
    allocate(client)
    client.post("/gpu/release", json={"allocation_id": allocate(client).get_json()["id"]})
    text = client.get("/metrics").get_data(as_text=True)
    for name in EXACT_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name} " in text, name


def test_fleet_and_queue_gauges_read_from_redis(make_app):
    client = make_app(nodes=(("node-a", 4),)).test_client()
    big = allocate(client, "big", workload_data={"required_gpus": 3}).get_json()
    allocate(client, "waiter", workload_data={"required_gpus": 2})
    m = scrape(client)
    assert value(m, "gpu_orchestrator_allocations_active") == 1
    assert value(m, "gpu_allocator_gpus_allocated_total") == 3
    assert value(m, "gpu_orchestrator_queue_depth") == 1
    assert value(m, "gpu_orchestrator_gpus_total") == 4
    assert value(m, "gpu_orchestrator_gpus_available") == 1
    assert value(m, "gpu_orchestrator_allocations_total", service="big", status="allocated") == 1
    assert value(m, "gpu_orchestrator_allocations_total", service="waiter", status="queued") == 1

    # A second app (another replica) on the same Redis reports the same truth.
    other = create_app(client.application.extensions["gpu_settings"])
    m2 = scrape(other.test_client())
    assert value(m2, "gpu_orchestrator_queue_depth") == 1
    assert value(m2, "gpu_orchestrator_allocations_active") == 1

    waits_before = value(m, "gpu_scheduler_queue_wait_seconds_count")
    client.post("/gpu/release", json={"allocation_id": big["id"]})
    m = scrape(client)
    assert value(m, "gpu_orchestrator_queue_depth") == 0
    assert value(m, "gpu_scheduler_queue_wait_seconds_count") == waits_before + 1
    assert value(m, "gpu_orchestrator_allocations_total", service="big", status="released") == 1


def test_per_gpu_gauges_carry_node_gpu_uuid_and_name(make_app):
    client = make_app(nodes=(("node-a", 2), ("node-b", 1))).test_client()
    m = scrape(client)
    totals = m["gpu_orchestrator_gpu_memory_total_mb"]
    assert len(totals) == 3
    labels = {(lab["node"], lab["gpu"]) for lab, _ in totals}
    assert labels == {("node-a", "0"), ("node-a", "1"), ("node-b", "0")}
    for lab, v in totals:
        assert lab["uuid"].startswith("GPU-") and lab["name"] and v == 81559
    for name in (
        "gpu_orchestrator_gpu_utilization_percent",
        "gpu_orchestrator_gpu_temperature_celsius",
        "gpu_orchestrator_gpu_power_draw_watts",
        "gpu_orchestrator_gpu_memory_used_mb",
    ):
        assert len(m[name]) == 3, name


def test_http_metrics_use_the_route_template_never_the_raw_path(client):
    client.get("/gpu/requests/svc-123")
    client.get("/gpu/requests/svc-456")
    client.get("/definitely/not/a/route")
    m = scrape(client)
    reqs = m["gpu_orchestrator_http_requests_total"]
    routes = {lab["route"] for lab, _ in reqs}
    assert "/gpu/requests/<request_id>" in routes
    assert not any("svc-123" in r or "definitely" in r for r in routes)
    assert (
        value(
            m,
            "gpu_orchestrator_http_requests_total",
            method="GET",
            route="/gpu/requests/<request_id>",
            status="404",
        )
        == 2
    )
    assert value(m, "gpu_orchestrator_http_requests_total", route="<unmatched>") == 1
    assert (
        value(
            m,
            "gpu_orchestrator_http_request_duration_seconds_count",
            route="/gpu/requests/<request_id>",
        )
        == 2
    )


def test_a_method_its_path_does_not_allow_is_counted_as_unmatched(client):
    """docs/api.md, Metrics: no route takes a 405 either, so it is <unmatched>, not /gpu/status."""
    assert client.put("/gpu/status").status_code == 405
    m = scrape(client)
    labels = {
        (lab["method"], lab["route"], lab["status"])
        for lab, _ in m["gpu_orchestrator_http_requests_total"]
    }
    assert ("PUT", "<unmatched>", "405") in labels
    assert not any(route == "/gpu/status" and method == "PUT" for method, route, _ in labels)


def test_webhook_results_come_from_the_stats_hash(app, client):
    engine = app.extensions["gpu_engine"]
    engine.redis.hincrby(engine.keys.stats(), "webhook|delivered", 3)
    engine.redis.hincrby(engine.keys.stats(), "webhook|failed", 1)
    m = scrape(client)
    assert value(m, "gpu_orchestrator_webhooks_total", result="delivered") == 3
    assert value(m, "gpu_orchestrator_webhooks_total", result="failed") == 1
    assert value(m, "gpu_orchestrator_webhooks_total", result="retried") == 0


def test_analyser_decisions_are_exported(client):
    client.post("/gpu/workload", json={"workload_type": "generic"})
    assert "decisions" in client.get("/metrics").get_data(as_text=True)


def test_scrape_survives_a_redis_outage(settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        settings.replace(redis={"url": dead, "socket_timeout": 0.2}, dashboard={"enabled": False}),
        redis_url=dead,
    )
    client = app.test_client()
    client.get("/healthz")
    m = scrape(client)
    assert value(m, "gpu_orchestrator_redis_up") == 0
    assert value(m, "gpu_orchestrator_http_requests_total", route="/healthz") == 1


def test_metrics_can_be_switched_off(make_app):
    """``monitoring.metrics_enabled: false`` (a key of the original config) hides /metrics."""
    client = make_app(monitoring={"metrics_enabled": False}).test_client()
    assert client.get("/healthz").status_code == 200
    resp = client.get("/metrics")
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "not_found"
    assert "metrics_enabled" in resp.get_json()["error"]["message"]


def reads(redis) -> dict[str, int]:
    """The commands a collection sends that nothing else in the app does (the webhook
    dispatcher's thread moves outbox lists meanwhile), run since CONFIG RESETSTAT, by name."""
    stats = redis.info("commandstats")
    names = ("fcall_ro", "hgetall", "smembers", "zrange")
    return {n: stats[f"cmdstat_{n}"]["calls"] for n in names if f"cmdstat_{n}" in stats}


def test_a_burst_of_scrapes_reads_redis_once_and_a_scrape_after_a_second_reads_it_again(
    make_app, clock, redis
):
    """/metrics is public by default: however many scrapes arrive within REDIS_MAX_AGE (1 s),
    this process reads Redis once (Redis's own command counts show it); one scrape later, the
    figures are read again and show what another replica changed meanwhile."""
    import threading

    nodes = (("node-a", 4), ("node-b", 4))
    client = make_app(nodes=nodes).test_client()
    allocate(client, "first")
    redis.config_resetstat()
    m = scrape(client)
    assert value(m, "gpu_orchestrator_allocations_active") == 1
    one = reads(redis)
    # one collection reads each GPU's and node's hash and the stats hash once
    assert one["hgetall"] == 8 + 2 + 1 and one["fcall_ro"] == 2

    def burst():
        c = client.application.test_client()
        for _ in range(5):
            assert c.get("/metrics").status_code == 200

    redis.config_resetstat()
    threads = [threading.Thread(target=burst) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clock.advance(0.9)
    assert value(scrape(client), "gpu_orchestrator_allocations_active") == 1
    assert reads(redis) == {}  # 41 scrapes, not one read

    # another replica grants a request: not seen before the second is up, seen after
    other = Engine(redis, client.application.extensions["gpu_settings"], clock=clock)
    assert other.allocate({"service_name": "second"})["status"] == "allocated"
    assert value(scrape(client), "gpu_orchestrator_allocations_active") == 1
    clock.advance(0.1)
    redis.config_resetstat()
    m = scrape(client)
    assert value(m, "gpu_orchestrator_allocations_active") == 2
    assert value(m, "gpu_orchestrator_allocations_total", service="second", status="allocated") == 1
    again = reads(redis)
    assert (again["hgetall"], again["fcall_ro"]) == (one["hgetall"], one["fcall_ro"])


def test_a_write_answered_while_a_scrape_collects_is_shown_by_the_next_scrape(
    make_app, monkeypatch
):
    """A grant served by this process while a scrape is reading Redis (after that scrape read
    the allocations): the scrape answers what it read, but the next one, sent after the
    grant's 200 and within REDIS_MAX_AGE, shows the grant instead of the older figures."""
    import threading

    app = make_app(nodes=(("node-a", 4),))
    client = app.test_client()
    allocate(client, "first")
    engine = app.extensions["gpu_engine"]
    real_counts = engine.counts
    granted = []

    def counts_then_a_grant(*args, **kwargs):
        out = real_counts(*args, **kwargs)
        if not granted:  # the first collection only: another client's grant lands now
            writer = threading.Thread(
                target=lambda: granted.append(allocate(app.test_client(), "second").status_code)
            )
            writer.start()
            writer.join()
        return out

    monkeypatch.setattr(engine, "counts", counts_then_a_grant)
    assert value(scrape(client), "gpu_orchestrator_allocations_active") == 1
    assert granted == [200]
    assert value(scrape(client), "gpu_orchestrator_allocations_active") == 2


def test_an_analysis_does_not_make_the_next_scrape_read_redis(make_app, redis):
    """POST /gpu/workload changes nothing: a scrape after it, within REDIS_MAX_AGE, answers
    from the last collection (a client alternating the two made every scrape a collection:
    ~1,200 Redis commands at 1,024 GPUs, for one cheap request). A write still does."""
    client = make_app(nodes=(("node-a", 4),)).test_client()
    scrape(client)
    redis.config_resetstat()
    for _ in range(3):
        resp = client.post("/gpu/workload", json={"workload_type": "inference"})
        assert resp.status_code == 200
        scrape(client)
    assert reads(redis) == {}
    allocate(client, "writer")
    redis.config_resetstat()
    assert value(scrape(client), "gpu_orchestrator_allocations_active") == 1
    assert reads(redis)["fcall_ro"] == 2
