"""Hands webhook notifications from the engine's outbox to RQ, off the request path.

Views call :meth:`OutboxDispatcher.kick` after any engine call that may have granted or ended a
request (allocate, release, release by service, cancel). A kick only sets a flag; one daemon
thread per process wakes up and calls :func:`workers.outbox.dispatch`, which moves every pending
entry into an RQ job. Many kicks during one dispatch collapse into one more pass, so under load
the cost is a pass per burst, not per request (passes are at least ``MIN_INTERVAL`` apart), and
no request waits for it.

Best effort by design: a failed pass is logged and retried on the next kick; the scheduler also
drains the outbox periodically (with crash recovery), so nothing is lost if this process dies
between the engine's write and the dispatch.

The thread starts on the first kick, i.e. inside the gunicorn worker that serves requests,
never in the master before the fork.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("gpu_orchestrator.dispatcher")

#: Shortest time between two passes. Under load every request kicks; spacing the passes lets
#: kicks gather (at most 100 passes a second per process). 10 ms apart, the benchmarks could
#: not tell the passes' CPU cost from noise (bench/http.py ratio 0.347 vs 0.352 at 50 ms), while
#: 50 ms apart added ~25 ms to the typical webhook (bench/latency.py p50 37.6 -> 13.3 ms).
MIN_INTERVAL = 0.01


class OutboxDispatcher:
    """One background thread per process that drains the webhook outbox when kicked."""

    def __init__(self, rq_redis: Any, settings: Any,
                 dispatch: Callable[[Any, Any], int] | None = None,
                 min_interval: float = MIN_INTERVAL):
        self.rq_redis = rq_redis
        self.min_interval = min_interval
        self.settings = settings
        self._dispatch = dispatch
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        """Ask for a pass soon; returns at once."""
        with self._lock:  # pairs with the idle check in _run: no kick slips between them
            self._idle.clear()
            self._wake.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="outbox-dispatcher",
                                                    daemon=True)
                    self._thread.start()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every kick so far has been handled (for tests and shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        if self._dispatch is None:
            from workers.outbox import dispatch
            self._dispatch = dispatch
        last = float("-inf")
        while True:
            self._wake.wait()
            pause = last + self.min_interval - time.monotonic()
            if pause > 0:  # let a burst of kicks gather into this pass
                time.sleep(pause)
            self._wake.clear()
            last = time.monotonic()
            try:
                moved = self._dispatch(self.rq_redis, self.settings)
                if moved:
                    log.debug("dispatched %d webhook notification(s)", moved)
            except Exception:  # noqa: BLE001 - best effort; the scheduler drains it too
                log.warning("webhook dispatch failed; the scheduler will retry", exc_info=True)
            with self._lock:
                if not self._wake.is_set():
                    self._idle.set()
