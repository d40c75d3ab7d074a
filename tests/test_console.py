"""The console over HTTP: pages and their headers, browser sign-in (cookie flags, redirects,
CSRF, expiry, revocation when a key leaves the config), and the /admin API."""

from __future__ import annotations

import re
import threading
import time

import pytest

from app import sessions
from app.auth import Authenticator
from tests.api_support import app, assert_error, client, clock, make_app  # noqa: F401

ADMIN, USER = "k-admin", "k-user"
KEYS = {ADMIN: "ops", USER: "alice"}


@pytest.fixture
def secured(make_app):
    def make(**auth):
        cfg = {"enabled": True, "api_keys": dict(KEYS), "admins": ["ops"]}
        cfg.update(auth)
        return make_app(nodes=(("node-a", 2),), auth=cfg)

    return make


def sign_in(client, key=ADMIN, **headers):
    resp = client.post("/login", data={"api_key": key, "next": "/"}, headers=headers)
    assert resp.status_code == 303, resp.get_data(as_text=True)
    return resp


def csrf_of(client) -> str:
    page = client.get("/").get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


# --------------------------------------------------------------------------- pages


def test_fleet_page_and_state_with_auth_off(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    body = page.get_data(as_text=True)
    assert "/static/console/console.js" in body and "http" not in body.split("<body>")[0]
    state = client.get("/console/state").get_json()
    assert state["counts"]["gpus_total"] == 8 and state["counts"]["nodes_alive"] == 1
    assert [n["name"] for n in state["nodes"]] == ["node-a"]
    assert len(state["nodes"][0]["gpus"]) == 8
    assert client.get("/login?next=/docs").headers["Location"] == "/docs"
    css = client.get("/static/console/console.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    css.close()


def test_state_shows_holders_queue_reasons_and_events(client):
    a = client.post(
        "/gpu/allocate",
        json={"service_name": "train", "workload_data": {"required_gpus": 8}, "ttl_seconds": 600},
    )
    assert a.status_code == 200
    q = client.post("/gpu/allocate", json={"service_name": "waits", "ttl_seconds": 60})
    assert q.status_code == 202
    state = client.get("/console/state").get_json()
    holders = [h for g in state["nodes"][0]["gpus"] for h in g["holders"]]
    assert {h["service_name"] for h in holders} == {"train"} and len(holders) == 8
    assert holders[0]["expires_at"] is not None
    [row] = state["queue"]
    assert row["service_name"] == "waits" and row["position"] == 1
    # the server's reason and ETA (app.waiting), the same as the request's own
    assert row["reason"] == "capacity" and row["eta"] == holders[0]["expires_at"]
    own = client.get(f"/gpu/requests/{q.get_json()['id']}").get_json()
    assert (own["reason"], own["eta"]) == (row["reason"], row["eta"])
    assert (q.get_json()["reason"], q.get_json()["eta"]) == (row["reason"], row["eta"])
    assert [e["event"] for e in state["events"]][:2] == ["queued", "allocated"]  # newest first


# --------------------------------------------------------------------------- sign-in


def test_browsers_without_a_session_go_to_login_and_scripts_get_401(secured):
    client = secured().test_client()
    for path in ("/", "/docs", "/rq/"):
        resp = client.get(path, headers={"Accept": "text/html"})
        assert resp.status_code == 302 and resp.headers["Location"].startswith("/login?next=")
    assert client.get("/gpu/status", headers={"Accept": "text/html"}).status_code == 302
    assert_error(client.get("/console/state"), 401, "unauthorized")
    assert_error(client.post("/admin/nodes/node-a/cordon"), 401, "unauthorized")
    login = client.get("/login?next=/docs")
    assert login.status_code == 200 and 'value="/docs"' in login.get_data(as_text=True)


def test_sign_in_sets_a_safe_cookie_and_redirects_back(secured):
    client = secured().test_client()
    bad = client.post("/login", data={"api_key": "nope", "next": "/"})
    assert bad.status_code == 401 and "not valid" in bad.get_data(as_text=True)
    assert "Set-Cookie" not in bad.headers
    resp = client.post("/login", data={"api_key": ADMIN, "next": "/docs"})
    assert resp.status_code == 303 and resp.headers["Location"] == "/docs"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith(sessions.COOKIE + "=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert ADMIN not in cookie
    assert client.get("/docs").status_code == 200
    assert client.get("/console/state").get_json()["viewer"] == {
        "principal": "ops",
        "admin": True,
        "auth": True,
    }
    assert client.get("/login?next=/docs").headers["Location"] == "/docs"  # already in


def test_cookie_is_secure_behind_https_and_next_never_leaves_the_site(secured):
    client = secured().test_client()
    resp = client.post(
        "/login",
        data={"api_key": ADMIN, "next": "//evil.example/x"},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert "Secure" in resp.headers["Set-Cookie"] and resp.headers["Location"] == "/"
    for target in ("https://evil.example/", "/\\evil", "javascript:alert(1)"):
        resp = client.post("/login", data={"api_key": ADMIN, "next": target})
        assert resp.headers["Location"] == "/"


def test_sign_in_from_another_site_is_refused(secured):
    client = secured().test_client()
    resp = client.post(
        "/login", data={"api_key": ADMIN, "next": "/"}, headers={"Origin": "https://evil.example"}
    )
    assert_error(resp, 403, "forbidden")
    sign_in(client, Origin="http://localhost")


def test_state_changes_with_the_cookie_need_the_csrf_token(secured):
    client = secured().test_client()
    sign_in(client)
    assert_error(client.post("/admin/nodes/node-a/cordon"), 403, "forbidden")
    assert_error(
        client.post("/admin/nodes/node-a/cordon", headers={"X-CSRF-Token": "x" * 64}),
        403,
        "forbidden",
    )
    token = csrf_of(client)
    resp = client.post("/admin/nodes/node-a/cordon", headers={"X-CSRF-Token": token})
    assert resp.status_code == 200 and resp.get_json()["cordoned"]
    # a header key needs no CSRF token (no cookie involved)
    other = secured().test_client()
    assert (
        other.post("/admin/nodes/node-a/uncordon", headers={"X-API-Key": ADMIN}).status_code == 200
    )


def test_session_principal_rights_apply(secured):
    client = secured(admins=["ops"]).test_client()
    sign_in(client, USER)
    token = csrf_of(client)
    assert_error(
        client.post("/admin/nodes/node-a/cordon", headers={"X-CSRF-Token": token}), 403, "forbidden"
    )
    made = client.post(
        "/gpu/allocate", json={"service_name": "mine"}, headers={"X-CSRF-Token": token}
    )
    assert made.status_code == 200 and made.get_json()["owner"] == "alice"
    assert "(admin)" not in client.get("/").get_data(as_text=True)


def test_removing_a_key_from_the_config_ends_its_sessions(secured):
    app = secured(session_secret="s3cret")
    client = app.test_client()
    sign_in(client, USER)
    assert client.get("/console/state").status_code == 200
    cookie = client.get_cookie(sessions.COOKIE).value
    # a new deployment without alice's key (same secret): her cookie opens nothing
    later = secured(session_secret="s3cret", api_keys={ADMIN: "ops"}).test_client()
    later.set_cookie(sessions.COOKIE, cookie)
    assert_error(later.get("/console/state"), 401, "unauthorized")
    # the key now belongs to someone else: the old session does not carry over either
    moved = secured(session_secret="s3cret", api_keys={USER: "mallory"}).test_client()
    moved.set_cookie(sessions.COOKIE, cookie)
    assert_error(moved.get("/console/state"), 401, "unauthorized")
    # unchanged config: still valid (the secret in config is shared by every replica)
    same = secured(session_secret="s3cret").test_client()
    same.set_cookie(sessions.COOKIE, cookie)
    assert same.get("/console/state").status_code == 200


def test_replicas_share_the_generated_secret_through_redis(secured):
    first = secured().test_client()
    sign_in(first)
    cookie = first.get_cookie(sessions.COOKIE).value
    second = secured().test_client()  # another app (replica) on the same Redis
    second.set_cookie(sessions.COOKIE, cookie)
    assert second.get("/console/state").status_code == 200


def test_sessions_expire_after_session_ttl(settings, redis):
    now = [1_800_000_000.0]
    auth = Authenticator(KEYS, ["ops"])
    st = settings.replace(auth={"session_ttl": "1h"})
    manager = sessions.SessionManager(st, redis, auth.digests, clock=lambda: now[0])
    digest, principal = auth.digest_for(USER)
    value = manager.issue(principal, digest)
    assert manager.load(value).principal == "alice"
    now[0] += 3599
    assert manager.load(value) is not None
    now[0] += 2
    assert manager.load(value) is None
    assert manager.load(value[:-2] + "xx") is None and manager.load("") is None


def test_sign_out_clears_the_cookie(secured):
    client = secured().test_client()
    sign_in(client)
    token = csrf_of(client)
    assert_error(client.post("/logout", data={"csrf_token": "wrong"}), 403, "forbidden")
    resp = client.post("/logout", data={"csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    assert client.get_cookie(sessions.COOKIE) is None
    assert client.get("/", headers={"Accept": "text/html"}).status_code == 302


# --------------------------------------------------------------------------- /admin

H = {"X-API-Key": ADMIN}


def test_admin_actions_are_admins_only(secured):
    client = secured().test_client()
    for method, path in (
        ("POST", "/admin/nodes/node-a/cordon"),
        ("GET", "/admin/nodes"),
        ("DELETE", "/admin/nodes/node-a"),
        ("POST", "/admin/gpus/node-a/0/cordon"),
    ):
        assert_error(
            client.open(path, method=method, headers={"X-API-Key": USER}), 403, "forbidden"
        )


def test_node_and_gpu_cordon_drain_and_events_name_the_principal(secured):
    app = secured()
    client = app.test_client()
    listed = client.get("/admin/nodes", headers=H).get_json()["nodes"]
    assert [(n["name"], n["alive"], len(n["gpus"])) for n in listed] == [("node-a", True, 2)]
    assert client.post("/admin/gpus/node-a/1/cordon", headers=H).get_json()["cordoned"]
    assert not client.post("/admin/gpus/node-a/1/uncordon", headers=H).get_json()["cordoned"]
    assert_error(client.post("/admin/gpus/node-a/7/cordon", headers=H), 404, "not_found")
    assert_error(client.post("/admin/nodes/ghost/cordon", headers=H), 404, "not_found")
    drained = client.post("/admin/nodes/node-a/drain", headers=H).get_json()
    assert drained["draining"] and drained["cordoned"] and drained["drained"]
    assert client.post("/admin/nodes/node-a/uncordon", headers=H).get_json()["draining"] is False
    engine = app.extensions["gpu_engine"]
    by = {e["event"]: e.get("by") for e in engine.events(count=100)}
    assert by["gpu_cordoned"] == by["gpu_uncordoned"] == by["node_draining"] == "ops"
    assert by["node_uncordoned"] == "ops"


def test_drain_wait_returns_when_the_last_allocation_ends(secured):
    app = secured()
    client = app.test_client()
    a = client.post("/gpu/allocate", json={"service_name": "x"}, headers=H).get_json()
    quick = client.post("/admin/nodes/node-a/drain?wait=true&timeout=0.2", headers=H)
    assert quick.status_code == 200 and quick.get_json()["drained"] is False
    assert quick.get_json()["allocations"] == [a["id"]]
    timer = threading.Timer(0.5, lambda: app.extensions["gpu_engine"].release(a["id"]))
    timer.start()
    t0 = time.monotonic()
    done = client.post("/admin/nodes/node-a/drain?wait=true&timeout=30", headers=H)
    timer.join()
    assert done.get_json()["drained"] is True and time.monotonic() - t0 < 20
    assert_error(client.post("/admin/nodes/node-a/drain?wait=maybe", headers=H), 400, "bad_request")
    assert_error(
        client.post("/admin/nodes/node-a/drain?timeout=601", headers=H), 400, "bad_request"
    )


def test_forget_only_a_silent_node_and_its_allocation_reads_lost(secured, clock):
    app = secured()
    client = app.test_client()
    a = client.post("/gpu/allocate", json={"service_name": "x"}, headers=H).get_json()
    assert_error(client.delete("/admin/nodes/node-a", headers=H), 409, "conflict")
    clock.advance(31)
    assert client.get("/gpu/allocations/" + a["id"], headers=H).get_json()["gpu_health"] == [
        {"index": a["gpu_ids"][0], "health": "lost"}
    ]
    out = client.delete("/admin/nodes/node-a", headers=H).get_json()
    assert out == {"node": "node-a", "forgotten": True, "lost": [a["id"]]}
    assert client.get("/gpu/allocations/" + a["id"], headers=H).get_json()["status"] == "lost"
    assert_error(client.delete("/admin/nodes/node-a", headers=H), 404, "not_found")
    assert client.get("/admin/nodes", headers=H).get_json()["nodes"] == []


def test_priority_change_through_the_api(secured):
    client = secured().test_client()
    client.post(
        "/gpu/allocate",
        json={"service_name": "x", "workload_data": {"required_gpus": 2}},
        headers=H,
    )
    q = client.post("/gpu/allocate", json={"service_name": "y"}, headers=H).get_json()
    resp = client.post(f"/admin/requests/{q['id']}/priority", json={"priority": 9}, headers=H)
    assert resp.status_code == 200 and resp.get_json()["priority"] == 9
    assert_error(
        client.post(f"/admin/requests/{q['id']}/priority", json={"priority": 0}, headers=H),
        422,
        "validation_error",
    )
    assert_error(
        client.post(f"/admin/requests/{q['id']}/priority", json={"priority": "9"}, headers=H),
        422,
        "validation_error",
    )
    assert_error(
        client.post("/admin/requests/nope-1/priority", json={"priority": 3}, headers=H),
        404,
        "not_found",
    )


def test_allocation_shows_gpu_health(client, app):
    a = client.post("/gpu/allocate", json={"service_name": "x"}).get_json()
    got = client.get("/gpu/allocations/" + a["id"]).get_json()
    assert got["gpu_health"] == [{"index": a["gpu_ids"][0], "health": "ok"}]


def test_the_cookie_opens_rq_for_admins_only(make_app):
    app = make_app(
        nodes=(("node-a", 1),),
        dashboard={"enabled": True},
        auth={"enabled": True, "api_keys": dict(KEYS), "admins": ["ops"]},
    )
    admin, user = app.test_client(), app.test_client()
    sign_in(admin)
    sign_in(user, USER)
    assert admin.get("/rq/").status_code == 200
    assert_error(user.get("/rq/"), 403, "forbidden")
    assert admin.get("/docs").status_code == 200 and user.get("/docs").status_code == 200


def test_other_sites_cannot_drive_admin_actions_even_with_auth_off(client):
    evil = {"Origin": "https://evil.example"}
    assert_error(client.post("/admin/nodes/node-a/cordon", headers=evil), 403, "forbidden")
    assert (
        client.post(
            "/admin/nodes/node-a/cordon", headers={"Origin": "http://localhost:8080"}
        ).status_code
        == 200
    )
    assert client.post("/admin/nodes/node-a/uncordon").status_code == 200  # no Origin: a script


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://a]"])
def test_a_malformed_origin_is_another_site_not_a_500(secured, origin):
    """An Origin that urlsplit cannot parse (an unclosed IPv6 bracket) made every /admin route
    and POST /login answer 500 internal_error; it names no site of ours: 403."""
    client = secured().test_client()
    headers = {"Origin": origin, "X-API-Key": ADMIN}
    assert_error(client.post("/admin/nodes/node-a/cordon", headers=headers), 403, "forbidden")
    resp = client.post("/login", data={"api_key": ADMIN, "next": "/"}, headers={"Origin": origin})
    assert_error(resp, 403, "forbidden")
    assert "Set-Cookie" not in resp.headers


def test_state_shows_the_head_of_a_long_queue_and_its_whole_depth(client, monkeypatch):
    from app.api import console

    monkeypatch.setattr(console, "QUEUE_SHOWN", 2)
    client.post(
        "/gpu/allocate", json={"service_name": "all", "workload_data": {"required_gpus": 8}}
    )
    ids = [
        client.post("/gpu/allocate", json={"service_name": f"q{i}"}).get_json()["id"]
        for i in range(3)
    ]
    state = client.get("/console/state").get_json()
    assert [q["request_id"] for q in state["queue"]] == ids[:2]
    assert state["counts"]["queue_depth"] == 3 and state["counts"]["allocations_active"] == 1
    assert sum(len(g["holders"]) for g in state["nodes"][0]["gpus"]) == 8


def test_a_damaged_record_does_not_break_the_console(app, client, redis):
    a = client.post("/gpu/allocate", json={"service_name": "x"}).get_json()
    redis.hset(app.extensions["gpu_engine"].keys.request(a["id"]), "gpu_ids", "[1e999]")
    client.post(
        "/gpu/allocate", json={"service_name": "all", "workload_data": {"required_gpus": 7}}
    )
    q = client.post("/gpu/allocate", json={"service_name": "waits"}).get_json()
    redis.hset(app.extensions["gpu_engine"].keys.request(q["id"]), "min_memory_mb", "1e999")
    state = client.get("/console/state")
    assert state.status_code == 200 and len(state.get_json()["queue"]) == 1
    assert client.get("/gpu/allocations/" + a["id"]).status_code == 200


def test_a_held_drain_lets_its_thread_go_when_the_worker_needs_it(make_app):
    """Like a long-poll, a drain waiting with ?wait=true answers (drained: false) as soon as a
    request takes its worker's last idle thread, instead of starving other clients."""
    app = make_app(nodes=(("node-a", 1),), server={"threads": 2})
    client = app.test_client()
    client.post("/gpu/allocate", json={"service_name": "x"})
    answers = []
    held = threading.Thread(
        target=lambda: answers.append(
            client.post("/admin/nodes/node-a/drain?wait=true&timeout=30").get_json()
        )
    )
    t0 = time.monotonic()
    held.start()
    time.sleep(0.5)
    assert held.is_alive()  # held: one of the two threads
    assert app.test_client().get("/healthz").status_code == 200  # takes the last one
    held.join(10)
    assert answers and answers[0]["drained"] is False and time.monotonic() - t0 < 10
