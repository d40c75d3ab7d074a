"""Browser sign-in: a signed session cookie standing in for an API key.

``GET /login`` takes an API key once; the answer sets a cookie holding the principal and a
fingerprint of the key (never the key), signed with itsdangerous and dated. On every request
the cookie is valid only while

- its signature verifies and it is younger than ``auth.session_ttl``, and
- a configured key still has that fingerprint and still belongs to that principal, so removing
  (or re-assigning) a key from the config ends every session opened with it.

The signing secret is ``auth.session_secret`` or, when that is empty, a random one kept in
Redis (``Keys.session_secret()``, created with SET NX), so every replica and worker agrees and
sessions survive restarts.

Cookie flags: ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict`` (other sites cannot
make the browser send it) and ``Secure`` when the request came over https (directly, or as
``X-Forwarded-Proto: https`` from the proxy). A state-changing request authenticated by the
cookie also needs the session's CSRF token (header ``X-CSRF-Token`` or form field
``csrf_token``); the pages carry it in a ``<meta name="csrf-token">`` tag.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import Request, Response
from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

from app.keys import Keys
from app.settings import Settings

COOKIE = "gpuo_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
_SALT = "gpu-orchestrator-session"
#: Methods that change nothing: no CSRF token needed.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Session:
    principal: str
    csrf_token: str


class SessionManager:
    """Issues and checks session cookies for one app (thread-safe; the secret is read once)."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        key_digests: Callable[[], list],
        *,
        clock: Callable[[], float] | None = None,
    ):
        self.ttl = settings.auth.session_ttl
        self._clock = clock
        self._configured = settings.auth.session_secret
        self._redis = redis
        self._secret_key = Keys(settings.redis.prefix).session_secret()
        self._digests = key_digests
        self._lock = threading.Lock()
        self._secret: bytes | None = None

    # ------------------------------------------------------------------ the secret
    def _get_secret(self) -> bytes:
        if self._secret is None:
            with self._lock:
                if self._secret is None:
                    if self._configured:
                        self._secret = self._configured.encode()
                    else:
                        self._redis.set(self._secret_key, secrets.token_hex(32), nx=True)
                        value = self._redis.get(self._secret_key)
                        self._secret = value if isinstance(value, bytes) else str(value).encode()
        return self._secret

    def _serializer(self) -> URLSafeTimedSerializer:
        if self._clock is None:
            return URLSafeTimedSerializer(self._get_secret(), salt=_SALT)
        clock = self._clock

        class ClockSigner(TimestampSigner):
            def get_timestamp(self) -> int:  # itsdangerous' documented hook for the time
                return int(clock())

        return URLSafeTimedSerializer(self._get_secret(), salt=_SALT, signer=ClockSigner)

    def _fingerprint(self, digest: bytes) -> str:
        return hmac.new(self._get_secret(), b"key|" + digest, hashlib.sha256).hexdigest()[:32]

    def _csrf(self, nonce: str) -> str:
        return hmac.new(self._get_secret(), b"csrf|" + nonce.encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ issue and check
    def issue(self, principal: str, digest: bytes) -> str:
        """The cookie value for a principal who just presented the key with ``digest``."""
        return self._serializer().dumps(
            {"p": principal, "k": self._fingerprint(digest), "n": secrets.token_urlsafe(16)}
        )

    def load(self, value: str | None) -> Session | None:
        """The session a cookie value stands for, or None (bad, expired, or key removed)."""
        if not value or len(value) > 4096:
            return None
        try:
            data = self._serializer().loads(value, max_age=self.ttl)
        except BadSignature:  # SignatureExpired is a BadSignature too
            return None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("p", "k", "n")
        ):
            return None
        for digest, principal in self._digests():
            if hmac.compare_digest(self._fingerprint(digest), data["k"]):
                if principal != data["p"]:
                    return None
                return Session(principal, self._csrf(data["n"]))
        return None

    @staticmethod
    def csrf_ok(session: Session, request: Request) -> bool:
        """True when the request carries the session's CSRF token."""
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.mimetype in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            sent = request.form.get(CSRF_FIELD)
        return bool(sent) and hmac.compare_digest(sent, session.csrf_token)

    # ------------------------------------------------------------------ the cookie
    def set_cookie(self, response: Response, value: str, request: Request) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=int(self.ttl),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=is_https(request),
        )

    @staticmethod
    def clear_cookie(response: Response, request: Request) -> None:
        response.delete_cookie(
            COOKIE, path="/", httponly=True, samesite="Strict", secure=is_https(request)
        )


def is_https(request: Request) -> bool:
    """Came over https, directly or through a proxy that says so (only ever adds Secure)."""
    return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def same_origin(request: Request) -> bool:
    """False only when the browser says the request came from another site: its ``Origin``
    names another host. Ports are not compared (a proxy may pass ``Host`` without one, as
    deploy/nginx.conf does), which matches what SameSite cookies call the same site."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # unparsable ("http://[", an unclosed IPv6 bracket): not a site of ours
        return False
    host = request.headers.get("X-Forwarded-Host") or request.host
    return _hostname(netloc) == _hostname(host)


def _hostname(netloc: str) -> str:
    try:
        return (urlsplit("//" + netloc.split(",")[0].strip()).hostname or "").lower()
    except ValueError:
        return ""


def safe_next(target: str | None) -> str:
    """A local path to return to after sign-in; anything else (another host) becomes ``/``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 0x20 for c in target):
        return "/"
    return target
