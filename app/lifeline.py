"""Children of ``gpu-orchestrator up`` die with it, even when it is SIGKILLed.

``up`` runs every role (and the embedded Redis) in its own session, so a Ctrl-C reaches only the
supervisor, which stops them in order. The price: when the supervisor itself is killed
(SIGKILL, OOM killer), nothing stops them, and they keep running under PID 1.

On Linux each child asks the kernel for a parent-death signal (``prctl(PR_SET_PDEATHSIG,
SIGTERM)``, called through ctypes between fork and exec; it survives the exec) and checks
that its parent is still the supervisor (it may have died during the fork). SIGTERM is the
orderly stop: Redis fsyncs its AOF, a worker finishes its job.

Elsewhere (no ``prctl``), a Python role started by ``up`` runs :func:`watch_parent`: a daemon
thread that sends the process SIGTERM once its parent is gone. The embedded Redis has no such
thread there; the next ``up`` finds and stops it (see ``app/supervisor.py``).

Race to know about: ``PR_SET_PDEATHSIG`` fires when the parent *thread* that forked the child
exits, not the parent process. ``up`` forks every child from its main thread, which lives as
long as the supervisor does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Set by ``up`` in each child's environment: the supervisor's pid.
SUPERVISOR_ENV = "GPU_ORCH_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def has_parent_death_signal() -> bool:
    """True where the kernel can signal a child when its parent dies (Linux)."""
    return _prctl is not None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when we die.

    None where the platform has no parent-death signal (then see :func:`watch_parent`).
    Everything it needs is resolved here, in the parent; the child only calls ``prctl``.
    """
    if _prctl is None:
        return None
    parent = os.getpid()
    prctl = _prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def watch_parent(interval: float = 1.0) -> threading.Thread | None:
    """Fallback for a role started by ``up`` where no parent-death signal exists.

    Does nothing unless ``up`` started this process (``GPU_ORCH_SUPERVISOR_PID``) and the
    platform lacks ``prctl``: there the kernel already does the job.
    """
    supervisor = os.environ.pop(SUPERVISOR_ENV, None)  # for us, not for what we start
    if not supervisor or has_parent_death_signal():
        return None
    try:
        expected = int(supervisor)
    except ValueError:
        return None
    if os.getppid() != expected:
        os.kill(os.getpid(), signal.SIGTERM)
        return None
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            if os.getppid() != expected:
                log.error("the supervisor (pid %d) is gone; stopping", expected)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread
