"""Log lines: readable text or JSON, always with the request id."""

from __future__ import annotations

import io
import json
import logging

from app import logs
from tests.api_support import clock, make_app  # noqa: F401


def test_json_lines_carry_the_request_id():
    stream = io.StringIO()
    logs.setup("json", "INFO", stream=stream)
    token = logs.request_id_var.set("req-42")
    try:
        logging.getLogger("gpu.test").info("granted %s", "svc-1", extra={"node": "node-a"})
    finally:
        logs.request_id_var.reset(token)
    record = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert record["message"] == "granted svc-1"
    assert record["request_id"] == "req-42" and record["node"] == "node-a"
    assert record["level"] == "INFO"


def test_text_lines_carry_the_request_id():
    stream = io.StringIO()
    logs.setup("text", "INFO", stream=stream)
    token = logs.request_id_var.set("abc-1")
    try:
        logging.getLogger("gpu.test").warning("hello")
    finally:
        logs.request_id_var.reset(token)
    assert "[abc-1] hello" in stream.getvalue()


def test_a_client_value_cannot_forge_a_text_log_line(make_app):
    """Regression: ``GET /gpu/status%0A<forged line>`` wrote the forged line into the text log
    (the access line prints the decoded path)."""
    stream = io.StringIO()
    logs.setup("text", "DEBUG", stream=stream)
    try:
        client = make_app().test_client()
        forged = "2026-01-01 00:00:00,000 INFO    gpu_orchestrator.api [x] FORGED"
        client.get("/gpu/status%0A" + forged.replace(" ", "%20") + "%0D%1B%E2%80%A8")
    finally:
        logs.setup("text", "INFO")
    lines = stream.getvalue().splitlines()
    assert not any(
        line.startswith("2026-01-01")
        or "FORGED" in line
        and not line.startswith(tuple("0123456789"))
        for line in lines
    )
    access = [line for line in lines if "/gpu/status" in line]
    assert access and "\\n2026-01-01" in access[0] and "\\r\\x1b\\u2028" in access[0]


def test_a_traceback_is_indented_under_its_record():
    stream = io.StringIO()
    logs.setup("text", "INFO", stream=stream)
    try:
        raise ValueError("bad value\nFORGED line\x1b[31m")
    except ValueError:
        logging.getLogger("gpu.test").exception("failed on %s", "a\nb")
    finally:
        logs.setup("text", "INFO")
    lines = stream.getvalue().splitlines()
    assert len([line for line in lines if not line.startswith(" ")]) == 1
    assert "failed on a\\nb" in lines[0]
    assert any(line == "  FORGED line\\x1b[31m" for line in lines)
