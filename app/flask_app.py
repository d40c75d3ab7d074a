"""The API's Flask class: Flask with ``ensure_sync`` remembered per function.

Flask passes every request hook and view through :meth:`Flask.ensure_sync` on every request
(~10 times per request here), and each call asks ``inspect.iscoroutinefunction`` again. Our
hooks and views are the same function objects for the life of the app, so the answer is kept.
``ensure_sync`` is the method Flask documents for overriding how an app runs its functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask

#: Most functions remembered: the app's hooks and views are a few dozen; anything made per
#: request (which Flask does not do today) is not kept past this.
MAX_REMEMBERED = 1024


class OrchestratorFlask(Flask):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable, Callable] = {}

    def ensure_sync(self, func: Callable) -> Callable:
        try:
            return self._sync[func]
        except KeyError:
            pass
        except TypeError:  # an unhashable callable: nothing to remember it by
            return super().ensure_sync(func)
        sync = super().ensure_sync(func)
        if len(self._sync) < MAX_REMEMBERED:
            self._sync[func] = sync
        return sync
