"""``gpu-orchestrator run [...] -- COMMAND``: hold GPUs for exactly as long as a command runs.

Built on :mod:`app.client`: one allocate (with an Idempotency-Key), long-polls while queued
(a line on stderr each time the position, reason or ETA changes), COMMAND with
``CUDA_VISIBLE_DEVICES``, ``GPU_ORCH_ALLOCATION_ID``, ``GPU_ORCH_NODE`` and
``GPU_ORCH_GPU_UUIDS`` set, the lease renewed every third of its length, and a release
when COMMAND exits, whatever happens.

Exit codes: COMMAND's own (128+N when a signal N ended it); 2 for a usage error or a request
the API refuses as invalid (400/404/422: one line on stderr); 75 when ``--wait`` ran out (the
request is cancelled), the request ended without GPUs (timed out in the queue, cancelled by
someone) or the queue is full / the API is down (429/503); 69 when the API cannot
be reached; 77 when the API key is refused (401/403); 128+N after signal N (SIGINT, SIGTERM,
SIGHUP, SIGQUIT: 130, 143, 129, 131) while queued (the request is cancelled); 126/127 when
COMMAND cannot be run.

Signals while COMMAND runs: SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to COMMAND,
and ``run`` releases after COMMAND exits (one arriving during that release is dropped: the exit
code stays COMMAND's). A Ctrl-C typed at the terminal already reaches COMMAND (it shares the
terminal's process group), so that one is not sent a second time: the main thread takes
signals with ``sigtimedwait`` and looks at who sent them (``si_code``). A SIGHUP ignored when
``run`` started (``nohup``) stays ignored by run and by COMMAND. SIGINT and SIGQUIT are handled
even when ignored at start (a non-interactive shell ignores them for a job started with ``&``),
so ``kill -INT`` still cancels or reaches COMMAND, as it always did.

Concurrency: the lease threads (:class:`app.client.LeaseKeeper`) call back from their own
threads when the allocation turns ``preempting`` (SIGTERM to COMMAND at once, so it can
checkpoint before ``preempt_at``) or ends under it (expired, lost while the API was
unreachable, released by an admin: SIGTERM too, the GPUs are no longer ours). Signals are
blocked in every thread while COMMAND runs, so only the main thread's ``sigtimedwait`` sees
them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from datetime import datetime
from typing import Any

from app import client as api
from app.request_rules import FIELDS, SERVICE_NAME_MAX
from app.timefmt import parse_duration

PROG = "gpu-orchestrator run"
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: the API cannot be reached
EXIT_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: --wait ran out, queue full, API down
EXIT_NOPERM = 77  # sysexits EX_NOPERM: the key was refused
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127
#: Signals forwarded to COMMAND while it runs.
FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: ``si_code`` of a signal the kernel sent itself (a terminal's Ctrl-C, Ctrl-\\).
SI_KERNEL = 0x80
#: Statuses after which COMMAND no longer holds its GPUs.
_GONE = ("expired", "released", "lost", "preempted", "ended", "cancelled", "timed_out")

log = logging.getLogger("gpu_orchestrator.client")


class UsageError(Exception):
    """A bad command line; one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while queued."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run COMMAND on GPUs from gpu-orchestrator: allocate "
        "(waiting in the queue if needed), set CUDA_VISIBLE_DEVICES, keep the lease "
        "while it runs, release when it exits. The API key comes from "
        f"${api.API_KEY_ENV} only (never a flag, so it stays out of ps).",
        usage=f"{PROG} [options] -- COMMAND [ARGS...]",
    )
    p.add_argument("--url", help=f"API base URL (default: ${api.URL_ENV}, else {api.DEFAULT_URL})")
    p.add_argument("--service", metavar="NAME", help="service name (default: COMMAND's name)")
    p.add_argument(
        "--type",
        metavar="TYPE",
        default="generic",
        dest="workload_type",
        help="workload type (training, inference, ...; default generic)",
    )
    p.add_argument("--gpus", metavar="N", type=_positive_int, help="GPUs, all on one node")
    p.add_argument(
        "--memory", metavar="MB", type=_nonneg_int, help="memory each GPU must have free, MB"
    )
    p.add_argument("--gpu-model", metavar="GLOB", help='GPU name glob, e.g. "*H100*"')
    p.add_argument(
        "--node",
        metavar="NAME",
        action="extend",
        nargs="+",
        dest="nodes",
        help="node(s) the allocation may use (repeat or list several)",
    )
    prio = FIELDS["priority"]
    p.add_argument(
        "--priority", metavar="P", type=_priority, help=f"{prio.lo}-{prio.hi}, higher first"
    )
    p.add_argument(
        "--ttl",
        metavar="DURATION",
        type=_duration,
        help="lease length, e.g. 10m (renewed every third of it while COMMAND runs)",
    )
    p.add_argument(
        "--data",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        type=_pair,
        help="workload_data entries (VALUE as JSON when it parses)",
    )
    p.add_argument(
        "--wait",
        metavar="DURATION",
        type=_duration,
        help="longest time to wait in the queue (default: no limit); then the "
        f"request is cancelled and run exits {EXIT_TEMPFAIL}",
    )
    p.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="WARNING",
        help="what run itself says on stderr (default WARNING)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="accepted like every command's; run reads no config file (it only talks to the API)",
    )
    p.add_argument("--log-format", choices=("text", "json"), help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _priority(text: str) -> int:
    value, rule = _int(text), FIELDS["priority"]
    if not rule.accepts(value):
        raise argparse.ArgumentTypeError(f"must be {rule.lo:g}-{rule.hi:g}, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a duration (e.g. 30s, 10m, 2h): {text!r}")
    return value


def _pair(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def service_name(command: list[str]) -> str:
    """COMMAND's name as a service name (``/usr/bin/python3`` -> ``python3``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(command[0]))[:SERVICE_NAME_MAX].strip(
        "-"
    )
    return name or "run"


# --------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            raise UsageError("missing COMMAND (gpu-orchestrator run [options] -- COMMAND)")
        client = api.Client(args.url)
    except (UsageError, ValueError) as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    _log_to_stderr(args.log_level)
    return Run(client, args, command).run()


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def _log_to_stderr(level: str = "WARNING") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def _exit_code_for(exc: api.ClientError) -> int:
    if isinstance(exc, api.ConnectionFailed):
        return EXIT_UNAVAILABLE
    if isinstance(exc, (api.Unauthorized, api.Forbidden)):
        return EXIT_NOPERM
    if isinstance(exc, (api.TooManyRequests, api.ServerError)):
        return EXIT_TEMPFAIL
    return EXIT_USAGE


class Run:
    """One ``run``: queued, then COMMAND running, then released."""

    def __init__(self, client: api.Client, args: argparse.Namespace, command: list[str]):
        self.client = client
        self.args = args
        self.command = command
        self.key = f"run-{uuid.uuid4().hex}"
        self.request_id: str | None = None
        self.child: subprocess.Popen | None = None
        self._last_line = ""
        #: FORWARD less a SIGHUP ignored when run started (``nohup``): it stays ignored, by run
        #: and by COMMAND (which inherits SIG_IGN), as without run
        nohup = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        self.signals = tuple(s for s in FORWARD if not (nohup and s == signal.SIGHUP))

    def _allocate(self) -> api.Allocation:
        a = self.args
        return self.client.allocate(
            a.service or service_name(self.command),
            a.workload_type,
            dict(a.data),
            required_gpus=a.gpus,
            min_memory_mb=a.memory,
            gpu_model=a.gpu_model,
            nodes=a.nodes,
            priority=a.priority,
            ttl=a.ttl,
            idempotency_key=self.key,
        )

    def run(self) -> int:
        # The wait's handlers stay until COMMAND's replace them, with no default handler in
        # between (a SIGTERM there killed run holding the GPUs until their lease ran out); the
        # original handlers come back at the end.
        original = {s: signal.signal(s, self._interrupt) for s in self.signals}
        try:
            return self._run()
        finally:
            self._restore(original)

    def _run(self) -> int:
        try:
            alloc = self._allocate()
            self.request_id = alloc.id
            if alloc.status == "queued":
                self._progress(alloc)
                alloc = self.client.wait(alloc.id, self.args.wait, on_update=self._progress)
                print(
                    f"allocated: {alloc.id} on {alloc.node}, GPUs {alloc.cuda_visible_devices}",
                    file=sys.stderr,
                    flush=True,
                )
        except Interrupted as exc:
            self._quietly_withdraw()
            return 128 + exc.signum
        except api.WaitTimeout:
            self._quietly_withdraw()
            return _fail(
                f"still queued after {self.args.wait:g}s; request {self.request_id} cancelled",
                EXIT_TEMPFAIL,
            )
        except api.NotGranted as exc:
            return _fail(
                f"request {exc.allocation.id} ended without GPUs: {exc.allocation.status}",
                EXIT_TEMPFAIL,
            )
        except api.ClientError as exc:
            if self.request_id:
                self._quietly_withdraw()
            return _fail(f"error: {exc}", _exit_code_for(exc))
        try:
            return self._run_command(alloc)
        except Interrupted as exc:  # granted, but COMMAND had not started yet
            self._release(alloc)
            return 128 + exc.signum

    def _interrupt(self, signum, frame):
        # queued: leave the wait; signals arriving during the clean-up are ignored
        self._ignore_signals()
        raise Interrupted(signum)

    def _ignore_signals(self) -> None:
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)

    def _quietly_withdraw(self) -> None:
        """Cancel the request (release it if the grant won the race). Interrupted before the
        allocate answered: the same Idempotency-Key finds the request, if it was made. run is
        leaving: a signal from here on is ignored, as after an interrupt, so that none raises
        out of the cancel (after --wait ran out, or an API error) and leaves the request
        queued."""
        self._ignore_signals()
        try:
            rid = self.request_id or self._allocate().id
            self.client.withdraw(rid)
        except api.ClientError as exc:
            log.warning("could not cancel the request (%s); it times out in the queue", exc)

    def _progress(self, alloc: api.Allocation) -> None:
        if alloc.status != "queued":
            return
        parts = [f"position {alloc.position}" if alloc.position else "waiting"]
        reason = alloc.data.get("reason")
        if reason:
            parts.append(f"reason {reason}")
        eta = alloc.data.get("eta")
        if eta:
            parts.append(f"eta {_clock(eta)}")
        line = "queued: " + ", ".join(parts)
        if line != self._last_line:
            self._last_line = line
            print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ COMMAND
    def _run_command(self, alloc: api.Allocation) -> int:
        env = dict(
            os.environ,
            CUDA_VISIBLE_DEVICES=alloc.cuda_visible_devices,
            GPU_ORCH_ALLOCATION_ID=alloc.id,
            GPU_ORCH_NODE=alloc.node or "",
            GPU_ORCH_GPU_UUIDS=",".join(alloc.gpu_uuids),
        )
        mask = set(self.signals) | {signal.SIGCHLD}
        early: list[int] = []  # signals between the start of COMMAND and blocking them
        for s in self.signals:
            signal.signal(s, lambda signum, frame: early.append(signum))
        try:
            self.child = subprocess.Popen(self.command, env=env)
        except OSError as exc:
            self._ignore_signals()  # nothing to forward them to; run() restores the handlers
            self._release(alloc)
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXEC
            return _fail(f"cannot run {self.command[0]!r}: {exc.strerror or exc}", code)
        # from here signals wait for sigtimedwait in this thread; the lease threads, started
        # below, inherit the blocked mask
        signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        for signum in early:
            _signal(self.child, signum)
        keeper = api.LeaseKeeper(self.client, alloc, on_change=self._changed).start()
        try:
            while True:
                code = self.child.poll()
                if code is not None:
                    break
                info = signal.sigtimedwait(list(mask), 0.5)
                if info is None or info.si_signo == signal.SIGCHLD:
                    continue
                if info.si_code == SI_KERNEL and os.isatty(0):
                    continue  # typed at the terminal: COMMAND got it from there too
                _signal(self.child, info.si_signo)
        finally:
            keeper.stop()
            self._release(alloc)
            # COMMAND is gone: a signal that came during the release is dropped here (SIG_IGN
            # discards it) instead of reaching a handler once unblocked; run() restores them
            self._ignore_signals()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)
        return 128 - code if code < 0 else code

    @staticmethod
    def _restore(handlers: dict) -> None:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    def _changed(self, alloc: api.Allocation) -> None:
        """From a lease thread: the allocation changed state under COMMAND."""
        status = alloc.status
        if status == "preempting":
            when = alloc.data.get("preempt_at")
            log.warning(
                "allocation %s is being preempted%s: sending SIGTERM to COMMAND",
                alloc.id,
                f" (GPUs taken back at {_clock(when)})" if when else "",
            )
        elif status in _GONE:
            log.warning(
                "allocation %s is %s: its GPUs are no longer held; sending SIGTERM to COMMAND",
                alloc.id,
                status,
            )
        else:
            return
        if self.child is not None:
            _signal(self.child, signal.SIGTERM)

    def _release(self, alloc: api.Allocation) -> None:
        try:
            self.client.release(alloc.id)
        except api.NotFound:
            pass  # already ended (expired, released by an admin)
        except api.ClientError as exc:
            log.warning(
                "could not release %s (%s); its lease runs out at %s",
                alloc.id,
                exc,
                alloc.data.get("expires_at"),
            )


def _signal(child: subprocess.Popen, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass


def _clock(value: Any) -> str:
    """An RFC 3339 time as the local wall clock (``14:02:10``); anything else as it is."""
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return dt.astimezone().strftime("%H:%M:%S")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
