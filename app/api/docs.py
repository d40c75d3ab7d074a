"""OpenAPI documentation of the views: flask-smorest's public ``Blueprint.doc``.

It wraps each view in one more function per decorator (cost measured in docs/benchmarks.md).
Setting flask-smorest's private ``_apidoc`` attribute directly, as ``app.api.doc`` once did,
saved that wrapper but depended on its internals (issue 13 part 5). A module of its own so the
views need not import the ``app.api`` package that registers them (tests/test_imports.py).
"""

from __future__ import annotations

from flask_smorest import Blueprint

doc = Blueprint.doc
