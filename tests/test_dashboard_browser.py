"""rq-dashboard under /rq in a real browser (headless Chromium), as an admin signed in with
the console's cookie: what a hostile tenant can put on its pages shows as text, and the pages
never show the Redis password."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import requests

from app import create_app, outbox, queues
from app.keys import Keys
from tests.api_support import deliver_all, register_fleet
from tests.browser_support import LiveServer, browser  # noqa: F401 (a fixture)
from tests.test_console_browser import text_of, wait_for

ADMIN_KEY = "k-ops-admin"
#: What a hostile receiver answers instead of a status line; it ends up in the failed job's
#: exception text ("not an HTTP response: '...'"), which the job page shows.
PAYLOAD = "<img src=x onerror=document.title='pwned'>"
pytestmark = pytest.mark.slow


def secured(settings, **overrides):
    return settings.replace(
        dashboard={"enabled": True},
        auth={"enabled": True, "api_keys": {ADMIN_KEY: "ops"}, "admins": ["ops"]},
        **overrides,
    )


def sign_in(browser, live, path):
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/login?next=" + path)
    browser.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "sign-in").click()
    wait_for(lambda: browser.current_url == live.url + path, f"the redirect to {path}")


class HostileReceiver:
    """Answers every connection with ``answer`` and two line ends, then closes."""

    def __init__(self, answer: str):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.answer = answer.encode() + b"\r\n\r\n"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()


def test_a_receivers_answer_shows_as_text_on_the_failed_jobs_page(browser, settings, redis_url):
    """A tenant's webhook receiver controls the text of its delivery's failure; rq-dashboard's
    job page wrote that text as HTML (an admin opening the failed job ran the tenant's
    script in the orchestrator's origin, with the admin's session)."""
    from rq.registry import FailedJobRegistry

    st = secured(settings, webhooks={"retry_intervals": ["0s"]})  # one retry, at once
    app = create_app(st, redis_url=redis_url)
    register_fleet(app, (("node-a", 1),))
    with HostileReceiver(PAYLOAD) as rx, LiveServer(app) as live:

        def call(path, body):
            return requests.post(
                live.url + path, json=body, headers={"X-API-Key": ADMIN_KEY}, timeout=10
            )

        # the tenant's request waits for the one GPU; its grant is a webhook to its receiver
        first = call("/gpu/allocate", {"service_name": "first"})
        assert first.status_code == 200, first.text
        queued = call("/gpu/allocate", {"service_name": "mallory", "webhook_url": rx.url})
        assert queued.status_code == 202, queued.text
        assert call("/gpu/release", {"allocation_id": first.json()["id"]}).status_code == 200
        deliver_all(app)
        qname = queues.queue_name(settings, queues.WEBHOOKS)
        failed = FailedJobRegistry(
            qname, connection=app.extensions["gpu_rq_redis"], serializer=queues.SERIALIZER
        ).get_job_ids()
        assert len(failed) == 1
        sign_in(browser, live, f"/rq/0/view/job/{failed[0]}")
        shown = wait_for(
            lambda: (
                "not an HTTP response" in text_of(browser, ".exc_info")
                and text_of(browser, ".exc_info")
            ),
            "the failure on the job page",
        )
        assert browser.title != "pwned"  # the receiver's script did not run
        assert PAYLOAD in shown  # its answer shows as text
        assert (
            browser.execute_script("return document.querySelectorAll('#job-data img').length") == 0
        )


@pytest.mark.parametrize(
    "form",
    [
        "redis://default@{host}/0?password=s3cret-pw",  # the password as a query argument
        "redis://default:s3cret-pw@{host}/0",
    ],
)
def test_the_dashboard_never_shows_the_redis_password(browser, settings, redis_url, form):
    """rq-dashboard lists its Redis URL at the top of every page and hides only a password
    between ``://`` and ``@``: one given as ``?password=`` (redis-py's other spelling, the
    only one for a unix socket) was shown. The default user of the test Redis has no
    password, so any password authenticates and the pages must still read Redis."""
    from selenium.webdriver.common.by import By

    url = form.format(host=redis_url.split("//")[1].split("/")[0])
    st = secured(settings).replace(redis={"url": url})
    app = create_app(st, redis_url=url)
    rq_redis = app.extensions["gpu_rq_redis"]
    entry = {"event_id": "ev1", "event": "allocated", "request_id": "svc-1", "ts": 1.0}
    rq_redis.rpush(Keys(st.redis.prefix).webhook_outbox(), json.dumps(entry))
    outbox.dispatch(rq_redis, st)  # a job on the webhooks queue: a queue the page lists
    with LiveServer(app) as live:
        sign_in(browser, live, "/rq/")
        wait_for(
            lambda: queues.queue_name(st, queues.WEBHOOKS) in text_of(browser, "#queues"),
            "the queues read from Redis",
        )
        shown = browser.find_element(By.ID, "rq-instances").text
        assert "redis://" in shown and "127.0.0.1" in shown
        assert "s3cret-pw" not in browser.page_source


def test_the_dashboards_own_requeue_all_button_still_works(browser, settings, redis_url):
    """/rq refuses other sites' requests and a GET requeue; its own button (a POST from its
    page, which carries our Origin but not our CSRF token) still requeues."""
    from rq.job import Job
    from rq.registry import FailedJobRegistry
    from selenium.webdriver.common.by import By

    st = secured(settings)
    app = create_app(st, redis_url=redis_url)
    rq_redis = app.extensions["gpu_rq_redis"]
    entry = {"event_id": "ev1", "event": "allocated", "request_id": "svc-1", "ts": 1.0}
    rq_redis.rpush(Keys(st.redis.prefix).webhook_outbox(), json.dumps(entry))
    outbox.dispatch(rq_redis, st)
    qname = queues.queue_name(st, queues.WEBHOOKS)
    failed = FailedJobRegistry(qname, connection=rq_redis, serializer=queues.SERIALIZER)
    job = Job.fetch(outbox.job_id_for("ev1"), connection=rq_redis, serializer=queues.SERIALIZER)
    failed.add(job, exc_string="WebhookError: POST answered 500")
    with LiveServer(app) as live:
        sign_in(browser, live, f"/rq/0/view/jobs/{qname}/failed/8/asc/1")
        wait_for(lambda: job.id in text_of(browser, "#jobs"), "the failed job in the list")
        browser.find_element(By.ID, "requeue-all-btn").click()
        wait_for(
            lambda: browser.find_element(By.ID, "confirmation-modal-yes").is_displayed(),
            "the confirmation",
        )
        browser.find_element(By.ID, "confirmation-modal-yes").click()
        wait_for(lambda: failed.get_job_ids() == [], "the job to leave the failed registry")


@pytest.mark.parametrize("path", ["/rq/", "/docs", "/"])
def test_no_other_page_can_frame_the_console_the_dashboard_or_the_docs(
    browser, settings, redis_url, path
):
    """With auth off no cookie is needed, so another site's page could show /rq (Requeue All,
    Compact) or /docs (Try it out) in a frame and steer an operator's clicks onto them; every
    HTML page refuses to be framed, as the console's already did."""
    from flask import Flask
    from selenium.webdriver.common.by import By

    app = create_app(settings, redis_url=redis_url)
    other = Flask("another-site")  # another origin (its own port)
    with LiveServer(app) as live, LiveServer(other) as site:
        assert requests.get(live.url + path, timeout=10).status_code == 200
        other.add_url_rule("/", "page", lambda: f"<iframe id='f' src='{live.url}{path}'></iframe>")
        browser.get(site.url + "/")
        browser.switch_to.frame(browser.find_element(By.ID, "f"))
        shown = wait_for(
            lambda: browser.execute_script(
                "return document.readyState === 'complete' && location.href"
            ),
            "the frame to settle",
        )
        browser.switch_to.default_content()
        assert not shown.startswith(live.url), f"{path} was shown in another page's frame"


def test_the_workers_page_shows_what_it_lists_as_text(browser, settings, redis_url):
    """The workers page writes each worker's fields (name, queues, the job it runs with its
    arguments: a gpu_unhealthy delivery's hold a node name, which a monitor reports with any
    printable character but '|' and '%') into the page as HTML."""
    from rq import Queue, Worker

    name = "<b>w1</b>"  # no '=' or space: Redis's CLIENT LIST would not parse the name
    st = secured(settings)
    app = create_app(st, redis_url=redis_url)
    rq_redis = app.extensions["gpu_rq_redis"]
    q = Queue(queues.queue_name(st, queues.WEBHOOKS), connection=rq_redis)
    worker = Worker([q], name=name, connection=rq_redis, serializer=queues.SERIALIZER)
    worker.register_birth()
    try:
        with LiveServer(app) as live:
            sign_in(browser, live, "/rq/0/view/workers")
            wait_for(lambda: name in text_of(browser, "#workers"), "the worker, as text")
            assert (
                browser.execute_script("return document.querySelectorAll('#workers img').length")
                == 0
            )
            assert browser.title != "pwned"
    finally:
        worker.register_death()
