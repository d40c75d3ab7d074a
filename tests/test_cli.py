"""The gpu-orchestrator command: help, config show/check/example, exit codes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from app import serve
from app import settings as settings_mod
from app.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, cwd=None):
    """Run the real console entry point as a user would."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPU_ORCH__") and k not in ("CONFIG_PATH", "REDIS_URL", "PORT")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=60,
    )


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("up", "api", "worker", "scheduler", "monitor", "redis", "config"):
        assert cmd in out.stdout


def test_config_check_accepts_a_good_file_and_rejects_a_bad_one(write_config):
    good = write_config("scheduler: {max_queue_size: 20}\n", "good.yaml")
    out = run_cli("config", "check", good)
    assert out.returncode == 0 and "OK" in out.stdout

    bad = write_config("scheduler: {max_queue_size: 0}\n", "bad.yaml")
    out = run_cli("config", "check", bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert bad in lines[0] and "scheduler.max_queue_size" in lines[0] and "expected" in lines[0]


def test_config_check_warns_when_history_ttl_ends_before_the_webhook_retries(write_config):
    """A request's record expires scheduler.history_ttl after it ends; a webhook of its end
    event still retrying after that finds nothing to send and counts as failed. config check
    said OK to such a file; it now says so in one line naming both keys (the file is valid,
    so the exit code stays 0), and the default retries fit in the shortest history_ttl."""
    short = write_config(
        "scheduler: {history_ttl: 1h}\nwebhooks: {retry_intervals: [30m, 30m], timeout: 5s}\n",
        "short.yaml",
    )
    out = run_cli("config", "check", short)
    assert out.returncode == 0 and f"{short}: OK (1 warning(s) on stderr)" in out.stdout
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"{short}: warning: scheduler.history_ttl (1h) is shorter than")
    assert "webhooks.retry_intervals (3610s with webhooks.timeout per failed try)" in line
    fits = write_config("scheduler: {history_ttl: 1h}\n", "fits.yaml")
    out = run_cli("config", "check", fits)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, f"{fits}: OK", "")
    out = run_cli("--config", short, "config", "show")  # a role logs it once at start
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["scheduler"]["history_ttl"] == "1h"
    assert "config: scheduler.history_ttl (1h) is shorter than" in out.stderr


def test_bad_environment_stops_any_command_with_exit_2():
    out = run_cli("config", "show", env={"GPU_ORCH__SERVER__WORKERS": "zero"})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "GPU_ORCH__SERVER__WORKERS" in out.stderr and "server.workers" in out.stderr


def test_missing_explicit_config_is_exit_2(tmp_path):
    out = run_cli("--config", str(tmp_path / "absent.yaml"), "config", "show")
    assert out.returncode == 2 and "absent.yaml" in out.stderr


def test_config_show_prints_effective_yaml_with_secrets_redacted(write_config):
    path = write_config("""
auth: {enabled: true, api_keys: {"k-live-777": team-a}}
webhooks: {secret: "s3cr3t-hmac"}
""")
    out = run_cli(
        "--config",
        path,
        "config",
        "show",
        env={"REDIS_URL": "redis://:pw-999@cache:6379/1", "PORT": "8123"},
    )
    assert out.returncode == 0, out.stderr
    for secret in ("k-live-777", "s3cr3t-hmac", "pw-999"):
        assert secret not in out.stdout
    assert "port: 8123" in out.stdout and "team-a" in out.stdout and "cache:6379" in out.stdout


@pytest.mark.parametrize(
    "url, shown",
    [
        # redis-py's documented form for a socket with a password
        (
            "unix:///run/redis.sock?db=0&password=pw-in-query",
            "unix:///run/redis.sock?db=0&password=***",
        ),
        # any other query argument goes to the connection too
        (
            "rediss://cache:6380/0?ssl_password=pw-in-query",
            "rediss://cache:6380/0?ssl_password=***",
        ),
        # an IPv6 host keeps its brackets, or the URL shown is not the one in effect
        ("redis://:pw-in-query@[::1]:6390/0", "redis://***@[::1]:6390/0"),
    ],
)
def test_config_show_hides_a_password_in_the_url_query(url, shown):
    out = run_cli("config", "show", env={"REDIS_URL": url})
    assert out.returncode == 0, out.stderr
    assert "pw-in-query" not in out.stdout
    assert f"url: {shown}" in out.stdout


def test_config_show_hides_a_token_in_a_service_urls_query():
    """An HTTP service may take its credential in the query (``?token=``, ``?api_key=``,
    ``?X-Amz-Signature=``); what is not a credential stays readable."""
    url = (
        "https://advisor.example:8443/v1?model=m1&token=tk-in-query&api_key=ak-in-query"
        "&X-Amz-Signature=sg-in-query&region=eu"
    )
    out = run_cli("config", "show", env={"DEEPAGENTS_URL": url})
    assert out.returncode == 0, out.stderr
    for secret in ("tk-in-query", "ak-in-query", "sg-in-query"):
        assert secret not in out.stdout
    assert (
        "deepagents_url: https://advisor.example:8443/v1?model=m1&token=***&api_key=***"
        "&X-Amz-Signature=***&region=eu"
    ) in out.stdout


@pytest.mark.parametrize("port", ["99999", "port"])
def test_a_redis_url_with_a_bad_port_is_one_line_exit_2_without_its_password(port):
    out = run_cli("config", "show", env={"REDIS_URL": f"redis://:pw-777@cache:{port}/0"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert "REDIS_URL" in out.stderr and "redis.url" in out.stderr and "port" in out.stderr
    assert "pw-777" not in out.stderr


@pytest.mark.parametrize("command", ["redis", "api"])
def test_a_data_dir_that_cannot_be_made_is_one_line_exit_2(tmp_path, command):
    taken = tmp_path / "a-file"
    taken.write_text("")
    out = run_cli(
        command,
        env={
            "GPU_ORCH__REDIS__DATA_DIR": str(taken / "redis"),
            "GPU_ORCH__REDIS__EMBEDDED_PORT": str(free_port()),
            "PORT": str(free_port()),
        },
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert str(taken) in out.stderr and "redis.data_dir" in out.stderr


@pytest.mark.parametrize("command", [["worker", "--burst"], ["monitor", "--once"]])
def test_a_role_that_cannot_reach_redis_says_so_in_one_line(command):
    """Exit 1 (a restart may help: up and docker-compose restart it), not a traceback."""
    out = run_cli(*command, env={"REDIS_URL": f"redis://:pw-555@127.0.0.1:{free_port()}/0"})
    assert out.returncode == 1
    err_lines = [line for line in out.stderr.splitlines() if "gpu-orchestrator:" in line]
    assert "Traceback" not in out.stderr and len(err_lines) == 1, out.stderr
    assert "Redis" in err_lines[0] and "pw-555" not in out.stderr


def test_a_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("scheduler:\n  max_queue_size: 20  # \u00e9quipe\n".encode("latin-1"))
    for args in (["config", "check", str(path)], ["--config", str(path), "config", "show"]):
        out = run_cli(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1
        assert f"{path}: line 2: expected UTF-8 text" in out.stderr


def test_redis_says_so_when_the_server_on_its_data_dir_is_another_process(tmp_path):
    """It used to print '...; Ctrl-C stops it' and exit at once: Ctrl-C stopped nothing."""
    from app.embedded_redis import EmbeddedRedis

    port = free_port()
    owner = EmbeddedRedis(str(tmp_path / "data"), port=port)
    owner.start()
    try:
        out = run_cli(
            "redis",
            env={
                "GPU_ORCH__REDIS__DATA_DIR": str(tmp_path / "data"),
                "GPU_ORCH__REDIS__EMBEDDED_PORT": str(port),
            },
        )
        assert out.returncode == 0, out.stderr
        assert "already running" in out.stdout and "Ctrl-C" not in out.stdout
        assert owner.proc.poll() is None  # still the owner's, still up
    finally:
        owner.stop()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_version_prints_the_package_version():
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu-orchestrator 0.1.0"


def test_global_options_work_after_the_subcommand_too(write_config):
    path = write_config("server: {port: 8123}\n")
    for args in (
        ("config", "show", "--config", path),
        ("--config", path, "config", "show"),
        ("config", "--config", path, "show"),
    ):
        out = run_cli(*args)
        assert out.returncode == 0, (args, out.stderr)
        assert "port: 8123" in out.stdout, args
    out = run_cli("config", "show", "--log-level", "DEBUG", "--log-format", "json")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "command, names",
    [
        (["up"], ["server.*", "redis.*", "workers.*", "PORT", "REDIS_URL", "data_dir"]),
        (["up"], ["tenants.*", "preemption.*", "webhooks.*", "workload_defaults.*"]),
        (["api"], ["server.*", "host", "port", "PORT", "REDIS_URL", "auth.*"]),
        # what else the API reads: the engine's settings (sent with every call), the webhook
        # URL policy, the workload analysis, the metrics switches
        (["api"], ["scheduler.*", "tenants.*", "preemption.*", "webhooks.*", "services.*"]),
        (["api"], ["workload_defaults.*", "memory_estimate.*", "monitoring.*"]),
        (["worker"], ["workers.*", "webhooks.*", "REDIS_URL"]),
        # its maintenance jobs (reaper, safety-net pass) and a monitor's report run the engine
        (["worker"], ["scheduler.*", "tenants.*", "preemption.*", "monitoring.*"]),
        (["scheduler"], ["scheduler.*", "REDIS_URL"]),
        (["monitor"], ["monitoring.*", "REDIS_URL"]),
        (["monitor"], ["scheduler.*", "tenants.*", "preemption.*"]),
        (["redis"], ["redis.*", "embedded_port"]),
        (["config", "show"], ["server.*", "CONFIG_PATH"]),
    ],
)
def test_each_subcommand_help_describes_it_and_names_its_settings(command, names):
    out = run_cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    usage, description = out.stdout.split("\n\n")[:2]
    assert usage.startswith("usage: gpu-orchestrator " + " ".join(command))
    assert len(description.split()) >= 8, description  # a sentence, not the options list
    assert "GPU_ORCH__<SECTION>__<KEY>" in out.stdout
    for name in names:
        assert name in out.stdout, (command, name)


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["api", "--no-such-option"],
        ["monitor", "--backend", "cuda"],
        ["config", "check"],
        ["config"],
        [],
        ["--log-level", "LOUD", "config", "show"],
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "error:" in lines[0] and "usage:" not in out.stderr and "--help" in lines[0]
    assert out.stdout == ""


def test_the_api_binds_to_loopback_unless_told_otherwise():
    settings = settings_mod.load(environ={})
    assert settings.server.host == "127.0.0.1"
    assert serve.gunicorn_options(settings)["bind"] == "127.0.0.1:8086"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("api-1", "api-2"):
        env = compose["services"][name]["environment"]
        assert env["GPU_ORCH__SERVER__HOST"] == "0.0.0.0", name  # nginx reaches it over the network


def test_api_exits_2_at_once_with_one_line_when_its_port_is_taken(write_config):
    port = free_port()
    path = write_config(f"server: {{port: {port}, host: 127.0.0.1}}\n")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        started = time.monotonic()
        out = run_cli("--config", path, "api", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
        took = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-2000:]
    assert took < 10
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(port) in lines[0] and "server.port" in lines[0] and "PORT" in lines[0]


@pytest.mark.slow
def test_pip_install_into_fresh_venv_gives_working_help(tmp_path):
    """`pip install .` into a brand-new virtualenv, then `gpu-orchestrator --help`."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # Build from a copy so the test never writes build/ or egg-info into the work tree.
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    subprocess.run(pip + [str(src)], check=True, timeout=600)
    out = subprocess.run(
        [str(env_dir / "bin" / "gpu-orchestrator"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "monitor" in out.stdout


def test_up_says_when_its_redis_is_run_by_another_process(tmp_path, settings):
    """`up` restarts and stops only a server it started; its summary said 'Ctrl-C stops
    everything' over one that `gpu-orchestrator redis` ran in another terminal."""
    from app.cli import _summary
    from app.embedded_redis import EmbeddedRedis

    port = free_port()
    owner = EmbeddedRedis(str(tmp_path / "data"), port=port)
    url = owner.start()
    try:
        mine = _summary(settings, url, owner, "127.0.0.1", ["api"])
        assert "Ctrl-C stops everything." in mine and "another process" not in mine
        guest = EmbeddedRedis(str(tmp_path / "data"), port=port)
        guest.start()
        theirs = _summary(settings, url, guest, "127.0.0.1", ["api"])
        assert "run by another process: up neither restarts nor stops it" in theirs
        assert "Ctrl-C stops every role (not that Redis)." in theirs
    finally:
        owner.stop()
