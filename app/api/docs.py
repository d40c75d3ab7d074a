"""OpenAPI documentation of the views: flask-smorest's public ``Blueprint.doc``.

It wraps each view in one more function per decorator (cost measured in docs/benchmarks.md).
Setting flask-smorest's private ``_apidoc`` attribute directly, as ``app.api.doc`` once did,
saved that wrapper but depended on its internals (issue 13 part 5). A module of its own so the
views need not import the ``app.api`` package that registers them (tests/test_imports.py).
"""

from __future__ import annotations

import copy

from flask_smorest import Blueprint

doc = Blueprint.doc


def doc_once(*parts: dict):
    """One ``doc`` for several entries, listed as the ``@doc`` decorators they replace would be
    (top first), merged into what the stack of them documented, in the same order (the
    innermost entry's keys first, an outer entry winning a clash): one wrapper per request
    instead of one per entry (the hot routes, issue 13 part 3)."""
    merged: dict = {}
    for part in reversed(parts):
        _merge(merged, copy.deepcopy(part))
    return doc(**merged)


def _merge(into: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
