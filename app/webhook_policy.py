"""Which webhook URLs the service may call: one rule, checked at allocate and again at delivery.

A webhook URL is a request to make the service open a connection on a client's behalf, so it is
checked like one (SSRF):

- only ``http``/``https`` with a host; no userinfo (``user:pw@``: credentials belong in the
  signature secret, and a URL is shown and logged in places a password must not be);
- ``webhooks.allowed_hosts``, when non-empty, lists what may receive webhooks. Each entry is a
  host name (``hooks.example.com``), a wildcard (``*.corp.example``: any name below it), a
  host with a port (``hooks.example.com:8443``), a CIDR or a single address (``10.20.0.0/16``,
  ``127.0.0.1``), an address with a port (``10.0.0.5:9000``, ``[::1]:9000``), or ``*`` (any
  host, subject to the next rule);
- with ``webhooks.deny_private_networks`` (the default) every address the host resolves to
  must be public, unless it is allowed *explicitly* by a CIDR or address entry that contains
  it (and its port, if the entry gives one). A host *name* entry never unlocks a private
  address: the name's DNS could be changed to point inside; an address cannot.

:func:`Policy.resolve` resolves the host once and checks every address; delivery then connects
to one of exactly those addresses (see :mod:`workers.webhook_client`), so a DNS answer that
changes between the check and the connection (DNS rebinding) cannot redirect it. If any address
of a host is refused, the whole URL is: a round-robin name cannot smuggle in a private one.

:func:`redact` is how a webhook URL appears in logs and error messages: scheme, host and port,
and the path only as a fingerprint. Many receivers (Slack, Discord, chat bridges) take the
credential in the path, so the path is as secret as a query token; the fingerprint still tells
one receiver's URLs apart from another's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list]

DEFAULT_PORTS = {"http": 80, "https": 443}
#: Most name lookups running at once in a process (one thread each, however many callers wait
#: on one); past it a lookup is refused at once instead of waiting behind the hung ones.
MAX_LOOKUPS = 128


class Refused(Exception):
    """The URL may not receive webhooks; ``str()`` says why without echoing secrets."""


class Unresolvable(Refused):
    """The host did not resolve (in time); may be transient, so delivery retries it."""


@dataclass(frozen=True)
class Entry:
    """One parsed ``webhooks.allowed_hosts`` entry: a name pattern or a network, and maybe a
    port."""

    host: str | None = None  # exact name, "*.suffix" wildcard or "*"
    network: IPNetwork | None = None
    port: int | None = None

    def matches_name(self, host: str, port: int) -> bool:
        if self.host is None or (self.port is not None and self.port != port):
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def contains(self, ip: IPAddress, port: int) -> bool:
        return (
            self.network is not None
            and ip in self.network
            and (self.port is None or self.port == port)
        )


def parse_entry(text: str) -> Entry:
    """``host``, ``*.suffix``, ``*``, ``host:port``, CIDR, address, ``address:port`` or
    ``[v6]:port``; ValueError otherwise (settings reports it as a config error)."""
    raw = text.strip().lower().rstrip(".")
    if not raw:
        raise ValueError("an empty entry")
    try:
        return Entry(network=ipaddress.ip_network(raw.strip("[]"), strict=False))
    except ValueError:
        pass
    host, port_text = raw, None
    if raw.startswith("["):
        inner, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not a host, host:port or CIDR")
        host, port_text = inner, rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r} has a bad port")
        port = int(port_text)
    literal = _literal(host)
    if literal is not None:
        return Entry(network=ipaddress.ip_network(literal), port=port)
    if raw.startswith("[") or (
        host != "*" and not _valid_name(host[2:] if host.startswith("*.") else host)
    ):
        raise ValueError(f"{text!r} is not a host, host:port or CIDR")
    return Entry(host=host.rstrip("."), port=port)


def _valid_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return all(0 < len(x) <= 63 and all(c.isalnum() or c in "-_" for c in x) for x in labels)


def redact(url: str) -> str:
    """The URL as logs and messages show it: scheme, host and port; a path other than ``/``
    as the first 8 hex digits of its SHA-256 (``https://hooks.example.com/…#1a2b3c4d``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    path = parts.path
    if path not in ("", "/"):
        digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        path = f"/…#{digest}"
    return f"{parts.scheme}://{host}{port}{path}"


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (only these addresses) and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    # ``is_global`` is False for what is_private misses too: the shared address space
    # 100.64.0.0/10 (where some clouds put their metadata service) and 192.0.0.0/24.
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _system_resolve(host: str, port: int) -> list:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _Lookup:
    """One name lookup running in its own thread; every caller that wants it waits on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.addresses: list = []
        self.error: BaseException | None = None


class Lookups:
    """Name lookups with a deadline per caller, none waiting behind another host's.

    ``getaddrinfo`` cannot be interrupted: a caller can stop waiting, but the lookup's thread
    runs on until the system resolver gives up (tens of seconds for a name whose DNS server
    does not answer). These used to run on a shared pool of four threads, so four such names
    held every thread, and for as long as they hung every other host's lookup timed out in the
    queue behind them: other teams' allocates with a webhook_url were refused (422) and their
    deliveries failed. Here each lookup has its own thread, callers asking for a name that is
    already being looked up wait on that lookup instead of starting another (a name that hangs
    holds one thread, however often it is asked for), and at most ``limit`` lookups run at
    once: past that, a lookup is refused at once (Unresolvable, retried by delivery) rather
    than queued. Nothing is cached: a lookup that ends is forgotten.
    """

    def __init__(self, limit: int = MAX_LOOKUPS):
        self.limit = limit
        self._lock = threading.Lock()
        self._running: dict[tuple[Resolver, str, int], _Lookup] = {}

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def resolve(self, resolver: Resolver, host: str, port: int, timeout: float) -> list:
        key = (resolver, host, port)
        with self._lock:
            lookup = self._running.get(key)
            if lookup is None:
                if len(self._running) >= self.limit:
                    raise Unresolvable(
                        f"cannot look up {host!r} now: {self.limit} name lookups are still running"
                    )
                lookup = self._running[key] = _Lookup()
                try:
                    threading.Thread(
                        target=self._run, args=(key, lookup), name="webhook-dns", daemon=True
                    ).start()
                except RuntimeError as exc:  # no thread to be had: refuse, keep nothing
                    del self._running[key]
                    raise Unresolvable(f"cannot look up {host!r} now: {exc}") from None
        if not lookup.done.wait(max(0.0, timeout)):
            raise Unresolvable(f"looking up {host!r} took longer than {timeout:.1f} s")
        if isinstance(lookup.error, OSError):
            exc = lookup.error
            raise Unresolvable(f"cannot resolve {host!r}: {exc.strerror or exc}")
        if lookup.error is not None:
            raise lookup.error
        return list(lookup.addresses)

    def _run(self, key: tuple[Resolver, str, int], lookup: _Lookup) -> None:
        resolver, host, port = key
        try:
            lookup.addresses = list(resolver(host, port))
        except BaseException as exc:  # noqa: BLE001 - handed to every caller waiting on it
            lookup.error = exc
        finally:
            with self._lock:
                del self._running[key]
            lookup.done.set()


_lookups = Lookups()


def split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an acceptable URL shape; Refused otherwise."""
    try:
        url.encode()  # a lone surrogate (JSON can spell "\ud800") is in no URL, and no store
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # UnicodeEncodeError is one
        raise Refused("webhook URL is not a valid URL") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise Refused("webhook URL must be http:// or https:// with a host")
    if "@" in parts.netloc:
        raise Refused(
            "webhook URL must not carry credentials (user:password@); "
            "receivers verify the X-GPU-Orchestrator-Signature instead"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in path):
        raise Refused("webhook URL path must not contain spaces or control characters")
    host = parts.hostname.lower().rstrip(".")
    try:  # what the name lookup does first; an empty or over-long label can never resolve
        host.encode("idna")
    except UnicodeError:
        raise Refused("webhook URL host is not a valid host name") from None
    return parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], path


class Policy:
    """``webhooks.allowed_hosts`` and ``deny_private_networks``, parsed once."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        deny_private_networks: bool = True,
        resolver: Resolver | None = None,
    ):
        self.entries = [parse_entry(x) for x in allowed_hosts]
        self.deny_private = deny_private_networks
        self.resolver = resolver or _system_resolve

    @classmethod
    def from_settings(cls, settings, resolver: Resolver | None = None) -> Policy:
        hooks = settings.webhooks
        return cls(hooks.allowed_hosts, hooks.deny_private_networks, resolver)

    def resolve(self, url: str, timeout: float = 5.0) -> Target:
        """Check ``url`` and return where it may be delivered; Refused (or Unresolvable).

        Nothing connects anywhere here; the only network traffic is the name lookup (none for
        an address literal, nor for a name that allowed_hosts cannot admit).
        """
        scheme, host, port, path = split(url)
        shown = redact(url)
        literal = _literal(host)
        networks = [e for e in self.entries if e.network is not None]
        named = any(e.matches_name(host, port) for e in self.entries)
        if literal is not None:
            addresses = [str(literal)]
        else:
            if self.entries and not named and not networks:
                raise Refused(f"webhook host {host!r} is not in webhooks.allowed_hosts")
            addresses = _lookups.resolve(self.resolver, host, port, timeout)
            if not addresses:
                raise Unresolvable(f"{host!r} resolves to no address")
        for text in addresses:
            ip = ipaddress.ip_address(str(text).split("%", 1)[0])
            listed = any(e.contains(ip, port) for e in networks)
            if self.entries and not (named or listed):
                raise Refused(f"webhook target {shown} ({ip}) is not in webhooks.allowed_hosts")
            if self.deny_private and not listed and not _is_public(ip):
                raise Refused(
                    f"webhook target {shown} resolves to a private, loopback or link-local "
                    f"address ({ip}); webhooks.deny_private_networks is on and no "
                    "webhooks.allowed_hosts network (CIDR or address) allows it"
                )
        return Target(scheme, host, port, path, tuple(str(a) for a in addresses))


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
