"""Long-polls on GET /gpu/requests/<id>?wait= and /gpu/allocations/<id>?wait= (real Redis)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis as redis_lib

from app.longpoll import ChangeListener, Holds, Waiter
from tests.api_support import allocate, assert_error, clock, make_app  # noqa: F401


class Call(threading.Thread):
    """A GET in a background thread, timed."""

    def __init__(self, app, path):
        super().__init__(daemon=True)
        self.app, self.path = app, path
        self.resp = None
        self.elapsed = None
        self.start()

    def run(self):
        t0 = time.monotonic()
        self.resp = self.app.test_client().get(self.path)
        self.elapsed = time.monotonic() - t0

    def result(self, timeout=20):
        self.join(timeout)
        assert not self.is_alive(), f"{self.path} still held"
        return self.resp


def _held(app, n=1, timeout=5):
    listener = app.extensions["gpu_longpoll"].listener
    deadline = time.monotonic() + timeout
    while listener.held() < n:
        assert time.monotonic() < deadline, "the call was never held"
        time.sleep(0.01)


@pytest.fixture
def app(make_app):
    return make_app(nodes=(("node-a", 1),))


def _holder_and_waiter(client):
    holder = allocate(client, "holder").get_json()["id"]
    waiter = allocate(client, "waiter")
    assert waiter.status_code == 202
    return holder, waiter.get_json()["request_id"]


def test_a_held_request_answers_when_the_release_grants_it(app):
    client = app.test_client()
    holder, waiter = _holder_and_waiter(client)
    call = Call(app, f"/gpu/requests/{waiter}?wait=30")
    _held(app)
    time.sleep(0.2)
    assert call.is_alive(), "answered before anything changed"
    t0 = time.monotonic()
    client.post("/gpu/release", json={"allocation_id": holder})
    body = call.result().get_json()
    assert time.monotonic() - t0 < 2
    assert body["status"] == "allocated" and body["allocation"]["gpu_ids"] == [0]


def test_a_wait_that_runs_out_answers_the_unchanged_record(app):
    client = app.test_client()
    _, waiter = _holder_and_waiter(client)
    call = Call(app, f"/gpu/requests/{waiter}?wait=0.5")
    resp = call.result()
    assert resp.status_code == 200 and resp.get_json()["status"] == "queued"
    assert resp.get_json()["position"] == 1
    assert call.elapsed >= 0.5


def test_no_polling_inside_the_server_while_held(app, redis):
    client = app.test_client()
    _, waiter = _holder_and_waiter(client)

    def reads():
        stats = redis.info("commandstats")
        return stats.get("cmdstat_hgetall", {}).get("calls", 0)

    before = reads()
    call = Call(app, f"/gpu/requests/{waiter}?wait=1.5")
    assert call.result().get_json()["status"] == "queued"
    assert reads() - before <= 2  # the first read and the one after subscribing


def test_cancel_and_timeout_wake_the_held_call(app, clock):
    client = app.test_client()
    _, waiter = _holder_and_waiter(client)
    call = Call(app, f"/gpu/requests/{waiter}?wait=30")
    _held(app)
    client.delete(f"/gpu/requests/{waiter}")
    assert call.result().get_json()["status"] == "cancelled"

    _, waiter = (None, allocate(client, "late").get_json()["request_id"])
    call = Call(app, f"/gpu/requests/{waiter}?wait=30")
    _held(app)
    clock.advance(app.extensions["gpu_settings"].scheduler.queue_timeout + 1)
    app.extensions["gpu_engine"].reap()
    assert call.result().get_json()["status"] == "timed_out"


def test_not_queued_answers_at_once(app):
    client = app.test_client()
    rid = allocate(client, "now").get_json()["id"]
    t0 = time.monotonic()
    assert client.get(f"/gpu/requests/{rid}?wait=30").get_json()["status"] == "allocated"
    client.post("/gpu/release", json={"allocation_id": rid})
    assert client.get(f"/gpu/allocations/{rid}?wait=30").get_json()["status"] == "released"
    assert time.monotonic() - t0 < 1


def test_a_held_allocation_answers_when_it_ends(app, clock):
    client = app.test_client()
    rid = allocate(client, "live", ttl_seconds=60).get_json()["id"]
    call = Call(app, f"/gpu/allocations/{rid}?wait=30")
    _held(app)
    client.post(f"/gpu/allocations/{rid}/renew")  # a renewal is no change of state
    time.sleep(0.2)
    assert call.is_alive()
    clock.advance(61)
    app.extensions["gpu_engine"].reap()
    body = call.result().get_json()
    assert body["status"] == "expired"


def test_a_held_allocation_answers_when_its_holder_releases_it(app, redis):
    """The release publishes only for an allocation a long-poll marked (Engine.watch): the
    held call still wakes at once, and a release nobody waits on publishes nothing."""
    client = app.test_client()

    def publishes():
        return redis.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)

    before = publishes()
    rid = allocate(client, "quiet").get_json()["id"]
    client.post("/gpu/release", json={"allocation_id": rid})
    assert publishes() == before

    rid = allocate(client, "live").get_json()["id"]
    call = Call(app, f"/gpu/allocations/{rid}?wait=30")
    _held(app)
    time.sleep(0.2)
    assert call.is_alive(), "answered before anything changed"
    t0 = time.monotonic()
    client.post("/gpu/release", json={"allocation_id": rid})
    body = call.result().get_json()
    assert time.monotonic() - t0 < 2
    assert body["status"] == "released" and "watched" not in body
    assert "watched" not in client.get(f"/gpu/requests/{rid}").get_json()


@pytest.mark.parametrize("value", ["abc", "-1", "61", "nan", "inf", "1e400"])
def test_bad_wait_is_422_naming_wait(app, value):
    client = app.test_client()
    rid = allocate(client).get_json()["id"]
    for path in (f"/gpu/requests/{rid}", f"/gpu/allocations/{rid}"):
        err = assert_error(client.get(f"{path}?wait={value}"), 422, "validation_error")
        assert "wait" in err["details"]


def test_a_held_call_gives_its_thread_back_when_the_worker_runs_short(make_app):
    app = make_app(nodes=(("node-a", 1),), server={"threads": 2})
    client = app.test_client()
    _, waiter = _holder_and_waiter(client)
    call = Call(app, f"/gpu/requests/{waiter}?wait=30")
    _held(app)
    # another client's request takes the worker's last idle thread: the held call lets go
    slow = threading.Event()
    inner = app.extensions["gpu_engine"].snapshot

    def snapshot(*a, **kw):
        slow.wait(5)
        return inner(*a, **kw)

    app.extensions["gpu_engine"].snapshot = snapshot
    other = Call(app, "/gpu/status")
    resp = call.result(timeout=5)
    assert resp.get_json()["status"] == "queued" and call.elapsed < 5
    slow.set()
    assert other.result().status_code == 200


def test_holds_never_take_the_last_thread():
    holds = Holds(3)
    a, b, c = Waiter("a"), Waiter("b"), Waiter("c")
    holds.enter()
    assert holds.hold(a)
    holds.enter()
    assert holds.hold(b)  # two running, one idle thread left
    holds.enter()  # the last idle thread is taken: the oldest held call lets go
    assert a.evicted and a.event.is_set() and not b.evicted
    holds.enter()
    assert not holds.hold(c)  # nothing idle: answer at once
    assert b.evicted


def test_listener_stops_when_idle_and_restarts(redis_url, settings, request):
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    request.addfinalizer(client.close)
    listener = ChangeListener(client, "chan-test", idle_exit=0.2)
    w = listener.watch("x-1")
    assert w is not None
    client.publish("chan-test", "x-2|allocated")
    client.publish("chan-test", "x-1|allocated")
    assert w.event.wait(2)
    listener.unwatch(w)
    deadline = time.monotonic() + 5
    while listener._run is not None:  # noqa: SLF001 - the thread's own slot
        assert time.monotonic() < deadline, "listener never stopped"
        time.sleep(0.05)
    w = listener.watch("x-3")
    assert w is not None
    client.publish("chan-test", "x-3|cancelled")
    assert w.event.wait(2)
    listener.unwatch(w)


def test_under_gunicorn_a_held_call_outlives_the_worker_timeout_and_ends_with_a_stop(
    tmp_path, settings
):
    """The real server: a 5 s wait with a 2 s gunicorn timeout answers after 5 s (a held call
    is not a stuck worker), and SIGTERM answers a held 60 s call at once instead of holding the
    graceful stop (30 s here) for it."""
    import requests

    from app.engine import Engine
    from app.redis_client import connect
    from tests.conftest import free_port
    from tests.proc_support import Role, wait_until, write_settings

    port = free_port()
    config = write_settings(
        tmp_path,
        settings,
        dashboard={"enabled": False},
        server={
            "port": port,
            "host": "127.0.0.1",
            "workers": 1,
            "threads": 4,
            "write_timeout": "2s",
            "read_timeout": "30s",
        },
    )
    role = Role(config, "api", log_dir=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:

        def up():
            try:
                return requests.get(base + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout=60, message="the API")
        redis_client = connect(settings.redis.url, settings)
        try:
            Engine(redis_client, settings).report_node(
                "node-a", [{"index": 0, "memory_total_mb": 1000}]
            )
        finally:
            redis_client.close()
        requests.post(base + "/gpu/allocate", json={"service_name": "holder"}, timeout=10)
        rid = requests.post(
            base + "/gpu/allocate", json={"service_name": "waiter"}, timeout=10
        ).json()["request_id"]
        t0 = time.monotonic()
        resp = requests.get(f"{base}/gpu/requests/{rid}?wait=5", timeout=30)
        assert resp.status_code == 200 and resp.json()["status"] == "queued"
        assert time.monotonic() - t0 >= 4.9

        answers = []
        held = threading.Thread(
            target=lambda: answers.append(
                requests.get(f"{base}/gpu/requests/{rid}?wait=60", timeout=90)
            ),
            daemon=True,
        )
        held.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        role.proc.send_signal(signal.SIGTERM)
        held.join(20)
        assert answers and answers[0].status_code == 200, role.output()[-2000:]
        assert answers[0].json()["status"] == "queued"
        role.proc.wait(20)
        assert time.monotonic() - t0 < 10, "the graceful stop waited for the held call"
    finally:
        role.stop()


def test_openapi_documents_the_wait_parameter(app):
    spec = app.test_client().get("/openapi.json").get_json()
    for path in ("/gpu/requests/{request_id}", "/gpu/allocations/{allocation_id}"):
        params = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}
        assert params["wait"]["in"] == "query"
        assert params["wait"]["schema"]["maximum"] == 60


def test_a_long_poll_is_timed_under_its_own_route_label(app):
    client = app.test_client()
    rid = allocate(client).get_json()["id"]
    client.get(f"/gpu/requests/{rid}?wait=5")
    client.get(f"/gpu/requests/{rid}")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'route="/gpu/requests/<request_id>?wait"' in text
    assert 'route="/gpu/requests/<request_id>"' in text


class ScriptedPubSub:
    """A Pub/Sub connection that plays back messages as the test feeds them."""

    def __init__(self):
        import queue

        self.messages = queue.Queue()

    def subscribe(self, channel):
        self.messages.put({"type": "subscribe", "channel": channel, "data": 1})

    def get_message(self, timeout):
        import queue

        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(msg, Exception):
            raise msg
        return msg

    def close(self):
        pass


def test_a_second_subscription_or_a_lost_connection_lets_held_calls_go():
    """redis-py may reconnect a dropped Pub/Sub connection and subscribe again by itself;
    whatever was published in between is lost, so held calls must read again. A connection
    that cannot come back lets them go too, and the next wait subscribes anew."""
    pubsubs = []

    class Fake:
        def pubsub(self):
            pubsubs.append(ScriptedPubSub())
            return pubsubs[-1]

    listener = ChangeListener(Fake(), "chan")
    w = listener.watch("x-1")
    assert w is not None and not w.event.is_set()
    pubsubs[0].messages.put({"type": "subscribe", "channel": "chan", "data": 1})
    assert w.event.wait(2) and w.evicted
    listener.unwatch(w)

    w = listener.watch("x-2")
    pubsubs[0].messages.put(redis_lib.ConnectionError("gone"))
    assert w.event.wait(2) and w.evicted
    listener.unwatch(w)
    w = listener.watch("x-3")  # a new listener, a new subscription
    assert w is not None and len(pubsubs) == 2
    pubsubs[1].messages.put({"type": "message", "channel": "chan", "data": "x-3|allocated"})
    assert w.event.wait(2) and not w.evicted
    listener.unwatch(w)


def test_without_a_subscription_the_call_answers_a_fresh_read_at_once():
    from app.longpoll import LongPoll

    class NoPubSub:
        def pubsub(self):
            raise redis_lib.ConnectionError("refused")

    poll = LongPoll(ChangeListener(NoPubSub(), "chan"), Holds(4))
    reads = iter([{"status": "queued"}, {"status": "allocated"}])
    t0 = time.monotonic()
    assert poll.read("x-1", lambda: next(reads), frozenset({"queued"}), 30) == {
        "status": "allocated"
    }
    assert time.monotonic() - t0 < 2
