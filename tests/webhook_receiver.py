"""A real HTTP receiver on 127.0.0.1 for webhook tests: records bodies, answers scripted codes."""
from __future__ import annotations

import threading
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
                    outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                           "body": body})
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
