"""A real headless Chromium for the console tests (imported, not a conftest).

Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them) driven by
Selenium through the system chromedriver: nothing is downloaded at test time. Without them the
tests skip and say why; with ``CI=true`` a missing browser fails the run instead.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

#: Flags for a quiet, sandbox-free headless run that never talks to the network by itself.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str | None, str | None, str]:
    """(browser, chromedriver, why not) from CHROME_BIN / CHROMEDRIVER or the PATH."""
    browser = os.environ.get("CHROME_BIN") or next(
        (p for p in map(shutil.which, BROWSERS) if p), None
    )
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser:
        return None, None, "no Chromium found (apt-get install chromium chromium-driver)"
    if not driver:
        return browser, None, "no chromedriver found (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return browser, driver, "selenium is not installed (pip install -e .[test])"
    return browser, driver, ""


def require_browser() -> tuple[str, str]:
    """The browser and driver paths, or skip (fail under CI=true) saying what is missing."""
    browser, driver, why = find_browser()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the browser tests: {why}")
        pytest.skip(why)
    return browser, driver


def start_chromium(browser: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture
def browser():
    """Headless Chromium for one test (without one: see require_browser)."""
    binary, driver = require_browser()
    drv = start_chromium(binary, driver)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


class LiveServer:
    """The Flask app on a free loopback port in a thread (werkzeug's threaded server)."""

    def __init__(self, app):
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args, **kwargs):  # no access lines in the test output
                pass

        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join(10)
