"""Tenants (issue 14): the config sections, each record's tenant, and what the engine keeps per
tenant (GPUs held, queued requests, decayed usage), on a real redis-server."""

from __future__ import annotations

import math

import pytest

from app import settings as settings_mod
from app.cli import main as cli_main
from app.engine import Engine
from tests.api_support import allocate, clock, make_app  # noqa: F401 (fixtures)

HOUR = 3600.0


class Clock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def gpus(n, mb=80_000):
    return [{"index": i, "uuid": f"u{i}", "name": "H100", "memory_total_mb": mb} for i in range(n)]


@pytest.fixture
def tclock():
    return Clock()


@pytest.fixture
def make_engine(redis, settings, tclock):
    def make(n=4, nodes=("n1",), **overrides):
        eng = Engine(redis, settings.replace(**overrides), clock=tclock)
        for node in nodes:
            eng.report_node(node, gpus(n))
        return eng

    return make


def tenant_state(engine) -> dict:
    """tenant -> (held, usage GPU-seconds as stored, at)."""
    out = {}
    for t, v in engine.redis.hgetall(engine.keys.tenants()).items():
        held, usage, at = v.split("|")
        out[t] = (int(held), float(usage), float(at))
    return out


def held(engine) -> dict:
    return {t: h for t, (h, _, _) in tenant_state(engine).items() if h}


def queued(engine) -> dict:
    return {t: int(n) for t, n in engine.redis.hgetall(engine.keys.tenant_queued()).items()}


# ----------------------------------------------------------------------------- config


def check(write_config, text):
    return settings_mod.check_file(write_config(text))


@pytest.mark.parametrize(
    "text,key,expected",
    [
        ("tenants: {quotas: {a: {wieght: 2}}}", "tenants.quotas.a.wieght", "a known tenant field"),
        ("tenants: {quotas: {a: {max_gpus: -1}}}", "tenants.quotas.a.max_gpus", "an integer >= 0"),
        ("tenants: {quotas: {a: {max_queued: -3}}}", "tenants.quotas.a.max_queued", ">= 0"),
        ("tenants: {quotas: {a: {guaranteed_gpus: -1}}}", "tenants.quotas.a.guaranteed_gpus", ""),
        ("tenants: {quotas: {a: {weight: -1}}}", "tenants.quotas.a.weight", "a number > 0"),
        ("tenants: {default: {weight: 0}}", "tenants.default.weight", "a number > 0"),
        ("tenants: {default: {max_gpus: 2.5}}", "tenants.default.max_gpus", "an integer"),
        ("tenants: {default: {color: red}}", "tenants.default.color", "a known tenant field"),
        (
            "tenants: {quotas: {a: {guaranteed_gpus: 4, max_gpus: 2}}}",
            "tenants.quotas.a.guaranteed_gpus",
            "a value <= max_gpus (2)",
        ),
        (
            "tenants: {default: {max_gpus: 2}, quotas: {a: {guaranteed_gpus: 3}}}",
            "tenants.quotas.a.guaranteed_gpus",
            "a value <= max_gpus (2)",
        ),
        (
            "tenants: {default: {guaranteed_gpus: 3, max_gpus: 1}}",
            "tenants.default.guaranteed_gpus",
            "<= max_gpus",
        ),
        ("tenants: {key: owner}", "tenants.key", "one of principal, service_name"),
        ("tenants: {quotas: {a: 3}}", "tenants.quotas.a", "a mapping"),
        ("tenants: {usage_half_life: 0}", "tenants.usage_half_life", "a duration"),
        ("tenants: {fair: true}", "tenants.fair", "a known key"),
        ("preemption: {grace_period: -5}", "preemption.grace_period", "a duration"),
        ("preemption: {enabled: maybe}", "preemption.enabled", "true or false"),
    ],
)
def test_config_check_names_the_bad_tenant_field(write_config, text, key, expected):
    with pytest.raises(settings_mod.ConfigError) as err:
        check(write_config, text)
    line = str(err.value)
    assert "\n" not in line
    assert f": {key}: expected" in line and expected in line, line


ISSUE_EXAMPLE = """\
tenants:
  key: principal
  fair_share: true
  usage_half_life: 1h
  default: {weight: 1, guaranteed_gpus: 0, max_gpus: null, max_queued: null}
  quotas:
    training-team:  {weight: 2, guaranteed_gpus: 4, max_gpus: 8}
    inference-team: {weight: 1, guaranteed_gpus: 2, max_gpus: 4}
preemption:
  enabled: false
  grace_period: 30s
"""


def test_the_issues_example_is_valid_and_config_show_prints_it(write_config, capsys):
    path = write_config(ISSUE_EXAMPLE)
    s = check(write_config, ISSUE_EXAMPLE)
    assert settings_mod.tenant_quotas(s)["training-team"] == {
        "weight": 2,
        "guaranteed_gpus": 4,
        "max_gpus": 8,
        "max_queued": None,
    }
    assert s.preemption.grace_period == 30.0 and s.tenants.usage_half_life == HOUR
    assert cli_main(["config", "check", path]) == 0
    assert cli_main(["--config", path, "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "tenants:\n  key: principal\n  fair_share: true\n  usage_half_life: 1h\n" in out
    assert "training-team:\n      weight: 2\n      guaranteed_gpus: 4\n      max_gpus: 8" in out
    assert "preemption:\n  enabled: false\n  grace_period: 30s\n" in out


def test_config_check_exits_2_with_one_line(write_config, capsys):
    path = write_config("tenants: {quotas: {a: {guaranteed_gpus: 5, max_gpus: 4}}}\n")
    assert cli_main(["config", "check", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tenants.quotas.a.guaranteed_gpus: expected a value <= max_gpus (4), got 5" in err


def test_tenant_key_defaults_on_auth(write_config, capsys):
    off = settings_mod.load(write_config("{}"), environ={})
    assert settings_mod.tenant_key(off) == "service_name"
    on = settings_mod.load(
        write_config("auth: {enabled: true, api_keys: {k1: team-a}}"), environ={}
    )
    assert settings_mod.tenant_key(on) == "principal"
    assert on.redacted()["tenants"]["key"] == "principal"
    assert off.redacted()["tenants"]["key"] == "service_name"
    explicit = settings_mod.load(
        write_config("auth: {enabled: true, api_keys: {k1: a}}\ntenants: {key: service_name}"),
        environ={},
    )
    assert settings_mod.tenant_key(explicit) == "service_name"


def test_a_quota_inherits_what_it_leaves_out_from_default(write_config):
    s = check(write_config, "tenants: {default: {max_queued: 7, weight: 3}, quotas: {a: {}}}")
    assert settings_mod.tenant_quota(s, "a")["max_queued"] == 7
    assert settings_mod.tenant_quota(s, "a")["weight"] == 3
    assert settings_mod.tenant_quota(s, "unknown") == s.tenants.default


def test_environment_sets_tenant_options(write_config):
    s = settings_mod.load(
        write_config("{}"),
        environ={
            "GPU_ORCH__TENANTS__FAIR_SHARE": "true",
            "GPU_ORCH__TENANTS__QUOTAS": "{team-a: {max_gpus: 2}}",
            "GPU_ORCH__PREEMPTION__GRACE_PERIOD": "1m",
        },
    )
    assert s.tenants.fair_share is True
    assert settings_mod.tenant_quota(s, "team-a")["max_gpus"] == 2
    assert s.preemption.grace_period == 60.0


# ----------------------------------------------------------------------------- records


def test_the_tenant_is_the_service_with_auth_off(make_engine):
    eng = make_engine()
    rec = eng.allocate({"service_name": "svc-a"})
    assert rec["tenant"] == "svc-a"
    assert eng.get(rec["id"])["tenant"] == "svc-a"


def test_the_tenant_is_the_principal_with_auth_on(make_engine):
    eng = make_engine(auth={"enabled": True, "api_keys": {"k": "team-a"}})
    rec = eng.allocate({"service_name": "svc-a", "owner": "team-a"})
    assert eng.get(rec["id"])["tenant"] == "team-a"


def test_tenants_key_service_name_with_auth_on(make_engine):
    eng = make_engine(
        auth={"enabled": True, "api_keys": {"k": "team-a"}}, tenants={"key": "service_name"}
    )
    rec = eng.allocate({"service_name": "svc-a", "owner": "team-a"})
    assert eng.get(rec["id"])["tenant"] == "svc-a"


def test_tenants_key_principal_without_a_principal_falls_back_to_the_service(make_engine):
    eng = make_engine(tenants={"key": "principal"})
    rec = eng.allocate({"service_name": "svc-a"})
    assert eng.get(rec["id"])["tenant"] == "svc-a"


def test_the_record_over_http_carries_its_tenant(make_app):
    client = make_app().test_client()
    resp = allocate(client, "svc-http", required_gpus=1)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["tenant"] == "svc-http"
    rid = resp.get_json()["id"]
    assert client.get(f"/gpu/allocations/{rid}").get_json()["tenant"] == "svc-http"


# ----------------------------------------------------------------------------- counters


def test_gpus_held_count_whole_gpus_and_a_shared_allocation_as_one(make_engine):
    eng = make_engine(n=4)
    a = eng.allocate({"service_name": "a", "required_gpus": 3})
    s1 = eng.allocate({"service_name": "b", "sharing": "shared", "min_memory_mb": 1000})
    s2 = eng.allocate({"service_name": "b", "sharing": "shared", "min_memory_mb": 1000})
    assert a["status"] == s1["status"] == s2["status"] == "allocated"
    assert held(eng) == {"a": 3, "b": 2}
    eng.release(s1["id"])
    assert held(eng) == {"a": 3, "b": 1}
    eng.release(a["id"])
    eng.release(s2["id"])
    assert held(eng) == {}


def test_queued_counts_follow_enqueue_grant_cancel_and_timeout(make_engine, tclock):
    eng = make_engine(n=2)
    hold = eng.allocate({"service_name": "a", "required_gpus": 2})
    q1 = eng.allocate({"service_name": "b", "required_gpus": 1})
    q2 = eng.allocate({"service_name": "b", "required_gpus": 2, "queue_timeout_seconds": 10})
    q3 = eng.allocate({"service_name": "c", "required_gpus": 1})
    assert [q1["status"], q2["status"], q3["status"]] == ["queued"] * 3
    assert queued(eng) == {"b": 2, "c": 1}
    keys = eng.keys
    assert eng.redis.zrange(keys.queue_tenant("b"), 0, -1) == [q1["id"], q2["id"]]
    assert eng.redis.zrange(keys.queue_tenant("c"), 0, -1) == [q3["id"]]
    eng.cancel(q3["id"])
    assert queued(eng) == {"b": 2}
    tclock.now += 11
    assert eng.reap()["timed_out"] == [q2["id"]]
    assert queued(eng) == {"b": 1}
    eng.release(hold["id"])  # q1 is granted from the queue
    assert eng.get(q1["id"])["status"] == "allocated"
    assert queued(eng) == {}
    assert not eng.redis.exists(keys.queue_tenant("b"), keys.queue_tenant("c"))
    assert held(eng) == {"b": 1}


def test_counts_survive_expiry_release_by_service_and_a_forgotten_node(make_engine, tclock):
    eng = make_engine(n=2, nodes=("n1", "n2"))
    a = eng.allocate({"service_name": "a", "required_gpus": 2, "ttl_seconds": 5})
    eng.allocate({"service_name": "b", "required_gpus": 1})
    eng.allocate({"service_name": "b", "required_gpus": 1})
    assert held(eng) == {"a": 2, "b": 2}
    tclock.now += 6
    eng.report_node("n1", gpus(2))
    eng.report_node("n2", gpus(2))
    assert a["id"] in eng.reap()["expired"]
    assert held(eng) == {"b": 2}
    eng.release_by_service("b")
    assert held(eng) == {}


def test_usage_is_exact_decayed_gpu_seconds_under_the_injected_clock(make_engine, tclock):
    eng = make_engine(n=4, tenants={"usage_half_life": "1h"})
    t0 = tclock.now

    def at(t):
        tclock.now = t
        eng.report_node("n1", gpus(4))  # the node stays alive

    a = eng.allocate({"service_name": "a", "required_gpus": 2})
    at(t0 + 1800)
    b = eng.allocate({"service_name": "a", "required_gpus": 1})
    assert b["status"] == "allocated"
    at(t0 + 3600)
    eng.release(a["id"])
    at(t0 + 7200)
    eng.release(b["id"])

    def integral(g, t_from, t_to, at):
        """g GPUs held over [t_from, t_to], weighted 2^(-(at - s)/H)."""
        return g * HOUR / math.log(2) * (2 ** (-(at - t_to) / HOUR) - 2 ** (-(at - t_from) / HOUR))

    end = t0 + 7200
    want = integral(2, t0, t0 + 1800, end) + integral(3, t0 + 1800, t0 + 3600, end)
    want += integral(1, t0 + 3600, t0 + 7200, end)
    h, usage, stamp = tenant_state(eng)["a"]
    assert h == 0 and stamp == end
    assert usage == pytest.approx(want, rel=1e-12)


def test_an_idle_tenant_with_little_usage_leaves_no_state(make_engine, tclock):
    eng = make_engine(n=1)
    rec = eng.allocate({"service_name": "brief"})
    tclock.now += 30  # 30 GPU-seconds: below a GPU-minute
    eng.release(rec["id"])
    assert eng.redis.hgetall(eng.keys.tenants()) == {}
    assert eng.redis.hgetall(eng.keys.tenant_queued()) == {}


def test_a_priority_change_moves_the_request_in_its_tenants_queue(make_engine):
    eng = make_engine(n=1)
    eng.allocate({"service_name": "hold"})
    low = eng.allocate({"service_name": "b", "priority": 3})
    high = eng.allocate({"service_name": "b", "priority": 5})
    key = eng.keys.queue_tenant("b")
    assert eng.redis.zrange(key, 0, -1) == [high["id"], low["id"]]
    eng.set_priority(low["id"], 9)
    assert eng.redis.zrange(key, 0, -1) == [low["id"], high["id"]]
    assert eng.redis.zrange(key, 0, -1, withscores=True) == eng.redis.zrange(
        eng.keys.queue(), 0, -1, withscores=True
    )
