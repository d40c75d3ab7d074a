"""API keys: who may call what, and who may touch whose allocations."""

from __future__ import annotations

import hashlib
import logging

import pytest

from app.auth import Authenticator, is_public
from tests.api_support import assert_error, clock, make_app  # noqa: F401 (fixtures)

ALICE_KEY = "alice-key-0123456789"
BOB_KEY = "bob-key-9876543210"
ADMIN_KEY = "ops-key-5555555555"
HASHED = "hashed-key-abcdef"
KEYS = {
    ALICE_KEY: "alice",
    BOB_KEY: "bob",
    ADMIN_KEY: "ops",
    "sha256:" + hashlib.sha256(HASHED.encode()).hexdigest(): "carol",
}


def hdr(key):
    return {"X-API-Key": key}


@pytest.fixture
def auth_app(make_app):
    return make_app(auth={"enabled": True, "api_keys": KEYS, "admins": ["ops"]})


@pytest.fixture
def client(auth_app):
    return auth_app.test_client()


# --------------------------------------------------------------------------- unit


def test_authenticator_resolves_plain_and_hashed_keys():
    auth = Authenticator(KEYS, ["ops"])
    assert auth.principal_for(ALICE_KEY) == "alice"
    assert auth.principal_for(HASHED) == "carol"
    assert auth.principal_for("sha256:" + hashlib.sha256(HASHED.encode()).hexdigest()) is None
    assert auth.principal_for("alice-key") is None
    assert auth.principal_for("") is None and auth.principal_for(None) is None
    assert auth.is_admin("ops") and not auth.is_admin("alice") and not auth.is_admin(None)


def test_public_paths_exact_and_prefix():
    assert is_public("/healthz", ["/healthz"])
    assert not is_public("/healthz/x", ["/healthz"])
    assert is_public("/docs/assets/a.js", ["/docs*"])


# --------------------------------------------------------------------------- the matrix

PROTECTED = [
    ("post", "/gpu/allocate", {"service_name": "svc"}),
    ("post", "/gpu/release", {"allocation_id": "svc-1"}),
    ("get", "/gpu/status", None),
    ("get", "/gpu/list", None),
    ("post", "/gpu/workload", {"workload_type": "generic"}),
    ("get", "/gpu/requests/svc-1", None),
    ("delete", "/gpu/requests/svc-1", None),
    ("get", "/gpu/allocations/svc-1", None),
    ("post", "/gpu/allocations/svc-1/renew", None),
    ("get", "/openapi.json", None),
    ("get", "/docs", None),
]


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_protected_routes_need_a_valid_key(client, method, path, body):
    kwargs = {"json": body} if body is not None else {}
    call = getattr(client, method)
    err = assert_error(call(path, **kwargs), 401, "unauthorized")
    assert "X-API-Key" in err["message"]
    assert_error(call(path, headers=hdr("wrong-key"), **kwargs), 401, "unauthorized")
    assert_error(
        call(path, headers={"Authorization": "Bearer wrong"}, **kwargs), 401, "unauthorized"
    )
    for headers in (
        hdr(ALICE_KEY),
        {"Authorization": f"Bearer {ALICE_KEY}"},
        hdr(HASHED),
        hdr(ADMIN_KEY),
    ):
        assert call(path, headers=headers, **kwargs).status_code not in (401, 403)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_public_paths_need_no_key(client, path):
    assert client.get(path).status_code == 200


def test_public_paths_are_configurable(make_app):
    client = make_app(
        auth={
            "enabled": True,
            "api_keys": KEYS,
            "public_paths": ["/healthz", "/docs", "/docs/assets/*", "/openapi.json"],
        }
    ).test_client()
    assert client.get("/docs").status_code == 200
    with client.get("/docs/assets/swagger-ui.css") as resp:
        assert resp.status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert_error(client.get("/metrics"), 401, "unauthorized")


def test_custom_header_name(make_app):
    client = make_app(
        auth={"enabled": True, "api_keys": KEYS, "header_name": "X-Token"}
    ).test_client()
    assert client.get("/gpu/status", headers={"X-Token": ALICE_KEY}).status_code == 200
    assert_error(client.get("/gpu/status", headers=hdr(ALICE_KEY)), 401, "unauthorized")


def test_dashboard_needs_a_key_and_is_for_admins_only(make_app):
    """rq-dashboard shows every team's jobs and can requeue them: admins only."""
    client = make_app(
        auth={"enabled": True, "api_keys": KEYS, "admins": ["ops"]}, dashboard={"enabled": True}
    ).test_client()
    assert_error(client.get("/rq/"), 401, "unauthorized")
    assert_error(client.get("/rq/", headers=hdr(ALICE_KEY)), 403, "forbidden")
    assert_error(client.get("/rq/0/data/queues.json", headers=hdr(ALICE_KEY)), 403, "forbidden")
    assert client.get("/rq/", headers=hdr(ADMIN_KEY)).status_code == 200
    assert client.get("/gpu/status", headers=hdr(ALICE_KEY)).status_code == 200


# --------------------------------------------------------------------------- ownership


def test_owner_is_the_principal(client):
    body = client.post(
        "/gpu/allocate", json={"service_name": "svc"}, headers=hdr(ALICE_KEY)
    ).get_json()
    assert body["owner"] == "alice"


@pytest.mark.parametrize("action", ["release", "renew"])
def test_only_the_owner_or_an_admin_may_release_or_renew(client, action):
    alloc_id = client.post(
        "/gpu/allocate", json={"service_name": "svc"}, headers=hdr(ALICE_KEY)
    ).get_json()["id"]

    def act(key):
        if action == "release":
            return client.post("/gpu/release", json={"allocation_id": alloc_id}, headers=hdr(key))
        return client.post(f"/gpu/allocations/{alloc_id}/renew", headers=hdr(key))

    assert_error(act(BOB_KEY), 403, "forbidden")
    assert (
        client.get(f"/gpu/allocations/{alloc_id}", headers=hdr(ALICE_KEY)).get_json()["status"]
        == "allocated"
    )
    assert act(ADMIN_KEY).status_code == 200
    if action == "renew":
        assert act(ALICE_KEY).status_code == 200


def test_only_the_owner_or_an_admin_may_cancel(client):
    big = client.post(
        "/gpu/allocate",
        json={"service_name": "big", "workload_data": {"required_gpus": 8}},
        headers=hdr(ALICE_KEY),
    )
    assert big.status_code == 200
    rid = client.post(
        "/gpu/allocate", json={"service_name": "svc"}, headers=hdr(ALICE_KEY)
    ).get_json()["request_id"]
    assert_error(client.delete(f"/gpu/requests/{rid}", headers=hdr(BOB_KEY)), 403, "forbidden")
    assert client.delete(f"/gpu/requests/{rid}", headers=hdr(ALICE_KEY)).status_code == 200
    rid2 = client.post(
        "/gpu/allocate", json={"service_name": "svc"}, headers=hdr(ALICE_KEY)
    ).get_json()["request_id"]
    assert client.delete(f"/gpu/requests/{rid2}", headers=hdr(ADMIN_KEY)).status_code == 200


def test_release_by_service_releases_only_the_callers_own(client):
    mine = client.post(
        "/gpu/allocate", json={"service_name": "shared-svc"}, headers=hdr(ALICE_KEY)
    ).get_json()["id"]
    theirs = client.post(
        "/gpu/allocate", json={"service_name": "shared-svc"}, headers=hdr(BOB_KEY)
    ).get_json()["id"]
    resp = client.post("/gpu/release", json={"service_name": "shared-svc"}, headers=hdr(ALICE_KEY))
    assert resp.status_code == 200
    assert resp.get_json()["released"] == [mine]
    live = [
        a["id"] for a in client.get("/gpu/list", headers=hdr(BOB_KEY)).get_json()["allocations"]
    ]
    assert live == [theirs]


def test_keys_never_appear_in_logs(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.get("/gpu/status", headers=hdr("leaky-wrong-key-123"))
        client.get("/gpu/status", headers={"Authorization": f"Bearer {ALICE_KEY}"})
        client.post("/gpu/allocate", json={"service_name": "svc"}, headers=hdr(BOB_KEY))
    assert caplog.records  # something was logged ...
    for secret in ("leaky-wrong-key-123", ALICE_KEY, BOB_KEY):
        assert secret not in caplog.text  # ... but never a key


def test_idempotency_keys_are_per_principal(client):
    """The same Idempotency-Key from two teams makes two requests; neither sees the other's."""
    body = {"service_name": "svc", "workload_type": "generic"}
    first = client.post(
        "/gpu/allocate", json=body, headers={**hdr(ALICE_KEY), "Idempotency-Key": "retry-1"}
    )
    second = client.post(
        "/gpu/allocate", json=body, headers={**hdr(BOB_KEY), "Idempotency-Key": "retry-1"}
    )
    assert first.status_code == 200 and second.status_code == 200
    assert first.get_json()["id"] != second.get_json()["id"]
    assert second.get_json()["owner"] == "bob" and not second.get_json().get("replayed")
    again = client.post(
        "/gpu/allocate", json=body, headers={**hdr(ALICE_KEY), "Idempotency-Key": "retry-1"}
    )
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
