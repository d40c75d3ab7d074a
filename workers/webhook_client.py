"""One webhook POST under one deadline, to an address the URL policy has already checked.

Why not ``requests``: its ``timeout`` bounds each socket read, not the attempt, so a receiver
that answers ``200`` and then one header line every 2 s held a worker for a minute (issue 11).
And it resolves the host name again when it connects, which would let a DNS answer change
between the policy check and the connection (DNS rebinding). Here:

- the caller passes a :class:`app.webhook_policy.Target`, whose addresses were resolved once
  and checked; the socket connects to one of those addresses and to nothing else (no proxies,
  no redirects);
- every step (connect, TLS handshake, sending, reading the response headers) gets whatever is
  left of one deadline, so the whole attempt ends by ``timeout`` whatever the receiver does;
- the attempt is decided by the status line once the response headers are complete; the body
  is not read (``Connection: close``).

HTTPS verifies the certificate against the URL's host name (SNI too), as a browser would.
"""

from __future__ import annotations

import socket
import ssl
import time

from app.webhook_policy import Target

#: Response headers larger than this are refused (a receiver cannot make us buffer more).
MAX_HEADER_BYTES = 64 * 1024


class DeliveryTimeout(Exception):
    """The attempt's deadline passed (connect, handshake, send or response headers)."""


class DeliveryFailed(Exception):
    """Could not connect, or the answer was not HTTP."""


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeliveryTimeout("deadline passed")
    return left


def _connect(target: Target, deadline: float) -> socket.socket:
    errors = []
    for address in target.addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect((address, target.port))
            return sock
        except TimeoutError:
            sock.close()
            raise DeliveryTimeout(f"connecting to {address} timed out") from None
        except DeliveryTimeout:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            errors.append(f"{address}: {exc.strerror or exc}")
        except BaseException:
            sock.close()  # anything else (a bad port's OverflowError, an interrupt): no leak
            raise
    raise DeliveryFailed("cannot connect (" + "; ".join(errors) + ")")


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST ``body`` to ``target`` and return the response status; the whole attempt takes at
    most ``timeout`` seconds. Raises DeliveryTimeout or DeliveryFailed."""
    deadline = time.monotonic() + timeout
    sock = _connect(target, deadline)
    try:
        if target.scheme == "https":
            sock.settimeout(_left(deadline))
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
        lines = [
            f"POST {target.path} HTTP/1.1",
            f"Host: {target.host_header}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        sock.settimeout(_left(deadline))
        sock.sendall(request)  # the timeout bounds the whole sendall (Python >= 3.5)
        return _read_status(sock, deadline)
    except TimeoutError:
        raise DeliveryTimeout("the receiver did not answer in time") from None
    except ssl.SSLError as exc:
        raise DeliveryFailed(f"TLS: {exc.reason or exc}") from None
    except OSError as exc:
        raise DeliveryFailed(exc.strerror or str(exc)) from None
    finally:
        sock.close()


def _read_status(sock: socket.socket, deadline: float) -> int:
    """The status code, once the response headers are complete (before the deadline)."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEADER_BYTES:
            raise DeliveryFailed(f"response headers over {MAX_HEADER_BYTES} bytes")
        sock.settimeout(_left(deadline))
        chunk = sock.recv(16384)
        if not chunk:
            if data.startswith(b"HTTP/") and b"\r\n" in data:
                break  # closed right after the status line / headers: still an answer
            raise DeliveryFailed("connection closed before a complete response")
        data += chunk
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise DeliveryFailed(f"not an HTTP response: {status_line[:80]!r}")
    return int(parts[1])
