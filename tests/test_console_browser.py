"""The operators' console in a real browser (headless Chromium): sign in with a key, see the
fleet, watch an allocation made through the API appear without a reload, drain a node with a
button, read at phone width, sign out. Screenshots go to the test's tmp dir, and to
``GPUO_SCREENSHOTS`` when set (docs/images holds the ones docs/operations.md shows)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import requests

from app import create_app
from app.engine import Engine
from tests.api_support import register_fleet
from tests.browser_support import LiveServer, browser  # noqa: F401 (a fixture)

ADMIN_KEY, USER_KEY = "k-ops-admin", "k-alice-user"
pytestmark = pytest.mark.slow


@pytest.fixture
def live(settings, redis_url):
    st = settings.replace(
        dashboard={"enabled": False},
        scheduler={"node_heartbeat_timeout": "10m", "node_forget_after": "1h"},
        auth={
            "enabled": True,
            "api_keys": {ADMIN_KEY: "ops", USER_KEY: "alice"},
            "admins": ["ops"],
        },
    )
    app = create_app(st, redis_url=redis_url)
    register_fleet(app, (("gpu-node-1", 4),))
    # a node that last reported 12 minutes ago: shown, not alive
    from workers.simulated import fleet

    old = Engine(app.extensions["gpu_engine"].redis, st, clock=lambda: time.time() - 720)
    for node, gpus in fleet({"nodes": [{"name": "gpu-node-2", "count": 2}]}).items():
        old.report_node(node, gpus)
    with LiveServer(app) as server:
        yield server


def api(live, method, path, key=USER_KEY, **kw):
    return requests.request(method, live.url + path, headers={"X-API-Key": key}, timeout=10, **kw)


#: The elements wider than the window (names what breaks the layout when the check fails).
OVERFLOW = """return [window.innerWidth, document.documentElement.scrollWidth].concat(
  Array.from(document.querySelectorAll('body *')).filter(function (e) {
    return e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest('.scroll');
  }).slice(0, 5).map(function (e) { return e.tagName + '.' + e.className + '#' + e.id; }));"""


def wait_for(check, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # the DOM is redrawn under us: retry
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def shot(drv, tmp_path, name):
    path = tmp_path / name
    drv.save_screenshot(str(path))
    out = os.environ.get("GPUO_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, name))
    return path


def text_of(drv, css):
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in drv.find_elements(By.CSS_SELECTOR, css))


def test_sign_in_see_the_fleet_and_a_new_allocation_without_reload(browser, live, tmp_path):
    from selenium.webdriver.common.by import By

    held = api(
        live,
        "POST",
        "/gpu/allocate",
        json={
            "service_name": "training-job",
            "workload_type": "training",
            "workload_data": {"required_gpus": 2, "min_memory_mb": 40000},
            "ttl_seconds": 3600,
        },
    )
    assert held.status_code == 200, held.text
    waiting = api(
        live,
        "POST",
        "/gpu/allocate",
        json={"service_name": "big-finetune", "workload_data": {"required_gpus": 4}, "priority": 6},
    )
    assert waiting.status_code == 202, waiting.text

    # no session: the browser lands on the sign-in form, not on a JSON 401
    browser.get(live.url + "/")
    assert browser.current_url.startswith(live.url + "/login")
    browser.find_element(By.ID, "api_key").send_keys("not-a-key")
    browser.find_element(By.ID, "sign-in").click()
    # the click posts the form; the answer is a new page, which may not have loaded yet
    wait_for(lambda: "not valid" in text_of(browser, "#login-error"), "the sign-in error")
    shot(browser, tmp_path, "console-login.png")
    browser.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "sign-in").click()
    assert wait_for(lambda: browser.current_url == live.url + "/", "the redirect back to /")

    # the fleet: both nodes, the silent one marked, the holder and the queue with its reason
    wait_for(
        lambda: "training-job" in text_of(browser, "[data-node='gpu-node-1'] .holder"),
        "the holder of gpu-node-1's GPUs",
    )
    assert "silent" in text_of(browser, "[data-node='gpu-node-2'] .marks")
    assert "alive" in text_of(browser, "[data-node='gpu-node-1'] .marks")
    assert "ops (admin)" in browser.find_element(By.ID, "principal").text
    queue = text_of(browser, "#queue tbody")
    assert "big-finetune" in queue
    # the server's reason (app/waiting.py), the one the API gives for the request
    assert (
        waiting.json()["reason"] == "capacity"
        and waiting.json()["eta"] == held.json()["expires_at"]
    )
    assert text_of(browser, f"tr[data-request='{waiting.json()['id']}'] .reason") == "capacity"
    assert "2 / 4 GPUs free" in browser.find_element(By.ID, "summary").text
    browser.execute_script("window.__noReload = 'still here';")
    shot(browser, tmp_path, "console-fleet.png")

    # an allocation made through the API appears without a reload
    new = api(
        live, "POST", "/gpu/allocate", json={"service_name": "inference-api", "ttl_seconds": 600}
    )
    assert new.status_code == 200, new.text
    gpu = f"gpu-node-1/{new.json()['gpu_ids'][0]}"
    wait_for(
        lambda: "inference-api" in text_of(browser, f"tr[data-gpu='{gpu}'] .holder"),
        "the new allocation on the page",
    )
    assert "alice" in text_of(browser, f"tr[data-gpu='{gpu}'] .holder")
    assert browser.execute_script("return window.__noReload") == "still here"
    wait_for(
        lambda: "allocated" in text_of(browser, "#events li[data-event='allocated']"),
        "the grant in the latest events",
    )

    # a drain preempts every holder on the node: the button asks first, and a "no" drains
    # nothing (one stray click next to Cordon used to give every holder notice at once)
    drain = "[data-node='gpu-node-1'] [data-action='drain-node']"
    browser.find_element(By.CSS_SELECTOR, drain).click()
    question = wait_for(lambda: browser.switch_to.alert, "the drain's confirmation", timeout=5)
    assert "gpu-node-1" in question.text and "preempt" in question.text
    question.dismiss()
    time.sleep(1)  # a drain sent anyway would show in the API by now
    nodes = {n["name"]: n for n in api(live, "GET", "/admin/nodes", key=ADMIN_KEY).json()["nodes"]}
    assert not nodes["gpu-node-1"]["draining"] and not nodes["gpu-node-1"]["cordoned"]
    assert api(live, "GET", f"/gpu/allocations/{held.json()['id']}").json()["status"] == (
        "allocated"
    )
    # yes: the node drains; the action is an event naming the admin
    browser.find_element(By.CSS_SELECTOR, drain).click()
    wait_for(lambda: browser.switch_to.alert, "the drain's confirmation", timeout=5).accept()
    wait_for(
        lambda: "draining" in text_of(browser, "[data-node='gpu-node-1'] .marks"),
        "the draining mark",
    )
    wait_for(
        lambda: "by ops" in text_of(browser, "#events li[data-event='node_draining']"),
        "the drain event naming ops",
    )
    nodes = {n["name"]: n for n in api(live, "GET", "/admin/nodes", key=ADMIN_KEY).json()["nodes"]}
    assert nodes["gpu-node-1"]["draining"] and not nodes["gpu-node-2"]["draining"]
    assert browser.execute_script("return window.__noReload") == "still here"
    shot(browser, tmp_path, "console-drain.png")

    # phone width: nothing sticks out sideways (wide tables scroll inside their box)
    browser.set_window_size(390, 844)
    try:
        wait_for(
            lambda: browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            ),
            "the page to fit a phone's width",
            timeout=5,
        )
    except AssertionError:
        raise AssertionError(f"wider than a phone: {browser.execute_script(OVERFLOW)}") from None
    shot(browser, tmp_path, "console-phone.png")

    # sign out: the cookie is gone, the page sends the browser back to /login
    browser.set_window_size(1280, 800)
    browser.find_element(By.ID, "sign-out").click()
    wait_for(lambda: "/login" in browser.current_url, "the sign-in page after sign-out")
    browser.get(live.url + "/")
    assert "/login" in browser.current_url


def test_a_user_sees_the_fleet_without_admin_buttons(browser, live):
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/login?next=/")
    browser.find_element(By.ID, "api_key").send_keys(USER_KEY)
    browser.find_element(By.ID, "sign-in").click()
    wait_for(lambda: text_of(browser, "[data-node='gpu-node-1']"), "the fleet")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-action]") == []
    assert "alice" in browser.find_element(By.ID, "principal").text
    assert "(admin)" not in browser.find_element(By.ID, "principal").text
    # the cookie opens /docs too, and /rq stays admin-only
    browser.get(live.url + "/docs")
    assert "swagger" in browser.page_source.lower()


def test_a_long_node_name_fits_a_phone(browser, settings, redis_url):
    """Node names are host names (up to 253 characters, no spaces), which a browser does not
    break at a dot: a name such as dgxa100node0017.gpucluster.research.example.edu made the
    whole page wider than a phone, and a longer one wider than a laptop's window."""
    from workers.simulated import fleet

    cloud = "dgxa100node0017.gpucluster.research.example.edu"
    longest = ".".join(["dgxa100node0017rack0042row0007hall0003"] * 7)[:253]
    st = settings.replace(
        dashboard={"enabled": False},
        auth={"enabled": True, "api_keys": {ADMIN_KEY: "ops"}, "admins": ["ops"]},
    )
    app = create_app(st, redis_url=redis_url)
    engine = app.extensions["gpu_engine"]
    for node, gpus in fleet({"nodes": [{"name": cloud}, {"name": longest}]}).items():
        engine.report_node(node, gpus, backend="nvml", host=node)
    with LiveServer(app) as live:
        from selenium.webdriver.common.by import By

        browser.get(live.url + "/login?next=/")
        browser.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
        browser.find_element(By.ID, "sign-in").click()
        wait_for(lambda: cloud in text_of(browser, f"[data-node='{cloud}'] h3"), "the nodes")
        for width, height in ((1280, 800), (390, 844)):
            browser.set_window_size(width, height)
            try:
                wait_for(
                    lambda: browser.execute_script(
                        "return document.documentElement.scrollWidth <= window.innerWidth"
                    ),
                    f"the page to fit {width} px",
                    timeout=5,
                )
            except AssertionError:
                raise AssertionError(
                    f"wider than {width} px: {browser.execute_script(OVERFLOW)}"
                ) from None
        # the whole name is still there to read (wrapped, not cut)
        assert text_of(browser, f"[data-node='{longest}'] h3").replace("\n", "") == longest


def test_the_queue_keeps_updating_after_a_priority_is_set(browser, live):
    """The queue is not redrawn while a priority is being typed. Chromium leaves the focus on
    the Set button after its click, and that counted as typing: from then on the queue never
    changed (a newly queued request never appeared, the new order never showed) while the
    page still said "updated" every two seconds."""
    from selenium.webdriver.common.by import By

    held = api(live, "POST", "/gpu/allocate", json={"service_name": "holder", "required_gpus": 4})
    assert held.status_code == 200, held.text
    ids = []
    for name in ("first", "second"):
        got = api(live, "POST", "/gpu/allocate", json={"service_name": name, "required_gpus": 4})
        assert got.status_code == 202, got.text
        ids.append(got.json()["id"])
    browser.get(live.url + "/login?next=/")
    browser.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "sign-in").click()
    wait_for(lambda: ids[1] in text_of(browser, "#queue tbody"), "the queue")
    row = f"#queue tr[data-request='{ids[1]}']"
    box = browser.find_element(By.CSS_SELECTOR, row + " input.prio")
    box.clear()
    box.send_keys("9")
    browser.find_element(By.CSS_SELECTOR, row + " [data-action='set-priority']").click()
    wait_for(lambda: "done" in text_of(browser, "#notice"), "the priority change")
    late = api(live, "POST", "/gpu/allocate", json={"service_name": "late", "required_gpus": 4})
    assert late.status_code == 202, late.text
    wait_for(lambda: "late" in text_of(browser, "#queue tbody"), "the newly queued request")
    # the raised request now heads the queue
    wait_for(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, "#queue tbody tr").get_attribute("data-request")
            == ids[1]
        ),
        "the new order",
    )


@pytest.mark.parametrize("dashboard", [True, False])
def test_the_jobs_link_is_there_only_when_the_dashboard_is(browser, settings, redis_url, dashboard):
    """An admin's "Jobs" link led to a JSON 404 when the deployment runs without rq-dashboard
    (dashboard.enabled: false)."""
    from selenium.webdriver.common.by import By

    st = settings.replace(
        dashboard={"enabled": dashboard},
        auth={"enabled": True, "api_keys": {ADMIN_KEY: "ops"}, "admins": ["ops"]},
    )
    with LiveServer(create_app(st, redis_url=redis_url)) as server:
        browser.get(server.url + "/login?next=/")
        browser.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
        browser.find_element(By.ID, "sign-in").click()
        wait_for(lambda: "ops (admin)" in text_of(browser, "#principal"), "the fleet page")
        links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "nav.who a")]
        assert ("Jobs" in links) == dashboard, links
        if dashboard:
            browser.find_element(By.LINK_TEXT, "Jobs").click()
            wait_for(lambda: browser.title == "RQ dashboard", "rq-dashboard")


def test_another_site_cannot_sign_you_out(browser, live):
    """Sign-out checked the CSRF token only when the cookie came with the request, and a
    SameSite=Strict cookie never comes with another site's form: its answer cleared the cookie
    anyway, so any page could sign an operator out of the console."""
    from flask import Flask
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/login?next=/")
    browser.find_element(By.ID, "api_key").send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "sign-in").click()
    wait_for(lambda: "ops (admin)" in text_of(browser, "#principal"), "the fleet page")
    other = Flask("another-site")  # localhost: another site than 127.0.0.1
    other.add_url_rule(
        "/",
        "page",
        lambda: (
            f"<form id='f' method='post' action='{live.url}/logout'></form>"
            "<script>document.getElementById('f').submit()</script>"
        ),
    )
    with LiveServer(other) as site:
        browser.get(site.url.replace("127.0.0.1", "localhost") + "/")
        wait_for(lambda: browser.current_url.startswith(live.url), "the other site's form post")
    browser.get(live.url + "/")
    wait_for(lambda: "ops (admin)" in text_of(browser, "#principal"), "still signed in")
    assert browser.current_url == live.url + "/"
