"""The ``gpu-orchestrator`` command: one entry point for every role of the service.

Configuration errors and bad arguments exit with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

import yaml

from app import logs
from app import settings as settings_mod
from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from app.shutdown import StopSignal

log = logging.getLogger("gpu_orchestrator.cli")

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the operator must fix; printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-orchestrator",
        description="Hands out GPUs to the services that need them.")
    parser.add_argument("--config", metavar="PATH",
                        help="YAML config file (default: $CONFIG_PATH or ./config.yaml)")
    parser.add_argument("--log-format", choices=("text", "json"),
                        help="log format (overrides logging.format)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser("up", help="run the whole service in one terminal: Redis, API, "
                                   "worker, scheduler, monitor")
    up.add_argument("--no-monitor", action="store_true", help="do not start a local monitor")
    sub.add_parser("api", help="serve the REST API with gunicorn")
    worker = sub.add_parser("worker", help="run an RQ worker on the service's queues")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    sub.add_parser("scheduler", help="enqueue the periodic safety-net pass and the reaper "
                                    "(RQ cron, one leader at a time)")
    monitor = sub.add_parser("monitor", help="report this node's GPUs to Redis")
    monitor.add_argument("--once", action="store_true", help="report once and exit")
    monitor.add_argument("--backend", choices=("auto", "nvml", "simulated"),
                         help="override monitoring.backend")
    sub.add_parser("redis", help="run only the embedded Redis in the foreground")
    sub.add_parser("run", add_help=False,
                   help="run a command on GPUs from the API: allocate, wait, set "
                        "CUDA_VISIBLE_DEVICES, renew, release (see `run --help`)")

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    config_sub.add_parser("show", help="print the effective config as YAML, secrets redacted")
    config_sub.add_parser("example", help="print a config file documenting every option")
    check = config_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    return parser


def resolve_redis(settings: settings_mod.Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use; starts (or reuses) the embedded server when none is configured."""
    if settings.redis.url:
        return settings.redis.url, None
    embedded = EmbeddedRedis(settings.redis.data_dir, settings.redis.embedded_host,
                             settings.redis.embedded_port)
    return embedded.start(), embedded


# ------------------------------------------------------------------------------ commands

def cmd_config(args, settings) -> int:
    if args.config_command == "check":
        settings_mod.check_file(args.file)
        print(f"{args.file}: OK")
        return 0
    if args.config_command == "example":
        from app.config_example import render
        sys.stdout.write(render())
        return 0
    sys.stdout.write(yaml.safe_dump(settings.redacted(), sort_keys=False))
    return 0


def cmd_redis(args, settings) -> int:
    url, embedded = resolve_redis(settings)
    if embedded is None:
        raise CliError(f"REDIS_URL is set ({settings_mod.redact_url(url)}); nothing to start")
    print(f"embedded Redis at {url}, data in {embedded.data_dir}; Ctrl-C stops it", flush=True)
    stop = StopSignal().install()
    try:
        while not stop.sleep(0.2) and embedded.proc is not None and embedded.proc.poll() is None:
            pass
    finally:
        embedded.stop()
    return 0


def cmd_api(args, settings) -> int:
    from app import serve

    url, embedded = resolve_redis(settings)
    serve.run(settings, url, cleanup=embedded.stop if embedded else None)
    return 0


def cmd_worker(args, settings) -> int:
    from workers.worker import run
    return run(settings, burst=args.burst)


def cmd_scheduler(args, settings) -> int:
    from workers.scheduler import run
    return run(settings)


def cmd_monitor(args, settings) -> int:
    from workers.monitor import run
    return run(settings, once=args.once, backend=args.backend)


#: Roles that ``up`` runs as child processes, in start order.
UP_ROLES = ("api", "worker", "scheduler", "monitor")


def cmd_up(args, settings) -> int:
    """Embedded Redis plus every role as a child process; Ctrl-C stops them all in order.

    Children run in their own sessions, so a Ctrl-C reaches only this supervisor, which then
    sends each child exactly one SIGTERM (an RQ worker finishes its current job on the first
    signal; a second one would kill it mid-job).
    """
    url, embedded = resolve_redis(settings)
    roles = [r for r in UP_ROLES if not (r == "monitor" and args.no_monitor)]
    env = dict(os.environ, REDIS_URL=url)
    base = [sys.executable, "-m", "app.cli"]
    if args.config:
        base += ["--config", args.config]
    if args.log_format:
        base += ["--log-format", args.log_format]
    if args.log_level:
        base += ["--log-level", args.log_level]
    names = []
    for role in roles:
        count = settings.workers.count if role == "worker" else 1
        names += [role] if count == 1 else [f"{role}-{i + 1}" for i in range(count)]
    children: dict[str, subprocess.Popen] = {}

    def spawn(name: str) -> None:
        role = name.split("-")[0]
        children[name] = subprocess.Popen(base + [role], env=env, start_new_session=True)

    stopping = StopSignal().install()
    try:
        for name in names:
            spawn(name)
        srv = settings.server
        host = "127.0.0.1" if srv.host in ("0.0.0.0", "::") else srv.host
        ready = _wait_until_up(settings, url, host, "monitor" in roles, stopping.__bool__)
        print(_summary(settings, url, embedded, host, names, ready), flush=True)
        restarts: dict[str, float] = {}
        while not stopping.sleep(0.2):
            for name, proc in list(children.items()):
                if proc.poll() is not None and not stopping:
                    if proc.returncode == EXIT_USAGE:  # a config problem: restarting won't help
                        log.error("%s exited with code %s (see its message above); not "
                                  "restarting it", name, proc.returncode)
                        del children[name]
                        continue
                    log.warning("%s exited with code %s; restarting", name, proc.returncode)
                    if time.monotonic() - restarts.get(name, 0) < 5 and stopping.sleep(1):
                        break
                    restarts[name] = time.monotonic()
                    spawn(name)
    finally:
        _stop_children(children)
        if embedded:
            embedded.stop()
    return 0


def _wait_until_up(settings, url, host, with_monitor, stopped, timeout=20.0) -> dict:
    """Wait (bounded) for /healthz and the first GPU report; returns what the summary shows."""
    import urllib.request

    found = {"api": False, "gpus": None, "nodes": None, "queued": None, "allocations": None}
    deadline = time.monotonic() + timeout
    health = f"http://{host}:{settings.server.port}/healthz"
    while not stopped() and time.monotonic() < deadline and not found["api"]:
        try:
            with urllib.request.urlopen(health, timeout=1) as resp:
                found["api"] = resp.status == 200
        except OSError:
            time.sleep(0.2)
    try:
        from app.engine import Engine
        from app.redis_client import connect
        engine = Engine(connect(url, settings), settings)
        while not stopped():
            snap = engine.snapshot(requests=False)
            counts = engine.counts()
            found.update(gpus=len(snap.get("gpus") or []), nodes=len(snap.get("nodes") or []),
                         queued=counts["queue_depth"],
                         allocations=counts["allocations_active"])
            if found["gpus"] or not with_monitor or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except Exception as exc:  # the summary must never stop the service from running
        log.debug("could not read the fleet for the summary: %s", exc)
    return found


def _summary(settings, url, embedded, host, roles, found=None) -> str:
    found = found or {}
    where = (f"embedded, data in {embedded.data_dir}" if embedded
             else settings_mod.redact_url(url))
    base = f"http://{host}:{settings.server.port}"
    gpus = ("not reported yet" if found.get("gpus") is None
            else f"{found['gpus']} on {found['nodes']} node(s)")
    lines = [
        "gpu-orchestrator is up" if found.get("api", True) else
        "gpu-orchestrator is starting (the API has not answered yet)",
        f"  API:        {base}  (docs: {base}/docs, metrics: {base}/metrics)",
        f"  Dashboard:  {base}/rq" if settings.dashboard.enabled else "  Dashboard:  off",
        f"  Redis:      {settings_mod.redact_url(url)}  ({where})",
        f"  GPUs:       {gpus}",
    ]
    if found.get("allocations") is not None:
        lines.append(f"  State:      {found['allocations']} allocation(s), "
                     f"{found['queued']} queued request(s)")
    lines += [f"  Roles:      {', '.join(roles)}", "  Ctrl-C stops everything."]
    return "\n".join(lines)


def _stop_children(children: dict[str, subprocess.Popen], timeout: float = 15.0) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for role, proc in children.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", role, timeout)
            proc.kill()
            proc.wait()


COMMANDS = {
    "up": cmd_up, "api": cmd_api, "worker": cmd_worker, "scheduler": cmd_scheduler,
    "monitor": cmd_monitor, "redis": cmd_redis, "config": cmd_config,
}


#: Global options that take a value (to find the subcommand without parsing its options).
_VALUED_GLOBALS = ("--config", "--log-format", "--log-level")


def _run_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``run`` when the subcommand is ``run``, else None. ``run`` parses
    its own options (everything after ``--`` is COMMAND's) and needs no config or Redis."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "run":
            return argv[i + 1:]
        if arg in _VALUED_GLOBALS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    run_args = _run_args(argv)
    if run_args is not None:
        from app import run
        return run.main(run_args)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "config" and args.config_command in ("check", "example"):
            settings = settings_mod.defaults()
        else:
            settings = settings_mod.load(args.config)
        logs.setup(args.log_format or settings.logging.format,
                   args.log_level or settings.logging.level)
        return COMMANDS[args.command](args, settings) or 0
    except settings_mod.ConfigError as exc:
        print(f"gpu-orchestrator: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, EmbeddedRedisError) as exc:
        print(f"gpu-orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
