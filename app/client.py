"""A Python client for gpu-orchestrator: ask for GPUs, wait for them, keep the lease, give them back.

Depends only on ``requests`` and the standard library: importing it imports nothing of the
server (no Flask, RQ, Redis or YAML), so a job can use it with only ``requests`` installed::

    from app.client import Client

    gpus = Client("http://127.0.0.1:8086", api_key=None)   # default: $GPU_ORCH_URL, $GPU_ORCH_API_KEY
    with gpus.allocation(service_name="trainer", workload_type="training", required_gpus=2,
                         ttl="10m", wait=True) as alloc:
        os.environ["CUDA_VISIBLE_DEVICES"] = alloc.cuda_visible_devices
        train()                # the lease is renewed in the background
    # released here, also when the block raises

Waiting uses the API's long-polls (``GET /gpu/requests/<id>?wait=``), not a polling loop.
Requests that create something carry an ``Idempotency-Key``, so retrying one after a network
error never makes two; every call is retried a few times on connection errors and 503s.

Exceptions (each API error code has its own class; all carry the HTTP status, the stable code,
the message, the details and ``retry_after`` from the response)::

    ClientError
    ├── ApiError (status, code, message, details, retry_after)
    │   ├── BadRequest          400 bad_request (and other 4xx without a class of their own)
    │   ├── Unauthorized        401 unauthorized
    │   ├── Forbidden           403 forbidden
    │   ├── NotFound            404 not_found
    │   ├── Conflict            409 conflict
    │   ├── PayloadTooLarge     413 payload_too_large
    │   ├── ValidationError     422 validation_error
    │   ├── Unsatisfiable       422 unsatisfiable: no GPU in the fleet can ever hold it
    │   ├── TooManyRequests     429 (any code)
    │   │   └── QueueFull       429 queue_full, owner_queue_full, tenant_queue_full
    │   ├── ServerError         5xx
    │   │   └── Unavailable     503 unavailable (Redis down), engine_upgrading (rolling upgrade),
    │   │                       not_replicated (redis.min_replicas_ack not met)
    ├── ConnectionFailed        the API could not be reached (after the retries), or what
    │                           answered at the URL is not the API
    ├── WaitTimeout             ``wait`` ran out; ``.allocation`` is the request, still queued
    └── NotGranted              the request ended without GPUs (cancelled, timed out)
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import requests

from app.timefmt import parse_duration

log = logging.getLogger("gpu_orchestrator.client")

DEFAULT_URL = "http://127.0.0.1:8086"
URL_ENV = "GPU_ORCH_URL"
API_KEY_ENV = "GPU_ORCH_API_KEY"
#: Longest single long-poll the client asks for (the API allows 60 s).
LONG_POLL = 30.0
#: ... while someone wants progress: the API answers a long-poll when the status changes, not
#: when the queue position does, so a new position is seen within this many seconds.
PROGRESS_POLL = 5.0
#: Statuses of a live allocation (its GPUs are held).
LIVE = ("allocated", "preempting")


# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """Base of everything this module raises."""


class ApiError(ClientError):
    """The API answered with an error."""

    status = 0

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        details: dict | None = None,
        retry_after: float | None = None,
        response: Any = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details or {}
        self.retry_after = retry_after
        self.response = response

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class ValidationError(ApiError):
    pass


class Unsatisfiable(ApiError):
    pass


class TooManyRequests(ApiError):
    pass


class QueueFull(TooManyRequests):
    pass


class ServerError(ApiError):
    pass


class Unavailable(ServerError):
    pass


class ConnectionFailed(ClientError):
    """The API could not be reached (refused, reset, timed out) after the retries, or what
    answered at the URL is not the API (a success that is not a JSON object)."""


class WaitTimeout(ClientError):
    """The wait ran out while the request was still queued (``.allocation``)."""

    def __init__(self, allocation: Allocation):
        super().__init__(
            f"request {allocation.id} still queued (position "
            f"{allocation.position}) when the wait ran out"
        )
        self.allocation = allocation


class NotGranted(ClientError):
    """The request ended without GPUs (``.allocation.status``: cancelled, timed_out, ...)."""

    def __init__(self, allocation: Allocation):
        super().__init__(f"request {allocation.id} ended without GPUs: {allocation.status}")
        self.allocation = allocation


#: API error code -> class (the code is the contract; the status decides when it is unknown).
_BY_CODE: dict[str, type[ApiError]] = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "payload_too_large": PayloadTooLarge,
    "validation_error": ValidationError,
    "unsatisfiable": Unsatisfiable,
    "queue_full": QueueFull,
    "owner_queue_full": QueueFull,
    "tenant_queue_full": QueueFull,
    "too_many_requests": TooManyRequests,
    "unavailable": Unavailable,
    "engine_upgrading": Unavailable,
    "not_replicated": Unavailable,
}
_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: TooManyRequests,
    503: Unavailable,
}


def _error(resp: requests.Response) -> ApiError:
    try:
        err = resp.json().get("error") or {}
    except ValueError:
        err = {}
    code = str(err.get("code") or f"http_{resp.status_code}")
    message = str(err.get("message") or resp.reason or "error")
    retry_after = _retry_after(resp.headers.get("Retry-After"))
    cls = (
        _BY_CODE.get(code)
        or _BY_STATUS.get(resp.status_code)
        or (ServerError if resp.status_code >= 500 else BadRequest)
    )
    return cls(
        message,
        status=resp.status_code,
        code=code,
        details=err.get("details") if isinstance(err.get("details"), dict) else {},
        retry_after=retry_after,
        response=resp,
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header, seconds or an HTTP-date (RFC 9110); None
    when absent or unreadable, never negative or infinite (a proxy may send anything)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):  # a year no datetime holds overflows
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


# --------------------------------------------------------------------------- records


class Allocation:
    """A request or allocation as the API last described it; every field is also in ``.data``.

    ``gpu_ids`` are the indexes on ``node``; ``cuda_visible_devices`` is the value for the
    environment variable ("" while queued)."""

    def __init__(self, data: dict[str, Any]):
        # /gpu/requests/<id> keeps the grant under "allocation"; one flat record either way
        grant = data.get("allocation")
        self.data = {**grant, **data} if isinstance(grant, dict) else dict(data)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def id(self) -> str:
        return self.data.get("id") or self.data.get("request_id") or ""

    @property
    def status(self) -> str:
        return self.data.get("status") or ""

    @property
    def node(self) -> str | None:
        return self.data.get("node")

    @property
    def gpu_ids(self) -> list[int]:
        return list(self.data.get("gpu_ids") or [])

    @property
    def gpu_uuids(self) -> list[str]:
        return list(self.data.get("gpu_uuids") or [])

    @property
    def cuda_visible_devices(self) -> str:
        return self.data.get("cuda_visible_devices") or ",".join(str(i) for i in self.gpu_ids)

    @property
    def position(self) -> int | None:
        return self.data.get("position")

    @property
    def lease_seconds(self) -> float | None:
        return self.data.get("lease_seconds")

    @property
    def granted(self) -> bool:
        return self.status in LIVE

    def __repr__(self) -> str:
        return f"<Allocation {self.id} {self.status} node={self.node} gpus={self.gpu_ids}>"


def _seconds(value: Any, name: str) -> float:
    try:
        secs = parse_duration(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: a duration such as 30s, 10m, 2h or a number of seconds, got {value!r}"
        ) from None
    if secs < 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")
    return secs


# --------------------------------------------------------------------------- client


class Client:
    """One API endpoint. Thread-safe: each thread gets its own HTTP session."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
    ):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: seconds > 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: an integer >= 0, got {retries!r}")
        self.timeout = timeout
        self.retries = retries
        self._local = threading.local()

    def __repr__(self) -> str:  # never shows the key
        return f"Client({self.url!r})"

    # ------------------------------------------------------------------ plumbing
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Accept"] = "application/json"
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
        return session

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict | None = None,
        headers: dict | None = None,
        timeout: float | None = None,
        done_on_retry: tuple[int, ...] = (),
    ) -> Any:
        """One API call, retried on connection errors and 503 (bounded); JSON answer.
        ``done_on_retry``: statuses that, on a retry, mean the first attempt already did it."""
        url = self.url + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self._session().request(
                    method,
                    url,
                    json=body,
                    params=params,
                    headers=headers,
                    timeout=(self.timeout, timeout or self.timeout),
                )
            except requests.RequestException as exc:
                if last:
                    raise ConnectionFailed(f"cannot reach {self.url} ({_why(exc)})") from exc
                time.sleep(_backoff(attempt))
                continue
            if resp.status_code < 400:
                return self._answer(resp)
            if attempt and resp.status_code in done_on_retry:
                return None
            err = _error(resp)
            if isinstance(err, Unavailable) and not last:
                time.sleep(min(err.retry_after or _backoff(attempt), 5.0))
                continue
            raise err
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, resp: requests.Response) -> dict:
        """A success's JSON object; ConnectionFailed when what answered is not the API (a
        wrong URL, a proxy's or a captive portal's page)."""
        if not resp.content:
            return {}
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            kind = resp.headers.get("Content-Type") or "no Content-Type"
            raise ConnectionFailed(
                f"{self.url} answered HTTP {resp.status_code} with {kind}, not the API's JSON; "
                f"is it the gpu-orchestrator API?"
            )
        return data

    # ------------------------------------------------------------------ calls
    def allocate(
        self,
        service_name: str,
        workload_type: str = "generic",
        workload_data: dict | None = None,
        *,
        required_gpus: int | None = None,
        min_memory_mb: int | None = None,
        gpu_model: str | None = None,
        nodes: list[str] | None = None,
        priority: int | None = None,
        ttl: Any = None,
        sharing: str | None = None,
        depends_on: list[str] | None = None,
        depends_on_mode: str | None = None,
        preferred_gpus: list[int] | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Allocation:
        """``POST /gpu/allocate``: granted (``status == "allocated"``) or queued. ``ttl``: the
        lease, seconds or ``"10m"``. A fresh Idempotency-Key is made when none is given, so the
        retries after a network error cannot make two requests."""
        body: dict[str, Any] = {
            "service_name": service_name,
            "workload_type": workload_type,
            "workload_data": dict(workload_data or {}),
        }
        for key, value in (
            ("required_gpus", required_gpus),
            ("min_memory_mb", min_memory_mb),
            ("gpu_model", gpu_model),
            ("nodes", nodes),
            ("priority", priority),
            ("sharing", sharing),
            ("depends_on", depends_on),
            ("depends_on_mode", depends_on_mode),
            ("preferred_gpus", preferred_gpus),
            ("webhook_url", webhook_url),
            ("webhook_events", webhook_events),
        ):
            if value is not None:
                body[key] = list(value) if isinstance(value, (list, tuple)) else value
        if ttl is not None:
            body["ttl_seconds"] = math.ceil(_seconds(ttl, "ttl"))
        key = idempotency_key or f"client-{uuid.uuid4().hex}"
        return Allocation(
            self._call("POST", "/gpu/allocate", body=body, headers={"Idempotency-Key": key})
        )

    def get(self, request_id: str, wait: float = 0) -> Allocation:
        """``GET /gpu/requests/<id>``; ``wait`` > 0 holds the call while it is queued."""
        return Allocation(self._call("GET", f"/gpu/requests/{request_id}", **self._wait_args(wait)))

    def get_allocation(self, allocation_id: str, wait: float = 0) -> Allocation:
        """``GET /gpu/allocations/<id>``; ``wait`` > 0 holds the call while it is live."""
        return Allocation(
            self._call("GET", f"/gpu/allocations/{allocation_id}", **self._wait_args(wait))
        )

    def _wait_args(self, wait: float) -> dict:
        if not wait:
            return {}
        wait = min(float(wait), 60.0)
        return {"params": {"wait": f"{wait:.3f}"}, "timeout": wait + self.timeout}

    def wait(
        self,
        request_id: str,
        timeout: Any = None,
        *,
        on_update: Callable[[Allocation], None] | None = None,
    ) -> Allocation:
        """Wait (long-polls) until the request is granted and return the allocation.

        ``timeout``: seconds or ``"5m"``; None waits as long as it takes. ``on_update`` is called
        with the record at once, then each time its status, position, reason or ETA changes
        (the last call sees it granted). Raises
        WaitTimeout (still queued), NotGranted (cancelled, timed out). The API being
        unreachable for a while does not end the wait: the request is still queued there."""
        deadline = None if timeout is None else time.monotonic() + _seconds(timeout, "timeout")
        seen: tuple | None = None
        rec: Allocation | None = None
        early = 0
        longest = LONG_POLL if on_update is None else PROGRESS_POLL
        while True:
            remaining = longest if deadline is None else deadline - time.monotonic()
            if rec is not None and remaining <= 0:
                raise WaitTimeout(rec)
            chunk = max(0.0, min(longest, remaining))
            if rec is None and on_update is not None:
                chunk = 0.0  # read at once: a long-poll would hold the queued state back
            t0 = time.monotonic()
            try:
                rec = self.get(request_id, wait=chunk)
            except (ConnectionFailed, Unavailable) as exc:
                log.warning("waiting for %s: %s; retrying", request_id, exc)
                if rec is None:
                    raise
                self._pause(deadline, 2.0)
                continue
            state = (rec.status, rec.position, rec.data.get("reason"), rec.data.get("eta"))
            if state != seen:
                seen = state
                if on_update is not None:
                    on_update(rec)
            if rec.status in LIVE:
                return rec
            if rec.status != "queued":
                raise NotGranted(rec)
            # a wait that came back early with nothing changed (the server needed the thread,
            # or does not long-poll): pause a little, longer each time, so this never spins
            if chunk > 0 and time.monotonic() - t0 < chunk / 2:
                early += 1
                self._pause(deadline, min(0.1 * 2**early, 2.0))
            else:
                early = 0

    @staticmethod
    def _pause(deadline: float | None, seconds: float) -> None:
        if deadline is not None:
            seconds = min(seconds, max(0.0, deadline - time.monotonic()))
        time.sleep(seconds)

    def renew(self, allocation_id: str, ttl: Any = None) -> Allocation:
        """Extend the lease by ``ttl`` (default: the allocation's own lease) from now."""
        body = None if ttl is None else {"ttl_seconds": max(1, math.ceil(_seconds(ttl, "ttl")))}
        return Allocation(
            self._call(
                "POST",
                f"/gpu/allocations/{allocation_id}/renew",
                body=body if body is not None else {},
            )
        )

    def release(self, allocation_id: str) -> dict:
        """Give the GPUs back. A retry that finds it already released counts as done."""
        out = self._call(
            "POST", "/gpu/release", body={"allocation_id": allocation_id}, done_on_retry=(404,)
        )
        return out if out is not None else {"status": "released", "allocation_id": allocation_id}

    def cancel(self, request_id: str) -> Allocation:
        """Withdraw a queued request (Conflict when it is no longer queued)."""
        out = self._call("DELETE", f"/gpu/requests/{request_id}", done_on_retry=(409,))
        return Allocation(out) if out is not None else self.get(request_id)

    def withdraw(self, request_id: str) -> str:
        """Cancel the request, or release it if it was granted in the meantime; returns what
        was done (``cancelled``, ``released``, or the status it had already ended in)."""
        try:
            return self.cancel(request_id).status
        except Conflict as exc:
            status = exc.details.get("status")
            if status not in LIVE:
                return str(status)
        try:
            self.release(request_id)
        except NotFound:
            return "ended"
        return "released"

    def status(self) -> list[dict]:
        """Every GPU with telemetry and allocation state (``GET /gpu/status``)."""
        return self._call("GET", "/gpu/status")["gpus"]

    def workload(
        self, workload_type: str = "generic", workload_data: dict | None = None, **fields: Any
    ) -> dict:
        """The requirements ``allocate`` would use (``POST /gpu/workload``), no side effects;
        ``fields``: required_gpus, min_memory_mb, gpu_model, nodes."""
        body = {
            "workload_type": workload_type,
            "workload_data": dict(workload_data or {}),
            **{k: v for k, v in fields.items() if v is not None},
        }
        return self._call("POST", "/gpu/workload", body=body)

    # ------------------------------------------------------------------ the whole life
    @contextlib.contextmanager
    def allocation(
        self,
        service_name: str,
        workload_type: str = "generic",
        workload_data: dict | None = None,
        *,
        wait: Any = True,
        on_update: Callable[[Allocation], None] | None = None,
        on_change: Callable[[Allocation], None] | None = None,
        **fields: Any,
    ) -> Iterator[Allocation]:
        """Allocate, wait for the grant, keep the lease renewed, release on the way out.

        ``wait``: True waits as long as it takes, a duration bounds it (WaitTimeout, and the
        request is withdrawn), False raises WaitTimeout at once when the request is queued.
        ``on_change`` is called from a background thread when the allocation changes state
        while the block runs (``preempting``: checkpoint and leave; ``expired``). The other
        keyword arguments are ``allocate``'s."""
        alloc = self.allocate(service_name, workload_type, workload_data, **fields)
        if alloc.status == "queued":
            try:
                if wait is False:
                    raise WaitTimeout(alloc)
                alloc = self.wait(alloc.id, None if wait is True else wait, on_update=on_update)
            except BaseException:
                with contextlib.suppress(ClientError):
                    self.withdraw(alloc.id)
                raise
        keeper = LeaseKeeper(self, alloc, on_change=on_change).start()
        try:
            yield alloc
        finally:
            keeper.stop()
            try:
                self.release(alloc.id)
            except NotFound:
                pass  # it had already ended (expired, or released by an admin)
            except ClientError as exc:
                log.warning(
                    "could not release %s (%s); its lease runs out at %s",
                    alloc.id,
                    exc,
                    alloc.data.get("expires_at"),
                )


def _why(exc: requests.RequestException) -> str:
    """A short reason for a failed connection (requests' own text runs to three lines)."""
    text = str(exc)
    for needle in (
        "Connection refused",
        "Name or service not known",
        "Connection reset",
        "No route to host",
        "Network is unreachable",
    ):
        if needle in text:
            return needle.lower()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return exc.__class__.__name__


def _backoff(attempt: int) -> float:
    return min(0.2 * 2**attempt, 2.0) * (0.5 + random.random() / 2)


class LeaseKeeper:
    """Keeps an allocation alive while a job runs, in two daemon threads.

    * renewer: renews every third of the lease. When the API cannot be reached it keeps
      retrying (every few seconds) until the lease would have ended, and then reports the
      allocation ``lost`` through ``on_change``.
    * watcher: long-polls ``GET /gpu/allocations/<id>?wait=`` and reports every change of
      state (``preempting``, ``expired``, ``released`` by someone else) through ``on_change``
      at once, without waiting for the next renewal.

    ``alloc`` is updated in place with what the API last said.
    """

    def __init__(
        self,
        client: Client,
        alloc: Allocation,
        on_change: Callable[[Allocation], None] | None = None,
    ):
        self.client = client
        self.alloc = alloc
        self.on_change = on_change
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reported = alloc.status
        self._threads: list[threading.Thread] = []

    def start(self) -> LeaseKeeper:
        for target, name in ((self._renew, "lease-renewer"), (self._watch, "lease-watcher")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _report(self, data: dict) -> None:
        with self._lock:
            self.alloc.data.update(data)
            status = self.alloc.status
            if status == self._reported or self._stop.is_set():
                return
            self._reported = status
        log.debug("allocation %s is now %s", self.alloc.id, status)
        if self.on_change is not None:
            try:
                self.on_change(self.alloc)
            except Exception:  # noqa: BLE001 - a callback's failure must not stop renewals
                log.exception("on_change callback failed")

    def _renew(self) -> None:
        lease = self.alloc.lease_seconds
        if not lease or lease <= 0:
            return  # no expiry: nothing to renew
        interval = lease / 3
        ends = time.monotonic() + lease
        due = time.monotonic() + interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            try:
                rec = self.client.renew(self.alloc.id)
            except (ConnectionFailed, ServerError) as exc:
                if time.monotonic() >= ends:
                    log.warning(
                        "could not renew %s before its lease ended (%s)", self.alloc.id, exc
                    )
                    self._report({"status": "lost"})
                    return
                log.warning(
                    "could not renew %s (%s); retrying until its lease ends", self.alloc.id, exc
                )
                due = min(time.monotonic() + min(interval, 5.0), ends)
                continue
            except Conflict as exc:  # not live any more (preempting, expired, released)
                self._report({"status": exc.details.get("status") or "ended"})
                if exc.details.get("status") in LIVE:
                    due = time.monotonic() + min(interval, 5.0)
                    continue
                return
            except NotFound:
                self._report({"status": "expired"})
                return
            except ClientError as exc:  # 401/403: a key change; say so, keep trying
                log.warning("could not renew %s (%s)", self.alloc.id, exc)
                due = time.monotonic() + interval
                continue
            lease = rec.lease_seconds or lease
            interval = lease / 3
            ends = time.monotonic() + lease
            due = time.monotonic() + interval
            log.debug("renewed %s until %s", self.alloc.id, rec.data.get("expires_at"))
            self._report(rec.data)

    def _watch(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                rec = self.client.get_allocation(self.alloc.id, wait=LONG_POLL)
            except NotFound:
                self._report({"status": "expired"})
                return
            except ClientError:
                self._stop.wait(2.0)  # unreachable: the renewer decides when it is lost
                continue
            if self._stop.is_set():
                return
            self._report(rec.data)
            if rec.status not in LIVE:
                return
            if time.monotonic() - t0 < LONG_POLL / 2 and rec.status == self._reported:
                self._stop.wait(0.5)  # came back early unchanged: do not spin
