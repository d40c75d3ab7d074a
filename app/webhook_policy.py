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
import time
from collections import Counter
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
#: The share of those that lookups started for one asker (the owner, or the service when there
#: is none) may hold, and lookups of names under one domain (:func:`domain_of`): 1/8 each
#: (16 of 128), so filling MAX_LOOKUPS with hung names takes 8 askers with 8 DNS zones, not one
#: client with one zone.
SHARE = 8
#: A name whose lookup outlived a caller's deadline and then failed is refused at once for this
#: long (seconds), so the same hung names cannot take their threads back as soon as they end.
SLOW_NAME_TTL = 60.0
#: Most such names remembered (the oldest is forgotten first): a bound on what clients can grow.
MAX_SLOW_NAMES = 4096


class Refused(Exception):
    """The URL may not receive webhooks; ``str()`` says why without echoing secrets."""


class Unresolvable(Refused):
    """The host did not resolve (in time); may be transient, so delivery retries it."""


class NotNow(Unresolvable):
    """The name was not looked up at all: the lookup caps are full, or it failed slowly
    moments ago. Nothing new was learnt about it, so a delivery waits ``retry_in`` seconds
    (0: soon) without spending a try; the API still refuses the URL (422) as Unresolvable."""

    def __init__(self, message: str, retry_in: float = 0.0):
        super().__init__(message)
        self.retry_in = retry_in


class TimedOut(Unresolvable):
    """The lookup did not end within the caller's timeout (it may still answer later)."""


class Busy(NotNow):
    """The caller stopped waiting for the server's sake (``abort``: its thread was wanted):
    nothing was learnt about the name, so the API answers 503 (try again), not a refusal."""


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


def asker_of(owner: str | None, service_name: str | None) -> str:
    """Whose share of the name lookups a webhook URL's lookup counts against: its owner (the
    API key's principal), or its service when auth is off and there is none; the engine's
    rule for a share of the queue (``owner_bucket`` in app/lua/includes/stats.lua)."""
    return f"o:{owner}" if owner else f"s:{service_name or ''}"


def domain_of(host: str) -> str:
    """The domain whose DNS answers for ``host``, roughly: its last two labels
    (``a.hooks.example.com`` -> ``example.com``). Without the public suffix list, names under
    ``co.uk`` all count as ``co.uk``; they only share a budget of *running* lookups, which a
    name that answers holds for milliseconds."""
    return ".".join(host.rsplit(".", 2)[-2:])


class _Lookup:
    """One name lookup running in its own thread; every caller that wants it waits on it."""

    def __init__(self, asker: str, domain: str) -> None:
        self.done = threading.Event()
        self.addresses: list = []
        self.error: BaseException | None = None
        self.asker, self.domain = asker, domain
        #: a caller stopped waiting on it: later callers are refused at once, not held too
        self.overdue: float | None = None
        #: callers' own events (``abort``), set too when the lookup ends
        self.wakers: list[threading.Event] = []
        #: a caller ran out of patience after this long: one with no more is Busy at once
        self.cut: float | None = None


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
    once: past that, a lookup is refused at once (:class:`NotNow`: a delivery comes back
    later without spending a try) rather than queued.

    One client must not be able to fill that limit and so refuse every other client's names
    (a client controls its webhook URLs and can point them at a DNS zone of its own that never
    answers). So of the running lookups at most ``per_asker`` may have been started for one
    asker (:func:`asker_of`) and at most ``per_domain`` may be of names under one domain
    (both ``limit // SHARE`` unless given; a lookup for no named asker, ``asker=""``, as a
    test or a tool makes, meets only the limit and its domain's share)
    (:func:`domain_of`, so fresh names in one hostile zone do not help); past either, the
    lookup is refused at once, for that asker or domain only. And a name that is timing out
    stops costing anyone a wait: once a caller has given up on a lookup, later callers of that
    name are refused at once while it runs, and if it then fails the name is refused at once
    for ``slow_ttl`` seconds (at most ``max_slow`` names remembered; :class:`NotNow`, so a
    delivery waits that out instead of spending tries on refusals). Nothing else is cached: a
    lookup that answers is forgotten when it ends.
    """

    def __init__(
        self,
        limit: int = MAX_LOOKUPS,
        *,
        per_asker: int | None = None,
        per_domain: int | None = None,
        slow_ttl: float = SLOW_NAME_TTL,
        max_slow: int = MAX_SLOW_NAMES,
        clock: Callable[[], float] = time.monotonic,
    ):
        share = max(1, limit // SHARE)
        self.limit = limit
        self.per_asker = share if per_asker is None else per_asker
        self.per_domain = share if per_domain is None else per_domain
        self.slow_ttl, self.max_slow, self.clock = slow_ttl, max_slow, clock
        self._lock = threading.Lock()
        self._running: dict[tuple[Resolver, str, int], _Lookup] = {}
        self._askers: Counter[str] = Counter()
        self._domains: Counter[str] = Counter()
        #: (resolver, host, port) -> until when (clock) it is refused at once; oldest first
        self._slow: dict[tuple[Resolver, str, int], float] = {}

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def slow_names(self) -> int:
        with self._lock:
            return len(self._slow)

    def resolve(
        self,
        resolver: Resolver,
        host: str,
        port: int,
        timeout: float,
        asker: str = "",
        abort: threading.Event | None = None,
        patience: float | None = None,
    ) -> list:
        """The addresses of ``host``. ``abort``: an event whose setting ends the wait at once
        with Busy (the API's thread budget wants the thread back); the lookup also sets it
        when it ends, so the caller waits on one event. ``patience`` (below ``timeout``): the
        caller stops waiting then for the server's sake, Busy too. Neither marks the lookup
        overdue: only a wait of the whole ``timeout`` says the name is slow. A later caller
        with no more patience than one that ran out is Busy at once."""
        key = (resolver, host, port)
        with self._lock:
            lookup = self._running.get(key)
            if lookup is not None and lookup.overdue is not None:
                raise Unresolvable(
                    f"looking up {host!r} took longer than {lookup.overdue:g} s for an "
                    "earlier caller and is still running"
                )
            if lookup is not None and lookup.cut is not None and patience is not None:
                if min(patience, timeout) <= lookup.cut:
                    raise Busy(
                        f"looking up {host!r} took longer than {lookup.cut:g} s for an "
                        "earlier caller, as long as the server can wait now: server busy"
                    )
            if lookup is None:
                self._refuse_if_slow(key)
                domain = domain_of(host)
                if len(self._running) >= self.limit:
                    raise NotNow(
                        f"cannot look up {host!r} now: {self.limit} name lookups are still running"
                    )
                if asker and self._askers[asker] >= self.per_asker:
                    raise NotNow(
                        f"cannot look up {host!r} now: {self.per_asker} name lookups for the "
                        "same owner are still running"
                    )
                if self._domains[domain] >= self.per_domain:
                    raise NotNow(
                        f"cannot look up {host!r} now: {self.per_domain} lookups of names "
                        f"under {domain!r} are still running"
                    )
                lookup = self._running[key] = _Lookup(asker, domain)
                try:
                    threading.Thread(
                        target=self._run, args=(key, lookup), name="webhook-dns", daemon=True
                    ).start()
                except RuntimeError as exc:  # no thread to be had: refuse, keep nothing
                    del self._running[key]
                    raise Unresolvable(f"cannot look up {host!r} now: {exc}") from None
                self._askers[asker] += 1
                self._domains[domain] += 1
            if abort is not None:
                lookup.wakers.append(abort)
        wait = timeout if patience is None else min(patience, timeout)
        waited = (abort or lookup.done).wait(max(0.0, wait))
        if not lookup.done.is_set():
            with self._lock:
                if abort is not None and abort in lookup.wakers:
                    lookup.wakers.remove(abort)
                if waited:  # aborted: the name is not known to be slow
                    raise Busy(f"cannot wait for the lookup of {host!r} now: server busy")
                if wait < timeout:  # out of patience: nor is it then
                    lookup.cut = max(lookup.cut or 0.0, wait)
                    raise Busy(
                        f"looking up {host!r} took longer than {wait:g} s, as long as the "
                        "server can wait now: server busy"
                    )
                if not lookup.done.is_set() and lookup.overdue is None:
                    lookup.overdue = timeout
            if not lookup.done.is_set():
                raise TimedOut(f"looking up {host!r} took longer than {timeout:g} s")
        if isinstance(lookup.error, OSError):
            exc = lookup.error
            raise Unresolvable(f"cannot resolve {host!r}: {exc.strerror or exc}")
        if lookup.error is not None:
            raise lookup.error
        return list(lookup.addresses)

    def _refuse_if_slow(self, key: tuple[Resolver, str, int]) -> None:
        """NotNow while ``key`` is a recently timed-out name (called under the lock)."""
        until = self._slow.get(key)
        if until is None:
            return
        left = until - self.clock()
        if left <= 0:
            del self._slow[key]
            return
        raise NotNow(
            f"looking up {key[1]!r} recently took too long and failed; not tried again for "
            f"{left:.0f} s",
            retry_in=left,
        )

    def _run(self, key: tuple[Resolver, str, int], lookup: _Lookup) -> None:
        resolver, host, port = key
        try:
            lookup.addresses = list(resolver(host, port))
        except BaseException as exc:  # noqa: BLE001 - handed to every caller waiting on it
            lookup.error = exc
        finally:
            with self._lock:
                del self._running[key]
                for counts, name in ((self._askers, lookup.asker), (self._domains, lookup.domain)):
                    counts[name] -= 1
                    if counts[name] <= 0:
                        del counts[name]
                if lookup.overdue is not None and lookup.error is not None:
                    self._remember_slow(key)
                wakers = list(lookup.wakers)
            lookup.done.set()
            for event in wakers:
                event.set()

    def _remember_slow(self, key: tuple[Resolver, str, int]) -> None:
        """Refuse ``key`` at once for slow_ttl; the oldest entry makes room (under the lock)."""
        self._slow.pop(key, None)
        while self._slow and len(self._slow) >= self.max_slow:
            del self._slow[next(iter(self._slow))]
        if self.max_slow > 0:
            self._slow[key] = self.clock() + self.slow_ttl


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

    def resolve(
        self,
        url: str,
        timeout: float = 5.0,
        asker: str = "",
        abort: threading.Event | None = None,
        patience: float | None = None,
    ) -> Target:
        """Check ``url`` and return where it may be delivered; Refused (or Unresolvable).

        Nothing connects anywhere here; the only network traffic is the name lookup (none for
        an address literal, nor for a name that allowed_hosts cannot admit). ``asker``
        (:func:`asker_of`): whose share of the running lookups this one counts against;
        ``abort``, ``patience``: the caller's limits on its wait (Busy; Lookups.resolve).
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
            addresses = _lookups.resolve(self.resolver, host, port, timeout, asker, abort, patience)
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
