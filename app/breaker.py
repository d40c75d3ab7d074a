"""A circuit breaker for an optional outside service, so a sick one costs requests nothing.

The advisor (app/advisor.py) and the graph service (app/workflow.py) are asked while an API
thread waits. When one of them hangs, every call would hold that thread for the full time limit.
``failures`` failures in a row open the breaker: for ``cooldown`` seconds ``admit()`` says no
at once and the caller goes on without the service. After that one caller is let through as a
trial (half-open); its success closes the breaker, its failure opens it for another cooldown.

Concurrency note: gunicorn threads share one breaker. Without the half-open trial slot, when
the cooldown ends every thread would see "closed" at once and all of them would wait on a
still-dead service: thread-1 at t=30.0 s sends a request, thread-2 at t=30.1 s sends another,
... each paying the full time limit. The lock-protected ``_trial_in_flight`` flag lets only
the first through; the others keep skipping until the trial reports back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    """Closed / open / half-open with one trial in flight; thread-safe.

    ``name`` and ``shown`` (the service's URL as logs may show it: no password) go into the
    WARNING line when it opens and the INFO line when it closes, on ``log``.
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int,
        cooldown: float,
        clock: Callable[[], float],
        log: logging.Logger,
        shown: str = "",
    ):
        if failures < 1 or cooldown < 0:
            raise ValueError("failures >= 1 and cooldown >= 0")
        self.name, self.shown = name, shown
        self.failures, self.cooldown = failures, cooldown
        self._clock, self._log = clock, log
        self._lock = threading.Lock()
        self._failed = 0
        self._open_until: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._open_until is None:
                return CLOSED
            return OPEN if self._clock() < self._open_until else HALF_OPEN

    def admit(self) -> bool:
        """May this call go out? Claims the half-open trial slot when it is free.

        A caller that is admitted must call ``record`` once, whatever happens, or a half-open
        breaker would wait for its trial forever."""
        with self._lock:
            if self._open_until is None:
                return True
            if self._clock() < self._open_until or self._trial_in_flight:
                return False
            self._trial_in_flight = True
            return True

    def record(self, ok: bool | None) -> None:
        """The outcome of an admitted call: a success closes, a failure counts (and may open).

        None: the call says nothing about the service's health (it answered, but about the
        caller's input); it only frees the trial slot, so the next caller is the trial."""
        with self._lock:
            self._trial_in_flight = False
            if ok is None:
                return
            if ok:
                if self._open_until is not None:
                    self._log.info("%s breaker closed: %s answered again", self.name, self.shown)
                self._failed, self._open_until = 0, None
                return
            self._failed += 1
            if self._open_until is not None or self._failed >= self.failures:
                if self._open_until is None:
                    self._log.warning(
                        "%s breaker open for %.0fs after %d failures in a row",
                        self.name,
                        self.cooldown,
                        self._failed,
                    )
                self._open_until = self._clock() + self.cooldown
