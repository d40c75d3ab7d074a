"""The API's gunicorn worker (app/http_worker.py) against a real ``gpu-orchestrator api``:
slow and idle clients, deadlines, body limits and HTTP/1.1 framing."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.workers import base as gunicorn_base

from app.http_worker import BufferingWorker, Limits, _Clock, _Connection
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
HEADER_TIMEOUT = 2.0
MAX_BODY = 4096


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory):
    """One API (2 workers x 2 threads, header_timeout 2s) for the whole module."""
    tmp = tmp_path_factory.mktemp("http-worker")
    port = free_port()
    config = tmp / "config.yaml"
    config.write_text(
        f"server:\n  workers: 2\n  threads: 2\n  host: 127.0.0.1\n"
        f"  header_timeout: {HEADER_TIMEOUT}s\n  max_body_bytes: {MAX_BODY}\n"
        "dashboard:\n  enabled: false\nlogging:\n  level: WARNING\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPU_ORCH__") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        REDIS_URL=redis_server.url,
        PORT=str(port),
        CONFIG_PATH=str(config),
        GPU_ORCH__REDIS__PREFIX="{gpuo-" + uuid.uuid4().hex[:8] + "}",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _exchange(port, _get("/healthz")).startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp / "api.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (the socket's timeout bounds it)."""
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def _exchange(port: int, request: bytes) -> bytes:
    """One request on a fresh connection, ``Connection: close``; the whole answer."""
    head, _, body = request.partition(b"\r\n\r\n")
    with _connect(port) as sock:
        sock.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
        return _read_all(sock)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _body(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def _still_open(sock: socket.socket) -> bool:
    """True when the server has neither closed the connection nor answered on it."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b"x"  # never: an answer or EOF means it is not held any more
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# --------------------------------------------------------------------------- slow clients


def test_held_slow_connections_do_not_stall_other_clients(api):
    """Regression: under gthread, 8 half-sent heads (2 workers x 4 threads) or 200 silent
    sockets made every other request time out for as long as they were held."""
    held = []
    try:
        for i in range(150):
            sock = _connect(api)
            if i % 3 == 1:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # head never finished
            elif i % 3 == 2:
                sock.sendall(
                    b"POST /gpu/allocate HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
                )
            held.append(sock)
        for _ in range(10):  # another client, each time on a fresh connection
            answer = _exchange(api, _get("/healthz"))
            assert _status(answer) == 200
        # They were still held while the other client was served (so the test tested that).
        assert all(_still_open(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_a_partial_head_gets_408_and_is_closed_after_header_timeout(api):
    with _connect(api) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        answer = _read_all(sock)  # the server closes it; a 10 s socket timeout says it did not
        waited = time.monotonic() - t0
    assert _status(answer) == 408
    assert _body(answer)["error"]["code"] == "request_timeout"
    assert waited >= HEADER_TIMEOUT - 0.2  # not cut off before the configured time


def test_the_deadline_covers_the_whole_request_not_each_read(api):
    """A client trickling its body a byte at a time keeps every read short; it is still cut
    off once header_timeout has passed since the connection opened."""
    with _connect(api) as sock:
        sock.sendall(
            b"POST /gpu/allocate HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        t0 = time.monotonic()
        answer = b""
        for _ in range(40):  # 40 x 0.25 s = 10 s of trickle, far past header_timeout
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or answer.endswith(b"}"):
                break
        waited = time.monotonic() - t0
    assert _status(answer) == 408
    assert waited < HEADER_TIMEOUT + 5


def test_a_silent_connection_is_closed_after_header_timeout(api):
    with _connect(api) as sock:
        assert _read_all(sock) == b""  # closed without an answer: there was no request


def test_an_idle_keep_alive_connection_outlives_header_timeout(api):
    """header_timeout bounds a request in flight; between requests idle_timeout (60 s) applies."""
    with _connect(api) as sock:
        sock.sendall(_get("/healthz"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT + 0.5)
        sock.sendall(_get("/healthz"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


# --------------------------------------------------------------------------- bodies


def _chunked(payload: bytes, size: int = 1000) -> bytes:
    out = b""
    for i in range(0, len(payload), size):
        piece = payload[i : i + size]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


def _post_chunked(api: int, payload: bytes) -> bytes:
    return _exchange(
        api,
        b"POST /gpu/allocate HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(payload),
    )


def test_a_chunked_body_over_max_body_bytes_is_413(api):
    """Regression: a chunked body over the limit was cut to the limit and parsed (200)."""
    payload = json.dumps({"service_name": "big", "workload_type": "inference"}).encode()
    answer = _post_chunked(api, payload + b" " * (MAX_BODY * 50))
    assert _status(answer) == 413
    assert _body(answer)["error"]["code"] == "payload_too_large"


def test_a_content_length_over_max_body_bytes_is_413_before_the_body_is_sent(api):
    with _connect(api) as sock:
        sock.sendall(
            b"POST /gpu/allocate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        answer = _read_all(sock)
    assert _status(answer) == 413


def test_a_chunked_body_under_the_limit_reaches_the_app(api):
    answer = _post_chunked(api, b'{"workload_type": "inference"}' + b" " * 1500)
    assert _status(answer) == 422
    assert "service_name" in _body(answer)["error"]["details"]


# --------------------------------------------------------------------------- HTTP/1.1


def test_pipelined_requests_are_answered_in_order(api):
    with _connect(api) as sock:
        sock.sendall(_get("/healthz") + _get("/nope") + _get("/healthz", "Connection: close\r\n"))
        answer = _read_all(sock)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", answer) == [b"200", b"404", b"200"]


def test_a_client_that_half_closes_after_its_request_gets_the_answer_then_eof(api):
    with _connect(api) as sock:
        sock.sendall(_get("/healthz"))
        sock.shutdown(socket.SHUT_WR)
        answer = _read_all(sock)  # EOF promptly after the answer, not after idle_timeout
    assert _status(answer) == 200


class _Transport(asyncio.Transport):
    """Records what the connection writes and whether it reads."""

    def __init__(self):
        super().__init__()
        self.out = b""
        self.reading = True
        self.closed = False

    def write(self, data):
        self.out += data

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def get_write_buffer_size(self):
        return 0

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True


def test_a_client_not_reading_its_answers_is_read_no_further_until_they_drain():
    """Pipelined requests from a client that reads nothing: once asyncio says the unsent
    answers passed its high-water mark, the next request waits, so what a client sends
    cannot grow the server's buffers."""
    loop = asyncio.new_event_loop()
    worker = SimpleNamespace(
        limits=Limits(),
        loop=loop,
        pool=ThreadPoolExecutor(1),
        clock=_Clock(),
        alive=True,
        cfg=SimpleNamespace(workers=1),
        log=None,
        forget=lambda conn: None,
        call_app=lambda env: (
            "200 OK",
            [("Content-Type", "text/plain")],
            env["PATH_INFO"].encode(),
        ),
    )
    conn = _Connection(worker, ("127.0.0.1", 1), ("127.0.0.1", "80"))
    transport = _Transport()
    try:
        conn.connection_made(transport)

        def answers():
            loop.run_until_complete(asyncio.sleep(0.2))
            return transport.out.count(b"HTTP/1.1 200")

        conn.data_received(_get("/one"))
        assert answers() == 1
        conn.pause_writing()  # as asyncio does once unsent answers pass its high-water mark
        conn.data_received(_get("/two"))  # already in flight: kept, not answered
        assert answers() == 1
        conn.resume_writing()
        assert answers() == 2 and transport.out.endswith(b"/two") and transport.reading
        conn.data_received(_get("/three"))
        conn.pause_writing()  # backs up while /three runs
        assert answers() == 3 and not transport.reading  # answered, but nothing more is read
        conn.resume_writing()
        assert transport.reading
    finally:
        conn.connection_lost(None)
        worker.pool.shutdown()
        loop.close()


def test_expect_100_continue_gets_a_100_then_the_answer(api):
    body = b'{"workload_type": "inference"}'
    with _connect(api) as sock:
        sock.sendall(
            b"POST /gpu/allocate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        answer = _read_all(sock)
    assert _status(answer) == 422


def test_malformed_requests_get_a_json_400_and_oversized_heads_431(api):
    answer = _exchange(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert _status(answer) == 400 and _body(answer)["error"]["code"] == "bad_request"
    answer = _exchange(api, _get("/healthz", "X-Big: " + "a" * 20000 + "\r\n"))
    assert _status(answer) == 431
    both = b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"  # request smuggling shape
    answer = _exchange(api, b"POST /gpu/allocate HTTP/1.1\r\nHost: x\r\n" + both + b"\r\n0\r\n\r\n")
    assert _status(answer) == 400


def test_header_names_with_underscores_are_dropped(api):
    """``X_Request_ID`` would land in the same environ key as ``X-Request-ID``."""
    answer = _exchange(api, _get("/healthz", "X_Request_ID: spoofed\r\n"))
    assert b"spoofed" not in answer
    answer = _exchange(api, _get("/healthz", "X-Request-ID: mine\r\n"))
    assert b"X-Request-ID: mine" in answer


# --------------------------------------------------------------------------- gunicorn contract


def test_gunicorn_still_offers_what_the_worker_relies_on():
    """Canary: BufferingWorker uses gunicorn's worker contract only (base.Worker's run(),
    init_process() and the attributes every worker has). An upgrade that moves one fails here,
    not in production."""
    assert issubclass(BufferingWorker, gunicorn_base.Worker)
    assert "override this method" in " ".join((gunicorn_base.Worker.run.__doc__ or "").split())
    assert "super().init_process()" in (gunicorn_base.Worker.init_process.__doc__ or "")
    init = inspect.getsource(gunicorn_base.Worker.__init__)
    for attr in ("self.age", "self.ppid", "self.sockets", "self.cfg", "self.alive", "self.log"):
        assert attr in init, attr
    process = inspect.getsource(gunicorn_base.Worker.init_process)
    assert "self.load_wsgi()" in process and "self.run()" in process
    assert "set_wakeup_fd(self.PIPE[1])" in inspect.getsource(gunicorn_base.Worker.init_signals)
    assert callable(gunicorn_base.Worker.notify)
    load = inspect.getsource(gunicorn_base.Worker.load_wsgi)
    assert "self.wsgi = self.app.wsgi()" in load
