"""X-Request-ID: taken from the request when sane, else generated; echoed on every response.

The id is also put in :data:`app.logs.request_id_var`, so every log line written while serving
the request carries it.
"""

from __future__ import annotations

import itertools
import os
import re

from flask import Flask

from app.flask_context import current_request, request_globals
from app.logs import request_id_var

HEADER = "X-Request-ID"
#: Accepted client-supplied ids; anything else (too long, odd characters) is replaced.
_VALID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


_state: dict = {"pid": None, "prefix": "", "counter": itertools.count()}


def new_id() -> str:
    """A unique id without a syscall per call: a random per-process prefix plus a counter.

    ``uuid4()`` reads the kernel's random source on every call, which costs a syscall per
    request (expensive in sandboxed kernels); ids need to be unique, not unpredictable.
    The prefix is re-drawn after a fork (gunicorn workers), so two workers never share it.
    """
    pid = os.getpid()
    if _state["pid"] != pid:
        _state.update(pid=pid, prefix=os.urandom(8).hex(), counter=itertools.count())
    return f"{_state['prefix']}{next(_state['counter']):08x}"


def init_app(app: Flask) -> None:
    """Register first, so the id exists before auth or anything else can fail."""

    @app.before_request
    def _assign_request_id():
        rid = current_request().headers.get(HEADER, "")
        if not _VALID.match(rid):
            rid = new_id()
        ctx = request_globals()
        ctx.request_id = rid
        ctx._request_id_token = request_id_var.set(rid)

    @app.after_request
    def _echo_request_id(response):
        response.headers[HEADER] = request_globals().get("request_id") or new_id()
        return response

    @app.teardown_request
    def _forget_request_id(exc):
        token = request_globals().pop("_request_id_token", None)
        if token is not None:
            try:
                request_id_var.reset(token)
            except ValueError:  # set in another context; nothing to undo here
                pass
