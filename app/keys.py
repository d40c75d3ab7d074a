"""Every Redis key the service uses, built in one place from one prefix.

All keys share the prefix's hash tag (``{gpuo}`` by default), so every Lua script's keys live in
one Redis Cluster slot. Nothing outside this module formats a key by hand; Lua scripts receive
the prefix (or full keys) from here. ``tests/test_keys.py`` pins every shape.
"""

from __future__ import annotations


class Keys:
    """Key builder for one deployment; ``Keys("{gpuo}").request("svc-1")``."""

    def __init__(self, prefix: str = "{gpuo}"):
        if not prefix or ":" in prefix[-1:]:
            raise ValueError("prefix must be non-empty and must not end with ':'")
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    # Fleet ------------------------------------------------------------------
    def nodes(self) -> str:
        """ZSET node name -> last heartbeat (epoch seconds)."""
        return self._k("nodes")

    def node(self, node: str) -> str:
        """HASH of one node: heartbeat, gpu_count, backend, host."""
        return self._k("node", node)

    def gpu(self, node: str, index: int | str) -> str:
        """HASH of one GPU's telemetry, health and allocation state."""
        return self._k("gpu", node, str(index))

    def node_free_gpus(self, node: str) -> str:
        """HASH index -> "memory_free_mb|utilization|uuid" of the node's GPUs that are free for an
        exclusive grant (placement reads one hash per node instead of every GPU)."""
        return self._k("freegpus", node)

    def nodes_free(self) -> str:
        """ZSET node name -> number of its GPUs free for an exclusive grant (best-fit index)."""
        return self._k("nodes", "free")

    def node_sizes(self) -> str:
        """ZSET node name -> number of GPUs it has (for "can never fit" checks)."""
        return self._k("nodes", "size")

    def gpus(self) -> str:
        """ZSET ``node|index`` -> memory_total_mb of every known GPU."""
        return self._k("gpus")

    def shared_capacity(self) -> str:
        """ZSET ``node|index`` -> MB still reservable by shared requests (shareable GPUs with
        fewer than ``request_rules.MAX_SHARED_PER_GPU`` shared holders only)."""
        return self._k("gpus", "shared")

    # Requests and allocations ----------------------------------------------
    def request(self, request_id: str) -> str:
        """HASH of one request/allocation over its whole lifecycle."""
        return self._k("req", request_id)

    def dependents(self, request_id: str) -> str:
        """SET of the queued requests that wait on this one with ``depends_on_mode: ok``
        (cancelled when it ends otherwise than released; deleted when it ends). A member
        that ends while queued leaves it (so it holds at most the queue)."""
        return self._k("deps", request_id)

    def queue(self) -> str:
        """ZSET of queued request ids, ordered by rank (lowest score is served first)."""
        return self._k("queue")

    def queue_demand(self, sharing: str) -> str:
        """ZSET of queued ids by demand: GPUs (``exclusive``) or MB (``shared``); "nothing fits"."""
        return self._k("queue", "demand", sharing)

    def queue_shapes(self) -> str:
        """HASH queued id -> "<shape>#<submitted_at>"; a pass reads 500 shapes per call and skips
        shapes that already failed without reading the requests."""
        return self._k("queue", "shapes")

    def queue_deadlines(self) -> str:
        """ZSET of queued request ids by the time they time out."""
        return self._k("queue", "deadlines")

    def queue_unreserved(self) -> str:
        """ZSET of queued ids holding no node reservation yet, by submitted_at (or by the time
        of their last attempt to reserve, which found no node)."""
        return self._k("queue", "unreserved")

    def reservations(self) -> str:
        """HASH node name -> id of the long-waiting request that reserves it."""
        return self._k("reservations")

    def leases(self) -> str:
        """ZSET of live allocation ids by expires_at."""
        return self._k("leases")

    def service(self, service_name: str) -> str:
        """SET of live allocation ids of one service."""
        return self._k("svc", service_name)

    def idempotency(self, key: str) -> str:
        """STRING: request id stored under an idempotency key (24 h)."""
        return self._k("idem", key)

    def events(self) -> str:
        """STREAM of every state change (capped)."""
        return self._k("events")

    def webhook_outbox(self) -> str:
        """LIST of pending webhook deliveries written atomically by the engine's scripts."""
        return self._k("outbox", "webhooks")

    def webhook_processing(self) -> str:
        """LIST of outbox entries a dispatcher has taken but not yet turned into RQ jobs."""
        return self._k("outbox", "webhooks", "processing")

    def webhook_claim(self, event_id: str) -> str:
        """STRING (short TTL): one dispatcher is turning this outbox entry into a job."""
        return self._k("outbox", "claim", event_id)

    def changes(self) -> str:
        """Pub/Sub channel (not a key): ``<id>|<status>`` each time a request that someone may
        be waiting on changes status; the API's long-polls listen (app/longpoll.py)."""
        return self._k("changes")

    def rq_queue(self, name: str) -> str:
        """Name (not a key) of one of the service's RQ queues, unique per prefix:
        ``{gpuo}`` -> ``gpuo-webhooks``. RQ stores it under its own ``rq:`` keys."""
        tag = "".join(ch for ch in self.prefix if ch.isalnum() or ch in "-_.") or "gpuo"
        return f"{tag}-{name}"

    def lock(self, name: str) -> str:
        """STRING leader lock (scheduler, reaper) held with a TTL."""
        return self._k("lock", name)

    def stats_services(self) -> str:
        """SET of the services that have their own label in the stats hash (at most
        ``monitoring.max_service_labels``; the rest are counted as ``other``)."""
        return self._k("stats", "services")

    def queue_owners(self) -> str:
        """HASH of owner (``o:<principal>``, or ``s:<service>`` with auth off) -> requests it
        has queued; for ``scheduler.max_queued_per_owner``. Owners with none have no field."""
        return self._k("queue", "owners")

    def queue_owner_tenants(self, owner: str) -> str:
        """HASH of tenant -> requests the owner (a principal) has queued in it (``""``: records
        from before tenants), so GET /gpu/tenants of a non-admin reads its own tenants without
        the queue. Its counts add up to the owner's ``queue_owners()`` field; it is gone when
        that is, and rebuilt from the queue after each library load (includes/call.lua)."""
        return self._k("queue", "owner", owner)

    def tenants(self) -> str:
        """HASH of tenant -> GPUs it holds now (a shared allocation counts as one GPU), kept
        by the engine on every grant and end. Tenants holding nothing have no field."""
        return self._k("tenants")

    def tenant_usage(self) -> str:
        """HASH of tenant -> ``<decayed usage, GPU-seconds>|<as of, epoch s>``, kept while
        ``tenants.fair_share`` is on. A tenant holding nothing whose usage decayed below a
        GPU-minute has no field."""
        return self._k("tenants", "usage")

    def tenant_queued(self) -> str:
        """HASH of tenant -> requests it has queued (``tenants.default.max_queued`` and the
        quotas). Tenants with none have no field."""
        return self._k("tenants", "queued")

    def preempt_holds(self) -> str:
        """HASH node -> id of the queued request a guarantee preemption holds it for (a strong
        reservation: no other request is placed there; includes/preemption.lua)."""
        return self._k("preempt", "holds")

    def queue_tenant(self, tenant: str) -> str:
        """ZSET of one tenant's queued requests, scored as in ``queue()`` (its own queue order;
        the fair-share pass walks these). Gone when the tenant has nothing queued."""
        return self._k("queue", "tenant", tenant)

    def session_secret(self) -> str:
        """STRING: the random secret that signs browser session cookies when
        ``auth.session_secret`` is empty (made once, shared by every replica)."""
        return self._k("session", "secret")

    def stats(self) -> str:
        """HASH of cluster-wide counters (allocations by service/status, grants, wait buckets)
        kept by the Lua scripts, so every replica exports the same totals."""
        return self._k("stats")

    def meta(self) -> str:
        """HASH of counters and version stamps the engine keeps about itself."""
        return self._k("meta")
