"""The supervisor behind `up`: restarts that end, one `up` per data directory, leftovers stopped.

Real child processes (tiny Python programs); the end-to-end behaviour with the real roles is in
tests/test_up.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_support import wait_until

from app import lifeline, supervisor
from app.supervisor import Supervisor, SupervisorError, UpLock, started_at

CRASH = [sys.executable, "-c", "raise SystemExit(1)"]
USAGE = [sys.executable, "-c", "raise SystemExit(2)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


class Stopping:
    def __bool__(self):
        return False


def _run_until_error(sup: Supervisor, timeout: float = 30) -> SupervisorError:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sup.check(Stopping())
        except SupervisorError as exc:
            return exc
        time.sleep(0.02)
    raise AssertionError("the supervisor kept going")


@pytest.fixture
def fast_restarts(monkeypatch):
    monkeypatch.setattr(supervisor, "MAX_RESTART_DELAY", 0.05)


def test_a_role_that_keeps_failing_at_start_ends_up_instead_of_looping(fast_restarts):
    sup = Supervisor({"worker": CRASH}, dict(os.environ))
    spawned = []
    real_spawn = sup.spawn
    sup.spawn = lambda child: (spawned.append(child.name), real_spawn(child))
    sup.start()
    try:
        exc = _run_until_error(sup)
    finally:
        sup.stop()
    assert exc.code == 1
    assert "worker exited 5 times in a row" in str(exc) and "\n" not in str(exc)
    assert len(spawned) == supervisor.MAX_QUICK_FAILURES


def test_restart_delays_grow():
    sup = Supervisor({"worker": CRASH}, dict(os.environ))
    child = sup.children["worker"]
    delays = []
    for _ in range(4):
        child.started = now = time.monotonic()
        sup._exited(child, 1, now)
        delays.append(child.restart_at - now)
    assert delays == [1.0, 2.0, 4.0, 8.0]


def test_api_exit_2_ends_up_with_2_and_another_role_exit_2_is_not_restarted():
    sup = Supervisor({"monitor": USAGE, "scheduler": SLEEP}, dict(os.environ))
    sup.start()
    try:
        wait_until(lambda: sup.children["monitor"].proc.poll() is not None, timeout=30)
        sup.check(Stopping())
        assert sup.children["monitor"].given_up
        first = sup.children["monitor"].proc
        sup.check(Stopping())
        assert sup.children["monitor"].proc is first  # not started again
        assert sup.children["scheduler"].proc.poll() is None
    finally:
        sup.stop()

    api = Supervisor({"api": USAGE}, dict(os.environ))
    api.start()
    try:
        wait_until(api.failed_early, timeout=30)
        with pytest.raises(SupervisorError) as exc:
            api.check(Stopping())
        assert exc.value.code == 2
    finally:
        api.stop()


def test_second_lock_on_one_data_directory_is_refused_with_the_holder(tmp_path):
    first = UpLock(tmp_path)
    first.acquire()
    try:
        code = (
            "import sys; from app.supervisor import UpLock, SupervisorError\n"
            "try:\n    UpLock(sys.argv[1]).acquire()\n"
            "except SupervisorError as e:\n    print(e); sys.exit(2)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2
        assert f"(pid {os.getpid()})" in out.stdout and str(tmp_path) in out.stdout
    finally:
        first.release()
    again = UpLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_an_unusable_data_directory_is_one_line_naming_the_setting(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SupervisorError) as exc:
        UpLock(blocker / "data").acquire()
    assert exc.value.code == 2 and "redis.data_dir" in str(exc.value)
    assert str(blocker / "data") in str(exc.value)


def test_leftovers_of_an_earlier_up_are_stopped_and_reused_pids_are_not(tmp_path):
    earlier = UpLock(tmp_path)
    earlier.acquire()
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)",
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    polite = subprocess.Popen(SLEEP, start_new_session=True)
    stubborn.stdout.readline()
    polite.send_signal(signal.SIGSTOP)  # a stopped process must still be stopped
    earlier.record({"worker": stubborn.pid, "monitor": polite.pid, "api": os.getpid()})
    state = earlier.state_path.read_text()
    # The record names this test process as "api", but with another start time: a pid that
    # was reused by an unrelated process is never signalled.
    earlier.state_path.write_text(state.replace(f'"{started_at(os.getpid())}"', '"1"'))
    earlier._fd and os.close(earlier._fd)  # the earlier `up` dies without cleaning up
    earlier._fd = None
    try:
        later = UpLock(tmp_path)
        later.acquire()
        stopped = later.stop_leftovers(grace=1.0)
        later.release()
        assert sorted(stopped) == sorted(
            [f"worker (pid {stubborn.pid})", f"monitor (pid {polite.pid})"]
        )
        assert stubborn.wait(10) == -signal.SIGKILL
        assert polite.wait(10) == -signal.SIGTERM
    finally:
        for proc in (stubborn, polite):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stubborn.stdout.close()


def test_what_a_dead_child_left_in_its_process_group_is_stopped_too(tmp_path):
    """The API's gunicorn workers outlive a SIGKILLed master and keep the API port: the next
    'up' said 'API port ... is taken by another process' (exit 2) until they noticed. Here the
    recorded child is dead and only a process of its group is left."""
    earlier = UpLock(tmp_path)
    earlier.acquire()
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.Popen(sys.argv[1:]); input()"]
        + SLEEP,
        start_new_session=True,
        stdin=subprocess.PIPE,
    )
    wait_until(lambda: _group_members(leader.pid) == 2, message="the leader's child")
    earlier.record({"api": leader.pid})
    earlier._fd and os.close(earlier._fd)  # the earlier `up` dies without cleaning up
    earlier._fd = None
    leader.kill()  # the master: SIGKILLed with the earlier `up`
    leader.wait()
    leader.stdin.close()
    [worker] = _group_pids(leader.pid)
    try:
        later = UpLock(tmp_path)
        later.acquire()
        stopped = later.stop_leftovers(grace=0.5)
        later.release()
        assert stopped == [f"api (pid {leader.pid})"]
        assert _group_pids(leader.pid) == []
    finally:
        if _group_pids(leader.pid):
            os.kill(worker, signal.SIGKILL)


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _group_members(pgid: int) -> int:
    return len(_group_pids(pgid))


@pytest.mark.skipif(not lifeline.has_parent_death_signal(), reason="Linux only")
def test_a_child_started_with_die_with_parent_gets_sigterm_when_its_parent_is_killed(tmp_path):
    code = (
        "import subprocess, sys, time\n"
        "from app import lifeline\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                     preexec_fn=lifeline.die_with_parent(), start_new_session=True)\n"
        "print(c.pid, flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        wait_until(lambda: started_at(child) is None, timeout=20, message="the child to die")
    finally:
        parent.stdout.close()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_without_prctl_a_role_stops_itself_when_its_supervisor_is_gone():
    """The fallback for platforms without a parent-death signal (forced here on Linux)."""
    role = (
        "import time\nfrom app import lifeline\nlifeline._prctl = None\n"
        "assert lifeline.watch_parent(interval=0.1) is not None\n"
        "print('watching', flush=True); time.sleep(120)\n"
    )
    code = (
        "import os, subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True,\n"
        "    env=dict(os.environ, GPU_ORCH_SUPERVISOR_PID=str(os.getpid())),\n"
        "    stdout=subprocess.PIPE, text=True)\n"
        "c.stdout.readline(); print(c.pid, flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, role], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert started_at(child) is not None
        parent.kill()
        parent.wait()
        wait_until(lambda: started_at(child) is None, timeout=20, message="the role to stop")
    finally:
        parent.stdout.close()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
