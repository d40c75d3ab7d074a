"""Hands webhook notifications from the engine's outbox to RQ, off the request path.

Views call :meth:`OutboxDispatcher.kick` after any engine call that may have granted or ended a
request (allocate, release, release by service, cancel). One daemon thread per process then
calls :func:`app.outbox.dispatch`, which moves every pending entry into an RQ job. No request
waits for it. The thread starts on the first kick, i.e. inside the gunicorn worker that serves
requests, never in the master before the fork.

Two ways for that thread to know when to run a pass:

- **watch** (what the API uses, ``watch=True``): the thread blocks in Redis until the outbox
  holds an entry (``BLMOVE outbox outbox LEFT LEFT``: pops the head and pushes it back in one
  step, so it waits for an entry without taking it), then runs a pass. A kick only notes the
  time and starts the thread if it is not running: under load the requests whose outbox stays
  empty (no ``webhook_url``) cost the dispatcher nothing, where a kick used to wake the thread
  for a pass (a Redis round trip) every ``MIN_INTERVAL``. Entries are seen whoever wrote them
  (this process, another replica, the scheduler). The thread stops after ``idle_exit`` seconds
  without a kick, or when Redis fails it; the next kick starts it again.
- **kick** (``watch=False``): a kick sets a flag and wakes the thread; many kicks during one
  pass collapse into one more pass.

Passes are at least ``MIN_INTERVAL`` apart either way, so entries that arrive in a burst go out
in one pass.

Best effort by design: a failed pass is logged and retried (watch: ``RETRY_AFTER`` later; kick:
on the next kick); the scheduler also drains the outbox periodically (with crash recovery), so
nothing is lost if this process dies between the engine's write and the dispatch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gpu_orchestrator.dispatcher")

#: Shortest time between two passes: entries arriving in a burst gather into one pass. 10 ms
#: apart, the benchmarks could not tell the passes' CPU cost from noise (bench/http.py ratio
#: 0.347 vs 0.352 at 50 ms), while 50 ms apart added ~25 ms to the typical webhook
#: (bench/latency.py p50 37.6 -> 13.3 ms).
MIN_INTERVAL = 0.01
#: Watch mode: a watching thread stops after this many seconds without a kick.
IDLE_EXIT = 10.0
#: Watch mode: longest single wait in Redis (shorter when redis.socket_timeout is).
WATCH_BLOCK = 1.0
#: Watch mode: seconds between passes while they fail, and before a new watcher after its wait
#: in Redis failed.
RETRY_AFTER = 1.0


class OutboxDispatcher:
    """One background thread per process that turns outbox entries into RQ jobs."""

    def __init__(
        self,
        rq_redis: Any,
        settings: Any,
        dispatch: Callable[[Any, Any], int] | None = None,
        min_interval: float = MIN_INTERVAL,
        *,
        watch: bool = False,
        idle_exit: float = IDLE_EXIT,
    ):
        self.rq_redis = rq_redis
        self.min_interval = min_interval
        self.settings = settings
        self.watch = watch
        self.idle_exit = idle_exit
        self._dispatch = dispatch
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._kicked_at = float("-inf")
        self._busy = False  # watch mode: a pass is running
        self._retry_at = float("-inf")  # watch mode: no new watcher before (Redis failed)
        if watch:
            from app.keys import Keys

            self._outbox = Keys(settings.redis.prefix).webhook_outbox()
            self._block = min(WATCH_BLOCK, settings.redis.socket_timeout / 2)

    def kick(self) -> None:
        """Ask for a pass soon (kick mode) or keep the watcher running (watch mode); returns at
        once."""
        if self.watch:
            self._kicked_at = now = time.monotonic()
            # see _watch's exit for why this unlocked read is safe
            if self._thread is None and now >= self._retry_at:
                self._start(self._watch)
            return
        with self._lock:  # pairs with the idle check in _run: no kick slips between them
            self._idle.clear()
            self._wake.set()
        if self._thread is None:
            self._start(self._run)

    def _start(self, target: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=target, name="outbox-dispatcher", daemon=True
                )
                self._thread.start()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every kick so far has been handled (kick mode), or until the outbox is
        empty and no pass is running (watch mode); False when ``timeout`` ran out first. For
        tests and shutdown."""
        if not self.watch:
            return self._idle.wait(timeout)
        deadline = time.monotonic() + timeout
        while True:
            # The outbox first, then the flag: an entry this thread has taken out of the
            # outbox is in a pass that set _busy before taking it.
            if not self.rq_redis.llen(self._outbox) and not self._busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def _load_dispatch(self) -> None:
        if self._dispatch is None:
            from app.outbox import dispatch

            self._dispatch = dispatch

    def _pass(self) -> bool:
        try:
            moved = self._dispatch(self.rq_redis, self.settings)
            if moved:
                log.debug("dispatched %d webhook notification(s)", moved)
            return True
        except Exception:  # noqa: BLE001 - best effort; the scheduler drains it too
            log.warning("webhook dispatch failed; the scheduler will retry", exc_info=True)
            return False

    def _run(self) -> None:
        """Kick mode: a pass per wake-up, at least min_interval apart."""
        self._load_dispatch()
        last = float("-inf")
        while True:
            self._wake.wait()
            pause = last + self.min_interval - time.monotonic()
            if pause > 0:  # let a burst of kicks gather into this pass
                time.sleep(pause)
            self._wake.clear()
            last = time.monotonic()
            self._pass()
            with self._lock:
                if not self._wake.is_set():
                    self._idle.set()

    def _watch(self) -> None:
        """Watch mode: wait in Redis for an outbox entry, then run a pass."""
        self._load_dispatch()
        me = threading.current_thread()
        last = float("-inf")
        while True:
            try:
                entry = self.rq_redis.blmove(
                    self._outbox, self._outbox, self._block, "LEFT", "LEFT"
                )
            except Exception as exc:  # noqa: BLE001 - Redis went away
                # Stop; the next request that kicks (it got through to Redis) starts a new
                # watcher, not before RETRY_AFTER. Requests failing meanwhile say it loudly
                # enough; a watcher that retried on its own would outlive its app.
                log.debug("stopped watching the webhook outbox (%s)", exc.__class__.__name__)
                with self._lock:
                    self._retry_at = time.monotonic() + RETRY_AFTER
                    self._thread = None
                return
            if entry is None:
                if time.monotonic() - self._kicked_at < self.idle_exit:
                    continue
                with self._lock:
                    # Give up the slot first, then look at the last kick: a kick that read
                    # _thread before this line also set _kicked_at before it, so it is seen
                    # below; one that reads it after starts a new thread (or, waiting for the
                    # lock, finds this one resumed).
                    self._thread = None
                    if time.monotonic() - self._kicked_at < self.idle_exit:
                        self._thread = me
                        continue
                    return
            self._busy = True
            try:
                pause = last + self.min_interval - time.monotonic()
                if pause > 0:  # entries arriving in a burst go out in one pass
                    time.sleep(pause)
                last = time.monotonic()
                ok = self._pass()
            finally:
                self._busy = False
            if not ok:
                time.sleep(RETRY_AFTER)  # the entries are still there: do not spin on them
