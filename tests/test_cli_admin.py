"""``gpu-orchestrator admin`` against a live API on 127.0.0.1: tables, --json, exit codes."""

from __future__ import annotations

import json

import pytest

from app import cli, create_app
from tests.api_support import register_fleet
from tests.browser_support import LiveServer

ADMIN, USER = "k-admin", "k-user"


@pytest.fixture
def live(settings, redis_url, monkeypatch):
    st = settings.replace(
        dashboard={"enabled": False},
        auth={"enabled": True, "api_keys": {ADMIN: "ops", USER: "alice"}, "admins": ["ops"]},
    )
    app = create_app(st, redis_url=redis_url)
    register_fleet(app, (("node-a", 2), ("node:b", 1)))
    with LiveServer(app) as server:
        monkeypatch.setenv("GPU_ORCH_URL", server.url)
        monkeypatch.setenv("GPU_ORCH_API_KEY", ADMIN)
        server.app = app
        yield server


def admin(capsys, *argv):
    code = cli.main(["admin", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_nodes_table_and_json(live, capsys):
    code, out, _ = admin(capsys, "nodes")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NODE",
        "STATE",
        "SILENT",
        "GPUS",
        "FREE",
        "CORDONED",
        "ALLOCATIONS",
    ]
    assert lines[1].split()[:2] == ["node-a", "alive"] and lines[1].split()[3:5] == ["2", "2"]
    code, out, _ = admin(capsys, "nodes", "--json")
    assert {n["name"] for n in json.loads(out)["nodes"]} == {"node-a", "node:b"}


def test_cordon_uncordon_a_node_and_a_gpu(live, capsys):
    assert admin(capsys, "cordon", "node-a")[1].strip() == "node-a: cordoned"
    assert admin(capsys, "uncordon", "node-a")[1].strip() == "node-a: schedulable"
    assert admin(capsys, "cordon", "node-a:1")[1].strip() == "node-a:1: cordoned"
    assert admin(capsys, "cordon", "node:b")[1].strip() == "node:b: cordoned"  # ':' in a name
    code, out, _ = admin(capsys, "nodes")
    row = next(line for line in out.splitlines() if line.startswith("node-a"))
    assert row.split()[5] == "1"
    events = live.app.extensions["gpu_engine"].events(count=50)
    assert {e["event"]: e.get("by") for e in events}["gpu_cordoned"] == "ops"


def test_drain_wait_and_forget_and_priority(live, capsys):
    engine = live.app.extensions["gpu_engine"]
    a = engine.allocate({"service_name": "x", "required_gpus": 2})
    q = engine.allocate({"service_name": "y", "required_gpus": 2})
    code, out, _ = admin(capsys, "drain", "node-a", "--wait", "--timeout", "0.3")
    assert code == 1 and "1 allocation(s) left" in out and a["id"] in out
    # --timeout alone would be ignored (a drain without --wait does not wait): refused, and
    # the node is not drained by it
    code, _, err = admin(capsys, "drain", "node:b", "--timeout", "30")
    assert code == 2 and "--wait" in err and len(err.splitlines()) == 1
    node_b = [g for g in engine.snapshot(queue=False)["gpus"] if g["node"] == "node:b"]
    assert node_b and not any(g["cordoned"] for g in node_b)
    code, out, _ = admin(capsys, "priority", q["id"], "9")
    assert code == 0 and out.strip() == f"{q['id']}: priority 9, position 1"
    code, _, err = admin(capsys, "forget", "node-a")
    assert code == 2 and "409" in err and "alive" in err and len(err.splitlines()) == 1
    engine.release(a["id"])
    code, out, _ = admin(capsys, "drain", "node-a", "--wait", "--json")
    assert code == 0 and json.loads(out)["drained"] is True


def test_refusals_and_an_unreachable_api_are_one_line(live, capsys, monkeypatch):
    monkeypatch.setenv("GPU_ORCH_API_KEY", USER)
    code, _, err = admin(capsys, "cordon", "node-a")
    assert code == 2 and err.startswith("gpu-orchestrator: error: ") and "403" in err
    monkeypatch.setenv("GPU_ORCH_URL", "http://127.0.0.1:9")
    code, _, err = admin(capsys, "nodes")
    assert code == 1 and "cannot reach http://127.0.0.1:9" in err and ADMIN not in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["admin", "priority", "x", "high"])
    assert exc.value.code == 2


def test_a_url_without_its_scheme_is_bad_input(monkeypatch, capsys):
    """Exit 2 (fix the setting), not 1 (an API that is down), and one line that names it."""
    monkeypatch.setenv("GPU_ORCH_URL", "gpu-api:8086")
    code, out, err = admin(capsys, "nodes")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "GPU_ORCH_URL" in err and "http://" in err


def test_the_key_reaches_an_api_that_reads_another_header(settings, redis_url, monkeypatch, capsys):
    """auth.header_name is the server's choice; the CLI sends the key as a bearer token, which
    every server accepts, so an operator's admin key works whatever the header is called."""
    st = settings.replace(
        dashboard={"enabled": False},
        auth={
            "enabled": True,
            "header_name": "X-Gpu-Token",
            "api_keys": {ADMIN: "ops"},
            "admins": ["ops"],
        },
    )
    app = create_app(st, redis_url=redis_url)
    register_fleet(app, (("node-a", 2),))
    with LiveServer(app) as server:
        monkeypatch.setenv("GPU_ORCH_URL", server.url)
        monkeypatch.setenv("GPU_ORCH_API_KEY", ADMIN)
        code, out, err = admin(capsys, "cordon", "node-a")
    assert (code, out.strip(), err) == (0, "node-a: cordoned", "")


def test_a_url_that_is_not_the_api_is_one_line_exit_1(monkeypatch, capsys):
    """A 200 page that is not the API's JSON (a wrong GPU_ORCH_URL) made 'admin nodes' die
    with a TypeError traceback."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>some other service</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GPU_ORCH_URL", f"http://127.0.0.1:{server.server_address[1]}")
        code, out, err = admin(capsys, "nodes")
    finally:
        server.shutdown()
        server.server_close()
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "not the API's JSON" in err and "GPU_ORCH_URL" in err
