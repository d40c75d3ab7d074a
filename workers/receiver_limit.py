"""At most N deliveries in flight to one receiver, per worker process.

The delivery slots (``webhooks.concurrency``) are shared by every team. Without a cap, one team
whose receiver is slow and who has many webhooks pending would fill them all, each for up to
``webhooks.timeout``, and every other team's webhook would wait behind them: the very delay
issue 11 is about, only needing more than one request to trigger. So each receiver
(the address and port a delivery connects to, see :func:`workers.webhooks._receiver`) gets at
most ``webhooks.max_per_receiver`` slots at once. A delivery that finds its receiver at the cap
waits briefly (a healthy receiver frees a slot in milliseconds), then is deferred: put back on
the schedule without spending one of its tries (see :class:`workers.webhooks.WebhookDeferred`).

It also remembers, per host name, the receiver the name led to last time, so a delivery whose
receiver is known to be at its cap is deferred before its name is looked up (a hint only: the
lookup that follows decides which receiver's slot the delivery holds).

The count lives in this process only: it guards this process's slots, which is what the cap
is for; a process that dies takes its counts with it, so nothing can leak.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable

#: Host names whose last receiver is remembered (least recently used forgotten first).
MAX_NAMES = 4096


class ReceiverLimit:
    """A counting gate per receiver key."""

    def __init__(self, limit: int, max_names: int = MAX_NAMES):
        self.limit, self.max_names = limit, max_names
        self._busy: Counter = Counter()
        self._cond = threading.Condition()
        self._last: OrderedDict[Hashable, Hashable] = OrderedDict()

    def last_receiver(self, name: Hashable) -> Hashable | None:
        """The receiver ``name`` led to last time (:meth:`remember`), if still remembered."""
        with self._cond:
            key = self._last.get(name)
            if key is not None:
                self._last.move_to_end(name)
            return key

    def remember(self, name: Hashable, key: Hashable) -> None:
        """``name`` (a URL's host and port) led to receiver ``key``; at most max_names kept."""
        with self._cond:
            self._last[name] = key
            self._last.move_to_end(name)
            while len(self._last) > self.max_names:
                self._last.popitem(last=False)

    def names(self) -> int:
        with self._cond:
            return len(self._last)

    def room(self, key: Hashable, wait: float) -> bool:
        """Whether ``key`` has a free slot, waiting up to ``wait`` seconds for one; takes none
        (a check before a name lookup must not hold a slot while the lookup runs)."""
        with self._cond:
            return self._free_slot(key, wait)

    def acquire(self, key: Hashable, wait: float) -> bool:
        """Take a slot of ``key``, waiting up to ``wait`` seconds; False when none freed."""
        with self._cond:
            if not self._free_slot(key, wait):
                return False
            self._busy[key] += 1
            return True

    def _free_slot(self, key: Hashable, wait: float) -> bool:
        """Wait (lock held) up to ``wait`` seconds until ``key`` is below its cap."""
        deadline = time.monotonic() + wait
        while self._busy[key] >= self.limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(left)
        return True

    def release(self, key: Hashable) -> None:
        with self._cond:
            self._busy[key] -= 1
            if self._busy[key] <= 0:
                del self._busy[key]
            self._cond.notify_all()

    def in_flight(self, key: Hashable) -> int:
        with self._cond:
            return self._busy[key]
