"""X-Request-ID: taken from the request when sane, else generated; echoed on every response.

The id is also put in :data:`app.logs.request_id_var`, so every log line written while serving
the request carries it.
"""
from __future__ import annotations

import re
import uuid

from flask import Flask, g, request

from app.logs import request_id_var

HEADER = "X-Request-ID"
#: Accepted client-supplied ids; anything else (too long, odd characters) is replaced.
_VALID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def current() -> str:
    return g.get("request_id") or "-"


def init_app(app: Flask) -> None:
    """Register first, so the id exists before auth or anything else can fail."""

    @app.before_request
    def _assign_request_id():
        rid = request.headers.get(HEADER, "")
        if not _VALID.match(rid):
            rid = uuid.uuid4().hex
        g.request_id = rid
        g._request_id_token = request_id_var.set(rid)

    @app.after_request
    def _echo_request_id(response):
        response.headers[HEADER] = g.get("request_id") or uuid.uuid4().hex
        return response

    @app.teardown_request
    def _forget_request_id(exc):
        token = g.pop("_request_id_token", None)
        if token is not None:
            try:
                request_id_var.reset(token)
            except ValueError:  # set in another context; nothing to undo here
                pass
