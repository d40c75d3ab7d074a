"""The JSON answers of the allocate/release path, byte for byte: keys, their order, values.

A scripted session (fixed clock, one 8-GPU node) runs every answer the hot path gives: a
grant (200) with and without warnings, an idempotent replay, a queued request (202), the
request's status with its ``allocation`` (GET /gpu/requests/<id>), an allocation, a renewal,
releases by id and by service, and the errors of a bad body and an unknown id. Each answer's
status, headers that carry meaning and exact body text are compared with
``tests/data/api_answers.json``, written by the code before the request path was made cheaper
(issue 13 part 3) and the grant fields were declared once (part 6): a rendering shortcut that
drops, reorders or reformats anything fails here. Request ids (random) become ``<id1>``,
``<id2>``...

A deliberate change of an answer: rerun with ``GPUO_WRITE_ANSWERS=1`` and review the diff of
the data file.
"""

from __future__ import annotations

import json
import os
import re

from tests.api_support import app, client, clock, make_app  # noqa: F401

DATA = os.path.join(os.path.dirname(__file__), "data", "api_answers.json")
_ID = re.compile(r"svc-[a-z]+-\d+-\d{8}")
HEADERS = ("Content-Type", "Location", "Idempotent-Replayed", "Retry-After")


def _session(client, clock) -> list[dict]:
    ids: dict[str, str] = {}

    def anon(text: str) -> str:
        def sub(m: re.Match) -> str:
            return ids.setdefault(m.group(0), f"<id{len(ids) + 1}>")

        return _ID.sub(sub, text)

    answers = []

    def call(name, method, path, body=None, headers=None):
        resp = client.open(path, method=method, json=body, headers=headers or {})
        answers.append(
            {
                "name": name,
                "status": resp.status_code,
                "headers": {h: anon(resp.headers[h]) for h in HEADERS if h in resp.headers},
                "body": anon(resp.get_data(as_text=True)),
            }
        )
        return resp.get_json()

    small = {
        "service_name": "svc-a",
        "workload_type": "inference",
        "workload_data": {"model_size": "small"},
    }
    first = call("allocate", "POST", "/gpu/allocate", small)
    clock.advance(1.5)
    full = call(
        "allocate, every field",
        "POST",
        "/gpu/allocate",
        {
            "service_name": "svc-b",
            "workload_type": "training",
            "workload_data": {"batch_size": 4, "gpu_count": 2},
            "required_gpus": 2,
            "min_memory_mb": 1000,
            "priority": 7,
            "ttl_seconds": 600,
            "sharing": "exclusive",
            "preferred_gpus": [4, 3],
            "nodes": ["node-a"],
            "gpu_model": "*",
            "depends_on_mode": "any",
            "webhook_events": ["expired"],
        },
    )
    key = {"Idempotency-Key": "k-1"}
    call("allocate with a key", "POST", "/gpu/allocate", dict(small, service_name="svc-c"), key)
    call("replay", "POST", "/gpu/allocate", dict(small, service_name="svc-c"), key)
    call("allocate 4", "POST", "/gpu/allocate", {"service_name": "svc-d", "required_gpus": 4})
    clock.advance(2)
    queued = call("queued", "POST", "/gpu/allocate", {"service_name": "svc-e", "required_gpus": 2})
    call("status of a grant", "GET", f"/gpu/requests/{full['id']}")
    call("status of a queued request", "GET", f"/gpu/requests/{queued['id']}")
    call("allocation", "GET", f"/gpu/allocations/{full['id']}")
    clock.advance(3)
    call("renew", "POST", f"/gpu/allocations/{full['id']}/renew", {"ttl_seconds": 900})
    clock.advance(4)
    call("release", "POST", "/gpu/release", {"allocation_id": first["id"]})
    call("status after release", "GET", f"/gpu/requests/{first['id']}")
    call("release by service", "POST", "/gpu/release", {"service_name": "svc-b"})
    call("release unknown", "POST", "/gpu/release", {"allocation_id": "svc-x-1-00000000"})
    call("release, bad body", "POST", "/gpu/release", {"allocation_id": 5})
    call(
        "allocate, bad body",
        "POST",
        "/gpu/allocate",
        {"service_name": "svc a", "priority": 11, "extra": 1},
    )
    return answers


def test_the_hot_paths_answers_are_unchanged(client, clock):
    answers = _session(client, clock)
    if os.environ.get("GPUO_WRITE_ANSWERS"):
        with open(DATA, "w") as f:
            json.dump(answers, f, indent=1)
            f.write("\n")
    with open(DATA) as f:
        expected = json.load(f)
    assert [a["name"] for a in answers] == [e["name"] for e in expected]
    for got, want in zip(answers, expected):
        assert got == want, got["name"]


def test_the_grant_object_is_the_allocations_fields_in_grant_view_order(client):
    """GrantSchema declares no field of its own but the id's description: the spec's
    ``Grant`` properties are ``Allocation``'s, in GRANT_VIEW order (the order render writes)."""
    from app.schemas import GRANT_VIEW

    spec = client.get("/openapi.json").get_json()["components"]["schemas"]
    grant, alloc = spec["Grant"], spec["Allocation"]
    assert tuple(grant["properties"]) == GRANT_VIEW
    for name in GRANT_VIEW[1:]:
        assert grant["properties"][name] == alloc["properties"][name], name
    assert grant["properties"]["id"]["description"] == "The allocation id (= request_id)."
    assert grant["required"] == ["id", "service_name"]
