"""Redis behind Sentinel: configuration, following a failover, and replica-acknowledged writes.

The failover tests run a real primary, replica and three sentinels on loopback
(bench/sentinel_topology.py, the embedded server's binary) and SIGKILL the primary.
"""

from __future__ import annotations

import time

import pytest

from app import create_app
from app import settings as settings_mod
from app.redis_client import connect
from bench.sentinel_topology import SentinelTopology
from tests.api_support import allocate, assert_error, clock, make_app, register_fleet  # noqa: F401
from tests.test_cli import run_cli

SENTINEL_PASSWORD = "sentinel-pw-31337"
#: the issue's promise: every role follows a failover within 10 s, with no restart
FOLLOW_WITHIN = 10.0


# ------------------------------------------------------------------ configuration


def test_sentinel_mapping_becomes_the_url_every_role_uses_without_its_password(write_config):
    path = write_config(f"""
redis:
  sentinel:
    master_name: mymaster
    sentinels: ["10.0.0.1:26379", "sentinel-b:26380", "[::1]:26381"]
    password: {SENTINEL_PASSWORD}
""")
    s = settings_mod.load(path, environ={})
    assert s.redis.url == ("redis+sentinel://10.0.0.1:26379,sentinel-b:26380,[::1]:26381/mymaster")
    target = settings_mod.sentinel_target(s, s.redis.url)
    assert target.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert (target.master_name, target.db, target.password) == ("mymaster", 0, SENTINEL_PASSWORD)
    shown = s.redacted()["redis"]
    assert shown["sentinel"]["password"] == "***" and SENTINEL_PASSWORD not in repr(s.redacted())


def test_config_show_hides_the_sentinel_password_in_the_mapping_and_in_the_url(write_config):
    path = write_config(f"""
redis: {{sentinel: {{master_name: m, sentinels: ["127.0.0.1:26379"], password: {SENTINEL_PASSWORD}}}}}
""")
    out = run_cli("--config", path, "config", "show")
    assert out.returncode == 0, out.stderr
    assert SENTINEL_PASSWORD not in out.stdout and "127.0.0.1:26379" in out.stdout
    out = run_cli(
        "config",
        "show",
        env={
            "REDIS_URL": f"redis+sentinel://:{SENTINEL_PASSWORD}@127.0.0.1:26379,127.0.0.1:26380/m/2"
        },
    )
    assert out.returncode == 0, out.stderr
    assert SENTINEL_PASSWORD not in out.stdout
    assert "redis+sentinel://***@127.0.0.1:26379,127.0.0.1:26380/m/2" in out.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("redis: {sentinel: {master_name: m, sentinels: []}}", "non-empty list of host:port"),
        ("redis: {sentinel: {master_name: m, sentinels: [nohost]}}", "not host:port"),
        ("redis: {sentinel: {master_name: m, sentinels: ['h:99999']}}", "not host:port"),
        ("redis: {sentinel: {sentinels: ['h:1']}}", "master_name"),
        ("redis: {sentinel: {master_name: m, sentinels: ['h:1'], extra: 1}}", "unknown key extra"),
        ("redis: {url: 'redis+sentinel://h:1'}", "a URL with scheme"),
        ("redis: {url: 'redis+sentinel://h:1,h2/m'}", "a URL with scheme"),
        (
            "redis: {url: 'redis://h:1', sentinel: {master_name: m, sentinels: ['h:1']}}",
            "empty or a redis+sentinel:// URL",
        ),
        ("redis: {min_replicas_ack: -1}", "an integer in 0..16"),
    ],
)
def test_bad_sentinel_settings_name_the_key(write_config, text, expected):
    with pytest.raises(settings_mod.ConfigError) as exc:
        settings_mod.load(write_config(text), environ={})
    assert "redis." in str(exc.value) and expected in str(exc.value)


def test_a_bad_sentinel_mapping_never_echoes_its_password(write_config):
    with pytest.raises(settings_mod.ConfigError) as exc:
        settings_mod.load(
            write_config(
                f"redis: {{sentinel: {{master_name: m, sentinels: [bad], password: {SENTINEL_PASSWORD}}}}}"
            ),
            environ={},
        )
    assert SENTINEL_PASSWORD not in str(exc.value)


# ------------------------------------------------------------------ acknowledged writes


def test_a_write_no_replica_acknowledges_answers_503_and_reads_still_work(make_app):
    """The test server has no replica: WAIT 1 returns 0, so the grant is not confirmed."""
    app = make_app(nodes=(), redis={"min_replicas_ack": 1, "replica_ack_timeout": "50ms"})
    with pytest.raises(Exception) as exc:
        register_fleet(app)
    assert getattr(exc.value, "code", None) == "not_replicated"
    client = app.test_client()
    resp = allocate(client)
    err = assert_error(resp, 503, "not_replicated")
    assert resp.headers["Retry-After"]
    assert err["details"] == {"acknowledged": 0, "required": 1}
    assert client.get("/gpu/status").status_code == 200  # reads do not wait for replicas


def test_without_min_replicas_ack_no_write_waits(make_app):
    client = make_app().test_client()
    assert allocate(client).status_code in (200, 201)


# ------------------------------------------------------------------ failover


@pytest.fixture
def topology(tmp_path):
    topo = SentinelTopology(tmp_path / "sentinel", password=SENTINEL_PASSWORD).start()
    yield topo
    topo.stop()


def _until_ok(call, deadline: float):
    """Call until it succeeds or the deadline passes; (result, seconds it took)."""
    start = time.monotonic()
    while True:
        try:
            return call(), time.monotonic() - start
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_api_engine_and_dashboard_follow_a_failover_without_restart_and_keep_acked_grants(topology):
    settings = settings_mod.defaults().replace(
        redis={
            "sentinel": topology.sentinel_config(),
            "min_replicas_ack": 1,
            "socket_timeout": "2s",
        },
        dashboard={"enabled": True},
    )
    app = create_app(settings)
    register_fleet(app)
    client = app.test_client()
    granted = []
    for i in range(4):
        resp = allocate(client, f"svc-{i}")
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
        granted.append(resp.get_json()["id"])
    assert client.get("/rq/0/data/queues.json").status_code == 200

    old = topology.kill_primary()
    new = topology.wait_failover(old)
    assert new != old
    follow = time.monotonic()
    deadline = follow + FOLLOW_WITHIN
    for aid in granted:  # every grant the client was told about is on the new primary
        resp, _ = _until_ok(lambda aid=aid: _ok(client.get(f"/gpu/allocations/{aid}")), deadline)
        assert resp.get_json()["id"] == aid
    _until_ok(lambda: _ok(client.get("/rq/0/data/queues.json")), deadline)  # rq-dashboard
    raw = connect(settings.redis.url, settings, decode=False)  # as workers build theirs
    assert _until_ok(raw.ping, deadline)[0] is True
    assert int(raw.info("server")["tcp_port"]) == new
    assert time.monotonic() - follow < FOLLOW_WITHIN

    # the new primary has no replica yet: a write is done but not confirmed, so 503
    assert_error(allocate(client, "unconfirmed"), 503, "not_replicated")
    topology.restart(old)  # the sentinels make it the new primary's replica

    def allocate_ok():
        return _ok(
            client.post(
                "/gpu/allocate",
                json={"service_name": "after-failover"},
                headers={"Idempotency-Key": "after-1"},
            )
        ).get_json()

    after, _ = _until_ok(allocate_ok, time.monotonic() + 30)
    assert after["gpu_ids"]


def _ok(resp):
    assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    return resp
