"""The gpu-orchestrator command: help, config show/check/example, exit codes."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, cwd=None):
    """Run the real console entry point as a user would."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("GPU_ORCH__") and k not in ("CONFIG_PATH", "REDIS_URL", "PORT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=60)


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
    out = run_cli("--config", path, "config", "show",
                  env={"REDIS_URL": "redis://:pw-999@cache:6379/1", "PORT": "8123"})
    assert out.returncode == 0, out.stderr
    for secret in ("k-live-777", "s3cr3t-hmac", "pw-999"):
        assert secret not in out.stdout
    assert "port: 8123" in out.stdout and "team-a" in out.stdout and "cache:6379" in out.stdout


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_pip_install_into_fresh_venv_gives_working_help(tmp_path):
    """`pip install .` into a brand-new virtualenv, then `gpu-orchestrator --help`."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # Build from a copy so the test never writes build/ or egg-info into the work tree.
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], check=True, capture_output=True,
                           text=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    subprocess.run(pip + [str(src)], check=True, timeout=600)
    out = subprocess.run([str(env_dir / "bin" / "gpu-orchestrator"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "monitor" in out.stdout
