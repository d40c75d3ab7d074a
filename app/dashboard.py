"""rq-dashboard mounted under the API at ``/rq``, behind the API's own auth.

rq-dashboard has no authentication of its own. Every path under ``/rq`` needs an API key like
the rest of the API (it is not in ``auth.public_paths``), and with auth on only principals in
``auth.admins`` may open it: it shows every team's jobs and can requeue them.

Notes on rq-dashboard 0.9:

- It imports ``six`` without declaring it; ``setup.cfg`` lists it.
- ``RQ_DASHBOARD_REDIS_URL`` is set as a list (one instance), which its templates expect.
- Job deletion (delete, empty queue) is disabled unless ``dashboard.allow_delete`` is true.
- A ``redis+sentinel://`` URL is read by its own parser (redis-sentinel-url, same URL form as
  ours), which builds a ``Sentinel(...).master_for`` client; the password comes from
  ``redis.sentinel.password`` through its ``RQ_DASHBOARD_REDIS_(SENTINEL_)PASSWORD`` settings.
- It reads jobs with a module-wide serializer; we set it to RQ's JSON serializer, the one every
  role of this service uses. That setting is process-wide, which is fine: one process serves one
  deployment.
"""

from __future__ import annotations

from typing import Any

from app import queues
from app.settings import SENTINEL_SCHEME, Settings, sentinel_target

URL_PREFIX = "/rq"


def init_app(app: Any, settings: Settings, redis_url: str) -> bool:
    """Register rq-dashboard's blueprint on ``app`` under ``/rq``; False when disabled."""
    if not settings.dashboard.enabled or not redis_url:
        return False
    import rq_dashboard
    from rq_dashboard import web

    app.config["RQ_DASHBOARD_REDIS_URL"] = [redis_url]
    if redis_url.startswith(SENTINEL_SCHEME + "://"):  # it follows the primary by itself
        password = sentinel_target(settings, redis_url).password or None
        app.config["RQ_DASHBOARD_REDIS_SENTINEL_PASSWORD"] = password
        app.config["RQ_DASHBOARD_REDIS_PASSWORD"] = password
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = not settings.dashboard.allow_delete
    app.config.setdefault("RQ_DASHBOARD_POLL_INTERVAL", 2500)
    web.config.serializer = queues.SERIALIZER
    web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=URL_PREFIX)

    @app.before_request
    def _admins_only():  # runs after the API's authentication, registered earlier
        from flask import request

        from app.auth import current_is_admin
        from app.errors import Forbidden

        path = request.path
        if (path == URL_PREFIX or path.startswith(URL_PREFIX + "/")) and not current_is_admin():
            raise Forbidden("rq-dashboard is open to admins only (auth.admins)")

    return True
