"""The webhook delivery job: POST the original payload, signed, with retries and an SSRF policy.

:func:`deliver` runs inside an RQ worker for one outbox entry (see :mod:`app.outbox`). It
reads the request's record through the engine, builds the original service's payload plus an
``event_id``, and POSTs it as JSON:

- any 2xx counts as delivered;
- anything else (including a 3xx: redirects are not followed, so they cannot bypass the SSRF
  policy), a timeout or a connection error raises, and RQ retries the job after the next interval
  of ``webhooks.retry_intervals``;
- a 410 Gone stops the retries at once;
- a URL refused by the SSRF policy (:mod:`app.webhook_policy`) fails at once, without retries;
- after the last try the job stays in RQ's failed registry (rq-dashboard shows it).

Each try has one deadline, ``webhooks.timeout``, for lookup, connect, TLS, send and response
headers (:mod:`workers.webhook_client`), and goes only to an address the policy checked. At
most ``webhooks.max_per_receiver`` tries run at once per receiver (the address and port the
try connects to, whatever host name led there) in a process (:mod:`workers.receiver_limit`);
a delivery over that cap is deferred (rescheduled ``DEFER_SECONDS`` later by
:func:`workers.rq_overrides.defer`) without spending a try. Logs show a URL as scheme, host
and port with a fingerprint of its path (:func:`app.webhook_policy.redact`).

Counters (HINCRBY on ``Keys.stats()``, exported by the API as
``gpu_orchestrator_webhooks_total{result}``): ``webhook|delivered``, ``webhook|retried`` (a try
failed and another one is scheduled) and ``webhook|failed`` (given up: last try, 410 or refused;
or the request's record expired, scheduler.history_ttl after it ended, before the try).

Signature: with ``webhooks.secret`` set, each try carries
``X-GPU-Orchestrator-Timestamp: <unix seconds>`` and
``X-GPU-Orchestrator-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``, where
body is the exact bytes of the request body. :func:`verify_signature` is the reference check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

from app import logs, queues
from app.keys import Keys
from app.settings import Settings
from app.timefmt import iso
from app.webhook_policy import (
    NotNow,
    Policy,
    Refused,
    Target,
    Unresolvable,
    asker_of,
    redact,
    split,
)
from workers import context, rq_overrides, webhook_client
from workers.receiver_limit import ReceiverLimit

log = logging.getLogger("gpu_orchestrator.webhooks")

SIGNATURE_HEADER = "X-GPU-Orchestrator-Signature"
TIMESTAMP_HEADER = "X-GPU-Orchestrator-Timestamp"
EVENT_HEADER = "X-GPU-Orchestrator-Event"
EVENT_ID_HEADER = "X-GPU-Orchestrator-Event-Id"
USER_AGENT = "gpu-orchestrator-webhooks/0.1"

#: A deferred delivery is tried again this many seconds later.
DEFER_SECONDS = 2
#: How long a delivery waits for a slot of its receiver before it is deferred.
DEFER_WAIT = 0.02

_limit: ReceiverLimit | None = None
_limit_lock = threading.Lock()

STAT_DELIVERED = "webhook|delivered"
STAT_FAILED = "webhook|failed"
STAT_RETRIED = "webhook|retried"


class WebhookError(Exception):
    """A delivery try failed; carries the url (redacted) and, when there was a response, its
    status."""

    def __init__(self, message: str, *, url: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status


class WebhookGone(WebhookError):
    """The receiver answered 410 Gone: it wants no more deliveries; no retries."""


class WebhookDeferred(rq_overrides.JobDeferred):
    """The receiver already has ``webhooks.max_per_receiver`` deliveries in flight in this
    process: the delivery goes back on the schedule (DEFER_SECONDS) without spending a try."""


class WebhookNotNow(WebhookError):
    """The URL's name was not looked up (:class:`app.webhook_policy.NotNow`): a delivery comes
    back ``retry_in`` seconds later (at least DEFER_SECONDS) without spending a try; a direct
    :func:`post` fails with it."""

    def __init__(self, message: str, *, url: str, retry_in: float = 0.0):
        super().__init__(message, url=url)
        self.retry_in = retry_in


class WebhookRefused(WebhookError):
    """The URL is not allowed by ``webhooks.allowed_hosts`` / ``deny_private_networks`` (or
    carries credentials); no retries."""


# ------------------------------------------------------------------------------ payload


def _gpu_ids(value: Any) -> list[int]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [x for x in text.split(",") if x]
    return [int(x) for x in value]


#: Fields that only happen after a grant: an ``allocated`` event's payload leaves them out
#: (they are null at the grant), so every try of that event sends the same body.
_LATER_FIELDS = ("released_at", "ended_at", "renewed_at", "position")


def _allocation(
    record: dict[str, Any], event: str, pinned: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``allocation`` object: the fields of a 200 answer of ``/gpu/allocate``, as they
    were at the event (``pinned`` holds what a renewal may have changed since)."""
    from app.api import render  # the API's renderer: one definition of an allocation's JSON

    rec = dict(record, gpu_ids=_gpu_ids(record.get("gpu_ids")), status=event)
    if event == "allocated":
        for key in _LATER_FIELDS:
            rec.pop(key, None)
        if pinned and "expires_at" in pinned:
            rec["expires_at"] = float(pinned["expires_at"]) if pinned["expires_at"] else None
            lease = float(pinned.get("lease_seconds") or -1)
            rec["lease_seconds"] = None if lease < 0 else lease
    elif event == "preempting" and pinned:
        # as at the mark: a renewal in between (capped at preempt_at) changes no try's body
        rec.pop("renewed_at", None)
        rec["expires_at"] = float(pinned["expires_at"]) if pinned.get("expires_at") else None
        rec["preempt_at"] = float(pinned["preempt_at"]) if pinned.get("preempt_at") else None
    rec.pop("replayed", None)
    out = render.allocation(rec, principal=None, admin=True)  # the owner's own receiver
    if out.get("priority") not in (None, ""):
        out["priority"] = int(out["priority"])
    return out


def build_payload(
    record: dict[str, Any],
    event: str,
    event_id: str,
    pinned: dict[str, Any] | None = None,
    entry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The original service's webhook body, plus ``event_id`` for receivers to dedupe.

    ``allocation`` carries the same fields as a 200 answer of ``/gpu/allocate`` (node,
    gpu_uuids, expires_at, cuda_visible_devices, ...): with several nodes gpu_ids alone is
    ambiguous. ``gpu_unhealthy`` also names the node and the GPUs that turned unhealthy, with
    their health (``degraded``, ``failed`` or ``lost``), from the outbox ``entry``; its
    allocation keeps its own status (it is still live). ``preempting`` also carries
    ``preempt_at`` (when the GPUs are taken back) and ``reason`` (drain or guarantee)."""
    submitted = record.get("submitted_at")
    allocated = record.get("allocated_at")
    wait = record.get("wait_time_seconds")
    if wait in (None, "") and submitted not in (None, "") and allocated not in (None, ""):
        wait = max(0.0, float(allocated) - float(submitted))
    wait = None if wait in (None, "") or allocated in (None, "") else round(float(wait), 3)
    status = "allocated" if event == "allocated" else event
    extra = {"reason": record["reason"]} if record.get("reason") and event != "allocated" else {}
    if event == "gpu_unhealthy" and entry is not None:
        extra["node"] = entry.get("node") or record.get("node")
        extra["gpus"] = [
            {"index": int(g["index"]), "health": str(g["health"])} for g in entry.get("gpus") or []
        ]
    allocation = _allocation(
        record,
        (record.get("status") or "allocated") if event == "gpu_unhealthy" else status,
        pinned,
    )
    if event == "preempting":
        extra["preempt_at"] = allocation.get("preempt_at")
    return {
        "status": status,
        "request_id": record["id"],
        "allocation": allocation,
        "submitted_at": iso(submitted),
        "allocated_at": iso(allocated),
        "wait_time_seconds": wait,
        "event_id": event_id,
        **extra,
    }


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Reference receiver check: the HMAC matches and the timestamp is recent (anti-replay)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (TypeError, ValueError):
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


# ------------------------------------------------------------------------------ delivery


def post(
    url: str,
    payload: dict[str, Any],
    settings: Settings,
    *,
    now: float | None = None,
    policy: Policy | None = None,
) -> int:
    """One try: POST the signed JSON body; returns the 2xx status or raises WebhookError.

    ``webhooks.timeout`` bounds the whole try: name lookup, connect, TLS, sending and the
    response headers. The URL is checked against the policy (:mod:`app.webhook_policy`) and
    the connection goes to an address that check resolved and allowed, nowhere else.
    """
    deadline = time.monotonic() + settings.webhooks.timeout
    target = check(url, settings, deadline, policy=policy)
    return send(target, url, payload, settings, deadline, now=now)


def check(
    url: str,
    settings: Settings,
    deadline: float,
    *,
    policy: Policy | None = None,
    asker: str = "",
) -> Target:
    """The policy's :class:`app.webhook_policy.Target` for ``url`` (its one name lookup, by
    ``deadline``, counted against ``asker``'s share of the lookups); WebhookRefused, or
    WebhookError when the name does not resolve (in time)."""
    shown = redact(url)
    try:
        return (policy or Policy.from_settings(settings)).resolve(
            url, timeout=max(0.0, deadline - time.monotonic()), asker=asker
        )
    except NotNow as exc:
        message = f"POST {shown} not tried: {exc}"
        raise WebhookNotNow(message, url=shown, retry_in=exc.retry_in) from None
    except Unresolvable as exc:
        raise WebhookError(f"POST {shown} failed: {exc}", url=shown) from None
    except Refused as exc:
        raise WebhookRefused(str(exc), url=shown) from None


def send(
    target: Target,
    url: str,
    payload: dict[str, Any],
    settings: Settings,
    deadline: float,
    *,
    now: float | None = None,
) -> int:
    """POST the signed JSON body to a checked ``target`` by ``deadline`` (see :func:`post`)."""
    shown = redact(url)
    timeout = settings.webhooks.timeout
    body = encode(payload)
    timestamp = str(int(time.time() if now is None else now))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: timestamp,
        EVENT_HEADER: str(payload.get("status")),
        EVENT_ID_HEADER: str(payload.get("event_id")),
    }
    if settings.webhooks.secret:
        headers[SIGNATURE_HEADER] = sign(settings.webhooks.secret, timestamp, body)
    try:
        status = webhook_client.post(target, body, headers, max(0.0, deadline - time.monotonic()))
    except webhook_client.DeliveryTimeout:
        raise WebhookError(f"POST {shown} timed out after {timeout:g} s", url=shown) from None
    except webhook_client.DeliveryFailed as exc:
        raise WebhookError(f"POST {shown} failed: {exc}", url=shown) from None
    if 200 <= status < 300:
        return status
    if status == 410:
        raise WebhookGone(f"POST {shown} answered 410 Gone; not retrying", url=shown, status=410)
    raise WebhookError(f"POST {shown} answered {status}", url=shown, status=status)


def receiver_limit(settings: Settings) -> ReceiverLimit:
    """This process's per-receiver gate (built on first use)."""
    global _limit
    with _limit_lock:
        if _limit is None or _limit.limit != settings.webhooks.max_per_receiver:
            _limit = ReceiverLimit(settings.webhooks.max_per_receiver)
        return _limit


def _receiver(target: Target) -> tuple[str, int]:
    """What the per-receiver cap counts: the address (and port) the delivery connects to.

    Keyed by address, not by host name: several names for one backend (``hooks.a.example``
    and ``a-hooks.example`` both pointing at it) share its slots instead of getting
    ``max_per_receiver`` each. The address is the first one the policy's lookup gave
    (:attr:`Target.addresses`); webhook_client connects to it first and stays there unless
    it refuses the connection (then the next address is tried under the same slot). No second
    lookup: the one that checked the URL chose the address."""
    return target.addresses[0], target.port


def _name(url: str) -> tuple[str, int] | None:
    """(host, port) of ``url``; None when its shape is refused (check() says why)."""
    try:
        _, host, port, _ = split(url)
    except Refused:
        return None
    return host, port


def _put_back(job, settings: Settings, seconds: float) -> None:
    """Not a try: the running job comes back ``seconds`` out, its tries and backoff unchanged,
    on the deferred queue, behind any fresh delivery."""
    rq_overrides.defer(job, seconds, queues.queue_name(settings, queues.WEBHOOKS_DEFERRED))


def _defer(job, settings: Settings, entry: dict[str, Any], url: str, receiver, cap: int):
    """Raise WebhookDeferred: ``receiver`` has ``cap`` deliveries in flight in this process."""
    if job is not None:
        _put_back(job, settings, DEFER_SECONDS)
    log.debug(
        "webhook %s for %s deferred: %s (%s port %d) has %d deliveries in flight",
        entry["event_id"],
        entry["request_id"],
        redact(url),
        receiver[0],
        receiver[1],
        cap,
    )
    raise WebhookDeferred(f"{redact(url)} is at webhooks.max_per_receiver")


def _load_record(request_id: str) -> dict[str, Any] | None:
    from app.errors import NotFound

    try:
        return context.engine().get(request_id)
    except NotFound:
        return None


def deliver(entry: dict[str, Any]) -> dict[str, Any]:
    """RQ job: deliver one outbox entry ``{"event_id", "event", "request_id", "ts"}``."""
    from rq import get_current_job

    settings, redis, _ = context.get()
    job = get_current_job()
    token = logs.request_id_var.set(str(entry.get("request_id") or "-"))
    try:
        stats = Keys(settings.redis.prefix).stats()
        record = _load_record(entry["request_id"])
        if not record:
            # Its record expired (scheduler.history_ttl after it ended) before this try: there
            # is nothing left to build the payload from. A lost event, so counted as one.
            redis.hincrby(stats, STAT_FAILED, 1)
            log.warning(
                "webhook %s for %s given up: the request is gone (it ended longer than "
                "scheduler.history_ttl ago)",
                entry.get("event_id"),
                entry.get("request_id"),
            )
            return {"delivered": False, "reason": "unknown request"}
        url = record.get("webhook_url") or entry.get("webhook_url")
        if not url:
            log.info("no webhook to deliver for %s (no webhook_url)", entry.get("request_id"))
            return {"delivered": False, "reason": "no webhook_url"}
        payload = build_payload(
            record,
            str(entry.get("event") or "allocated"),
            str(entry["event_id"]),
            entry.get("pinned"),
            entry,
        )
        limit = receiver_limit(settings)
        deadline = time.monotonic() + settings.webhooks.timeout
        # Where this name led last time: if that receiver is at its cap, defer now, without a
        # lookup (a backlog of deferrals would otherwise look the name up every time each comes
        # back). Only a hint, and no slot is held on it: a lookup that hangs must not keep a
        # receiver's slot from deliveries that are ready to send.
        name = _name(url)
        hint = None if name is None else limit.last_receiver(name)
        if hint is not None and not limit.room(hint, DEFER_WAIT):
            _defer(job, settings, entry, url, hint, limit.limit)
        try:
            # the lookup counts against the try, and against its owner's share of lookups
            asker = asker_of(record.get("owner"), record.get("service_name"))
            target = check(url, settings, deadline, asker=asker)
            receiver = _receiver(target)
            if name is not None:
                limit.remember(name, receiver)
            if not limit.acquire(receiver, DEFER_WAIT):
                _defer(job, settings, entry, url, receiver, limit.limit)
            try:
                status = send(target, url, payload, settings, deadline)
            finally:
                limit.release(receiver)
        except (WebhookGone, WebhookRefused) as exc:
            if job is not None:
                rq_overrides.give_up(job)
            redis.hincrby(stats, STAT_FAILED, 1)
            log.warning(
                "webhook %s for %s given up: %s", entry["event_id"], entry["request_id"], exc
            )
            raise
        except WebhookError as exc:
            if isinstance(exc, WebhookNotNow) and job is not None:
                # nothing was tried (no lookup, no connection): not a try spent
                delay = max(DEFER_SECONDS, exc.retry_in)
                _put_back(job, settings, delay)
                log.info(
                    "webhook %s for %s deferred %.0f s, no try spent: %s",
                    entry["event_id"],
                    entry["request_id"],
                    delay,
                    exc,
                )
                raise WebhookDeferred(str(exc)) from None
            left = 0 if job is None else rq_overrides.retries_left(job)
            final = not left
            redis.hincrby(stats, STAT_FAILED if final else STAT_RETRIED, 1)
            log.warning(
                "webhook %s for %s failed (%s); %s",
                entry["event_id"],
                entry["request_id"],
                exc,
                "giving up" if final else f"{left} retries left",
            )
            raise
        redis.hincrby(stats, STAT_DELIVERED, 1)
        log.info(
            "webhook %s for %s delivered to %s (%s)",
            entry["event_id"],
            entry["request_id"],
            redact(url),
            status,
        )
        return {"delivered": True, "status": status}
    finally:
        logs.request_id_var.reset(token)
