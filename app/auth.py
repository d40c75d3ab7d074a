"""API-key authentication: who is calling, and are they an admin.

Keys come from ``auth.api_keys`` (key -> principal). A key written as ``sha256:<hex>`` is stored
hashed, so plaintext keys need not sit in config files; the presented key is hashed and compared.
Every comparison uses :func:`hmac.compare_digest` against every configured key, so timing does
not reveal which prefix matched. Keys are never logged: only the principal is.

The key travels in ``auth.header_name`` (default ``X-API-Key``) or as ``Authorization: Bearer``.
Paths in ``auth.public_paths`` need no key; an entry ending in ``*`` is a prefix.
"""
from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Flask, g, request

from app.errors import Unauthorized
from app.settings import Settings

log = logging.getLogger("gpu_orchestrator.auth")


class Authenticator:
    """Resolves a presented key to a principal in constant time per configured key."""

    def __init__(self, api_keys: dict[str, str], admins: list[str] | tuple[str, ...] = ()):
        # Hash plaintext keys too: every comparison is then between two 32-byte digests.
        self._digests: list[tuple[bytes, str]] = []
        for key, principal in api_keys.items():
            if key.startswith("sha256:"):
                digest = bytes.fromhex(key[len("sha256:"):])
            else:
                digest = hashlib.sha256(key.encode()).digest()
            self._digests.append((digest, principal))
        self.admins = frozenset(admins)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Authenticator":
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


def presented_key(header_name: str) -> str | None:
    """The key from the configured header, else from ``Authorization: Bearer``."""
    key = request.headers.get(header_name)
    if key:
        return key.strip()
    authz = request.headers.get("Authorization", "")
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
    return g.get("principal")


def current_is_admin() -> bool:
    """True for admins, and for everyone when auth is off (nothing to own then)."""
    return bool(g.get("is_admin", True))


def init_app(app: Flask, settings: Settings) -> None:
    """Require a key on every non-public route when ``auth.enabled``."""
    cfg = settings.auth
    authenticator = Authenticator.from_settings(settings)
    app.extensions["gpu_auth"] = authenticator
    if not cfg.enabled:
        return
    public = list(cfg.public_paths)
    header = cfg.header_name

    @app.before_request
    def _authenticate():
        g.principal, g.is_admin = None, False
        if request.method == "OPTIONS" or is_public(request.path, public):
            return None
        key = presented_key(header)
        if key is None:
            raise Unauthorized(f"an API key is required (header {header} or "
                               "Authorization: Bearer)")
        principal = authenticator.principal_for(key)
        if principal is None:
            log.info("rejected an invalid API key")
            raise Unauthorized("invalid API key")
        g.principal = principal
        g.is_admin = authenticator.is_admin(principal)
        return None
