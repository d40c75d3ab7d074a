"""A webhook receiver on 127.0.0.1 that records every delivery and can be told to fail.

Modes: ``up`` (answer 200 and record), ``error`` (answer 500, record the attempt as failed) and
``down`` (the listening socket is closed: connections are refused). Going from ``down`` back to
another mode listens again on the same port, so the URLs the service holds stay valid.

Its URL carries a random token (``http://127.0.0.1:<port>/<token>``). Several chaos runs share a
machine (the test suites of parallel branches, each with its own webhook secret), and a port one
run's receiver gave up (``down``, or its run ended) can be handed to another run's receiver while
the first run's workers still retry deliveries to it: those arrive signed with the other run's
secret. Before the token they were recorded as deliveries with bad signatures (one chaos run
failed on ``webhook_bad_signatures: 1``). Now a request outside the token answers 404 and is
counted in ``foreign``, apart from this run's deliveries, whose signatures are all checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class WebhookReceiver:
    """Records deliveries as dicts: ``t``, ``path``, ``status`` answered, ``body``, ``event_id``,
    ``request_id``, ``event``, ``signature_ok`` (None when no secret is set)."""

    def __init__(self, secret: str = "", host: str = "127.0.0.1", port: int = 0):
        self.secret = secret
        self.host = host
        self.mode = "up"
        self.delay = 0.0  # seconds each answer waits (to catch a worker inside a job)
        self.deliveries: list[dict[str, Any]] = []
        self.failed_attempts = 0
        self.token = secrets.token_hex(8)
        self.foreign_requests = 0  # requests outside the token: another sender's
        self.foreign: list[dict[str, Any]] = []  # the first 100 of them, for the report
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self._listen()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/{self.token}"

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the harness output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.split("/")[1:2] != [receiver.token]:
                    receiver._foreign(self.path, dict(self.headers), body)
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = 500 if receiver.mode == "error" else 200
                receiver._record(self.path, dict(self.headers), body, status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler

    def _listen(self) -> None:
        self._server = _Server((self.host, self.port), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, kwargs={"poll_interval": 0.05}
        )
        self._thread.start()

    def _close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_mode(self, mode: str) -> None:
        if mode not in ("up", "error", "down"):
            raise ValueError(f"mode must be up, error or down, got {mode!r}")
        with self._lock:
            if mode == "down" and self._server is not None:
                self._close()
            elif mode != "down" and self._server is None:
                for _ in range(100):  # the port can linger for a moment after close
                    try:
                        self._listen()
                        break
                    except OSError:
                        time.sleep(0.05)
                else:
                    raise RuntimeError(f"could not listen on {self.host}:{self.port} again")
            self.mode = mode

    def verify(self, headers: dict[str, str], body: bytes) -> bool | None:
        """Check the signature as docs/workers.md tells receivers to (written out here, not
        imported, so the check does not share code with the signer)."""
        if not self.secret:
            return None
        lower = {k.lower(): v for k, v in headers.items()}
        sig = lower.get("x-gpu-orchestrator-signature", "")
        ts = lower.get("x-gpu-orchestrator-timestamp", "")
        want = (
            "sha256="
            + hmac.new(self.secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        )
        return hmac.compare_digest(want, sig)

    def _record(self, path: str, headers: dict[str, str], body: bytes, status: int) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        payload = payload if isinstance(payload, dict) else {}
        entry = {
            "t": time.time(),
            "path": path,
            "status": status,
            "body": payload,
            "event_id": payload.get("event_id"),
            "request_id": payload.get("request_id"),
            "event": payload.get("status"),
            "signature_ok": self.verify(headers, body),
        }
        with self._lock:
            if status >= 300:
                self.failed_attempts += 1
            else:
                self.deliveries.append(entry)

    def _foreign(self, path: str, headers: dict[str, str], body: bytes) -> None:
        """Keep a few for the report (no signature header: it is another run's secret's)."""
        with self._lock:
            self.foreign_requests += 1
            if len(self.foreign) < 100:
                self.foreign.append(
                    {
                        "t": time.time(),
                        "path": path,
                        "user_agent": headers.get("User-Agent", ""),
                        "bytes": len(body),
                    }
                )

    def delivered(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.deliveries)

    def close(self) -> None:
        with self._lock:
            self._close()
