"""API-key authentication: who is calling, and are they an admin.

Keys come from ``auth.api_keys`` (key -> principal). A key written as ``sha256:<hex>`` is stored
hashed, so plaintext keys need not sit in config files; the presented key is hashed and compared.
Every comparison uses :func:`hmac.compare_digest` against every configured key, so timing does
not reveal which prefix matched. Keys are never logged: only the principal is.

The key travels in ``auth.header_name`` (default ``X-API-Key``) or as ``Authorization: Bearer``.
Paths in ``auth.public_paths`` need no key; an entry ending in ``*`` is a prefix. The sign-in
page and the console's static files are always open (:data:`ALWAYS_PUBLIC`).

Browsers sign in once at ``/login`` and then carry a session cookie (:mod:`app.sessions`): it
opens every route with the principal's rights, and a state-changing request made with it needs
the session's CSRF token. A browser asking for a page without a key or session is redirected
to ``/login``; API clients keep getting a JSON 401.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Flask, redirect, request, url_for

from app import sessions
from app.errors import Forbidden, Unauthorized
from app.flask_context import current_request, request_globals
from app.settings import Settings

log = logging.getLogger("gpu_orchestrator.auth")


class Authenticator:
    """Resolves a presented key to a principal in constant time per configured key."""

    def __init__(self, api_keys: dict[str, str], admins: list[str] | tuple[str, ...] = ()):
        # Hash plaintext keys too: every comparison is then between two 32-byte digests.
        self._digests: list[tuple[bytes, str]] = []
        for key, principal in api_keys.items():
            if key.startswith("sha256:"):
                digest = bytes.fromhex(key[len("sha256:") :])
            else:
                digest = hashlib.sha256(key.encode()).digest()
            self._digests.append((digest, principal))
        self.admins = frozenset(admins)

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        return cls(settings.auth.api_keys, settings.auth.admins)

    def principal_for(self, key: str | None) -> str | None:
        """The principal owning ``key``, or None. Checks every key (no early exit)."""
        if not key:
            return None
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, principal in self._digests:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found

    def is_admin(self, principal: str | None) -> bool:
        return principal is not None and principal in self.admins

    def digest_for(self, key: str | None) -> tuple[bytes, str] | None:
        """(digest, principal) of a valid key, for the session cookie; None otherwise."""
        principal = self.principal_for(key)
        if principal is None or key is None:
            return None
        return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest(), principal

    def digests(self) -> list[tuple[bytes, str]]:
        """Every configured key's digest and principal (sessions check theirs is still here)."""
        return list(self._digests)


#: Always open with auth on: sign-in and sign-out (they check what they need themselves) and the
#: console's static files (no data in them).
ALWAYS_PUBLIC = ["/login", "/logout", "/static/console/*"]


def presented_key(header_name: str) -> str | None:
    """The key from the configured header, else from ``Authorization: Bearer``."""
    headers = current_request().headers
    key = headers.get(header_name)
    if key:
        return key.strip()
    authz = headers.get("Authorization", "")
    scheme, _, token = authz.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def is_public(path: str, public_paths: list[str]) -> bool:
    for entry in public_paths:
        if entry.endswith("*"):
            if path.startswith(entry[:-1]):
                return True
        elif path == entry:
            return True
    return False


def current_principal() -> str | None:
    """The authenticated principal of this request (None when auth is off)."""
    return request_globals().get("principal")


def current_is_admin() -> bool:
    """True for admins, and for everyone when auth is off (nothing to own then)."""
    return bool(request_globals().get("is_admin", True))


def current_session() -> sessions.Session | None:
    """The browser session this request came with (None: a header key, or no auth)."""
    return request_globals().get("session")


def wants_page() -> bool:
    """A browser navigating: a GET that prefers HTML (browsers send ``Accept: text/html,...``
    for a page). Scripts (``*/*`` or ``application/json``) keep getting a JSON 401."""
    if request.method not in ("GET", "HEAD"):
        return False
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html"


def init_app(app: Flask, settings: Settings, redis=None) -> None:
    """Require a key or a session on every non-public route when ``auth.enabled``."""
    cfg = settings.auth
    authenticator = Authenticator.from_settings(settings)
    app.extensions["gpu_auth"] = authenticator
    manager = sessions.SessionManager(settings, redis, authenticator.digests)
    app.extensions["gpu_sessions"] = manager
    if not cfg.enabled:
        return
    public = list(cfg.public_paths) + ALWAYS_PUBLIC
    header = cfg.header_name

    @app.before_request
    def _authenticate():
        req, ctx = current_request(), request_globals()
        ctx.principal, ctx.is_admin, ctx.session = None, False, None
        if req.method == "OPTIONS" or is_public(req.path, public):
            return None
        key = presented_key(header)
        if key is None:
            session = manager.load(req.cookies.get(sessions.COOKIE))
            if session is None:
                if wants_page():
                    return redirect(
                        url_for(
                            "console.login",
                            next=req.full_path if req.query_string else req.path,
                        )
                    )
                raise Unauthorized(
                    f"an API key is required (header {header} or Authorization: Bearer)"
                )
            if req.method not in sessions.SAFE_METHODS and not _csrf_ok(session):
                raise Forbidden(
                    "this request was made with a session cookie; it needs the "
                    f"session's CSRF token ({sessions.CSRF_HEADER} header)",
                    details={"header": sessions.CSRF_HEADER},
                )
            ctx.principal, ctx.session = session.principal, session
            ctx.is_admin = authenticator.is_admin(session.principal)
            return None
        principal = authenticator.principal_for(key)
        if principal is None:
            log.info("rejected an invalid API key")
            raise Unauthorized("invalid API key")
        ctx.principal = principal
        ctx.is_admin = authenticator.is_admin(principal)
        return None

    def _csrf_ok(session) -> bool:
        # rq-dashboard's own pages post without our token: for them a same-origin request
        # (Origin header present and ours) is the check; SameSite=Strict already keeps the
        # cookie off cross-site requests.
        if is_public(request.path, ["/rq/*"]) and request.headers.get("Origin"):
            return sessions.same_origin(request)
        return manager.csrf_ok(session, request)
