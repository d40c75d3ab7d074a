"""Security checks in the chaos issue's spirit: every route, every principal, every secret.

tests/test_auth.py (the API's own tests) checks a hand-written list of routes and the ownership
rules one by one. This module extends it rather than repeating it:

- the route matrix is discovered from the app's URL map, so a route added later cannot escape
  it, and each route is called as nobody, with a wrong key, as the owner, as another principal
  and as an admin, expecting exact statuses;
- the webhook SSRF policy against the spellings attackers use (numeric IPs, userinfo, trailing
  dots, IPv6 forms, redirects), resolved by the real resolver where that matters;
- no configured secret (API keys, the webhook secret, the Redis password) ever shows up in logs,
  config errors or ``config show``.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app import settings as settings_mod
from tests.api_support import assert_error, clock, make_app  # noqa: F401 (fixtures)

OWNER_KEY = "sec-owner-key-7f3a9c1e"
OTHER_KEY = "sec-other-key-2b8d4e6f"
ADMIN_KEY = "sec-admin-key-9a1c3e5b"
KEYS = {OWNER_KEY: "owner", OTHER_KEY: "other", ADMIN_KEY: "root"}
PUBLIC = {"/healthz", "/readyz", "/metrics", "/login", "/logout"}


def hdr(key):
    return {"X-API-Key": key}


@pytest.fixture
def app(make_app):
    # One node of 2 GPUs, so a third exclusive request has to queue.
    return make_app(
        nodes=(("node-a", 2),), auth={"enabled": True, "api_keys": KEYS, "admins": ["root"]}
    )


@pytest.fixture
def client(app):
    return app.test_client()


def _allocate(client, service, gpus=1, key=OWNER_KEY):
    resp = client.post(
        "/gpu/allocate",
        headers=hdr(key),
        json={"service_name": service, "workload_data": {"required_gpus": gpus}},
    )
    assert resp.status_code in (200, 202), resp.get_data(as_text=True)
    return resp.get_json()["request_id"], resp.status_code


@pytest.fixture
def owned(client):
    """A fresh allocation and a fresh queued request of ``owner`` for every call."""

    def make():
        state = client.get("/gpu/list", headers=hdr(ADMIN_KEY)).get_json()
        for req in state["queue"]:
            client.delete(f"/gpu/requests/{req['id']}", headers=hdr(ADMIN_KEY))
        for alloc in state["allocations"]:
            client.post("/gpu/release", headers=hdr(ADMIN_KEY), json={"allocation_id": alloc["id"]})
        alloc, code = _allocate(client, "sec-alloc")
        assert code == 200
        queued, code = _allocate(client, "sec-queued", gpus=2)
        assert code == 202
        return alloc, queued

    return make


# --------------------------------------------------------------------------- route matrix
#
# How to call each protected route, and the exact status each caller gets. ``{alloc}`` and
# ``{queued}`` are the owner's live allocation and queued request, made fresh per caller so one
# caller's success cannot change the next caller's answer.

CALLS = {
    ("POST", "/gpu/allocate"): (
        "/gpu/allocate",
        {"service_name": "sec-new"},
        {"owner": 200, "other": 200, "admin": 200},
    ),
    ("POST", "/gpu/release"): (
        "/gpu/release",
        {"allocation_id": "{alloc}"},
        {"owner": 200, "other": 403, "admin": 200},
    ),
    ("GET", "/gpu/status"): ("/gpu/status", None, {"owner": 200, "other": 200, "admin": 200}),
    ("GET", "/gpu/list"): ("/gpu/list", None, {"owner": 200, "other": 200, "admin": 200}),
    ("GET", "/gpu/tenants"): ("/gpu/tenants", None, {"owner": 200, "other": 200, "admin": 200}),
    ("POST", "/gpu/workload"): (
        "/gpu/workload",
        {"workload_type": "generic"},
        {"owner": 200, "other": 200, "admin": 200},
    ),
    ("GET", "/gpu/requests/<request_id>"): (
        "/gpu/requests/{queued}",
        None,
        {"owner": 200, "other": 200, "admin": 200},
    ),
    ("DELETE", "/gpu/requests/<request_id>"): (
        "/gpu/requests/{queued}",
        None,
        {"owner": 200, "other": 403, "admin": 200},
    ),
    ("GET", "/gpu/allocations/<allocation_id>"): (
        "/gpu/allocations/{alloc}",
        None,
        {"owner": 200, "other": 200, "admin": 200},
    ),
    ("POST", "/gpu/allocations/<allocation_id>/renew"): (
        "/gpu/allocations/{alloc}/renew",
        None,
        {"owner": 200, "other": 403, "admin": 200},
    ),
    ("GET", "/openapi.json"): ("/openapi.json", None, {"owner": 200, "other": 200, "admin": 200}),
    ("GET", "/docs"): ("/docs", None, {"owner": 200, "other": 200, "admin": 200}),
    ("GET", "/docs/assets/<path:filename>"): (
        "/docs/assets/swagger-ui.css",
        None,
        {"owner": 200, "other": 200, "admin": 200},
    ),
    ("GET", "/static/<path:filename>"): (
        "/static/nothing-here.txt",
        None,
        {"owner": 404, "other": 404, "admin": 404},
    ),
    # the console: every principal sees the fleet; /admin is for admins only
    ("GET", "/"): ("/", None, {"owner": 200, "other": 200, "admin": 200}),
    ("GET", "/console/state"): ("/console/state", None, {"owner": 200, "other": 200, "admin": 200}),
    ("GET", "/admin/nodes"): ("/admin/nodes", None, {"owner": 403, "other": 403, "admin": 200}),
    ("POST", "/admin/nodes/<node>/cordon"): (
        "/admin/nodes/node-z/cordon",
        None,
        {"owner": 403, "other": 403, "admin": 404},
    ),
    ("POST", "/admin/nodes/<node>/uncordon"): (
        "/admin/nodes/node-a/uncordon",
        None,
        {"owner": 403, "other": 403, "admin": 200},
    ),
    ("POST", "/admin/nodes/<node>/drain"): (
        "/admin/nodes/node-z/drain",
        None,
        {"owner": 403, "other": 403, "admin": 404},
    ),
    ("DELETE", "/admin/nodes/<node>"): (
        "/admin/nodes/node-a",
        None,
        {"owner": 403, "other": 403, "admin": 409},
    ),
    ("POST", "/admin/gpus/<node>/<int:index>/cordon"): (
        "/admin/gpus/node-a/1/cordon",
        None,
        {"owner": 403, "other": 403, "admin": 200},
    ),
    ("POST", "/admin/gpus/<node>/<int:index>/uncordon"): (
        "/admin/gpus/node-a/1/uncordon",
        None,
        {"owner": 403, "other": 403, "admin": 200},
    ),
    ("POST", "/admin/requests/<request_id>/priority"): (
        "/admin/requests/{queued}/priority",
        {"priority": 7},
        {"owner": 403, "other": 403, "admin": 200},
    ),
}


def _routes(app):
    out = set()
    for rule in app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((method, rule.rule))
    return out


def test_every_route_is_in_the_matrix_or_public(app):
    """A new route must be added to CALLS (or be public on purpose) before this passes."""
    missing = {r for r in _routes(app) if r[1] not in PUBLIC} - set(CALLS)
    assert not missing, f"routes with no auth expectations: {sorted(missing)}"


def _call(client, method, path, body, key=None, headers=None):
    headers = dict(headers or {})
    if key:
        headers["X-API-Key"] = key
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    resp = client.open(path, method=method, **kwargs)
    resp.close()
    return resp


def _fill(template, ids):
    alloc, queued = ids
    if isinstance(template, dict):
        return {k: _fill(v, ids) for k, v in template.items()}
    if isinstance(template, str):
        return template.replace("{alloc}", alloc).replace("{queued}", queued)
    return template


@pytest.mark.parametrize("route", sorted(CALLS), ids=lambda r: f"{r[0]} {r[1]}")
def test_route_matrix(client, owned, route):
    method, _ = route
    path_t, body_t, expect = CALLS[route]
    ids = owned()
    path, body = _fill(path_t, ids), _fill(body_t, ids)
    # Nobody, a wrong key, a wrong bearer token, a key in the wrong header: 401, one JSON shape.
    for key, headers in (
        (None, None),
        ("not-a-key", None),
        (None, {"Authorization": "Bearer not-a-key"}),
        (None, {"X-Api-Key-Typo": OWNER_KEY}),
        (None, {"Authorization": f"Basic {OWNER_KEY}"}),
    ):
        assert_error(_call(client, method, path, body, key, headers), 401, "unauthorized")
    # Each principal on a fresh copy of the owner's resources.
    for who, key in (("other", OTHER_KEY), ("owner", OWNER_KEY), ("admin", ADMIN_KEY)):
        ids = owned()
        path, body = _fill(path_t, ids), _fill(body_t, ids)
        resp = _call(client, method, path, body, key)
        assert resp.status_code == expect[who], (who, resp.get_data(as_text=True)[:300])
        if expect[who] == 403:
            assert_error(resp, 403, "forbidden")
    # The bearer form authenticates exactly like the header.
    ids = owned()
    resp = _call(
        client,
        method,
        _fill(path_t, ids),
        _fill(body_t, ids),
        headers={"Authorization": f"Bearer {OWNER_KEY}"},
    )
    assert resp.status_code == expect["owner"]


def test_a_forbidden_attempt_changes_nothing(client, owned):
    alloc, queued = owned()
    before = client.get(f"/gpu/allocations/{alloc}", headers=hdr(OWNER_KEY)).get_json()
    assert (
        _call(client, "POST", "/gpu/release", {"allocation_id": alloc}, OTHER_KEY).status_code
        == 403
    )
    assert (
        _call(
            client, "POST", f"/gpu/allocations/{alloc}/renew", {"ttl_seconds": 99999}, OTHER_KEY
        ).status_code
        == 403
    )
    assert _call(client, "DELETE", f"/gpu/requests/{queued}", None, OTHER_KEY).status_code == 403
    after = client.get(f"/gpu/allocations/{alloc}", headers=hdr(OWNER_KEY)).get_json()
    assert after["status"] == "allocated" and after["expires_at"] == before["expires_at"]
    assert (
        client.get(f"/gpu/requests/{queued}", headers=hdr(OWNER_KEY)).get_json()["status"]
        == "queued"
    )


def test_release_by_service_as_another_principal_releases_nothing(client, owned):
    alloc, _ = owned()
    resp = _call(client, "POST", "/gpu/release", {"service_name": "sec-alloc"}, OTHER_KEY)
    assert resp.status_code in (200, 404)
    if resp.status_code == 200:
        assert alloc not in resp.get_json().get("released", [])
    assert (
        client.get(f"/gpu/allocations/{alloc}", headers=hdr(OWNER_KEY)).get_json()["status"]
        == "allocated"
    )


def test_an_admin_flag_is_not_a_principal_name(make_app):
    """``admins`` names principals; a key whose *value* is an admin's name is not an admin."""
    client = make_app(
        auth={"enabled": True, "api_keys": {"root": "owner", ADMIN_KEY: "root"}, "admins": ["root"]}
    ).test_client()
    alloc = client.post(
        "/gpu/allocate", headers=hdr(ADMIN_KEY), json={"service_name": "sec"}
    ).get_json()["id"]
    resp = _call(client, "POST", "/gpu/release", {"allocation_id": alloc}, "root")
    assert_error(resp, 403, "forbidden")


# --------------------------------------------------------------------------- SSRF policy


def _deny(settings, **extra):
    return settings.replace(webhooks={"deny_private_networks": True, "allowed_hosts": [], **extra})


def _check(url, settings, resolve=None):
    """The webhook URL policy as allocate and delivery apply it; raises Refused."""
    from app.webhook_policy import Policy

    resolver = (lambda host, port: resolve(host)) if resolve else None
    return Policy.from_settings(settings, resolver=resolver).resolve(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/hook",  # 127.0.0.1 as one decimal number
        "http://0x7f000001/hook",  # ... as hex
        "http://0177.0.0.1/hook",  # ... with an octal first part
        "http://127.1/hook",  # ... short form
        "http://0.0.0.0/hook",
        "http://localhost/hook",
        "http://LOCALHOST/hook",
        "http://[::]/hook",
        "http://[0:0:0:0:0:ffff:7f00:1]/hook",
        "http://[fe80::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/hook",  # carrier-grade NAT (shared address space)
        "http://100.100.100.200/latest/meta-data/",  # a cloud metadata service inside 100.64/10
        "http://192.0.0.170/hook",  # IETF protocol assignments (not global)
        "http://hooks.example.com@127.0.0.1/hook",
        "http://127.0.0.1#@hooks.example.com/hook",
    ],
)
def test_private_targets_in_any_spelling_are_refused(settings, url, monkeypatch):
    from app.webhook_policy import Refused

    _no_connections(monkeypatch)
    with pytest.raises(Refused):
        _check(url, _deny(settings))


def _no_connections(monkeypatch):
    """Any socket connect fails the test: a refused URL is refused before connecting."""
    import socket

    def forbidden(self, address):
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket.socket, "connect_ex", forbidden)


PUBLIC_DNS = lambda host: ["93.184.215.14"]  # noqa: E731 - a documentation-range public answer


def test_allowed_hosts_match_whole_labels_only(settings, monkeypatch):
    from app.webhook_policy import Refused

    _no_connections(monkeypatch)
    allow = settings.replace(webhooks={"allowed_hosts": ["hooks.example.com", "*.corp.example"]})
    _check("https://HOOKS.EXAMPLE.COM./x", allow, PUBLIC_DNS)
    _check("https://deep.a.corp.example/x", allow, PUBLIC_DNS)
    for url in (
        "https://hooks.example.com.evil.test/x",
        "https://evilhooks.example.com/x",
        "https://evilcorp.example/x",
        "https://hooks.example.com@evil.test/x",
        "https://evil.test/hooks.example.com",
        "https://evil.test/?h=hooks.example.com",
    ):
        with pytest.raises(Refused):
            _check(url, allow, PUBLIC_DNS)


def test_allowed_host_that_resolves_private_is_still_refused(settings, monkeypatch):
    """A host *name* entry never unlocks a private address (its DNS could be made to point
    inside); only a network or address entry does."""
    from app.webhook_policy import Refused

    _no_connections(monkeypatch)
    both = _deny(settings, allowed_hosts=["hooks.example.com"])
    with pytest.raises(Refused):
        _check("https://hooks.example.com/x", both, resolve=lambda h: ["10.0.0.7"])
    _check("https://hooks.example.com/x", both, resolve=PUBLIC_DNS)
    internal = _deny(settings, allowed_hosts=["hooks.example.com", "10.0.0.0/24"])
    _check("https://hooks.example.com/x", internal, resolve=lambda h: ["10.0.0.7"])


class _Recorder(BaseHTTPRequestHandler):
    hits: list = []
    location = ""

    def do_POST(self):
        type(self).hits.append(self.path)
        self.send_response(302 if type(self).location else 200)
        if type(self).location:
            self.send_header("Location", type(self).location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args):
        pass


def _serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_redirect_is_not_followed_to_an_internal_address(settings):
    """An allowed receiver answering 302 must not bounce the POST to a private service."""
    from workers import webhooks

    internal = type("Internal", (_Recorder,), {"hits": [], "location": ""})
    inner = _serve(internal)
    redirector = type(
        "Redirector",
        (_Recorder,),
        {"hits": [], "location": f"http://127.0.0.1:{inner.server_address[1]}/admin"},
    )
    outer = _serve(redirector)
    try:
        with pytest.raises(webhooks.WebhookError) as info:
            webhooks.post(
                f"http://127.0.0.1:{outer.server_address[1]}/hook",
                {"status": "allocated", "event_id": "e1"},
                settings,
            )
        assert info.value.status == 302
        assert redirector.hits == ["/hook"] and internal.hits == []
    finally:
        inner.shutdown(), outer.shutdown()
        inner.server_close(), outer.server_close()


def test_refused_url_never_opens_a_connection(settings):
    """The receiver runs on loopback, which the policy here does not allow: nothing reaches it."""
    from workers import webhooks

    hits = type("Hits", (_Recorder,), {"hits": [], "location": ""})
    server = _serve(hits)
    try:
        with pytest.raises(webhooks.WebhookRefused):
            webhooks.post(
                f"http://127.0.0.1:{server.server_address[1]}/hook",
                {"status": "allocated", "event_id": "e2"},
                _deny(settings),
            )
        assert hits.hits == []
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- secrets

WEBHOOK_SECRET = "whsec-do-not-log-4c8e1a"
REDIS_PASSWORD = "redis-pw-do-not-log-93be"


def test_config_errors_never_echo_a_key_or_a_password():
    cases = {
        "GPU_ORCH__AUTH__API_KEYS": "{sec-leak-key-1234: ''}",
        "GPU_ORCH__REDIS__URL": f"http://:{REDIS_PASSWORD}@127.0.0.1:1/0",
        "GPU_ORCH__SERVICES__DEEPAGENTS_URL": f"ftp://user:{REDIS_PASSWORD}@advisor/",
    }
    for var, value in cases.items():
        with pytest.raises(settings_mod.ConfigError) as info:
            settings_mod.load(environ={var: value})
        text = str(info.value)
        assert var in text  # the operator still learns which setting is wrong ...
        assert "sec-leak-key-1234" not in text and REDIS_PASSWORD not in text  # ... not its secret


def test_config_show_redacts_every_secret(capsys, monkeypatch, tmp_path):
    from app import cli

    monkeypatch.setenv("GPU_ORCH__AUTH__API_KEYS", f"{{{OWNER_KEY}: owner}}")
    monkeypatch.setenv("GPU_ORCH__WEBHOOKS__SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("REDIS_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    monkeypatch.delenv("CONFIG_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./config.yaml: defaults plus the environment
    assert cli.main(["config", "show"]) == 0
    out = capsys.readouterr()
    for secret in (OWNER_KEY, WEBHOOK_SECRET, REDIS_PASSWORD):
        assert secret not in out.out and secret not in out.err
    assert "owner" in out.out  # the principal is shown, only its key is hidden


def test_no_secret_in_logs_during_a_run(make_app, tmp_path, caplog):
    """Drive the API through its paths (good, bad and forbidden keys, grants, a queued grant
    with a signed webhook) at DEBUG, and grep everything that was logged."""
    from workers import webhooks

    hits = type("Hits", (_Recorder,), {"hits": [], "location": ""})
    server = _serve(hits)
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    app = make_app(
        nodes=(("node-a", 1),),
        auth={"enabled": True, "api_keys": KEYS, "admins": ["root"]},
        webhooks={"secret": WEBHOOK_SECRET},
        logging={"level": "DEBUG"},
    )
    client = app.test_client()
    try:
        with caplog.at_level(logging.DEBUG):
            first, _ = _allocate(client, "sec-a")
            resp = client.post(
                "/gpu/allocate",
                headers={"Authorization": f"Bearer {OTHER_KEY}"},
                json={"service_name": "sec-b", "webhook_url": url},
            )
            queued = resp.get_json()["request_id"]
            client.get("/gpu/status", headers=hdr(OWNER_KEY + "-wrong"))
            client.post("/gpu/release", headers=hdr(OTHER_KEY), json={"allocation_id": first})
            client.post("/gpu/release", headers=hdr(ADMIN_KEY), json={"allocation_id": first})
            client.get(f"/gpu/requests/{queued}", headers=hdr(ADMIN_KEY))
            record = app.extensions["gpu_engine"].get(queued)
            payload = webhooks.build_payload(record, "allocated", "ev-1")
            webhooks.post(url, payload, app.extensions["gpu_settings"])
    finally:
        server.shutdown()
        server.server_close()
    assert hits.hits == ["/hook"]
    assert len(caplog.records) > 5
    for secret in list(KEYS) + [OWNER_KEY + "-wrong", WEBHOOK_SECRET]:
        assert secret not in caplog.text


# --------------------------------------------------------------------------- rq-dashboard


def test_every_dashboard_route_needs_a_key_and_deletion_stays_off(make_app, settings):
    """rq-dashboard has no auth of its own; every one of its routes sits behind the API's. With
    ``dashboard.allow_delete`` off (the default), even an admin cannot delete or empty."""
    import redis as redis_lib

    from app import queues

    app = make_app(
        auth={"enabled": True, "api_keys": KEYS, "admins": ["root"]}, dashboard={"enabled": True}
    )
    client = app.test_client()
    routes = [
        (m, r.rule)
        for r in app.url_map.iter_rules()
        if r.rule.startswith("/rq")
        for m in r.methods - {"HEAD", "OPTIONS"}
    ]
    assert len(routes) >= 10
    for method, rule in routes:
        path = (
            rule.replace("<int:instance_number>", "0")
            .replace("<job_id>", "j1")
            .replace("<queue_name>", "q")
            .replace("<registry_name>", "queued")
            .replace("<path:filename>", "x.css")
            .replace("<", "")
            .replace(">", "")
        )
        for key, headers in (
            (None, None),
            ("not-a-key", None),
            (None, {"Authorization": "Bearer not-a-key"}),
        ):
            resp = _call(client, method, path, None, key, headers)
            assert resp.status_code == 401, (method, rule, resp.status_code)

    rq_redis = redis_lib.Redis.from_url(settings.redis.url)
    try:
        q = queues.queue(rq_redis, settings, queues.WEBHOOKS)
        job = q.enqueue("workers.webhooks.deliver", {"event_id": "e", "request_id": "r"})
        for path in (f"/rq/queue/{q.name}/queued/empty", f"/rq/job/{job.id}/delete"):
            resp = _call(client, "POST", path, None, ADMIN_KEY)
            assert resp.status_code == 200 and resp.get_json() == {"status": "DISABLED"}
        assert q.count == 1 and q.job_ids == [job.id]
    finally:
        rq_redis.close()
