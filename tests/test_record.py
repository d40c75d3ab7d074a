"""The record's fields are declared once (app/record.py): the engine, the library's Lua tables
and the reader follow the declaration, and a field at its default is not stored but reads the
same as one written in full (an earlier release's record)."""

from __future__ import annotations

import pytest
from test_engine import gpu_list, req

from app import record
from app.engine import LUA_DIR, Engine, library_source


@pytest.fixture
def engine(redis, settings):
    return Engine(redis, settings)


def test_every_request_field_the_engine_sends_is_declared(engine):
    fields, _ = engine._request_fields(req(webhook_url="http://127.0.0.1:9/h", nodes=["a"]))
    assert tuple(fields) == record.REQUEST_FIELDS
    for name in record.SCHEDULER_FIELDS:
        assert name in record.BY_NAME, name


def test_the_library_carries_the_declared_lua_tables():
    _, source = library_source()
    assert record.lua_tables() in source
    for name, value in record.DEFAULTS.items():
        assert f"{name} = {record._lua_str(value)}" in source
    # no hand-written copy of the scheduler's field list is left in the Lua sources
    for path in LUA_DIR.rglob("*.lua"):
        assert "local REQ_FIELDS" not in path.read_text(), path


def test_fields_at_their_default_are_not_stored_and_read_back_in_full(engine, redis):
    engine.report_node("a", gpu_list(2))
    plain = engine.allocate(req())
    stored = redis.hgetall(engine.keys.request(plain["id"]))
    for name in record.DEFAULTS:
        assert name not in stored, name
    full = engine.get(plain["id"])
    for name, value in record.DEFAULTS.items():
        expected = record.parse_record({"service_name": "x", name: value})[name]
        assert full[name] == expected, name
    assert full["max_utilization"] == 100.0 and full["preferred_gpus"] == []
    assert full["workload_data"] == {} and full["depends_on_mode"] == "any"
    # the same record written in full (as the release before the sparse encoding did) reads
    # the same
    key = engine.keys.request(plain["id"])
    redis.hset(key, mapping=record.DEFAULTS)
    assert engine.get(plain["id"]) == full
    # and releases like one written sparse
    assert engine.release(plain["id"])["status"] == "released"
    assert engine.counts()["gpus_available"] == 2


def test_a_field_off_its_default_is_stored(engine, redis):
    engine.report_node("a", gpu_list(2))
    rec = engine.allocate(req(max_utilization=50, workload_type="training"))
    stored = redis.hgetall(engine.keys.request(rec["id"]))
    assert stored["max_utilization"] == "50" and stored["workload_type"] == "training"
    assert engine.get(rec["id"])["max_utilization"] == 50.0


def test_listings_leave_workload_data_out_even_when_filled_in(engine):
    engine.report_node("a", gpu_list(1))
    engine.allocate(req())
    engine.allocate(req())  # queued
    snap = engine.snapshot()
    for rec in snap["allocations"] + snap["queue"]:
        assert "workload_data" not in rec
        assert rec["max_utilization"] == 100.0


@pytest.mark.parametrize("name", ["a:b", "", "x" * 129, "sp ace"])
def test_one_service_name_rule_for_the_api_and_the_engine(engine, name):
    from app.errors import ValidationFailed
    from app.schemas import AllocateRequestSchema

    with pytest.raises(ValidationFailed) as exc:
        engine.allocate(req(name))
    assert exc.value.details["field"] == "service_name"
    errors = AllocateRequestSchema().validate({"service_name": name})
    assert "service_name" in errors
    assert not AllocateRequestSchema().validate({"service_name": "ok.name_1-2"})
    assert engine._request_fields(req("ok.name_1-2"))[0]["service_name"] == "ok.name_1-2"


def test_records_read_from_the_same_stored_list_do_not_share_it():
    """GPU id lists are decoded once per distinct stored string: each record still gets its
    own list, so a caller that changes one record changes no other."""
    raw = {"service_name": "a", "gpu_ids": "[3, 5]", "gpu_uuids": '["GPU-3","GPU-5"]'}
    first, second = record.parse_record(dict(raw)), record.parse_record(dict(raw))
    assert first["gpu_ids"] == second["gpu_ids"] == [3, 5]
    assert first["gpu_uuids"] == ["GPU-3", "GPU-5"]
    first["gpu_ids"].append(7)
    first["gpu_uuids"].clear()
    third = record.parse_record(dict(raw))
    assert third["gpu_ids"] == second["gpu_ids"] == [3, 5]
    assert third["gpu_uuids"] == ["GPU-3", "GPU-5"]
