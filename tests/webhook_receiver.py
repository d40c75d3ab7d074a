"""A real HTTP receiver on 127.0.0.1 for webhook tests (records bodies, answers scripted codes),
and the worker side that delivers to it in the test's process."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """``Receiver(codes=[500, 500, 200])``: answers those codes in order, then the last one.

    ``hold`` (a threading.Event) makes the first request block until it is set, to kill a worker
    in the middle of a delivery.
    """

    def __init__(self, codes=(200,), hold: threading.Event | None = None):
        self.codes = list(codes)
        self.hold = hold
        self.requests: list[dict] = []
        self.received = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.received:
                    n = len(outer.requests)
                    outer.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    outer.received.notify_all()
                if outer.hold is not None and n == 0:
                    outer.hold.wait(30)
                code = outer.codes[min(n, len(outer.codes) - 1)]
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict]:
        with self.received:
            self.received.wait_for(lambda: len(self.requests) >= count, timeout)
            return list(self.requests)


class Trickler:
    """A receiver that answers ``200`` and then one header line every ``interval`` seconds,
    ``lines`` times (the slow receiver of issue 11). ``connections`` stamps each accept."""

    def __init__(self, interval: float = 0.5, lines: int = 40):
        self.interval, self.lines = interval, lines
        self.connections: list[float] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(time.monotonic())
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for i in range(self.lines):
                    if self.stop.wait(self.interval):
                        return
                    conn.sendall(f"X-Drip-{i}: x\r\n".encode())
                conn.sendall(b"Content-Length: 0\r\n\r\n")
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


@contextmanager
def delivering(settings, redis, *, gpus: int = 1, memory_mb: int = 1000, backend: str = ""):
    """The worker side of a delivery, in this process: an engine whose fleet is one node "n"
    of ``gpus`` GPUs, and ``workers.context`` configured as a worker has it (RQ's connection
    too), which ``workers.webhooks.deliver`` reads; undone on the way out. Yields the engine."""
    from app.engine import Engine
    from app.redis_client import connect
    from workers import context

    engine = Engine(redis, settings)
    node = [
        {"index": i, "uuid": f"G-{i}", "name": "x", "memory_total_mb": memory_mb}
        for i in range(gpus)
    ]
    engine.report_node("n", node, backend=backend, host="h")
    rq_redis = connect(settings.redis.url, settings, decode=False)
    context.configure(settings, redis, rq_redis)
    try:
        yield engine
    finally:
        rq_redis.close()
        context.configure(None, None, None)
