"""The ``gpu-orchestrator`` command: one entry point for every role of the service.

Configuration errors and bad arguments exit with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import yaml
from redis.exceptions import RedisError

from app import lifeline, logs
from app import settings as settings_mod
from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from app.embedded_redis import resolve as resolve_redis
from app.redis_client import ServerTooOld
from app.shutdown import StopSignal
from app.supervisor import Supervisor, SupervisorError, UpLock

log = logging.getLogger("gpu_orchestrator.cli")

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the operator must fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with the README's promise: a bad argument is one line on stderr, exit 2."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _global_options(parser: argparse.ArgumentParser) -> None:
    """Options every command accepts, before or after its name (``config show --config x``).

    They are added to the top parser and to every subcommand with ``SUPPRESS`` defaults, so a
    value given in one place is never overwritten by the other's default; :func:`main` fills
    in the ``None`` defaults afterwards.
    """
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="YAML config file (default: $CONFIG_PATH or ./config.yaml)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="log format (overrides logging.format)",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=argparse.SUPPRESS,
        help="lowest level logged (overrides logging.level)",
    )


GLOBAL_DESTS = ("config", "log_format", "log_level")
HELP_WIDTH = 79


def settings_help(*sections: str) -> str:
    """The part of a ``--help`` page that names the settings and environment variables."""
    lines = ["settings (config file, or GPU_ORCH__<SECTION>__<KEY> in the environment):"]
    for section in sections:
        keys = ", ".join(settings_mod.SPEC[section])
        lines.append(textwrap.fill(f"  {section}.*: {keys}", HELP_WIDTH, subsequent_indent="    "))
    aliases = [
        f"{var} ({'.'.join(key)})"
        for var, key in settings_mod.ENV_ALIASES.items()
        if key[0] in sections
    ]
    lines.append(
        textwrap.fill(
            "environment: "
            + ", ".join(aliases + ["CONFIG_PATH (--config)", "GPU_ORCH__<SECTION>__<KEY>"]),
            HELP_WIDTH,
            subsequent_indent="  ",
        )
    )
    return "\n".join(lines)


#: Sent with every engine call (engine.SETTINGS, with monitoring.max_service_labels): each role
#: that runs the engine (api, worker, monitor) schedules by its own copy of them.
ENGINE_SECTIONS = ("scheduler", "tenants", "preemption")


def add_command(
    sub, name: str, func, summary: str, description: str, sections: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """Register one subcommand: ``summary`` for the command list, ``description`` and the
    settings it reads for its own ``--help``."""
    parser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, HELP_WIDTH),
        epilog=settings_help(*sections) if sections else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser)
    parser.set_defaults(func=func)
    return parser


def _add_up(sub) -> None:
    up = add_command(
        sub,
        "up",
        cmd_up,
        "run the whole service in one terminal: Redis, API, worker, scheduler, monitor",
        "Run the whole service in one terminal: the embedded Redis (unless REDIS_URL or "
        "redis.url is set), the API, workers.count worker(s), the scheduler and a monitor, each "
        "in its own process. Ctrl-C stops them all in order. A role that dies is restarted, "
        "the embedded Redis too; only one 'up' runs per redis.data_dir.",
        tuple(settings_mod.SPEC),  # every role it starts reads the one config
    )
    up.add_argument("--no-monitor", action="store_true", help="do not start a local monitor")


def _add_api(sub) -> None:
    add_command(
        sub,
        "api",
        cmd_api,
        "serve the REST API with gunicorn",
        "Serve the REST API with gunicorn on server.host:server.port (env PORT). "
        "Exits with code 2 when the port is taken.",
        (
            "server",
            "redis",
            "auth",
            *ENGINE_SECTIONS,
            "webhooks",  # the webhook URL policy, the outbox dispatcher
            "workload_defaults",
            "memory_estimate",
            "services",
            "monitoring",  # metrics_enabled, max_service_labels
            "dashboard",
            "logging",
        ),
    )


def _add_worker(sub) -> None:
    worker = add_command(
        sub,
        "worker",
        cmd_worker,
        "run an RQ worker on the service's queues",
        "Run an RQ worker: webhook deliveries with retries and the periodic "
        "maintenance jobs. SIGTERM finishes the job in hand first.",
        ("workers", "webhooks", *ENGINE_SECTIONS, "monitoring", "redis", "logging"),
    )
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")


def _add_scheduler(sub) -> None:
    add_command(
        sub,
        "scheduler",
        cmd_scheduler,
        "enqueue the periodic safety-net pass and the reaper (RQ cron, one leader at a time)",
        "Enqueue the periodic safety-net schedule pass and the lease reaper (RQ cron). "
        "Any number may run; one leader at a time does the work.",
        ("scheduler", "redis", "logging"),
    )


def _add_monitor(sub) -> None:
    monitor = add_command(
        sub,
        "monitor",
        cmd_monitor,
        "report this node's GPUs to Redis",
        "Report this node's GPUs to Redis every monitoring.refresh_interval: "
        "NVML, or a simulated fleet. Exits with code 2 when --backend nvml "
        "finds no driver.",
        ("monitoring", *ENGINE_SECTIONS, "redis", "logging"),  # a report runs a pass
    )
    monitor.add_argument("--once", action="store_true", help="report once and exit")
    monitor.add_argument(
        "--backend", choices=("auto", "nvml", "simulated"), help="override monitoring.backend"
    )


def _add_redis(sub) -> None:
    add_command(
        sub,
        "redis",
        cmd_redis,
        "run only the embedded Redis in the foreground",
        "Run only the embedded Redis in the foreground (AOF in redis.data_dir), for "
        "roles started by hand. Nothing to do when REDIS_URL is set.",
        ("redis", "logging"),
    )


def _add_run(sub) -> None:
    """``run`` parses its own arguments (app/run.py); :func:`main` hands them over before
    argparse sees them, so this entry only lists it in ``--help``."""
    sub.add_parser(
        "run",
        add_help=False,
        help="run a command on GPUs from the API: allocate, wait, set "
        "CUDA_VISIBLE_DEVICES, renew, release (see `run --help`)",
    )


def _add_config(sub) -> None:
    config = add_command(
        sub,
        "config",
        cmd_config,
        "inspect configuration",
        "Inspect configuration: the effective settings, an example file, or a check of a file.",
    )
    actions = config.add_subparsers(
        dest="config_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    add_command(
        actions,
        "show",
        cmd_config,
        "print the effective config as YAML, secrets redacted",
        "Print the effective config (defaults, then the file, then the environment) "
        "as YAML, secrets redacted.",
        tuple(settings_mod.SPEC),
    )
    example = add_command(
        actions,
        "example",
        cmd_config,
        "print a config file documenting every option",
        "Print a config file documenting every option with its default.",
    )
    example.set_defaults(needs_settings=False)
    check = add_command(
        actions,
        "check",
        cmd_config,
        "validate a config file",
        "Validate a config file: exit 0 (valid; settings that work against each other "
        "are printed as warning lines on stderr), or exit 2 with one line naming the "
        "file, the key and what was expected.",
    )
    check.add_argument("file")
    check.set_defaults(needs_settings=False)


def _add_admin(sub) -> None:
    from app import admin_cli

    admin = add_command(sub, "admin", cmd_admin, admin_cli.SUMMARY, admin_cli.DESCRIPTION)
    admin.set_defaults(needs_settings=False)  # it talks to the API: no local config needed
    admin_cli.add_actions(admin, _Parser, _global_options)


#: One function per subcommand, in the order ``--help`` lists them; a new command adds its own.
SUBCOMMANDS = [
    _add_up,
    _add_api,
    _add_worker,
    _add_scheduler,
    _add_monitor,
    _add_redis,
    _add_run,
    _add_config,
    _add_admin,
]


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("gpu-orchestrator")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpu-orchestrator",
        description="Hands out GPUs to the services that need them.",
        epilog="'gpu-orchestrator COMMAND --help' names the settings and "
        "environment variables each command reads.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-orchestrator {version()}")
    _global_options(parser)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# ------------------------------------------------------------------------------ commands


def cmd_config(args, settings) -> int:
    if args.config_command == "check":
        warnings = settings_mod.warnings(settings_mod.check_file(args.file))
        for line in warnings:
            print(f"{args.file}: warning: {line}", file=sys.stderr)
        print(f"{args.file}: OK" + (f" ({len(warnings)} warning(s) on stderr)" if warnings else ""))
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
    if not embedded.owned:  # another process (up, a role started by hand) runs it
        print(
            f"embedded Redis already running at {url}, data in {embedded.data_dir}, started by "
            f"another process; nothing to do",
            flush=True,
        )
        return 0
    print(f"embedded Redis at {url}, data in {embedded.data_dir}; Ctrl-C stops it", flush=True)
    stop = StopSignal().install()
    try:
        while not stop.sleep(0.2) and embedded.proc is not None and embedded.proc.poll() is None:
            pass
    finally:
        embedded.stop()
    return 0


def require_free_port(host: str, port: int) -> None:
    """CliError (exit 2) when ``host:port`` cannot be bound; gunicorn would retry forever.

    Binds the way gunicorn does (``SO_REUSEADDR``), so a port in TIME_WAIT counts as free.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]
    except socket.gaierror as exc:
        raise CliError(
            f"server.host {host!r} cannot be resolved ({exc.strerror}); set "
            f"server.host (GPU_ORCH__SERVER__HOST)"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(
                    f"API port {port} on {host} is taken by another process; set "
                    f"server.port (env PORT) to a free port, or stop that "
                    f"process"
                ) from None
            raise CliError(
                f"cannot listen on {host}:{port} ({exc.strerror}); check "
                f"server.host and server.port (env PORT)"
            ) from None


def cmd_api(args, settings) -> int:
    from app import serve

    require_free_port(settings.server.host, settings.server.port)
    url, embedded = resolve_redis(settings)
    serve.run(settings, url, cleanup=embedded.stop if embedded else None)
    return 0


def cmd_worker(args, settings) -> int:
    from workers.worker import run

    return run(settings, burst=args.burst)


def cmd_scheduler(args, settings) -> int:
    from workers.scheduler import run

    return run(settings)


def cmd_admin(args, settings) -> int:
    from app import admin_cli

    return admin_cli.run(args, settings)


def cmd_monitor(args, settings) -> int:
    from workers.monitor import run

    return run(settings, once=args.once, backend=args.backend)


#: Roles that ``up`` runs as child processes, in start order.
UP_ROLES = ("api", "worker", "scheduler", "monitor")


def cmd_up(args, settings) -> int:
    """Embedded Redis plus every role as a child process; Ctrl-C stops them all in order.

    Children run in their own sessions, so a Ctrl-C reaches only this supervisor, which then
    sends each child exactly one SIGTERM (an RQ worker finishes its current job on the first
    signal; a second one would kill it mid-job). What keeps them running, and what stops
    them when this process dies, is in ``app/supervisor.py``.
    """
    lock = None
    if not settings.redis.url:
        lock = UpLock(Path(settings.redis.data_dir).resolve())
        lock.acquire()
    try:
        if lock is not None:
            lock.stop_leftovers()
        return _run_up(args, settings, lock)
    finally:
        if lock is not None:
            lock.release()


def _run_up(args, settings, lock) -> int:
    srv = settings.server
    require_free_port(srv.host, srv.port)
    if settings.redis.url:
        url, embedded = settings.redis.url, None
    else:
        embedded = EmbeddedRedis(
            settings.redis.data_dir,
            settings.redis.embedded_host,
            settings.redis.embedded_port,
            preexec_fn=lifeline.die_with_parent(),
            appendfsync=settings.redis.embedded_appendfsync,
        )
        url = embedded.start()
    roles = [r for r in UP_ROLES if not (r == "monitor" and args.no_monitor)]
    base = [sys.executable, "-m", "app.cli"]
    for flag, value in (
        ("--config", args.config),
        ("--log-format", args.log_format),
        ("--log-level", args.log_level),
    ):
        if value:
            base += [flag, value]
    commands = {}
    for role in roles:
        count = settings.workers.count if role == "worker" else 1
        for i in range(count):
            commands[role if count == 1 else f"{role}-{i + 1}"] = base + [role]
    sup = Supervisor(commands, dict(os.environ, REDIS_URL=url), embedded, lock)
    stopping = StopSignal().install()
    try:
        sup.start()
        host = "127.0.0.1" if srv.host in ("0.0.0.0", "::") else srv.host
        ready = _wait_until_up(
            settings, url, host, "monitor" in roles, lambda: bool(stopping) or sup.failed_early()
        )
        if sup.failed_early():
            sup.check(stopping)  # raises with the reason
        print(_summary(settings, url, embedded, host, list(commands), ready), flush=True)
        while not stopping.sleep(0.2):
            sup.check(stopping)
    finally:
        sup.stop()
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
            found.update(
                gpus=sum(1 for g in snap.get("gpus") or [] if g.get("node_alive")),
                nodes=sum(1 for n in snap.get("nodes") or [] if n.get("alive")),
                queued=counts["queue_depth"],
                allocations=counts["allocations_active"],
            )
            if found["gpus"] or not with_monitor or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except Exception as exc:  # the summary must never stop the service from running
        log.debug("could not read the fleet for the summary: %s", exc)
    return found


def _summary(settings, url, embedded, host, roles, found=None) -> str:
    found = found or {}
    where = f"embedded, data in {embedded.data_dir}" if embedded else settings_mod.redact_url(url)
    foreign = embedded is not None and not embedded.owned  # e.g. `gpu-orchestrator redis`
    if foreign:
        where += "; run by another process: up neither restarts nor stops it"
    base = f"http://{host}:{settings.server.port}"
    gpus = (
        "not reported yet"
        if found.get("gpus") is None
        else f"{found['gpus']} on {found['nodes']} node(s)"
    )
    lines = [
        "gpu-orchestrator is up"
        if found.get("api", True)
        else "gpu-orchestrator is starting (the API has not answered yet)",
        f"  Console:    {base}/  (the fleet, the queue, admin actions)",
        f"  API:        {base}  (docs: {base}/docs, metrics: {base}/metrics)",
        f"  Dashboard:  {base}/rq" if settings.dashboard.enabled else "  Dashboard:  off",
        f"  Redis:      {settings_mod.redact_url(url)}  ({where})",
        f"  GPUs:       {gpus}",
    ]
    if found.get("allocations") is not None:
        lines.append(
            f"  State:      {found['allocations']} allocation(s), "
            f"{found['queued']} queued request(s)"
        )
    stops = "every role (not that Redis)" if foreign else "everything"
    lines += [f"  Roles:      {', '.join(roles)}", f"  Ctrl-C stops {stops}."]
    return "\n".join(lines)


#: Global options that take a value (to find the subcommand without parsing its options).
_VALUED_GLOBALS = ("--config", "--log-format", "--log-level")


def _run_args(argv: list[str]) -> list[str] | None:
    """The arguments for ``run`` when the subcommand is ``run`` (global options given before
    it first), else None. ``run`` parses its own options (everything after ``--`` is COMMAND's)
    and needs no config or Redis."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "run":
            return argv[:i] + argv[i + 1 :]
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
    args = _parser().parse_args(argv)
    for dest in GLOBAL_DESTS:
        setattr(args, dest, getattr(args, dest, None))
    lifeline.watch_parent()
    try:
        if getattr(args, "needs_settings", True):
            settings = settings_mod.load(args.config)
        else:
            settings = settings_mod.defaults()
        logs.setup(
            args.log_format or settings.logging.format, args.log_level or settings.logging.level
        )
        if getattr(args, "needs_settings", True):
            for line in settings_mod.warnings(settings):
                logging.getLogger("gpu_orchestrator.settings").warning("config: %s", line)
        return args.func(args, settings) or 0
    except settings_mod.ConfigError as exc:
        print(f"gpu-orchestrator: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, EmbeddedRedisError, ServerTooOld) as exc:
        print(f"gpu-orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SupervisorError as exc:
        print(f"gpu-orchestrator: error: {exc}", file=sys.stderr)
        return exc.code
    except RedisError as exc:  # unreachable at start (worker, monitor --once): not a usage error
        print(f"gpu-orchestrator: error: Redis: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
