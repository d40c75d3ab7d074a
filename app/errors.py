"""Domain errors: one base class carrying an HTTP status and a stable code.

::

    OrchestratorError (500, internal_error)
    ├── BadRequest (400, bad_request)
    ├── ValidationFailed (422, validation_error)
    ├── Unsatisfiable (422, unsatisfiable)
    ├── Unauthorized (401, unauthorized)
    ├── Forbidden (403, forbidden)
    ├── NotFound (404, not_found)
    ├── Conflict (409, conflict)
    ├── PayloadTooLarge (413, payload_too_large)
    ├── QueueFull (429, queue_full)
    │   ├── OwnerQueueFull (429, owner_queue_full)
    │   └── TenantQueueFull (429, tenant_queue_full)
    └── Unavailable (503, unavailable)
        └── EngineUpgrading (503, engine_upgrading)

The API's app-wide handler turns any of them into
``{"error": {"code", "message", "details"}}`` with the status; the engine maps each Lua error
code to one of these in one table.
"""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    status = 500
    code = "internal_error"
    retry_after: int | None = None

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, **context: Any):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.context = context

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(OrchestratorError):
    status, code = 400, "bad_request"


class ValidationFailed(OrchestratorError):
    status, code = 422, "validation_error"


class Unsatisfiable(OrchestratorError):
    status, code = 422, "unsatisfiable"


class Unauthorized(OrchestratorError):
    status, code = 401, "unauthorized"


class Forbidden(OrchestratorError):
    status, code = 403, "forbidden"


class NotFound(OrchestratorError):
    status, code = 404, "not_found"


class Conflict(OrchestratorError):
    status, code = 409, "conflict"


class PayloadTooLarge(OrchestratorError):
    status, code = 413, "payload_too_large"


class QueueFull(OrchestratorError):
    status, code = 429, "queue_full"
    retry_after = 5


class OwnerQueueFull(QueueFull):
    """The caller's own share of the queue is full; other owners can still queue."""

    code = "owner_queue_full"


class TenantQueueFull(QueueFull):
    """The caller's tenant has its ``max_queued`` requests queued; other tenants can still
    queue."""

    code = "tenant_queue_full"


class Unavailable(OrchestratorError):
    status, code = 503, "unavailable"
    retry_after = 2


class EngineUpgrading(Unavailable):
    """The engine's Redis Functions library was replaced by another version while the call ran
    (replicas of two releases share one Redis during a rolling upgrade). Nothing was applied;
    the client should retry after ``Retry-After``."""

    code = "engine_upgrading"
    retry_after = 1
