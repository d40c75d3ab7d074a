"""The supervisor behind ``gpu-orchestrator up``: one per data directory, and it cleans up.

What it guarantees, and how:

- **One ``up`` per data directory.** It holds an exclusive ``flock`` on ``<data_dir>/up.lock``
  for its whole life (the kernel drops it when the process dies, however it dies). A second
  ``up`` on the same directory is refused with one line naming the running one.
- **No leftovers.** It records each child (pid and start time, so a reused pid is never taken
  for ours) in ``<data_dir>/up.json``. A new ``up`` that gets the lock reads that file and stops
  whatever of an earlier ``up`` still runs (SIGTERM, then SIGKILL after a grace period) before
  it starts anything. Children normally die with their supervisor anyway (``app.lifeline``);
  this catches the rest: a child that was stopped or hung, or a platform without a
  parent-death signal.
- **Restarts that end.** A role that exits is restarted with a growing delay (1, 2, 4 … 30 s).
  An exit with code 2 is a problem a restart cannot fix (config, a taken port): the API's ends
  ``up`` with code 2; another role's is reported and that role stays stopped. A role that
  fails ``MAX_QUICK_FAILURES`` times in a row, each within ``STABLE_AFTER`` seconds of its
  start, ends ``up`` with code 1 instead of restarting forever.
- **Redis comes back.** When the embedded Redis dies, it is started again on the same data
  directory (it replays its AOF), with one warning line. Roles keep their processes and
  reconnect on their own (their clients retry). The binary is whatever ``EmbeddedRedis`` runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from app import lifeline
from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError

log = logging.getLogger("gpu_orchestrator.up")

EXIT_USAGE = 2
#: A child that lived at least this long before exiting is not crash-looping.
STABLE_AFTER = 10.0
#: Quick exits in a row after which a role (or Redis) is given up on.
MAX_QUICK_FAILURES = 5
#: Longest wait between two restarts of one role.
MAX_RESTART_DELAY = 30.0
#: How long children get to stop on SIGTERM before SIGKILL.
STOP_GRACE = 15.0


class SupervisorError(Exception):
    """``up`` cannot (or can no longer) run; ``str()`` is one line, ``code`` the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------ processes


def started_at(pid: int) -> str | None:
    """An identity for a running process (its start time), None when it is gone.

    Two processes with the same pid and the same start time are the same process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except OSError:
        return None
    else:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    try:  # no /proc (macOS, BSD)
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _group_left(pgid: int) -> bool:
    """True while a process group lives on after its leader died: the API's gunicorn workers
    outlive a SIGKILLed master (for a second, or for as long as a request in hand takes) and
    keep its listening socket. Call only when no process has the pid ``pgid`` (then the group
    can only be the remnant of the child that led it: the kernel reuses no live group's id).
    Zombies do not count (a killed child of ours stays one until we reap it).
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():  # no /proc (macOS, BSD): zombies count there
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False


def _still_there(pid: int, since: str | None) -> bool:
    """A recorded child (or what is left of its process group) is still running."""
    now = started_at(pid)
    return now == since if now is not None else _group_left(pid)


def _signal_group(pid: int, sig: int) -> None:
    """Signal a child's whole process group (each child leads its own session)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


# ------------------------------------------------------------------------ the lock


class UpLock:
    """``<data_dir>/up.lock`` held for the supervisor's life, plus the record of its children."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.lock_path = self.data_dir / "up.lock"
        self.state_path = self.data_dir / "up.json"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SupervisorError naming the ``up`` that holds it."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SupervisorError(
                f"cannot use data directory {self.data_dir} ({exc.strerror}); set "
                f"redis.data_dir (GPU_ORCH__REDIS__DATA_DIR) to a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SupervisorError(
                f"another 'gpu-orchestrator up' (pid {holder}) is running on data directory "
                f"{self.data_dir}; stop it first (Ctrl-C), or give this one its own "
                f"redis.data_dir (GPU_ORCH__REDIS__DATA_DIR)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.state_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def record(self, processes: dict[str, int]) -> None:
        """Write ``{name: pid}`` (with start times) where the next ``up`` will look."""
        state = {
            "supervisor": os.getpid(),
            "processes": {name: [pid, started_at(pid)] for name, pid in processes.items()},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def stop_leftovers(self, grace: float = STOP_GRACE) -> list[str]:
        """Stop what an earlier ``up`` on this directory left running; returns what it stopped.

        Call with the lock held: then no supervisor owns these processes any more.
        """
        try:
            state = json.loads(self.state_path.read_text())
            recorded = state["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        alive = {
            name: pid
            for name, (pid, since) in recorded.items()
            if since is not None and _still_there(pid, since)
        }
        if not alive:
            return []

        def running() -> list[str]:
            return [name for name, pid in alive.items() if _still_there(pid, recorded[name][1])]

        def wait(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and running():
                time.sleep(0.1)

        # With a parent-death signal they already have their SIGTERM (a second one makes an RQ
        # worker drop the job in hand); a stopped process only needs to run to act on it.
        first = (
            (signal.SIGCONT,)
            if lifeline.has_parent_death_signal()
            else (signal.SIGTERM, signal.SIGCONT)
        )
        for sig in first:
            for pid in alive.values():
                _signal_group(pid, sig)
        wait(grace)
        for sig in (signal.SIGTERM, signal.SIGCONT):
            for name in running():
                _signal_group(alive[name], sig)
        wait(5)
        for name in running():
            _signal_group(alive[name], signal.SIGKILL)
        wait(5)
        stuck = [
            f"{name} (pid {pid})"
            for name, pid in alive.items()
            if _still_there(pid, recorded[name][1])
        ]
        if stuck:
            raise SupervisorError(
                f"processes left by an earlier 'gpu-orchestrator up' on {self.data_dir} cannot "
                f"be stopped: {', '.join(stuck)}; stop them and start again"
            )
        stopped = [f"{name} (pid {pid})" for name, pid in alive.items()]
        log.warning(
            "stopped %d process(es) left running by an earlier 'up' (pid %s) on %s: %s",
            len(stopped),
            state.get("supervisor", "?"),
            self.data_dir,
            ", ".join(stopped),
        )
        self.state_path.unlink(missing_ok=True)
        return stopped


# ------------------------------------------------------------------------ children


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False

    @property
    def role(self) -> str:
        return self.name.split("-")[0]


class Supervisor:
    """Runs the children of ``up`` and the embedded Redis, and keeps them running."""

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str],
        embedded: EmbeddedRedis | None = None,
        lock: UpLock | None = None,
    ):
        self.children = {name: Child(name, args) for name, args in commands.items()}
        self.env = dict(env, **{lifeline.SUPERVISOR_ENV: str(os.getpid())})
        self.embedded = embedded
        self.lock = lock
        self.redis_failures = 0
        self.redis_started = time.monotonic()

    def _record(self) -> None:
        if self.lock is None:
            return
        pids = {
            c.name: c.proc.pid
            for c in self.children.values()
            if c.proc is not None and c.proc.poll() is None
        }
        if self.embedded is not None and self.embedded.proc is not None:
            pids["redis"] = self.embedded.proc.pid
        self.lock.record(pids)

    def spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            child.args, env=self.env, start_new_session=True, preexec_fn=lifeline.die_with_parent()
        )
        child.started = time.monotonic()
        child.restart_at = None
        self._record()

    def start(self) -> None:
        self._record()  # Redis first: it is already running
        for child in self.children.values():
            self.spawn(child)

    def failed_early(self) -> bool:
        """True when the API exited with code 2 (while ``up`` still waits for it to answer)."""
        return any(
            c.role == "api" and c.proc is not None and c.proc.poll() == EXIT_USAGE
            for c in self.children.values()
        )

    def check(self, stopping) -> None:
        """One supervision pass; raises SupervisorError when ``up`` must end."""
        self._check_redis(stopping)
        now = time.monotonic()
        for child in self.children.values():
            if stopping:
                return
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.spawn(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            self._exited(child, code, now)

    def _exited(self, child: Child, code: int, now: float) -> None:
        if code == EXIT_USAGE:  # config, a taken port: restarting cannot help
            if child.role == "api":
                raise SupervisorError(f"{child.name} cannot start (see its message above)")
            log.error(
                "%s exited with code 2 (see its message above); not restarting it", child.name
            )
            child.given_up = True
            self._record()
            return
        lived = now - child.started
        child.quick_failures = child.quick_failures + 1 if lived < STABLE_AFTER else 1
        if child.quick_failures >= MAX_QUICK_FAILURES:
            raise SupervisorError(
                f"{child.name} exited {child.quick_failures} times in a row within "
                f"{STABLE_AFTER:.0f} s of starting (last exit code {code}); not restarting it "
                f"again: see its messages above",
                code=1,
            )
        delay = min(2.0 ** (child.quick_failures - 1), MAX_RESTART_DELAY)
        log.warning("%s exited with code %s; restarting it in %.0f s", child.name, code, delay)
        child.restart_at = now + delay

    def _check_redis(self, stopping) -> None:
        embedded = self.embedded
        if embedded is None or embedded.proc is None or stopping:
            return
        code = embedded.proc.poll()
        if code is None:
            return
        lived = time.monotonic() - self.redis_started
        self.redis_failures = self.redis_failures + 1 if lived < STABLE_AFTER else 1
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if self.redis_failures >= MAX_QUICK_FAILURES:
            raise SupervisorError(
                f"embedded Redis died {self.redis_failures} times in a row within "
                f"{STABLE_AFTER:.0f} s of starting ({how}); see {embedded.data_dir}/redis.log",
                code=1,
            )
        log.warning(
            "embedded Redis (pid %d) died (%s); restarting it on %s (replaying its "
            "AOF); roles reconnect when it answers",
            embedded.proc.pid,
            how,
            embedded.data_dir,
        )
        try:
            embedded.restart(timeout=120)
        except EmbeddedRedisError as exc:
            raise SupervisorError(f"embedded Redis cannot be restarted: {exc}") from None
        self.redis_started = time.monotonic()
        self._record()

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """One SIGTERM to each running child, then wait; SIGKILL what is left."""
        running = [c for c in self.children.values() if c.proc is not None]
        for child in running:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in running:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
