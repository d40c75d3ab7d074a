"""Webhook delivery: payload, signature, status handling and the SSRF policy."""

from __future__ import annotations

import json
import threading
import time

import pytest
from webhook_receiver import Receiver, delivering

from workers import webhooks

RECORD = {
    "id": "trainer-1700000000123-ab12",
    "service_name": "trainer",
    "gpu_ids": [2, 3],
    "priority": 7,
    "submitted_at": 1767225600.0,
    "allocated_at": 1767225612.5,
    "webhook_url": "http://example.invalid/hook",
    "status": "allocated",
}


def test_payload_is_the_original_shape_plus_event_id():
    payload = webhooks.build_payload(RECORD, "allocated", "ev-1")
    allocation = payload.pop("allocation")
    assert payload == {
        "status": "allocated",
        "request_id": "trainer-1700000000123-ab12",
        "submitted_at": "2026-01-01T00:00:00.000Z",
        "allocated_at": "2026-01-01T00:00:12.500Z",
        "wait_time_seconds": 12.5,
        "event_id": "ev-1",
    }
    # the original's allocation fields, among those of a 200 answer of /gpu/allocate
    assert {
        k: allocation[k] for k in ("id", "service_name", "gpu_ids", "allocated_at", "priority")
    } == {
        "id": "trainer-1700000000123-ab12",
        "service_name": "trainer",
        "gpu_ids": [2, 3],
        "allocated_at": "2026-01-01T00:00:12.500Z",
        "priority": 7,
    }
    assert allocation["cuda_visible_devices"] == "2,3"
    assert allocation["status"] == "allocated"


def test_an_allocated_payload_pins_the_lease_as_granted():
    """A renewal between two tries of the grant's webhook does not change its body."""
    renewed = dict(
        RECORD,
        expires_at=1767230000.0,
        lease_seconds=4000.0,
        renewed_at=1767226000.0,
        status="released",
        released_at=1767229000.0,
    )
    pinned = {"expires_at": "1767229212.500000", "lease_seconds": "3600"}
    allocation = webhooks.build_payload(renewed, "allocated", "ev-1", pinned)["allocation"]
    assert allocation["expires_at"] == "2026-01-01T01:00:12.500Z"
    assert allocation["lease_seconds"] == 3600
    assert allocation["status"] == "allocated"
    assert "renewed_at" not in allocation and "released_at" not in allocation
    forever = webhooks.build_payload(
        renewed, "allocated", "ev-1", {"expires_at": "", "lease_seconds": "-1"}
    )["allocation"]
    assert forever["expires_at"] is None and forever["lease_seconds"] is None


def test_payload_for_a_request_that_never_got_gpus():
    record = dict(RECORD, gpu_ids="", allocated_at=None)
    payload = webhooks.build_payload(record, "timed_out", "ev-2")
    assert payload["status"] == "timed_out" and payload["allocation"]["gpu_ids"] == []
    assert payload["allocated_at"] is None and payload["wait_time_seconds"] is None


def test_signed_post_verifies_with_the_documented_recipe(settings):
    s = settings.replace(webhooks={"secret": "s3cret"})
    payload = webhooks.build_payload(RECORD, "allocated", "ev-1")
    with Receiver() as rx:
        assert webhooks.post(rx.url, payload, s) == 200
        [req] = rx.wait_for(1)
    assert json.loads(req["body"]) == payload
    ts = req["headers"][webhooks.TIMESTAMP_HEADER]
    sig = req["headers"][webhooks.SIGNATURE_HEADER]
    assert webhooks.verify_signature("s3cret", ts, req["body"], sig)
    assert not webhooks.verify_signature("wrong", ts, req["body"], sig)
    assert not webhooks.verify_signature("s3cret", ts, req["body"] + b" ", sig)
    assert not webhooks.verify_signature("s3cret", ts, req["body"], sig, now=int(ts) + 3600)
    assert req["headers"][webhooks.EVENT_ID_HEADER] == "ev-1"
    assert req["headers"]["Content-Type"] == "application/json"


def test_unsigned_without_a_secret(settings):
    with Receiver() as rx:
        webhooks.post(rx.url, {"status": "allocated", "event_id": "e"}, settings)
        [req] = rx.wait_for(1)
    assert webhooks.SIGNATURE_HEADER not in req["headers"]


@pytest.mark.parametrize(
    "code, error",
    [(500, webhooks.WebhookError), (302, webhooks.WebhookError), (410, webhooks.WebhookGone)],
)
def test_non_2xx_raises(settings, code, error):
    with Receiver(codes=[code]) as rx:
        with pytest.raises(error) as info:
            webhooks.post(rx.url, {"event_id": "e"}, settings)
    assert info.value.status == code


def test_any_2xx_is_delivered(settings):
    with Receiver(codes=[204]) as rx:
        assert webhooks.post(rx.url, {"event_id": "e"}, settings) == 204


def test_unreachable_receiver_is_a_retryable_error(settings):
    from conftest import free_port

    with pytest.raises(webhooks.WebhookError) as info:
        webhooks.post(
            f"http://127.0.0.1:{free_port()}/x",
            {"event_id": "e"},
            settings.replace(webhooks={"timeout": "1s"}),
        )
    assert not isinstance(info.value, webhooks.WebhookRefused)


def test_ssrf_policy(settings, monkeypatch):
    from app.webhook_policy import Policy, Refused

    def connect(self, address):
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(__import__("socket").socket, "connect", connect)

    def check(url, allowed=(), deny=True, resolve=None):
        return Policy(allowed, deny, resolver=resolve).resolve(url)

    open_ = check("http://127.0.0.1:9/x", deny=False)  # no list, private allowed: anything
    assert open_.addresses == ("127.0.0.1",) and open_.port == 9
    for url in (
        "http://127.0.0.1/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://[::ffff:192.168.0.1]/x",
    ):
        with pytest.raises(Refused):
            check(url)  # the default: private networks denied
    public = lambda host, port: ["93.184.215.14"]  # noqa: E731
    assert check("https://hooks.example.com/x", resolve=public).addresses == ("93.184.215.14",)
    with pytest.raises(Refused, match="private"):
        check(
            "https://sneaky.example.com/x", resolve=lambda host, port: ["93.184.215.14", "10.0.0.5"]
        )
    allow = ["hooks.example.com", "*.corp.example"]
    check("https://hooks.example.com/x", allow, resolve=public)
    check("https://a.b.corp.example/x", allow, resolve=public)
    for url in (
        "https://evil.example.com/x",
        "https://corp.example.evil/x",
        "ftp://hooks.example.com/",
    ):
        with pytest.raises(Refused):
            check(url, allow, resolve=public)


def test_an_event_whose_request_is_gone_counts_as_a_failed_webhook(settings, redis, caplog):
    """An ended request's record lives for scheduler.history_ttl (1 h at least), and a webhook's
    tries can outlast it (the default retry_intervals span 59 min, more with deferrals or a
    worker outage). Before, such a delivery ended as a success: nothing was sent, the job was
    'finished', webhook|failed did not move and the only trace was an INFO line. Now it is
    given up as a failure: counted, and a warning naming history_ttl."""
    import logging

    from app.keys import Keys

    with delivering(settings, redis) as engine:
        rec = engine.allocate(
            {"service_name": "gone", "required_gpus": 1, "webhook_url": "http://127.0.0.1:9/hook"}
        )
        redis.delete(Keys(settings.redis.prefix).request(rec["id"]))  # history_ttl has passed
        entry = {"event_id": "ev-gone", "event": "expired", "request_id": rec["id"]}
        with caplog.at_level(logging.INFO, logger="gpu_orchestrator.webhooks"):
            assert webhooks.deliver(entry)["delivered"] is False
    stats = redis.hgetall(Keys(settings.redis.prefix).stats())
    assert stats.get(webhooks.STAT_FAILED) == "1"
    [line] = [r for r in caplog.records if rec["id"] in r.getMessage()]
    assert line.levelno == logging.WARNING and "history_ttl" in line.getMessage()


def test_logs_show_a_receivers_host_but_not_the_path_that_holds_its_credential(
    settings, redis, caplog
):
    """Chat receivers (Slack, Discord) take their credential in the URL's path, and the API
    hides a webhook_url from other clients; the delivery's log lines must not print it."""
    import logging

    with delivering(settings, redis) as engine, Receiver() as rx:
        where = rx.url.split("/")[2]  # host:port
        url = f"http://{where}/services/T1/B2/s3cr3tpath"
        rec = engine.allocate({"service_name": "chat", "required_gpus": 1, "webhook_url": url})
        entry = {"event_id": "ev-chat", "event": "allocated", "request_id": rec["id"]}
        with caplog.at_level(logging.DEBUG):
            assert webhooks.deliver(entry)["delivered"] is True
        [req] = rx.wait_for(1)
    assert req["path"] == "/services/T1/B2/s3cr3tpath"  # delivered to the whole URL
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"http://{where}/…#" in line for line in lines), lines
    assert not [line for line in lines if "s3cr3tpath" in line or "T1/B2" in line]


class CappedDeliveries:
    """Worker deliveries (``webhooks.deliver``) of fresh requests' webhooks with
    ``max_per_receiver: 1``. The host names in ``names`` (unique to each test: see NOTES)
    resolve to 127.0.0.1; each lookup of one is recorded in ``lookups``, and a name in
    ``delay`` answers that many seconds late. ``results[key]`` is what a delivery returned or
    raised."""

    def __init__(self, engine, monkeypatch):
        import socket

        self.engine = engine
        self.names: set[str] = set()
        self.lookups: list[str] = []
        self.delay: dict[str, float] = {}
        self.results: dict = {}
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host not in self.names:
                return real(host, port, *args, **kwargs)
            self.lookups.append(host)
            time.sleep(self.delay.get(host, 0))
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def deliver(self, key: str, url: str) -> None:
        rec = self.engine.allocate({"service_name": key, "required_gpus": 1, "webhook_url": url})
        entry = {"event_id": f"ev-{key}", "event": "allocated", "request_id": rec["id"]}
        try:
            self.results[key] = webhooks.deliver(entry)
        except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
            self.results[key] = exc

    def in_background(self, key: str, url: str):
        thread = threading.Thread(target=self.deliver, args=(key, url))
        thread.start()
        return thread


@pytest.fixture
def capped(settings, redis, monkeypatch):
    one = settings.replace(webhooks={"max_per_receiver": 1, "timeout": "10s"})
    with delivering(one, redis, gpus=8) as engine:
        yield CappedDeliveries(engine, monkeypatch)


def test_names_for_one_receiver_share_its_delivery_slots(capped):
    """webhooks.max_per_receiver counted per host name: two names of one slow backend had a
    cap each, so its team held twice the slots. Now the cap is keyed by the address (and port)
    the delivery connects to, taken from the lookup that checked the URL: a delivery through
    the second name waits for the first's slot (deferred, nothing sent), while one to another
    port on the same address has its own slots."""
    capped.names |= {"rx-a-5f3e1c.test", "rx-b-5f3e1c.test"}
    results = capped.results
    hold = threading.Event()
    try:
        with Receiver(hold=hold) as slow, Receiver() as other:
            port = slow.server.server_address[1]
            first = capped.in_background("first", f"http://rx-a-5f3e1c.test:{port}/a")
            assert len(slow.wait_for(1, timeout=10)) == 1, results  # held: it has the one slot
            capped.deliver("second", f"http://rx-b-5f3e1c.test:{port}/b")
            assert isinstance(results["second"], webhooks.WebhookDeferred), results
            assert len(slow.requests) == 1  # the second name's delivery was not sent
            capped.deliver(
                "elsewhere", f"http://rx-b-5f3e1c.test:{other.server.server_address[1]}/c"
            )
            assert results["elsewhere"] == {"delivered": True, "status": 200}
            hold.set()
            first.join(10)
            assert results["first"] == {"delivered": True, "status": 200}
            capped.deliver("again", f"http://rx-b-5f3e1c.test:{port}/b")  # the slot is free
            assert results["again"] == {"delivered": True, "status": 200}
    finally:
        hold.set()


def test_a_delivery_deferred_again_is_not_looked_up_again(capped):
    """Keying the cap by address put the name lookup before the slot, so each time a deferred
    delivery came back (every 2 s, per delivery of a backlog) it looked its name up again only
    to be deferred. A name's last receiver is remembered: while that one is at its cap, the
    delivery is deferred without a lookup; once a slot frees, it looks the name up as before."""
    name = "rx-hint-9a7d02.test"
    capped.names.add(name)
    results = capped.results
    hold = threading.Event()
    try:
        with Receiver(hold=hold) as slow:
            url = f"http://{name}:{slow.server.server_address[1]}/h"
            first = capped.in_background("first", url)
            assert len(slow.wait_for(1, timeout=10)) == 1, results
            for i in range(3):  # the same deferred delivery coming back, three times
                capped.deliver(f"back{i}", url)
                assert isinstance(results[f"back{i}"], webhooks.WebhookDeferred), results
            assert capped.lookups == [name]  # only the first delivery's
            hold.set()
            first.join(10)
            capped.deliver("later", url)
            assert results["later"] == {"delivered": True, "status": 200}, results
            assert capped.lookups == [name, name]
    finally:
        hold.set()


def test_a_hanging_lookup_holds_no_slot_of_the_receiver_its_name_led_to(capped):
    """The remembered receiver of a name is a hint checked before the lookup, not a slot held
    through it: while one name's lookup hangs, another name of the same receiver (cap 1) is
    delivered at once (it was deferred while the hanging lookup held the receiver's slot)."""
    stuck, healthy = "rx-stuck-5c01e7.test", "rx-well-5c01e7.test"
    capped.names |= {stuck, healthy}
    results = capped.results
    with Receiver() as rx:
        port = rx.server.server_address[1]
        capped.deliver("warm", f"http://{stuck}:{port}/a")  # the name's receiver is remembered
        assert results["warm"] == {"delivered": True, "status": 200}, results
        capped.delay[stuck] = 3
        slow = capped.in_background("slow", f"http://{stuck}:{port}/a")
        time.sleep(0.5)  # its lookup is hanging now
        capped.deliver("ready", f"http://{healthy}:{port}/b")
        assert results["ready"] == {"delivered": True, "status": 200}, results
        slow.join(10)
        assert results["slow"] == {"delivered": True, "status": 200}, results


def test_the_remembered_receivers_of_names_are_bounded():
    """One entry per host name a delivery went to: endless fresh names keep at most
    max_names (the least recently used is forgotten first)."""
    from workers.receiver_limit import ReceiverLimit

    limit = ReceiverLimit(1, max_names=2)
    for host in ("a.test", "b.test", "c.test"):
        limit.remember((host, 80), ("127.0.0.1", 80))
    assert limit.names() == 2 and limit.last_receiver(("a.test", 80)) is None
    assert limit.last_receiver(("c.test", 80)) == ("127.0.0.1", 80)
