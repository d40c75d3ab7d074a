"""The gunicorn worker that serves the API: each request is read whole on an event loop, then
handed to a thread that runs the Flask app.

Why not gunicorn's ``gthread``: it gives a connection to one of its few threads as soon as the
connection has a byte to read, and that thread then blocks until the request is complete. Eight
clients that send half a header and go quiet (2 workers x 4 threads) stalled every other client;
200 silent connections did the same. Here the reading happens on an asyncio event loop, where a
waiting connection costs a few kilobytes and no thread: a thread is taken only by a request that
has fully arrived, and the threads never wait for a client.

Per connection, in this order:

- a new connection must deliver its first whole request (head and body) within
  ``server.header_timeout`` of being accepted;
- a kept-alive connection may sit idle for ``server.idle_timeout``; once the first byte of its
  next request arrives, that request must be complete within ``header_timeout``;
- past a deadline the connection is closed (a client that had sent part of a request gets a 408
  first); a head larger than :data:`MAX_HEAD_BYTES` is a 431, a body larger than
  ``server.max_body_bytes`` a 413, whether it is sent with a Content-Length or chunked, and
  before the body is read;
- a response the client does not read is dropped with the connection once ``idle_timeout`` has
  passed; a client that pipelines requests without reading the answers is read no further
  once 64 KiB of answers wait (asyncio's write flow control), so it cannot grow our buffers.

HTTP/1.1 framing (Content-Length, chunked, keep-alive, pipelining, ``Expect: 100-continue``) is
h11's, a well-kept state machine that refuses malformed framing (conflicting lengths, unknown
transfer codings, bare CR/LF), so this module holds policy, not parsing. On top of it a request
with both Content-Length and Transfer-Encoding (request smuggling's shape) is a 400.

Gunicorn contract: a custom worker subclasses ``gunicorn.workers.base.Worker`` and overrides
``run()`` (its docstring invites exactly that) and ``init_process()`` (ending with the super
call, as its docstring asks). ``run()`` uses the attributes every gunicorn worker has:
``sockets``, ``wsgi``, ``alive``, ``notify()``, ``ppid``, ``cfg``, ``log`` and the signal
wake-up pipe ``PIPE``. tests/test_http_worker.py names each of them, so an upgrade that moves
one fails loudly.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import resource
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import h11
from gunicorn.workers.base import Worker

#: Largest request line plus headers; past it the request is answered 431 (h11's default).
MAX_HEAD_BYTES = 16 * 1024
#: Connections one worker holds at most; past it, it stops accepting until one closes (a held
#: connection costs a few KB; the deadlines above free them).
MAX_CONNECTIONS = 10_000
#: Longest a worker leaves a waiting connection to a sibling holding fewer before taking it.
MAX_DEFER = 0.02
#: How long a connection closed after an error keeps being read (and discarded), so that a
#: client still sending its body reads our answer instead of a connection reset.
LINGER_SECONDS = 2.0
#: Response headers that describe the connection, set here, never taken from the app.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}


@dataclass(frozen=True)
class Limits:
    """The per-connection limits from ``server.*`` (see the module docstring)."""

    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_body_bytes: int = 65536


def _error_body(code: str, message: str) -> bytes:
    """The API's one error shape (app/http_errors.py), for answers given before the app runs."""
    return json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}
_CODES = {
    400: ("bad_request", "malformed HTTP request"),
    408: ("request_timeout", "the request did not arrive within server.header_timeout"),
    413: ("payload_too_large", "request body is larger than the configured limit"),
    431: ("headers_too_large", "request headers are larger than the server accepts"),
    500: ("internal_error", "internal server error"),
}


def _raw_error(status: int) -> bytes:
    """A complete ``Connection: close`` error response, written outside h11's state machine
    (h11 cannot answer a request whose head never finished arriving)."""
    body = _error_body(*_CODES[status])
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
    ) + body


class Board:
    """Open connections per worker, in memory the workers share (made in the master, before
    any fork), so a worker holding more than a sibling can leave a new connection to it.

    Every worker waits on the one listening socket and whichever wakes first accepts; on a
    busy machine that is often the same one, and a burst of keep-alive clients (bench/http.py's
    16) landed 16/0 or 14/2 on two workers, leaving one core idle. A worker's slot is its
    gunicorn ``age`` (unique, counting up) modulo the number of slots; ``child_exit`` in the
    master clears the slot of a worker that died. Two live workers share a slot only after
    ``slots`` restarts of one while the other lives; the cost is a worse split, never more
    than ``MAX_DEFER`` per connection.
    """

    def __init__(self, slots: int):
        from multiprocessing.sharedctypes import RawArray

        self.counts = RawArray("i", [-1] * slots)

    def slot(self, age: int) -> int:
        return age % len(self.counts)

    def publish(self, age: int, count: int) -> None:
        self.counts[self.slot(age)] = count

    def clear(self, age: int) -> None:
        self.counts[self.slot(age)] = -1

    def fewest_elsewhere(self, age: int) -> int | None:
        mine = self.slot(age)
        others = [c for i, c in enumerate(self.counts[:]) if i != mine and c >= 0]
        return min(others) if others else None


class _Clock:
    """``Date`` header text, formatted at most once a second."""

    def __init__(self):
        self._second = -1
        self._text = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._text = now, formatdate(now, usegmt=True).encode()
        return self._text


class BufferingWorker(Worker):
    """Reads whole requests on an event loop and runs them on ``server.threads`` threads."""

    limits = Limits()
    board: Board | None = None

    @classmethod
    def configured(cls, limits: Limits, workers: int = 1) -> type[BufferingWorker]:
        """This class with ``limits`` and a connection board for ``workers`` built in (gunicorn
        constructs the workers itself); call it in the master, before gunicorn forks."""
        board = Board(8 * workers) if workers > 1 else None
        return type(cls.__name__, (cls,), {"limits": limits, "board": board})

    def init_process(self):
        # Each held connection is a file descriptor; the usual soft limit (1024) would cap a
        # worker below what the event loop can hold. Raising it to the hard limit is allowed.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass
        super().init_process()

    def run(self):
        self.loop = asyncio.new_event_loop()
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix="api")
        self.conns: set[_Connection] = set()
        self.clock = _Clock()
        self._accepting = False
        self._defer_since: float | None = None
        self._wake = asyncio.Event()
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            for conn in list(self.conns):
                conn.abort()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.loop.close()

    async def _serve(self) -> None:
        self.loop.add_reader(self.PIPE[0], self._on_signal)
        self.server_names = {}
        for listener in self.sockets:
            listener.setblocking(False)
            name = listener.getsockname()
            self.server_names[listener.fileno()] = (
                (str(name[0]), str(name[1])) if isinstance(name, tuple) else (str(name), "")
            )
        self._publish()
        self._set_accepting(True)
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass
            self._wake.clear()
        await self._drain()

    async def _drain(self) -> None:
        """Graceful stop: accept nothing new, close idle connections, let running requests
        answer (with ``Connection: close``) for up to ``graceful_timeout``."""
        self._set_accepting(False)
        self.alive = False
        if self.board is not None:
            self.board.clear(self.age)
        for conn in list(self.conns):
            conn.stop()
        deadline = self.loop.time() + self.cfg.graceful_timeout
        while self.conns and self.loop.time() < deadline:
            self.notify()
            await asyncio.sleep(0.05)

    def _on_signal(self) -> None:
        """gunicorn's signal handlers write to ``PIPE``; wake the main loop to look at ``alive``."""
        try:
            os.read(self.PIPE[0], 4096)
        except OSError:
            pass
        self._wake.set()

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        for listener in self.sockets:
            if on:
                self.loop.add_reader(listener.fileno(), self._accept, listener)
            else:
                self.loop.remove_reader(listener.fileno())
        self._accepting = on

    def _publish(self) -> None:
        if self.board is not None:
            self.board.publish(self.age, len(self.conns))

    def _defer(self) -> bool:
        """True while a sibling holds fewer connections than this worker, for ``MAX_DEFER``."""
        fewest = self.board.fewest_elsewhere(self.age) if self.board is not None else None
        if fewest is None or len(self.conns) <= fewest:
            self._defer_since = None
            return False
        now = self.loop.time()
        if self._defer_since is None:
            self._defer_since = now
        return now - self._defer_since < MAX_DEFER

    def _accept(self, listener) -> None:
        """Take one connection per wake-up (unless a sibling holds fewer: see :class:`Board`)."""
        if self._defer():
            self._set_accepting(False)  # look again soon; the sibling may take it meanwhile
            self.loop.call_later(0.002, self._resume_accepting)
            return
        self._defer_since = None
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.warning(
                    "accept failed (%s); pausing new connections for 1s", os.strerror(exc.errno)
                )
                self._set_accepting(False)
                self.loop.call_later(1.0, self._resume_accepting)
                return
            raise
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, peer, self.server_names.get(listener.fileno(), ("", "")))
        self.conns.add(conn)
        self._publish()
        if len(self.conns) >= MAX_CONNECTIONS:
            self._set_accepting(False)
        self.loop.create_task(self._connect(conn, sock))

    async def _connect(self, conn: _Connection, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except OSError:
            self.forget(conn)
            sock.close()

    def _resume_accepting(self) -> None:
        if self.alive and len(self.conns) < MAX_CONNECTIONS:
            self._set_accepting(True)

    def forget(self, conn: _Connection) -> None:
        self.conns.discard(conn)
        self._publish()
        if self.alive and not self._accepting and len(self.conns) < MAX_CONNECTIONS:
            self._set_accepting(True)

    def call_app(self, environ: dict) -> tuple[str, list, bytes]:
        """Run the WSGI app (in a pool thread); the whole response, buffered (API answers are
        small, and a buffered answer never makes a thread wait for a slow reader)."""
        head: list = []
        chunks: list[bytes] = []

        def start_response(status, headers, exc_info=None):
            if exc_info and head:
                raise exc_info[1].with_traceback(exc_info[2])
            head[:] = [status, headers]
            return chunks.append

        result = self.wsgi(environ, start_response)
        try:
            for chunk in result:
                if chunk:
                    chunks.append(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return head[0], head[1], b"".join(chunks)


class _Connection(asyncio.Protocol):
    """One client connection: h11 frames it, the deadlines above bound it."""

    def __init__(self, worker: BufferingWorker, peer: Any, server: tuple[str, str]):
        self.worker = worker
        self.limits = worker.limits
        self.peer = peer if isinstance(peer, tuple) else (str(peer or ""), 0)
        self.server = server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.request: h11.Request | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.started = False  # a byte of the current request has arrived (or it is the first)
        self.busy = False  # the app is running this connection's request
        self.closing = False  # an answer with Connection: close was written
        self.eof = False  # the client half-closed its side
        self.write_paused = False  # asyncio's flow control: too much unsent

    # ---- asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport
        self.started = True  # a new connection owes its first request within header_timeout
        self._arm(self.limits.header_timeout, self._timed_out)

    def connection_lost(self, exc):
        self._disarm()
        self.transport = None
        self.worker.forget(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after an error: read and discard
        if not self.started:
            self.started = True
            self._arm(self.limits.header_timeout, self._timed_out)
        self.h11.receive_data(data)
        if not self.write_paused:
            self._advance()

    def eof_received(self):
        """The client has finished sending: answer what it sent, then close."""
        self.eof = True
        if self.closing:
            return False  # lingering after an error: nothing more to read, close now
        if not self.busy:
            self.h11.receive_data(b"")
            self._advance()
        return True  # keep the write side for the answer; _next_request closes after it

    # ---- reading a request

    def _advance(self) -> None:
        """Consume h11 events until a whole request is in hand or more bytes are needed."""
        while self.transport is not None and not self.busy and not self.closing:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                hint = exc.error_status_hint
                self._fail(hint if hint in _REASONS else 400)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body, self.body_size = event, [], 0
                if self._head_size(event) > MAX_HEAD_BYTES:  # h11 bounds only a partial head
                    self._fail(431)
                    return
                names = [name for name, _ in event.headers]
                if b"transfer-encoding" in names and b"content-length" in names:
                    self._fail(400)  # request smuggling's shape (RFC 9112 6.1): refused
                    return
                if self._declared_length(event) > self.limits.max_body_bytes:
                    self._fail(413)
                    return
                if self.h11.they_are_waiting_for_100_continue:
                    self.transport.write(
                        self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
                    )
            elif isinstance(event, h11.Data):
                self.body_size += len(event.data)
                if self.body_size > self.limits.max_body_bytes:  # chunked: counted as it comes
                    self._fail(413)
                    return
                self.body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    @staticmethod
    def _head_size(request: h11.Request) -> int:
        return len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers) + 16

    @staticmethod
    def _declared_length(request: h11.Request) -> int:
        for name, value in request.headers:
            if name == b"content-length":
                return int(value)  # h11 has checked it is one decimal number
        return 0

    def _dispatch(self) -> None:
        self.busy = True
        self._disarm()
        self.transport.pause_reading()
        environ = self._environ(self.request, b"".join(self.body))
        self.body = []
        future = self.worker.loop.run_in_executor(self.worker.pool, self.worker.call_app, environ)
        future.add_done_callback(self._respond)

    def _environ(self, req: h11.Request, body: bytes) -> dict:
        target = req.target
        if not target.startswith(b"/"):  # absolute form (http://host/path) or "*"
            scheme, sep, rest = target.partition(b"://")
            target = (b"/" + rest.partition(b"/")[2]) if sep else b"/"
        path, _, query = target.partition(b"?")
        environ = {
            "REQUEST_METHOD": req.method.decode("ascii"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "RAW_URI": req.target.decode("latin-1"),
            "SERVER_NAME": self.server[0],
            "SERVER_PORT": self.server[1],
            "SERVER_PROTOCOL": "HTTP/" + req.http_version.decode("ascii"),
            "REMOTE_ADDR": str(self.peer[0]),
            "REMOTE_PORT": str(self.peer[1]),
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.worker.cfg.workers > 1,
            "wsgi.run_once": False,
        }
        for name, value in req.headers:
            if b"_" in name:
                continue  # X_Api_Key would shadow X-Api-Key in environ: dropped, as gunicorn does
            if name in (b"content-length", b"transfer-encoding"):
                continue  # the body is whole; CONTENT_LENGTH says how long it is
            text = value.decode("latin-1")
            if name == b"content-type":
                environ["CONTENT_TYPE"] = text
                continue
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            if key in environ:
                text = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + text
            environ[key] = text
        return environ

    # ---- answering

    def _respond(self, future: asyncio.Future) -> None:
        self.busy = False
        if self.transport is None:
            return  # the client left while the app ran
        try:
            status, headers, body = future.result()
            code = int(status[:3])
            reason = status[4:].encode("latin-1")
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        except Exception:
            self.worker.log.exception("Error handling request")
            code, reason, body = 500, _REASONS[500], _error_body(*_CODES[500])
            out = [(b"Content-Type", b"application/json")]
        out = [(k, v) for k, v in out if k.lower() not in _HOP_BY_HOP]
        if code in (204, 304) or code < 200 or self.request.method == b"HEAD":
            body = b""
        elif not any(k.lower() == b"content-length" for k, _ in out):
            out.append((b"Content-Length", str(len(body)).encode()))
        out.append((b"Date", self.worker.clock.date()))
        if not self.worker.alive:
            out.append((b"Connection", b"close"))
        try:
            data = self.h11.send(h11.Response(status_code=code, headers=out, reason=reason))
            if body:
                data += self.h11.send(h11.Data(data=body))
            data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.worker.log.exception("The app's response is not valid HTTP")
            self.transport.write(_raw_error(500))
            self._close()
            return
        self.transport.write(data)
        self._next_request()

    def _next_request(self) -> None:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        if self.h11.our_state is not h11.IDLE or not self.worker.alive or self.eof:
            self._close()
            return
        self.request = None
        if self.write_paused:  # answers pile up unread: read no more until they drain
            self._arm(self.limits.idle_timeout, self.abort)
            return
        self._read_next()

    def _read_next(self) -> None:
        self.transport.resume_reading()
        if self.h11.trailing_data[0]:  # a pipelined request is already (partly) here
            self.started = True
            self._arm(self.limits.header_timeout, self._timed_out)
            self._advance()
        else:
            self.started = False
            self._arm(self.limits.idle_timeout, self._timed_out)

    def pause_writing(self) -> None:
        """asyncio: our unsent answers passed the high-water mark (a client that pipelines
        requests without reading the answers); no further request is read until they drain."""
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if (
            self.transport is not None
            and not self.busy
            and not self.closing
            and self.request is None
        ):
            self._read_next()

    def stop(self) -> None:
        """The worker is stopping: close now unless a request is running or arriving."""
        if not self.busy and not self.started:
            self._close()

    # ---- deadlines and closing

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self.timer = self.worker.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.transport is None or self.busy:
            return
        partial = self.request is not None or bool(self.h11.trailing_data[0])
        if partial and not self.closing:
            self._fail(408)
        else:
            self.abort() if self.transport.get_write_buffer_size() else self._close()

    def _fail(self, status: int) -> None:
        """Answer ``status`` and close; keep reading (and discarding) for a moment first, so a
        client still sending its body gets the answer rather than a reset."""
        if self.transport is None:
            return
        self.closing = True
        self.transport.resume_reading()
        self.transport.write(_raw_error(status))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(LINGER_SECONDS, self.abort)

    def _close(self) -> None:
        if self.transport is None:
            return
        self.closing = True
        self.transport.close()
        if self.transport.get_write_buffer_size():  # a client that does not read our answer
            self._arm(self.limits.idle_timeout, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
