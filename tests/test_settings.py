"""Configuration: layering, every kind of error, redaction, and the example file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app import settings as settings_mod
from app.settings import ConfigError, load, parse_duration

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_original_service(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./config.yaml here
    s = load(environ={})
    assert s.server.port == 8086
    assert s.server.read_timeout == 15 and s.server.idle_timeout == 60
    assert s.scheduler.queue_check_interval == 5
    assert s.workload_defaults.training.default_memory_mb == 8192
    assert s.workload_defaults.inference.default_priority == 7
    assert s.auth.enabled is False and s.auth.header_name == "X-API-Key"
    assert s.redis.url == ""


def test_file_overrides_defaults_and_env_overrides_file(write_config):
    path = write_config("""
server: {port: "9001", read_timeout: 2m}
scheduler: {max_queue_size: 50, cleanup_interval: 1h}
services: {deepagents_url: "http://advisor:9004/"}
""")
    s = load(path, environ={})
    assert s.server.port == 9001  # the original wrote the port as a string
    assert s.server.read_timeout == 120
    assert s.scheduler.max_queue_size == 50 and s.scheduler.cleanup_interval == 3600
    assert s.services.deepagents_url == "http://advisor:9004"
    assert s.scheduler.default_ttl_multiplier == 2.0  # untouched default

    env = {
        "PORT": "9100",
        "GPU_ORCH__SCHEDULER__MAX_QUEUE_SIZE": "7",
        "DEEPAGENTS_URL": "http://other:1",
        "REDIS_URL": "redis://db:6379/2",
        "GRAPH_SERVICE_URL": "http://graph:8081",
        "GPU_ORCH__WORKLOAD_DEFAULTS__TRAINING__DEFAULT_GPUS": "2",
        "GPU_ORCH__AUTH__ADMINS": "[ops, root]",
        "GPU_ORCH__SCHEDULER__QUEUE_CHECK_INTERVAL": "250ms",
    }
    s = load(path, environ=env)
    assert s.server.port == 9100
    assert s.server.read_timeout == 120  # file value survives where env is silent
    assert s.scheduler.max_queue_size == 7
    assert s.services.deepagents_url == "http://other:1"
    assert s.services.graph_service_url == "http://graph:8081"
    assert s.redis.url == "redis://db:6379/2"
    assert s.workload_defaults.training.default_gpus == 2
    assert s.auth.admins == ["ops", "root"]
    assert s.scheduler.queue_check_interval == 0.25


def test_a_numeric_node_name_names_the_node_as_written(write_config):
    """``node_name: 42`` (YAML, or an environment value, read as YAML) is node "42", as any
    string option takes a number; the node-name rule must not turn it into a config error
    that stops every role."""
    assert (
        load(write_config("monitoring: {node_name: 42}\n"), environ={}).monitoring.node_name == "42"
    )
    env = {"GPU_ORCH__MONITORING__NODE_NAME": "7"}
    assert load(environ=env).monitoring.node_name == "7"


def test_config_path_env_names_the_file(write_config):
    path = write_config("server: {port: 7000}\n")
    assert load(environ={"CONFIG_PATH": path}).server.port == 7000


def test_missing_default_file_is_fine_but_named_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(environ={}).server.port == 8086
    with pytest.raises(ConfigError) as err:
        load(str(tmp_path / "nope.yaml"), environ={})
    assert "nope.yaml" in str(err.value)
    with pytest.raises(ConfigError):
        load(environ={"CONFIG_PATH": str(tmp_path / "nope.yaml")})


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("server: [1, 2", "line", "valid YAML"),
        ("server: {prot: 1}", "server.prot", "a known key"),
        ("nonsense: {}", "nonsense", "a known key"),
        ("server: {port: abc}", "server.port", "an integer in 1..65535"),
        ("server: {port: 70000}", "server.port", "an integer in 1..65535"),
        ("server: {host: ''}", "server.host", "a host name or address"),
        ("scheduler: {max_queue_size: -1}", "scheduler.max_queue_size", "an integer in 1"),
        ("scheduler: {cleanup_interval: soon}", "scheduler.cleanup_interval", "a duration"),
        ("scheduler: {policy: random}", "scheduler.policy", "one of best_effort, strict_fifo"),
        ("monitoring: {metrics_enabled: maybe}", "monitoring.metrics_enabled", "true or false"),
        ("redis: {url: 'http://x'}", "redis.url", "a URL with scheme redis"),
        ("auth: {enabled: true}", "auth.api_keys", "at least one key"),
        ("auth: {api_keys: {'sha256:abc': svc}}", "auth.api_keys", "64 hex digits"),
        # "<owner>|<idempotency key>" must name one owner's key only
        ("auth: {api_keys: {k1: 'team|a'}}", "auth.api_keys", "principal names without '|'"),
        (
            "workload_defaults: {training: {default_priority: 11}}",
            "workload_defaults.training.default_priority",
            "an integer in 1..10",
        ),
        ("workload_defaults: {robotics: {}}", "workload_defaults.robotics", "a known key"),
        ("server: 5", "server", "a mapping"),
        ("monitoring: {simulated: {nodes: [{count: 2}]}}", "monitoring.simulated", "a simulated"),
        # YAML's .nan and .inf are floats: no bound refuses NaN, and no option means infinity
        ("scheduler: {queue_check_interval: .nan}", "scheduler.queue_check_interval", "a duration"),
        ("server: {read_timeout: .inf}", "server.read_timeout", "a duration"),
        ("scheduler: {aging_rate: .nan}", "scheduler.aging_rate", "a number in 0..100"),
        (
            "memory_estimate: {overhead_factor: .nan}",
            "memory_estimate.overhead_factor",
            "a number in 1.0..10",
        ),
        ("webhooks: {retry_intervals: [10s, .inf]}", "webhooks.retry_intervals", "a non-empty"),
        (
            "monitoring: {simulated: {nodes: [{name: a, gpu: {utilization: .nan}}]}}",
            "monitoring.simulated",
            "a simulated",
        ),
        # a node name no /admin/nodes/<node>/... path reaches (request_rules.NODE_NAME_RULE)
        ("monitoring: {node_name: rack-1/gpu-1}", "monitoring.node_name", "no '|', '%' or '/'"),
        ("monitoring: {node_name: '..'}", "monitoring.node_name", "not '.' or '..'"),
        ("monitoring: {simulated: {nodes: [{name: a/b}]}}", "monitoring.simulated", "'a/b'"),
        ("monitoring: {simulated: {nodes: [{name: '.'}]}}", "monitoring.simulated", "'.'}"),
        ("redis: {url: 'redis://db:99999/0'}", "redis.url", "its port a number in 1..65535"),
        ("redis: {url: 'redis://db:port/0'}", "redis.url", "its port a number in 1..65535"),
        ("services: {deepagents_url: 'http://advisor:0'}", "services.deepagents_url", "port"),
    ],
)
def test_each_kind_of_error_names_file_key_and_expectation(write_config, text, key, expected):
    path = write_config(text)
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(path + ": ")
    assert key in line and expected in line


@pytest.mark.parametrize(
    "text, line, key",
    [
        # a second section replaces the first one whole: auth would be off without a word
        (
            "auth:\n  enabled: true\n  api_keys: {k1: ops}\nserver: {}\nauth:\n  admins: [ops]\n",
            5,
            "auth",
        ),
        ("server:\n  port: 8086\n  port: 9000\n", 3, "port"),
        ("tenants: {quotas: {a: {weight: 2}, a: {weight: 1}}}", 1, "a"),
    ],
)
def test_a_key_given_twice_in_one_mapping_is_an_error(write_config, text, line, key):
    """YAML parsers keep the last of two equal keys silently; the first one's settings would
    be dropped without a word (``config check`` said OK)."""
    path = write_config(text)
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    assert str(err.value) == (
        f"{path}: line {line}: expected valid YAML (key {key!r} given twice in one mapping)"
    )


def test_a_merge_key_may_still_be_overridden_by_its_own_mapping(write_config):
    path = write_config(
        "workload_defaults:\n"
        "  training: &base {default_gpus: 2, default_priority: 4}\n"
        "  inference: {<<: *base, default_priority: 7}\n"
    )
    settings = load(path, environ={})
    assert settings.workload_defaults["inference"].default_gpus == 2
    assert settings.workload_defaults["inference"].default_priority == 7


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError) as err:
        load(environ={"GPU_ORCH__SCHEDULER__MAX_QUEUE_SIZE": "lots"})
    assert str(err.value).startswith("environment GPU_ORCH__SCHEDULER__MAX_QUEUE_SIZE: ")
    assert "scheduler.max_queue_size" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(environ={"PORT": "-3"})
    assert "environment PORT: server.port" in str(err.value)


def test_secret_values_never_appear_in_errors(write_config):
    path = write_config("webhooks: {secret: [hunter2-secret]}")
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    assert "hunter2" not in str(err.value)


def test_redacted_view_hides_every_secret(write_config):
    path = write_config(
        """
auth:
  enabled: true
  api_keys: {"key-alpha-123": svc-a, "sha256:%s": svc-b}
webhooks: {secret: "whsec-very-secret"}
"""
        % ("ab" * 32)
    )
    s = load(
        path,
        environ={
            "REDIS_URL": "redis://user:p4ssw0rd@db:6379/0",
            "DEEPAGENTS_URL": "http://bot:tok3n@advisor:9004",
        },
    )
    shown = yaml.safe_dump(s.redacted())
    for secret in ("key-alpha-123", "ab" * 32, "whsec-very-secret", "p4ssw0rd", "tok3n"):
        assert secret not in shown
    assert "svc-a" in shown and "db:6379" in shown  # the non-secret parts stay readable
    assert s.auth.api_keys["key-alpha-123"] == "svc-a"  # the real values are intact


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("15s", 15),
        ("5m", 300),
        ("1h", 3600),
        ("250ms", 0.25),
        (42, 42),
        ("2d", 172800),
        ("1.5h", 5400),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_example_config_documents_every_option_and_is_valid():
    path = ROOT / "config" / "config.yaml.example"
    raw = yaml.safe_load(path.read_text())
    load(str(path), environ={})  # must validate as shipped

    def keys(spec, prefix=""):
        for k, v in spec.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    def present(data, dotted):
        for part in dotted.split("."):
            if not isinstance(data, dict) or part not in data:
                return False
            data = data[part]
        return True

    missing = [k for k in keys(settings_mod.SPEC) if not present(raw, k)]
    assert not missing, f"config.yaml.example lacks {missing}"


def test_example_config_is_the_rendered_spec():
    from app.config_example import render

    shipped = (ROOT / "config" / "config.yaml.example").read_text()
    assert shipped == render(), "run: gpu-orchestrator config example > config/config.yaml.example"


def test_every_option_says_what_it_is_for():
    def undocumented(spec, prefix=""):
        for key, opt in spec.items():
            if isinstance(opt, dict):
                yield from undocumented(opt, f"{prefix}{key}.")
            elif not opt.doc:
                yield prefix + key

    assert list(undocumented(settings_mod.SPEC)) == []


def test_a_rule_across_keys_set_from_the_environment_names_the_environment(
    tmp_path, monkeypatch, write_config
):
    """No ./config.yaml here: the error must not send the operator looking for one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load(environ={"GPU_ORCH__AUTH__ENABLED": "true"})
    assert str(err.value).startswith("environment: auth.api_keys: ")
    path = write_config("scheduler: {node_heartbeat_timeout: 1m}")
    with pytest.raises(ConfigError) as err:
        load(path, environ={"GPU_ORCH__SCHEDULER__NODE_FORGET_AFTER": "30s"})
    assert str(err.value).startswith(f"{path} and environment: scheduler.node_forget_after: ")


@pytest.mark.parametrize("given", ["1.5ms", "100.5ms", "250ms", "1.5s", "59.5s"])
def test_config_show_spells_each_duration_as_the_value_in_effect(given):
    s = load(environ={"GPU_ORCH__REDIS__REPLICA_ACK_TIMEOUT": given})
    shown = s.redacted()["redis"]["replica_ack_timeout"]
    assert parse_duration(shown) == s.redis.replica_ack_timeout == parse_duration(given)


def test_the_default_webhook_retries_fit_in_the_shortest_history_ttl():
    """Webhook tries span the retry intervals plus a timeout per failed try (3,565 s by
    default); history_ttl may not go below 1 h, so only a changed retry setting can warn."""
    s = settings_mod.defaults()
    assert settings_mod.webhook_retry_span(s) == 3520 + 9 * 5
    assert settings_mod.warnings(s.replace(scheduler={"history_ttl": "1h"})) == []
    longer = s.replace(scheduler={"history_ttl": "1h"}, webhooks={"timeout": "10s"})
    [line] = settings_mod.warnings(longer)
    assert "scheduler.history_ttl (1h)" in line and "webhooks.retry_intervals (3610s" in line
