"""Stop on SIGINT or SIGTERM: one flag that every long-running role checks and sleeps on."""

from __future__ import annotations

import signal
import threading


class StopSignal:
    """Set by SIGINT/SIGTERM; ``sleep`` returns early when it is set.

    The handler only sets an event, so a role finishes the step in hand (a monitor report, a
    scheduler tick) and then shuts down in order instead of dying in the middle of it.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> StopSignal:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when stopped."""
        return self._event.wait(max(0.0, seconds))
