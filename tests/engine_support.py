"""What the engine's tests share: an injected clock and readers of what the engine wrote."""

from __future__ import annotations

import json


class Clock:
    """An injected clock: tests move time instead of sleeping."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def outbox(engine, redis) -> list[dict]:
    """The webhook deliveries the engine queued, oldest first."""
    return [json.loads(x) for x in redis.lrange(engine.keys.webhook_outbox(), 0, -1)]


def events(engine, name: str) -> list[dict]:
    """The engine's events of one kind, oldest first."""
    return [e for e in engine.events(count=1000) if e["event"] == name]
