"""The operators' console: the fleet page at ``/``, browser sign-in, and the page's JSON.

Everything is served from the package (``app/templates``, ``app/static/console``): no CDN, no
build step. The page polls ``GET /console/state`` (one engine snapshot, a few KB) every two
seconds instead of holding a server-sent-events stream open: a poll costs one short request,
where a stream would hold one of the few gunicorn worker threads per open browser tab.

Sign-in (``/login``, ``/logout``) is described in :mod:`app.sessions`.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import (
    Blueprint,
    current_app,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)

from app import auth, sessions, waiting
from app.api import render
from app.errors import Forbidden

bp = Blueprint("console", __name__)

#: Milliseconds between two polls of the page.
POLL_MS = 2000
#: Latest events shown.
EVENTS_SHOWN = 40
#: Queued requests shown (the head of the queue; the counts give the whole depth).
QUEUE_SHOWN = 200
#: Headers of every HTML page here: our own scripts and styles only, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

#: Headers of every other HTML answer (rq-dashboard under /rq, Swagger UI at /docs): their
#: scripts are their own, but no other site's page may frame them (with auth off no cookie is
#: needed to click their buttons).
NO_FRAMING = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


@bp.after_app_request
def _no_framing(resp):
    if resp.mimetype == "text/html":
        for name, value in NO_FRAMING.items():
            resp.headers.setdefault(name, value)
    return resp


def _settings():
    return current_app.extensions["gpu_settings"]


def _page(html: str, status: int = 200):
    resp = make_response(html, status)
    resp.headers.update(PAGE_HEADERS)
    return resp


@bp.get("/")
def fleet():
    """The fleet page (the data arrives by polling /console/state)."""
    session = auth.current_session()
    return _page(
        render_template(
            "console.html",
            principal=auth.current_principal(),
            is_admin=auth.current_is_admin(),
            jobs="rq_dashboard" in current_app.blueprints,  # mounted (app.dashboard)
            auth_enabled=_settings().auth.enabled,
            csrf_token=session.csrf_token if session else "",
            signed_in=session is not None,
            poll_ms=POLL_MS,
        )
    )


@bp.get("/console/state")
def state():
    """Nodes with their GPUs and holders, the queue with reasons, the latest events."""
    engine = current_app.extensions["gpu_engine"]
    counts = engine.counts(nodes=True)
    # every live allocation (at most one per GPU share) and the head of the queue: the page's
    # cost must not grow with a long queue
    snap = engine.snapshot(limit=counts["allocations_active"] + QUEUE_SHOWN)
    why = waiting.annotate(engine, snap["queue"])  # the API's reason and eta, one rule
    for q in snap["queue"]:
        q.update(why.get(q["id"], {}))
    out: dict[str, Any] = render.fleet(snap, engine.latest_events(EVENTS_SHOWN), counts)
    out["viewer"] = {
        "principal": auth.current_principal(),
        "admin": auth.current_is_admin(),
        "auth": _settings().auth.enabled,
    }
    resp = jsonify(out)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/login")
def login():
    """The sign-in form (with auth off there is nothing to sign in to: go on)."""
    target = sessions.safe_next(request.args.get("next"))
    if not _settings().auth.enabled:
        return redirect(target)
    manager = current_app.extensions["gpu_sessions"]
    if manager.load(request.cookies.get(sessions.COOKIE)) is not None:
        return redirect(target)
    return _page(render_template("login.html", next=target, error=None))


@bp.post("/login")
def login_submit():
    """Check the key; on success set the session cookie and go back where the user was."""
    target = sessions.safe_next(request.form.get("next"))
    if not _settings().auth.enabled:
        return redirect(target, code=303)
    if not sessions.same_origin(request):
        raise Forbidden("sign-in must come from this site's own form")
    found = current_app.extensions["gpu_auth"].digest_for(request.form.get("api_key", ""))
    if found is None:
        return _page(
            render_template("login.html", next=target, error="That API key is not valid."), 401
        )
    digest, _principal = found
    manager = current_app.extensions["gpu_sessions"]
    resp = redirect(target, code=303)
    manager.set_cookie(resp, manager.issue(found[1], digest), request)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.post("/logout")
def logout():
    """End the browser session (the cookie is cleared; nothing is kept server-side)."""
    # another site's form comes without the (SameSite=Strict) cookie, so no token is checked
    # below, and its answer would still clear the cookie
    if not sessions.same_origin(request):
        raise Forbidden("sign-out must come from this site's own page")
    manager = current_app.extensions["gpu_sessions"]
    session = manager.load(request.cookies.get(sessions.COOKIE))
    if session is not None and not hmac.compare_digest(
        request.form.get(sessions.CSRF_FIELD, "") or request.headers.get(sessions.CSRF_HEADER, ""),
        session.csrf_token,
    ):
        raise Forbidden("sign-out needs the session's CSRF token")
    resp = redirect(url_for("console.login"), code=303)
    manager.clear_cookie(resp, request)
    return resp
