"""Writes that replicas have acknowledged before the client hears about them.

With ``redis.min_replicas_ack`` >= 1 an engine write is sent together with ``WAIT n timeout``
on the same connection (one pipeline, one round trip). ``WAIT`` returns once ``n`` replicas have
every write that connection made, so a grant the client was told about is on a replica when
the primary dies, and Sentinel promotes a replica that has it. Not acknowledged in time: the
write stands on the primary but may not survive a failover, and the caller gets a 503 (an
``Idempotency-Key`` makes the retry safe). Costs: the replication round trip per write (see
docs/reliability.md for the figure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError

from app.errors import Unavailable


class NotAcknowledged(Unavailable):
    """Fewer replicas than ``redis.min_replicas_ack`` confirmed a write in time."""

    code = "not_replicated"


def write_acked(
    client: Any,
    command: Sequence[Any],
    replicas: int,
    timeout: float,
    *,
    reload: Callable[[], Any] | None = None,
) -> Any:
    """Run one write ``command`` then ``WAIT replicas timeout`` on one connection; its reply.

    ``reload`` is called once on NOSCRIPT (an EVALSHA after a restart or a failover to a
    replica whose script cache is empty), then the pair is sent again.
    """
    for attempt in (0, 1):
        with client.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            pipe.execute_command("WAIT", replicas, max(1, int(timeout * 1000)))
            try:
                reply, acked = pipe.execute()
            except NoScriptError:
                if attempt or reload is None:
                    raise
                reload()
                continue
        if int(acked) < replicas:
            raise NotAcknowledged(
                f"the write was confirmed by {int(acked)} of {replicas} replica(s) within "
                f"{timeout:g}s (redis.min_replicas_ack); it may not survive a failover: retry "
                "with the same Idempotency-Key",
                details={"acknowledged": int(acked), "required": replicas},
            )
        return reply
    raise AssertionError("unreachable")
