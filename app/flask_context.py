"""The objects behind Flask's context proxies, for code that runs on every request.

``flask.request``, ``flask.g`` and ``flask.current_app`` are werkzeug ``LocalProxy`` objects:
every attribute read through one finds the current context again. Measured here, one such read
costs ~4 µs against ~0.06 µs on the object itself (~9k interpreter instructions, by
``bench/request_instructions.py``), and our request hooks and the allocate path made 10 of them
per no-op request and 23 per allocate. Code on that path takes the object once with these
functions, through ``_get_current_object()``, the proxies' documented way to the object they
stand for.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Request, current_app, g, request


def current_request() -> Request:
    """The request being served (what ``flask.request`` stands for)."""
    return request._get_current_object()


def request_globals() -> Any:
    """The context's ``flask.g``."""
    return g._get_current_object()


def this_app() -> Flask:
    """The application serving the request (what ``flask.current_app`` stands for)."""
    return current_app._get_current_object()
