"""rq-dashboard mounted under the API at ``/rq``, behind the API's own auth.

rq-dashboard has no authentication of its own. Every path under ``/rq`` needs an API key like
the rest of the API (it is not in ``auth.public_paths``), and with auth on only principals in
``auth.admins`` may open it: it shows every team's jobs and can requeue them.

Notes on rq-dashboard 0.9:

- It imports ``six`` without declaring it; ``setup.cfg`` lists it.
- ``RQ_DASHBOARD_REDIS_URL`` is set as a list (one instance), which its templates expect.
- Job deletion (delete, empty queue) is disabled unless ``dashboard.allow_delete`` is true.
- Like ``/admin``, it refuses a request whose ``Origin`` names another site (with auth off too),
  and "requeue all" (which it also answers on GET, where no CSRF check applies) takes POST only.
- A ``redis+sentinel://`` URL is read by its own parser (redis-sentinel-url, same URL form as
  ours), which builds a ``Sentinel(...).master_for`` client; the password comes from
  ``redis.sentinel.password`` through its ``RQ_DASHBOARD_REDIS_(SENTINEL_)PASSWORD`` settings.
- It shows its Redis URL at the top of every page, hiding only a password between ``://`` and
  ``@``; one given as ``?password=`` was shown. It gets the URL without the password
  (:func:`_without_password`), and the password through ``RQ_DASHBOARD_REDIS_PASSWORD``.
  It has no setting for any other connection argument: it builds its client from the URL on
  every request, so an argument such as ``?ssl_password=`` (the passphrase of the TLS client
  key) must stay in the URL it gets. Its HTML pages have each such ``name=value`` (any name
  with ``password`` in it, as ``config show`` hides them) replaced by ``name=***``
  (:func:`_hide_secrets`) before they leave.
- It reads jobs with a module-wide serializer; we set it to RQ's JSON serializer, the one every
  role of this service uses. That setting is process-wide, which is fine: one process serves one
  deployment.
- Its job and workers pages write the JSON of ``data/job/<id>.json`` and ``data/workers.json``
  into the page as HTML (underscore ``<%= %>``). A failed delivery's exception text holds what a
  tenant's webhook receiver answered, so those two answers have their strings HTML-escaped here
  (:func:`_escape_for_page`); the one field its template already escapes is left alone.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from app import queues
from app.settings import SENTINEL_SCHEME, Settings, query_passwords, sentinel_target

URL_PREFIX = "/rq"
#: rq-dashboard's JSON answers that its pages write as HTML, and the fields of each that its
#: template escapes itself (escaping those again would show ``&lt;``).
_RENDERED_AS_HTML = {
    "rq_dashboard.job_info": (),
    "rq_dashboard.list_workers": ("description",),
}


def init_app(app: Any, settings: Settings, redis_url: str) -> bool:
    """Register rq-dashboard's blueprint on ``app`` under ``/rq``; False when disabled."""
    if not settings.dashboard.enabled or not redis_url:
        return False
    import rq_dashboard
    from rq.exceptions import NoSuchJobError
    from rq_dashboard import web

    from app.errors import Forbidden, NotFound

    if redis_url.startswith(SENTINEL_SCHEME + "://"):  # it follows the primary by itself
        password = sentinel_target(settings, redis_url).password or None
        app.config["RQ_DASHBOARD_REDIS_SENTINEL_PASSWORD"] = password
        app.config["RQ_DASHBOARD_REDIS_PASSWORD"] = password
    else:  # redis-py takes a password keyword where the URL has none
        redis_url, password = _without_password(redis_url)
        app.config["RQ_DASHBOARD_REDIS_PASSWORD"] = password
    app.config["RQ_DASHBOARD_REDIS_URL"] = [redis_url]
    hidden = _hide_secrets(redis_url)
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = not settings.dashboard.allow_delete
    app.config.setdefault("RQ_DASHBOARD_POLL_INTERVAL", 2500)
    web.config.serializer = queues.SERIALIZER
    web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=URL_PREFIX)

    from werkzeug.exceptions import MethodNotAllowed

    from app.auth import current_is_admin
    from app.flask_context import current_request
    from app.http_errors import handle_domain
    from app.sessions import same_origin

    # These two hooks run on every request of the API, not only /rq's: each reads the request
    # once (app.flask_context) and imports nothing per call.
    @app.before_request
    def _admins_only():  # runs after the API's authentication, registered earlier
        request = current_request()
        path = request.path
        if not (path == URL_PREFIX or path.startswith(URL_PREFIX + "/")):
            return
        if not current_is_admin():
            raise Forbidden("rq-dashboard is open to admins only (auth.admins)")
        # as for /admin: another site's page cannot drive it, with auth off too
        if not same_origin(request):
            raise Forbidden("rq-dashboard requests from another site's page are refused")
        # it answers GET here too, which no CSRF check covers; its own button posts
        if request.endpoint == "rq_dashboard.requeue_all" and request.method != "POST":
            raise MethodNotAllowed(valid_methods=["POST"])
        # it has one Redis (instance 0); another number was a LookupError, a 500
        if (request.view_args or {}).get("instance_number", 0) != 0:
            raise NotFound("rq-dashboard has one Redis instance: /rq/0/...")

    @app.errorhandler(NoSuchJobError)
    def _job_gone(exc):  # a job that expired (results and failures are kept for a while)
        return handle_domain(NotFound(f"no such job (it may have expired): {exc}"))

    @app.after_request
    def _text_not_html(response):
        endpoint = current_request().endpoint or ""
        keep = _RENDERED_AS_HTML.get(endpoint)
        if keep is not None and response.is_json and response.status_code == 200:
            response.set_data(app.json.dumps(_escape_for_page(response.get_json(), keep)))
        elif (
            hidden
            and endpoint.startswith("rq_dashboard.")
            and response.mimetype == "text/html"
            and not response.direct_passthrough
        ):
            page = response.get_data(as_text=True)
            for shown, instead in hidden:
                page = page.replace(shown, instead)
            response.set_data(page)
        return response

    return True


def _without_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password (in the userinfo or a ``password=`` query argument, as
    redis-py reads them), and that password (None when there is none)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    password = next((v for k, v in query if k == "password"), None)
    if parts.password is not None:
        password = unquote(parts.password)  # redis-py: the userinfo's wins
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = parts.netloc.rpartition("@")[0].partition(":")[0] + "@" + netloc
    if password is None:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "password"])
    # built by hand: urlunsplit drops the "//" of an empty netloc (unix:///path)
    url = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{rest}" if rest else "")
    return url + (f"#{parts.fragment}" if parts.fragment else ""), password


def _hide_secrets(url: str) -> list[tuple[str, str]]:
    """What a page must show instead of each secret query argument of ``url``: as its template
    writes it (HTML-escaped, as Jinja does) and as typed."""
    from markupsafe import escape

    pairs = query_passwords(url)
    return [(str(escape(s)), str(escape(i))) for s, i in pairs] + pairs


def _escape_for_page(value: Any, keep: tuple[str, ...] = ()) -> Any:
    """``value`` with every string HTML-escaped, at any depth, except under the keys in
    ``keep`` (dates and ids come out unchanged: they hold no ``<>&"'``)."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, list):
        return [_escape_for_page(v, keep) for v in value]
    if isinstance(value, dict):
        return {k: v if k in keep else _escape_for_page(v, keep) for k, v in value.items()}
    return value
