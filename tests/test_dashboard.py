"""rq-dashboard under /rq: its pages and JSON endpoints answer, deletion is off by default."""

from __future__ import annotations

import json

import pytest
import redis as redis_lib
from flask import Flask

from app import dashboard, outbox, queues
from app.keys import Keys


def _app(settings, redis_url):
    app = Flask("dash-test")
    assert dashboard.init_app(app, settings, redis_url)
    return app


@pytest.fixture
def queued_job(redis_url, settings):
    rq_redis = redis_lib.Redis.from_url(redis_url)
    entry = {"event_id": "ev1", "event": "allocated", "request_id": "svc-1", "ts": 1.0}
    rq_redis.rpush(Keys(settings.redis.prefix).webhook_outbox(), json.dumps(entry))
    outbox.dispatch(rq_redis, settings)
    yield outbox.job_id_for("ev1")
    rq_redis.close()


def test_pages_and_json_endpoints_answer(settings, redis_url, queued_job):
    client = _app(settings, redis_url).test_client()
    qname = queues.queue_name(settings, queues.WEBHOOKS)
    for path in (
        "/rq/",
        "/rq/0/view/workers",
        f"/rq/0/view/jobs/{qname}/queued/8/asc/1",
        f"/rq/0/view/job/{queued_job}",
    ):
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert b"<html" in resp.data.lower()
    listed = client.get("/rq/0/data/queues.json").get_json()
    assert {"name": qname, "count": 1} in [
        {"name": q["name"], "count": q["count"]} for q in listed["queues"]
    ]
    jobs = client.get(f"/rq/0/data/jobs/{qname}/queued/8/asc/1.json").get_json()
    assert [j["id"] for j in jobs["jobs"]] == [queued_job]
    info = client.get(f"/rq/0/data/job/{queued_job}.json").get_json()
    assert info["id"] == queued_job and info["description"] == "webhook allocated svc-1"
    assert client.get("/rq/0/data/workers.json").status_code == 200


def test_deletion_is_disabled_unless_allowed(settings, redis_url, queued_job):
    client = _app(settings, redis_url).test_client()
    assert client.post(f"/rq/job/{queued_job}/delete").get_json() == {"status": "DISABLED"}
    rq_redis = redis_lib.Redis.from_url(redis_url)
    assert rq_redis.exists(f"rq:job:{queued_job}")
    allowed = _app(settings.replace(dashboard={"allow_delete": True}), redis_url).test_client()
    assert allowed.post(f"/rq/job/{queued_job}/delete").get_json() == {"status": "OK"}
    assert not rq_redis.exists(f"rq:job:{queued_job}")
    rq_redis.close()


def test_disabled_dashboard_mounts_nothing(settings, redis_url):
    app = Flask("dash-off")
    assert not dashboard.init_app(app, settings.replace(dashboard={"enabled": False}), redis_url)
    assert app.test_client().get("/rq/").status_code == 404


def test_mounted_in_the_api_behind_its_auth(settings, redis_url, queued_job):
    from app import create_app

    s = settings.replace(
        auth={"enabled": True, "api_keys": {"k-ops": "ops", "k-dev": "dev"}, "admins": ["ops"]}
    )
    client = create_app(s, redis_url=redis_url).test_client()
    assert client.get("/rq/").status_code == 401
    assert client.get("/rq/0/data/queues.json").status_code == 401
    assert client.post(f"/rq/job/{queued_job}/delete").status_code == 401
    assert client.get("/rq/", headers={"X-API-Key": "k-dev"}).status_code == 403
    ok = client.get("/rq/", headers={"X-API-Key": "k-ops"})
    assert ok.status_code == 200 and b"<html" in ok.data.lower()
    listed = client.get("/rq/0/data/queues.json", headers={"X-API-Key": "k-ops"}).get_json()
    assert queues.queue_name(settings, queues.WEBHOOKS) in [q["name"] for q in listed["queues"]]


def test_live_workers_and_failed_jobs_show(settings, redis_url, queued_job):
    from rq.job import Job
    from rq.registry import FailedJobRegistry

    from workers import worker as worker_mod

    rq_redis = redis_lib.Redis.from_url(redis_url)
    qname = queues.queue_name(settings, queues.WEBHOOKS)
    job = Job.fetch(queued_job, connection=rq_redis, serializer=queues.SERIALIZER)
    FailedJobRegistry(qname, connection=rq_redis, serializer=queues.SERIALIZER).add(
        job, exc_string="WebhookError: POST answered 500"
    )
    w = worker_mod.build(settings, redis_url)
    w.register_birth()
    try:
        client = _app(settings, redis_url).test_client()
        workers = client.get("/rq/0/data/workers.json").get_json()["workers"]
        assert [sorted(x["queues"]) for x in workers] == [sorted(w.queue_names())]
        failed = client.get(f"/rq/0/data/jobs/{qname}/failed/8/asc/1.json").get_json()
        assert [j["id"] for j in failed["jobs"]] == [queued_job]
        assert client.get(f"/rq/0/view/jobs/{qname}/failed/8/asc/1").status_code == 200
    finally:
        w.register_death()
        rq_redis.close()


@pytest.mark.parametrize(
    "url, shown, password",
    [
        ("unix:///run/redis.sock?password=p%26w&db=1", "unix:///run/redis.sock?db=1", "p&w"),
        ("redis://default:p%40w@h:6379/0", "redis://default@h:6379/0", "p@w"),
        ("redis://:pw@[::1]:6379/0", "redis://[::1]:6379/0", "pw"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock", None),
        ("rediss://h/0?ssl_cert_reqs=none", "rediss://h/0?ssl_cert_reqs=none", None),
    ],
)
def test_the_dashboard_gets_its_url_without_the_password(settings, url, shown, password):
    """What rq-dashboard shows at the top of its pages has no password; it connects with the
    password given apart (tests/test_dashboard_browser.py reads a real Redis that way)."""
    app = Flask("dash-url")
    assert dashboard.init_app(app, settings, url)
    assert app.config["RQ_DASHBOARD_REDIS_URL"] == [shown]
    assert app.config["RQ_DASHBOARD_REDIS_PASSWORD"] == password


def _failed(settings, redis_url, job_id):
    from rq.job import Job
    from rq.registry import FailedJobRegistry

    rq_redis = redis_lib.Redis.from_url(redis_url)
    qname = queues.queue_name(settings, queues.WEBHOOKS)
    registry = FailedJobRegistry(qname, connection=rq_redis, serializer=queues.SERIALIZER)
    job = Job.fetch(job_id, connection=rq_redis, serializer=queues.SERIALIZER)
    registry.add(job, exc_string="WebhookError: POST answered 500")
    return qname, registry


def test_requeue_all_is_a_post_only(settings, redis_url, queued_job):
    """rq-dashboard answers GET /rq/requeue/<queue> too: a GET changes nothing by the rules
    the session cookie follows (no CSRF token, no Origin), so a link or an <img> on any page
    of the site requeued every failed job of a queue with an admin's cookie. GET is refused;
    the dashboard's own button posts."""
    from app import create_app

    s = settings.replace(
        dashboard={"enabled": True},
        auth={"enabled": True, "api_keys": {"k-ops": "ops"}, "admins": ["ops"]},
    )
    qname, failed = _failed(settings, redis_url, queued_job)
    browser = create_app(s, redis_url=redis_url).test_client()
    signed = browser.post("/login", data={"api_key": "k-ops", "next": "/rq/"})
    assert signed.status_code == 303
    got = browser.get(f"/rq/requeue/{qname}")
    assert got.status_code == 405 and got.get_json()["error"]["code"] == "method_not_allowed"
    assert failed.get_job_ids() == [queued_job]
    page = browser.post(f"/rq/requeue/{qname}", headers={"Origin": "http://localhost"})
    assert page.get_json() == {"status": "OK", "count": 1}
    assert failed.get_job_ids() == []


def test_other_sites_cannot_drive_the_dashboard_even_with_auth_off(settings, redis_url, queued_job):
    """/admin refuses a request from another site's page with auth off too (an operator's
    browser can reach an API that the other site cannot); /rq's requeue and compact did not."""
    from app import create_app

    client = create_app(settings, redis_url=redis_url).test_client()
    qname, failed = _failed(settings, redis_url, queued_job)
    evil = {"Origin": "https://evil.example"}
    for path in (f"/rq/requeue/{qname}", f"/rq/job/{queued_job}/requeue"):
        got = client.post(path, headers=evil)
        assert got.status_code == 403 and got.get_json()["error"]["code"] == "forbidden"
    assert client.get("/rq/0/data/queues.json", headers=evil).status_code == 403
    assert failed.get_job_ids() == [queued_job]
    ours = client.post(f"/rq/requeue/{qname}", headers={"Origin": "http://localhost"})
    assert ours.get_json() == {"status": "OK", "count": 1}


def test_a_job_that_is_gone_or_another_instance_is_a_404_not_a_500(settings, redis_url, caplog):
    """A link to a job that has since expired (finished deliveries are kept for a while) or
    to an instance other than /rq/0 answered 500 internal_error and logged a stack trace."""
    import logging

    from app import create_app

    client = create_app(settings, redis_url=redis_url).test_client()
    caplog.set_level(logging.ERROR)
    for path in (
        "/rq/0/view/job/webhook-gone",
        "/rq/0/data/job/webhook-gone.json",
        "/rq/1/view/queues",
        "/rq/7/data/queues.json",
    ):
        got = client.get(path)
        assert got.status_code == 404 and got.get_json()["error"]["code"] == "not_found", path
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class _TlsProxy:
    """A TLS endpoint on 127.0.0.1 in front of the test Redis (whose build has no TLS): what
    a ``rediss://`` URL needs to be read for real."""

    def __init__(self, tmp_path, target_port):
        import socket
        import ssl
        import subprocess
        import threading

        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.crt")  # fmt: skip
        # the client's key is encrypted: redis-py needs ssl_password to load it
        openssl("req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=client",
                "-passout", f"pass:{TLS_KEY_PASSPHRASE}", "-keyout", "client.key",
                "-out", "client.crt")  # fmt: skip
        self.client_cert, self.client_key = tmp_path / "client.crt", tmp_path / "client.key"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    s.close()

        def serve():
            while True:
                try:
                    conn, _ = self.listener.accept()
                    tls = context.wrap_socket(conn, server_side=True)
                except OSError:
                    if self.listener.fileno() == -1:
                        return
                    continue
                upstream = socket.create_connection(("127.0.0.1", target_port))
                threading.Thread(target=pipe, args=(tls, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, tls), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def url(self, passphrase):
        return (
            f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=none&ssl_certfile={self.client_cert}"
            f"&ssl_keyfile={self.client_key}&ssl_password={passphrase}"
        )


TLS_KEY_PASSPHRASE = "tls-key-s3cret"


def test_no_page_shows_a_secret_query_argument_and_the_dashboard_still_connects(
    settings, redis_url, tmp_path
):
    """rq-dashboard has no setting for ``ssl_password`` (the passphrase of the TLS client key)
    and builds its client from the URL on every request, so the argument stays in its URL; its
    pages, which list that URL, show ``ssl_password=***`` and still read Redis through TLS."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = _TlsProxy(tmp_path, port)
    try:
        url = proxy.url(TLS_KEY_PASSPHRASE)
        via_tls = redis_lib.Redis.from_url(url)
        entry = {"event_id": "ev1", "event": "allocated", "request_id": "svc-1", "ts": 1.0}
        via_tls.rpush(Keys(settings.redis.prefix).webhook_outbox(), json.dumps(entry))
        outbox.dispatch(via_tls, settings)
        with pytest.raises(redis_lib.ConnectionError, match="SSL"):  # the passphrase opens the key
            redis_lib.Redis.from_url(proxy.url("wrong")).ping()
        client = _app(settings, url).test_client()
        qname = queues.queue_name(settings, queues.WEBHOOKS)
        job = outbox.job_id_for("ev1")
        for path in (
            "/rq/",
            "/rq/0/view/workers",
            f"/rq/0/view/jobs/{qname}/queued/8/asc/1",
            f"/rq/0/view/job/{job}",
        ):
            resp = client.get(path)
            page = resp.get_data(as_text=True)
            assert resp.status_code == 200 and "<html" in page.lower(), path
            assert f"127.0.0.1:{proxy.port}" in page and "ssl_password=***" in page, path
            assert TLS_KEY_PASSPHRASE not in page, path
        listed = client.get("/rq/0/data/queues.json").get_json()
        assert {"name": qname, "count": 1} in [
            {"name": q["name"], "count": q["count"]} for q in listed["queues"]
        ]
        via_tls.close()
    finally:
        proxy.listener.close()
