"""app.flask_context hands out the objects behind Flask's proxies: the same objects the proxies
stand for (a werkzeug upgrade that changed ``_get_current_object`` fails here, not in a
request)."""

from __future__ import annotations

from flask import Flask, current_app, g, request
from werkzeug.local import LocalProxy

from app.flask_context import current_request, request_globals, this_app


def test_the_objects_are_the_ones_the_proxies_stand_for():
    app = Flask(__name__)
    with app.test_request_context("/x?wait=1", method="POST"):
        req, ctx, current = current_request(), request_globals(), this_app()
        for obj in (req, ctx, current):
            assert not isinstance(obj, LocalProxy)
        assert current is app
        assert req.method == request.method == "POST" and req.args["wait"] == "1"
        ctx.seen = 1
        assert g.seen == 1 and current_app.name == current.name
    with app.test_request_context("/y"):  # a new request: new objects
        assert current_request() is not req and "seen" not in request_globals()


def test_the_app_remembers_whether_a_function_is_async_as_flask_answers_it():
    """OrchestratorFlask keeps ensure_sync's answer per function, and answers as Flask does:
    a plain function as it is, an async one never as it is (Flask wraps it, or without the
    async extra refuses it)."""
    from app.flask_app import OrchestratorFlask

    app = OrchestratorFlask(__name__)

    def hook():
        return None

    assert app.ensure_sync(hook) is hook and app.ensure_sync(hook) is hook
    assert hook in app._sync

    async def view():
        return "async"

    for _ in range(2):
        try:
            wrapped = app.ensure_sync(view)
        except RuntimeError as exc:  # no asgiref: Flask's own refusal, each time
            assert "async" in str(exc)
        else:
            assert wrapped is not view
