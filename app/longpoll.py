"""Long-polls: ``GET /gpu/requests/<id>?wait=`` and ``GET /gpu/allocations/<id>?wait=``.

No polling inside the server. The engine's scripts ``PUBLISH <id>|<status>`` on the changes
channel (``Keys.changes``) in the same atomic step that changes a request's status
(``notify`` in ``app/lua/includes/events.lua``); a release publishes only for a record a
long-poll marked ``watched`` (``Engine.watch``, the read after subscribing, marks it in the same
atomic step as it reads it), so the releases nobody waits on cost Redis one call less. Each API process runs one listener thread
with one Pub/Sub connection, whatever the number of held calls; a held call waits on an
event that the listener sets when its id goes by. The listener starts with the first held
call and stops ``IDLE_EXIT`` seconds after the last one, so a process nobody waits on
receives nothing.

Race notes (one held call, one release on another replica):

* the call reads the record: ``queued``. The release's script grants it and publishes. If
  the call subscribed only after that, it would sleep through the grant. So the order is:
  register the id, wait until the listener's SUBSCRIBE is confirmed, read the record *again*,
  and only then wait. A change published before the second read is seen by that read; one
  published after it reaches the listener and sets the event (an event set before ``wait``
  makes ``wait`` return at once).
* the Pub/Sub connection drops and redis-py reconnects and subscribes again on its own: a
  change published in between is lost, so on a second subscription the listener lets every
  held call go (each answers what it reads then; clients ask again).
* Redis goes away for good: the listener lets every held call go and exits; each call reads the record again and answers it (503 if Redis is still gone, like any
  other read). Nothing would wake a call that went on waiting. The next held call starts a new
  listener.

Threads (``server.threads`` per API worker, app/http_worker.py): a held call sits on one of
its worker's threads, so it may only use a thread nobody else needs. :class:`Holds` counts the
requests each process is running (a WSGI wrapper) and lets a call be held only while another
thread of its worker is idle; when a request takes the worker's last idle thread, the oldest held call answers at once
with the current record (as if its time were up), so a thread is free again for the next
client. Clients ask again: :mod:`app.client` pauses briefly when a wait comes back early with
nothing changed, so this never turns into a busy loop.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gpu_orchestrator.longpoll")

#: Longest ``?wait=`` in seconds.
MAX_WAIT = 60.0
#: The listener stops this many seconds after the last held call ended.
IDLE_EXIT = 30.0
#: A held call answers at once (a fresh read) when the listener could not subscribe within this
#: many seconds.
SUBSCRIBE_TIMEOUT = 5.0
#: Longest single read of the Pub/Sub connection (the listener looks at its state in between).
READ_BLOCK = 1.0

#: Statuses a call waits on: a request while queued, an allocation while live.
REQUEST_WAITS = frozenset({"queued"})
ALLOCATION_WAITS = frozenset({"allocated", "preempting"})


class Waiter:
    """One held call: set when its id's status changed, or when it must let its thread go."""

    __slots__ = ("id", "event", "evicted")

    def __init__(self, request_id: str):
        self.id = request_id
        self.event = threading.Event()
        self.evicted = False


class _Run:
    """One listener thread's life: its subscription state."""

    def __init__(self):
        self.ready = threading.Event()  # subscribed, or failed
        self.failed = False


class ChangeListener:
    """One Pub/Sub subscription per process, shared by every held call."""

    def __init__(self, redis: Any, channel: str, *, idle_exit: float = IDLE_EXIT):
        self.redis = redis
        self.channel = channel
        self.idle_exit = idle_exit
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._run: _Run | None = None
        self._last_waiter = time.monotonic()

    def watch(self, request_id: str, timeout: float = SUBSCRIBE_TIMEOUT) -> Waiter | None:
        """Register a waiter for the id; returns it once the subscription is live (None when it
        could not be made in time: the caller answers at once instead of waiting)."""
        w = Waiter(request_id)
        with self._lock:
            self._waiters.setdefault(request_id, set()).add(w)
            run = self._run
            if run is None:
                run = self._run = _Run()
                threading.Thread(
                    target=self._listen, args=(run,), name="longpoll-listener", daemon=True
                ).start()
        if not run.ready.wait(timeout) or run.failed:
            self.unwatch(w)
            return None
        return w

    def unwatch(self, w: Waiter) -> None:
        with self._lock:
            group = self._waiters.get(w.id)
            if group is not None:
                group.discard(w)
                if not group:
                    del self._waiters[w.id]
            if not self._waiters:
                self._last_waiter = time.monotonic()

    def held(self) -> int:
        with self._lock:
            return sum(len(g) for g in self._waiters.values())

    def _wake(self, request_id: str) -> None:
        with self._lock:
            for w in self._waiters.get(request_id, ()):
                w.event.set()

    def _let_go_all(self) -> None:
        """The subscription is gone: every held call answers now (nothing would wake it)."""
        for group in self._waiters.values():
            for w in group:
                w.evicted = True
                w.event.set()

    def _listen(self, run: _Run) -> None:
        pubsub = None
        try:
            pubsub = self.redis.pubsub()
            pubsub.subscribe(self.channel)
            while True:
                msg = pubsub.get_message(timeout=READ_BLOCK)
                if msg is not None:
                    kind = msg.get("type")
                    if kind == "message":
                        data = msg["data"]
                        if isinstance(data, bytes):
                            data = data.decode()
                        self._wake(data.rpartition("|")[0])
                    elif kind == "subscribe":
                        if run.ready.is_set():
                            # redis-py reconnected and subscribed again by itself: whatever
                            # was published in between is lost, so the held calls read again
                            with self._lock:
                                self._let_go_all()
                        run.ready.set()
                    continue
                with self._lock:
                    if not self._waiters and time.monotonic() - self._last_waiter > self.idle_exit:
                        self._run = None  # a watch() from now on starts a new listener
                        return
        except Exception as exc:  # noqa: BLE001 - Redis went away; held calls read again
            log.debug("long-poll listener stopped (%s)", exc.__class__.__name__)
            with self._lock:
                if self._run is run:
                    self._run = None
                run.failed = True
                run.ready.set()  # a watch() waiting for the subscription gives up now
                self._let_go_all()
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass


#: Every Holds of this process, for answer_held_on_stop.
_ALL_HOLDS: weakref.WeakSet[Holds] = weakref.WeakSet()


class Holds:
    """Which calls may hold a thread of this process; see the module docstring."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._lock = threading.Lock()
        self._busy = 0
        self._held: collections.OrderedDict[Waiter, None] = collections.OrderedDict()
        self._stopping = False
        _ALL_HOLDS.add(self)

    def stop(self) -> None:
        """The process is shutting down: every held call answers now, none is held again."""
        with self._lock:
            self._stopping = True
            for w in self._held:
                w.evicted = True
                w.event.set()
            self._held.clear()

    def enter(self) -> None:
        """A request took a thread; if that was the last idle one, let the oldest held go."""
        with self._lock:
            self._busy += 1
            if self._busy >= self.threads and self._held:
                w, _ = self._held.popitem(last=False)
                w.evicted = True
                w.event.set()

    def exit(self) -> None:
        with self._lock:
            self._busy -= 1

    def hold(self, w: Waiter) -> bool:
        """May this call (already counted as running) wait on its thread now?"""
        with self._lock:
            if self._busy >= self.threads or self._stopping:
                return False
            self._held[w] = None
            return True

    def unhold(self, w: Waiter) -> None:
        with self._lock:
            self._held.pop(w, None)

    def wrap(self, wsgi_app: Callable) -> Callable:
        """A WSGI app that counts the requests running in this process."""

        def counted(environ, start_response):
            self.enter()
            try:
                return wsgi_app(environ, start_response)
            finally:
                self.exit()

        return counted


class LongPoll:
    """Read a record, and while its status is one to wait on, wait for it to change."""

    def __init__(self, listener: ChangeListener, holds: Holds):
        self.listener = listener
        self.holds = holds

    def read(
        self,
        request_id: str,
        read: Callable[[], dict],
        waits: frozenset,
        timeout: float,
        watch: Callable[[], dict] | None = None,
    ) -> dict:
        """``read()``'s record, once its status is not the one it had (or is not in ``waits``),
        or when ``timeout`` seconds passed, or when this call had to let its thread go.
        ``watch``: the read after subscribing, when it differs from ``read`` (``Engine.watch``
        marks the record so that the engine publishes its next change)."""
        rec = read()
        status = rec.get("status")
        if timeout <= 0 or status not in waits:
            return rec
        deadline = time.monotonic() + timeout
        w = self.listener.watch(request_id)
        if w is None:
            log.warning(
                "long-poll of %s answered at once: no subscription within %.0fs",
                request_id,
                SUBSCRIBE_TIMEOUT,
            )
            return read()  # answer now, with what is true now
        try:
            if not self.holds.hold(w):
                log.debug("long-poll of %s answered at once: no idle thread", request_id)
                return rec
            try:
                # after subscribing: a change before this read is seen here
                rec = (watch or read)()
                while rec.get("status") == status and not w.evicted:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not w.event.wait(remaining):
                        break
                    w.event.clear()
                    rec = read()
            finally:
                self.holds.unhold(w)
        finally:
            self.listener.unwatch(w)
        return rec


def answer_held_on_stop(signals=(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)) -> None:
    """In a server process (a gunicorn worker, from ``post_worker_init``): when a stop signal
    arrives, held calls answer at once (the current record) before the server's own handler
    runs, so a graceful stop does not wait up to 60 s for them. Runs in the main thread."""
    for signum in signals:
        previous = signal.getsignal(signum)

        def handler(num, frame, previous=previous):
            for holds in list(_ALL_HOLDS):
                holds.stop()
            if callable(previous):
                previous(num, frame)

        signal.signal(signum, handler)


def init_app(app, settings, redis) -> LongPoll:
    """One listener and one thread budget per process (a gunicorn worker)."""
    from app.keys import Keys

    holds = Holds(settings.server.threads)
    app.wsgi_app = holds.wrap(app.wsgi_app)
    poll = LongPoll(ChangeListener(redis, Keys(settings.redis.prefix).changes()), holds)
    app.extensions["gpu_longpoll"] = poll
    return poll


def wait_seconds(raw: str | None) -> float:
    """The ``wait`` query parameter: 0-60 seconds (default 0). Raises ValidationFailed."""
    from app.errors import ValidationFailed

    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= MAX_WAIT:  # NaN fails too
        raise ValidationFailed(
            f"wait: seconds from 0 to {MAX_WAIT:g}",
            details={"wait": [f"must be a number from 0 to {MAX_WAIT:g}"]},
        )
    return value
