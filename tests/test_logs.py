"""Log lines: readable text or JSON, always with the request id."""
from __future__ import annotations

import io
import json
import logging

from app import logs


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
